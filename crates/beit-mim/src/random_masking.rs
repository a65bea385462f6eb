//! Uniform random masking with an exact count: the "− blockwise masking" ablation of Table 4.

use rand::RngCore;

use crate::error::Result;
use crate::masking_config::{MaskStrategy, MaskingConfig};
use crate::sampler::MaskSampler;

/// Masks exactly `num_masking_patches` cells chosen uniformly without replacement.
#[derive(Debug, Clone)]
pub struct RandomMasking {
    height: usize,
    width: usize,
    num_masking_patches: usize,
}

impl RandomMasking {
    /// Build from a config; only `input_size` and `num_masking_patches` are used.
    pub fn new(cfg: &MaskingConfig) -> Result<Self> {
        let cfg = MaskingConfig {
            strategy: MaskStrategy::Random,
            ..cfg.clone()
        };
        cfg.validate()?;
        Ok(Self {
            height: cfg.input_size[0],
            width: cfg.input_size[1],
            num_masking_patches: cfg.num_masking_patches,
        })
    }
}

impl MaskSampler for RandomMasking {
    fn grid(&self) -> (usize, usize) {
        (self.height, self.width)
    }

    fn num_masking_patches(&self) -> usize {
        self.num_masking_patches
    }

    fn sample(&self, rng: &mut dyn RngCore) -> Vec<bool> {
        let n = self.height * self.width;
        let mut mask = vec![false; n];
        for i in rand::seq::index::sample(rng, n, self.num_masking_patches) {
            mask[i] = true;
        }
        mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_count_and_uniform_cells() {
        let g = RandomMasking::new(&MaskingConfig::new([7, 7], 20)).unwrap();
        let draws = 4000;
        let mut hits = [0usize; 49];
        for i in 0..draws {
            let m = g.sample_at(3, 0, i);
            assert_eq!(m.iter().filter(|&&b| b).count(), 20);
            for (h, &b) in hits.iter_mut().zip(&m) {
                *h += usize::from(b);
            }
        }
        // Each cell is masked with probability 20/49; 5 binomial standard deviations.
        let p = 20.0 / 49.0;
        let sd = (p * (1.0 - p) / draws as f64).sqrt();
        for (i, &h) in hits.iter().enumerate() {
            let f = h as f64 / draws as f64;
            assert!((f - p).abs() < 5.0 * sd, "cell {i}: {f} vs {p}");
        }
    }
}
