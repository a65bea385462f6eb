//! Helpers of the unit tests: comparing a kernel with its composition, values and gradients.

use candle::{Device, Result, Tensor, Var};

/// Largest absolute difference between two tensors of one shape.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("comparable tensors")
}

/// Values and all gradients of `fused` and `reference`, for a random cotangent.
pub fn compare(
    vars: &[&Var],
    fused: impl Fn(&[&Tensor]) -> Result<Tensor>,
    reference: impl Fn(&[&Tensor]) -> Result<Tensor>,
    tol: f32,
) -> Result<()> {
    let ts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
    let yf = fused(&ts)?;
    let yr = reference(&ts)?;
    assert_eq!(yf.dims(), yr.dims());
    let d = max_diff(&yf, &yr);
    assert!(d < tol, "values differ by {d}");
    let cot = Tensor::randn(0f32, 1., yf.shape(), &Device::Cpu)?;
    let gf = (yf * &cot)?.sum_all()?.backward()?;
    let gr = (yr * &cot)?.sum_all()?.backward()?;
    for (i, v) in vars.iter().enumerate() {
        let a = gf.get(v.as_tensor()).expect("fused gradient");
        let b = gr.get(v.as_tensor()).expect("reference gradient");
        assert_eq!(a.dims(), v.dims());
        let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
        let d = max_diff(a, b) / scale;
        assert!(d < tol, "gradient of input {i} differs by {d} (relative)");
    }
    Ok(())
}

/// A variable of normal samples.
pub fn var(shape: &[usize], mean: f32, std: f32) -> Var {
    Var::from_tensor(&Tensor::randn(mean, std, shape, &Device::Cpu).unwrap()).unwrap()
}
