//! Weighted k-nearest-neighbour classification of features, as DINO evaluates a frozen backbone
//! (`eval_knn.py`): features L2-normalised, cosine similarity to every training feature, the `k`
//! most similar vote for their label with weight `exp(sim / T)`, and the classes ranked by their
//! summed votes (ties: lower class index first). Reports top-1 and top-5 accuracy in percent.

use anyhow::{ensure, Result};
use candle::{DType, Device, Tensor, D};
use serde::Serialize;

/// DINO's defaults: `k` of 10, 20, 100 and 200 in the paper's sweep, `T` = 0.07.
pub const DEFAULT_TEMPERATURE: f64 = 0.07;

/// Features and labels of one split.
#[derive(Debug, Clone)]
pub struct LabelledFeatures {
    /// `(N, C)` f32.
    pub features: Tensor,
    /// One label per row.
    pub labels: Vec<u32>,
}

/// Accuracy of one `k`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct KnnResult {
    /// Neighbours voting.
    pub k: usize,
    /// Top-1 accuracy, percent.
    pub top1: f64,
    /// Top-5 accuracy, percent.
    pub top5: f64,
}

/// Rows scaled to unit L2 norm (a zero row stays zero).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    Ok(x.broadcast_div(&norm)?)
}

/// The weighted k-NN accuracy of `val` against `train` for every `k` of `ks`, with temperature
/// `t`; `num_classes` covers every label. Similarities are computed `chunk` validation rows at a
/// time.
pub fn knn_classify(
    train: &LabelledFeatures,
    val: &LabelledFeatures,
    ks: &[usize],
    t: f64,
    num_classes: usize,
) -> Result<Vec<KnnResult>> {
    let n_train = train.labels.len();
    ensure!(
        n_train > 0 && !val.labels.is_empty(),
        "k-NN needs train and val features"
    );
    ensure!(
        train.features.dim(1)? == val.features.dim(1)?,
        "train and val features differ in width"
    );
    ensure!(t > 0.0, "the temperature must be positive");
    let kmax = ks.iter().copied().max().unwrap_or(0).min(n_train);
    ensure!(kmax > 0, "k must be at least 1");
    let train_t = l2_normalize(&train.features.to_dtype(DType::F32)?)?
        .t()?
        .contiguous()?;
    let val_n = l2_normalize(&val.features.to_dtype(DType::F32)?)?;
    let mut hits = vec![(0usize, 0usize); ks.len()];
    let chunk = 256;
    for start in (0..val.labels.len()).step_by(chunk) {
        let n = chunk.min(val.labels.len() - start);
        let sims = val_n
            .narrow(0, start, n)?
            .matmul(&train_t)?
            .to_vec2::<f32>()?;
        for (row, target) in sims.iter().zip(&val.labels[start..start + n]) {
            let neighbours = nearest(row, kmax);
            for (h, &k) in hits.iter_mut().zip(ks) {
                let ranked =
                    rank_classes(&neighbours[..k.min(kmax)], &train.labels, t, num_classes);
                h.0 += usize::from(ranked.first() == Some(target));
                h.1 += usize::from(ranked.iter().take(5).any(|c| c == target));
            }
        }
    }
    let total = val.labels.len() as f64;
    Ok(ks
        .iter()
        .zip(hits)
        .map(|(&k, (t1, t5))| KnnResult {
            k,
            top1: 100.0 * t1 as f64 / total,
            top5: 100.0 * t5 as f64 / total,
        })
        .collect())
}

/// The `k` most similar training rows as (index, similarity), most similar first (ties: lower
/// index first).
fn nearest(sims: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..sims.len()).collect();
    let cmp = |a: &usize, b: &usize| sims[*b].total_cmp(&sims[*a]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx.into_iter().map(|i| (i, sims[i])).collect()
}

/// Classes ranked by the summed `exp(sim / t)` of their neighbours, highest first (ties: lower
/// class first); classes without a vote come last.
fn rank_classes(
    neighbours: &[(usize, f32)],
    labels: &[u32],
    t: f64,
    num_classes: usize,
) -> Vec<u32> {
    let mut votes = vec![0f64; num_classes];
    for &(i, s) in neighbours {
        if let Some(v) = votes.get_mut(labels[i] as usize) {
            *v += (f64::from(s) / t).exp();
        }
    }
    let mut classes: Vec<u32> = (0..num_classes as u32).collect();
    classes.sort_by(|&a, &b| {
        votes[b as usize]
            .total_cmp(&votes[a as usize])
            .then(a.cmp(&b))
    });
    classes
}

/// Features and labels as tensors on `device`, for callers holding plain vectors.
pub fn labelled(
    features: Vec<f32>,
    dim: usize,
    labels: Vec<u32>,
    device: &Device,
) -> Result<LabelledFeatures> {
    let n = labels.len();
    Ok(LabelledFeatures {
        features: Tensor::from_vec(features, (n, dim), device)?,
        labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separable_clusters_are_classified_perfectly() {
        let dev = Device::Cpu;
        let train = labelled(
            vec![1., 0., 0.9, 0.1, 0., 1., 0.1, 0.9],
            2,
            vec![0, 0, 1, 1],
            &dev,
        )
        .unwrap();
        let val = labelled(vec![0.95, 0.05, 0.05, 0.95], 2, vec![0, 1], &dev).unwrap();
        let r = knn_classify(&train, &val, &[1, 3], DEFAULT_TEMPERATURE, 2).unwrap();
        assert_eq!(
            r[0],
            KnnResult {
                k: 1,
                top1: 100.0,
                top5: 100.0
            }
        );
        assert_eq!(r[1].top1, 100.0);
    }

    #[test]
    fn votes_are_weighted_by_similarity() {
        // Two far neighbours of class 1 against one very close neighbour of class 0.
        let labels = [0u32, 1, 1];
        let ranked = rank_classes(&[(0, 1.0), (1, 0.5), (2, 0.5)], &labels, 0.07, 3);
        assert_eq!(ranked, vec![0, 1, 2]);
        let ranked = rank_classes(&[(0, 1.0), (1, 0.99), (2, 0.99)], &labels, 0.07, 3);
        assert_eq!(ranked[0], 1);
    }
}
