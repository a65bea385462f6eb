//! The run around every training recipe, in one place: parse the device and prepare the run
//! directory ([`start`]), open the engine on it with the resolved recipe written as
//! `config.toml` ([`open_loop`]), fit the recipe's [`beit_train::TrainTask`] with its evaluation
//! and best-model options ([`evaluated`]), record each new best in `best.json`
//! ([`write_best`]), and gather what a fine-tuning run produced ([`FinetuneOutcome`]).
//!
//! A recipe brings its config, its task and its data; these functions are the only places the
//! recipes call the engine's `TrainLoop::open_in` and read its `FitOutcome`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use beit_train::{BestMetric, FitOptions, FitOutcome, ParamGroup, Position, TrainLoop};
use candle::Device;
use candle_nn::VarMap;
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use crate::config::{prepare_output_dir, write_resolved_config, TrainSection};
use crate::device::DeviceSpec;
use crate::distributed::World;

/// The first two steps of a recipe: its device (`device`, opened for this process of `world`),
/// then its run directory
/// (`output`, created for a fresh run; required to exist when `resuming`).
pub fn start(device: DeviceSpec, world: &World, output: &Path, resuming: bool) -> Result<Device> {
    let device = device.open_in(world)?;
    prepare_output_dir(output, resuming)?;
    Ok(device)
}

/// Where and how long a run trains.
#[derive(Debug, Clone, Copy)]
pub struct RunSpec<'a> {
    /// The run directory.
    pub output: &'a Path,
    /// Resume from this checkpoint (or run directory: its newest checkpoint).
    pub resume: Option<&'a Path>,
    /// The `[train]` table.
    pub train: &'a TrainSection,
    /// Micro-batches in one epoch (over all data-parallel processes).
    pub batches_per_epoch: u64,
    /// Draw progress bars.
    pub progress: bool,
    /// The processes the run is spread over.
    pub world: &'a World,
}

impl<'a> RunSpec<'a> {
    /// A run in `output` (resumed from `resume`, if given) on the `[train]` table `train`,
    /// `batches_per_epoch` micro-batches an epoch, over the processes of `world`.
    pub fn new(
        output: &'a Path,
        resume: Option<&'a Path>,
        train: &'a TrainSection,
        batches_per_epoch: u64,
        progress: bool,
        world: &'a World,
    ) -> Self {
        Self {
            output,
            resume,
            train,
            batches_per_epoch,
            progress,
            world,
        }
    }
}

/// [`open_loop_recording`] with the recipe itself as the record of every checkpoint.
pub fn open_loop<C: Serialize>(
    spec: &RunSpec<'_>,
    config: &C,
    varmap: VarMap,
    groups: Vec<ParamGroup>,
) -> Result<TrainLoop> {
    open_loop_recording(spec, config, serde_json::to_value(config)?, varmap, groups)
}

/// Open the engine on a run: the `[train]` table's settings for `spec.batches_per_epoch`, the
/// resolved recipe `config` written as `config.toml`, then [`TrainLoop::open_in`] (fresh or
/// resumed) over `varmap`'s parameter `groups`, with `run_config` stored in every checkpoint.
pub fn open_loop_recording<C: Serialize>(
    spec: &RunSpec<'_>,
    config: &C,
    run_config: serde_json::Value,
    varmap: VarMap,
    groups: Vec<ParamGroup>,
) -> Result<TrainLoop> {
    let engine = spec.train.engine(spec.batches_per_epoch, spec.progress)?;
    write_resolved_config(spec.output, config, spec.world)?;
    Ok(TrainLoop::open_in(
        spec.world.collective(),
        engine,
        varmap,
        groups,
        spec.output,
        spec.resume,
        run_config,
    )?)
}

/// The fit options of a recipe with an evaluation: every `eval_every` epochs (at least 1) and
/// after the last, the best model by the metric `best` (higher is better), stopping after
/// `stop_after` optimizer steps if given.
pub fn evaluated(eval_every: u64, best: &str, stop_after: Option<u64>) -> FitOptions {
    FitOptions {
        eval_every: Some(eval_every.max(1)),
        best: Some(BestMetric {
            name: best.into(),
            higher_is_better: true,
        }),
        stop_after,
    }
}

/// `best.json`: the metrics of the best model, in the recipe's order, then when it was reached.
struct BestRecord<'a> {
    metrics: Vec<(&'a str, f64)>,
    epoch: u64,
    step: u64,
}

impl Serialize for BestRecord<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.metrics.len() + 2))?;
        for (name, value) in &self.metrics {
            map.serialize_entry(name, value)?;
        }
        map.serialize_entry("epoch", &self.epoch)?;
        map.serialize_entry("step", &self.step)?;
        map.end()
    }
}

/// Record a new best model in `out/best.json`: the evaluation's `keys` (in that order), the
/// epoch it followed (0-based) and the optimizer steps done. Returns the values of `keys`; an
/// evaluation without one of them is an error naming it.
pub fn write_best(
    out: &Path,
    metrics: &BTreeMap<String, f64>,
    keys: &[&'static str],
    at: Position,
) -> Result<Vec<f64>> {
    let values = keys
        .iter()
        .map(|&k| {
            metrics
                .get(k)
                .copied()
                .with_context(|| format!("best.json: the evaluation has no `{k}`"))
        })
        .collect::<Result<Vec<f64>>>()?;
    let rec = BestRecord {
        metrics: keys.iter().copied().zip(values.iter().copied()).collect(),
        epoch: at.epoch.saturating_sub(1),
        step: at.step,
    };
    let file = out.join("best.json");
    std::fs::write(&file, serde_json::to_string_pretty(&rec)?)
        .with_context(|| format!("cannot write {}", file.display()))?;
    Ok(values)
}

/// What a fine-tuning run produced (classification and segmentation).
#[derive(Debug, Clone)]
pub struct FinetuneOutcome {
    /// Optimizer steps completed.
    pub steps: u64,
    /// All scheduled steps are done (false after `stop_after`).
    pub finished: bool,
    /// What data was used.
    pub data: String,
    /// The latest evaluation (classification: `acc1`, `acc5`, `loss`; segmentation: `mIoU`,
    /// `mAcc`, `aAcc`, percent).
    pub last_eval: Option<beit_train::EvalRecord>,
    /// The best evaluation (top-1, or mIoU).
    pub best_eval: Option<beit_train::EvalRecord>,
    /// Mean training loss of the first and the last optimizer step of this invocation.
    pub loss_first_last: Option<(f64, f64)>,
    /// The exported best model (`config.json`, `model.safetensors`, `preprocessor_config.json`).
    pub best_model: PathBuf,
    /// The exported final model, when the recipe writes one (segmentation, once finished).
    pub final_model: Option<PathBuf>,
    /// The run's metrics log.
    pub metrics: PathBuf,
    /// The curves plot, if drawn.
    pub plot: Option<PathBuf>,
    /// The last checkpoint.
    pub checkpoint: PathBuf,
    /// Unreadable files skipped (train + validation).
    pub skipped_files: usize,
}

impl FinetuneOutcome {
    /// The outcome of `done`, a run in `out` on `data` (best model in `out/best_model`).
    pub fn new(done: FitOutcome, data: String, out: &Path) -> Self {
        Self {
            steps: done.summary.steps,
            finished: done.finished,
            data,
            loss_first_last: loss_first_last(&done),
            last_eval: done.last_eval,
            best_eval: done.best_eval,
            best_model: out.join("best_model"),
            final_model: None,
            metrics: done.summary.metrics,
            plot: done.summary.plot,
            checkpoint: done.summary.checkpoint,
            skipped_files: 0,
        }
    }
}

/// Mean training loss of the first and the last optimizer step of this invocation.
pub fn loss_first_last(done: &FitOutcome) -> Option<(f64, f64)> {
    done.first_step
        .as_ref()
        .zip(done.last_step.as_ref())
        .map(|(a, b)| (a.loss, b.loss))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_json_keeps_the_recipe_order_and_names_a_missing_metric() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let metrics: BTreeMap<String, f64> = [("mIoU", 40.0), ("mAcc", 50.0), ("aAcc", 80.0)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let at = Position {
            epoch: 3,
            step: 12,
            batch_in_epoch: 0,
        };
        let v = write_best(dir.path(), &metrics, &["mIoU", "mAcc", "aAcc"], at)?;
        assert_eq!(v, vec![40.0, 50.0, 80.0]);
        let text = std::fs::read_to_string(dir.path().join("best.json"))?;
        let keys: Vec<usize> = ["mIoU", "mAcc", "aAcc", "epoch", "step"]
            .iter()
            .map(|k| text.find(&format!("\"{k}\"")).unwrap())
            .collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{text}");
        let json: serde_json::Value = serde_json::from_str(&text)?;
        assert_eq!(json["epoch"], 2);
        assert_eq!(json["step"], 12);
        let err = write_best(dir.path(), &metrics, &["acc1"], at).unwrap_err();
        assert!(err.to_string().contains("acc1"), "{err}");
        Ok(())
    }
}
