//! Mixup / CutMix with label smoothing on a batch (timm's `Mixup`, batch mode), producing soft
//! targets.

use rand::Rng;
use rand_distr::{Beta, Distribution};
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// timm `Mixup(mixup_alpha, cutmix_alpha, prob, switch_prob, label_smoothing, mode="batch")`.
///
/// Each sample `i` of a batch is mixed with sample `B - 1 - i` (the batch reversed) with one `lam`
/// per batch; CutMix pastes a box of the partner and corrects `lam` to the pasted area.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Mixup {
    /// Beta(alpha, alpha) for mixup; 0 disables mixup.
    pub mixup_alpha: f64,
    /// Beta(alpha, alpha) for CutMix; 0 disables CutMix.
    pub cutmix_alpha: f64,
    /// Probability of mixing a batch at all.
    pub prob: f64,
    /// Probability of CutMix instead of mixup when both are enabled.
    pub switch_prob: f64,
    /// Label smoothing folded into the targets.
    pub label_smoothing: f64,
    /// Number of classes of the soft targets.
    pub num_classes: usize,
}

impl Mixup {
    /// The BEiT/DeiT fine-tuning setting: mixup 0.8, CutMix 1.0, prob 1, switch 0.5, smoothing 0.1.
    pub fn beit(num_classes: usize) -> Self {
        Mixup {
            mixup_alpha: 0.8,
            cutmix_alpha: 1.0,
            prob: 1.0,
            switch_prob: 0.5,
            label_smoothing: 0.1,
            num_classes,
        }
    }

    /// Check the parameters.
    pub fn validate(&self) -> Result<()> {
        if self.mixup_alpha < 0.0 || self.cutmix_alpha < 0.0 {
            return Err(DataError::param("mixup/cutmix alpha", "must be >= 0"));
        }
        for (n, p) in [
            ("mixup_prob", self.prob),
            ("mixup_switch_prob", self.switch_prob),
            ("smoothing", self.label_smoothing),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(DataError::param(n, format!("{p} not in [0, 1]")));
            }
        }
        if self.num_classes == 0 {
            return Err(DataError::param("num_classes", "must be positive"));
        }
        Ok(())
    }

    /// Mix `images` (`(B, C, H, W)` row-major, `dims = (B, C, H, W)`) in place and return the soft
    /// targets `(B, num_classes)` built from `labels`.
    pub fn apply<R: Rng + ?Sized>(
        &self,
        images: &mut [f32],
        dims: (usize, usize, usize, usize),
        labels: &[u32],
        rng: &mut R,
    ) -> Result<Vec<f32>> {
        let (b, c, h, w) = dims;
        if images.len() != b * c * h * w || labels.len() != b {
            return Err(DataError::param(
                "batch",
                format!(
                    "{} values / {} labels for dims {dims:?}",
                    images.len(),
                    labels.len()
                ),
            ));
        }
        if let Some(&bad) = labels.iter().find(|&&l| l as usize >= self.num_classes) {
            return Err(DataError::param(
                "labels",
                format!("label {bad} >= num_classes {}", self.num_classes),
            ));
        }
        let (mut lam, use_cutmix) = self.draw(rng)?;
        let per = c * h * w;
        if lam < 1.0 {
            let original = images.to_vec();
            if use_cutmix {
                let cut = (1.0 - lam).sqrt();
                let (cut_h, cut_w) = ((h as f64 * cut) as i64, (w as f64 * cut) as i64);
                let cy = rng.random_range(0..h as i64);
                let cx = rng.random_range(0..w as i64);
                let y0 = (cy - cut_h / 2).clamp(0, h as i64) as usize;
                let y1 = (cy + cut_h / 2).clamp(0, h as i64) as usize;
                let x0 = (cx - cut_w / 2).clamp(0, w as i64) as usize;
                let x1 = (cx + cut_w / 2).clamp(0, w as i64) as usize;
                for i in 0..b {
                    let j = b - 1 - i;
                    for ch in 0..c {
                        for y in y0..y1 {
                            let o = i * per + (ch * h + y) * w;
                            let s = j * per + (ch * h + y) * w;
                            images[o + x0..o + x1].copy_from_slice(&original[s + x0..s + x1]);
                        }
                    }
                }
                lam = 1.0 - ((y1 - y0) * (x1 - x0)) as f64 / (h * w) as f64;
            } else {
                let (l, m) = (lam as f32, (1.0 - lam) as f32);
                for i in 0..b {
                    let j = b - 1 - i;
                    let (dst, src) = (
                        &mut images[i * per..(i + 1) * per],
                        &original[j * per..(j + 1) * per],
                    );
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d = *d * l + s * m;
                    }
                }
            }
        }
        let nc = self.num_classes;
        let off = self.label_smoothing / nc as f64;
        let on = 1.0 - self.label_smoothing + off;
        let mut targets = vec![0f32; b * nc];
        for i in 0..b {
            let row = &mut targets[i * nc..(i + 1) * nc];
            for v in row.iter_mut() {
                *v = off as f32;
            }
            let (a, p) = (labels[i] as usize, labels[b - 1 - i] as usize);
            row[a] += ((on - off) * lam) as f32;
            row[p] += ((on - off) * (1.0 - lam)) as f32;
        }
        Ok(targets)
    }

    /// `(lam, use_cutmix)` for one batch.
    fn draw<R: Rng + ?Sized>(&self, rng: &mut R) -> Result<(f64, bool)> {
        let beta = |a: f64, rng: &mut R| -> Result<f64> {
            Ok(Beta::new(a, a)
                .map_err(|e| DataError::param("alpha", e.to_string()))?
                .sample(rng))
        };
        if rng.random::<f64>() >= self.prob {
            return Ok((1.0, false));
        }
        Ok(match (self.mixup_alpha > 0.0, self.cutmix_alpha > 0.0) {
            (true, true) => {
                let cut = rng.random::<f64>() < self.switch_prob;
                let a = if cut {
                    self.cutmix_alpha
                } else {
                    self.mixup_alpha
                };
                (beta(a, rng)?, cut)
            }
            (true, false) => (beta(self.mixup_alpha, rng)?, false),
            (false, true) => (beta(self.cutmix_alpha, rng)?, true),
            (false, false) => (1.0, false),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    #[test]
    fn targets_sum_to_one_and_match_pixels() {
        let m = Mixup::beit(5);
        let mut rng = StdRng::seed_from_u64(9);
        let (b, c, h, w) = (4, 3, 8, 8);
        for _ in 0..20 {
            // Sample i is constant i: the mixed value tells the weight of each partner.
            let mut x: Vec<f32> = (0..b).flat_map(|i| vec![i as f32; c * h * w]).collect();
            let labels = [0u32, 1, 2, 3];
            let t = m.apply(&mut x, (b, c, h, w), &labels, &mut rng).unwrap();
            for i in 0..b {
                let row = &t[i * 5..(i + 1) * 5];
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
                // Fraction of sample i's own content = its (unsmoothed) target weight.
                let j = b - 1 - i;
                let own = if i == j {
                    1.0
                } else {
                    let img = &x[i * c * h * w..(i + 1) * c * h * w];
                    let mean = img.iter().sum::<f32>() / img.len() as f32;
                    (mean - j as f32) / (i as f32 - j as f32)
                };
                let lam = (row[labels[i] as usize] - 0.02) / 0.9;
                if i != j {
                    assert!((own - lam).abs() < 1e-4, "own {own} lam {lam}");
                }
            }
        }
        assert!(Mixup {
            num_classes: 0,
            ..m
        }
        .validate()
        .is_err());
    }
}
