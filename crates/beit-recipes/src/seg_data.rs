//! The data of segmentation fine-tuning: the `[data]` table, the (image, label map) pairs of a
//! split (ADE20K layout on disk, or Fashion-MNIST mosaics in memory), and the training stream of
//! augmented micro-batches read through beit-data's [`Loader`] (mmseg's iteration-based sampling:
//! an endless, reshuffled stream, expressed as the loader's [`Sampler`]).

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use beit_data::seg_augment::{SegSample, SegTrainTransform};
use beit_data::segmentation::{
    fashion_seg_classes, fashion_segmentation, LabelMap, SegmentationFolder, ADE20K_CLASSES,
    IGNORE_INDEX,
};
use beit_data::{Assemble, DataError, Draw, FashionMnist, Loader, LoaderConfig, RgbImage, Sampler};
use beit_train::TrainRng;
use candle::{Device, Tensor};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

type DataResult<T> = beit_data::Result<T>;
use crate::distributed::World;

/// `[data]` of a segmentation run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegDataSection {
    /// A directory in the ADE20K layout (`images/<split>/*.jpg` + `annotations/<split>/*.png`,
    /// or its parent holding `ADEChallengeData2016/`), or `fashion-mnist`: the segmentation set
    /// derived in memory from the Fashion-MNIST subset embedded in beit-data (2x2 mosaics of
    /// garments, 11 classes with the background).
    pub source: String,
    /// Training split folder (`training`).
    pub train_split: String,
    /// Validation split folder (`validation`).
    pub val_split: String,
    /// mmseg's `reduce_zero_label` (annotation 0 ignored, classes shifted down). Unset: true for
    /// a directory (ADE20K), false for `fashion-mnist` (0 is its background class).
    pub reduce_zero_label: Option<bool>,
    /// Class names of a directory dataset; empty: ADE20K's 150 (with `reduce_zero_label`).
    pub classes: Vec<String>,
    /// Optimizer steps per epoch, drawn from an endless stream of reshuffled passes over the
    /// training set (mmseg's iteration-based runner; 16,000 = unilm's evaluation interval).
    /// Unset: an epoch is one pass (the last incomplete batch dropped).
    pub iters_per_epoch: Option<u64>,
    /// Use at most the first this many training pairs (sorted by name).
    pub max_train_samples: Option<usize>,
    /// Evaluate on at most the first this many validation pairs.
    pub max_val_samples: Option<usize>,
    /// `fashion-mnist`: training mosaics (4 garments each; 1,500 uses the 6,000 embedded images).
    pub fashion_train_images: usize,
    /// `fashion-mnist`: validation mosaics from the 1,000 test images (250).
    pub fashion_val_images: usize,
}

impl Default for SegDataSection {
    fn default() -> Self {
        Self {
            source: String::new(),
            train_split: "training".into(),
            val_split: "validation".into(),
            reduce_zero_label: None,
            classes: Vec::new(),
            iters_per_epoch: Some(16_000),
            max_train_samples: None,
            max_val_samples: None,
            fashion_train_images: 1_500,
            fashion_val_images: 250,
        }
    }
}

/// The pairs of one split: on disk (ADE20K layout) or in memory.
pub(crate) enum Pairs {
    Folder(SegmentationFolder, usize),
    Memory(Vec<(RgbImage, LabelMap)>),
}

impl Pairs {
    pub(crate) fn len(&self) -> usize {
        match self {
            Pairs::Folder(_, n) => *n,
            Pairs::Memory(v) => v.len(),
        }
    }

    /// Pair `i`, its error naming the file.
    fn get(&self, i: usize) -> DataResult<(RgbImage, LabelMap)> {
        match self {
            Pairs::Folder(f, _) => f.load(i),
            Pairs::Memory(v) => v.get(i).cloned().ok_or(DataError::OutOfRange {
                index: i,
                len: v.len(),
            }),
        }
    }

    /// A name of pair `i` for skip reports: its image file, or its place in memory.
    fn describe(&self, i: usize) -> String {
        match self {
            Pairs::Folder(f, _) => f
                .pairs
                .get(i)
                .map_or_else(|| format!("pair {i}"), |p| p.image.display().to_string()),
            Pairs::Memory(_) => format!("training pair {i}"),
        }
    }

    pub(crate) fn load(&self, i: usize) -> Result<(RgbImage, LabelMap)> {
        match self {
            Pairs::Folder(f, _) => f
                .load(i)
                .with_context(|| format!("loading {}", f.pairs[i].image.display())),
            Pairs::Memory(v) => Ok(v[i].clone()),
        }
    }
}

/// The training and validation pairs, the class names and a description.
pub(crate) fn load_data(d: &SegDataSection) -> Result<(Pairs, Pairs, Vec<String>, String)> {
    let cap = |n: usize, max: Option<usize>| max.map_or(n, |m| m.min(n));
    if d.source.trim() == "fashion-mnist" {
        if d.reduce_zero_label == Some(true) {
            bail!(
                "data.reduce_zero_label: the fashion-mnist set's label 0 is its background class"
            );
        }
        let fm = FashionMnist::embedded()?;
        let mut train = fashion_segmentation(&fm.train, d.fashion_train_images, 0)?;
        let mut val = fashion_segmentation(&fm.test, d.fashion_val_images, 1)?;
        train.truncate(cap(train.len(), d.max_train_samples));
        val.truncate(cap(val.len(), d.max_val_samples));
        let desc = format!(
            "Fashion-MNIST segmentation mosaics (56x56, 11 classes): {} train / {} val",
            train.len(),
            val.len()
        );
        return Ok((
            Pairs::Memory(train),
            Pairs::Memory(val),
            fashion_seg_classes(),
            desc,
        ));
    }
    if d.source.trim().is_empty() {
        bail!("data.source: no dataset given (--data DIR in the ADE20K layout, or fashion-mnist)");
    }
    let root = Path::new(d.source.trim());
    let reduce = d.reduce_zero_label.unwrap_or(true);
    let classes: Vec<String> = if d.classes.is_empty() {
        if !reduce {
            bail!("data.classes: list the class names of a dataset without reduce_zero_label");
        }
        ADE20K_CLASSES.iter().map(|s| s.to_string()).collect()
    } else {
        d.classes.clone()
    };
    let train = SegmentationFolder::ade20k(root, &d.train_split, reduce)?;
    let val = SegmentationFolder::ade20k(root, &d.val_split, reduce)?;
    let (nt, nv) = (
        cap(train.len(), d.max_train_samples),
        cap(val.len(), d.max_val_samples),
    );
    let desc = format!(
        "{} ({} classes{}): {nt} train / {nv} val",
        root.display(),
        classes.len(),
        if reduce { ", reduce_zero_label" } else { "" }
    );
    Ok((
        Pairs::Folder(train, nt),
        Pairs::Folder(val, nv),
        classes,
        desc,
    ))
}

/// One micro-batch: normalised crops `(B, 3, S, S)` and labels `(B, S, S)`.
pub(crate) struct SegBatch {
    pub(crate) pixels: Tensor,
    pub(crate) labels: Tensor,
    pub(crate) len: usize,
    /// Label pixels not equal to the ignore index (the losses' denominator).
    pub(crate) labelled_pixels: usize,
}

/// The training loader: micro-batch `b` of epoch `e` holds the samples at stream positions
/// `(e·per_epoch + b·micro)..` (see [`Passes`]), this process reading its share (positions `rank`,
/// `rank + N`, ... of each micro-batch); each sample's augmentation draws from a generator derived
/// from `(seed, epoch, position in the epoch)`. A function of `(seed, e)` alone, so a resumed run
/// sees the same data.
pub(crate) fn train_loader(
    pairs: Arc<Pairs>,
    transform: SegTrainTransform,
    seed: u64,
    micro: usize,
    batches_per_epoch: u64,
    device: Device,
    world: &World,
) -> Result<Loader<SegBatches>> {
    let cfg = world.shard_loader(LoaderConfig {
        batch_size: world.rank_micro_batch(micro)?,
        shuffle: false,
        drop_last: false,
        seed,
        ..LoaderConfig::default()
    });
    let sampler = Passes {
        seed,
        per_epoch: batches_per_epoch * micro as u64,
    };
    let assemble = SegBatches {
        pairs,
        transform: Arc::new(transform),
        seed,
        device,
    };
    Ok(Loader::with_assembly(assemble, Arc::new(sampler), cfg)?)
}

/// mmseg's iteration-based order: an endless stream of passes over the training set, position `p`
/// being sample `perm(p / N)[p % N]` of a seeded permutation per pass; epoch `e` reads positions
/// `e·per_epoch..(e+1)·per_epoch`, each keyed by its position in the epoch.
struct Passes {
    seed: u64,
    /// Stream positions per epoch (over all processes).
    per_epoch: u64,
}

impl Passes {
    fn permutation(&self, len: usize, pass: u64) -> Vec<usize> {
        let mut p: Vec<usize> = (0..len).collect();
        p.shuffle(&mut TrainRng::derive(self.seed, &[0x7061_7373, pass]));
        p
    }
}

impl Sampler for Passes {
    fn draws(&self, len: usize, epoch: u64, rank: usize, world: usize) -> DataResult<Vec<Draw>> {
        let n = len as u64;
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut cache: Option<(u64, Vec<usize>)> = None;
        let mut draws = Vec::with_capacity(self.samples_per_epoch(len, world));
        for in_epoch in (rank as u64..self.per_epoch).step_by(world.max(1)) {
            let p = epoch.wrapping_mul(self.per_epoch).wrapping_add(in_epoch);
            let pass = p / n;
            if cache.as_ref().map(|c| c.0) != Some(pass) {
                cache = Some((pass, self.permutation(len, pass)));
            }
            let index = cache.as_ref().map_or(0, |c| c.1[(p % n) as usize]);
            draws.push(Draw {
                index,
                key: in_epoch,
            });
        }
        Ok(draws)
    }

    fn samples_per_epoch(&self, _len: usize, world: usize) -> usize {
        (self.per_epoch as usize).div_ceil(world.max(1))
    }
}

/// Training pairs through the segmentation augmentation, stacked into [`SegBatch`]es.
#[derive(Clone)]
pub(crate) struct SegBatches {
    pairs: Arc<Pairs>,
    transform: Arc<SegTrainTransform>,
    seed: u64,
    device: Device,
}

impl Assemble for SegBatches {
    type Item = SegSample;
    type Batch = SegBatch;

    fn len(&self) -> usize {
        self.pairs.len()
    }

    fn describe(&self, index: usize) -> String {
        self.pairs.describe(index)
    }

    fn prepare(&self, epoch: u64, draw: Draw) -> DataResult<SegSample> {
        let (img, labels) = self.pairs.get(draw.index)?;
        let mut rng = TrainRng::derive(self.seed, &[0x0061_7567, epoch, draw.key]);
        self.transform.apply(&img, &labels, &mut rng)
    }

    fn batch_len(batch: &SegBatch) -> usize {
        batch.len
    }

    fn collate(
        &self,
        samples: Vec<SegSample>,
        _epoch: u64,
        _batch_no: u64,
    ) -> DataResult<SegBatch> {
        let side = self.transform.crop_size as usize;
        let len = samples.len();
        let mut pixels = Vec::with_capacity(len * 3 * side * side);
        let mut labels = Vec::with_capacity(len * side * side);
        for s in samples {
            pixels.extend_from_slice(&s.pixels);
            labels.extend(s.labels.iter().map(|&v| v as u32));
        }
        let labelled_pixels = labels.iter().filter(|&&v| v != IGNORE_INDEX as u32).count();
        Ok(SegBatch {
            pixels: Tensor::from_vec(pixels, (len, 3, side, side), &self.device)?,
            labels: Tensor::from_vec(labels, (len, side, side), &self.device)?,
            len,
            labelled_pixels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_share_the_one_stream() {
        let s = Passes {
            seed: 3,
            per_epoch: 8,
        };
        let one = s.draws(5, 2, 0, 1).unwrap();
        assert_eq!(one.len(), 8);
        let (r0, r1) = (s.draws(5, 2, 0, 2).unwrap(), s.draws(5, 2, 1, 2).unwrap());
        let merged: Vec<Draw> = r0.iter().zip(&r1).flat_map(|(a, b)| [*a, *b]).collect();
        assert_eq!(merged, one);
        // Epoch 2 starts 16 positions into the stream: in its fourth pass over 5 samples.
        let pass3 = s.permutation(5, 3);
        assert_eq!(one[0].index, pass3[1]);
        assert_eq!(
            one.iter().map(|d| d.key).collect::<Vec<_>>(),
            (0..8).collect::<Vec<_>>()
        );
    }
}
