//! Shared pieces of the training commands (`finetune`, `eval`, `linear-probe`, `pretrain`, `demo`).
//!
//! * **Configuration** ([`CommonArgs`], [`load_config`]): a TOML file (`--config`) parsed into the
//!   command's serde struct (every struct `#[serde(deny_unknown_fields, default)]`, so a typo is
//!   an error naming the field and the file, and an omitted field takes its documented default =
//!   the paper recipe), then repeated `--set key=value` overrides (dotted keys for nested tables,
//!   values parsed as TOML, falling back to a plain string), then the first-class flags
//!   (`--data`, `--model`, `--output`, `--epochs`, `--batch-size`, `--lr`, `--device`, `--seed`),
//!   which win over both. [`write_resolved_config`] stores the result in the run directory.
//! * **Data** ([`DataConfig`], [`load_splits`]): `--data` is a directory (`train/` + `val/`
//!   sub-folders in ImageFolder layout, or one ImageFolder split by a held-out fraction), or the
//!   built-in `fashion-mnist` (the subset embedded in beit-data) / `fashion-mnist:DIR` (the
//!   full set, e.g. `/usr/share/datasets/fashion-mnist` from Debian's `dataset-fashion-mnist`).
//!   Images are decoded to RGB (grey replicated); the transforms resize them to the model's input.
//! * **Model** ([`trainable_classifier`]): a classifier in a `VarMap`, initialised as unilm does
//!   for fine-tuning (trunc-normal, `1/sqrt(2l)` rescale, head × 0.001) and then overwritten by a
//!   checkpoint after unilm's surgery (shared relative table copied into every layer, resize,
//!   mismatched head dropped).
//! * **Evaluation** ([`evaluate`]): top-1/top-5, loss and the confusion matrix over a loader,
//!   with a progress bar; [`print_table`] for aligned summaries.
//! * **Runs** ([`ResumeArg`], [`prepare_output_dir`]): output directory and `--resume`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use beit_data::{
    Chw, Dataset, EvalResize, EvalTransform, FashionMnist, ImageFolder, Sample, Transform, Views,
};
use beit_model::load::{adapt_for_finetuning, load_into_varmap, Architecture, Checkpoint};
use beit_model::{BeitConfig, BeitForImageClassification, ForwardOptions};
use beit_train::{init_beit, InitConfig, TrainRng};
use candle::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use clap::Args;
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::processor::{ImageProcessor, TargetSize};

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// Flags shared by the training commands; `#[command(flatten)]` them into a command's `Args`.
#[derive(Args, Debug, Clone, Default)]
pub struct CommonArgs {
    /// TOML recipe (see `configs/`). Fields it omits take their documented defaults (the paper's
    /// recipe); an unknown field is an error naming it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override any config field: `--set train.layer_decay=0.75 --set aug.mixup=0.0`. Dotted keys
    /// address nested tables; the value is parsed as TOML (a bare word is taken as a string).
    /// Applied after the file, before the flags below. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Dataset: a directory (`train/` and `val/` ImageFolders, or one ImageFolder split by
    /// `data.val_fraction`), `fashion-mnist` (embedded subset) or `fashion-mnist:DIR` (full set).
    #[arg(long)]
    pub data: Option<String>,
    /// Model: a directory with config.json + weights, or a hub id in the local HF cache.
    #[arg(long)]
    pub model: Option<String>,
    /// Run directory (checkpoints, metrics.jsonl, curves.png, exported model).
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Number of epochs.
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Images per optimizer step (split into micro-batches by `train.accum_steps`).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Device: cpu, cuda[:N] or metal[:N].
    #[arg(long)]
    pub device: Option<String>,
    /// Seed of initialisation, data order, augmentation, drop path.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// Where each first-class flag lands in a command's config (dotted keys).
#[derive(Debug, Clone, Copy)]
pub struct FlagKeys {
    /// `--data`.
    pub data: &'static str,
    /// `--model`.
    pub model: &'static str,
    /// `--output`.
    pub output: &'static str,
    /// `--epochs`.
    pub epochs: &'static str,
    /// `--batch-size`.
    pub batch_size: &'static str,
    /// `--lr`.
    pub lr: &'static str,
    /// `--device`.
    pub device: &'static str,
    /// `--seed`.
    pub seed: &'static str,
}

impl FlagKeys {
    /// The layout of the training configs in `configs/`: `model`, `output`, `device` at the top,
    /// `data.source`, and `train.{epochs,batch_size,lr,seed}`.
    pub const STANDARD: FlagKeys = FlagKeys {
        data: "data.source",
        model: "model",
        output: "output",
        epochs: "train.epochs",
        batch_size: "train.batch_size",
        lr: "train.lr",
        device: "device",
        seed: "train.seed",
    };
}

impl CommonArgs {
    /// The flags that were given, as (dotted key, value) overrides.
    pub fn flag_overrides(&self, keys: &FlagKeys) -> Vec<(String, toml::Value)> {
        let mut out = Vec::new();
        let mut push = |k: &str, v: toml::Value| out.push((k.to_string(), v));
        if let Some(v) = &self.data {
            push(keys.data, toml::Value::String(v.clone()));
        }
        if let Some(v) = &self.model {
            push(keys.model, toml::Value::String(v.clone()));
        }
        if let Some(v) = &self.output {
            push(keys.output, toml::Value::String(v.display().to_string()));
        }
        if let Some(v) = self.epochs {
            push(keys.epochs, toml::Value::Integer(v as i64));
        }
        if let Some(v) = self.batch_size {
            push(keys.batch_size, toml::Value::Integer(v as i64));
        }
        if let Some(v) = self.lr {
            push(keys.lr, toml::Value::Float(v));
        }
        if let Some(v) = &self.device {
            push(keys.device, toml::Value::String(v.clone()));
        }
        if let Some(v) = self.seed {
            push(keys.seed, toml::Value::Integer(v as i64));
        }
        out
    }

    /// [`load_config`] with this command line's file, `--set`s and flags.
    pub fn resolve<T: DeserializeOwned>(&self, keys: &FlagKeys) -> Result<T> {
        load_config(
            self.config.as_deref(),
            &self.set,
            &self.flag_overrides(keys),
        )
    }
}

/// Parse one `--set key=value` into (key, TOML value). A value that is not valid TOML (e.g. a
/// bare path) is taken as a string.
pub fn parse_set(item: &str) -> Result<(String, toml::Value)> {
    let (key, raw) = item
        .split_once('=')
        .with_context(|| format!("--set `{item}`: expected KEY=VALUE"))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(|p| p.trim().is_empty()) {
        bail!("--set `{item}`: invalid key `{key}`");
    }
    let raw = raw.trim();
    let value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    Ok((key.to_string(), value))
}

/// Set `value` at the dotted `key` of `table`, creating intermediate tables.
pub fn set_dotted(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<()> {
    let parts: Vec<&str> = key.split('.').map(str::trim).collect();
    let mut cur = table;
    for (i, part) in parts[..parts.len() - 1].iter().enumerate() {
        let entry = cur
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match entry {
            toml::Value::Table(t) => t,
            other => bail!(
                "`{key}`: `{}` is a {}, not a table",
                parts[..=i].join("."),
                other.type_str()
            ),
        };
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// Read a command config: the TOML file (if any; fields it omits take the struct's defaults),
/// then the `--set` overrides in order, then `flags` (dotted key, value). Each stage is checked
/// on its own so an error names its origin: the file (with line and column), the `--set` item,
/// or the flag's key.
pub fn load_config<T: DeserializeOwned>(
    path: Option<&Path>,
    sets: &[String],
    flags: &[(String, toml::Value)],
) -> Result<T> {
    let mut table = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config {}", p.display()))?;
            // Deserialise from the text first: its errors carry line/column and the field name.
            if let Err(e) = toml::from_str::<T>(&text) {
                bail!("config {}: {}", p.display(), e.to_string().trim_end());
            }
            text.parse::<toml::Table>()
                .with_context(|| format!("config {}", p.display()))?
        }
        None => toml::Table::new(),
    };
    let check = |table: &toml::Table, origin: &str| -> Result<()> {
        T::deserialize(toml::Value::Table(table.clone()))
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("{origin}: {}", e.to_string().trim_end()))
    };
    if path.is_none() {
        check(&table, "default configuration")?;
    }
    for item in sets {
        let (key, value) = parse_set(item)?;
        set_dotted(&mut table, &key, value).with_context(|| format!("--set `{item}`"))?;
        check(&table, &format!("--set `{item}`"))?;
    }
    for (key, value) in flags {
        set_dotted(&mut table, key, value.clone())?;
        check(&table, &format!("flag for `{key}` = {value}"))?;
    }
    Ok(T::deserialize(toml::Value::Table(table))?)
}

/// Write the resolved config as `config.toml` in `dir` (for the record, and to rerun with
/// `--config DIR/config.toml`).
pub fn write_resolved_config<T: Serialize>(dir: &Path, cfg: &T) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("config.toml");
    let text = toml::to_string_pretty(cfg).context("serialising the resolved config")?;
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

// ---------------------------------------------------------------------------------------------
// Runs: output directory and resume
// ---------------------------------------------------------------------------------------------

/// `--resume [CHECKPOINT]`: continue the run in the output directory from its newest checkpoint,
/// or from the given checkpoint directory.
#[derive(Args, Debug, Clone, Default)]
pub struct ResumeArg {
    /// Continue an interrupted run exactly (weights, optimizer, schedule, data position, random
    /// generators). Without a value: the newest `checkpoint-*` in the output directory.
    #[arg(long, value_name = "CHECKPOINT", num_args = 0..=1)]
    #[allow(clippy::option_option)] // absent / `--resume` / `--resume DIR`
    pub resume: Option<Option<PathBuf>>,
}

impl ResumeArg {
    /// The checkpoint (or run directory) to resume from, if resuming.
    pub fn checkpoint(&self, out_dir: &Path) -> Option<PathBuf> {
        self.resume
            .as_ref()
            .map(|p| p.clone().unwrap_or_else(|| out_dir.to_path_buf()))
    }
}

/// Create the run directory. A fresh run refuses a directory with checkpoints (beit-train also
/// checks); resuming requires one.
pub fn prepare_output_dir(out: &Path, resuming: bool) -> Result<()> {
    if resuming {
        if !out.is_dir() {
            bail!(
                "--resume: the output directory {} does not exist",
                out.display()
            );
        }
        return Ok(());
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))
}

// ---------------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------------

/// The `[data]` table of a training config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Dataset (what `--data` sets): a directory or `fashion-mnist[:DIR]`.
    pub source: String,
    /// Held-out fraction for a single ImageFolder without `train/` and `val/`.
    pub val_fraction: f64,
    /// Seed of that split.
    pub split_seed: u64,
    /// Use at most this many training images (a fixed random subset; for quick runs).
    pub max_train_samples: Option<usize>,
    /// Use at most this many validation images (a fixed random subset).
    pub max_val_samples: Option<usize>,
    /// Decode/augmentation threads (0 = number of CPUs).
    pub num_workers: usize,
    /// Batches prepared ahead.
    pub prefetch: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            source: String::new(),
            val_fraction: 0.1,
            split_seed: 0,
            max_train_samples: None,
            max_val_samples: None,
            num_workers: 0,
            prefetch: 4,
        }
    }
}

/// A view of some samples of another dataset.
pub struct Subset {
    inner: Arc<dyn Dataset>,
    indices: Vec<usize>,
}

impl Subset {
    /// `indices` of `inner`.
    pub fn new(inner: Arc<dyn Dataset>, indices: Vec<usize>) -> Self {
        Self { inner, indices }
    }
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn get(&self, index: usize) -> beit_data::Result<Sample> {
        let i = *self
            .indices
            .get(index)
            .ok_or(beit_data::DataError::OutOfRange {
                index,
                len: self.indices.len(),
            })?;
        self.inner.get(i)
    }
    fn class_names(&self) -> Option<Vec<String>> {
        self.inner.class_names()
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
            let mut idx = shuffled(ds.len(), seed);
            idx.truncate(m);
            idx.sort_unstable();
            Arc::new(Subset::new(ds, idx))
        }
        _ => ds,
    }
}

fn image_folder(dir: &Path) -> Result<ImageFolder> {
    ImageFolder::new(dir).with_context(|| format!("reading image folder {}", dir.display()))
}

/// Load the train/validation splits `cfg.source` names (see the module docs).
pub fn load_splits(cfg: &DataConfig) -> Result<Splits> {
    let spec = cfg.source.trim();
    if spec.is_empty() {
        bail!("no dataset: pass --data DIR (or `fashion-mnist`), or set data.source in the config");
    }
    let (train, val, classes, description): (
        Arc<dyn Dataset>,
        Arc<dyn Dataset>,
        Vec<String>,
        String,
    ) = if spec == "fashion-mnist" || spec.starts_with("fashion-mnist:") {
        let fm = match spec.strip_prefix("fashion-mnist:") {
            Some(dir) => FashionMnist::from_dir(dir)
                .with_context(|| format!("--data {spec}: reading Fashion-MNIST from {dir}"))?,
            None => FashionMnist::embedded()?,
        };
        let classes = fm.class_names().iter().map(|s| s.to_string()).collect();
        let d = format!(
            "Fashion-MNIST ({}): {} train / {} test images",
            if spec == "fashion-mnist" {
                "embedded subset"
            } else {
                &spec[14..]
            },
            fm.train.len(),
            fm.test.len()
        );
        (Arc::new(fm.train), Arc::new(fm.test), classes, d)
    } else {
        let root = Path::new(spec);
        if !root.is_dir() {
            bail!(
                "--data {spec}: not a directory (expected an image folder, `fashion-mnist` or \
                     `fashion-mnist:DIR`)"
            );
        }
        let val_dir = ["val", "validation", "test"]
            .iter()
            .map(|d| root.join(d))
            .find(|p| p.is_dir());
        if let (true, Some(val_dir)) = (root.join("train").is_dir(), val_dir) {
            let tr = image_folder(&root.join("train"))?;
            let va = image_folder(&val_dir)?;
            if tr.classes() != va.classes() {
                bail!(
                    "--data {spec}: the class folders of train/ ({}) and {} ({}) differ",
                    tr.classes().len(),
                    val_dir.display(),
                    va.classes().len()
                );
            }
            let classes = tr.classes().to_vec();
            let d = format!(
                "{}: {} train / {} val images, {} classes",
                root.display(),
                tr.len(),
                va.len(),
                classes.len()
            );
            (Arc::new(tr), Arc::new(va), classes, d)
        } else {
            let all = image_folder(root)?;
            let classes = all.classes().to_vec();
            if !(cfg.val_fraction > 0.0 && cfg.val_fraction < 1.0) {
                bail!(
                    "data.val_fraction must be in (0, 1) to split {} (got {})",
                    root.display(),
                    cfg.val_fraction
                );
            }
            let n = all.len();
            let n_val = ((n as f64 * cfg.val_fraction).round() as usize).clamp(1, n - 1);
            let idx = shuffled(n, cfg.split_seed);
            let (mut v, mut t) = (idx[..n_val].to_vec(), idx[n_val..].to_vec());
            v.sort_unstable();
            t.sort_unstable();
            let all: Arc<dyn Dataset> = Arc::new(all);
            let d = format!(
                "{}: {} images, {} classes, split {} train / {} val (val_fraction {})",
                root.display(),
                n,
                classes.len(),
                t.len(),
                v.len(),
                cfg.val_fraction
            );
            (
                Arc::new(Subset::new(all.clone(), t)),
                Arc::new(Subset::new(all, v)),
                classes,
                d,
            )
        }
    };
    let train = limit(train, cfg.max_train_samples, cfg.split_seed ^ 0x7261);
    let val = limit(val, cfg.max_val_samples, cfg.split_seed ^ 0x7661);
    let description = if cfg.max_train_samples.is_some() || cfg.max_val_samples.is_some() {
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

// ---------------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------------

/// A classifier whose parameters live in a `VarMap` (trainable), with unilm's fine-tuning init,
/// then the weights of `checkpoint` (if any) after unilm's surgery. The returned report lists
/// what was loaded, left at its init (e.g. a new head) or unused (e.g. `lm_head`).
pub fn trainable_classifier(
    cfg: &BeitConfig,
    checkpoint: Option<&Checkpoint>,
    device: &Device,
    init_seed: u64,
) -> Result<(
    VarMap,
    BeitForImageClassification,
    beit_model::load::LoadReport,
)> {
    let varmap = VarMap::new();
    let model =
        BeitForImageClassification::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    // unilm's order: initialise everything (head × 0.001), then load the checkpoint over it.
    init_beit(
        &varmap,
        &InitConfig::classifier(
            cfg.num_hidden_layers,
            cfg.layer_scale_init_value,
            checkpoint.is_none(),
        ),
        &mut TrainRng::derive(init_seed, &[0x696e6974]),
    )?;
    let mut report = beit_model::load::LoadReport::default();
    if let Some(ck) = checkpoint {
        let (tensors, adapt) =
            adapt_for_finetuning(cfg, Architecture::ImageClassification, ck.tensors.clone())
                .with_context(|| format!("adapting {}", ck.source.display()))?;
        let loaded = load_into_varmap(&varmap, &tensors)?;
        report = beit_model::load::LoadReport {
            loaded: loaded.loaded,
            missing: loaded.missing,
            unused: adapt.unused,
            notes: adapt.notes,
        };
    }
    Ok((varmap, model, report))
}

/// The config of a classifier fine-tuned from `source` (a pre-trained MIM or a fine-tuned
/// checkpoint config): per-layer relative position tables (a shared table is copied into every
/// layer at load), no mask token, the dataset's labels, the recipe's drop path and resolution.
pub fn finetune_config(
    source: &BeitConfig,
    classes: &[String],
    drop_path_rate: f64,
    image_size: usize,
) -> BeitConfig {
    let mut cfg = source.clone();
    if cfg.use_shared_relative_position_bias {
        cfg.use_shared_relative_position_bias = false;
        cfg.use_relative_position_bias = true;
    }
    cfg.use_mask_token = false;
    cfg.drop_path_rate = drop_path_rate;
    cfg.image_size = image_size;
    cfg.set_labels(classes);
    cfg
}

/// Log a load report in a few lines.
pub fn log_load_report(report: &beit_model::load::LoadReport) {
    for n in &report.notes {
        tracing::info!("checkpoint: {n}");
    }
    tracing::info!(
        "checkpoint: {} tensors loaded, {} left at init{}, {} unused{}",
        report.loaded.len(),
        report.missing.len(),
        if report.missing.is_empty() {
            String::new()
        } else {
            format!(" ({})", abbreviate(&report.missing))
        },
        report.unused.len(),
        if report.unused.is_empty() {
            String::new()
        } else {
            format!(" ({})", abbreviate(&report.unused))
        },
    );
}

fn abbreviate(names: &[String]) -> String {
    let mut s = names.iter().take(4).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 4 {
        s.push_str(", ...");
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------

/// Classification metrics over a dataset.
#[derive(Debug, Clone, Serialize)]
pub struct EvalMetrics {
    /// Images evaluated.
    pub images: usize,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Top-1 accuracy in percent.
    pub acc1: f64,
    /// Top-5 accuracy in percent (top-k with k = min(5, classes)).
    pub acc5: f64,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<u64>>,
}

impl EvalMetrics {
    /// Per-class accuracy in percent (`None` for a class with no image).
    pub fn per_class_accuracy(&self) -> Vec<Option<f64>> {
        self.confusion
            .iter()
            .enumerate()
            .map(|(c, row)| {
                let n: u64 = row.iter().sum();
                (n > 0).then(|| 100.0 * row[c] as f64 / n as f64)
            })
            .collect()
    }

    /// The `k` most frequent (true, predicted, count) confusions, most frequent first.
    pub fn top_confusions(&self, k: usize) -> Vec<(usize, usize, u64)> {
        let mut v: Vec<(usize, usize, u64)> = Vec::new();
        for (t, row) in self.confusion.iter().enumerate() {
            for (p, &n) in row.iter().enumerate() {
                if t != p && n > 0 {
                    v.push((t, p, n));
                }
            }
        }
        v.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
        v.truncate(k);
        v
    }
}

/// Accumulates predictions into [`EvalMetrics`].
#[derive(Debug, Clone)]
pub struct EvalAccumulator {
    num_classes: usize,
    images: usize,
    loss_sum: f64,
    top1: u64,
    top5: u64,
    confusion: Vec<Vec<u64>>,
}

impl EvalAccumulator {
    /// For `num_classes` classes.
    pub fn new(num_classes: usize) -> Self {
        Self {
            num_classes,
            images: 0,
            loss_sum: 0.0,
            top1: 0,
            top5: 0,
            confusion: vec![vec![0; num_classes]; num_classes],
        }
    }

    /// Add a batch of logits `(B, C)` with labels `(B,)`.
    pub fn add(&mut self, logits: &Tensor, labels: &Tensor) -> Result<()> {
        let logits = logits.to_dtype(DType::F32)?;
        let (b, c) = logits.dims2()?;
        if c != self.num_classes {
            bail!(
                "the model predicts {c} classes but the dataset has {}",
                self.num_classes
            );
        }
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let rows: Vec<Vec<f32>> = logp.to_vec2()?;
        let labels: Vec<u32> = labels.to_dtype(DType::U32)?.to_vec1()?;
        let k = 5.min(c);
        for (row, &y) in rows.iter().zip(&labels) {
            let y = y as usize;
            if y >= c {
                bail!("label {y} out of range for {c} classes");
            }
            self.loss_sum -= row[y] as f64;
            // Rank of the true class: how many classes score strictly higher (ties favour the
            // lower index, as a stable top-k does).
            let better = row
                .iter()
                .enumerate()
                .filter(|&(j, &v)| v > row[y] || (v == row[y] && j < y))
                .count();
            if better == 0 {
                self.top1 += 1;
            }
            if better < k {
                self.top5 += 1;
            }
            let pred = row
                .iter()
                .enumerate()
                .fold(0, |best, (j, &v)| if v > row[best] { j } else { best });
            self.confusion[y][pred] += 1;
        }
        self.images += b;
        Ok(())
    }

    /// The metrics so far.
    pub fn finish(&self) -> EvalMetrics {
        let n = self.images.max(1) as f64;
        EvalMetrics {
            images: self.images,
            loss: self.loss_sum / n,
            acc1: 100.0 * self.top1 as f64 / n,
            acc5: 100.0 * self.top5 as f64 / n,
            confusion: self.confusion.clone(),
        }
    }
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress_bar(len: u64, label: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{label} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} images ({{per_sec}}, eta {{eta}})"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

/// Evaluate `forward` (pixels -> logits) over every batch of `loader`'s epoch 0.
pub fn evaluate(
    loader: &beit_data::Loader,
    num_classes: usize,
    show_progress: bool,
    mut forward: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<EvalMetrics> {
    let pb = if show_progress {
        progress_bar(loader.samples_per_epoch() as u64, "eval")
    } else {
        ProgressBar::hidden()
    };
    let mut acc = EvalAccumulator::new(num_classes);
    for batch in loader.epoch(0)? {
        let batch = batch?;
        let labels = batch
            .labels
            .as_ref()
            .context("evaluation needs a labelled dataset")?;
        let logits = forward(&batch.images)?;
        acc.add(&logits, labels)?;
        pb.inc(batch.len() as u64);
    }
    pb.finish_and_clear();
    Ok(acc.finish())
}

/// Logits of a classifier in evaluation mode.
pub fn classifier_logits(model: &BeitForImageClassification, pixels: &Tensor) -> Result<Tensor> {
    Ok(model.forward(pixels, ForwardOptions::default())?.logits)
}

/// A checkpoint's `preprocessor_config.json` pipeline as a loader transform (deterministic), so
/// that `eval` and `linear-probe` see images exactly as `predict` and `transformers` do.
pub struct ProcessorTransform {
    processor: ImageProcessor,
    out: (usize, usize),
}

impl ProcessorTransform {
    /// Wrap `processor`; fails when its output size cannot be known in advance (a
    /// `shortest_edge` resize without a centre crop gives images of varying shape).
    pub fn new(processor: ImageProcessor) -> Result<Self> {
        let out = if processor.do_center_crop {
            (
                processor.crop_size.0 as usize,
                processor.crop_size.1 as usize,
            )
        } else {
            match processor.size {
                TargetSize::Exact(h, w) if processor.do_resize => (h as usize, w as usize),
                _ => bail!(
                    "the preprocessor config gives images of varying size (no fixed resize or \
                     centre crop); batches need one size"
                ),
            }
        };
        Ok(Self { processor, out })
    }
}

impl Transform for ProcessorTransform {
    fn apply(&self, img: &RgbImage, _rng: &mut StdRng) -> beit_data::Result<Views> {
        let p = &self.processor;
        let g = p
            .geometry(img)
            .map_err(|e| beit_data::DataError::param("preprocessor", format!("{e:#}")))?;
        let (w, h) = g.dimensions();
        let plane = (w * h) as usize;
        let mut data = vec![0f32; 3 * plane];
        let scale = if p.do_rescale { p.rescale_factor } else { 1.0 };
        for (i, px) in g.as_raw().chunks_exact(3).enumerate() {
            for c in 0..3 {
                let mut v = px[c] as f32 * scale;
                if p.do_normalize {
                    v = (v - p.image_mean[c]) / p.image_std[c];
                }
                data[c * plane + i] = v;
            }
        }
        Ok(Views {
            image: Chw {
                data,
                height: h as usize,
                width: w as usize,
            },
            tokenizer: None,
        })
    }

    fn output_size(&self) -> (usize, usize) {
        self.out
    }
}

/// The `preprocessor_config.json` equivalent of an evaluation transform, for exports.
/// `ShorterSideCrop` becomes a square resize to `floor(size / crop_pct)` then a centre crop (what
/// `BeitImageProcessor` can express; identical for square images).
pub fn processor_for_eval(t: &EvalTransform) -> ImageProcessor {
    let (size, crop) = match t.resize {
        EvalResize::Squash => (t.size, false),
        EvalResize::ShorterSideCrop { crop_pct } => {
            ((t.size as f64 / crop_pct).floor() as u32, true)
        }
    };
    ImageProcessor {
        do_resize: true,
        size: TargetSize::Exact(size, size),
        resample: t.interpolation,
        do_center_crop: crop,
        crop_size: (t.size, t.size),
        do_rescale: true,
        rescale_factor: 1.0 / 255.0,
        do_normalize: true,
        image_mean: t.normalize.mean,
        image_std: t.normalize.std,
    }
}

/// Write a classifier in Hugging Face layout (`config.json` with `id2label`,
/// `model.safetensors`, `preprocessor_config.json`) that `beit-cli predict`, `eval` and
/// `transformers` load.
pub fn export_classifier(
    dir: &Path,
    cfg: &BeitConfig,
    varmap: &VarMap,
    processor: &ImageProcessor,
) -> Result<()> {
    beit_model::save::save_hf(
        dir,
        cfg,
        Architecture::ImageClassification,
        &beit_model::save::varmap_tensors(varmap),
    )
    .with_context(|| format!("exporting the model to {}", dir.display()))?;
    let path = dir.join("preprocessor_config.json");
    let tmp = dir.join(".preprocessor_config.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&processor.to_json())?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Print `rows` as two aligned columns.
pub fn print_table(title: &str, rows: &[(String, String)]) {
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!("{title}");
    for (k, v) in rows {
        println!("  {k:<w$}  {v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        lr: f64,
        epochs: u64,
        name: String,
    }
    impl Default for Inner {
        fn default() -> Self {
            Self {
                lr: 4e-3,
                epochs: 100,
                name: "x".into(),
            }
        }
    }
    #[derive(Debug, Deserialize, Serialize, PartialEq, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Outer {
        model: Option<String>,
        train: Inner,
    }

    #[test]
    fn file_sets_and_flags_apply_in_order() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[train]\nlr = 1e-3\nepochs = 5\n")?;
        let c: Outer = load_config(
            Some(&p),
            &["train.epochs=7".into(), "train.name=some/path".into()],
            &[("model".into(), toml::Value::String("m".into()))],
        )?;
        assert_eq!(c.train.lr, 1e-3);
        assert_eq!(c.train.epochs, 7);
        assert_eq!(c.train.name, "some/path");
        assert_eq!(c.model.as_deref(), Some("m"));
        let d: Outer = load_config(None, &[], &[])?;
        assert_eq!(d, Outer::default());
        Ok(())
    }

    #[test]
    fn typos_name_the_field_and_origin() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.toml");
        std::fs::write(&p, "[train]\nlrr = 1e-3\n").unwrap();
        let e = format!(
            "{:#}",
            load_config::<Outer>(Some(&p), &[], &[]).unwrap_err()
        );
        assert!(e.contains("lrr") && e.contains("bad.toml"), "{e}");
        let e = format!(
            "{:#}",
            load_config::<Outer>(None, &["train.epoch=3".into()], &[]).unwrap_err()
        );
        assert!(e.contains("epoch") && e.contains("--set"), "{e}");
        let e = format!(
            "{:#}",
            load_config::<Outer>(None, &["train.lr=fast".into()], &[]).unwrap_err()
        );
        assert!(e.contains("train.lr=fast"), "{e}");
        assert!(parse_set("novalue").is_err());
    }

    #[test]
    fn accumulator_counts_top_k_and_confusions() -> Result<()> {
        let dev = Device::Cpu;
        let logits = Tensor::new(
            &[
                [3f32, 2., 1., 0., -1., -2.],
                [0., 3., 2., 1., -1., -2.],
                [0., 1., 2., 3., 4., 5.],
            ],
            &dev,
        )?;
        let labels = Tensor::new(&[0u32, 2, 0], &dev)?;
        let mut acc = EvalAccumulator::new(6);
        acc.add(&logits, &labels)?;
        let m = acc.finish();
        assert!((m.acc1 - 100.0 / 3.0).abs() < 1e-9);
        assert!((m.acc5 - 200.0 / 3.0).abs() < 1e-9);
        assert_eq!(m.confusion[2][1], 1);
        assert_eq!(m.confusion[0][5], 1);
        assert_eq!(m.top_confusions(1), vec![(0, 5, 1)]);
        Ok(())
    }
}
