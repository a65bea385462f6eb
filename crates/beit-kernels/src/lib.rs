//! CPU kernels of beit-rs, each behind one function that picks the fused kernel or candle's plain
//! composition itself, so that model code calls them unconditionally.
//!
//! candle builds LayerNorm, softmax, GELU's backward, the attention core and the head layout
//! changes out of many element-wise ops and small matrix products; each op allocates a fresh
//! tensor and makes one more pass over memory (and the autograd engine adds a zero-fill and an add
//! per edge). On a CPU where the GEMMs run near the roof, those passes are what separates a
//! training step from PyTorch's, so these get single-pass kernels, forward and backward:
//!
//! | op | function | file |
//! |---|---|---|
//! | `x W^T + b`, bias folded into the GEMM | [`linear`] | `linear.rs` |
//! | LayerNorm | [`layer_norm`] | `layer_norm.rs` |
//! | softmax, of `scores + bias` | [`softmax_last_dim`], [`softmax_with_bias`] | `softmax.rs` |
//! | `gelu_erf(h + b)` | [`bias_gelu_erf`] | `bias_gelu.rs` |
//! | `x + drop_path(lambda * h)` | [`residual`] | `residual.rs` |
//! | `softmax(q k^T + bias) v`, all heads | [`attention_core`], [`attention_core_rows`] | `attention.rs` |
//! | head split / merge | [`split_heads`], [`merge_heads`] | `heads.rs` |
//! | `cat([a * s, b, c])` (the q/k/v weight) | [`stack3_scaled_first`] | `stack.rs` |
//! | same-padding convolution (im2col + GEMM) | [`conv2d_same`], [`conv2d_same_bias`], [`upsample2x`] | `conv.rs` |
//!
//! The fused path applies to f32 tensors on the CPU while the kernels are enabled (see
//! [`enabled`]: `BEIT_FUSED_OPS=0` turns them off); CUDA, Metal, bf16 and f16 take the
//! composition. The element-wise math (`exp`, `erf`) is compiled for AVX-512, AVX2 + FMA, NEON
//! and the baseline target, chosen at run time ([`Isa`], `BEIT_KERNELS_ISA`). The unit tests check
//! values and gradients of every kernel against its composition, and the math against `f64`.

mod attention;
mod autocast;
mod bias_gelu;
mod conv;
mod cpu;
mod dispatch;
mod gemm;
mod heads;
mod layer_norm;
mod linear;
mod matmul;
mod residual;
mod softmax;
mod stack;
#[cfg(test)]
mod test_util;
mod vmath;

pub use attention::{attention_core, attention_core_rows, QueryRows};
pub use autocast::{autocast_broadcast_matmul, autocast_matmul, matmul_dtype, with_matmul_dtype};
pub use bias_gelu::bias_gelu_erf;
pub use conv::{conv2d_same, conv2d_same_bias, upsample2x};
pub use dispatch::{enabled, fused_cpu_f32, isa, with_fused_ops, Isa};
pub use heads::{merge_heads, split_heads};
pub use layer_norm::{layer_norm, layer_norm_composed};
pub use linear::linear;
pub use residual::residual;
pub use softmax::{softmax_last_dim, softmax_with_bias};
pub use stack::stack3_scaled_first;

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{DType, Device, Result, Tensor};

    #[test]
    fn non_f32_inputs_fall_back_to_the_composition() -> Result<()> {
        let x = Tensor::randn(0f32, 1., (4, 8), &Device::Cpu)?.to_dtype(DType::F64)?;
        let w = Tensor::ones(8, DType::F64, &Device::Cpu)?;
        let b = Tensor::zeros(8, DType::F64, &Device::Cpu)?;
        assert!(!fused_cpu_f32(&[&x, &w, &b]));
        let y = layer_norm(&x, &w, &b, 1e-6)?;
        assert_eq!(y.dtype(), DType::F64);
        let s = softmax_last_dim(&x)?.sum(1)?.to_vec1::<f64>()?;
        assert!(s.iter().all(|v| (v - 1.0).abs() < 1e-9));
        Ok(())
    }
}
