//! `beit-cli demo`: the paper's claim on real data in one command, on a CPU.
//!
//! Trains a dVAE tokenizer on the Fashion-MNIST images embedded in `beit-data` (no download),
//! pre-trains a small BEiT on them with masked image modeling, fine-tunes it on a few labelled
//! images per class, and fine-tunes the same architecture from random initialisation with the
//! same budget; both are evaluated on the held-out test images. The recipe is
//! `configs/demo.toml`, compiled into the binary.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use beit_data::{
    Dataset, EvalResize, EvalTransform, FashionMnist, Filter, Loader, LoaderConfig, Normalize,
    RandomResizedCrop, TrainTransform,
};
use beit_model::load::Checkpoint;
use beit_model::{BeitConfig, ForwardOptions};
use beit_tokenizer::train::TokenizerTrainFile;
use beit_train::{
    build_param_groups, label_smoothing_cross_entropy, named_vars, topk_accuracy, AdamWConfig,
    GroupingConfig, StepOutput, TrainConfig, TrainLoop,
};
use clap::Args;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::pretraining::{pretrain, PretrainConfig, PretrainJob};
use crate::training::{
    classifier_logits, evaluate, finetune_config, log_load_report, parse_set, set_dotted,
    trainable_classifier, EvalMetrics, Subset,
};

/// The built-in recipe.
const DEMO_TOML: &str = include_str!("../../../../configs/demo.toml");

/// Arguments of `beit-cli demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Output folder (one sub-folder per stage, summary.json).
    #[arg(long, default_value = "runs/demo")]
    output: PathBuf,
    /// A tiny version (a minute or so) that exercises every stage; its accuracies mean nothing.
    #[arg(long)]
    quick: bool,
    /// Recipe to use instead of the built-in `configs/demo.toml`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a recipe value, e.g. `--set finetune.labels_per_class=100`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Replace the stage folders of an earlier demo run in OUTPUT.
    #[arg(long)]
    overwrite: bool,
    /// Device: cpu, cuda[:N], metal[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
    /// No progress bars (logs only).
    #[arg(long)]
    quiet: bool,
}

/// The demo recipe (`configs/demo.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoConfig {
    /// The dVAE and its training.
    pub tokenizer: TokenizerTrainFile,
    /// MIM pre-training (data, tokenizer, output and device are set by the demo).
    pub pretrain: PretrainConfig,
    /// Fine-tuning of both classifiers.
    pub finetune: FinetuneSection,
}

/// `[finetune]` of the demo recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneSection {
    /// Labelled training images per class (the first ones of each class).
    pub labels_per_class: usize,
    /// Epochs over the labelled images.
    pub epochs: u64,
    /// Images per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate.
    pub min_lr: f64,
    /// Warm-up epochs.
    pub warmup_epochs: u64,
    /// Layer-wise learning-rate decay.
    pub layer_decay: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Stochastic depth.
    pub drop_path_rate: f64,
    /// Label smoothing.
    pub label_smoothing: f64,
    /// Random-resized-crop area range.
    pub crop_scale: [f64; 2],
    /// Horizontal flip probability.
    pub hflip: f64,
    /// Evaluate on the test images every this many epochs (and at the end).
    pub eval_every: u64,
    /// Seed of the head init, data order and augmentation.
    pub seed: u64,
    /// Evaluate on the first this many test images only (default: all 1,000).
    #[serde(default)]
    pub test_images: Option<usize>,
}

/// What each stage reported.
#[derive(Debug, Clone, Serialize)]
struct StageResult {
    stage: String,
    seconds: f64,
    result: String,
}

/// Overrides making the quick version.
const QUICK: &[&str] = &[
    "tokenizer.train.steps=4",
    "tokenizer.train.batch_size=16",
    "tokenizer.train.warmup_steps=2",
    "tokenizer.train.kl_warmup_steps=5",
    "tokenizer.train.log_every=5",
    "tokenizer.train.checkpoint_every=0",
    "pretrain.data.limit=128",
    "pretrain.train.epochs=2",
    "pretrain.train.batch_size=32",
    "pretrain.train.log_every=2",
    "finetune.labels_per_class=8",
    "finetune.epochs=2",
    "finetune.batch_size=16",
    "finetune.warmup_epochs=1",
    "finetune.eval_every=2",
    "finetune.test_images=200",
];

fn load_recipe(args: &DemoArgs) -> Result<DemoConfig> {
    let (text, origin) = match &args.config {
        Some(p) => (
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            p.display().to_string(),
        ),
        None => (
            DEMO_TOML.to_string(),
            "built-in configs/demo.toml".to_string(),
        ),
    };
    if let Err(e) = toml::from_str::<DemoConfig>(&text) {
        bail!("config {origin}: {}", e.to_string().trim_end());
    }
    let mut table: toml::Table = text.parse().with_context(|| format!("config {origin}"))?;
    let quick = if args.quick { QUICK } else { &[] };
    for item in quick
        .iter()
        .map(|s| s.to_string())
        .chain(args.set.iter().cloned())
    {
        let (key, value) = parse_set(&item)?;
        set_dotted(&mut table, &key, value).with_context(|| format!("--set `{item}`"))?;
    }
    DemoConfig::deserialize(toml::Value::Table(table))
        .map_err(|e| anyhow::anyhow!("config {origin}: {}", e.to_string().trim_end()))
}

/// Run the command.
pub fn run(args: DemoArgs) -> Result<()> {
    let recipe = load_recipe(&args)?;
    let device = crate::device::parse_device(&args.device)?;
    let out = &args.output;
    let stages = [
        "tokenizer",
        "pretrain",
        "finetune-pretrained",
        "finetune-scratch",
    ];
    for s in stages {
        let dir = out.join(s);
        if dir.exists() {
            if !args.overwrite {
                bail!(
                    "{} exists (an earlier demo run): pass --overwrite to replace it, or choose \
                     another --output",
                    dir.display()
                );
            }
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(
        out.join("demo_config.toml"),
        toml::to_string_pretty(&recipe).context("serialising the recipe")?,
    )?;
    let total = Instant::now();
    let mut results: Vec<StageResult> = Vec::new();
    println!(
        "BEiT demo{}: dVAE tokenizer -> MIM pre-training -> fine-tuning on {} labels/class, vs. \
         random init; output in {}",
        if args.quick { " (quick)" } else { "" },
        recipe.finetune.labels_per_class,
        out.display()
    );

    // 1. Tokenizer (the `tokenizer train` command itself, on its own config file).
    println!(
        "[1/4] training the dVAE tokenizer ({} steps)",
        recipe.tokenizer.train.steps
    );
    let t = Instant::now();
    let tok_dir = out.join("tokenizer");
    std::fs::create_dir_all(&tok_dir)?;
    let tok_cfg = out.join("tokenizer_config.toml");
    std::fs::write(&tok_cfg, toml::to_string_pretty(&recipe.tokenizer)?)?;
    crate::commands::tokenizer::run(crate::commands::tokenizer::TokenizerCommand::Train(
        crate::commands::tokenizer::TrainArgs {
            config: tok_cfg,
            data: "fashion-mnist".into(),
            output: tok_dir.clone(),
            resume: false,
            steps: None,
            device: args.device.clone(),
            quiet: args.quiet,
        },
    ))
    .context("stage 1 (tokenizer)")?;
    let tok_eval: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tok_dir.join("eval.json")).context("reading tokenizer eval")?,
    )?;
    results.push(StageResult {
        stage: "1. dVAE tokenizer".into(),
        seconds: t.elapsed().as_secs_f64(),
        result: format!(
            "held-out recon. MSE {:.4} ({:.0}% of mean-image baseline), {} codes used",
            tok_eval["heldout_mse"].as_f64().unwrap_or(f64::NAN),
            100.0 * tok_eval["mse_ratio"].as_f64().unwrap_or(f64::NAN),
            tok_eval["codes_used"]
        ),
    });

    // 2. MIM pre-training.
    let mut pcfg = recipe.pretrain.clone();
    pcfg.output = out.join("pretrain");
    pcfg.device = args.device.clone();
    pcfg.tokenizer = Some(tok_dir.clone());
    pcfg.init = None;
    pcfg.data.source = Some("fashion-mnist".into());
    println!(
        "[2/4] MIM pre-training ({} epochs on the unlabelled training images)",
        pcfg.train.epochs
    );
    let t = Instant::now();
    let pre = pretrain(&PretrainJob {
        config: pcfg,
        resume: None,
        progress: !args.quiet,
        stop_after: None,
    })
    .context("stage 2 (pre-training)")?;
    let model_dir = pre
        .export_dir
        .clone()
        .context("pre-training stopped early")?;
    results.push(StageResult {
        stage: "2. MIM pre-training".into(),
        seconds: t.elapsed().as_secs_f64(),
        result: format!(
            "{} steps, loss {:.3} -> {:.3}, masked-token acc. {:.1}%",
            pre.steps,
            pre.first_loss,
            pre.last_loss,
            100.0 * pre.last_mlm_acc.unwrap_or(f64::NAN)
        ),
    });

    // 3 and 4. Fine-tuning from the pre-trained model and from scratch, same budget.
    let data = FashionMnist::embedded()?;
    let ft = &recipe.finetune;
    let labelled = labelled_subset(&data.train, ft.labels_per_class)?;
    let test: Arc<dyn Dataset> = match ft.test_images {
        Some(n) => Arc::new(Subset::new(
            Arc::new(data.test.clone()),
            (0..n.min(data.test.len())).collect(),
        )),
        None => Arc::new(data.test.clone()),
    };
    let classes: Vec<String> = data.class_names().iter().map(|s| s.to_string()).collect();
    let ckpt = Checkpoint::from_dir(&model_dir)?;
    let mut accs = Vec::new();
    for (i, (name, init)) in [("pretrained", Some(&ckpt)), ("scratch", None)]
        .into_iter()
        .enumerate()
    {
        println!(
            "[{}/4] fine-tuning {} on {} labelled images, {} epochs",
            i + 3,
            if init.is_some() {
                "the pre-trained BEiT"
            } else {
                "the same BEiT from random init"
            },
            labelled.len(),
            ft.epochs
        );
        let t = Instant::now();
        let m = finetune_and_eval(
            &ckpt.config,
            init,
            labelled.clone(),
            test.clone(),
            &classes,
            ft,
            &out.join(format!("finetune-{name}")),
            &device,
            !args.quiet,
        )
        .with_context(|| format!("stage {} (fine-tuning, {name})", i + 3))?;
        results.push(StageResult {
            stage: format!(
                "{}. fine-tune, {}",
                i + 3,
                if init.is_some() {
                    "from MIM pre-training"
                } else {
                    "from random init"
                }
            ),
            seconds: t.elapsed().as_secs_f64(),
            result: format!(
                "test top-1 {:.2}% (top-5 {:.2}%) on {} held-out images",
                m.acc1, m.acc5, m.images
            ),
        });
        accs.push(m.acc1);
    }

    let total_s = total.elapsed().as_secs_f64();
    let summary = serde_json::json!({
        "quick": args.quick,
        "labelled_images": labelled.len(),
        "test_images": test.len(),
        "accuracy_pretrained": accs[0],
        "accuracy_scratch": accs[1],
        "stages": results,
        "total_seconds": total_s,
        "threads": rayon::current_num_threads(),
    });
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    println!();
    println!(
        "BEiT demo summary (Fashion-MNIST, {} labelled training images, {} test images)",
        labelled.len(),
        test.len()
    );
    let w = results.iter().map(|r| r.stage.len()).max().unwrap_or(0);
    println!("  {:<w$}  {:>8}  result", "stage", "time");
    for r in &results {
        println!("  {:<w$}  {:>7.0}s  {}", r.stage, r.seconds, r.result);
    }
    println!("  {:<w$}  {:>7.0}s", "total", total_s);
    println!();
    println!(
        "test accuracy: {:.2}% with BEiT pre-training vs {:.2}% from random init ({:+.2} points)",
        accs[0],
        accs[1],
        accs[0] - accs[1]
    );
    println!(
        "curves: {}/{{pretrain,finetune-pretrained,finetune-scratch}}/curves.png; summary: {}",
        out.display(),
        out.join("summary.json").display()
    );
    Ok(())
}

/// The first `per_class` images of each class.
fn labelled_subset(train: &beit_data::MnistSplit, per_class: usize) -> Result<Arc<dyn Dataset>> {
    if per_class == 0 {
        bail!("finetune.labels_per_class must be at least 1");
    }
    let mut counts = [0usize; 10];
    let mut idx = Vec::new();
    for i in 0..train.len() {
        let c = train.label(i) as usize;
        if counts[c] < per_class {
            counts[c] += 1;
            idx.push(i);
        }
    }
    if counts.iter().any(|&c| c < per_class) {
        bail!("finetune.labels_per_class = {per_class}: some class has fewer training images");
    }
    Ok(Arc::new(Subset::new(Arc::new(train.clone()), idx)))
}

/// Fine-tune a classifier of `source`'s architecture (from `init`, or random) and evaluate it.
#[allow(clippy::too_many_arguments)]
fn finetune_and_eval(
    source: &BeitConfig,
    init: Option<&Checkpoint>,
    train: Arc<dyn Dataset>,
    test: Arc<dyn Dataset>,
    classes: &[String],
    ft: &FinetuneSection,
    out: &Path,
    device: &candle::Device,
    progress: bool,
) -> Result<EvalMetrics> {
    let size = source.image_size as u32;
    let cfg = finetune_config(source, classes, ft.drop_path_rate, source.image_size);
    let (varmap, model, report) = trainable_classifier(&cfg, init, device, ft.seed)?;
    if init.is_some() {
        log_load_report(&report);
    }
    let train_tf = TrainTransform {
        crop: RandomResizedCrop {
            scale: (ft.crop_scale[0], ft.crop_scale[1]),
            ..RandomResizedCrop::new(size)
        },
        hflip: ft.hflip,
        color_jitter: None,
        rand_augment: None,
        normalize: Normalize::HALF,
        random_erasing: None,
    };
    let eval_tf = EvalTransform {
        size,
        resize: EvalResize::Squash,
        interpolation: Filter::Bicubic,
        normalize: Normalize::HALF,
    };
    let loader = Loader::new(
        train,
        Arc::new(train_tf),
        LoaderConfig {
            batch_size: ft.batch_size,
            shuffle: true,
            drop_last: true,
            seed: ft.seed,
            num_threads: 1,
            ..LoaderConfig::default()
        },
        device.clone(),
    )?;
    let test_loader = Loader::new(
        test,
        Arc::new(eval_tf),
        LoaderConfig {
            batch_size: 250,
            shuffle: false,
            num_threads: 1,
            ..LoaderConfig::default()
        },
        device.clone(),
    )?;
    let groups = build_param_groups(
        named_vars(&varmap),
        &GroupingConfig::finetune(cfg.num_hidden_layers, ft.layer_decay),
    )?;
    let tcfg = TrainConfig {
        epochs: ft.epochs,
        batches_per_epoch: loader.batches_per_epoch() as u64,
        accum_steps: 1,
        lr: ft.lr,
        min_lr: ft.min_lr,
        warmup_epochs: ft.warmup_epochs,
        warmup_steps: None,
        weight_decay: ft.weight_decay,
        weight_decay_end: None,
        clip_grad: None,
        adamw: AdamWConfig::default(),
        seed: ft.seed,
        log_every: 50,
        checkpoint_every: None,
        checkpoint_each_epoch: false,
        keep_last: 1,
        show_progress: progress,
    };
    let mut tl = TrainLoop::new(
        tcfg,
        varmap.clone(),
        groups,
        out,
        serde_json::json!({"command": "demo finetune", "finetune": ft, "pretrained": init.is_some()}),
    )?;
    let opts = ForwardOptions::train();
    let mut last = None;
    while !tl.is_done() {
        let epoch = tl.position().epoch;
        let mut batches = loader.epoch(epoch)?;
        tl.run_epoch(
            |_, _| -> Result<beit_data::Batch> {
                batches
                    .next()
                    .context("the epoch ended early")?
                    .map_err(Into::into)
            },
            |b, rng| -> Result<StepOutput> {
                model.backbone().rng().reseed(rng.next_u64());
                let labels = b.labels.as_ref().context("unlabelled batch")?;
                let logits = model.forward(&b.images, opts)?.logits;
                let loss = label_smoothing_cross_entropy(&logits, labels, ft.label_smoothing)?;
                let acc = topk_accuracy(&logits, labels, &[1])?[0];
                Ok(StepOutput {
                    loss,
                    batch_size: b.len(),
                    metrics: vec![("train_acc1".into(), acc)],
                })
            },
        )?;
        let done = epoch + 1;
        if done % ft.eval_every.max(1) == 0 || tl.is_done() {
            let m = evaluate(&test_loader, classes.len(), false, |x| {
                classifier_logits(&model, x)
            })?;
            tl.record_eval(
                &[("acc1", m.acc1), ("acc5", m.acc5), ("eval_loss", m.loss)],
                None,
            )?;
            last = Some(m);
        }
    }
    tl.finish()?;
    last.context("no evaluation was run")
}
