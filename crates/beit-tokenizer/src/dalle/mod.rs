//! The DALL-E discrete VAE (OpenAI's `dall_e` package) as inference modules.
//!
//! [`Encoder`]: image (mapped pixels) -> logits over the vocabulary at 1/8 resolution;
//! [`Decoder`]: one-hot (or relaxed) codes -> 2 x channels maps (mean and log-scale of a
//! logit-Laplace distribution). Both read safetensors files with `dall_e`'s own state-dict names,
//! and both are generalised over the group count (DALL-E: 4 groups, 8x down/up-sampling), which is
//! how our own smaller dVAE ([`crate::dvae`]) reuses them.

pub mod decoder;
pub mod encoder;

pub use decoder::{Decoder, DecoderConfig};
pub use encoder::{Encoder, EncoderConfig};

use crate::error::{Result, TokenizerError};
use crate::weights::WeightsFile;

/// Count `prefix{1}suffix`, `prefix{2}suffix`, ... present in `weights`.
fn count_indexed(weights: &WeightsFile, prefix: &str, suffix: &str) -> usize {
    (1..)
        .take_while(|i| weights.contains(&format!("{prefix}{i}{suffix}")))
        .count()
}

/// Infer `(group_count, n_blk_per_group)` from the block names present in a file.
/// Number of scalars in a list of `(name, shape)` parameters.
fn count_params(shapes: &[(String, Vec<usize>)]) -> usize {
    shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
}

fn infer_layout(weights: &WeightsFile) -> Result<(usize, usize)> {
    let groups = count_indexed(weights, "blocks.group_", ".block_1.res_path.conv_1.w");
    let blocks = count_indexed(weights, "blocks.group_1.block_", ".res_path.conv_1.w");
    if groups == 0 || blocks == 0 {
        return Err(TokenizerError::MissingTensor {
            path: weights.path.clone(),
            key: "blocks.group_1.block_1.res_path.conv_1.w".into(),
        });
    }
    Ok((groups, blocks))
}

/// Validate the fields shared by encoder and decoder configurations.
fn validate_common(
    context: &str,
    group_count: usize,
    n_hid: usize,
    n_blk_per_group: usize,
    vocab_size: usize,
) -> Result<()> {
    let err = |field: &str, reason: &str| {
        Err(TokenizerError::Config {
            context: context.to_string(),
            field: field.into(),
            reason: reason.into(),
        })
    };
    if group_count == 0 {
        return err("group_count", "must be at least 1");
    }
    if n_hid == 0 || !n_hid.is_multiple_of(4) {
        return err(
            "n_hid",
            "must be a positive multiple of 4 (blocks use n_out / 4 hidden channels)",
        );
    }
    if n_blk_per_group == 0 {
        return err("n_blk_per_group", "must be at least 1");
    }
    if vocab_size < 2 {
        return err("vocab_size", "must be at least 2");
    }
    Ok(())
}
