//! A stride-1 "same" convolution whose CPU backward pass is fast: im2col ("unfold") + one matrix
//! product (the convolutions of the dVAE tokenizer).
//!
//! candle 0.11's CPU `conv2d` backward, `narrow`-based unfolding and nearest upsampling backward
//! are slow for the many small convolutions of a dVAE (measured: a 3x3 conv, batch 64, 64->16
//! channels at 14x14 took 1.7 s forward+backward, ten times its forward). Here the unfold is a
//! custom op with a hand-written backward (the matching "fold", a scatter-add), and the
//! contraction is a plain matmul, so training steps cost about what their FLOPs say.

use candle::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::f32_data;
use crate::dispatch::fused_cpu_f32;

/// `(B, C, H, W)` -> `(C * k * k, B * H * W)`: for each channel and kernel offset `(dy, dx)`, the
/// input shifted by `(dy - p, dx - p)` with zero padding `p = (k - 1) / 2`.
struct Unfold {
    k: usize,
}

/// The adjoint of [`Unfold`]: `(C * k * k, B * H * W)` -> `(B, C, H, W)`, summing every column
/// entry back onto the input pixel it was copied from.
struct Fold {
    k: usize,
    b: usize,
    h: usize,
    w: usize,
}

/// Valid `(out_start, in_start, len)` of a 1-D shift by `d - p` over `n` positions.
fn span(n: usize, d: usize, p: usize) -> (usize, usize, usize) {
    let out_start = p.saturating_sub(d);
    let in_start = d.saturating_sub(p);
    let len = n - out_start.max(in_start);
    (out_start, in_start, len)
}

impl CustomOp1 for Unfold {
    fn name(&self) -> &'static str {
        "dvae-unfold"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle::Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        let src = f32_data(s, l, "unfold")?;
        let (k, p, hw) = (self.k, (self.k - 1) / 2, h * w);
        let mut out = vec![0f32; c * k * k * b * hw];
        // Row (ci, dy, dx) holds, for every image, the channel-ci plane shifted by (dy, dx).
        out.par_chunks_mut(b * hw)
            .enumerate()
            .for_each(|(row, dst)| {
                let (ci, off) = (row / (k * k), row % (k * k));
                let (dy, dx) = (off / k, off % k);
                let (oy, iy, ny) = span(h, dy, p);
                let (ox, ix, nx) = span(w, dx, p);
                for bi in 0..b {
                    let plane = &src[(bi * c + ci) * hw..(bi * c + ci + 1) * hw];
                    let img = &mut dst[bi * hw..(bi + 1) * hw];
                    for r in 0..ny {
                        let d = (oy + r) * w + ox;
                        let s = (iy + r) * w + ix;
                        img[d..d + nx].copy_from_slice(&plane[s..s + nx]);
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((c * k * k, b * hw))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle::Result<Option<Tensor>> {
        let (b, _, h, w) = arg.dims4()?;
        let g = grad
            .contiguous()?
            .apply_op1_no_bwd(&Fold { k: self.k, b, h, w })?;
        Ok(Some(g))
    }
}

impl CustomOp1 for Fold {
    fn name(&self) -> &'static str {
        "dvae-fold"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle::Result<(CpuStorage, Shape)> {
        let (ck, bhw) = l.shape().dims2()?;
        let (k, p, b, h, w) = (self.k, (self.k - 1) / 2, self.b, self.h, self.w);
        let hw = h * w;
        if bhw != b * hw || ck % (k * k) != 0 {
            candle::bail!("fold: bad shape {:?} for k={k}, {b}x{h}x{w}", l.shape());
        }
        let c = ck / (k * k);
        let src = f32_data(s, l, "fold")?;
        let mut out = vec![0f32; b * c * hw];
        out.par_chunks_mut(hw)
            .enumerate()
            .for_each(|(plane_idx, plane)| {
                let (bi, ci) = (plane_idx / c, plane_idx % c);
                for dy in 0..k {
                    let (oy, iy, ny) = span(h, dy, p);
                    for dx in 0..k {
                        let (ox, ix, nx) = span(w, dx, p);
                        let row = (ci * k * k + dy * k + dx) * b * hw + bi * hw;
                        for r in 0..ny {
                            let s = row + (oy + r) * w + ox;
                            let d = (iy + r) * w + ix;
                            for (o, v) in plane[d..d + nx].iter_mut().zip(&src[s..s + nx]) {
                                *o += v;
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, c, h, w))))
    }
}

/// Largest unfolded column matrix (f32 elements: 64 MiB) built at once by the forward-only path
/// of [`conv2d_same`]; an image whose columns alone are larger keeps candle's tiled `conv2d`,
/// whose memory is bounded (DALL-E's 256-channel 3x3 convolutions at 112x112, for one).
const FROZEN_COLS_LIMIT: usize = 16 << 20;

/// Stride-1 "same" convolution without bias: `x (B, C, H, W)`, `w (out, C, k, k)` with `k` odd,
/// zero padding `(k - 1) / 2`. For f32 tensors on the CPU: when `w` needs a gradient, an unfold
/// op with a hand-written backward and one matrix product (candle's CPU `conv2d` backward is slow
/// for these shapes); in a forward pass alone (a frozen tokenizer), the same unfold + product over
/// chunks of the batch, when one image's columns are small (candle's tiled `conv2d` builds its
/// columns element by element into freshly zeroed tiles: a quarter of the demo's pre-training
/// step went there; for `k = 1` the "unfold" is a transpose to `(C, B H W)`, which turns one
/// small product per image into one product per batch). Otherwise a matrix product over channels
/// for `k = 1` and candle's `conv2d` for larger kernels.
pub fn conv2d_same(x: &Tensor, w: &Tensor) -> candle::Result<Tensor> {
    conv2d_same_impl(x, w, None)
}

/// [`conv2d_same`] plus a per-output-channel bias `b (out,)`. On the unfold path the bias is
/// added to the `(out, B H W)` product, so its gradient is a sum over the contiguous last
/// dimension (adding it to the `(B, out, H, W)` output makes candle's backward reduce over
/// strided dimensions: a fifth of a dVAE training step).
pub fn conv2d_same_bias(x: &Tensor, w: &Tensor, b: &Tensor) -> candle::Result<Tensor> {
    conv2d_same_impl(x, w, Some(b))
}

fn conv2d_same_impl(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> candle::Result<Tensor> {
    let (n_out, c, k, kw) = w.dims4()?;
    if k != kw || k % 2 == 0 {
        candle::bail!("conv2d_same: kernel {:?} is not square and odd", w.dims());
    }
    if fused_cpu_f32(&[x, w]) {
        if w.track_op() {
            return conv2d_im2col(x, w, k, bias);
        }
        if !x.track_op() {
            if let Some(y) = conv2d_im2col_chunked(x, w, k, bias, FROZEN_COLS_LIMIT)? {
                return Ok(y);
            }
        }
    }
    let y = if k == 1 {
        let (b, _, h, wd) = x.dims4()?;
        let wm = w.reshape((n_out, c))?;
        let y = wm.broadcast_matmul(&x.reshape((b, c, h * wd))?)?;
        y.reshape((b, n_out, h, wd))?
    } else {
        x.conv2d(w, (k - 1) / 2, 1, 1, 1)?
    };
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, n_out, 1, 1))?),
        None => Ok(y),
    }
}

/// The unfold + matrix product path of [`conv2d_same`] (CPU, f32).
fn conv2d_im2col(
    x: &Tensor,
    w: &Tensor,
    k: usize,
    bias: Option<&Tensor>,
) -> candle::Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let n_out = w.dim(0)?;
    // Columns (C k k, B H W): the whole batch is one matrix product, and the kernel's gradient
    // one more, instead of B small ones.
    let cols = x.contiguous()?.apply_op1(Unfold { k })?;
    let mut y = crate::matmul::matmul(&w.reshape((n_out, c * k * k))?, &cols)?;
    if let Some(bias) = bias {
        y = y.broadcast_add(&bias.reshape((n_out, 1))?)?;
    }
    y.reshape((n_out, b, h, wd))?.permute((1, 0, 2, 3))
}

/// The forward-only unfold + product of [`conv2d_same`] over chunks of the batch whose columns
/// hold at most `cols_limit` elements; `None` when one image's columns exceed it.
fn conv2d_im2col_chunked(
    x: &Tensor,
    w: &Tensor,
    k: usize,
    bias: Option<&Tensor>,
    cols_limit: usize,
) -> candle::Result<Option<Tensor>> {
    let (b, c, h, wd) = x.dims4()?;
    let per_image = c * k * k * h * wd;
    if per_image > cols_limit {
        return Ok(None);
    }
    let chunk = (cols_limit / per_image.max(1)).clamp(1, b.max(1));
    if chunk >= b {
        return conv2d_im2col(x, w, k, bias).map(Some);
    }
    let parts = (0..b)
        .step_by(chunk)
        .map(|i| conv2d_im2col(&x.narrow(0, i, chunk.min(b - i))?, w, k, bias))
        .collect::<candle::Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0).map(Some)
}

/// Nearest-neighbour 2x upsampling `(B, C, H, W) -> (B, C, 2H, 2W)` as a broadcast, whose
/// backward is a sum (candle's `upsample_nearest2d` backward is slow on the CPU).
pub fn upsample2x(x: &Tensor) -> candle::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .contiguous()?
        .reshape((b, c, 2 * h, 2 * w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn matches_conv2d_forward_and_backward() -> candle::Result<()> {
        let dev = Device::Cpu;
        for k in [1, 3, 7] {
            let x = Var::randn(0f32, 1.0, (2, 5, 9, 7), &dev)?;
            let w = Var::randn(0f32, 1.0, (4, 5, k, k), &dev)?;
            let g = Tensor::randn(0f32, 1.0, (2, 4, 9, 7), &dev)?;
            let a = conv2d_same(&x, &w)?;
            let b = x.conv2d(&w, (k - 1) / 2, 1, 1, 1)?;
            assert!(max_diff(&a, &b) < 1e-4, "forward k={k}");
            // Frozen weights: unfold + product (a matrix product for k = 1), whole batch, in
            // chunks (one image per chunk here), or candle's convolution when an image is too big.
            let (xd, wd) = (x.as_detached_tensor(), w.as_detached_tensor());
            let frozen = conv2d_same(&xd, &wd)?;
            assert!(max_diff(&frozen, &b) < 1e-4, "frozen forward k={k}");
            let per_image = 5 * k * k * 9 * 7;
            let chunked = conv2d_im2col_chunked(&xd, &wd, k, None, per_image - 1)?;
            assert!(
                chunked.is_none(),
                "an image over the limit keeps candle's conv2d"
            );
            let chunked = conv2d_im2col_chunked(&xd, &wd, k, None, per_image)?.unwrap();
            assert!(max_diff(&chunked, &b) < 1e-4, "chunked forward k={k}");
            // With a bias: the same as adding it to the output, forward and backward, on the
            // unfold path, frozen, and on candle's.
            let bias = Var::randn(0f32, 1.0, 4, &dev)?;
            let want = b.broadcast_add(&bias.reshape((1, 4, 1, 1))?)?;
            let got = conv2d_same_bias(&x, &w, &bias)?;
            assert!(max_diff(&got, &want) < 1e-4, "bias forward k={k}");
            let frozen = conv2d_same_bias(&xd, &wd, &bias.as_detached_tensor())?;
            assert!(max_diff(&frozen, &want) < 1e-4, "frozen bias forward k={k}");
            let gg = (got * &g)?.sum_all()?.backward()?;
            let gw = (&want * &g)?.sum_all()?.backward()?;
            for v in [&x, &w, &bias] {
                let d = max_diff(gg.get(v).unwrap(), gw.get(v).unwrap());
                assert!(d < 1e-3, "bias backward k={k}: {d}");
            }
            let plain = crate::with_fused_ops(false, || conv2d_same_bias(&x, &w, &bias))?;
            assert!(max_diff(&plain, &want) < 1e-4, "unfused bias forward k={k}");
            let ga = (a * &g)?.sum_all()?.backward()?;
            let gb = (b * &g)?.sum_all()?.backward()?;
            for v in [&x, &w] {
                let d = max_diff(ga.get(v).unwrap(), gb.get(v).unwrap());
                assert!(d < 1e-3, "backward k={k}: {d}");
            }
        }
        let even = Tensor::zeros((4, 5, 2, 2), candle::DType::F32, &dev)?;
        assert!(conv2d_same(
            &Tensor::zeros((1, 5, 4, 4), candle::DType::F32, &dev)?,
            &even
        )
        .is_err());
        Ok(())
    }

    #[test]
    fn upsample_matches_candle() -> candle::Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (2, 3, 4, 5), &dev)?;
        let g = Tensor::randn(0f32, 1.0, (2, 3, 8, 10), &dev)?;
        let a = upsample2x(&x)?;
        let b = x.upsample_nearest2d(8, 10)?;
        assert_eq!(max_diff(&a, &b), 0.0);
        let ga = (a * &g)?.sum_all()?.backward()?;
        let gb = (b * &g)?.sum_all()?.backward()?;
        assert!(max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-5);
        Ok(())
    }
}
