//! Per-step schedules: linear warm-up followed by a half cosine, as unilm's `cosine_scheduler`
//! ([`CosineSchedule`]), or mmcv's polynomial decay with linear warm-up, as unilm's semantic
//! segmentation recipe uses it ([`PolySchedule`]); [`LrSchedule`] is either.
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

/// mmcv's `PolyLrUpdaterHook` with `warmup='linear'` (unilm's ADE20K recipe: power 1.0,
/// `min_lr` 0, 1,500 warm-up iterations, `warmup_ratio` 1e-6), evaluated per optimizer step:
///
/// * the regular value of step `i` of `total`: `(base − final)·(1 − i/total)^power + final`;
/// * during the warm-up (`i < warmup`) it is scaled by `1 − (1 − i/warmup)·(1 − warmup_ratio)`,
///   which rises linearly from `warmup_ratio` towards 1.
///
/// Steps past the end keep the last value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PolySchedule {
    /// Peak value (`lr`).
    pub base: f64,
    /// Value approached at the end (`min_lr`).
    pub final_value: f64,
    /// Total number of optimizer steps (`max_iters`).
    pub total_steps: u64,
    /// Number of warm-up steps (`warmup_iters`).
    pub warmup_steps: u64,
    /// Exponent of the decay (`power`).
    pub power: f64,
    /// Scale of the regular value at step 0 of the warm-up (`warmup_ratio`).
    pub warmup_ratio: f64,
}

impl PolySchedule {
    /// Build a schedule; fails on 0 steps, a warm-up covering every step, or a non-finite or
    /// negative power.
    pub fn new(
        base: f64,
        final_value: f64,
        total_steps: u64,
        warmup_steps: u64,
        power: f64,
        warmup_ratio: f64,
    ) -> Result<Self> {
        if total_steps == 0 {
            return Err(TrainError::Config("schedule with 0 total steps".into()));
        }
        if warmup_steps >= total_steps {
            return Err(TrainError::Config(format!(
                "{warmup_steps} warm-up steps leave nothing of {total_steps} total steps"
            )));
        }
        if !(power.is_finite() && power >= 0.0) {
            return Err(TrainError::Config(format!(
                "poly_power must be finite and >= 0, got {power}"
            )));
        }
        if !(0.0..=1.0).contains(&warmup_ratio) {
            return Err(TrainError::Config(format!(
                "warmup_ratio must lie in [0, 1], got {warmup_ratio}"
            )));
        }
        Ok(Self {
            base,
            final_value,
            total_steps,
            warmup_steps,
            power,
            warmup_ratio,
        })
    }

    /// The value at optimizer step `step` (0-based).
    pub fn value(&self, step: u64) -> f64 {
        let step = step.min(self.total_steps - 1);
        let progress = step as f64 / self.total_steps as f64;
        let regular =
            (self.base - self.final_value) * (1.0 - progress).powf(self.power) + self.final_value;
        if step < self.warmup_steps {
            let k = (1.0 - step as f64 / self.warmup_steps as f64) * (1.0 - self.warmup_ratio);
            return regular * (1.0 - k);
        }
        regular
    }
}

/// Which learning-rate schedule a run follows (`[train] schedule`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Linear warm-up + half cosine (unilm's classification and pre-training recipes).
    #[default]
    Cosine,
    /// Linear warm-up (from `warmup_ratio` 1e-6) + polynomial decay (mmseg / unilm's
    /// segmentation recipe).
    Poly,
}

/// A learning-rate schedule of either kind.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum LrSchedule {
    /// [`CosineSchedule`].
    Cosine(CosineSchedule),
    /// [`PolySchedule`].
    Poly(PolySchedule),
}

impl LrSchedule {
    /// The value at optimizer step `step` (0-based).
    pub fn value(&self, step: u64) -> f64 {
        match self {
            Self::Cosine(s) => s.value(step),
            Self::Poly(s) => s.value(step),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poly_matches_mmcv() {
        // mmcv: warm-up lr = regular * (1 - (1 - i/w)(1 - ratio)), regular = (base - min)(1 -
        // i/T)^p + min. Values computed by hand for base 1, T 10, w 4, ratio 0.
        let s = PolySchedule::new(1.0, 0.0, 10, 4, 1.0, 0.0).unwrap();
        assert_eq!(s.value(0), 0.0);
        assert!((s.value(2) - 0.8 * 0.5).abs() < 1e-15);
        assert!((s.value(4) - 0.6).abs() < 1e-15);
        assert!((s.value(9) - 0.1).abs() < 1e-15);
        assert_eq!(s.value(50), s.value(9));
        // Power 2, min 0.5, the ADE20K warm-up ratio at step 0.
        let s = PolySchedule::new(3e-5, 0.0, 160_000, 1_500, 1.0, 1e-6).unwrap();
        assert!((s.value(0) - 3e-11).abs() < 1e-20);
        assert!((s.value(1_500) - 3e-5 * (1.0 - 1_500.0 / 160_000.0)).abs() < 1e-18);
        let s = PolySchedule::new(2.0, 0.5, 4, 0, 2.0, 1e-6).unwrap();
        assert!((s.value(2) - (1.5 * 0.25 + 0.5)).abs() < 1e-15);
        assert!(PolySchedule::new(1.0, 0.0, 5, 5, 1.0, 0.0).is_err());
        assert!(PolySchedule::new(1.0, 0.0, 5, 0, f64::NAN, 0.0).is_err());
        let l = LrSchedule::Poly(PolySchedule::new(1.0, 0.0, 10, 0, 1.0, 0.0).unwrap());
        assert!((l.value(5) - 0.5).abs() < 1e-15);
    }

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
