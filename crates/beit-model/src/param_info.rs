//! What a BEiT model knows about its own parameters, by name: which transformer block a tensor
//! belongs to, its layer id for layer-wise lr decay, which tensors the model itself keeps out of
//! weight decay, and what each tensor *is* (its [`ParamRole`]), from which an initialisation
//! scheme picks a distribution.
//!
//! This is the knowledge timm keeps on its models (`no_weight_decay()`, `group_matcher()`,
//! `_init_weights`); a trainer consumes it through the [`ParamInfo`] trait and stays free of name
//! parsing. [`BeitParams`] implements it for every name this crate's models use, in both
//! `transformers` layouts, with or without the leading `beit.`:
//!
//! * classic: `beit.embeddings.*`, `beit.encoder.layer.{k}.{attention.attention.{query,key,value},
//!   attention.output.dense, intermediate.dense, output.dense, layernorm_before, layernorm_after,
//!   lambda_1, lambda_2, attention.attention.relative_position_bias.*}`, the shared
//!   `beit.encoder.relative_position_bias.*`, `beit.pooler.layernorm.*`, `layernorm.*`,
//!   `classifier.*`, `lm_head.*`, `pixel_head.*`;
//! * v5: `beit.layers.{k}.{attention.{q,k,v,o}_proj, mlp.fc1, mlp.fc2, relative_position_bias.*,
//!   …}` and `beit.shared_position_bias.*`.
//!
//! Layer ids follow the BEiT authors' fine-tuning code (unilm `get_layer_id_for_vit`): the
//! embeddings get 0, everything under block `k` (that block's own relative-position table
//! included) gets `k + 1`, and the rest (the *shared* relative-position table, final norms,
//! heads) gets `L + 1`.

use crate::config::BeitConfig;

/// What a parameter is, whatever the naming layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamRole {
    /// `embeddings.cls_token`.
    ClsToken,
    /// `embeddings.mask_token` (MIM).
    MaskToken,
    /// `embeddings.position_embeddings` (absolute position embedding).
    PositionEmbeddings,
    /// The patch-embedding convolution weight, `[hidden, channels, p, p]`.
    PatchEmbedWeight,
    /// The patch-embedding convolution bias.
    PatchEmbedBias,
    /// A relative-position bias table (per block or shared).
    RelativePositionTable,
    /// LayerScale `lambda_1` / `lambda_2`.
    LayerScale,
    /// A LayerNorm weight.
    NormWeight,
    /// A LayerNorm bias.
    NormBias,
    /// The weight of a linear layer that writes into the residual stream of a block (attention
    /// output projection, second MLP layer): unilm divides it by `sqrt(2·l)` at init.
    ResidualOutputWeight,
    /// Any other linear weight (query/key/value, first MLP layer, `lm_head`, `pixel_head`).
    LinearWeight,
    /// The bias of a linear layer (block or head, classifier excepted).
    LinearBias,
    /// The classification head weight (`classifier.weight`).
    ClassifierWeight,
    /// The classification head bias (`classifier.bias`).
    ClassifierBias,
}

/// A model's knowledge of its parameters, for optimizers and initialisers.
pub trait ParamInfo {
    /// Number of transformer blocks `L`; layer ids run from 0 to `L + 1`.
    fn num_layers(&self) -> usize;

    /// The block `k` (0-based) whose tensor `name` is, if it lies under one.
    fn block_index(&self, name: &str) -> Option<usize>;

    /// The layer id of `name` for layer-wise lr decay (timm `group_matcher`).
    fn layer_id(&self, name: &str) -> usize;

    /// Whether the model itself excludes `name` from weight decay (timm `no_weight_decay()`).
    /// The generic rules (1-D tensors, biases) are the optimizer's, not listed here.
    fn no_weight_decay(&self, name: &str) -> bool;

    /// What the tensor `name` of shape `dims` is; `None` for a name the model does not have.
    fn role(&self, name: &str, dims: &[usize]) -> Option<ParamRole>;
}

/// [`ParamInfo`] for the BEiT models of this crate (both `transformers` layouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BeitParams {
    num_layers: usize,
}

impl BeitParams {
    /// The rules for a model of `num_layers` transformer blocks.
    pub fn new(num_layers: usize) -> Self {
        Self { num_layers }
    }
}

impl BeitConfig {
    /// This model's parameter knowledge ([`ParamInfo`]).
    pub fn param_info(&self) -> BeitParams {
        BeitParams::new(self.num_hidden_layers)
    }
}

/// `name` without an optional leading `beit.`, so backbone and head-model names share the rules.
fn strip_backbone(name: &str) -> &str {
    name.strip_prefix("beit.").unwrap_or(name)
}

/// The block index of `name` (`encoder.layer.{k}.` or `layers.{k}.`, optionally under `beit.`).
pub fn block_index(name: &str) -> Option<usize> {
    let rest = strip_backbone(name);
    let tail = rest
        .strip_prefix("encoder.layer.")
        .or_else(|| rest.strip_prefix("layers."))?;
    let (idx, after) = tail.split_once('.')?;
    if after.is_empty() {
        return None;
    }
    idx.parse().ok()
}

/// The layer id of `name` in a model of `num_layers` blocks (see the module docs).
pub fn layer_id(name: &str, num_layers: usize) -> usize {
    if strip_backbone(name).starts_with("embeddings.") {
        0
    } else if let Some(k) = block_index(name) {
        k + 1
    } else {
        num_layers + 1
    }
}

/// unilm's `no_weight_decay()`: the class token and the absolute position embedding.
pub fn no_weight_decay(name: &str) -> bool {
    matches!(
        strip_backbone(name),
        "embeddings.cls_token" | "embeddings.position_embeddings"
    )
}

/// Whether `name` is a block's output projection into the residual stream (either layout).
fn is_residual_output(name: &str) -> bool {
    if block_index(name).is_none() {
        return false;
    }
    name.ends_with(".attention.output.dense.weight")
        || name.ends_with(".attention.o_proj.weight")
        || name.ends_with(".mlp.fc2.weight")
        // classic layout: the MLP's second layer is `{block}.output.dense`
        || (name.ends_with(".output.dense.weight")
            && !name.ends_with(".attention.output.dense.weight"))
}

/// What the tensor `name` of shape `dims` is (see [`ParamRole`]); `None` if no BEiT model of this
/// crate has such a tensor.
pub fn role(name: &str, dims: &[usize]) -> Option<ParamRole> {
    let rest = strip_backbone(name);
    let (module_path, last) = rest.rsplit_once('.').unwrap_or(("", rest));
    let module = module_path.rsplit('.').next().unwrap_or(module_path);
    let is_norm = module.contains("layernorm") || module == "norm" || module == "fc_norm";
    Some(if module_path.ends_with("patch_embeddings.projection") {
        match last {
            "weight" => ParamRole::PatchEmbedWeight,
            "bias" => ParamRole::PatchEmbedBias,
            _ => return None,
        }
    } else if last == "relative_position_bias_table" {
        ParamRole::RelativePositionTable
    } else if last == "lambda_1" || last == "lambda_2" {
        ParamRole::LayerScale
    } else if is_norm && last == "weight" {
        ParamRole::NormWeight
    } else if is_norm && last == "bias" {
        ParamRole::NormBias
    } else if rest == "classifier.weight" {
        ParamRole::ClassifierWeight
    } else if rest == "classifier.bias" {
        ParamRole::ClassifierBias
    } else if rest == "embeddings.cls_token" {
        ParamRole::ClsToken
    } else if rest == "embeddings.mask_token" {
        ParamRole::MaskToken
    } else if rest == "embeddings.position_embeddings" {
        ParamRole::PositionEmbeddings
    } else if last == "weight" && dims.len() >= 2 {
        if is_residual_output(name) {
            ParamRole::ResidualOutputWeight
        } else {
            ParamRole::LinearWeight
        }
    } else if last == "bias" && dims.len() == 1 {
        ParamRole::LinearBias
    } else {
        return None;
    })
}

impl ParamInfo for BeitParams {
    fn num_layers(&self) -> usize {
        self.num_layers
    }

    fn block_index(&self, name: &str) -> Option<usize> {
        block_index(name)
    }

    fn layer_id(&self, name: &str) -> usize {
        layer_id(name, self.num_layers)
    }

    fn no_weight_decay(&self, name: &str) -> bool {
        no_weight_decay(name)
    }

    fn role(&self, name: &str, dims: &[usize]) -> Option<ParamRole> {
        role(name, dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_ids_both_layouts() {
        let p = BeitParams::new(12);
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
            assert_eq!(p.layer_id(n), id, "{n}");
        }
        assert_eq!(block_index("beit.encoder.layer.x.lambda_1"), None);
        assert_eq!(block_index("beit.encoder.layer.7"), None);
    }

    #[test]
    fn roles_both_layouts() {
        use ParamRole::*;
        let m = [4, 4];
        for (n, dims, want) in [
            ("beit.embeddings.cls_token", &[1, 1, 4][..], Some(ClsToken)),
            ("beit.embeddings.mask_token", &[1, 1, 4], Some(MaskToken)),
            (
                "beit.embeddings.patch_embeddings.projection.weight",
                &[4, 3, 2, 2],
                Some(PatchEmbedWeight),
            ),
            (
                "beit.embeddings.patch_embeddings.projection.bias",
                &[4],
                Some(PatchEmbedBias),
            ),
            (
                "beit.encoder.layer.0.attention.output.dense.weight",
                &m,
                Some(ResidualOutputWeight),
            ),
            (
                "beit.encoder.layer.0.output.dense.weight",
                &m,
                Some(ResidualOutputWeight),
            ),
            (
                "beit.layers.2.attention.o_proj.weight",
                &m,
                Some(ResidualOutputWeight),
            ),
            (
                "beit.layers.2.mlp.fc2.weight",
                &m,
                Some(ResidualOutputWeight),
            ),
            ("beit.layers.2.mlp.fc1.weight", &m, Some(LinearWeight)),
            (
                "beit.encoder.layer.1.intermediate.dense.weight",
                &m,
                Some(LinearWeight),
            ),
            (
                "beit.encoder.layer.1.attention.attention.query.bias",
                &[4],
                Some(LinearBias),
            ),
            (
                "beit.encoder.layer.1.layernorm_after.weight",
                &[4],
                Some(NormWeight),
            ),
            ("beit.pooler.layernorm.bias", &[4], Some(NormBias)),
            ("beit.encoder.layer.1.lambda_2", &[4], Some(LayerScale)),
            (
                "beit.shared_position_bias.relative_position_bias_table",
                &[12, 2],
                Some(RelativePositionTable),
            ),
            ("classifier.weight", &m, Some(ClassifierWeight)),
            ("classifier.bias", &[4], Some(ClassifierBias)),
            ("lm_head.weight", &m, Some(LinearWeight)),
            ("something.scale", &[4], None),
            ("lm_head.weight", &[4], None),
        ] {
            assert_eq!(role(n, dims), want, "{n}");
        }
    }

    #[test]
    fn no_weight_decay_names() {
        let p = BeitConfig::default().param_info();
        assert_eq!(p.num_layers(), 12);
        assert!(p.no_weight_decay("beit.embeddings.cls_token"));
        assert!(p.no_weight_decay("embeddings.position_embeddings"));
        assert!(!p.no_weight_decay("beit.embeddings.mask_token"));
        assert!(!p.no_weight_decay("beit.encoder.layer.0.lambda_1"));
    }
}
