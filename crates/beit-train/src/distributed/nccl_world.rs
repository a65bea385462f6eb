//! [`NcclWorld`] (feature `nccl`): the processes of an MPI job whose tensor all-reduce (the
//! gradients) runs on the GPUs through NCCL; everything else (ranks, host buffers, broadcasts,
//! barriers, the watchdog) is the [`MpiWorld`]'s.
//!
//! The communicator is made on the first all-reduce of a CUDA tensor, on that tensor's device
//! and on candle's own stream of it, so the collective is queued behind the backward pass that
//! produced the gradients and before the optimizer step that reads them, without extra
//! synchronisation. Rank 0 draws the NCCL unique id and broadcasts it over MPI. CPU tensors
//! (a `--device cpu` run of a `nccl` build) go through MPI on the host as in an `mpi` build.

use std::ffi::{c_char, CStr};
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex};

use candle::backend::BackendStorage;
use candle::cuda::cudarc::driver::CudaSlice;
use candle::cuda::cudarc::nccl::result::{get_nccl_version, NcclError};
use candle::cuda::cudarc::nccl::{sys, Comm, Id, NcclType, ReduceOp};
use candle::{CpuStorage, CudaDevice, CudaStorage, DType, DeviceLocation, InplaceOp1, Layout};
use candle::{Device, Tensor};

use super::{Collective, MpiWorld};
use crate::error::{Result, TrainError};

/// Size of NCCL's unique id (`ncclUniqueId`, 128 bytes).
const ID_BYTES: usize = 128;

/// This process's NCCL communicator and the CUDA device (ordinal) it was made on.
struct NcclComm {
    /// Never dropped: cudarc's `Drop` for `Comm` panics when `ncclCommAbort` fails, and the
    /// communicator is meant to live as long as the process (one per process; NCCL's resources
    /// go with it).
    comm: ManuallyDrop<Comm>,
    ordinal: usize,
}

// SAFETY: cudarc's `Comm` is `!Send` only because it holds NCCL's raw `ncclComm_t` handle (its
// `Arc<CudaStream>` is `Send + Sync`). NCCL allows a communicator to be used from any thread as
// long as no two calls on it run at the same time; an `NcclComm` is only reached through the
// `Mutex` of `NcclWorld`, which serialises every use, and `NcclWorld::all_reduce_on_cuda` makes
// the communicator's CUDA context current on the calling thread before using it.
unsafe impl Send for NcclComm {}

/// The world of an MPI job with NCCL for CUDA tensors; see the module documentation.
pub struct NcclWorld {
    mpi: Arc<MpiWorld>,
    comm: Mutex<Option<NcclComm>>,
}

impl NcclWorld {
    /// NCCL over the processes of `mpi` (created lazily, on the first CUDA all-reduce).
    pub fn new(mpi: Arc<MpiWorld>) -> Self {
        NcclWorld {
            mpi,
            comm: Mutex::new(None),
        }
    }

    /// The NCCL communicator of this process on `dev`: one collective over every rank (rank 0
    /// draws the unique id, MPI broadcasts it, every rank joins), watched by the watchdog.
    fn make_comm(&self, dev: &CudaDevice, ordinal: usize) -> Result<NcclComm> {
        let what = "NCCL communicator creation";
        let err = |message: String| TrainError::Collective {
            what: what.into(),
            message,
        };
        let stream = dev.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| err(format!("cannot make cuda:{ordinal} current: {e:?}")))?;
        // Byte 0 says whether rank 0 could draw an id, so that its failure stops every rank
        // instead of leaving them waiting for the communicator.
        let mut msg = [0u8; 1 + ID_BYTES];
        if self.rank() == 0 {
            match Id::new() {
                Ok(id) => {
                    msg[0] = 1;
                    for (b, c) in msg[1..].iter_mut().zip(id.internal()) {
                        *b = *c as u8;
                    }
                }
                Err(e) => tracing::error!("ncclGetUniqueId failed: {}", describe(&e)),
            }
        }
        self.mpi
            .broadcast_bytes("NCCL unique id broadcast", &mut msg)?;
        if msg[0] != 1 {
            return Err(err(
                "rank 0 could not create the NCCL unique id (ncclGetUniqueId failed; see rank \
                 0's log)"
                    .into(),
            ));
        }
        let mut internal: [c_char; ID_BYTES] = [0; ID_BYTES];
        for (c, b) in internal.iter_mut().zip(&msg[1..]) {
            *c = *b as c_char;
        }
        let (rank, size) = (self.rank(), self.size());
        let comm = self
            .mpi
            .watched(what, || {
                Comm::from_rank(stream, rank, size, Id::uninit(internal))
            })?
            .map_err(|e| {
                err(format!(
                    "ncclCommInitRank (rank {rank} of {size}, cuda:{ordinal}) failed: {}",
                    describe(&e)
                ))
            })?;
        let version = get_nccl_version().map_or_else(|_| "?".into(), |v| v.to_string());
        tracing::info!(
            "NCCL communicator: rank {rank} of {size} on cuda:{ordinal} (local rank {}, NCCL {version})",
            self.local_rank()
        );
        Ok(NcclComm {
            comm: ManuallyDrop::new(comm),
            ordinal,
        })
    }

    /// Sum the CUDA tensor `t` over the ranks with NCCL, in place on its device storage (a
    /// contiguous copy first when it is not contiguous), and wait for the result under the
    /// watchdog.
    fn all_reduce_on_cuda(&self, what: &str, t: &Tensor) -> Result<Tensor> {
        let err = |message: String| TrainError::Collective {
            what: what.into(),
            message,
        };
        let dev = t.device().as_cuda_device()?;
        let ordinal = match t.device().location() {
            DeviceLocation::Cuda { gpu_id } => gpu_id,
            other => return Err(err(format!("expected a CUDA tensor, got one on {other:?}"))),
        };
        let mut slot = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(self.make_comm(dev, ordinal)?);
        }
        let Some(c) = slot.as_ref() else {
            return Err(err("no NCCL communicator".into()));
        };
        if c.ordinal != ordinal {
            return Err(err(format!(
                "the NCCL communicator of this process is on cuda:{}; a tensor on cuda:{ordinal} \
                 cannot be reduced with it (one GPU per process)",
                c.ordinal
            )));
        }
        let stream = dev.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| err(format!("cannot make cuda:{ordinal} current: {e:?}")))?;
        let buf = if t.is_contiguous() {
            t.clone()
        } else {
            t.contiguous()?
        };
        buf.inplace_op1(&NcclSum { comm: &c.comm })
            .map_err(|e| err(e.to_string()))?;
        // The sum is queued on candle's stream; wait for it here, so that a rank that died or
        // hangs ends the job through the watchdog rather than blocking the next read forever.
        self.mpi
            .watched(what, || stream.synchronize())?
            .map_err(|e| {
                err(format!(
                    "waiting for the NCCL all-reduce on cuda:{ordinal}: {e:?}"
                ))
            })?;
        Ok(buf)
    }
}

/// NCCL's name and description of an error code.
fn describe(e: &NcclError) -> String {
    // SAFETY: `ncclGetErrorString` takes any `ncclResult_t` and returns a pointer to a static,
    // NUL-terminated string (never freed); it is checked for null before being read.
    let text = unsafe {
        let p = sys::ncclGetErrorString(e.0);
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    format!("{:?} ({text})", e.0)
}

/// The in-place NCCL sum of a tensor's storage, as a candle in-place op (which hands us the
/// storage mutably, under candle's own lock).
struct NcclSum<'a> {
    comm: &'a Comm,
}

impl NcclSum<'_> {
    fn sum<T: NcclType>(
        &self,
        slice: &mut CudaSlice<T>,
        start: usize,
        end: usize,
    ) -> candle::Result<()> {
        let len = slice.len();
        let Some(mut view) = slice.try_slice_mut(start..end) else {
            candle::bail!("the NCCL all-reduce: elements {start}..{end} of a buffer of {len}")
        };
        self.comm
            .all_reduce_in_place(&mut view, &ReduceOp::Sum)
            .map(|_| ())
            .map_err(|e| candle::Error::Msg(format!("ncclAllReduce failed: {}", describe(&e))))
    }
}

impl InplaceOp1 for NcclSum<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle::Result<()> {
        candle::bail!("the NCCL all-reduce takes CUDA tensors only")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle::Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle::bail!("the NCCL all-reduce needs a contiguous tensor")
        };
        match storage.dtype() {
            DType::F32 => self.sum(storage.as_cuda_slice_mut::<f32>()?, start, end),
            DType::F64 => self.sum(storage.as_cuda_slice_mut::<f64>()?, start, end),
            other => candle::bail!("the NCCL all-reduce sums f32 or f64 tensors, not {other:?}"),
        }
    }
}

impl Collective for NcclWorld {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }
    fn size(&self) -> usize {
        self.mpi.size()
    }
    fn local_rank(&self) -> usize {
        self.mpi.local_rank()
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn all_reduce_sum_f32(&self, what: &str, buf: &mut [f32]) -> Result<()> {
        self.mpi.all_reduce_sum_f32(what, buf)
    }
    fn all_reduce_sum_f32_to(&self, what: &str, send: &[f32], recv: &mut [f32]) -> Result<()> {
        self.mpi.all_reduce_sum_f32_to(what, send, recv)
    }
    fn all_reduce_sum_f64(&self, what: &str, buf: &mut [f64]) -> Result<()> {
        self.mpi.all_reduce_sum_f64(what, buf)
    }
    fn broadcast_f32(&self, what: &str, buf: &mut [f32]) -> Result<()> {
        self.mpi.broadcast_f32(what, buf)
    }
    fn broadcast_f64(&self, what: &str, buf: &mut [f64]) -> Result<()> {
        self.mpi.broadcast_f64(what, buf)
    }
    fn barrier(&self, what: &str) -> Result<()> {
        self.mpi.barrier(what)
    }

    /// CUDA tensors: NCCL, in place (`t`'s storage holds the sum afterwards). CPU tensors: MPI
    /// through the host. Every rank must hold the tensor on the same kind of device; one small
    /// MPI all-reduce per call checks it, so that a mixed job fails with an error on every rank
    /// instead of mismatching collectives.
    fn all_reduce_sum_tensor(&self, what: &str, t: &Tensor) -> Result<Tensor> {
        let mut on_cuda = [if t.device().is_cuda() { 1.0 } else { 0.0 }];
        self.mpi
            .all_reduce_sum_f64(&format!("{what} (device check)"), &mut on_cuda)?;
        let (cuda_ranks, n) = (on_cuda[0].round() as usize, self.size());
        if cuda_ranks == 0 {
            return self.mpi.all_reduce_sum_tensor(what, t);
        }
        if cuda_ranks != n {
            return Err(TrainError::Collective {
                what: what.into(),
                message: format!(
                    "{cuda_ranks} of {n} ranks hold the tensor on a CUDA device and the others \
                     do not (this rank: {}); every rank must use the same kind of --device",
                    describe_device(t.device())
                ),
            });
        }
        self.all_reduce_on_cuda(what, t)
    }
}

fn describe_device(d: &Device) -> String {
    match d.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}
