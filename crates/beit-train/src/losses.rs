//! Classification losses and accuracy of the fine-tuning recipe (unilm uses timm's).
//!
//! * no mixup/cutmix: [`label_smoothing_cross_entropy`] with smoothing 0.1 (timm
//!   `LabelSmoothingCrossEntropy`: `(1−s)·NLL + s·mean_c(−log p_c)`), or plain cross-entropy
//!   when the smoothing is 0;
//! * with mixup/cutmix (label smoothing folded into the mixed targets):
//!   [`soft_target_cross_entropy`] (timm `SoftTargetCrossEntropy`: `mean_n Σ_c −t_c log p_c`);
//! * [`topk_accuracy`] for `acc1`/`acc5` (and the MIM accuracy, `k = 1`).
//!
//! All are computed in f32 with candle's differentiable `log_softmax` (not the fused
//! `softmax_last_dim`, which has no backward).

use candle::{DType, Tensor, D};

use crate::error::{Result, TrainError};

fn check_logits(logits: &Tensor) -> Result<(usize, usize)> {
    logits.dims2().map_err(|_| {
        TrainError::Config(format!(
            "logits must be (batch, classes), got shape {:?}",
            logits.dims()
        ))
    })
}

/// Label-smoothed cross-entropy, mean over the batch. `logits` (N, C) any float dtype,
/// `targets` (N) integer class ids. `smoothing = 0` gives the plain cross-entropy.
pub fn label_smoothing_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    smoothing: f64,
) -> Result<Tensor> {
    let (n, _) = check_logits(logits)?;
    if targets.dims() != [n] {
        return Err(TrainError::Config(format!(
            "targets must be ({n}) class ids, got shape {:?}",
            targets.dims()
        )));
    }
    if !(0.0..1.0).contains(&smoothing) {
        return Err(TrainError::Config(format!(
            "label smoothing must be in [0, 1), got {smoothing}"
        )));
    }
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let idx = targets.to_dtype(DType::U32)?.unsqueeze(1)?;
    let nll = logp.gather(&idx, 1)?.squeeze(1)?.neg()?.mean_all()?;
    if smoothing == 0.0 {
        return Ok(nll);
    }
    let smooth = logp.mean(D::Minus1)?.neg()?.mean_all()?;
    Ok(((nll * (1.0 - smoothing))? + (smooth * smoothing)?)?)
}

/// Cross-entropy against soft targets (rows summing to 1), mean over the batch.
pub fn soft_target_cross_entropy(logits: &Tensor, soft_targets: &Tensor) -> Result<Tensor> {
    check_logits(logits)?;
    if soft_targets.dims() != logits.dims() {
        return Err(TrainError::Config(format!(
            "soft targets {:?} must have the logits' shape {:?}",
            soft_targets.dims(),
            logits.dims()
        )));
    }
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let t = soft_targets.to_dtype(DType::F32)?;
    Ok((t * logp)?.sum(D::Minus1)?.neg()?.mean_all()?)
}

/// Fraction of rows whose target is among the `k` largest logits, for each `k` in `ks`.
///
/// Computed on the device (one comparison per class, then a count), so only `ks.len()` numbers
/// are read back, in one read; a target tied with other logits counts as ranked first among
/// them. A training step keeps them on the device: [`topk_accuracy_on_device`].
pub fn topk_accuracy(logits: &Tensor, targets: &Tensor, ks: &[usize]) -> Result<Vec<f64>> {
    let (n, _) = check_logits(logits)?;
    if n == 0 {
        return Ok(vec![0.0; ks.len()]);
    }
    crate::host::read_values(&topk_accuracy_on_device(logits, targets, ks)?)
}

/// [`topk_accuracy`] left on the device: one f32 scalar tensor per `k` (nothing is read back;
/// hand them to the step as [`crate::StepValue`]s). Zero rows give zeros.
pub fn topk_accuracy_on_device(
    logits: &Tensor,
    targets: &Tensor,
    ks: &[usize],
) -> Result<Vec<Tensor>> {
    let (n, _) = check_logits(logits)?;
    if n == 0 {
        let zero = Tensor::zeros((), DType::F32, logits.device())?;
        return Ok(vec![zero; ks.len()]);
    }
    let rank = target_rank(logits, targets)?;
    ks.iter()
        .map(|&k| Ok(rank.lt(k as f64)?.to_dtype(DType::F32)?.mean_all()?))
        .collect()
}

/// The 0-based rank of each row's target among its logits: how many classes score strictly
/// higher (`(N,)`, f32, on the logits' device; a target tied with others ranks first).
pub fn target_rank(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = logits.detach().to_dtype(DType::F32)?;
    let idx = targets.to_dtype(DType::U32)?.unsqueeze(1)?;
    let target_logit = logits.gather(&idx, 1)?;
    Ok(logits
        .broadcast_gt(&target_logit)?
        .to_dtype(DType::F32)?
        .sum(D::Minus1)?)
}
