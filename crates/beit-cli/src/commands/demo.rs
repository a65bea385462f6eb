//! `beit-cli demo`: the paper's claim on real data in one command, on a CPU
//! (`beit_recipes::demo`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use beit_recipes::demo::{demo, final_acc1, DemoConfig, DemoJob, DEMO_TOML};
use beit_recipes::World;
use clap::Args;

/// The one-command demo: dVAE tokenizer -> MIM pre-training -> fine-tuning on a few labels per
/// class, against the same model fine-tuned from random init, on the Fashion-MNIST images
/// compiled into the binary (no download). The recipe is `configs/demo.toml`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Output folder (one sub-folder per stage, summary.json).
    #[arg(long, default_value = "runs/demo")]
    output: PathBuf,
    /// A tiny version (a minute or so) that exercises every stage; its accuracies mean little.
    #[arg(long)]
    quick: bool,
    /// Recipe to use instead of the built-in `configs/demo.toml`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a recipe value, e.g. `--set finetune.data.train_per_class=100`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Seed of every stage's training (initialisation, batches, augmentation, masks); the
    /// images stay the same. Overrides the recipe's `*.train.seed`.
    #[arg(long)]
    seed: Option<u64>,
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

/// Run the command.
pub fn run(args: DemoArgs, world: &World) -> Result<()> {
    let (text, origin) = match &args.config {
        Some(p) => (
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            p.display().to_string(),
        ),
        None => (DEMO_TOML.to_string(), "built-in configs/demo.toml".into()),
    };
    let mut config = DemoConfig::parse(&text, &origin, args.quick, &args.set)?;
    if let Some(seed) = args.seed {
        config.set_seed(seed);
    }
    println!(
        "BEiT demo{}: dVAE tokenizer -> MIM pre-training -> fine-tuning vs. random init; output \
         in {}",
        if args.quick { " (quick)" } else { "" },
        args.output.display()
    );
    let out = demo(
        &DemoJob {
            config,
            output: args.output.clone(),
            device: args.device.parse().map_err(anyhow::Error::msg)?,
            overwrite: args.overwrite,
            progress: !args.quiet,
            quick: args.quick,
            world: world.clone(),
        },
        |line| println!("{line}"),
    )?;
    println!();
    println!("BEiT demo summary ({})", out.finetune_pretrained.data);
    let w = out.stages.iter().map(|r| r.stage.len()).max().unwrap_or(0);
    println!("  {:<w$}  {:>8}  result", "stage", "time");
    for r in &out.stages {
        println!("  {:<w$}  {:>7.0}s  {}", r.stage, r.seconds, r.result);
    }
    println!("  {:<w$}  {:>7.0}s", "total", out.seconds);
    println!();
    let (a, b) = (
        final_acc1(&out.finetune_pretrained),
        final_acc1(&out.finetune_scratch),
    );
    println!(
        "test accuracy: {a:.2}% with BEiT pre-training vs {b:.2}% from random init ({:+.2} points)",
        a - b
    );
    println!(
        "linear probe (frozen features, block {}): {:.2}% pre-trained vs {:.2}% random init ({:+.2} \
         points)",
        out.probe_pretrained.layer,
        out.probe_pretrained.final_acc.0,
        out.probe_random_init.final_acc.0,
        out.probe_pretrained.final_acc.0 - out.probe_random_init.final_acc.0
    );
    println!(
        "curves: {}/{{pretrain,finetune-pretrained,finetune-scratch,probe-*}}/curves.png; summary: {}",
        args.output.display(),
        out.summary.display()
    );
    Ok(())
}
