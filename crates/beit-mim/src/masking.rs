//! Blockwise masking (BEiT's `MaskingGenerator`).

use rand::RngCore;

use crate::error::Result;
use crate::masking_config::{MaskStrategy, MaskingConfig};
use crate::sampler::MaskSampler;

/// Attempts at placing one block before the generator gives up on it (reference value).
pub const MAX_ATTEMPTS_PER_BLOCK: usize = 10;

/// BEiT's blockwise mask generator, restated from the reference algorithm (unilm's
/// `masking_generator.py`: up to 10 attempts per block, area uniform in
/// `[min, min(remaining, max)]`, log-uniform aspect ratio).
///
/// Blocks are added until the target is reached. For each block the budget is
/// `min(target − masked, max_num_patches)`; up to [`MAX_ATTEMPTS_PER_BLOCK`] times an area is drawn
/// uniformly between `min_num_patches` and the budget, an aspect ratio log-uniformly, the sides are
/// rounded (half to even, like Python's `round`), and a rectangle with sides strictly smaller than
/// the grid is placed uniformly at random. It is kept only if it covers between 1 and `budget` new
/// cells. If all attempts fail the mask is returned as is, below the target.
#[derive(Debug, Clone)]
pub struct MaskingGenerator {
    height: usize,
    width: usize,
    num_masking_patches: usize,
    min_num_patches: usize,
    max_num_patches: usize,
    log_aspect: (f64, f64),
}

impl MaskingGenerator {
    /// Build from a config (its `strategy` is ignored).
    pub fn new(cfg: &MaskingConfig) -> Result<Self> {
        let cfg = MaskingConfig {
            strategy: MaskStrategy::Blockwise,
            ..cfg.clone()
        };
        cfg.validate()?;
        let max_aspect = cfg.max_aspect.unwrap_or(1.0 / cfg.min_aspect);
        Ok(Self {
            height: cfg.input_size[0],
            width: cfg.input_size[1],
            num_masking_patches: cfg.num_masking_patches,
            min_num_patches: cfg.min_num_patches,
            max_num_patches: cfg.max_num_patches.unwrap_or(cfg.num_masking_patches),
            log_aspect: (cfg.min_aspect.ln(), max_aspect.ln()),
        })
    }

    /// Try to place one block of at most `budget` new cells; returns how many cells it added.
    fn add_block(&self, mask: &mut [bool], budget: usize, rng: &mut dyn RngCore) -> usize {
        for _ in 0..MAX_ATTEMPTS_PER_BLOCK {
            let area = uniform(rng, self.min_num_patches as f64, budget as f64);
            let ratio = uniform(rng, self.log_aspect.0, self.log_aspect.1).exp();
            let bh = (area * ratio).sqrt().round_ties_even() as usize;
            let bw = (area / ratio).sqrt().round_ties_even() as usize;
            if bh >= self.height || bw >= self.width {
                continue;
            }
            let top = randint(rng, 0, self.height - bh);
            let left = randint(rng, 0, self.width - bw);
            let cells = |mask: &[bool]| {
                (top..top + bh)
                    .flat_map(|r| (left..left + bw).map(move |c| r * self.width + c))
                    .filter(|&i| !mask[i])
                    .collect::<Vec<_>>()
            };
            let fresh = cells(mask);
            if !fresh.is_empty() && fresh.len() <= budget {
                for &i in &fresh {
                    mask[i] = true;
                }
                return fresh.len();
            }
        }
        0
    }
}

// The three random primitives below follow CPython's `random` conventions on top of the raw
// words of the generator. Behind a Mersenne-Twister `RngCore` (see tests/python_stream.rs) the
// generator then reproduces the reference masks bit for bit; with `StdRng` they are simply
// unbiased draws.

/// A double uniform in `[0, 1)` from the top 53 bits of `next_u64` (CPython's `random()` builds
/// the same 53 bits from two 32-bit words).
fn unit_f64(rng: &mut dyn RngCore) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// `a + (b − a)·U[0, 1)`: Python's `random.uniform`, which also accepts `b < a`.
fn uniform(rng: &mut dyn RngCore, a: f64, b: f64) -> f64 {
    a + (b - a) * unit_f64(rng)
}

/// Uniform integer in `lo..=hi` by rejection: draw `bit_length(n)` bits from the top of a 32-bit
/// word until the value is below `n = hi − lo + 1` (CPython's `randint`; unbiased).
fn randint(rng: &mut dyn RngCore, lo: usize, hi: usize) -> usize {
    let n = (hi - lo + 1) as u64;
    let k = 64 - n.leading_zeros();
    loop {
        let r = if k <= 32 {
            u64::from(rng.next_u32() >> (32 - k))
        } else {
            rng.next_u64() >> (64 - k)
        };
        if r < n {
            return lo + r as usize;
        }
    }
}

impl MaskSampler for MaskingGenerator {
    fn grid(&self) -> (usize, usize) {
        (self.height, self.width)
    }

    fn num_masking_patches(&self) -> usize {
        self.num_masking_patches
    }

    fn sample(&self, rng: &mut dyn RngCore) -> Vec<bool> {
        let mut mask = vec![false; self.height * self.width];
        let mut count = 0;
        while count < self.num_masking_patches {
            let budget = (self.num_masking_patches - count).min(self.max_num_patches);
            match self.add_block(&mut mask, budget, rng) {
                0 => break,
                added => count += added,
            }
        }
        mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::sample_rng;

    #[test]
    fn never_exceeds_the_target_and_is_seeded() {
        let g = MaskingGenerator::new(&MaskingConfig::default()).unwrap();
        for i in 0..200 {
            let m = g.sample_at(7, 0, i);
            assert_eq!(m.len(), 196);
            let n = m.iter().filter(|&&b| b).count();
            assert!((16..=75).contains(&n), "sample {i}: {n} cells");
            assert_eq!(m, g.sample_at(7, 0, i));
        }
        assert_ne!(g.sample_at(7, 0, 0), g.sample_at(8, 0, 0));
        assert_ne!(g.sample_at(7, 0, 0), g.sample_at(7, 1, 0));
        assert_ne!(g.sample_at(7, 0, 0), g.sample_at(7, 0, 1));
    }

    #[test]
    fn one_block_is_a_rectangle_with_sides_below_the_grid() {
        let cfg = MaskingConfig {
            min_num_patches: 8,
            ..MaskingConfig::new([6, 6], 30)
        };
        let g = MaskingGenerator::new(&cfg).unwrap();
        let mut rng = sample_rng(1, 2, 3);
        for _ in 0..500 {
            let mut m = vec![false; 36];
            let added = g.add_block(&mut m, 30, &mut rng);
            let cells: Vec<(usize, usize)> =
                (0..36).filter(|&i| m[i]).map(|i| (i / 6, i % 6)).collect();
            assert_eq!(added, cells.len());
            if added == 0 {
                continue;
            }
            let rows = cells.iter().map(|c| c.0).max().unwrap()
                - cells.iter().map(|c| c.0).min().unwrap()
                + 1;
            let cols = cells.iter().map(|c| c.1).max().unwrap()
                - cells.iter().map(|c| c.1).min().unwrap()
                + 1;
            assert_eq!(rows * cols, added, "not a filled rectangle");
            assert!(rows < 6 && cols < 6, "{rows}x{cols} spans the grid");
            assert!((1..=30).contains(&added));
        }
    }

    #[test]
    fn rejects_bad_fields_by_name() {
        let bad = |cfg: MaskingConfig, field: &str| {
            let err = MaskingGenerator::new(&cfg).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        };
        bad(MaskingConfig::new([14, 14], 197), "num_masking_patches");
        bad(MaskingConfig::new([14, 14], 0), "num_masking_patches");
        bad(MaskingConfig::new([1, 14], 5), "input_size");
        bad(MaskingConfig::new([0, 14], 5), "input_size");
        bad(
            MaskingConfig {
                min_aspect: 0.0,
                ..Default::default()
            },
            "min_aspect",
        );
        bad(
            MaskingConfig {
                max_aspect: Some(f64::NAN),
                ..Default::default()
            },
            "max_aspect",
        );
        bad(
            MaskingConfig {
                max_num_patches: Some(0),
                ..Default::default()
            },
            "max_num_patches",
        );
    }
}
