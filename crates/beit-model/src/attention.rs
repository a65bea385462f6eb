//! Multi-head self-attention with q and v biases (no k bias) and an additive relative position bias.

use candle::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;

use beit_kernels::{
    attention_core, attention_core_rows, autocast_matmul, merge_heads, softmax_last_dim,
    softmax_with_bias, split_heads, stack3_scaled_first, QueryRows,
};

use crate::config::BeitConfig;
use crate::layers::{linear, Dropout, Linear, StochasticRng};
use crate::relative_position::RelativePositionBias;

/// `beit.encoder.layer.{i}.attention`: self-attention followed by its output projection.
#[derive(Debug)]
pub struct BeitAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    /// Fused `(3C, C)` weight and `(3C)` bias, precomputed when the weights are not trainable.
    fused: Option<(Tensor, Tensor)>,
    output: Linear,
    relative_position_bias: Option<RelativePositionBias>,
    num_heads: usize,
    head_dim: usize,
    attn_dropout: Dropout,
}

impl BeitAttention {
    /// Load under `vb` (= `beit.encoder.layer.{i}.attention`); `per_layer_bias` adds this layer's table.
    pub fn new(
        cfg: &BeitConfig,
        vb: VarBuilder,
        per_layer_bias: bool,
        rng: StochasticRng,
    ) -> Result<Self> {
        let c = cfg.hidden_size;
        let avb = vb.pp("attention");
        let query = linear(c, c, true, avb.pp("query"))?;
        let key = linear(c, c, false, avb.pp("key"))?;
        let value = linear(c, c, true, avb.pp("value"))?;
        let relative_position_bias = if per_layer_bias {
            let g = cfg.grid_size();
            Some(RelativePositionBias::new(
                (g, g),
                cfg.num_attention_heads,
                avb.pp("relative_position_bias"),
            )?)
        } else {
            None
        };
        let output = linear(c, c, true, vb.pp("output").pp("dense"))?;
        let trainable = [query.weight(), key.weight(), value.weight()]
            .iter()
            .any(|t| t.is_variable())
            || query.bias().is_some_and(|b| b.is_variable());
        let mut attn = Self {
            query,
            key,
            value,
            fused: None,
            output,
            relative_position_bias,
            num_heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
            attn_dropout: Dropout::new(cfg.attention_probs_dropout_prob, rng),
        };
        if !trainable {
            attn.fused = Some(attn.fused_qkv()?);
        }
        Ok(attn)
    }

    /// This layer's own relative position table, if it has one.
    pub fn relative_position_bias(&self) -> Option<&RelativePositionBias> {
        self.relative_position_bias.as_ref()
    }

    /// One `(3C, C)` projection for q, k, v with bias `cat(q_bias, 0, v_bias)`, the attention
    /// scale `head_dim^-0.5` folded into the q rows (a `(C, C)` multiply instead of one over every
    /// token; exact for power-of-two head dims such as 64).
    fn fused_qkv(&self) -> Result<(Tensor, Tensor)> {
        let scale = (self.head_dim as f64).powf(-0.5);
        let w = stack3_scaled_first(
            self.query.weight(),
            self.key.weight(),
            self.value.weight(),
            scale,
        )?;
        let qb = self.query.bias().expect("query has a bias");
        let vb = self.value.bias().expect("value has a bias");
        let b = stack3_scaled_first(qb, &qb.zeros_like()?, vb, scale)?;
        Ok((w, b))
    }

    /// Attend over `x` `(B, T, C)` with the additive `bias` `(1, H, T, T)` (shared, may be `None`) plus
    /// this layer's own table. Returns the projected output and, if asked, the attention probabilities.
    pub fn forward(
        &self,
        x: &Tensor,
        shared_bias: Option<&Tensor>,
        window: (usize, usize),
        train: bool,
        want_probs: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, t, c) = x.dims3()?;
        let h = self.num_heads;
        if !want_probs && !self.attn_dropout.is_active(train) {
            // The attention core reads every head in place and writes the heads merged.
            let (qkv, bias) = self.projection_and_bias(x, shared_bias, window)?;
            let attended = attention_core(&qkv, bias.as_ref(), b, h)?;
            return Ok((self.output.forward(&attended)?, None));
        }
        // The probabilities are wanted (or dropped out): materialise them.
        let x2 = x.reshape((b * t, c))?;
        // q is pre-scaled (see `fused_qkv`); each head split adds its bias in the same pass.
        let (q, k, v) = match &self.fused {
            Some((w, bias)) => {
                // Frozen weights: one (3C, C) GEMM, each split reading its third of the columns.
                let qkv = autocast_matmul(&x2, &w.t()?)?;
                let (qb, vb) = (bias.narrow(0, 0, c)?, bias.narrow(0, 2 * c, c)?);
                (
                    split_heads(&qkv, Some(&qb), b, t, h, 3, 0)?,
                    split_heads(&qkv, None, b, t, h, 3, 1)?,
                    split_heads(&qkv, Some(&vb), b, t, h, 3, 2)?,
                )
            }
            None => {
                // Trainable: three projections, so that each split has a one-pass backward
                // (slicing one fused output would send three zero-padded gradients back).
                let scale = (self.head_dim as f64).powf(-0.5);
                let qb = (self.query.bias().expect("query has a bias") * scale)?;
                let vb = self.value.bias().expect("value has a bias");
                let q = autocast_matmul(&x2, &(self.query.weight() * scale)?.t()?)?;
                let k = autocast_matmul(&x2, &self.key.weight().t()?)?;
                let v = autocast_matmul(&x2, &self.value.weight().t()?)?;
                (
                    split_heads(&q, Some(&qb), b, t, h, 1, 0)?,
                    split_heads(&k, None, b, t, h, 1, 0)?,
                    split_heads(&v, Some(vb), b, t, h, 1, 0)?,
                )
            }
        };
        let scores = autocast_matmul(&q, &k.t()?)?;
        let bias = self.attention_bias(shared_bias, window, scores.dtype())?;
        // Bias add and softmax in one pass (and one backward pass when training).
        let probs = match &bias {
            Some(bias) => softmax_with_bias(&scores, bias)?,
            None => softmax_last_dim(&scores)?,
        };
        let attended = autocast_matmul(&self.attn_dropout.forward_t(&probs, train)?, &v)?; // (B, H, T, D)
        let out = self
            .output
            .forward(&merge_heads(&attended)?)?
            .reshape((b, t, c))?;
        Ok((out, want_probs.then_some(probs)))
    }

    /// The output at the selected query rows only, `(M, C)`, or `None` when attention dropout is
    /// active (its mask covers every row): the caller then runs the full forward pass.
    pub fn forward_rows(
        &self,
        x: &Tensor,
        shared_bias: Option<&Tensor>,
        window: (usize, usize),
        train: bool,
        queries: &QueryRows,
    ) -> Result<Option<Tensor>> {
        if self.attn_dropout.is_active(train) {
            return Ok(None);
        }
        // Keys and values are needed for every token; queries only for the selected rows.
        let (qkv, bias) = self.projection_and_bias(x, shared_bias, window)?;
        let attended =
            attention_core_rows(&qkv, bias.as_ref(), x.dim(0)?, self.num_heads, queries)?;
        Ok(Some(self.output.forward(&attended)?))
    }

    /// The attention core's inputs: one `(3C, C)` projection of `x` with the q/v biases folded
    /// into the GEMM, `(B, T, 3C)` (no reshape node), and the additive attention bias.
    fn projection_and_bias(
        &self,
        x: &Tensor,
        shared_bias: Option<&Tensor>,
        window: (usize, usize),
    ) -> Result<(Tensor, Option<Tensor>)> {
        let qkv = match &self.fused {
            Some((w, bias)) => beit_kernels::linear(x, w, Some(bias))?,
            None => {
                let (w, bias) = self.fused_qkv()?;
                beit_kernels::linear(x, &w, Some(&bias))?
            }
        };
        let bias = self.attention_bias(shared_bias, window, qkv.dtype())?;
        Ok((qkv, bias))
    }

    /// The additive attention bias `(1, H, T, T)`: this layer's table plus the shared one, either
    /// of which may be absent.
    fn attention_bias(
        &self,
        shared_bias: Option<&Tensor>,
        window: (usize, usize),
        dtype: candle::DType,
    ) -> Result<Option<Tensor>> {
        let own = match &self.relative_position_bias {
            Some(rpb) => Some(rpb.forward(window)?.to_dtype(dtype)?),
            None => None,
        };
        let shared = match shared_bias {
            Some(s) => Some(s.to_dtype(dtype)?),
            None => None,
        };
        Ok(match (own, shared) {
            (Some(a), Some(b)) => Some(a.broadcast_add(&b)?),
            (a, b) => a.or(b),
        })
    }
}
