//! Synchronised BatchNorm statistics (mmseg's `SyncBN`, PyTorch's `SyncBatchNorm`): in a
//! data-parallel run the batch mean and variance of each channel are computed over the samples of
//! every process, so that the normalisation, the running statistics and the gradients are those
//! of one process holding the whole batch.
//!
//! The transport is the caller's ([`BatchStatsSync`]: the training engine adapts its collective);
//! this module only needs a sum of small host buffers over the processes. The statistics are
//! built from ordinary tensor operations around one differentiable cross-process sum,
//! [`all_reduce_sum`], whose backward pass sums the incoming gradient over the processes too
//! (the gradient of a sum that every process reads is the sum of what each process sends back).
//! Automatic differentiation through it yields PyTorch's `SyncBatchNorm` backward, whose
//! all-reduced `sum_dy` and `sum_dy_xmu` are the gradients reaching the two sums below.
//!
//! Every process must run the same layers in the same order (the forward and backward passes of
//! a data-parallel step do): each sum is a collective.

use std::sync::Arc;

use candle::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};

/// The collective a synchronised BatchNorm needs: an in-place sum of an f32 buffer over the
/// processes of a data-parallel run (every process calls it with a buffer of the same length).
pub trait BatchStatsSync: Send + Sync {
    /// Number of processes.
    fn world_size(&self) -> usize;
    /// Sum `buf` over all processes, in place; `what` names the collective in errors.
    fn all_reduce_sum(&self, what: &str, buf: &mut [f32]) -> Result<()>;
}

impl std::fmt::Debug for dyn BatchStatsSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BatchStatsSync(world of {})", self.world_size())
    }
}

/// The sum over processes of an f32 tensor on the host; its backward pass is the same sum of the
/// gradient.
struct AllReduceSum {
    sync: Arc<dyn BatchStatsSync>,
    what: &'static str,
}

impl AllReduceSum {
    /// `values` summed over the processes.
    fn reduce(&self, what: &str, mut values: Vec<f32>) -> Result<Vec<f32>> {
        self.sync.all_reduce_sum(what, &mut values)?;
        Ok(values)
    }
}

impl CustomOp1 for AllReduceSum {
    fn name(&self) -> &'static str {
        "sync-batch-norm-all-reduce"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets())
        else {
            candle::bail!("{}: expects a contiguous f32 tensor", self.what);
        };
        let summed = self.reduce(self.what, data[start..end].to_vec())?;
        Ok((CpuStorage::F32(summed), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad_res
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let what = format!("{} (gradient)", self.what);
        let summed = self.reduce(&what, grad)?;
        Ok(Some(Tensor::from_vec(
            summed,
            grad_res.shape(),
            grad_res.device(),
        )?))
    }
}

/// `t` summed over the processes of `sync`, differentiably (the gradient is summed over the
/// processes too). The values travel through the host as f32, whatever `t`'s device and dtype.
pub fn all_reduce_sum(
    t: &Tensor,
    sync: &Arc<dyn BatchStatsSync>,
    what: &'static str,
) -> Result<Tensor> {
    let host = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let op = AllReduceSum {
        sync: sync.clone(),
        what,
    };
    host.apply_op1(op)?
        .to_dtype(t.dtype())?
        .to_device(t.device())
}

/// A training batch's per-channel statistics of `x` `(B, C, H, W)`: the mean `(1, C, 1, 1)`,
/// `x` minus it, the biased variance `(1, C, 1, 1)`, and the number of values per channel.
#[derive(Debug)]
pub(super) struct BatchStats {
    pub mean: Tensor,
    pub centred: Tensor,
    pub var: Tensor,
    pub count: usize,
}

/// [`BatchStats`] of this process's batch alone (plain BatchNorm).
pub(super) fn local_stats(x: &Tensor) -> Result<BatchStats> {
    let (b, _, h, w) = x.dims4()?;
    let mean = x.mean_keepdim((0, 2, 3))?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim((0, 2, 3))?;
    Ok(BatchStats {
        mean,
        centred,
        var,
        count: b * h * w,
    })
}

/// [`BatchStats`] of the batch formed by every process's `x`: the per-channel sum and the count
/// are summed over the processes, then the sum of squared deviations from the global mean (two
/// passes, as [`local_stats`], which this equals exactly in a world of one).
pub(super) fn global_stats(x: &Tensor, sync: &Arc<dyn BatchStatsSync>) -> Result<BatchStats> {
    let (b, c, h, w) = x.dims4()?;
    // The count travels as f32 beside the sums (exact up to 2^24 values per channel).
    let local_count = Tensor::new(&[(b * h * w) as f32], x.device())?;
    let local_sum = x
        .sum_keepdim((0, 2, 3))?
        .flatten_all()?
        .to_dtype(DType::F32)?;
    let sums = Tensor::cat(&[local_sum, local_count], 0)?;
    let sums = all_reduce_sum(&sums, sync, "sync BatchNorm sum")?;
    let count = sums.narrow(0, c, 1)?.to_vec1::<f32>()?[0].round() as usize;
    let scale = 1f64 / count as f64;
    let sum = sums.narrow(0, 0, c)?.to_dtype(x.dtype())?;
    let mean = (sum.reshape((1, c, 1, 1))? * scale)?;
    let centred = x.broadcast_sub(&mean)?;
    let squares = centred.sqr()?.sum_keepdim((0, 2, 3))?;
    let var = (all_reduce_sum(&squares, sync, "sync BatchNorm variance")? * scale)?;
    Ok(BatchStats {
        mean,
        centred,
        var,
        count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Var;

    /// A world of one process: every sum is the identity; it counts the calls.
    #[derive(Default)]
    struct Alone(std::sync::atomic::AtomicUsize);

    impl BatchStatsSync for Alone {
        fn world_size(&self) -> usize {
            1
        }
        fn all_reduce_sum(&self, _: &str, _: &mut [f32]) -> Result<()> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn in_a_world_of_one_the_statistics_and_their_gradients_are_the_local_ones_exactly(
    ) -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (3, 4, 5, 2), &dev)? + 0.7)?)?;
        let weights = Tensor::randn(0f32, 1.0, (3, 4, 5, 2), &dev)?;
        let alone = Arc::new(Alone::default());
        let sync: Arc<dyn BatchStatsSync> = alone.clone();
        let (local, global) = (local_stats(&x)?, global_stats(&x, &sync)?);
        assert_eq!(local.count, 30);
        assert_eq!(global.count, 30);
        let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        assert_eq!(flat(&local.mean)?, flat(&global.mean)?);
        assert_eq!(flat(&local.var)?, flat(&global.var)?);
        let objective = |s: &BatchStats| -> Result<Tensor> {
            (s.centred.broadcast_div(&(&s.var + 1e-5)?.sqrt()?)? * &weights)?.sum_all()
        };
        let g_local = objective(&local)?.backward()?;
        let g_global = objective(&global)?.backward()?;
        assert_eq!(
            flat(g_local.get(&x).unwrap())?,
            flat(g_global.get(&x).unwrap())?
        );
        let calls = alone.0.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(calls, 4, "two sums forward, their two gradients backward");
        Ok(())
    }
}
