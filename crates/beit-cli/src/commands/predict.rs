//! `beit-cli predict`: classify images with a BEiT classifier.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use beit_data::decode::{decode_file, DecodeOptions};
use beit_model::ForwardOptions;
use candle::{Tensor, D};
use clap::Args;
use serde::Serialize;

use beit_recipes::load_model;
use beit_recipes::parse_device;

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

/// One predicted class.
#[derive(Debug, Serialize, Clone, PartialEq)]
pub struct Prediction {
    /// Class index.
    pub index: usize,
    /// Class name from the config's `id2label`.
    pub label: String,
    /// Softmax probability.
    pub probability: f32,
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
        let probs = candle_nn::ops::softmax(&logits, D::Minus1)?.squeeze(0)?;
        let predictions = top_k(&probs, args.top_k)?
            .into_iter()
            .map(|(index, probability)| Prediction {
                index,
                label: cfg.label(index),
                probability,
            })
            .collect();
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

/// The `k` largest entries of a 1-D tensor as (index, value), largest first.
pub fn top_k(values: &Tensor, k: usize) -> Result<Vec<(usize, f32)>> {
    let v = values.to_dtype(candle::DType::F32)?.to_vec1::<f32>()?;
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    Ok(idx.into_iter().take(k).map(|i| (i, v[i])).collect())
}
