//! One value of a training step: known on the host, or a tensor on the device that is read back
//! later, with the other values of the steps around it ([`crate::pending::Pending`]).

use candle::Tensor;

use crate::error::Result;
use crate::host;

/// One value of a micro-batch (its loss, a metric): known on the host, or a one-element tensor
/// on the device that is read back with the step's logged values.
#[derive(Debug, Clone)]
pub enum StepValue {
    /// A value the host already has (e.g. a count).
    Host(f64),
    /// A one-element tensor (any float dtype) on the device, multiplied by `scale` once read.
    Device {
        /// The value, not read yet.
        value: Tensor,
        /// Applied on the host, in f64, after the read (e.g. 100 for a percentage).
        scale: f64,
    },
}

impl StepValue {
    /// The device value `value` times `scale` (applied on the host once read).
    pub fn scaled(value: Tensor, scale: f64) -> Self {
        Self::Device { value, scale }
    }

    /// The same value, cut from the graph that computed it.
    pub(crate) fn detached(self) -> Self {
        match self {
            Self::Device { value, scale } => Self::Device {
                value: value.detach(),
                scale,
            },
            host => host,
        }
    }
}

impl From<f64> for StepValue {
    fn from(v: f64) -> Self {
        Self::Host(v)
    }
}

impl From<Tensor> for StepValue {
    fn from(value: Tensor) -> Self {
        Self::Device { value, scale: 1.0 }
    }
}

/// The host values of `values`, reading the device ones back in one read.
pub fn read_all(values: Vec<StepValue>) -> Result<Vec<f64>> {
    let mut tensors = Vec::new();
    values.iter().for_each(|v| push_device(&mut tensors, v));
    let mut read = host::read_values(&tensors)?.into_iter();
    Ok(values
        .into_iter()
        .map(|v| host_value(v, &mut read))
        .collect())
}

pub(crate) fn push_device(tensors: &mut Vec<Tensor>, v: &StepValue) {
    if let StepValue::Device { value, .. } = v {
        tensors.push(value.clone());
    }
}

/// The host value of `v`, taking the next read value for a device one.
pub(crate) fn host_value(v: StepValue, values: &mut impl Iterator<Item = f64>) -> f64 {
    match v {
        StepValue::Host(x) => x,
        StepValue::Device { scale, .. } => values.next().unwrap_or(f64::NAN) * scale,
    }
}
