//! The data of segmentation fine-tuning: the `[data]` table, the (image, label map) pairs of a
//! split (ADE20K layout on disk, or Fashion-MNIST mosaics in memory), and the training stream of
//! augmented micro-batches (mmseg's iteration-based sampling: an endless, reshuffled stream).

use std::path::Path;

use anyhow::{bail, Context, Result};
use beit_data::seg_augment::SegTrainTransform;
use beit_data::segmentation::{
    fashion_seg_classes, fashion_segmentation, LabelMap, SegmentationFolder, ADE20K_CLASSES,
    IGNORE_INDEX,
};
use beit_data::{FashionMnist, RgbImage};
use beit_train::TrainRng;
use candle::{Device, Tensor};
use rand::seq::SliceRandom;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

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

/// The training stream: micro-batch `b` of epoch `e` holds stream positions
/// `(e·per_epoch + b·micro)..` where a position `p` is sample `perm(p / N)[p % N]`, a seeded
/// permutation per pass; each sample's augmentation draws from a generator derived from
/// `(seed, epoch, position in the epoch)`. A function of `(seed, e)` alone, so a resumed run
/// sees the same data.
pub(crate) struct Stream<'a> {
    pairs: &'a Pairs,
    transform: &'a SegTrainTransform,
    seed: u64,
    micro: usize,
    batches_per_epoch: u64,
    device: Device,
    /// This process's rank and the world size: it reads its share of each micro-batch.
    rank: usize,
    world_size: usize,
}

impl<'a> Stream<'a> {
    /// The stream of `pairs` in micro-batches of `micro` (this process of `world` reads its
    /// share).
    pub(crate) fn new(
        pairs: &'a Pairs,
        transform: &'a SegTrainTransform,
        seed: u64,
        micro: usize,
        batches_per_epoch: u64,
        device: Device,
        world: &World,
    ) -> Self {
        Self {
            pairs,
            transform,
            seed,
            micro,
            batches_per_epoch,
            device,
            rank: world.rank(),
            world_size: world.size(),
        }
    }

    fn permutation(&self, pass: u64) -> Vec<usize> {
        let mut p: Vec<usize> = (0..self.pairs.len()).collect();
        p.shuffle(&mut TrainRng::derive(self.seed, &[0x7061_7373, pass]));
        p
    }

    pub(crate) fn batch(
        &self,
        epoch: u64,
        b: u64,
        cache: &mut Option<(u64, Vec<usize>)>,
    ) -> Result<SegBatch> {
        let n = self.pairs.len() as u64;
        let per_epoch = self.batches_per_epoch * self.micro as u64;
        let mut items = Vec::with_capacity(self.micro / self.world_size);
        // This rank's share of the global micro-batch: positions rank, rank + N, ...
        for j in (self.rank as u64..self.micro as u64).step_by(self.world_size) {
            let in_epoch = b * self.micro as u64 + j;
            let p = epoch.wrapping_mul(per_epoch).wrapping_add(in_epoch);
            let pass = p / n;
            if cache.as_ref().map(|c| c.0) != Some(pass) {
                *cache = Some((pass, self.permutation(pass)));
            }
            let idx = cache.as_ref().map(|c| c.1[(p % n) as usize]).unwrap_or(0);
            items.push((in_epoch, idx));
        }
        let samples = items
            .par_iter()
            .map(|&(in_epoch, idx)| {
                let (img, labels) = self.pairs.load(idx)?;
                let mut rng = TrainRng::derive(self.seed, &[0x0061_7567, epoch, in_epoch]);
                self.transform
                    .apply(&img, &labels, &mut rng)
                    .with_context(|| format!("augmenting training pair {idx}"))
            })
            .collect::<Result<Vec<_>>>()?;
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
