//! The records of a run: `metrics.jsonl` (step, epoch and eval records), the log lines, the
//! progress bar and, at the end, the curves plot.
//!
//! [`Records`] also keeps the running averages the records report (the step's and the epoch's
//! sample-weighted means) and the step's throughput. Only rank 0 writes the log; the other ranks
//! keep the averages (checkpointed with the state) and nothing else.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::error::Result;
use crate::metrics::{MetricAverager, MetricsWriter, Throughput};
use crate::plot::{plot_metrics, PlotOptions};
use crate::progress::TrainProgress;
use crate::update::Update;

/// File name of the metrics log inside the run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// File name of the curves plot inside the run directory.
pub const PLOT_FILE: &str = "curves.png";

/// The step's means, as reported by [`Records::step`].
#[derive(Debug, Clone, PartialEq)]
pub struct StepMeans {
    /// Mean loss over the step's micro-batches.
    pub loss: f64,
    /// Means of the caller's metrics.
    pub metrics: BTreeMap<String, f64>,
    /// Samples per second over the step.
    pub images_per_sec: f64,
}

/// Metrics log, progress bar and running averages of a run.
pub struct Records {
    /// The log; `None` on ranks other than 0.
    writer: Option<MetricsWriter>,
    path: PathBuf,
    progress: TrainProgress,
    step_avg: MetricAverager,
    epoch_avg: MetricAverager,
    step_samples: u64,
    throughput: Throughput,
    log_every: u64,
    total_steps: u64,
    data_parallel: bool,
}

impl Records {
    /// Records written to `writer` (rank 0) at `path`, continuing the epoch averages of
    /// `epoch_sums` (a resumed run's). `data_parallel` adds the time in collectives to the
    /// step records.
    pub fn new(
        writer: Option<MetricsWriter>,
        path: PathBuf,
        progress: TrainProgress,
        epoch_sums: &BTreeMap<String, [f64; 2]>,
        (log_every, total_steps): (u64, u64),
        data_parallel: bool,
    ) -> Self {
        Self {
            writer,
            path,
            progress,
            step_avg: MetricAverager::new(),
            epoch_avg: MetricAverager::from_sums(epoch_sums),
            step_samples: 0,
            throughput: Throughput::new(),
            log_every,
            total_steps,
            data_parallel,
        }
    }

    /// The metrics log.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The progress bar.
    pub fn progress(&self) -> &TrainProgress {
        &self.progress
    }

    /// The epoch's running sums (saved with a checkpoint).
    pub fn epoch_sums(&self) -> BTreeMap<String, [f64; 2]> {
        self.epoch_avg.sums()
    }

    fn write(&mut self, rec: Map<String, Value>) -> Result<()> {
        match &mut self.writer {
            Some(m) => m.write(&Value::Object(rec)),
            None => Ok(()),
        }
    }

    /// Count a micro-batch of `batch_size` samples with `loss` and `metrics` into the step.
    pub fn add_micro_batch(&mut self, loss: f64, batch_size: f64, metrics: &[(String, f64)]) {
        self.step_avg.add("loss", loss, batch_size);
        for (k, v) in metrics {
            self.step_avg.add(k, *v, batch_size);
        }
        self.step_samples += batch_size as u64;
    }

    /// Close optimizer step `step` of `epoch`: fold its means into the epoch's, write its
    /// record, move the progress bar and log a line every `log_every` steps.
    pub fn step(&mut self, step: u64, epoch: u64, update: &Update) -> Result<StepMeans> {
        let images_per_sec = {
            let mut t = std::mem::take(&mut self.throughput);
            t.add(self.step_samples);
            t.rate()
        };
        let samples = std::mem::take(&mut self.step_samples) as f64;
        let mut metrics = self.step_avg.means();
        self.step_avg.reset();
        let loss = metrics.remove("loss").unwrap_or(f64::NAN);
        self.epoch_avg.add("loss", loss, samples);
        for (k, v) in &metrics {
            self.epoch_avg.add(k, *v, samples);
        }
        let means = StepMeans {
            loss,
            metrics,
            images_per_sec,
        };
        self.write(self.step_record(step, epoch, update, &means))?;
        self.progress.update(step, loss, update.lr, images_per_sec);
        if step % self.log_every == 0 || step == 1 {
            let extra: String = (means.metrics.iter())
                .map(|(k, v)| format!(" {k} {v:.4}"))
                .collect();
            tracing::info!(
                "step {step}/{} epoch {epoch} loss {loss:.4} lr {:.3e} grad_norm {:.3}{extra} \
                 {images_per_sec:.1} img/s",
                self.total_steps,
                update.lr,
                update.grad_norm,
            );
        }
        Ok(means)
    }

    fn step_record(
        &self,
        step: u64,
        epoch: u64,
        update: &Update,
        means: &StepMeans,
    ) -> Map<String, Value> {
        let mut rec = header("step", step, epoch);
        rec.insert("loss".into(), json!(means.loss));
        rec.insert("lr".into(), json!(update.lr));
        rec.insert("wd".into(), json!(update.wd));
        rec.insert("grad_norm".into(), json!(update.grad_norm));
        for (k, v) in &means.metrics {
            rec.insert(k.clone(), json!(v));
        }
        rec.insert("images_per_sec".into(), json!(means.images_per_sec));
        if self.data_parallel {
            // Time in the step's collectives (gradient and loss all-reduces, waits included).
            rec.insert("comm_seconds".into(), json!(update.comm_seconds));
        }
        if update.skipped {
            rec.insert("skipped".into(), json!(true));
        }
        rec
    }

    /// Close `epoch` at `step`: write its record with the epoch's means and restart them.
    pub fn end_epoch(&mut self, step: u64, epoch: u64) -> Result<()> {
        let means = self.epoch_avg.means();
        self.epoch_avg.reset();
        let mut rec = header("epoch", step, epoch);
        for (k, v) in &means {
            rec.insert(k.clone(), json!(v));
        }
        self.write(rec)?;
        tracing::info!(
            "epoch {epoch} done: {}",
            join(means.iter().map(|(k, v)| (k.clone(), *v)))
        );
        Ok(())
    }

    /// Write an `eval` record of `metrics` at `step` of `epoch`.
    pub fn eval(&mut self, step: u64, epoch: u64, metrics: &[(&str, f64)]) -> Result<()> {
        let mut rec = header("eval", step, epoch);
        for (k, v) in metrics {
            rec.insert((*k).to_string(), json!(v));
        }
        self.write(rec)?;
        tracing::info!(
            "eval at step {step}: {}",
            join(metrics.iter().map(|(k, v)| (k.to_string(), *v)))
        );
        Ok(())
    }

    /// Start timing the next step (after a checkpoint, so that saving does not count).
    pub fn restart_clock(&mut self) {
        self.throughput = Throughput::new();
    }

    /// Close the progress bar and draw the curves plot into `out_dir` (rank 0; a plotting
    /// failure is logged, not fatal).
    pub fn finish(&self, out_dir: &Path) -> Option<PathBuf> {
        self.progress.finish();
        self.writer.as_ref()?;
        let png = out_dir.join(PLOT_FILE);
        match plot_metrics(&self.path, &png, &PlotOptions::default()) {
            Ok(_) => Some(png),
            Err(e) => {
                tracing::warn!("no plot: {e}");
                None
            }
        }
    }
}

fn header(kind: &str, step: u64, epoch: u64) -> Map<String, Value> {
    let mut rec = Map::new();
    rec.insert("kind".into(), json!(kind));
    rec.insert("step".into(), json!(step));
    rec.insert("epoch".into(), json!(epoch));
    rec
}

fn join(pairs: impl Iterator<Item = (String, f64)>) -> String {
    pairs
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect::<Vec<_>>()
        .join(", ")
}
