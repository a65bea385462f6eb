//! `--model <dir | hub id>`: resolve through the Hugging Face cache and load the checkpoint.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use beit_hub::{resolve_model, ResolveOptions, WeightFiles};
use beit_model::load::Checkpoint;
use beit_model::BeitConfig;
use candle::Tensor;

use beit_data::ImageProcessor;

/// A loaded checkpoint and its preprocessing.
pub struct LoadedModel {
    /// Config and tensors.
    pub checkpoint: Checkpoint,
    /// How images are prepared for it.
    pub processor: ImageProcessor,
}

/// Resolve `spec` (a local directory or `org/name[@revision]` in the HF cache; never downloads
/// unless `download`) and read config, weights and `preprocessor_config.json`.
pub fn load_model(spec: &str, download: bool) -> Result<LoadedModel> {
    load(spec, download, |config, weights| {
        Checkpoint::from_files(config, weights).with_context(|| format!("loading model `{spec}`"))
    })
}

/// [`load_model`] without reading the weights file: config and preprocessing from `spec`, the
/// tensors from `tensors(config)` (e.g. a fresh initialisation of the same architecture).
pub fn load_architecture(
    spec: &str,
    download: bool,
    tensors: impl FnOnce(&BeitConfig) -> Result<HashMap<String, Tensor>>,
) -> Result<LoadedModel> {
    load(spec, download, |config, weights| {
        Ok(Checkpoint {
            tensors: tensors(&config)?,
            config,
            source: weights.to_path_buf(),
        })
    })
}

fn load(
    spec: &str,
    download: bool,
    checkpoint: impl FnOnce(BeitConfig, &Path) -> Result<Checkpoint>,
) -> Result<LoadedModel> {
    let files = resolve_model(spec, &ResolveOptions::default().with_download(download))?;
    let weights = match &files.weights {
        WeightFiles::Safetensors(p) | WeightFiles::PytorchBin(p) => p.clone(),
        WeightFiles::ShardedSafetensors { index, .. } => index.clone(),
    };
    let config = BeitConfig::from_file(&files.config)?;
    let checkpoint = checkpoint(config, &weights)?;
    let size = checkpoint.config.image_size as u32;
    let processor = if checkpoint.config.family == beit_model::config::Family::Timm {
        // timm checkpoints describe their pipeline in config.json's `pretrained_cfg`.
        let cfg = checkpoint
            .config
            .timm_pretrained_cfg
            .clone()
            .unwrap_or_default();
        ImageProcessor::from_timm_pretrained_cfg(&cfg, size)
            .with_context(|| format!("invalid `pretrained_cfg` in {}", files.config.display()))?
    } else {
        match &files.preprocessor_config {
            Some(p) => ImageProcessor::from_file(p, size)?,
            None => ImageProcessor::for_image_size(size),
        }
    };
    Ok(LoadedModel {
        checkpoint,
        processor,
    })
}
