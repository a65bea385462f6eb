//! The update of a run: the data-parallel reductions (the loss of the global micro-batch, the
//! mean gradient), gradient clipping and the AdamW step with the scheduled learning rate and
//! weight decay.
//!
//! [`Updater`] owns the optimizer and the schedules and the collective it reduces over; the
//! [`crate::TrainLoop`] hands it the accumulated gradients of each optimizer step.

use std::sync::Arc;
use std::time::Instant;

use candle::backprop::GradStore;
use candle::Var;

use crate::clip::{clip_grad_norm, squared_grad_norm, SquaredNorm};
use crate::distributed::{self, Collective};
use crate::error::Result;
use crate::optimizer::AdamW;
use crate::param_groups::ParamGroup;
use crate::schedule::{CosineSchedule, LrSchedule};
use crate::step_value::{self, StepValue};
use crate::train_config::TrainConfig;

/// The global gradient norm of a step, before clipping.
#[derive(Debug, Clone)]
pub enum GradNorm {
    /// Known on the host: clipping read it, or every gradient was summed on the host.
    Read(f64),
    /// Partly on the device (no clipping): read with the step's logged values.
    Pending(SquaredNorm),
}

/// What one optimizer step applied.
#[derive(Debug, Clone)]
pub struct Update {
    /// Scheduled learning rate (before the groups' lr scales).
    pub lr: f64,
    /// Scheduled weight decay.
    pub wd: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: GradNorm,
    /// The update was skipped because the gradient norm, known on the host, was not finite.
    pub skipped: bool,
    /// Seconds in collectives since the previous step (waits for slower ranks included).
    pub comm_seconds: f64,
}

/// A micro-batch's loss and sample count over all ranks.
#[derive(Debug, Clone)]
pub struct GlobalMicroBatch {
    /// Loss of the global micro-batch (still on the device in a single process).
    pub loss: StepValue,
    /// Samples of the global micro-batch.
    pub batch_size: f64,
    /// Sample-weighted means of the caller's metrics over the global micro-batch.
    pub metrics: Vec<(String, StepValue)>,
    /// Factor on this rank's loss so that the mean of the ranks' gradients is the gradient of
    /// the global micro-batch's loss (1 in a single process).
    pub share: f64,
}

/// Optimizer, schedules, clipping and the collective of a run.
pub struct Updater {
    optimizer: AdamW,
    vars: Vec<Var>,
    lr_sched: LrSchedule,
    wd_sched: CosineSchedule,
    clip_grad: Option<f64>,
    world: Arc<dyn Collective>,
    comm_seconds: f64,
    warned_missing_grads: bool,
}

impl Updater {
    /// AdamW over `groups` with `cfg`'s schedules, reducing over `world`.
    pub fn new(
        cfg: &TrainConfig,
        groups: Vec<ParamGroup>,
        world: Arc<dyn Collective>,
    ) -> Result<Self> {
        let optimizer = AdamW::new(groups, cfg.adamw)?;
        Ok(Self {
            vars: optimizer.vars(),
            optimizer,
            lr_sched: cfg.lr_schedule()?,
            wd_sched: cfg.wd_schedule()?,
            clip_grad: cfg.clip_grad,
            world,
            comm_seconds: 0.0,
            warned_missing_grads: false,
        })
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// The optimizer, to restore its state.
    pub fn optimizer_mut(&mut self) -> &mut AdamW {
        &mut self.optimizer
    }

    /// The trainable variables, in the optimizer's order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The collective the gradients are reduced over.
    pub fn world(&self) -> &Arc<dyn Collective> {
        &self.world
    }

    /// Scheduled learning rate at optimizer step `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.lr_sched.value(step)
    }

    /// The loss, sample count and metrics of the global micro-batch of which this rank computed
    /// `batch_size` samples with mean `loss` (over `loss_weight` terms, the batch size when
    /// `None`). Only a data-parallel run communicates; a single process reads nothing back.
    pub fn global_micro_batch(
        &mut self,
        loss: StepValue,
        batch_size: f64,
        loss_weight: Option<f64>,
        metrics: Vec<(String, StepValue)>,
    ) -> Result<GlobalMicroBatch> {
        let n = self.world.size();
        if n == 1 {
            return Ok(GlobalMicroBatch {
                loss,
                batch_size,
                metrics,
                share: 1.0,
            });
        }
        // The host all-reduce of the transport needs this rank's values on the host: a read per
        // micro-batch that only data-parallel runs make.
        let (names, values): (Vec<String>, Vec<StepValue>) = metrics.into_iter().unzip();
        let mut local = step_value::read_all(std::iter::once(loss).chain(values).collect())?;
        let loss = local.remove(0);
        let w = loss_weight.unwrap_or(batch_size);
        let mut sums = vec![loss * w, w, batch_size];
        sums.extend(local.iter().map(|v| v * batch_size));
        let t0 = Instant::now();
        self.world
            .all_reduce_sum_f64("loss all-reduce", &mut sums)?;
        self.comm_seconds += t0.elapsed().as_secs_f64();
        let batch_size = sums[2];
        let metrics = (names.into_iter().zip(&sums[3..]))
            .map(|(k, s)| (k, StepValue::Host(s / batch_size)))
            .collect();
        Ok(GlobalMicroBatch {
            loss: StepValue::Host(sums[0] / sums[1]),
            batch_size,
            metrics,
            share: w * n as f64 / sums[1],
        })
    }

    /// Optimizer step `step` (0-based) with the accumulated `grads`: the ranks' mean gradient,
    /// clipped to the global norm, then AdamW at the step's lr and wd. A non-finite norm known on
    /// the host skips the update (logged); without clipping, a norm left on the device is only
    /// checked when it is read (see [`crate::train_loop`]).
    pub fn apply(&mut self, mut grads: GradStore, step: u64) -> Result<Update> {
        // Data-parallel: every rank continues with the mean of the ranks' gradients.
        let t0 = Instant::now();
        distributed::all_reduce_grads(&*self.world, &mut grads, &self.vars)?;
        self.comm_seconds += t0.elapsed().as_secs_f64();
        let comm_seconds = std::mem::take(&mut self.comm_seconds);
        let lr = self.lr_sched.value(step);
        let wd = self.wd_sched.value(step);
        let grad_norm = match self.clip_grad {
            Some(c) => GradNorm::Read(clip_grad_norm(&mut grads, &self.vars, c)?),
            None => match squared_grad_norm(&grads, &self.vars)? {
                sq if sq.device.is_none() => GradNorm::Read(sq.norm_with(None)),
                sq => GradNorm::Pending(sq),
            },
        };
        let skipped = match grad_norm {
            GradNorm::Read(n) if !n.is_finite() => {
                tracing::warn!("step {}: gradient norm {n}, update skipped", step + 1);
                true
            }
            _ => false,
        };
        if !skipped {
            self.adamw_step(&grads, lr, wd)?;
        }
        Ok(Update {
            lr,
            wd,
            grad_norm,
            skipped,
            comm_seconds,
        })
    }

    fn adamw_step(&mut self, grads: &GradStore, lr: f64, wd: f64) -> Result<()> {
        let stats = self.optimizer.step(grads, lr, wd)?;
        if stats.without_grad > 0 && !self.warned_missing_grads {
            self.warned_missing_grads = true;
            tracing::warn!(
                "{} of {} parameters received no gradient (not updated)",
                stats.without_grad,
                stats.without_grad + stats.updated
            );
        }
        Ok(())
    }
}
