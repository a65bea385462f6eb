//! `y = x W^T + b` as one GEMM with the bias folded in, and a backward pass of two GEMMs plus one
//! column sum.
//!
//! The composition `x.matmul(&w.t()) + b` costs, per projection, a zero-filled output, a separate
//! pass to add the bias, and in the backward pass a transposed-weight node, a broadcast-add node
//! and a strided reduction for the bias gradient (each edge also zero-filled and added into by the
//! autograd engine). Here the output starts as copies of the bias and the GEMM accumulates into it;
//! the backward pass reads the weight and the gradient in place with strides.

use candle::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{add_partials, chunk_rows, f32_data, par_filled};
use crate::dispatch::fused_cpu_f32;
use crate::gemm::{filled_by, sgemm, Mat};

/// `x (.., K) * w (N, K)^T (+ b (N))` with one-pass forward and backward on f32 CPU tensors, or
/// the plain composition elsewhere.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let ts: Vec<&Tensor> = [Some(x), Some(w), b].into_iter().flatten().collect();
    if !fused_cpu_f32(&ts) {
        let y = crate::autocast_broadcast_matmul(x, &w.t()?)?;
        return match b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearBias),
        None => x.apply_op2(&w, LinearNoBias),
    }
}

struct LinearNoBias;
struct LinearBias;

/// `(rows, k, n)` of `x (.., K)` against `w (N, K)`.
fn dims(x: &Layout, w: &Layout) -> Result<(usize, usize, usize)> {
    let (n, k) = w.shape().dims2()?;
    let xk = x.shape().dims().last().copied().unwrap_or(0);
    if xk != k || k == 0 {
        candle::bail!(
            "linear: input {:?} does not match weight {:?}",
            x.shape(),
            w.shape()
        );
    }
    Ok((x.shape().elem_count() / k, k, n))
}

fn out_shape(x: &Layout, n: usize) -> Shape {
    let mut d = x.shape().dims().to_vec();
    *d.last_mut().expect("checked in dims") = n;
    Shape::from(d)
}

fn forward(x: &[f32], w: &[f32], b: Option<&[f32]>, rows: usize, k: usize, n: usize) -> Vec<f32> {
    let gemm_into = |y: *mut f32, accumulate: bool| {
        // SAFETY: x is (rows, k), w is (n, k) read as its transpose (k, n), y is (rows, n).
        unsafe {
            sgemm(
                rows,
                n,
                k,
                y,
                n,
                accumulate,
                Mat::rows(x.as_ptr(), k),
                Mat::transposed(w.as_ptr(), k),
                true,
            )
        }
    };
    match b {
        Some(b) => {
            // Every row starts as the bias (written by the rayon threads); the GEMM accumulates
            // onto it.
            // SAFETY: blocks are whole rows (they start at multiples of n and their lengths are
            // multiples of n), and every element of each row is written.
            let mut y = unsafe {
                par_filled(rows * n, n, |_, block| {
                    for row in block.chunks_mut(n) {
                        row.iter_mut().zip(b).for_each(|(e, &v)| {
                            e.write(v);
                        })
                    }
                })
            };
            gemm_into(y.as_mut_ptr(), true);
            y
        }
        // SAFETY: the GEMM writes all rows * n outputs.
        None => unsafe { filled_by(rows * n, |y| gemm_into(y, false)) },
    }
}

impl CustomOp2 for LinearNoBias {
    fn name(&self) -> &'static str {
        "beit-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, k, n) = dims(l1, l2)?;
        let x = f32_data(s1, l1, self.name())?;
        let w = f32_data(s2, l2, self.name())?;
        let y = forward(x, w, None, rows, k, n);
        Ok((CpuStorage::F32(y), out_shape(l1, n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = backward(x, w, grad)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "beit-linear-bias"
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
        let (rows, k, n) = dims(l1, l2)?;
        let x = f32_data(s1, l1, self.name())?;
        let w = f32_data(s2, l2, self.name())?;
        let b = f32_data(s3, l3, self.name())?;
        if b.len() != n {
            candle::bail!(
                "linear: bias {:?} does not match weight {:?}",
                l3.shape(),
                l2.shape()
            );
        }
        let y = forward(x, w, Some(b), rows, k, n);
        Ok((CpuStorage::F32(y), out_shape(l1, n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (dx, dw) = backward(x, w, &grad)?;
        let db = if b.track_op() {
            Some(grad.apply_op1_no_bwd(&ColumnSum)?.reshape(b.shape())?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// `dx = grad * w` (skipped when `x` needs no gradient) and `dw = grad^T * x`.
fn backward(x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let grad = grad.contiguous()?;
    let dx = if x.track_op() {
        Some(
            grad.apply_op2_no_bwd(w, &BackwardGemm::InputGrad)?
                .reshape(x.shape())?,
        )
    } else {
        None
    };
    let dw = if w.track_op() {
        Some(grad.apply_op2_no_bwd(x, &BackwardGemm::WeightGrad)?)
    } else {
        None
    };
    Ok((dx, dw))
}

/// The two GEMMs of the backward pass, on `(grad (rows, N), other)`.
#[derive(Clone, Copy)]
enum BackwardGemm {
    /// `other = w (N, K)`: `dx = grad * w`, `(rows, K)`.
    InputGrad,
    /// `other = x (rows, K)`: `dw = grad^T * x`, `(N, K)`.
    WeightGrad,
}

impl CustomOp2 for BackwardGemm {
    fn name(&self) -> &'static str {
        match self {
            Self::InputGrad => "beit-linear-dx",
            Self::WeightGrad => "beit-linear-dw",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = f32_data(s1, l1, self.name())?;
        let other = f32_data(s2, l2, self.name())?;
        let n = *l1.shape().dims().last().unwrap_or(&1);
        let k = *l2.shape().dims().last().unwrap_or(&1);
        let rows = g.len() / n;
        // (m, inner, lhs) of the product; the right-hand side is always `other` as (inner, k).
        let (m, inner, lhs) = match self {
            Self::InputGrad => (rows, n, Mat::rows(g.as_ptr(), n)),
            Self::WeightGrad => (n, rows, Mat::transposed(g.as_ptr(), n)),
        };
        // SAFETY: lhs is (m, inner) over g, `other` is (inner, k) row-major, the output is
        // (m, k) and entirely written by the GEMM.
        let out = unsafe {
            filled_by(m * k, |dst| {
                sgemm(
                    m,
                    k,
                    inner,
                    dst,
                    k,
                    false,
                    lhs,
                    Mat::rows(other.as_ptr(), k),
                    true,
                )
            })
        };
        Ok((CpuStorage::F32(out), Shape::from((m, k))))
    }
}

/// Sum over the rows of a `(rows, N)` matrix: `(N)`.
struct ColumnSum;

impl candle::CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "beit-column-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = f32_data(s, l, self.name())?;
        let n = *l.shape().dims().last().unwrap_or(&1);
        Ok((CpuStorage::F32(column_sum(g, n)), Shape::from(n)))
    }
}

/// Column sums of a row-major `(rows, n)` matrix, in parallel over row blocks.
pub(crate) fn column_sum(g: &[f32], n: usize) -> Vec<f32> {
    let rows = g.len() / n;
    let chunk = chunk_rows(rows, n) * n;
    g.par_chunks(chunk)
        .map(|c| {
            let mut acc = vec![0f32; n];
            for r in c.chunks_exact(n) {
                for (a, v) in acc.iter_mut().zip(r) {
                    *a += v;
                }
            }
            acc
        })
        .reduce(|| vec![0f32; n], add_partials)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_diff;
    use candle::{Device, Var};

    #[test]
    fn linear_matches_the_composition_with_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (2, 5, 24), &dev)?;
        let w = Var::randn(0f32, 1., (40, 24), &dev)?;
        let b = Var::randn(0f32, 1., 40, &dev)?;
        let up = Tensor::randn(0f32, 1., (2, 5, 40), &dev)?;
        for with_bias in [true, false] {
            let bias = with_bias.then_some(b.as_tensor());
            let fused = linear(&x, &w, bias)?;
            let plain = {
                let y = x.broadcast_matmul(&w.t()?)?;
                match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            };
            assert!(max_diff(&fused, &plain) < 1e-5);
            let gf = (fused * &up)?.sum_all()?.backward()?;
            let gp = (plain * &up)?.sum_all()?.backward()?;
            for v in [&x, &w] {
                let (a, b) = (gf.get(v).unwrap(), gp.get(v).unwrap());
                assert_eq!(a.dims(), b.dims());
                assert!(max_diff(a, b) < 1e-4);
            }
            if with_bias {
                assert!(max_diff(gf.get(&b).unwrap(), gp.get(&b).unwrap()) < 1e-4);
            }
        }
        Ok(())
    }

    #[test]
    fn a_wrong_weight_shape_is_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((3, 8), candle::DType::F32, &dev)?;
        let w = Tensor::zeros((4, 7), candle::DType::F32, &dev)?;
        let err = linear(&x, &w, None).unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
        Ok(())
    }
}
