//! Masked-image-modeling pre-training: the configuration file, and one run from data to exported
//! model.
//!
//! Per micro-batch (beit-reference.md §5.3–5.5): the two-view transform makes, from one crop, the
//! patch view (normalised) and the tokenizer view (`map_pixels`); the frozen tokenizer turns the
//! tokenizer view into a grid of visual-token ids; the mask sampler (blockwise, or random for the
//! ablation) draws a mask per image from `(seed, micro-batch index, sample)`; the model replaces
//! the masked patches by its mask token and predicts the ids of the masked positions
//! ([`beit_mim::mim_loss`]: `lm_head` on the masked rows only). [`beit_train::TrainLoop`] owns the
//! optimizer (AdamW, constant weight decay 0.05, no layer decay in pre-training), the cosine
//! schedule with warm-up, clipping, accumulation, checkpoints (resume is exact), `metrics.jsonl`,
//! `curves.png` and the progress bar. At the end the model is written in Hugging Face layout
//! (`BeitForMaskedImageModeling`) under `OUTPUT/model`, ready for fine-tuning.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::training::FlagKeys;
use beit_data::{
    ColorJitter, Dataset, FashionMnist, Filter, Loader, LoaderConfig, Normalize, RandomResizedCrop,
    TwoViewTransform, UnlabelledFolder,
};
use beit_mim::{
    masked_token_loss, mim_loss, MaskSampler, MaskStrategy, MaskingConfig, MimInputs, MimTarget,
    PixelRegressionHead,
};
use beit_model::load::{load_into_varmap, Architecture, Checkpoint};
use beit_model::save::{save_hf, varmap_tensors};
use beit_model::{BeitConfig, BeitForMaskedImageModeling, ForwardOptions};
use beit_tokenizer::{Encoder, VisualTokenizer};
use beit_train::{
    build_param_groups, init_beit, named_vars, AdamWConfig, GroupingConfig, InitConfig, StepOutput,
    TrainConfig, TrainLoop, TrainRng,
};
use candle::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// A pre-training configuration file (`configs/pretrain_*.toml`). Every field has a default (the
/// paper's BEiT-base recipe on ImageNet-1k, beit-reference.md §7.1); unknown fields are errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainConfig {
    /// Run folder (`--output`).
    pub output: PathBuf,
    /// Device (`--device`): cpu, cuda[:N], metal[:N].
    pub device: String,
    /// Frozen visual tokenizer (`--tokenizer`): a folder from `beit-cli tokenizer train`, an
    /// encoder safetensors file with `dall_e` names, or DALL-E's `encoder.pkl`.
    pub tokenizer: Option<PathBuf>,
    /// Start from the weights of a HF-layout MIM checkpoint folder (`--model`) instead of a
    /// fresh initialisation; its `config.json` then defines the architecture.
    pub init: Option<PathBuf>,
    /// The ViT.
    pub model: ModelSection,
    /// Images and augmentation.
    pub data: DataSection,
    /// Mask generation.
    pub masking: MaskingSection,
    /// What the model predicts.
    pub objective: ObjectiveSection,
    /// Optimisation.
    pub train: TrainSection,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            output: PathBuf::from("runs/pretrain"),
            device: "cpu".into(),
            tokenizer: None,
            init: None,
            model: ModelSection::default(),
            data: DataSection::default(),
            masking: MaskingSection::default(),
            objective: ObjectiveSection::default(),
            train: TrainSection::default(),
        }
    }
}

/// Where the shared first-class flags land in a [`PretrainConfig`].
pub const FLAG_KEYS: FlagKeys = FlagKeys {
    data: "data.source",
    model: "init",
    output: "output",
    epochs: "train.epochs",
    batch_size: "train.batch_size",
    lr: "train.lr",
    device: "device",
    seed: "train.seed",
};

/// `[model]`: the architecture, from a preset with optional overrides (HF `BeitConfig` names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// `base` (12 x 768) or `large` (24 x 1024); the fields below override it.
    pub preset: String,
    /// Transformer width.
    pub hidden_size: Option<usize>,
    /// Number of blocks.
    pub num_hidden_layers: Option<usize>,
    /// Attention heads.
    pub num_attention_heads: Option<usize>,
    /// MLP width.
    pub intermediate_size: Option<usize>,
    /// Input side in pixels.
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Visual-token vocabulary; default: the tokenizer's (8192 without a tokenizer).
    pub vocab_size: Option<usize>,
    /// LayerScale init (0.1 base, 1e-5 large).
    pub layer_scale_init_value: f64,
    /// Stochastic depth of the last block.
    pub drop_path_rate: f64,
    /// LayerNorm epsilon (unilm: 1e-6).
    pub layer_norm_eps: f64,
    /// One relative position bias shared by all blocks (the pre-training default).
    pub use_shared_relative_position_bias: bool,
    /// One relative position bias per block.
    pub use_relative_position_bias: bool,
    /// Absolute position embeddings (off in BEiT).
    pub use_absolute_position_embeddings: bool,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            preset: "base".into(),
            hidden_size: None,
            num_hidden_layers: None,
            num_attention_heads: None,
            intermediate_size: None,
            image_size: 224,
            patch_size: 16,
            vocab_size: None,
            layer_scale_init_value: 0.1,
            drop_path_rate: 0.1,
            layer_norm_eps: 1e-6,
            use_shared_relative_position_bias: true,
            use_relative_position_bias: false,
            use_absolute_position_embeddings: false,
        }
    }
}

impl ModelSection {
    /// The `BeitConfig` of a MIM model with `vocab_size` visual tokens.
    pub fn beit_config(&self, vocab_size: usize) -> Result<BeitConfig> {
        let base = BeitConfig::base_patch16_224_pt22k();
        let mut cfg = match self.preset.as_str() {
            "base" => base,
            "large" => base.into_large(),
            other => bail!("[model] preset: unknown `{other}` (expected base or large)"),
        };
        cfg.hidden_size = self.hidden_size.unwrap_or(cfg.hidden_size);
        cfg.num_hidden_layers = self.num_hidden_layers.unwrap_or(cfg.num_hidden_layers);
        cfg.num_attention_heads = self.num_attention_heads.unwrap_or(cfg.num_attention_heads);
        cfg.intermediate_size = self.intermediate_size.unwrap_or(cfg.intermediate_size);
        cfg.image_size = self.image_size;
        cfg.patch_size = self.patch_size;
        cfg.vocab_size = vocab_size;
        cfg.layer_scale_init_value = self.layer_scale_init_value;
        cfg.drop_path_rate = self.drop_path_rate;
        cfg.layer_norm_eps = self.layer_norm_eps;
        cfg.use_mask_token = true;
        cfg.use_shared_relative_position_bias = self.use_shared_relative_position_bias;
        cfg.use_relative_position_bias = self.use_relative_position_bias;
        cfg.use_absolute_position_embeddings = self.use_absolute_position_embeddings;
        cfg.validate().context("[model]")?;
        Ok(cfg)
    }
}

/// `[data]`: the two-view augmentation and the loader.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Training images (`--data`): `fashion-mnist` (embedded subset), `fashion-mnist:DIR` or a
    /// folder with the Fashion-MNIST IDX files, or a folder of images (its `train/` sub-folder if
    /// present; searched recursively, class folders allowed, labels unused).
    pub source: Option<String>,
    /// Filter of the patch view (`bicubic`).
    pub interpolation: String,
    /// Tokenizer view side; default: patch grid x the tokenizer's downsampling (112 for DALL-E
    /// at 224 px / 16 px patches).
    pub second_size: Option<u32>,
    /// Filter of the tokenizer view (`lanczos`).
    pub second_interpolation: String,
    /// Colour-jitter strength for brightness, contrast and saturation (0 = off).
    pub color_jitter: f32,
    /// Horizontal flip probability.
    pub hflip: f64,
    /// Crop area range, fraction of the image.
    pub crop_scale: [f64; 2],
    /// Crop aspect-ratio range.
    pub crop_ratio: [f64; 2],
    /// Normalisation of the patch view: `half` (mean = std = 0.5) or `imagenet`.
    pub normalize: String,
    /// Use only the first `limit` images (quick runs).
    pub limit: Option<usize>,
    /// Decode/augment threads (0 = all cores).
    pub num_threads: usize,
    /// Batches prepared ahead.
    pub prefetch: usize,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            source: None,
            interpolation: "bicubic".into(),
            second_size: None,
            second_interpolation: "lanczos".into(),
            color_jitter: 0.4,
            hflip: 0.5,
            crop_scale: [0.08, 1.0],
            crop_ratio: [3.0 / 4.0, 4.0 / 3.0],
            normalize: "half".into(),
            limit: None,
            num_threads: 0,
            prefetch: 4,
        }
    }
}

impl DataSection {
    /// The two-view transform for `image_size` and a tokenizer view of `second_size`.
    pub fn transform(&self, image_size: u32, second_size: u32) -> Result<TwoViewTransform> {
        let t = TwoViewTransform {
            color_jitter: (self.color_jitter > 0.0)
                .then(|| ColorJitter::uniform(self.color_jitter)),
            hflip: self.hflip,
            crop: RandomResizedCrop {
                size: (image_size, image_size),
                scale: (self.crop_scale[0], self.crop_scale[1]),
                ratio: (self.crop_ratio[0], self.crop_ratio[1]),
                interpolation: Filter::parse(&self.interpolation)
                    .context("[data] interpolation")?,
            },
            second_size: (second_size, second_size),
            second_interpolation: Filter::parse(&self.second_interpolation)
                .context("[data] second_interpolation")?,
            normalize: Normalize::preset(&self.normalize).context("[data] normalize")?,
        };
        t.validate().context("[data]")?;
        Ok(t)
    }
}

/// `[masking]`: the mask sampler; counts default to the paper's proportions on any grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaskingSection {
    /// `blockwise` (BEiT) or `random` (Table 4 ablation).
    pub strategy: MaskStrategy,
    /// Masked patches per image; default `round(mask_ratio x N)`.
    pub num_masking_patches: Option<usize>,
    /// Fraction masked when `num_masking_patches` is not given.
    pub mask_ratio: f64,
    /// Smallest block; default 16 at 196 patches, scaled with the grid (4 at 7x7).
    pub min_num_patches: Option<usize>,
    /// Largest block (default: the target).
    pub max_num_patches: Option<usize>,
    /// Smallest aspect ratio of a block.
    pub min_aspect: f64,
    /// Largest aspect ratio (default `1 / min_aspect`).
    pub max_aspect: Option<f64>,
}

impl Default for MaskingSection {
    fn default() -> Self {
        Self {
            strategy: MaskStrategy::Blockwise,
            num_masking_patches: None,
            mask_ratio: 0.4,
            min_num_patches: None,
            max_num_patches: None,
            min_aspect: 0.3,
            max_aspect: None,
        }
    }
}

impl MaskingSection {
    /// The sampler settings on a `grid` x `grid` patch grid.
    pub fn masking_config(&self, grid: usize) -> Result<MaskingConfig> {
        let n = grid * grid;
        if !(self.mask_ratio > 0.0 && self.mask_ratio < 1.0) {
            bail!(
                "[masking] mask_ratio must be in (0, 1), got {}",
                self.mask_ratio
            );
        }
        let target = self
            .num_masking_patches
            .unwrap_or_else(|| ((self.mask_ratio * n as f64).round() as usize).max(1));
        // unilm's 16 of 196 patches, in proportion to the grid.
        let min_block = self
            .min_num_patches
            .unwrap_or_else(|| ((16.0 * n as f64 / 196.0).round() as usize).max(1));
        let cfg = MaskingConfig {
            strategy: self.strategy,
            input_size: [grid, grid],
            num_masking_patches: target,
            min_num_patches: min_block,
            max_num_patches: self.max_num_patches,
            min_aspect: self.min_aspect,
            max_aspect: self.max_aspect,
        };
        cfg.validate().context("[masking]")?;
        Ok(cfg)
    }
}

/// `[objective]`: the training target (Table 4 ablations).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectiveSection {
    /// `visual-tokens` (BEiT), `pixel-regression` or `all-tokens`.
    pub target: MimTarget,
}

/// `[train]`: the optimisation recipe (defaults: the paper's, beit-reference.md §7.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Epochs over the data.
    pub epochs: u64,
    /// Images per optimizer step; split into `accum_steps` micro-batches of
    /// `batch_size / accum_steps` images (one forward/backward each).
    pub batch_size: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    pub accum_steps: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the cosine.
    pub min_lr: f64,
    /// Linear warm-up epochs.
    pub warmup_epochs: u64,
    /// Warm-up steps overriding `warmup_epochs` (when `warmup_epochs > 0`, as unilm).
    pub warmup_steps: Option<u64>,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Final weight decay of a cosine schedule (default: constant).
    pub weight_decay_end: Option<f64>,
    /// Global gradient-norm clip.
    pub clip_grad: Option<f64>,
    /// AdamW beta1.
    pub beta1: f64,
    /// AdamW beta2.
    pub beta2: f64,
    /// AdamW epsilon.
    pub eps: f64,
    /// Seed of init, data order, augmentation, masks and drop path.
    pub seed: u64,
    /// Log a line every this many steps.
    pub log_every: u64,
    /// Checkpoint every this many steps (besides epoch ends, when enabled, and the last step).
    pub checkpoint_every: Option<u64>,
    /// Checkpoint at every epoch end.
    pub checkpoint_each_epoch: bool,
    /// Step checkpoints kept.
    pub keep_last: usize,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            epochs: 800,
            batch_size: 2048,
            accum_steps: 1,
            lr: 1.5e-3,
            min_lr: 1e-5,
            warmup_epochs: 10,
            warmup_steps: None,
            weight_decay: 0.05,
            weight_decay_end: None,
            clip_grad: Some(3.0),
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            seed: 0,
            log_every: 10,
            checkpoint_every: None,
            checkpoint_each_epoch: true,
            keep_last: 2,
        }
    }
}

impl TrainSection {
    /// Images per micro-batch.
    pub fn micro_batch(&self) -> Result<usize> {
        let a = self.accum_steps as usize;
        if a == 0 || self.batch_size == 0 || !self.batch_size.is_multiple_of(a) {
            bail!(
                "[train] batch_size {} must be a positive multiple of accum_steps {}",
                self.batch_size,
                self.accum_steps
            );
        }
        Ok(self.batch_size / a)
    }
}

/// Unlabelled training images from `--data`: `fashion-mnist` (the embedded subset's train split),
/// a folder with the Fashion-MNIST IDX files, an `ImageFolder` (`root/<class>/<image>`, labels
/// ignored) or any folder of images (searched recursively).
pub fn open_images(spec: &str) -> Result<(Arc<dyn Dataset>, String)> {
    let path = Path::new(spec.strip_prefix("fashion-mnist:").unwrap_or(spec));
    if spec == "fashion-mnist" {
        let ds = FashionMnist::embedded()?;
        let what = format!("Fashion-MNIST (embedded, {} train images)", ds.train.len());
        return Ok((Arc::new(ds.train), what));
    }
    if path.join("train-images-idx3-ubyte.gz").exists()
        || path.join("train-images-idx3-ubyte").exists()
    {
        let ds = FashionMnist::from_dir(path)?;
        let what = format!(
            "Fashion-MNIST ({}, {} train images)",
            path.display(),
            ds.train.len()
        );
        return Ok((Arc::new(ds.train), what));
    }
    if !path.is_dir() {
        bail!("--data {spec}: expected `fashion-mnist`, `fashion-mnist:DIR` or a folder of images");
    }
    // An ImageFolder with splits: pre-train on its training part only.
    let path = if path.join("train").is_dir() {
        path.join("train")
    } else {
        path.to_path_buf()
    };
    let path = path.as_path();
    let ds = UnlabelledFolder::new(path).with_context(|| format!("--data {spec}"))?;
    let what = format!("{} ({} images)", path.display(), ds.len());
    Ok((Arc::new(ds), what))
}

/// A dataset restricted to its first `n` samples.
struct Take<D> {
    inner: D,
    n: usize,
}

impl<D: Dataset> Dataset for Take<D> {
    fn len(&self) -> usize {
        self.n.min(self.inner.len())
    }
    fn get(&self, index: usize) -> beit_data::Result<beit_data::Sample> {
        if index >= self.len() {
            return Err(beit_data::DataError::OutOfRange {
                index,
                len: self.len(),
            });
        }
        self.inner.get(index)
    }
    fn describe(&self, index: usize) -> String {
        self.inner.describe(index)
    }
}

/// Load a frozen tokenizer: a folder written by `beit-cli tokenizer train` (its
/// `encoder.safetensors`), an encoder safetensors file with `dall_e` names (e.g. the converted
/// DALL-E `encoder.pkl`), or a DALL-E `encoder.pkl` (read as `beit-cli tokenizer` reads it).
pub fn load_tokenizer(path: &Path, device: &Device) -> Result<Encoder> {
    let file = if path.is_dir() {
        path.join(beit_tokenizer::dvae::ENCODER_FILE)
    } else {
        path.to_path_buf()
    };
    if !file.is_file() {
        bail!(
            "--tokenizer {}: no encoder found (expected a file, or a folder with {})",
            path.display(),
            beit_tokenizer::dvae::ENCODER_FILE
        );
    }
    let weights = crate::commands::tokenizer::read_weights(&file, device)?;
    Encoder::from_weights(&weights).with_context(|| format!("loading tokenizer {}", file.display()))
}

/// A pre-training run: the resolved config and how to run it.
#[derive(Debug, Clone)]
pub struct PretrainJob {
    /// The recipe (with data, tokenizer, output and device).
    pub config: PretrainConfig,
    /// Resume from this checkpoint (or run folder: its newest checkpoint).
    pub resume: Option<PathBuf>,
    /// Draw the progress bar.
    pub progress: bool,
    /// Save a checkpoint and stop after this many optimizer steps (a time-boxed slice of the run;
    /// continue it with `--resume`).
    pub stop_after: Option<u64>,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct PretrainOutcome {
    /// Optimizer steps completed.
    pub steps: u64,
    /// Whether all scheduled steps are done.
    pub finished: bool,
    /// Loss of the last step.
    pub last_loss: f64,
    /// Mean loss of the first logged step (for a before/after line).
    pub first_loss: f64,
    /// `mlm_acc` of the last step (visual-token targets).
    pub last_mlm_acc: Option<f64>,
    /// The exported model (`config.json` + `model.safetensors`), once finished.
    pub export_dir: Option<PathBuf>,
    /// `metrics.jsonl`.
    pub metrics: PathBuf,
    /// `curves.png`, if drawn.
    pub plot: Option<PathBuf>,
    /// Wall time of this invocation.
    pub seconds: f64,
    /// Model parameters.
    pub num_params: usize,
}

/// Wraps the MIM model's `lm_head` as a [`Module`] for [`mim_loss`].
struct LmHead<'a>(&'a BeitForMaskedImageModeling);

impl Module for LmHead<'_> {
    fn forward(&self, xs: &Tensor) -> candle::Result<Tensor> {
        self.0.lm_logits(xs)
    }
}

/// One micro-batch, ready for the forward pass.
struct MimBatch {
    pixels: Tensor,
    mask: Tensor,
    token_ids: Option<Tensor>,
    size: usize,
}

/// Run (or continue) a pre-training job.
pub fn pretrain(job: &PretrainJob) -> Result<PretrainOutcome> {
    let started = Instant::now();
    let cfg = &job.config;
    let target = cfg.objective.target;
    let device = &crate::device::parse_device(&cfg.device)?;
    let output = &cfg.output;
    let data_source = cfg
        .data
        .source
        .as_deref()
        .context("no training data: pass --data (or set data.source in the config)")?;
    let micro_batch = cfg.train.micro_batch()?;

    // Tokenizer (frozen: built from plain tensors, so no gradient reaches it).
    let tokenizer = match (&cfg.tokenizer, target.needs_visual_tokens()) {
        (Some(p), _) => Some(load_tokenizer(p, device)?),
        (None, true) => bail!(
            "the `{target}` objective needs a visual tokenizer: pass --tokenizer (a folder from \
             `beit-cli tokenizer train`, or a DALL-E encoder)"
        ),
        (None, false) => None,
    };
    let vocab = match (&tokenizer, cfg.model.vocab_size) {
        (Some(t), Some(v)) if v != t.vocab_size() => bail!(
            "[model] vocab_size = {v} but the tokenizer has {} codes",
            t.vocab_size()
        ),
        (Some(t), _) => t.vocab_size(),
        (None, v) => v.unwrap_or(8192),
    };
    let (mcfg, init_tensors) = match &cfg.init {
        Some(dir) => {
            let ck =
                Checkpoint::from_dir(dir).with_context(|| format!("--model {}", dir.display()))?;
            let mut c = ck.config.clone();
            if tokenizer.is_some() && c.vocab_size != vocab {
                bail!(
                    "--model {}: its vocab_size is {} but the tokenizer has {vocab} codes",
                    dir.display(),
                    c.vocab_size
                );
            }
            c.use_mask_token = true;
            c.drop_path_rate = cfg.model.drop_path_rate;
            (c, Some(ck.tensors))
        }
        None => (cfg.model.beit_config(vocab)?, None),
    };
    let grid = mcfg.grid_size();
    if mcfg.image_size % mcfg.patch_size != 0 {
        bail!(
            "[model] image_size {} is not a multiple of patch_size {}",
            mcfg.image_size,
            mcfg.patch_size
        );
    }
    let second = match (&tokenizer, cfg.data.second_size) {
        (Some(t), Some(s)) => {
            if s as usize != grid * t.downsample() {
                bail!(
                    "[data] second_size = {s}: the tokenizer downsamples by {} so its grid would \
                     be {}x{0}, but the model's patch grid is {grid}x{grid}",
                    t.downsample(),
                    s as usize / t.downsample()
                );
            }
            s
        }
        (Some(t), None) => (grid * t.downsample()) as u32,
        (None, s) => s.unwrap_or(mcfg.image_size as u32 / 2),
    };
    let masking = cfg.masking.masking_config(grid)?;
    let sampler: Box<dyn MaskSampler> = masking.build()?;

    // Data.
    let (dataset, what) = open_images(data_source)?;
    let dataset: Arc<dyn Dataset> = match cfg.data.limit {
        Some(n) => Arc::new(Take { inner: dataset, n }),
        None => dataset,
    };
    let transform = cfg.data.transform(mcfg.image_size as u32, second)?;
    let loader = Loader::new(
        dataset.clone(),
        Arc::new(transform),
        LoaderConfig {
            batch_size: micro_batch,
            shuffle: true,
            drop_last: true,
            seed: cfg.train.seed,
            num_threads: cfg.data.num_threads,
            prefetch: cfg.data.prefetch.max(1),
            ..LoaderConfig::default()
        },
        device.clone(),
    )?;
    let batches_per_epoch = loader.batches_per_epoch() as u64;
    if batches_per_epoch == 0 {
        bail!(
            "{what}: {} images do not fill one micro-batch of {micro_batch}",
            dataset.len()
        );
    }

    // Model.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = BeitForMaskedImageModeling::new(&mcfg, vb.clone())?;
    let pixel_head = if target.needs_pixel_head() {
        Some(PixelRegressionHead::new(
            mcfg.hidden_size,
            mcfg.patch_size,
            mcfg.num_channels,
            vb.clone(),
        )?)
    } else {
        None
    };
    let layers = mcfg.num_hidden_layers;
    init_beit(
        &varmap,
        &InitConfig::pretrain(layers, mcfg.layer_scale_init_value),
        &mut TrainRng::derive(cfg.train.seed, &[0x1417]),
    )?;
    if let Some(tensors) = &init_tensors {
        let report = load_into_varmap(&varmap, tensors)?;
        tracing::info!(
            "initialised {} tensors from {}{}",
            report.loaded.len(),
            cfg.init
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            if report.missing.is_empty() {
                String::new()
            } else {
                format!("; freshly initialised: {}", report.missing.join(", "))
            }
        );
    }
    // Pixel regression trains `pixel_head` instead of `lm_head`: leave the latter out of the
    // optimizer rather than decaying weights that get no gradient.
    let trainable: Vec<_> = named_vars(&varmap)
        .into_iter()
        .filter(|(n, _)| !(target.needs_pixel_head() && n.starts_with("lm_head.")))
        .collect();
    let num_params: usize = trainable.iter().map(|(_, v)| v.elem_count()).sum();
    let groups = build_param_groups(trainable, &GroupingConfig::pretrain(layers))?;

    let tcfg = TrainConfig {
        epochs: cfg.train.epochs,
        batches_per_epoch,
        accum_steps: cfg.train.accum_steps,
        lr: cfg.train.lr,
        min_lr: cfg.train.min_lr,
        warmup_epochs: cfg.train.warmup_epochs,
        warmup_steps: cfg.train.warmup_steps,
        weight_decay: cfg.train.weight_decay,
        weight_decay_end: cfg.train.weight_decay_end,
        clip_grad: cfg.train.clip_grad,
        adamw: AdamWConfig {
            beta1: cfg.train.beta1,
            beta2: cfg.train.beta2,
            eps: cfg.train.eps,
        },
        seed: cfg.train.seed,
        log_every: cfg.train.log_every.max(1),
        checkpoint_every: cfg.train.checkpoint_every,
        checkpoint_each_epoch: cfg.train.checkpoint_each_epoch,
        keep_last: cfg.train.keep_last.max(1),
        show_progress: job.progress,
    };
    tcfg.validate().context("[train]")?;
    std::fs::create_dir_all(output).with_context(|| format!("creating {}", output.display()))?;
    let resolved = output.join("pretrain_config.toml");
    std::fs::write(
        &resolved,
        toml::to_string_pretty(cfg).context("serialising the config")?,
    )
    .with_context(|| format!("writing {}", resolved.display()))?;
    let run_config = serde_json::json!({
        "command": "pretrain",
        "config": cfg,
        "data": data_source,
        "tokenizer": cfg.tokenizer,
        "model": serde_json::from_str::<serde_json::Value>(
            &mcfg.to_hf_json(Architecture::MaskedImageModeling.hf_class())?
        )?,
    });
    let mut tl = match &job.resume {
        Some(ck) => {
            TrainLoop::resume(tcfg.clone(), varmap.clone(), groups, output, ck, run_config)?
        }
        None => TrainLoop::new(tcfg.clone(), varmap.clone(), groups, output, run_config)?,
    };
    tracing::info!(
        "pre-training BEiT ({} blocks x {}, {} heads, {grid}x{grid} patches of {} px, {:.2} M \
         parameters) on {what}: target {target}, {} masking of {} patches (blocks >= {}), \
         {} epochs x {} steps of {} x {} images, lr {:.2e}",
        layers,
        mcfg.hidden_size,
        mcfg.num_attention_heads,
        mcfg.patch_size,
        num_params as f64 / 1e6,
        match masking.strategy {
            MaskStrategy::Blockwise => "blockwise",
            MaskStrategy::Random => "random",
        },
        masking.num_masking_patches,
        masking.min_num_patches,
        tcfg.epochs,
        tcfg.steps_per_epoch(),
        tcfg.accum_steps,
        micro_batch,
        tcfg.lr,
    );

    let seed = cfg.train.seed;
    let opts = ForwardOptions::train();
    let mut first_loss = f64::NAN;
    let mut last_loss = f64::NAN;
    let mut last_acc = None;
    let stop_at = job.stop_after.unwrap_or(u64::MAX);
    while !tl.is_done() && tl.state().step < stop_at {
        let pos = tl.position();
        let mut batches = loader.epoch(pos.epoch)?;
        // A resumed run continues mid-epoch: the skipped batches are produced (the augmentation
        // of a sample depends only on (seed, epoch, index)) and dropped.
        for _ in 0..pos.batch_in_epoch {
            batches
                .next()
                .context("the epoch ended while skipping to the resumed position")??;
        }
        let epoch = pos.epoch;
        while !tl.is_done() && tl.position().epoch == epoch && tl.state().step < stop_at {
            let pos = tl.position();
            let batch = batches.next().with_context(|| {
                format!("epoch {epoch} ended after {} batches", pos.batch_in_epoch)
            })??;
            // Masks are keyed by the global micro-batch index, so a resumed run draws the same.
            let micro = pos.epoch * batches_per_epoch + pos.batch_in_epoch;
            let b = batch.len();
            let mask = sampler.sample_batch(seed, micro, b).to_tensor(device)?;
            let token_ids = match (&tokenizer, &batch.tokenizer_images) {
                (Some(t), Some(view)) => Some(t.tokenize(view)?.reshape((b, grid * grid))?),
                (Some(_), None) => bail!("the loader produced no tokenizer view"),
                (None, _) => None,
            };
            let mb = MimBatch {
                pixels: batch.images,
                mask,
                token_ids,
                size: b,
            };
            let out = forward(&model, pixel_head.as_ref(), target, &mb, tl.rng(), opts)?;
            if let Some(report) = tl.micro_step(out)? {
                if report.step == 1 || first_loss.is_nan() {
                    first_loss = report.loss;
                }
                last_loss = report.loss;
                last_acc = report.metrics.get("mlm_acc").copied();
            }
        }
    }
    if let Some(s) = loader.skipped().first() {
        tracing::warn!("{} ({})", loader.summary(), s.reason);
    }
    let steps = tl.state().step;
    let finished = tl.is_done();
    let metrics = tl.metrics_path().to_path_buf();
    let summary = tl.finish()?;
    let export_dir = if finished {
        let dir = output.join("model");
        save_hf(
            &dir,
            &mcfg,
            Architecture::MaskedImageModeling,
            &varmap_tensors(&varmap),
        )?;
        if let Some(_head) = &pixel_head {
            let tensors: std::collections::HashMap<String, Tensor> = varmap_tensors(&varmap)
                .into_iter()
                .filter(|(k, _)| k.starts_with(beit_mim::PIXEL_HEAD_NAME))
                .collect();
            candle::safetensors::save(&tensors, dir.join("pixel_head.safetensors"))?;
        }
        Some(dir)
    } else {
        tracing::info!(
            "stopped at step {steps} of {}; continue with --resume",
            tcfg.total_steps()
        );
        None
    };
    Ok(PretrainOutcome {
        steps,
        finished,
        last_loss,
        first_loss,
        last_mlm_acc: last_acc,
        export_dir,
        metrics,
        plot: summary.plot,
        seconds: started.elapsed().as_secs_f64(),
        num_params,
    })
}

/// Loss and metrics of one micro-batch.
fn forward(
    model: &BeitForMaskedImageModeling,
    pixel_head: Option<&PixelRegressionHead>,
    target: MimTarget,
    b: &MimBatch,
    rng: &mut TrainRng,
    opts: ForwardOptions,
) -> Result<StepOutput> {
    // Drop path draws from the model's generator, reseeded from the loop's checkpointed one.
    model.backbone().rng().reseed(rng.next_u64());
    let out = if target == MimTarget::VisualTokens {
        // The last block, the final LayerNorm and lm_head on the masked rows only.
        let logits = model.forward_masked(&b.pixels, &b.mask, opts)?.logits;
        masked_token_loss(&logits, &b.mask, b.token_ids.as_ref())?
    } else {
        let (features, _) = model.features(&b.pixels, Some(&b.mask), opts)?;
        mim_loss(
            target,
            &MimInputs {
                features: &features,
                mask: &b.mask,
                token_ids: b.token_ids.as_ref(),
                pixels: Some(&b.pixels),
            },
            &LmHead(model),
            pixel_head,
        )?
    };
    let mut metrics = vec![("masked".to_string(), out.num_masked as f64 / b.size as f64)];
    if let Some(acc) = out.mlm_acc {
        metrics.push(("mlm_acc".to_string(), acc as f64));
    }
    Ok(StepOutput {
        loss: out.loss,
        batch_size: b.size,
        metrics,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::training::load_config;

    #[test]
    fn overrides_reach_nested_keys_and_unknown_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "[train]\nepochs = 1\nbatch_size = 4\n").unwrap();
        let sets: Vec<String> = [
            "train.lr=2e-3",
            "model.preset=large",
            "masking.strategy=random",
            "objective.target=\"all-tokens\"",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let flags = [(
            "data.source".to_string(),
            toml::Value::String("fashion-mnist".into()),
        )];
        let cfg: PretrainConfig = load_config(Some(&path), &sets, &flags).unwrap();
        assert_eq!(cfg.train.lr, 2e-3);
        assert_eq!(cfg.train.epochs, 1);
        assert_eq!(
            cfg.train.clip_grad,
            Some(3.0),
            "unset fields keep the paper recipe"
        );
        assert_eq!(cfg.model.preset, "large");
        assert_eq!(cfg.masking.strategy, MaskStrategy::Random);
        assert_eq!(cfg.objective.target, MimTarget::AllTokens);
        assert_eq!(cfg.data.source.as_deref(), Some("fashion-mnist"));
        let err =
            load_config::<PretrainConfig>(Some(&path), &["train.lrr=1".into()], &[]).unwrap_err();
        assert!(format!("{err:#}").contains("lrr"), "{err:#}");
        // The shipped recipes parse.
        for f in [
            "pretrain_base_in1k",
            "pretrain_large_in22k",
            "pretrain_fashion_mnist",
        ] {
            let p = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs"))
                .join(format!("{f}.toml"));
            let cfg: PretrainConfig = load_config(Some(&p), &[], &[]).unwrap();
            cfg.train.micro_batch().unwrap();
            cfg.masking
                .masking_config(cfg.model.image_size / cfg.model.patch_size)
                .unwrap();
        }
    }

    #[test]
    fn masking_defaults_scale_with_the_grid() {
        let m = MaskingSection::default();
        let c = m.masking_config(7).unwrap();
        assert_eq!((c.num_masking_patches, c.min_num_patches), (20, 4));
        let c = m.masking_config(14).unwrap();
        assert_eq!((c.num_masking_patches, c.min_num_patches), (78, 16));
    }
}
