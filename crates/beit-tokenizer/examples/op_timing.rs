//! Forward+backward timings of the ops a dVAE step uses (CPU), to find slow backward passes.
use candle::{Device, Tensor, Var};
use std::time::Instant;

fn time<F: FnMut() -> candle::Result<()>>(name: &str, mut f: F) -> candle::Result<()> {
    f()?;
    let t = Instant::now();
    for _ in 0..3 {
        f()?;
    }
    println!("{name}: {:.1} ms", t.elapsed().as_secs_f64() * 1000.0 / 3.0);
    Ok(())
}

fn main() -> candle::Result<()> {
    let dev = Device::Cpu;
    let x = Var::randn(0f32, 1.0, (64, 64, 14, 14), &dev)?;
    let w3 = Var::randn(0f32, 0.1, (16, 64, 3, 3), &dev)?;
    let w1 = Var::randn(0f32, 0.1, (16, 64, 1, 1), &dev)?;
    time("conv2d 3x3 fwd", || x.conv2d(&w3, 1, 1, 1, 1).map(|_| ()))?;
    time("conv2d 3x3 fwd+bwd", || {
        x.conv2d(&w3, 1, 1, 1, 1)?.sum_all()?.backward().map(|_| ())
    })?;
    time("im2col 3x3 fwd+bwd", || {
        beit_kernels::conv2d_same(&x, &w3)?
            .sum_all()?
            .backward()
            .map(|_| ())
    })?;
    time("upsample2x fwd+bwd", || {
        beit_kernels::upsample2x(&x)?
            .sum_all()?
            .backward()
            .map(|_| ())
    })?;
    let xs = x.as_tensor().detach();
    time("im2col 3x3 fwd+bwd (w only)", || {
        beit_kernels::conv2d_same(&xs, &w3)?
            .sum_all()?
            .backward()
            .map(|_| ())
    })?;
    time("matmul 1x1 fwd+bwd", || {
        let y = w1
            .reshape((16, 64))?
            .broadcast_matmul(&x.reshape((64, 64, 196))?)?;
        y.sum_all()?.backward().map(|_| ())
    })?;
    time("relu fwd+bwd", || {
        x.relu()?.sum_all()?.backward().map(|_| ())
    })?;
    time("maxpool fwd+bwd", || {
        x.max_pool2d(2)?.sum_all()?.backward().map(|_| ())
    })?;
    time("upsample fwd+bwd", || {
        x.upsample_nearest2d(28, 28)?
            .sum_all()?
            .backward()
            .map(|_| ())
    })?;
    time("pad fwd+bwd", || {
        x.pad_with_zeros(2, 1, 1)?
            .pad_with_zeros(3, 1, 1)?
            .sum_all()?
            .backward()
            .map(|_| ())
    })?;
    time("narrow x9 + stack fwd+bwd", || {
        let xp = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
        let mut v = vec![];
        for dy in 0..3 {
            for dx in 0..3 {
                v.push(xp.narrow(2, dy, 14)?.narrow(3, dx, 14)?);
            }
        }
        Tensor::stack(&v, 2)?.sum_all()?.backward().map(|_| ())
    })?;
    let l = Var::randn(0f32, 1.0, (64, 512, 7, 7), &dev)?;
    time("softmax dim1 fwd+bwd", || {
        candle_nn::ops::softmax(&l, 1)?
            .sum_all()?
            .backward()
            .map(|_| ())
    })?;
    Ok(())
}
