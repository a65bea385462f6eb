//! Parameter groups: layer ids, layer-wise lr decay and weight-decay exclusions, by parameter name.
//!
//! The rules follow the BEiT authors' fine-tuning code (unilm `optim_factory.py`), restated for
//! Hugging Face `transformers` key names (the names our model uses):
//!
//! * **Layer id** (with `L` transformer blocks): the embeddings (`cls_token`, `mask_token`,
//!   `position_embeddings`, `patch_embeddings.*`) get 0; everything under block `k`
//!   (`beit.encoder.layer.k.*`, including that block's own relative-position table) gets `k + 1`;
//!   the *shared* relative-position table and everything else (final norms, `lm_head`,
//!   `classifier`, `pixel_head`) get `L + 1`.
//! * **lr scale** of layer id `i`: `decay^(L + 1 - i)`, so the head trains at the full rate and the
//!   embeddings at `decay^(L+1)`. Without layer decay (pre-training) every scale is 1.
//! * **No weight decay** for every 1-D tensor (biases, LayerNorm weights, `lambda_*`), every name
//!   ending in `.bias`, and `cls_token` / `position_embeddings`. `mask_token` and the
//!   relative-position tables *are* decayed, as in unilm, unless
//!   [`GroupingConfig::decay_rel_pos_tables`] is false (unilm's
//!   `--disable_weight_decay_on_rel_pos_bias`; timm never decays them).
//!
//! Both the classic `transformers` layout (`beit.encoder.layer.{k}.…`,
//! `beit.encoder.relative_position_bias.…`) and the v5 layout (`beit.layers.{k}.…`,
//! `beit.shared_position_bias.…`) are recognised, with or without the leading `beit.`.

use std::collections::BTreeMap;

use candle::Var;
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// How parameters are split into optimizer groups.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupingConfig {
    /// Number of transformer blocks `L` of the model.
    pub num_layers: usize,
    /// Layer-wise lr decay `d` (unilm `--layer_decay`); `None` or `1.0` gives every group scale 1.
    pub layer_decay: Option<f64>,
    /// Apply weight decay to relative-position bias tables (unilm default: yes).
    #[serde(default = "default_true")]
    pub decay_rel_pos_tables: bool,
    /// Extra parameter names (exact, or a suffix after a `.`) excluded from weight decay.
    #[serde(default)]
    pub extra_no_decay: Vec<String>,
}

fn default_true() -> bool {
    true
}

impl GroupingConfig {
    /// Pre-training grouping: no layer decay, unilm weight-decay rules.
    pub fn pretrain(num_layers: usize) -> Self {
        Self {
            num_layers,
            layer_decay: None,
            decay_rel_pos_tables: true,
            extra_no_decay: Vec::new(),
        }
    }

    /// Fine-tuning grouping with layer-wise lr decay `layer_decay`.
    pub fn finetune(num_layers: usize, layer_decay: f64) -> Self {
        Self {
            layer_decay: Some(layer_decay),
            ..Self::pretrain(num_layers)
        }
    }

    /// The lr scale of layer id `layer_id`: `decay^(L + 1 - layer_id)` (1 without decay).
    pub fn lr_scale(&self, layer_id: usize) -> f64 {
        match self.layer_decay {
            // powf (a libm call) rather than powi (an LLVM intrinsic whose rounding may depend on
            // how it was optimised), so the scales are the same in every build.
            Some(d) if d != 1.0 => d.powf((self.num_layers + 1).saturating_sub(layer_id) as f64),
            _ => 1.0,
        }
    }
}

/// One optimizer group: parameters sharing an lr scale and a weight-decay switch.
#[derive(Debug, Clone)]
pub struct ParamGroup {
    /// A readable name, `layer_{id}_decay` or `layer_{id}_no_decay` (as unilm names them).
    pub name: String,
    /// The parameters, each with its (unique) name.
    pub params: Vec<(String, Var)>,
    /// Multiplier applied to the scheduled learning rate.
    pub lr_scale: f64,
    /// Whether the scheduled weight decay applies to this group.
    pub weight_decay: bool,
}

impl ParamGroup {
    /// Number of scalar parameters in the group.
    pub fn numel(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }
}

/// Strip an optional leading `beit.` so base-model and head-model names share the rules.
fn strip_backbone_prefix(name: &str) -> &str {
    name.strip_prefix("beit.").unwrap_or(name)
}

/// The block index `k` if `name` lies under transformer block `k` (either transformers layout).
pub fn block_index(name: &str) -> Option<usize> {
    let rest = strip_backbone_prefix(name);
    let tail = rest
        .strip_prefix("encoder.layer.")
        .or_else(|| rest.strip_prefix("layers."))?;
    let idx = tail.split('.').next()?;
    idx.parse().ok()
}

/// unilm's layer id of a parameter (see the module docs). `num_layers` is `L`.
pub fn layer_id(name: &str, num_layers: usize) -> usize {
    let rest = strip_backbone_prefix(name);
    if rest.starts_with("embeddings.") {
        return 0;
    }
    if let Some(k) = block_index(name) {
        return k + 1;
    }
    // Shared relative-position table, final norms and heads.
    num_layers + 1
}

/// Whether `name` is a relative-position bias table (per-block or shared).
pub fn is_rel_pos_table(name: &str) -> bool {
    name.ends_with("relative_position_bias_table")
}

/// Whether weight decay is switched off for a parameter of this name and rank.
pub fn is_no_decay(name: &str, rank: usize, cfg: &GroupingConfig) -> bool {
    if rank <= 1 || name.ends_with(".bias") {
        return true;
    }
    // unilm's `no_weight_decay()` = {pos_embed, cls_token}.
    let rest = strip_backbone_prefix(name);
    if rest == "embeddings.cls_token" || rest == "embeddings.position_embeddings" {
        return true;
    }
    if !cfg.decay_rel_pos_tables && is_rel_pos_table(name) {
        return true;
    }
    cfg.extra_no_decay
        .iter()
        .any(|x| name == x || name.ends_with(&format!(".{x}")))
}

/// The named `Var`s of a `VarMap`, sorted by name (the map itself iterates in random order).
pub fn named_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().expect("VarMap mutex poisoned");
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Split named parameters into groups by (layer id, decay/no-decay), in a deterministic order
/// (layer id ascending, decay before no-decay, parameters sorted by name).
///
/// Pass only the parameters that should train (e.g. only the head for a linear probe).
/// Fails on a duplicate name or a block index `>= num_layers`.
pub fn build_param_groups(
    params: impl IntoIterator<Item = (String, Var)>,
    cfg: &GroupingConfig,
) -> Result<Vec<ParamGroup>> {
    let mut by_key: BTreeMap<(usize, bool), Vec<(String, Var)>> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for (name, var) in params {
        if !seen.insert(name.clone()) {
            return Err(TrainError::Parameter {
                name,
                message: "appears twice in the parameter list".into(),
            });
        }
        if let Some(k) = block_index(&name) {
            if k >= cfg.num_layers {
                return Err(TrainError::Parameter {
                    name,
                    message: format!(
                        "block index {k} but the grouping was configured for {} blocks",
                        cfg.num_layers
                    ),
                });
            }
        }
        let id = layer_id(&name, cfg.num_layers);
        let no_decay = is_no_decay(&name, var.rank(), cfg);
        by_key.entry((id, no_decay)).or_default().push((name, var));
    }
    Ok(by_key
        .into_iter()
        .map(|((id, no_decay), mut params)| {
            params.sort_by(|a, b| a.0.cmp(&b.0));
            ParamGroup {
                name: format!("layer_{id}_{}", if no_decay { "no_decay" } else { "decay" }),
                params,
                lr_scale: cfg.lr_scale(id),
                weight_decay: !no_decay,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs()
    }

    #[test]
    fn derived_layer_decay_scales() {
        // beit-reference §5.6: base d=0.65 -> 0.0037 / 0.0057 / 0.65 / 1.0.
        let c = GroupingConfig::finetune(12, 0.65);
        let emb = c.lr_scale(layer_id("beit.embeddings.cls_token", 12));
        let b0 = c.lr_scale(layer_id("beit.encoder.layer.0.output.dense.weight", 12));
        let b11 = c.lr_scale(layer_id("beit.encoder.layer.11.lambda_1", 12));
        let head = c.lr_scale(layer_id("classifier.weight", 12));
        assert!(close(emb, 0.0037, 0.01), "{emb}");
        assert!(close(b0, 0.0057, 0.01), "{b0}");
        assert!(close(b11, 0.65, 1e-12));
        assert_eq!(head, 1.0);
        // large d=0.75 -> 0.00075 / 0.0010 / 0.75 / 1.0.
        let c = GroupingConfig::finetune(24, 0.75);
        assert!(close(c.lr_scale(0), 0.00075, 0.01));
        assert!(close(c.lr_scale(1), 0.0010, 0.01));
        assert!(close(c.lr_scale(24), 0.75, 1e-12));
        assert_eq!(c.lr_scale(25), 1.0);
        // base d=0.85 -> 0.121 / 0.142.
        let c = GroupingConfig::finetune(12, 0.85);
        assert!(close(c.lr_scale(0), 0.121, 0.01));
        assert!(close(c.lr_scale(1), 0.142, 0.01));
        // No decay: everything 1.
        assert_eq!(GroupingConfig::pretrain(12).lr_scale(0), 1.0);
    }

    #[test]
    fn layer_ids_both_layouts() {
        let l = 12;
        for (n, id) in [
            ("beit.embeddings.mask_token", 0),
            ("beit.embeddings.patch_embeddings.projection.weight", 0),
            ("beit.embeddings.position_embeddings", 0),
            (
                "beit.encoder.layer.3.attention.attention.relative_position_bias.relative_position_bias_table",
                4,
            ),
            ("beit.encoder.layer.11.output.dense.bias", 12),
            (
                "beit.encoder.relative_position_bias.relative_position_bias_table",
                13,
            ),
            ("beit.shared_position_bias.relative_position_bias_table", 13),
            ("beit.layers.5.mlp.fc2.weight", 6),
            ("layernorm.weight", 13),
            ("lm_head.weight", 13),
            ("beit.pooler.layernorm.bias", 13),
            ("pixel_head.weight", 13),
            ("encoder.layer.0.layernorm_before.weight", 1),
            ("embeddings.cls_token", 0),
        ] {
            assert_eq!(layer_id(n, l), id, "{n}");
        }
    }

    #[test]
    fn no_decay_rules() {
        let c = GroupingConfig::pretrain(12);
        assert!(is_no_decay("beit.embeddings.cls_token", 3, &c));
        assert!(is_no_decay("beit.embeddings.position_embeddings", 3, &c));
        assert!(!is_no_decay("beit.embeddings.mask_token", 3, &c));
        assert!(is_no_decay("beit.encoder.layer.0.lambda_1", 1, &c));
        assert!(is_no_decay("lm_head.bias", 1, &c));
        assert!(!is_no_decay("lm_head.weight", 2, &c));
        let t = "beit.encoder.relative_position_bias.relative_position_bias_table";
        assert!(!is_no_decay(t, 2, &c));
        let c2 = GroupingConfig {
            decay_rel_pos_tables: false,
            ..c
        };
        assert!(is_no_decay(t, 2, &c2));
    }
}
