//! BEiT (BERT Pre-Training of Image Transformers) in candle.
//!
//! A pre-norm ViT with a relative position bias (per layer or shared), LayerScale, q/v biases only
//! and mean pooling, exactly as Hugging Face `transformers` computes it, with the parameter names of
//! the published `microsoft/beit-*` checkpoints:
//!
//! - [`BeitConfig`] reads a `config.json` as is;
//! - [`BeitModel`], [`BeitForImageClassification`], [`BeitForMaskedImageModeling`] are the modules;
//! - [`load`] reads `model.safetensors` (also sharded) and `pytorch_model.bin`, maps unilm/timm names,
//!   and reports missing/unexpected keys and shape mismatches by name; [`save`] writes HF layout.
//! - [`param_info`] says what each named parameter is (layer id, weight decay, role) and [`init`]
//!   initialises a model for training from scratch by those roles (unilm's and transformers'
//!   `_init_weights`), drawing from the caller's seeded generator.
//!
//! Training-safe: every op used keeps its autograd graph (candle-nn's fused LayerNorm/softmax
//! kernels are used only when no gradient is needed), and dropout/DropPath draw from a seedable RNG.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use beit_model::{load::Checkpoint, ForwardOptions};
//! let ckpt = Checkpoint::from_dir("beit-base-patch16-224")?;
//! let model = ckpt.classifier(&candle::Device::Cpu)?;
//! let pixels = candle::Tensor::zeros((1, 3, 224, 224), candle::DType::F32, &candle::Device::Cpu)?;
//! let logits = model.forward(&pixels, ForwardOptions::default())?.logits;
//! # Ok(()) }
//! ```

pub mod attention;
pub mod block;
pub mod config;
pub mod embeddings;
pub mod error;
pub mod heads;
pub mod init;
pub mod interpolate;
pub mod layers;
pub mod load;
pub mod model;
pub mod param_info;
pub mod relative_position;
pub mod save;
pub mod segmentation;

pub use config::BeitConfig;
pub use error::{BeitError, Result};
pub use heads::{
    mask_reads, BeitForImageClassification, BeitForMaskedImageModeling, ClassifierOutput, MimOutput,
};
pub use init::{init_beit, init_beit_with, InitConfig, PatchEmbedInit, Truncation};
pub use model::{BeitModel, BeitOutput, ForwardOptions};

/// The CPU kernels the model runs on (LayerNorm, softmax, attention, ...), each choosing the fused
/// kernel or candle's composition itself.
pub use beit_kernels as kernels;
pub use beit_kernels::QueryRows;
