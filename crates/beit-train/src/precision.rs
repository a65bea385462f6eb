//! Mixed precision: bf16 matrix products with f32 master weights (`train.precision`; `auto` is
//! bf16 on CUDA, f32 elsewhere, and `bf16` can be chosen on the CPU too).
//!
//! candle has no autocast. Parameters stay f32 `Var`s (the optimizer updates them in f32); inside
//! [`Precision::scope`] the model's matrix products (linear layers, attention) cast their inputs
//! to bf16 and their products back to f32 ([`beit_model::kernels::with_matmul_dtype`]);
//! `to_dtype` has a backward, so gradients arrive at the f32 `Var`s in f32. LayerNorm, softmax
//! and the loss are computed in f32. bf16 keeps f32's exponent range, so no loss scaling is
//! needed. Convolutions (the dVAE tokenizer, the segmentation decoder) stay f32.

use std::fmt;
use std::str::FromStr;

use candle::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Compute precision of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    F32,
    /// Matmuls in bf16, master weights and reductions in f32.
    Bf16,
}

impl Precision {
    /// bf16 on CUDA, f32 elsewhere (CPU bf16 matmuls widen to f32 internally and gain nothing).
    pub fn auto(device: &Device) -> Self {
        if device.is_cuda() {
            Self::Bf16
        } else {
            Self::F32
        }
    }

    /// Parse `auto`, `f32`/`fp32` or `bf16` for `device`.
    pub fn parse_for(s: &str, device: &Device) -> Result<Self> {
        if s.eq_ignore_ascii_case("auto") {
            Ok(Self::auto(device))
        } else {
            s.parse()
        }
    }

    /// The dtype matmul inputs are cast to.
    pub fn compute_dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
        }
    }

    /// Run `f` (a training run: the model is built and run on the calling thread) with the
    /// model's matrix products computed in this precision.
    pub fn scope<R>(self, f: impl FnOnce() -> R) -> R {
        beit_model::kernels::with_matmul_dtype(self.compute_dtype(), f)
    }

    /// Cast a float tensor to the compute dtype (no-op if it already has it; integer tensors are
    /// returned unchanged).
    pub fn cast(self, t: &Tensor) -> Result<Tensor> {
        let dt = self.compute_dtype();
        if t.dtype() == dt || !t.dtype().is_float() {
            Ok(t.clone())
        } else {
            Ok(t.to_dtype(dt)?)
        }
    }

    /// Cast back to f32 (for norms, softmax, losses).
    pub fn to_f32(t: &Tensor) -> Result<Tensor> {
        if t.dtype() == DType::F32 {
            Ok(t.clone())
        } else {
            Ok(t.to_dtype(DType::F32)?)
        }
    }
}

impl FromStr for Precision {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(TrainError::Config(format!(
                "unknown precision `{other}` (expected auto, f32 or bf16)"
            ))),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_cast() {
        let cpu = Device::Cpu;
        assert_eq!(Precision::parse_for("auto", &cpu).unwrap(), Precision::F32);
        assert_eq!(Precision::parse_for("BF16", &cpu).unwrap(), Precision::Bf16);
        assert!(Precision::parse_for("fp8", &cpu)
            .unwrap_err()
            .to_string()
            .contains("fp8"));
        let x = Tensor::new(&[1.5f32, -2.0], &cpu).unwrap();
        let y = Precision::Bf16.cast(&x).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        assert_eq!(
            Precision::to_f32(&y).unwrap().to_vec1::<f32>().unwrap(),
            [1.5, -2.0]
        );
        let ids = Tensor::new(&[1u32, 2], &cpu).unwrap();
        assert_eq!(Precision::Bf16.cast(&ids).unwrap().dtype(), DType::U32);
        assert_eq!(Precision::F32.to_string(), "f32");
    }
}
