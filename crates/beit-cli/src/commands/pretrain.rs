//! `beit-cli pretrain`: masked-image-modeling pre-training (`beit_recipes::pretrain`).

use std::path::PathBuf;

use anyhow::Result;
use beit_recipes::{pretrain, PretrainConfig, PretrainJob, World};
use clap::Args;

use crate::args::{path_value, CommonArgs, ResumeArg};

/// Masked-image-modeling pre-training (the paper's recipe; random-masking, pixel-regression and
/// all-tokens ablations through `masking.strategy` and `objective.target`).
///
/// Settings: `--config configs/pretrain_*.toml` (omitted fields: the paper's BEiT-base recipe),
/// `--set` overrides, then flags. `--model` starts from a MIM checkpoint's weights. The run
/// directory gets `config.toml`, `metrics.jsonl`, `curves.png`, checkpoints and, at the end,
/// `model/` (BeitForMaskedImageModeling in Hugging Face layout, ready for `finetune --model`).
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
    /// Write each micro-batch the model trains on (patch-view pixels, masks, visual-token ids)
    /// as `batch-NNNNNN.safetensors` into this folder, and the initial weights under its
    /// `model/` (HF layout), for a step-for-step comparison with PyTorch
    /// (`scripts/peers/mim_peer.py`).
    #[arg(long)]
    dump_batches: Option<PathBuf>,
    /// Print the resolved configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

/// Run the command.
pub fn run(args: PretrainArgs, world: &World) -> Result<()> {
    let extra = args
        .tokenizer
        .iter()
        .map(|t| ("tokenizer".to_string(), path_value(t)))
        .collect();
    let config: PretrainConfig = args.common.resolve(extra)?;
    if args.print_config {
        print!("{}", toml::to_string_pretty(&config)?);
        return Ok(());
    }
    let resume = args.resume.checkpoint(&config.output);
    let out = pretrain(&PretrainJob {
        config,
        resume,
        progress: !args.common.quiet,
        stop_after: args.stop_after,
        world: world.clone(),
        dump_batches: args.dump_batches,
    })?;
    if !world.is_primary() {
        return Ok(()); // rank 0 prints the summary
    }
    let acc = out
        .last_mlm_acc
        .map(|a| format!(", masked-token accuracy {:.1}%", 100.0 * a))
        .unwrap_or_default();
    println!(
        "pre-training ({:.2} M parameters): {} steps in {:.0} s; loss {:.4} (first step) -> {:.4} (last step){acc}",
        out.num_params as f64 / 1e6,
        out.steps,
        out.seconds,
        out.first_loss,
        out.last_loss
    );
    match &out.export_dir {
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
