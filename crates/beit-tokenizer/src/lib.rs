//! Visual tokenizers for BEiT: the DALL-E dVAE and our own Gumbel-softmax dVAE.
//!
//! BEiT's pre-training target is a grid of discrete visual tokens: a 112 px view of each image
//! goes through the encoder of a discrete VAE (vocabulary 8192, 8x downsampling, 14x14 tokens),
//! and the argmax over the vocabulary gives one id per position.
//!
//! - [`dalle`]: the DALL-E encoder and decoder (OpenAI's `dall_e` package), loaded from safetensors
//!   files with `dall_e`'s state-dict names ([`pkl::load_dalle_pkl`] reads OpenAI's pickles);
//! - [`dvae`]: our own configurable dVAE, the same blocks at smaller widths, saved in the same
//!   layout so that [`dalle::Encoder`] loads it;
//! - [`train`]: its training objective (Gumbel-softmax relaxation, annealed temperature, KL to a
//!   uniform prior, logit-Laplace / L1 / MSE reconstruction); the optimisation itself is the
//!   training engine's (`beit-train`), driven by `beit-recipes`' `train_tokenizer`;
//! - [`pixels`]: `map_pixels` / `unmap_pixels` and image helpers.
//!
//! Sister crates: `beit-model` (the ViT), `beit-mim` (masking and the MIM head), `beit-data`,
//! `beit-train`, `beit-recipes`, `beit-cli`.

pub mod blocks;
pub mod dalle;
pub mod dvae;
pub mod error;
pub mod gumbel;
pub mod pixels;
pub mod pkl;
pub mod train;
pub mod weights;

use candle::Tensor;

pub use dalle::{Decoder, DecoderConfig, Encoder, EncoderConfig};
pub use dvae::{Dvae, DvaeConfig};
pub use error::{Result, TokenizerError};
pub use train::{dvae_losses, GumbelConfig, Losses, ReconLoss};

/// A frozen image tokenizer: mapped pixels in, one code id per position out.
///
/// Implemented by [`dalle::Encoder`], which also serves our own trained dVAE (same weights
/// layout), so pre-training code does not care which one it was given.
pub trait VisualTokenizer {
    /// Code ids `(B, H/d, W/d)` (u32) for pixels `(B, C, H, W)` already passed through
    /// [`pixels::map_pixels`]; `d` is [`VisualTokenizer::downsample`].
    fn tokenize(&self, pixels_mapped: &Tensor) -> Result<Tensor>;
    /// Number of distinct codes.
    fn vocab_size(&self) -> usize;
    /// Image side length the tokenizer was made for (112 for DALL-E in BEiT).
    fn input_size(&self) -> usize;
    /// Pixels per token along each side (8 for DALL-E).
    fn downsample(&self) -> usize;
}
