//! Blockwise masking and masked-image-modeling (MIM) losses for BEiT pre-training.
//!
//! - [`MaskingGenerator`]: BEiT's blockwise generator, a faithful restatement of the reference
//!   (`unilm/beit/masking_generator.py`), and [`RandomMasking`] for the uniform ablation; both
//!   implement [`MaskSampler`] and are chosen by [`MaskingConfig`] (serde). Masks are reproducible
//!   per `(seed, step, sample)` ([`sample_rng`]) and come as a host [`MaskBatch`] or a `(B, N)` `u8`
//!   tensor.
//! - [`mim_loss`] for the three [`MimTarget`]s of the paper's Table 4, built from differentiable
//!   helpers ([`gather_masked_rows`], [`mim_cross_entropy`], [`patchify`], ...), plus
//!   [`mlm_accuracy`] and the [`check_finite`] guard.
//! - [`MaskingSpec`]: the `[masking]` table of a pre-training recipe, scaled to any patch grid.
//!
//! The crate works on tensors only: the model (`beit-model`) provides the `(B, N, C)` patch
//! features and the `lm_head`.
//!
//! ```
//! use beit_mim::{MaskSampler, MaskingConfig};
//! # fn main() -> Result<(), beit_mim::MimError> {
//! let sampler = MaskingConfig::default().build()?; // 14x14 grid, 75 patches, blocks >= 16
//! let batch = sampler.sample_batch(/* seed */ 0, /* step */ 0, /* batch */ 4);
//! assert!(batch.counts().iter().all(|&n| n <= 75));
//! let mask = batch.to_tensor(&candle::Device::Cpu)?; // (4, 196) u8
//! assert_eq!(mask.dims(), &[4, 196]);
//! # Ok(()) }
//! ```

mod config;
mod error;
mod loss;
mod masking;
mod masking_config;
mod objective;
mod pixel;
mod random_masking;
mod sampler;
pub mod stats;
mod target;

pub use config::MaskingSpec;
pub use error::{MimError, Result};
pub use loss::{
    check_finite, gather_masked_labels, gather_masked_rows, gather_rows, mask_reads,
    masked_flat_indices, mim_cross_entropy, mlm_accuracy, mlm_accuracy_on_device,
};
pub use masking::{MaskingGenerator, MAX_ATTEMPTS_PER_BLOCK};
pub use masking_config::{MaskStrategy, MaskingConfig};
pub use objective::{
    masked_token_loss, masked_token_loss_at, mim_loss, mim_loss_at, MimInputs, MimLossOutput,
};
pub use pixel::{
    normalize_patches, patchify, pixel_mse, PixelRegressionHead, PATCH_NORM_EPS, PIXEL_HEAD_NAME,
};
pub use random_masking::RandomMasking;
pub use sampler::{sample_rng, MaskBatch, MaskSampler};
pub use target::MimTarget;
