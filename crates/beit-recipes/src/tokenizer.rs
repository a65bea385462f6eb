//! Training our dVAE visual tokenizer on the engine, and reading tokenizer weights.
//!
//! One step: a batch of images in `[0, 1]` -> [`beit_tokenizer::dvae_losses`] (Gumbel-softmax
//! relaxation, annealed temperature, KL to uniform) -> the engine's AdamW step. Epochs visit the
//! training images in a permutation drawn from `(seed, epoch)`. At the end the encoder and
//! decoder are exported in DALL-E's layout (what `beit-cli pretrain --tokenizer` reads), with
//! `eval.json` (held-out reconstruction error against the mean-image baseline, codebook use)
//! and `reconstructions.png`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use beit_data::{fashion_mnist, open_images, DataConfig};
use beit_tokenizer::pixels::{image_to_tensor, map_pixels, resize_lanczos};
use beit_tokenizer::pixels::{save_image, tensor_to_image};
use beit_tokenizer::train::{evaluate, mean_image_mse, EvalStats};
use beit_tokenizer::weights::WeightsFile;
use beit_tokenizer::{dvae_losses, Dvae, DvaeConfig, GumbelConfig, VisualTokenizer};
use beit_train::{fit, FitOptions, ParamGroup, StepContext, StepOutput, TrainTask};
use candle::{Device, Tensor};
use image::RgbImage;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::config::TrainSection;
use crate::device::DeviceSpec;
use crate::distributed::World;
use crate::runner::{self, RunSpec};
use crate::tensor_batches::epoch_batch_indices;

/// A tokenizer recipe (`configs/tokenizer_*.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerConfig {
    /// Run directory (`--output`).
    pub output: PathBuf,
    /// Device (`--device`).
    pub device: DeviceSpec,
    /// Training images (`--data`): `fashion-mnist[:DIR]` (its test split held out), or any source
    /// `beit_data::open_images` reads (its last 10% held out); `max_train_samples` keeps the
    /// first that many training images.
    pub data: DataConfig,
    /// The dVAE.
    pub architecture: DvaeConfig,
    /// The relaxation and its regularisers.
    pub objective: GumbelConfig,
    /// Optimisation (defaults: 16 epochs of batch 64, lr 2e-3 to 1e-4 after 50 warm-up steps,
    /// weight decay 1e-4 on kernels, no clipping).
    pub train: TrainSection,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        Self {
            output: PathBuf::from("runs/tokenizer"),
            device: DeviceSpec::Cpu,
            data: DataConfig::default(),
            architecture: DvaeConfig::default(),
            objective: GumbelConfig::default(),
            train: TrainSection {
                epochs: 16,
                batch_size: 64,
                lr: 2e-3,
                min_lr: 1e-4,
                warmup_epochs: 1,
                warmup_steps: Some(50),
                weight_decay: 1e-4,
                layer_decay: None,
                drop_path_rate: 0.0,
                label_smoothing: 0.0,
                log_every: 50,
                checkpoint_each_epoch: false,
                keep_last: 1,
                ..TrainSection::default()
            },
        }
    }
}

/// A tokenizer training run.
#[derive(Debug, Clone)]
pub struct TokenizerJob {
    /// The resolved recipe.
    pub config: TokenizerConfig,
    /// Continue from the newest checkpoint in the output directory, if there is one.
    pub resume: bool,
    /// Stop after this many optimizer steps (the schedule stays the recipe's); the weights at
    /// that point are exported and evaluated.
    pub stop_after: Option<u64>,
    /// Draw the progress bar.
    pub progress: bool,
    /// The processes the run is spread over (a single one by default).
    pub world: World,
}

/// What a tokenizer run produced.
#[derive(Debug, Clone)]
pub struct TokenizerOutcome {
    /// Optimizer steps done.
    pub steps: u64,
    /// Loss of the first and the last step of this invocation.
    pub loss_first_last: Option<(f64, f64)>,
    /// Seconds of this invocation.
    pub seconds: f64,
    /// Held-out evaluation with hard codes.
    pub eval: EvalStats,
    /// Mean squared error of the mean training image on the held-out images.
    pub baseline_mse: f64,
    /// Codes in the vocabulary.
    pub vocab_size: usize,
    /// The run directory (encoder/decoder safetensors, eval.json, reconstructions.png).
    pub output: PathBuf,
}

/// Read weights from safetensors, or from a pickled whole module (`.pkl`/`.pt`, OpenAI's format).
pub fn read_weights(path: &Path, device: &Device) -> Result<WeightsFile> {
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

/// Training and held-out images as `(N, C, S, S)` tensors in `[0, 1]`.
struct Images {
    train: Tensor,
    test: Tensor,
    what: String,
}

fn load_images(spec: &str, channels: usize, size: usize, device: &Device) -> Result<Images> {
    let to_channels = |x: Tensor| -> Result<Tensor> {
        Ok(if channels == 3 {
            x.repeat((1, 3, 1, 1))?
        } else {
            x
        })
    };
    if let Some((ds, what)) = fashion_mnist(spec)? {
        if size != beit_data::fashion_mnist::SIDE {
            bail!(
                "Fashion-MNIST images are {0}x{0} but architecture.image_size is {size}",
                beit_data::fashion_mnist::SIDE
            );
        }
        return Ok(Images {
            train: to_channels(ds.train.to_tensors(device)?.0)?,
            test: to_channels(ds.test.to_tensors(device)?.0)?,
            what: format!(
                "Fashion-MNIST ({what}: {} train / {} held-out images)",
                ds.train.len(),
                ds.test.len()
            ),
        });
    }
    // Any other source: its (unlabelled) training images, the last 10% held out.
    let (ds, what) = open_images(spec)?;
    if ds.len() < 2 {
        bail!("--data {spec}: found {} images, need at least 2", ds.len());
    }
    let mut tensors = Vec::with_capacity(ds.len());
    for i in 0..ds.len() {
        let img = resize_lanczos(&ds.get(i)?.image, size as u32)?;
        tensors.push(image_to_tensor(&img, channels, device)?);
    }
    let n_test = (ds.len() / 10).max(1);
    let n_train = ds.len() - n_test;
    let all = Tensor::stack(&tensors, 0)?;
    Ok(Images {
        train: all.narrow(0, 0, n_train)?,
        test: all.narrow(0, n_train, n_test)?,
        what: format!("{what}: {n_train} train / {n_test} held out"),
    })
}

/// The dVAE task: the Gumbel-softmax objective of one batch.
struct DvaeTask<'a> {
    dvae: &'a Dvae,
    objective: &'a GumbelConfig,
    total_steps: u64,
}

impl TrainTask for DvaeTask<'_> {
    type Batch = Tensor;
    type Error = anyhow::Error;

    fn train_step(&mut self, images: Tensor, ctx: &mut StepContext<'_>) -> Result<StepOutput> {
        let l = dvae_losses(
            self.dvae,
            self.objective,
            &images,
            ctx.position.step,
            self.total_steps,
            ctx.rng.next_u64(),
        )?;
        Ok(StepOutput {
            loss: l.loss,
            batch_size: images.dim(0)?,
            metrics: vec![
                ("recon".into(), l.recon.into()),
                ("kl".into(), l.kl.into()),
                ("tau".into(), l.tau.into()),
                ("kl_weight".into(), l.kl_weight.into()),
                ("codes_used".into(), (l.codebook.used as f64).into()),
                ("perplexity".into(), l.codebook.perplexity.into()),
            ],
        })
    }
}

/// The dVAE's optimizer groups: weight decay on the convolution kernels only, as the DALL-E
/// training code.
fn dvae_groups(dvae: &Dvae) -> Vec<ParamGroup> {
    let (decay, no_decay): (Vec<_>, Vec<_>) = dvae
        .named_vars()
        .into_iter()
        .partition(|(k, _)| k.ends_with(".w"));
    vec![
        ParamGroup {
            name: "kernels".into(),
            params: decay,
            lr_scale: 1.0,
            weight_decay: true,
        },
        ParamGroup {
            name: "biases".into(),
            params: no_decay,
            lr_scale: 1.0,
            weight_decay: false,
        },
    ]
}

/// The held-out evaluation (`eval.json`) and the reconstructions of the first 16 held-out
/// images (`reconstructions.png`: originals on top, reconstructions below) of a trained `dvae`.
fn evaluate_and_draw(
    dvae: &Dvae,
    data: &Images,
    steps: u64,
    started: std::time::Instant,
    out: &Path,
) -> Result<(EvalStats, f64)> {
    let eval = evaluate(dvae, &data.test, 250)?;
    let baseline = mean_image_mse(&data.train, &data.test)?;
    let summary = serde_json::json!({
        "steps": steps,
        "train_seconds_this_run": started.elapsed().as_secs_f64(),
        "heldout_images": data.test.dim(0)?,
        "heldout_mse": eval.mse,
        "mean_image_mse": baseline,
        "mse_ratio": eval.mse / baseline,
        "codes_used": eval.codebook.used,
        "vocab_size": dvae.encoder.vocab_size(),
        "codebook_usage": eval.codebook.usage,
        "perplexity": eval.codebook.perplexity,
    });
    std::fs::write(
        out.join("eval.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    let k = data.test.dim(0)?.min(16);
    let originals = data.test.narrow(0, 0, k)?;
    let ids = dvae.encoder.tokenize(&map_pixels(&originals)?)?;
    let recon = dvae.decoder.reconstruct(&ids)?;
    let row = |x: &Tensor| -> Result<Vec<RgbImage>> {
        (0..k).map(|i| Ok(tensor_to_image(&x.get(i)?)?)).collect()
    };
    save_image(
        &side_by_side(&row(&originals)?, &row(&recon)?),
        &out.join("reconstructions.png"),
    )?;
    Ok((eval, baseline))
}

/// Train (or continue training) a dVAE tokenizer.
pub fn train_tokenizer(job: &TokenizerJob) -> Result<TokenizerOutcome> {
    let started = std::time::Instant::now();
    let cfg = &job.config;
    let (model, t) = (&cfg.architecture, &cfg.train);
    model.validate("[architecture]")?;
    cfg.objective.validate("[objective]")?;
    let out = &cfg.output;
    let device = runner::start(cfg.device, &job.world, out, false)?;
    let has_checkpoints = !beit_train::CheckpointManager::new(out, 1)?
        .list()?
        .is_empty();
    let resume_from = (job.resume && has_checkpoints).then(|| out.clone());
    let mut data = load_images(&cfg.data.source, model.channels, model.image_size, &device)?;
    if let Some(m) = cfg.data.max_train_samples {
        let m = m.min(data.train.dim(0)?);
        data.train = data.train.narrow(0, 0, m)?;
        data.what = format!("{} (using the first {m} training images)", data.what);
    }
    let n = data.train.dim(0)?;
    let bs = t.micro_batch()?.min(n);
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
    let dvae = Dvae::new(model, t.seed, &device)?;
    let batches = (n / bs) as u64;
    let spec = RunSpec::new(
        out,
        resume_from.as_deref(),
        t,
        batches,
        job.progress,
        &job.world,
    );
    let tl = runner::open_loop(&spec, cfg, dvae.varmap().clone(), dvae_groups(&dvae))?;
    let mut task = DvaeTask {
        dvae: &dvae,
        objective: &cfg.objective,
        total_steps: tl.config().total_steps(),
    };
    let train = &data.train;
    let done = fit(
        tl,
        &mut task,
        |epoch| {
            let batches = epoch_batch_indices(n, bs, t.seed, 0x6476_6165, epoch, train.device())?;
            Ok(batches
                .into_iter()
                .map(move |idx| Ok(train.index_select(&idx, 0)?)))
        },
        &FitOptions {
            stop_after: job.stop_after,
            ..FitOptions::default()
        },
    )?;
    dvae.export(out)?;
    let (eval, baseline_mse) = evaluate_and_draw(&dvae, &data, done.summary.steps, started, out)?;
    Ok(TokenizerOutcome {
        steps: done.summary.steps,
        loss_first_last: runner::loss_first_last(&done),
        seconds: started.elapsed().as_secs_f64(),
        eval,
        baseline_mse,
        vocab_size: model.vocab_size,
        output: out.clone(),
    })
}

/// Images `a` above images `b` (one pair side by side when there is one image each).
pub fn side_by_side(a: &[RgbImage], b: &[RgbImage]) -> RgbImage {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_config;

    #[test]
    fn recipe_errors_name_the_file_and_field_and_the_shipped_one_parses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[train]\nstepz = 3\n").unwrap();
        let err = format!(
            "{:#}",
            load_config::<TokenizerConfig>(Some(&path), &[], &[]).unwrap_err()
        );
        assert!(err.contains("bad.toml") && err.contains("stepz"), "{err}");
        let shipped: TokenizerConfig = load_config(
            Some(Path::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../configs/tokenizer_fashion_mnist.toml"
            ))),
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(shipped.architecture.image_size, 28);
        assert_eq!(shipped.architecture.tokens_per_side(), 7);
        shipped.architecture.validate("shipped").unwrap();
        let bad = DvaeConfig {
            downsample: 3,
            ..shipped.architecture
        };
        let err = bad.validate("bad.toml").unwrap_err().to_string();
        assert!(err.contains("downsample"), "{err}");
    }
}
