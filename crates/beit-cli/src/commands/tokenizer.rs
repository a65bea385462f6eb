//! `beit-cli tokenizer ...`: encode images to visual tokens, reconstruct them, train a dVAE.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use beit_recipes::config::load_config;
use beit_recipes::tokenizer::{read_weights, side_by_side};
use beit_recipes::{train_tokenizer, TokenizerConfig, TokenizerJob, World};
use beit_tokenizer::dvae::{DECODER_FILE, ENCODER_FILE};
use beit_tokenizer::pixels::{
    image_to_tensor, map_pixels, open_image, resize_lanczos, save_image, tensor_to_image,
};
use beit_tokenizer::{Decoder, Encoder, VisualTokenizer};
use candle::{Device, Tensor};
use clap::{Args, Subcommand};
use image::RgbImage;

/// Visual tokenizer commands.
#[derive(Subcommand, Debug)]
pub enum TokenizerCommand {
    /// Encode images to a grid of token ids (resized to the tokenizer's input size with Lanczos).
    Encode(EncodeArgs),
    /// Image -> tokens -> decoder; writes the input and its reconstruction side by side.
    Reconstruct(ReconstructArgs),
    /// Train our own dVAE with the Gumbel-softmax relaxation.
    Train(TrainArgs),
}

/// `tokenizer encode`.
#[derive(Args, Debug)]
pub struct EncodeArgs {
    /// Encoder weights: a safetensors file with `dall_e` names (converted DALL-E `encoder.pkl`,
    /// or `encoder.safetensors` from `tokenizer train`), or a DALL-E `encoder.pkl` itself.
    #[arg(long)]
    pub weights: PathBuf,
    /// Print one JSON array: `[{"image": PATH, "tokens": [[...], ...]}, ...]`.
    #[arg(long)]
    pub json: bool,
    /// Input side length; default: the tokenizer's own (112 for DALL-E).
    #[arg(long)]
    pub size: Option<u32>,
    /// Device: cpu, cuda[:N], metal[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Images to encode.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

/// `tokenizer reconstruct`.
#[derive(Args, Debug)]
pub struct ReconstructArgs {
    /// Encoder weights (see `tokenizer encode --weights`).
    #[arg(long)]
    pub weights: PathBuf,
    /// Decoder weights: safetensors with `dall_e` names, or a DALL-E `decoder.pkl`.
    #[arg(long)]
    pub decoder: PathBuf,
    /// Input side length; default: the tokenizer's own.
    #[arg(long)]
    pub size: Option<u32>,
    /// Device: cpu, cuda[:N], metal[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Output PNG: the resized input (left) and its reconstruction (right).
    #[arg(long)]
    pub out: PathBuf,
    /// The image.
    pub image: PathBuf,
}

/// `tokenizer train`: train our own dVAE (`beit_recipes::train_tokenizer`).
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Training recipe (TOML with `[architecture]`, `[objective]` and `[train]`), e.g.
    /// `configs/tokenizer_fashion_mnist.toml`.
    #[arg(long)]
    pub config: PathBuf,
    /// `fashion-mnist` (the subset embedded in beit-data: 6000 train / 1000 test images), a
    /// folder with the four Fashion-MNIST IDX files, or a folder of images (10% held out).
    #[arg(long)]
    pub data: String,
    /// Output folder: encoder/decoder safetensors, checkpoints, metrics.jsonl, curves.png,
    /// eval.json and reconstructions.png.
    #[arg(long)]
    pub output: PathBuf,
    /// Continue from the newest checkpoint in OUTPUT if there is one.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many optimizer steps (the schedule stays the recipe's); the weights at
    /// that point are exported.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Override a recipe value, e.g. `--set train.epochs=4`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Device: cpu, cuda[:N], metal[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// No progress bar (logs only).
    #[arg(long)]
    pub quiet: bool,
}

/// Run a tokenizer command.
pub fn run(command: TokenizerCommand, world: &World) -> Result<()> {
    match command {
        TokenizerCommand::Encode(a) => encode(a),
        TokenizerCommand::Reconstruct(a) => reconstruct(a),
        TokenizerCommand::Train(a) => train(a, world),
    }
}

fn load_encoder(path: &Path, device: &Device) -> Result<Encoder> {
    let w = read_weights(path, device)?;
    Encoder::from_weights(&w).with_context(|| format!("loading encoder {}", path.display()))
}

/// Open, resize (Lanczos; skipped when already `size`) and convert an image for `enc`.
fn prepare(path: &Path, size: u32, enc: &Encoder, device: &Device) -> Result<(RgbImage, Tensor)> {
    let img = resize_lanczos(&open_image(path)?.to_rgb8(), size)?;
    let x = image_to_tensor(&img, enc.config().input_channels, device)?.unsqueeze(0)?;
    Ok((img, map_pixels(&x)?))
}

fn input_size(arg: Option<u32>, enc: &Encoder) -> Result<u32> {
    let size = arg.unwrap_or(enc.input_size() as u32);
    if size == 0 || !(size as usize).is_multiple_of(enc.downsample()) {
        bail!(
            "--size {size} must be a positive multiple of the tokenizer's downsampling ({})",
            enc.downsample()
        );
    }
    Ok(size)
}

fn encode(args: EncodeArgs) -> Result<()> {
    let device = beit_recipes::parse_device(&args.device)?;
    let enc = load_encoder(&args.weights, &device)?;
    let size = input_size(args.size, &enc)?;
    let mut results = Vec::with_capacity(args.images.len());
    for path in &args.images {
        let (_, x) = prepare(path, size, &enc, &device)?;
        let ids = enc.tokenize(&x)?.squeeze(0)?.to_vec2::<u32>()?;
        results.push((path, ids));
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.json {
        let items: Vec<serde_json::Value> = results
            .iter()
            .map(|(p, ids)| serde_json::json!({ "image": p.display().to_string(), "tokens": ids }))
            .collect();
        writeln!(out, "{}", serde_json::to_string(&items)?)?;
    } else {
        for (p, ids) in &results {
            writeln!(
                out,
                "{} ({}x{} tokens)",
                p.display(),
                ids.len(),
                ids[0].len()
            )?;
            for row in ids {
                let row: Vec<String> = row.iter().map(|v| format!("{v:5}")).collect();
                writeln!(out, "{}", row.join(""))?;
            }
        }
    }
    Ok(())
}

fn reconstruct(args: ReconstructArgs) -> Result<()> {
    let device = beit_recipes::parse_device(&args.device)?;
    let enc = load_encoder(&args.weights, &device)?;
    let dw = read_weights(&args.decoder, &device)?;
    let dec = Decoder::from_weights(&dw)
        .with_context(|| format!("loading decoder {}", args.decoder.display()))?;
    if dec.config().vocab_size != enc.vocab_size() {
        bail!(
            "{} has a vocabulary of {} codes but the encoder {} has {}",
            args.decoder.display(),
            dec.config().vocab_size,
            args.weights.display(),
            enc.vocab_size()
        );
    }
    let size = input_size(args.size, &enc)?;
    let (img, x) = prepare(&args.image, size, &enc, &device)?;
    let ids = enc.tokenize(&x)?;
    let recon = tensor_to_image(&dec.reconstruct(&ids)?.squeeze(0)?)?;
    let side = side_by_side(&[img], &[recon]);
    save_image(&side, &args.out)?;
    let (_, h, w) = ids.dims3()?;
    eprintln!(
        "{}: {h}x{w} tokens -> {}",
        args.image.display(),
        args.out.display()
    );
    Ok(())
}

/// Top row `a`, bottom row `b` (pairs side by side when there is one of each).
fn train(args: TrainArgs, world: &World) -> Result<()> {
    let flags = vec![
        (
            "data.source".to_string(),
            toml::Value::String(args.data.clone()),
        ),
        ("output".to_string(), crate::args::path_value(&args.output)),
        (
            "device".to_string(),
            toml::Value::String(args.device.clone()),
        ),
    ];
    let config: TokenizerConfig = load_config(Some(&args.config), &args.set, &flags)?;
    let out = train_tokenizer(&TokenizerJob {
        config,
        resume: args.resume,
        stop_after: args.steps,
        progress: !args.quiet,
        world: world.clone(),
    })?;
    let e = &out.eval;
    println!(
        "dVAE: {} steps ({:.0} s this run); held-out MSE {:.5} vs mean-image baseline {:.5} \
         ({:.1}%); codes used {}/{} ({:.1}%), perplexity {:.1}",
        out.steps,
        out.seconds,
        e.mse,
        out.baseline_mse,
        100.0 * e.mse / out.baseline_mse,
        e.codebook.used,
        out.vocab_size,
        100.0 * e.codebook.usage,
        e.codebook.perplexity
    );
    let o = &out.output;
    println!(
        "wrote {} and {}, {}, {}",
        o.join(ENCODER_FILE).display(),
        o.join(DECODER_FILE).display(),
        o.join("eval.json").display(),
        o.join("reconstructions.png").display()
    );
    Ok(())
}
