//! Dynamic batching: requests wait in a bounded queue; one dedicated thread takes up to
//! `max_batch` images (or whatever arrived within `max_wait` of the first), runs them as one
//! forward pass, and sends each request its own rows back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle::Tensor;
use tokio::sync::oneshot;

use crate::error::{Result, ServeError};
use crate::metrics::Metrics;
use crate::model::{Answer, ServedModel, Task};

/// One request's images, preprocessed, and where its answer goes.
pub struct Job {
    /// `(n, 3, H, W)`.
    pub pixels: Tensor,
    /// What to compute.
    pub task: Task,
    /// The answer, or a message naming the failure.
    pub reply: oneshot::Sender<std::result::Result<Answer, String>>,
}

impl Job {
    fn len(&self) -> usize {
        self.pixels.dim(0).unwrap_or(1)
    }
}

/// Why a job was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejected {
    /// The queue is at capacity.
    Full,
    /// The batching thread has stopped.
    Closed,
}

/// The sending side: bounded, never blocks.
#[derive(Clone)]
pub struct Batcher {
    tx: SyncSender<Job>,
    metrics: Arc<Metrics>,
}

impl Batcher {
    /// Queue `job`, or say why not at once.
    pub fn submit(&self, job: Job) -> std::result::Result<(), Rejected> {
        self.metrics.queue_depth.fetch_add(1, Ordering::SeqCst);
        self.tx.try_send(job).map_err(|e| {
            self.metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
            match e {
                TrySendError::Full(_) => Rejected::Full,
                TrySendError::Disconnected(_) => Rejected::Closed,
            }
        })
    }
}

/// Start the batching thread. It warms the model up with `warmup` (one image), raises `ready`,
/// then serves until every [`Batcher`] is dropped and the queue is drained.
pub fn start(
    model: ServedModel,
    warmup: Tensor,
    max_batch: usize,
    max_wait: Duration,
    capacity: usize,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
) -> Result<(Batcher, JoinHandle<()>)> {
    let (tx, rx) = sync_channel(capacity);
    let m = metrics.clone();
    let handle = std::thread::Builder::new()
        .name("beit-serve-batcher".into())
        .spawn(move || {
            let task = model.warmup_task();
            if let Err(e) = model.run(&warmup, &[(task, 1)]) {
                tracing::error!("warm-up forward failed: {e:#}");
            }
            ready.store(true, Ordering::SeqCst);
            worker_loop(&model, &rx, max_batch, max_wait, &m);
        })
        .map_err(|e| ServeError::Worker(e.to_string()))?;
    Ok((Batcher { tx, metrics }, handle))
}

fn worker_loop(
    model: &ServedModel,
    rx: &Receiver<Job>,
    max_batch: usize,
    max_wait: Duration,
    metrics: &Metrics,
) {
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(j) => j,
            None => match rx.recv() {
                Ok(j) => {
                    metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
                    j
                }
                Err(_) => return,
            },
        };
        let (batch, next) = gather(first, rx, max_batch, max_wait, metrics);
        carried = next;
        run_batch(model, batch, metrics);
    }
}

/// `first` plus whatever joins within `max_wait`, up to `max_batch` images; a job that would
/// overflow the batch is returned to start the next one.
fn gather(
    first: Job,
    rx: &Receiver<Job>,
    max_batch: usize,
    max_wait: Duration,
    metrics: &Metrics,
) -> (Vec<Job>, Option<Job>) {
    let deadline = Instant::now() + max_wait;
    let mut images = first.len();
    let mut batch = vec![first];
    while images < max_batch {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(job) => {
                metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
                if images + job.len() > max_batch {
                    return (batch, Some(job));
                }
                images += job.len();
                batch.push(job);
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
        }
    }
    (batch, None)
}

/// Run the jobs, grouped by image size (one forward per size), and answer each.
fn run_batch(model: &ServedModel, mut jobs: Vec<Job>, metrics: &Metrics) {
    while !jobs.is_empty() {
        let dims = jobs[0].pixels.dims()[1..].to_vec();
        let (same, rest): (Vec<Job>, Vec<Job>) = jobs
            .into_iter()
            .partition(|j| j.pixels.dims()[1..] == dims[..]);
        jobs = rest;
        run_group(model, same, metrics);
    }
}

fn run_group(model: &ServedModel, jobs: Vec<Job>, metrics: &Metrics) {
    let tasks: Vec<(Task, usize)> = jobs.iter().map(|j| (j.task, j.len())).collect();
    metrics.observe_batch(tasks.iter().map(|t| t.1).sum());
    let pixels: Vec<&Tensor> = jobs.iter().map(|j| &j.pixels).collect();
    let result = Tensor::cat(&pixels, 0)
        .map_err(anyhow::Error::from)
        .and_then(|p| model.run(&p, &tasks));
    match result {
        Ok(answers) => {
            for (job, answer) in jobs.into_iter().zip(answers) {
                // A client that timed out has dropped its receiver: nothing to do.
                let _ = job.reply.send(Ok(answer));
            }
        }
        Err(e) => {
            tracing::error!("forward pass failed: {e:#}");
            for job in jobs {
                let _ = job.reply.send(Err(format!("{e:#}")));
            }
        }
    }
}
