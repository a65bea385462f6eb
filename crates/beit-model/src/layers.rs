//! Building blocks: LayerNorm that keeps gradients, linear layers, activations, DropPath and dropout
//! driven by a seedable RNG.

use std::sync::{Arc, Mutex};

use beit_rng::{absorb, mix64};
use candle::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// LayerNorm over the last dimension ([`beit_kernels::layer_norm`]: keeps gradients).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Load `weight` and `bias` of width `dim` under `vb`.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        beit_kernels::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// A fully connected layer with PyTorch's weight layout `(out, in)`: `y = x W^T + b`.
///
/// Unlike `candle_nn::Linear`, the f32 CPU path is one GEMM with the bias folded in and a
/// single-node backward pass ([`beit_kernels::linear`]); elsewhere it is the same composition.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// A layer from its `(out, in)` weight and optional `(out)` bias.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The `(out, in)` weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The `(out)` bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl candle::Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        beit_kernels::linear(x, &self.weight, self.bias.as_ref())
    }
}

/// A [`Linear`] `(out, in)` under `vb` (`weight`, and `bias` when asked), initialised as BEiT
/// initialises it when the weights are not in `vb`.
pub fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let init = candle_nn::Init::Randn {
        mean: 0.0,
        stdev: 0.02,
    };
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
    let bias = if bias {
        Some(vb.get_with_hints(out_dim, "bias", candle_nn::Init::Const(0.0))?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

/// MLP activations found in BEiT configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU, `x * Phi(x)` with erf (`gelu` in `transformers`; what BEiT uses).
    GeluErf,
    /// Tanh approximation of GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// ReLU.
    Relu,
}

impl Activation {
    /// Parse the `hidden_act` string of a config.
    pub fn parse(name: &str) -> std::result::Result<Self, String> {
        match name {
            "gelu" => Ok(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Self::GeluTanh),
            "relu" => Ok(Self::Relu),
            other => Err(other.to_string()),
        }
    }
}

impl Module for Activation {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::GeluErf => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::Relu => x.relu(),
        }
    }
}

/// The random source of stochastic layers (DropPath, dropout), shared by all layers of a model.
///
/// candle cannot seed its CPU RNG, so masks are drawn here on the host and uploaded. The draws are
/// counter-based: the value for element `e` of batch sample `s` in the `d`-th draw since the last
/// reseed is a hash of `(seed, d, id(s), e)`. `id(s)` is `s` after [`reseed`](Self::reseed), or
/// the sample's global index after [`reseed_for_samples`](Self::reseed_for_samples): a
/// data-parallel run that gives each process a share of the batch then draws, for every image,
/// exactly what one process draws for it. Reseeding from the training step makes a resumed run
/// draw the same masks.
#[derive(Debug, Clone)]
pub struct StochasticRng(Arc<Mutex<RngState>>);

#[derive(Debug)]
struct RngState {
    seed: u64,
    draws: u64,
    samples: Vec<u64>,
}

impl StochasticRng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(Arc::new(Mutex::new(RngState {
            seed,
            draws: 0,
            samples: Vec::new(),
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RngState> {
        // A poisoned lock only means another thread panicked mid-draw; the state is plain data.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Restart the stream from `seed`; batch sample `s` is keyed by `s`.
    pub fn reseed(&self, seed: u64) {
        self.reseed_for_samples(seed, Vec::new());
    }

    /// Restart the stream from `seed`, keying batch sample `s` by `samples[s]` (its index in the
    /// global batch of a data-parallel step; samples beyond the list are keyed by `s`).
    pub fn reseed_for_samples(&self, seed: u64, samples: Vec<u64>) {
        *self.state() = RngState {
            seed,
            draws: 0,
            samples,
        };
    }

    /// One draw: `batch x per_sample` uniform values in [0, 1), sample-major.
    fn uniform(&self, batch: usize, per_sample: usize) -> Vec<f32> {
        let mut st = self.state();
        // beit_rng::chain(mix64(seed), [draw, sample, element]), absorbed one key at a time.
        let base = absorb(mix64(st.seed), st.draws);
        st.draws += 1;
        let mut out = Vec::with_capacity(batch * per_sample);
        for s in 0..batch {
            let id = st.samples.get(s).copied().unwrap_or(s as u64);
            let key = absorb(base, id);
            // The top 24 bits: an exact f32 in [0, 1).
            out.extend(
                (0..per_sample).map(|e| (absorb(key, e as u64) >> 40) as f32 / (1u32 << 24) as f32),
            );
        }
        out
    }

    /// One draw of keep factors: 0 with probability `drop`, else `1/keep` (the inverted-dropout
    /// scaling folded in), `batch x per_sample` values, sample-major.
    fn keep_factors(&self, batch: usize, per_sample: usize, drop: f64) -> Vec<f32> {
        let keep = 1.0 - drop;
        let scale = (1.0 / keep) as f32;
        self.uniform(batch, per_sample)
            .into_iter()
            .map(|u| if (u as f64) < keep { scale } else { 0.0 })
            .collect()
    }

    /// A keep-mask of `shape` (batch first) from [`keep_factors`](Self::keep_factors).
    fn keep_mask(&self, shape: &[usize], drop: f64, like: &Tensor) -> Result<Tensor> {
        let batch = shape.first().copied().unwrap_or(1);
        let per_sample = shape.iter().skip(1).product();
        let values = self.keep_factors(batch, per_sample, drop);
        Tensor::from_vec(values, shape, like.device())?.to_dtype(like.dtype())
    }
}

impl Default for StochasticRng {
    fn default() -> Self {
        Self::new(0)
    }
}

/// Stochastic depth: drops a whole residual branch per sample with probability `prob` (training only).
#[derive(Debug, Clone)]
pub struct DropPath {
    prob: f64,
    rng: StochasticRng,
}

impl DropPath {
    /// A DropPath layer with drop probability `prob`.
    pub fn new(prob: f64, rng: StochasticRng) -> Self {
        Self { prob, rng }
    }
}

impl DropPath {
    /// Per-sample factors (0 or `1/keep`) for a batch of `batch`, drawn exactly as
    /// `forward_t` draws them; `None` when the layer is the identity (eval, or rate 0).
    pub fn sample_factors(&self, batch: usize, train: bool) -> Option<Vec<f32>> {
        if !train || self.prob <= 0.0 {
            return None;
        }
        Some(self.rng.keep_factors(batch, 1, self.prob))
    }
}

impl candle::ModuleT for DropPath {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.prob <= 0.0 {
            return Ok(x.clone());
        }
        let mut shape = vec![1; x.rank()];
        shape[0] = x.dim(0)?;
        x.broadcast_mul(&self.rng.keep_mask(&shape, self.prob, x)?)
    }
}

/// Element-wise dropout (training only), seeded through [`StochasticRng`].
#[derive(Debug, Clone)]
pub struct Dropout {
    prob: f64,
    rng: StochasticRng,
}

impl Dropout {
    /// A dropout layer with drop probability `prob`.
    pub fn new(prob: f64, rng: StochasticRng) -> Self {
        Self { prob, rng }
    }

    /// Whether a forward pass in this mode drops anything.
    pub fn is_active(&self, train: bool) -> bool {
        train && self.prob > 0.0
    }
}

impl candle::ModuleT for Dropout {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.prob <= 0.0 {
            return Ok(x.clone());
        }
        x.mul(&self.rng.keep_mask(x.dims(), self.prob, x)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{DType, Device, ModuleT, Var};

    #[test]
    fn layer_norm_paths_agree_and_slow_path_has_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 5, 8), &dev)?;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.1, 8, &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.1, 8, &dev)?)?;
        let fused = LayerNorm {
            weight: w.as_detached_tensor(),
            bias: b.as_detached_tensor(),
            eps: 1e-6,
        };
        let tracked = LayerNorm {
            weight: w.as_tensor().clone(),
            bias: b.as_tensor().clone(),
            eps: 1e-6,
        };
        let a = fused.forward(&x)?;
        let c = tracked.forward(&x)?;
        let diff = (a - &c)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(
            diff < 1e-5,
            "fused vs differentiable LayerNorm differ by {diff}"
        );
        let grads = c.sqr()?.sum_all()?.backward()?;
        assert!(grads.get(w.as_tensor()).is_some() && grads.get(b.as_tensor()).is_some());
        Ok(())
    }

    #[test]
    fn draws_keyed_by_global_sample_do_not_depend_on_how_the_batch_is_split() {
        // One process with 6 images vs two processes with images 0, 2, 4 and 1, 3, 5 (the
        // interleaved shards of a data-parallel step): each image gets the same draws.
        let one = StochasticRng::new(0);
        one.reseed(11);
        let full: Vec<Vec<f32>> = (0..3).map(|_| one.uniform(6, 4)).collect();
        for rank in 0..2u64 {
            let r = StochasticRng::new(0);
            r.reseed_for_samples(11, vec![rank, rank + 2, rank + 4]);
            for draw in &full {
                let part = r.uniform(3, 4);
                for (k, chunk) in part.chunks(4).enumerate() {
                    let s = (2 * k as u64 + rank) as usize;
                    assert_eq!(chunk, &draw[s * 4..s * 4 + 4]);
                }
            }
        }
        // Successive draws and samples differ; values lie in [0, 1) with a sane mean.
        assert_ne!(full[0], full[1]);
        assert_ne!(full[0][..4], full[0][4..8]);
        let r = StochasticRng::new(3);
        let many = r.uniform(1000, 10);
        assert!(many.iter().all(|&u| (0.0..1.0).contains(&u)));
        let mean = many.iter().sum::<f32>() / many.len() as f32;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
    }

    #[test]
    fn drop_path_is_identity_in_eval_and_reproducible_in_training() -> Result<()> {
        let x = Tensor::ones((64, 3, 4), DType::F32, &Device::Cpu)?;
        let rng = StochasticRng::new(7);
        let dp = DropPath::new(0.5, rng.clone());
        assert_eq!(
            dp.forward_t(&x, false)?.sum_all()?.to_scalar::<f32>()?,
            64. * 12.
        );
        let a = dp.forward_t(&x, true)?.flatten_all()?.to_vec1::<f32>()?;
        rng.reseed(7);
        let b = dp.forward_t(&x, true)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(a, b);
        // Whole samples are dropped or scaled by 1/keep.
        assert!(a.iter().all(|&v| v == 0.0 || v == 2.0));
        assert!(a.contains(&0.0) && a.contains(&2.0));
        Ok(())
    }
}
