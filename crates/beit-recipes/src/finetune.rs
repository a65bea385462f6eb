//! Fine-tuning an image classifier with the unilm recipe.
//!
//! From a pre-trained (MIM, shared relative bias) or fine-tuned checkpoint, or from scratch
//! (`[architecture]`): layer-wise lr decay, weight-decay groups, warm-up + cosine, mixup/CutMix
//! with label smoothing (soft-target cross-entropy), RandAugment, random erasing, drop path;
//! top-1/top-5 after every `train.eval_every` epochs; the best model exported in Hugging Face
//! layout (`best_model/`, with `best.json`); resuming continues bit for bit.
//!
//! One micro-batch: augmented images (and mixed soft targets) from the loader ->
//! [`BeitForImageClassification::forward`] in training mode (drop path seeded from the run's
//! generator) -> soft-target or label-smoothing cross-entropy -> the engine's step.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use beit_data::{
    load_splits, Batch, ColorJitter, DataConfig, EraseMode, EvalResize, EvalTransform, Filter,
    ImageProcessor, Loader, LoaderConfig, Mixup, RandomErasing, RandomResizedCrop, TrainTransform,
};
use beit_model::{BeitConfig, BeitForImageClassification, ForwardOptions};
use beit_train::{
    build_param_groups, fit_source, label_smoothing_cross_entropy, named_vars,
    soft_target_cross_entropy, Position, StepContext, StepOutput, TrainTask,
};
use candle::Device;
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::classifier::{
    export_classifier, finetune_config, log_load_report, processor_for_eval, trainable_classifier,
};
use crate::config::{AutoAugment, EvalResizeMode, NormalizePreset, TrainSection};
use crate::device::DeviceSpec;
use crate::distributed::World;
use crate::evaluate::{classifier_logits, evaluate};
use crate::loader_epochs::LoaderEpochs;
use crate::model_source::load_model;
pub use crate::runner::FinetuneOutcome;
use crate::runner::{self, RunSpec};

/// A fine-tuning recipe (`configs/finetune_*.toml`). Defaults: the paper's BEiT-base recipe on
/// ImageNet-1k from the pt22k checkpoint (Table 13 / unilm README).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneConfig {
    /// Starting checkpoint: directory or hub id (`--model`). Unset (the default): from scratch
    /// with `[architecture]`.
    #[serde(deserialize_with = "crate::config::non_empty")]
    pub model: Option<String>,
    /// Load the checkpoint's weights (true); false keeps only its architecture, freshly
    /// initialised: a from-scratch baseline of the same shape.
    pub pretrained: bool,
    /// Scale of the freshly initialised classifier (weight and bias) when fine-tuning from a
    /// checkpoint (unilm's `--init_scale`, 0.001: the head starts near zero so the first steps
    /// do not push a random gradient into the pre-trained backbone). From scratch the head
    /// keeps transformers' initialisation and this is not used. A short fine-tuning of a small
    /// model learns faster with 1.0 (`docs/demo.md`).
    pub head_init_scale: f64,
    /// Run directory (`--output`).
    pub output: PathBuf,
    /// Device (`--device`).
    pub device: DeviceSpec,
    /// Dataset.
    pub data: DataConfig,
    /// Model shape when training from scratch (ignored with a checkpoint).
    pub architecture: Architecture,
    /// Optimisation.
    pub train: TrainSection,
    /// Augmentation and regularisation.
    pub aug: AugSection,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            model: None,
            pretrained: true,
            head_init_scale: 0.001,
            output: PathBuf::from("runs/finetune"),
            device: DeviceSpec::Cpu,
            data: DataConfig::default(),
            architecture: Architecture::default(),
            train: TrainSection {
                layer_decay: Some(0.65),
                ..TrainSection::default()
            },
            aug: AugSection::default(),
        }
    }
}

/// `[architecture]`: a from-scratch model (HF `BeitConfig` fields). Defaults: BEiT-base/16.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Architecture {
    /// Width.
    pub hidden_size: usize,
    /// Blocks.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// LayerScale init (0.1 base, 1e-5 large; <= 0 disables LayerScale).
    pub layer_scale_init_value: f64,
    /// LayerNorm epsilon (unilm 1e-6).
    pub layer_norm_eps: f64,
}

impl Architecture {
    /// The model of this shape (relative position bias in every block, mean pooling), as
    /// fine-tuning builds it from scratch.
    pub fn beit_config(&self) -> BeitConfig {
        BeitConfig {
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            patch_size: self.patch_size,
            layer_scale_init_value: self.layer_scale_init_value,
            layer_norm_eps: self.layer_norm_eps,
            use_relative_position_bias: true,
            use_mean_pooling: true,
            ..BeitConfig::default()
        }
    }
}

impl Default for Architecture {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            patch_size: 16,
            layer_scale_init_value: 0.1,
            layer_norm_eps: 1e-6,
        }
    }
}

/// `[aug]`: input pipeline and regularisation (timm `create_transform` / `Mixup` settings).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugSection {
    /// Model input side (`--input_size`, 224); the checkpoint's tables are resized to it.
    pub input_size: usize,
    /// RandomResizedCrop minimum area fraction (0.08).
    pub crop_scale_min: f64,
    /// Training resampling filter (`--train_interpolation`, bicubic).
    pub train_interpolation: Filter,
    /// Horizontal flip probability (0.5).
    pub hflip: f64,
    /// Colour jitter strength, used only without RandAugment (`--color_jitter`, 0.4).
    pub color_jitter: f32,
    /// RandAugment policy (`--aa`, `rand-m9-mstd0.5-inc1`); `none` disables it. A spec that does
    /// not parse fails when the recipe is read, naming this field.
    pub auto_augment: AutoAugment,
    /// Random erasing probability (`--reprob`, 0.25).
    pub reprob: f64,
    /// Random erasing fill: `pixel` (per-pixel normal noise, the default), `rand` (one colour
    /// per rectangle) or `const` (zeros) (`--remode`).
    pub remode: EraseMode,
    /// Mixup alpha (`--mixup`, 0.8); 0 disables.
    pub mixup: f64,
    /// CutMix alpha (`--cutmix`, 1.0); 0 disables.
    pub cutmix: f64,
    /// Probability of mixing a batch (`--mixup_prob`, 1.0).
    pub mixup_prob: f64,
    /// Probability of CutMix rather than mixup (`--mixup_switch_prob`, 0.5).
    pub mixup_switch_prob: f64,
    /// Normalisation: `half` (mean = std = 0.5, the released checkpoints) or `imagenet`.
    pub normalize: NormalizePreset,
    /// Evaluation: `crop` (shorter side to size/crop_pct, centre crop, as unilm) or `squash`
    /// (resize to size × size, as the published HF processors).
    pub eval_resize: EvalResizeMode,
    /// Crop fraction of `crop` evaluation (0.875 at 224, as unilm).
    pub eval_crop_pct: f64,
    /// Evaluation resampling filter (bicubic).
    pub eval_interpolation: Filter,
}

impl Default for AugSection {
    fn default() -> Self {
        Self {
            input_size: 224,
            crop_scale_min: 0.08,
            train_interpolation: Filter::Bicubic,
            hflip: 0.5,
            color_jitter: 0.4,
            auto_augment: AutoAugment::parse("rand-m9-mstd0.5-inc1")
                .expect("the default RandAugment spec parses"),
            reprob: 0.25,
            remode: EraseMode::Pixel,
            mixup: 0.8,
            cutmix: 1.0,
            mixup_prob: 1.0,
            mixup_switch_prob: 0.5,
            normalize: NormalizePreset::Half,
            eval_resize: EvalResizeMode::Crop,
            eval_crop_pct: 0.875,
            eval_interpolation: Filter::Bicubic,
        }
    }
}

impl AugSection {
    /// The training transform.
    pub fn train_transform(&self) -> Result<TrainTransform> {
        let mut crop = RandomResizedCrop::new(self.input_size as u32);
        crop.scale = (self.crop_scale_min, 1.0);
        crop.interpolation = self.train_interpolation;
        let rand_augment = self.auto_augment.policy().cloned();
        let t = TrainTransform {
            crop,
            hflip: self.hflip,
            color_jitter: (self.color_jitter > 0.0)
                .then(|| ColorJitter::uniform(self.color_jitter)),
            rand_augment,
            normalize: self.normalize.normalize(),
            random_erasing: (self.reprob > 0.0).then(|| RandomErasing {
                probability: self.reprob,
                mode: self.remode,
                ..RandomErasing::default()
            }),
        };
        t.validate().context("[aug]")?;
        Ok(t)
    }

    /// The evaluation transform.
    pub fn eval_transform(&self) -> Result<EvalTransform> {
        let resize = match self.eval_resize {
            EvalResizeMode::Crop => EvalResize::ShorterSideCrop {
                crop_pct: self.eval_crop_pct,
            },
            EvalResizeMode::Squash => EvalResize::Squash,
        };
        if !(self.eval_crop_pct > 0.0 && self.eval_crop_pct <= 1.0) {
            bail!(
                "aug.eval_crop_pct must be in (0, 1], got {}",
                self.eval_crop_pct
            );
        }
        Ok(EvalTransform {
            size: self.input_size as u32,
            resize,
            interpolation: self.eval_interpolation,
            normalize: self.normalize.normalize(),
        })
    }

    /// Mixup/CutMix, when either is enabled.
    pub fn mixup(&self, num_classes: usize, label_smoothing: f64) -> Option<Mixup> {
        (self.mixup > 0.0 || self.cutmix > 0.0).then_some(Mixup {
            mixup_alpha: self.mixup,
            cutmix_alpha: self.cutmix,
            prob: self.mixup_prob,
            switch_prob: self.mixup_switch_prob,
            label_smoothing,
            num_classes,
        })
    }
}

/// A fine-tuning run of the recipe `C`: [`FinetuneConfig`] (classification, [`finetune`]) or
/// [`crate::FinetuneSegConfig`] (segmentation, [`crate::finetune_seg`], as
/// [`crate::FinetuneSegJob`]).
#[derive(Debug, Clone)]
pub struct FinetuneJob<C = FinetuneConfig> {
    /// The resolved recipe.
    pub config: C,
    /// Resume from this checkpoint (or run directory: its newest checkpoint).
    pub resume: Option<PathBuf>,
    /// Allow downloading a hub checkpoint missing from the cache.
    pub download: bool,
    /// Stop (with a checkpoint) once this many optimizer steps are done.
    pub stop_after: Option<u64>,
    /// Draw progress bars.
    pub progress: bool,
    /// The processes the run is spread over (a single one by default).
    pub world: World,
}

/// The fine-tuning task: a classifier, its loss, its evaluation and its export.
struct ClassifierTask<'a> {
    model: BeitForImageClassification,
    model_cfg: BeitConfig,
    varmap: VarMap,
    label_smoothing: f64,
    eval_loader: &'a Loader,
    num_classes: usize,
    progress: bool,
    processor: ImageProcessor,
    out: PathBuf,
    world: World,
}

impl TrainTask for ClassifierTask<'_> {
    type Batch = Batch;
    type Error = anyhow::Error;

    fn train_step(&mut self, batch: Batch, ctx: &mut StepContext<'_>) -> Result<StepOutput> {
        ctx.reseed_stochastic(self.model.backbone().rng(), batch.images.dim(0)?);
        let logits = self
            .model
            .forward(&batch.images, ForwardOptions::train())?
            .logits;
        let loss = match (&batch.soft_targets, &batch.labels) {
            (Some(soft), _) => soft_target_cross_entropy(&logits, soft)?,
            (None, Some(labels)) => {
                label_smoothing_cross_entropy(&logits, labels, self.label_smoothing)?
            }
            (None, None) => bail!("the training data has no labels"),
        };
        Ok(StepOutput {
            loss,
            batch_size: batch.len(),
            metrics: vec![],
        })
    }

    fn evaluate(&mut self) -> Result<Vec<(String, f64)>> {
        let world = &self.world;
        let m = evaluate(
            self.eval_loader,
            self.num_classes,
            self.progress && world.is_primary(),
            Some(&**world),
            |x| classifier_logits(&self.model, x),
        )?;
        tracing::info!(
            "validation: acc1 {:.2}% acc5 {:.2}% loss {:.4} ({} images)",
            m.acc1,
            m.acc5,
            m.loss,
            m.images
        );
        Ok(m.as_pairs())
    }

    fn on_best(&mut self, metrics: &BTreeMap<String, f64>, at: Position) -> Result<()> {
        let dir = self.out.join("best_model");
        export_classifier(&dir, &self.model_cfg, &self.varmap, &self.processor)?;
        let best = runner::write_best(&self.out, metrics, &["acc1", "acc5"], at)?;
        tracing::info!("new best acc1 {:.2}%: exported {}", best[0], dir.display());
        Ok(())
    }
}

/// The classifier to fine-tune, from `job`'s checkpoint after unilm's surgery or fresh from
/// `[architecture]`, with `classes`: its config, variables and model.
fn build_classifier(
    job: &FinetuneJob,
    classes: &[String],
    device: &Device,
) -> Result<(BeitConfig, VarMap, BeitForImageClassification)> {
    let cfg = &job.config;
    let t = &cfg.train;
    let (model_cfg, checkpoint) = if let Some(model) = cfg.model.as_deref() {
        let loaded = load_model(model, job.download)?;
        tracing::info!(
            "model: {model} ({} tensors, {:?})",
            loaded.checkpoint.tensors.len(),
            loaded.checkpoint.architecture()
        );
        let weights = cfg.pretrained.then_some(loaded.checkpoint.clone());
        (loaded.checkpoint.config, weights)
    } else {
        let a = &cfg.architecture;
        tracing::info!(
            "model: from scratch ({} layers, width {})",
            a.num_hidden_layers,
            a.hidden_size
        );
        (a.beit_config(), None)
    };
    let model_cfg = finetune_config(&model_cfg, classes, t.drop_path_rate, cfg.aug.input_size);
    model_cfg
        .validate()
        .context("the fine-tuning model configuration")?;
    let (varmap, model, report) = trainable_classifier(
        &model_cfg,
        checkpoint.as_ref(),
        cfg.head_init_scale,
        device,
        t.seed,
    )?;
    if job.resume.is_none() && checkpoint.is_some() {
        log_load_report(&report);
    }
    Ok((model_cfg, varmap, model))
}

/// The input pipelines of a fine-tuning run.
struct Pipelines {
    train: Loader,
    eval: Loader,
    eval_transform: EvalTransform,
    mixup: bool,
}

/// The sharded training loader (micro-batches of `micro` over all processes, mixup/CutMix when
/// enabled) and the evaluation loader of `splits`.
fn pipelines(
    cfg: &FinetuneConfig,
    splits: &beit_data::Splits,
    micro: usize,
    device: &Device,
    world: &World,
) -> Result<Pipelines> {
    let t = &cfg.train;
    let rank_micro = world.rank_micro_batch(micro)?;
    let train_tf = cfg.aug.train_transform()?;
    let eval_tf = cfg.aug.eval_transform()?;
    let loader_cfg = world.shard_loader(LoaderConfig {
        batch_size: rank_micro,
        shuffle: true,
        drop_last: true,
        seed: t.seed,
        num_threads: cfg.data.num_workers,
        prefetch: cfg.data.prefetch.max(1),
        ..LoaderConfig::default()
    });
    let mut train = Loader::new(
        splits.train.clone(),
        Arc::new(train_tf),
        loader_cfg.clone(),
        device.clone(),
    )?;
    let mixup = cfg.aug.mixup(splits.classes.len(), t.label_smoothing);
    if let Some(m) = mixup {
        train = train.with_mixup(m)?;
    }
    world.warn_if_n_dependent(mixup.is_some());
    let eval = Loader::new(
        world.eval_shard(splits.val.clone()),
        Arc::new(eval_tf.clone()),
        LoaderConfig {
            batch_size: t.eval_batch_size.unwrap_or((micro * 3).div_ceil(2)),
            shuffle: false,
            drop_last: false,
            rank: 0,
            world_size: 1,
            ..loader_cfg
        },
        device.clone(),
    )?;
    Ok(Pipelines {
        train,
        eval,
        eval_transform: eval_tf,
        mixup: mixup.is_some(),
    })
}

/// Run (or continue) a fine-tuning job.
pub fn finetune(job: &FinetuneJob) -> Result<FinetuneOutcome> {
    let cfg = &job.config;
    let t = &cfg.train;
    let world = &job.world;
    let device = runner::start(cfg.device, world, &cfg.output, job.resume.is_some())?;
    let micro = t.micro_batch()?;
    world.rank_micro_batch(micro)?;
    let splits = load_splits(&cfg.data)?;
    tracing::info!("data: {}", splits.description);
    let (model_cfg, varmap, model) = build_classifier(job, &splits.classes, &device)?;
    let groups = build_param_groups(
        named_vars(&varmap),
        &t.grouping(model_cfg.num_hidden_layers),
    )?;
    let data = pipelines(cfg, &splits, micro, &device, world)?;
    let batches = crate::distributed::global_batches_per_epoch(splits.train.len(), micro);
    if batches < t.accum_steps {
        bail!(
            "{} training images make {batches} micro-batches of {micro}, fewer than one step of \
             {} (lower train.batch_size)",
            splits.train.len(),
            t.accum_steps
        );
    }
    let spec = RunSpec::new(
        &cfg.output,
        job.resume.as_deref(),
        t,
        batches,
        job.progress,
        world,
    );
    let tl = runner::open_loop(&spec, cfg, varmap.clone(), groups)?;
    tracing::info!(
        "fine-tuning: {} epochs x {} steps of {} images ({} x {}), lr {:.2e}, layer decay {:?}, \
         mixup {}",
        t.epochs,
        tl.config().steps_per_epoch(),
        t.batch_size,
        t.accum_steps,
        micro,
        t.lr,
        t.layer_decay,
        if data.mixup { "on" } else { "off" },
    );
    let mut task = ClassifierTask {
        model,
        model_cfg,
        varmap,
        label_smoothing: t.label_smoothing,
        eval_loader: &data.eval,
        num_classes: splits.classes.len(),
        progress: job.progress,
        processor: processor_for_eval(&data.eval_transform),
        out: cfg.output.clone(),
        world: world.clone(),
    };
    let train = &data.train;
    let precision = t.precision(&device)?;
    tracing::info!("precision: {precision}");
    let done = precision.scope(|| {
        fit_source(
            tl,
            &mut task,
            &mut LoaderEpochs(train),
            &runner::evaluated(t.eval_every, "acc1", job.stop_after),
        )
    })?;
    let skipped_files = train.skipped().len() + data.eval.skipped().len();
    if skipped_files > 0 {
        tracing::warn!("{}", train.summary());
    }
    Ok(FinetuneOutcome {
        skipped_files,
        ..FinetuneOutcome::new(done, splits.description, &cfg.output)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_config;

    #[test]
    fn typed_fields_reject_typos_naming_the_field_and_read_the_old_spellings() {
        let set = |s: &str| parse_config::<FinetuneConfig>(None, &[s.to_string()], &[]);
        for (item, field) in [
            ("aug.train_interpolation=\"bicubc\"", "bicubc"),
            ("aug.normalize=\"imagenett\"", "imagenett"),
            ("aug.remode=\"pixels\"", "pixels"),
            ("aug.eval_resize=\"squish\"", "squish"),
            ("device=\"tpu\"", "tpu"),
        ] {
            let err = format!("{:#}", set(item).unwrap_err());
            assert!(
                err.contains(field) && err.contains("--set"),
                "{item}: {err}"
            );
        }
        let c = set("aug.eval_resize=\"squash\"").unwrap();
        assert_eq!(c.aug.eval_resize, EvalResizeMode::Squash);
        assert_eq!(c.model, None);
        let c = set("model=\"\"").unwrap();
        assert_eq!(
            c.model, None,
            "an empty model is unset, as older recipes wrote it"
        );
        let c = set("device=\"cuda:1\"").unwrap();
        assert_eq!(c.device, DeviceSpec::Cuda(Some(1)));
        let text = toml::to_string(&c).unwrap();
        assert!(text.contains("device = \"cuda:1\""), "{text}");
    }

    #[test]
    fn auto_augment_is_checked_when_read_and_written_back_as_given() {
        let set = |s: &str| parse_config::<FinetuneConfig>(None, &[s.to_string()], &[]);
        let err = format!("{:#}", set("aug.auto_augment=\"rand-x9\"").unwrap_err());
        assert!(
            err.contains("auto_augment") && err.contains("rand-x9"),
            "{err}"
        );
        let c = set("aug.auto_augment=\"none\"").unwrap();
        assert!(c.aug.auto_augment.policy().is_none());
        let c = FinetuneConfig::default();
        assert!(c.aug.auto_augment.policy().is_some());
        let text = toml::to_string(&c).unwrap();
        assert!(
            text.contains("auto_augment = \"rand-m9-mstd0.5-inc1\""),
            "{text}"
        );
    }
}
