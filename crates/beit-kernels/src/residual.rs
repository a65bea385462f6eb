//! The residual add of a LayerScale'd, stochastic-depth-dropped branch,
//! `x + drop_path(lambda * h)`, in one pass forward and one pass backward.

use candle::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{add_partials, chunk_rows, f32_data, par_rows, par_zeroed};
use crate::dispatch::fused_cpu_f32;

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
        let y = par_rows(rows, c, |r, yr| {
            let (xr, hr) = (&x[r * c..(r + 1) * c], &h[r * c..(r + 1) * c]);
            let elems = yr.iter_mut().zip(xr.iter().zip(hr).zip(lambda));
            match &self.keep {
                // Same operation order as `x + (h * lambda) * keep`.
                Some(_) => {
                    let k = self.factor(r, per_sample);
                    elems.for_each(|(y, ((x, h), l))| *y = h * l * k + x);
                }
                None => elems.for_each(|(y, ((x, h), l))| *y = h * l + x),
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
        let chunk = chunk_rows(rows, c);
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

/// `x + keep[b] * (h * lambda)`: the residual add of a block's branch `h`, scaled by LayerScale's
/// `lambda` `(C)` (if the model has one) and by stochastic depth's per-sample factors `keep`
/// (0 or `1/keep_prob` for each of the B samples; `None` outside training). `x` and `h` are
/// `(B, ..., C)`. With `lambda`, f32 on the CPU: one pass forward and backward; otherwise the
/// composition, in the same order of operations.
pub fn residual(
    x: &Tensor,
    h: &Tensor,
    lambda: Option<&Tensor>,
    keep: Option<Vec<f32>>,
) -> Result<Tensor> {
    if x.dims() != h.dims() {
        candle::bail!("residual: x {:?} and h {:?} differ", x.dims(), h.dims());
    }
    if let Some(k) = &keep {
        if k.len() != x.dim(0)? {
            candle::bail!(
                "residual: {} keep factors for a batch of {}",
                k.len(),
                x.dim(0)?
            );
        }
    }
    if let Some(lambda) = lambda {
        if fused_cpu_f32(&[x, h, lambda]) {
            return x
                .contiguous()?
                .apply_op3(&h.contiguous()?, lambda, ScaledResidualOp { keep });
        }
    }
    let branch = match lambda {
        Some(lambda) => h.broadcast_mul(lambda)?,
        None => h.clone(),
    };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{compare, var};
    use candle::Device;

    #[test]
    fn residual_matches_composition_values_and_gradients() -> Result<()> {
        // Small (one task) and big enough for several parallel tasks, whose rows must find their
        // own sample's keep factor.
        for t in [5, 700] {
            residual_case(t)?;
        }
        Ok(())
    }

    fn residual_case(t: usize) -> Result<()> {
        let x = var(&[3, t, 21], 0.0, 1.0);
        let h = var(&[3, t, 21], 0.0, 1.0);
        let l = var(&[21], 0.1, 0.05);
        for keep in [None, Some(vec![2.0, 0.0, 2.0])] {
            let k2 = keep.clone();
            compare(
                &[&x, &h, &l],
                move |t| residual(t[0], t[1], Some(t[2]), keep.clone()),
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
        assert!(residual(
            x.as_tensor(),
            h.as_tensor(),
            Some(l.as_tensor()),
            Some(vec![1.0])
        )
        .is_err());
        Ok(())
    }

    #[test]
    fn without_layer_scale_the_branch_is_added_as_is() -> Result<()> {
        let x = Tensor::randn(0f32, 1., (2, 3, 4), &Device::Cpu)?;
        let h = Tensor::randn(0f32, 1., (2, 3, 4), &Device::Cpu)?;
        let y = residual(&x, &h, None, Some(vec![2.0, 0.0]))?;
        let k = Tensor::from_vec(vec![2f32, 0.0], (2, 1, 1), &Device::Cpu)?;
        let want = (h.broadcast_mul(&k)? + &x)?;
        let (y, want) = (y.flatten_all()?, want.flatten_all()?);
        assert_eq!(y.to_vec1::<f32>()?, want.to_vec1::<f32>()?);
        assert_eq!(
            residual(&x, &h, None, None)?
                .flatten_all()?
                .to_vec1::<f32>()?,
            (&h + &x)?.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }
}
