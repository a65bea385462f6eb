//! Evaluation of a classifier: [`evaluate`] over any loader (used by fine-tuning after each
//! epoch), and [`eval_classifier`], the `beit-cli eval` job (a checkpoint on a labelled split,
//! with its own preprocessing, per-class accuracy and the most frequent confusions).

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use beit_data::{
    load_splits, DataConfig, Dataset, Loader, LoaderConfig, ProcessorTransform, Sample,
};
use beit_model::{BeitForImageClassification, ForwardOptions};
use beit_train::{ClassificationMetrics, EvalAccumulator};
use candle::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::device::parse_device;
use crate::model_source::load_model;

/// A progress bar over `len` images on stderr (hidden when stderr is not a terminal).
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

/// Evaluate `forward` (pixels -> logits) over every batch of `loader`'s epoch 0. With `world`,
/// `loader` holds this rank's shard of the split and the counts are summed over the ranks.
pub fn evaluate(
    loader: &Loader,
    num_classes: usize,
    show_progress: bool,
    world: Option<&dyn beit_train::distributed::Collective>,
    mut forward: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<ClassificationMetrics> {
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
        acc.add(&forward(&batch.images)?, labels)?;
        pb.inc(batch.len() as u64);
    }
    pb.finish_and_clear();
    if let Some(w) = world {
        acc.all_reduce(w)?;
    }
    Ok(acc.finish())
}

/// Logits of a classifier in evaluation mode.
pub fn classifier_logits(model: &BeitForImageClassification, pixels: &Tensor) -> Result<Tensor> {
    Ok(model.forward(pixels, ForwardOptions::default())?.logits)
}

/// What `beit-cli eval` evaluates.
#[derive(Debug, Clone)]
pub struct EvalJob {
    /// Classifier: a directory or a hub id in the local cache.
    pub model: String,
    /// Allow downloading a hub checkpoint missing from the cache.
    pub download: bool,
    /// The dataset (`max_*_samples` limit the evaluated split).
    pub data: DataConfig,
    /// `val` (or `test`) or `train`.
    pub split: String,
    /// Images per batch.
    pub batch_size: usize,
    /// `cpu`, `cuda[:N]`, `metal[:N]`.
    pub device: String,
    /// How many of the most frequent confusions to report.
    pub confusions: usize,
    /// Draw a progress bar.
    pub progress: bool,
}

/// Accuracy of one class.
#[derive(Debug, Clone, Serialize)]
pub struct ClassReport {
    /// Model class index.
    pub index: usize,
    /// Its label.
    pub label: String,
    /// Images of that class.
    pub images: u64,
    /// Top-1 accuracy in percent (none without images).
    pub acc1: Option<f64>,
}

/// A frequent confusion.
#[derive(Debug, Clone, Serialize)]
pub struct Confusion {
    /// True class.
    pub true_index: usize,
    /// Its label.
    pub true_label: String,
    /// Predicted class.
    pub predicted_index: usize,
    /// Its label.
    pub predicted_label: String,
    /// How often.
    pub count: u64,
}

/// The result of [`eval_classifier`] (printed as tables or one JSON object).
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// The model evaluated.
    pub model: String,
    /// The dataset description.
    pub data: String,
    /// The split.
    pub split: String,
    /// Images evaluated.
    pub images: usize,
    /// Top-1 accuracy in percent.
    pub acc1: f64,
    /// Top-5 (top-min(5, classes)) accuracy in percent.
    pub acc5: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Unreadable files skipped.
    pub skipped_files: usize,
    /// Per-class accuracy.
    pub per_class: Vec<ClassReport>,
    /// The most frequent confusions.
    pub top_confusions: Vec<Confusion>,
    /// `confusion_matrix[true][predicted]`.
    pub confusion_matrix: Vec<Vec<u64>>,
}

/// Relabels a dataset: dataset label `i` becomes model class `map[i]`.
struct Relabel {
    inner: Arc<dyn Dataset>,
    map: Vec<u32>,
}

impl Dataset for Relabel {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn get(&self, index: usize) -> beit_data::Result<Sample> {
        let mut s = self.inner.get(index)?;
        s.label = s.label.map(|l| self.map[l as usize]);
        Ok(s)
    }
    fn describe(&self, index: usize) -> String {
        self.inner.describe(index)
    }
}

/// The model class of each dataset class: by name when every name is in the model's
/// `id2label`, else by index when the counts agree; an error otherwise.
fn class_map(classes: &[String], cfg: &beit_model::BeitConfig) -> Result<Vec<u32>> {
    let num_labels = cfg.num_labels();
    let by_name: BTreeMap<String, usize> = (0..num_labels).map(|i| (cfg.label(i), i)).collect();
    if let Some(map) = classes
        .iter()
        .map(|c| by_name.get(c).map(|&i| i as u32))
        .collect::<Option<Vec<u32>>>()
    {
        return Ok(map);
    }
    if classes.len() == num_labels {
        tracing::warn!(
            "the dataset's class names do not match the model's id2label; matching classes by index"
        );
        return Ok((0..num_labels as u32).collect());
    }
    bail!(
        "the dataset has {} classes ({}) but the model predicts {num_labels} with other names",
        classes.len(),
        classes
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Per-class accuracy and the `confusions` most frequent confusions of `m`, named by `cfg`.
fn class_reports(
    m: &ClassificationMetrics,
    cfg: &beit_model::BeitConfig,
    confusions: usize,
) -> (Vec<ClassReport>, Vec<Confusion>) {
    let per_class = m
        .per_class_accuracy()
        .into_iter()
        .enumerate()
        .map(|(i, acc)| ClassReport {
            index: i,
            label: cfg.label(i),
            images: m.confusion[i].iter().sum(),
            acc1: acc,
        })
        .collect();
    let top_confusions = m
        .top_confusions(confusions)
        .into_iter()
        .map(|(t, p, n)| Confusion {
            true_index: t,
            true_label: cfg.label(t),
            predicted_index: p,
            predicted_label: cfg.label(p),
            count: n,
        })
        .collect();
    (per_class, top_confusions)
}

/// Evaluate a classifier checkpoint on a labelled split, with the checkpoint's own
/// preprocessing. Dataset classes are matched to the model's `id2label` by name when every name
/// is known to the model, else by index.
pub fn eval_classifier(job: &EvalJob) -> Result<EvalReport> {
    if job.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let device = parse_device(&job.device)?;
    let loaded = load_model(&job.model, job.download)?;
    let cfg = loaded.checkpoint.config.clone();
    let model = loaded
        .checkpoint
        .classifier(&device)
        .with_context(|| format!("`{}` is not an image classifier checkpoint", job.model))?;
    let splits = load_splits(&job.data)?;
    let ds = match job.split.as_str() {
        "val" | "test" => splits.val.clone(),
        "train" => splits.train.clone(),
        other => bail!("--split `{other}`: expected val or train"),
    };
    let num_labels = cfg.num_labels();
    let map = class_map(&splits.classes, &cfg)?;
    let ds: Arc<dyn Dataset> = Arc::new(Relabel { inner: ds, map });
    let loader = Loader::new(
        ds,
        Arc::new(ProcessorTransform::new(loaded.processor.clone())?),
        LoaderConfig {
            batch_size: job.batch_size,
            shuffle: false,
            drop_last: false,
            num_threads: job.data.num_workers,
            ..LoaderConfig::default()
        },
        device,
    )?;
    let m = evaluate(&loader, num_labels, job.progress, None, |x| {
        classifier_logits(&model, x)
    })?;
    let (per_class, top_confusions) = class_reports(&m, &cfg, job.confusions);
    Ok(EvalReport {
        model: job.model.clone(),
        data: splits.description.clone(),
        split: job.split.clone(),
        images: m.images,
        acc1: m.acc1,
        acc5: m.acc5,
        loss: m.loss,
        skipped_files: loader.skipped().len(),
        per_class,
        top_confusions,
        confusion_matrix: m.confusion,
    })
}
