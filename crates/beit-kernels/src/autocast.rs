//! Mixed precision for matrix products, the one thing candle lacks of PyTorch's autocast.
//!
//! Inside [`with_matmul_dtype`]`(DType::BF16, ..)` every matrix product of the model (the linear
//! layers and the two products of attention) casts its f32 inputs to bf16, multiplies, and casts
//! the product back to f32: parameters, LayerNorm, softmax, GELU, the residual stream and the loss
//! stay f32, as under `torch.autocast(dtype=torch.bfloat16)` (which also keeps the product in bf16:
//! here it is widened at once, so every op after the product sees f32). `to_dtype` has a backward
//! pass, so the gradients reach the f32 parameters in f32. The fused CPU kernels take f32 only, so
//! they are off inside the scope: the run takes candle's plain ops, the path of a CUDA device.

use std::cell::Cell;

use candle::{DType, Result, Tensor};

thread_local! {
    static MATMUL_DTYPE: Cell<DType> = const { Cell::new(DType::F32) };
}

/// The dtype matrix products of f32 tensors are computed in on this thread (f32 unless inside
/// [`with_matmul_dtype`]).
pub fn matmul_dtype() -> DType {
    MATMUL_DTYPE.with(|d| d.get())
}

/// Run `f` with the matrix products of f32 tensors computed in `dtype` (bf16 or f16) on this
/// thread; the model is built and run on the calling thread.
pub fn with_matmul_dtype<R>(dtype: DType, f: impl FnOnce() -> R) -> R {
    let previous = MATMUL_DTYPE.with(|d| d.replace(dtype));
    let out = f();
    MATMUL_DTYPE.with(|d| d.set(previous));
    out
}

/// The dtype `a * b` is computed in, when it is not the inputs' own.
fn lowered(a: &Tensor, b: &Tensor) -> Option<DType> {
    let dt = matmul_dtype();
    (dt != DType::F32 && a.dtype() == DType::F32 && b.dtype() == DType::F32).then_some(dt)
}

/// `a.matmul(b)`, computed in [`matmul_dtype`] with an f32 result when that is not f32.
pub fn autocast_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match lowered(a, b) {
        Some(dt) => a
            .to_dtype(dt)?
            .matmul(&b.to_dtype(dt)?)?
            .to_dtype(DType::F32),
        None => a.matmul(b),
    }
}

/// `a.broadcast_matmul(b)`, computed in [`matmul_dtype`] with an f32 result when that is not f32.
pub fn autocast_broadcast_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match lowered(a, b) {
        Some(dt) => a
            .to_dtype(dt)?
            .broadcast_matmul(&b.to_dtype(dt)?)?
            .to_dtype(DType::F32),
        None => a.broadcast_matmul(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{Device, Var};

    #[test]
    fn products_round_through_bf16_and_gradients_arrive_in_f32() -> Result<()> {
        let a = Var::new(&[[1.0f32 + 1.0 / 512.0, 2.0]], &Device::Cpu)?;
        let b = Tensor::new(&[[1.0f32], [1.0]], &Device::Cpu)?;
        let exact = autocast_matmul(&a, &b)?;
        assert_eq!(exact.to_vec2::<f32>()?, [[3.0 + 1.0 / 512.0]]);
        let (y, inside) = with_matmul_dtype(DType::BF16, || {
            (autocast_broadcast_matmul(&a, &b), matmul_dtype())
        });
        assert_eq!(inside, DType::BF16);
        assert_eq!(matmul_dtype(), DType::F32, "restored after the scope");
        let y = y?;
        assert_eq!(y.dtype(), DType::F32);
        // 1 + 2^-9 is not a bf16 number (8 significant bits): it rounds to 1.
        assert_eq!(y.to_vec2::<f32>()?, [[3.0]]);
        let g = y.sum_all()?.backward()?;
        let ga = g.get(&a).expect("a gradient for a");
        assert_eq!(ga.dtype(), DType::F32);
        assert_eq!(ga.to_vec2::<f32>()?, [[1.0, 1.0]]);
        Ok(())
    }
}
