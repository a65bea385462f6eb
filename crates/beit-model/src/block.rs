//! A pre-norm transformer block with LayerScale and stochastic depth (`BeitLayer` in `transformers`).

use candle::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;

use crate::attention::BeitAttention;
use crate::config::BeitConfig;
use crate::layers::{linear, Activation, DropPath, Dropout, LayerNorm, Linear, StochasticRng};
use crate::ops;

/// `beit.encoder.layer.{i}`:
/// `x += drop_path(lambda_1 * attn(LN(x)))`, then `x += drop_path(lambda_2 * mlp(LN(x)))`.
#[derive(Debug)]
pub struct BeitLayer {
    layernorm_before: LayerNorm,
    attention: BeitAttention,
    lambda_1: Option<Tensor>,
    layernorm_after: LayerNorm,
    intermediate: Linear,
    activation: Activation,
    output: Linear,
    lambda_2: Option<Tensor>,
    dropout: Dropout,
    drop_path: DropPath,
}

impl BeitLayer {
    /// Load under `vb` (= `beit.encoder.layer.{i}`) with stochastic-depth rate `drop_path`.
    pub fn new(
        cfg: &BeitConfig,
        vb: VarBuilder,
        drop_path: f64,
        rng: StochasticRng,
    ) -> Result<Self> {
        let c = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let (lambda_1, lambda_2) = if cfg.layer_scale_init_value > 0.0 {
            let init = candle_nn::Init::Const(cfg.layer_scale_init_value);
            (
                Some(vb.get_with_hints(c, "lambda_1", init)?),
                Some(vb.get_with_hints(c, "lambda_2", init)?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            layernorm_before: LayerNorm::new(c, eps, vb.pp("layernorm_before"))?,
            attention: BeitAttention::new(
                cfg,
                vb.pp("attention"),
                cfg.use_relative_position_bias,
                rng.clone(),
            )?,
            lambda_1,
            layernorm_after: LayerNorm::new(c, eps, vb.pp("layernorm_after"))?,
            intermediate: linear(
                c,
                cfg.intermediate_size,
                true,
                vb.pp("intermediate").pp("dense"),
            )?,
            activation: Activation::parse(&cfg.hidden_act).map_err(candle::Error::Msg)?,
            output: linear(cfg.intermediate_size, c, true, vb.pp("output").pp("dense"))?,
            lambda_2,
            dropout: Dropout::new(cfg.hidden_dropout_prob, rng.clone()),
            drop_path: DropPath::new(drop_path, rng),
        })
    }

    /// The attention sub-module.
    pub fn attention(&self) -> &BeitAttention {
        &self.attention
    }

    /// Run the block on `x` `(B, T, C)`; returns the new hidden state and optionally the attention.
    pub fn forward(
        &self,
        x: &Tensor,
        shared_bias: Option<&Tensor>,
        window: (usize, usize),
        train: bool,
        want_probs: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let h = self.layernorm_before.forward(x)?;
        let (h, probs) = self
            .attention
            .forward(&h, shared_bias, window, train, want_probs)?;
        let h = self.dropout.forward_t(&h, train)?;
        let x = self.residual(x, &h, self.lambda_1.as_ref(), train)?;

        let h = self.layernorm_after.forward(&x)?;
        let h = self.mlp_hidden(&h)?;
        let h = self.dropout.forward_t(&self.output.forward(&h)?, train)?;
        let x = self.residual(&x, &h, self.lambda_2.as_ref(), train)?;
        Ok((x, probs))
    }
}

impl BeitLayer {
    /// The block's output at the selected token rows only, `(M, C)` in the order of `queries`
    /// (image by image): exactly the corresponding rows of [`BeitLayer::forward`], computed
    /// with attention queries, LayerNorm and MLP on those rows alone (keys and values still come
    /// from every token). Stochastic depth draws the same per-image factors as the full pass.
    pub fn forward_rows(
        &self,
        x: &Tensor,
        shared_bias: Option<&Tensor>,
        window: (usize, usize),
        train: bool,
        queries: &ops::QueryRows,
    ) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let idx = Tensor::from_vec(queries.flat_indices(t), queries.len(), &candle::Device::Cpu)?
            .to_device(x.device())?;
        let residual_fused = [&self.lambda_1, &self.lambda_2]
            .iter()
            .all(|l| l.as_ref().is_some_and(|l| ops::fused_cpu_f32(&[x, l])));
        let attended = if residual_fused && !self.dropout.is_active(train) {
            let h = self.layernorm_before.forward(x)?;
            self.attention
                .forward_rows(&h, shared_bias, window, train, queries)?
        } else {
            None
        };
        let Some(h) = attended else {
            let (full, _) = self.forward(x, shared_bias, window, train, false)?;
            return full.reshape((b * t, c))?.index_select(&idx, 0);
        };
        // Per-image stochastic-depth factors, repeated for each selected row of that image.
        let per_row = |keep: Option<Vec<f32>>| {
            keep.map(|k| {
                (0..b)
                    .flat_map(|i| std::iter::repeat_n(k[i], queries.of(i).len()))
                    .collect::<Vec<f32>>()
            })
        };
        let lambda_1 = self.lambda_1.as_ref().expect("checked above");
        let lambda_2 = self.lambda_2.as_ref().expect("checked above");
        let x = x.reshape((b * t, c))?.index_select(&idx, 0)?;
        let keep = per_row(self.drop_path.sample_factors(b, train));
        let x = ops::scaled_residual(&x, &h, lambda_1, keep)?;
        let h = self.layernorm_after.forward(&x)?;
        let h = self.output.forward(&self.mlp_hidden(&h)?)?;
        let keep = per_row(self.drop_path.sample_factors(b, train));
        ops::scaled_residual(&x, &h, lambda_2, keep)
    }

    /// `x + drop_path(lambda * h)`, in one pass (and one backward pass) when the kernels apply.
    fn residual(
        &self,
        x: &Tensor,
        h: &Tensor,
        lambda: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        match lambda {
            Some(l) if ops::fused_cpu_f32(&[x, h, l]) => {
                let keep = self.drop_path.sample_factors(x.dim(0)?, train);
                ops::scaled_residual(x, h, l, keep)
            }
            _ => {
                let h = scale(h, lambda)?;
                self.drop_path.forward_t(&h, train)? + x
            }
        }
    }

    /// `act(intermediate(h))`; exact GELU with its bias add fused into one pass (and one backward
    /// pass) when the kernels apply.
    fn mlp_hidden(&self, h: &Tensor) -> Result<Tensor> {
        let (w, bias) = (self.intermediate.weight(), self.intermediate.bias());
        match bias {
            Some(bias)
                if self.activation == Activation::GeluErf && ops::fused_cpu_f32(&[h, w, bias]) =>
            {
                ops::bias_gelu_erf(&ops::linear(h, w, None)?, bias)
            }
            _ => self.activation.forward(&self.intermediate.forward(h)?),
        }
    }
}

fn scale(h: &Tensor, lambda: Option<&Tensor>) -> Result<Tensor> {
    match lambda {
        Some(l) => h.broadcast_mul(l),
        None => Ok(h.clone()),
    }
}
