//! The training objective of our dVAE: the Gumbel-softmax relaxation.
//!
//! Per step, for images `x` in `[0, 1]`: encoder logits on `map_pixels(x)`; a relaxed one-hot sample
//! `softmax((logits + Gumbel noise) / tau)` (optionally straight-through); the decoder's
//! logit-Laplace parameters; loss = reconstruction + `beta(step) * KL(q || uniform)`. The
//! temperature `tau` anneals exponentially from `tau_start` to `tau_end`, `beta` ramps linearly
//! from 0 to `kl_weight`. [`dvae_losses`] computes one step's loss; the optimizer, schedule,
//! checkpoints and epoch loop are the training engine's (`beit-train`), driven by the
//! `train_tokenizer` recipe (`beit-recipes`). This module knows nothing about datasets.

use candle::Tensor;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::dvae::Dvae;
use crate::error::{Result, TokenizerError};
use crate::gumbel::{codebook_stats, gumbel_noise, gumbel_softmax, kl_to_uniform, CodebookStats};
use crate::pixels::map_pixels;
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

/// The relaxation and its regularisers (`[objective]` of a tokenizer recipe). The defaults are
/// generic starting points; the tuned Fashion-MNIST recipe is
/// `configs/tokenizer_fashion_mnist.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GumbelConfig {
    /// Initial Gumbel-softmax temperature. Default 1.0.
    pub tau_start: f64,
    /// Final temperature. Default 1/16.
    pub tau_end: f64,
    /// Steps over which the temperature decays exponentially; 0 means the whole run. Default 0.
    pub tau_anneal_steps: u64,
    /// Straight-through estimator: hard one-hot codes forward, soft gradients. Default false.
    pub straight_through: bool,
    /// Final weight of the KL-to-uniform term (per-token KL, in nats). Default 1e-3.
    pub kl_weight: f64,
    /// Steps of the linear ramp of the KL weight from 0. Default 500.
    pub kl_warmup_steps: u64,
    /// Weight of an extra anti-collapse term: the KL from the batch-averaged code distribution
    /// (the aggregate posterior) to uniform, ramped like `kl_weight`. The per-token KL keeps each
    /// position uncertain but does not stop every position from preferring the same few codes;
    /// this term does. 0 disables it. Default 0.
    pub usage_weight: f64,
    /// Reconstruction loss. Default `logit_laplace`.
    pub recon_loss: ReconLoss,
}

impl Default for GumbelConfig {
    fn default() -> Self {
        Self {
            tau_start: 1.0,
            tau_end: 1.0 / 16.0,
            tau_anneal_steps: 0,
            straight_through: false,
            kl_weight: 1e-3,
            kl_warmup_steps: 500,
            usage_weight: 0.0,
            recon_loss: ReconLoss::LogitLaplace,
        }
    }
}

impl GumbelConfig {
    /// Check the fields; `context` names the source in errors.
    pub fn validate(&self, context: &str) -> Result<()> {
        let err = |field: &str, reason: &str| {
            Err(TokenizerError::Config {
                context: context.into(),
                field: field.into(),
                reason: reason.into(),
            })
        };
        if !(self.tau_start > 0.0 && self.tau_end > 0.0) {
            return err("tau_start", "temperatures must be positive");
        }
        if self.kl_weight.is_nan() || self.kl_weight < 0.0 {
            return err("kl_weight", "must be >= 0");
        }
        if self.usage_weight.is_nan() || self.usage_weight < 0.0 {
            return err("usage_weight", "must be >= 0");
        }
        Ok(())
    }

    /// Gumbel-softmax temperature at `step` of a `total_steps` run: exponential decay from
    /// `tau_start` to `tau_end`.
    pub fn temperature(&self, step: u64, total_steps: u64) -> f64 {
        let span = if self.tau_anneal_steps == 0 {
            total_steps
        } else {
            self.tau_anneal_steps
        };
        let frac = (step as f64 / span.max(1) as f64).min(1.0);
        self.tau_start * (self.tau_end / self.tau_start).powf(frac)
    }

    /// KL weight at `step`: linear ramp from 0 to `kl_weight`.
    pub fn kl_weight_at(&self, step: u64) -> f64 {
        if self.kl_warmup_steps == 0 {
            return self.kl_weight;
        }
        self.kl_weight * (step as f64 / self.kl_warmup_steps as f64).min(1.0)
    }
}

/// One step's loss and its parts.
#[derive(Debug, Clone)]
pub struct Losses {
    /// The total loss (attached to the graph).
    pub loss: Tensor,
    /// Reconstruction term.
    pub recon: f64,
    /// KL-to-uniform term (before weighting).
    pub kl: f64,
    /// Temperature used.
    pub tau: f64,
    /// KL weight used.
    pub kl_weight: f64,
    /// Codebook use of the batch's argmax codes.
    pub codebook: CodebookStats,
}

/// The loss of `dvae` on `images` (`(B, C, H, W)` in `[0, 1]`) at optimizer step `step` of a
/// `total_steps` run; the Gumbel noise is drawn from `noise_seed`.
pub fn dvae_losses(
    dvae: &Dvae,
    cfg: &GumbelConfig,
    images: &Tensor,
    step: u64,
    total_steps: u64,
    noise_seed: u64,
) -> Result<Losses> {
    let mcfg = dvae.config();
    let (_, c, h, w) = images.dims4().map_err(|_| {
        TokenizerError::Input(format!(
            "a batch must be (B, C, H, W), got {:?}",
            images.dims()
        ))
    })?;
    if c != mcfg.channels || h != mcfg.image_size || w != mcfg.image_size {
        return Err(TokenizerError::Input(format!(
            "the dVAE trains on (B, {}, {s}, {s}) images, got {:?}",
            mcfg.channels,
            images.dims(),
            s = mcfg.image_size
        )));
    }
    let x = map_pixels(images)?;
    let logits = dvae
        .encoder
        .forward(&x)?
        .permute((0, 2, 3, 1))?
        .contiguous()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(noise_seed);
    let noise = gumbel_noise(logits.dims(), &mut rng, images.device())?;
    let tau = cfg.temperature(step, total_steps);
    let z = gumbel_softmax(&logits, &noise, tau, cfg.straight_through, 3)?;
    let out = dvae.decoder.forward_channels_last(&z)?;
    let mu = out.narrow(1, 0, c)?;
    let recon = match cfg.recon_loss {
        ReconLoss::LogitLaplace => {
            let ln_b = out.narrow(1, c, c)?;
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
    let kl_weight = cfg.kl_weight_at(step);
    let mut loss = (&recon + (&kl * kl_weight)?)?;
    if cfg.usage_weight > 0.0 {
        let ramp = kl_weight / cfg.kl_weight.max(f64::MIN_POSITIVE);
        let v = logits.dim(3)?;
        let mean_q = candle_nn::ops::softmax(&logits, 3)?
            .reshape(((), v))?
            .mean(0)?;
        let marginal_kl = ((&mean_q * (&mean_q + 1e-10)?.log()?)?.sum_all()? + (v as f64).ln())?;
        let w = if cfg.kl_weight > 0.0 { ramp } else { 1.0 } * cfg.usage_weight;
        loss = (loss + (marginal_kl * w)?)?;
    }
    let ids = logits.detach().argmax(3)?;
    Ok(Losses {
        loss,
        recon: recon.to_scalar::<f32>()? as f64,
        kl: kl.to_scalar::<f32>()? as f64,
        tau,
        kl_weight,
        codebook: codebook_stats(&ids, mcfg.vocab_size)?,
    })
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

/// Reconstruction error and codebook use of `dvae` on `images` with hard (argmax) codes, in
/// batches of `batch_size`.
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
