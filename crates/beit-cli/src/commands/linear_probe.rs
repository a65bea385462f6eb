//! `beit-cli linear-probe`: a linear classifier on frozen block features
//! (`beit_recipes::linear_probe`).

use anyhow::Result;
use beit_recipes::{linear_probe, LinearProbeConfig, LinearProbeJob, World};
use clap::Args;

use crate::args::{print_table, CommonArgs, ResumeArg};

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

/// Run the command.
pub fn run(args: LinearProbeArgs, world: &World) -> Result<()> {
    let extra = args
        .layer
        .map(|l| ("layer".to_string(), toml::Value::Integer(l as i64)))
        .into_iter()
        .collect();
    let config: LinearProbeConfig = args.common.resolve(extra)?;
    if args.print_config {
        print!("{}", toml::to_string_pretty(&config)?);
        return Ok(());
    }
    let resume = args.resume.checkpoint(&config.output);
    let model = config.model.clone().unwrap_or_default();
    let out = linear_probe(&LinearProbeJob {
        config,
        resume,
        download: args.download,
        progress: !args.common.quiet,
        world: world.clone(),
    })?;
    if !world.is_primary() {
        return Ok(()); // rank 0 prints the summary
    }
    let mut rows = vec![
        (
            "model".to_string(),
            format!("{model} (block {} of {})", out.layer, out.num_layers),
        ),
        ("data".to_string(), out.data.clone()),
        (
            "final val top-1".to_string(),
            format!("{:.2}%", out.final_acc.0),
        ),
        (
            "final val top-5".to_string(),
            format!("{:.2}%", out.final_acc.1),
        ),
    ];
    if let Some((acc, epochs)) = out.best_acc1 {
        rows.push((
            "best val top-1".into(),
            format!("{acc:.2}% (after {epochs} epochs)"),
        ));
    }
    rows.push(("head".into(), out.head.display().to_string()));
    rows.push(("metrics".into(), out.metrics.display().to_string()));
    print_table("linear probe done", &rows);
    Ok(())
}
