//! GEMM throughput at ViT-B/16 shapes (batch 8, 197 tokens), f32: candle's matmul, our fused
//! `linear` and the fused attention core, then the element-wise kernels on the instruction-set
//! path in use. Run with `RAYON_NUM_THREADS=<n>` (and `BEIT_KERNELS_ISA=scalar|avx2|avx512|neon`
//! to time another path): `cargo run --release -p beit-kernels --example gemm_roof`.
//!
//! The first line is the roof itself: the f32 multiply-add rate of a loop of independent vector
//! FMAs (no memory traffic) on one thread and on all of them at once, so the GEMM rates below can
//! be read as a fraction of what the cores do while every core is busy.
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

/// Peak f32 FLOP/s of one thread: `iters` rounds of 12 independent vector FMAs. `None` where no
/// vector FMA path exists for this CPU (the loop is written for x86-64 AVX2/AVX-512 and aarch64).
fn fma_loop_gflops(iters: u64) -> Option<f64> {
    let t = Instant::now();
    let flop_per_iter = fma_loop(iters)?;
    Some(iters as f64 * flop_per_iter / t.elapsed().as_secs_f64() / 1e9)
}

/// Runs the loop on the widest FMA the CPU has; returns the FLOP of one iteration.
fn fma_loop(iters: u64) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512 F was detected at run time.
            std::hint::black_box(unsafe { fma_loop_avx512(iters) });
            return Some(12.0 * 16.0 * 2.0);
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: AVX2 and FMA were detected at run time.
            std::hint::black_box(unsafe { fma_loop_avx2(iters) });
            return Some(12.0 * 8.0 * 2.0);
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        // SAFETY: NEON is part of the aarch64 baseline.
        std::hint::black_box(unsafe { fma_loop_neon(iters) });
        return Some(12.0 * 4.0 * 2.0);
    }
    #[allow(unreachable_code)]
    {
        let _ = iters;
        None
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fma_loop_avx2(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let (b, c) = std::hint::black_box((_mm256_set1_ps(0.999_999_9), _mm256_set1_ps(1e-7)));
    // Distinct starting values, so that no two chains can be merged.
    let mut acc: [__m256; 12] = std::array::from_fn(|i| _mm256_set1_ps(i as f32));
    for _ in 0..std::hint::black_box(iters) {
        for a in acc.iter_mut() {
            *a = _mm256_fmadd_ps(*a, b, c);
        }
    }
    let mut out = [0f32; 8];
    // SAFETY: `out` holds the 8 lanes that the unaligned store writes.
    unsafe {
        _mm256_storeu_ps(
            out.as_mut_ptr(),
            acc.iter().fold(c, |s, &a| _mm256_add_ps(s, a)),
        )
    };
    out.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fma_loop_avx512(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let (b, c) = std::hint::black_box((_mm512_set1_ps(0.999_999_9), _mm512_set1_ps(1e-7)));
    let mut acc: [__m512; 12] = std::array::from_fn(|i| _mm512_set1_ps(i as f32));
    for _ in 0..std::hint::black_box(iters) {
        for a in acc.iter_mut() {
            *a = _mm512_fmadd_ps(*a, b, c);
        }
    }
    _mm512_reduce_add_ps(acc.iter().fold(c, |s, &a| _mm512_add_ps(s, a)))
}

#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
fn fma_loop_neon(iters: u64) -> f32 {
    use std::arch::aarch64::*;
    let (b, c) = std::hint::black_box((vdupq_n_f32(0.999_999_9), vdupq_n_f32(1e-7)));
    let mut acc: [float32x4_t; 12] = std::array::from_fn(|i| vdupq_n_f32(i as f32));
    for _ in 0..std::hint::black_box(iters) {
        for a in acc.iter_mut() {
            *a = vfmaq_f32(c, *a, b);
        }
    }
    vaddvq_f32(acc.iter().fold(c, |s, &a| vaddq_f32(s, a)))
}

/// The FMA roof: GFLOP/s of one thread alone, and of `threads` threads running the loop at once.
fn print_fma_roof(threads: usize) {
    const ITERS: u64 = 100_000_000;
    let Some(one) = fma_loop_gflops(ITERS) else {
        println!("FMA roof: no vector FMA loop for this CPU");
        return;
    };
    let all: f64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| s.spawn(|| fma_loop_gflops(ITERS).unwrap_or(0.0)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
    });
    println!(
        "FMA roof: {one:.1} GFLOP/s on one thread alone, {all:.1} on {threads} threads at once"
    );
}

fn main() -> candle::Result<()> {
    let dev = Device::Cpu;
    print_fma_roof(candle::utils::get_num_threads());
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
