//! Parameter groups: layer ids, layer-wise lr decay and weight-decay exclusions.
//!
//! The rules follow the BEiT authors' fine-tuning code (unilm `optim_factory.py`). What depends
//! on the model — the layer id of a parameter, which names the model keeps out of weight decay,
//! which tensors are relative-position tables — comes from the model through
//! [`ParamInfo`] (timm keeps the same knowledge on its models as `group_matcher()` and
//! `no_weight_decay()`); [`build_param_groups_with`] takes it as a trait object, and
//! [`build_param_groups`] uses BEiT's ([`beit_model::param_info::BeitParams`]). For BEiT:
//!
//! * **Layer id** (with `L` transformer blocks): the embeddings get 0; everything under block `k`
//!   (including that block's own relative-position table) gets `k + 1`; the *shared*
//!   relative-position table and everything else (final norms, heads) get `L + 1`.
//! * **lr scale** of layer id `i`: `decay^(L + 1 - i)`, so the head trains at the full rate and the
//!   embeddings at `decay^(L+1)`. Without layer decay (pre-training) every scale is 1.
//! * **No weight decay** for every 1-D tensor (biases, LayerNorm weights, `lambda_*`) and every name
//!   ending in `.bias` (the optimizer's generic rules), and for the names the model lists
//!   (`cls_token` / `position_embeddings` for BEiT). `mask_token` and the relative-position tables
//!   *are* decayed, as in unilm, unless [`GroupingConfig::decay_rel_pos_tables`] is false (unilm's
//!   `--disable_weight_decay_on_rel_pos_bias`; timm never decays them).

use std::collections::BTreeMap;

use beit_model::param_info::{BeitParams, ParamInfo, ParamRole};
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

/// BEiT's layer id of a parameter (see the module docs). `num_layers` is `L`.
pub fn layer_id(name: &str, num_layers: usize) -> usize {
    BeitParams::new(num_layers).layer_id(name)
}

/// Whether weight decay is switched off for a parameter of this name and shape: the generic
/// rules (rank <= 1, `.bias`), the model's own list, the relative-position tables when
/// `cfg.decay_rel_pos_tables` is false, and `cfg.extra_no_decay`.
pub fn is_no_decay(name: &str, dims: &[usize], cfg: &GroupingConfig, info: &dyn ParamInfo) -> bool {
    if dims.len() <= 1 || name.ends_with(".bias") || info.no_weight_decay(name) {
        return true;
    }
    if !cfg.decay_rel_pos_tables && info.role(name, dims) == Some(ParamRole::RelativePositionTable)
    {
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

/// Split named parameters into groups by (layer id, decay/no-decay) with BEiT's parameter rules;
/// see [`build_param_groups_with`].
pub fn build_param_groups(
    params: impl IntoIterator<Item = (String, Var)>,
    cfg: &GroupingConfig,
) -> Result<Vec<ParamGroup>> {
    build_param_groups_with(params, cfg, &BeitParams::new(cfg.num_layers))
}

/// Split named parameters into groups by (layer id, decay/no-decay), in a deterministic order
/// (layer id ascending, decay before no-decay, parameters sorted by name). `info` is the model's
/// parameter knowledge (layer ids, no-decay names, roles).
///
/// Pass only the parameters that should train (e.g. only the head for a linear probe).
/// Fails on a duplicate name, a block index `>= num_layers`, or an `info` for another depth.
pub fn build_param_groups_with(
    params: impl IntoIterator<Item = (String, Var)>,
    cfg: &GroupingConfig,
    info: &dyn ParamInfo,
) -> Result<Vec<ParamGroup>> {
    if info.num_layers() != cfg.num_layers {
        return Err(TrainError::Config(format!(
            "the grouping is configured for {} blocks but the model has {}",
            cfg.num_layers,
            info.num_layers()
        )));
    }
    let mut by_key: BTreeMap<(usize, bool), Vec<(String, Var)>> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for (name, var) in params {
        if !seen.insert(name.clone()) {
            return Err(TrainError::Parameter {
                name,
                message: "appears twice in the parameter list".into(),
            });
        }
        if let Some(k) = info.block_index(&name) {
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
        let id = info.layer_id(&name);
        let no_decay = is_no_decay(&name, var.dims(), cfg, info);
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
        // unilm base, d=0.65 over 12 blocks: 0.0037 / 0.0057 / 0.65 / 1.0.
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
        let info = BeitParams::new(12);
        let nd = |n: &str, dims: &[usize], c: &GroupingConfig| is_no_decay(n, dims, c, &info);
        assert!(nd("beit.embeddings.cls_token", &[1, 1, 8], &c));
        assert!(nd("beit.embeddings.position_embeddings", &[1, 5, 8], &c));
        assert!(!nd("beit.embeddings.mask_token", &[1, 1, 8], &c));
        assert!(nd("beit.encoder.layer.0.lambda_1", &[8], &c));
        assert!(nd("lm_head.bias", &[8], &c));
        assert!(!nd("lm_head.weight", &[8, 8], &c));
        let t = "beit.encoder.relative_position_bias.relative_position_bias_table";
        assert!(!nd(t, &[12, 2], &c));
        let c2 = GroupingConfig {
            decay_rel_pos_tables: false,
            ..c
        };
        assert!(nd(t, &[12, 2], &c2));
    }

    /// A toy model's own rules reach the groups: the trainer parses no names itself.
    #[test]
    fn groups_follow_the_models_rules() {
        struct Toy;
        impl ParamInfo for Toy {
            fn num_layers(&self) -> usize {
                1
            }
            fn block_index(&self, name: &str) -> Option<usize> {
                name.starts_with("b.").then_some(0)
            }
            fn layer_id(&self, name: &str) -> usize {
                if name.starts_with("b.") {
                    1
                } else if name.starts_with("head") {
                    2
                } else {
                    0
                }
            }
            fn no_weight_decay(&self, name: &str) -> bool {
                name == "stem.scale"
            }
            fn role(&self, _: &str, _: &[usize]) -> Option<ParamRole> {
                None
            }
        }
        let v =
            |dims: &[usize]| Var::zeros(dims, candle::DType::F32, &candle::Device::Cpu).unwrap();
        let params = vec![
            ("stem.scale".to_string(), v(&[2, 2])),
            ("stem.w".to_string(), v(&[2, 2])),
            ("b.w".to_string(), v(&[2, 2])),
            ("head".to_string(), v(&[2, 2])),
        ];
        let g = build_param_groups_with(params, &GroupingConfig::finetune(1, 0.5), &Toy).unwrap();
        let s: Vec<(String, usize, f64)> = g
            .iter()
            .map(|g| (g.name.clone(), g.params.len(), g.lr_scale))
            .collect();
        assert_eq!(
            s,
            [
                ("layer_0_decay".to_string(), 1, 0.25),
                ("layer_0_no_decay".to_string(), 1, 0.25),
                ("layer_1_decay".to_string(), 1, 0.5),
                ("layer_2_decay".to_string(), 1, 1.0),
            ]
        );
        let e = build_param_groups_with(vec![], &GroupingConfig::pretrain(3), &Toy)
            .unwrap_err()
            .to_string();
        assert!(e.contains("3 blocks") && e.contains("has 1"), "{e}");
    }
}
