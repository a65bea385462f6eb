//! The convolutional pieces of the segmentation heads: `BatchNorm2d`, 2-D convolutions (plain and
//! transposed) and the Conv-BN-ReLU block (`BeitConvModule` in `transformers`, mmseg's
//! `ConvModule`).

use std::sync::Arc;

use candle::{DType, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};

use super::sync_bn::{global_stats, local_stats, BatchStatsSync};

/// PyTorch's default `BatchNorm2d` epsilon.
pub const BN_EPS: f64 = 1e-5;
/// PyTorch's default `BatchNorm2d` momentum (weight of the new batch in the running averages).
pub const BN_MOMENTUM: f64 = 0.1;

/// The init `transformers` gives convolution weights: normal with std `initializer_range`.
fn conv_init(std: f64) -> Init {
    Init::Randn {
        mean: 0.0,
        stdev: std,
    }
}

/// `nn.BatchNorm2d(C)`: `weight`, `bias`, `running_mean`, `running_var`, `num_batches_tracked`.
///
/// Evaluation normalises with the running statistics. Training normalises with the batch's mean
/// and biased variance (differentiably: gradients flow through the statistics, as in PyTorch) and
/// updates the running averages in place, `r ← (1 − m)·r + m·s` with momentum `m` = 0.1 and the
/// *unbiased* batch variance for `running_var`, and adds one to `num_batches_tracked`.
///
/// The running statistics are variables (so that a `VarMap` saves them) that never receive a
/// gradient; [`is_buffer`] tells an optimiser to leave them alone.
///
/// Synchronised ([`BatchNorm2d::synchronise`], mmseg's `SyncBN`), training computes the batch
/// statistics over the samples of every process of a data-parallel run
/// ([`super::sync_bn`]): the output, the gradients and the running statistics are those of one
/// process holding the whole batch.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    num_batches_tracked: Var,
    eps: f64,
    momentum: f64,
    sync: Option<Arc<dyn BatchStatsSync>>,
}

/// Whether a parameter name is a BatchNorm buffer (running statistics, batch counter): state
/// that training updates without gradients and that weight decay must not touch.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with(".running_mean")
        || name.ends_with(".running_var")
        || name.ends_with(".num_batches_tracked")
}

impl BatchNorm2d {
    /// Load (or initialise: weight 1, bias 0, mean 0, var 1) under `vb`.
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
        let running_mean = vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?;
        let running_var = vb.get_with_hints(channels, "running_var", Init::Const(1.0))?;
        // A scalar int64 in PyTorch files; kept as f32 here and written back as int64.
        let tracked = vb.get_with_hints((), "num_batches_tracked", Init::Const(0.0))?;
        Ok(Self {
            weight,
            bias,
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
            num_batches_tracked: Var::from_tensor(&tracked)?,
            eps: BN_EPS,
            momentum: BN_MOMENTUM,
            sync: None,
        })
    }

    /// The running mean (detached).
    pub fn running_mean(&self) -> Tensor {
        self.running_mean.as_detached_tensor()
    }

    /// The running variance (detached).
    pub fn running_var(&self) -> Tensor {
        self.running_var.as_detached_tensor()
    }

    /// Compute the training statistics over every process of `sync` (`Some`), or over this
    /// process's batch alone (`None`, the default). Evaluation is unaffected.
    pub fn synchronise(&mut self, sync: Option<Arc<dyn BatchStatsSync>>) {
        self.sync = sync;
    }

    /// Whether the training statistics are synchronised across processes.
    pub fn is_synchronised(&self) -> bool {
        self.sync.is_some()
    }

    /// Normalise `x` `(B, C, H, W)`; `train` selects batch statistics (and updates the running ones).
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let c = x.dims4()?.1;
        let shape = (1, c, 1, 1);
        let weight = self.weight.reshape(shape)?;
        let bias = self.bias.reshape(shape)?;
        if !train {
            let mean = self.running_mean.as_detached_tensor().reshape(shape)?;
            let var = self.running_var.as_detached_tensor().reshape(shape)?;
            let inv_std = (var + self.eps)?.sqrt()?.recip()?;
            return x
                .broadcast_sub(&mean)?
                .broadcast_mul(&inv_std.broadcast_mul(&weight)?)?
                .broadcast_add(&bias);
        }
        let stats = match &self.sync {
            None => local_stats(x)?,
            Some(sync) => global_stats(x, sync)?,
        };
        let n = stats.count;
        if n < 2 {
            candle::bail!(
                "BatchNorm2d in training mode needs more than one value per channel, got input {:?}{}",
                x.dims(),
                if self.sync.is_some() { " (over all processes)" } else { "" }
            );
        }
        let y = stats
            .centred
            .broadcast_div(&(&stats.var + self.eps)?.sqrt()?)?
            .broadcast_mul(&weight)?
            .broadcast_add(&bias)?;
        self.update_running_stats(&stats.mean, &stats.var, n)?;
        Ok(y)
    }

    /// The running averages (outside the graph) after a training batch of `n` values per channel
    /// with `mean` and biased `var`; one more batch tracked.
    fn update_running_stats(&self, mean: &Tensor, var: &Tensor, n: usize) -> Result<()> {
        let m = self.momentum;
        let batch_mean = mean.detach().flatten_all()?.to_dtype(DType::F32)?;
        let unbiased = (var.detach().flatten_all()? * (n as f64 / (n - 1) as f64))?;
        let rm = self.running_mean.as_detached_tensor();
        let rv = self.running_var.as_detached_tensor();
        let new_mean = ((rm.to_dtype(DType::F32)? * (1.0 - m))? + (batch_mean * m)?)?;
        let new_var =
            ((rv.to_dtype(DType::F32)? * (1.0 - m))? + (unbiased.to_dtype(DType::F32)? * m)?)?;
        self.running_mean.set(&new_mean.to_dtype(rm.dtype())?)?;
        self.running_var.set(&new_var.to_dtype(rv.dtype())?)?;
        let t = self.num_batches_tracked.as_detached_tensor();
        self.num_batches_tracked.set(&(t + 1.0)?)?;
        Ok(())
    }
}

/// `nn.Conv2d` with square kernel, stride 1 and optional bias.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    padding: usize,
    dilation: usize,
}

impl Conv2d {
    /// `weight` `(out, in, k, k)` (and `bias` `(out)`) under `vb`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        padding: usize,
        dilation: usize,
        bias: bool,
        init_std: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get_with_hints(
            (out_ch, in_ch, kernel, kernel),
            "weight",
            conv_init(init_std),
        )?;
        let bias = if bias {
            Some(vb.get_with_hints(out_ch, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            padding,
            dilation,
        })
    }

    /// Convolve `x` `(B, in, H, W)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv2d(&self.weight, self.padding, 1, self.dilation, 1)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }
}

/// `nn.ConvTranspose2d(C_in, C_out, kernel_size=2, stride=2)` with bias: doubles the resolution.
#[derive(Debug, Clone)]
pub struct Upsample2x {
    weight: Tensor,
    bias: Tensor,
}

impl Upsample2x {
    /// `weight` `(in, out, 2, 2)` and `bias` `(out)` under `vb`.
    pub fn new(in_ch: usize, out_ch: usize, init_std: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints((in_ch, out_ch, 2, 2), "weight", conv_init(init_std))?,
            bias: vb.get_with_hints(out_ch, "bias", Init::Const(0.0))?,
        })
    }

    /// `(B, in, H, W)` -> `(B, out, 2H, 2W)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.conv_transpose2d(&self.weight, 0, 0, 2, 1)?
            .broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }
}

/// `nn.MaxPool2d(2, 2)` (floor mode: an odd last row or column is dropped), differentiable with
/// PyTorch's gradient: all of a window's gradient goes to its first maximum in row-major order.
///
/// candle's own `max_pool2d` backward scales the gradient by the fraction of maxima in the window
/// (a quarter for a unique maximum), so the window maximum is taken here with `argmax` (which
/// keeps the first maximum, as PyTorch) and `gather` (whose backward scatters to that element).
pub fn max_pool_2x2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (ho, wo) = (h / 2, w / 2);
    if ho == 0 || wo == 0 {
        candle::bail!("max_pool_2x2: input {h}x{w} is smaller than the 2x2 window");
    }
    let x = if h % 2 == 1 || w % 2 == 1 {
        x.narrow(2, 0, 2 * ho)?.narrow(3, 0, 2 * wo)?
    } else {
        x.clone()
    };
    let windows = x
        .reshape((b, c, ho, 2, wo, 2))?
        .permute((0, 1, 2, 4, 3, 5))?
        .contiguous()?
        .reshape((b, c, ho, wo, 4))?;
    let first_max = windows.detach().argmax_keepdim(4)?;
    windows.gather(&first_max, 4)?.squeeze(4)
}

/// Conv2d (no bias) -> BatchNorm2d -> ReLU, under `conv.*` and `bn.*`.
#[derive(Debug, Clone)]
pub struct ConvBnRelu {
    conv: Conv2d,
    bn: BatchNorm2d,
}

impl ConvBnRelu {
    /// A block with a `kernel`x`kernel` convolution and "same" padding.
    pub fn new(
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        init_std: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(
                in_ch,
                out_ch,
                kernel,
                kernel / 2,
                1,
                false,
                init_std,
                vb.pp("conv"),
            )?,
            bn: BatchNorm2d::new(out_ch, vb.pp("bn"))?,
        })
    }

    /// The BatchNorm of the block.
    pub fn bn(&self) -> &BatchNorm2d {
        &self.bn
    }

    /// The BatchNorm of the block, to change.
    pub fn bn_mut(&mut self) -> &mut BatchNorm2d {
        &mut self.bn
    }

    /// Apply to `x` `(B, in, H, W)`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.bn.forward(&self.conv.forward(x)?, train)?.relu()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{Device, Var};
    use candle_nn::VarMap;

    #[test]
    fn max_pool_gradient_goes_to_the_first_maximum() -> Result<()> {
        let dev = Device::Cpu;
        // One 2x2 window with a unique maximum, one with a tie (3, 3), and an odd column dropped.
        let x = Var::new(&[[[[1f32, 5., 3., 3., 9.], [2., 0., 1., 3., 9.]]]], &dev)?;
        let y = max_pool_2x2(x.as_tensor())?;
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![5., 3.]);
        let g = (y * Tensor::new(&[[[[10f32, 20.]]]], &dev)?)?
            .sum_all()?
            .backward()?;
        let gx = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(gx, vec![0., 10., 20., 0., 0., 0., 0., 0., 0., 0.]);
        Ok(())
    }

    #[test]
    fn batchnorm_training_updates_running_statistics_like_torch() -> Result<()> {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let bn = BatchNorm2d::new(2, vb.pp("bn"))?;
        // Channel 0 holds 1, 2, 3, 4; channel 1 holds 0, 0, 0, 8.
        let x = Tensor::new(&[[[[1f32, 2.], [3., 4.]], [[0., 0.], [0., 8.]]]], &dev)?;
        let y = bn.forward(&x, true)?;
        // Batch mean 2.5 / 2, biased var 1.25 / 12, unbiased 5/3 / 16.
        let rm = bn.running_mean().to_vec1::<f32>()?;
        let rv = bn.running_var().to_vec1::<f32>()?;
        assert!(
            (rm[0] - 0.25).abs() < 1e-6 && (rm[1] - 0.2).abs() < 1e-6,
            "{rm:?}"
        );
        assert!(
            (rv[0] - (0.9 + 0.1 * 5.0 / 3.0)).abs() < 1e-6 && (rv[1] - 2.5).abs() < 1e-6,
            "{rv:?}"
        );
        let y0 = y.flatten_all()?.to_vec1::<f32>()?;
        let want = (1.0 - 2.5) / (1.25f32 + 1e-5).sqrt();
        assert!((y0[0] - want).abs() < 1e-5, "{y0:?}");
        // The buffers live in the VarMap (so checkpoints carry them) and are flagged as buffers.
        let names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
        assert!(names.iter().any(|n| n == "bn.running_var"), "{names:?}");
        assert_eq!(names.iter().filter(|n| is_buffer(n)).count(), 3);
        let tracked = varmap.data().lock().unwrap()["bn.num_batches_tracked"]
            .as_tensor()
            .to_scalar::<f32>()?;
        assert_eq!(tracked, 1.0);
        // A single value per channel cannot be normalised in training mode.
        let one = Tensor::zeros((1, 2, 1, 1), DType::F32, &dev)?;
        assert!(bn.forward(&one, true).is_err());
        assert!(bn.forward(&one, false).is_ok());
        Ok(())
    }
}
