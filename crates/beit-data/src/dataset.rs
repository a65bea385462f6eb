//! The `Dataset` abstraction shared by image folders, Fashion-MNIST and user datasets.

use image::RgbImage;

use crate::error::{DataError, Result};
use crate::fashion_mnist::{MnistSplit, CLASS_NAMES};
use crate::shard_set::ShardSet;

/// One decoded sample.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The image, 8-bit RGB.
    pub image: RgbImage,
    /// Class index for labelled datasets.
    pub label: Option<u32>,
}

/// A random-access collection of images, shared by the loader's worker threads.
pub trait Dataset: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;

    /// Whether there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Load (decode) sample `index`. Errors for unreadable or corrupt files name the file; the loader
    /// skips such samples and counts them.
    fn get(&self, index: usize) -> Result<Sample>;

    /// Class names in label order, for labelled datasets.
    fn class_names(&self) -> Option<Vec<String>> {
        None
    }

    /// The label of sample `index` without decoding it, where the dataset knows it cheaply.
    fn label(&self, _index: usize) -> Option<u32> {
        None
    }

    /// A human-readable name of sample `index` (its path for files), used in skip reports.
    fn describe(&self, index: usize) -> String {
        format!("sample {index}")
    }

    /// The tar shards behind a sharded dataset, which the loader then streams instead of reading
    /// by index.
    fn shards(&self) -> Option<std::sync::Arc<ShardSet>> {
        None
    }
}

impl Dataset for MnistSplit {
    fn len(&self) -> usize {
        MnistSplit::len(self)
    }

    fn label(&self, index: usize) -> Option<u32> {
        (index < MnistSplit::len(self)).then(|| MnistSplit::label(self, index) as u32)
    }

    fn get(&self, index: usize) -> Result<Sample> {
        if index >= MnistSplit::len(self) {
            return Err(DataError::OutOfRange {
                index,
                len: MnistSplit::len(self),
            });
        }
        Ok(Sample {
            image: self.rgb_image(index),
            label: Some(self.label(index) as u32),
        })
    }

    fn class_names(&self) -> Option<Vec<String>> {
        Some(CLASS_NAMES.iter().map(|s| s.to_string()).collect())
    }

    fn describe(&self, index: usize) -> String {
        format!("fashion-mnist image {index}")
    }
}

impl<D: Dataset + ?Sized> Dataset for std::sync::Arc<D> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn get(&self, index: usize) -> Result<Sample> {
        (**self).get(index)
    }
    fn class_names(&self) -> Option<Vec<String>> {
        (**self).class_names()
    }
    fn label(&self, index: usize) -> Option<u32> {
        (**self).label(index)
    }
    fn describe(&self, index: usize) -> String {
        (**self).describe(index)
    }
    fn shards(&self) -> Option<std::sync::Arc<ShardSet>> {
        (**self).shards()
    }
}
