//! `beit-cli eval`: top-1/top-5 of a classifier on a labelled dataset, with a confusion summary
//! (`beit_recipes::eval_classifier`).

use anyhow::Result;
use beit_data::DataConfig;
use beit_recipes::{eval_classifier, EvalJob};
use clap::Args;

use crate::args::print_table;

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

/// Run the command.
pub fn run(args: EvalArgs) -> Result<()> {
    let report = eval_classifier(&EvalJob {
        model: args.model.clone(),
        download: args.download,
        data: DataConfig {
            source: args.data.clone(),
            val_fraction: args.val_fraction,
            split_seed: args.split_seed,
            max_train_samples: args.max_samples,
            max_val_samples: args.max_samples,
            num_workers: args.num_workers,
            ..DataConfig::default()
        },
        split: args.split.clone(),
        batch_size: args.batch_size,
        device: args.device.clone(),
        confusions: args.confusions,
        progress: !args.json,
    })?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let k = 5.min(report.per_class.len());
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
            ("skipped files".into(), report.skipped_files.to_string()),
        ],
    );
    // Per-class accuracy: all classes when few, else the 10 worst.
    let mut classes: Vec<_> = report.per_class.iter().filter(|c| c.images > 0).collect();
    let title = if classes.len() > 20 {
        classes.sort_by(|a, b| a.acc1.unwrap_or(0.0).total_cmp(&b.acc1.unwrap_or(0.0)));
        classes.truncate(10);
        "per-class accuracy (10 worst classes)"
    } else {
        "per-class accuracy"
    };
    let rows: Vec<_> = classes
        .iter()
        .map(|c| {
            (
                format!("{:>4} {}", c.index, c.label),
                format!("{:6.2}%  ({} images)", c.acc1.unwrap_or(0.0), c.images),
            )
        })
        .collect();
    print_table(title, &rows);
    if !report.top_confusions.is_empty() {
        let rows: Vec<_> = report
            .top_confusions
            .iter()
            .map(|c| {
                let pair = format!("{} -> {}", c.true_label, c.predicted_label);
                (pair, c.count.to_string())
            })
            .collect();
        print_table("most frequent confusions (true -> predicted)", &rows);
    }
    Ok(())
}
