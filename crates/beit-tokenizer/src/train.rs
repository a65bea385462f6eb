//! Training our dVAE with the Gumbel-softmax relaxation.
//!
//! Per step, for images `x` in `[0, 1]`: encoder logits on `map_pixels(x)`; a relaxed one-hot sample
//! `softmax((logits + Gumbel noise) / tau)` (optionally straight-through); the decoder's
//! logit-Laplace parameters; loss = reconstruction + `beta(step) * KL(q || uniform)`, minimised
//! with AdamW. The temperature `tau` anneals exponentially from `tau_start` to `tau_end`, `beta`
//! ramps linearly from 0 to `kl_weight`, and the learning rate warms up linearly then follows a
//! cosine to `lr_min`. The trainer takes batches of tensors and knows nothing about datasets.
//!
//! Checkpoints hold the parameters, the optimizer moments and the step in one safetensors file,
//! written atomically; the random stream of step `s` is seeded from `(seed, s)`, so a resumed run
//! draws the same noise as an uninterrupted one.

use std::collections::HashMap;
use std::path::Path;

use candle::backprop::GradStore;
use candle::{Device, Tensor};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::adamw::{AdamW, AdamWConfig};
use crate::dvae::{Dvae, DvaeConfig};
use crate::error::{Result, TokenizerError};
use crate::gumbel::{codebook_stats, gumbel_noise, gumbel_softmax, kl_to_uniform, CodebookStats};
use crate::pixels::map_pixels;
use crate::weights::{save_weights, WeightsFile};
use crate::VisualTokenizer;

/// Reconstruction loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReconLoss {
    /// DALL-E's logit-Laplace negative log-likelihood of the mapped pixels (per pixel).
    LogitLaplace,
    /// Mean absolute error of `sigmoid(mean)` against the mapped pixels.
    L1,
    /// Mean squared error of `sigmoid(mean)` against the mapped pixels.
    Mse,
}

/// Training hyper-parameters. The defaults are generic starting points; the tuned Fashion-MNIST
/// demo is `configs/tokenizer_fashion_mnist.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimisation steps. Default 1500.
    pub steps: usize,
    /// Images per step. Default 64.
    pub batch_size: usize,
    /// Peak learning rate. Default 2e-3.
    pub lr: f64,
    /// Final learning rate of the cosine schedule. Default 1e-4.
    pub lr_min: f64,
    /// Linear warm-up steps. Default 50.
    pub warmup_steps: usize,
    /// AdamW settings.
    pub adamw: AdamWConfig,
    /// Initial Gumbel-softmax temperature. Default 1.0.
    pub tau_start: f64,
    /// Final temperature. Default 1/16.
    pub tau_end: f64,
    /// Steps over which the temperature decays exponentially; 0 means `steps`. Default 0.
    pub tau_anneal_steps: usize,
    /// Straight-through estimator: hard one-hot codes forward, soft gradients. Default false.
    pub straight_through: bool,
    /// Final weight of the KL-to-uniform term (per-token KL, in nats). Default 1e-3.
    pub kl_weight: f64,
    /// Steps of the linear ramp of the KL weight from 0. Default 500.
    pub kl_warmup_steps: usize,
    /// Weight of an extra anti-collapse term: the KL from the batch-averaged code distribution
    /// (the aggregate posterior) to uniform, ramped like `kl_weight`. The per-token KL keeps each
    /// position uncertain but does not stop every position from preferring the same few codes;
    /// this term does. 0 disables it. Default 0.
    pub usage_weight: f64,
    /// Reconstruction loss. Default `logit_laplace`.
    pub recon_loss: ReconLoss,
    /// Seed of parameter init, Gumbel noise and data order. Default 0.
    pub seed: u64,
    /// Log every this many steps. Default 50.
    pub log_every: usize,
    /// Write a checkpoint every this many steps (and at the end); 0 = only at the end. Default 500.
    pub checkpoint_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 1500,
            batch_size: 64,
            lr: 2e-3,
            lr_min: 1e-4,
            warmup_steps: 50,
            adamw: AdamWConfig::default(),
            tau_start: 1.0,
            tau_end: 1.0 / 16.0,
            tau_anneal_steps: 0,
            straight_through: false,
            kl_weight: 1e-3,
            kl_warmup_steps: 500,
            usage_weight: 0.0,
            recon_loss: ReconLoss::LogitLaplace,
            seed: 0,
            log_every: 50,
            checkpoint_every: 500,
        }
    }
}

impl TrainConfig {
    /// Check the fields; `context` names the source in errors.
    pub fn validate(&self, context: &str) -> Result<()> {
        let err = |field: &str, reason: &str| {
            Err(TokenizerError::Config {
                context: context.into(),
                field: field.into(),
                reason: reason.into(),
            })
        };
        if self.steps == 0 {
            return err("steps", "must be at least 1");
        }
        if self.batch_size == 0 {
            return err("batch_size", "must be at least 1");
        }
        if self.lr.is_nan() || self.lr <= 0.0 || self.lr_min < 0.0 || self.lr_min > self.lr {
            return err("lr", "need lr > 0 and 0 <= lr_min <= lr");
        }
        if !(self.tau_start > 0.0 && self.tau_end > 0.0) {
            return err("tau_start", "temperatures must be positive");
        }
        if self.kl_weight < 0.0 {
            return err("kl_weight", "must be >= 0");
        }
        if self.usage_weight < 0.0 {
            return err("usage_weight", "must be >= 0");
        }
        Ok(())
    }

    /// Gumbel-softmax temperature at `step`: exponential decay from `tau_start` to `tau_end`.
    pub fn temperature(&self, step: usize) -> f64 {
        let span = if self.tau_anneal_steps == 0 {
            self.steps
        } else {
            self.tau_anneal_steps
        };
        let frac = (step as f64 / span.max(1) as f64).min(1.0);
        self.tau_start * (self.tau_end / self.tau_start).powf(frac)
    }

    /// KL weight at `step`: linear ramp from 0 to `kl_weight`.
    pub fn kl_weight_at(&self, step: usize) -> f64 {
        if self.kl_warmup_steps == 0 {
            return self.kl_weight;
        }
        self.kl_weight * (step as f64 / self.kl_warmup_steps as f64).min(1.0)
    }

    /// Learning rate at `step`: linear warm-up, then cosine from `lr` to `lr_min`.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let rest = (self.steps - self.warmup_steps.min(self.steps)).max(1) as f64;
        let frac = ((step - self.warmup_steps) as f64 / rest).min(1.0);
        self.lr_min + 0.5 * (self.lr - self.lr_min) * (1.0 + (std::f64::consts::PI * frac).cos())
    }
}

/// A training configuration file: `[model]` (a [`DvaeConfig`]) and `[train]` (a [`TrainConfig`]).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerTrainFile {
    /// The dVAE architecture.
    pub model: DvaeConfig,
    /// The training hyper-parameters.
    pub train: TrainConfig,
}

impl TokenizerTrainFile {
    /// Read and validate a TOML file.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TokenizerError::io(path, e))?;
        let ctx = path.display().to_string();
        let file: Self = toml::from_str(&text).map_err(|e| TokenizerError::Config {
            context: ctx.clone(),
            field: e
                .span()
                .map(|s| text[s].chars().take(40).collect())
                .unwrap_or_default(),
            reason: e.message().to_string(),
        })?;
        file.model.validate(&ctx)?;
        file.train.validate(&ctx)?;
        Ok(file)
    }
}

/// What one training step measured.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StepStats {
    /// Steps completed (1-based after the first step).
    pub step: usize,
    /// Total loss.
    pub loss: f64,
    /// Reconstruction term.
    pub recon: f64,
    /// KL-to-uniform term (before weighting).
    pub kl: f64,
    /// Temperature used.
    pub tau: f64,
    /// KL weight used.
    pub kl_weight: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Codebook use of the batch's argmax codes.
    pub codebook: CodebookStats,
}

/// Held-out evaluation with hard (argmax) codes, i.e. the tokenizer as it will be used.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct EvalStats {
    /// Mean squared error of the reconstructions, pixels in `[0, 1]`.
    pub mse: f64,
    /// Codebook use over all evaluated tokens.
    pub codebook: CodebookStats,
}

/// Mean squared error of predicting every image of `test` by the mean image of `train`: the
/// baseline a reconstruction must beat. Both `(N, C, H, W)` in `[0, 1]`.
pub fn mean_image_mse(train: &Tensor, test: &Tensor) -> Result<f64> {
    let mean = train.mean_keepdim(0)?;
    Ok(test
        .broadcast_sub(&mean)?
        .sqr()?
        .mean_all()?
        .to_scalar::<f32>()? as f64)
}

/// The dVAE trainer.
pub struct Trainer {
    dvae: Dvae,
    opt: AdamW,
    cfg: TrainConfig,
    device: Device,
}

impl Trainer {
    /// A fresh dVAE (seeded init) and optimizer.
    pub fn new(model: &DvaeConfig, cfg: &TrainConfig, device: &Device) -> Result<Self> {
        cfg.validate("train config")?;
        let dvae = Dvae::new(model, cfg.seed, device)?;
        let opt = AdamW::new(dvae.named_vars(), cfg.adamw.clone())?;
        Ok(Self {
            dvae,
            opt,
            cfg: cfg.clone(),
            device: device.clone(),
        })
    }

    /// The model being trained.
    pub fn dvae(&self) -> &Dvae {
        &self.dvae
    }

    /// The training configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// Steps completed.
    pub fn step_count(&self) -> usize {
        self.opt.steps()
    }

    /// Loss terms for a batch at the current step, with the Gumbel noise of that step.
    /// Returns `(loss, recon, kl, logits)`.
    fn losses(&self, images: &Tensor) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let cfg = self.dvae.config();
        let (_, c, h, w) = images.dims4().map_err(|_| {
            TokenizerError::Input(format!(
                "a batch must be (B, C, H, W), got {:?}",
                images.dims()
            ))
        })?;
        if c != cfg.channels || h != cfg.image_size || w != cfg.image_size {
            return Err(TokenizerError::Input(format!(
                "the dVAE trains on (B, {}, {s}, {s}) images, got {:?}",
                cfg.channels,
                images.dims(),
                s = cfg.image_size
            )));
        }
        let step = self.opt.steps();
        let x = map_pixels(images)?;
        // Codes channels-last, (B, h, w, V): the softmaxes and the KL reduce over the last,
        // contiguous dimension, which is much faster than over dimension 1.
        let logits = self
            .dvae
            .encoder
            .forward(&x)?
            .permute((0, 2, 3, 1))?
            .contiguous()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            self.cfg.seed ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let noise = gumbel_noise(logits.dims(), &mut rng, &self.device)?;
        let tau = self.cfg.temperature(step);
        let z = gumbel_softmax(&logits, &noise, tau, self.cfg.straight_through, 3)?;
        let out = self.dvae.decoder.forward_channels_last(&z)?;
        let mu = out.narrow(1, 0, c)?;
        let recon = match self.cfg.recon_loss {
            ReconLoss::LogitLaplace => {
                let ln_b = out.narrow(1, c, c)?;
                // NLL of x under logit-Laplace(mu, b): |logit x - mu| / b + ln b + ln(2 x (1 - x)).
                let logit_x = (x.log()? - x.affine(-1.0, 1.0)?.log()?)?;
                let dev = (logit_x - &mu)?.abs()?;
                let base = (x.affine(-1.0, 1.0)? * &x)?.affine(2.0, 0.0)?.log()?;
                ((dev * ln_b.neg()?.exp()?)? + ln_b)?
                    .add(&base)?
                    .mean_all()?
            }
            ReconLoss::L1 => (candle_nn::ops::sigmoid(&mu)? - &x)?.abs()?.mean_all()?,
            ReconLoss::Mse => (candle_nn::ops::sigmoid(&mu)? - &x)?.sqr()?.mean_all()?,
        };
        let kl = kl_to_uniform(&logits, 3)?;
        let mut loss = (&recon + (&kl * self.cfg.kl_weight_at(step))?)?;
        if self.cfg.usage_weight > 0.0 {
            let ramp = self.cfg.kl_weight_at(step) / self.cfg.kl_weight.max(f64::MIN_POSITIVE);
            let v = logits.dim(3)?;
            let mean_q = candle_nn::ops::softmax(&logits, 3)?
                .reshape(((), v))?
                .mean(0)?;
            let marginal_kl =
                ((&mean_q * (&mean_q + 1e-10)?.log()?)?.sum_all()? + (v as f64).ln())?;
            let w = if self.cfg.kl_weight > 0.0 { ramp } else { 1.0 } * self.cfg.usage_weight;
            loss = (loss + (marginal_kl * w)?)?;
        }
        Ok((loss, recon, kl, logits))
    }

    /// Loss and gradients of a batch `(B, C, H, W)` in `[0, 1]` at the current step, without
    /// updating anything.
    pub fn gradients(&self, images: &Tensor) -> Result<(f64, GradStore)> {
        let (loss, ..) = self.losses(images)?;
        let grads = loss.backward()?;
        Ok((loss.to_scalar::<f32>()? as f64, grads))
    }

    /// One optimisation step on a batch `(B, C, H, W)` in `[0, 1]`.
    pub fn step(&mut self, images: &Tensor) -> Result<StepStats> {
        let step = self.opt.steps();
        let (loss, recon, kl, logits) = self.losses(images)?;
        let loss_v = loss.to_scalar::<f32>()? as f64;
        if !loss_v.is_finite() {
            return Err(TokenizerError::Input(format!(
                "loss is {loss_v} at step {step}; lower the learning rate"
            )));
        }
        let grads = loss.backward()?;
        let lr = self.cfg.lr_at(step);
        self.opt.step(&grads, lr)?;
        let ids = logits.argmax(3)?;
        Ok(StepStats {
            step: step + 1,
            loss: loss_v,
            recon: recon.to_scalar::<f32>()? as f64,
            kl: kl.to_scalar::<f32>()? as f64,
            tau: self.cfg.temperature(step),
            kl_weight: self.cfg.kl_weight_at(step),
            lr,
            codebook: codebook_stats(&ids, self.dvae.config().vocab_size)?,
        })
    }

    /// Evaluate the tokenizer on `images` `(N, C, H, W)` in `[0, 1]`, `batch_size` at a time:
    /// argmax codes, decoded reconstructions, their MSE and codebook use.
    pub fn evaluate(&self, images: &Tensor, batch_size: usize) -> Result<EvalStats> {
        evaluate(&self.dvae, images, batch_size)
    }

    /// Save parameters (`model.<name>`), optimizer moments and the step to `path`, atomically.
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let mut tensors: HashMap<String, Tensor> = self
            .dvae
            .named_vars()
            .into_iter()
            .map(|(k, v)| (format!("model.{k}"), v.as_tensor().detach()))
            .collect();
        tensors.extend(self.opt.state_tensors());
        let mut meta = HashMap::new();
        meta.insert("step".into(), self.opt.steps().to_string());
        meta.insert(
            "dvae_config".into(),
            serde_json::to_string(self.dvae.config()).expect("config serialises"),
        );
        save_weights(&tensors, meta, path)
    }

    /// Restore a checkpoint written by [`Trainer::save_checkpoint`]. Its model configuration
    /// must equal this trainer's.
    pub fn resume(&mut self, path: &Path) -> Result<()> {
        let file = WeightsFile::read(path, &self.device)?;
        let meta_err = |field: &str, reason: String| TokenizerError::Config {
            context: path.display().to_string(),
            field: field.into(),
            reason,
        };
        let saved: DvaeConfig = file
            .metadata
            .get("dvae_config")
            .ok_or_else(|| meta_err("dvae_config", "missing from the checkpoint metadata".into()))
            .and_then(|s| {
                serde_json::from_str(s).map_err(|e| meta_err("dvae_config", e.to_string()))
            })?;
        if &saved != self.dvae.config() {
            return Err(meta_err(
                "dvae_config",
                format!(
                    "the checkpoint's model {saved:?} differs from the configured {:?}",
                    self.dvae.config()
                ),
            ));
        }
        let step: usize = file
            .metadata
            .get("step")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| meta_err("step", "missing or not an integer".into()))?;
        let model: HashMap<String, Tensor> = file
            .tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("model.").map(|n| (n.to_string(), v.clone())))
            .collect();
        self.dvae.load_tensors(&model, path)?;
        self.opt.load_state(&file.tensors, step, path)
    }
}

/// Evaluate any dVAE (see [`Trainer::evaluate`]).
pub fn evaluate(dvae: &Dvae, images: &Tensor, batch_size: usize) -> Result<EvalStats> {
    let n = images.dim(0)?;
    let mut sq_sum = 0f64;
    let mut all_ids = Vec::new();
    let mut start = 0;
    while start < n {
        let len = batch_size.max(1).min(n - start);
        let batch = images.narrow(0, start, len)?;
        let ids = dvae.encoder.tokenize(&map_pixels(&batch)?)?;
        let recon = dvae.decoder.reconstruct(&ids)?;
        sq_sum += (recon - &batch)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        all_ids.push(ids.flatten_all()?);
        start += len;
    }
    let ids = Tensor::cat(&all_ids, 0)?;
    Ok(EvalStats {
        mse: sq_sum / images.elem_count() as f64,
        codebook: codebook_stats(&ids, dvae.config().vocab_size)?,
    })
}
