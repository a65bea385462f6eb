//! `beit-cli linear-probe`: a linear classifier on frozen, average-pooled features of one block
//! (BEiT paper, Appendix D: block 9 of base, 14 of large).
//!
//! The backbone runs once over the train and validation images (the model's preprocessing, no
//! augmentation); each image's feature is the mean of the patch tokens of block `layer`'s output
//! (`hidden_states[layer]`), standardised with the training set's per-dimension mean and
//! standard deviation (a frozen, non-affine batch norm). A `Linear` head then trains on the
//! cached features with AdamW and a warm-up + cosine schedule through the training engine
//! (metrics.jsonl, curves.png, checkpoints, `--resume`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use beit_data::{Dataset, Loader, LoaderConfig};
use beit_model::{BeitModel, ForwardOptions};
use beit_train::{
    build_param_groups, label_smoothing_cross_entropy, named_vars, AdamWConfig, GroupingConfig,
    StepOutput, TrainConfig, TrainLoop, TrainRng,
};
use candle::{DType, Device, Tensor, D};
use candle_nn::{Init, Module, VarBuilder, VarMap};
use clap::Args;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::device::parse_device;
use crate::model_source::load_model;
use crate::training::{
    load_splits, prepare_output_dir, print_table, progress_bar, write_resolved_config, CommonArgs,
    DataConfig, EvalAccumulator, FlagKeys, ProcessorTransform, ResumeArg,
};

/// Linear probe: a linear classifier on frozen, average-pooled features of one block.
///
/// Settings: `--config configs/linear_probe_base.toml` (defaults: the paper's Appendix D recipe,
/// AdamW lr 4e-3 cosine, 50 epochs, batch 1024, weight decay 1e-4, block 9), `--set`
/// overrides, then flags. Features are computed once (the model's preprocessing, no
/// augmentation), so the head trains in seconds.
///
/// Example: `beit-cli linear-probe --model runs/pretrain/model --layer 3 --data fashion-mnist`
#[derive(Args, Debug)]
pub struct LinearProbeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub resume: ResumeArg,
    /// Block whose output is pooled (1 = first block, L = last; 0 = the patch embeddings).
    #[arg(long)]
    pub layer: Option<usize>,
    /// Allow downloading a hub checkpoint missing from the cache.
    #[arg(long)]
    pub download: bool,
    /// Print the resolved configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// A linear-probe recipe (`configs/linear_probe_*.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinearProbeConfig {
    /// Frozen model: a directory or hub id (`--model`); any BEiT checkpoint (MIM or classifier).
    pub model: String,
    /// Block whose output is average-pooled (`--layer`; paper: 9 for base, 14 for large).
    pub layer: usize,
    /// Run directory (`--output`).
    pub output: PathBuf,
    /// Device (`--device`).
    pub device: String,
    /// Dataset.
    pub data: DataConfig,
    /// Optimisation of the head.
    pub train: ProbeTrain,
}

impl Default for LinearProbeConfig {
    fn default() -> Self {
        Self {
            model: String::new(),
            layer: 9,
            output: PathBuf::from("runs/linear-probe"),
            device: "cpu".into(),
            data: DataConfig::default(),
            train: ProbeTrain::default(),
        }
    }
}

/// `[train]` of a linear probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeTrain {
    /// Epochs (50).
    pub epochs: u64,
    /// Features per step (1024).
    pub batch_size: usize,
    /// Peak learning rate (4e-3).
    pub lr: f64,
    /// Final learning rate (0).
    pub min_lr: f64,
    /// Warm-up epochs (0).
    pub warmup_epochs: u64,
    /// Weight decay (1e-4).
    pub weight_decay: f64,
    /// Label smoothing (0).
    pub smoothing: f64,
    /// Standardise features with the training set's mean/std (a frozen, non-affine BatchNorm).
    pub normalize_features: bool,
    /// Seed.
    pub seed: u64,
    /// Batch size of the feature extraction.
    pub feature_batch_size: usize,
}

impl Default for ProbeTrain {
    fn default() -> Self {
        Self {
            epochs: 50,
            batch_size: 1024,
            lr: 4e-3,
            min_lr: 0.0,
            warmup_epochs: 0,
            weight_decay: 1e-4,
            smoothing: 0.0,
            normalize_features: true,
            seed: 0,
            feature_batch_size: 64,
        }
    }
}

#[allow(clippy::too_many_arguments)] // one call site per split; a struct would only rename them
/// Mean patch token of `hidden_states[layer]` for every image of `ds`: `(N, C)` and labels `(N)`.
fn extract(
    backbone: &BeitModel,
    ds: Arc<dyn Dataset>,
    transform: Arc<ProcessorTransform>,
    layer: usize,
    batch_size: usize,
    num_workers: usize,
    device: &Device,
    label: &str,
) -> Result<(Tensor, Tensor)> {
    let loader = Loader::new(
        ds,
        transform,
        LoaderConfig {
            batch_size,
            shuffle: false,
            drop_last: false,
            num_threads: num_workers,
            ..LoaderConfig::default()
        },
        device.clone(),
    )?;
    let pb = progress_bar(loader.samples_per_epoch() as u64, label);
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

/// Run the command.
pub fn run(args: LinearProbeArgs) -> Result<()> {
    let mut common = args.common.clone();
    if let Some(l) = args.layer {
        common.set.push(format!("layer={l}"));
    }
    let cfg: LinearProbeConfig = common.resolve(&FlagKeys::STANDARD)?;
    if args.print_config {
        print!("{}", toml::to_string_pretty(&cfg)?);
        return Ok(());
    }
    if cfg.model.trim().is_empty() {
        bail!("no model: pass --model DIR|HUB_ID (or set `model` in the config)");
    }
    let t = &cfg.train;
    if t.batch_size == 0 || t.feature_batch_size == 0 {
        bail!("train.batch_size and train.feature_batch_size must be at least 1");
    }
    let device = parse_device(&cfg.device)?;
    let out = cfg.output.clone();
    let resume_from = args.resume.checkpoint(&out);
    prepare_output_dir(&out, resume_from.is_some())?;

    let loaded = load_model(&cfg.model, args.download)?;
    let mcfg = loaded.checkpoint.config.clone();
    let layers = mcfg.num_hidden_layers;
    if cfg.layer > layers {
        bail!(
            "--layer {}: the model has {layers} blocks (use 1..={layers}; the paper uses 9 of 12 \
             for base, 14 of 24 for large)",
            cfg.layer
        );
    }
    let backbone = loaded
        .checkpoint
        .backbone(&device)
        .with_context(|| format!("building the backbone of {}", cfg.model))?;
    let splits = load_splits(&cfg.data)?;
    tracing::info!("data: {}", splits.description);
    let classes = splits.classes.clone();
    let transform = Arc::new(ProcessorTransform::new(loaded.processor.clone())?);
    let started = std::time::Instant::now();
    let (mut xtr, ytr) = extract(
        &backbone,
        splits.train.clone(),
        transform.clone(),
        cfg.layer,
        t.feature_batch_size,
        cfg.data.num_workers,
        &device,
        "features (train)",
    )?;
    let (mut xva, yva) = extract(
        &backbone,
        splits.val.clone(),
        transform,
        cfg.layer,
        t.feature_batch_size,
        cfg.data.num_workers,
        &device,
        "features (val)",
    )?;
    tracing::info!(
        "features of block {} ({} dims): {} train / {} val images in {:.1}s",
        cfg.layer,
        xtr.dim(1)?,
        xtr.dim(0)?,
        xva.dim(0)?,
        started.elapsed().as_secs_f64()
    );
    if t.normalize_features {
        let mean = xtr.mean_keepdim(0)?;
        let std = (xtr.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)? + 1e-6)?.sqrt()?;
        xtr = xtr.broadcast_sub(&mean)?.broadcast_div(&std)?;
        xva = xva.broadcast_sub(&mean)?.broadcast_div(&std)?;
    }
    drop(backbone);

    // The head: `classifier.*` (the engine gives it lr scale 1 and decays only the weight).
    let dim = xtr.dim(1)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let head = candle_nn::Linear::new(
        vb.pp("classifier")
            .get_with_hints((classes.len(), dim), "weight", Init::Const(0.0))?,
        Some(
            vb.pp("classifier")
                .get_with_hints(classes.len(), "bias", Init::Const(0.0))?,
        ),
    );
    // trunc_normal(std 0.01) as MAE's probe head, from the seeded generator.
    {
        let mut rng = TrainRng::derive(t.seed, &[0x68656164]);
        let w = beit_train::init::trunc_normal_vec(
            &mut rng,
            classes.len() * dim,
            0.0,
            0.01,
            -0.02,
            0.02,
        )?;
        let data = varmap.data().lock().expect("varmap lock");
        data["classifier.weight"].set(&Tensor::from_vec(w, (classes.len(), dim), &device)?)?;
    }
    let groups = build_param_groups(named_vars(&varmap), &GroupingConfig::pretrain(layers))?;

    let n = xtr.dim(0)?;
    let bs = t.batch_size.min(n);
    let train_cfg = TrainConfig {
        epochs: t.epochs,
        batches_per_epoch: (n / bs) as u64,
        accum_steps: 1,
        lr: t.lr,
        min_lr: t.min_lr,
        warmup_epochs: t.warmup_epochs,
        warmup_steps: None,
        weight_decay: t.weight_decay,
        weight_decay_end: None,
        clip_grad: None,
        adamw: AdamWConfig::default(),
        seed: t.seed,
        log_every: 50,
        checkpoint_every: None,
        checkpoint_each_epoch: true,
        keep_last: 1,
        show_progress: true,
    };
    write_resolved_config(&out, &cfg)?;
    let run_config = serde_json::to_value(&cfg)?;
    let mut tl = match &resume_from {
        Some(ck) => TrainLoop::resume(train_cfg, varmap.clone(), groups, &out, ck, run_config)
            .with_context(|| format!("resuming from {}", ck.display()))?,
        None => TrainLoop::new(train_cfg, varmap.clone(), groups, &out, run_config)?,
    };
    let eval = |head: &candle_nn::Linear| -> Result<(f64, f64)> {
        let mut acc = EvalAccumulator::new(classes.len());
        let nv = xva.dim(0)?;
        for s in (0..nv).step_by(4096) {
            let len = 4096.min(nv - s);
            acc.add(
                &head.forward(&xva.narrow(0, s, len)?)?,
                &yva.narrow(0, s, len)?,
            )?;
        }
        let m = acc.finish();
        Ok((m.acc1, m.acc5))
    };
    let mut best = (f64::NEG_INFINITY, 0u64);
    let mut last = (0.0, 0.0);
    while !tl.is_done() {
        let epoch = tl.position().epoch;
        // This epoch's order: a permutation drawn from (seed, epoch), so a resumed run agrees.
        let mut perm: Vec<u32> = (0..n as u32).collect();
        perm.shuffle(&mut TrainRng::derive(t.seed, &[0x7065726d, epoch]));
        let perm = Tensor::from_vec(perm, n, &device)?;
        tl.run_epoch(
            |pos, _| -> Result<(Tensor, Tensor)> {
                let idx = perm.narrow(0, pos.batch_in_epoch as usize * bs, bs)?;
                Ok((xtr.index_select(&idx, 0)?, ytr.index_select(&idx, 0)?))
            },
            |(x, y), _| -> Result<StepOutput> {
                let logits = head.forward(x)?;
                let loss = label_smoothing_cross_entropy(&logits, y, t.smoothing)?;
                let acc = logits
                    .argmax(D::Minus1)?
                    .eq(&y.to_dtype(DType::U32)?)?
                    .to_dtype(DType::F32)?
                    .mean_all()?
                    .to_scalar::<f32>()?;
                Ok(StepOutput {
                    loss,
                    batch_size: bs,
                    metrics: vec![("train_acc1".into(), 100.0 * acc as f64)],
                })
            },
        )?;
        let (a1, a5) = eval(&head)?;
        tl.record_eval(&[("acc1", a1), ("acc5", a5)], None)?;
        if a1 > best.0 {
            best = (a1, epoch);
        }
        last = (a1, a5);
    }
    let final_eval = if tl.state().step > 0 && last == (0.0, 0.0) {
        eval(&head)?
    } else {
        last
    };
    let summary = tl.finish()?;
    let head_path = out.join("linear_head.safetensors");
    varmap
        .save(&head_path)
        .with_context(|| format!("cannot write {}", head_path.display()))?;
    let mut rows = vec![
        (
            "model".to_string(),
            format!("{} (block {} of {layers})", cfg.model, cfg.layer),
        ),
        ("data".to_string(), splits.description.clone()),
        (
            "final val top-1".to_string(),
            format!("{:.2}%", final_eval.0),
        ),
        (
            "final val top-5".to_string(),
            format!("{:.2}%", final_eval.1),
        ),
    ];
    if best.0.is_finite() {
        rows.push((
            "best val top-1".into(),
            format!("{:.2}% (epoch {})", best.0, best.1),
        ));
    }
    rows.push(("head".into(), head_path.display().to_string()));
    rows.push(("metrics".into(), summary.metrics.display().to_string()));
    print_table("linear probe done", &rows);
    Ok(())
}
