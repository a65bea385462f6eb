//! `beit-cli pretrain`: masked-image-modeling pre-training (see [`crate::pretraining`]).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::pretraining::{pretrain, PretrainConfig, PretrainJob, FLAG_KEYS};
use crate::training::{CommonArgs, ResumeArg};

/// Arguments of `beit-cli pretrain`.
///
/// Example: `beit-cli pretrain --config configs/pretrain_fashion_mnist.toml --data fashion-mnist
/// --tokenizer runs/tokenizer-fmnist --output runs/pretrain-fmnist`.
#[derive(Args, Debug)]
pub struct PretrainArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    resume: ResumeArg,
    /// Frozen visual tokenizer: a folder from `beit-cli tokenizer train`, an encoder safetensors
    /// file with `dall_e` names, or DALL-E's `encoder.pkl`. Not needed for pixel regression.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Stop (with a checkpoint) after this many optimizer steps; continue later with --resume.
    #[arg(long)]
    stop_after: Option<u64>,
    /// No progress bar (logs only).
    #[arg(long)]
    quiet: bool,
}

/// Run the command.
pub fn run(args: PretrainArgs) -> Result<()> {
    let mut flags = args.common.flag_overrides(&FLAG_KEYS);
    if let Some(t) = &args.tokenizer {
        flags.push((
            "tokenizer".into(),
            toml::Value::String(t.display().to_string()),
        ));
    }
    let config: PretrainConfig =
        crate::training::load_config(args.common.config.as_deref(), &args.common.set, &flags)?;
    let resume = args.resume.checkpoint(&config.output);
    let job = PretrainJob {
        config,
        resume,
        progress: !args.quiet,
        stop_after: args.stop_after,
    };
    let out = pretrain(&job)?;
    let acc = out
        .last_mlm_acc
        .map(|a| format!(", masked-token accuracy {:.1}%", 100.0 * a))
        .unwrap_or_default();
    println!(
        "pre-training ({:.2} M parameters): {} steps in {:.0} s; loss {:.4} (first step) -> {:.4} (last step){acc}",
        out.num_params as f64 / 1e6,
        out.steps,
        out.seconds,
        out.first_loss, out.last_loss
    );
    match out.export_dir.as_ref().filter(|_| out.finished) {
        Some(dir) => println!(
            "model (BeitForMaskedImageModeling, HF layout): {}\nmetrics: {}{}",
            dir.display(),
            out.metrics.display(),
            out.plot
                .as_ref()
                .map(|p| format!("\ncurves: {}", p.display()))
                .unwrap_or_default()
        ),
        None => println!(
            "stopped before the end of the schedule; continue with --resume (metrics: {})",
            out.metrics.display()
        ),
    }
    Ok(())
}
