//! Datasets, augmentations and loaders for BEiT pre-training, fine-tuning and evaluation.
//!
//! - Datasets ([`Dataset`]): [`ImageFolder`] (`root/<class>/<image>` as torchvision, or a flat
//!   folder with a label file), [`UnlabelledFolder`] for pre-training, and Fashion-MNIST
//!   ([`FashionMnist`], from the Debian package or embedded in the crate).
//! - Transforms with torchvision/timm semantics on 8-bit RGB images: Pillow-compatible [`resize()`],
//!   [`RandomResizedCrop`], [`ColorJitter`], [`Normalize`], RandAugment, random erasing, mixup/CutMix,
//!   and the complete pipelines [`EvalTransform`], [`TrainTransform`] and BEiT's two-view
//!   [`TwoViewTransform`] (224 bicubic for the patches, 112 Lanczos for the tokenizer).
//! - Tar shards in the WebDataset layout ([`ShardSet`]), streamed by the loader with a shard-order
//!   permutation and a shuffle buffer, disjoint shards per rank, an exact resume position
//!   ([`StreamPosition`]); [`pack_source`] writes them from an ImageFolder or Parquet files.
//! - Parquet files in the Hugging Face datasets layout (`image` and `label` columns, hub file
//!   names such as `train-00000-of-00004.parquet`), streamed as shards through the same machinery.
//! - [`Loader`]: parallel decode and augmentation on its own thread pool with bounded prefetch,
//!   batches as candle tensors; corrupt files are skipped, counted and reported once. What it
//!   reads and stacks is an [`Assemble`] (images and class labels by default, [`ImageBatches`]),
//!   its epoch order a [`Sampler`].
//!
//! Fidelity: the deterministic geometry (resize with every Pillow filter, `Resize` + `CenterCrop`,
//! the two views of a given crop) is bit-exact with Pillow/torchvision on real photos
//! (`tests/parity.rs`). Random augmentations follow the reference definitions but cannot match
//! draw for draw (different random generators); colour jitter computes brightness, contrast and
//! saturation with Pillow's 8-bit arithmetic, as torchvision does on the PIL images that timm and
//! unilm jitter.
//!
//! All randomness comes from `StdRng`s seeded from `(seed, epoch, sample index)`, so a resumed run
//! sees the same augmentations.

pub mod assemble;
pub mod color_jitter;
pub mod dataset;
pub mod decode;
pub mod error;
pub mod fashion_mnist;
pub mod geometry;
pub mod hub_layout;
pub mod image_folder;
pub mod inspect;
mod jpeg;
mod limits;
pub mod loader;
pub mod mixup;
pub mod normalize;
pub mod pack;
pub mod parquet_shard;
pub mod processor;
pub mod rand_augment;
pub mod random_erasing;
pub mod resize;
pub mod sampler;
pub mod seg_augment;
pub mod segmentation;
pub mod shard_count;
pub mod shard_dataset;
pub mod shard_format;
pub mod shard_manifest;
pub mod shard_set;
pub mod shard_spec;
pub mod shard_stream;
pub mod source;
pub mod tar_shard;
pub mod transform;

pub use assemble::{Assemble, ImageBatches};
pub use color_jitter::{ColorJitter, JitterDraw, Op as JitterOp};
pub use dataset::{Dataset, Sample};
pub use decode::{decode_file, DecodeOptions};
pub use error::{DataError, Result};
pub use fashion_mnist::{FashionMnist, MnistSplit};
pub use geometry::{center_crop, resize_shorter_side, CropBox, RandomResizedCrop};
pub use image::RgbImage;
pub use image_folder::{ImageFolder, UnlabelledFolder};
pub use inspect::describe_source;
pub use loader::{Batch, EpochIter, Loader, LoaderConfig, SkippedSample};
pub use mixup::Mixup;
pub use normalize::{map_pixels, Chw, Normalize};
pub use pack::{pack_image_folder, pack_shard_set, pack_source, parse_size, PackOptions};
pub use processor::{ImageProcessor, ProcessorTransform, TargetSize};
pub use rand_augment::{AugOp, RandAugment};
pub use random_erasing::{EraseMode, RandomErasing};
pub use resize::{resize, resize_region, Filter};
pub use sampler::{Draw, EpochSampler, Sampler};
pub use shard_format::{ShardCount, ShardFormat};
pub use shard_manifest::{ShardEntry, ShardManifest};
pub use shard_set::{EpochPlan, ShardInfo, ShardSet};
pub use shard_spec::expand_braces;
pub use shard_stream::{ShardStream, StreamPosition};
pub use source::{
    fashion_mnist, first_per_class, limit, load_splits, open_images, DataConfig, Splits, Subset,
};
pub use tar_shard::RawSample;
pub use transform::{
    EvalResize, EvalTransform, TrainTransform, Transform, TwoViewTransform, Views,
};
