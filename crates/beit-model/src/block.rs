//! A pre-norm transformer block with LayerScale and stochastic depth (`BeitLayer` in `transformers`).

use candle::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;

use crate::attention::BeitAttention;
use crate::config::BeitConfig;
use crate::layers::{linear, Activation, DropPath, Dropout, LayerNorm, Linear, StochasticRng};
use beit_kernels::{bias_gelu_erf, residual, QueryRows};

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
        let (h, probs) = self.attention.forward(
            &self.layernorm_before.forward(x)?,
            shared_bias,
            window,
            train,
            want_probs,
        )?;
        let x = self.residual(
            x,
            &self.dropout.forward_t(&h, train)?,
            &self.lambda_1,
            train,
        )?;
        let h = self.mlp(&self.layernorm_after.forward(&x)?)?;
        let x = self.residual(
            &x,
            &self.dropout.forward_t(&h, train)?,
            &self.lambda_2,
            train,
        )?;
        Ok((x, probs))
    }

    /// The block's output at the selected token rows only, `(M, C)` in the order of `queries`
    /// (image by image): the corresponding rows of [`BeitLayer::forward`], computed with
    /// attention queries, LayerNorm and MLP on those rows alone (keys and values still come from
    /// every token). Stochastic depth draws the same per-image factors as the full pass. With
    /// dropout active (whose masks depend on the full shape) it is the full pass, then the rows.
    pub fn forward_rows(
        &self,
        x: &Tensor,
        shared_bias: Option<&Tensor>,
        window: (usize, usize),
        train: bool,
        queries: &QueryRows,
    ) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let idx = Tensor::from_vec(queries.flat_indices(t), queries.len(), &candle::Device::Cpu)?
            .to_device(x.device())?;
        let attended = if self.dropout.is_active(train) {
            None
        } else {
            let h = self.layernorm_before.forward(x)?;
            self.attention
                .forward_rows(&h, shared_bias, window, train, queries)?
        };
        let Some(h) = attended else {
            let (full, _) = self.forward(x, shared_bias, window, train, false)?;
            return full.reshape((b * t, c))?.index_select(&idx, 0);
        };
        // Per-image stochastic-depth factors, repeated for each selected row of that image.
        let keep = || {
            self.drop_path.sample_factors(b, train).map(|k| {
                (0..b)
                    .flat_map(|i| std::iter::repeat_n(k[i], queries.of(i).len()))
                    .collect::<Vec<f32>>()
            })
        };
        let x = x.reshape((b * t, c))?.index_select(&idx, 0)?;
        let x = residual(&x, &h, self.lambda_1.as_ref(), keep())?;
        let h = self.mlp(&self.layernorm_after.forward(&x)?)?;
        residual(&x, &h, self.lambda_2.as_ref(), keep())
    }

    /// `x + drop_path(lambda * h)`.
    fn residual(
        &self,
        x: &Tensor,
        h: &Tensor,
        lambda: &Option<Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let keep = self.drop_path.sample_factors(x.dim(0)?, train);
        residual(x, h, lambda.as_ref(), keep)
    }

    /// `output(act(intermediate(h)))`; exact GELU takes the intermediate bias in its own pass
    /// ([`bias_gelu_erf`]).
    fn mlp(&self, h: &Tensor) -> Result<Tensor> {
        let h = match (self.activation, self.intermediate.bias()) {
            (Activation::GeluErf, Some(bias)) => {
                let h = beit_kernels::linear(h, self.intermediate.weight(), None)?;
                bias_gelu_erf(&h, bias)?
            }
            _ => self.activation.forward(&self.intermediate.forward(h)?)?,
        };
        self.output.forward(&h)
    }
}

#[cfg(test)]
mod tests {
    use candle::{DType, Device, Result, Tensor};

    /// Loss and every parameter gradient of one MIM training step of a tiny model.
    fn mim_step(cfg: &crate::BeitConfig, fused: bool) -> Result<(f32, Vec<(String, Tensor)>)> {
        use candle_nn::{VarBuilder, VarMap};
        beit_kernels::with_fused_ops(fused, || {
            let dev = Device::Cpu;
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
            let model = crate::BeitForMaskedImageModeling::new(cfg, vb)?;
            // Deterministic, non-trivial parameters (same for both runs).
            let mut names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
            names.sort();
            for (i, name) in names.iter().enumerate() {
                let var = varmap.data().lock().unwrap()[name].clone();
                let n = var.elem_count();
                let vals: Vec<f32> = (0..n)
                    .map(|j| (((i * 7919 + j * 104_729) % 1000) as f32 / 1000.0 - 0.5) * 0.4)
                    .collect();
                // (candle's CPU init cannot be seeded, so every value is overwritten.)
                var.set(&Tensor::from_vec(vals, var.shape(), &dev)?)?;
            }
            model.backbone().rng().reseed(3);
            let pixels = Tensor::arange(0f32, (3 * 3 * 256) as f32, &dev)?
                .affine(1. / 1000., -1.0)?
                .sin()?
                .reshape((3, 3, 16, 16))?;
            let mask: Vec<u8> = (0..3 * 16).map(|i| (i % 3 == 0) as u8).collect();
            let mask = Tensor::from_vec(mask, (3, 16), &dev)?;
            let logits = model
                .forward_masked(&pixels, &mask, crate::ForwardOptions::train())?
                .logits;
            let m = logits.dim(0)?;
            let labels: Vec<u32> = (0..m as u32).map(|i| i % 12).collect();
            let labels = Tensor::from_vec(labels, m, &dev)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
            let grads = loss.backward()?;
            let mut out = Vec::new();
            for name in names {
                let var = varmap.data().lock().unwrap()[&name].clone();
                let g = grads
                    .get(var.as_tensor())
                    .expect("every parameter has a gradient");
                out.push((name, g.clone()));
            }
            Ok((loss.to_scalar::<f32>()?, out))
        })
    }

    #[test]
    fn model_gradients_with_and_without_fused_kernels_agree() -> Result<()> {
        for shared in [true, false] {
            let cfg = crate::BeitConfig {
                drop_path_rate: 0.5,
                use_shared_relative_position_bias: shared,
                use_relative_position_bias: !shared,
                ..crate::config::tests::tiny_mim()
            };
            let (lf, gf) = mim_step(&cfg, true)?;
            let (lc, gc) = mim_step(&cfg, false)?;
            assert!((lf - lc).abs() < 1e-5, "loss {lf} vs {lc}");
            assert_eq!(gf.len(), gc.len());
            for ((name, a), (_, b)) in gf.iter().zip(&gc) {
                let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-3);
                let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
                assert!(
                    d < 1e-4,
                    "{name}: fused and composed gradients differ by {d}"
                );
            }
        }
        Ok(())
    }
}
