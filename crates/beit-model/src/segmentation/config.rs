//! [`SegmentationConfig`]: the semantic-segmentation fields of a BEiT `config.json`.
//!
//! They are read from the fields [`BeitConfig`] keeps verbatim in [`BeitConfig::extra`], so a
//! config round-trips unchanged whichever spelling it used, and written back there by
//! [`SegmentationConfig::store`].

use serde_json::{json, Value};

use crate::config::BeitConfig;
use crate::error::{BeitError, Result};

/// Settings of `BeitForSemanticSegmentation` (names and defaults of `transformers.BeitConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentationConfig {
    /// Which hidden states feed the four neck branches, `transformers`' indexing: the entry `k`
    /// selects `hidden_states[k - 1]`, i.e. the output of block `k - 1` counting blocks from 1
    /// (`hidden_states[0]` is the embedding output). unilm/mmseg's `out_indices` take the output of
    /// block `k` counting from 0, one block later: the same numbers select different layers.
    /// Read from `out_indices`, else `semantic_out_indices`, else `segmentation_indices`.
    pub out_indices: Vec<usize>,
    /// Output sizes of the pyramid pooling module (`[1, 2, 3, 6]`).
    pub pool_scales: Vec<usize>,
    /// Whether the FCN auxiliary head exists.
    pub use_auxiliary_head: bool,
    /// Weight of the auxiliary loss (0.4).
    pub auxiliary_loss_weight: f64,
    /// Width of the auxiliary head (256).
    pub auxiliary_channels: usize,
    /// Number of 3x3 conv blocks in the auxiliary head (1).
    pub auxiliary_num_convs: usize,
    /// Whether the auxiliary head concatenates its input before the classifier (`conv_cat`).
    pub auxiliary_concat_input: bool,
    /// Label value the loss ignores (255).
    pub semantic_loss_ignore_index: i64,
}

impl Default for SegmentationConfig {
    fn default() -> Self {
        Self {
            out_indices: vec![3, 5, 7, 11],
            pool_scales: vec![1, 2, 3, 6],
            use_auxiliary_head: true,
            auxiliary_loss_weight: 0.4,
            auxiliary_channels: 256,
            auxiliary_num_convs: 1,
            auxiliary_concat_input: false,
            semantic_loss_ignore_index: 255,
        }
    }
}

fn config_error(message: String) -> BeitError {
    BeitError::Config {
        path: None,
        message,
    }
}

fn usize_list(name: &str, v: &Value) -> Result<Vec<usize>> {
    v.as_array()
        .and_then(|a| {
            a.iter()
                .map(|x| x.as_u64().map(|x| x as usize))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| {
            config_error(format!(
                "`{name}` must be a list of non-negative integers, got {v}"
            ))
        })
}

impl SegmentationConfig {
    /// Read the segmentation fields of `cfg` (defaults for absent ones) and validate them against
    /// the backbone: four indices in `1..=num_hidden_layers`, positive pool scales.
    pub fn from_config(cfg: &BeitConfig) -> Result<Self> {
        let mut s = Self::default();
        let extra = &cfg.extra;
        let get = |k: &str| extra.get(k).filter(|v| !v.is_null());
        if let Some((name, v)) = [
            "out_indices",
            "semantic_out_indices",
            "segmentation_indices",
        ]
        .iter()
        .find_map(|k| get(k).map(|v| (*k, v)))
        {
            s.out_indices = usize_list(name, v)?;
        }
        if let Some(v) = get("pool_scales") {
            s.pool_scales = usize_list("pool_scales", v)?;
        }
        let boolean = |name: &str, v: &Value| {
            v.as_bool()
                .ok_or_else(|| config_error(format!("`{name}` must be true or false, got {v}")))
        };
        let count = |name: &str, v: &Value| {
            v.as_u64().map(|x| x as usize).ok_or_else(|| {
                config_error(format!("`{name}` must be a non-negative integer, got {v}"))
            })
        };
        if let Some(v) = get("use_auxiliary_head") {
            s.use_auxiliary_head = boolean("use_auxiliary_head", v)?;
        }
        if let Some(v) = get("auxiliary_concat_input") {
            s.auxiliary_concat_input = boolean("auxiliary_concat_input", v)?;
        }
        if let Some(v) = get("auxiliary_loss_weight") {
            s.auxiliary_loss_weight = v.as_f64().ok_or_else(|| {
                config_error(format!("`auxiliary_loss_weight` must be a number, got {v}"))
            })?;
        }
        if let Some(v) = get("auxiliary_channels") {
            s.auxiliary_channels = count("auxiliary_channels", v)?;
        }
        if let Some(v) = get("auxiliary_num_convs") {
            s.auxiliary_num_convs = count("auxiliary_num_convs", v)?;
        }
        if let Some(v) = get("semantic_loss_ignore_index") {
            s.semantic_loss_ignore_index = v.as_i64().ok_or_else(|| {
                config_error(format!(
                    "`semantic_loss_ignore_index` must be an integer, got {v}"
                ))
            })?;
        }
        s.validate(cfg)?;
        Ok(s)
    }

    /// Check the fields against the backbone `cfg`; the message names the field.
    pub fn validate(&self, cfg: &BeitConfig) -> Result<()> {
        if self.out_indices.len() != 4 {
            return Err(config_error(format!(
                "`out_indices` must list 4 layers for semantic segmentation (one per neck branch), got {:?}",
                self.out_indices
            )));
        }
        let l = cfg.num_hidden_layers;
        if let Some(bad) = self.out_indices.iter().find(|&&i| i == 0 || i > l) {
            return Err(config_error(format!(
                "`out_indices` entry {bad} is out of range: entries select hidden_states[k - 1] and \
                 must lie in 1..={l} for {l} layers"
            )));
        }
        if self.pool_scales.is_empty() || self.pool_scales.contains(&0) {
            return Err(config_error(format!(
                "`pool_scales` must be a non-empty list of positive sizes, got {:?}",
                self.pool_scales
            )));
        }
        if self.use_auxiliary_head && self.auxiliary_channels == 0 {
            return Err(config_error(
                "`auxiliary_channels` must be positive when `use_auxiliary_head` is true".into(),
            ));
        }
        if self.use_auxiliary_head && self.auxiliary_num_convs == 0 {
            // transformers then classifies the backbone features directly, whose width is
            // hidden_size, with a classifier built for auxiliary_channels: only equal widths work.
            if self.auxiliary_channels != cfg.hidden_size {
                return Err(config_error(format!(
                    "`auxiliary_num_convs` 0 needs `auxiliary_channels` == `hidden_size` ({}), got {}",
                    cfg.hidden_size, self.auxiliary_channels
                )));
            }
        }
        if !self.auxiliary_loss_weight.is_finite() {
            return Err(config_error(
                "`auxiliary_loss_weight` must be finite".into(),
            ));
        }
        Ok(())
    }

    /// Write these fields into `cfg.extra` under `transformers`' names (replacing the older
    /// spellings of `out_indices`), so that `config.json` carries them.
    pub fn store(&self, cfg: &mut BeitConfig) {
        let e = &mut cfg.extra;
        e.remove("semantic_out_indices");
        e.remove("segmentation_indices");
        e.insert("out_indices".into(), json!(self.out_indices));
        // transformers' backbone mixin keeps `out_features` aligned with `out_indices`.
        let features: Vec<String> = self
            .out_indices
            .iter()
            .map(|&i| format!("stage{i}"))
            .collect();
        e.insert("out_features".into(), json!(features));
        e.insert("pool_scales".into(), json!(self.pool_scales));
        e.insert("use_auxiliary_head".into(), json!(self.use_auxiliary_head));
        e.insert(
            "auxiliary_loss_weight".into(),
            json!(self.auxiliary_loss_weight),
        );
        e.insert("auxiliary_channels".into(), json!(self.auxiliary_channels));
        e.insert(
            "auxiliary_num_convs".into(),
            json!(self.auxiliary_num_convs),
        );
        e.insert(
            "auxiliary_concat_input".into(),
            json!(self.auxiliary_concat_input),
        );
        e.insert(
            "semantic_loss_ignore_index".into(),
            json!(self.semantic_loss_ignore_index),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> BeitConfig {
        BeitConfig::from_json_str(json).unwrap()
    }

    #[test]
    fn reads_every_spelling_and_defaults() {
        let base = r#""id2label": {"0": "a", "1": "b"}"#;
        let s = SegmentationConfig::from_config(&cfg(&format!("{{{base}}}"))).unwrap();
        assert_eq!(s, SegmentationConfig::default());
        for key in [
            "out_indices",
            "semantic_out_indices",
            "segmentation_indices",
        ] {
            let c = cfg(&format!(
                r#"{{{base}, "{key}": [1, 2, 3, 12], "pool_scales": [1, 3]}}"#
            ));
            let s = SegmentationConfig::from_config(&c).unwrap();
            assert_eq!(s.out_indices, vec![1, 2, 3, 12], "{key}");
            assert_eq!(s.pool_scales, vec![1, 3]);
        }
        // out_indices wins over the older spellings.
        let c = cfg(&format!(
            r#"{{{base}, "out_indices": [2, 4, 6, 8], "segmentation_indices": [1, 2, 3, 4]}}"#
        ));
        let mut c2 = c.clone();
        let s = SegmentationConfig::from_config(&c).unwrap();
        assert_eq!(s.out_indices, vec![2, 4, 6, 8]);
        s.store(&mut c2);
        assert!(!c2.extra.contains_key("segmentation_indices"));
        assert_eq!(SegmentationConfig::from_config(&c2).unwrap(), s);
    }

    #[test]
    fn errors_name_the_field() {
        let base = r#""id2label": {"0": "a", "1": "b"}"#;
        for (extra, field) in [
            (r#""out_indices": [3, 5, 7]"#, "out_indices"),
            (r#""out_indices": [0, 5, 7, 11]"#, "out_indices"),
            (r#""out_indices": [3, 5, 7, 13]"#, "out_indices"),
            (r#""pool_scales": [1, 0]"#, "pool_scales"),
            (r#""use_auxiliary_head": "yes""#, "use_auxiliary_head"),
            (
                r#""semantic_loss_ignore_index": 2.5"#,
                "semantic_loss_ignore_index",
            ),
        ] {
            let e = SegmentationConfig::from_config(&cfg(&format!("{{{base}, {extra}}}")))
                .unwrap_err()
                .to_string();
            assert!(e.contains(field), "{extra}: {e}");
        }
    }
}
