//! The Gumbel-softmax relaxation of a categorical sample, the KL term to a uniform prior, and
//! codebook statistics.
//!
//! Everything here is built from differentiable candle ops (`candle_nn::ops::softmax` /
//! `log_softmax`, not the fused `softmax_last_dim`, which has no backward pass). Random numbers
//! come from a seeded host RNG, since candle's CPU RNG cannot be seeded.

use candle::{DType, Device, Tensor};
use rand::Rng;

/// Standard Gumbel noise `-ln(-ln U)`, `U ~ Uniform(0, 1)`, of the given shape.
pub fn gumbel_noise<R: Rng>(
    dims: &[usize],
    rng: &mut R,
    device: &Device,
) -> candle::Result<Tensor> {
    let n: usize = dims.iter().product();
    let noise: Vec<f32> = (0..n)
        .map(|_| {
            // Keep U away from 0 and 1 so both logarithms stay finite.
            let u: f32 = rng.random_range(1e-7f32..1.0 - 1e-7);
            -(-u.ln()).ln()
        })
        .collect();
    Tensor::from_vec(noise, dims, device)
}

/// One-hot encoding along `dim` of the argmax along `dim` (same shape as `x`, dtype of `x`).
pub fn hard_one_hot(x: &Tensor, dim: usize) -> candle::Result<Tensor> {
    let v = x.dim(dim)?;
    let ids = x.argmax_keepdim(dim)?;
    let mut shape = vec![1usize; x.rank()];
    shape[dim] = v;
    let range = Tensor::arange(0u32, v as u32, x.device())?.reshape(shape)?;
    ids.broadcast_eq(&range)?.to_dtype(x.dtype())
}

/// Gumbel-softmax sample along `dim`: `softmax((logits + noise) / tau)`.
///
/// With `hard`, the forward value is the one-hot argmax of that sample while gradients flow
/// through the soft sample (straight-through estimator): `hard - stop_grad(soft) + soft`.
pub fn gumbel_softmax(
    logits: &Tensor,
    noise: &Tensor,
    tau: f64,
    hard: bool,
    dim: usize,
) -> candle::Result<Tensor> {
    let y = candle_nn::ops::softmax(&((logits + noise)? / tau)?, dim)?;
    if !hard {
        return Ok(y);
    }
    let y_hard = hard_one_hot(&y, dim)?;
    (y_hard - y.detach())? + y
}

/// `KL(q || uniform)` for `q = softmax(logits)` along `dim`, averaged over every other position:
/// `sum_k q_k ln q_k + ln V`. Zero when the encoder is maximally uncertain, `ln V` when certain.
pub fn kl_to_uniform(logits: &Tensor, dim: usize) -> candle::Result<Tensor> {
    let v = logits.dim(dim)? as f64;
    let log_q = candle_nn::ops::log_softmax(logits, dim)?;
    let neg_entropy = (log_q.exp()? * &log_q)?.sum(dim)?;
    (neg_entropy + v.ln())?.mean_all()
}

/// How much of a codebook a set of code ids uses.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CodebookStats {
    /// Number of distinct codes that occur.
    pub used: usize,
    /// `used / vocab_size`.
    pub usage: f64,
    /// `exp(entropy)` of the code histogram: the effective number of codes in use.
    pub perplexity: f64,
}

/// Codebook usage and perplexity of `ids` (any shape, integer dtype) over a vocabulary.
pub fn codebook_stats(ids: &Tensor, vocab_size: usize) -> candle::Result<CodebookStats> {
    let ids: Vec<u32> = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
    let mut counts = vec![0usize; vocab_size];
    for &i in &ids {
        if let Some(c) = counts.get_mut(i as usize) {
            *c += 1;
        }
    }
    let total = ids.len().max(1) as f64;
    let used = counts.iter().filter(|&&c| c > 0).count();
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total;
            -p * p.ln()
        })
        .sum();
    Ok(CodebookStats {
        used,
        usage: used as f64 / vocab_size as f64,
        perplexity: entropy.exp(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn gumbel_softmax_is_a_distribution_and_hard_is_one_hot() -> candle::Result<()> {
        let dev = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let logits = Tensor::new(&[[1f32, 2.0, 0.5], [0.0, 0.0, 3.0]], &dev)?;
        let noise = gumbel_noise(&[2, 3], &mut rng, &dev)?;
        let soft = gumbel_softmax(&logits, &noise, 0.5, false, 1)?;
        for s in soft.sum(1)?.to_vec1::<f32>()? {
            assert!((s - 1.0).abs() < 1e-5);
        }
        let hard = gumbel_softmax(&logits, &noise, 0.5, true, 1)?;
        for row in hard.to_vec2::<f32>()? {
            let ones = row.iter().filter(|&&v| (v - 1.0).abs() < 1e-5).count();
            let zeros = row.iter().filter(|&&v| v.abs() < 1e-5).count();
            assert_eq!((ones, zeros), (1, 2), "{row:?}");
        }
        // At a low temperature with no noise the sample is the argmax.
        let zero = logits.zeros_like()?;
        let cold = gumbel_softmax(&logits, &zero, 0.01, false, 1)?.to_vec2::<f32>()?;
        assert!(cold[0][1] > 0.99 && cold[1][2] > 0.99);
        Ok(())
    }

    #[test]
    fn gumbel_noise_has_the_right_mean() -> candle::Result<()> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let n = gumbel_noise(&[20000], &mut rng, &Device::Cpu)?;
        let mean = n.mean_all()?.to_scalar::<f32>()?;
        // E[Gumbel(0, 1)] = Euler-Mascheroni constant.
        assert!((mean - 0.5772).abs() < 0.03, "{mean}");
        Ok(())
    }

    #[test]
    fn kl_is_zero_for_uniform_and_ln_v_for_certain() -> candle::Result<()> {
        let dev = Device::Cpu;
        let flat = Tensor::zeros((2, 4, 3, 3), DType::F32, &dev)?;
        assert!(kl_to_uniform(&flat, 1)?.to_scalar::<f32>()?.abs() < 1e-6);
        let sharp = hard_one_hot(&Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &dev)?, 1)?;
        let kl = kl_to_uniform(&(sharp * 100.0)?, 1)?.to_scalar::<f32>()?;
        assert!((kl - 4f32.ln()).abs() < 1e-3, "{kl}");
        Ok(())
    }

    #[test]
    fn codebook_stats_counts() -> candle::Result<()> {
        let ids = Tensor::new(&[0u32, 0, 1, 1, 2, 2, 3, 3], &Device::Cpu)?;
        let s = codebook_stats(&ids, 8)?;
        assert_eq!(s.used, 4);
        assert!((s.usage - 0.5).abs() < 1e-12);
        assert!((s.perplexity - 4.0).abs() < 1e-9);
        Ok(())
    }
}
