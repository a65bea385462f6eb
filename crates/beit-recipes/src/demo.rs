//! The demo: the paper's claim on real data in one call, on a CPU.
//!
//! Trains a dVAE tokenizer on the Fashion-MNIST images embedded in `beit-data` (no download)
//! ([`train_tokenizer`]), pre-trains a small BEiT on them with masked image modeling
//! ([`pretrain`]), fine-tunes it on a few labelled images per class ([`finetune`]), and
//! fine-tunes the same architecture from random initialisation with the same budget; both are
//! evaluated on the held-out test images. Last, a linear probe of the frozen features of the
//! pre-trained model and of the same architecture at random init ([`linear_probe`]), on the same
//! labelled images: what pre-training put into the features, apart from fine-tuning. Each stage
//! is the same job its command runs. The recipe is `configs/demo.toml`, compiled in.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::parse_config;
use crate::device::DeviceSpec;
use crate::distributed::World;
use crate::finetune::{finetune, FinetuneConfig, FinetuneJob, FinetuneOutcome};
use crate::linear_probe::{linear_probe, LinearProbeConfig, LinearProbeJob, LinearProbeOutcome};
use crate::pretrain::{pretrain, PretrainConfig, PretrainJob, PretrainOutcome};
use crate::tokenizer::{train_tokenizer, TokenizerConfig, TokenizerJob, TokenizerOutcome};

/// The built-in recipe.
pub const DEMO_TOML: &str = include_str!("../../../configs/demo.toml");

/// The dataset every stage uses.
const DATA: &str = "fashion-mnist";

/// Overrides making the quick version (every stage in about a minute on 2 cores).
pub const QUICK: &[&str] = &[
    "tokenizer.train.epochs=1",
    "tokenizer.data.max_train_samples=512",
    "tokenizer.train.warmup_steps=2",
    "tokenizer.objective.kl_warmup_steps=5",
    "tokenizer.train.log_every=5",
    "pretrain.data.max_train_samples=256",
    "pretrain.train.epochs=2",
    "pretrain.train.batch_size=32",
    "pretrain.train.log_every=2",
    "finetune.data.train_per_class=10",
    "finetune.train.epochs=3",
    "finetune.train.batch_size=20",
    "finetune.train.warmup_epochs=1",
    "finetune.train.eval_every=3",
    "finetune.data.max_val_samples=200",
    "probe.train.epochs=3",
];

/// The stages, in order: their output folders.
const STAGES: [&str; 6] = [
    "tokenizer",
    "pretrain",
    "finetune-pretrained",
    "finetune-scratch",
    "probe-pretrained",
    "probe-random-init",
];

/// The demo recipe (`configs/demo.toml`): one table per stage, each the schema of its command.
/// Data, outputs, devices and the stages' links (tokenizer -> pre-training -> fine-tuning) are
/// set by the demo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DemoConfig {
    /// The dVAE and its training.
    pub tokenizer: TokenizerConfig,
    /// MIM pre-training.
    pub pretrain: PretrainConfig,
    /// Fine-tuning of both classifiers (`data.train_per_class` labelled images per class).
    pub finetune: FinetuneConfig,
    /// The linear probes (their data is the fine-tuning's: the same labelled images and test
    /// images).
    pub probe: LinearProbeConfig,
}

impl DemoConfig {
    /// The recipe `text` (from `origin`) with the quick overrides (when `quick`) and `sets`.
    pub fn parse(text: &str, origin: &str, quick: bool, sets: &[String]) -> Result<Self> {
        let quick = if quick { QUICK } else { &[] };
        let sets: Vec<String> = quick
            .iter()
            .map(|s| s.to_string())
            .chain(sets.iter().cloned())
            .collect();
        parse_config(Some((text, origin)), &sets, &[])
    }

    /// Seed every stage's training (`tokenizer.train.seed`, `pretrain.train.seed`,
    /// `finetune.train.seed`, `probe.train.seed`): the dVAE's and the BEiT's initialisation, the
    /// sampling of batches, augmentations, masks and drop path. The images (the labelled subset
    /// included) stay the same.
    pub fn set_seed(&mut self, seed: u64) {
        self.tokenizer.train.seed = seed;
        self.pretrain.train.seed = seed;
        self.finetune.train.seed = seed;
        self.probe.train.seed = seed;
    }
}

/// A demo run.
#[derive(Debug, Clone)]
pub struct DemoJob {
    /// The recipe.
    pub config: DemoConfig,
    /// Output folder (one sub-folder per stage, `summary.json`).
    pub output: PathBuf,
    /// Device of every stage.
    pub device: DeviceSpec,
    /// Replace the stage folders of an earlier run.
    pub overwrite: bool,
    /// Progress bars.
    pub progress: bool,
    /// Marked in the summary (the quick overrides are already in `config`).
    pub quick: bool,
    /// The processes every stage is spread over (a single one by default).
    pub world: World,
}

/// What one stage reported.
#[derive(Debug, Clone, Serialize)]
pub struct StageResult {
    /// The stage.
    pub stage: String,
    /// Its wall time.
    pub seconds: f64,
    /// A one-line result.
    pub result: String,
}

/// What the demo produced.
#[derive(Debug, Clone)]
pub struct DemoOutcome {
    /// The tokenizer stage.
    pub tokenizer: TokenizerOutcome,
    /// The pre-training stage.
    pub pretrain: PretrainOutcome,
    /// Fine-tuning from the pre-trained model.
    pub finetune_pretrained: FinetuneOutcome,
    /// Fine-tuning the same architecture from random init.
    pub finetune_scratch: FinetuneOutcome,
    /// Linear probe of the pre-trained features.
    pub probe_pretrained: LinearProbeOutcome,
    /// Linear probe of the same architecture's features at random init.
    pub probe_random_init: LinearProbeOutcome,
    /// One line per stage.
    pub stages: Vec<StageResult>,
    /// Wall time of the whole demo.
    pub seconds: f64,
    /// `summary.json`.
    pub summary: PathBuf,
}

/// The final top-1 of a fine-tuning run.
pub fn final_acc1(o: &FinetuneOutcome) -> f64 {
    o.last_eval
        .as_ref()
        .and_then(|e| e.metrics.get("acc1").copied())
        .unwrap_or(f64::NAN)
}

/// Refuse (or, with `overwrite`, clear) the stage folders of an earlier run, then create the
/// output folder with the recipe in it (`demo_config.toml`).
fn prepare_output(job: &DemoJob) -> Result<()> {
    let out = &job.output;
    for s in STAGES {
        let dir = out.join(s);
        if dir.exists() {
            if !job.overwrite {
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
        toml::to_string_pretty(&job.config).context("serialising the recipe")?,
    )?;
    Ok(())
}

/// Stage 1: the dVAE tokenizer.
fn stage_tokenizer(job: &DemoJob, results: &mut Vec<StageResult>) -> Result<TokenizerOutcome> {
    let mut tcfg = job.config.tokenizer.clone();
    tcfg.output = job.output.join("tokenizer");
    tcfg.device = job.device;
    tcfg.data.source = DATA.into();
    let t = Instant::now();
    let tok = train_tokenizer(&TokenizerJob {
        config: tcfg,
        resume: false,
        stop_after: None,
        progress: job.progress,
        world: job.world.clone(),
    })
    .context("stage 1 (tokenizer)")?;
    results.push(StageResult {
        stage: "1. dVAE tokenizer".into(),
        seconds: t.elapsed().as_secs_f64(),
        result: format!(
            "held-out recon. MSE {:.4} ({:.0}% of mean-image baseline), {} codes used",
            tok.eval.mse,
            100.0 * tok.eval.mse / tok.baseline_mse,
            tok.eval.codebook.used
        ),
    });
    Ok(tok)
}

/// Stage 2: MIM pre-training with the stage-1 tokenizer.
fn stage_pretrain(
    job: &DemoJob,
    tokenizer: &Path,
    results: &mut Vec<StageResult>,
) -> Result<PretrainOutcome> {
    let mut pcfg = job.config.pretrain.clone();
    pcfg.output = job.output.join("pretrain");
    pcfg.device = job.device;
    pcfg.tokenizer = Some(tokenizer.to_path_buf());
    pcfg.model = None;
    pcfg.data.source = DATA.into();
    let t = Instant::now();
    let pre = pretrain(&PretrainJob {
        config: pcfg,
        resume: None,
        progress: job.progress,
        stop_after: None,
        world: job.world.clone(),
        dump_batches: None,
    })
    .context("stage 2 (pre-training)")?;
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
    Ok(pre)
}

/// Stage 3 (`pretrained`) or 4: fine-tuning from the pre-trained model or the same
/// architecture from random init, same budget.
fn stage_finetune(
    job: &DemoJob,
    model_dir: &Path,
    pretrained: bool,
    announce: &mut dyn FnMut(&str),
    results: &mut Vec<StageResult>,
) -> Result<FinetuneOutcome> {
    let (stage, name) = if pretrained {
        (3, "pretrained")
    } else {
        (4, "scratch")
    };
    let mut fcfg = job.config.finetune.clone();
    fcfg.output = job.output.join(format!("finetune-{name}"));
    fcfg.device = job.device;
    fcfg.model = Some(model_dir.display().to_string());
    fcfg.pretrained = pretrained;
    fcfg.data.source = DATA.into();
    announce(&format!(
        "[{stage}/5] fine-tuning {} on {} labelled images per class, {} epochs",
        if pretrained {
            "the pre-trained BEiT"
        } else {
            "the same BEiT from random init"
        },
        fcfg.data
            .train_per_class
            .map_or("all".to_string(), |n| n.to_string()),
        fcfg.train.epochs
    ));
    let t = Instant::now();
    let m = finetune(&FinetuneJob {
        config: fcfg,
        resume: None,
        download: false,
        stop_after: None,
        progress: job.progress,
        world: job.world.clone(),
    })
    .with_context(|| format!("stage {stage} (fine-tuning, {name})"))?;
    let from = if pretrained {
        "from MIM pre-training"
    } else {
        "from random init"
    };
    results.push(StageResult {
        stage: format!("{stage}. fine-tune, {from}"),
        seconds: t.elapsed().as_secs_f64(),
        result: format!("test top-1 {:.2}% ({})", final_acc1(&m), m.data),
    });
    Ok(m)
}

/// Stage 5: linear probes of the frozen features, pre-trained and at random init.
fn stage_probes(
    job: &DemoJob,
    model_dir: &Path,
    results: &mut Vec<StageResult>,
) -> Result<(LinearProbeOutcome, LinearProbeOutcome)> {
    let t = Instant::now();
    let probe = |pretrained: bool| -> Result<LinearProbeOutcome> {
        let mut lcfg = job.config.probe.clone();
        lcfg.output = job
            .output
            .join(if pretrained { STAGES[4] } else { STAGES[5] });
        lcfg.device = job.device;
        lcfg.model = Some(model_dir.display().to_string());
        lcfg.pretrained = pretrained;
        lcfg.data = job.config.finetune.data.clone();
        lcfg.data.source = DATA.into();
        linear_probe(&LinearProbeJob {
            config: lcfg,
            resume: None,
            download: false,
            progress: job.progress,
            world: job.world.clone(),
        })
        .context("stage 5 (linear probe)")
    };
    let pretrained = probe(true)?;
    let random_init = probe(false)?;
    results.push(StageResult {
        stage: "5. linear probes".into(),
        seconds: t.elapsed().as_secs_f64(),
        result: format!(
            "test top-1 {:.2}% pre-trained vs {:.2}% random init (block {})",
            pretrained.final_acc.0, random_init.final_acc.0, pretrained.layer
        ),
    });
    Ok((pretrained, random_init))
}

/// Run the demo: tokenizer -> pre-training -> fine-tuning from it and from scratch -> linear
/// probes of both backbones.
pub fn demo(job: &DemoJob, mut announce: impl FnMut(&str)) -> Result<DemoOutcome> {
    prepare_output(job)?;
    let total = Instant::now();
    let mut results = Vec::new();
    announce(&format!(
        "[1/5] training the dVAE tokenizer ({} epochs)",
        job.config.tokenizer.train.epochs
    ));
    let tok = stage_tokenizer(job, &mut results)?;
    announce(&format!(
        "[2/5] MIM pre-training ({} epochs on the unlabelled training images)",
        job.config.pretrain.train.epochs
    ));
    let pre = stage_pretrain(job, &tok.output, &mut results)?;
    let model_dir = pre
        .export_dir
        .clone()
        .context("pre-training stopped early")?;
    let pretrained = stage_finetune(job, &model_dir, true, &mut announce, &mut results)?;
    let scratch = stage_finetune(job, &model_dir, false, &mut announce, &mut results)?;
    announce(&format!(
        "[5/5] linear probes of the frozen features (pre-trained, random init), {} epochs",
        job.config.probe.train.epochs
    ));
    let (probe_pretrained, probe_random_init) = stage_probes(job, &model_dir, &mut results)?;
    let outcome = DemoOutcome {
        tokenizer: tok,
        pretrain: pre,
        finetune_pretrained: pretrained,
        finetune_scratch: scratch,
        probe_pretrained,
        probe_random_init,
        stages: results,
        seconds: total.elapsed().as_secs_f64(),
        summary: job.output.join("summary.json"),
    };
    write_summary(job, &outcome)?;
    Ok(outcome)
}

/// `summary.json`: the stages' headline numbers, seeds and timings.
fn write_summary(job: &DemoJob, o: &DemoOutcome) -> Result<()> {
    let json = serde_json::json!({
        "loss_first_last": {
            "tokenizer": o.tokenizer.loss_first_last,
            "pretrain": [o.pretrain.first_loss, o.pretrain.last_loss],
            "finetune_pretrained": o.finetune_pretrained.loss_first_last,
            "finetune_scratch": o.finetune_scratch.loss_first_last,
        },
        "quick": job.quick,
        "seeds": {
            "tokenizer": job.config.tokenizer.train.seed,
            "pretrain": job.config.pretrain.train.seed,
            "finetune": job.config.finetune.train.seed,
        },
        "labels_per_class": job.config.finetune.data.train_per_class,
        "data": o.finetune_pretrained.data,
        "accuracy_pretrained": final_acc1(&o.finetune_pretrained),
        "accuracy_scratch": final_acc1(&o.finetune_scratch),
        "probe_accuracy_pretrained": o.probe_pretrained.final_acc.0,
        "probe_accuracy_random_init": o.probe_random_init.final_acc.0,
        "probe_layer": o.probe_pretrained.layer,
        "stages": o.stages,
        "total_seconds": o.seconds,
        "threads": rayon::current_num_threads(),
    });
    let path = &o.summary;
    std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_recipe_and_its_quick_version_parse() {
        let full = DemoConfig::parse(DEMO_TOML, "demo.toml", false, &[]).unwrap();
        let quick = DemoConfig::parse(DEMO_TOML, "demo.toml", true, &[]).unwrap();
        assert!(quick.pretrain.train.epochs < full.pretrain.train.epochs);
        assert_eq!(quick.finetune.data.train_per_class, Some(10));
        let e = DemoConfig::parse(
            DEMO_TOML,
            "demo.toml",
            false,
            &["finetune.train.lrr=1".into()],
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("lrr"), "{e:#}");
        let mut seeded = full.clone();
        seeded.set_seed(7);
        assert_eq!(
            (
                seeded.tokenizer.train.seed,
                seeded.pretrain.train.seed,
                seeded.finetune.train.seed,
                seeded.probe.train.seed
            ),
            (7, 7, 7, 7)
        );
        // The probes read the last block of the pre-trained model.
        assert_eq!(
            Some(full.probe.layer),
            full.pretrain.architecture.num_hidden_layers
        );
        assert_eq!(seeded.finetune.data, full.finetune.data);
    }
}
