//! The recipes' side of data-parallel training (see `beit_train::distributed` for the engine's
//! side and `docs/distributed.md` for launching).
//!
//! The process's collective is created once, at start-up ([`init_from_launcher`], or
//! [`install`] with any [`Collective`]), kept here and handed explicitly to the engine
//! (`TrainLoop::open_in`) and to evaluation; without it every recipe is the single-process one.
//!
//! `train.batch_size` stays the global batch: with `A` accumulation steps it makes global
//! micro-batches of `m = batch_size / A` samples, the same on any number of processes `N`. Each
//! rank's loader has micro-batches of `m / N`; as PyTorch's `DistributedSampler`, rank `r` reads
//! positions `r, r + N, r + 2N, ...` of the epoch's permutation, so that rank `r`'s `k`-th sample
//! of micro-batch `j` is sample `k·N + r` of the global micro-batch `j` (the one a single process
//! would read): together the ranks read exactly that micro-batch. Augmentations are seeded by
//! `(seed, epoch, dataset index)` and MIM masks by `(seed, micro-batch, position in the global
//! micro-batch)`, and drop path / dropout by `(step seed, position in the global micro-batch)`
//! (`beit_train::StepContext::global_positions`), so the data and the regularisers do not depend on `N`. Mixup/CutMix
//! (which mixes a batch with itself reversed, as timm does under DDP) does depend on how the batch
//! is split: [`warn_if_n_dependent`] says so.

use std::sync::{Arc, OnceLock};

use anyhow::{anyhow, bail, Result};
use beit_data::{Dataset, LoaderConfig, Subset};
use beit_train::distributed::{Collective, SingleProcess};

static WORLD: OnceLock<Arc<dyn Collective>> = OnceLock::new();

/// Make `world` the process's collective. Once per process; a second call is an error.
pub fn install(world: Arc<dyn Collective>) -> Result<()> {
    WORLD
        .set(world)
        .map_err(|_| anyhow!("the data-parallel world is already set"))
}

/// The process's collective ([`SingleProcess`] unless [`install`] was called).
pub fn world() -> Arc<dyn Collective> {
    WORLD
        .get()
        .cloned()
        .unwrap_or_else(|| Arc::new(SingleProcess))
}

/// This rank's share of a global micro-batch of `micro` samples. Fails when `N` does not
/// divide it.
pub fn rank_micro_batch(micro: usize) -> Result<usize> {
    let n = world().size();
    if !micro.is_multiple_of(n) {
        bail!(
            "train.batch_size / train.accum_steps = {micro} samples per micro-batch cannot be \
             split evenly over {n} processes (choose a batch size that is a multiple of \
             accum_steps x {n})"
        );
    }
    Ok(micro / n)
}

/// Shard a training loader's epochs over the world's ranks.
pub fn shard_loader(cfg: LoaderConfig) -> LoaderConfig {
    let w = world();
    LoaderConfig {
        rank: w.rank(),
        world_size: w.size(),
        ..cfg
    }
}

/// The global micro-batches of an epoch of `len` samples (a trailing partial one dropped): the
/// same on every `N` (each rank's loader may have one more, never read).
pub fn global_batches_per_epoch(len: usize, micro: usize) -> u64 {
    (len / micro.max(1)) as u64
}

/// This rank's share of an evaluation split: samples `r, r + N, ...` (no padding, so the summed
/// counts are those of the split).
pub fn eval_shard(ds: Arc<dyn Dataset>) -> Arc<dyn Dataset> {
    let w = world();
    if w.size() == 1 {
        return ds;
    }
    let idx: Vec<usize> = (w.rank()..ds.len()).step_by(w.size()).collect();
    Arc::new(Subset::new(ds, idx))
}

/// Log once (rank 0) what makes a data-parallel run differ from a single process.
pub fn warn_if_n_dependent(mixup: bool) {
    let w = world();
    if w.size() == 1 || w.rank() != 0 {
        return;
    }
    tracing::info!(
        "data-parallel run: {} processes ({}), local rank {}",
        w.size(),
        w.backend(),
        w.local_rank()
    );
    if mixup {
        tracing::warn!(
            "mixup/CutMix mixes each rank's share of the batch: the pairs differ from one \
             process's"
        );
    }
}

/// Whether this process writes the run's files.
pub fn is_primary() -> bool {
    world().rank() == 0
}

/// Environment variables set by the launchers (`mpirun` of OpenMPI, MPICH/Intel MPI's
/// `mpiexec`, PMIx, `srun --mpi=pmi2|pmix`): their presence means the process is one of an MPI
/// job.
const LAUNCHER_VARS: [&str; 4] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK"];

/// Whether a launcher started this process as part of an MPI job.
pub fn launched_by_mpi() -> bool {
    LAUNCHER_VARS.iter().any(|k| std::env::var_os(k).is_some())
}

/// When launched by `mpirun` / `srun`, initialise MPI and make it (or, in a `nccl` build, NCCL
/// over it for CUDA tensors: `beit_train::distributed::transport_from_env`) the process's world; a
/// plain start stays a single process (`None`). Keep the guard until the end of a successful
/// run; on failure call [`abort_job`] so that the other ranks end too.
#[cfg(feature = "mpi")]
pub fn init_from_launcher() -> Result<Option<beit_train::distributed::MpiGuard>> {
    if !launched_by_mpi() {
        return Ok(None);
    }
    let guard = beit_train::distributed::MpiWorld::init()?;
    install(beit_train::distributed::transport_from_env(guard.world())?)?;
    Ok(Some(guard))
}

/// End a failed data-parallel job: every rank stops (MPI_Abort) rather than waiting for the
/// failed one in a collective. Returns when there is no MPI world (the caller then exits).
#[cfg(feature = "mpi")]
pub fn abort_job(guard: Option<beit_train::distributed::MpiGuard>, code: i32) {
    if let Some(g) = guard {
        if world().size() > 1 {
            g.abort(code);
        }
        drop(g);
    }
}
