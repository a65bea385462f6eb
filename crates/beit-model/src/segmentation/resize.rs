//! Bilinear resizing (PyTorch's `interpolate(mode="bilinear", align_corners=False)`) and adaptive
//! average pooling (`AdaptiveAvgPool2d`), both differentiable.
//!
//! candle's `upsample_bilinear2d` has no backward pass and candle has no adaptive pooling. Both are
//! separable linear maps, so each is written as two matrix products with a small interpolation (or
//! averaging) matrix per axis: `Y = A_h · X · A_wᵀ` for every `(batch, channel)` plane. The matrices
//! hold exactly PyTorch's weights, the products are ordinary candle matmuls, and the backward pass
//! is the matmuls' own (`dX = A_hᵀ · dY · A_w`).

use candle::{Result, Tensor};

/// PyTorch's bilinear weights along one axis for `align_corners=False` and an explicit output
/// size, as a row-major `(out, in)` matrix: output `i` samples source coordinate
/// `max((i + 0.5) · in / out − 0.5, 0)` and mixes its two neighbouring inputs linearly (the upper
/// neighbour is clamped to the last input).
pub fn bilinear_matrix(in_size: usize, out_size: usize) -> Vec<f32> {
    let mut m = vec![0f32; out_size * in_size];
    if in_size == 0 {
        return m;
    }
    let scale = in_size as f32 / out_size as f32;
    for i in 0..out_size {
        // PyTorch computes the source index in the tensor's float type.
        let src = ((i as f32 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src as usize).min(in_size - 1);
        let i1 = (i0 + 1).min(in_size - 1);
        let l1 = src - i0 as f32;
        let l0 = 1.0 - l1;
        m[i * in_size + i0] += l0;
        m[i * in_size + i1] += l1;
    }
    m
}

/// `AdaptiveAvgPool` weights along one axis as a row-major `(out, in)` matrix: output `i` averages
/// inputs `floor(i · in / out) .. ceil((i + 1) · in / out)`.
pub fn adaptive_pool_matrix(in_size: usize, out_size: usize) -> Vec<f32> {
    let mut m = vec![0f32; out_size * in_size];
    for i in 0..out_size {
        let start = i * in_size / out_size;
        let end = ((i + 1) * in_size).div_ceil(out_size);
        let w = 1.0 / (end - start) as f32;
        for j in start..end {
            m[i * in_size + j] = w;
        }
    }
    m
}

/// Apply `(out_h, H)` and `(out_w, W)` matrices to every plane of `x` `(B, C, H, W)`.
/// An axis whose size does not change and whose matrix is the identity is skipped.
fn separable(
    x: &Tensor,
    (mh, out_h): (Vec<f32>, usize),
    (mw, out_w): (Vec<f32>, usize),
    identity_when_same: bool,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (dev, dtype) = (x.device(), x.dtype());
    let mut y = x.clone();
    if !(identity_when_same && out_w == w) {
        // (B·C·H, W) · (W, out_w)
        let mw = Tensor::from_vec(mw, (out_w, w), dev)?
            .to_dtype(dtype)?
            .t()?;
        y = y
            .reshape((b * c * h, w))?
            .matmul(&mw)?
            .reshape((b, c, h, out_w))?;
    }
    if !(identity_when_same && out_h == h) {
        // Rows: (B·C·out_w, H) · (H, out_h), on the transposed planes.
        let mh = Tensor::from_vec(mh, (out_h, h), dev)?
            .to_dtype(dtype)?
            .t()?;
        let yw = y.dim(3)?;
        y = y
            .transpose(2, 3)?
            .contiguous()?
            .reshape((b * c * yw, h))?
            .matmul(&mh)?
            .reshape((b, c, yw, out_h))?
            .transpose(2, 3)?
            .contiguous()?;
    }
    Ok(y)
}

/// Resize `x` `(B, C, H, W)` to `(B, C, out_h, out_w)` as
/// `torch.nn.functional.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False)`.
/// Differentiable with respect to `x`.
pub fn resize_bilinear(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if out_h == 0 || out_w == 0 || h == 0 || w == 0 {
        candle::bail!("resize_bilinear: empty size ({h}x{w} -> {out_h}x{out_w})");
    }
    // At the same size the weights are exactly the identity (source index = i, weight 1).
    separable(
        x,
        (bilinear_matrix(h, out_h), out_h),
        (bilinear_matrix(w, out_w), out_w),
        true,
    )
}

/// `torch.nn.AdaptiveAvgPool2d((out_h, out_w))` on `x` `(B, C, H, W)`. Differentiable.
pub fn adaptive_avg_pool2d(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if out_h == 0 || out_w == 0 || h == 0 || w == 0 {
        candle::bail!("adaptive_avg_pool2d: empty size ({h}x{w} -> {out_h}x{out_w})");
    }
    separable(
        x,
        (adaptive_pool_matrix(h, out_h), out_h),
        (adaptive_pool_matrix(w, out_w), out_w),
        true,
    )
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
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Values printed by PyTorch 2.x:
    /// `F.interpolate(torch.arange(6.).reshape(1,1,2,3), size=(3,5), mode="bilinear", align_corners=False)`.
    #[test]
    fn bilinear_matches_torch_values() -> Result<()> {
        let x = Tensor::arange(0f32, 6., &Device::Cpu)?.reshape((1, 1, 2, 3))?;
        let y = resize_bilinear(&x, 3, 5)?;
        let want = Tensor::new(
            &[
                [0.0f32, 0.4, 1.0, 1.6, 2.0],
                [1.5, 1.9, 2.5, 3.1, 3.5],
                [3.0, 3.4, 4.0, 4.6, 5.0],
            ],
            &Device::Cpu,
        )?
        .reshape((1, 1, 3, 5))?;
        assert!(max_diff(&y, &want) < 1e-6, "{y}");
        // Downsampling 5 -> 2: source coordinates 0.75 and 3.25.
        let x = Tensor::arange(0f32, 5., &Device::Cpu)?.reshape((1, 1, 1, 5))?;
        let y = resize_bilinear(&x, 1, 2)?;
        let want = Tensor::new(&[0.75f32, 3.25], &Device::Cpu)?.reshape((1, 1, 1, 2))?;
        assert!(max_diff(&y, &want) < 1e-6, "{y}");
        Ok(())
    }

    /// `nn.AdaptiveAvgPool2d((2, 3))(torch.arange(20.).reshape(1,1,4,5))` (overlapping windows
    /// along the width: columns 0..2, 1..4, 3..5).
    #[test]
    fn adaptive_pool_matches_torch_values() -> Result<()> {
        let x = Tensor::arange(0f32, 20., &Device::Cpu)?.reshape((1, 1, 4, 5))?;
        let y = adaptive_avg_pool2d(&x, 2, 3)?;
        let want = Tensor::new(&[[3.0f32, 4.5, 6.0], [13.0, 14.5, 16.0]], &Device::Cpu)?
            .reshape((1, 1, 2, 3))?;
        assert!(max_diff(&y, &want) < 1e-6, "{y}");
        // Upsampling by adaptive pooling (2 -> 3) repeats the middle input: windows 0..1, 0..2, 1..2.
        let x = Tensor::new(&[1f32, 3.], &Device::Cpu)?.reshape((1, 1, 1, 2))?;
        let y = adaptive_avg_pool2d(&x, 1, 3)?;
        let want = Tensor::new(&[1f32, 2., 3.], &Device::Cpu)?.reshape((1, 1, 1, 3))?;
        assert!(max_diff(&y, &want) < 1e-6, "{y}");
        Ok(())
    }

    /// The gradient of `sum(w ⊙ resize(x))` is `A_hᵀ · w · A_w`: check one entry by finite
    /// differences (the map is linear, so the difference quotient is exact up to rounding).
    #[test]
    fn gradients_are_the_transposed_maps() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 5, 7), &dev)?)?;
        let w = Tensor::randn(0f32, 1., (2, 3, 9, 4), &dev)?;
        let loss = (resize_bilinear(x.as_tensor(), 9, 4)? * &w)?.sum_all()?;
        let g = loss.backward()?.get(x.as_tensor()).unwrap().clone();
        let mut bumped = x.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let k = 3 * 7 * 5 + 2 * 7 + 3; // (b 0, c 2, row 2, col 3)
        bumped[k] += 1.0;
        let xb = Tensor::from_vec(bumped, (2, 3, 5, 7), &dev)?;
        let lb = (resize_bilinear(&xb, 9, 4)? * &w)?.sum_all()?;
        let fd = (lb - loss)?.to_scalar::<f32>()?;
        let gk = g.flatten_all()?.to_vec1::<f32>()?[k];
        assert!(
            (fd - gk).abs() < 1e-3,
            "finite difference {fd} vs gradient {gk}"
        );
        let loss = adaptive_avg_pool2d(x.as_tensor(), 3, 2)?.sum_all()?;
        let g = loss.backward()?.get(x.as_tensor()).unwrap().clone();
        // Each row of a pooling matrix sums to one, so the gradients add up to the output count.
        let total = g.sum_all()?.to_scalar::<f32>()?;
        assert!((total - 2.0 * 3.0 * 3.0 * 2.0).abs() < 1e-4, "{total}");
        Ok(())
    }
}
