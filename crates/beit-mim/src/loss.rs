//! Masked-position selection, the MIM cross-entropy, masked-token accuracy and the finiteness
//! guard. All tensor paths are differentiable (`index_select`, `log_softmax`, `gather`).

use candle::{DType, Tensor, D};

use crate::error::{bad_input, MimError, Result};

thread_local! {
    static MASK_READS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many times this thread has read a mask tensor back ([`masked_flat_indices`], and the
/// losses that call it). A training step passes the masked positions from the host
/// ([`crate::mim_loss_at`], [`crate::masked_token_loss_at`]); tests pin this count to show that
/// it reads nothing.
pub fn mask_reads() -> u64 {
    MASK_READS.with(std::cell::Cell::get)
}

/// Host-side indices `b * N + n` of the masked positions of a `(B, N)` mask tensor (any dtype;
/// non-zero = masked), in row-major order. Reads the mask back from its device.
pub fn masked_flat_indices(mask: &Tensor) -> Result<Vec<u32>> {
    MASK_READS.with(|r| r.set(r.get() + 1));
    if mask.rank() != 2 {
        return Err(bad_input(
            "mask",
            format!("expected a (B, N) tensor, got shape {:?}", mask.dims()),
        ));
    }
    let flat = mask.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(flat
        .iter()
        .enumerate()
        .filter(|(_, &m)| m != 0.0)
        .map(|(i, _)| i as u32)
        .collect())
}

/// Rows `flat_indices` of `(B, N, C)` features viewed as `(B * N, C)`: an `(M, C)` tensor that keeps
/// the gradient path to `features`.
///
/// # Shapes
/// - `features`: `(B, N, C)`; `flat_indices`: `M` values below `B * N`; output `(M, C)`.
pub fn gather_rows(features: &Tensor, flat_indices: &[u32]) -> Result<Tensor> {
    let (b, n, c) = features.dims3().map_err(|_| {
        bad_input(
            "features",
            format!("expected (B, N, C), got {:?}", features.dims()),
        )
    })?;
    if let Some(&bad) = flat_indices.iter().find(|&&i| i as usize >= b * n) {
        return Err(bad_input(
            "mask",
            format!("index {bad} is outside the {b}x{n} positions of the features"),
        ));
    }
    let idx = Tensor::from_slice(flat_indices, flat_indices.len(), features.device())?;
    Ok(features.reshape((b * n, c))?.index_select(&idx, 0)?)
}

/// The masked rows of `(B, N, C)` features: `(M, C)` where `M` is the number of masked positions,
/// in row-major order (the order of `features[bool_masked_pos]` in PyTorch).
pub fn gather_masked_rows(features: &Tensor, mask: &Tensor) -> Result<Tensor> {
    check_mask_matches(features, mask)?;
    gather_rows(features, &masked_flat_indices(mask)?)
}

/// The labels of the masked positions: `(B, N)` ids → `(M,)` `u32`.
pub fn gather_masked_labels(labels: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if labels.dims() != mask.dims() {
        return Err(bad_input(
            "labels",
            format!(
                "shape {:?} differs from the mask's {:?}",
                labels.dims(),
                mask.dims()
            ),
        ));
    }
    let idx = masked_flat_indices(mask)?;
    let idx = Tensor::from_slice(&idx, idx.len(), labels.device())?;
    Ok(labels
        .flatten_all()?
        .to_dtype(DType::U32)?
        .index_select(&idx, 0)?)
}

fn check_mask_matches(features: &Tensor, mask: &Tensor) -> Result<()> {
    let fd = features.dims();
    if fd.len() != 3 || mask.dims() != &fd[..2] {
        return Err(bad_input(
            "mask",
            format!(
                "shape {:?} does not match features {:?} (expected (B, N) and (B, N, C))",
                mask.dims(),
                fd
            ),
        ));
    }
    Ok(())
}

fn check_logits_labels(logits: &Tensor, labels: &Tensor) -> Result<usize> {
    let (m, _v) = logits.dims2().map_err(|_| {
        bad_input(
            "logits",
            format!("expected (M, V), got {:?}", logits.dims()),
        )
    })?;
    if labels.dims() != [m] {
        return Err(bad_input(
            "labels",
            format!(
                "expected ({m},) to match the logits, got {:?}",
                labels.dims()
            ),
        ));
    }
    if m == 0 {
        return Err(MimError::NoMaskedPositions);
    }
    Ok(m)
}

/// Mean cross-entropy of `(M, V)` logits against `(M,)` token ids, computed in f32 whatever the
/// logits' dtype (the loss of a bf16 forward stays accurate).
pub fn mim_cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    check_logits_labels(logits, labels)?;
    let logits = logits.to_dtype(DType::F32)?;
    let labels = labels.to_dtype(DType::U32)?;
    Ok(candle_nn::loss::cross_entropy(&logits, &labels)?)
}

/// Share of rows whose arg-max logit equals the label (`mlm_acc` in the reference logs).
pub fn mlm_accuracy(logits: &Tensor, labels: &Tensor) -> Result<f32> {
    Ok(mlm_accuracy_on_device(logits, labels)?.to_scalar::<f32>()?)
}

/// [`mlm_accuracy`] as a scalar f32 tensor on the logits' device, not read back (a training
/// step logs it without waiting for the device): the count of hits divided by the rows in f32,
/// the same value [`mlm_accuracy`] reads.
pub fn mlm_accuracy_on_device(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let m = check_logits_labels(logits, labels)?;
    let pred = logits.detach().argmax(D::Minus1)?;
    let hits = pred
        .eq(&labels.to_dtype(DType::U32)?)?
        .to_dtype(DType::F32)?
        .sum_all()?;
    let rows = Tensor::new(m as f32, logits.device())?;
    Ok(hits.div(&rows)?)
}

/// Read a scalar loss and fail with [`MimError::NonFiniteLoss`] if it is NaN or infinite, so the
/// trainer stops with a clear message before the optimiser step corrupts the weights.
pub fn check_finite(loss: &Tensor, step: u64) -> Result<f32> {
    if loss.elem_count() != 1 {
        return Err(bad_input(
            "loss",
            format!("expected a scalar, got shape {:?}", loss.dims()),
        ));
    }
    let value = loss.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?[0];
    if value.is_finite() {
        Ok(value)
    } else {
        Err(MimError::NonFiniteLoss { step, value })
    }
}
