//! Batches of data held in one tensor (cached features, a small image set): each epoch visits the
//! rows in a permutation drawn from `(seed, key, epoch)`, so a resumed run sees the same batches.

use anyhow::Result;
use beit_train::TrainRng;
use candle::{Device, Tensor};
use rand::seq::SliceRandom;

/// The row indices `(bs,)` of each full batch of epoch `epoch` over `n` rows (a trailing partial
/// batch is dropped). `key` separates the streams of different jobs.
pub fn epoch_batch_indices(
    n: usize,
    bs: usize,
    seed: u64,
    key: u64,
    epoch: u64,
    device: &Device,
) -> Result<Vec<Tensor>> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.shuffle(&mut TrainRng::derive(seed, &[key, epoch]));
    let order = Tensor::from_vec(order, n, device)?;
    (0..n / bs.max(1))
        .map(|i| Ok(order.narrow(0, i * bs, bs)?))
        .collect()
}
