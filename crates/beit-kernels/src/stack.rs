//! `cat([a * scale, b, c], 0)` for three same-shaped tensors, as one op: the fused q/k/v weight and
//! bias of a trainable attention layer, assembled on every training step.
//!
//! candle's `cat` copies on the calling thread and the `* scale` is one more node and pass; here
//! the copy is split over the rayon threads, and the backward pass hands out views of the
//! incoming gradient (only the scaled third is a new tensor).

use candle::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use crate::cpu::{f32_data, par_filled};
use crate::dispatch::fused_cpu_f32;

/// `cat([a * scale, b, c], 0)` for tensors of one shape; gradients flow to all three.
pub fn stack3_scaled_first(a: &Tensor, b: &Tensor, c: &Tensor, scale: f64) -> Result<Tensor> {
    if a.dims() != b.dims() || a.dims() != c.dims() || a.rank() == 0 {
        candle::bail!(
            "stack3: shapes {:?}, {:?}, {:?} differ",
            a.dims(),
            b.dims(),
            c.dims()
        );
    }
    if !fused_cpu_f32(&[a, b, c]) {
        return Tensor::cat(&[&(a * scale)?, b, c], 0);
    }
    a.contiguous()?.apply_op3(
        &b.contiguous()?,
        &c.contiguous()?,
        Stack3 {
            scale: scale as f32,
        },
    )
}

struct Stack3 {
    scale: f32,
}

impl CustomOp3 for Stack3 {
    fn name(&self) -> &'static str {
        "beit-stack3"
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
        let parts = [
            f32_data(s1, l1, "beit-stack3")?,
            f32_data(s2, l2, "beit-stack3")?,
            f32_data(s3, l3, "beit-stack3")?,
        ];
        let n = parts[0].len();
        // SAFETY: the closure writes every element of its block, segment by segment.
        let out = unsafe {
            par_filled(3 * n, 1 << 15, |start, block| {
                // A block may straddle two of the parts: copy it segment by segment.
                let (mut i, mut rest) = (start, block);
                while !rest.is_empty() {
                    let (part, offset) = (i / n, i % n);
                    let (dst, tail) = rest.split_at_mut(rest.len().min(n - offset));
                    let s = if part == 0 { self.scale } else { 1.0 };
                    let src = &parts[part][offset..offset + dst.len()];
                    dst.iter_mut().zip(src).for_each(|(d, &x)| {
                        d.write(x * s);
                    });
                    i += dst.len();
                    rest = tail;
                }
            })
        };
        let mut dims = l1.shape().dims().to_vec();
        dims[0] *= 3;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = a.dim(0)?;
        let part = |i: usize, t: &Tensor| -> Result<Option<Tensor>> {
            if !t.track_op() {
                return Ok(None);
            }
            Ok(Some(grad.narrow(0, i * n, n)?))
        };
        let da = match part(0, a)? {
            Some(g) => Some((g * self.scale as f64)?),
            None => None,
        };
        Ok((da, part(1, b)?, part(2, c)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{Device, Var};

    #[test]
    fn matches_cat_with_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::randn(0f32, 1., (5, 3), &dev)?;
        let b = Var::randn(0f32, 1., (5, 3), &dev)?;
        let c = Var::randn(0f32, 1., (5, 3), &dev)?;
        let up = Tensor::randn(0f32, 1., (15, 3), &dev)?;
        let fused = stack3_scaled_first(&a, &b, &c, 0.125)?;
        let plain = Tensor::cat(&[&(a.as_tensor() * 0.125)?, &b, &c], 0)?;
        assert_eq!(fused.to_vec2::<f32>()?, plain.to_vec2::<f32>()?);
        let gf = (fused * &up)?.sum_all()?.backward()?;
        let gp = (plain * &up)?.sum_all()?.backward()?;
        for v in [&a, &b, &c] {
            let (x, y) = (gf.get(v).unwrap(), gp.get(v).unwrap());
            assert_eq!(x.to_vec2::<f32>()?, y.to_vec2::<f32>()?);
        }
        let bad = Tensor::zeros((4, 3), candle::DType::F32, &dev)?;
        assert!(stack3_scaled_first(&a, &b, &bad, 1.0).is_err());
        Ok(())
    }
}
