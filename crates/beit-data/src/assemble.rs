//! Batch assembly: what a [`Loader`](crate::Loader) reads, how it prepares one sample and how it
//! stacks prepared samples into a batch. [`ImageBatches`] is the classification and pre-training
//! assembly (images through a [`Transform`], class labels, optional mixup/CutMix); other kinds of
//! samples (e.g. image and label-map pairs) implement [`Assemble`] themselves.

use std::sync::Arc;

use candle::{Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::dataset::Dataset;
use crate::decode::DecodeOptions;
use crate::error::{DataError, Result};
use crate::mixup::Mixup;
use crate::sampler::{derive_seed, sample_rng, Draw};
use crate::shard_dataset::decode_raw;
use crate::shard_set::ShardSet;
use crate::tar_shard::RawSample;
use crate::transform::{Transform, Views};

/// One batch, as candle tensors on the loader's device.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Model inputs, f32 `(B, 3, H, W)`.
    pub images: Tensor,
    /// Hard labels, u32 `(B,)`, for labelled datasets.
    pub labels: Option<Tensor>,
    /// Soft targets, f32 `(B, num_classes)`, when mixup/CutMix is enabled.
    pub soft_targets: Option<Tensor>,
    /// Tokenizer view, f32 `(B, 3, h, w)` in `[0.1, 0.9]`, for the two-view transform.
    pub tokenizer_images: Option<Tensor>,
    /// Dataset indices of the samples, in batch order.
    pub indices: Vec<usize>,
}

impl Batch {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether the batch is empty (never true for batches the loader yields).
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

/// How a loader turns samples into batches. Shared by the loader's threads (cheap to clone).
pub trait Assemble: Clone + Send + Sync + 'static {
    /// One prepared (loaded and augmented) sample.
    type Item: Send;
    /// One batch.
    type Batch: Send + 'static;

    /// Number of samples.
    fn len(&self) -> usize;

    /// Whether there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A human-readable name of sample `index`, used in skip reports.
    fn describe(&self, index: usize) -> String;

    /// Load and augment `draw.index`, its random draws derived from `epoch` and `draw.key`.
    fn prepare(&self, epoch: u64, draw: Draw) -> Result<Self::Item>;

    /// Stack prepared samples into batch number `batch_no` of `epoch`.
    fn collate(&self, items: Vec<Self::Item>, epoch: u64, batch_no: u64) -> Result<Self::Batch>;

    /// Number of samples in a batch.
    fn batch_len(batch: &Self::Batch) -> usize;

    /// The tar shards behind a streamed dataset.
    fn shards(&self) -> Option<Arc<ShardSet>> {
        None
    }

    /// Decode and augment a streamed sample, the `ordinal`-th of `epoch`.
    fn prepare_raw(&self, _epoch: u64, _ordinal: u64, _raw: &RawSample) -> Result<Self::Item> {
        Err(DataError::param(
            "stream",
            "this loader does not read tar shards",
        ))
    }
}

/// Images through a [`Transform`] with their class labels, as candle tensors on `device`.
#[derive(Clone)]
pub struct ImageBatches {
    dataset: Arc<dyn Dataset>,
    transform: Arc<dyn Transform>,
    mixup: Option<Mixup>,
    seed: u64,
    device: Device,
}

/// A transformed image.
pub struct PreparedImage {
    index: usize,
    label: Option<u32>,
    views: Views,
}

impl ImageBatches {
    /// Batches of `dataset` through `transform`, with draws derived from `seed`.
    pub fn new(
        dataset: Arc<dyn Dataset>,
        transform: Arc<dyn Transform>,
        seed: u64,
        device: Device,
    ) -> Self {
        ImageBatches {
            dataset,
            transform,
            mixup: None,
            seed,
            device,
        }
    }

    /// Mix the images of each batch: batches then carry soft targets.
    pub fn with_mixup(self, mixup: Mixup) -> Self {
        ImageBatches {
            mixup: Some(mixup),
            ..self
        }
    }
}

impl Assemble for ImageBatches {
    type Item = PreparedImage;
    type Batch = Batch;

    fn len(&self) -> usize {
        self.dataset.len()
    }

    fn describe(&self, index: usize) -> String {
        self.dataset.describe(index)
    }

    fn shards(&self) -> Option<Arc<ShardSet>> {
        self.dataset.shards()
    }

    fn prepare(&self, epoch: u64, draw: Draw) -> Result<PreparedImage> {
        let s = self.dataset.get(draw.index)?;
        let mut rng = sample_rng(self.seed, epoch, draw.key);
        Ok(PreparedImage {
            index: draw.index,
            label: s.label,
            views: self.transform.apply(&s.image, &mut rng)?,
        })
    }

    fn prepare_raw(&self, epoch: u64, ordinal: u64, raw: &RawSample) -> Result<PreparedImage> {
        let s = decode_raw(raw, &DecodeOptions::default())?;
        let mut rng = sample_rng(self.seed, epoch, ordinal);
        Ok(PreparedImage {
            index: ordinal as usize,
            label: s.label,
            views: self.transform.apply(&s.image, &mut rng)?,
        })
    }

    fn batch_len(batch: &Batch) -> usize {
        batch.len()
    }

    fn collate(&self, ready: Vec<PreparedImage>, epoch: u64, batch_no: u64) -> Result<Batch> {
        let b = ready.len();
        let (h, w) = self.transform.output_size();
        let tok_size = self.transform.tokenizer_size();
        let mut images = Vec::with_capacity(b * 3 * h * w);
        let (mut tok, mut labels, mut indices) = (Vec::new(), Vec::with_capacity(b), Vec::new());
        for p in &ready {
            if (p.views.image.height, p.views.image.width) != (h, w) {
                return Err(DataError::param(
                    "transform",
                    format!(
                        "sample {} came out {}x{}, expected {h}x{w}",
                        p.index, p.views.image.height, p.views.image.width
                    ),
                ));
            }
            images.extend_from_slice(&p.views.image.data);
            if let (Some(t), Some(_)) = (&p.views.tokenizer, tok_size) {
                tok.extend_from_slice(&t.data);
            }
            if let Some(l) = p.label {
                labels.push(l);
            }
            indices.push(p.index);
        }
        let labelled = labels.len() == b;
        let soft_targets = self.mix(&mut images, (b, h, w), &labels, labelled, epoch, batch_no)?;
        let images = self.tensor(images, (b, 3, h, w))?;
        let tokenizer_images = match tok_size {
            Some((th, tw)) if tok.len() == b * 3 * th * tw => {
                Some(self.tensor(tok, (b, 3, th, tw))?)
            }
            _ => None,
        };
        let labels = if labelled {
            Some(Tensor::from_vec(labels, b, &Device::Cpu)?.to_device(&self.device)?)
        } else {
            None
        };
        Ok(Batch {
            images,
            labels,
            soft_targets,
            tokenizer_images,
            indices,
        })
    }
}

impl ImageBatches {
    fn tensor(&self, data: Vec<f32>, shape: (usize, usize, usize, usize)) -> Result<Tensor> {
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?.to_device(&self.device)?)
    }

    /// Apply mixup/CutMix to `images` in place; the soft targets, when enabled.
    fn mix(
        &self,
        images: &mut [f32],
        (b, h, w): (usize, usize, usize),
        labels: &[u32],
        labelled: bool,
        epoch: u64,
        batch_no: u64,
    ) -> Result<Option<Tensor>> {
        let Some(m) = &self.mixup else {
            return Ok(None);
        };
        if !labelled {
            return Err(DataError::param(
                "mixup",
                "mixup/CutMix needs a labelled dataset",
            ));
        }
        let mut rng = StdRng::seed_from_u64(derive_seed(self.seed, &[epoch, batch_no, 2]));
        let t = m.apply(images, (b, 3, h, w), labels, &mut rng)?;
        let t = Tensor::from_vec(t, (b, m.num_classes), &Device::Cpu)?.to_device(&self.device)?;
        Ok(Some(t))
    }
}
