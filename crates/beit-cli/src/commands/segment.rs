//! `beit-cli segment`: semantic segmentation of images with a `BeitForSemanticSegmentation`
//! checkpoint, as `transformers`' `BeitImageProcessor` + model + `post_process_semantic_segmentation`
//! (or mmseg's sliding-window inference).

use std::path::PathBuf;

use anyhow::{Context, Result};
use beit_data::decode::{decode_file, DecodeOptions};
use beit_model::segmentation::segmentation_model;
use beit_recipes::segment::{
    class_areas, palette_for, segment_image, write_outputs, ImageSegmentation, Inference,
};
use beit_recipes::{load_model, parse_device};
use clap::Args;

/// Segment images: one class per pixel, at each image's original resolution.
///
/// Images are prepared as the checkpoint's `preprocessor_config.json` says (for the ADE20K
/// checkpoints: resize to 640x640, no crop, rescale, normalise); the logits are resized
/// bilinearly to the original size and the most likely class is taken per pixel, as
/// `transformers`' `post_process_semantic_segmentation` with `target_sizes` does.
///
/// Example: `beit-cli segment --model microsoft/beit-base-finetuned-ade-640-640 --out seg/ room.jpg`
#[derive(Args, Debug)]
pub struct SegmentArgs {
    /// Segmentation model: a directory (config.json + weights, HF or unilm/mmseg names) or a hub
    /// id in the local Hugging Face cache (fetch it first with `cargo xtask fetch-weights`).
    #[arg(long)]
    pub model: String,
    /// Write `<stem>.labels.png` (class index per pixel, palette PNG) and `<stem>.overlay.png`
    /// (class colours over the photo, with a legend) for every image into this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print exactly one JSON array: per image {"image", "height", "width", "labels": rows of
    /// class indices, "classes": the classes present with their pixel counts}.
    #[arg(long)]
    pub json: bool,
    /// mmseg's sliding-window inference `CROP,STRIDE` (ADE20K: `640,426`): the image is resized
    /// so that its shorter side is CROP (longer side at most 4 x CROP), the model runs on
    /// CROP x CROP windows every STRIDE pixels, and overlapping logits are averaged.
    #[arg(long, value_name = "CROP,STRIDE")]
    pub sliding_window: Option<String>,
    /// Device: cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Allow downloading a hub checkpoint missing from the cache.
    #[arg(long)]
    pub download: bool,
    /// Images (JPEG, PNG, WebP, BMP; grey and RGBA are converted to RGB).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

/// Run the command.
pub fn run(args: SegmentArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let loaded = load_model(&args.model, args.download)?;
    let cfg = &loaded.checkpoint.config;
    let inference = Inference::parse(args.sliding_window.as_deref(), cfg.patch_size)?;
    let model = segmentation_model(&loaded.checkpoint, &device)
        .with_context(|| format!("`{}` is not a semantic segmentation checkpoint", args.model))?;
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out)
            .with_context(|| format!("cannot create output directory {}", out.display()))?;
    }
    let palette = palette_for(model.num_labels());
    let mut results = Vec::with_capacity(args.images.len());
    for path in &args.images {
        let img = decode_file(path, &DecodeOptions::default())?;
        let labels = segment_image(&model, &loaded.processor, &img, inference, &device)
            .with_context(|| format!("segmenting {}", path.display()))?;
        let (w, h) = (img.width() as usize, img.height() as usize);
        let classes = class_areas(&labels, |i| cfg.label(i));
        if let Some(out) = &args.out {
            write_outputs(out, path, &img, &labels, &classes, &palette)?;
        }
        results.push(ImageSegmentation {
            image: path.display().to_string(),
            height: h,
            width: w,
            labels: labels.chunks(w).map(<[u32]>::to_vec).collect(),
            classes,
        });
    }
    if args.json {
        println!("{}", serde_json::to_string(&results)?);
    } else {
        for r in &results {
            println!("{} ({}x{})", r.image, r.width, r.height);
            let total = (r.width * r.height) as f64;
            for c in &r.classes {
                println!(
                    "  {:>6.2}%  {:>5}  {}",
                    100.0 * c.pixels as f64 / total,
                    c.index,
                    c.label
                );
            }
        }
    }
    Ok(())
}
