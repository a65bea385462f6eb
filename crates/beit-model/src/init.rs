//! Initialisation for training from scratch, applied to a `VarMap` by parameter role: the
//! model's own init rules, beside the parameter knowledge of [`crate::param_info`] (as timm's and
//! transformers' `_init_weights` belong to their models).
//!
//! The model says what each tensor is ([`ParamInfo::role`], e.g. BEiT's
//! [`beit_model::param_info::BeitParams`]); the [`InitConfig`] says how each role is drawn. Two
//! schemes are provided.
//!
//! **unilm** ([`InitConfig::finetune`], [`InitConfig::pretrain`]; BEiT paper §2.5, unilm
//! `modeling_pretrain.py` / `modeling_finetune.py`):
//!
//! * linear weights, `cls_token`, `mask_token`, `position_embeddings`, head weights: truncated
//!   normal, mean 0, std 0.02 (see [`Truncation`]);
//! * every linear bias: 0; LayerNorm weight 1 and bias 0;
//! * relative-position bias tables: 0; LayerScale `lambda_1/2`: the layer-scale init value;
//! * the patch-embedding convolution keeps PyTorch's default `Conv2d` init (unilm's
//!   `_init_weights` only touches Linear and LayerNorm): weight and bias uniform in
//!   `±1/sqrt(fan_in)`;
//! * then (unilm `fix_init_weight`) the output projections of block `l` (1-based) into the
//!   residual stream (attention output, second MLP layer) are divided by `sqrt(2·l)`;
//! * at fine-tuning, the classifier weight and bias are multiplied by `head_init_scale`
//!   (unilm `--init_scale 0.001`).
//!
//! **transformers** ([`InitConfig::transformers`], `BeitPreTrainedModel._init_weights`): every
//! linear and convolution weight (patch embedding and heads included) normal with std 0.02, not
//! truncated, biases 0; `cls_token`, `mask_token`, `position_embeddings` and the relative-position
//! tables 0; LayerNorm 1/0; LayerScale the init value; no depth rescale, no head scaling.
//!
//! Random numbers come from the caller's seeded generator (any [`rand::Rng`]; training passes its
//! checkpointed one), parameters are visited in sorted name order, so the same seed gives the
//! same model on every machine.
//!
//! Fine-tuning a checkpoint follows unilm's order: build the model, initialise everything with
//! [`InitConfig::finetune`] (which scales the fresh head by 0.001), then load the pre-trained
//! weights non-strictly over it, leaving the head (and any other parameter the checkpoint lacks)
//! with its fresh initialisation.

use candle::{DType, Tensor, Var};
use candle_nn::VarMap;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{BeitError, Result};
use crate::param_info::{BeitParams, ParamInfo, ParamRole};

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
    /// A plain normal (transformers' `normal_`).
    None,
}

/// How the patch-embedding convolution is initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PatchEmbedInit {
    /// PyTorch's default `Conv2d` init, weight and bias uniform in `±1/sqrt(fan_in)` (unilm).
    #[default]
    TorchDefault,
    /// Like the linear weights (normal with [`InitConfig::std`]), bias 0 (transformers).
    Normal,
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
    /// The patch-embedding convolution (unilm: torch's default; transformers: normal).
    #[serde(default)]
    pub patch_embed: PatchEmbedInit,
    /// `cls_token`, `mask_token` and `position_embeddings` start at 0 (transformers) rather than
    /// truncated normal (unilm).
    #[serde(default)]
    pub zero_tokens: bool,
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
            patch_embed: PatchEmbedInit::TorchDefault,
            zero_tokens: false,
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

    /// The initialisation of a classifier about to be fine-tuned: from scratch
    /// (`from_scratch`), [`InitConfig::transformers`]; under a checkpoint, unilm's
    /// [`InitConfig::finetune`] (what the checkpoint lacks, i.e. the fresh head, keeps it).
    ///
    /// From scratch, unilm's scheme trains markedly worse in short runs: on the embedded
    /// Fashion-MNIST recipe (8 epochs) it stalled in the warm-up epoch and ended 5-8 points of
    /// top-1 below the same model initialised as transformers does (seed 0; PyTorch's peer
    /// agrees with the latter); `docs/training-parity.md` has the tables.
    pub fn classifier(num_layers: usize, layer_scale_init: f64, from_scratch: bool) -> Self {
        if from_scratch {
            Self::transformers(num_layers, layer_scale_init)
        } else {
            Self::finetune(num_layers, layer_scale_init)
        }
    }

    /// transformers' `_init_weights` (see the module docs): plain normal std 0.02 for every
    /// linear and convolution weight, zero tokens, no depth rescale, no head scaling.
    pub fn transformers(num_layers: usize, layer_scale_init: f64) -> Self {
        Self {
            num_layers,
            std: 0.02,
            truncation: Truncation::None,
            layer_scale_init,
            rescale_depth: false,
            head_init_scale: None,
            patch_embed: PatchEmbedInit::Normal,
            zero_tokens: true,
        }
    }
}

/// `n` samples of a normal(`mean`, `std`) truncated to `[a, b]` (rejection sampling, exact in
/// distribution; fails if the interval holds almost no mass).
pub fn trunc_normal_vec(
    rng: &mut (impl Rng + ?Sized),
    n: usize,
    mean: f64,
    std: f64,
    a: f64,
    b: f64,
) -> Result<Vec<f32>> {
    if a >= b || a.is_nan() || b.is_nan() || std.is_nan() || std <= 0.0 {
        return Err(BeitError::Init(format!(
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
            return Err(BeitError::Init(format!(
                "truncated normal [{a}, {b}] around {mean} (std {std}) rejects almost everything"
            )));
        }
    }
    Ok(out)
}

/// What happened to each parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitKind {
    /// Truncated normal (or plain normal with [`Truncation::None`]).
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

impl InitKind {
    /// The distribution `cfg` gives a parameter of this role.
    pub fn for_role(role: ParamRole, cfg: &InitConfig) -> Self {
        use ParamRole::*;
        match role {
            ClsToken | MaskToken | PositionEmbeddings if cfg.zero_tokens => InitKind::Zeros,
            ClsToken | MaskToken | PositionEmbeddings => InitKind::TruncNormal,
            PatchEmbedWeight | PatchEmbedBias
                if cfg.patch_embed == PatchEmbedInit::TorchDefault =>
            {
                InitKind::ConvDefault
            }
            PatchEmbedWeight => InitKind::TruncNormal,
            PatchEmbedBias => InitKind::Zeros,
            RelativePositionTable => InitKind::Zeros,
            LayerScale => InitKind::LayerScale,
            NormWeight => InitKind::Ones,
            NormBias | LinearBias | ClassifierBias => InitKind::Zeros,
            ResidualOutputWeight | LinearWeight | ClassifierWeight => InitKind::TruncNormal,
        }
    }
}

/// Which unilm rule applies to a BEiT parameter name and shape.
pub fn init_kind(name: &str, dims: &[usize]) -> Result<InitKind> {
    let role = crate::param_info::role(name, dims).ok_or_else(|| no_rule(name, dims))?;
    Ok(InitKind::for_role(role, &InitConfig::finetune(0, 0.0)))
}

fn no_rule(name: &str, dims: &[usize]) -> BeitError {
    BeitError::Parameter {
        name: name.into(),
        message: format!("no initialisation rule for a parameter of shape {dims:?}"),
    }
}

/// Initialise every parameter of a BEiT `varmap` in place (BEiT's parameter roles); see
/// [`init_beit_with`].
pub fn init_beit(
    varmap: &VarMap,
    cfg: &InitConfig,
    rng: &mut (impl Rng + ?Sized),
) -> Result<Vec<(String, InitKind)>> {
    init_beit_with(varmap, cfg, rng, &BeitParams::new(cfg.num_layers))
}

/// Initialise every parameter of `varmap` in place by the role `info` gives it; returns the rule
/// applied to each name. Fails on a name without a role, a block index `>= cfg.num_layers`, or an
/// `info` for another depth.
pub fn init_beit_with(
    varmap: &VarMap,
    cfg: &InitConfig,
    rng: &mut (impl Rng + ?Sized),
    info: &dyn ParamInfo,
) -> Result<Vec<(String, InitKind)>> {
    if info.num_layers() != cfg.num_layers {
        return Err(BeitError::Init(format!(
            "the initialisation is configured for {} blocks but the model has {}",
            cfg.num_layers,
            info.num_layers()
        )));
    }
    let (lo, hi) = match cfg.truncation {
        Truncation::StdMultiple(k) => (-k * cfg.std, k * cfg.std),
        Truncation::Absolute { a, b } => (a, b),
        Truncation::None => (f64::NEG_INFINITY, f64::INFINITY),
    };
    let vars = sorted_vars(varmap);
    let mut roles = Vec::with_capacity(vars.len());
    for (name, var) in &vars {
        let role = info
            .role(name, var.dims())
            .ok_or_else(|| no_rule(name, var.dims()))?;
        roles.push(role);
    }
    // The patch-embedding bias bound needs the conv weight's fan-in.
    let conv_fan_in = vars
        .iter()
        .zip(&roles)
        .find(|(_, r)| **r == ParamRole::PatchEmbedWeight)
        .map(|((_, v), _)| v.dims().iter().skip(1).product::<usize>());
    let mut report = Vec::with_capacity(vars.len());
    for ((name, var), &role) in vars.iter().zip(&roles) {
        let dims = var.dims().to_vec();
        let n = var.elem_count();
        let kind = InitKind::for_role(role, cfg);
        let mut values: Vec<f32> = match kind {
            InitKind::TruncNormal => trunc_normal_vec(rng, n, 0.0, cfg.std, lo, hi)?,
            InitKind::ConvDefault => {
                let fan_in = conv_fan_in.ok_or_else(|| BeitError::Parameter {
                    name: name.clone(),
                    message: "patch-embedding bias without its weight".into(),
                })?;
                let bound = 1.0 / (fan_in as f32).sqrt();
                (0..n).map(|_| rng.random_range(-bound..bound)).collect()
            }
            InitKind::Zeros => vec![0.0; n],
            InitKind::Ones => vec![1.0; n],
            InitKind::LayerScale => vec![cfg.layer_scale_init as f32; n],
        };
        if let Some(k) = info.block_index(name) {
            if k >= cfg.num_layers {
                return Err(BeitError::Parameter {
                    name: name.clone(),
                    message: format!("block {k} but the model has {} blocks", cfg.num_layers),
                });
            }
            if cfg.rescale_depth && role == ParamRole::ResidualOutputWeight {
                let s = 1.0 / (2.0 * (k + 1) as f32).sqrt();
                values.iter_mut().for_each(|x| *x *= s);
            }
        }
        if let Some(scale) = cfg.head_init_scale {
            if matches!(
                role,
                ParamRole::ClassifierWeight | ParamRole::ClassifierBias
            ) {
                values.iter_mut().for_each(|x| *x *= scale as f32);
            }
        }
        let t = Tensor::from_vec(values, dims.as_slice(), var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
        report.push((name.clone(), kind));
    }
    Ok(report)
}

/// The variables of `varmap` in name order.
fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().expect("VarMap mutex poisoned");
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Convenience for tests and tools: the f32 values of a named parameter.
pub fn var_values(varmap: &VarMap, name: &str) -> Result<Vec<f32>> {
    let data = varmap.data().lock().expect("VarMap mutex poisoned");
    let v = data.get(name).ok_or_else(|| BeitError::Parameter {
        name: name.into(),
        message: "not in the VarMap".into(),
    })?;
    Ok(v.as_tensor()
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1()?)
}
