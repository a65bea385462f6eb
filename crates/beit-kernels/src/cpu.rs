//! Helpers shared by the CPU kernels: reading a contiguous f32 input, allocating outputs filled by
//! the rayon threads, splitting rows into tasks, and the 16-accumulator reductions.

use candle::{CpuStorage, Layout, Result};
use rayon::prelude::*;

/// Below this many elements an op runs on the calling thread: handing work to the pool and
/// waiting for it (a futex wake-up and a sleep, ~10-20 us) costs more than the pass itself.
pub(crate) const SEQUENTIAL_BELOW: usize = 1 << 15;

/// The f32 data of a contiguous input, or an error naming `op`.
pub(crate) fn f32_data<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v,
        _ => candle::bail!("{op}: expected an f32 input"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle::bail!("{op}: input must be contiguous"),
    }
}

/// `n` values written block by block by the rayon threads: `fill(start, block)` gets elements
/// `start..start + block.len()`. Blocks start at multiples of `block_len` and are `block_len`
/// long (the last one shorter), or there is one block of all `n` when `n` is small. A plain `vec![0.0; n]` followed by a fill would be a single-threaded memset on the
/// calling thread while the pool waits, then a second pass.
///
/// # Safety
/// `fill` must initialise every element of every block it is given: the returned vector claims
/// all `n` elements as initialised.
pub(crate) unsafe fn par_filled(
    n: usize,
    block_len: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let block_len = if n < SEQUENTIAL_BELOW {
        n.max(1)
    } else {
        block_len.max(1)
    };
    let mut v: Vec<f32> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(block_len)
        .enumerate()
        .for_each(|(i, block)| fill(i * block_len, block));
    // SAFETY: the capacity is at least n, and `fill` initialised every block (the caller's
    // contract), which together cover all n elements.
    unsafe { v.set_len(n) };
    v
}

/// `n` zeros, written by the rayon threads (see [`par_filled`]).
pub(crate) fn par_zeroed(n: usize) -> Vec<f32> {
    // SAFETY: the closure writes every element of every block.
    unsafe {
        par_filled(n, 1 << 15, |_, block| {
            block.iter_mut().for_each(|e| {
                e.write(0.0);
            })
        })
    }
}

/// A `(rows, row_len)` output computed row by row by the rayon threads, in tasks of
/// [`chunk_rows`] rows: `row(i, out)` writes row `i` into `out`. Each row is zeroed just before it
/// is handed out, while it is in cache, instead of in a separate zero-fill pass over the whole
/// buffer (one more trip through memory for a big activation).
pub(crate) fn par_rows(
    rows: usize,
    row_len: usize,
    row: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    if rows == 0 || row_len == 0 {
        return Vec::new();
    }
    let chunk = chunk_rows(rows, row_len) * row_len;
    let fill = |start: usize, block: &mut [std::mem::MaybeUninit<f32>]| {
        for (r, out) in block.chunks_mut(row_len).enumerate() {
            out.fill(std::mem::MaybeUninit::new(0.0));
            // SAFETY: every element of `out` was just initialised, and MaybeUninit<f32> has the
            // layout of f32.
            let out = unsafe { &mut *(out as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
            row(start / row_len + r, out);
        }
    };
    // SAFETY: blocks start at multiples of `chunk` (whole rows) and cover the `rows * row_len`
    // elements in whole rows; `fill` initialises every element of every row it is given.
    unsafe { par_filled(rows * row_len, chunk, fill) }
}

/// Element-wise sum of two per-task partial sums (the `reduce` step of the backward kernels).
pub(crate) fn add_partials(mut a: Vec<f32>, b: Vec<f32>) -> Vec<f32> {
    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
    a
}

/// Rows per parallel task for `rows` rows of `row_len` elements: a few tasks per thread so that
/// uneven threads still balance, or all rows in one task (run on the calling thread, see
/// [`SEQUENTIAL_BELOW`]) when the op is small.
pub(crate) fn chunk_rows(rows: usize, row_len: usize) -> usize {
    if rows.saturating_mul(row_len) < SEQUENTIAL_BELOW {
        return rows.max(1);
    }
    let tasks = 4 * rayon::current_num_threads().max(1);
    rows.div_ceil(tasks).max(1)
}

/// Sum with 16 independent accumulators (vectorisable; f32 addition is not associative, so a plain
/// `iter().sum()` stays scalar).
#[inline(always)]
pub(crate) fn sum16(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    acc.iter().sum::<f32>() + tail
}

/// Dot product with 16 independent accumulators.
#[inline(always)]
pub(crate) fn dot16(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// Mean and `1/sqrt(var + eps)` of one row (two passes, as the composition computes them).
#[inline(always)]
pub(crate) fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = sum16(x) / n;
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            let d = c[i] - mean;
            acc[i] += d * d;
        }
    }
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|v| (v - mean) * (v - mean))
        .sum();
    let var = (acc.iter().sum::<f32>() + tail) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filled_vectors_are_complete_at_every_size() {
        for n in [
            0,
            1,
            17,
            SEQUENTIAL_BELOW - 1,
            SEQUENTIAL_BELOW + 5,
            100_003,
        ] {
            // SAFETY: the closure writes every element of its block.
            let v = unsafe {
                par_filled(n, 1000, |start, block| {
                    for (i, e) in block.iter_mut().enumerate() {
                        e.write((start + i) as f32);
                    }
                })
            };
            assert_eq!(v.len(), n);
            assert!(v.iter().enumerate().all(|(i, &x)| x == i as f32));
            assert!(par_zeroed(n).iter().all(|&x| x == 0.0));
        }
    }

    #[test]
    fn every_row_gets_its_own_index_at_every_size() {
        // One task (below SEQUENTIAL_BELOW), many tasks with a short last one, and nothing.
        for (rows, row_len) in [(3, 5), (1001, 77), (4096, 8), (0, 9), (7, 0)] {
            let v = par_rows(rows, row_len, |i, out| {
                assert!(
                    out.iter().all(|&x| x == 0.0),
                    "row {i} is handed out zeroed"
                );
                for (j, e) in out.iter_mut().enumerate() {
                    *e = (i * row_len + j) as f32;
                }
            });
            assert_eq!(v.len(), rows * row_len);
            assert!(v.iter().enumerate().all(|(k, &x)| x == k as f32));
        }
    }

    #[test]
    fn small_ops_are_one_task() {
        assert_eq!(chunk_rows(10, 100), 10);
        assert!(chunk_rows(10_000, 100) < 10_000);
        assert_eq!(chunk_rows(0, 100), 1);
    }

    #[test]
    fn reductions_match_f64() {
        let x: Vec<f32> = (0..101).map(|i| (i as f32 * 0.37).sin()).collect();
        let y: Vec<f32> = (0..101).map(|i| (i as f32 * 0.11).cos()).collect();
        let s: f64 = x.iter().map(|&v| v as f64).sum();
        let d: f64 = x.iter().zip(&y).map(|(&a, &b)| a as f64 * b as f64).sum();
        assert!((sum16(&x) as f64 - s).abs() < 1e-5);
        assert!((dot16(&x, &y) as f64 - d).abs() < 1e-5);
        let mean = s / 101.0;
        let var: f64 = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 101.0;
        let (m, r) = row_stats(&x, 1e-6);
        assert!((m as f64 - mean).abs() < 1e-6);
        assert!((r as f64 - 1.0 / (var + 1e-6).sqrt()).abs() < 1e-5);
    }
}
