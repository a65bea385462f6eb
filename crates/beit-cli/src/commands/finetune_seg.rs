//! `beit-cli finetune-seg`: fine-tune a semantic segmentation model (`beit_recipes::finetune_seg`).

use anyhow::Result;
use beit_recipes::{finetune_seg, FinetuneSegConfig, World};
use clap::Args;

use crate::args::{print_table, CommonArgs, FinetuneRunArgs};

/// Fine-tune BEiT + UperNet for semantic segmentation (unilm's ADE20K recipe: AdamW lr 3e-5,
/// layer decay 0.9, poly schedule with 1,500 warm-up iterations, 160k iterations of 16 crops of
/// 640, auxiliary loss 0.4, mmseg's augmentation; mIoU with a sliding window).
///
/// `--data` is a directory in the ADE20K layout or `fashion-mnist` (a small real set derived from
/// the embedded Fashion-MNIST images). `--model` is a classification, MIM or segmentation
/// checkpoint; without it the model starts from scratch (`[architecture]`). The run directory
/// gets `config.toml`, `metrics.jsonl` (with `mIoU`, `mAcc`, `aAcc` records), `curves.png`,
/// checkpoints, `best_model/` and, at the end, `final_model/` (Hugging Face layout).
///
/// Example: `beit-cli finetune-seg --config configs/finetune_seg_ade20k.toml --model M --data
/// ADEChallengeData2016 --output runs/seg-ade`
#[derive(Args, Debug)]
pub struct FinetuneSegArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub run: FinetuneRunArgs,
}

/// Run the command.
pub fn run(args: FinetuneSegArgs, world: &World) -> Result<()> {
    let Some(job) = args
        .run
        .job(&args.common, |c: &FinetuneSegConfig| &c.output, world)?
    else {
        return Ok(());
    };
    let out = finetune_seg(&job)?;
    if !world.is_primary() {
        return Ok(()); // rank 0 prints the summary
    }
    let mut rows = vec![
        ("steps".to_string(), out.steps.to_string()),
        ("data".to_string(), out.data.clone()),
    ];
    if let Some((a, b)) = out.loss_first_last {
        rows.push(("loss first / last step".into(), format!("{a:.4} / {b:.4}")));
    }
    if let Some(b) = &out.best_eval {
        let m = |k: &str| b.metrics.get(k).copied().unwrap_or(f64::NAN);
        rows.push((
            "best mIoU / mAcc / aAcc".into(),
            format!(
                "{:.2} / {:.2} / {:.2} (after {} epochs, step {})",
                m("mIoU"),
                m("mAcc"),
                m("aAcc"),
                b.epochs_done,
                b.step
            ),
        ));
        rows.push(("best model".into(), out.best_model.display().to_string()));
    }
    if let Some(f) = &out.final_model {
        rows.push(("final model".into(), f.display().to_string()));
    }
    rows.push(("metrics".into(), out.metrics.display().to_string()));
    rows.push((
        "last checkpoint".into(),
        out.checkpoint.display().to_string(),
    ));
    let title = if out.finished {
        "segmentation fine-tuning done"
    } else {
        "segmentation fine-tuning stopped (--stop-after; continue with --resume)"
    };
    print_table(title, &rows);
    Ok(())
}
