//! Masked-image-modeling pre-training: the recipe file, and one run from data to exported model.
//!
//! One micro-batch: the two-view transform makes, from one crop, the patch view (normalised) and
//! the tokenizer view (`map_pixels`); the frozen tokenizer turns the tokenizer view into a grid
//! of visual-token ids; the mask sampler (blockwise, or random for the ablation) draws a mask per
//! image from `(seed, global micro-batch index, sample)`; the model replaces the masked patches
//! by its mask token and predicts the ids of the masked positions
//! ([`beit_mim::masked_token_loss_at`]: the last block, the final LayerNorm and `lm_head` on the
//! masked rows only). The engine ([`beit_train::fit`]) owns the optimizer (AdamW, weight decay
//! 0.05, no layer decay in pre-training), the cosine schedule with warm-up, clipping,
//! accumulation, checkpoints (resume is exact), `metrics.jsonl`, `curves.png` and the progress
//! bar. At the end the model is written in Hugging Face layout (`BeitForMaskedImageModeling`)
//! under `OUTPUT/model`, ready for fine-tuning.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use beit_data::{
    limit, open_images, Batch, ColorJitter, DataConfig, Filter, Loader, LoaderConfig,
    RandomResizedCrop, TwoViewTransform,
};
use beit_mim::{
    masked_token_loss_at, mim_loss_at, MaskBatch, MaskSampler, MaskStrategy, MaskingSpec,
    MimInputs, MimLossOutput, MimTarget, PixelRegressionHead,
};
use beit_model::init::{init_beit, InitConfig};
use beit_model::load::{load_into_varmap, Architecture, Checkpoint};
use beit_model::save::{save_hf, varmap_tensors};
use beit_model::{BeitConfig, BeitForMaskedImageModeling, ForwardOptions, QueryRows};
use beit_tokenizer::{Encoder, VisualTokenizer};
use beit_train::{
    build_param_groups, fit_source, named_vars, FitOptions, StepContext, StepOutput, StepValue,
    TrainRng, TrainTask,
};
use candle::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::config::{NormalizePreset, Preset, TrainSection};
use crate::device::DeviceSpec;
use crate::distributed::World;
use crate::loader_epochs::LoaderEpochs;
use crate::runner::{self, RunSpec};

/// A pre-training configuration file (`configs/pretrain_*.toml`). Every field has a default (the
/// paper's BEiT-base recipe on ImageNet-1k: 800 epochs, batch 2048, lr 1.5e-3 with 10 warm-up
/// epochs, weight decay 0.05, clip 3.0, drop path 0.1, 75 of 196 patches masked blockwise);
/// unknown fields are errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainConfig {
    /// Run folder (`--output`).
    pub output: PathBuf,
    /// Device (`--device`): cpu, cuda[:N], metal[:N].
    pub device: DeviceSpec,
    /// Frozen visual tokenizer (`--tokenizer`): a folder from `beit-cli tokenizer train`, an
    /// encoder safetensors file with `dall_e` names, or DALL-E's `encoder.pkl`.
    pub tokenizer: Option<PathBuf>,
    /// Start from the weights of a HF-layout MIM checkpoint folder (`--model`) instead of a
    /// fresh initialisation; its `config.json` then defines the architecture.
    pub model: Option<PathBuf>,
    /// The ViT built from scratch (ignored with `model`).
    pub architecture: ModelSection,
    /// Its initialisation: `unilm` (the paper's: truncated normal, block outputs rescaled by
    /// depth, torch's default for the patch embedding) or `transformers` (`_init_weights`:
    /// normal 0.02 everywhere, zero tokens). Default `unilm`.
    pub init: InitScheme,
    /// The images (`--data`); only the training part is used, labels ignored.
    pub data: DataConfig,
    /// The two-view augmentation.
    pub aug: AugSection,
    /// Mask generation.
    pub masking: MaskingSpec,
    /// What the model predicts.
    pub objective: ObjectiveSection,
    /// Optimisation.
    pub train: TrainSection,
}

/// The initialisation of a model built from scratch (`beit_model::init::InitConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InitScheme {
    /// unilm's pre-training init ([`InitConfig::pretrain`]).
    Unilm,
    /// transformers' `_init_weights` ([`InitConfig::transformers`]).
    Transformers,
}

impl InitScheme {
    /// The init rules for a model of `layers` blocks with LayerScale `layer_scale`.
    pub fn config(self, layers: usize, layer_scale: f64) -> InitConfig {
        match self {
            Self::Unilm => InitConfig::pretrain(layers, layer_scale),
            Self::Transformers => InitConfig::transformers(layers, layer_scale),
        }
    }
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            output: PathBuf::from("runs/pretrain"),
            device: DeviceSpec::Cpu,
            tokenizer: None,
            model: None,
            architecture: ModelSection::default(),
            init: InitScheme::Unilm,
            data: DataConfig::default(),
            aug: AugSection::default(),
            masking: MaskingSpec::default(),
            objective: ObjectiveSection::default(),
            train: TrainSection {
                epochs: 800,
                batch_size: 2048,
                lr: 1.5e-3,
                min_lr: 1e-5,
                warmup_epochs: 10,
                layer_decay: None,
                clip_grad: Some(3.0),
                label_smoothing: 0.0,
                ..TrainSection::default()
            },
        }
    }
}

/// `[architecture]`: the ViT, from a preset with optional overrides (HF `BeitConfig` names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// `base` (12 x 768, the default) or `large` (24 x 1024); the fields below override it.
    pub preset: Preset,
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
            preset: Preset::Base,
            hidden_size: None,
            num_hidden_layers: None,
            num_attention_heads: None,
            intermediate_size: None,
            image_size: 224,
            patch_size: 16,
            vocab_size: None,
            layer_scale_init_value: 0.1,
            layer_norm_eps: 1e-6,
            use_shared_relative_position_bias: true,
            use_relative_position_bias: false,
            use_absolute_position_embeddings: false,
        }
    }
}

impl ModelSection {
    /// The `BeitConfig` of a MIM model with `vocab_size` visual tokens and stochastic depth
    /// `drop_path_rate`.
    pub fn beit_config(&self, vocab_size: usize, drop_path_rate: f64) -> Result<BeitConfig> {
        let base = BeitConfig::base_patch16_224_pt22k();
        let mut cfg = match self.preset {
            Preset::Base => base,
            Preset::Large => base.into_large(),
        };
        cfg.hidden_size = self.hidden_size.unwrap_or(cfg.hidden_size);
        cfg.num_hidden_layers = self.num_hidden_layers.unwrap_or(cfg.num_hidden_layers);
        cfg.num_attention_heads = self.num_attention_heads.unwrap_or(cfg.num_attention_heads);
        cfg.intermediate_size = self.intermediate_size.unwrap_or(cfg.intermediate_size);
        cfg.image_size = self.image_size;
        cfg.patch_size = self.patch_size;
        cfg.vocab_size = vocab_size;
        cfg.layer_scale_init_value = self.layer_scale_init_value;
        cfg.drop_path_rate = drop_path_rate;
        cfg.layer_norm_eps = self.layer_norm_eps;
        cfg.use_mask_token = true;
        cfg.use_shared_relative_position_bias = self.use_shared_relative_position_bias;
        cfg.use_relative_position_bias = self.use_relative_position_bias;
        cfg.use_absolute_position_embeddings = self.use_absolute_position_embeddings;
        cfg.validate().context("[architecture]")?;
        Ok(cfg)
    }
}

/// `[aug]`: the two-view augmentation (unilm `DataAugmentationForBEiT`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugSection {
    /// Filter of the patch view (`bicubic`).
    pub interpolation: Filter,
    /// Tokenizer view side; default: patch grid x the tokenizer's downsampling (112 for DALL-E
    /// at 224 px / 16 px patches).
    pub second_size: Option<u32>,
    /// Filter of the tokenizer view (`lanczos`).
    pub second_interpolation: Filter,
    /// Colour-jitter strength for brightness, contrast and saturation (0 = off).
    pub color_jitter: f32,
    /// Horizontal flip probability.
    pub hflip: f64,
    /// Crop area range, fraction of the image.
    pub crop_scale: [f64; 2],
    /// Crop aspect-ratio range.
    pub crop_ratio: [f64; 2],
    /// Normalisation of the patch view: `half` (mean = std = 0.5) or `imagenet`.
    pub normalize: NormalizePreset,
}

impl Default for AugSection {
    fn default() -> Self {
        Self {
            interpolation: Filter::Bicubic,
            second_size: None,
            second_interpolation: Filter::Lanczos,
            color_jitter: 0.4,
            hflip: 0.5,
            crop_scale: [0.08, 1.0],
            crop_ratio: [3.0 / 4.0, 4.0 / 3.0],
            normalize: NormalizePreset::Half,
        }
    }
}

impl AugSection {
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
                interpolation: self.interpolation,
            },
            second_size: (second_size, second_size),
            second_interpolation: self.second_interpolation,
            normalize: self.normalize.normalize(),
        };
        t.validate().context("[aug]")?;
        Ok(t)
    }
}

/// `[objective]`: the training target (Table 4 ablations).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectiveSection {
    /// `visual-tokens` (BEiT), `pixel-regression` or `all-tokens`.
    pub target: MimTarget,
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
    let weights = crate::tokenizer::read_weights(&file, device)?;
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
    /// The processes the run is spread over (a single one by default).
    pub world: World,
    /// Write what each micro-batch trains on into this folder (see [`dump_micro_batch`]) and
    /// the initial weights under `model/` (HF layout), for a step-for-step comparison with
    /// another implementation.
    pub dump_batches: Option<PathBuf>,
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

impl PretrainOutcome {
    fn new(
        done: &beit_train::FitOutcome,
        export_dir: Option<PathBuf>,
        started: Instant,
        num_params: usize,
    ) -> Self {
        let last = done.last_step.as_ref();
        Self {
            steps: done.summary.steps,
            finished: done.finished,
            last_loss: last.map_or(f64::NAN, |r| r.loss),
            first_loss: done.first_step.as_ref().map_or(f64::NAN, |r| r.loss),
            last_mlm_acc: last.and_then(|r| r.metrics.get("mlm_acc").copied()),
            export_dir,
            metrics: done.summary.metrics.clone(),
            plot: done.summary.plot.clone(),
            seconds: started.elapsed().as_secs_f64(),
            num_params,
        }
    }
}

/// Wraps the MIM model's `lm_head` as a [`Module`] for [`mim_loss_at`].
struct LmHead<'a>(&'a BeitForMaskedImageModeling);

impl Module for LmHead<'_> {
    fn forward(&self, xs: &Tensor) -> candle::Result<Tensor> {
        self.0.lm_logits(xs)
    }
}

/// The MIM task: tokenizer, mask sampler, model and loss of one micro-batch.
struct MimTask {
    model: BeitForMaskedImageModeling,
    pixel_head: Option<PixelRegressionHead>,
    tokenizer: Option<Encoder>,
    sampler: Box<dyn MaskSampler>,
    target: MimTarget,
    grid: usize,
    seed: u64,
    batches_per_epoch: u64,
    device: Device,
    dump: Option<PathBuf>,
}

/// File name of global micro-batch `micro` in a batch dump.
pub fn dump_file_name(micro: u64) -> String {
    format!("batch-{micro:06}.safetensors")
}

/// Write one micro-batch as the model sees it: `pixel_values` (f32, the normalised patch view),
/// `bool_masked_pos` (u8, batch x patches, 1 = masked) and, with a tokenizer, `token_ids` (i64,
/// batch x patches, the visual tokens of every position).
pub fn dump_micro_batch(
    dir: &Path,
    micro: u64,
    pixels: &Tensor,
    mask: &Tensor,
    token_ids: Option<&Tensor>,
) -> Result<()> {
    let mut tensors = vec![
        ("pixel_values".to_string(), pixels.clone()),
        ("bool_masked_pos".to_string(), mask.clone()),
    ];
    if let Some(ids) = token_ids {
        tensors.push(("token_ids".to_string(), ids.to_dtype(DType::I64)?));
    }
    let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
    let path = dir.join(dump_file_name(micro));
    candle::safetensors::save(&map, &path).with_context(|| format!("writing {}", path.display()))
}

impl MimTask {
    /// The loss of one micro-batch of `images` masked by `masks` (`mask` is the same on the
    /// device). The masked positions are taken from the host batch: neither the model nor the
    /// loss reads the mask back from the device.
    fn loss(
        &self,
        images: &Tensor,
        masks: &MaskBatch,
        mask: &Tensor,
        token_ids: Option<&Tensor>,
    ) -> Result<MimLossOutput> {
        let masked = masks.masked_flat_indices();
        let opts = ForwardOptions::train();
        Ok(if self.target == MimTarget::VisualTokens {
            // The last block, the final LayerNorm and lm_head on the masked rows only.
            let rows = QueryRows::new(&masks.masked_positions(1))?;
            let logits = self
                .model
                .forward_masked_rows(images, mask, &rows, opts)?
                .logits;
            let grid = (masks.batch_size(), masks.num_patches());
            masked_token_loss_at(&logits, grid, &masked, token_ids)?
        } else {
            let (features, _) = self.model.features(images, Some(mask), opts)?;
            mim_loss_at(
                self.target,
                &MimInputs {
                    features: &features,
                    mask,
                    token_ids,
                    pixels: Some(images),
                },
                &masked,
                &LmHead(&self.model),
                self.pixel_head.as_ref(),
            )?
        })
    }
}

impl TrainTask for MimTask {
    type Batch = Batch;
    type Error = anyhow::Error;

    fn train_step(&mut self, batch: Batch, ctx: &mut StepContext<'_>) -> Result<StepOutput> {
        let pos = ctx.position;
        let b = batch.len();
        // Masks are keyed by the global micro-batch index, so a resumed run draws the same, and
        // by the sample's position in the global micro-batch, so that they do not depend on the
        // number of data-parallel processes.
        let micro = pos.epoch * self.batches_per_epoch + pos.batch_in_epoch;
        let positions = ctx.global_positions(b);
        let (height, width) = self.sampler.grid();
        let masks = MaskBatch {
            height,
            width,
            masks: positions
                .iter()
                .map(|&p| self.sampler.sample_at(self.seed, micro, p))
                .collect(),
        };
        let mask = masks.to_tensor(&self.device)?;
        let token_ids = match (&self.tokenizer, &batch.tokenizer_images) {
            (Some(t), Some(view)) => Some(t.tokenize(view)?.reshape((b, self.grid * self.grid))?),
            (Some(_), None) => bail!("the loader produced no tokenizer view"),
            (None, _) => None,
        };
        if let Some(dir) = &self.dump {
            dump_micro_batch(dir, micro, &batch.images, &mask, token_ids.as_ref())?;
        }
        // Drop path draws from the model's generator, seeded from the run's checkpointed one and
        // keyed by each image's position in the global micro-batch, as the masks are.
        ctx.reseed_stochastic(self.model.backbone().rng(), b);
        let out = self.loss(&batch.images, &masks, &mask, token_ids.as_ref())?;
        // The loss is a mean over masked patches (all patches for `all-tokens`): data-parallel
        // ranks are weighted by them.
        ctx.loss_weight = Some(match self.target {
            MimTarget::AllTokens => (b * self.grid * self.grid) as f64,
            _ => out.num_masked as f64,
        });
        let masked = out.num_masked as f64 / b as f64;
        let mut metrics = vec![("masked".to_string(), StepValue::Host(masked))];
        if let Some(acc) = out.mlm_acc {
            // Stays on the device until the step's values are read back.
            metrics.push(("mlm_acc".to_string(), acc.into()));
        }
        Ok(StepOutput {
            loss: out.loss,
            batch_size: b,
            metrics,
        })
    }
}

/// The frozen tokenizer of `cfg` (required by objectives that predict visual tokens) and the
/// vocabulary size the model predicts.
fn tokenizer_and_vocab(cfg: &PretrainConfig, device: &Device) -> Result<(Option<Encoder>, usize)> {
    let target = cfg.objective.target;
    let tokenizer = match (&cfg.tokenizer, target.needs_visual_tokens()) {
        (Some(p), _) => Some(load_tokenizer(p, device)?),
        (None, true) => bail!(
            "the `{target}` objective needs a visual tokenizer: pass --tokenizer (a folder from \
             `beit-cli tokenizer train`, or a DALL-E encoder)"
        ),
        (None, false) => None,
    };
    let vocab = match (&tokenizer, cfg.architecture.vocab_size) {
        (Some(t), Some(v)) if v != t.vocab_size() => bail!(
            "[architecture] vocab_size = {v} but the tokenizer has {} codes",
            t.vocab_size()
        ),
        (Some(t), _) => t.vocab_size(),
        (None, v) => v.unwrap_or(8192),
    };
    Ok((tokenizer, vocab))
}

/// Initial weights of a continued pre-training (`--model`), by name.
type InitTensors = Option<std::collections::HashMap<String, Tensor>>;

/// The model's config (from `--model`, or `[architecture]`) and the weights it starts from.
fn model_config(
    cfg: &PretrainConfig,
    vocab: usize,
    tokenized: bool,
) -> Result<(BeitConfig, InitTensors)> {
    let (mcfg, init) = match &cfg.model {
        Some(dir) => {
            let ck =
                Checkpoint::from_dir(dir).with_context(|| format!("--model {}", dir.display()))?;
            let mut c = ck.config.clone();
            if tokenized && c.vocab_size != vocab {
                bail!(
                    "--model {}: its vocab_size is {} but the tokenizer has {vocab} codes",
                    dir.display(),
                    c.vocab_size
                );
            }
            c.use_mask_token = true;
            c.drop_path_rate = cfg.train.drop_path_rate;
            (c, Some(ck.tensors))
        }
        None => (
            cfg.architecture
                .beit_config(vocab, cfg.train.drop_path_rate)?,
            None,
        ),
    };
    if mcfg.image_size % mcfg.patch_size != 0 {
        bail!(
            "[architecture] image_size {} is not a multiple of patch_size {}",
            mcfg.image_size,
            mcfg.patch_size
        );
    }
    Ok((mcfg, init))
}

/// The tokenizer view's side: `[aug] second_size`, checked against the tokenizer's grid, or
/// what makes the tokenizer's grid the model's `grid`.
fn second_size(
    tokenizer: Option<&Encoder>,
    cfg: &PretrainConfig,
    mcfg: &BeitConfig,
) -> Result<u32> {
    let grid = mcfg.grid_size();
    Ok(match (tokenizer, cfg.aug.second_size) {
        (Some(t), Some(s)) => {
            if s as usize != grid * t.downsample() {
                bail!(
                    "[aug] second_size = {s}: the tokenizer downsamples by {} so its grid would \
                     be {}x{0}, but the model's patch grid is {grid}x{grid}",
                    t.downsample(),
                    s as usize / t.downsample()
                );
            }
            s
        }
        (Some(t), None) => (grid * t.downsample()) as u32,
        (None, s) => s.unwrap_or(mcfg.image_size as u32 / 2),
    })
}

/// The sharded two-view loader of `cfg.data` and its micro-batches per epoch.
fn mim_loader(
    cfg: &PretrainConfig,
    mcfg: &BeitConfig,
    second: u32,
    device: &Device,
    world: &World,
) -> Result<(Loader, u64, String)> {
    let micro_batch = cfg.train.micro_batch()?;
    let (dataset, what) = open_images(&cfg.data.source)?;
    let dataset = limit(dataset, cfg.data.max_train_samples, cfg.data.split_seed);
    let transform = cfg.aug.transform(mcfg.image_size as u32, second)?;
    let loader = Loader::new(
        dataset.clone(),
        Arc::new(transform),
        world.shard_loader(LoaderConfig {
            batch_size: world.rank_micro_batch(micro_batch)?,
            shuffle: true,
            drop_last: true,
            seed: cfg.train.seed,
            num_threads: cfg.data.num_workers,
            prefetch: cfg.data.prefetch.max(1),
            ..LoaderConfig::default()
        }),
        device.clone(),
    )?;
    let batches_per_epoch =
        crate::distributed::global_batches_per_epoch(dataset.len(), micro_batch);
    if batches_per_epoch == 0 {
        bail!(
            "{what}: {} images do not fill one micro-batch of {micro_batch}",
            dataset.len()
        );
    }
    Ok((loader, batches_per_epoch, what))
}

/// The MIM model (and the pixel head of the pixel-regression ablations), initialised as unilm
/// pre-trains, then from `init` when continuing a checkpoint.
fn build_mim_model(
    cfg: &PretrainConfig,
    mcfg: &BeitConfig,
    init: Option<&std::collections::HashMap<String, Tensor>>,
    device: &Device,
) -> Result<(
    VarMap,
    BeitForMaskedImageModeling,
    Option<PixelRegressionHead>,
)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = BeitForMaskedImageModeling::new(mcfg, vb.clone())?;
    let pixel_head = if cfg.objective.target.needs_pixel_head() {
        Some(PixelRegressionHead::new(
            mcfg.hidden_size,
            mcfg.patch_size,
            mcfg.num_channels,
            vb.clone(),
        )?)
    } else {
        None
    };
    init_beit(
        &varmap,
        &cfg.init
            .config(mcfg.num_hidden_layers, mcfg.layer_scale_init_value),
        &mut TrainRng::derive(cfg.train.seed, &[0x1417]),
    )?;
    if let Some(tensors) = init {
        let report = load_into_varmap(&varmap, tensors)?;
        tracing::info!(
            "initialised {} tensors from {}{}",
            report.loaded.len(),
            cfg.model
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
    Ok((varmap, model, pixel_head))
}

/// The trained variables of `varmap`: pixel regression trains `pixel_head` instead of
/// `lm_head`, so the latter is left out rather than decaying weights that get no gradient.
fn trainable(varmap: &VarMap, target: MimTarget) -> Vec<(String, candle::Var)> {
    named_vars(varmap)
        .into_iter()
        .filter(|(n, _)| !(target.needs_pixel_head() && n.starts_with("lm_head.")))
        .collect()
}

/// The run's log line: the model, the data, the objective and the schedule.
fn log_start(
    cfg: &PretrainConfig,
    mcfg: &BeitConfig,
    masking: &beit_mim::MaskingConfig,
    tcfg: &beit_train::TrainConfig,
    num_params: usize,
    what: &str,
) -> Result<()> {
    let grid = mcfg.grid_size();
    tracing::info!(
        "pre-training BEiT ({} blocks x {}, {} heads, {grid}x{grid} patches of {} px, {:.2} M \
         parameters) on {}: target {}, {} masking of {} patches (blocks >= {}), \
         {} epochs x {} steps of {} x {} images, lr {:.2e}",
        mcfg.num_hidden_layers,
        mcfg.hidden_size,
        mcfg.num_attention_heads,
        mcfg.patch_size,
        num_params as f64 / 1e6,
        what,
        cfg.objective.target,
        match masking.strategy {
            MaskStrategy::Blockwise => "blockwise",
            MaskStrategy::Random => "random",
        },
        masking.num_masking_patches,
        masking.min_num_patches,
        tcfg.epochs,
        tcfg.steps_per_epoch(),
        tcfg.accum_steps,
        cfg.train.micro_batch()?,
        tcfg.lr,
    );
    Ok(())
}

/// Write the finished model in Hugging Face layout under `output/model`
/// (`BeitForMaskedImageModeling`), with `pixel_head.safetensors` beside it when there is one.
fn export_model(
    output: &Path,
    mcfg: &BeitConfig,
    varmap: &VarMap,
    pixel_head: bool,
) -> Result<PathBuf> {
    let dir = output.join("model");
    save_hf(
        &dir,
        mcfg,
        Architecture::MaskedImageModeling,
        &varmap_tensors(varmap),
    )?;
    if pixel_head {
        let tensors: std::collections::HashMap<String, Tensor> = varmap_tensors(varmap)
            .into_iter()
            .filter(|(k, _)| k.starts_with(beit_mim::PIXEL_HEAD_NAME))
            .collect();
        candle::safetensors::save(&tensors, dir.join("pixel_head.safetensors"))?;
    }
    Ok(dir)
}

/// What every checkpoint of the run records: the command, the recipe and the model's config.
fn run_config(cfg: &PretrainConfig, mcfg: &BeitConfig) -> Result<serde_json::Value> {
    Ok(serde_json::json!({
        "command": "pretrain",
        "config": cfg,
        "model": serde_json::from_str::<serde_json::Value>(
            &mcfg.to_hf_json(Architecture::MaskedImageModeling.hf_class())?
        )?,
    }))
}

/// Rank 0 exports the model of a finished run in HF layout; an unfinished run (stopped after
/// `--stop-after` steps of `total_steps`) says how to continue.
fn export_if_finished(
    done: &beit_train::FitOutcome,
    total_steps: u64,
    world: &World,
    cfg: &PretrainConfig,
    mcfg: &BeitConfig,
    varmap: &VarMap,
    pixel_head: bool,
) -> Result<Option<PathBuf>> {
    if !done.finished {
        let steps = done.summary.steps;
        tracing::info!("stopped at step {steps} of {total_steps}; continue with --resume");
        return Ok(None);
    }
    if !world.is_primary() {
        return Ok(None); // rank 0 exports
    }
    Ok(Some(export_model(&cfg.output, mcfg, varmap, pixel_head)?))
}

/// Run (or continue) a pre-training job.
pub fn pretrain(job: &PretrainJob) -> Result<PretrainOutcome> {
    let started = Instant::now();
    let cfg = &job.config;
    let world = &job.world;
    let device = &cfg.device.open_in(world)?;
    if cfg.data.source.trim().is_empty() {
        bail!("no training data: pass --data (or set data.source in the config)");
    }
    world.rank_micro_batch(cfg.train.micro_batch()?)?;
    world.warn_if_n_dependent(false);
    let (tokenizer, vocab) = tokenizer_and_vocab(cfg, device)?;
    let (mcfg, init_tensors) = model_config(cfg, vocab, tokenizer.is_some())?;
    let second = second_size(tokenizer.as_ref(), cfg, &mcfg)?;
    let masking = cfg.masking.on_grid(mcfg.grid_size()).context("[masking]")?;
    let sampler: Box<dyn MaskSampler> = masking.build()?;
    let (loader, batches_per_epoch, what) = mim_loader(cfg, &mcfg, second, device, world)?;
    let (varmap, model, pixel_head) = build_mim_model(cfg, &mcfg, init_tensors.as_ref(), device)?;
    drop(init_tensors);
    if let Some(dir) = &job.dump_batches {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        export_model(dir, &mcfg, &varmap, pixel_head.is_some())?;
    }
    let params = trainable(&varmap, cfg.objective.target);
    let num_params: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    let groups = build_param_groups(params, &cfg.train.grouping(mcfg.num_hidden_layers))?;
    let resume = job.resume.as_deref();
    let spec = RunSpec::new(
        &cfg.output,
        resume,
        &cfg.train,
        batches_per_epoch,
        job.progress,
        world,
    );
    let record = run_config(cfg, &mcfg)?;
    let tl = runner::open_loop_recording(&spec, cfg, record, varmap.clone(), groups)?;
    let tcfg = tl.config().clone();
    log_start(cfg, &mcfg, &masking, &tcfg, num_params, &what)?;
    let mut task = MimTask {
        model,
        pixel_head,
        tokenizer,
        sampler,
        target: cfg.objective.target,
        grid: mcfg.grid_size(),
        seed: cfg.train.seed,
        batches_per_epoch,
        device: device.clone(),
        dump: job.dump_batches.clone(),
    };
    let precision = cfg.train.precision(device)?;
    tracing::info!("precision: {precision}");
    let done = precision.scope(|| {
        fit_source(
            tl,
            &mut task,
            &mut LoaderEpochs(&loader),
            &FitOptions {
                stop_after: job.stop_after,
                ..FitOptions::default()
            },
        )
    })?;
    if let Some(s) = loader.skipped().first() {
        tracing::warn!("{} ({})", loader.summary(), s.reason);
    }
    let has_pixel_head = task.pixel_head.is_some();
    let total = tcfg.total_steps();
    let export_dir = export_if_finished(&done, total, world, cfg, &mcfg, &varmap, has_pixel_head)?;
    Ok(PretrainOutcome::new(&done, export_dir, started, num_params))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_config;

    #[test]
    fn overrides_reach_nested_keys_and_unknown_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "[train]\nepochs = 1\nbatch_size = 4\n").unwrap();
        let sets: Vec<String> = [
            "train.lr=2e-3",
            "architecture.preset=large",
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
        assert_eq!(cfg.architecture.preset, Preset::Large);
        assert_eq!(cfg.masking.strategy, MaskStrategy::Random);
        assert_eq!(cfg.objective.target, MimTarget::AllTokens);
        assert_eq!(cfg.data.source, "fashion-mnist");
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
                .on_grid(cfg.architecture.image_size / cfg.architecture.patch_size)
                .unwrap();
        }
    }
}
