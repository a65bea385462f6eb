//! [`BeitConfig`]: the model hyper-parameters, read from a Hugging Face `config.json` as is.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{BeitError, Result};

/// BEiT hyper-parameters with the field names and defaults of `transformers.BeitConfig`.
///
/// Unknown fields of a `config.json` (segmentation settings, `torch_dtype`, ...) are kept in
/// [`BeitConfig::extra`] so that a saved config round-trips, and never cause an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BeitConfig {
    /// Size of the visual-token vocabulary predicted by the MIM head (8192 for DALL-E).
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    /// Width of the transformer (768 base, 1024 large).
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    /// Number of transformer blocks.
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    /// Number of attention heads; must divide `hidden_size`.
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    /// Width of the MLP hidden layer.
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    /// MLP activation: `gelu` (exact, erf), `gelu_new`/`gelu_pytorch_tanh` (tanh approximation), `relu`.
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: String,
    /// Dropout after the attention output, the MLP and the embeddings (training only).
    #[serde(default)]
    pub hidden_dropout_prob: f64,
    /// Dropout on the attention probabilities (training only).
    #[serde(default)]
    pub attention_probs_dropout_prob: f64,
    /// Std of the normal init used by `transformers`; from-scratch training uses trunc-normal 0.02.
    #[serde(default = "defaults::initializer_range")]
    pub initializer_range: f64,
    /// LayerNorm epsilon (1e-12 in the hub configs, 1e-6 in unilm/timm).
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Input resolution the checkpoint was trained at (square). Other resolutions still run.
    #[serde(default = "defaults::image_size", deserialize_with = "square_size")]
    pub image_size: usize,
    /// Patch side (16).
    #[serde(default = "defaults::patch_size", deserialize_with = "square_size")]
    pub patch_size: usize,
    /// Input channels (3).
    #[serde(default = "defaults::num_channels")]
    pub num_channels: usize,
    /// Whether the embeddings carry a learned `[M]` token (pre-training checkpoints).
    #[serde(default)]
    pub use_mask_token: bool,
    /// Whether an absolute position embedding is added (off in all released checkpoints).
    #[serde(default)]
    pub use_absolute_position_embeddings: bool,
    /// One relative position bias table per layer (fine-tuned checkpoints).
    #[serde(default)]
    pub use_relative_position_bias: bool,
    /// One relative position bias table shared by all layers (pre-trained checkpoints).
    #[serde(default)]
    pub use_shared_relative_position_bias: bool,
    /// LayerScale init value; `<= 0` means no `lambda_1/lambda_2` parameters.
    #[serde(default = "defaults::layer_scale_init_value")]
    pub layer_scale_init_value: f64,
    /// Maximal stochastic-depth rate (linear from 0 at the first block to this at the last).
    #[serde(default = "defaults::drop_path_rate")]
    pub drop_path_rate: f64,
    /// Pool by mean of patch tokens + LayerNorm (true) or take the CLS token after a final LayerNorm.
    #[serde(default = "defaults::use_mean_pooling")]
    pub use_mean_pooling: bool,
    /// The published family the file was written for (BEiT, data2vec-vision, timm). Not written
    /// back: an export is always a `transformers` BEiT config, which describes the same network.
    #[serde(skip)]
    pub family: Family,
    /// timm's `pretrained_cfg` (input size, `crop_pct`, interpolation, mean/std) when the config
    /// came from a timm `config.json`; the image pipeline follows it.
    #[serde(skip)]
    pub timm_pretrained_cfg: Option<serde_json::Value>,
    /// Class index -> label. `num_labels` is its length, as in `transformers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id2label: Option<BTreeMap<usize, String>>,
    /// Label -> class index (kept for round trips).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label2id: Option<BTreeMap<String, usize>>,
    /// Every other field of the file, kept verbatim.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The published families of the BEiT architecture that [`BeitConfig::from_json_str`] reads. They
/// differ only in how the files are written; the network is the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Family {
    /// `transformers` BEiT (`model_type: beit`), which includes DiT (BEiT with absolute position
    /// embeddings, `microsoft/dit-*`).
    #[default]
    Beit,
    /// `transformers` data2vec-vision (`model_type: data2vec-vision`, weights under
    /// `data2vec_vision.`, or without a prefix for the pre-trained-only backbones).
    Data2VecVision,
    /// A timm hub `config.json` (`architecture: beit_*` / `beitv2_*`, `pretrained_cfg`), with timm
    /// weight names.
    Timm,
}

fn config_error(message: String) -> BeitError {
    BeitError::Config {
        path: None,
        message,
    }
}

/// Upper bounds [`BeitConfig::validate`] enforces (published checkpoints: width <= 1024, 24 layers,
/// 21841 classes, 640 px with 40 patches per side).
pub mod limits {
    /// Largest `hidden_size` (`intermediate_size` may be 4x this).
    pub const MAX_WIDTH: usize = 1 << 14;
    /// Largest `num_hidden_layers`.
    pub const MAX_LAYERS: usize = 256;
    /// Largest `num_channels`.
    pub const MAX_CHANNELS: usize = 64;
    /// Largest `vocab_size` and number of labels.
    pub const MAX_CLASSES: usize = 1 << 20;
    /// Largest `image_size` in pixels.
    pub const MAX_IMAGE_SIZE: usize = 1 << 14;
    /// Largest patch grid side (`image_size / patch_size`): the relative position index has
    /// `(side^2 + 1)^2` entries.
    pub const MAX_GRID: usize = 64;
}

/// Defaults of `transformers.BeitConfig`.
mod defaults {
    pub fn vocab_size() -> usize {
        8192
    }
    pub fn hidden_size() -> usize {
        768
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn num_attention_heads() -> usize {
        12
    }
    pub fn intermediate_size() -> usize {
        3072
    }
    pub fn hidden_act() -> String {
        "gelu".into()
    }
    pub fn initializer_range() -> f64 {
        0.02
    }
    pub fn layer_norm_eps() -> f64 {
        1e-12
    }
    pub fn image_size() -> usize {
        224
    }
    pub fn patch_size() -> usize {
        16
    }
    pub fn num_channels() -> usize {
        3
    }
    pub fn layer_scale_init_value() -> f64 {
        0.1
    }
    pub fn drop_path_rate() -> f64 {
        0.1
    }
    pub fn use_mean_pooling() -> bool {
        true
    }
}

/// Accept `224` or `[224, 224]`; non-square sizes are rejected with a clear message.
fn square_size<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        One(usize),
        Two([usize; 2]),
    }
    match Size::deserialize(d)? {
        Size::One(s) => Ok(s),
        Size::Two([h, w]) if h == w => Ok(h),
        Size::Two([h, w]) => Err(serde::de::Error::custom(format!(
            "non-square size [{h}, {w}] is not supported"
        ))),
    }
}

impl Default for BeitConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults deserialize")
    }
}

impl BeitConfig {
    /// Read and validate a `config.json`. Errors name the file and the field.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| BeitError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text).map_err(|e| match e {
            BeitError::Config { message, .. } => BeitError::Config {
                path: Some(path.to_path_buf()),
                message,
            },
            other => other,
        })
    }

    /// Parse and validate a config from JSON text.
    ///
    /// Every family of the architecture is read (see [`Family`]): a `transformers` BEiT config
    /// (`model_type: beit`, DiT included), a data2vec-vision config (`model_type:
    /// data2vec-vision`, the same fields), and a timm hub `config.json` (`architecture:
    /// beit_*`/`beitv2_*`, optional `model_args`), which is translated to the same hyper-parameters.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| config_error(e.to_string()))?;
        let Some(object) = value.as_object() else {
            return Err(config_error("expected a JSON object".into()));
        };
        let model_type = object.get("model_type").map(|v| v.as_str());
        let cfg = match model_type {
            None if object.contains_key("architecture") => timm::from_timm_config(object)?,
            None | Some(Some("beit")) => {
                serde_json::from_str::<Self>(text).map_err(|e| config_error(e.to_string()))?
            }
            Some(Some("data2vec-vision")) => {
                let mut cfg: Self =
                    serde_json::from_str(text).map_err(|e| config_error(e.to_string()))?;
                cfg.family = Family::Data2VecVision;
                cfg
            }
            Some(other) => {
                return Err(config_error(format!(
                    "`model_type` {} is not a BEiT-family model (expected \"beit\" or \"data2vec-vision\", \
                     or a timm config with `architecture`)",
                    other.map_or_else(|| object["model_type"].to_string(), |s| format!("{s:?}"))
                )))
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The `microsoft/beit-base-patch16-224-pt22k` architecture (MIM, shared bias, mask token).
    pub fn base_patch16_224_pt22k() -> Self {
        Self {
            use_mask_token: true,
            use_shared_relative_position_bias: true,
            ..Self::default()
        }
    }

    /// The `microsoft/beit-base-patch16-224` classifier architecture (per-layer bias, 1000 classes).
    pub fn base_patch16_224() -> Self {
        Self {
            use_relative_position_bias: true,
            id2label: Some((0..1000).map(|i| (i, format!("LABEL_{i}"))).collect()),
            ..Self::default()
        }
    }

    /// The large (24 layers, 1024 wide, 16 heads) variant of a base config.
    pub fn into_large(self) -> Self {
        Self {
            hidden_size: 1024,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            intermediate_size: 4096,
            ..self
        }
    }

    /// Check the invariants the model relies on; the message names the offending field.
    pub fn validate(&self) -> Result<()> {
        let err = |message: String| {
            Err(BeitError::Config {
                path: None,
                message,
            })
        };
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
            ("num_channels", self.num_channels),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return err(format!("`{name}` must be positive"));
            }
        }
        // Upper bounds, so that a hostile config.json cannot make the model (or the relative
        // position index, whose size grows as grid^4) allocate without limit. Every published
        // checkpoint is far inside them.
        for (name, v, max) in [
            ("hidden_size", self.hidden_size, limits::MAX_WIDTH),
            (
                "intermediate_size",
                self.intermediate_size,
                4 * limits::MAX_WIDTH,
            ),
            (
                "num_hidden_layers",
                self.num_hidden_layers,
                limits::MAX_LAYERS,
            ),
            ("num_channels", self.num_channels, limits::MAX_CHANNELS),
            ("vocab_size", self.vocab_size, limits::MAX_CLASSES),
            ("image_size", self.image_size, limits::MAX_IMAGE_SIZE),
        ] {
            if v > max {
                return err(format!(
                    "`{name}` = {v} is over the supported maximum {max}"
                ));
            }
        }
        if self.num_labels() > limits::MAX_CLASSES {
            return err(format!(
                "`id2label` has {} classes, over the supported maximum {}",
                self.num_labels(),
                limits::MAX_CLASSES
            ));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return err(format!(
                "`hidden_size` ({}) must be divisible by `num_attention_heads` ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return err(format!(
                "`image_size` ({}) must be divisible by `patch_size` ({})",
                self.image_size, self.patch_size
            ));
        }
        if self.grid_size() > limits::MAX_GRID {
            return err(format!(
                "`image_size` / `patch_size` = {} patches per side is over the supported maximum {}",
                self.grid_size(),
                limits::MAX_GRID
            ));
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return err(format!(
                "`layer_norm_eps` must be > 0, got {}",
                self.layer_norm_eps
            ));
        }
        for (name, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
            ("drop_path_rate", self.drop_path_rate),
        ] {
            if !(0.0..1.0).contains(&p) {
                return err(format!("`{name}` must be in [0, 1), got {p}"));
            }
        }
        crate::layers::Activation::parse(&self.hidden_act).map_err(|_| BeitError::Config {
            path: None,
            message: format!(
                "unsupported `hidden_act` {:?}: expected gelu, gelu_new, gelu_pytorch_tanh or relu",
                self.hidden_act
            ),
        })?;
        Ok(())
    }

    /// Number of classes of the classification head (length of `id2label`; 2 when absent, as HF).
    pub fn num_labels(&self) -> usize {
        self.id2label.as_ref().map_or(2, |m| m.len())
    }

    /// Set `num_labels` classes with the given names (index order).
    pub fn set_labels(&mut self, names: &[String]) {
        self.id2label = Some(names.iter().cloned().enumerate().collect());
        self.label2id = Some(
            names
                .iter()
                .cloned()
                .enumerate()
                .map(|(i, n)| (n, i))
                .collect(),
        );
    }

    /// Label of class `index` (`LABEL_i` when the config has no names).
    pub fn label(&self, index: usize) -> String {
        self.id2label
            .as_ref()
            .and_then(|m| m.get(&index).cloned())
            .unwrap_or_else(|| format!("LABEL_{index}"))
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Patch grid side at the config's resolution (14 at 224/16).
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Number of patches at the config's resolution (196 at 224/16).
    pub fn num_patches(&self) -> usize {
        self.grid_size() * self.grid_size()
    }

    /// Serialize for a `config.json`, with `model_type` and `architectures` set as `transformers` expects.
    pub fn to_hf_json(&self, architecture: &str) -> Result<String> {
        let mut cfg = self.clone();
        cfg.extra.insert(
            "model_type".into(),
            serde_json::Value::String("beit".into()),
        );
        cfg.extra.insert(
            "architectures".into(),
            serde_json::Value::Array(vec![serde_json::Value::String(architecture.into())]),
        );
        serde_json::to_string_pretty(&cfg).map_err(|e| BeitError::Config {
            path: None,
            message: e.to_string(),
        })
    }
}

/// timm's `config.json`: `architecture` names a registered model (the tag after `.` is ignored),
/// `model_args` overrides its keyword arguments, `num_classes`, `global_pool` and `label_names` set
/// the head, and `pretrained_cfg` carries the preprocessing.
mod timm {
    use serde_json::{Map, Value};

    use super::{config_error, BeitConfig, Family};
    use crate::error::Result;

    /// The keyword arguments of timm's `Beit` class that a registered BEiT model sets.
    #[derive(Debug, Clone)]
    struct Args {
        img_size: usize,
        patch_size: usize,
        in_chans: usize,
        embed_dim: usize,
        depth: usize,
        num_heads: usize,
        mlp_ratio: f64,
        use_abs_pos_emb: bool,
        use_rel_pos_bias: bool,
        use_shared_rel_pos_bias: bool,
        init_values: Option<f64>,
        drop_path_rate: f64,
    }

    /// timm's registered BEiT models (`timm.models.beit`): v1 (`beit_*`) and v2 (`beitv2_*`).
    fn registered(name: &str) -> Option<Args> {
        let (embed_dim, depth, num_heads, img_size, init_values) = match name {
            "beit_base_patch16_224" => (768, 12, 12, 224, 0.1),
            "beit_base_patch16_384" => (768, 12, 12, 384, 0.1),
            "beit_large_patch16_224" => (1024, 24, 16, 224, 1e-5),
            "beit_large_patch16_384" => (1024, 24, 16, 384, 1e-5),
            "beit_large_patch16_512" => (1024, 24, 16, 512, 1e-5),
            "beitv2_base_patch16_224" => (768, 12, 12, 224, 1e-5),
            "beitv2_large_patch16_224" => (1024, 24, 16, 224, 1e-5),
            _ => return None,
        };
        Some(Args {
            img_size,
            patch_size: 16,
            in_chans: 3,
            embed_dim,
            depth,
            num_heads,
            mlp_ratio: 4.0,
            use_abs_pos_emb: false,
            use_rel_pos_bias: true,
            use_shared_rel_pos_bias: false,
            init_values: Some(init_values),
            drop_path_rate: 0.0,
        })
    }

    /// The names of the registered models, for messages.
    pub(super) const REGISTERED: [&str; 7] = [
        "beit_base_patch16_224",
        "beit_base_patch16_384",
        "beit_large_patch16_224",
        "beit_large_patch16_384",
        "beit_large_patch16_512",
        "beitv2_base_patch16_224",
        "beitv2_large_patch16_224",
    ];

    fn usize_of(v: &Value, field: &str) -> Result<usize> {
        v.as_u64().map(|x| x as usize).ok_or_else(|| {
            config_error(format!(
                "`{field}`: expected a non-negative integer, got {v}"
            ))
        })
    }

    fn f64_of(v: &Value, field: &str) -> Result<f64> {
        v.as_f64()
            .ok_or_else(|| config_error(format!("`{field}`: expected a number, got {v}")))
    }

    fn bool_of(v: &Value, field: &str) -> Result<bool> {
        v.as_bool()
            .ok_or_else(|| config_error(format!("`{field}`: expected true or false, got {v}")))
    }

    /// `224` or `[224, 224]` (timm's `img_size`, `input_size[1:]`).
    pub(super) fn square(v: &Value, field: &str) -> Result<usize> {
        match v {
            Value::Array(a) if a.len() == 2 && a[0] == a[1] => usize_of(&a[0], field),
            Value::Array(_) => Err(config_error(format!(
                "`{field}`: non-square size {v} is not supported"
            ))),
            other => usize_of(other, field),
        }
    }

    /// The Hugging Face config equivalent to a timm `config.json` (see the module documentation).
    pub(super) fn from_timm_config(obj: &Map<String, Value>) -> Result<BeitConfig> {
        let mut a = registered_architecture(obj)?;
        let mut head = Head::from_top_level(obj)?;
        if let Some(args) = obj.get("model_args") {
            let args = args.as_object().ok_or_else(|| {
                config_error(format!("`model_args`: expected an object, got {args}"))
            })?;
            for (k, v) in args {
                apply_model_arg(&mut a, &mut head, k, v)?;
            }
        }
        let mean_pooling = mean_pooling(&head.global_pool)?;
        let mut cfg = to_beit_config(&a, mean_pooling, obj.get("pretrained_cfg").cloned());
        let names = label_names(obj, head.num_classes)?;
        if head.num_classes > 0 {
            cfg.set_labels(&names);
        }
        Ok(cfg)
    }

    /// The registered model `architecture` names (the tag after `.` ignored).
    fn registered_architecture(obj: &Map<String, Value>) -> Result<Args> {
        let arch_full = obj["architecture"].as_str().ok_or_else(|| {
            config_error(format!(
                "`architecture`: expected a timm model name, got {}",
                obj["architecture"]
            ))
        })?;
        // `beitv2_base_patch16_224.in1k_ft_in22k_in1k`: the tag names the weights, not the model.
        let arch = arch_full.split('.').next().unwrap_or(arch_full);
        registered(arch).ok_or_else(|| {
            config_error(format!(
                "`architecture` {arch_full:?} is not a timm BEiT model (known: {})",
                REGISTERED.join(", ")
            ))
        })
    }

    /// The classification head: top-level `num_classes` and `global_pool`, which `model_args` may
    /// override.
    struct Head {
        num_classes: usize,
        global_pool: String,
    }

    impl Head {
        fn from_top_level(obj: &Map<String, Value>) -> Result<Head> {
            let num_classes = match obj.get("num_classes") {
                Some(v) => usize_of(v, "num_classes")?,
                None => 1000,
            };
            let global_pool = match obj.get("global_pool") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => "avg".to_string(),
                Some(v) => {
                    return Err(config_error(format!(
                        "`global_pool`: expected a string, got {v}"
                    )))
                }
            };
            Ok(Head {
                num_classes,
                global_pool,
            })
        }
    }

    /// Apply one `model_args` entry; keyword arguments that would change the network into a
    /// variant we do not implement are refused by name.
    fn apply_model_arg(a: &mut Args, head: &mut Head, k: &str, v: &Value) -> Result<()> {
        let field = format!("model_args.{k}");
        match k {
            "img_size" => a.img_size = square(v, &field)?,
            "patch_size" => a.patch_size = square(v, &field)?,
            "in_chans" => a.in_chans = usize_of(v, &field)?,
            "num_classes" => head.num_classes = usize_of(v, &field)?,
            "global_pool" => {
                head.global_pool = v
                    .as_str()
                    .ok_or_else(|| config_error(format!("`{field}`: expected a string")))?
                    .to_string()
            }
            "embed_dim" => a.embed_dim = usize_of(v, &field)?,
            "depth" => a.depth = usize_of(v, &field)?,
            "num_heads" => a.num_heads = usize_of(v, &field)?,
            "mlp_ratio" => a.mlp_ratio = f64_of(v, &field)?,
            "use_abs_pos_emb" => a.use_abs_pos_emb = bool_of(v, &field)?,
            "use_rel_pos_bias" => a.use_rel_pos_bias = bool_of(v, &field)?,
            "use_shared_rel_pos_bias" => a.use_shared_rel_pos_bias = bool_of(v, &field)?,
            "init_values" => {
                a.init_values = match v {
                    Value::Null => None,
                    v => Some(f64_of(v, &field)?),
                }
            }
            "drop_path_rate" => a.drop_path_rate = f64_of(v, &field)?,
            // Training-time rates and init scales do not change the network.
            "drop_rate" | "pos_drop_rate" | "proj_drop_rate" | "attn_drop_rate"
            | "head_init_scale" => {}
            "qkv_bias" if v == &Value::Bool(true) => {}
            "swiglu_mlp" | "scale_mlp" if v == &Value::Bool(false) => {}
            _ => {
                return Err(config_error(format!(
                    "`{field}` = {v} is not supported (BEiT variants with it are not \
                     implemented)"
                )))
            }
        }
        Ok(())
    }

    /// timm's `global_pool`: `avg` (mean pooling) or `token` (the CLS token).
    fn mean_pooling(global_pool: &str) -> Result<bool> {
        match global_pool {
            "avg" => Ok(true),
            "token" => Ok(false),
            other => Err(config_error(format!(
                "`global_pool` {other:?} is not supported (expected \"avg\" or \"token\")"
            ))),
        }
    }

    /// The Hugging Face config of timm's network (labels not yet set).
    fn to_beit_config(a: &Args, mean_pooling: bool, pretrained_cfg: Option<Value>) -> BeitConfig {
        let intermediate = a.embed_dim as f64 * a.mlp_ratio;
        BeitConfig {
            hidden_size: a.embed_dim,
            num_hidden_layers: a.depth,
            num_attention_heads: a.num_heads,
            intermediate_size: intermediate as usize,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-6,
            image_size: a.img_size,
            patch_size: a.patch_size,
            num_channels: a.in_chans,
            use_mask_token: false,
            use_absolute_position_embeddings: a.use_abs_pos_emb,
            use_relative_position_bias: a.use_rel_pos_bias,
            use_shared_relative_position_bias: a.use_shared_rel_pos_bias,
            layer_scale_init_value: a.init_values.filter(|v| *v > 0.0).unwrap_or(0.0),
            drop_path_rate: a.drop_path_rate,
            use_mean_pooling: mean_pooling,
            family: Family::Timm,
            timm_pretrained_cfg: pretrained_cfg,
            ..BeitConfig::default()
        }
    }

    /// `label_names` when it has one name per class (a non-string name reads `LABEL_i`), else
    /// `LABEL_0`, `LABEL_1`, ...
    fn label_names(obj: &Map<String, Value>, num_classes: usize) -> Result<Vec<String>> {
        Ok(match obj.get("label_names") {
            Some(Value::Array(names)) if names.len() == num_classes => names
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    n.as_str()
                        .map_or_else(|| format!("LABEL_{i}"), str::to_string)
                })
                .collect(),
            Some(Value::Array(names)) => {
                return Err(config_error(format!(
                    "`label_names` has {} names for {num_classes} classes",
                    names.len()
                )))
            }
            _ => (0..num_classes).map(|i| format!("LABEL_{i}")).collect(),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A two-block MIM model of width 16 on 16 x 16 images (4 x 4 patches, 12 visual tokens,
    /// shared relative position bias): the unit tests' small model.
    pub(crate) fn tiny_mim() -> BeitConfig {
        BeitConfig {
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 32,
            image_size: 16,
            patch_size: 4,
            vocab_size: 12,
            use_mask_token: true,
            use_shared_relative_position_bias: true,
            ..BeitConfig::default()
        }
    }

    #[test]
    fn defaults_match_transformers() {
        let c = BeitConfig::default();
        assert_eq!(c.hidden_size, 768);
        assert_eq!(c.layer_norm_eps, 1e-12);
        assert_eq!(c.num_labels(), 2);
        assert_eq!(c.num_patches(), 196);
        assert!(c.use_mean_pooling);
    }

    #[test]
    fn reads_hub_style_config_and_keeps_unknown_fields() {
        let text = r#"{"architectures": ["BeitForImageClassification"], "image_size": 384,
            "use_relative_position_bias": true, "out_indices": [3, 5, 7, 11],
            "id2label": {"0": "tench", "1": "goldfish"}, "label2id": {"tench": 0, "goldfish": 1}}"#;
        let c = BeitConfig::from_json_str(text).unwrap();
        assert_eq!(c.image_size, 384);
        assert_eq!(c.num_labels(), 2);
        assert_eq!(c.label(1), "goldfish");
        assert!(c.extra.contains_key("out_indices"));
        let back = BeitConfig::from_json_str(&c.to_hf_json("BeitForImageClassification").unwrap())
            .unwrap();
        assert_eq!(back.id2label, c.id2label);
        assert_eq!(back.extra["out_indices"], c.extra["out_indices"]);
    }

    #[test]
    fn validation_names_the_field() {
        let e = BeitConfig::from_json_str(r#"{"hidden_size": 100}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("hidden_size") && e.contains("num_attention_heads"),
            "{e}"
        );
        let e = BeitConfig::from_json_str(r#"{"image_size": 225}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("image_size"), "{e}");
        let e = BeitConfig::from_json_str(r#"{"hidden_act": "swish"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("hidden_act"), "{e}");
        let e = BeitConfig::from_json_str(r#"{"hidden_size": "big"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("hidden_size") || e.contains("invalid type"),
            "{e}"
        );
        let e = BeitConfig::from_json_str(r#"{"image_size": [224, 160]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("non-square"), "{e}");
    }
}
