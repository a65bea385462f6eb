//! [`CollectiveBatchStats`]: a run's [`Collective`] as the transport of synchronised BatchNorm
//! (`beit_model::segmentation::sync_bn`), so that a data-parallel segmentation run normalises
//! with the statistics of the whole global batch (mmseg's `SyncBN`).

use std::sync::Arc;

use beit_model::segmentation::BatchStatsSync;

use super::Collective;

/// The per-channel sums of synchronised BatchNorm, summed over the ranks of a collective (on
/// the host, as f32; a few values per channel, two collectives per layer in each direction).
pub struct CollectiveBatchStats(Arc<dyn Collective>);

impl CollectiveBatchStats {
    /// BatchNorm statistics summed over `world`'s ranks, ready for
    /// `BeitForSemanticSegmentation::synchronise_batch_norms`.
    pub fn shared(world: Arc<dyn Collective>) -> Arc<dyn BatchStatsSync> {
        Arc::new(Self(world))
    }
}

impl BatchStatsSync for CollectiveBatchStats {
    fn world_size(&self) -> usize {
        self.0.size()
    }

    fn all_reduce_sum(&self, what: &str, buf: &mut [f32]) -> candle::Result<()> {
        self.0
            .all_reduce_sum_f32(what, buf)
            .map_err(candle::Error::wrap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Result;
    use beit_model::segmentation::BatchNorm2d;
    use candle::{DType, Device, Tensor, Var};
    use candle_nn::{VarBuilder, VarMap};
    use std::sync::{Barrier, Mutex};

    /// `n` ranks as threads of one process: an all-reduce posts each rank's buffer, waits for
    /// every rank, and sums the buffers in rank order (the same sum on every rank).
    struct Threads {
        barrier: Barrier,
        posted: Mutex<Vec<Vec<f32>>>,
    }

    /// One rank of [`Threads`].
    struct ThreadRank {
        rank: usize,
        all: Arc<Threads>,
    }

    impl Collective for ThreadRank {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.all.posted.lock().unwrap().len()
        }
        fn local_rank(&self) -> usize {
            self.rank
        }
        fn backend(&self) -> &'static str {
            "threads"
        }
        fn all_reduce_sum_f32(&self, _: &str, buf: &mut [f32]) -> Result<()> {
            self.all.posted.lock().unwrap()[self.rank] = buf.to_vec();
            self.all.barrier.wait();
            buf.fill(0.0);
            for posted in self.all.posted.lock().unwrap().iter() {
                buf.iter_mut().zip(posted).for_each(|(b, p)| *b += p);
            }
            self.all.barrier.wait();
            Ok(())
        }
        fn all_reduce_sum_f64(&self, _: &str, _: &mut [f64]) -> Result<()> {
            unimplemented!("not used by BatchNorm")
        }
        fn broadcast_f32(&self, _: &str, _: &mut [f32]) -> Result<()> {
            unimplemented!("not used by BatchNorm")
        }
        fn broadcast_f64(&self, _: &str, _: &mut [f64]) -> Result<()> {
            unimplemented!("not used by BatchNorm")
        }
        fn barrier(&self, _: &str) -> Result<()> {
            self.all.barrier.wait();
            Ok(())
        }
    }

    /// What one BatchNorm training step produced: the output, the gradients of `x`, `weight`
    /// and `bias` for the objective `sum(y * probe)`, the running mean and variance.
    #[derive(Debug)]
    struct Step {
        y: Vec<f32>,
        grad_x: Vec<f32>,
        grad_weight: Vec<f32>,
        grad_bias: Vec<f32>,
        running: Vec<f32>,
    }

    /// One training forward and backward pass of a 3-channel BatchNorm (weight and bias not
    /// 1 and 0) on `x`, synchronised over `sync` when given.
    fn step(x: &Tensor, probe: &Tensor, sync: Option<Arc<dyn BatchStatsSync>>) -> Step {
        let run = || -> candle::Result<Step> {
            let dev = Device::Cpu;
            let vm = VarMap::new();
            let mut bn = BatchNorm2d::new(3, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
            bn.synchronise(sync);
            let var = |name: &str| vm.data().lock().unwrap()[name].clone();
            var("weight").set(&Tensor::new(&[0.5f32, 2.0, -1.0], &dev)?)?;
            var("bias").set(&Tensor::new(&[0.1f32, -0.3, 0.7], &dev)?)?;
            let x = Var::from_tensor(x)?;
            let y = bn.forward(&x, true)?;
            let grads = (&y * probe)?.sum_all()?.backward()?;
            let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
            let grad = |t: &Tensor| flat(grads.get(t).expect("a gradient"));
            Ok(Step {
                y: flat(&y)?,
                grad_x: grad(&x)?,
                grad_weight: grad(var("weight").as_tensor())?,
                grad_bias: grad(var("bias").as_tensor())?,
                running: [bn.running_mean(), bn.running_var()]
                    .iter()
                    .map(flat)
                    .collect::<candle::Result<Vec<_>>>()?
                    .concat(),
            })
        };
        run().unwrap()
    }

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + x.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    #[test]
    fn two_synchronised_ranks_match_plain_batch_norm_on_the_whole_batch() {
        let dev = Device::Cpu;
        // The ranks' halves have different means and spreads, so per-rank statistics would differ.
        let column = |v: [f32; 4]| Tensor::new(&v, &dev)?.reshape((4, 1, 1, 1));
        let x = Tensor::randn(0f32, 1.0, (4, 3, 5, 2), &dev)
            .and_then(|x| x.broadcast_mul(&column([1., 1., 3., 3.])?))
            .and_then(|x| x.broadcast_add(&column([0., 0., 2., 2.])?))
            .unwrap();
        let probe = Tensor::randn(0f32, 1.0, (4, 3, 5, 2), &dev).unwrap();
        let whole = step(&x, &probe, None);
        let all = Arc::new(Threads {
            barrier: Barrier::new(2),
            posted: Mutex::new(vec![Vec::new(); 2]),
        });
        let ranks: Vec<Step> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|rank| {
                    let world: Arc<dyn Collective> = Arc::new(ThreadRank {
                        rank,
                        all: all.clone(),
                    });
                    let (x, probe) = (
                        x.narrow(0, 2 * rank, 2).unwrap(),
                        probe.narrow(0, 2 * rank, 2).unwrap(),
                    );
                    s.spawn(move || step(&x, &probe, Some(CollectiveBatchStats::shared(world))))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let joined =
            |f: fn(&Step) -> &Vec<f32>| [f(&ranks[0]).clone(), f(&ranks[1]).clone()].concat();
        assert_close(&whole.y, &joined(|s| &s.y), "output");
        assert_close(&whole.grad_x, &joined(|s| &s.grad_x), "gradient of x");
        let summed = |f: fn(&Step) -> &Vec<f32>| -> Vec<f32> {
            f(&ranks[0])
                .iter()
                .zip(f(&ranks[1]))
                .map(|(a, b)| a + b)
                .collect()
        };
        assert_close(
            &whole.grad_weight,
            &summed(|s| &s.grad_weight),
            "gradient of weight",
        );
        assert_close(
            &whole.grad_bias,
            &summed(|s| &s.grad_bias),
            "gradient of bias",
        );
        for r in &ranks {
            assert_close(&whole.running, &r.running, "running statistics");
        }
        // Without the synchronisation a rank's half normalises differently.
        let alone = step(
            &x.narrow(0, 0, 2).unwrap(),
            &probe.narrow(0, 0, 2).unwrap(),
            None,
        );
        let differs = alone
            .grad_x
            .iter()
            .zip(&ranks[0].grad_x)
            .any(|(a, b)| (a - b).abs() > 1e-3);
        assert!(differs, "per-rank statistics give other gradients");
    }
}
