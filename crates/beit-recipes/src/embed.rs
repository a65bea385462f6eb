//! `beit-cli embed`: the pooled features of every image of a dataset, with labels and paths, in
//! one features file (see [`crate::feature_file`]).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use beit_data::source::{load_splits, DataConfig};
use beit_data::{Dataset, Loader, LoaderConfig, ProcessorTransform};
use candle::Device;

use crate::evaluate::progress_bar;
use crate::feature_file::FeatureFile;
use crate::features::{features, Pool};
use crate::load_model;

/// Which part of the data source to embed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The training split.
    Train,
    /// The validation split.
    Val,
}

/// One feature-extraction run.
#[derive(Debug, Clone)]
pub struct EmbedJob {
    /// `--model`: directory or hub id.
    pub model: String,
    /// The data source (`--data`) and its split settings.
    pub data: DataConfig,
    /// The split to embed.
    pub split: Split,
    /// Pooling of the block's tokens.
    pub pool: Pool,
    /// Block pooled (default: the last).
    pub layer: Option<usize>,
    /// Images per forward pass.
    pub batch_size: usize,
    /// The features file to write.
    pub out: PathBuf,
    /// Where the model runs.
    pub device: Device,
    /// Allow downloading a hub checkpoint missing from the cache.
    pub download: bool,
    /// Draw a progress bar.
    pub progress: bool,
}

/// What an embedding run wrote.
#[derive(Debug, Clone)]
pub struct EmbedOutcome {
    /// Rows written.
    pub rows: usize,
    /// Feature width.
    pub dim: usize,
    /// Block pooled.
    pub layer: usize,
    /// Images that could not be read (skipped, named in the log).
    pub skipped: usize,
    /// The file written.
    pub out: PathBuf,
}

/// Run `job`: load the backbone, stream the split through beit-data's prefetching [`Loader`],
/// pool each batch, and write the file atomically.
pub fn embed(job: &EmbedJob) -> Result<EmbedOutcome> {
    let loaded = load_model(&job.model, job.download)?;
    let num_layers = loaded.checkpoint.config.num_hidden_layers;
    let layer = job.layer.unwrap_or(num_layers);
    if layer > num_layers {
        bail!("--layer {layer}: the model has blocks 0..={num_layers}");
    }
    let backbone = loaded
        .checkpoint
        .backbone(&job.device)
        .with_context(|| format!("building the backbone of {}", job.model))?;
    let splits = load_splits(&job.data)?;
    tracing::info!("data: {}", splits.description);
    let ds: Arc<dyn Dataset> = match job.split {
        Split::Train => splits.train,
        Split::Val => splits.val,
    };
    let loader = Loader::new(
        ds.clone(),
        Arc::new(ProcessorTransform::new(loaded.processor.clone())?),
        LoaderConfig {
            batch_size: job.batch_size.max(1),
            shuffle: false,
            drop_last: false,
            num_threads: job.data.num_workers,
            ..LoaderConfig::default()
        },
        job.device.clone(),
    )?;
    let pb = if job.progress {
        progress_bar(loader.samples_per_epoch() as u64, "embed")
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut file = FeatureFile {
        features: Vec::new(),
        dim: 0,
        labels: Vec::new(),
        paths: Vec::new(),
        classes: splits.classes,
        meta: [
            ("pool".to_string(), job.pool.name().to_string()),
            ("layer".to_string(), layer.to_string()),
            ("model".to_string(), job.model.clone()),
        ]
        .into_iter()
        .collect(),
    };
    for batch in loader.epoch(0)? {
        let batch = batch?;
        let f = features(&backbone, &batch.images, layer, job.pool)?;
        file.dim = f.dim(1)?;
        file.features.extend(f.flatten_all()?.to_vec1::<f32>()?);
        let labels = match &batch.labels {
            Some(l) => l.to_vec1::<u32>()?.into_iter().map(i64::from).collect(),
            None => vec![-1; batch.len()],
        };
        file.labels.extend(labels);
        file.paths
            .extend(batch.indices.iter().map(|&i| ds.describe(i)));
        pb.inc(batch.len() as u64);
    }
    pb.finish_and_clear();
    let skipped = loader.skipped().len();
    if skipped > 0 {
        tracing::warn!("{}", loader.summary());
    }
    file.write(&job.out)?;
    Ok(EmbedOutcome {
        rows: file.len(),
        dim: file.dim,
        layer,
        skipped,
        out: job.out.clone(),
    })
}
