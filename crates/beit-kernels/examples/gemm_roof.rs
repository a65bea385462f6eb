//! GEMM throughput at ViT-B/16 shapes (batch 8, 197 tokens), f32: candle's matmul, our fused
//! `linear` and the fused attention core, then the element-wise kernels on the instruction-set
//! path in use. Run with `RAYON_NUM_THREADS=<n>` (and `BEIT_KERNELS_ISA=scalar|avx2|avx512|neon`
//! to time another path): `cargo run --release -p beit-kernels --example gemm_roof`.
use beit_kernels::{attention_core, bias_gelu_erf, layer_norm, linear, softmax_with_bias};
use candle::{Device, Tensor};
use std::time::Instant;

fn median_s(mut f: impl FnMut() -> candle::Result<Tensor>) -> candle::Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let mut ts = vec![];
    for _ in 0..11 {
        let t = Instant::now();
        f()?;
        ts.push(t.elapsed().as_secs_f64());
    }
    ts.sort_by(|a, b| a.total_cmp(b));
    Ok(ts[5])
}

fn main() -> candle::Result<()> {
    let dev = Device::Cpu;
    let m = 8 * 197;
    for (k, n, what) in [
        (768, 2304, "qkv"),
        (768, 768, "proj"),
        (768, 3072, "fc1"),
        (3072, 768, "fc2"),
    ] {
        let x = Tensor::randn(0f32, 1., (m, k), &dev)?;
        let w = Tensor::randn(0f32, 1., (n, k), &dev)?;
        let b = Tensor::randn(0f32, 1., n, &dev)?;
        let flop = 2.0 * (m * k * n) as f64 / 1e9;
        let t_mm = median_s(|| x.matmul(&w.t()?))?;
        let t_lin = median_s(|| linear(&x, &w, Some(&b)))?;
        // The two GEMMs of the backward pass, with the operand layouts the fused linear uses.
        let g = Tensor::randn(0f32, 1., (m, n), &dev)?;
        let t_dx = median_s(|| g.matmul(&w))?;
        let t_dw = median_s(|| g.t()?.matmul(&x))?;
        println!(
            "{what:5} {m}x{k}x{n}: candle matmul {:6.1}, linear+bias {:6.1}, dx {:6.1}, dw {:6.1} GFLOP/s",
            flop / t_mm,
            flop / t_lin,
            flop / t_dx,
            flop / t_dw
        );
    }
    let qkv = Tensor::randn(0f32, 1., (m, 3 * 768), &dev)?;
    let bias = Tensor::randn(0f32, 1., (12, 197, 197), &dev)?;
    let flop = 2.0 * 2.0 * (8 * 12 * 197 * 197 * 64) as f64 / 1e9;
    let t = median_s(|| attention_core(&qkv, Some(&bias), 8, 12))?;
    println!(
        "attention core (8x12 heads, 197 tokens): {:.1} GFLOP/s of GEMM work, {:.1} ms",
        flop / t,
        t * 1e3
    );
    // The same with a gradient: forward plus the recomputing backward pass.
    let qkv_var = candle::Var::from_tensor(&qkv)?;
    let up = Tensor::randn(0f32, 1., (8, 197, 768), &dev)?;
    let t_fb = median_s(|| {
        let out = attention_core(&qkv_var, Some(&bias), 8, 12)?;
        let g = (out * &up)?.sum_all()?.backward()?;
        Ok(g.get(&qkv_var).unwrap().clone())
    })?;
    println!("attention core forward + backward: {:.1} ms", t_fb * 1e3);
    // One head's GEMMs on one thread (run with RAYON_NUM_THREADS=1 to see the per-core rate).
    let q = Tensor::randn(0f32, 1., (197, 64), &dev)?;
    let k = Tensor::randn(0f32, 1., (197, 64), &dev)?;
    let p = Tensor::randn(0f32, 1., (197, 197), &dev)?;
    let flop = 2.0 * (197 * 197 * 64) as f64 / 1e9;
    let t_s = median_s(|| q.matmul(&k.t()?))?;
    let t_pv = median_s(|| p.matmul(&k))?;
    println!(
        "one head: q k^T {:.1} GFLOP/s, p v {:.1} GFLOP/s",
        flop / t_s,
        flop / t_pv
    );
    // Element-wise kernels (forward) on the chosen instruction-set path.
    let h = Tensor::randn(0f32, 1., (m, 3072), &dev)?;
    let b3072 = Tensor::randn(0f32, 1., 3072, &dev)?;
    let t_gelu = median_s(|| bias_gelu_erf(&h, &b3072))?;
    let scores = Tensor::randn(0f32, 1., (8, 12, 197, 197), &dev)?;
    let sbias = Tensor::randn(0f32, 1., (1, 12, 197, 197), &dev)?;
    let t_soft = median_s(|| softmax_with_bias(&scores, &sbias))?;
    // A variable weight, so that our kernel (not candle-nn's inference one) runs.
    let x = Tensor::randn(0f32, 1., (m, 768), &dev)?;
    let w = candle::Var::ones(768, candle::DType::F32, &dev)?;
    let b768 = Tensor::zeros(768, candle::DType::F32, &dev)?;
    let t_ln = median_s(|| layer_norm(&x, &w, &b768, 1e-6))?;
    println!(
        "path {}: bias+GELU {m}x3072 {:.2} ms, bias+softmax 8x12x197x197 {:.2} ms, LayerNorm {m}x768 {:.2} ms",
        beit_kernels::isa().name(),
        t_gelu * 1e3,
        t_soft * 1e3,
        t_ln * 1e3
    );
    Ok(())
}
