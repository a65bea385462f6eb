//! `beit-cli finetune`: fine-tune an image classifier (`beit_recipes::finetune`).

use anyhow::Result;
use beit_recipes::{finetune, FinetuneConfig, World};
use clap::Args;

use crate::args::{print_table, CommonArgs, FinetuneRunArgs};

/// Fine-tune an image classifier (unilm recipe: layer decay, mixup/CutMix, label smoothing,
/// RandAugment, random erasing, drop path, warm-up + cosine).
///
/// Settings come from `--config FILE.toml` (see `configs/finetune_*.toml`; omitted fields take
/// the paper's base recipe), then `--set key=value` overrides, then the flags below. The run
/// directory gets `config.toml` (resolved settings), `metrics.jsonl`, `curves.png`, rotating
/// `checkpoint-*` directories and `best_model/` (HF layout: config.json with id2label,
/// model.safetensors, preprocessor_config.json), loadable by `beit-cli predict`/`eval` and by
/// `transformers`.
///
/// Example: `beit-cli finetune --config configs/finetune_fashion_mnist.toml --data fashion-mnist
/// --output runs/ft-fmnist`
#[derive(Args, Debug)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub run: FinetuneRunArgs,
}

/// Run the command.
pub fn run(args: FinetuneArgs, world: &World) -> Result<()> {
    let Some(job) = args
        .run
        .job(&args.common, |c: &FinetuneConfig| &c.output, world)?
    else {
        return Ok(());
    };
    let out = finetune(&job)?;
    if !world.is_primary() {
        return Ok(()); // rank 0 prints the summary
    }
    let mut rows = vec![
        ("steps".to_string(), out.steps.to_string()),
        ("data".to_string(), out.data.clone()),
    ];
    if let Some(b) = &out.best_eval {
        rows.push((
            "best val acc1 / acc5".into(),
            format!(
                "{:.2}% / {:.2}% (after {} epochs, step {})",
                b.metrics["acc1"], b.metrics["acc5"], b.epochs_done, b.step
            ),
        ));
        rows.push(("best model".into(), out.best_model.display().to_string()));
    }
    rows.push(("metrics".into(), out.metrics.display().to_string()));
    if let Some(p) = &out.plot {
        rows.push(("curves".into(), p.display().to_string()));
    }
    rows.push((
        "last checkpoint".into(),
        out.checkpoint.display().to_string(),
    ));
    rows.push(("skipped files".into(), out.skipped_files.to_string()));
    if !out.finished {
        let note = format!(
            "after step {} (--stop-after); continue with --resume",
            out.steps
        );
        rows.insert(0, ("stopped".into(), note));
    }
    let title = if out.finished {
        "fine-tuning done"
    } else {
        "fine-tuning stopped"
    };
    print_table(title, &rows);
    Ok(())
}
