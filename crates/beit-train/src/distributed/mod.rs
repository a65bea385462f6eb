//! Data-parallel training, the Horovod way: one process per device, launched by `mpirun` or
//! `srun`; gradients all-reduced and averaged before the optimizer; only rank 0 writes.
//!
//! The concept lives here and nowhere else:
//!
//! * [`Collective`]: what a data-parallel run needs from its transport (rank, world size, local
//!   rank, in-place sum all-reduce of f32/f64 buffers, broadcast from rank 0, barrier).
//!   [`SingleProcess`] is the default (every operation is a no-op); [`MpiWorld`] (feature `mpi`)
//!   runs over MPI on the host; [`NcclWorld`] (feature `nccl`) is the MPI world with the tensor
//!   all-reduce of CUDA tensors (the gradients) done by NCCL on the GPUs.
//! * No process-wide world: the caller creates the collective once at start-up (the CLI does it
//!   when built with `mpi`, choosing the transport with [`transport_from_env`]) and hands it to
//!   the engine ([`crate::TrainLoop::open_in`] and siblings) and to whatever else needs it. The
//!   plain constructors use [`SingleProcess`]: the single-process path, at no cost.
//! * [`CollectiveBatchStats`]: the collective as the transport of synchronised BatchNorm
//!   (`beit_model::segmentation::sync_bn`, mmseg's `SyncBN`), which segmentation training
//!   installs in a data-parallel run.
//! * Helpers the engine uses: [`all_reduce_grads`] (the mean gradient of every optimizer step;
//!   on the host large gradients are summed where they lie, `host_grads.rs`), [`broadcast_vars`]
//!   (rank 0's initial weights), [`weights_checksum`] and [`check_in_sync`] (compared at every
//!   checkpoint).
//!
//! [`crate::TrainLoop`] and [`crate::fit`] use the world they were given: a recipe only shards its
//! data (see the recipes' `distributed` helpers) and shards its evaluation
//! ([`crate::EvalAccumulator::all_reduce`]).
//!
//! A collective that does not finish within the timeout ([`timeout_from_env`], variable
//! `BEIT_DIST_TIMEOUT_S`, default 600 s) ends the whole job with a message naming the collective
//! and the rank (the MPI world's watchdog), never a silent hang.

mod batch_stats;
mod host_grads;
#[cfg(feature = "mpi")]
mod mpi_world;
#[cfg(feature = "nccl")]
mod nccl_world;

use std::collections::BTreeMap;
#[cfg(feature = "mpi")]
use std::sync::Arc;
use std::time::Duration;

use candle::{backprop::GradStore, DType, Tensor, Var};
use candle_nn::VarMap;

use crate::error::{Result, TrainError};

pub use batch_stats::CollectiveBatchStats;
#[cfg(feature = "mpi")]
pub use mpi_world::{MpiGuard, MpiWorld};
#[cfg(feature = "nccl")]
pub use nccl_world::NcclWorld;

/// Environment variable: seconds a collective may take before the job is ended.
pub const TIMEOUT_ENV: &str = "BEIT_DIST_TIMEOUT_S";
/// Default collective timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// Environment variable: the transport of an MPI job, `nccl` (the default of a `nccl` build:
/// CUDA gradients through NCCL) or `mpi` (everything through MPI on the host).
pub const BACKEND_ENV: &str = "BEIT_DIST_BACKEND";
/// Environment variable: `1` makes [`all_reduce_grads`] all-reduce even in a world of 1, which
/// exercises a transport on a single device (NCCL on one GPU: `scripts/gpu/gpu_nccl_check.sh`).
pub const FORCE_REDUCE_ENV: &str = "BEIT_DIST_FORCE_REDUCE";

/// The collective operations of a data-parallel run. `what` names the operation in errors and in
/// the watchdog's message.
pub trait Collective: Send + Sync {
    /// This process's rank in `0..size()`.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn size(&self) -> usize;
    /// Rank among the processes of this machine (picks the device).
    fn local_rank(&self) -> usize;
    /// The transport, for logs (`single`, `mpi`).
    fn backend(&self) -> &'static str;
    /// Sum `buf` over all ranks, in place.
    fn all_reduce_sum_f32(&self, what: &str, buf: &mut [f32]) -> Result<()>;
    /// Sum `send` over all ranks into `recv` (of the same length), leaving `send` unchanged.
    /// The default copies `send` into `recv` and sums that in place; MPI hands both buffers to
    /// `MPI_Allreduce`, which saves the copy.
    fn all_reduce_sum_f32_to(&self, what: &str, send: &[f32], recv: &mut [f32]) -> Result<()> {
        recv.copy_from_slice(send);
        self.all_reduce_sum_f32(what, recv)
    }
    /// Sum `buf` over all ranks, in place.
    fn all_reduce_sum_f64(&self, what: &str, buf: &mut [f64]) -> Result<()>;
    /// Replace `buf` by rank 0's.
    fn broadcast_f32(&self, what: &str, buf: &mut [f32]) -> Result<()>;
    /// Replace `buf` by rank 0's.
    fn broadcast_f64(&self, what: &str, buf: &mut [f64]) -> Result<()>;
    /// Wait for every rank.
    fn barrier(&self, what: &str) -> Result<()>;

    /// Sum a tensor over all ranks. The default goes through the host (f32) and leaves `t`
    /// unchanged; a device transport (NCCL) overrides it to stay on the device and may sum in
    /// place, so that `t`'s storage holds the sum too: pass a buffer the caller owns.
    fn all_reduce_sum_tensor(&self, what: &str, t: &Tensor) -> Result<Tensor> {
        let mut host = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        self.all_reduce_sum_f32(what, &mut host)?;
        Ok(Tensor::from_vec(host, t.shape(), t.device())?.to_dtype(t.dtype())?)
    }
}

/// One process: rank 0 of a world of 1; every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum_f32(&self, _: &str, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _: &str, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast_f32(&self, _: &str, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast_f64(&self, _: &str, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn barrier(&self, _: &str) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_tensor(&self, _: &str, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
}

/// The collective timeout: `BEIT_DIST_TIMEOUT_S` seconds (a positive number), else
/// [`DEFAULT_TIMEOUT`].
pub fn timeout_from_env() -> Result<Duration> {
    match std::env::var(TIMEOUT_ENV) {
        Err(_) => Ok(DEFAULT_TIMEOUT),
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if s > 0.0 && s.is_finite() => Ok(Duration::from_secs_f64(s)),
            _ => Err(TrainError::Config(format!(
                "{TIMEOUT_ENV}={v:?}: expected a positive number of seconds"
            ))),
        },
    }
}

/// The local rank the launcher gives this process: `OMPI_COMM_WORLD_LOCAL_RANK` (OpenMPI's
/// `mpirun`), `SLURM_LOCALID` (`srun`), `MPI_LOCALRANKID` (MPICH) or `LOCAL_RANK`; `None` when
/// none is set.
pub fn local_rank_from_env() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "SLURM_LOCALID",
        "MPI_LOCALRANKID",
        "LOCAL_RANK",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

/// The transport to install over MPI, from [`BACKEND_ENV`]: in a `nccl` build an
/// [`NcclWorld`] over `mpi` unless the variable says `mpi`; otherwise `mpi` itself. A `nccl`
/// request in a build without the feature is an error naming it.
#[cfg(feature = "mpi")]
pub fn transport_from_env(mpi: Arc<MpiWorld>) -> Result<Arc<dyn Collective>> {
    let choice = std::env::var(BACKEND_ENV).ok();
    match choice.as_deref().map(str::trim) {
        Some("mpi") => Ok(mpi),
        #[cfg(feature = "nccl")]
        None | Some("") | Some("nccl") => Ok(Arc::new(NcclWorld::new(mpi))),
        #[cfg(not(feature = "nccl"))]
        None | Some("") => Ok(mpi),
        #[cfg(not(feature = "nccl"))]
        Some("nccl") => Err(TrainError::Config(format!(
            "{BACKEND_ENV}=nccl: this binary was built without NCCL; rebuild with `--features \
             nccl`"
        ))),
        Some(other) => Err(TrainError::Config(format!(
            "{BACKEND_ENV}={other:?}: expected `nccl` or `mpi`"
        ))),
    }
}

/// Whether [`FORCE_REDUCE_ENV`] is set to `1`.
fn force_reduce() -> bool {
    std::env::var(FORCE_REDUCE_ENV).is_ok_and(|v| v.trim() == "1")
}

/// All-reduce the gradients of `vars` in `grads` and divide them by the world size: after it
/// every rank holds the mean of the ranks' gradients. On a device, all gradients travel in one
/// flattened buffer (f32, in `vars` order; with NCCL it never leaves the GPU); on the host, large
/// gradients are summed in their own storage and the rest packed in one buffer (`host_grads.rs`).
/// Either way one presence flag per parameter travels along, so a parameter that got no
/// gradient on any rank stays without one (AdamW then skips it, as in a single process).
/// No-op in a world of 1 (unless [`FORCE_REDUCE_ENV`] is `1`).
pub fn all_reduce_grads(world: &dyn Collective, grads: &mut GradStore, vars: &[Var]) -> Result<()> {
    let n = world.size();
    if vars.is_empty() || (n == 1 && !force_reduce()) {
        return Ok(());
    }
    if vars[0].device().is_cpu() {
        return host_grads::all_reduce_grads_host(world, grads, vars);
    }
    let device = vars[0].device().clone();
    let mut parts = Vec::with_capacity(vars.len() + 1);
    let mut present = Vec::with_capacity(vars.len());
    for v in vars {
        let part = match grads.get(v.as_tensor()) {
            Some(g) => {
                present.push(1f32);
                g.to_dtype(DType::F32)?.flatten_all()?
            }
            None => {
                present.push(0f32);
                Tensor::zeros(v.elem_count(), DType::F32, &device)?
            }
        };
        parts.push(part.to_device(&device)?);
    }
    parts.push(Tensor::from_vec(present, vars.len(), &device)?);
    let flat = Tensor::cat(&parts, 0)?;
    drop(parts);
    let summed = world.all_reduce_sum_tensor("gradient all-reduce", &flat)?;
    let mean = summed.affine(1.0 / n as f64, 0.0)?;
    let total: usize = vars.iter().map(|v| v.elem_count()).sum();
    let flags = summed.narrow(0, total, vars.len())?.to_vec1::<f32>()?;
    let mut offset = 0;
    for (v, flag) in vars.iter().zip(flags) {
        let len = v.elem_count();
        if flag > 0.0 {
            let g = mean
                .narrow(0, offset, len)?
                .reshape(v.shape())?
                .to_dtype(v.dtype())?;
            grads.insert(v.as_tensor(), g);
        } else {
            grads.remove(v.as_tensor());
        }
        offset += len;
    }
    Ok(())
}

/// The variables of `varmap` in name order (the same order on every rank).
fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let sorted: BTreeMap<String, Var> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    sorted.into_iter().collect()
}

/// Give every rank rank 0's values of every variable of `varmap` (one broadcast per
/// variable). No-op in a world of 1.
pub fn broadcast_vars(world: &dyn Collective, varmap: &VarMap) -> Result<()> {
    broadcast_vars_where(world, varmap, |_| true)
}

/// [`broadcast_vars`] for the variables whose name `keep` accepts, e.g. BatchNorm running
/// statistics after a training forward pass (what PyTorch's DDP does with buffers).
pub fn broadcast_vars_where(
    world: &dyn Collective,
    varmap: &VarMap,
    keep: impl Fn(&str) -> bool,
) -> Result<()> {
    if world.size() == 1 {
        return Ok(());
    }
    for (name, var) in sorted_vars(varmap).into_iter().filter(|(n, _)| keep(n)) {
        let t = var.as_tensor();
        let mut host = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        world.broadcast_f32(&format!("broadcast of {name}"), &mut host)?;
        let new = Tensor::from_vec(host, t.shape(), t.device())?.to_dtype(t.dtype())?;
        var.set(&new)?;
    }
    Ok(())
}

/// A cheap checksum of the weights: per variable (in name order) the f64 sum of its values and
/// of its values weighted by their position modulo 7, folded into one number. Identical
/// weights give bit-identical checksums.
pub fn weights_checksum(varmap: &VarMap) -> Result<f64> {
    let mut total = 0f64;
    for (i, (_, var)) in sorted_vars(varmap).into_iter().enumerate() {
        let v = var
            .as_tensor()
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let (mut plain, mut weighted) = (0f64, 0f64);
        for (j, x) in v.iter().enumerate() {
            plain += f64::from(*x);
            weighted += f64::from(*x) * ((j % 7) as f64 + 1.0);
        }
        total += (plain + 0.5 * weighted) * (1.0 + (i % 13) as f64 * 1e-3);
    }
    Ok(total)
}

/// Compare this rank's `checksum` with rank 0's; every rank learns whether any differs, and all
/// return the same error (naming the ranks that differ) when one does.
pub fn check_in_sync(world: &dyn Collective, checksum: f64, what: &str) -> Result<()> {
    if world.size() == 1 {
        return Ok(());
    }
    let mut root = [checksum];
    world.broadcast_f64("weight checksum broadcast", &mut root)?;
    let n = world.size();
    let mut differs = vec![0f64; n];
    if root[0].to_bits() != checksum.to_bits() {
        differs[world.rank()] = 1.0;
    }
    world.all_reduce_sum_f64("weight checksum comparison", &mut differs)?;
    let bad: Vec<String> = differs
        .iter()
        .enumerate()
        .filter(|(_, d)| **d > 0.0)
        .map(|(r, _)| r.to_string())
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    Err(TrainError::Config(format!(
        "{what}: the weights of rank(s) {} differ from rank 0's (checksum {} on rank 0, {checksum} \
         on rank {}); the processes are out of sync, stopping",
        bad.join(", "),
        root[0],
        world.rank()
    )))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle::Device;

    /// A fake world of `n` identical ranks: sums multiply by `n` (what `n` ranks holding the same
    /// buffer would get), broadcasts are identities; it counts the f32 all-reduces it is asked for.
    pub(crate) struct Replicated {
        n: usize,
        f32_reduces: std::sync::atomic::AtomicUsize,
    }

    impl Replicated {
        pub(crate) fn new(n: usize) -> Self {
            Self {
                n,
                f32_reduces: Default::default(),
            }
        }
    }

    impl Collective for Replicated {
        fn rank(&self) -> usize {
            0
        }
        fn size(&self) -> usize {
            self.n
        }
        fn local_rank(&self) -> usize {
            0
        }
        fn backend(&self) -> &'static str {
            "replicated"
        }
        fn all_reduce_sum_f32(&self, _: &str, buf: &mut [f32]) -> Result<()> {
            self.f32_reduces
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            buf.iter_mut().for_each(|x| *x *= self.n as f32);
            Ok(())
        }
        fn all_reduce_sum_f64(&self, _: &str, buf: &mut [f64]) -> Result<()> {
            buf.iter_mut().for_each(|x| *x *= self.n as f64);
            Ok(())
        }
        fn broadcast_f32(&self, _: &str, _: &mut [f32]) -> Result<()> {
            Ok(())
        }
        fn broadcast_f64(&self, _: &str, _: &mut [f64]) -> Result<()> {
            Ok(())
        }
        fn barrier(&self, _: &str) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn replicated_gradients_average_to_themselves_and_absent_ones_stay_absent() {
        let dev = Device::Cpu;
        let a = Var::new(&[[1f32, 2.], [3., 4.]], &dev).unwrap();
        let b = Var::new(&[5f32, 6., 7.], &dev).unwrap();
        let loss = (a.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
        let mut grads = loss.backward().unwrap();
        assert!(grads.get(b.as_tensor()).is_none());
        all_reduce_grads(&Replicated::new(3), &mut grads, &[a.clone(), b.clone()]).unwrap();
        let g = grads.get(a.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(g, vec![vec![1., 2.], vec![3., 4.]]);
        assert!(grads.get(b.as_tensor()).is_none());
    }

    #[test]
    fn checksum_sees_a_swap_and_sync_check_passes_for_equal_weights() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let w = vb
            .get_with_hints(4, "w", candle_nn::Init::Const(0.0))
            .unwrap();
        let _ = w;
        let var = vm.data().lock().unwrap()["w"].clone();
        var.set(&Tensor::new(&[1f32, 2., 3., 4.], &dev).unwrap())
            .unwrap();
        let c1 = weights_checksum(&vm).unwrap();
        var.set(&Tensor::new(&[2f32, 1., 3., 4.], &dev).unwrap())
            .unwrap();
        let c2 = weights_checksum(&vm).unwrap();
        assert_ne!(c1, c2, "a swap of two values changes the checksum");
        check_in_sync(&Replicated::new(2), c2, "test").unwrap();
        check_in_sync(&SingleProcess, c2, "test").unwrap();
    }

    #[test]
    fn a_world_of_one_reduces_only_when_forced_and_keeps_the_gradients() {
        // Only this test touches the variable.
        let dev = Device::Cpu;
        let a = Var::new(&[1f32, -2., 3.], &dev).unwrap();
        let loss = a.as_tensor().sqr().unwrap().sum_all().unwrap();
        let world = Replicated::new(1);
        let calls = || world.f32_reduces.load(std::sync::atomic::Ordering::SeqCst);
        let mut grads = loss.backward().unwrap();
        std::env::remove_var(FORCE_REDUCE_ENV);
        all_reduce_grads(&world, &mut grads, std::slice::from_ref(&a)).unwrap();
        assert_eq!(calls(), 0, "a world of 1 skips the all-reduce");
        std::env::set_var(FORCE_REDUCE_ENV, "1");
        all_reduce_grads(&world, &mut grads, std::slice::from_ref(&a)).unwrap();
        std::env::remove_var(FORCE_REDUCE_ENV);
        assert_eq!(calls(), 1, "forced: one all-reduce of the flattened buffer");
        let g = grads.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(g, vec![2., -4., 6.]);
    }

    #[test]
    fn timeout_variable_is_checked() {
        // Only this test touches the variable.
        std::env::set_var(TIMEOUT_ENV, "2.5");
        assert_eq!(timeout_from_env().unwrap(), Duration::from_millis(2500));
        std::env::set_var(TIMEOUT_ENV, "soon");
        let e = timeout_from_env().unwrap_err().to_string();
        assert!(e.contains(TIMEOUT_ENV), "{e}");
        std::env::remove_var(TIMEOUT_ENV);
        assert_eq!(timeout_from_env().unwrap(), DEFAULT_TIMEOUT);
    }
}
