//! Datasets, augmentations and loaders for BEiT pre-training, fine-tuning and evaluation.
//!
//! - [`fashion_mnist`]: Fashion-MNIST from its gzipped IDX files, or a subset embedded in the crate.

pub mod error;
pub mod fashion_mnist;

pub use error::{DataError, Result};
pub use fashion_mnist::{FashionMnist, MnistSplit};
