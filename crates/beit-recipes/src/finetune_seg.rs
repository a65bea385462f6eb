//! Fine-tuning `BeitForSemanticSegmentation` (UperNet + auxiliary FCN head) with unilm's ADE20K
//! recipe, on the one engine ([`beit_train::fit`]).
//!
//! Defaults are unilm's `upernet_beit_base_12_640_slide_160k_ade20k` recipe: AdamW lr 3e-5,
//! weight decay 0.05, layer decay 0.9, mmcv's poly schedule (power 1.0, min lr 0) after 1,500
//! linear warm-up iterations, 160k iterations of 16 images (an "epoch" here is `data.iters_per_epoch`
//! = 16,000 iterations drawn from an endless reshuffled stream, as mmseg's iteration-based runner;
//! evaluation every epoch, i.e. every 16k iterations as unilm), crops of 640, auxiliary loss
//! weight 0.4, ignore index 255, `reduce_zero_label` for ADE20K, drop path 0.1; mmseg's training
//! pipeline ([`beit_data::seg_augment`]) and sliding-window evaluation (crop 640, stride 426).
//!
//! One micro-batch: augmented crops and label maps -> [`BeitForSemanticSegmentation::forward`]
//! in training mode (drop path seeded from the run's generator, BatchNorm on batch statistics
//! with its running averages updated) -> [`BeitForSemanticSegmentation::loss`] -> the engine's
//! step. BatchNorm running statistics are buffers: never in the optimizer, always in the
//! checkpoints and exports. The best model by mIoU is exported in Hugging Face layout
//! (`best_model/`, with `best.json`), the last one in `final_model/` when the run completes.
//!
//! Under `mpirun` each rank reads its share of every global micro-batch (positions `r, r + N,
//! ...`, the same samples and augmentations as one process), the ranks' losses are weighted by
//! their labelled pixels, validation is sharded and its counts summed, and rank 0 writes. The
//! BatchNorms of the neck and heads are synchronised (mmseg's `SyncBN`,
//! `segmentation.sync_batch_norm`): their batch statistics are summed over the ranks
//! (`beit_model::segmentation::sync_bn`), so the losses are one process's within float rounding;
//! every rank then takes rank 0's running statistics (as PyTorch's DDP broadcasts buffers), so
//! that the ranks stay bitwise identical whatever the transport's summation order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use beit_data::seg_augment::SegTrainTransform;
use beit_data::segmentation::IGNORE_INDEX;
use beit_data::{Filter, ImageProcessor, TargetSize};
use beit_model::load::LoadReport;
use beit_model::segmentation::{
    is_buffer, save_segmentation_hf, segmentation_model_in_varmap, BeitForSemanticSegmentation,
    SegmentationConfig,
};
use beit_model::{BeitConfig, ForwardOptions};
use beit_train::distributed::CollectiveBatchStats;
use beit_train::{
    build_param_groups, fit, named_vars, Position, ScheduleKind, StepContext, StepOutput, TrainRng,
    TrainTask,
};
use candle::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::classifier::{log_load_report, trainable_classifier};
use crate::config::{NormalizePreset, TrainSection};
use crate::device::DeviceSpec;
use crate::distributed::World;
use crate::finetune::Architecture;
use crate::model_source::load_model;
use crate::runner::{self, FinetuneOutcome, RunSpec};
pub use crate::seg_data::SegDataSection;
use crate::seg_data::{load_data, train_loader, Pairs, SegBatch};
use crate::seg_eval::{score_pairs, SegPredictor};
use crate::segment::Inference;

/// A segmentation fine-tuning recipe (`configs/finetune_seg_*.toml`). Defaults: unilm's
/// BEiT-base ADE20K recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneSegConfig {
    /// Starting checkpoint: a directory or hub id (`--model`), classification, MIM or
    /// segmentation. Unset (the default): from scratch with `[architecture]`.
    #[serde(deserialize_with = "crate::config::non_empty")]
    pub model: Option<String>,
    /// Load the checkpoint's weights (true); false keeps only its architecture, freshly
    /// initialised (a from-scratch baseline of the same shape).
    pub pretrained: bool,
    /// Run directory (`--output`).
    pub output: PathBuf,
    /// Device (`--device`).
    pub device: DeviceSpec,
    /// Dataset.
    pub data: SegDataSection,
    /// Backbone shape when training from scratch (ignored with a checkpoint).
    pub architecture: Architecture,
    /// Neck and heads.
    pub segmentation: SegHeadSection,
    /// Optimisation (the schema's one `[train]` table).
    pub train: TrainSection,
    /// mmseg's training pipeline and the evaluation's sliding window.
    pub aug: SegAugSection,
}

impl Default for FinetuneSegConfig {
    fn default() -> Self {
        Self {
            model: None,
            pretrained: true,
            output: PathBuf::from("runs/finetune-seg"),
            device: DeviceSpec::Cpu,
            data: SegDataSection::default(),
            architecture: Architecture::default(),
            segmentation: SegHeadSection::default(),
            train: TrainSection {
                // 10 x 16,000 = 160k iterations of 16 images (8 GPUs x 2).
                epochs: 10,
                batch_size: 16,
                accum_steps: 1,
                lr: 3e-5,
                min_lr: 0.0,
                schedule: ScheduleKind::Poly,
                poly_power: 1.0,
                warmup_epochs: 1,
                warmup_steps: Some(1500),
                weight_decay: 0.05,
                weight_decay_end: None,
                layer_decay: Some(0.9),
                clip_grad: None,
                drop_path_rate: 0.1,
                label_smoothing: 0.0,
                eval_batch_size: Some(1),
                log_every: 50,
                ..TrainSection::default()
            },
            aug: SegAugSection::default(),
        }
    }
}

/// `[segmentation]`: the neck and heads (`transformers`' `BeitConfig` fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegHeadSection {
    /// Hidden states feeding the neck, `transformers`' indexing (`hidden_states[k - 1]`). Unset:
    /// the checkpoint's, else `[3, 5, 7, 11]` for 12 blocks, `[7, 11, 15, 23]` for 24, and
    /// `ceil(i·L/4)` for `i = 1..4` otherwise.
    pub out_indices: Option<Vec<usize>>,
    /// Pyramid pooling sizes (`[1, 2, 3, 6]`).
    pub pool_scales: Vec<usize>,
    /// Train the FCN auxiliary head too (true).
    pub use_auxiliary_head: bool,
    /// Weight of the auxiliary loss (0.4).
    pub auxiliary_loss_weight: f64,
    /// Width of the auxiliary head (256).
    pub auxiliary_channels: usize,
    /// 3x3 conv blocks of the auxiliary head (1).
    pub auxiliary_num_convs: usize,
    /// `conv_cat` in the auxiliary head (false).
    pub auxiliary_concat_input: bool,
    /// Label ignored by the loss and the metric (255).
    pub ignore_index: u8,
    /// Under `mpirun`, compute the BatchNorm training statistics over every process's samples
    /// (mmseg's `SyncBN`: the run is one process's with the global batch); false normalises with
    /// each process's share. No effect on a single process (true).
    pub sync_batch_norm: bool,
}

impl Default for SegHeadSection {
    fn default() -> Self {
        let s = SegmentationConfig::default();
        Self {
            out_indices: None,
            pool_scales: s.pool_scales,
            use_auxiliary_head: s.use_auxiliary_head,
            auxiliary_loss_weight: s.auxiliary_loss_weight,
            auxiliary_channels: s.auxiliary_channels,
            auxiliary_num_convs: s.auxiliary_num_convs,
            auxiliary_concat_input: s.auxiliary_concat_input,
            ignore_index: IGNORE_INDEX,
            sync_batch_norm: true,
        }
    }
}

/// `[aug]`: mmseg's training pipeline and the evaluation window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegAugSection {
    /// Training crop side = the model's input size (640).
    pub crop_size: usize,
    /// `img_scale` `[long, short]` of the random rescale ([2560, 640]).
    pub scale: [u32; 2],
    /// Ratio range of the random rescale ([0.5, 2.0]).
    pub ratio_range: [f64; 2],
    /// Largest share of one class in a crop (0.75; 1.0 disables).
    pub cat_max_ratio: f64,
    /// Horizontal flip probability (0.5).
    pub hflip: f64,
    /// mmseg's `PhotoMetricDistortion` (true).
    pub photometric: bool,
    /// Image resampling filter of the rescale (bilinear); labels always use nearest.
    pub interpolation: Filter,
    /// `half` (mean = std = 0.5: unilm's 127.5 and the published processors) or `imagenet`.
    pub normalize: NormalizePreset,
    /// Stride of the sliding-window evaluation (426 at crop 640); unset: the crop size.
    pub eval_stride: Option<usize>,
}

impl Default for SegAugSection {
    fn default() -> Self {
        Self {
            crop_size: 640,
            scale: [2560, 640],
            ratio_range: [0.5, 2.0],
            cat_max_ratio: 0.75,
            hflip: 0.5,
            photometric: true,
            interpolation: Filter::Bilinear,
            normalize: NormalizePreset::Half,
            eval_stride: Some(426),
        }
    }
}

impl SegAugSection {
    /// The training transform.
    pub fn train_transform(&self) -> Result<SegTrainTransform> {
        let t = SegTrainTransform {
            crop_size: self.crop_size as u32,
            scale: (self.scale[0], self.scale[1]),
            ratio_range: (self.ratio_range[0], self.ratio_range[1]),
            cat_max_ratio: self.cat_max_ratio,
            hflip: self.hflip,
            photometric: self.photometric,
            interpolation: self.interpolation,
            normalize: self.normalize.normalize(),
        };
        t.validate().context("[aug]")?;
        Ok(t)
    }

    /// The processor of the exported model and of the evaluation (rescale, normalise; resize
    /// to the crop size for whole-image inference).
    pub fn processor(&self) -> Result<ImageProcessor> {
        let n = self.normalize.normalize();
        let s = self.crop_size as u32;
        Ok(ImageProcessor {
            do_resize: true,
            size: TargetSize::Exact(s, s),
            resample: self.interpolation,
            do_center_crop: false,
            crop_size: (s, s),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: n.mean,
            image_std: n.std,
        })
    }
}

/// A segmentation fine-tuning run: the fine-tuning job over the segmentation recipe.
pub type FinetuneSegJob = crate::finetune::FinetuneJob<FinetuneSegConfig>;

/// What a segmentation fine-tuning run produced (`last_eval`/`best_eval`: `mIoU`, `mAcc`,
/// `aAcc` in percent; `final_model` once the run completes).
pub type FinetuneSegOutcome = FinetuneOutcome;

/// `out_indices` for a backbone of `l` blocks when the recipe and the checkpoint give none.
fn default_out_indices(l: usize) -> Vec<usize> {
    match l {
        12 => vec![3, 5, 7, 11],
        24 => vec![7, 11, 15, 23],
        _ => (1..=4).map(|i| (i * l).div_ceil(4).max(1)).collect(),
    }
}

/// The model's config: the checkpoint's (or `[architecture]`'s) backbone with per-layer
/// relative position bias, the crop size, the recipe's drop path, the classes and the heads.
fn segmentation_config(
    cfg: &FinetuneSegConfig,
    source: Option<&BeitConfig>,
    classes: &[String],
) -> Result<(BeitConfig, SegmentationConfig)> {
    let mut c = source
        .cloned()
        .unwrap_or_else(|| cfg.architecture.beit_config());
    // The checkpoint's own `out_indices` (any of its spellings), when it has them.
    let from_checkpoint = source
        .filter(|s| {
            [
                "out_indices",
                "semantic_out_indices",
                "segmentation_indices",
            ]
            .iter()
            .any(|k| s.extra.contains_key(*k))
        })
        .and_then(|s| SegmentationConfig::from_config(s).ok());
    c.use_shared_relative_position_bias = false;
    c.use_relative_position_bias = true;
    c.use_mask_token = false;
    c.use_mean_pooling = true;
    c.drop_path_rate = cfg.train.drop_path_rate;
    c.image_size = cfg.aug.crop_size;
    c.set_labels(classes);
    let h = &cfg.segmentation;
    let seg = SegmentationConfig {
        out_indices: h
            .out_indices
            .clone()
            .or_else(|| from_checkpoint.map(|s| s.out_indices))
            .unwrap_or_else(|| default_out_indices(c.num_hidden_layers)),
        pool_scales: h.pool_scales.clone(),
        use_auxiliary_head: h.use_auxiliary_head,
        auxiliary_loss_weight: h.auxiliary_loss_weight,
        auxiliary_channels: h.auxiliary_channels,
        auxiliary_num_convs: h.auxiliary_num_convs,
        auxiliary_concat_input: h.auxiliary_concat_input,
        semantic_loss_ignore_index: h.ignore_index as i64,
    };
    seg.validate(&c).context("[segmentation]")?;
    seg.store(&mut c);
    if !cfg.aug.crop_size.is_multiple_of(c.patch_size) || cfg.aug.crop_size == 0 {
        bail!(
            "aug.crop_size {} must be a positive multiple of the patch size {}",
            cfg.aug.crop_size,
            c.patch_size
        );
    }
    c.validate()
        .context("the segmentation model configuration")?;
    Ok((c, seg))
}

/// Build the trainable model: the checkpoint's weights after unilm's surgery, or a backbone
/// freshly initialised as the classifier fine-tuning does from scratch (transformers' init); the
/// heads get `transformers`' init (convolutions normal(0, `initializer_range`) drawn from the
/// run's seed, BatchNorm 1/0, running statistics 0/1).
fn build_model(
    model_cfg: &BeitConfig,
    weights: Option<std::collections::HashMap<String, Tensor>>,
    device: &Device,
    seed: u64,
) -> Result<(VarMap, BeitForSemanticSegmentation, LoadReport)> {
    let tensors = match weights {
        Some(t) => t,
        None => {
            let (vm, _, _) = trainable_classifier(model_cfg, None, 1.0, device, seed)?;
            beit_model::save::varmap_tensors(&vm)
                .into_iter()
                .filter(|(k, _)| k.starts_with("beit.") && !k.starts_with("beit.pooler."))
                .collect()
        }
    };
    let varmap = VarMap::new();
    let (model, report) = segmentation_model_in_varmap(model_cfg, tensors, &varmap, device)
        .context("building the segmentation model")?;
    let mut rng = TrainRng::derive(seed, &[0x0073_6567_6865_6164]);
    let std = model_cfg.initializer_range;
    for (name, var) in named_vars(&varmap) {
        if report.missing.contains(&name) && !name.starts_with("beit.") && var.dims().len() >= 2 {
            var.set(&(rng.normal_tensor(var.shape().clone(), device)? * std)?)?;
        }
    }
    Ok((varmap, model, report))
}

/// The segmentation task: the model, its loss, its validation and its export.
struct SegTask<'a> {
    model: BeitForSemanticSegmentation,
    model_cfg: BeitConfig,
    seg: SegmentationConfig,
    varmap: VarMap,
    val: &'a Pairs,
    processor: ImageProcessor,
    inference: Inference,
    reduce_zero_label: bool,
    device: Device,
    out: PathBuf,
    world: World,
}

impl SegTask<'_> {
    /// Once the run is `finished`, rank 0 exports the last model to `final_model/`.
    fn export_final(&self, finished: bool) -> Result<Option<PathBuf>> {
        if !(finished && self.world.is_primary()) {
            return Ok(None);
        }
        let dir = self.out.join("final_model");
        self.export(&dir)?;
        Ok(Some(dir))
    }

    fn export(&self, dir: &Path) -> Result<()> {
        save_segmentation_hf(
            dir,
            &self.model_cfg,
            &self.seg,
            &beit_model::save::varmap_tensors(&self.varmap),
        )
        .with_context(|| format!("exporting the model to {}", dir.display()))?;
        let mut json = self.processor.to_json();
        if let Some(o) = json.as_object_mut() {
            o.insert("do_reduce_labels".into(), self.reduce_zero_label.into());
        }
        let path = dir.join("preprocessor_config.json");
        std::fs::write(&path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }
}

impl TrainTask for SegTask<'_> {
    type Batch = SegBatch;
    type Error = anyhow::Error;

    fn train_step(&mut self, batch: SegBatch, ctx: &mut StepContext<'_>) -> Result<StepOutput> {
        ctx.reseed_stochastic(self.model.backbone().rng(), batch.pixels.dim(0)?);
        let out = self.model.forward(&batch.pixels, ForwardOptions::train())?;
        // The forward pass moved the BatchNorm running statistics (by the global batch's
        // statistics when synchronised, else by this rank's): every rank takes rank 0's
        // (PyTorch DDP's buffer broadcast), so the ranks stay bitwise identical.
        beit_train::distributed::broadcast_vars_where(&*self.world, &self.varmap, is_buffer)?;
        let loss = self.model.loss(&out, &batch.labels)?;
        // Both losses are means over the labelled pixels: ranks are weighted by their count.
        ctx.loss_weight = Some(batch.labelled_pixels as f64);
        Ok(StepOutput {
            loss,
            batch_size: batch.len,
            metrics: vec![],
        })
    }

    fn evaluate(&mut self) -> Result<Vec<(String, f64)>> {
        // Data-parallel: rank r evaluates pairs r, r + N, ...; the counts are summed.
        let world = &self.world;
        let mine: Vec<usize> = (world.rank()..self.val.len())
            .step_by(world.size())
            .collect();
        let predictor = SegPredictor {
            model: &self.model,
            processor: &self.processor,
            inference: self.inference,
            device: &self.device,
        };
        let mut metrics = score_pairs(
            &predictor,
            &mine,
            |i| self.val.load(i),
            |i| format!("validation pair {i}"),
            None,
        )?;
        metrics.all_reduce(&**world)?;
        let s = metrics.scores();
        tracing::info!(
            "validation: mIoU {:.2} mAcc {:.2} aAcc {:.2} ({} images)",
            100.0 * s.miou,
            100.0 * s.macc,
            100.0 * s.aacc,
            self.val.len()
        );
        Ok(vec![
            ("mIoU".into(), 100.0 * s.miou),
            ("mAcc".into(), 100.0 * s.macc),
            ("aAcc".into(), 100.0 * s.aacc),
        ])
    }

    fn on_best(&mut self, metrics: &BTreeMap<String, f64>, at: Position) -> Result<()> {
        let dir = self.out.join("best_model");
        self.export(&dir)?;
        let best = runner::write_best(&self.out, metrics, &["mIoU", "mAcc", "aAcc"], at)?;
        tracing::info!("new best mIoU {:.2}: exported {}", best[0], dir.display());
        Ok(())
    }
}

/// The starting checkpoint of `job`, if any: its config, and its weights when `pretrained`.
type Source = (
    Option<BeitConfig>,
    Option<std::collections::HashMap<String, Tensor>>,
);

fn load_source(job: &FinetuneSegJob) -> Result<Source> {
    let cfg = &job.config;
    let Some(model) = cfg.model.as_deref() else {
        return Ok((None, None));
    };
    let loaded = load_model(model, job.download)?;
    tracing::info!(
        "model: {model} ({} tensors, {:?})",
        loaded.checkpoint.tensors.len(),
        loaded.checkpoint.architecture()
    );
    let w = cfg.pretrained.then(|| loaded.checkpoint.tensors.clone());
    Ok((Some(loaded.checkpoint.config), w))
}

/// In a data-parallel run, synchronise the model's BatchNorms over the ranks (`sync`: mmseg's
/// `SyncBN`), or warn (rank 0) that each rank normalises with its own share of the batch.
fn synchronise_batch_norms(model: &mut BeitForSemanticSegmentation, world: &World, sync: bool) {
    if world.size() == 1 {
        return;
    }
    if sync {
        model.synchronise_batch_norms(Some(CollectiveBatchStats::shared(world.collective())));
        if world.is_primary() {
            tracing::info!(
                "BatchNorm statistics synchronised over {} processes (SyncBN)",
                world.size()
            );
        }
    } else if world.is_primary() {
        tracing::warn!(
            "data-parallel run on {} processes with segmentation.sync_batch_norm = false: each \
             rank's BatchNorm normalises with its own share of the batch, so the run is \
             statistically, not bitwise, the same as one process",
            world.size()
        );
    }
}

/// Micro-batches per epoch: `data.iters_per_epoch` optimizer steps, or one pass over the
/// `train` pairs; an error when either split cannot make one.
fn batches_per_epoch(
    cfg: &FinetuneSegConfig,
    train: usize,
    val: usize,
    micro: usize,
) -> Result<u64> {
    if train < micro {
        bail!("{train} training pairs make no micro-batch of {micro} (lower train.batch_size)");
    }
    if val == 0 {
        bail!("the validation split is empty");
    }
    Ok(match cfg.data.iters_per_epoch {
        Some(0) => bail!("data.iters_per_epoch must be at least 1"),
        Some(iters) => iters * cfg.train.accum_steps,
        None => (train / micro) as u64,
    })
}

/// mmseg's test pipeline: keep-ratio resize into the training `img_scale`, then windows of the
/// crop size every `aug.eval_stride` pixels.
fn sliding_inference(aug: &SegAugSection) -> Result<Inference> {
    let crop = aug.crop_size;
    let stride = aug.eval_stride.unwrap_or(crop);
    if stride == 0 || stride > crop {
        bail!("aug.eval_stride {stride} must lie in 1..={crop} (the crop size)");
    }
    Ok(Inference::Sliding {
        crop,
        stride,
        scale: (aug.scale[0] as usize, aug.scale[1] as usize),
    })
}

/// The run's log line: the schedule and the optimizer.
fn log_plan(cfg: &FinetuneSegConfig, steps_per_epoch: u64, micro: usize) {
    let t = &cfg.train;
    tracing::info!(
        "segmentation fine-tuning: {} epochs x {} steps of {} crops of {} ({} x {}), lr {:.2e} \
         ({:?}), layer decay {:?}",
        t.epochs,
        steps_per_epoch,
        t.batch_size,
        cfg.aug.crop_size,
        t.accum_steps,
        micro,
        t.lr,
        t.schedule,
        t.layer_decay,
    );
}

/// Run (or continue) a segmentation fine-tuning job.
pub fn finetune_seg(job: &FinetuneSegJob) -> Result<FinetuneSegOutcome> {
    let (cfg, t) = (&job.config, &job.config.train);
    let world = &job.world;
    let device = runner::start(cfg.device, world, &cfg.output, job.resume.is_some())?;
    let micro = t.micro_batch()?;
    world.rank_micro_batch(micro)?;
    let transform = cfg.aug.train_transform()?;
    let processor = cfg.aug.processor()?;
    let (train, val, classes, description) = load_data(&cfg.data)?;
    tracing::info!("data: {description}");
    let reduce_zero_label = matches!(train, Pairs::Folder(ref f, _) if f.reduce_zero_label);
    let (source_cfg, weights) = load_source(job)?;
    let from_weights = weights.is_some();
    let (model_cfg, seg) = segmentation_config(cfg, source_cfg.as_ref(), &classes)?;
    let (varmap, mut model, report) = build_model(&model_cfg, weights, &device, t.seed)?;
    synchronise_batch_norms(&mut model, world, cfg.segmentation.sync_batch_norm);
    if job.resume.is_none() && from_weights {
        log_load_report(&report);
    }
    // BatchNorm running statistics are state, not parameters: no optimizer, no weight decay.
    let params = named_vars(&varmap)
        .into_iter()
        .filter(|(n, _)| !is_buffer(n));
    let groups = build_param_groups(params, &t.grouping(model_cfg.num_hidden_layers))?;
    let batches = batches_per_epoch(cfg, train.len(), val.len(), micro)?;
    let spec = RunSpec::new(
        &cfg.output,
        job.resume.as_deref(),
        t,
        batches,
        job.progress,
        world,
    );
    let tl = runner::open_loop(&spec, cfg, varmap.clone(), groups)?;
    log_plan(cfg, tl.config().steps_per_epoch(), micro);
    let mut task = SegTask {
        model,
        model_cfg,
        seg,
        varmap,
        val: &val,
        processor,
        inference: sliding_inference(&cfg.aug)?,
        reduce_zero_label,
        device: device.clone(),
        out: cfg.output.clone(),
        world: world.clone(),
    };
    let precision = t.precision(&device)?;
    tracing::info!("precision: {precision}");
    let loader = train_loader(
        train.into(),
        transform,
        t.seed,
        micro,
        batches,
        device,
        world,
    )?;
    let done = precision.scope(|| {
        fit(
            tl,
            &mut task,
            |epoch| Ok(loader.epoch(epoch)?.map(|b| b.map_err(anyhow::Error::from))),
            &runner::evaluated(t.eval_every, "mIoU", job.stop_after),
        )
    })?;
    let final_model = task.export_final(done.finished)?;
    Ok(FinetuneSegOutcome {
        final_model,
        ..FinetuneOutcome::new(done, description, &cfg.output)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_config;

    #[test]
    fn defaults_are_unilm_ade20k_recipe() {
        let c = FinetuneSegConfig::default();
        assert_eq!(
            (c.train.lr, c.train.weight_decay, c.train.layer_decay),
            (3e-5, 0.05, Some(0.9))
        );
        assert_eq!(c.train.schedule, ScheduleKind::Poly);
        assert_eq!((c.train.warmup_steps, c.train.min_lr), (Some(1500), 0.0));
        assert_eq!(
            c.train.epochs * c.data.iters_per_epoch.unwrap(),
            160_000,
            "160k iterations"
        );
        assert_eq!((c.train.batch_size, c.aug.crop_size), (16, 640));
        assert_eq!(c.segmentation.auxiliary_loss_weight, 0.4);
        assert_eq!(c.segmentation.ignore_index, 255);
        let e = c.train.engine(16_000, false).unwrap();
        assert_eq!(e.total_steps(), 160_000);
        let s = e.lr_schedule().unwrap();
        assert!((s.value(1_500) - 3e-5 * (1.0 - 1_500.0 / 160_000.0)).abs() < 1e-15);
        assert!(s.value(0) < 1e-10);
        assert_eq!(default_out_indices(12), vec![3, 5, 7, 11]);
        assert_eq!(default_out_indices(4), vec![1, 2, 3, 4]);
    }

    #[test]
    fn typos_are_errors_naming_the_key() {
        for (set, key) in [
            ("aug.crop_sise=64", "crop_sise"),
            ("segmentation.aux_weight=0.2", "aux_weight"),
            ("data.iter_per_epoch=5", "iter_per_epoch"),
            ("train.schedule=\"polly\"", "polly"),
        ] {
            let e = format!(
                "{:#}",
                parse_config::<FinetuneSegConfig>(None, &[set.into()], &[]).unwrap_err()
            );
            assert!(e.contains(key), "{set}: {e}");
        }
    }
}
