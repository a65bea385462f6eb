//! [`MpiWorld`]: the [`Collective`] of processes launched by `mpirun` / `srun`, over MPI on the
//! host (rsmpi, the `mpi` crate), with a watchdog that ends the job when a collective hangs.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mpi::collective::SystemOperation;
use mpi::environment::{Threading, Universe};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use super::{local_rank_from_env, timeout_from_env, Collective};
use crate::error::{Result, TrainError};

/// Largest number of elements handed to one MPI call (MPI counts are `int`).
const CHUNK: usize = 1 << 27;

/// Exit code of a job ended by the watchdog.
const TIMEOUT_EXIT: i32 = 70;

/// MPI_COMM_WORLD's communicator, while MPI is initialised.
struct Comm(Option<SimpleCommunicator>);

// SAFETY: `Comm` is only reached through the `Mutex` of `MpiWorld`, so no two threads call MPI
// at once, and `MpiWorld::init` refuses an MPI library below `MPI_THREAD_SERIALIZED`, the level
// at which MPI may be called from any thread as long as the calls are not concurrent. The
// communicator is the predefined world handle, valid in every thread until `MPI_Finalize`,
// after which it is `None` (see `MpiGuard::drop`).
unsafe impl Send for Comm {}

/// The collective in flight, watched by the watchdog thread.
#[derive(Default)]
struct InFlight {
    what: Option<(String, Instant)>,
}

/// Processes of an MPI job: ranks and local ranks from MPI and the launcher, collectives over MPI.
pub struct MpiWorld {
    comm: Mutex<Comm>,
    rank: usize,
    size: usize,
    local_rank: usize,
    in_flight: Arc<Mutex<InFlight>>,
    timeout: Duration,
    /// The send side of the f32 all-reduce, kept between calls so that its pages are faulted
    /// in once (the gradient all-reduce moves hundreds of megabytes at every step).
    send_f32: Mutex<Vec<f32>>,
}

/// Keeps MPI initialised; dropping it finalises MPI (the end of a successful run). On a failed
/// run call [`MpiGuard::abort`] instead, so that the other ranks are ended rather than left
/// waiting in a collective.
pub struct MpiGuard {
    universe: Option<Universe>,
    world: Arc<MpiWorld>,
}

impl MpiGuard {
    /// The world.
    pub fn world(&self) -> Arc<MpiWorld> {
        self.world.clone()
    }

    /// End every process of the job with `code` (`MPI_Abort`).
    pub fn abort(self, code: i32) -> ! {
        abort_job(code)
    }
}

impl Drop for MpiGuard {
    fn drop(&mut self) {
        let mut comm = self.world.comm.lock().unwrap_or_else(|e| e.into_inner());
        comm.0 = None;
        // Dropping the universe calls MPI_Finalize.
        self.universe.take();
    }
}

fn abort_job(code: i32) -> ! {
    // SAFETY: MPI_Abort takes the predefined world communicator and an error code; it is
    // callable from any thread at MPI_THREAD_MULTIPLE (requested at init) and, in practice, at
    // lower levels; it does not return when it works. Should it return, the process exits.
    unsafe {
        mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, code);
    }
    std::process::exit(code)
}

impl MpiWorld {
    /// Initialise MPI (once per process) and start the watchdog. The collective timeout is
    /// read from `BEIT_DIST_TIMEOUT_S` (see [`timeout_from_env`]).
    pub fn init() -> Result<MpiGuard> {
        let timeout = timeout_from_env()?;
        let (universe, threading) = mpi::initialize_with_threading(Threading::Multiple)
            .ok_or_else(|| TrainError::Config("MPI is already initialised".into()))?;
        if threading < Threading::Serialized {
            return Err(TrainError::Config(format!(
                "the MPI library offers thread level {threading:?}; data-parallel training needs \
                 at least Serialized"
            )));
        }
        let comm = universe.world();
        let rank = comm.rank() as usize;
        let size = comm.size() as usize;
        let local_rank = local_rank_from_env().unwrap_or(0);
        let in_flight = Arc::new(Mutex::new(InFlight::default()));
        spawn_watchdog(in_flight.clone(), timeout, rank)?;
        let world = Arc::new(MpiWorld {
            comm: Mutex::new(Comm(Some(comm))),
            rank,
            size,
            local_rank,
            in_flight,
            timeout,
            send_f32: Mutex::new(Vec::new()),
        });
        Ok(MpiGuard {
            universe: Some(universe),
            world,
        })
    }

    /// The collective timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Replace `buf` by rank 0's bytes (the NCCL unique id travels this way).
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub(super) fn broadcast_bytes(&self, what: &str, buf: &mut [u8]) -> Result<()> {
        self.with_comm(what, |c| {
            let root = c.process_at_rank(0);
            for chunk in buf.chunks_mut(CHUNK) {
                root.broadcast_into(chunk);
            }
        })
    }

    /// Run `f`, a blocking step of another transport (waiting for an NCCL collective), under
    /// the watchdog: past the timeout the job is ended as for an MPI collective.
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub(super) fn watched<T>(&self, what: &str, f: impl FnOnce() -> T) -> Result<T> {
        self.with_comm(what, |_| f())
    }

    /// Run `f` on the communicator, watched by the watchdog.
    fn with_comm<T>(&self, what: &str, f: impl FnOnce(&SimpleCommunicator) -> T) -> Result<T> {
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        let c = comm
            .0
            .as_ref()
            .ok_or_else(|| TrainError::Config(format!("{what}: MPI is already finalised")))?;
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .what = Some((what.to_string(), Instant::now()));
        let out = f(c);
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .what = None;
        Ok(out)
    }
}

/// A thread that aborts the job when a collective runs past `timeout`.
fn spawn_watchdog(in_flight: Arc<Mutex<InFlight>>, timeout: Duration, rank: usize) -> Result<()> {
    std::thread::Builder::new()
        .name("beit-dist-watchdog".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(250));
            let late = {
                let g = in_flight.lock().unwrap_or_else(|e| e.into_inner());
                g.what
                    .as_ref()
                    .filter(|(_, t)| t.elapsed() > timeout)
                    .map(|(w, _)| w.clone())
            };
            if let Some(what) = late {
                eprintln!(
                    "error: rank {rank}: the collective `{what}` did not finish within {:.0} s \
                     (another rank died, hangs or is far behind); ending the job. Raise {} if \
                     a step legitimately takes that long.",
                    timeout.as_secs_f64(),
                    super::TIMEOUT_ENV
                );
                abort_job(TIMEOUT_EXIT);
            }
        })
        .map_err(|e| TrainError::Config(format!("cannot start the watchdog thread: {e}")))?;
    Ok(())
}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }
    fn backend(&self) -> &'static str {
        "mpi"
    }
    fn all_reduce_sum_f32(&self, what: &str, buf: &mut [f32]) -> Result<()> {
        let mut send = self.send_f32.lock().unwrap_or_else(|e| e.into_inner());
        self.with_comm(what, |c| {
            for chunk in buf.chunks_mut(CHUNK) {
                send.clear();
                send.extend_from_slice(chunk);
                c.all_reduce_into(&send[..], chunk, SystemOperation::sum());
            }
        })
    }
    fn all_reduce_sum_f32_to(&self, what: &str, send: &[f32], recv: &mut [f32]) -> Result<()> {
        self.with_comm(what, |c| {
            for (s, r) in send.chunks(CHUNK).zip(recv.chunks_mut(CHUNK)) {
                c.all_reduce_into(s, r, SystemOperation::sum());
            }
        })
    }
    fn all_reduce_sum_f64(&self, what: &str, buf: &mut [f64]) -> Result<()> {
        self.with_comm(what, |c| {
            for chunk in buf.chunks_mut(CHUNK) {
                let send = chunk.to_vec();
                c.all_reduce_into(&send[..], chunk, SystemOperation::sum());
            }
        })
    }
    fn broadcast_f32(&self, what: &str, buf: &mut [f32]) -> Result<()> {
        self.with_comm(what, |c| {
            let root = c.process_at_rank(0);
            for chunk in buf.chunks_mut(CHUNK) {
                root.broadcast_into(chunk);
            }
        })
    }
    fn broadcast_f64(&self, what: &str, buf: &mut [f64]) -> Result<()> {
        self.with_comm(what, |c| {
            let root = c.process_at_rank(0);
            for chunk in buf.chunks_mut(CHUNK) {
                root.broadcast_into(chunk);
            }
        })
    }
    fn barrier(&self, what: &str) -> Result<()> {
        self.with_comm(what, |c| c.barrier())
    }
}
