//! Head split / merge: the layout changes around attention, `(B*T, C)` to `(B, H, T, D)` and
//! back, with the q/v bias add folded into the split.

use candle::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::f32_data;
use crate::dispatch::fused_cpu_f32;

/// Geometry of a head split: `rows = batch * tokens` rows of `parts * heads * head_dim` columns,
/// of which `part` is taken.
#[derive(Debug, Clone, Copy)]
struct Heads {
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    parts: usize,
    part: usize,
}

impl Heads {
    fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// `(B*T, parts*C)` columns `part` (+ bias) into `(B, H, T, D)`.
    fn split(&self, x: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let (t, h, d, c) = (self.tokens, self.heads, self.head_dim, self.width());
        let row = self.parts * c;
        let off = self.part * c;
        let mut y = vec![0f32; self.batch * h * t * d];
        y.par_chunks_mut(t * d).enumerate().for_each(|(bh, yc)| {
            let (bi, hi) = (bh / h, bh % h);
            for ti in 0..t {
                let src = &x[(bi * t + ti) * row + off + hi * d..][..d];
                let dst = &mut yc[ti * d..(ti + 1) * d];
                match bias {
                    Some(b) => {
                        let b = &b[hi * d..(hi + 1) * d];
                        for i in 0..d {
                            dst[i] = src[i] + b[i];
                        }
                    }
                    None => dst.copy_from_slice(src),
                }
            }
        });
        y
    }

    /// `(B, H, T, D)` into `(B*T, C)` (the inverse of `split` for `parts == 1`).
    fn merge(&self, y: &[f32]) -> Vec<f32> {
        let (t, h, d, c) = (self.tokens, self.heads, self.head_dim, self.width());
        let mut x = vec![0f32; self.batch * t * c];
        x.par_chunks_mut(t * c).enumerate().for_each(|(bi, xc)| {
            for hi in 0..h {
                let src = &y[(bi * h + hi) * t * d..][..t * d];
                for ti in 0..t {
                    xc[ti * c + hi * d..ti * c + (hi + 1) * d]
                        .copy_from_slice(&src[ti * d..(ti + 1) * d]);
                }
            }
        });
        x
    }

    fn split_shape(&self) -> Shape {
        Shape::from((self.batch, self.heads, self.tokens, self.head_dim))
    }

    fn merged_shape(&self) -> Shape {
        Shape::from((self.batch * self.tokens, self.width()))
    }

    fn check_split_input(&self, l: &Layout) -> Result<()> {
        let want = (self.batch * self.tokens, self.parts * self.width());
        if l.dims() != [want.0, want.1] {
            candle::bail!("split_heads: input {:?}, expected {want:?}", l.dims());
        }
        Ok(())
    }
}

struct SplitHeadsOp(Heads);

impl CustomOp1 for SplitHeadsOp {
    fn name(&self) -> &'static str {
        "beit-split-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.0.check_split_input(l)?;
        let x = f32_data(s, l, self.name())?;
        Ok((CpuStorage::F32(self.0.split(x, None)), self.0.split_shape()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(merge_heads_no_bwd(grad, self.0)?))
    }
}

struct SplitHeadsBiasOp(Heads);

impl CustomOp2 for SplitHeadsBiasOp {
    fn name(&self) -> &'static str {
        "beit-split-heads-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.0.check_split_input(l1)?;
        let x = f32_data(s1, l1, self.name())?;
        let b = f32_data(s2, l2, self.name())?;
        if b.len() != self.0.width() {
            candle::bail!(
                "split_heads: bias of {}, expected {}",
                b.len(),
                self.0.width()
            );
        }
        Ok((
            CpuStorage::F32(self.0.split(x, Some(b))),
            self.0.split_shape(),
        ))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = merge_heads_no_bwd(grad, self.0)?;
        let db = dx.sum(0)?.reshape(bias.shape())?;
        Ok((Some(dx), Some(db)))
    }
}

struct MergeHeadsOp(Heads);

impl CustomOp1 for MergeHeadsOp {
    fn name(&self) -> &'static str {
        "beit-merge-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        if l.shape() != &self.0.split_shape() {
            candle::bail!(
                "merge_heads: input {:?}, expected {:?}",
                l.dims(),
                self.0.split_shape()
            );
        }
        let y = f32_data(s, l, self.name())?;
        Ok((CpuStorage::F32(self.0.merge(y)), self.0.merged_shape()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        Ok(Some(g.apply_op1_no_bwd(&SplitHeadsOp(self.0))?))
    }
}

fn merge_heads_no_bwd(grad: &Tensor, heads: Heads) -> Result<Tensor> {
    grad.contiguous()?.apply_op1_no_bwd(&MergeHeadsOp(heads))
}

/// Columns `[part*C, (part+1)*C)` of `x` `(B*T, parts*C)` (+ `bias` `(C)`) as heads
/// `(B, H, T, C/H)`, contiguous, in one pass (f32 on CPU; else reshape/transpose/copy).
/// Gradients flow to `x` and `bias` only when `parts == 1` (training projects q, k, v separately).
#[allow(clippy::too_many_arguments)]
pub fn split_heads(
    x: &Tensor,
    bias: Option<&Tensor>,
    batch: usize,
    tokens: usize,
    heads: usize,
    parts: usize,
    part: usize,
) -> Result<Tensor> {
    let (rows, cols) = x.dims2()?;
    if heads == 0 || parts == 0 || part >= parts || cols % (parts * heads) != 0 {
        candle::bail!("split_heads: {cols} columns, {parts} parts of {heads} heads");
    }
    if rows != batch * tokens {
        candle::bail!("split_heads: {rows} rows for {batch} x {tokens} tokens");
    }
    let width = cols / parts;
    let geo = Heads {
        batch,
        tokens,
        heads,
        head_dim: width / heads,
        parts,
        part,
    };
    let mut all: Vec<&Tensor> = vec![x];
    all.extend(bias);
    if fused_cpu_f32(&all) {
        let x = x.contiguous()?;
        return match (bias, parts) {
            (Some(b), 1) => x.apply_op2(&b.contiguous()?, SplitHeadsBiasOp(geo)),
            (None, 1) => x.apply_op1(SplitHeadsOp(geo)),
            (Some(b), _) => x.apply_op2_no_bwd(&b.contiguous()?, &SplitHeadsBiasOp(geo)),
            (None, _) => x.apply_op1_no_bwd(&SplitHeadsOp(geo)),
        };
    }
    let mut cols = x.narrow(1, part * width, width)?;
    if let Some(b) = bias {
        cols = cols.broadcast_add(b)?;
    }
    cols.reshape((batch, tokens, heads, width / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// Heads `(B, H, T, D)` back to `(B*T, H*D)` in one pass (f32 on CPU; else transpose/copy).
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (batch, heads, tokens, head_dim) = x.dims4()?;
    if fused_cpu_f32(&[x]) {
        let geo = Heads {
            batch,
            tokens,
            heads,
            head_dim,
            parts: 1,
            part: 0,
        };
        return x.contiguous()?.apply_op1(MergeHeadsOp(geo));
    }
    x.transpose(1, 2)?
        .reshape((batch * tokens, heads * head_dim))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{compare, max_diff, var};
    use candle::Device;

    #[test]
    fn head_split_and_merge_match_reshapes_values_and_gradients() -> Result<()> {
        let (b, t, h, d) = (2, 5, 3, 4);
        let x = var(&[b * t, h * d], 0.0, 1.0);
        let bias = var(&[h * d], 0.0, 1.0);
        let reference = |x: &Tensor, bias: Option<&Tensor>| -> Result<Tensor> {
            let x = match bias {
                Some(bb) => x.broadcast_add(bb)?,
                None => x.clone(),
            };
            x.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()
        };
        compare(
            &[&x, &bias],
            |ts| split_heads(ts[0], Some(ts[1]), b, t, h, 1, 0),
            |ts| reference(ts[0], Some(ts[1])),
            1e-6,
        )?;
        compare(
            &[&x],
            |ts| split_heads(ts[0], None, b, t, h, 1, 0),
            |ts| reference(ts[0], None),
            1e-6,
        )?;
        let y = var(&[b, h, t, d], 0.0, 1.0);
        compare(
            &[&y],
            |ts| merge_heads(ts[0]),
            |ts| ts[0].transpose(1, 2)?.reshape((b * t, h * d)),
            1e-6,
        )?;
        // One part of a fused (q, k, v) projection.
        let qkv = Tensor::randn(0f32, 1., (b * t, 3 * h * d), &Device::Cpu)?;
        let got = split_heads(&qkv, Some(bias.as_tensor()), b, t, h, 3, 2)?;
        let want = reference(&qkv.narrow(1, 2 * h * d, h * d)?, Some(bias.as_tensor()))?;
        assert!(max_diff(&got, &want) < 1e-6);
        assert!(split_heads(&qkv, None, b, t, h, 3, 3).is_err());
        assert!(split_heads(&qkv, None, b + 1, t, h, 3, 0).is_err());
        Ok(())
    }
}
