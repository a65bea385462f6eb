//! Resampling of position tables, written as linear maps (matrices) built on the host.
//!
//! Interpolation is linear in the data, so resizing a table `(rows_in, C)` to `(rows_out, C)` is a
//! product `W @ table` with a small `(rows_out, rows_in)` matrix `W`. Applied with a matmul it keeps
//! gradients flowing to the table, and `W` follows PyTorch's `F.interpolate` formulas exactly.

/// 1-D bilinear weights of `F.interpolate(mode="bilinear", align_corners=False)`, `(out, in)` row-major.
pub fn bilinear_weights(input: usize, output: usize) -> Vec<f64> {
    let mut w = vec![0.0; output * input];
    let scale = input as f64 / output as f64;
    for o in 0..output {
        // PyTorch clamps negative source coordinates to 0 for (bi)linear modes.
        let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(input - 1);
        let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
        let l1 = src - i0 as f64;
        w[o * input + i0] += 1.0 - l1;
        w[o * input + i1] += l1;
    }
    w
}

/// 1-D bicubic weights of `F.interpolate(mode="bicubic", align_corners=False)` (A = -0.75, borders
/// replicated), `(out, in)` row-major.
pub fn bicubic_weights(input: usize, output: usize) -> Vec<f64> {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let mut w = vec![0.0; output * input];
    let scale = input as f64 / output as f64;
    for o in 0..output {
        let src = (o as f64 + 0.5) * scale - 0.5;
        let base = src.floor();
        let t = src - base;
        let coeffs = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
        for (k, c) in coeffs.iter().enumerate() {
            let idx = (base as i64 - 1 + k as i64).clamp(0, input as i64 - 1) as usize;
            w[o * input + idx] += c;
        }
    }
    w
}

/// The 2-D (separable) map from an `(in_h, in_w)` grid to `(out_h, out_w)`, flattened row-major on
/// both sides: `(out_h*out_w, in_h*in_w)`, as f32.
pub fn kron_2d(
    wh: &[f64],
    in_h: usize,
    out_h: usize,
    ww: &[f64],
    in_w: usize,
    out_w: usize,
) -> Vec<f32> {
    let mut m = vec![0f32; out_h * out_w * in_h * in_w];
    let cols = in_h * in_w;
    for oy in 0..out_h {
        for iy in 0..in_h {
            let a = wh[oy * in_h + iy];
            if a == 0.0 {
                continue;
            }
            for ox in 0..out_w {
                let row = (oy * out_w + ox) * cols + iy * in_w;
                for ix in 0..in_w {
                    m[row + ix] = (a * ww[ox * in_w + ix]) as f32;
                }
            }
        }
    }
    m
}

/// Interpolating cubic spline with not-a-knot ends (what FITPACK builds with `s=0`, i.e. scipy's
/// `interp2d(kind="cubic")` / `RectBivariateSpline` on a grid), as a linear map from values at the
/// knots `xs` to values at `ts` (clamped to the knot range, as FITPACK evaluates): `(ts, xs)`.
pub fn not_a_knot_spline_weights(xs: &[f64], ts: &[f64]) -> Vec<f64> {
    let n = xs.len();
    let mut w = vec![0.0; ts.len() * n];
    // Spline interpolation is linear in the data: column j is the spline through the unit vector e_j.
    for j in 0..n {
        let mut ys = vec![0.0; n];
        ys[j] = 1.0;
        let m = spline_second_derivatives(xs, &ys);
        for (r, &t) in ts.iter().enumerate() {
            w[r * n + j] = eval_spline(xs, &ys, &m, t);
        }
    }
    w
}

/// Second derivatives of the not-a-knot cubic spline through `(xs, ys)` (dense solve; n is small).
fn spline_second_derivatives(xs: &[f64], ys: &[f64]) -> Vec<f64> {
    let n = xs.len();
    assert!(n >= 4, "a not-a-knot cubic spline needs at least 4 knots");
    let h: Vec<f64> = xs.windows(2).map(|p| p[1] - p[0]).collect();
    let mut a = vec![vec![0.0; n]; n];
    let mut b = vec![0.0; n];
    // Third derivative continuous at x_1 and x_{n-2}.
    a[0][0] = -1.0 / h[0];
    a[0][1] = 1.0 / h[0] + 1.0 / h[1];
    a[0][2] = -1.0 / h[1];
    for i in 1..n - 1 {
        a[i][i - 1] = h[i - 1];
        a[i][i] = 2.0 * (h[i - 1] + h[i]);
        a[i][i + 1] = h[i];
        b[i] = 6.0 * ((ys[i + 1] - ys[i]) / h[i] - (ys[i] - ys[i - 1]) / h[i - 1]);
    }
    a[n - 1][n - 3] = -1.0 / h[n - 3];
    a[n - 1][n - 2] = 1.0 / h[n - 3] + 1.0 / h[n - 2];
    a[n - 1][n - 1] = -1.0 / h[n - 2];
    solve_dense(a, b)
}

/// Gaussian elimination with partial pivoting.
fn solve_dense(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .expect("non-empty");
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..n {
            let f = a[row][col] / a[col][col];
            if f != 0.0 {
                let (upper, lower) = a.split_at_mut(row);
                for (x, &p) in lower[0][col..].iter_mut().zip(&upper[col][col..]) {
                    *x -= f * p;
                }
                b[row] -= f * b[col];
            }
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x
}

fn eval_spline(xs: &[f64], ys: &[f64], m: &[f64], t: f64) -> f64 {
    let n = xs.len();
    let t = t.clamp(xs[0], xs[n - 1]);
    let i = match xs.iter().rposition(|&x| x <= t) {
        Some(i) if i >= n - 1 => n - 2,
        Some(i) => i,
        None => 0,
    };
    let h = xs[i + 1] - xs[i];
    let (l, r) = (xs[i + 1] - t, t - xs[i]);
    m[i] * l.powi(3) / (6.0 * h)
        + m[i + 1] * r.powi(3) / (6.0 * h)
        + (ys[i] / h - m[i] * h / 6.0) * l
        + (ys[i + 1] / h - m[i + 1] * h / 6.0) * r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_identity() {
        for w in [bilinear_weights(5, 5), bicubic_weights(5, 5)] {
            for o in 0..5 {
                for i in 0..5 {
                    let expect = if o == i { 1.0 } else { 0.0 };
                    assert!((w[o * 5 + i] - expect).abs() < 1e-12);
                }
            }
        }
    }

    #[test]
    fn rows_sum_to_one() {
        for w in [
            bilinear_weights(7, 12),
            bicubic_weights(7, 12),
            bicubic_weights(12, 5),
        ] {
            let input = if w.len() == 84 { 7 } else { 12 };
            for row in w.chunks(input) {
                assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn spline_reproduces_cubics_exactly() {
        // A not-a-knot spline is exact on cubic polynomials, on any knot spacing.
        let xs = [-4.0, -2.5, -1.2, 0.0, 1.2, 2.5, 4.0];
        let f = |x: f64| 0.3 * x * x * x - x * x + 2.0 * x - 1.0;
        let ts: Vec<f64> = (-8..=8).map(|k| k as f64 * 0.5).collect();
        let w = not_a_knot_spline_weights(&xs, &ts);
        for (r, &t) in ts.iter().enumerate() {
            let got: f64 = (0..xs.len()).map(|j| w[r * xs.len() + j] * f(xs[j])).sum();
            let expect = f(t.clamp(-4.0, 4.0));
            assert!((got - expect).abs() < 1e-9, "t={t}: {got} vs {expect}");
        }
    }
}
