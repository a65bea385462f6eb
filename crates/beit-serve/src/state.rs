//! The server as a whole: the loaded model and its batching thread (`serve.rs` serves it).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;

use beit_data::ImageProcessor;
use beit_model::load::Architecture;
use beit_model::segmentation::load::is_segmentation;
use beit_model::segmentation::segmentation_model;
use beit_model::BeitConfig;
use beit_recipes::load_model;
use beit_recipes::segment::palette_for;
use candle::{Device, Tensor};

use crate::batcher::{self, Batcher};
use crate::config::ServeConfig;
use crate::error::{Result, ServeError};
use crate::metrics::Metrics;
use crate::model::{Network, ServedModel};

/// What every handler shares.
pub struct AppState {
    /// The queue to the model.
    pub batcher: Batcher,
    /// The checkpoint's preprocessing (the same as `beit-cli predict`'s).
    pub processor: ImageProcessor,
    /// Where pixels are prepared and the model runs.
    pub device: Device,
    /// Limits.
    pub config: ServeConfig,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Raised once the model is loaded and warmed up.
    pub ready: Arc<AtomicBool>,
    /// Blocks of the backbone (the largest valid `layer`).
    pub num_layers: usize,
    /// Whether the checkpoint has a classification head.
    pub model_classifies: bool,
    /// Whether the checkpoint is a semantic segmentation model (it serves `/v1/segment` only).
    pub model_segments: bool,
    /// The checkpoint's config (class names of the label maps).
    pub model_config: BeitConfig,
    /// Colours of the classes in label PNGs (as `beit-cli segment --out` writes them).
    pub palette: Vec<[u8; 3]>,
}

/// A loaded model with its batching thread running, ready to serve.
pub struct Service {
    pub(crate) state: Arc<AppState>,
    pub(crate) worker: JoinHandle<()>,
}

impl Service {
    /// Load `spec` (a model directory or hub id, as `beit-cli predict --model`) on `device` and
    /// start the batching thread (which warms the model up before `/readyz` says ready).
    pub fn load(spec: &str, download: bool, device: Device, config: ServeConfig) -> Result<Self> {
        config.validate()?;
        let model_err = |source| ServeError::Model {
            spec: spec.to_string(),
            source,
        };
        let loaded = load_model(spec, download).map_err(model_err)?;
        let ckpt = &loaded.checkpoint;
        let network = if is_segmentation(ckpt.tensors.keys()) {
            segmentation_model(ckpt, &device).map(|m| Network::Segmenter(Box::new(m)))
        } else if ckpt.architecture() == Architecture::ImageClassification {
            ckpt.classifier(&device).map(Network::Classifier)
        } else {
            ckpt.backbone(&device).map(Network::Backbone)
        }
        .map_err(|e| model_err(e.into()))?;
        let palette = match &network {
            Network::Segmenter(m) => palette_for(m.num_labels()),
            _ => Vec::new(),
        };
        let size = ckpt.config.image_size;
        let (h, w) = loaded.processor.fixed_output_size().unwrap_or((size, size));
        let warmup = Tensor::zeros((1, 3, h, w), candle::DType::F32, &device)
            .map_err(|e| model_err(e.into()))?;
        let model = ServedModel {
            network,
            config: ckpt.config.clone(),
        };
        let model_classifies = model.can_classify();
        let model_segments = model.can_segment();
        let model_config = ckpt.config.clone();
        let num_layers = ckpt.config.num_hidden_layers;
        let metrics = Arc::new(Metrics::default());
        let ready = Arc::new(AtomicBool::new(false));
        let (batcher, worker) = batcher::start(
            model,
            warmup,
            config.max_batch,
            config.max_wait,
            config.queue_capacity,
            metrics.clone(),
            ready.clone(),
        )?;
        let state = AppState {
            batcher,
            processor: loaded.processor,
            device,
            config,
            metrics,
            ready,
            num_layers,
            model_classifies,
            model_segments,
            model_config,
            palette,
        };
        Ok(Service {
            state: Arc::new(state),
            worker,
        })
    }

    /// The shared state (for tests and embedding the router elsewhere).
    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }
}
