//! `beit-cli knn`: weighted k-NN accuracy of features written by `beit-cli embed` (DINO's check
//! of a frozen backbone).

use std::path::PathBuf;

use anyhow::{ensure, Result};
use beit_recipes::feature_file::FeatureFile;
use beit_recipes::knn::{knn_classify, LabelledFeatures, DEFAULT_TEMPERATURE};
use candle::Device;
use clap::Args;

/// Weighted k-NN classification of `--val` features against `--train` features: cosine
/// similarity of L2-normalised features, votes `exp(sim / T)`; prints top-1/top-5 per `k`.
#[derive(Args, Debug)]
pub struct KnnArgs {
    /// Training features (`beit-cli embed --split train`).
    #[arg(long)]
    pub train: PathBuf,
    /// Validation features (`beit-cli embed --split val`).
    #[arg(long)]
    pub val: PathBuf,
    /// Neighbour counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,20,100")]
    pub k: Vec<usize>,
    /// Temperature of the vote weights.
    #[arg(long, default_value_t = DEFAULT_TEMPERATURE)]
    pub temperature: f64,
    /// Print one JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn labelled(f: &FeatureFile, what: &str) -> Result<LabelledFeatures> {
    ensure!(
        f.labels.iter().all(|&l| l >= 0),
        "{what}: unlabelled rows (label -1); k-NN needs labels"
    );
    Ok(LabelledFeatures {
        features: f.tensor(&Device::Cpu)?,
        labels: f.labels.iter().map(|&l| l as u32).collect(),
    })
}

/// Run the command.
pub fn run(args: KnnArgs) -> Result<()> {
    let train = FeatureFile::read(&args.train)?;
    let val = FeatureFile::read(&args.val)?;
    let num_classes = train
        .labels
        .iter()
        .chain(&val.labels)
        .map(|&l| l as usize + 1)
        .max()
        .unwrap_or(0)
        .max(train.classes.len());
    let results = knn_classify(
        &labelled(&train, "--train")?,
        &labelled(&val, "--val")?,
        &args.k,
        args.temperature,
        num_classes,
    )?;
    if args.json {
        println!("{}", serde_json::to_string(&results)?);
    } else {
        println!(
            "{} train / {} val, T = {}",
            train.len(),
            val.len(),
            args.temperature
        );
        for r in &results {
            println!(
                "  k = {:>4}  top-1 {:6.2}%  top-5 {:6.2}%",
                r.k, r.top1, r.top5
            );
        }
    }
    Ok(())
}
