//! `beit-cli eval`: top-1/top-5 accuracy of a classifier on a labelled dataset, with a confusion
//! summary (per-class accuracy and the most frequent confusions).

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use beit_data::{Dataset, Loader, LoaderConfig, Sample};
use clap::Args;
use serde::Serialize;

use crate::device::parse_device;
use crate::model_source::load_model;
use crate::training::{
    classifier_logits, evaluate, load_splits, print_table, DataConfig, ProcessorTransform,
};

/// Evaluate a classifier: top-1/top-5, mean loss, per-class accuracy and the most confused pairs.
///
/// Images are prepared as the model's `preprocessor_config.json` says (as `predict` and
/// `transformers` do). Dataset classes are matched to the model's `id2label` by name when the
/// names agree, else by index.
///
/// Example: `beit-cli eval --model runs/ft-fmnist/best_model --data fashion-mnist`
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Classifier: a directory (config.json + weights) or a hub id in the local HF cache.
    #[arg(long)]
    pub model: String,
    /// Dataset: a directory (`train/` + `val/` ImageFolders, or one ImageFolder split by
    /// `--val-fraction`), `fashion-mnist` (embedded subset) or `fashion-mnist:DIR`.
    #[arg(long)]
    pub data: String,
    /// Which split to evaluate: `val` (the `val/` folder, the held-out part, or the Fashion-MNIST
    /// test set) or `train`.
    #[arg(long, default_value = "val")]
    pub split: String,
    /// Held-out fraction when `--data` is a single ImageFolder (same split as `finetune`).
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    /// Seed of that split (same as `finetune`'s `data.split_seed`).
    #[arg(long, default_value_t = 0)]
    pub split_seed: u64,
    /// Evaluate at most this many images (a fixed random subset).
    #[arg(long)]
    pub max_samples: Option<usize>,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Decode threads (0 = number of CPUs).
    #[arg(long, default_value_t = 0)]
    pub num_workers: usize,
    /// Device: cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// How many of the most frequent confusions to list.
    #[arg(long, default_value_t = 10)]
    pub confusions: usize,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Allow downloading a hub checkpoint missing from the cache.
    #[arg(long)]
    pub download: bool,
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

#[derive(Serialize)]
struct ClassReport {
    index: usize,
    label: String,
    images: u64,
    acc1: Option<f64>,
}

#[derive(Serialize)]
struct Confusion {
    true_index: usize,
    true_label: String,
    predicted_index: usize,
    predicted_label: String,
    count: u64,
}

#[derive(Serialize)]
struct Report {
    model: String,
    data: String,
    split: String,
    images: usize,
    acc1: f64,
    acc5: f64,
    loss: f64,
    skipped_files: usize,
    per_class: Vec<ClassReport>,
    top_confusions: Vec<Confusion>,
    confusion_matrix: Vec<Vec<u64>>,
}

/// Run the command.
pub fn run(args: EvalArgs) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let device = parse_device(&args.device)?;
    let loaded = load_model(&args.model, args.download)?;
    let cfg = loaded.checkpoint.config.clone();
    let model = loaded
        .checkpoint
        .classifier(&device)
        .with_context(|| format!("`{}` is not an image classifier checkpoint", args.model))?;
    let splits = load_splits(&DataConfig {
        source: args.data.clone(),
        val_fraction: args.val_fraction,
        split_seed: args.split_seed,
        max_train_samples: args.max_samples,
        max_val_samples: args.max_samples,
        num_workers: args.num_workers,
        ..DataConfig::default()
    })?;
    let ds = match args.split.as_str() {
        "val" | "test" => splits.val.clone(),
        "train" => splits.train.clone(),
        other => bail!("--split `{other}`: expected val or train"),
    };

    // Dataset classes -> model classes: by name when every name is known to the model.
    let num_labels = cfg.num_labels();
    let by_name: BTreeMap<String, usize> = (0..num_labels).map(|i| (cfg.label(i), i)).collect();
    let map: Vec<u32> =
        if splits.classes.iter().all(|c| by_name.contains_key(c)) {
            splits.classes.iter().map(|c| by_name[c] as u32).collect()
        } else if splits.classes.len() == num_labels {
            tracing::warn!(
            "the dataset's class names do not match the model's id2label; matching classes by index"
        );
            (0..num_labels as u32).collect()
        } else {
            bail!(
            "the dataset has {} classes ({}) but the model predicts {num_labels} with other names",
            splits.classes.len(),
            splits.classes.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        );
        };
    let ds: Arc<dyn Dataset> = Arc::new(Relabel { inner: ds, map });

    let transform = ProcessorTransform::new(loaded.processor.clone())?;
    let loader = Loader::new(
        ds,
        Arc::new(transform),
        LoaderConfig {
            batch_size: args.batch_size,
            shuffle: false,
            drop_last: false,
            num_threads: args.num_workers,
            ..LoaderConfig::default()
        },
        device.clone(),
    )?;
    let m = evaluate(&loader, num_labels, !args.json, |x| {
        classifier_logits(&model, x)
    })?;
    let skipped = loader.skipped().len();

    let per_class: Vec<ClassReport> = m
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
    let top_confusions: Vec<Confusion> = m
        .top_confusions(args.confusions)
        .into_iter()
        .map(|(t, p, n)| Confusion {
            true_index: t,
            true_label: cfg.label(t),
            predicted_index: p,
            predicted_label: cfg.label(p),
            count: n,
        })
        .collect();
    let report = Report {
        model: args.model.clone(),
        data: splits.description.clone(),
        split: args.split.clone(),
        images: m.images,
        acc1: m.acc1,
        acc5: m.acc5,
        loss: m.loss,
        skipped_files: skipped,
        per_class,
        top_confusions,
        confusion_matrix: m.confusion.clone(),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let k = 5.min(num_labels);
    print_table(
        &format!("evaluation of {}", report.model),
        &[
            (
                "data".into(),
                format!("{} ({} split)", report.data, report.split),
            ),
            ("images".into(), report.images.to_string()),
            ("top-1".into(), format!("{:.2}%", report.acc1)),
            (format!("top-{k}"), format!("{:.2}%", report.acc5)),
            ("loss".into(), format!("{:.4}", report.loss)),
            ("skipped files".into(), skipped.to_string()),
        ],
    );
    // Per-class accuracy: all classes when few, else the 10 worst.
    let mut classes: Vec<&ClassReport> = report.per_class.iter().filter(|c| c.images > 0).collect();
    let title = if classes.len() > 20 {
        classes.sort_by(|a, b| a.acc1.unwrap_or(0.0).total_cmp(&b.acc1.unwrap_or(0.0)));
        classes.truncate(10);
        "per-class accuracy (10 worst classes)"
    } else {
        "per-class accuracy"
    };
    print_table(
        title,
        &classes
            .iter()
            .map(|c| {
                (
                    format!("{:>4} {}", c.index, c.label),
                    format!("{:6.2}%  ({} images)", c.acc1.unwrap_or(0.0), c.images),
                )
            })
            .collect::<Vec<_>>(),
    );
    if !report.top_confusions.is_empty() {
        print_table(
            "most frequent confusions (true -> predicted)",
            &report
                .top_confusions
                .iter()
                .map(|c| {
                    (
                        format!("{} -> {}", c.true_label, c.predicted_label),
                        c.count.to_string(),
                    )
                })
                .collect::<Vec<_>>(),
        );
    }
    Ok(())
}
