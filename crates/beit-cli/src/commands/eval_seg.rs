//! `beit-cli eval-seg`: mIoU, mAcc, aAcc and per-class IoU of a segmentation model on a dataset in
//! the ADE20K layout, accumulated as mmsegmentation does.

use anyhow::{bail, Context, Result};
use beit_data::segmentation::SegmentationFolder;
use beit_model::segmentation::segmentation_model;
use beit_recipes::seg_eval::{score_pairs, SegPredictor};
use beit_recipes::segment::{checkpoint_reduces_labels, report, Inference};
use beit_recipes::{load_model, parse_device};
use clap::Args;

/// Evaluate a segmentation model: mIoU, mAcc, aAcc and per-class IoU/accuracy.
///
/// The data is a directory in the ADE20K layout (`images/<split>/*.jpg` with
/// `annotations/<split>/*.png` of the same stem, or its parent holding `ADEChallengeData2016/`).
/// Per-class intersections and unions are summed over the whole split before dividing, pixels
/// labelled 255 are ignored, and with `reduce_zero_label` annotation 0 ("other") is ignored and
/// the classes shift down by one, as mmseg evaluates ADE20K. Predictions are made as `segment`
/// makes them (the checkpoint's preprocessing, logits resized to the annotation's size).
///
/// Example: `beit-cli eval-seg --model microsoft/beit-base-finetuned-ade-640-640 --data ADEChallengeData2016 --sliding-window 640,426`
#[derive(Args, Debug)]
pub struct EvalSegArgs {
    /// Segmentation model: a directory or a hub id in the local Hugging Face cache.
    #[arg(long)]
    pub model: String,
    /// Dataset root in the ADE20K layout.
    #[arg(long)]
    pub data: std::path::PathBuf,
    /// Split folder name under `images/` and `annotations/`.
    #[arg(long, default_value = "validation")]
    pub split: String,
    /// `auto` (the checkpoint's `do_reduce_labels`, true for the ADE20K checkpoints), `true` or
    /// `false`.
    #[arg(long, value_enum, default_value_t = ReduceZeroLabel::Auto)]
    pub reduce_zero_label: ReduceZeroLabel,
    /// mmseg's sliding-window inference `CROP,STRIDE` (ADE20K: `640,426`); default: whole image.
    #[arg(long, value_name = "CROP,STRIDE")]
    pub sliding_window: Option<String>,
    /// Evaluate only the first N images (sorted by name).
    #[arg(long)]
    pub max_samples: Option<usize>,
    /// Device: cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Allow downloading a hub checkpoint missing from the cache.
    #[arg(long)]
    pub download: bool,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Whether annotation 0 is ignored and the classes shift down by one (mmseg's
/// `reduce_zero_label`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceZeroLabel {
    /// As the checkpoint's `preprocessor_config.json` says (`do_reduce_labels`).
    Auto,
    /// Reduce.
    True,
    /// Keep the annotations as they are.
    False,
}

/// Run the command.
pub fn run(args: EvalSegArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let reduce = match args.reduce_zero_label {
        ReduceZeroLabel::Auto => checkpoint_reduces_labels(&args.model, args.download)?,
        ReduceZeroLabel::True => true,
        ReduceZeroLabel::False => false,
    };
    let loaded = load_model(&args.model, args.download)?;
    let cfg = &loaded.checkpoint.config;
    let inference = Inference::parse(args.sliding_window.as_deref(), cfg.patch_size)?;
    let model = segmentation_model(&loaded.checkpoint, &device)
        .with_context(|| format!("`{}` is not a semantic segmentation checkpoint", args.model))?;
    let data = SegmentationFolder::ade20k(&args.data, &args.split, reduce)?;
    let n = args.max_samples.map_or(data.len(), |m| m.min(data.len()));
    if n == 0 {
        bail!("--max-samples 0: nothing to evaluate");
    }
    let predictor = SegPredictor {
        model: &model,
        processor: &loaded.processor,
        inference,
        device: &device,
    };
    let indices: Vec<usize> = (0..n).collect();
    let metrics = score_pairs(
        &predictor,
        &indices,
        |i| Ok(data.load(i)?),
        |i| data.pairs[i].image.display().to_string(),
        Some(50),
    )?;
    let rep = report(
        &metrics.scores(),
        n,
        metrics.labelled_pixels(),
        reduce,
        |i| cfg.label(i),
    );
    if args.json {
        println!("{}", serde_json::to_string(&rep)?);
    } else {
        println!(
            "{} images, {} labelled pixels{}",
            rep.images,
            rep.pixels,
            if reduce { " (reduce_zero_label)" } else { "" }
        );
        println!(
            "aAcc {:.2}  mIoU {:.2}  mAcc {:.2}",
            rep.aacc, rep.miou, rep.macc
        );
        println!("{:>5}  {:<24} {:>7} {:>7}", "class", "name", "IoU", "Acc");
        let fmt = |v: Option<f64>| v.map_or("nan".to_string(), |x| format!("{x:.2}"));
        for c in &rep.per_class {
            println!(
                "{:>5}  {:<24} {:>7} {:>7}",
                c.index,
                c.label,
                fmt(c.iou),
                fmt(c.acc)
            );
        }
    }
    Ok(())
}
