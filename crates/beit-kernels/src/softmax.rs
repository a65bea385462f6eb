//! Softmax over the last dimension, optionally of `scores + bias` with a bias that tiles the
//! trailing dimensions (the attention bias): one pass forward (vectorised `exp`, see
//! [`crate::vmath`]) and one pass backward.

use candle::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};

use crate::cpu::{dot16, f32_data, par_rows};
use crate::dispatch::{fused_cpu_f32, multiversion};
use crate::vmath;

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
    Ok(par_rows(s.len() / n, n, |i, y| {
        let b = bias.map(|b| {
            let off = (i * n) % period;
            &b[off..off + n]
        });
        softmax_row(&s[i * n..(i + 1) * n], b, y);
    }))
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
        let dx = par_rows(y.len() / n.max(1), n, |i, dr| {
            let row = i * n..(i + 1) * n;
            grad_rows(&y[row.clone()], &g[row], n, dr)
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

multiversion! {
    /// `dx = y * (g - sum(g * y))` for each row (of `n`) of `y` and `g`.
    fn grad_rows / grad_rows_on(y: &[f32], g: &[f32], n: usize, dx: &mut [f32]) {
        for ((dr, yr), gr) in dx
            .chunks_exact_mut(n)
            .zip(y.chunks_exact(n))
            .zip(g.chunks_exact(n))
        {
            let dot = dot16(yr, gr);
            for i in 0..n {
                dr[i] = yr[i] * (gr[i] - dot);
            }
        }
    }
}

fn softmax_bwd(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    y.contiguous()?
        .apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBwdOp)
}

/// Softmax over the last dimension. f32 on the CPU: our kernel, with a single-pass backward.
/// Elsewhere: candle-nn's kernel (no backward) when no gradient is needed, else candle's
/// differentiable composition.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fused_cpu_f32(&[x]) {
        x.contiguous()?.apply_op1(SoftmaxOp)
    } else if x.track_op() {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
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
    softmax_last_dim(&scores.broadcast_add(bias)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{compare, var};
    use candle::{DType, Device, D};

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
        // A bias with the leading unit dimension, one without it (tiles the same way), and scores
        // big enough for several parallel tasks, whose rows must find their own bias rows.
        let big = var(&[8, 3, 41, 41], 0.0, 2.0);
        for (s, b) in [
            (&s, var(&[1, 3, 7, 7], 0.0, 1.0)),
            (&s, var(&[3, 7, 7], 0.0, 1.0)),
            (&big, var(&[3, 41, 41], 0.0, 1.0)),
        ] {
            compare(
                &[s, &b],
                |t| softmax_with_bias(t[0], t[1]),
                |t| candle_nn::ops::softmax(&t[0].broadcast_add(t[1])?, D::Minus1),
                1e-5,
            )?;
        }
        let bad = Tensor::zeros((2, 7, 7), DType::F32, &Device::Cpu)?;
        assert!(softmax_with_bias(s.as_tensor(), &bad).is_err());
        Ok(())
    }
}
