//! AdamW with state that can be saved and restored (candle_nn's `AdamW` keeps its moments private,
//! so a run could not be resumed with it).

use std::collections::HashMap;
use std::path::Path;

use candle::backprop::GradStore;
use candle::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TokenizerError};

/// AdamW hyper-parameters (the learning rate is passed to every step, for schedules).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// First-moment decay. Default 0.9.
    pub beta1: f64,
    /// Second-moment decay. Default 0.999.
    pub beta2: f64,
    /// Denominator epsilon. Default 1e-8.
    pub eps: f64,
    /// Decoupled weight decay, applied to convolution kernels only (not to biases). Default 1e-4.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-4,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// AdamW over named variables, with bias-corrected moments and decoupled weight decay.
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    steps: usize,
}

impl AdamW {
    /// Optimise `params` (name, variable). Variables of rank >= 2 get weight decay.
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let slots = params
            .into_iter()
            .map(|(name, var)| {
                let m = var.as_tensor().zeros_like()?;
                let v = var.as_tensor().zeros_like()?;
                let decay = var.rank() >= 2;
                Ok(Slot {
                    name,
                    var,
                    m,
                    v,
                    decay,
                })
            })
            .collect::<candle::Result<Vec<_>>>()?;
        Ok(Self {
            cfg,
            slots,
            steps: 0,
        })
    }

    /// Number of steps taken so far.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// One update with learning rate `lr`. Variables without a gradient are left unchanged.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let c1 = 1.0 - b1.powi(t);
        let c2 = 1.0 - b2.powi(t);
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            slot.m = ((&slot.m * b1)? + (g * (1.0 - b1))?)?;
            slot.v = ((&slot.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&slot.m / c1)? / ((&slot.v / c2)?.sqrt()? + self.cfg.eps)?)?;
            let theta = slot.var.as_tensor();
            let theta = if slot.decay && self.cfg.weight_decay > 0.0 {
                (theta * (1.0 - lr * self.cfg.weight_decay))?
            } else {
                theta.clone()
            };
            slot.var.set(&(theta - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// The moments as `opt.m.<name>` / `opt.v.<name>` tensors, for a checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for s in &self.slots {
            out.insert(format!("opt.m.{}", s.name), s.m.clone());
            out.insert(format!("opt.v.{}", s.name), s.v.clone());
        }
        out
    }

    /// Restore moments saved by [`AdamW::state_tensors`] and the step count; `origin` names the
    /// checkpoint in errors.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        steps: usize,
        origin: &Path,
    ) -> Result<()> {
        for s in &mut self.slots {
            for (kind, dst) in [("m", &mut s.m), ("v", &mut s.v)] {
                let key = format!("opt.{kind}.{}", s.name);
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| TokenizerError::MissingTensor {
                        path: origin.to_path_buf(),
                        key: key.clone(),
                    })?;
                if t.dims() != dst.dims() {
                    return Err(TokenizerError::BadTensor {
                        path: origin.to_path_buf(),
                        key,
                        reason: format!("expected shape {:?}, found {:?}", dst.dims(), t.dims()),
                    });
                }
                *dst = t.to_device(dst.device())?;
            }
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;

    #[test]
    fn minimises_a_quadratic_and_state_round_trips() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::new(&[[3f32, -2.0]], &dev)?;
        let mut opt = AdamW::new(vec![("x".into(), x.clone())], AdamWConfig::default())?;
        for _ in 0..300 {
            let loss = x.as_tensor().sqr()?.sum_all()?;
            opt.step(&loss.backward()?, 0.05)?;
        }
        let v = x.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        assert!(v.iter().all(|a| a.abs() < 0.05), "{v:?}");
        let state = opt.state_tensors();
        let mut other = AdamW::new(vec![("x".into(), x.clone())], AdamWConfig::default())?;
        other.load_state(&state, opt.steps(), Path::new("mem"))?;
        assert_eq!(other.steps(), 300);
        let missing = AdamW::new(vec![("y".into(), x)], AdamWConfig::default())?
            .load_state(&state, 1, Path::new("ckpt.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("opt.m.y") && missing.contains("ckpt.safetensors"),
            "{missing}"
        );
        Ok(())
    }
}
