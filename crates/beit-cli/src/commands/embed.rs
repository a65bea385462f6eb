//! `beit-cli embed`: write the pooled features of every image of a dataset to a safetensors file.

use std::path::PathBuf;

use anyhow::Result;
use beit_data::source::DataConfig;
use beit_recipes::embed::{embed, EmbedJob, Split};
use beit_recipes::features::Pool;
use beit_recipes::parse_device;
use clap::{Args, ValueEnum};

/// Features of every image of a dataset (`features`, `labels`, and the paths in the metadata),
/// for retrieval, deduplication or `beit-cli knn`.
#[derive(Args, Debug)]
pub struct EmbedArgs {
    /// Model directory or hub id (any checkpoint with a backbone).
    #[arg(long)]
    pub model: String,
    /// Data: an ImageFolder (`train/` + `val/`, or one folder split by `--val-fraction`),
    /// `fashion-mnist`, or `fashion-mnist:DIR`.
    #[arg(long)]
    pub data: String,
    /// Which split to embed.
    #[arg(long, value_enum, default_value_t = SplitArg::Train)]
    pub split: SplitArg,
    /// Held-out fraction of a single-folder dataset (as the training commands).
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    /// Embed at most this many images of the split (a fixed random subset).
    #[arg(long)]
    pub max_samples: Option<usize>,
    /// Pooling: `mean` of the patch tokens or the `cls` token.
    #[arg(long, default_value = "mean")]
    pub pool: Pool,
    /// Block pooled (0 = patch embeddings; default: the last block).
    #[arg(long)]
    pub layer: Option<usize>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Output file (written atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Device: cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Decode threads (0 = every core).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Allow downloading a hub checkpoint missing from the cache.
    #[arg(long)]
    pub download: bool,
}

/// `--split`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SplitArg {
    /// Training images.
    Train,
    /// Validation images.
    Val,
}

/// Run the command.
pub fn run(args: EmbedArgs) -> Result<()> {
    let split = match args.split {
        SplitArg::Train => Split::Train,
        SplitArg::Val => Split::Val,
    };
    let data = DataConfig {
        source: args.data.clone(),
        val_fraction: args.val_fraction,
        max_train_samples: args.max_samples.filter(|_| split == Split::Train),
        max_val_samples: args.max_samples.filter(|_| split == Split::Val),
        num_workers: args.workers,
        ..DataConfig::default()
    };
    let job = EmbedJob {
        model: args.model,
        data,
        split,
        pool: args.pool,
        layer: args.layer,
        batch_size: args.batch_size,
        out: args.out,
        device: parse_device(&args.device)?,
        download: args.download,
        progress: true,
    };
    let o = embed(&job)?;
    println!(
        "{}: {} images x {} features (block {}, {} pooling){}",
        o.out.display(),
        o.rows,
        o.dim,
        o.layer,
        job.pool.name(),
        if o.skipped > 0 {
            format!(", {} unreadable skipped", o.skipped)
        } else {
            String::new()
        }
    );
    Ok(())
}
