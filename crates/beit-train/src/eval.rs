//! Classification metrics accumulated over an evaluation pass: loss, top-1/top-5 and the
//! confusion matrix.

use candle::{DType, Tensor, D};
use serde::Serialize;

use crate::error::{Result, TrainError};
use crate::losses::target_rank;

/// Classification metrics over a dataset.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassificationMetrics {
    /// Images evaluated.
    pub images: usize,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Top-1 accuracy in percent.
    pub acc1: f64,
    /// Top-5 accuracy in percent (top-k with k = min(5, classes)).
    pub acc5: f64,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<u64>>,
}

impl ClassificationMetrics {
    /// Per-class accuracy in percent (`None` for a class with no image).
    pub fn per_class_accuracy(&self) -> Vec<Option<f64>> {
        self.confusion
            .iter()
            .enumerate()
            .map(|(c, row)| {
                let n: u64 = row.iter().sum();
                (n > 0).then(|| 100.0 * row[c] as f64 / n as f64)
            })
            .collect()
    }

    /// The `k` most frequent (true, predicted, count) confusions, most frequent first.
    pub fn top_confusions(&self, k: usize) -> Vec<(usize, usize, u64)> {
        let mut v: Vec<(usize, usize, u64)> = Vec::new();
        for (t, row) in self.confusion.iter().enumerate() {
            for (p, &n) in row.iter().enumerate() {
                if t != p && n > 0 {
                    v.push((t, p, n));
                }
            }
        }
        v.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
        v.truncate(k);
        v
    }

    /// The metrics logged as an `eval` record.
    pub fn as_pairs(&self) -> Vec<(String, f64)> {
        vec![
            ("acc1".into(), self.acc1),
            ("acc5".into(), self.acc5),
            ("loss".into(), self.loss),
        ]
    }
}

/// Accumulates batches of logits and labels into [`ClassificationMetrics`].
#[derive(Debug, Clone)]
pub struct EvalAccumulator {
    num_classes: usize,
    images: usize,
    loss_sum: f64,
    top1: u64,
    top5: u64,
    confusion: Vec<Vec<u64>>,
}

impl EvalAccumulator {
    /// For `num_classes` classes.
    pub fn new(num_classes: usize) -> Self {
        Self {
            num_classes,
            images: 0,
            loss_sum: 0.0,
            top1: 0,
            top5: 0,
            confusion: vec![vec![0; num_classes]; num_classes],
        }
    }

    /// Sum the counts of every rank of a data-parallel evaluation (each rank evaluated its
    /// own shard of the split): afterwards every rank holds the counts of the whole split.
    /// Counts travel as f64, exact below 2^53. No-op in a world of 1.
    pub fn all_reduce(&mut self, world: &dyn crate::distributed::Collective) -> Result<()> {
        if world.size() == 1 {
            return Ok(());
        }
        let mut buf = vec![
            self.images as f64,
            self.loss_sum,
            self.top1 as f64,
            self.top5 as f64,
        ];
        buf.extend(self.confusion.iter().flatten().map(|&c| c as f64));
        world.all_reduce_sum_f64("evaluation counts all-reduce", &mut buf)?;
        self.images = buf[0] as usize;
        self.loss_sum = buf[1];
        self.top1 = buf[2] as u64;
        self.top5 = buf[3] as u64;
        for (c, v) in self.confusion.iter_mut().flatten().zip(&buf[4..]) {
            *c = *v as u64;
        }
        Ok(())
    }

    /// Add a batch of logits `(B, C)` with labels `(B,)`.
    pub fn add(&mut self, logits: &Tensor, labels: &Tensor) -> Result<()> {
        let logits = logits.detach().to_dtype(DType::F32)?;
        let (b, c) = logits.dims2()?;
        if c != self.num_classes {
            return Err(TrainError::Config(format!(
                "the model predicts {c} classes but the dataset has {}",
                self.num_classes
            )));
        }
        let labels_u32: Vec<u32> = labels.to_dtype(DType::U32)?.to_vec1()?;
        if let Some(&y) = labels_u32.iter().find(|&&y| y as usize >= c) {
            return Err(TrainError::Config(format!(
                "label {y} out of range for {c} classes"
            )));
        }
        let labels = Tensor::new(labels_u32.as_slice(), logits.device())?;
        let nll: Vec<f32> = candle_nn::ops::log_softmax(&logits, D::Minus1)?
            .gather(&labels.unsqueeze(1)?, 1)?
            .squeeze(1)?
            .to_vec1()?;
        let ranks: Vec<f32> = target_rank(&logits, &labels)?.to_vec1()?;
        let preds: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        let k = 5.min(c) as f32;
        for ((&y, &rank), (&logp, &pred)) in
            labels_u32.iter().zip(&ranks).zip(nll.iter().zip(&preds))
        {
            self.loss_sum -= logp as f64;
            self.top1 += u64::from(rank < 1.0);
            self.top5 += u64::from(rank < k);
            self.confusion[y as usize][pred as usize] += 1;
        }
        self.images += b;
        Ok(())
    }

    /// The metrics so far.
    pub fn finish(&self) -> ClassificationMetrics {
        let n = self.images.max(1) as f64;
        ClassificationMetrics {
            images: self.images,
            loss: self.loss_sum / n,
            acc1: 100.0 * self.top1 as f64 / n,
            acc5: 100.0 * self.top5 as f64 / n,
            confusion: self.confusion.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;

    #[test]
    fn accumulator_counts_top_k_and_confusions() -> Result<()> {
        let dev = Device::Cpu;
        let logits = Tensor::new(
            &[
                [3f32, 2., 1., 0., -1., -2.],
                [0., 3., 2., 1., -1., -2.],
                [0., 1., 2., 3., 4., 5.],
            ],
            &dev,
        )?;
        let labels = Tensor::new(&[0u32, 2, 0], &dev)?;
        let mut acc = EvalAccumulator::new(6);
        acc.add(&logits, &labels)?;
        let m = acc.finish();
        assert!((m.acc1 - 100.0 / 3.0).abs() < 1e-9);
        assert!((m.acc5 - 200.0 / 3.0).abs() < 1e-9);
        assert_eq!(m.confusion[2][1], 1);
        assert_eq!(m.confusion[0][5], 1);
        assert_eq!(m.top_confusions(1), vec![(0, 5, 1)]);
        // Loss: mean of -log_softmax at the targets.
        let expect: f64 = [(0usize, 0usize), (1, 2), (2, 0)]
            .iter()
            .map(|&(r, y)| {
                let row: Vec<f64> = logits
                    .get(r)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
                lse - row[y]
            })
            .sum::<f64>()
            / 3.0;
        assert!((m.loss - expect).abs() < 1e-5, "{} vs {expect}", m.loss);
        let bad = Tensor::new(&[0u32, 9, 0], &dev)?;
        assert!(acc.add(&logits, &bad).is_err());
        Ok(())
    }
}
