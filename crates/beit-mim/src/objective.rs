//! One entry point computing the pre-training loss for any [`MimTarget`].

use candle::{DType, Module, Tensor};

use crate::error::{bad_input, MimError, Result};
use crate::loss::{gather_rows, masked_flat_indices, mim_cross_entropy, mlm_accuracy_on_device};
use crate::pixel::{normalize_patches, patchify, pixel_mse, PixelRegressionHead};
use crate::target::MimTarget;

/// What the model and the data give the loss for one batch.
#[derive(Debug, Clone, Copy)]
pub struct MimInputs<'a> {
    /// Final-normed patch-token features `(B, N, C)` (CLS dropped).
    pub features: &'a Tensor,
    /// `(B, N)` mask, non-zero = masked (`bool_masked_pos`).
    pub mask: &'a Tensor,
    /// `(B, N)` visual-token ids from the tokenizer; needed by `visual-tokens` and `all-tokens`.
    pub token_ids: Option<&'a Tensor>,
    /// `(B, C, H, W)` images as fed to the encoder; needed by `pixel-regression`.
    pub pixels: Option<&'a Tensor>,
}

/// The loss of one batch and what to log with it.
#[derive(Debug, Clone)]
pub struct MimLossOutput {
    /// Scalar loss (f32), differentiable.
    pub loss: Tensor,
    /// Arg-max accuracy of the visual tokens on the masked positions (`mlm_acc`, a scalar f32
    /// tensor on the device, not read back); `None` for pixel regression.
    pub mlm_acc: Option<Tensor>,
    /// Number of masked positions in the batch.
    pub num_masked: usize,
}

/// Compute the loss of `target`.
///
/// - `visual-tokens`: `lm_head` only on the masked rows (the efficient way: `M` rows instead of
///   `B·N`), cross-entropy against their token ids.
/// - `all-tokens`: `lm_head` on every row, cross-entropy against every token id; `mlm_acc` is still
///   measured on the masked rows so it compares with the default target.
/// - `pixel-regression`: `pixel_head` on the masked rows, MSE against the per-patch normalised
///   pixels of those patches.
///
/// Reads the mask back to find the masked positions; a training step that knows them on the
/// host calls [`mim_loss_at`] instead.
pub fn mim_loss(
    target: MimTarget,
    inputs: &MimInputs<'_>,
    lm_head: &dyn Module,
    pixel_head: Option<&PixelRegressionHead>,
) -> Result<MimLossOutput> {
    check_mask_shape(inputs)?;
    let idx = masked_flat_indices(inputs.mask)?;
    mim_loss_at(target, inputs, &idx, lm_head, pixel_head)
}

/// [`mim_loss`] with the masked positions given on the host, so the mask is not read back:
/// `masked` holds the flat indices `b * N + n` of the positions `inputs.mask` masks, in
/// row-major order (e.g. [`crate::MaskBatch::masked_flat_indices`] of the batch the mask was
/// made from).
pub fn mim_loss_at(
    target: MimTarget,
    inputs: &MimInputs<'_>,
    masked: &[u32],
    lm_head: &dyn Module,
    pixel_head: Option<&PixelRegressionHead>,
) -> Result<MimLossOutput> {
    let (b, n) = check_mask_shape(inputs)?;
    check_flat_indices(masked, b, n)?;
    if masked.is_empty() {
        return Err(MimError::NoMaskedPositions);
    }
    let device = inputs.features.device();
    let idx_t = Tensor::from_slice(masked, masked.len(), device)?;
    let token_ids = || flat_token_ids(target, inputs.token_ids, b, n);
    match target {
        MimTarget::VisualTokens => {
            let logits = lm_head.forward(&gather_rows(inputs.features, masked)?)?;
            loss_on_masked_rows(&logits, masked, &token_ids()?)
        }
        MimTarget::AllTokens => {
            let ids = token_ids()?;
            let logits = lm_head.forward(inputs.features)?;
            let v = logits.dim(2)?;
            let logits = logits.reshape((b * n, v))?;
            let masked_logits = logits.index_select(&idx_t, 0)?;
            let masked_ids = ids.index_select(&idx_t, 0)?;
            Ok(MimLossOutput {
                loss: mim_cross_entropy(&logits, &ids)?,
                mlm_acc: Some(mlm_accuracy_on_device(&masked_logits, &masked_ids)?),
                num_masked: masked.len(),
            })
        }
        MimTarget::PixelRegression => {
            let head = pixel_head.ok_or(MimError::MissingInput {
                target: target.as_str(),
                needed: "a pixel head (`PixelRegressionHead`)",
            })?;
            let pixels = inputs.pixels.ok_or(MimError::MissingInput {
                target: target.as_str(),
                needed: "the input images (`pixels`)",
            })?;
            let patches = patchify(&pixels.to_dtype(DType::F32)?, head.patch_size())?;
            if patches.dims()[..2] != [b, n] || patches.dim(2)? != head.out_dim() {
                return Err(bad_input(
                    "pixels",
                    format!(
                        "patchified to {:?}, expected ({b}, {n}, {}) for the features and head",
                        patches.dims(),
                        head.out_dim()
                    ),
                ));
            }
            let target_px = gather_rows(&normalize_patches(&patches)?, masked)?;
            let pred = head
                .forward(&gather_rows(inputs.features, masked)?)?
                .to_dtype(DType::F32)?;
            Ok(MimLossOutput {
                loss: pixel_mse(&pred, &target_px.detach())?,
                mlm_acc: None,
                num_masked: masked.len(),
            })
        }
    }
}

/// The `visual-tokens` loss from logits already computed for the masked positions only, `(M, V)`
/// in row-major (image, patch) order (e.g. `BeitForMaskedImageModeling::forward_masked`, which
/// runs the last block and `lm_head` on those rows alone): cross-entropy against the token ids of
/// the masked positions of `mask` `(B, N)`, and `mlm_acc`. Reads the mask back; a training step
/// calls [`masked_token_loss_at`] instead.
pub fn masked_token_loss(
    masked_logits: &Tensor,
    mask: &Tensor,
    token_ids: Option<&Tensor>,
) -> Result<MimLossOutput> {
    let idx = masked_flat_indices(mask)?;
    masked_token_loss_at(masked_logits, mask.dims2()?, &idx, token_ids)
}

/// [`masked_token_loss`] with the masked positions given on the host, so nothing is read back:
/// `masked` holds the flat indices `b * N + n` of the masked positions of the `grid` `(B, N)`,
/// in row-major order.
pub fn masked_token_loss_at(
    masked_logits: &Tensor,
    grid: (usize, usize),
    masked: &[u32],
    token_ids: Option<&Tensor>,
) -> Result<MimLossOutput> {
    let (b, n) = grid;
    check_flat_indices(masked, b, n)?;
    if masked.is_empty() {
        return Err(MimError::NoMaskedPositions);
    }
    let ids = flat_token_ids(MimTarget::VisualTokens, token_ids, b, n)?;
    if masked_logits.dims().first() != Some(&masked.len()) {
        return Err(bad_input(
            "masked_logits",
            format!(
                "expected ({}, vocab) for the masked positions, got {:?}",
                masked.len(),
                masked_logits.dims()
            ),
        ));
    }
    loss_on_masked_rows(masked_logits, masked, &ids)
}

/// The `(B, N)` of the features, checked against the mask's shape.
fn check_mask_shape(inputs: &MimInputs<'_>) -> Result<(usize, usize)> {
    let (b, n, _c) = inputs.features.dims3().map_err(|_| {
        bad_input(
            "features",
            format!("expected (B, N, C), got {:?}", inputs.features.dims()),
        )
    })?;
    if inputs.mask.dims() != [b, n] {
        return Err(bad_input(
            "mask",
            format!(
                "expected ({b}, {n}) to match the features, got {:?}",
                inputs.mask.dims()
            ),
        ));
    }
    Ok((b, n))
}

/// Fails unless `masked` is strictly increasing and below `b * n`.
fn check_flat_indices(masked: &[u32], b: usize, n: usize) -> Result<()> {
    if masked.windows(2).any(|w| w[0] >= w[1]) {
        return Err(bad_input(
            "masked",
            "indices are not strictly increasing".to_string(),
        ));
    }
    match masked.last() {
        Some(&last) if last as usize >= b * n => Err(bad_input(
            "masked",
            format!("index {last} is outside the {b}x{n} positions"),
        )),
        _ => Ok(()),
    }
}

/// The `(B, N)` visual-token ids that `target` needs, checked and flattened to `(B*N,)` `u32`.
fn flat_token_ids(
    target: MimTarget,
    token_ids: Option<&Tensor>,
    b: usize,
    n: usize,
) -> Result<Tensor> {
    let ids = token_ids.ok_or(MimError::MissingInput {
        target: target.as_str(),
        needed: "visual-token ids (`token_ids`)",
    })?;
    if ids.dims() != [b, n] {
        return Err(bad_input(
            "token_ids",
            format!("expected ({b}, {n}), got {:?}", ids.dims()),
        ));
    }
    Ok(ids.flatten_all()?.to_dtype(DType::U32)?)
}

/// Cross-entropy and accuracy of `(M, V)` logits of the masked positions `idx` (flat, row-major)
/// against the flat ids of every position.
fn loss_on_masked_rows(
    masked_logits: &Tensor,
    idx: &[u32],
    flat_ids: &Tensor,
) -> Result<MimLossOutput> {
    let idx_t = Tensor::from_slice(idx, idx.len(), masked_logits.device())?;
    let ids = flat_ids.index_select(&idx_t, 0)?;
    Ok(MimLossOutput {
        loss: mim_cross_entropy(masked_logits, &ids)?,
        mlm_acc: Some(mlm_accuracy_on_device(masked_logits, &ids)?),
        num_masked: idx.len(),
    })
}
