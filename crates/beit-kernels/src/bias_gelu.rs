//! `gelu_erf(h + b)`, the MLP activation with its bias add, in one pass forward and one pass for
//! both gradients (vectorised erf, see [`crate::vmath`]).

use candle::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{add_partials, chunk_rows, f32_data, par_rows, par_zeroed};
use crate::dispatch::fused_cpu_f32;
use crate::vmath;

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
        let y = par_rows(h.len() / n, n, |i, y| {
            vmath::bias_gelu_rows(&h[i * n..(i + 1) * n], b, y)
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
        let chunk = chunk_rows(rows, n) * n;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{compare, var};

    #[test]
    fn bias_gelu_matches_composition_values_and_gradients() -> Result<()> {
        // One task, and enough rows for several parallel tasks.
        for t in [9, 300] {
            let h = var(&[5, t, 33], 0.0, 2.0);
            let b = var(&[33], 0.0, 1.0);
            compare(
                &[&h, &b],
                |t| bias_gelu_erf(t[0], t[1]),
                |t| t[0].broadcast_add(t[1])?.gelu_erf(),
                1e-5,
            )?;
        }
        Ok(())
    }
}
