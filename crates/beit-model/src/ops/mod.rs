//! Fused CPU kernels with backward passes: LayerNorm, softmax with an additive bias, bias + GELU.
//!
//! candle builds LayerNorm, softmax and GELU's backward out of many element-wise ops; each one
//! allocates a fresh tensor and makes one more pass over memory (and the autograd engine adds a
//! zero-fill and an add per edge). On a CPU where the GEMMs already run near the roof, those passes
//! are what separates us from PyTorch, so these three get single-pass kernels, forward and backward.
//!
//! Each public function falls back to the plain differentiable composition when its inputs are not
//! f32 on the CPU (CUDA, Metal, bf16), so callers can use them unconditionally. The unit tests check
//! values and gradients against those compositions.

use candle::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;
use std::sync::OnceLock;

mod attention;
mod gemm;
mod linear;
mod stack;
mod vmath;

#[cfg(test)]
mod test_util {
    use candle::Tensor;

    /// Largest absolute difference between two tensors of one shape.
    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .expect("comparable tensors")
    }
}

pub use attention::{attention_core, attention_core_rows, QueryRows};
pub use linear::linear;
pub use stack::stack3_scaled_first;

/// Whether the fused kernels are in use: yes unless the environment sets `BEIT_FUSED_OPS=0`
/// (read once), which restores the plain compositions to measure what the kernels gain or to rule
/// them out when debugging.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    if let Some(on) = OVERRIDE.with(|o| o.get()) {
        return on;
    }
    *ON.get_or_init(|| std::env::var("BEIT_FUSED_OPS").map_or(true, |v| v.trim() != "0"))
}

thread_local! {
    static OVERRIDE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Run `f` with the kernels switched on or off on this thread (the model is built and run on the
/// calling thread), e.g. to compare a model's gradients with and without them.
pub fn with_fused_ops<R>(on: bool, f: impl FnOnce() -> R) -> R {
    let previous = OVERRIDE.with(|o| o.replace(Some(on)));
    let out = f();
    OVERRIDE.with(|o| o.set(previous));
    out
}

/// True when the kernels are enabled and every tensor is f32 on the CPU: the case they handle.
pub fn fused_cpu_f32(ts: &[&Tensor]) -> bool {
    enabled()
        && ts
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

fn f32_data<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v,
        _ => candle::bail!("{op}: expected an f32 input"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle::bail!("{op}: input must be contiguous"),
    }
}

/// `n` values written block by block by the rayon threads: `fill(start, block)` must initialise
/// every element of `block`, which holds elements `start..start + block.len()` (blocks of
/// `block_len`, the last one shorter). A plain `vec![0.0; n]` followed by a fill would be a
/// single-threaded memset on the calling thread while the pool waits, then a second pass.
pub(crate) fn par_filled(
    n: usize,
    block_len: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(block_len.max(1))
        .enumerate()
        .for_each(|(i, block)| fill(i * block_len, block));
    // SAFETY: `fill` initialised every block (its contract), so all n elements.
    unsafe { v.set_len(n) };
    v
}

/// `n` zeros, written by the rayon threads (see [`par_filled`]).
pub(crate) fn par_zeroed(n: usize) -> Vec<f32> {
    par_filled(n, 1 << 15, |_, block| {
        block.iter_mut().for_each(|e| {
            e.write(0.0);
        })
    })
}

/// Element-wise sum of two per-task partial sums (the `reduce` step of the backward kernels).
pub(crate) fn add_partials(mut a: Vec<f32>, b: Vec<f32>) -> Vec<f32> {
    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
    a
}

/// Rows per parallel task: a few tasks per thread so that uneven threads still balance.
fn chunk_rows(rows: usize) -> usize {
    let tasks = 4 * rayon::current_num_threads().max(1);
    rows.div_ceil(tasks).max(1)
}

/// Sum with 16 independent accumulators (vectorisable; f32 addition is not associative, so a plain
/// `iter().sum()` stays scalar).
#[inline]
fn sum16(x: &[f32]) -> f32 {
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
#[inline]
fn dot16(a: &[f32], b: &[f32]) -> f32 {
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
#[inline]
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
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

// ------------------------------------------------------------------------------------------------
// LayerNorm

struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "beit-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(s1, l1, self.name())?;
        let w = f32_data(s2, l2, self.name())?;
        let b = f32_data(s3, l3, self.name())?;
        let c = w.len();
        if c == 0 || b.len() != c || x.len() % c != 0 {
            candle::bail!("layer-norm: weight/bias of {c} do not fit {:?}", l1.shape());
        }
        let mut y = par_zeroed(x.len());
        let rows = chunk_rows(x.len() / c);
        y.par_chunks_mut(rows * c)
            .zip(x.par_chunks(rows * c))
            .for_each(|(yc, xc)| {
                for (yr, xr) in yc.chunks_exact_mut(c).zip(xc.chunks_exact(c)) {
                    let (mean, rstd) = row_stats(xr, self.eps);
                    for i in 0..c {
                        yr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = w.elem_count();
        let rows = x.elem_count() / c;
        let out = x.contiguous()?.apply_op3_no_bwd(
            &w.contiguous()?,
            &grad.contiguous()?,
            &LayerNormBwdOp { eps: self.eps },
        )?;
        let dx = out.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = out.get(rows)?.reshape(w.shape())?;
        let db = out.get(rows + 1)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Backward of [`LayerNormOp`] on `(x, w, grad)`: a `(rows + 2, C)` tensor holding `dx`, then the
/// weight and bias gradients as its last two rows (one pass over `x` and `grad` for all three).
struct LayerNormBwdOp {
    eps: f32,
}

impl CustomOp3 for LayerNormBwdOp {
    fn name(&self) -> &'static str {
        "beit-layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(s1, l1, self.name())?;
        let w = f32_data(s2, l2, self.name())?;
        let g = f32_data(s3, l3, self.name())?;
        let c = w.len();
        let rows = x.len() / c;
        let mut out = par_zeroed((rows + 2) * c);
        let (dx, dwdb) = out.split_at_mut(rows * c);
        let chunk = chunk_rows(rows);
        let inv_c = 1.0 / c as f32;
        let partial = dx
            .par_chunks_mut(chunk * c)
            .zip(x.par_chunks(chunk * c).zip(g.par_chunks(chunk * c)))
            .map(|(dxc, (xc, gc))| {
                let mut acc = vec![0f32; 2 * c];
                let mut xhat = vec![0f32; c];
                let mut gy = vec![0f32; c];
                for ((dxr, xr), gr) in dxc
                    .chunks_exact_mut(c)
                    .zip(xc.chunks_exact(c))
                    .zip(gc.chunks_exact(c))
                {
                    let (mean, rstd) = row_stats(xr, self.eps);
                    for i in 0..c {
                        xhat[i] = (xr[i] - mean) * rstd;
                        gy[i] = gr[i] * w[i];
                    }
                    let a = sum16(&gy) * inv_c;
                    let m = dot16(&gy, &xhat) * inv_c;
                    let (dw, db) = acc.split_at_mut(c);
                    for i in 0..c {
                        dxr[i] = rstd * (gy[i] - a - xhat[i] * m);
                        dw[i] += gr[i] * xhat[i];
                        db[i] += gr[i];
                    }
                }
                acc
            })
            .reduce(|| vec![0f32; 2 * c], add_partials);
        dwdb.copy_from_slice(&partial);
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, c))))
    }
}

/// LayerNorm over the last dimension with a single-pass backward (f32 on CPU), or the
/// differentiable composition elsewhere.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_cpu_f32(&[x, w, b]) {
        return x
            .contiguous()?
            .apply_op3(w, b, LayerNormOp { eps: eps as f32 });
    }
    layer_norm_composed(x, w, b, eps)
}

/// The differentiable LayerNorm composition (computed in f32), the reference of the fused kernel.
pub fn layer_norm_composed(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(w)?.broadcast_add(b)
}

// ------------------------------------------------------------------------------------------------
// Softmax (optionally of `scores + bias`)

/// Softmax of one row of `s (+ bias)`, written to `y`.
#[inline]
fn softmax_row(s: &[f32], bias: Option<&[f32]>, y: &mut [f32]) {
    match bias {
        Some(b) => {
            for i in 0..s.len() {
                y[i] = s[i] + b[i];
            }
        }
        None => y.copy_from_slice(s),
    }
    vmath::softmax_inplace(y);
}

fn softmax_fwd(s: &[f32], bias: Option<&[f32]>, dims: &[usize]) -> Result<Vec<f32>> {
    let n = *dims.last().unwrap_or(&0);
    if n == 0 {
        candle::bail!("softmax: empty last dimension");
    }
    let period = bias.map_or(0, |b| b.len());
    if period != 0 && (!period.is_multiple_of(n) || !s.len().is_multiple_of(period)) {
        candle::bail!("softmax: a bias of {period} values does not tile scores {dims:?}");
    }
    let mut y = par_zeroed(s.len());
    let rows = s.len() / n;
    let chunk = chunk_rows(rows);
    y.par_chunks_mut(chunk * n)
        .zip(s.par_chunks(chunk * n))
        .enumerate()
        .for_each(|(ci, (yc, sc))| {
            for (r, (yr, sr)) in yc.chunks_exact_mut(n).zip(sc.chunks_exact(n)).enumerate() {
                let b = bias.map(|b| {
                    let off = ((ci * chunk + r) * n) % period;
                    &b[off..off + n]
                });
                softmax_row(sr, b, yr);
            }
        });
    Ok(y)
}

struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "beit-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(s, l, self.name())?;
        let y = softmax_fwd(x, None, l.dims())?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(softmax_bwd(res, grad)?))
    }
}

/// `softmax(scores + bias)` where `bias` tiles the trailing dimensions of `scores`.
struct SoftmaxBiasOp;

impl CustomOp2 for SoftmaxBiasOp {
    fn name(&self) -> &'static str {
        "beit-softmax-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(s1, l1, self.name())?;
        let b = f32_data(s2, l2, self.name())?;
        let y = softmax_fwd(x, Some(b), l1.dims())?;
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        scores: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = softmax_bwd(res, grad)?;
        // The bias is repeated over the leading dimensions: its gradient sums over them.
        let reps = scores.elem_count() / bias.elem_count();
        let db = ds
            .reshape((reps, bias.elem_count()))?
            .sum(0)?
            .reshape(bias.shape())?;
        Ok((Some(ds), Some(db)))
    }
}

/// `dx = y * (g - sum(g * y))` per row, on `(y, g)`.
struct SoftmaxBwdOp;

impl CustomOp2 for SoftmaxBwdOp {
    fn name(&self) -> &'static str {
        "beit-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32_data(s1, l1, self.name())?;
        let g = f32_data(s2, l2, self.name())?;
        let n = *l1.dims().last().unwrap_or(&1);
        let mut dx = par_zeroed(y.len());
        let chunk = chunk_rows(y.len() / n.max(1)) * n;
        dx.par_chunks_mut(chunk)
            .zip(y.par_chunks(chunk).zip(g.par_chunks(chunk)))
            .for_each(|(dc, (yc, gc))| {
                for ((dr, yr), gr) in dc
                    .chunks_exact_mut(n)
                    .zip(yc.chunks_exact(n))
                    .zip(gc.chunks_exact(n))
                {
                    let dot = dot16(yr, gr);
                    for i in 0..n {
                        dr[i] = yr[i] * (gr[i] - dot);
                    }
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

fn softmax_bwd(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    y.contiguous()?
        .apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBwdOp)
}

/// Softmax over the last dimension with a single-pass backward (f32 on CPU), or candle's
/// differentiable composition elsewhere.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fused_cpu_f32(&[x]) {
        return x.contiguous()?.apply_op1(SoftmaxOp);
    }
    candle_nn::ops::softmax(x, D::Minus1)
}

/// `softmax(scores + bias)` over the last dimension, where `bias` has the trailing shape of
/// `scores` with leading dimensions of size 1 (e.g. scores `(B, H, T, T)`, bias `(1, H, T, T)`).
/// Gradients flow to both; the bias gradient sums over the repeated leading dimensions.
pub fn softmax_with_bias(scores: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (sd, bd) = (scores.dims(), bias.dims());
    let lead = sd.len().saturating_sub(bd.len());
    let tiles = bd.len() <= sd.len()
        && bd.iter().enumerate().all(|(i, &d)| {
            let s = sd[lead + i];
            d == s || (d == 1 && bd[..=i].iter().all(|&e| e == 1))
        });
    if !tiles {
        candle::bail!("softmax_with_bias: bias {bd:?} does not tile scores {sd:?}");
    }
    if fused_cpu_f32(&[scores, bias]) {
        return scores
            .contiguous()?
            .apply_op2(&bias.contiguous()?, SoftmaxBiasOp);
    }
    candle_nn::ops::softmax(&scores.broadcast_add(bias)?, D::Minus1)
}

// ------------------------------------------------------------------------------------------------
// bias + exact GELU

/// `gelu_erf(h + b)` with `b` broadcast over the rows of `h`.
struct BiasGeluOp;

impl CustomOp2 for BiasGeluOp {
    fn name(&self) -> &'static str {
        "beit-bias-gelu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = f32_data(s1, l1, self.name())?;
        let b = f32_data(s2, l2, self.name())?;
        let n = b.len();
        if n == 0 || h.len() % n != 0 {
            candle::bail!("bias-gelu: a bias of {n} does not fit {:?}", l1.shape());
        }
        let mut y = par_zeroed(h.len());
        let chunk = chunk_rows(h.len() / n) * n;
        y.par_chunks_mut(chunk)
            .zip(h.par_chunks(chunk))
            .for_each(|(yc, hc)| {
                vmath::bias_gelu_rows(hc, b, yc);
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        h: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = b.elem_count();
        let rows = h.elem_count() / n;
        let out = h.contiguous()?.apply_op3_no_bwd(
            &b.contiguous()?,
            &grad.contiguous()?,
            &BiasGeluBwdOp,
        )?;
        let dh = out.narrow(0, 0, rows)?.reshape(h.shape())?;
        let db = out.get(rows)?.reshape(b.shape())?;
        Ok((Some(dh), Some(db)))
    }
}

/// Backward of [`BiasGeluOp`] on `(h, b, grad)`: `(rows + 1, N)`, `dh` then the bias gradient.
struct BiasGeluBwdOp;

impl CustomOp3 for BiasGeluBwdOp {
    fn name(&self) -> &'static str {
        "beit-bias-gelu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = f32_data(s1, l1, self.name())?;
        let b = f32_data(s2, l2, self.name())?;
        let g = f32_data(s3, l3, self.name())?;
        let n = b.len();
        let rows = h.len() / n;
        let mut out = par_zeroed((rows + 1) * n);
        let (dh, db) = out.split_at_mut(rows * n);
        let chunk = chunk_rows(rows) * n;
        let partial = dh
            .par_chunks_mut(chunk)
            .zip(h.par_chunks(chunk).zip(g.par_chunks(chunk)))
            .map(|(dc, (hc, gc))| {
                let mut acc = vec![0f32; n];
                vmath::bias_gelu_grad_rows(hc, b, gc, dc, &mut acc);
                acc
            })
            .reduce(|| vec![0f32; n], add_partials);
        db.copy_from_slice(&partial);
        Ok((CpuStorage::F32(out), Shape::from((rows + 1, n))))
    }
}

/// `gelu_erf(h + b)`, `b` broadcast over the last dimension of `h`, with a single-pass backward
/// (f32 on CPU), or the composition elsewhere.
pub fn bias_gelu_erf(h: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fused_cpu_f32(&[h, b]) {
        return h.contiguous()?.apply_op2(&b.contiguous()?, BiasGeluOp);
    }
    h.broadcast_add(b)?.gelu_erf()
}

// ------------------------------------------------------------------------------------------------
// Residual add of a LayerScale'd, stochastic-depth-dropped branch

/// `x + keep[b] * (h * lambda)`: `lambda` `(C)` over the last dimension, `keep` one factor per
/// sample (DropPath's 0 or 1/keep_prob), or none.
struct ScaledResidualOp {
    keep: Option<Vec<f32>>,
}

impl ScaledResidualOp {
    fn factor(&self, row: usize, rows_per_sample: usize) -> f32 {
        self.keep.as_ref().map_or(1.0, |k| k[row / rows_per_sample])
    }
}

impl CustomOp3 for ScaledResidualOp {
    fn name(&self) -> &'static str {
        "beit-scaled-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(s1, l1, self.name())?;
        let h = f32_data(s2, l2, self.name())?;
        let lambda = f32_data(s3, l3, self.name())?;
        let c = lambda.len();
        if c == 0 || x.len() != h.len() || x.len() % c != 0 {
            candle::bail!(
                "scaled-residual: shapes {:?}, {:?}, ({c})",
                l1.shape(),
                l2.shape()
            );
        }
        let rows = x.len() / c;
        let per_sample = match &self.keep {
            Some(k) if k.is_empty() || rows % k.len() != 0 => {
                candle::bail!("scaled-residual: {} keep factors for {rows} rows", k.len())
            }
            Some(k) => rows / k.len(),
            None => rows,
        };
        let mut y = par_zeroed(x.len());
        let chunk = chunk_rows(rows);
        y.par_chunks_mut(chunk * c)
            .zip(x.par_chunks(chunk * c).zip(h.par_chunks(chunk * c)))
            .enumerate()
            .for_each(|(ci, (yc, (xc, hc)))| {
                for (r, ((yr, xr), hr)) in yc
                    .chunks_exact_mut(c)
                    .zip(xc.chunks_exact(c))
                    .zip(hc.chunks_exact(c))
                    .enumerate()
                {
                    match &self.keep {
                        // Same operation order as `x + (h * lambda) * keep`.
                        Some(_) => {
                            let k = self.factor(ci * chunk + r, per_sample);
                            for i in 0..c {
                                yr[i] = hr[i] * lambda[i] * k + xr[i];
                            }
                        }
                        None => {
                            for i in 0..c {
                                yr[i] = hr[i] * lambda[i] + xr[i];
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        h: &Tensor,
        lambda: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = lambda.elem_count();
        let rows = h.elem_count() / c;
        let out = h.contiguous()?.apply_op3_no_bwd(
            &grad.contiguous()?,
            &lambda.contiguous()?,
            &ScaledResidualBwdOp {
                keep: self.keep.clone(),
            },
        )?;
        let dh = out.narrow(0, 0, rows)?.reshape(h.shape())?;
        let dl = out.get(rows)?.reshape(lambda.shape())?;
        Ok((Some(grad.clone()), Some(dh), Some(dl)))
    }
}

/// Backward of [`ScaledResidualOp`] on `(h, grad, lambda)`: `(rows + 1, C)`, `dh` then `dlambda`.
struct ScaledResidualBwdOp {
    keep: Option<Vec<f32>>,
}

impl CustomOp3 for ScaledResidualBwdOp {
    fn name(&self) -> &'static str {
        "beit-scaled-residual-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = f32_data(s1, l1, self.name())?;
        let g = f32_data(s2, l2, self.name())?;
        let lambda = f32_data(s3, l3, self.name())?;
        let c = lambda.len();
        let rows = h.len() / c;
        let per_sample = self.keep.as_ref().map_or(rows, |k| rows / k.len());
        let mut out = par_zeroed((rows + 1) * c);
        let (dh, dl) = out.split_at_mut(rows * c);
        let chunk = chunk_rows(rows);
        let partial = dh
            .par_chunks_mut(chunk * c)
            .zip(h.par_chunks(chunk * c).zip(g.par_chunks(chunk * c)))
            .enumerate()
            .map(|(ci, (dc, (hc, gc)))| {
                let mut acc = vec![0f32; c];
                for (r, ((dr, hr), gr)) in dc
                    .chunks_exact_mut(c)
                    .zip(hc.chunks_exact(c))
                    .zip(gc.chunks_exact(c))
                    .enumerate()
                {
                    let k = self
                        .keep
                        .as_ref()
                        .map_or(1.0, |k| k[(ci * chunk + r) / per_sample]);
                    for i in 0..c {
                        let gk = gr[i] * k;
                        dr[i] = gk * lambda[i];
                        acc[i] += gk * hr[i];
                    }
                }
                acc
            })
            .reduce(|| vec![0f32; c], add_partials);
        dl.copy_from_slice(&partial);
        Ok((CpuStorage::F32(out), Shape::from((rows + 1, c))))
    }
}

/// `x + keep[b] * (h * lambda)` for `x`, `h` `(B, ..., C)`, `lambda` `(C)` and optional per-sample
/// factors `keep` (length B), in one pass forward and backward (f32 on CPU), or the composition.
pub fn scaled_residual(
    x: &Tensor,
    h: &Tensor,
    lambda: &Tensor,
    keep: Option<Vec<f32>>,
) -> Result<Tensor> {
    if x.dims() != h.dims() {
        candle::bail!(
            "scaled_residual: x {:?} and h {:?} differ",
            x.dims(),
            h.dims()
        );
    }
    if let Some(k) = &keep {
        if k.len() != x.dim(0)? {
            candle::bail!(
                "scaled_residual: {} keep factors for a batch of {}",
                k.len(),
                x.dim(0)?
            );
        }
    }
    if fused_cpu_f32(&[x, h, lambda]) {
        return x
            .contiguous()?
            .apply_op3(&h.contiguous()?, lambda, ScaledResidualOp { keep });
    }
    let branch = h.broadcast_mul(lambda)?;
    let branch = match keep {
        Some(k) => {
            let mut shape = vec![1; x.rank()];
            shape[0] = k.len();
            let k = Tensor::from_vec(k, shape, x.device())?.to_dtype(x.dtype())?;
            branch.broadcast_mul(&k)?
        }
        None => branch,
    };
    branch + x
}

// ------------------------------------------------------------------------------------------------
// Head split / merge (the layout changes around attention, with the q/v bias add folded in)

/// Geometry of a head split: `rows = batch * tokens` rows of `parts * heads * head_dim` columns,
/// of which `part` is taken.
#[derive(Debug, Clone, Copy)]
struct Heads {
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    parts: usize,
    part: usize,
}

impl Heads {
    fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// `(B*T, parts*C)` columns `part` (+ bias) into `(B, H, T, D)`.
    fn split(&self, x: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let (t, h, d, c) = (self.tokens, self.heads, self.head_dim, self.width());
        let row = self.parts * c;
        let off = self.part * c;
        let mut y = vec![0f32; self.batch * h * t * d];
        y.par_chunks_mut(t * d).enumerate().for_each(|(bh, yc)| {
            let (bi, hi) = (bh / h, bh % h);
            for ti in 0..t {
                let src = &x[(bi * t + ti) * row + off + hi * d..][..d];
                let dst = &mut yc[ti * d..(ti + 1) * d];
                match bias {
                    Some(b) => {
                        let b = &b[hi * d..(hi + 1) * d];
                        for i in 0..d {
                            dst[i] = src[i] + b[i];
                        }
                    }
                    None => dst.copy_from_slice(src),
                }
            }
        });
        y
    }

    /// `(B, H, T, D)` into `(B*T, C)` (the inverse of `split` for `parts == 1`).
    fn merge(&self, y: &[f32]) -> Vec<f32> {
        let (t, h, d, c) = (self.tokens, self.heads, self.head_dim, self.width());
        let mut x = vec![0f32; self.batch * t * c];
        x.par_chunks_mut(t * c).enumerate().for_each(|(bi, xc)| {
            for hi in 0..h {
                let src = &y[(bi * h + hi) * t * d..][..t * d];
                for ti in 0..t {
                    xc[ti * c + hi * d..ti * c + (hi + 1) * d]
                        .copy_from_slice(&src[ti * d..(ti + 1) * d]);
                }
            }
        });
        x
    }

    fn split_shape(&self) -> Shape {
        Shape::from((self.batch, self.heads, self.tokens, self.head_dim))
    }

    fn merged_shape(&self) -> Shape {
        Shape::from((self.batch * self.tokens, self.width()))
    }

    fn check_split_input(&self, l: &Layout) -> Result<()> {
        let want = (self.batch * self.tokens, self.parts * self.width());
        if l.dims() != [want.0, want.1] {
            candle::bail!("split_heads: input {:?}, expected {want:?}", l.dims());
        }
        Ok(())
    }
}

struct SplitHeadsOp(Heads);

impl CustomOp1 for SplitHeadsOp {
    fn name(&self) -> &'static str {
        "beit-split-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.0.check_split_input(l)?;
        let x = f32_data(s, l, self.name())?;
        Ok((CpuStorage::F32(self.0.split(x, None)), self.0.split_shape()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(merge_heads_no_bwd(grad, self.0)?))
    }
}

struct SplitHeadsBiasOp(Heads);

impl CustomOp2 for SplitHeadsBiasOp {
    fn name(&self) -> &'static str {
        "beit-split-heads-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.0.check_split_input(l1)?;
        let x = f32_data(s1, l1, self.name())?;
        let b = f32_data(s2, l2, self.name())?;
        if b.len() != self.0.width() {
            candle::bail!(
                "split_heads: bias of {}, expected {}",
                b.len(),
                self.0.width()
            );
        }
        Ok((
            CpuStorage::F32(self.0.split(x, Some(b))),
            self.0.split_shape(),
        ))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = merge_heads_no_bwd(grad, self.0)?;
        let db = dx.sum(0)?.reshape(bias.shape())?;
        Ok((Some(dx), Some(db)))
    }
}

struct MergeHeadsOp(Heads);

impl CustomOp1 for MergeHeadsOp {
    fn name(&self) -> &'static str {
        "beit-merge-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        if l.shape() != &self.0.split_shape() {
            candle::bail!(
                "merge_heads: input {:?}, expected {:?}",
                l.dims(),
                self.0.split_shape()
            );
        }
        let y = f32_data(s, l, self.name())?;
        Ok((CpuStorage::F32(self.0.merge(y)), self.0.merged_shape()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        Ok(Some(g.apply_op1_no_bwd(&SplitHeadsOp(self.0))?))
    }
}

fn merge_heads_no_bwd(grad: &Tensor, heads: Heads) -> Result<Tensor> {
    grad.contiguous()?.apply_op1_no_bwd(&MergeHeadsOp(heads))
}

/// Columns `[part*C, (part+1)*C)` of `x` `(B*T, parts*C)` (+ `bias` `(C)`) as heads
/// `(B, H, T, C/H)`, contiguous, in one pass (f32 on CPU; else reshape/transpose/copy).
/// Gradients flow to `x` and `bias` only when `parts == 1` (training projects q, k, v separately).
#[allow(clippy::too_many_arguments)]
pub fn split_heads(
    x: &Tensor,
    bias: Option<&Tensor>,
    batch: usize,
    tokens: usize,
    heads: usize,
    parts: usize,
    part: usize,
) -> Result<Tensor> {
    let (rows, cols) = x.dims2()?;
    if heads == 0 || parts == 0 || part >= parts || cols % (parts * heads) != 0 {
        candle::bail!("split_heads: {cols} columns, {parts} parts of {heads} heads");
    }
    if rows != batch * tokens {
        candle::bail!("split_heads: {rows} rows for {batch} x {tokens} tokens");
    }
    let width = cols / parts;
    let geo = Heads {
        batch,
        tokens,
        heads,
        head_dim: width / heads,
        parts,
        part,
    };
    let mut all: Vec<&Tensor> = vec![x];
    all.extend(bias);
    if fused_cpu_f32(&all) {
        let x = x.contiguous()?;
        return match (bias, parts) {
            (Some(b), 1) => x.apply_op2(&b.contiguous()?, SplitHeadsBiasOp(geo)),
            (None, 1) => x.apply_op1(SplitHeadsOp(geo)),
            (Some(b), _) => x.apply_op2_no_bwd(&b.contiguous()?, &SplitHeadsBiasOp(geo)),
            (None, _) => x.apply_op1_no_bwd(&SplitHeadsOp(geo)),
        };
    }
    let mut cols = x.narrow(1, part * width, width)?;
    if let Some(b) = bias {
        cols = cols.broadcast_add(b)?;
    }
    cols.reshape((batch, tokens, heads, width / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// Heads `(B, H, T, D)` back to `(B*T, H*D)` in one pass (f32 on CPU; else transpose/copy).
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (batch, heads, tokens, head_dim) = x.dims4()?;
    if fused_cpu_f32(&[x]) {
        let geo = Heads {
            batch,
            tokens,
            heads,
            head_dim,
            parts: 1,
            part: 0,
        };
        return x.contiguous()?.apply_op1(MergeHeadsOp(geo));
    }
    x.transpose(1, 2)?
        .reshape((batch * tokens, heads * head_dim))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::max_diff;
    use candle::{Device, Var};

    /// Values and all gradients of `fused` and `reference`, for a random cotangent.
    fn compare(
        vars: &[&Var],
        fused: impl Fn(&[&Tensor]) -> Result<Tensor>,
        reference: impl Fn(&[&Tensor]) -> Result<Tensor>,
        tol: f32,
    ) -> Result<()> {
        let ts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let yf = fused(&ts)?;
        let yr = reference(&ts)?;
        assert_eq!(yf.dims(), yr.dims());
        let d = max_diff(&yf, &yr);
        assert!(d < tol, "values differ by {d}");
        let cot = Tensor::randn(0f32, 1., yf.shape(), &Device::Cpu)?;
        let gf = (yf * &cot)?.sum_all()?.backward()?;
        let gr = (yr * &cot)?.sum_all()?.backward()?;
        for (i, v) in vars.iter().enumerate() {
            let a = gf.get(v.as_tensor()).expect("fused gradient");
            let b = gr.get(v.as_tensor()).expect("reference gradient");
            assert_eq!(a.dims(), v.dims());
            let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
            let d = max_diff(a, b) / scale;
            assert!(d < tol, "gradient of input {i} differs by {d} (relative)");
        }
        Ok(())
    }

    fn var(shape: &[usize], mean: f32, std: f32) -> Var {
        Var::from_tensor(&Tensor::randn(mean, std, shape, &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn layer_norm_matches_composition_values_and_gradients() -> Result<()> {
        // 37 columns: exercises the 16-lane loops and their remainders; 45 rows: uneven chunks.
        let x = var(&[3, 15, 37], 0.5, 2.0);
        let w = var(&[37], 1.0, 0.3);
        let b = var(&[37], 0.0, 0.3);
        compare(
            &[&x, &w, &b],
            |t| layer_norm(t[0], t[1], t[2], 1e-6),
            |t| layer_norm_composed(t[0], t[1], t[2], 1e-6),
            1e-4,
        )
    }

    #[test]
    fn layer_norm_gradient_matches_finite_differences() -> Result<()> {
        // Independent of the composition: central differences in f64 arithmetic on the f32 op.
        let x = var(&[2, 6], 0.0, 1.0);
        let w = var(&[6], 1.0, 0.5);
        let b = var(&[6], 0.0, 0.5);
        let cot = Tensor::randn(0f32, 1., (2, 6), &Device::Cpu)?;
        let f = |xv: &Tensor| -> f64 {
            let y = layer_norm(xv, w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
            (y * &cot)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let grads = (layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)? * &cot)?
            .sum_all()?
            .backward()?;
        let gx = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()?
            .to_vec1::<f32>()?;
        let x0 = x.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let h = 1e-2f32;
        for i in 0..x0.len() {
            let mut xp = x0.clone();
            xp[i] += h;
            let mut xm = x0.clone();
            xm[i] -= h;
            let fp = f(&Tensor::from_vec(xp, (2, 6), &Device::Cpu)?);
            let fm = f(&Tensor::from_vec(xm, (2, 6), &Device::Cpu)?);
            let fd = (fp - fm) / (2.0 * h as f64);
            assert!(
                (fd - gx[i] as f64).abs() < 2e-2,
                "d/dx[{i}]: finite difference {fd}, backward {}",
                gx[i]
            );
        }
        Ok(())
    }

    #[test]
    fn softmax_matches_composition_values_and_gradients() -> Result<()> {
        let s = var(&[2, 3, 5, 19], 0.0, 3.0);
        compare(
            &[&s],
            |t| softmax_last_dim(t[0]),
            |t| candle_nn::ops::softmax(t[0], D::Minus1),
            1e-5,
        )
    }

    #[test]
    fn softmax_with_bias_matches_composition_values_and_gradients() -> Result<()> {
        let s = var(&[4, 3, 7, 7], 0.0, 2.0);
        let b = var(&[1, 3, 7, 7], 0.0, 1.0);
        compare(
            &[&s, &b],
            |t| softmax_with_bias(t[0], t[1]),
            |t| candle_nn::ops::softmax(&t[0].broadcast_add(t[1])?, D::Minus1),
            1e-5,
        )?;
        // A bias without the leading unit dimension tiles the same way.
        let b3 = var(&[3, 7, 7], 0.0, 1.0);
        compare(
            &[&s, &b3],
            |t| softmax_with_bias(t[0], t[1]),
            |t| candle_nn::ops::softmax(&t[0].broadcast_add(t[1])?, D::Minus1),
            1e-5,
        )?;
        let bad = Tensor::zeros((2, 7, 7), DType::F32, &Device::Cpu)?;
        assert!(softmax_with_bias(s.as_tensor(), &bad).is_err());
        Ok(())
    }

    #[test]
    fn bias_gelu_matches_composition_values_and_gradients() -> Result<()> {
        let h = var(&[5, 9, 33], 0.0, 2.0);
        let b = var(&[33], 0.0, 1.0);
        compare(
            &[&h, &b],
            |t| bias_gelu_erf(t[0], t[1]),
            |t| t[0].broadcast_add(t[1])?.gelu_erf(),
            1e-5,
        )
    }

    #[test]
    fn scaled_residual_matches_composition_values_and_gradients() -> Result<()> {
        let x = var(&[3, 5, 21], 0.0, 1.0);
        let h = var(&[3, 5, 21], 0.0, 1.0);
        let l = var(&[21], 0.1, 0.05);
        for keep in [None, Some(vec![2.0, 0.0, 2.0])] {
            let k2 = keep.clone();
            compare(
                &[&x, &h, &l],
                move |t| scaled_residual(t[0], t[1], t[2], keep.clone()),
                move |t| {
                    let branch = t[1].broadcast_mul(t[2])?;
                    let branch = match &k2 {
                        Some(k) => branch.broadcast_mul(&Tensor::from_vec(
                            k.clone(),
                            (3, 1, 1),
                            &Device::Cpu,
                        )?)?,
                        None => branch,
                    };
                    branch + t[0]
                },
                1e-5,
            )?;
        }
        assert!(
            scaled_residual(x.as_tensor(), h.as_tensor(), l.as_tensor(), Some(vec![1.0])).is_err()
        );
        Ok(())
    }

    #[test]
    fn head_split_and_merge_match_reshapes_values_and_gradients() -> Result<()> {
        let (b, t, h, d) = (2, 5, 3, 4);
        let x = var(&[b * t, h * d], 0.0, 1.0);
        let bias = var(&[h * d], 0.0, 1.0);
        let reference = |x: &Tensor, bias: Option<&Tensor>| -> Result<Tensor> {
            let x = match bias {
                Some(bb) => x.broadcast_add(bb)?,
                None => x.clone(),
            };
            x.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()
        };
        compare(
            &[&x, &bias],
            |ts| split_heads(ts[0], Some(ts[1]), b, t, h, 1, 0),
            |ts| reference(ts[0], Some(ts[1])),
            1e-6,
        )?;
        compare(
            &[&x],
            |ts| split_heads(ts[0], None, b, t, h, 1, 0),
            |ts| reference(ts[0], None),
            1e-6,
        )?;
        let y = var(&[b, h, t, d], 0.0, 1.0);
        compare(
            &[&y],
            |ts| merge_heads(ts[0]),
            |ts| ts[0].transpose(1, 2)?.reshape((b * t, h * d)),
            1e-6,
        )?;
        // One part of a fused (q, k, v) projection.
        let qkv = Tensor::randn(0f32, 1., (b * t, 3 * h * d), &Device::Cpu)?;
        let got = split_heads(&qkv, Some(bias.as_tensor()), b, t, h, 3, 2)?;
        let want = reference(&qkv.narrow(1, 2 * h * d, h * d)?, Some(bias.as_tensor()))?;
        assert!(max_diff(&got, &want) < 1e-6);
        assert!(split_heads(&qkv, None, b, t, h, 3, 3).is_err());
        assert!(split_heads(&qkv, None, b + 1, t, h, 3, 0).is_err());
        Ok(())
    }

    /// Loss and every parameter gradient of one MIM training step of a tiny model.
    fn mim_step(cfg: &crate::BeitConfig, fused: bool) -> Result<(f32, Vec<(String, Tensor)>)> {
        use candle_nn::{VarBuilder, VarMap};
        with_fused_ops(fused, || {
            let dev = Device::Cpu;
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
            let model = crate::BeitForMaskedImageModeling::new(cfg, vb)?;
            // Deterministic, non-trivial parameters (same for both runs).
            let mut names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
            names.sort();
            for (i, name) in names.iter().enumerate() {
                let var = varmap.data().lock().unwrap()[name].clone();
                let n = var.elem_count();
                let vals: Vec<f32> = (0..n)
                    .map(|j| (((i * 7919 + j * 104_729) % 1000) as f32 / 1000.0 - 0.5) * 0.4)
                    .collect();
                // (candle's CPU init cannot be seeded, so every value is overwritten.)
                var.set(&Tensor::from_vec(vals, var.shape(), &dev)?)?;
            }
            model.backbone().rng().reseed(3);
            let pixels = Tensor::arange(0f32, (3 * 3 * 256) as f32, &dev)?
                .affine(1. / 1000., -1.0)?
                .sin()?
                .reshape((3, 3, 16, 16))?;
            let mask: Vec<u8> = (0..3 * 16).map(|i| (i % 3 == 0) as u8).collect();
            let mask = Tensor::from_vec(mask, (3, 16), &dev)?;
            let logits = model
                .forward_masked(&pixels, &mask, crate::ForwardOptions::train())?
                .logits;
            let m = logits.dim(0)?;
            let labels: Vec<u32> = (0..m as u32).map(|i| i % 12).collect();
            let labels = Tensor::from_vec(labels, m, &dev)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
            let grads = loss.backward()?;
            let mut out = Vec::new();
            for name in names {
                let var = varmap.data().lock().unwrap()[&name].clone();
                let g = grads
                    .get(var.as_tensor())
                    .expect("every parameter has a gradient");
                out.push((name, g.clone()));
            }
            Ok((loss.to_scalar::<f32>()?, out))
        })
    }

    #[test]
    fn model_gradients_with_and_without_fused_kernels_agree() -> Result<()> {
        for shared in [true, false] {
            let cfg = crate::BeitConfig {
                hidden_size: 16,
                num_hidden_layers: 2,
                num_attention_heads: 2,
                intermediate_size: 32,
                image_size: 16,
                patch_size: 4,
                vocab_size: 12,
                drop_path_rate: 0.5,
                use_mask_token: true,
                use_shared_relative_position_bias: shared,
                use_relative_position_bias: !shared,
                ..crate::BeitConfig::default()
            };
            let (lf, gf) = mim_step(&cfg, true)?;
            let (lc, gc) = mim_step(&cfg, false)?;
            assert!((lf - lc).abs() < 1e-5, "loss {lf} vs {lc}");
            assert_eq!(gf.len(), gc.len());
            for ((name, a), (_, b)) in gf.iter().zip(&gc) {
                let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-3);
                let d = max_diff(a, b) / scale;
                assert!(
                    d < 1e-4,
                    "{name}: fused and composed gradients differ by {d}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn non_f32_inputs_fall_back_to_the_composition() -> Result<()> {
        let x = Tensor::randn(0f32, 1., (4, 8), &Device::Cpu)?.to_dtype(DType::F64)?;
        let w = Tensor::ones(8, DType::F64, &Device::Cpu)?;
        let b = Tensor::zeros(8, DType::F64, &Device::Cpu)?;
        assert!(!fused_cpu_f32(&[&x, &w, &b]));
        let y = layer_norm(&x, &w, &b, 1e-6)?;
        assert_eq!(y.dtype(), DType::F64);
        let s = softmax_last_dim(&x)?.sum(1)?.to_vec1::<f64>()?;
        assert!(s.iter().all(|v| (v - 1.0).abs() < 1e-9));
        Ok(())
    }
}
