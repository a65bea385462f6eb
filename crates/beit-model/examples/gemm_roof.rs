//! GEMM roof on this machine at ViT-B shapes (candle matmul, f32).
use candle::{Device, Tensor};
use std::time::Instant;
fn main() -> candle::Result<()> {
    let dev = Device::Cpu;
    let shapes = [
        (1576, 768, 2304),
        (1576, 768, 768),
        (1576, 768, 3072),
        (1576, 3072, 768),
        (768, 1576, 3072),
    ];
    for (m, k, n) in shapes {
        let a = Tensor::randn(0f32, 1., (m, k), &dev)?;
        let b = Tensor::randn(0f32, 1., (n, k), &dev)?.t()?; // weight layout, like Linear
        for _ in 0..3 {
            let _ = a.matmul(&b)?;
        }
        let mut ts = vec![];
        for _ in 0..10 {
            let t = Instant::now();
            let _c = a.matmul(&b)?;
            ts.push(t.elapsed().as_secs_f64());
        }
        ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "{m}x{k}x{n}: {:.1} GFLOP/s",
            2.0 * (m * k * n) as f64 / ts[5] / 1e9
        );
    }
    let a = Tensor::randn(0f32, 1., (8, 12, 197, 64), &dev)?;
    let b = Tensor::randn(0f32, 1., (8, 12, 197, 64), &dev)?.t()?;
    for _ in 0..3 {
        let _ = a.matmul(&b)?;
    }
    let mut ts = vec![];
    for _ in 0..10 {
        let t = Instant::now();
        let _c = a.matmul(&b)?;
        ts.push(t.elapsed().as_secs_f64());
    }
    ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "bmm 96x197x64x197: {:.1} GFLOP/s",
        2.0 * (96 * 197 * 64 * 197) as f64 / ts[5] / 1e9
    );
    Ok(())
}
