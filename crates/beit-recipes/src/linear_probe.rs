//! Linear probing: a linear classifier on frozen, average-pooled features of one block (BEiT
//! paper, Appendix D: block 9 of base, 14 of large).
//!
//! The backbone runs once over the train and validation images (the model's preprocessing, no
//! augmentation); each image's feature is the mean of the patch tokens of block `layer`'s output
//! (`hidden_states[layer]`), standardised with the training set's per-dimension mean and
//! standard deviation (a frozen, non-affine batch norm). A `Linear` head then trains on the
//! cached features through the engine ([`beit_train::fit`]: AdamW, warm-up + cosine,
//! metrics.jsonl, curves.png, checkpoints, resume).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use beit_data::{load_splits, DataConfig, Dataset, Loader, LoaderConfig, ProcessorTransform};
use beit_model::{BeitModel, ForwardOptions};
use beit_train::{
    build_param_groups, fit, label_smoothing_cross_entropy, named_vars, EvalAccumulator,
    StepContext, StepOutput, StepValue, TrainRng, TrainTask,
};
use candle::{DType, Tensor};
use candle_nn::{Init, Module, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::config::TrainSection;
use crate::device::DeviceSpec;
use crate::distributed::World;
use crate::evaluate::progress_bar;
use crate::model_source::{load_architecture, load_model, LoadedModel};
use crate::runner::{self, RunSpec};
use crate::tensor_batches::epoch_batch_indices;

/// A linear-probe recipe (`configs/linear_probe_*.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinearProbeConfig {
    /// Frozen model: a directory or hub id (`--model`); any BEiT checkpoint (MIM or classifier).
    #[serde(deserialize_with = "crate::config::non_empty")]
    pub model: Option<String>,
    /// Probe the checkpoint's weights (true); false probes the same architecture freshly
    /// initialised (transformers' init, seeded by `train.seed`): the random-features baseline
    /// a pre-trained model's probe is compared with.
    pub pretrained: bool,
    /// Block whose output is average-pooled (`--layer`; paper: 9 for base, 14 for large).
    pub layer: usize,
    /// Run directory (`--output`).
    pub output: PathBuf,
    /// Device (`--device`).
    pub device: DeviceSpec,
    /// Dataset.
    pub data: DataConfig,
    /// Optimisation of the head (`[train]`; `eval_batch_size` is the feature-extraction batch).
    pub train: TrainSection,
    /// Standardise features with the training set's mean/std (a frozen, non-affine BatchNorm).
    pub normalize_features: bool,
}

impl Default for LinearProbeConfig {
    fn default() -> Self {
        Self {
            model: None,
            pretrained: true,
            layer: 9,
            output: PathBuf::from("runs/linear-probe"),
            device: DeviceSpec::Cpu,
            data: DataConfig::default(),
            train: TrainSection {
                epochs: 50,
                batch_size: 1024,
                lr: 4e-3,
                min_lr: 0.0,
                warmup_epochs: 0,
                weight_decay: 1e-4,
                layer_decay: None,
                drop_path_rate: 0.0,
                label_smoothing: 0.0,
                eval_batch_size: Some(64),
                log_every: 50,
                keep_last: 1,
                ..TrainSection::default()
            },
            normalize_features: true,
        }
    }
}

/// The parameters of a BEiT of config `cfg` (with a MIM head when it has a mask token, else a
/// classifier), initialised as transformers does, seeded by `seed`.
fn random_init_tensors(
    cfg: &beit_model::BeitConfig,
    seed: u64,
    device: &candle::Device,
) -> Result<std::collections::HashMap<String, Tensor>> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    if cfg.use_mask_token {
        beit_model::BeitForMaskedImageModeling::new(cfg, vb)?;
    } else {
        beit_model::BeitForImageClassification::new(cfg, vb)?;
    }
    beit_model::init_beit(
        &varmap,
        &beit_model::InitConfig::transformers(cfg.num_hidden_layers, cfg.layer_scale_init_value),
        &mut TrainRng::derive(seed, &[0x696e6974]),
    )?;
    Ok(beit_model::save::varmap_tensors(&varmap))
}

/// Mean patch token of `hidden_states[layer]` for every image of `ds`: `(N, C)` and labels `(N)`.
fn extract(
    backbone: &BeitModel,
    loader: &Loader,
    layer: usize,
    label: &str,
    progress: bool,
) -> Result<(Tensor, Tensor)> {
    let pb = if progress {
        progress_bar(loader.samples_per_epoch() as u64, label)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let (mut feats, mut labels) = (Vec::new(), Vec::new());
    for batch in loader.epoch(0)? {
        let batch = batch?;
        let out = backbone.forward(
            &batch.images,
            None,
            ForwardOptions {
                output_hidden_states: true,
                ..ForwardOptions::default()
            },
        )?;
        let h = &out.hidden_states[layer];
        let n = h.dim(1)? - 1;
        feats.push(h.narrow(1, 1, n)?.mean(1)?.to_dtype(DType::F32)?);
        labels.push(
            batch
                .labels
                .clone()
                .context("the linear probe needs a labelled dataset")?,
        );
        pb.inc(batch.len() as u64);
    }
    pb.finish_and_clear();
    if !loader.skipped().is_empty() {
        tracing::warn!("{}", loader.summary());
    }
    Ok((Tensor::cat(&feats, 0)?, Tensor::cat(&labels, 0)?))
}

/// A linear-probe run.
#[derive(Debug, Clone)]
pub struct LinearProbeJob {
    /// The resolved recipe.
    pub config: LinearProbeConfig,
    /// Resume from this checkpoint (or run directory).
    pub resume: Option<PathBuf>,
    /// Allow downloading a hub checkpoint missing from the cache.
    pub download: bool,
    /// Draw progress bars.
    pub progress: bool,
    /// The processes the run is spread over (a single one by default).
    pub world: World,
}

/// What a linear probe produced.
#[derive(Debug, Clone)]
pub struct LinearProbeOutcome {
    /// Blocks of the probed model.
    pub num_layers: usize,
    /// The block whose features were probed (0 = the patch embeddings).
    pub layer: usize,
    /// The data used.
    pub data: String,
    /// Validation top-1 and top-5 after the last epoch.
    pub final_acc: (f64, f64),
    /// Best validation top-1 and the epochs done when it was reached.
    pub best_acc1: Option<(f64, u64)>,
    /// The trained head (`classifier.weight`, `classifier.bias`).
    pub head: PathBuf,
    /// The run's metrics log.
    pub metrics: PathBuf,
}

/// Data-parallel feature extraction: each rank extracted the rows `r, r + N, ...` of a split of
/// `n` images (`x`, `y`); every rank gets all `n` rows, in order (an all-gather made of one sum
/// all-reduce over disjoint rows).
fn gather_rows(world: &World, x: Tensor, y: Tensor, n: usize) -> Result<(Tensor, Tensor)> {
    let (size, rank) = (world.size(), world.rank());
    if size == 1 {
        return Ok((x, y));
    }
    let (rows, dim) = x.dims2()?;
    if rows != (rank..n).step_by(size).count() {
        bail!(
            "rank {rank} extracted {rows} feature rows for its shard of {n} images (unreadable              files?); a data-parallel linear probe needs every image"
        );
    }
    let local = x.to_vec2::<f32>()?;
    let labels = y.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let mut all = vec![0f32; n * (dim + 1)];
    for (k, (row, label)) in local.iter().zip(&labels).enumerate() {
        let g = k * size + rank;
        all[g * (dim + 1)..g * (dim + 1) + dim].copy_from_slice(row);
        all[g * (dim + 1) + dim] = *label;
    }
    world.all_reduce_sum_f32("feature all-gather", &mut all)?;
    let t = Tensor::from_vec(all, (n, dim + 1), x.device())?;
    Ok((
        t.narrow(1, 0, dim)?.contiguous()?,
        t.narrow(1, dim, 1)?.squeeze(1)?.to_dtype(DType::U32)?,
    ))
}

/// The probe's task: a linear head over cached features.
struct ProbeTask<'a> {
    head: candle_nn::Linear,
    label_smoothing: f64,
    val: (&'a Tensor, &'a Tensor),
    num_classes: usize,
}

impl TrainTask for ProbeTask<'_> {
    type Batch = (Tensor, Tensor);
    type Error = anyhow::Error;

    fn train_step(
        &mut self,
        (x, y): (Tensor, Tensor),
        _: &mut StepContext<'_>,
    ) -> Result<StepOutput> {
        let logits = self.head.forward(&x)?;
        let loss = label_smoothing_cross_entropy(&logits, &y, self.label_smoothing)?;
        let acc = beit_train::topk_accuracy_on_device(&logits, &y, &[1])?.remove(0);
        Ok(StepOutput {
            loss,
            batch_size: x.dim(0)?,
            metrics: vec![("train_acc1".into(), StepValue::scaled(acc, 100.0))],
        })
    }

    fn evaluate(&mut self) -> Result<Vec<(String, f64)>> {
        let mut acc = EvalAccumulator::new(self.num_classes);
        let (x, y) = self.val;
        let n = x.dim(0)?;
        for s in (0..n).step_by(4096) {
            let len = 4096.min(n - s);
            acc.add(
                &self.head.forward(&x.narrow(0, s, len)?)?,
                &y.narrow(0, s, len)?,
            )?;
        }
        Ok(acc.finish().as_pairs())
    }
}

/// The probed model of `job`: the checkpoint, or its architecture freshly initialised.
fn load_probed(job: &LinearProbeJob, model: &str, device: &candle::Device) -> Result<LoadedModel> {
    let cfg = &job.config;
    if cfg.pretrained {
        return load_model(model, job.download);
    }
    tracing::info!("probing the architecture of {model} from random init");
    load_architecture(model, job.download, |mcfg| {
        random_init_tensors(mcfg, cfg.train.seed, device)
    })
}

/// Cached features `(x, y)` of the training and the validation split.
struct Features {
    train: (Tensor, Tensor),
    val: (Tensor, Tensor),
}

/// Block `cfg.layer`'s pooled features of both splits (each data-parallel rank extracts its
/// shard, then every rank gets every row), standardised when `normalize_features`.
fn features(
    job: &LinearProbeJob,
    loaded: &LoadedModel,
    splits: &beit_data::Splits,
    device: &candle::Device,
) -> Result<Features> {
    let cfg = &job.config;
    let backbone = loaded.checkpoint.backbone(device).with_context(|| {
        format!(
            "building the backbone of {}",
            cfg.model.as_deref().unwrap_or("")
        )
    })?;
    let transform = Arc::new(ProcessorTransform::new(loaded.processor.clone())?);
    let started = std::time::Instant::now();
    let progress = job.progress && job.world.is_primary();
    let split = |ds: &Arc<dyn Dataset>, label: &str| -> Result<(Tensor, Tensor)> {
        let loader = Loader::new(
            job.world.eval_shard(ds.clone()),
            transform.clone(),
            LoaderConfig {
                batch_size: cfg.train.eval_batch_size.unwrap_or(64),
                shuffle: false,
                drop_last: false,
                num_threads: cfg.data.num_workers,
                ..LoaderConfig::default()
            },
            device.clone(),
        )?;
        let (x, y) = extract(&backbone, &loader, cfg.layer, label, progress)?;
        gather_rows(&job.world, x, y, ds.len())
    };
    let (mut xtr, ytr) = split(&splits.train, "features (train)")?;
    let (mut xva, yva) = split(&splits.val, "features (val)")?;
    tracing::info!(
        "features of block {} ({} dims): {} train / {} val images in {:.1}s",
        cfg.layer,
        xtr.dim(1)?,
        xtr.dim(0)?,
        xva.dim(0)?,
        started.elapsed().as_secs_f64()
    );
    if cfg.normalize_features {
        let mean = xtr.mean_keepdim(0)?;
        let std = (xtr.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)? + 1e-6)?.sqrt()?;
        xtr = xtr.broadcast_sub(&mean)?.broadcast_div(&std)?;
        xva = xva.broadcast_sub(&mean)?.broadcast_div(&std)?;
    }
    Ok(Features {
        train: (xtr, ytr),
        val: (xva, yva),
    })
}

/// The head: `classifier.*` (the engine gives it lr scale 1 and decays only the weight),
/// trunc_normal(std 0.01) as MAE's probe head, from the seeded generator.
fn probe_head(
    classes: usize,
    dim: usize,
    seed: u64,
    device: &candle::Device,
) -> Result<(VarMap, candle_nn::Linear)> {
    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device).pp("classifier");
    let w = beit_model::init::trunc_normal_vec(
        &mut TrainRng::derive(seed, &[0x68656164]),
        classes * dim,
        0.0,
        0.01,
        -0.02,
        0.02,
    )?;
    let w = Tensor::from_vec(w, (classes, dim), device)?;
    let head = candle_nn::Linear::new(
        vb.get_with_hints((classes, dim), "weight", Init::Const(0.0))?,
        Some(vb.get_with_hints(classes, "bias", Init::Const(0.0))?),
    );
    varmap.set_one("classifier.weight", &w)?;
    Ok((varmap, head))
}

/// Run (or continue) a linear probe.
pub fn linear_probe(job: &LinearProbeJob) -> Result<LinearProbeOutcome> {
    let (cfg, t) = (&job.config, &job.config.train);
    let Some(model) = cfg.model.as_deref() else {
        bail!("no model: pass --model DIR|HUB_ID (or set `model` in the config)");
    };
    if t.batch_size == 0 || t.eval_batch_size == Some(0) {
        bail!("train.batch_size and train.eval_batch_size must be at least 1");
    }
    let world = &job.world;
    let device = runner::start(cfg.device, world, &cfg.output, job.resume.is_some())?;
    let loaded = load_probed(job, model, &device)?;
    let layers = loaded.checkpoint.config.num_hidden_layers;
    if cfg.layer > layers {
        bail!(
            "--layer {}: the model has {layers} blocks (use 1..={layers}; the paper uses 9 of 12 \
             for base, 14 of 24 for large)",
            cfg.layer
        );
    }
    let splits = load_splits(&cfg.data)?;
    tracing::info!("data: {}", splits.description);
    let Features { train, val } = features(job, &loaded, &splits, &device)?;
    drop(loaded);
    let (n, dim) = train.0.dims2()?;
    let (varmap, head) = probe_head(splits.classes.len(), dim, t.seed, &device)?;
    let groups = build_param_groups(named_vars(&varmap), &t.grouping(layers))?;
    let bs = t.batch_size.min(n);
    // Each rank trains on its positions `r, r + N, ...` of every batch.
    world.rank_micro_batch(bs)?;
    let batches = (n / bs) as u64;
    let spec = RunSpec::new(
        &cfg.output,
        job.resume.as_deref(),
        t,
        batches,
        job.progress,
        world,
    );
    let tl = runner::open_loop(&spec, cfg, varmap.clone(), groups)?;
    let mut task = ProbeTask {
        head,
        label_smoothing: t.label_smoothing,
        val: (&val.0, &val.1),
        num_classes: splits.classes.len(),
    };
    let train = &train;
    let done = fit(
        tl,
        &mut task,
        |epoch| epoch_batches(world, train, bs, t.seed, epoch),
        &runner::evaluated(t.eval_every, "acc1", None),
    )?;
    let final_acc = match &done.last_eval {
        Some(e) => (e.metrics["acc1"], e.metrics["acc5"]),
        None => {
            let m = task.evaluate()?;
            (m[0].1, m[1].1)
        }
    };
    let head_path = cfg.output.join("linear_head.safetensors");
    if world.is_primary() {
        varmap
            .save(&head_path)
            .with_context(|| format!("cannot write {}", head_path.display()))?;
    }
    Ok(LinearProbeOutcome {
        num_layers: layers,
        layer: cfg.layer,
        data: splits.description,
        final_acc,
        best_acc1: done.best_eval.map(|e| (e.metrics["acc1"], e.epochs_done)),
        head: head_path,
        metrics: done.summary.metrics,
    })
}

/// The micro-batches of `epoch` over the cached features `(x, y)`: a permutation drawn from
/// `(seed, epoch)`, so a resumed run agrees; each rank takes its positions `r, r + N, ...`.
fn epoch_batches<'a>(
    world: &World,
    (x, y): &'a (Tensor, Tensor),
    bs: usize,
    seed: u64,
    epoch: u64,
) -> Result<impl Iterator<Item = Result<(Tensor, Tensor)>> + 'a> {
    let (rank, size) = (world.rank(), world.size());
    let batches = epoch_batch_indices(x.dim(0)?, bs, seed, 0x7065726d, epoch, x.device())?;
    Ok(batches.into_iter().map(move |idx| {
        let idx = if size > 1 {
            let all = idx.to_vec1::<u32>()?;
            let mine: Vec<u32> = all.into_iter().skip(rank).step_by(size).collect();
            Tensor::new(mine, idx.device())?
        } else {
            idx
        };
        Ok((x.index_select(&idx, 0)?, y.index_select(&idx, 0)?))
    }))
}
