//! AdamW with parameter groups and serialisable state.
//!
//! candle-nn's `AdamW` has one learning rate and one weight decay for all parameters and hides its
//! moments, so a run cannot be resumed. This one follows `torch.optim.AdamW` (the single-tensor
//! path) as unilm drives it:
//!
//! * every step receives the scheduled `lr` and `weight_decay`; group `g` uses
//!   `lr_g = lr * lr_scale_g` and `wd_g = weight_decay` if the group decays, else 0;
//! * per parameter: `θ ← θ·(1 − lr_g·wd_g)`, `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
//!   `θ ← θ − (lr_g / (1−β1^t)) · m / (sqrt(v)/sqrt(1−β2^t) + ε)`;
//! * `t` is counted per parameter, and a parameter without a gradient is skipped entirely (its
//!   `t` does not advance), exactly as torch does;
//! * moments are kept in f32 whatever the parameter dtype (f32 master weights are the norm here);
//! * on the CPU, f32 parameters are updated by a fused in-place kernel (three passes, no
//!   temporaries); elsewhere by tensor ops. Both paths are tested against PyTorch.
//!
//! State is saved as safetensors keyed by parameter name: `exp_avg.{name}`, `exp_avg_sq.{name}`
//! (f32, parameter shape) and `step.{name}` (a one-element f64 tensor), so a checkpoint can be
//! inspected with any safetensors tool and survives a re-ordering of the groups.

use std::collections::HashMap;
use std::path::Path;

use candle::{backprop::GradStore, DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::adamw_cpu;
use crate::error::{Result, TrainError};
use crate::param_groups::ParamGroup;

/// Hyper-parameters of AdamW that stay fixed during a run (lr and weight decay are per step).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// β1 (first-moment decay), default 0.9.
    pub beta1: f64,
    /// β2 (second-moment decay), default 0.999.
    pub beta2: f64,
    /// ε added to the denominator, default 1e-8.
    pub eps: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

#[derive(Debug)]
struct ParamState {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: u64,
}

/// What one [`AdamW::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepStats {
    /// Parameters that had a gradient and were updated.
    pub updated: usize,
    /// Parameters without a gradient (skipped, as torch does). A non-zero count on a model that
    /// should train end-to-end usually means an op without backward cut the graph.
    pub without_grad: usize,
}

/// AdamW over parameter groups, with per-parameter state that can be saved and restored.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    groups: Vec<ParamGroup>,
    /// Indexed like `groups[g].params[p]`.
    state: Vec<Vec<ParamState>>,
    steps_taken: u64,
    fused_cpu: bool,
}

impl AdamW {
    /// Create the optimizer with zeroed moments. Fails on a duplicate parameter name or a
    /// parameter that is not a float tensor.
    pub fn new(groups: Vec<ParamGroup>, cfg: AdamWConfig) -> Result<Self> {
        let mut names = std::collections::HashSet::new();
        let mut state = Vec::with_capacity(groups.len());
        for g in &groups {
            let mut gs = Vec::with_capacity(g.params.len());
            for (name, var) in &g.params {
                if !names.insert(name.clone()) {
                    return Err(TrainError::Parameter {
                        name: name.clone(),
                        message: "appears in more than one optimizer group".into(),
                    });
                }
                if !var.dtype().is_float() {
                    return Err(TrainError::Parameter {
                        name: name.clone(),
                        message: format!("cannot optimise a {:?} tensor", var.dtype()),
                    });
                }
                // Two separate buffers: the fused CPU path updates them in place.
                gs.push(ParamState {
                    exp_avg: Tensor::zeros(var.shape(), DType::F32, var.device())?,
                    exp_avg_sq: Tensor::zeros(var.shape(), DType::F32, var.device())?,
                    step: 0,
                });
            }
            state.push(gs);
        }
        Ok(Self {
            cfg,
            groups,
            state,
            steps_taken: 0,
            fused_cpu: true,
        })
    }

    /// Use the fused in-place CPU kernel for f32 parameters on the CPU (default: on). Off, every
    /// device takes the tensor-op path (the one CUDA uses); both compute the same update.
    pub fn set_fused_cpu(&mut self, on: bool) {
        self.fused_cpu = on;
    }

    /// The fixed hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// The parameter groups, in the order given at construction.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// All optimised `Var`s, in group order.
    pub fn vars(&self) -> Vec<Var> {
        self.groups
            .iter()
            .flat_map(|g| g.params.iter().map(|(_, v)| v.clone()))
            .collect()
    }

    /// Number of calls to [`AdamW::step`] so far (restored by [`AdamW::load_state`]).
    pub fn steps_taken(&self) -> u64 {
        self.steps_taken
    }

    /// Apply one update with the scheduled learning rate and weight decay.
    pub fn step(&mut self, grads: &GradStore, lr: f64, weight_decay: f64) -> Result<StepStats> {
        let (b1, b2, eps) = (self.cfg.beta1, self.cfg.beta2, self.cfg.eps);
        let mut stats = StepStats::default();
        for (group, states) in self.groups.iter().zip(self.state.iter_mut()) {
            let lr_g = lr * group.lr_scale;
            let wd_g = if group.weight_decay {
                weight_decay
            } else {
                0.0
            };
            for ((_, var), st) in group.params.iter().zip(states.iter_mut()) {
                let Some(grad) = grads.get(var.as_tensor()) else {
                    stats.without_grad += 1;
                    continue;
                };
                stats.updated += 1;
                st.step += 1;
                let bc1 = 1.0 - b1.powi(st.step as i32);
                let bc2_sqrt = (1.0 - b2.powi(st.step as i32)).sqrt();
                let step_size = lr_g / bc1;
                let grad = grad.to_dtype(DType::F32)?;
                if self.fused_cpu
                    && adamw_cpu::applicable(var.as_tensor(), &grad, &st.exp_avg, &st.exp_avg_sq)
                {
                    let args = adamw_cpu::UpdateArgs {
                        beta1: b1,
                        beta2: b2,
                        eps,
                        decay: 1.0 - lr_g * wd_g,
                        step_size,
                        bc2_sqrt,
                    };
                    adamw_cpu::update(var.as_tensor(), &grad, &st.exp_avg, &st.exp_avg_sq, &args)?;
                    continue;
                }
                // Work on an f32 view of the parameter; cast back only if the Var is not f32.
                let mut theta = var.as_tensor().detach().to_dtype(DType::F32)?;
                if wd_g != 0.0 {
                    theta = theta.affine(1.0 - lr_g * wd_g, 0.0)?;
                }
                st.exp_avg = ((&st.exp_avg * b1)? + (&grad * (1.0 - b1))?)?;
                st.exp_avg_sq = ((&st.exp_avg_sq * b2)? + (grad.sqr()? * (1.0 - b2))?)?;
                let denom = ((st.exp_avg_sq.sqrt()? / bc2_sqrt)? + eps)?;
                let update = ((&st.exp_avg / &denom)? * step_size)?;
                theta = (theta - update)?;
                var.set(&theta.to_dtype(var.dtype())?)?;
            }
        }
        self.steps_taken += 1;
        Ok(stats)
    }

    /// The state as named tensors: `exp_avg.{name}`, `exp_avg_sq.{name}`, `step.{name}`, plus
    /// `optimizer.steps_taken`.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        let cpu = candle::Device::Cpu;
        for (group, states) in self.groups.iter().zip(&self.state) {
            for ((name, _), st) in group.params.iter().zip(states) {
                // Copies: the fused CPU path updates the moments in place.
                out.insert(format!("exp_avg.{name}"), st.exp_avg.copy()?);
                out.insert(format!("exp_avg_sq.{name}"), st.exp_avg_sq.copy()?);
                // f64 holds any realistic step count exactly (< 2^53).
                out.insert(
                    format!("step.{name}"),
                    Tensor::new(&[st.step as f64], &cpu)?,
                );
            }
        }
        out.insert(
            "optimizer.steps_taken".into(),
            Tensor::new(&[self.steps_taken as f64], &cpu)?,
        );
        Ok(out)
    }

    /// Restore the state saved by [`AdamW::state_tensors`]. Every parameter must be present with
    /// its shape; the error names the first missing or mismatched entry. Extra entries (e.g. of
    /// parameters frozen in this run) are an error too, so a wrong file is not half-loaded.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let get = |key: &str| {
            tensors
                .get(key)
                .ok_or_else(|| TrainError::OptimizerState(format!("missing entry `{key}`")))
        };
        let scalar = |key: &str| -> Result<u64> {
            let t = get(key)?;
            let v = t
                .flatten_all()?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()
                .map_err(TrainError::from)?;
            match v.as_slice() {
                [x] if *x >= 0.0 && x.fract() == 0.0 => Ok(*x as u64),
                _ => Err(TrainError::OptimizerState(format!(
                    "entry `{key}` must hold one non-negative integer, found {v:?}"
                ))),
            }
        };
        let mut new_state = Vec::with_capacity(self.groups.len());
        let mut expected = 1usize; // optimizer.steps_taken
        for group in &self.groups {
            let mut gs = Vec::with_capacity(group.params.len());
            for (name, var) in &group.params {
                let mut moment = |prefix: &str| -> Result<Tensor> {
                    let key = format!("{prefix}.{name}");
                    let t = get(&key)?;
                    if t.dims() != var.dims() {
                        return Err(TrainError::OptimizerState(format!(
                            "entry `{key}` has shape {:?}, the parameter has {:?}",
                            t.dims(),
                            var.dims()
                        )));
                    }
                    expected += 1;
                    // A private copy: the fused CPU path updates moments in place, and must not
                    // write into the caller's tensors.
                    Ok(t.to_dtype(DType::F32)?.to_device(var.device())?.copy()?)
                };
                let exp_avg = moment("exp_avg")?;
                let exp_avg_sq = moment("exp_avg_sq")?;
                let step = scalar(&format!("step.{name}"))?;
                expected += 1;
                gs.push(ParamState {
                    exp_avg,
                    exp_avg_sq,
                    step,
                });
            }
            new_state.push(gs);
        }
        if tensors.len() != expected {
            let known: std::collections::HashSet<String> = self
                .groups
                .iter()
                .flat_map(|g| g.params.iter().map(|(n, _)| n.clone()))
                .collect();
            let extra = tensors
                .keys()
                .find(|k| {
                    *k != "optimizer.steps_taken"
                        && !k.split_once('.').is_some_and(|(_, n)| known.contains(n))
                })
                .cloned()
                .unwrap_or_default();
            return Err(TrainError::OptimizerState(format!(
                "{} entries, expected {expected}; unknown entry `{extra}` (was the state saved for \
                 another set of trainable parameters?)",
                tensors.len()
            )));
        }
        self.steps_taken = scalar("optimizer.steps_taken")?;
        self.state = new_state;
        Ok(())
    }

    /// Save the state to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        candle::safetensors::save(&self.state_tensors()?, path).map_err(|e| {
            TrainError::Checkpoint {
                path: path.to_path_buf(),
                message: format!("writing optimizer state: {e}"),
            }
        })
    }

    /// Load the state from a safetensors file written by [`AdamW::save`].
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let tensors = candle::safetensors::load(path, &candle::Device::Cpu).map_err(|e| {
            TrainError::Checkpoint {
                path: path.to_path_buf(),
                message: format!("reading optimizer state: {e}"),
            }
        })?;
        self.load_state(&tensors)
            .map_err(|e| TrainError::Checkpoint {
                path: path.to_path_buf(),
                message: e.to_string(),
            })
    }
}
