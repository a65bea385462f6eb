//! [`BeitModel`]: embeddings, the block stack with relative position biases, and pooling.

use candle::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::block::BeitLayer;
use crate::config::BeitConfig;
use crate::embeddings::BeitEmbeddings;
use crate::layers::{LayerNorm, StochasticRng};
use crate::relative_position::RelativePositionBias;

/// What a forward pass computes beyond the last hidden state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardOptions {
    /// Training mode: dropout and stochastic depth active.
    pub train: bool,
    /// Return the embedding output and the output of every block.
    pub output_hidden_states: bool,
    /// Return every block's attention probabilities `(B, H, T, T)`.
    pub output_attentions: bool,
}

impl ForwardOptions {
    /// Options for a training step.
    pub fn train() -> Self {
        Self {
            train: true,
            ..Self::default()
        }
    }
}

/// Outputs of [`BeitModel::forward`].
#[derive(Debug, Clone)]
pub struct BeitOutput {
    /// `(B, 1 + N, C)`, after the final LayerNorm when the model does not mean-pool.
    pub last_hidden_state: Tensor,
    /// `(B, C)`: LayerNorm(mean of patch tokens), or the CLS token; `None` without a pooler.
    pub pooler_output: Option<Tensor>,
    /// Embedding output then each block's output (`L + 1` tensors), when asked.
    pub hidden_states: Vec<Tensor>,
    /// Each block's attention probabilities, when asked.
    pub attentions: Vec<Tensor>,
}

/// The BEiT backbone (`beit.*` in `transformers` checkpoints).
#[derive(Debug)]
pub struct BeitModel {
    embeddings: BeitEmbeddings,
    shared_bias: Option<RelativePositionBias>,
    layers: Vec<BeitLayer>,
    layernorm: Option<LayerNorm>,
    pooler: Option<LayerNorm>,
    add_pooling_layer: bool,
    rng: StochasticRng,
}

impl BeitModel {
    /// Build under `vb` (= `beit`); `add_pooling_layer` adds `pooler.layernorm` (classification).
    pub fn new(cfg: &BeitConfig, vb: VarBuilder, add_pooling_layer: bool) -> Result<Self> {
        cfg.validate()?;
        let rng = StochasticRng::default();
        let embeddings = BeitEmbeddings::new(cfg, vb.pp("embeddings"), rng.clone())?;
        let evb = vb.pp("encoder");
        let g = cfg.grid_size();
        let shared_bias = if cfg.use_shared_relative_position_bias {
            Some(RelativePositionBias::new(
                (g, g),
                cfg.num_attention_heads,
                evb.pp("relative_position_bias"),
            )?)
        } else {
            None
        };
        let depth = cfg.num_hidden_layers;
        let layers = (0..depth)
            .map(|i| {
                // Stochastic depth grows linearly from 0 (first block) to drop_path_rate (last).
                let rate = cfg.drop_path_rate * i as f64 / (depth.max(2) - 1) as f64;
                BeitLayer::new(cfg, evb.pp("layer").pp(i), rate, rng.clone())
            })
            .collect::<Result<Vec<_>>>()?;
        let layernorm = if cfg.use_mean_pooling {
            None
        } else {
            Some(LayerNorm::new(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                vb.pp("layernorm"),
            )?)
        };
        let pooler = if add_pooling_layer && cfg.use_mean_pooling {
            Some(LayerNorm::new(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                vb.pp("pooler").pp("layernorm"),
            )?)
        } else {
            None
        };
        Ok(Self {
            embeddings,
            shared_bias,
            layers,
            layernorm,
            pooler,
            add_pooling_layer,
            rng,
        })
    }

    /// The random source of dropout and stochastic depth; reseed it for reproducible training.
    pub fn rng(&self) -> &StochasticRng {
        &self.rng
    }

    /// The blocks.
    pub fn layers(&self) -> &[BeitLayer] {
        &self.layers
    }

    /// The shared relative position bias, if the model has one.
    pub fn shared_relative_position_bias(&self) -> Option<&RelativePositionBias> {
        self.shared_bias.as_ref()
    }

    /// The embedded tokens `(B, T, C)`, the patch grid and the shared relative position bias
    /// (if the model has one) for `pixels`: what every forward pass starts from.
    fn embed(
        &self,
        pixels: &Tensor,
        bool_masked_pos: Option<&Tensor>,
        train: bool,
    ) -> Result<(Tensor, (usize, usize), Option<Tensor>)> {
        let (_, _, h, w) = pixels.dims4()?;
        let window = self.embeddings.grid_of(h, w)?;
        let x = self.embeddings.forward(pixels, bool_masked_pos, train)?;
        let shared = match &self.shared_bias {
            Some(rpb) => Some(rpb.forward(window)?),
            None => None,
        };
        Ok((x, window, shared))
    }

    /// The final hidden states (after this model's own LayerNorm, if it has one) of the token
    /// rows in `queries` only, `(M, C)`: the same values as the corresponding rows of
    /// [`BeitModel::forward`]'s `last_hidden_state`, with the last block computed for those rows
    /// alone (see [`BeitLayer::forward_rows`]). `opts` must not ask for hidden states or
    /// attentions.
    pub fn forward_rows(
        &self,
        pixels: &Tensor,
        bool_masked_pos: Option<&Tensor>,
        opts: ForwardOptions,
        queries: &beit_kernels::QueryRows,
    ) -> Result<Tensor> {
        if opts.output_hidden_states || opts.output_attentions {
            candle::bail!("forward_rows returns no hidden states or attentions");
        }
        let (mut x, window, shared) = self.embed(pixels, bool_masked_pos, opts.train)?;
        let Some((last, rest)) = self.layers.split_last() else {
            candle::bail!("the model has no layers");
        };
        for layer in rest {
            x = layer
                .forward(&x, shared.as_ref(), window, opts.train, false)?
                .0;
        }
        let rows = last.forward_rows(&x, shared.as_ref(), window, opts.train, queries)?;
        match &self.layernorm {
            Some(ln) => ln.forward(&rows),
            None => Ok(rows),
        }
    }

    /// Run the backbone on `pixels` `(B, C, H, W)`, with masked patches replaced by the mask token.
    ///
    /// Any resolution that is a multiple of the patch size works: relative position tables are
    /// resampled bilinearly and absolute position embeddings bicubically, as `transformers` does.
    pub fn forward(
        &self,
        pixels: &Tensor,
        bool_masked_pos: Option<&Tensor>,
        opts: ForwardOptions,
    ) -> Result<BeitOutput> {
        let (mut x, window, shared) = self.embed(pixels, bool_masked_pos, opts.train)?;
        let mut hidden_states = Vec::new();
        let mut attentions = Vec::new();
        for layer in &self.layers {
            if opts.output_hidden_states {
                hidden_states.push(x.clone());
            }
            let (next, probs) = layer.forward(
                &x,
                shared.as_ref(),
                window,
                opts.train,
                opts.output_attentions,
            )?;
            x = next;
            attentions.extend(probs);
        }
        if opts.output_hidden_states {
            hidden_states.push(x.clone());
        }
        let sequence = match &self.layernorm {
            Some(ln) => ln.forward(&x)?,
            None => x,
        };
        let pooler_output = if !self.add_pooling_layer {
            None
        } else if let Some(ln) = &self.pooler {
            let n = sequence.dim(1)? - 1;
            Some(ln.forward(&sequence.narrow(1, 1, n)?.mean(1)?)?)
        } else {
            Some(sequence.narrow(1, 0, 1)?.squeeze(1)?)
        };
        Ok(BeitOutput {
            last_hidden_state: sequence,
            pooler_output,
            hidden_states,
            attentions,
        })
    }
}
