//! The attention core `softmax(q k^T + bias) v` for all heads at once, reading q, k and v in place
//! from the fused `(B*T, 3C)` projection and writing the heads already merged as `(B*T, C)`.
//!
//! The composition splits q/k/v into `(B, H, T, D)` copies, runs two batched matmuls (candle runs
//! the 96 small `197x64` GEMMs of a ViT-B batch one after the other, each split over the threads:
//! about 110 GFLOP/s where one GEMM per thread reaches 300), materialises the `(B, H, T, T)`
//! probabilities and copies the heads back. Here each `(batch, head)` pair is one task: a
//! single-threaded GEMM for the scores into a scratch buffer that stays in cache, bias and softmax
//! in place, a GEMM into the output columns of that head.
//!
//! When a gradient will be needed, the forward pass keeps the probabilities (`B*H*T*T`, 15 MB per
//! ViT-B layer at batch 8, as PyTorch's eager attention keeps them) inside the op, and the
//! backward pass reads them; otherwise (inference) nothing is kept, and a backward pass would
//! recompute them. The backward pass runs one task per head so that the bias gradient of a head
//! is accumulated over the batch by one thread.
//!
//! [`attention_core_rows`] computes the output of selected query rows only (keys and values still
//! come from every token): in the last block of the MIM model only the masked patches reach the
//! loss, so the other ~60% of the rows need neither attention nor MLP there.

use std::sync::{Arc, Mutex};

use candle::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{dot16, f32_data, par_zeroed};
use crate::dispatch::fused_cpu_f32;
use crate::gemm::{filled_by, sgemm, Mat, Shared, SharedMut};
use crate::softmax::{softmax_last_dim, softmax_with_bias};
use crate::vmath;

/// `(B*T, 3C)` fused projections (q already scaled by `head_dim^-0.5`, biases added) and an
/// optional additive bias `(H, T, T)` (any shape with `H*T*T` elements) to the attention output
/// `(B, T, C)`, heads merged. Single-pass kernels on f32 CPU tensors, the composition elsewhere.
pub fn attention_core(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    batch: usize,
    heads: usize,
) -> Result<Tensor> {
    run(qkv, bias, batch, heads, None)
}

/// As [`attention_core`], for the query rows in `queries` only: `(M, C)`, the rows in the order of
/// `queries` (image by image).
pub fn attention_core_rows(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    batch: usize,
    heads: usize,
    queries: &QueryRows,
) -> Result<Tensor> {
    run(qkv, bias, batch, heads, Some(queries))
}

/// A subset of the token rows of each image in a batch: the queries whose output is wanted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryRows {
    /// `offsets[b]..offsets[b + 1]` index the rows of image `b` in `rows`.
    offsets: Vec<usize>,
    /// Token indices within their image, increasing per image.
    rows: Vec<u32>,
}

impl QueryRows {
    /// From the token indices of each image (each list strictly increasing).
    pub fn new(per_image: &[Vec<u32>]) -> Result<Self> {
        let mut offsets = vec![0];
        let mut rows = Vec::new();
        for (b, r) in per_image.iter().enumerate() {
            if r.windows(2).any(|w| w[0] >= w[1]) {
                candle::bail!("query rows of image {b} are not strictly increasing");
            }
            rows.extend_from_slice(r);
            offsets.push(rows.len());
        }
        Ok(Self { offsets, rows })
    }

    /// Number of images.
    pub fn batch(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Total number of rows `M`.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no row is selected.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Token indices of image `b`.
    pub fn of(&self, b: usize) -> &[u32] {
        &self.rows[self.offsets[b]..self.offsets[b + 1]]
    }

    /// Row indices into the flattened `(B*T)` token axis.
    pub fn flat_indices(&self, tokens: usize) -> Vec<u32> {
        (0..self.batch())
            .flat_map(|b| self.of(b).iter().map(move |&i| (b * tokens) as u32 + i))
            .collect()
    }
}

fn run(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    batch: usize,
    heads: usize,
    queries: Option<&QueryRows>,
) -> Result<Tensor> {
    let c3 = *qkv.dims().last().unwrap_or(&0);
    let rows = qkv.elem_count() / c3.max(1);
    if c3 == 0 || !c3.is_multiple_of(3 * heads) || batch == 0 || !rows.is_multiple_of(batch) {
        candle::bail!(
            "attention: {:?} is not (batch {batch} * tokens, 3 * {heads} heads * head_dim)",
            qkv.shape()
        );
    }
    let geom = Geometry {
        batch,
        tokens: rows / batch,
        heads,
        head_dim: c3 / (3 * heads),
    };
    if let Some(b) = bias {
        if b.elem_count() != heads * geom.tokens * geom.tokens {
            candle::bail!(
                "attention: bias {:?} is not ({heads}, {t}, {t})",
                b.shape(),
                t = geom.tokens
            );
        }
    }
    if let Some(q) = queries {
        if q.batch() != batch || q.rows.iter().any(|&i| i as usize >= geom.tokens) {
            candle::bail!(
                "attention: query rows for {} images do not fit a batch of {batch} x {} tokens",
                q.batch(),
                geom.tokens
            );
        }
    }
    let ts: Vec<&Tensor> = [Some(qkv), bias].into_iter().flatten().collect();
    if !fused_cpu_f32(&ts) {
        let out = composed(qkv, bias, geom)?;
        return match queries {
            None => Ok(out),
            Some(q) => {
                let idx = q.flat_indices(geom.tokens);
                let idx = Tensor::from_vec(idx, q.len(), &candle::Device::Cpu)?
                    .to_device(qkv.device())?;
                out.reshape((batch * geom.tokens, geom.width()))?
                    .index_select(&idx, 0)
            }
        };
    }
    let qkv = qkv.contiguous()?;
    let tracked = qkv.track_op() || bias.is_some_and(|b| b.track_op());
    let op = AttentionOp {
        g: geom,
        queries: queries.map(|q| Arc::new(q.clone())),
        probs: tracked.then(|| Arc::new(Mutex::new(None))),
    };
    // The ops produce (B, T, C) or (M, C) directly: a reshape node would cost a zero-fill and an
    // add of its gradient in candle's backward pass.
    match bias {
        Some(b) => qkv.apply_op2(&b.contiguous()?, op),
        None => qkv.apply_op1(op),
    }
}

/// The same computation from candle tensor ops (any device and dtype).
fn composed(qkv: &Tensor, bias: Option<&Tensor>, g: Geometry) -> Result<Tensor> {
    let (b, t, h, d) = (g.batch, g.tokens, g.heads, g.head_dim);
    let qkv = qkv.reshape((b, t, 3, h, d))?.permute((2, 0, 3, 1, 4))?;
    let q = qkv.get(0)?.contiguous()?;
    let k = qkv.get(1)?.contiguous()?;
    let v = qkv.get(2)?.contiguous()?;
    let scores = crate::autocast_matmul(&q, &k.t()?)?;
    let probs = match bias {
        Some(bias) => softmax_with_bias(&scores, &bias.reshape((1, h, t, t))?)?,
        None => softmax_last_dim(&scores)?,
    };
    crate::autocast_matmul(&probs, &v)?
        .transpose(1, 2)?
        .reshape((b, t, h * d))
}

#[derive(Clone, Copy, Debug)]
struct Geometry {
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
}

impl Geometry {
    fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Pointers to the q, k and v blocks of `(batch b, head h)` in a `(B*T, 3C)` buffer at `base`
    /// (computed with wrapping arithmetic, so this is safe; the callers that read through them
    /// check that `base` is such a buffer and `b < batch`, `h < heads`).
    fn qkv(&self, base: *const f32, b: usize, h: usize) -> [*const f32; 3] {
        let c = self.width();
        let p = base.wrapping_add(b * self.tokens * 3 * c + h * self.head_dim);
        [p, p.wrapping_add(c), p.wrapping_add(2 * c)]
    }
}

/// The query rows of image `b` (`None`: all tokens) and the first output row of that image.
fn image_rows(g: Geometry, queries: Option<&QueryRows>, b: usize) -> (Option<&[u32]>, usize) {
    match queries {
        Some(q) => (Some(q.of(b)), q.offsets[b]),
        None => (None, b * g.tokens),
    }
}

/// The query rows `rows` (all tokens when `None`) of `(b, h)`: their number `m` and the matrix
/// (`m x D`) to read them from, gathered into `qbuf` (`T*D` values) when they are a subset.
///
/// # Safety
/// `qkv` points to a `(B*T, 3C)` buffer for `g`, `b < B`, `h < H`, and every row index is below
/// `T`.
unsafe fn query_rows(
    g: Geometry,
    qkv: *const f32,
    b: usize,
    h: usize,
    rows: Option<&[u32]>,
    qbuf: &mut [f32],
) -> (usize, Mat) {
    let (t, d, c3) = (g.tokens, g.head_dim, 3 * g.width());
    let [q, _, _] = g.qkv(qkv, b, h);
    match rows {
        None => (t, Mat::rows(q, c3)),
        Some(rows) => {
            for (r, &i) in rows.iter().enumerate() {
                // SAFETY: row i < T of image b, head h's D columns: inside the buffer (the
                // caller's contract).
                let src = unsafe { std::slice::from_raw_parts(q.add(i as usize * c3), d) };
                qbuf[r * d..(r + 1) * d].copy_from_slice(src);
            }
            (rows.len(), Mat::rows(qbuf.as_ptr(), d))
        }
    }
}

/// Softmax probabilities of the `m` query rows `qm` (token indices `rows`, all when `None`) of
/// `(b, h)` into `p[..m*T]`.
///
/// # Safety
/// `qkv` points to a `(B*T, 3C)` buffer for `g`, `b < B`, `h < H`; `qm` is valid for `m x D`;
/// `p` holds at least `m * T` values.
#[allow(clippy::too_many_arguments)]
unsafe fn probabilities(
    g: Geometry,
    qkv: *const f32,
    bias: Option<&[f32]>,
    b: usize,
    h: usize,
    rows: Option<&[u32]>,
    (m, qm): (usize, Mat),
    p: &mut [f32],
) {
    let (t, d, c3) = (g.tokens, g.head_dim, 3 * g.width());
    if m == 0 {
        return;
    }
    let [_, k, _] = g.qkv(qkv, b, h);
    // SAFETY: qm is m x D (the caller's contract), k is read as the D x T transpose of the T
    // rows of head h of image b, inside the buffer; p holds m x T values and aliases neither.
    unsafe {
        sgemm(
            m,
            t,
            d,
            p.as_mut_ptr(),
            t,
            false,
            qm,
            Mat::transposed(k, c3),
            false,
        )
    };
    for (r, row) in p[..m * t].chunks_exact_mut(t).enumerate() {
        if let Some(bias) = bias {
            let i = rows.map_or(r, |rows| rows[r] as usize);
            let brow = &bias[(h * t + i) * t..][..t];
            row.iter_mut().zip(brow).for_each(|(s, b)| *s += b);
        }
        vmath::softmax_inplace(row);
    }
}

/// The forward pass; with `keep`, also the probabilities, `(B, H, T, T)` (for selected queries,
/// the first `m` rows of each `T x T` block are used).
fn forward(
    qkv: &[f32],
    bias: Option<&[f32]>,
    g: Geometry,
    q: Option<&QueryRows>,
    keep: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let rows = q.map_or(g.batch * g.tokens, |q| q.len());
    let n_probs = g.batch * g.heads * g.tokens * g.tokens;
    let src = Shared(qkv.as_ptr());
    // SAFETY: the (batch, head) tasks together write every element of the output.
    let run = |kept: Option<SharedMut>| unsafe {
        filled_by(rows * g.width(), |out| {
            forward_into(src, bias, g, q, SharedMut(out), kept)
        })
    };
    match (keep, q) {
        (false, _) => (run(None), None),
        (true, Some(_)) => {
            // Only the first m rows of each block are written: the rest stay zero.
            let mut probs = par_zeroed(n_probs);
            let out = run(Some(SharedMut(probs.as_mut_ptr())));
            (out, Some(probs))
        }
        (true, None) => {
            let mut out = None;
            // SAFETY: with all queries every task writes its whole T x T block.
            let probs = unsafe { filled_by(n_probs, |p| out = Some(run(Some(SharedMut(p))))) };
            (out.expect("run above"), Some(probs))
        }
    }
}

/// The forward pass into `dst` (`(B*T, C)`, or `(M, C)` for selected queries), with the
/// probabilities written to `kept` when given.
///
/// # Safety
/// `src` is a `(B*T, 3C)` buffer, `dst` a writable output for `g` and `q`, `kept` a writable
/// `B*H*T*T` buffer.
unsafe fn forward_into(
    src: Shared,
    bias: Option<&[f32]>,
    g: Geometry,
    q: Option<&QueryRows>,
    dst: SharedMut,
    kept: Option<SharedMut>,
) {
    let (t, d, c) = (g.tokens, g.head_dim, g.width());
    (0..g.batch * g.heads).into_par_iter().for_each_init(
        || (vec![0f32; t * t], vec![0f32; t * d]),
        |(scratch, qbuf), task| {
            let (b, h) = (task / g.heads, task % g.heads);
            let (rows, row0) = image_rows(g, q, b);
            // SAFETY: the task writes only the output rows of image b in the columns of head h
            // and block (b, h) of the kept probabilities, regions no other task touches; reads
            // stay within `qkv`.
            unsafe {
                let p: &mut [f32] = match kept {
                    Some(k) => std::slice::from_raw_parts_mut(k.get().add(task * t * t), t * t),
                    None => scratch,
                };
                let qm = query_rows(g, src.get(), b, h, rows, qbuf);
                let m = qm.0;
                probabilities(g, src.get(), bias, b, h, rows, qm, p);
                if m == 0 {
                    return;
                }
                let [_, _, v] = g.qkv(src.get(), b, h);
                sgemm(
                    m,
                    d,
                    t,
                    dst.get().add(row0 * c + h * d),
                    c,
                    false,
                    Mat::rows(p.as_ptr(), t),
                    Mat::rows(v, 3 * c),
                    false,
                );
            }
        },
    );
}

/// Gradients of the fused projections `(B*T, 3C)` and, with a bias, of the bias `(H*T*T)`,
/// concatenated.
fn backward(
    qkv: &[f32],
    bias: Option<&[f32]>,
    grad: &[f32],
    g: Geometry,
    q: Option<&QueryRows>,
    kept: Option<&[f32]>,
) -> Vec<f32> {
    let kept = kept.map(|k| Shared(k.as_ptr()));
    let (t, c) = (g.tokens, g.width());
    let n_qkv = g.batch * t * 3 * c;
    let n_bias = if bias.is_some() { g.heads * t * t } else { 0 };
    let src = Shared(qkv.as_ptr());
    let dout = Shared(grad.as_ptr());
    if q.is_some() {
        // Unselected query rows get no gradient: start from zeros.
        let mut out = par_zeroed(n_qkv + n_bias);
        // SAFETY: `out` has the layout backward_into writes.
        unsafe { backward_into(src, bias, dout, g, q, kept, SharedMut(out.as_mut_ptr())) };
        return out;
    }
    // SAFETY: the GEMMs of the head tasks write all of dq, dk and dv; the bias gradient is
    // accumulated, so that part is zeroed first.
    unsafe {
        filled_by(n_qkv + n_bias, |out| {
            std::ptr::write_bytes(out.add(n_qkv), 0, n_bias);
            backward_into(src, bias, dout, g, None, kept, SharedMut(out));
        })
    }
}

/// The backward pass into `dst` (`(B*T, 3C)` then `H*T*T` with a bias, the latter zeroed; with
/// selected queries all of it zeroed).
///
/// # Safety
/// `src` is `(B*T, 3C)`, `dout` is the output gradient, `kept` (if any) the probabilities the
/// forward pass kept, `dst` is writable as described, all for `g` and `q`.
unsafe fn backward_into(
    src: Shared,
    bias: Option<&[f32]>,
    dout: Shared,
    g: Geometry,
    q: Option<&QueryRows>,
    kept: Option<Shared>,
    dst: SharedMut,
) {
    let (t, d, c) = (g.tokens, g.head_dim, g.width());
    let n_qkv = g.batch * t * 3 * c;
    let n_bias = if bias.is_some() { g.heads * t * t } else { 0 };
    (0..g.heads).into_par_iter().for_each_init(
        || {
            (
                vec![0f32; t * t],
                vec![0f32; t * t],
                vec![0f32; t * d],
                vec![0f32; t * d],
            )
        },
        |(p, dp, qbuf, dqbuf), h| {
            // SAFETY: this task writes the columns of head h in dq, dk, dv (rows of every image)
            // and the bias gradient block of head h: disjoint from every other task.
            unsafe {
                let dbias = (n_bias > 0).then(|| dst.get().add(n_qkv + h * t * t));
                for b in 0..g.batch {
                    let (rows, row0) = image_rows(g, q, b);
                    let (m, qm) = query_rows(g, src.get(), b, h, rows, qbuf);
                    let p: &[f32] = match kept {
                        Some(k) => std::slice::from_raw_parts(
                            k.get().add((b * g.heads + h) * t * t),
                            t * t,
                        ),
                        None => {
                            probabilities(g, src.get(), bias, b, h, rows, (m, qm), p);
                            p
                        }
                    };
                    let [_, k, v] = g.qkv(src.get(), b, h);
                    let go = dout.get().add(row0 * c + h * d);
                    let dq = dst.get().add(b * t * 3 * c + h * d);
                    let (dk, dv) = (dq.add(c), dq.add(2 * c));
                    if m == 0 {
                        // No query of this image was kept: its k and v get no gradient.
                        for i in 0..t {
                            std::ptr::write_bytes(dk.add(i * 3 * c), 0, d);
                            std::ptr::write_bytes(dv.add(i * 3 * c), 0, d);
                        }
                        continue;
                    }
                    // dV = P^T dO
                    sgemm(
                        t,
                        d,
                        m,
                        dv,
                        3 * c,
                        false,
                        Mat::transposed(p.as_ptr(), t),
                        Mat::rows(go, c),
                        false,
                    );
                    // dP = dO V^T
                    sgemm(
                        m,
                        t,
                        d,
                        dp.as_mut_ptr(),
                        t,
                        false,
                        Mat::rows(go, c),
                        Mat::transposed(v, 3 * c),
                        false,
                    );
                    // dS = P * (dP - rowsum(dP * P)), the softmax backward; the bias gets dS.
                    for (r, (dr, pr)) in dp[..m * t]
                        .chunks_exact_mut(t)
                        .zip(p.chunks_exact(t))
                        .enumerate()
                    {
                        let dot = dot16(dr, pr);
                        dr.iter_mut().zip(pr).for_each(|(x, y)| *x = y * (*x - dot));
                        if let Some(db) = dbias {
                            let i = rows.map_or(r, |rows| rows[r] as usize);
                            let db = std::slice::from_raw_parts_mut(db.add(i * t), t);
                            db.iter_mut().zip(dr.iter()).for_each(|(a, v)| *a += v);
                        }
                    }
                    // dQ = dS K (scattered to the selected rows), dK = dS^T Q
                    match rows {
                        None => sgemm(
                            t,
                            d,
                            t,
                            dq,
                            3 * c,
                            false,
                            Mat::rows(dp.as_ptr(), t),
                            Mat::rows(k, 3 * c),
                            false,
                        ),
                        Some(rows) => {
                            sgemm(
                                m,
                                d,
                                t,
                                dqbuf.as_mut_ptr(),
                                d,
                                false,
                                Mat::rows(dp.as_ptr(), t),
                                Mat::rows(k, 3 * c),
                                false,
                            );
                            for (r, &i) in rows.iter().enumerate() {
                                let dst_row =
                                    std::slice::from_raw_parts_mut(dq.add(i as usize * 3 * c), d);
                                dst_row.copy_from_slice(&dqbuf[r * d..(r + 1) * d]);
                            }
                        }
                    }
                    sgemm(
                        t,
                        d,
                        m,
                        dk,
                        3 * c,
                        false,
                        Mat::transposed(dp.as_ptr(), t),
                        qm,
                        false,
                    );
                }
            }
        },
    );
}

fn split_grads(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    packed: Tensor,
) -> Result<(Tensor, Option<Tensor>)> {
    let n = qkv.elem_count();
    let dqkv = packed.narrow(0, 0, n)?.reshape(qkv.shape())?;
    let dbias = match bias {
        Some(b) => Some(packed.narrow(0, n, b.elem_count())?.reshape(b.shape())?),
        None => None,
    };
    Ok((dqkv, dbias))
}

/// The forward op: `(qkv)` or `(qkv, bias)`.
#[derive(Clone)]
struct AttentionOp {
    g: Geometry,
    queries: Option<Arc<QueryRows>>,
    /// Where the forward pass keeps the probabilities for the backward pass (when a gradient
    /// will be needed); the backward op shares it.
    probs: Option<Arc<Mutex<Option<Vec<f32>>>>>,
}

impl AttentionOp {
    fn out_shape(&self) -> Shape {
        let g = self.g;
        match &self.queries {
            Some(q) => Shape::from((q.len(), g.width())),
            None => Shape::from((g.batch, g.tokens, g.width())),
        }
    }

    fn bwd_op(&self) -> AttentionBwd {
        AttentionBwd(self.clone())
    }

    /// Run the forward pass, keeping the probabilities if asked to.
    fn run_forward(&self, qkv: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let (out, kept) = forward(
            qkv,
            bias,
            self.g,
            self.queries.as_deref(),
            self.probs.is_some(),
        );
        if let Some(slot) = &self.probs {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = kept;
        }
        out
    }

    /// Run the backward pass, from the kept probabilities when there are any.
    fn run_backward(&self, qkv: &[f32], bias: Option<&[f32]>, grad: &[f32]) -> Vec<f32> {
        let guard = self
            .probs
            .as_ref()
            .map(|p| p.lock().unwrap_or_else(|e| e.into_inner()));
        let kept = guard.as_ref().and_then(|g| g.as_deref());
        backward(qkv, bias, grad, self.g, self.queries.as_deref(), kept)
    }
}

/// The backward op: `(qkv, grad)` or `(qkv, bias, grad)`, returning the packed gradients.
struct AttentionBwd(AttentionOp);

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "beit-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = f32_data(s, l, "beit-attention")?;
        let out = self.run_forward(qkv, None);
        Ok((CpuStorage::F32(out), self.out_shape()))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let packed = qkv.apply_op2_no_bwd(&grad.contiguous()?, &self.bwd_op())?;
        Ok(Some(split_grads(qkv, None, packed)?.0))
    }
}

impl CustomOp2 for AttentionOp {
    fn name(&self) -> &'static str {
        "beit-attention-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let qkv = f32_data(s1, l1, "beit-attention-bias")?;
        let bias = f32_data(s2, l2, "beit-attention-bias")?;
        let out = self.run_forward(qkv, Some(bias));
        Ok((CpuStorage::F32(out), self.out_shape()))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = qkv.apply_op3_no_bwd(bias, &grad.contiguous()?, &self.bwd_op())?;
        let (dqkv, dbias) = split_grads(qkv, Some(bias), packed)?;
        Ok((Some(dqkv), dbias.filter(|_| bias.track_op())))
    }
}

impl CustomOp2 for AttentionBwd {
    fn name(&self) -> &'static str {
        "beit-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let qkv = f32_data(s1, l1, "beit-attention-bwd")?;
        let grad = f32_data(s2, l2, "beit-attention-bwd")?;
        let out = self.0.run_backward(qkv, None, grad);
        let n = out.len();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
}

impl CustomOp3 for AttentionBwd {
    fn name(&self) -> &'static str {
        "beit-attention-bias-bwd"
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
        let qkv = f32_data(s1, l1, "beit-attention-bias-bwd")?;
        let bias = f32_data(s2, l2, "beit-attention-bias-bwd")?;
        let grad = f32_data(s3, l3, "beit-attention-bias-bwd")?;
        let out = self.0.run_backward(qkv, Some(bias), grad);
        let n = out.len();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_diff;
    use candle::{Device, Var};

    #[test]
    fn fused_attention_matches_the_composition_with_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let (b, t, h, d) = (3, 11, 2, 8);
        let qkv = Var::randn(0f32, 1., (b * t, 3 * h * d), &dev)?;
        let bias = Var::randn(0f32, 1., (1, h, t, t), &dev)?;
        let up = Tensor::randn(0f32, 1., (b, t, h * d), &dev)?;
        let g = Geometry {
            batch: b,
            tokens: t,
            heads: h,
            head_dim: d,
        };
        for with_bias in [true, false] {
            let bias_t = with_bias.then_some(bias.as_tensor());
            let fused = attention_core(&qkv, bias_t, b, h)?;
            let plain = composed(&qkv, bias_t, g)?;
            assert_eq!(fused.dims(), &[b, t, h * d]);
            assert!(max_diff(&fused, &plain) < 1e-5);
            let gf = (fused * &up)?.sum_all()?.backward()?;
            let gp = (plain * &up)?.sum_all()?.backward()?;
            let (a, p) = (gf.get(&qkv).unwrap(), gp.get(&qkv).unwrap());
            assert!(max_diff(a, p) < 1e-4, "dqkv {}", max_diff(a, p));
            if with_bias {
                let (a, p) = (gf.get(&bias).unwrap(), gp.get(&bias).unwrap());
                assert_eq!(a.dims(), p.dims());
                assert!(max_diff(a, p) < 1e-4, "dbias {}", max_diff(a, p));
            }
        }
        Ok(())
    }

    #[test]
    fn selected_query_rows_match_the_full_attention_with_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let (b, t, h, d) = (3, 9, 2, 8);
        let qkv = Var::randn(0f32, 1., (b, t, 3 * h * d), &dev)?;
        let bias = Var::randn(0f32, 1., (h, t, t), &dev)?;
        // Image 1 keeps no query at all: its keys and values must still get no gradient.
        let queries = QueryRows::new(&[vec![0, 3, 4, 8], vec![], vec![1, 2, 5]])?;
        let idx = Tensor::from_vec(queries.flat_indices(t), queries.len(), &dev)?;
        let up = Tensor::randn(0f32, 1., (queries.len(), h * d), &dev)?;
        let g = Geometry {
            batch: b,
            tokens: t,
            heads: h,
            head_dim: d,
        };
        for with_bias in [true, false] {
            let bias_t = with_bias.then_some(bias.as_tensor());
            let fused = attention_core_rows(&qkv, bias_t, b, h, &queries)?;
            let plain = composed(&qkv, bias_t, g)?
                .reshape((b * t, h * d))?
                .index_select(&idx, 0)?;
            assert_eq!(fused.dims(), &[queries.len(), h * d]);
            assert!(max_diff(&fused, &plain) < 1e-5);
            let gf = (fused * &up)?.sum_all()?.backward()?;
            let gp = (plain * &up)?.sum_all()?.backward()?;
            let (a, p) = (gf.get(&qkv).unwrap(), gp.get(&qkv).unwrap());
            assert!(max_diff(a, p) < 1e-4, "dqkv {}", max_diff(a, p));
            if with_bias {
                let (a, p) = (gf.get(&bias).unwrap(), gp.get(&bias).unwrap());
                assert!(max_diff(a, p) < 1e-4, "dbias {}", max_diff(a, p));
            }
        }
        assert!(QueryRows::new(&[vec![2, 1]]).is_err());
        let too_far = QueryRows::new(&[vec![0], vec![t as u32], vec![0]])?;
        assert!(attention_core_rows(&qkv, None, b, h, &too_far).is_err());
        Ok(())
    }

    #[test]
    fn kept_and_recomputed_probabilities_give_the_same_backward_pass() {
        let g = Geometry {
            batch: 2,
            tokens: 7,
            heads: 2,
            head_dim: 4,
        };
        let n = g.batch * g.tokens * 3 * g.width();
        let qkv: Vec<f32> = (0..n).map(|i| ((i * 37) % 23) as f32 * 0.1 - 1.1).collect();
        let bias: Vec<f32> = (0..g.heads * 49).map(|i| (i % 5) as f32 * 0.2).collect();
        let selections = [
            None,
            Some(QueryRows::new(&[vec![1, 4], vec![0, 2, 6]]).unwrap()),
        ];
        for q in selections.iter().map(Option::as_ref) {
            let rows = q.map_or(g.batch * g.tokens, |q| q.len());
            let grad: Vec<f32> = (0..rows * g.width())
                .map(|i| (i % 7) as f32 - 3.0)
                .collect();
            let (out, kept) = forward(&qkv, Some(&bias), g, q, true);
            let (out2, none) = forward(&qkv, Some(&bias), g, q, false);
            assert_eq!(out, out2);
            assert!(none.is_none());
            let from_kept = backward(&qkv, Some(&bias), &grad, g, q, kept.as_deref());
            let recomputed = backward(&qkv, Some(&bias), &grad, g, q, None);
            assert_eq!(from_kept, recomputed);
        }
    }

    #[test]
    fn mismatched_shapes_are_errors() -> Result<()> {
        let dev = Device::Cpu;
        let qkv = Tensor::zeros((2 * 5, 3 * 2 * 4), candle::DType::F32, &dev)?;
        let bad_bias = Tensor::zeros((2, 5, 4), candle::DType::F32, &dev)?;
        let err = attention_core(&qkv, Some(&bad_bias), 2, 2).unwrap_err();
        assert!(err.to_string().contains("bias"), "{err}");
        let err = attention_core(&qkv, None, 3, 2).unwrap_err();
        assert!(err.to_string().contains("batch"), "{err}");
        Ok(())
    }
}
