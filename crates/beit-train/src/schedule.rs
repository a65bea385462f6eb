//! Per-step schedules: linear warm-up followed by a half cosine, as unilm's `cosine_scheduler`.
//!
//! For `total` steps of which `warmup` are warm-up:
//!
//! * step `i < warmup`: `start + (base − start)·i/(warmup − 1)` (numpy `linspace`, which includes
//!   both ends, so the last warm-up step already equals `base`; with a single warm-up step the
//!   value is `start`);
//! * step `i ≥ warmup`, `j = i − warmup`, `n = total − warmup`:
//!   `final + ½(base − final)(1 + cos(π·j/n))`.
//!
//! Steps past the end keep the last value (unilm would index out of bounds). The same type serves
//! the weight-decay schedule (no warm-up; `base == final` gives a constant).

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// A cosine schedule with linear warm-up, evaluated per optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CosineSchedule {
    /// Peak value, reached at the end of the warm-up.
    pub base: f64,
    /// Value approached at the last step (`min_lr`, `weight_decay_end`).
    pub final_value: f64,
    /// Total number of optimizer steps (`epochs · steps_per_epoch`).
    pub total_steps: u64,
    /// Number of warm-up steps.
    pub warmup_steps: u64,
    /// Value at step 0 of the warm-up (unilm: 0).
    pub start_warmup_value: f64,
}

impl CosineSchedule {
    /// Build a schedule; fails if the warm-up does not leave at least one cosine step.
    pub fn new(base: f64, final_value: f64, total_steps: u64, warmup_steps: u64) -> Result<Self> {
        if total_steps == 0 {
            return Err(TrainError::Config("schedule with 0 total steps".into()));
        }
        if warmup_steps >= total_steps {
            return Err(TrainError::Config(format!(
                "{warmup_steps} warm-up steps leave nothing of {total_steps} total steps"
            )));
        }
        Ok(Self {
            base,
            final_value,
            total_steps,
            warmup_steps,
            start_warmup_value: 0.0,
        })
    }

    /// unilm's argument convention: `epochs · steps_per_epoch` steps; warm-up of
    /// `warmup_epochs · steps_per_epoch` steps, replaced by `warmup_steps` when that is given,
    /// but (as in unilm) only when `warmup_epochs > 0`.
    pub fn from_epochs(
        base: f64,
        final_value: f64,
        epochs: u64,
        steps_per_epoch: u64,
        warmup_epochs: u64,
        warmup_steps: Option<u64>,
    ) -> Result<Self> {
        let warmup = if warmup_epochs == 0 {
            0
        } else {
            match warmup_steps {
                Some(s) if s > 0 => s,
                _ => warmup_epochs * steps_per_epoch,
            }
        };
        Self::new(base, final_value, epochs * steps_per_epoch, warmup)
    }

    /// A constant schedule (e.g. weight decay without `weight_decay_end`).
    pub fn constant(value: f64, total_steps: u64) -> Result<Self> {
        Self::new(value, value, total_steps, 0)
    }

    /// The value at optimizer step `step` (0-based).
    pub fn value(&self, step: u64) -> f64 {
        let step = step.min(self.total_steps - 1);
        if step < self.warmup_steps {
            if self.warmup_steps == 1 {
                return self.start_warmup_value;
            }
            let t = step as f64 / (self.warmup_steps - 1) as f64;
            return self.start_warmup_value + (self.base - self.start_warmup_value) * t;
        }
        let j = (step - self.warmup_steps) as f64;
        let n = (self.total_steps - self.warmup_steps) as f64;
        self.final_value
            + 0.5 * (self.base - self.final_value) * (1.0 + (std::f64::consts::PI * j / n).cos())
    }

    /// All values, one per step (for plots and tests).
    pub fn values(&self) -> Vec<f64> {
        (0..self.total_steps).map(|s| self.value(s)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_values() {
        // 10 steps, 3 warm-up: linspace(0, 1, 3) = 0, .5, 1; then cosine over 7 steps.
        let s = CosineSchedule::new(1.0, 0.0, 10, 3).unwrap();
        assert_eq!(s.value(0), 0.0);
        assert_eq!(s.value(1), 0.5);
        assert_eq!(s.value(2), 1.0);
        assert_eq!(s.value(3), 1.0);
        let want = 0.5 * (1.0 + (std::f64::consts::PI * 3.0 / 7.0).cos());
        assert!((s.value(6) - want).abs() < 1e-15);
        // Past the end: clamp to the last value.
        assert_eq!(s.value(100), s.value(9));
        let c = CosineSchedule::constant(0.05, 5).unwrap();
        assert!(c.values().iter().all(|&v| v == 0.05));
        assert!(CosineSchedule::new(1.0, 0.0, 5, 5).is_err());
    }
}
