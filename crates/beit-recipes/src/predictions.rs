//! Class predictions from logits: softmax probabilities and the top-k classes with their labels.
//! Shared by `beit-cli predict` and the HTTP server, so both answer the same for the same image.

use anyhow::Result;
use beit_model::BeitConfig;
use candle::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

/// One predicted class.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct Prediction {
    /// Class index.
    pub index: usize,
    /// Class name from the config's `id2label`.
    pub label: String,
    /// Softmax probability.
    pub probability: f32,
}

/// The `k` largest entries of a 1-D tensor as (index, value), largest first (ties: lower index
/// first).
pub fn top_k(values: &Tensor, k: usize) -> Result<Vec<(usize, f32)>> {
    let v = values.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    Ok(idx.into_iter().take(k).map(|i| (i, v[i])).collect())
}

/// The top-`k` classes of every row of `logits` `(B, num_labels)`, most probable first.
pub fn predictions(logits: &Tensor, k: usize, cfg: &BeitConfig) -> Result<Vec<Vec<Prediction>>> {
    let probs = candle_nn::ops::softmax(logits, D::Minus1)?;
    (0..probs.dim(0)?)
        .map(|i| {
            Ok(top_k(&probs.get(i)?, k)?
                .into_iter()
                .map(|(index, probability)| Prediction {
                    index,
                    label: cfg.label(index),
                    probability,
                })
                .collect())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_by_value_then_index() {
        let t = Tensor::new(&[0.1f32, 0.5, 0.5, 0.2], &candle::Device::Cpu).unwrap();
        let got = top_k(&t, 3).unwrap();
        assert_eq!(got, vec![(1, 0.5), (2, 0.5), (3, 0.2)]);
    }
}
