//! `a (m, k) * b (k, n)` for 2-D f32 CPU tensors through [`sgemm`], whose threaded calls open one
//! parallel region per product (candle's matmul lets the `gemm` crate open one per block of `k`),
//! with a backward pass of two more products that read their transposed operands through strides.

use candle::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use crate::cpu::f32_data;
use crate::dispatch::fused_cpu_f32;
use crate::gemm::{filled_by, sgemm, Mat};

/// `a * b` for matrices; f32 CPU tensors take [`sgemm`], anything else candle's `matmul`.
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !fused_cpu_f32(&[a, b]) || a.rank() != 2 || b.rank() != 2 {
        return a.matmul(b);
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, Product::PLAIN)
}

/// `op(a) * op(b)` of two row-major matrices, `op` transposing where the flag says so.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Product {
    transpose_a: bool,
    transpose_b: bool,
}

impl Product {
    const PLAIN: Self = Self {
        transpose_a: false,
        transpose_b: false,
    };

    /// `(rows, cols)` of `op(x)` for a stored `(r, c)` matrix, and its operand view.
    fn operand(x: &[f32], (r, c): (usize, usize), transpose: bool) -> ((usize, usize), Mat) {
        if transpose {
            ((c, r), Mat::transposed(x.as_ptr(), c))
        } else {
            ((r, c), Mat::rows(x.as_ptr(), c))
        }
    }
}

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        "beit-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = f32_data(s1, l1, self.name())?;
        let b = f32_data(s2, l2, self.name())?;
        let ((m, k), lhs) = Self::operand(a, l1.shape().dims2()?, self.transpose_a);
        let ((k2, n), rhs) = Self::operand(b, l2.shape().dims2()?, self.transpose_b);
        if k != k2 {
            candle::bail!(
                "matmul: {:?} and {:?} do not chain (transposed: {}, {})",
                l1.shape(),
                l2.shape(),
                self.transpose_a,
                self.transpose_b
            );
        }
        // SAFETY: lhs is (m, k) and rhs (k, n) over the two contiguous inputs (checked lengths
        // via their layouts), and the fresh (m, n) output is entirely written by the GEMM.
        let out = unsafe { filled_by(m * n, |dst| sgemm(m, n, k, dst, n, false, lhs, rhs, true)) };
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if *self != Self::PLAIN {
            candle::bail!("matmul: only the plain product has a backward pass");
        }
        let grad = grad.contiguous()?;
        // d(a b) = da b + a db: da = grad b^T, db = a^T grad.
        let da = if a.track_op() {
            let op = Self {
                transpose_a: false,
                transpose_b: true,
            };
            Some(grad.apply_op2_no_bwd(b, &op)?)
        } else {
            None
        };
        let db = if b.track_op() {
            let op = Self {
                transpose_a: true,
                transpose_b: false,
            };
            Some(a.apply_op2_no_bwd(&grad, &op)?)
        } else {
            None
        };
        Ok((da, db))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{compare, var};
    use candle::Device;

    /// Small, tall (row slabs) and wide (column slabs) products, forward and both gradients,
    /// against candle's matmul. Inputs are scaled by `k^(-1/4)` so that products are O(1).
    #[test]
    fn matches_candle_forward_and_backward() -> Result<()> {
        for &(m, k, n) in &[(3, 5, 4), (700, 96, 40), (40, 300, 900), (96, 5000, 288)] {
            let std = (k as f32).powf(-0.25);
            let (a, b) = (var(&[m, k], 0., std), var(&[k, n], 0., std));
            compare(
                &[&a, &b],
                |t| matmul(t[0], t[1]),
                |t| t[0].matmul(t[1]),
                1e-5,
            )?;
        }
        Ok(())
    }

    #[test]
    fn shapes_that_do_not_chain_are_an_error() -> Result<()> {
        let a = Tensor::zeros((3, 4), candle::DType::F32, &Device::Cpu)?;
        let err = matmul(&a, &a).unwrap_err().to_string();
        assert!(err.contains("do not chain"), "{err}");
        Ok(())
    }
}
