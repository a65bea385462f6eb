//! `beit-cli predict`: classify images with a BEiT classifier.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use beit_data::decode::{decode_file, DecodeOptions};
use beit_model::ForwardOptions;
use clap::Args;
use serde::Serialize;

use beit_recipes::load_model;
use beit_recipes::parse_device;
use beit_recipes::predictions::{predictions, Prediction};

/// Classify images with a BEiT classifier.
///
/// Images are prepared as the checkpoint's `preprocessor_config.json` says (resize with its filter,
/// optional centre crop, rescale, normalise), like `transformers`' `BeitImageProcessor`.
#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Model directory (config.json + weights) or hub id, e.g. `microsoft/beit-base-patch16-224`
    /// (resolved from the Hugging Face cache; fetch it first with `cargo xtask fetch-weights`).
    #[arg(long)]
    pub model: String,
    /// Number of classes to show per image.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// Print one JSON array (one object per image) instead of a table.
    #[arg(long)]
    pub json: bool,
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

/// The predictions for one image.
#[derive(Debug, Serialize)]
pub struct ImagePredictions {
    /// The image path as given.
    pub image: String,
    /// Top-k classes, most probable first.
    pub predictions: Vec<Prediction>,
}

/// Run the command.
pub fn run(args: PredictArgs) -> Result<()> {
    if args.top_k == 0 {
        bail!("--top-k must be at least 1");
    }
    let device = parse_device(&args.device)?;
    let loaded = load_model(&args.model, args.download)?;
    let cfg = &loaded.checkpoint.config;
    let model = loaded
        .checkpoint
        .classifier(&device)
        .with_context(|| format!("`{}` is not an image classifier checkpoint", args.model))?;
    let mut results = Vec::with_capacity(args.images.len());
    for path in &args.images {
        let img = decode_file(path, &DecodeOptions::default())?;
        let pixels = loaded.processor.pixel_values(&img, &device)?.unsqueeze(0)?;
        let logits = model.forward(&pixels, ForwardOptions::default())?.logits;
        // The same softmax and top-k as the HTTP server's `/v1/classify`.
        let predictions = predictions(&logits, args.top_k, cfg)?.remove(0);
        results.push(ImagePredictions {
            image: path.display().to_string(),
            predictions,
        });
    }
    if args.json {
        println!("{}", serde_json::to_string(&results)?);
    } else {
        for r in &results {
            println!("{}", r.image);
            for p in &r.predictions {
                println!(
                    "  {:>6.2}%  {:>5}  {}",
                    100.0 * p.probability,
                    p.index,
                    p.label
                );
            }
        }
    }
    Ok(())
}
