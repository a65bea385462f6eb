//! Vectorised `exp` and exact-GELU row kernels.
//!
//! glibc's `expf` and libm's `erff` are scalar calls: in a ViT-B step they were 5-10% of the time
//! (GELU runs on every element of the `(tokens, 3072)` MLP activation, `exp` on every attention
//! score). The functions here are written branch-free over plain `f32` so that LLVM vectorises the
//! loops, and each public entry point is compiled once per instruction set (AVX-512, AVX2 + FMA,
//! NEON, the baseline target; see [`crate::dispatch`]), the best one the CPU has picked at run
//! time. No path contracts `a * b + c` into a fused multiply-add, so all of them return the same
//! bits (the tests check it).
//!
//! Accuracy (checked in the tests against `f64`): `exp` within 2 ulp on the softmax range; GELU
//! within 3e-7 relative (absolute below 1) and its derivative within 3e-7 absolute, about 4 f32 ulp.
//! erf is Abramowitz & Stegun 7.1.26 (error bound 1.5e-7), evaluated so that `1 + erf(z)` has no
//! cancellation for negative `z`.

use crate::dispatch::multiversion;

const LOG2_E: f32 = std::f32::consts::LOG2_E;
// ln 2 split in a part exact in f32 and the rest (Cody-Waite reduction).
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// `e^x` for finite `x`, branch-free. Inputs are clamped to `[-87, 88]` (results below `1.6e-38`
/// are not needed by softmax or GELU and would be denormal).
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // n = round(x / ln 2) via the 1.5 * 2^23 trick (round-to-nearest in the FPU, vectorises).
    // The integer n also sits in the low mantissa bits of `shifted`: read it from there, since a
    // float-to-int conversion (`as i32`, saturating) does not vectorise.
    const SHIFTER: f32 = 12_582_912.0;
    let shifted = x * LOG2_E + SHIFTER;
    let n = shifted - SHIFTER;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // e^r on |r| <= ln2/2: 1 + r + r^2 * P(r), the minimax polynomial of Cephes' expf.
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5; // 5.0000001e-1 in Cephes, 0.5 in f32
    let er = p * r * r + r + 1.0;
    let n_int = shifted.to_bits().wrapping_sub(SHIFTER.to_bits()); // n as a two's-complement u32
    let scale = f32::from_bits(n_int.wrapping_add(127) << 23);
    er * scale
}

/// `(1 + erf(z), e^{-z^2})` without cancellation for negative `z`.
#[inline(always)]
fn one_plus_erf(z: f32) -> (f32, f32) {
    let a = z.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    let e = exp(-a * a);
    // erfc(|z|) ~= poly * e; 1 + erf(z) = 2 - erfc(z) for z >= 0 and erfc(|z|) for z < 0.
    let q = poly * e;
    let v = if z < 0.0 { q } else { 2.0 - q };
    (v, e)
}

/// Exact (erf) GELU: `x/2 * (1 + erf(x / sqrt 2))`.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * one_plus_erf(x * FRAC_1_SQRT_2).0
}

/// Derivative of the exact GELU: `(1 + erf(x / sqrt 2))/2 + x * phi(x)`.
#[inline(always)]
fn gelu_grad(x: f32) -> f32 {
    let (v, e) = one_plus_erf(x * FRAC_1_SQRT_2);
    0.5 * v + x * e * FRAC_1_SQRT_2PI
}

multiversion! {
    /// In place: `y = softmax(y)` over one row.
    fn softmax_inplace / softmax_inplace_on(y: &mut [f32]) {
        let max = y.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut acc = [0f32; 16];
        let mut chunks = y.chunks_exact_mut(16);
        for c in &mut chunks {
            for i in 0..16 {
                c[i] = exp(c[i] - max);
                acc[i] += c[i];
            }
        }
        let mut sum = 0f32;
        for v in chunks.into_remainder() {
            *v = exp(*v - max);
            sum += *v;
        }
        let inv = 1.0 / (sum + acc.iter().sum::<f32>());
        for v in y.iter_mut() {
            *v *= inv;
        }
    }
}

multiversion! {
    /// `y[r, i] = gelu(h[r, i] + b[i])` for every row `r` of `h` (rows of `b.len()`).
    fn bias_gelu_rows / bias_gelu_rows_on(h: &[f32], b: &[f32], y: &mut [f32]) {
        let n = b.len();
        for (yr, hr) in y.chunks_exact_mut(n).zip(h.chunks_exact(n)) {
            for i in 0..n {
                yr[i] = gelu(hr[i] + b[i]);
            }
        }
    }
}

multiversion! {
    /// `dh[r, i] = g[r, i] * gelu'(h[r, i] + b[i])`, and `db[i] += dh[r, i]` over the rows.
    fn bias_gelu_grad_rows / bias_gelu_grad_rows_on(h: &[f32], b: &[f32], g: &[f32], dh: &mut [f32], db: &mut [f32]) {
        let n = b.len();
        for ((dr, hr), gr) in dh.chunks_exact_mut(n).zip(h.chunks_exact(n)).zip(g.chunks_exact(n)) {
            for i in 0..n {
                let d = gr[i] * gelu_grad(hr[i] + b[i]);
                dr[i] = d;
                db[i] += d;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn erf64(x: f64) -> f64 {
        // High-accuracy reference: the Maclaurin series (|x| <= 3) or the continued fraction.
        if x.abs() <= 3.0 {
            let mut sum = 0.0;
            let mut term = x;
            let mut n = 0.0;
            while term.abs() > 1e-18 {
                sum += term / (2.0 * n + 1.0);
                n += 1.0;
                term *= -x * x / n;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let a = x.abs();
            let mut f = 0.0;
            for k in (1..200).rev() {
                f = (k as f64 / 2.0) / (a + f);
            }
            let erfc = (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f);
            (1.0 - erfc) * x.signum()
        }
    }

    fn grid() -> impl Iterator<Item = f32> {
        (-24_000..=24_000).map(|i| i as f32 * 5e-4)
    }

    #[test]
    fn exp_is_within_two_ulp() {
        for x in (-870..=880).map(|i| i as f32 * 0.1).chain(grid()) {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            let ulp = (want as f32).abs() * f32::EPSILON;
            assert!(
                (got - want).abs() <= 2.0 * ulp as f64,
                "exp({x}) = {got}, want {want}"
            );
        }
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
    }

    #[test]
    fn gelu_and_its_derivative_match_f64() {
        let mut worst = (0f64, 0f64);
        for x in grid() {
            let xd = x as f64;
            let z = xd / std::f64::consts::SQRT_2;
            let want = 0.5 * xd * (1.0 + erf64(z));
            let want_grad = 0.5 * (1.0 + erf64(z))
                + xd * (-0.5 * xd * xd).exp() / (2.0 * std::f64::consts::PI).sqrt();
            worst.0 = worst
                .0
                .max((gelu(x) as f64 - want).abs() / want.abs().max(1.0));
            worst.1 = worst.1.max((gelu_grad(x) as f64 - want_grad).abs());
        }
        assert!(worst.0 < 3e-7 && worst.1 < 3e-7, "worst errors {worst:?}");
    }

    #[test]
    fn row_kernels_agree_with_the_scalar_definitions() {
        let n = 37; // not a multiple of 16: exercises the remainders
        let h: Vec<f32> = (0..3 * n)
            .map(|i| ((i * 7919) % 101) as f32 * 0.09 - 4.5)
            .collect();
        let b: Vec<f32> = (0..n).map(|i| i as f32 * 0.01 - 0.2).collect();
        let g: Vec<f32> = (0..3 * n)
            .map(|i| ((i * 31) % 17) as f32 * 0.1 - 0.8)
            .collect();
        let mut y = vec![0f32; 3 * n];
        bias_gelu_rows(&h, &b, &mut y);
        let (mut dh, mut db) = (vec![0f32; 3 * n], vec![0f32; n]);
        bias_gelu_grad_rows(&h, &b, &g, &mut dh, &mut db);
        let mut db_want = vec![0f32; n];
        for r in 0..3 {
            for i in 0..n {
                let v = h[r * n + i] + b[i];
                assert!((y[r * n + i] - gelu(v)).abs() < 1e-6);
                let d = g[r * n + i] * gelu_grad(v);
                assert!((dh[r * n + i] - d).abs() < 1e-6);
                db_want[i] += d;
            }
        }
        for i in 0..n {
            assert!((db[i] - db_want[i]).abs() < 1e-5);
        }

        let mut s: Vec<f32> = (0..197)
            .map(|i| ((i * 13) % 29) as f32 * 0.7 - 9.0)
            .collect();
        let want: Vec<f64> = {
            let m = s.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
            let e: Vec<f64> = s.iter().map(|&v| (v as f64 - m).exp()).collect();
            let z: f64 = e.iter().sum();
            e.iter().map(|v| v / z).collect()
        };
        softmax_inplace(&mut s);
        for (a, b) in s.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-7, "{a} vs {b}");
        }
    }

    /// The f64 references of GELU and its derivative at `x`.
    fn gelu64(x: f32) -> (f64, f64) {
        let xd = x as f64;
        let z = xd / std::f64::consts::SQRT_2;
        let value = 0.5 * xd * (1.0 + erf64(z));
        let grad = 0.5 * (1.0 + erf64(z))
            + xd * (-0.5 * xd * xd).exp() / (2.0 * std::f64::consts::PI).sqrt();
        (value, grad)
    }

    #[test]
    fn every_supported_instruction_set_matches_f64_and_the_baseline_bit_for_bit() {
        use crate::dispatch::Isa;
        // The whole GELU grid as rows of 1000 (+ a ragged tail through a zero bias), and a
        // softmax row long enough for every vector width and its remainder.
        let xs: Vec<f32> = grid().collect();
        let n = 1000;
        let rows = xs.len() / n;
        let zero = vec![0f32; n];
        let ones = vec![1f32; rows * n];
        let softmax_in: Vec<f32> = (0..197)
            .map(|i| ((i * 13) % 29) as f32 * 0.7 - 9.0)
            .collect();
        let softmax_want: Vec<f64> = {
            let m = softmax_in.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
            let e: Vec<f64> = softmax_in.iter().map(|&v| (v as f64 - m).exp()).collect();
            let z: f64 = e.iter().sum();
            e.iter().map(|v| v / z).collect()
        };
        let run = |isa: Isa| {
            let mut y = vec![0f32; rows * n];
            bias_gelu_rows_on(isa, &xs[..rows * n], &zero, &mut y);
            let (mut dh, mut db) = (vec![0f32; rows * n], vec![0f32; n]);
            bias_gelu_grad_rows_on(isa, &xs[..rows * n], &zero, &ones, &mut dh, &mut db);
            let mut sm = softmax_in.clone();
            softmax_inplace_on(isa, &mut sm);
            (y, dh, db, sm)
        };
        let baseline = run(Isa::Scalar);
        let mut tested = vec![];
        for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
            let (y, dh, db, sm) = run(isa);
            let mut worst = (0f64, 0f64, 0f64);
            for (i, &x) in xs[..rows * n].iter().enumerate() {
                let (v, g) = gelu64(x);
                worst.0 = worst.0.max((y[i] as f64 - v).abs() / v.abs().max(1.0));
                worst.1 = worst.1.max((dh[i] as f64 - g).abs());
            }
            for (a, b) in sm.iter().zip(&softmax_want) {
                worst.2 = worst.2.max((*a as f64 - b).abs());
            }
            assert!(
                worst.0 < 3e-7 && worst.1 < 3e-7 && worst.2 < 1e-7,
                "{}: worst errors {worst:?}",
                isa.name()
            );
            assert!(
                y == baseline.0 && dh == baseline.1,
                "{}: GELU bits",
                isa.name()
            );
            assert!(db == baseline.2 && sm == baseline.3, "{}: sums", isa.name());
            tested.push(isa.name());
        }
        // This machine's best path was among them (AVX2 on an AVX2-only x86-64, for example).
        assert!(tested.contains(&Isa::best().name()), "{tested:?}");
        eprintln!("instruction sets tested: {tested:?}");
    }
}
