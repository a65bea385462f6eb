//! The recipes' side of data-parallel training (see `beit_train::distributed` for the engine's
//! side and `docs/distributed.md` for launching).
//!
//! The run's collective is a value, a [`World`]: created once by the caller at start-up (the CLI
//! with [`init_from_launcher`]), handed to each recipe in its job and from there to the engine
//! (`TrainLoop::open_in`), the data sharding and the evaluation. The default is the single
//! process.
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
//! is split: [`World::warn_if_n_dependent`] says so.

use std::fmt;
use std::sync::Arc;

use anyhow::{bail, Result};
use beit_data::{Dataset, LoaderConfig, Subset};
use beit_train::distributed::{Collective, SingleProcess};

/// The collective of a run, handed to each recipe in its job: [`SingleProcess`] by default, the
/// MPI world (or NCCL over it) when the CLI was launched by `mpirun` / `srun`
/// ([`init_from_launcher`]).
#[derive(Clone)]
pub struct World(Arc<dyn Collective>);

impl World {
    /// A run over `collective`.
    pub fn new(collective: Arc<dyn Collective>) -> Self {
        Self(collective)
    }

    /// The collective, for the engine (`TrainLoop::open_in`).
    pub fn collective(&self) -> Arc<dyn Collective> {
        self.0.clone()
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.0.rank()
    }

    /// Number of processes.
    pub fn size(&self) -> usize {
        self.0.size()
    }

    /// Whether this process writes the run's files (rank 0).
    pub fn is_primary(&self) -> bool {
        self.rank() == 0
    }

    /// This rank's share of a global micro-batch of `micro` samples. Fails when `N` does not
    /// divide it.
    pub fn rank_micro_batch(&self, micro: usize) -> Result<usize> {
        let n = self.size();
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
    pub fn shard_loader(&self, cfg: LoaderConfig) -> LoaderConfig {
        LoaderConfig {
            rank: self.rank(),
            world_size: self.size(),
            ..cfg
        }
    }

    /// This rank's share of an evaluation split: samples `r, r + N, ...` (no padding, so the
    /// summed counts are those of the split).
    pub fn eval_shard(&self, ds: Arc<dyn Dataset>) -> Arc<dyn Dataset> {
        // Sharded sets are split by the loader (disjoint shards per rank), not by index.
        if self.size() == 1 || ds.shards().is_some() {
            return ds;
        }
        let idx: Vec<usize> = (self.rank()..ds.len()).step_by(self.size()).collect();
        Arc::new(Subset::new(ds, idx))
    }

    /// Log once (rank 0) what makes a data-parallel run differ from a single process.
    pub fn warn_if_n_dependent(&self, mixup: bool) {
        if self.size() == 1 || self.rank() != 0 {
            return;
        }
        tracing::info!(
            "data-parallel run: {} processes ({}), local rank {}",
            self.size(),
            self.0.backend(),
            self.0.local_rank()
        );
        if mixup {
            tracing::warn!(
                "mixup/CutMix mixes each rank's share of the batch: the pairs differ from one \
                 process's"
            );
        }
    }
}

impl Default for World {
    /// A single process.
    fn default() -> Self {
        Self(Arc::new(SingleProcess))
    }
}

impl std::ops::Deref for World {
    type Target = dyn Collective;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl fmt::Debug for World {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("World")
            .field("backend", &self.0.backend())
            .field("rank", &self.rank())
            .field("size", &self.size())
            .finish()
    }
}

/// The global micro-batches of an epoch of `len` samples (a trailing partial one dropped): the
/// same on every `N` (each rank's loader may have one more, never read).
pub fn global_batches_per_epoch(len: usize, micro: usize) -> u64 {
    (len / micro.max(1)) as u64
}

/// Environment variables set by the launchers (`mpirun` of OpenMPI, MPICH/Intel MPI's
/// `mpiexec`, PMIx, `srun --mpi=pmi2|pmix`): their presence means the process is one of an MPI
/// job.
const LAUNCHER_VARS: [&str; 4] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK"];

/// Whether a launcher started this process as part of an MPI job.
pub fn launched_by_mpi() -> bool {
    LAUNCHER_VARS.iter().any(|k| std::env::var_os(k).is_some())
}

/// When launched by `mpirun` / `srun`, initialise MPI and return its world (or, in a `nccl`
/// build, NCCL over it for CUDA tensors: `beit_train::distributed::transport_from_env`) with the
/// guard; a plain start is a single process (no guard). Keep the guard until the end of a
/// successful run; on failure call [`abort_job`] so that the other ranks end too.
#[cfg(feature = "mpi")]
pub fn init_from_launcher() -> Result<(World, Option<beit_train::distributed::MpiGuard>)> {
    if !launched_by_mpi() {
        return Ok((World::default(), None));
    }
    let guard = beit_train::distributed::MpiWorld::init()?;
    let world = World::new(beit_train::distributed::transport_from_env(guard.world())?);
    Ok((world, Some(guard)))
}

/// End a failed data-parallel job: every rank stops (MPI_Abort) rather than waiting for the
/// failed one in a collective. Returns when there is no MPI world (the caller then exits).
#[cfg(feature = "mpi")]
pub fn abort_job(world: &World, guard: Option<beit_train::distributed::MpiGuard>, code: i32) {
    if let Some(g) = guard {
        if world.size() > 1 {
            g.abort(code);
        }
        drop(g);
    }
}
