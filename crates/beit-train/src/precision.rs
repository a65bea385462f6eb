//! Mixed precision: bf16 compute on CUDA with f32 master weights, f32 on CPU.
//!
//! candle has no autocast. The pattern (candle-notes §2.6): parameters stay f32 `Var`s (the
//! optimizer updates them in f32); the model casts weights and activations to the compute dtype
//! right before matmuls/convolutions ([`Precision::cast`]); `to_dtype` has a backward, so
//! gradients arrive at the f32 `Var`s in f32. LayerNorm, softmax and the loss should be computed
//! in f32 ([`Precision::to_f32`]). bf16 keeps f32's exponent range, so no loss scaling is needed.

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
