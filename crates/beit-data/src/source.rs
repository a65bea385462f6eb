//! What `--data` names, opened as datasets: the train/validation splits of a labelled source,
//! or the images of an unlabelled one.
//!
//! A source is `fashion-mnist` (the subset embedded in this crate), `fashion-mnist:DIR` (the
//! full set, e.g. Debian's `dataset-fashion-mnist`), a folder with the Fashion-MNIST IDX files,
//! or a directory of images: `train/` and `val/` (or `validation/`, `test/`) ImageFolders, or one
//! ImageFolder split by a held-out fraction. Images are decoded to RGB (grey replicated).
//!
//! Tar shards (WebDataset layout) are read as streams: a folder with `train/` and `val/` (or
//! `validation/`, `test/`) folders of `.tar` shards, as `beit-cli data pack` writes; for
//! unlabelled pre-training also a folder of shards or a brace pattern
//! (`/data/in22k/train-{000000..013999}.tar`).

use std::path::Path;
use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, Sample};
use crate::error::{DataError, Result};
use crate::fashion_mnist::FashionMnist;
use crate::image_folder::{ImageFolder, UnlabelledFolder};
use crate::shard_set::ShardSet;
use crate::shard_spec::{is_shard_pattern, tar_files_in};

/// The `[data]` table of a training recipe. Defaults: 10% held out of a single ImageFolder,
/// split seed 0, every image, all cores decoding, 4 batches prefetched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Dataset (what `--data` sets): see the module documentation.
    pub source: String,
    /// Held-out fraction for a single ImageFolder without `train/` and `val/` (0.1).
    pub val_fraction: f64,
    /// Seed of that split and of the subsets below (0).
    pub split_seed: u64,
    /// Use at most this many training images (a fixed random subset; for quick runs).
    pub max_train_samples: Option<usize>,
    /// Use the first this many training images of each class (few-label fine-tuning).
    pub train_per_class: Option<usize>,
    /// Use at most this many validation images (a fixed random subset).
    pub max_val_samples: Option<usize>,
    /// Decode/augmentation threads (0 = number of CPUs).
    pub num_workers: usize,
    /// Batches prepared ahead (4).
    pub prefetch: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            source: String::new(),
            val_fraction: 0.1,
            split_seed: 0,
            max_train_samples: None,
            train_per_class: None,
            max_val_samples: None,
            num_workers: 0,
            prefetch: 4,
        }
    }
}

/// Some samples of another dataset, by index.
pub struct Subset {
    inner: Arc<dyn Dataset>,
    indices: Vec<usize>,
}

impl Subset {
    /// `indices` of `inner`.
    pub fn new(inner: Arc<dyn Dataset>, indices: Vec<usize>) -> Self {
        Self { inner, indices }
    }

    /// The first `n` samples of `inner` (all of them when it has fewer).
    pub fn first(inner: Arc<dyn Dataset>, n: usize) -> Self {
        let n = n.min(inner.len());
        Self::new(inner, (0..n).collect())
    }
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn get(&self, index: usize) -> Result<Sample> {
        let i = *self.indices.get(index).ok_or(DataError::OutOfRange {
            index,
            len: self.indices.len(),
        })?;
        self.inner.get(i)
    }
    fn class_names(&self) -> Option<Vec<String>> {
        self.inner.class_names()
    }
    fn label(&self, index: usize) -> Option<u32> {
        self.indices.get(index).and_then(|&i| self.inner.label(i))
    }
    fn describe(&self, index: usize) -> String {
        match self.indices.get(index) {
            Some(&i) => self.inner.describe(i),
            None => format!("sample {index}"),
        }
    }
}

/// Train and validation sets with their class names.
pub struct Splits {
    /// Training images.
    pub train: Arc<dyn Dataset>,
    /// Validation images.
    pub val: Arc<dyn Dataset>,
    /// Class names in label order.
    pub classes: Vec<String>,
    /// What was loaded, for the log.
    pub description: String,
}

fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    idx
}

/// At most `max` samples of `ds` (a fixed random subset, in ascending index order).
pub fn limit(ds: Arc<dyn Dataset>, max: Option<usize>, seed: u64) -> Arc<dyn Dataset> {
    match max {
        Some(m) if m < ds.len() => {
            if let Some(shards) = ds.shards() {
                return Arc::new(shards.limited(m));
            }
            let mut idx = shuffled(ds.len(), seed);
            idx.truncate(m);
            idx.sort_unstable();
            Arc::new(Subset::new(ds, idx))
        }
        _ => ds,
    }
}

/// The first `per_class` samples of each of `num_classes` classes of `ds`, in index order.
pub fn first_per_class(
    ds: Arc<dyn Dataset>,
    num_classes: usize,
    per_class: usize,
) -> Result<Arc<dyn Dataset>> {
    if per_class == 0 {
        return Err(DataError::param(
            "data.train_per_class",
            "must be at least 1",
        ));
    }
    let mut counts = vec![0usize; num_classes];
    let mut idx = Vec::new();
    for i in 0..ds.len() {
        let c = ds.label(i).ok_or_else(|| {
            DataError::param(
                "data.train_per_class",
                "the dataset does not know its labels without decoding",
            )
        })? as usize;
        if counts.get(c).is_some_and(|&n| n < per_class) {
            counts[c] += 1;
            idx.push(i);
        }
    }
    if let Some(c) = counts.iter().position(|&n| n < per_class) {
        return Err(DataError::param(
            "data.train_per_class",
            format!(
                "class {c} has only {} training images, fewer than {per_class}",
                counts[c]
            ),
        ));
    }
    Ok(Arc::new(Subset::new(ds, idx)))
}

fn bad_source(spec: &str, reason: impl std::fmt::Display) -> DataError {
    DataError::param("data.source", format!("`{spec}`: {reason}"))
}

/// The Fashion-MNIST of `spec` and a description, if it names one: `fashion-mnist`,
/// `fashion-mnist:DIR`, or a folder holding the IDX files.
pub fn fashion_mnist(spec: &str) -> Result<Option<(FashionMnist, String)>> {
    if spec == "fashion-mnist" {
        return Ok(Some((FashionMnist::embedded()?, "embedded subset".into())));
    }
    let dir = Path::new(spec.strip_prefix("fashion-mnist:").unwrap_or(spec));
    let has_idx = ["train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"]
        .iter()
        .any(|f| dir.join(f).exists());
    if spec.starts_with("fashion-mnist:") || has_idx {
        return Ok(Some((
            FashionMnist::from_dir(dir)?,
            dir.display().to_string(),
        )));
    }
    Ok(None)
}

/// Load the train/validation splits `cfg.source` names (see the module docs).
pub fn load_splits(cfg: &DataConfig) -> Result<Splits> {
    let spec = cfg.source.trim();
    if spec.is_empty() {
        return Err(bad_source(
            spec,
            "no dataset: pass --data DIR (or `fashion-mnist`), or set data.source",
        ));
    }
    let (train, val, classes, description): (Arc<dyn Dataset>, Arc<dyn Dataset>, _, _) =
        if let Some((fm, what)) = fashion_mnist(spec)? {
            let classes = fm.class_names().iter().map(|s| s.to_string()).collect();
            let d = format!(
                "Fashion-MNIST ({what}): {} train / {} test images",
                fm.train.len(),
                fm.test.len()
            );
            (Arc::new(fm.train), Arc::new(fm.test), classes, d)
        } else if let Some(s) = sharded_splits(spec)? {
            s
        } else {
            folder_splits(spec, cfg)?
        };
    let train = match cfg.train_per_class {
        Some(k) => first_per_class(train, classes.len(), k)?,
        None => train,
    };
    let train = limit(train, cfg.max_train_samples, cfg.split_seed ^ 0x7261);
    let val = limit(val, cfg.max_val_samples, cfg.split_seed ^ 0x7661);
    let limited = cfg.max_train_samples.is_some()
        || cfg.max_val_samples.is_some()
        || cfg.train_per_class.is_some();
    let description = if limited {
        format!(
            "{description} (using {} train / {} val)",
            train.len(),
            val.len()
        )
    } else {
        description
    };
    Ok(Splits {
        train,
        val,
        classes,
        description,
    })
}

type FolderSplits = (Arc<dyn Dataset>, Arc<dyn Dataset>, Vec<String>, String);

/// Whether `dir` directly holds tar shards.
fn has_shards(dir: &Path) -> bool {
    dir.is_dir() && tar_files_in(dir).is_ok_and(|t| !t.is_empty())
}

/// The train/val shard folders of a sharded root, if `spec` is one.
fn sharded_splits(spec: &str) -> Result<Option<FolderSplits>> {
    let root = Path::new(spec);
    let has_subdirs = || {
        std::fs::read_dir(root)
            .map(|rd| rd.flatten().any(|e| e.path().is_dir()))
            .unwrap_or(false)
    };
    if is_shard_pattern(spec) || (has_shards(root) && !has_subdirs()) {
        return Err(bad_source(
            spec,
            "tar shards of one split; labelled training needs a folder with train/ and val/ \
             shard folders (see `beit-cli data pack`)",
        ));
    }
    if !has_shards(&root.join("train")) {
        return Ok(None);
    }
    let val_dir = ["val", "validation", "test"]
        .iter()
        .map(|d| root.join(d))
        .find(|p| has_shards(p))
        .ok_or_else(|| bad_source(spec, "train/ holds tar shards but no val/ folder does"))?;
    let tr = ShardSet::open(&root.join("train").to_string_lossy())?;
    let va = ShardSet::open(&val_dir.to_string_lossy())?;
    if tr.classes().is_empty() || tr.classes() != va.classes() {
        return Err(bad_source(
            spec,
            format!(
                "train/ shards have {} classes and {} shards {} (labelled shards with the same \
                 classes needed)",
                tr.classes().len(),
                val_dir.display(),
                va.classes().len()
            ),
        ));
    }
    let classes = tr.classes().to_vec();
    let d = format!(
        "{}: tar shards, {} train ({} shards) / {} val images, {} classes",
        root.display(),
        tr.total_samples(),
        tr.shards().len(),
        va.total_samples(),
        classes.len()
    );
    Ok(Some((Arc::new(tr), Arc::new(va), classes, d)))
}

fn folder_splits(spec: &str, cfg: &DataConfig) -> Result<FolderSplits> {
    let root = Path::new(spec);
    if !root.is_dir() {
        return Err(bad_source(
            spec,
            "not a directory (expected an image folder, `fashion-mnist` or `fashion-mnist:DIR`)",
        ));
    }
    let val_dir = ["val", "validation", "test"]
        .iter()
        .map(|d| root.join(d))
        .find(|p| p.is_dir());
    if let (true, Some(val_dir)) = (root.join("train").is_dir(), val_dir) {
        let tr = ImageFolder::new(root.join("train"))?;
        let va = ImageFolder::new(&val_dir)?;
        if tr.classes() != va.classes() {
            return Err(bad_source(
                spec,
                format!(
                    "the class folders of train/ ({}) and {} ({}) differ",
                    tr.classes().len(),
                    val_dir.display(),
                    va.classes().len()
                ),
            ));
        }
        let classes = tr.classes().to_vec();
        let d = format!(
            "{}: {} train / {} val images, {} classes",
            root.display(),
            tr.len(),
            va.len(),
            classes.len()
        );
        return Ok((Arc::new(tr), Arc::new(va), classes, d));
    }
    let all = ImageFolder::new(root)?;
    let classes = all.classes().to_vec();
    if !(cfg.val_fraction > 0.0 && cfg.val_fraction < 1.0) {
        return Err(DataError::param(
            "data.val_fraction",
            format!(
                "must be in (0, 1) to split {} (got {})",
                root.display(),
                cfg.val_fraction
            ),
        ));
    }
    let n = all.len();
    if n < 2 {
        return Err(DataError::Empty(format!(
            "{}: {n} image(s), too few to split into train and val",
            root.display()
        )));
    }
    let n_val = ((n as f64 * cfg.val_fraction).round() as usize).clamp(1, n - 1);
    let idx = shuffled(n, cfg.split_seed);
    let (mut v, mut t) = (idx[..n_val].to_vec(), idx[n_val..].to_vec());
    v.sort_unstable();
    t.sort_unstable();
    let all: Arc<dyn Dataset> = Arc::new(all);
    let d = format!(
        "{}: {n} images, {} classes, split {} train / {} val (val_fraction {})",
        root.display(),
        classes.len(),
        t.len(),
        v.len(),
        cfg.val_fraction
    );
    Ok((
        Arc::new(Subset::new(all.clone(), t)),
        Arc::new(Subset::new(all, v)),
        classes,
        d,
    ))
}

/// Unlabelled training images of `spec` (for pre-training): the Fashion-MNIST training split,
/// an ImageFolder's `train/` part (labels ignored), or any folder of images (searched
/// recursively). Returns the dataset and a description.
pub fn open_images(spec: &str) -> Result<(Arc<dyn Dataset>, String)> {
    if let Some((fm, what)) = fashion_mnist(spec)? {
        let d = format!("Fashion-MNIST ({what}, {} train images)", fm.train.len());
        return Ok((Arc::new(fm.train), d));
    }
    if let Some(found) = open_shards(spec)? {
        return Ok(found);
    }
    let path = Path::new(spec);
    if !path.is_dir() {
        return Err(bad_source(
            spec,
            "expected `fashion-mnist`, `fashion-mnist:DIR` or a folder of images",
        ));
    }
    // An ImageFolder with splits: pre-train on its training part only.
    let path = if path.join("train").is_dir() {
        path.join("train")
    } else {
        path.to_path_buf()
    };
    let ds = UnlabelledFolder::new(&path)?;
    let d = format!("{} ({} images)", path.display(), ds.len());
    Ok((Arc::new(ds), d))
}

/// The shards of `spec` for pre-training, if it names shards: a pattern or `.tar` file, a folder
/// of shards, or a sharded root's `train/`.
fn open_shards(spec: &str) -> Result<Option<(Arc<dyn Dataset>, String)>> {
    let root = Path::new(spec);
    let spec = if is_shard_pattern(spec) || has_shards(root) {
        spec.to_string()
    } else if has_shards(&root.join("train")) {
        root.join("train").to_string_lossy().into_owned()
    } else {
        return Ok(None);
    };
    let set = ShardSet::open(&spec)?;
    let d = format!(
        "{spec} ({} images in {} tar shards)",
        set.total_samples(),
        set.shards().len()
    );
    Ok(Some((Arc::new(set), d)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_fashion_mnist_and_limits() {
        let s = load_splits(&DataConfig {
            source: "fashion-mnist".into(),
            max_train_samples: Some(100),
            ..DataConfig::default()
        })
        .unwrap();
        assert_eq!(
            (s.train.len(), s.val.len(), s.classes.len()),
            (100, 1000, 10)
        );
        assert!(
            s.description.contains("using 100 train"),
            "{}",
            s.description
        );
        let s = load_splits(&DataConfig {
            source: "fashion-mnist".into(),
            train_per_class: Some(3),
            ..DataConfig::default()
        })
        .unwrap();
        assert_eq!(s.train.len(), 30);
        let mut per = [0; 10];
        for i in 0..30 {
            per[s.train.label(i).unwrap() as usize] += 1;
        }
        assert_eq!(per, [3; 10]);
        let (imgs, _) = open_images("fashion-mnist").unwrap();
        assert_eq!(imgs.len(), 6000);
        assert_eq!(Subset::first(imgs, 7).len(), 7);
    }

    #[test]
    fn bad_sources_name_the_field() {
        for spec in ["", "/definitely/not/here"] {
            let e = load_splits(&DataConfig {
                source: spec.into(),
                ..DataConfig::default()
            })
            .err()
            .unwrap()
            .to_string();
            assert!(e.contains("data.source"), "{e}");
        }
        let e = open_images("/definitely/not/here")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("data.source"), "{e}");
    }
}
