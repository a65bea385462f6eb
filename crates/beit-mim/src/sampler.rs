//! The interface shared by the mask generators, reproducible per-sample seeding, and a batch of masks.

use candle::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

/// A source of MIM masks over a fixed patch grid.
///
/// Implemented by [`crate::MaskingGenerator`] (blockwise, the BEiT default) and
/// [`crate::RandomMasking`] (uniform, the Table 4 ablation), so training code can switch between
/// them through a `Box<dyn MaskSampler>` built by [`crate::MaskingConfig::build`].
///
/// Masks are `Vec<bool>` of length `height * width` in row-major patch order (index `r * width + c`),
/// the order of `bool_masked_pos` in `transformers` and of the flattened patch embedding.
pub trait MaskSampler: Send + Sync {
    /// The patch grid `(height, width)`.
    fn grid(&self) -> (usize, usize);

    /// The number of masked patches aimed at per sample.
    fn num_masking_patches(&self) -> usize;

    /// Draw one mask with the given random source.
    fn sample(&self, rng: &mut dyn RngCore) -> Vec<bool>;

    /// Number of patches in the grid.
    fn num_patches(&self) -> usize {
        let (h, w) = self.grid();
        h * w
    }

    /// The mask of sample `index` of step `step`: a pure function of `(seed, step, index)`, so a
    /// resumed run draws the same masks and batch members are independent of each other.
    fn sample_at(&self, seed: u64, step: u64, index: u64) -> Vec<bool> {
        self.sample(&mut sample_rng(seed, step, index))
    }

    /// The masks of a whole batch: sample `i` uses [`sample_rng`]`(seed, step, i)`.
    fn sample_batch(&self, seed: u64, step: u64, batch_size: usize) -> MaskBatch {
        let (height, width) = self.grid();
        let masks = (0..batch_size as u64)
            .map(|i| self.sample_at(seed, step, i))
            .collect();
        MaskBatch {
            height,
            width,
            masks,
        }
    }
}

/// The random generator of one sample, keyed by `(seed, step, index)`.
///
/// The three numbers fill distinct words of the 32-byte ChaCha key of [`StdRng`]
/// ([`beit_rng::key_words`]), so different triples give unrelated streams (no collision such as
/// `(seed + 1, step)` vs `(seed, step + 1)`).
pub fn sample_rng(seed: u64, step: u64, index: u64) -> StdRng {
    // A fixed tag keeps these streams apart from other uses of the same seed (init, dropout...).
    StdRng::from_seed(beit_rng::key_words([seed, step, index, MASK_TAG]))
}

/// The purpose word of mask generators' keys.
const MASK_TAG: u64 = beit_rng::tag(b"beit-mim");

/// A batch of masks over one patch grid, kept on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskBatch {
    /// Grid rows.
    pub height: usize,
    /// Grid columns.
    pub width: usize,
    /// One row-major mask of `height * width` cells per sample.
    pub masks: Vec<Vec<bool>>,
}

impl MaskBatch {
    /// Number of samples.
    pub fn batch_size(&self) -> usize {
        self.masks.len()
    }

    /// Cells per mask (`height * width`).
    pub fn num_patches(&self) -> usize {
        self.height * self.width
    }

    /// Masked cells of each sample.
    pub fn counts(&self) -> Vec<usize> {
        self.masks
            .iter()
            .map(|m| m.iter().filter(|&&b| b).count())
            .collect()
    }

    /// All masks flattened to `B * N` bytes (1 = masked), row-major.
    pub fn to_u8(&self) -> Vec<u8> {
        self.masks
            .iter()
            .flat_map(|m| m.iter().map(|&b| u8::from(b)))
            .collect()
    }

    /// Indices `b * N + n` of the masked positions in the flattened `(B * N)` sequence, in order;
    /// feed them to [`crate::gather_rows`] to pick the masked rows of `(B, N, C)` features.
    pub fn masked_flat_indices(&self) -> Vec<u32> {
        let n = self.num_patches();
        self.masks
            .iter()
            .enumerate()
            .flat_map(|(b, m)| {
                m.iter()
                    .enumerate()
                    .filter(|(_, &x)| x)
                    .map(move |(i, _)| (b * n + i) as u32)
            })
            .collect()
    }

    /// The masked cells of each sample, increasing, each plus `offset` (1 gives the token rows
    /// of the masked patches after a CLS token).
    pub fn masked_positions(&self, offset: u32) -> Vec<Vec<u32>> {
        self.masks
            .iter()
            .map(|m| {
                m.iter()
                    .enumerate()
                    .filter(|(_, &x)| x)
                    .map(|(i, _)| i as u32 + offset)
                    .collect()
            })
            .collect()
    }

    /// The masks as a `(B, N)` `u8` tensor on `device`, like `bool_masked_pos` in `transformers`.
    pub fn to_tensor(&self, device: &Device) -> candle::Result<Tensor> {
        Tensor::from_vec(
            self.to_u8(),
            (self.batch_size(), self.num_patches()),
            device,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MaskingConfig;

    #[test]
    fn batch_members_are_independent_and_resumable() {
        let g = MaskingConfig::default().build().unwrap();
        let batch = g.sample_batch(5, 12, 6);
        assert_eq!(batch.batch_size(), 6);
        for (i, m) in batch.masks.iter().enumerate() {
            // Sample i of step 12 does not depend on the batch size or on other samples.
            assert_eq!(m, &g.sample_at(5, 12, i as u64));
        }
        assert_eq!(g.sample_batch(5, 12, 3).masks, batch.masks[..3].to_vec());
        let distinct: std::collections::HashSet<_> = batch.masks.iter().collect();
        assert_eq!(distinct.len(), 6);
        assert_ne!(g.sample_batch(5, 13, 6), batch);
    }

    #[test]
    fn host_and_tensor_views_agree() {
        let batch = MaskBatch {
            height: 2,
            width: 2,
            masks: vec![
                vec![true, false, false, true],
                vec![false, true, false, false],
            ],
        };
        assert_eq!(batch.counts(), vec![2, 1]);
        assert_eq!(batch.to_u8(), vec![1, 0, 0, 1, 0, 1, 0, 0]);
        assert_eq!(batch.masked_flat_indices(), vec![0, 3, 5]);
        assert_eq!(batch.masked_positions(1), vec![vec![1, 4], vec![2]]);
        let t = batch.to_tensor(&Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 4]);
        assert_eq!(
            t.to_vec2::<u8>().unwrap(),
            vec![vec![1, 0, 0, 1], vec![0, 1, 0, 0]]
        );
    }
}
