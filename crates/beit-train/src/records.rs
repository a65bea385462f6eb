//! The records of a run: `metrics.jsonl` (step, epoch and eval records), the log lines, the
//! progress bar and, at the end, the curves plot.
//!
//! [`Records`] also keeps the running averages the records report (the step's and the epoch's
//! sample-weighted means) and the throughput. Only rank 0 writes the log; the other ranks keep
//! the averages (checkpointed with the state) and nothing else.
//!
//! The values of a step stay on the device ([`crate::pending`]) until [`Records::read_back`]
//! reads all the completed steps at once; then each step is folded, checked and written exactly
//! as if it had been read at its end, so the log does not depend on when the reads happen. The
//! throughput of the steps read together is their mean over the time since the previous read
//! (on an accelerator, the time of a single step is only its launch time).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::error::{Result, TrainError};
use crate::metrics::{MetricAverager, MetricsWriter, Throughput};
use crate::pending::{Pending, ReadMicroBatch, ReadStep};
use crate::plot::{plot_metrics, PlotOptions};
use crate::progress::TrainProgress;
use crate::step_value::StepValue;
use crate::update::Update;

/// File name of the metrics log inside the run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// File name of the curves plot inside the run directory.
pub const PLOT_FILE: &str = "curves.png";

/// An optimizer step as its `step` record in `metrics.jsonl` tells it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    /// Optimizer steps completed (1 after the first).
    pub step: u64,
    /// Epoch the step belonged to.
    pub epoch: u64,
    /// Mean loss over the step's micro-batches.
    pub loss: f64,
    /// Learning rate used (before the groups' lr scales).
    pub lr: f64,
    /// Weight decay used.
    pub weight_decay: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The update was skipped because the gradient norm was not finite.
    pub skipped: bool,
    /// Means of the caller's metrics over the step.
    pub metrics: BTreeMap<String, f64>,
    /// Samples per second, over the steps read back together with this one.
    pub images_per_sec: f64,
}

/// Metrics log, progress bar and running averages of a run.
pub struct Records {
    /// The log; `None` on ranks other than 0.
    writer: Option<MetricsWriter>,
    path: PathBuf,
    progress: TrainProgress,
    pending: Pending,
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
            pending: Pending::new(),
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

    /// The epoch's running sums (saved with a checkpoint; read the completed steps back first).
    pub fn epoch_sums(&self) -> BTreeMap<String, [f64; 2]> {
        self.epoch_avg.sums()
    }

    /// Whether completed steps wait to be read back.
    pub fn has_pending_steps(&self) -> bool {
        self.pending.has_steps()
    }

    fn write(&mut self, rec: Map<String, Value>) -> Result<()> {
        match &mut self.writer {
            Some(m) => m.write(&Value::Object(rec)),
            None => Ok(()),
        }
    }

    /// Count a micro-batch of `batch_size` samples with `loss` and `metrics`, trained after
    /// `steps_done` optimizer steps, into the step under way (nothing is read).
    pub fn add_micro_batch(
        &mut self,
        steps_done: u64,
        loss: StepValue,
        batch_size: f64,
        metrics: Vec<(String, StepValue)>,
    ) {
        self.pending
            .add_micro_batch(steps_done, loss, batch_size, metrics);
        self.throughput.add(batch_size as u64);
    }

    /// Close optimizer step `step` of `epoch` with its `update`; its record waits for
    /// [`Records::read_back`].
    pub fn step(&mut self, step: u64, epoch: u64, update: Update) {
        self.pending.close_step(step, epoch, update);
    }

    /// Read the completed steps back (one read), then fold each into the epoch's means, write
    /// its record, move the progress bar and log a line at step 1 and every `log_every` steps.
    /// Fails on the first non-finite loss, or non-finite gradient norm of an update that was
    /// applied, naming its step; the steps before it are written.
    pub fn read_back(&mut self) -> Result<Vec<StepRecord>> {
        if !self.pending.has_steps() {
            return Ok(Vec::new());
        }
        let steps = self.pending.read()?;
        let images_per_sec = self.throughput.rate();
        steps
            .into_iter()
            .map(|s| self.fold_step(s, images_per_sec))
            .collect()
    }

    fn fold_step(&mut self, s: ReadStep, images_per_sec: f64) -> Result<StepRecord> {
        for mb in &s.micro_batches {
            self.fold_micro_batch(mb)?;
        }
        if !s.update.skipped && !s.grad_norm.is_finite() {
            return Err(TrainError::NonFinite {
                what: "gradient norm",
                step: s.step - 1,
                value: s.grad_norm,
            });
        }
        let samples = std::mem::take(&mut self.step_samples) as f64;
        let mut metrics = self.step_avg.means();
        self.step_avg.reset();
        let loss = metrics.remove("loss").unwrap_or(f64::NAN);
        self.epoch_avg.add("loss", loss, samples);
        for (k, v) in &metrics {
            self.epoch_avg.add(k, *v, samples);
        }
        let record = StepRecord {
            step: s.step,
            epoch: s.epoch,
            loss,
            lr: s.update.lr,
            weight_decay: s.update.wd,
            grad_norm: s.grad_norm,
            skipped: s.update.skipped,
            metrics,
            images_per_sec,
        };
        self.write(self.step_record(&record, s.update.comm_seconds))?;
        self.log_step(&record);
        Ok(record)
    }

    /// Fold a micro-batch into the step's means; a non-finite loss stops the run.
    fn fold_micro_batch(&mut self, mb: &ReadMicroBatch) -> Result<()> {
        if !mb.loss.is_finite() {
            return Err(TrainError::NonFinite {
                what: "loss",
                step: mb.steps_done,
                value: mb.loss,
            });
        }
        self.step_avg.add("loss", mb.loss, mb.batch_size);
        for (k, v) in &mb.metrics {
            self.step_avg.add(k, *v, mb.batch_size);
        }
        self.step_samples += mb.batch_size as u64;
        Ok(())
    }

    fn log_step(&self, r: &StepRecord) {
        let step = r.step;
        self.progress.update(step, r.loss, r.lr, r.images_per_sec);
        if step % self.log_every == 0 || step == 1 {
            let extra: String = (r.metrics.iter())
                .map(|(k, v)| format!(" {k} {v:.4}"))
                .collect();
            tracing::info!(
                "step {step}/{} epoch {} loss {:.4} lr {:.3e} grad_norm {:.3}{extra} \
                 {:.1} img/s",
                self.total_steps,
                r.epoch,
                r.loss,
                r.lr,
                r.grad_norm,
                r.images_per_sec,
            );
        }
    }

    fn step_record(&self, r: &StepRecord, comm_seconds: f64) -> Map<String, Value> {
        let mut rec = header("step", r.step, r.epoch);
        rec.insert("loss".into(), json!(r.loss));
        rec.insert("lr".into(), json!(r.lr));
        rec.insert("wd".into(), json!(r.weight_decay));
        rec.insert("grad_norm".into(), json!(r.grad_norm));
        for (k, v) in &r.metrics {
            rec.insert(k.clone(), json!(v));
        }
        rec.insert("images_per_sec".into(), json!(r.images_per_sec));
        if self.data_parallel {
            // Time in the step's collectives (gradient and loss all-reduces, waits included).
            rec.insert("comm_seconds".into(), json!(comm_seconds));
        }
        if r.skipped {
            rec.insert("skipped".into(), json!(true));
        }
        rec
    }

    /// Close `epoch` at `step`: write its record with the epoch's means and restart them (read
    /// the completed steps back first).
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

    /// Start timing the next steps (after a read and a checkpoint, so that saving does not
    /// count).
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
