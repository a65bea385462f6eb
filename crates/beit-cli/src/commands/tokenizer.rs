//! `beit-cli tokenizer ...`: encode images to visual tokens, reconstruct them, train a dVAE.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use beit_tokenizer::dvae::{DECODER_FILE, ENCODER_FILE};
use beit_tokenizer::pixels::{
    image_to_tensor, map_pixels, open_image, resize_lanczos, save_image, tensor_to_image,
};
use beit_tokenizer::train::{mean_image_mse, TokenizerTrainFile};
use beit_tokenizer::weights::WeightsFile;
use beit_tokenizer::{Decoder, Encoder, Trainer, VisualTokenizer};
use candle::{Device, Tensor};
use clap::{Args, Subcommand};
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::SeedableRng;

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

/// `tokenizer train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Training configuration (TOML with `[model]` and `[train]`), e.g.
    /// `configs/tokenizer_fashion_mnist.toml`.
    #[arg(long)]
    pub config: PathBuf,
    /// `fashion-mnist` (the subset embedded in beit-data: 6000 train / 1000 test images), a
    /// folder with the four Fashion-MNIST IDX files, or a folder of images (10% held out).
    #[arg(long)]
    pub data: String,
    /// Output folder: encoder/decoder safetensors, checkpoint, metrics.jsonl, eval.json and
    /// reconstructions.png.
    #[arg(long)]
    pub output: PathBuf,
    /// Continue from `OUTPUT/checkpoint.safetensors` if it exists.
    #[arg(long)]
    pub resume: bool,
    /// Override `[train] steps`.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Device: cpu, cuda[:N], metal[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// No progress bar (logs only).
    #[arg(long)]
    pub quiet: bool,
}

/// Run a tokenizer command.
pub fn run(command: TokenizerCommand) -> Result<()> {
    match command {
        TokenizerCommand::Encode(a) => encode(a),
        TokenizerCommand::Reconstruct(a) => reconstruct(a),
        TokenizerCommand::Train(a) => train(a),
    }
}

/// Read weights from safetensors, or from a pickled whole module (`.pkl`/`.pt`, OpenAI's format).
pub(crate) fn read_weights(path: &Path, device: &Device) -> Result<WeightsFile> {
    let is_pkl = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("pkl") || e.eq_ignore_ascii_case("pt"));
    if is_pkl {
        let tensors = beit_tokenizer::pkl::load_dalle_pkl(path)?
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_device(device)?)))
            .collect::<Result<_>>()?;
        Ok(WeightsFile::from_tensors(path, tensors))
    } else {
        Ok(WeightsFile::read(path, device)?)
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
    let device = crate::device::parse_device(&args.device)?;
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
    let device = crate::device::parse_device(&args.device)?;
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
fn side_by_side(a: &[RgbImage], b: &[RgbImage]) -> RgbImage {
    let (w, h) = a[0].dimensions();
    let gap = 2;
    if a.len() == 1 {
        let mut out = RgbImage::from_pixel(2 * w + gap, h, image::Rgb([255, 255, 255]));
        image::imageops::replace(&mut out, &a[0], 0, 0);
        image::imageops::replace(&mut out, &b[0], (w + gap) as i64, 0);
        return out;
    }
    let n = a.len() as u32;
    let mut out = RgbImage::from_pixel(n * (w + gap), 2 * h + gap, image::Rgb([255, 255, 255]));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let left = (i as u32 * (w + gap)) as i64;
        image::imageops::replace(&mut out, x, left, 0);
        image::imageops::replace(&mut out, y, left, (h + gap) as i64);
    }
    out
}

/// Training and held-out images, `(N, C, S, S)` in `[0, 1]`.
struct Data {
    train: Tensor,
    test: Tensor,
    what: String,
}

fn load_data(spec: &str, channels: usize, size: usize, device: &Device) -> Result<Data> {
    let path = Path::new(spec);
    let fmnist = if spec == "fashion-mnist" {
        Some(beit_data::FashionMnist::embedded()?)
    } else if path.join("train-images-idx3-ubyte.gz").exists()
        || path.join("train-images-idx3-ubyte").exists()
    {
        Some(beit_data::FashionMnist::from_dir(path)?)
    } else {
        None
    };
    if let Some(ds) = fmnist {
        if size != beit_data::fashion_mnist::SIDE {
            bail!(
                "Fashion-MNIST images are {0}x{0} but the config's model.image_size is {size}",
                beit_data::fashion_mnist::SIDE
            );
        }
        let to = |split: &beit_data::MnistSplit| -> Result<Tensor> {
            let (x, _) = split.to_tensors(device)?;
            Ok(if channels == 3 {
                x.repeat((1, 3, 1, 1))?
            } else {
                x
            })
        };
        return Ok(Data {
            train: to(&ds.train)?,
            test: to(&ds.test)?,
            what: format!(
                "Fashion-MNIST ({} train / {} held-out images)",
                ds.train.len(),
                ds.test.len()
            ),
        });
    }
    if !path.is_dir() {
        bail!("--data {spec}: expected `fashion-mnist` or a folder (of images or Fashion-MNIST IDX files)");
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("reading {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|e| {
                matches!(
                    e.to_ascii_lowercase().to_str(),
                    Some("png" | "jpg" | "jpeg" | "bmp" | "webp" | "gif")
                )
            })
        })
        .collect();
    files.sort();
    if files.len() < 2 {
        bail!(
            "--data {spec}: found {} images, need at least 2",
            files.len()
        );
    }
    let mut tensors = Vec::with_capacity(files.len());
    for f in &files {
        let img = resize_lanczos(&open_image(f)?.to_rgb8(), size as u32)?;
        tensors.push(image_to_tensor(&img, channels, device)?);
    }
    let n_test = (files.len() / 10).max(1);
    let all = Tensor::stack(&tensors, 0)?;
    let n_train = files.len() - n_test;
    Ok(Data {
        train: all.narrow(0, 0, n_train)?,
        test: all.narrow(0, n_train, n_test)?,
        what: format!(
            "{} ({n_train} train / {n_test} held-out images)",
            path.display()
        ),
    })
}

/// The batch of step `step`: epochs of a permutation seeded by `(seed, epoch)`, so the order is a
/// function of the step alone and a resumed run sees the same batches.
fn batch_indices(step: usize, n: usize, batch: usize, seed: u64) -> Vec<u32> {
    let per_epoch = (n / batch).max(1);
    let epoch = step / per_epoch;
    let pos = step % per_epoch;
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(1 + epoch as u64));
    order.shuffle(&mut rng);
    order
        .into_iter()
        .cycle()
        .skip(pos * batch)
        .take(batch)
        .collect()
}

fn train(args: TrainArgs) -> Result<()> {
    let device = crate::device::parse_device(&args.device)?;
    let mut file = TokenizerTrainFile::from_toml_file(&args.config)?;
    if let Some(steps) = args.steps {
        file.train.steps = steps;
        file.train.validate("--steps")?;
    }
    let (model, cfg) = (&file.model, &file.train);
    let data = load_data(&args.data, model.channels, model.image_size, &device)?;
    let n = data.train.dim(0)?;
    tracing::info!(
        "training a dVAE ({} codes, {}x{} tokens of {}x{} px, {} + {} parameters) on {}",
        model.vocab_size,
        model.tokens_per_side(),
        model.tokens_per_side(),
        model.image_size,
        model.image_size,
        model.encoder_config().num_params(),
        model.decoder_config().num_params(),
        data.what
    );
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("creating {}", args.output.display()))?;
    std::fs::write(
        args.output.join("config.toml"),
        toml::to_string_pretty(&file).context("serialising the config")?,
    )
    .with_context(|| format!("writing {}", args.output.join("config.toml").display()))?;

    let mut trainer = Trainer::new(model, cfg, &device)?;
    let ckpt = args.output.join("checkpoint.safetensors");
    if args.resume && ckpt.exists() {
        trainer.resume(&ckpt)?;
        tracing::info!(
            "resumed from {} at step {}",
            ckpt.display(),
            trainer.step_count()
        );
    }
    let metrics_path = args.output.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("opening {}", metrics_path.display()))?;

    let start = trainer.step_count();
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(cfg.steps as u64)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    bar.set_position(start as u64);
    let t0 = std::time::Instant::now();
    for step in start..cfg.steps {
        let idx = batch_indices(step, n, cfg.batch_size.min(n), cfg.seed);
        let idx = Tensor::from_vec(idx.clone(), idx.len(), &device)?;
        let batch = data.train.index_select(&idx, 0)?;
        let s = trainer.step(&batch)?;
        bar.inc(1);
        bar.set_message(format!(
            "loss {:.4} recon {:.4} kl {:.3} tau {:.3} codes {}",
            s.loss, s.recon, s.kl, s.tau, s.codebook.used
        ));
        let done = s.step == cfg.steps;
        if s.step % cfg.log_every.max(1) == 0 || done {
            writeln!(metrics, "{}", serde_json::to_string(&s)?)?;
            tracing::debug!(
                "step {} loss {:.4} recon {:.4} kl {:.3} tau {:.3} lr {:.2e} codes {} ppl {:.1}",
                s.step,
                s.loss,
                s.recon,
                s.kl,
                s.tau,
                s.lr,
                s.codebook.used,
                s.codebook.perplexity
            );
        }
        if cfg.checkpoint_every > 0 && s.step % cfg.checkpoint_every == 0 && !done {
            trainer.save_checkpoint(&ckpt)?;
        }
    }
    bar.finish_and_clear();
    let elapsed = t0.elapsed().as_secs_f64();
    trainer.save_checkpoint(&ckpt)?;
    trainer.dvae().export(&args.output)?;

    let eval = trainer.evaluate(&data.test, 250)?;
    let baseline = mean_image_mse(&data.train, &data.test)?;
    let summary = serde_json::json!({
        "steps": trainer.step_count(),
        "train_seconds_this_run": elapsed,
        "heldout_images": data.test.dim(0)?,
        "heldout_mse": eval.mse,
        "mean_image_mse": baseline,
        "mse_ratio": eval.mse / baseline,
        "codes_used": eval.codebook.used,
        "vocab_size": model.vocab_size,
        "codebook_usage": eval.codebook.usage,
        "perplexity": eval.codebook.perplexity,
    });
    std::fs::write(
        args.output.join("eval.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;

    // Reconstructions of the first 16 held-out images: originals on top, reconstructions below.
    let k = data.test.dim(0)?.min(16);
    let originals = data.test.narrow(0, 0, k)?;
    let ids = trainer.dvae().encoder.tokenize(&map_pixels(&originals)?)?;
    let recon = trainer.dvae().decoder.reconstruct(&ids)?;
    let top = (0..k)
        .map(|i| Ok(tensor_to_image(&originals.get(i)?)?))
        .collect::<Result<Vec<_>>>()?;
    let bottom = (0..k)
        .map(|i| Ok(tensor_to_image(&recon.get(i)?)?))
        .collect::<Result<Vec<_>>>()?;
    let png = args.output.join("reconstructions.png");
    save_image(&side_by_side(&top, &bottom), &png)?;

    println!(
        "dVAE: {} steps ({elapsed:.0} s this run); held-out MSE {:.5} vs mean-image baseline {:.5} \
         ({:.1}%); codes used {}/{} ({:.1}%), perplexity {:.1}",
        trainer.step_count(),
        eval.mse,
        baseline,
        100.0 * eval.mse / baseline,
        eval.codebook.used,
        model.vocab_size,
        100.0 * eval.codebook.usage,
        eval.codebook.perplexity
    );
    println!(
        "wrote {} and {}, {}, {}",
        args.output.join(ENCODER_FILE).display(),
        args.output.join(DECODER_FILE).display(),
        args.output.join("eval.json").display(),
        png.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_an_epoch_and_depend_only_on_the_step() {
        let mut seen: Vec<u32> = (0..5).flat_map(|s| batch_indices(s, 10, 2, 3)).collect();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert_eq!(batch_indices(7, 10, 2, 3), batch_indices(7, 10, 2, 3));
        assert_ne!(batch_indices(0, 10, 2, 3), batch_indices(5, 10, 2, 3));
    }
}
