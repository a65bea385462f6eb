//! Image features from a backbone: one block's output pooled to one vector per image. Shared by
//! `beit-cli embed`, the k-NN evaluation's inputs and the HTTP server's `/v1/embed`.

use std::str::FromStr;

use anyhow::{bail, ensure, Result};
use beit_model::{BeitModel, ForwardOptions};
use candle::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// How a block's tokens become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// The mean of the patch tokens (the [CLS] token left out), as the linear probe pools.
    #[default]
    Mean,
    /// The [CLS] token.
    Cls,
}

impl FromStr for Pool {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mean" => Ok(Pool::Mean),
            "cls" => Ok(Pool::Cls),
            other => bail!("unknown pooling `{other}` (expected `mean` or `cls`)"),
        }
    }
}

impl Pool {
    /// The name used on the command line and in requests.
    pub fn name(self) -> &'static str {
        match self {
            Pool::Mean => "mean",
            Pool::Cls => "cls",
        }
    }
}

/// Pool `hidden` `(B, T, C)` (the [CLS] token first) to `(B, C)` in f32.
pub fn pool_tokens(hidden: &Tensor, pool: Pool) -> Result<Tensor> {
    let t = hidden.dim(1)?;
    ensure!(
        t >= 2,
        "a sequence of {t} tokens has no patch tokens to pool"
    );
    let pooled = match pool {
        Pool::Mean => hidden.narrow(1, 1, t - 1)?.mean(1)?,
        Pool::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
    };
    Ok(pooled.to_dtype(DType::F32)?)
}

/// Pooled features `(B, C)` of block `layer` (0 = the patch embeddings, `num_layers` = the last
/// block's output, before any final LayerNorm) for `pixels` `(B, 3, H, W)`.
pub fn features(backbone: &BeitModel, pixels: &Tensor, layer: usize, pool: Pool) -> Result<Tensor> {
    let out = backbone.forward(
        pixels,
        None,
        ForwardOptions {
            output_hidden_states: true,
            ..ForwardOptions::default()
        },
    )?;
    pooled_layer(&out.hidden_states, layer, pool)
}

/// [`pool_tokens`] of `hidden_states[layer]`, with an error naming the valid range.
pub fn pooled_layer(hidden_states: &[Tensor], layer: usize, pool: Pool) -> Result<Tensor> {
    match hidden_states.get(layer) {
        Some(h) => pool_tokens(h, pool),
        None => bail!(
            "layer {layer} out of range: the model has blocks 0..={}",
            hidden_states.len().saturating_sub(1)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;

    #[test]
    fn mean_skips_cls_and_cls_takes_token_zero() {
        let h = Tensor::new(&[[[9f32, 9.], [1., 2.], [3., 4.]]], &Device::Cpu).unwrap();
        let m = pool_tokens(&h, Pool::Mean)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(m, vec![vec![2., 3.]]);
        let c = pool_tokens(&h, Pool::Cls)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(c, vec![vec![9., 9.]]);
        assert!("max".parse::<Pool>().is_err());
        assert!(pooled_layer(&[h], 1, Pool::Mean).is_err());
    }
}
