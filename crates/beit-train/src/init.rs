//! unilm's initialisation for training from scratch, applied to a `VarMap` by parameter name.
//!
//! Rules (BEiT paper §2.5, unilm `modeling_pretrain.py` / `modeling_finetune.py`):
//!
//! * Linear weights (`*.weight` of rank ≥ 2 that are not otherwise listed), `cls_token`,
//!   `mask_token`, `position_embeddings`: truncated normal, mean 0, std 0.02 (see [`Truncation`]);
//! * `lm_head`, `classifier`, `pixel_head` weights likewise;
//! * every `*.bias`: 0; LayerNorm weight 1 and bias 0;
//! * relative-position bias tables: 0; LayerScale `lambda_1/2`: the layer-scale init value;
//! * the patch-embedding convolution keeps PyTorch's default `Conv2d` init (unilm's
//!   `_init_weights` only touches Linear and LayerNorm): weight and bias uniform in
//!   `±1/sqrt(fan_in)`;
//! * then (unilm `fix_init_weight`) the output projections of block `l` (1-based) — the attention
//!   output (`attention.output.dense.weight`, v5 `attention.o_proj.weight`) and the MLP output
//!   (`output.dense.weight`, v5 `mlp.fc2.weight`) — are divided by `sqrt(2·l)`;
//! * at fine-tuning, the classifier weight and bias are multiplied by `head_init_scale`
//!   (unilm `--init_scale 0.001`).
//!
//! Random numbers come from a seeded [`TrainRng`], parameters are visited in sorted name order,
//! so the same seed gives the same model on every machine.
//!
//! Fine-tuning follows unilm's order: build the model, initialise everything with
//! [`InitConfig::finetune`] (which scales the fresh head by 0.001), then load the pre-trained
//! weights non-strictly over it, leaving the head (and any other parameter the checkpoint lacks)
//! with its fresh initialisation.

use candle::{DType, Tensor};
use candle_nn::VarMap;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::param_groups::{block_index, is_rel_pos_table, named_vars};
use crate::rng::TrainRng;

/// Where the truncated normal is cut.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Truncation {
    /// At `±k·std` around the mean. unilm pre-training wraps timm's `trunc_normal_` with
    /// `a=-std, b=std`, i.e. `k = 1` (values in `[-0.02, 0.02]`, as the paper says).
    StdMultiple(f64),
    /// At absolute values `[a, b]`: torch/timm's `trunc_normal_` default `a=-2, b=2`, which for
    /// std 0.02 is effectively no truncation.
    Absolute {
        /// Lower bound.
        a: f64,
        /// Upper bound.
        b: f64,
    },
}

/// Initialisation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitConfig {
    /// Number of transformer blocks (for validation of block indices).
    pub num_layers: usize,
    /// Standard deviation of the truncated normal (0.02).
    pub std: f64,
    /// Truncation of the normal.
    pub truncation: Truncation,
    /// Initial value of the LayerScale parameters `lambda_1/2` (0.1 base, 1e-5 large).
    pub layer_scale_init: f64,
    /// Divide block output projections by `sqrt(2·l)` (unilm/timm yes, HF no).
    pub rescale_depth: bool,
    /// Multiply the classifier weight and bias by this (fine-tuning: 0.001).
    pub head_init_scale: Option<f64>,
}

impl InitConfig {
    /// unilm pre-training: truncation at ±1 std, depth rescale, no head scaling.
    pub fn pretrain(num_layers: usize, layer_scale_init: f64) -> Self {
        Self {
            num_layers,
            std: 0.02,
            truncation: Truncation::StdMultiple(1.0),
            layer_scale_init,
            rescale_depth: true,
            head_init_scale: None,
        }
    }

    /// unilm fine-tuning from scratch (or of the fresh head): timm's `trunc_normal_` bounds,
    /// depth rescale, head × 0.001.
    pub fn finetune(num_layers: usize, layer_scale_init: f64) -> Self {
        Self {
            truncation: Truncation::Absolute { a: -2.0, b: 2.0 },
            head_init_scale: Some(0.001),
            ..Self::pretrain(num_layers, layer_scale_init)
        }
    }
}

/// `n` samples of a normal(`mean`, `std`) truncated to `[a, b]` (rejection sampling, exact in
/// distribution; fails if the interval holds almost no mass).
pub fn trunc_normal_vec(
    rng: &mut TrainRng,
    n: usize,
    mean: f64,
    std: f64,
    a: f64,
    b: f64,
) -> Result<Vec<f32>> {
    if a >= b || a.is_nan() || b.is_nan() || std.is_nan() || std <= 0.0 {
        return Err(TrainError::Config(format!(
            "truncated normal needs a < b and std > 0 (a={a}, b={b}, std={std})"
        )));
    }
    let mut out = Vec::with_capacity(n);
    let mut tries = 0u64;
    while out.len() < n {
        let z: f64 = rng.sample(rand_distr::StandardNormal);
        let x = mean + std * z;
        if x >= a && x <= b {
            out.push(x as f32);
        }
        tries += 1;
        if tries > 1000 + 1000 * n as u64 {
            return Err(TrainError::Config(format!(
                "truncated normal [{a}, {b}] around {mean} (std {std}) rejects almost everything"
            )));
        }
    }
    Ok(out)
}

/// What happened to each parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitKind {
    /// Truncated normal.
    TruncNormal,
    /// Uniform `±1/sqrt(fan_in)` (torch `Conv2d` default).
    ConvDefault,
    /// Constant zero.
    Zeros,
    /// Constant one (LayerNorm weight).
    Ones,
    /// The LayerScale init value.
    LayerScale,
}

/// Which rule applies to a parameter name and shape.
pub fn init_kind(name: &str, dims: &[usize]) -> Result<InitKind> {
    let last = name.rsplit('.').next().unwrap_or(name);
    let module = name
        .rsplit_once('.')
        .map(|(m, _)| m.rsplit('.').next().unwrap_or(m))
        .unwrap_or("");
    let is_norm = module.contains("layernorm") || module == "norm" || module == "fc_norm";
    Ok(if name.contains("patch_embeddings.projection") {
        InitKind::ConvDefault
    } else if is_rel_pos_table(name) {
        InitKind::Zeros
    } else if last.starts_with("lambda_") {
        InitKind::LayerScale
    } else if is_norm && last == "weight" {
        InitKind::Ones
    } else if last == "bias" {
        InitKind::Zeros
    } else if matches!(last, "cls_token" | "mask_token" | "position_embeddings")
        || (last == "weight" && dims.len() >= 2)
    {
        InitKind::TruncNormal
    } else {
        return Err(TrainError::Parameter {
            name: name.into(),
            message: format!("no initialisation rule for a parameter of shape {dims:?}"),
        });
    })
}

/// Whether `name` is an output projection rescaled by `1/sqrt(2·l)`.
fn is_block_output_projection(name: &str) -> bool {
    [
        ".attention.output.dense.weight",
        ".attention.o_proj.weight",
        ".mlp.fc2.weight",
    ]
    .iter()
    .any(|s| name.ends_with(s))
        || (name.ends_with(".output.dense.weight")
            && !name.ends_with(".attention.output.dense.weight")
            && block_index(name).is_some())
}

/// Initialise every parameter of `varmap` in place; returns the rule applied to each name.
pub fn init_beit(
    varmap: &VarMap,
    cfg: &InitConfig,
    rng: &mut TrainRng,
) -> Result<Vec<(String, InitKind)>> {
    let (lo, hi) = match cfg.truncation {
        Truncation::StdMultiple(k) => (-k * cfg.std, k * cfg.std),
        Truncation::Absolute { a, b } => (a, b),
    };
    let vars = named_vars(varmap);
    // The patch-embedding bias bound needs the conv weight's fan-in.
    let conv_fan_in = vars
        .iter()
        .find(|(n, _)| n.ends_with("patch_embeddings.projection.weight"))
        .map(|(_, v)| v.dims().iter().skip(1).product::<usize>());
    let mut report = Vec::with_capacity(vars.len());
    for (name, var) in &vars {
        let dims = var.dims().to_vec();
        let n = var.elem_count();
        let kind = init_kind(name, &dims)?;
        let mut values: Vec<f32> = match kind {
            InitKind::TruncNormal => trunc_normal_vec(rng, n, 0.0, cfg.std, lo, hi)?,
            InitKind::ConvDefault => {
                let fan_in = conv_fan_in.ok_or_else(|| TrainError::Parameter {
                    name: name.clone(),
                    message: "patch-embedding bias without its weight".into(),
                })?;
                let bound = 1.0 / (fan_in as f32).sqrt();
                rng.uniform_vec(n, -bound, bound)
            }
            InitKind::Zeros => vec![0.0; n],
            InitKind::Ones => vec![1.0; n],
            InitKind::LayerScale => vec![cfg.layer_scale_init as f32; n],
        };
        if let Some(k) = block_index(name) {
            if k >= cfg.num_layers {
                return Err(TrainError::Parameter {
                    name: name.clone(),
                    message: format!("block {k} but the model has {} blocks", cfg.num_layers),
                });
            }
            if cfg.rescale_depth && is_block_output_projection(name) {
                let s = 1.0 / (2.0 * (k + 1) as f32).sqrt();
                values.iter_mut().for_each(|x| *x *= s);
            }
        }
        if let Some(scale) = cfg.head_init_scale {
            if name == "classifier.weight" || name == "classifier.bias" {
                values.iter_mut().for_each(|x| *x *= scale as f32);
            }
        }
        let t = Tensor::from_vec(values, dims.as_slice(), var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
        report.push((name.clone(), kind));
    }
    Ok(report)
}

/// Convenience for tests and tools: the f32 values of a named parameter.
pub fn var_values(varmap: &VarMap, name: &str) -> Result<Vec<f32>> {
    let data = varmap.data().lock().expect("VarMap mutex poisoned");
    let v = data.get(name).ok_or_else(|| TrainError::Parameter {
        name: name.into(),
        message: "not in the VarMap".into(),
    })?;
    Ok(v.as_tensor()
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1()?)
}
