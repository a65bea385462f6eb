//! Epoch orders: deterministic shuffling from `(seed, epoch)`, sharding by `(rank, world_size)`, and
//! per-sample seeds so that augmentations are reproducible when a run resumes.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{DataError, Result};

/// Seed derived from a run seed and a list of indices (epoch, sample, ...): the workspace's
/// scheme, [`beit_rng::derive_seed`].
pub use beit_rng::derive_seed;

/// The RNG for the augmentations of sample `index` in `epoch`.
pub fn sample_rng(seed: u64, epoch: u64, index: u64) -> StdRng {
    StdRng::seed_from_u64(derive_seed(seed, &[epoch, index, 1]))
}

/// Sample indices for one epoch and one rank.
///
/// With `shuffle`, all `len` indices are permuted with an RNG seeded from `(seed, epoch)` (the same
/// permutation on every rank); without, they stay in order. As PyTorch's `DistributedSampler`, the
/// list is padded by wrapping around to a multiple of `world_size`, and rank `r` takes every
/// `world_size`-th index starting at `r`.
pub fn epoch_indices(
    len: usize,
    shuffle: bool,
    seed: u64,
    epoch: u64,
    rank: usize,
    world_size: usize,
) -> Result<Vec<usize>> {
    if world_size == 0 || rank >= world_size {
        return Err(DataError::param(
            "rank",
            format!("rank {rank} must be < world_size {world_size}"),
        ));
    }
    let mut order: Vec<usize> = (0..len).collect();
    if shuffle {
        let mut rng = StdRng::seed_from_u64(derive_seed(seed, &[epoch, 0]));
        order.shuffle(&mut rng);
    }
    if world_size == 1 || len == 0 {
        return Ok(order);
    }
    let total = len.div_ceil(world_size) * world_size;
    for i in len..total {
        order.push(order[i - len]);
    }
    Ok(order.into_iter().skip(rank).step_by(world_size).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffle_is_deterministic_and_epoch_dependent() {
        let a = epoch_indices(100, true, 42, 0, 0, 1).unwrap();
        let b = epoch_indices(100, true, 42, 0, 0, 1).unwrap();
        let c = epoch_indices(100, true, 42, 1, 0, 1).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_eq!(
            epoch_indices(5, false, 42, 3, 0, 1).unwrap(),
            vec![0, 1, 2, 3, 4]
        );
    }

    #[test]
    fn shards_cover_everything_once_with_padding() {
        let shards: Vec<Vec<usize>> = (0..3)
            .map(|r| epoch_indices(10, true, 7, 2, r, 3).unwrap())
            .collect();
        assert!(shards.iter().all(|s| s.len() == 4));
        let mut all: Vec<usize> = shards.concat();
        all.sort();
        all.dedup();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert!(epoch_indices(10, true, 7, 2, 3, 3).is_err());
    }
}
