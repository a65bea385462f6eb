//! `beit-cli finetune`: fine-tune a BEiT image classifier with the unilm recipe.
//!
//! From a pre-trained (MIM, shared relative bias) or fine-tuned checkpoint, or from scratch
//! (`[architecture]`): layer-wise lr decay, weight-decay groups, warm-up + cosine, mixup/CutMix
//! with label smoothing (soft-target cross-entropy), RandAugment, random erasing, drop path;
//! top-1/top-5 after every epoch; the best model exported in Hugging Face layout; `--resume`
//! continues bit for bit.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use beit_data::{
    Batch, ColorJitter, EpochIter, EraseMode, EvalResize, EvalTransform, Filter, Loader,
    LoaderConfig, Mixup, Normalize, RandAugment, RandomErasing, RandomResizedCrop, TrainTransform,
};
use beit_model::{BeitConfig, ForwardOptions};
use beit_train::{
    build_param_groups, label_smoothing_cross_entropy, named_vars, read_jsonl,
    soft_target_cross_entropy, AdamWConfig, GroupingConfig, StepOutput, TrainConfig, TrainLoop,
};
use clap::Args;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::device::parse_device;
use crate::model_source::load_model;
use crate::training::{
    classifier_logits, evaluate, export_classifier, finetune_config, load_splits, log_load_report,
    prepare_output_dir, print_table, processor_for_eval, trainable_classifier,
    write_resolved_config, CommonArgs, DataConfig, FlagKeys, ResumeArg,
};

/// Fine-tune an image classifier (unilm recipe: layer decay, mixup/CutMix, label smoothing,
/// RandAugment, random erasing, drop path, warm-up + cosine).
///
/// Settings come from `--config FILE.toml` (see `configs/finetune_*.toml`; omitted fields take
/// the paper's base recipe), then `--set key=value` overrides, then the flags below. The run
/// directory gets `config.toml` (resolved settings), `metrics.jsonl`, `curves.png`, rotating
/// `checkpoint-*` directories and `best_model/` (HF layout: config.json with id2label,
/// model.safetensors, preprocessor_config.json), loadable by `beit-cli predict`/`eval` and by
/// `transformers`.
///
/// Example: `beit-cli finetune --config configs/finetune_fashion_mnist.toml --data fashion-mnist
/// --output runs/ft-fmnist`
#[derive(Args, Debug)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub resume: ResumeArg,
    /// Allow downloading a hub checkpoint missing from the local cache.
    #[arg(long)]
    pub download: bool,
    /// Print the resolved configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Stop (with a checkpoint) once this many optimizer steps are done, e.g. to fit a time
    /// limit; continue later with `--resume`.
    #[arg(long, value_name = "STEPS")]
    pub stop_after: Option<u64>,
}

/// A fine-tuning recipe (`configs/finetune_*.toml`). Defaults: the paper's BEiT-base recipe on
/// ImageNet-1k from the pt22k checkpoint (Table 13 / unilm README).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneConfig {
    /// Starting checkpoint: directory or hub id (`--model`). Empty: from scratch with
    /// `[architecture]`.
    pub model: String,
    /// Run directory (`--output`).
    pub output: PathBuf,
    /// Device (`--device`).
    pub device: String,
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
            model: String::new(),
            output: PathBuf::from("runs/finetune"),
            device: "cpu".into(),
            data: DataConfig::default(),
            architecture: Architecture::default(),
            train: TrainSection::default(),
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

/// `[train]`: optimisation (unilm `run_class_finetuning.py` flags in brackets).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Epochs (`--epochs`, 100).
    pub epochs: u64,
    /// Images per optimizer step (1024 = 8 GPUs × 128).
    pub batch_size: usize,
    /// Micro-batches per step (`--update_freq`); the micro-batch is `batch_size / accum_steps`.
    pub accum_steps: u64,
    /// Peak learning rate (`--lr`, 4e-3), absolute (no batch-size scaling).
    pub lr: f64,
    /// Final learning rate (`--min_lr`, 1e-6).
    pub min_lr: f64,
    /// Warm-up epochs (`--warmup_epochs`, 20).
    pub warmup_epochs: u64,
    /// Warm-up steps, overriding the epochs when `warmup_epochs > 0` (`--warmup_steps`).
    pub warmup_steps: Option<u64>,
    /// Weight decay (`--weight_decay`, 0.05).
    pub weight_decay: f64,
    /// Final weight decay of a cosine decay schedule (`--weight_decay_end`; none = constant).
    pub weight_decay_end: Option<f64>,
    /// Layer-wise lr decay (`--layer_decay`, 0.65 base).
    pub layer_decay: f64,
    /// Global gradient-norm clipping (`--clip_grad`, none).
    pub clip_grad: Option<f64>,
    /// Stochastic depth rate (`--drop_path`, 0.1).
    pub drop_path: f64,
    /// AdamW beta1.
    pub beta1: f64,
    /// AdamW beta2.
    pub beta2: f64,
    /// AdamW epsilon (`--opt_eps`, 1e-8).
    pub eps: f64,
    /// Seed (`--seed`).
    pub seed: u64,
    /// Evaluation batch size (default 1.5 × the micro-batch, as unilm).
    pub eval_batch_size: Option<usize>,
    /// Log every this many steps.
    pub log_every: u64,
    /// Also checkpoint every this many steps (every epoch always).
    pub checkpoint_every: Option<u64>,
    /// Step checkpoints kept.
    pub keep_last: usize,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            epochs: 100,
            batch_size: 1024,
            accum_steps: 1,
            lr: 4e-3,
            min_lr: 1e-6,
            warmup_epochs: 20,
            warmup_steps: None,
            weight_decay: 0.05,
            weight_decay_end: None,
            layer_decay: 0.65,
            clip_grad: None,
            drop_path: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            seed: 0,
            eval_batch_size: None,
            log_every: 10,
            checkpoint_every: None,
            keep_last: 2,
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
    pub train_interpolation: String,
    /// Horizontal flip probability (0.5).
    pub hflip: f64,
    /// Colour jitter strength, used only without RandAugment (`--color_jitter`, 0.4).
    pub color_jitter: f32,
    /// RandAugment policy (`--aa`, `rand-m9-mstd0.5-inc1`); `none` disables it.
    pub auto_augment: String,
    /// Random erasing probability (`--reprob`, 0.25).
    pub reprob: f64,
    /// Random erasing fill: `pixel`, `rand` or `const` (`--remode`).
    pub remode: String,
    /// Mixup alpha (`--mixup`, 0.8); 0 disables.
    pub mixup: f64,
    /// CutMix alpha (`--cutmix`, 1.0); 0 disables.
    pub cutmix: f64,
    /// Probability of mixing a batch (`--mixup_prob`, 1.0).
    pub mixup_prob: f64,
    /// Probability of CutMix rather than mixup (`--mixup_switch_prob`, 0.5).
    pub mixup_switch_prob: f64,
    /// Label smoothing (`--smoothing`, 0.1).
    pub smoothing: f64,
    /// Normalisation: `half` (mean = std = 0.5, the released checkpoints) or `imagenet`.
    pub normalize: String,
    /// Evaluation: `crop` (shorter side to size/crop_pct, centre crop, as unilm) or `squash`
    /// (resize to size × size, as the published HF processors).
    pub eval_resize: String,
    /// Crop fraction of `crop` evaluation (0.875 at 224, as unilm).
    pub eval_crop_pct: f64,
    /// Evaluation resampling filter (bicubic).
    pub eval_interpolation: String,
}

impl Default for AugSection {
    fn default() -> Self {
        Self {
            input_size: 224,
            crop_scale_min: 0.08,
            train_interpolation: "bicubic".into(),
            hflip: 0.5,
            color_jitter: 0.4,
            auto_augment: "rand-m9-mstd0.5-inc1".into(),
            reprob: 0.25,
            remode: "pixel".into(),
            mixup: 0.8,
            cutmix: 1.0,
            mixup_prob: 1.0,
            mixup_switch_prob: 0.5,
            smoothing: 0.1,
            normalize: "half".into(),
            eval_resize: "crop".into(),
            eval_crop_pct: 0.875,
            eval_interpolation: "bicubic".into(),
        }
    }
}

impl AugSection {
    fn normalize(&self) -> Result<Normalize> {
        Normalize::preset(&self.normalize).context("aug.normalize")
    }

    /// The training transform.
    pub fn train_transform(&self) -> Result<TrainTransform> {
        let mut crop = RandomResizedCrop::new(self.input_size as u32);
        crop.scale = (self.crop_scale_min, 1.0);
        crop.interpolation =
            Filter::parse(&self.train_interpolation).context("aug.train_interpolation")?;
        let rand_augment = match self.auto_augment.trim() {
            "" | "none" => None,
            spec => Some(RandAugment::parse(spec).context("aug.auto_augment")?),
        };
        let mode = match self.remode.as_str() {
            "pixel" => EraseMode::Pixel,
            "rand" => EraseMode::Rand,
            "const" => EraseMode::Const,
            other => bail!("aug.remode: `{other}` is not pixel, rand or const"),
        };
        let t = TrainTransform {
            crop,
            hflip: self.hflip,
            color_jitter: (self.color_jitter > 0.0)
                .then(|| ColorJitter::uniform(self.color_jitter)),
            rand_augment,
            normalize: self.normalize()?,
            random_erasing: (self.reprob > 0.0).then(|| RandomErasing {
                probability: self.reprob,
                mode,
                ..RandomErasing::default()
            }),
        };
        t.validate().context("[aug]")?;
        Ok(t)
    }

    /// The evaluation transform.
    pub fn eval_transform(&self) -> Result<EvalTransform> {
        let resize = match self.eval_resize.as_str() {
            "crop" => EvalResize::ShorterSideCrop {
                crop_pct: self.eval_crop_pct,
            },
            "squash" => EvalResize::Squash,
            other => bail!("aug.eval_resize: `{other}` is not crop or squash"),
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
            interpolation: Filter::parse(&self.eval_interpolation)
                .context("aug.eval_interpolation")?,
            normalize: self.normalize()?,
        })
    }

    /// Mixup/CutMix, when either is enabled.
    pub fn mixup(&self, num_classes: usize) -> Option<Mixup> {
        (self.mixup > 0.0 || self.cutmix > 0.0).then_some(Mixup {
            mixup_alpha: self.mixup,
            cutmix_alpha: self.cutmix,
            prob: self.mixup_prob,
            switch_prob: self.mixup_switch_prob,
            label_smoothing: self.smoothing,
            num_classes,
        })
    }
}

/// Yields exactly the configured number of batches of an epoch. A skipped (corrupt) file can
/// leave the loader short of full batches; the stream then tops up from a supplementary,
/// deterministic pass so that the schedule and resume positions stay exact.
struct EpochStream<'a> {
    loader: &'a Loader,
    epoch: u64,
    iter: EpochIter,
    extra: u64,
}

impl<'a> EpochStream<'a> {
    fn new(loader: &'a Loader, epoch: u64) -> Result<Self> {
        Ok(Self {
            loader,
            epoch,
            iter: loader.epoch(epoch)?,
            extra: 0,
        })
    }

    fn next_batch(&mut self) -> Result<Batch> {
        loop {
            if let Some(b) = self.iter.next() {
                return Ok(b?);
            }
            self.extra += 1;
            if self.extra > 3 {
                bail!(
                    "epoch {}: the data ran out ({})",
                    self.epoch,
                    self.loader.summary()
                );
            }
            tracing::warn!(
                "epoch {}: fewer full batches than planned (unreadable files); topping up",
                self.epoch
            );
            self.iter = self.loader.epoch(self.epoch + (self.extra << 40))?;
        }
    }
}

/// Where a run stands on its best model.
#[derive(Debug, Serialize, Deserialize)]
struct BestRecord {
    acc1: f64,
    acc5: f64,
    epoch: u64,
    step: u64,
}

/// Run the command.
pub fn run(args: FinetuneArgs) -> Result<()> {
    let cfg: FinetuneConfig = args.common.resolve(&FlagKeys::STANDARD)?;
    if args.print_config {
        print!("{}", toml::to_string_pretty(&cfg)?);
        return Ok(());
    }
    let device = parse_device(&cfg.device)?;
    let out = cfg.output.clone();
    let resume_from = args.resume.checkpoint(&out);
    prepare_output_dir(&out, resume_from.is_some())?;

    let t = &cfg.train;
    if t.accum_steps == 0
        || t.batch_size == 0
        || !t.batch_size.is_multiple_of(t.accum_steps as usize)
    {
        bail!(
            "train.batch_size ({}) must be a positive multiple of train.accum_steps ({})",
            t.batch_size,
            t.accum_steps
        );
    }
    let micro = t.batch_size / t.accum_steps as usize;

    let splits = load_splits(&cfg.data)?;
    tracing::info!("data: {}", splits.description);
    let classes = splits.classes.clone();

    // Model: a checkpoint after unilm's surgery, or a fresh one.
    let (model_cfg, checkpoint) = if cfg.model.trim().is_empty() {
        let a = &cfg.architecture;
        let mut c = BeitConfig {
            hidden_size: a.hidden_size,
            num_hidden_layers: a.num_hidden_layers,
            num_attention_heads: a.num_attention_heads,
            intermediate_size: a.intermediate_size,
            patch_size: a.patch_size,
            layer_scale_init_value: a.layer_scale_init_value,
            layer_norm_eps: a.layer_norm_eps,
            use_relative_position_bias: true,
            use_mean_pooling: true,
            ..BeitConfig::default()
        };
        c = finetune_config(&c, &classes, t.drop_path, cfg.aug.input_size);
        tracing::info!(
            "model: from scratch ({} layers, width {})",
            a.num_hidden_layers,
            a.hidden_size
        );
        (c, None)
    } else {
        let loaded = load_model(&cfg.model, args.download)?;
        let c = finetune_config(
            &loaded.checkpoint.config,
            &classes,
            t.drop_path,
            cfg.aug.input_size,
        );
        tracing::info!(
            "model: {} ({} tensors, {:?})",
            cfg.model,
            loaded.checkpoint.tensors.len(),
            loaded.checkpoint.architecture()
        );
        (c, Some(loaded.checkpoint))
    };
    model_cfg
        .validate()
        .context("the fine-tuning model configuration")?;
    let (varmap, model, report) =
        trainable_classifier(&model_cfg, checkpoint.as_ref(), &device, t.seed)?;
    drop(checkpoint);
    if resume_from.is_none() && !cfg.model.trim().is_empty() {
        log_load_report(&report);
    }
    let groups = build_param_groups(
        named_vars(&varmap),
        &GroupingConfig::finetune(model_cfg.num_hidden_layers, t.layer_decay),
    )?;

    // Data pipelines.
    let train_tf = cfg.aug.train_transform()?;
    let eval_tf = cfg.aug.eval_transform()?;
    let processor = processor_for_eval(&eval_tf);
    let loader_cfg = LoaderConfig {
        batch_size: micro,
        shuffle: true,
        drop_last: true,
        seed: t.seed,
        num_threads: cfg.data.num_workers,
        prefetch: cfg.data.prefetch.max(1),
        ..LoaderConfig::default()
    };
    let mut train_loader = Loader::new(
        splits.train.clone(),
        Arc::new(train_tf),
        loader_cfg.clone(),
        device.clone(),
    )?;
    let mixup = cfg.aug.mixup(classes.len());
    if let Some(m) = mixup {
        train_loader = train_loader.with_mixup(m)?;
    }
    let eval_loader = Loader::new(
        splits.val.clone(),
        Arc::new(eval_tf),
        LoaderConfig {
            batch_size: t.eval_batch_size.unwrap_or((micro * 3).div_ceil(2)),
            shuffle: false,
            drop_last: false,
            ..loader_cfg
        },
        device.clone(),
    )?;
    let batches = train_loader.batches_per_epoch() as u64;
    if batches < t.accum_steps {
        bail!(
            "{} training images make {batches} micro-batches of {micro}, fewer than one step of \
             {} (lower train.batch_size)",
            splits.train.len(),
            t.accum_steps
        );
    }

    let train_cfg = TrainConfig {
        epochs: t.epochs,
        batches_per_epoch: batches,
        accum_steps: t.accum_steps,
        lr: t.lr,
        min_lr: t.min_lr,
        warmup_epochs: t.warmup_epochs,
        warmup_steps: t.warmup_steps,
        weight_decay: t.weight_decay,
        weight_decay_end: t.weight_decay_end,
        clip_grad: t.clip_grad,
        adamw: AdamWConfig {
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
        },
        seed: t.seed,
        log_every: t.log_every.max(1),
        checkpoint_every: t.checkpoint_every,
        checkpoint_each_epoch: true,
        keep_last: t.keep_last.max(1),
        show_progress: true,
    };
    let run_config = serde_json::to_value(&cfg)?;
    write_resolved_config(&out, &cfg)?;
    let mut tl = match &resume_from {
        Some(ck) => TrainLoop::resume(train_cfg, varmap.clone(), groups, &out, ck, run_config)
            .with_context(|| format!("resuming from {}", ck.display()))?,
        None => TrainLoop::new(train_cfg, varmap.clone(), groups, &out, run_config)?,
    };
    tracing::info!(
        "fine-tuning: {} epochs x {} steps of {} images ({} x {}), lr {:.2e}, layer decay {}, \
         mixup {}",
        t.epochs,
        tl.config().steps_per_epoch(),
        t.batch_size,
        t.accum_steps,
        micro,
        t.lr,
        t.layer_decay,
        if mixup.is_some() { "on" } else { "off" },
    );

    let best_dir = out.join("best_model");
    let best_file = out.join("best.json");
    // The best accuracy so far: the eval records of the (possibly resumed) log.
    let mut best: Option<BestRecord> = None;
    let mut evaluated_at = None;
    if resume_from.is_some() {
        for r in read_jsonl(tl.metrics_path())? {
            if r.get("kind").and_then(|v| v.as_str()) != Some("eval") {
                continue;
            }
            let get = |k: &str| r.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
            let step = r.get("step").and_then(|v| v.as_u64()).unwrap_or(0);
            evaluated_at = Some(step);
            if best.as_ref().is_none_or(|b| get("acc1") > b.acc1) {
                best = Some(BestRecord {
                    acc1: get("acc1"),
                    acc5: get("acc5"),
                    epoch: r.get("epoch").and_then(|v| v.as_u64()).unwrap_or(0),
                    step,
                });
            }
        }
    }
    let show_eval_progress = true;
    let eval_and_keep = |tl: &mut TrainLoop, best: &mut Option<BestRecord>| -> Result<()> {
        let m = evaluate(&eval_loader, classes.len(), show_eval_progress, |x| {
            classifier_logits(&model, x)
        })?;
        tl.record_eval(
            &[("acc1", m.acc1), ("acc5", m.acc5), ("loss", m.loss)],
            None,
        )?;
        let epoch = tl.state().epoch.saturating_sub(1);
        let step = tl.state().step;
        tl.progress().println(format!(
            "epoch {epoch}: val acc1 {:.2}% acc5 {:.2}% loss {:.4} ({} images)",
            m.acc1, m.acc5, m.loss, m.images
        ));
        if best.as_ref().is_none_or(|b| m.acc1 > b.acc1) {
            export_classifier(&best_dir, &model_cfg, tl.varmap(), &processor)?;
            let rec = BestRecord {
                acc1: m.acc1,
                acc5: m.acc5,
                epoch,
                step,
            };
            std::fs::write(&best_file, serde_json::to_string_pretty(&rec)?)
                .with_context(|| format!("cannot write {}", best_file.display()))?;
            tracing::info!(
                "new best acc1 {:.2}%: exported {}",
                m.acc1,
                best_dir.display()
            );
            *best = Some(rec);
        }
        Ok(())
    };

    // Resumed at an epoch boundary whose evaluation never ran (interrupted during it).
    let pos = tl.position();
    if pos.step > 0 && pos.batch_in_epoch == 0 && evaluated_at != Some(pos.step) {
        eval_and_keep(&mut tl, &mut best)?;
    }

    let smoothing = cfg.aug.smoothing;
    let forward = |batch: &Batch, rng: &mut beit_train::TrainRng| -> Result<StepOutput> {
        model.backbone().rng().reseed(rng.next_u64());
        let logits = model
            .forward(&batch.images, ForwardOptions::train())?
            .logits;
        let loss = match (&batch.soft_targets, &batch.labels) {
            (Some(soft), _) => soft_target_cross_entropy(&logits, soft)?,
            (None, Some(labels)) => label_smoothing_cross_entropy(&logits, labels, smoothing)?,
            (None, None) => bail!("the training data has no labels"),
        };
        Ok(StepOutput {
            loss,
            batch_size: batch.len(),
            metrics: vec![],
        })
    };
    let mut stopped = false;
    'epochs: while !tl.is_done() {
        let epoch = tl.position().epoch;
        let mut stream = EpochStream::new(&train_loader, epoch)?;
        for _ in 0..tl.position().batch_in_epoch {
            stream.next_batch()?; // resume mid-epoch: the same batches, discarded
        }
        while !tl.is_done() && tl.position().epoch == epoch {
            let pos = tl.position();
            if args.stop_after.is_some_and(|n| pos.step >= n)
                && pos.batch_in_epoch % t.accum_steps == 0
            {
                stopped = true;
                break 'epochs;
            }
            let batch = stream.next_batch()?;
            let out = forward(&batch, tl.rng())?;
            tl.micro_step(out)?;
        }
        if tl.position().batch_in_epoch == 0 {
            eval_and_keep(&mut tl, &mut best)?;
        }
    }
    let summary = tl.finish()?;
    let skipped = train_loader.skipped().len() + eval_loader.skipped().len();

    let mut rows = vec![
        ("steps".to_string(), summary.steps.to_string()),
        ("data".to_string(), splits.description.clone()),
    ];
    if let Some(b) = &best {
        rows.push((
            "best val acc1 / acc5".into(),
            format!(
                "{:.2}% / {:.2}% (epoch {}, step {})",
                b.acc1, b.acc5, b.epoch, b.step
            ),
        ));
        rows.push(("best model".into(), best_dir.display().to_string()));
    }
    rows.push(("metrics".into(), summary.metrics.display().to_string()));
    if let Some(p) = &summary.plot {
        rows.push(("curves".into(), p.display().to_string()));
    }
    rows.push((
        "last checkpoint".into(),
        summary.checkpoint.display().to_string(),
    ));
    rows.push(("skipped files".into(), skipped.to_string()));
    if stopped {
        rows.insert(
            0,
            (
                "stopped".into(),
                format!(
                    "after step {} (--stop-after); continue with --resume",
                    summary.steps
                ),
            ),
        );
    }
    print_table(
        if stopped {
            "fine-tuning stopped"
        } else {
            "fine-tuning done"
        },
        &rows,
    );
    if skipped > 0 {
        tracing::warn!("{}", train_loader.summary());
    }
    Ok(())
}
