//! Random erasing (Zhong et al.) as timm's `RandomErasing`, applied to the normalised tensor.

use rand::Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::geometry::{py_round, uniform};
use crate::normalize::Chw;

/// What the erased rectangle is filled with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EraseMode {
    /// Zeros (the normalised mean).
    Const,
    /// One normal(0, 1) value per channel.
    Rand,
    /// One normal(0, 1) value per pixel and channel (the BEiT recipe).
    Pixel,
}

/// timm `RandomErasing(probability, mode, max_count=1)`: with probability `probability`, erase one
/// rectangle of area fraction in `[min_area, max_area]` and aspect ratio log-uniform in
/// `[min_aspect, 1 / min_aspect]` (10 tries to fit).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RandomErasing {
    /// Probability of erasing.
    pub probability: f64,
    /// Minimum erased area fraction.
    pub min_area: f64,
    /// Maximum erased area fraction.
    pub max_area: f64,
    /// Minimum aspect ratio (the maximum is its inverse).
    pub min_aspect: f64,
    /// Fill mode.
    pub mode: EraseMode,
}

impl Default for RandomErasing {
    /// The BEiT fine-tuning setting: p = 0.25, pixel mode.
    fn default() -> Self {
        RandomErasing {
            probability: 0.25,
            min_area: 0.02,
            max_area: 1.0 / 3.0,
            min_aspect: 0.3,
            mode: EraseMode::Pixel,
        }
    }
}

impl RandomErasing {
    /// Check the parameters.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.probability) {
            return Err(DataError::param(
                "reprob",
                format!("{} not in [0, 1]", self.probability),
            ));
        }
        if !(self.min_area > 0.0 && self.min_area <= self.max_area && self.max_area <= 1.0) {
            return Err(DataError::param(
                "area",
                format!(
                    "need 0 < min_area <= max_area <= 1, got {} and {}",
                    self.min_area, self.max_area
                ),
            ));
        }
        if self.min_aspect.is_nan() || self.min_aspect <= 0.0 {
            return Err(DataError::param("min_aspect", "must be positive"));
        }
        Ok(())
    }

    /// Maybe erase a rectangle of `img` in place.
    pub fn apply<R: Rng + ?Sized>(&self, img: &mut Chw, rng: &mut R) {
        if rng.random::<f64>() > self.probability || self.probability == 0.0 {
            return;
        }
        let (ih, iw) = (img.height, img.width);
        let area = (ih * iw) as f64;
        let (la, lb) = (self.min_aspect.ln(), (1.0 / self.min_aspect).ln());
        for _ in 0..10 {
            let target = uniform(rng, self.min_area, self.max_area) * area;
            let aspect = uniform(rng, la, lb).exp();
            let h = py_round((target * aspect).sqrt()) as usize;
            let w = py_round((target / aspect).sqrt()) as usize;
            if w < iw && h < ih {
                let top = rng.random_range(0..=ih - h);
                let left = rng.random_range(0..=iw - w);
                let per_channel: [f32; 3] = match self.mode {
                    EraseMode::Rand => [
                        rng.sample(StandardNormal),
                        rng.sample(StandardNormal),
                        rng.sample(StandardNormal),
                    ],
                    _ => [0.0; 3],
                };
                for (c, fill) in per_channel.iter().enumerate() {
                    for y in top..top + h {
                        let row = &mut img.data[(c * ih + y) * iw + left..][..w];
                        for v in row {
                            *v = match self.mode {
                                EraseMode::Pixel => rng.sample(StandardNormal),
                                _ => *fill,
                            };
                        }
                    }
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    #[test]
    fn erases_a_rectangle_with_the_right_frequency() {
        let re = RandomErasing::default();
        let mut rng = StdRng::seed_from_u64(1);
        let mut erased = 0;
        for _ in 0..400 {
            let mut img = Chw {
                data: vec![5.0; 3 * 32 * 32],
                height: 32,
                width: 32,
            };
            re.apply(&mut img, &mut rng);
            let changed = img.data.iter().filter(|&&v| v != 5.0).count();
            if changed > 0 {
                erased += 1;
                let frac = changed as f64 / img.data.len() as f64;
                assert!(frac > 0.005 && frac < 0.5, "{frac}");
            }
        }
        assert!((70..130).contains(&erased), "{erased}");
    }
}
