//! LayerNorm over the last dimension: one pass forward, and one pass for all three gradients.
//!
//! candle builds LayerNorm's backward out of many element-wise ops; each one allocates a fresh
//! tensor and makes one more pass over memory (and the autograd engine adds a zero-fill and an
//! add per edge). candle-nn's own fused kernel has no backward pass and silently drops gradients,
//! so it serves only when no gradient is needed.

use candle::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::cpu::{
    add_partials, chunk_rows, dot16, f32_data, par_rows, par_zeroed, row_stats, sum16,
};
use crate::dispatch::{fused_cpu_f32, multiversion};

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
        let y = par_rows(x.len() / c, c, |i, y| {
            forward_rows(&x[i * c..(i + 1) * c], w, b, self.eps, y)
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
        let chunk = chunk_rows(rows, c);
        let partial = dx
            .par_chunks_mut(chunk * c)
            .zip(x.par_chunks(chunk * c).zip(g.par_chunks(chunk * c)))
            .map(|(dxc, (xc, gc))| {
                let mut acc = vec![0f32; 2 * c];
                backward_rows(xc, w, gc, self.eps, dxc, &mut acc);
                acc
            })
            .reduce(|| vec![0f32; 2 * c], add_partials);
        dwdb.copy_from_slice(&partial);
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, c))))
    }
}

multiversion! {
    /// LayerNorm of the rows of `x` (rows of `w.len()`) into `y`.
    fn forward_rows / forward_rows_on(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
        let c = w.len();
        for (yr, xr) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            let (mean, rstd) = row_stats(xr, eps);
            for i in 0..c {
                yr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
            }
        }
    }
}

multiversion! {
    /// LayerNorm's backward over the rows of `x` and `g`: `dx`, and the weight and bias gradients
    /// added to `acc` (`dw` then `db`, `2 * w.len()` values).
    fn backward_rows / backward_rows_on(
        x: &[f32],
        w: &[f32],
        g: &[f32],
        eps: f32,
        dx: &mut [f32],
        acc: &mut [f32],
    ) {
        let c = w.len();
        let inv_c = 1.0 / c as f32;
        let mut xhat = vec![0f32; c];
        let mut gy = vec![0f32; c];
        let (dw, db) = acc.split_at_mut(c);
        for ((dxr, xr), gr) in dx
            .chunks_exact_mut(c)
            .zip(x.chunks_exact(c))
            .zip(g.chunks_exact(c))
        {
            let (mean, rstd) = row_stats(xr, eps);
            for i in 0..c {
                xhat[i] = (xr[i] - mean) * rstd;
                gy[i] = gr[i] * w[i];
            }
            let a = sum16(&gy) * inv_c;
            let m = dot16(&gy, &xhat) * inv_c;
            for i in 0..c {
                dxr[i] = rstd * (gy[i] - a - xhat[i] * m);
                dw[i] += gr[i] * xhat[i];
                db[i] += gr[i];
            }
        }
    }
}

/// LayerNorm over the last dimension: candle-nn's kernel when no gradient is needed (any
/// device; f32, bf16, f16), ours with a single-pass backward for f32 on the CPU, the differentiable composition
/// elsewhere.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let needs_grad = x.track_op() || w.track_op() || b.track_op();
    // (candle-nn's kernel has no f64 version.)
    if !needs_grad && x.is_contiguous() && x.dtype() != DType::F64 {
        return candle_nn::ops::layer_norm(x, w, b, eps as f32);
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{compare, var};
    use candle::Device;

    #[test]
    fn layer_norm_matches_composition_values_and_gradients() -> Result<()> {
        // 37 columns: exercises the 16-lane loops and their remainders; 45 rows: one task, 1200
        // rows: several parallel tasks, uneven.
        for t in [15, 400] {
            let x = var(&[3, t, 37], 0.5, 2.0);
            let w = var(&[37], 1.0, 0.3);
            let b = var(&[37], 0.0, 0.3);
            compare(
                &[&x, &w, &b],
                |t| layer_norm(t[0], t[1], t[2], 1e-6),
                |t| layer_norm_composed(t[0], t[1], t[2], 1e-6),
                1e-4,
            )?;
        }
        Ok(())
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
    fn every_supported_instruction_set_matches_f64_and_the_baseline_bit_for_bit() {
        use crate::dispatch::Isa;
        let (rows, c) = (5, 37);
        let x: Vec<f32> = (0..rows * c)
            .map(|i| ((i * 7919) % 97) as f32 * 0.05 - 2.0)
            .collect();
        let g: Vec<f32> = (0..rows * c)
            .map(|i| ((i * 31) % 17) as f32 * 0.1 - 0.8)
            .collect();
        let w: Vec<f32> = (0..c).map(|i| 1.0 + i as f32 * 0.01).collect();
        let b: Vec<f32> = (0..c).map(|i| i as f32 * 0.02 - 0.3).collect();
        let eps = 1e-6;
        // f64 reference: y, dx, dw, db.
        let (mut y64, mut dx64, mut dw64, mut db64) = (
            vec![0f64; rows * c],
            vec![0f64; rows * c],
            vec![0f64; c],
            vec![0f64; c],
        );
        for r in 0..rows {
            let xr: Vec<f64> = x[r * c..(r + 1) * c].iter().map(|&v| v as f64).collect();
            let mean = xr.iter().sum::<f64>() / c as f64;
            let var = xr.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / c as f64;
            let rstd = 1.0 / (var + eps as f64).sqrt();
            let xhat: Vec<f64> = xr.iter().map(|v| (v - mean) * rstd).collect();
            let gy: Vec<f64> = (0..c).map(|i| g[r * c + i] as f64 * w[i] as f64).collect();
            let a = gy.iter().sum::<f64>() / c as f64;
            let m = gy.iter().zip(&xhat).map(|(p, q)| p * q).sum::<f64>() / c as f64;
            for i in 0..c {
                y64[r * c + i] = xhat[i] * w[i] as f64 + b[i] as f64;
                dx64[r * c + i] = rstd * (gy[i] - a - xhat[i] * m);
                dw64[i] += g[r * c + i] as f64 * xhat[i];
                db64[i] += g[r * c + i] as f64;
            }
        }
        let run = |isa: Isa| {
            let mut y = vec![0f32; rows * c];
            forward_rows_on(isa, &x, &w, &b, eps, &mut y);
            let (mut dx, mut acc) = (vec![0f32; rows * c], vec![0f32; 2 * c]);
            backward_rows_on(isa, &x, &w, &g, eps, &mut dx, &mut acc);
            (y, dx, acc)
        };
        let baseline = run(Isa::Scalar);
        for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
            let got = run(isa);
            let close = |a: &[f32], b: &[f64], tol: f64| {
                a.iter().zip(b).all(|(p, q)| (*p as f64 - q).abs() < tol)
            };
            assert!(close(&got.0, &y64, 1e-5), "{}: forward", isa.name());
            assert!(close(&got.1, &dx64, 1e-4), "{}: dx", isa.name());
            assert!(close(&got.2[..c], &dw64, 1e-4), "{}: dw", isa.name());
            assert!(close(&got.2[c..], &db64, 1e-4), "{}: db", isa.name());
            assert!(
                got == baseline,
                "{}: differs from the baseline path",
                isa.name()
            );
        }
    }
}
