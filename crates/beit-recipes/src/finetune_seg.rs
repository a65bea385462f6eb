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
//! decode head's BatchNorm normalises with each rank's batch statistics (mmseg's SyncBatchNorm
//! is not implemented) and every rank then takes rank 0's running statistics (as PyTorch's DDP
//! broadcasts buffers), so the run is statistically, not bitwise, that of one process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use beit_data::seg_augment::SegTrainTransform;
use beit_data::segmentation::{
    fashion_seg_classes, fashion_segmentation, LabelMap, SegmentationFolder, ADE20K_CLASSES,
    IGNORE_INDEX,
};
use beit_data::{FashionMnist, Filter, ImageProcessor, Normalize, RgbImage, TargetSize};
use beit_model::load::LoadReport;
use beit_model::segmentation::{
    is_buffer, save_segmentation_hf, segmentation_model_in_varmap, BeitForSemanticSegmentation,
    SegmentationConfig,
};
use beit_model::{BeitConfig, ForwardOptions};
use beit_train::seg_metrics::SegMetrics;
use beit_train::{
    build_param_groups, fit, named_vars, BestMetric, FitOptions, GroupingConfig, Position,
    ScheduleKind, StepContext, StepOutput, TrainLoop, TrainRng, TrainTask,
};
use candle::{Device, Tensor};
use candle_nn::VarMap;
use rand::seq::SliceRandom;
use rand::RngCore;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::classifier::{log_load_report, trainable_classifier};
use crate::config::{prepare_output_dir, write_resolved_config, TrainSection};
use crate::device::parse_device;
use crate::finetune::Architecture;
use crate::model_source::load_model;
use crate::segment::{segment_image, Inference};

/// A segmentation fine-tuning recipe (`configs/finetune_seg_*.toml`). Defaults: unilm's
/// BEiT-base ADE20K recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneSegConfig {
    /// Starting checkpoint: a directory or hub id (`--model`), classification, MIM or
    /// segmentation. Empty: from scratch with `[architecture]`.
    pub model: String,
    /// Load the checkpoint's weights (true); false keeps only its architecture, freshly
    /// initialised (a from-scratch baseline of the same shape).
    pub pretrained: bool,
    /// Run directory (`--output`).
    pub output: PathBuf,
    /// Device (`--device`).
    pub device: String,
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
            model: String::new(),
            pretrained: true,
            output: PathBuf::from("runs/finetune-seg"),
            device: "cpu".into(),
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

/// `[data]` of a segmentation run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegDataSection {
    /// A directory in the ADE20K layout (`images/<split>/*.jpg` + `annotations/<split>/*.png`,
    /// or its parent holding `ADEChallengeData2016/`), or `fashion-mnist`: the segmentation set
    /// derived in memory from the Fashion-MNIST subset embedded in beit-data (2x2 mosaics of
    /// garments, 11 classes with the background).
    pub source: String,
    /// Training split folder (`training`).
    pub train_split: String,
    /// Validation split folder (`validation`).
    pub val_split: String,
    /// mmseg's `reduce_zero_label` (annotation 0 ignored, classes shifted down). Unset: true for
    /// a directory (ADE20K), false for `fashion-mnist` (0 is its background class).
    pub reduce_zero_label: Option<bool>,
    /// Class names of a directory dataset; empty: ADE20K's 150 (with `reduce_zero_label`).
    pub classes: Vec<String>,
    /// Optimizer steps per epoch, drawn from an endless stream of reshuffled passes over the
    /// training set (mmseg's iteration-based runner; 16,000 = unilm's evaluation interval).
    /// Unset: an epoch is one pass (the last incomplete batch dropped).
    pub iters_per_epoch: Option<u64>,
    /// Use at most the first this many training pairs (sorted by name).
    pub max_train_samples: Option<usize>,
    /// Evaluate on at most the first this many validation pairs.
    pub max_val_samples: Option<usize>,
    /// `fashion-mnist`: training mosaics (4 garments each; 1,500 uses the 6,000 embedded images).
    pub fashion_train_images: usize,
    /// `fashion-mnist`: validation mosaics from the 1,000 test images (250).
    pub fashion_val_images: usize,
}

impl Default for SegDataSection {
    fn default() -> Self {
        Self {
            source: String::new(),
            train_split: "training".into(),
            val_split: "validation".into(),
            reduce_zero_label: None,
            classes: Vec::new(),
            iters_per_epoch: Some(16_000),
            max_train_samples: None,
            max_val_samples: None,
            fashion_train_images: 1_500,
            fashion_val_images: 250,
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
    pub interpolation: String,
    /// `half` (mean = std = 0.5: unilm's 127.5 and the published processors) or `imagenet`.
    pub normalize: String,
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
            interpolation: "bilinear".into(),
            normalize: "half".into(),
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
            interpolation: Filter::parse(&self.interpolation).context("aug.interpolation")?,
            normalize: Normalize::preset(&self.normalize).context("aug.normalize")?,
        };
        t.validate().context("[aug]")?;
        Ok(t)
    }

    /// The processor of the exported model and of the evaluation (rescale, normalise; resize
    /// to the crop size for whole-image inference).
    pub fn processor(&self) -> Result<ImageProcessor> {
        let n = Normalize::preset(&self.normalize).context("aug.normalize")?;
        let s = self.crop_size as u32;
        Ok(ImageProcessor {
            do_resize: true,
            size: TargetSize::Exact(s, s),
            resample: Filter::parse(&self.interpolation).context("aug.interpolation")?,
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

/// What a segmentation fine-tuning run produced.
#[derive(Debug, Clone)]
pub struct FinetuneSegOutcome {
    /// Optimizer steps completed.
    pub steps: u64,
    /// All scheduled steps are done.
    pub finished: bool,
    /// What data was used.
    pub data: String,
    /// The latest evaluation (`mIoU`, `mAcc`, `aAcc`, percent).
    pub last_eval: Option<beit_train::EvalRecord>,
    /// The best evaluation by mIoU.
    pub best_eval: Option<beit_train::EvalRecord>,
    /// Mean training loss of the first and the last optimizer step of this invocation.
    pub loss_first_last: Option<(f64, f64)>,
    /// The exported best model.
    pub best_model: PathBuf,
    /// The exported final model (written when the run completes).
    pub final_model: Option<PathBuf>,
    /// The run's metrics log.
    pub metrics: PathBuf,
    /// The last checkpoint.
    pub checkpoint: PathBuf,
}

/// The pairs of one split: on disk (ADE20K layout) or in memory.
enum Pairs {
    Folder(SegmentationFolder, usize),
    Memory(Vec<(RgbImage, LabelMap)>),
}

impl Pairs {
    fn len(&self) -> usize {
        match self {
            Pairs::Folder(_, n) => *n,
            Pairs::Memory(v) => v.len(),
        }
    }

    fn load(&self, i: usize) -> Result<(RgbImage, LabelMap)> {
        match self {
            Pairs::Folder(f, _) => f
                .load(i)
                .with_context(|| format!("loading {}", f.pairs[i].image.display())),
            Pairs::Memory(v) => Ok(v[i].clone()),
        }
    }
}

/// The training and validation pairs, the class names and a description.
fn load_data(d: &SegDataSection) -> Result<(Pairs, Pairs, Vec<String>, String)> {
    let cap = |n: usize, max: Option<usize>| max.map_or(n, |m| m.min(n));
    if d.source.trim() == "fashion-mnist" {
        if d.reduce_zero_label == Some(true) {
            bail!(
                "data.reduce_zero_label: the fashion-mnist set's label 0 is its background class"
            );
        }
        let fm = FashionMnist::embedded()?;
        let mut train = fashion_segmentation(&fm.train, d.fashion_train_images, 0)?;
        let mut val = fashion_segmentation(&fm.test, d.fashion_val_images, 1)?;
        train.truncate(cap(train.len(), d.max_train_samples));
        val.truncate(cap(val.len(), d.max_val_samples));
        let desc = format!(
            "Fashion-MNIST segmentation mosaics (56x56, 11 classes): {} train / {} val",
            train.len(),
            val.len()
        );
        return Ok((
            Pairs::Memory(train),
            Pairs::Memory(val),
            fashion_seg_classes(),
            desc,
        ));
    }
    if d.source.trim().is_empty() {
        bail!("data.source: no dataset given (--data DIR in the ADE20K layout, or fashion-mnist)");
    }
    let root = Path::new(d.source.trim());
    let reduce = d.reduce_zero_label.unwrap_or(true);
    let classes: Vec<String> = if d.classes.is_empty() {
        if !reduce {
            bail!("data.classes: list the class names of a dataset without reduce_zero_label");
        }
        ADE20K_CLASSES.iter().map(|s| s.to_string()).collect()
    } else {
        d.classes.clone()
    };
    let train = SegmentationFolder::ade20k(root, &d.train_split, reduce)?;
    let val = SegmentationFolder::ade20k(root, &d.val_split, reduce)?;
    let (nt, nv) = (
        cap(train.len(), d.max_train_samples),
        cap(val.len(), d.max_val_samples),
    );
    let desc = format!(
        "{} ({} classes{}): {nt} train / {nv} val",
        root.display(),
        classes.len(),
        if reduce { ", reduce_zero_label" } else { "" }
    );
    Ok((
        Pairs::Folder(train, nt),
        Pairs::Folder(val, nv),
        classes,
        desc,
    ))
}

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
    let mut c = match source {
        Some(s) => s.clone(),
        None => {
            let a = &cfg.architecture;
            BeitConfig {
                hidden_size: a.hidden_size,
                num_hidden_layers: a.num_hidden_layers,
                num_attention_heads: a.num_attention_heads,
                intermediate_size: a.intermediate_size,
                patch_size: a.patch_size,
                layer_scale_init_value: a.layer_scale_init_value,
                layer_norm_eps: a.layer_norm_eps,
                ..BeitConfig::default()
            }
        }
    };
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

/// One micro-batch: normalised crops `(B, 3, S, S)` and labels `(B, S, S)`.
struct SegBatch {
    pixels: Tensor,
    labels: Tensor,
    len: usize,
    /// Label pixels not equal to the ignore index (the losses' denominator).
    labelled_pixels: usize,
}

/// Where a run stands on its best model (`best.json`).
#[derive(Debug, Serialize, Deserialize)]
struct BestRecord {
    #[serde(rename = "mIoU")]
    miou: f64,
    #[serde(rename = "mAcc")]
    macc: f64,
    #[serde(rename = "aAcc")]
    aacc: f64,
    epoch: u64,
    step: u64,
}

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
}

impl SegTask<'_> {
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
        let samples = crate::dist::global_positions(batch.pixels.dim(0)?, ctx.rank_and_size);
        self.model
            .backbone()
            .rng()
            .reseed_for_samples(ctx.rng.next_u64(), samples);
        let out = self.model.forward(&batch.pixels, ForwardOptions::train())?;
        // The forward pass moved the BatchNorm running statistics by this rank's batch: every
        // rank takes rank 0's (PyTorch DDP's buffer broadcast), so the ranks stay identical.
        beit_train::dist::broadcast_vars_where(
            &*beit_train::dist::world(),
            &self.varmap,
            is_buffer,
        )?;
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
        let mut metrics = SegMetrics::new(self.model.num_labels(), IGNORE_INDEX as u32);
        // Data-parallel: rank r evaluates pairs r, r + N, ...; the counts are summed.
        let world = beit_train::dist::world();
        for i in (world.rank()..self.val.len()).step_by(world.size()) {
            let (img, labels) = self.val.load(i)?;
            let pred = segment_image(
                &self.model,
                &self.processor,
                &img,
                self.inference,
                &self.device,
            )?;
            let gt: Vec<u32> = labels.labels.iter().map(|&v| v as u32).collect();
            metrics
                .update(&pred, &gt)
                .map_err(|e| anyhow::anyhow!("validation pair {i}: {e}"))?;
        }
        metrics.all_reduce(&*world)?;
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
        let rec = BestRecord {
            miou: metrics["mIoU"],
            macc: metrics["mAcc"],
            aacc: metrics["aAcc"],
            epoch: at.epoch.saturating_sub(1),
            step: at.step,
        };
        let file = self.out.join("best.json");
        std::fs::write(&file, serde_json::to_string_pretty(&rec)?)
            .with_context(|| format!("cannot write {}", file.display()))?;
        tracing::info!("new best mIoU {:.2}: exported {}", rec.miou, dir.display());
        Ok(())
    }
}

/// The training stream: micro-batch `b` of epoch `e` holds stream positions
/// `(e·per_epoch + b·micro)..` where a position `p` is sample `perm(p / N)[p % N]`, a seeded
/// permutation per pass; each sample's augmentation draws from a generator derived from
/// `(seed, epoch, position in the epoch)`. A function of `(seed, e)` alone, so a resumed run
/// sees the same data.
struct Stream<'a> {
    pairs: &'a Pairs,
    transform: &'a SegTrainTransform,
    seed: u64,
    micro: usize,
    batches_per_epoch: u64,
    device: Device,
    /// This process's rank and the world size: it reads its share of each micro-batch.
    rank: usize,
    world_size: usize,
}

impl Stream<'_> {
    fn permutation(&self, pass: u64) -> Vec<usize> {
        let mut p: Vec<usize> = (0..self.pairs.len()).collect();
        p.shuffle(&mut TrainRng::derive(self.seed, &[0x7061_7373, pass]));
        p
    }

    fn batch(&self, epoch: u64, b: u64, cache: &mut Option<(u64, Vec<usize>)>) -> Result<SegBatch> {
        let n = self.pairs.len() as u64;
        let per_epoch = self.batches_per_epoch * self.micro as u64;
        let mut items = Vec::with_capacity(self.micro / self.world_size);
        // This rank's share of the global micro-batch: positions rank, rank + N, ...
        for j in (self.rank as u64..self.micro as u64).step_by(self.world_size) {
            let in_epoch = b * self.micro as u64 + j;
            let p = epoch.wrapping_mul(per_epoch).wrapping_add(in_epoch);
            let pass = p / n;
            if cache.as_ref().map(|c| c.0) != Some(pass) {
                *cache = Some((pass, self.permutation(pass)));
            }
            let idx = cache.as_ref().map(|c| c.1[(p % n) as usize]).unwrap_or(0);
            items.push((in_epoch, idx));
        }
        let samples = items
            .par_iter()
            .map(|&(in_epoch, idx)| {
                let (img, labels) = self.pairs.load(idx)?;
                let mut rng = TrainRng::derive(self.seed, &[0x0061_7567, epoch, in_epoch]);
                self.transform
                    .apply(&img, &labels, &mut rng)
                    .with_context(|| format!("augmenting training pair {idx}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let side = self.transform.crop_size as usize;
        let len = samples.len();
        let mut pixels = Vec::with_capacity(len * 3 * side * side);
        let mut labels = Vec::with_capacity(len * side * side);
        for s in samples {
            pixels.extend_from_slice(&s.pixels);
            labels.extend(s.labels.iter().map(|&v| v as u32));
        }
        let labelled_pixels = labels.iter().filter(|&&v| v != IGNORE_INDEX as u32).count();
        Ok(SegBatch {
            pixels: Tensor::from_vec(pixels, (len, 3, side, side), &self.device)?,
            labels: Tensor::from_vec(labels, (len, side, side), &self.device)?,
            len,
            labelled_pixels,
        })
    }
}

/// Run (or continue) a segmentation fine-tuning job.
pub fn finetune_seg(job: &FinetuneSegJob) -> Result<FinetuneSegOutcome> {
    let cfg = &job.config;
    let t = &cfg.train;
    let device = parse_device(&cfg.device)?;
    let precision = t.precision(&device)?;
    tracing::info!("precision: {precision}");
    let out = cfg.output.clone();
    prepare_output_dir(&out, job.resume.is_some())?;
    let micro = t.micro_batch()?;
    crate::dist::rank_micro_batch(micro)?;
    let world = beit_train::dist::world();
    if world.size() > 1 && world.rank() == 0 {
        tracing::warn!(
            "data-parallel run on {} processes: the decode head's BatchNorm normalises with each \
             rank's batch statistics (no SyncBatchNorm), so the run is statistically, not \
             bitwise, the same as one process",
            world.size()
        );
    }
    let transform = cfg.aug.train_transform()?;
    let processor = cfg.aug.processor()?;

    let (train, val, classes, description) = load_data(&cfg.data)?;
    tracing::info!("data: {description}");
    let reduce_zero_label = matches!(train, Pairs::Folder(ref f, _) if f.reduce_zero_label);

    let (source_cfg, weights) = if cfg.model.trim().is_empty() {
        (None, None)
    } else {
        let loaded = load_model(&cfg.model, job.download)?;
        tracing::info!(
            "model: {} ({} tensors, {:?})",
            cfg.model,
            loaded.checkpoint.tensors.len(),
            loaded.checkpoint.architecture()
        );
        let w = cfg.pretrained.then(|| loaded.checkpoint.tensors.clone());
        (Some(loaded.checkpoint.config), w)
    };
    let from_weights = weights.is_some();
    let (model_cfg, seg) = segmentation_config(cfg, source_cfg.as_ref(), &classes)?;
    let (varmap, model, report) = build_model(&model_cfg, weights, &device, t.seed)?;
    if job.resume.is_none() && from_weights {
        log_load_report(&report);
    }
    // BatchNorm running statistics are state, not parameters: no optimizer, no weight decay.
    let params = named_vars(&varmap)
        .into_iter()
        .filter(|(name, _)| !is_buffer(name));
    let groups = build_param_groups(
        params,
        &GroupingConfig::finetune(model_cfg.num_hidden_layers, t.layer_decay.unwrap_or(1.0)),
    )?;

    if train.len() < micro {
        bail!(
            "{} training pairs make no micro-batch of {micro} (lower train.batch_size)",
            train.len()
        );
    }
    if val.len() == 0 {
        bail!("the validation split is empty");
    }
    let batches = match cfg.data.iters_per_epoch {
        Some(0) => bail!("data.iters_per_epoch must be at least 1"),
        Some(iters) => iters * t.accum_steps,
        None => (train.len() / micro) as u64,
    };
    let train_cfg = t.engine(batches, job.progress)?;
    let run_config = serde_json::to_value(cfg)?;
    write_resolved_config(&out, cfg)?;
    let tl = TrainLoop::open(
        train_cfg,
        varmap.clone(),
        groups,
        &out,
        job.resume.as_deref(),
        run_config,
    )?;
    tracing::info!(
        "segmentation fine-tuning: {} epochs x {} steps of {} crops of {} ({} x {}), lr {:.2e} \
         ({:?}), layer decay {:?}",
        t.epochs,
        tl.config().steps_per_epoch(),
        t.batch_size,
        cfg.aug.crop_size,
        t.accum_steps,
        micro,
        t.lr,
        t.schedule,
        t.layer_decay,
    );

    let crop = cfg.aug.crop_size;
    let stride = cfg.aug.eval_stride.unwrap_or(crop);
    if stride == 0 || stride > crop {
        bail!("aug.eval_stride {stride} must lie in 1..={crop} (the crop size)");
    }
    let mut task = SegTask {
        model,
        model_cfg,
        seg,
        varmap,
        val: &val,
        processor,
        // mmseg's test pipeline: keep-ratio resize into the training `img_scale`, then windows.
        inference: Inference::Sliding {
            crop,
            stride,
            scale: (cfg.aug.scale[0] as usize, cfg.aug.scale[1] as usize),
        },
        reduce_zero_label,
        device: device.clone(),
        out: out.clone(),
    };
    let stream = Stream {
        pairs: &train,
        transform: &transform,
        seed: t.seed,
        micro,
        batches_per_epoch: batches,
        device,
        rank: world.rank(),
        world_size: world.size(),
    };
    let done = precision.scope(|| {
        fit(
            tl,
            &mut task,
            |epoch| {
                let stream = &stream;
                let mut cache = None;
                Ok((0..batches).map(move |b| stream.batch(epoch, b, &mut cache)))
            },
            &FitOptions {
                eval_every: Some(t.eval_every.max(1)),
                best: Some(BestMetric {
                    name: "mIoU".into(),
                    higher_is_better: true,
                }),
                stop_after: job.stop_after,
            },
        )
    })?;
    let final_model = if done.finished && crate::dist::is_primary() {
        let dir = out.join("final_model");
        task.export(&dir)?;
        Some(dir)
    } else {
        None
    };
    Ok(FinetuneSegOutcome {
        steps: done.summary.steps,
        finished: done.finished,
        data: description,
        loss_first_last: done
            .first_step
            .as_ref()
            .zip(done.last_step.as_ref())
            .map(|(a, b)| (a.loss, b.loss)),
        last_eval: done.last_eval,
        best_eval: done.best_eval,
        best_model: out.join("best_model"),
        final_model,
        metrics: done.summary.metrics,
        checkpoint: done.summary.checkpoint,
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
