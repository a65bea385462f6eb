//! Building blocks shared by the DALL-E encoder/decoder and our own dVAE: a convolution with
//! DALL-E's parameter names (`w`, `b`) and "same" padding, and the pre-activation residual block.

use candle::{Module, Tensor};
use candle_nn::VarBuilder;

/// A stride-1 convolution with `(kw - 1) / 2` zero padding, parameters named `w` `(out, in, kw, kw)`
/// and `b` `(out,)` as in `dall_e.utils.Conv2d`.
#[derive(Debug, Clone)]
pub struct Conv {
    w: Tensor,
    b: Tensor,
}

impl Conv {
    /// Fetch `w` and `b` for an `n_in -> n_out` convolution with a `kw x kw` kernel.
    pub fn new(n_in: usize, n_out: usize, kw: usize, vb: VarBuilder) -> candle::Result<Self> {
        let w = vb.get((n_out, n_in, kw, kw), "w")?;
        let b = vb.get(n_out, "b")?;
        Ok(Self { w, b })
    }

    /// The kernel `(out, in, kw, kw)`.
    pub fn weight(&self) -> &Tensor {
        &self.w
    }

    /// The bias `(out,)`.
    pub fn bias(&self) -> &Tensor {
        &self.b
    }
}

impl Module for Conv {
    /// `(B, in, H, W) -> (B, out, H, W)`.
    fn forward(&self, x: &Tensor) -> candle::Result<Tensor> {
        beit_kernels::conv2d_same_bias(x, &self.w, &self.b)
    }
}

/// Shapes of a [`Conv`]'s parameters under `prefix` (`prefix.w`, `prefix.b`).
pub(crate) fn conv_params(
    prefix: &str,
    n_in: usize,
    n_out: usize,
    kw: usize,
) -> Vec<(String, Vec<usize>)> {
    vec![
        (format!("{prefix}.w"), vec![n_out, n_in, kw, kw]),
        (format!("{prefix}.b"), vec![n_out]),
    ]
}

/// The residual block of the DALL-E dVAE: `id_path(x) + post_gain * res_path(x)`.
///
/// `res_path` is four convolutions, each preceded by a ReLU, `n_in -> n_hid -> n_hid -> n_hid ->
/// n_out` with `n_hid = n_out / 4`; `id_path` is a 1x1 convolution when the width changes, else
/// the identity. `post_gain = 1 / n_layers^2` (n_layers = blocks in the whole network) keeps the
/// residual branches small at initialisation. The encoder uses kernels 3,3,3,1 and the decoder
/// 1,3,3,3. Parameter names: `id_path.{w,b}` and `res_path.conv_{1..4}.{w,b}`.
#[derive(Debug, Clone)]
pub struct ResBlock {
    id_path: Option<Conv>,
    res_path: Vec<Conv>,
    post_gain: f64,
}

impl ResBlock {
    /// Build an `n_in -> n_out` block with the four given kernel sizes. `n_out` must be a multiple of 4.
    pub fn new(
        n_in: usize,
        n_out: usize,
        kernels: [usize; 4],
        n_layers: usize,
        vb: VarBuilder,
    ) -> candle::Result<Self> {
        let n_hid = n_out / 4;
        let id_path = if n_in != n_out {
            Some(Conv::new(n_in, n_out, 1, vb.pp("id_path"))?)
        } else {
            None
        };
        let widths = [n_in, n_hid, n_hid, n_hid, n_out];
        let res = vb.pp("res_path");
        let res_path = (0..4)
            .map(|i| {
                Conv::new(
                    widths[i],
                    widths[i + 1],
                    kernels[i],
                    res.pp(format!("conv_{}", i + 1)),
                )
            })
            .collect::<candle::Result<Vec<_>>>()?;
        Ok(Self {
            id_path,
            res_path,
            post_gain: 1.0 / (n_layers * n_layers) as f64,
        })
    }

    /// Parameter shapes of a block under `prefix`.
    pub(crate) fn params(
        prefix: &str,
        n_in: usize,
        n_out: usize,
        kernels: [usize; 4],
    ) -> Vec<(String, Vec<usize>)> {
        let n_hid = n_out / 4;
        let mut out = Vec::new();
        if n_in != n_out {
            out.extend(conv_params(&format!("{prefix}.id_path"), n_in, n_out, 1));
        }
        let widths = [n_in, n_hid, n_hid, n_hid, n_out];
        for i in 0..4 {
            out.extend(conv_params(
                &format!("{prefix}.res_path.conv_{}", i + 1),
                widths[i],
                widths[i + 1],
                kernels[i],
            ));
        }
        out
    }
}

impl Module for ResBlock {
    fn forward(&self, x: &Tensor) -> candle::Result<Tensor> {
        let id = match &self.id_path {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let mut h = x.clone();
        for conv in &self.res_path {
            h = conv.forward(&h.relu()?)?;
        }
        id + (h * self.post_gain)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;

    #[test]
    fn im2col_convolution_equals_conv2d() -> candle::Result<()> {
        let dev = Device::Cpu;
        for kw in [3, 7] {
            let x = Tensor::randn(0f32, 1.0, (2, 5, 9, 7), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (4, 5, kw, kw), &dev)?;
            let w = candle::Var::from_tensor(&w)?;
            let a = beit_kernels::conv2d_same(&x, &w)?;
            let b = x.conv2d(&w, (kw - 1) / 2, 1, 1, 1)?;
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "kw {kw}: {diff}");
        }
        Ok(())
    }
}
