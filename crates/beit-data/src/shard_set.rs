//! A set of tar shards read as a stream: the shards with their sample counts (from the folder's
//! manifest, or counted from the tar headers), the class names, and each epoch's plan: which
//! shards a rank (or a loader worker) reads, in which order, and how many samples it delivers.
//!
//! The shard order of an epoch is a permutation drawn from `(seed, epoch)`, the same on every rank;
//! split `s` of `n` (rank × workers) takes every `n`-th shard of it from position `s`, so splits
//! read disjoint shards. Every split delivers the same number of samples, `total / n`: a split
//! whose shards hold more stops early, one whose shards hold fewer starts over its own shards, so
//! every rank runs the same number of batches.

use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{DataError, Result};
use crate::sampler::derive_seed;
use crate::shard_manifest::ShardManifest;
use crate::shard_spec::{is_shard_pattern, shard_paths};
use crate::tar_shard::count_shard;

/// Default number of samples held by the shuffle buffer.
pub const DEFAULT_SHUFFLE_BUFFER: usize = 1000;

/// One shard and its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    /// The tar file.
    pub path: PathBuf,
    /// Samples in it.
    pub samples: usize,
}

/// Tar shards read sequentially; see the module documentation.
#[derive(Debug, Clone)]
pub struct ShardSet {
    shards: Vec<ShardInfo>,
    classes: Vec<String>,
    shuffle_buffer: usize,
    spec: String,
    cap: Option<usize>,
}

/// What one split reads in one epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochPlan {
    /// The split's shards, in reading order.
    pub shards: Vec<PathBuf>,
    /// Samples the split delivers this epoch (the same for every split).
    pub quota: usize,
    /// Seed of the split's shuffle buffer (`None`: no shuffling).
    pub buffer_seed: Option<u64>,
}

impl ShardSet {
    /// The shards `spec` names (a brace pattern, a `.tar` file or a folder of `.tar` files). Sizes
    /// and classes come from the folder's manifest when it lists every shard, else from a scan of
    /// the tar headers (classes are then named by index, up to the largest `.cls` label).
    pub fn open(spec: &str) -> Result<Self> {
        let paths = shard_paths(spec)?;
        let dir = if is_shard_pattern(spec) {
            paths[0].parent().unwrap_or(Path::new(".")).to_path_buf()
        } else {
            PathBuf::from(spec)
        };
        let (shards, classes) = match ShardManifest::read(&dir)? {
            Some(m) => match from_manifest(&m, &dir, &paths) {
                Some(shards) => (shards, m.classes),
                None => scan(&paths)?,
            },
            None => scan(&paths)?,
        };
        if shards.iter().all(|s| s.samples == 0) {
            return Err(DataError::Empty(format!(
                "`{spec}`: the shards hold no sample"
            )));
        }
        Ok(ShardSet {
            shards,
            classes,
            shuffle_buffer: DEFAULT_SHUFFLE_BUFFER,
            spec: spec.to_string(),
            cap: None,
        })
    }

    /// Hold `n` samples (at least 1) in the shuffle buffer.
    pub fn with_shuffle_buffer(mut self, n: usize) -> Self {
        self.shuffle_buffer = n.max(1);
        self
    }

    /// Samples held by the shuffle buffer.
    pub fn shuffle_buffer(&self) -> usize {
        self.shuffle_buffer
    }

    /// The shards, in their listed order.
    pub fn shards(&self) -> &[ShardInfo] {
        &self.shards
    }

    /// Class names in label order (empty when unknown).
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Samples in all shards (at most the cap of [`ShardSet::limited`]).
    pub fn total_samples(&self) -> usize {
        let sum: usize = self.shards.iter().map(|s| s.samples).sum();
        self.cap.map_or(sum, |c| sum.min(c))
    }

    /// At most `max` samples: the first shards (in listed order) that hold them, and an epoch of
    /// `max` samples (for quick runs).
    pub fn limited(&self, max: usize) -> ShardSet {
        let mut held = 0;
        let shards = self
            .shards
            .iter()
            .take_while(|s| {
                let more = held < max;
                held += s.samples;
                more
            })
            .cloned()
            .collect();
        ShardSet {
            shards,
            cap: Some(max),
            ..self.clone()
        }
    }

    /// What `--data` named.
    pub fn spec(&self) -> &str {
        &self.spec
    }

    /// Samples each of `splits` splits delivers per epoch.
    pub fn quota(&self, splits: usize) -> usize {
        self.total_samples() / splits.max(1)
    }

    /// The plan of split `split` of `splits` in `epoch`. Errors when there are fewer shards or
    /// samples than splits.
    pub fn epoch_plan(
        &self,
        shuffle: bool,
        seed: u64,
        epoch: u64,
        split: usize,
        splits: usize,
    ) -> Result<EpochPlan> {
        if splits == 0 || split >= splits {
            return Err(DataError::param(
                "rank",
                format!("split {split} must be < {splits}"),
            ));
        }
        if self.shards.len() < splits || self.quota(splits) == 0 {
            return Err(DataError::param(
                "data.source",
                format!(
                    "`{}`: {} shard(s) with {} samples cannot feed {splits} ranks x workers; \
                     pack into smaller shards",
                    self.spec,
                    self.shards.len(),
                    self.total_samples()
                ),
            ));
        }
        let mut order: Vec<usize> = (0..self.shards.len()).collect();
        if shuffle {
            order.shuffle(&mut StdRng::seed_from_u64(derive_seed(seed, &[epoch, 4])));
        }
        let shards = order
            .into_iter()
            .skip(split)
            .step_by(splits)
            .map(|i| self.shards[i].path.clone())
            .collect();
        Ok(EpochPlan {
            shards,
            quota: self.quota(splits),
            buffer_seed: shuffle.then(|| derive_seed(seed, &[epoch, split as u64, 3])),
        })
    }
}

/// The shards of `paths` with the sizes the manifest gives, if it lists them all.
fn from_manifest(m: &ShardManifest, dir: &Path, paths: &[PathBuf]) -> Option<Vec<ShardInfo>> {
    paths
        .iter()
        .map(|p| {
            let e = m.shards.iter().find(|e| dir.join(&e.file) == *p)?;
            Some(ShardInfo {
                path: p.clone(),
                samples: e.samples,
            })
        })
        .collect()
}

/// Count every shard's samples from its headers; classes named by index.
fn scan(paths: &[PathBuf]) -> Result<(Vec<ShardInfo>, Vec<String>)> {
    let mut max_label = None::<u32>;
    let mut shards = Vec::with_capacity(paths.len());
    for p in paths {
        let (samples, m) = count_shard(p)?;
        max_label = max_label.max(m);
        shards.push(ShardInfo {
            path: p.clone(),
            samples,
        });
    }
    let classes = max_label.map_or(Vec::new(), |m| (0..=m).map(|i| i.to_string()).collect());
    Ok((shards, classes))
}
