//! Thin, checked-at-the-call-site wrapper around the `gemm` crate (the GEMM inside candle's CPU
//! matmul), for kernels that need what `Tensor::matmul` cannot give: strided operands read in place
//! (one head's columns of a fused q/k/v matrix), accumulation into an initialised destination (a
//! bias folded into the GEMM), and single-threaded calls from inside a parallel loop.

use gemm::Parallelism;

/// A matrix operand: element `(i, j)` is at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

impl Mat {
    /// Row-major with row stride `rs`.
    pub fn rows(ptr: *const f32, rs: usize) -> Self {
        Self {
            ptr,
            rs: rs as isize,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix with row stride `rs`.
    pub fn transposed(ptr: *const f32, rs: usize) -> Self {
        Self {
            ptr,
            rs: 1,
            cs: rs as isize,
        }
    }
}

/// A raw pointer that parallel tasks may share because each writes a disjoint region.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub *mut f32);
// SAFETY: only used for writes to regions that no two tasks share (documented at each use).
unsafe impl Send for SharedMut {}
// SAFETY: as for Send; the wrapper itself is a plain copyable address.
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so that closures capture the wrapper rather than the raw field).
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

#[derive(Clone, Copy)]
pub(crate) struct Shared(pub *const f32);
// SAFETY: read-only access to data that outlives the parallel loop.
unsafe impl Send for Shared {}
// SAFETY: as for Send: only read through, while the data is alive.
unsafe impl Sync for Shared {}

impl Shared {
    /// The pointer (a method, so that closures capture the wrapper rather than the raw field).
    pub fn get(self) -> *const f32 {
        self.0
    }
}

/// Slabs are cut at multiples of this many rows or columns (a multiple of every micro-kernel's
/// tile), so that no slab ends in a partial tile that a single call would not have.
const SLAB_ALIGN: usize = 16;

/// `dst (m x n, row stride dst_rs) = lhs (m x k) * rhs (k x n)`, plus the previous content of
/// `dst` when `accumulate`. `threaded` splits the work over candle's thread count; inside an
/// already parallel loop pass `false`.
///
/// Below the `gemm` crate's threading threshold (multiply-adds) a call runs on the calling
/// thread, as `gemm` itself would. A threaded call hands the pool one task per thread, each a
/// single-threaded GEMM on its own slab of rows (or of columns, when `n > m`), instead of letting
/// `gemm` parallelise inside: that opens one parallel region for every block of `k` it works
/// through (a weight gradient, whose `k` is the batch's token count, opened about twenty per call
/// in the demo's pre-training, each a futex wake-up and sleep of the pool). One region per call
/// keeps the threads as busy for far fewer system calls.
///
/// # Safety
/// Every pointer must be valid for the extents implied by the shapes and strides, and `dst` must
/// not alias `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    threaded: bool,
) {
    let threads =
        if threaded && m.saturating_mul(n).saturating_mul(k) >= gemm::get_threading_threshold() {
            candle::utils::get_num_threads()
        } else {
            1
        };
    let split_rows = m >= n;
    let extent = if split_rows { m } else { n };
    let slabs = threads.min(extent / SLAB_ALIGN).max(1);
    if slabs == 1 {
        // SAFETY: the caller's contract.
        unsafe { sgemm_serial(m, n, k, dst, dst_rs, accumulate, lhs, rhs) };
        return;
    }
    let per = extent.div_ceil(slabs).next_multiple_of(SLAB_ALIGN);
    let (out, a, b) = (SharedMut(dst), Shared(lhs.ptr), Shared(rhs.ptr));
    let ((lrs, lcs), (rrs, rcs)) = ((lhs.rs, lhs.cs), (rhs.rs, rhs.cs));
    use rayon::prelude::*;
    (0..slabs).into_par_iter().for_each(|i| {
        let start = (i * per).min(extent);
        let len = per.min(extent - start);
        if len == 0 {
            return;
        }
        // SAFETY: slab `i` covers rows (or columns) `start..start + len` of `dst`, inside the
        // caller's extents and disjoint from every other slab's; it reads the matching rows of
        // `lhs` (or columns of `rhs`) and all of the other operand, which the caller guarantees
        // valid and not aliased with `dst`.
        unsafe {
            // Slab offsets: rows of lhs and dst, or columns of rhs and dst.
            let (lhs_at, rhs_at, dst_at, rows, cols) = if split_rows {
                (start as isize * lrs, 0, start * dst_rs, len, n)
            } else {
                (0, start as isize * rcs, start, m, len)
            };
            let lhs = Mat {
                ptr: a.get().offset(lhs_at),
                rs: lrs,
                cs: lcs,
            };
            let rhs = Mat {
                ptr: b.get().offset(rhs_at),
                rs: rrs,
                cs: rcs,
            };
            let dst = out.get().add(dst_at);
            sgemm_serial(rows, cols, k, dst, dst_rs, accumulate, lhs, rhs);
        }
    });
}

/// [`sgemm`] on the calling thread.
///
/// # Safety
/// As for [`sgemm`].
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_serial(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
) {
    // SAFETY: the caller guarantees valid, non-aliasing operands for these extents.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        )
    };
}

/// A vector of `n` f32 that `write` fills completely through the pointer it is given (typically
/// as a GEMM destination with `accumulate = false`), without zero-filling it first: for the big
/// activations a memset is a full extra pass over memory.
///
/// # Safety
/// `write` must write every one of the `n` elements.
pub(crate) unsafe fn filled_by(n: usize, write: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut v: Vec<std::mem::MaybeUninit<f32>> = Vec::with_capacity(n);
    // SAFETY: the capacity is n, and MaybeUninit elements need no initialisation.
    unsafe { v.set_len(n) };
    write(v.as_mut_ptr().cast::<f32>());
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: all n elements are initialised (the caller's contract) and MaybeUninit<f32> has the
    // layout of f32; the allocation is handed over unchanged.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), n, v.capacity()) }
}
