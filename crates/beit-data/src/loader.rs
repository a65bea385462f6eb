//! The parallel, prefetching batch loader.
//!
//! What it reads and how it stacks a batch is an [`Assemble`] ([`ImageBatches`] for images and
//! class labels); the order of an epoch is a [`Sampler`] ([`EpochSampler`] by default).
//!
//! A background producer thread walks the epoch's indices, decodes and transforms each batch on a
//! rayon pool of its own (not the global pool, which candle's matrix multiplications use), builds
//! candle tensors and hands them over through a bounded channel, so up to `prefetch` batches are
//! ready before the model asks. Corrupt or unreadable files are skipped, counted and reported once.
//!
//! A sharded dataset (tar shards, see [`ShardSet`]) is streamed instead: each rank reads its own
//! shards through a shuffle buffer, and every rank delivers the same number of batches. The
//! position after each batch ([`EpochIter::position`]) resumes the epoch exactly
//! ([`Loader::epoch_from`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use candle::Device;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub use crate::assemble::Batch;
use crate::assemble::{Assemble, ImageBatches};
use crate::dataset::Dataset;
use crate::error::{DataError, Result};
use crate::mixup::Mixup;
use crate::sampler::{Draw, EpochSampler, Sampler};
use crate::shard_set::ShardSet;
use crate::shard_stream::{ShardStream, StreamPosition};
use crate::tar_shard::RawSample;
use crate::transform::Transform;

/// Loader settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoaderConfig {
    /// Samples per batch.
    pub batch_size: usize,
    /// Shuffle each epoch (deterministically from `seed` and the epoch number).
    pub shuffle: bool,
    /// Drop the last incomplete batch.
    pub drop_last: bool,
    /// Seed of the shuffling and of every augmentation.
    pub seed: u64,
    /// Decode/augment threads of the loader's own pool (0 = number of CPUs).
    pub num_threads: usize,
    /// Batches prepared ahead of the consumer (at least 1).
    pub prefetch: usize,
    /// This process's rank for data-parallel sharding.
    pub rank: usize,
    /// Number of data-parallel processes.
    pub world_size: usize,
    /// Show a progress bar with images/s on stderr.
    pub progress: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 64,
            shuffle: true,
            drop_last: false,
            seed: 0,
            num_threads: 0,
            prefetch: 4,
            rank: 0,
            world_size: 1,
            progress: false,
        }
    }
}

/// A sample that could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedSample {
    /// Dataset index.
    pub index: usize,
    /// Path or description of the sample.
    pub source: String,
    /// Why it failed.
    pub reason: String,
}

/// Samples skipped so far, each reported once.
#[derive(Debug, Default)]
struct SkipLog {
    seen: Mutex<BTreeMap<usize, SkippedSample>>,
}

impl SkipLog {
    fn record(&self, index: usize, source: String, reason: String) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let std::collections::btree_map::Entry::Vacant(slot) = seen.entry(index) {
            tracing::warn!("skipping unreadable sample {source}: {reason}");
            slot.insert(SkippedSample {
                index,
                source,
                reason,
            });
        }
    }

    /// Record a streamed sample, once per source (its stream index changes from epoch to epoch).
    fn record_source(&self, index: usize, source: String, reason: String) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if !seen.values().any(|s| s.source == source) {
            tracing::warn!("skipping unreadable sample {source}: {reason}");
            let key = seen.keys().next_back().map_or(0, |k| k + 1);
            seen.insert(
                key,
                SkippedSample {
                    index,
                    source,
                    reason,
                },
            );
        }
    }

    fn list(&self) -> Vec<SkippedSample> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.values().cloned().collect()
    }
}

/// Loads batches through an [`Assemble`] (by default [`ImageBatches`]: images of a [`Dataset`]
/// through a [`Transform`]) in the order of a [`Sampler`].
pub struct Loader<A: Assemble = ImageBatches> {
    assemble: A,
    sampler: Arc<dyn Sampler>,
    cfg: LoaderConfig,
    pool: Arc<rayon::ThreadPool>,
    skips: Arc<SkipLog>,
    shards: Option<Arc<ShardSet>>,
}

/// What the producer thread sends: a batch and, when streaming, the position after it.
type Sent<B> = (Result<B>, Option<StreamPosition>);

impl Loader {
    /// A loader producing tensors on `device`. Errors on an empty dataset or invalid settings.
    pub fn new(
        dataset: Arc<dyn Dataset>,
        transform: Arc<dyn Transform>,
        cfg: LoaderConfig,
        device: Device,
    ) -> Result<Self> {
        let sampler = EpochSampler {
            shuffle: cfg.shuffle,
            seed: cfg.seed,
        };
        let assemble = ImageBatches::new(dataset, transform, cfg.seed, device);
        Loader::with_assembly(assemble, Arc::new(sampler), cfg)
    }

    /// Enable mixup/CutMix: batches then carry soft targets. The dataset must be labelled.
    pub fn with_mixup(mut self, mixup: Mixup) -> Result<Self> {
        mixup.validate()?;
        self.assemble = self.assemble.with_mixup(mixup);
        Ok(self)
    }
}

impl<A: Assemble> Loader<A> {
    /// A loader of `assemble`'s batches in `sampler`'s order. Errors on an empty dataset or
    /// invalid settings.
    pub fn with_assembly(
        assemble: A,
        sampler: Arc<dyn Sampler>,
        cfg: LoaderConfig,
    ) -> Result<Self> {
        if assemble.is_empty() {
            return Err(DataError::Empty("the dataset has no sample".into()));
        }
        if cfg.batch_size == 0 {
            return Err(DataError::param("batch_size", "must be positive"));
        }
        if cfg.world_size == 0 || cfg.rank >= cfg.world_size {
            return Err(DataError::param(
                "rank",
                format!("rank {} must be < world_size {}", cfg.rank, cfg.world_size),
            ));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.num_threads)
            .thread_name(|i| format!("beit-data-{i}"))
            .build()
            .map_err(|e| DataError::param("num_threads", e.to_string()))?;
        let shards = assemble.shards();
        if let Some(s) = &shards {
            s.epoch_plan(cfg.shuffle, cfg.seed, 0, cfg.rank, cfg.world_size)?;
        }
        Ok(Loader {
            shards,
            assemble,
            sampler,
            cfg,
            pool: Arc::new(pool),
            skips: Arc::new(SkipLog::default()),
        })
    }

    /// The settings.
    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// The dataset is streamed (tar shards, Parquet files): its epochs report a
    /// [`StreamPosition`] after each batch and resume from one ([`Loader::epoch_from`]).
    pub fn is_streamed(&self) -> bool {
        self.shards.is_some()
    }

    /// Samples this rank sees per epoch.
    pub fn samples_per_epoch(&self) -> usize {
        if let Some(s) = &self.shards {
            return s.quota(self.cfg.world_size);
        }
        self.sampler
            .samples_per_epoch(self.assemble.len(), self.cfg.world_size)
    }
    /// Batches per epoch (assuming no skipped file; exact for a streamed dataset).
    pub fn batches_per_epoch(&self) -> usize {
        let n = self.samples_per_epoch();
        if self.cfg.drop_last {
            n / self.cfg.batch_size
        } else {
            n.div_ceil(self.cfg.batch_size)
        }
    }

    /// Every sample skipped so far (across epochs), each once.
    pub fn skipped(&self) -> Vec<SkippedSample> {
        self.skips.list()
    }

    /// A one-line summary of skipped files for the end of a run.
    pub fn summary(&self) -> String {
        let skipped = self.skipped();
        if skipped.is_empty() {
            "data: no file skipped".to_string()
        } else {
            let names: Vec<&str> = skipped.iter().take(5).map(|s| s.source.as_str()).collect();
            format!(
                "data: {} unreadable file(s) skipped: {}{}",
                skipped.len(),
                names.join(", "),
                if skipped.len() > 5 { ", ..." } else { "" }
            )
        }
    }

    /// Start producing the batches of `epoch` in the background.
    pub fn epoch(&self, epoch: u64) -> Result<EpochIter<A>> {
        if self.shards.is_some() {
            return self.epoch_from(StreamPosition {
                epoch,
                ..StreamPosition::default()
            });
        }
        let c = &self.cfg;
        let draws = self
            .sampler
            .draws(self.assemble.len(), epoch, c.rank, c.world_size)?;
        self.start(epoch, move |p| {
            Box::new(p.batches(draws).map(|b| (b, None)))
        })
    }

    /// Resume a streamed epoch at `pos` (from [`EpochIter::position`]): the remaining batches are
    /// those the interrupted epoch would have delivered. Only for sharded datasets.
    pub fn epoch_from(&self, pos: StreamPosition) -> Result<EpochIter<A>> {
        let shards = self.shards.clone().ok_or_else(|| {
            DataError::param(
                "stream position",
                "only a sharded dataset resumes from a stream position",
            )
        })?;
        let c = &self.cfg;
        let plan = shards.epoch_plan(c.shuffle, c.seed, pos.epoch, c.rank, c.world_size)?;
        let classes = Arc::new(shards.classes().to_vec());
        let quota = plan.quota;
        self.start(pos.epoch, move |p| {
            let stream = ShardStream::open_at(&plan, classes, shards.shuffle_buffer(), pos.items);
            match stream {
                Ok(stream) => Box::new(p.stream_batches(stream, pos, quota)),
                Err(e) => Box::new(std::iter::once((Err(e), None))),
            }
        })
    }

    /// Run `work` on a producer thread feeding a bounded channel.
    fn start(
        &self,
        epoch: u64,
        work: impl FnOnce(Producer<A>) -> Box<dyn Iterator<Item = Sent<A::Batch>>> + Send + 'static,
    ) -> Result<EpochIter<A>> {
        let (tx, rx) = sync_channel(self.cfg.prefetch.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let delivered = Arc::new(AtomicUsize::new(0));
        let producer = Producer {
            assemble: self.assemble.clone(),
            cfg: self.cfg.clone(),
            pool: self.pool.clone(),
            skips: self.skips.clone(),
            epoch,
            stop: stop.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("beit-data-producer".into())
            .spawn(move || {
                for item in work(producer) {
                    let failed = item.0.is_err();
                    if tx.send(item).is_err() || failed {
                        break; // consumer gone, or an error was delivered
                    }
                }
            })
            .map_err(|e| DataError::param("loader thread", e.to_string()))?;
        Ok(EpochIter {
            rx: Some(rx),
            handle: Some(handle),
            stop,
            progress: self.progress_bar(epoch),
            delivered,
            started: Instant::now(),
            position: None,
        })
    }

    fn progress_bar(&self, epoch: u64) -> Option<ProgressBar> {
        self.cfg.progress.then(|| {
            let pb = ProgressBar::new(self.samples_per_epoch() as u64);
            pb.set_style(
                ProgressStyle::with_template(
                    "epoch {msg} [{elapsed_precise}] {wide_bar} {pos}/{len} images ({per_sec})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            pb.set_message(epoch.to_string());
            pb
        })
    }
}

/// Everything the producer thread needs.
struct Producer<A: Assemble> {
    assemble: A,
    cfg: LoaderConfig,
    pool: Arc<rayon::ThreadPool>,
    skips: Arc<SkipLog>,
    epoch: u64,
    stop: Arc<AtomicBool>,
}

impl<A: Assemble> Producer<A> {
    fn prepare(&self, draw: Draw) -> Option<A::Item> {
        match self.assemble.prepare(self.epoch, draw) {
            Ok(p) => Some(p),
            Err(e) => {
                let source = self.assemble.describe(draw.index);
                self.skips.record(draw.index, source, e.to_string());
                None
            }
        }
    }

    /// A streamed sample (or the stream's error) prepared; `ordinal` is its place in the epoch.
    fn prepare_raw(&self, ordinal: u64, item: Result<RawSample>) -> Option<A::Item> {
        let (source, result) = match item {
            Ok(raw) => (
                raw.describe(),
                self.assemble.prepare_raw(self.epoch, ordinal, &raw),
            ),
            Err(e) => (error_source(&e), Err(e)),
        };
        match result {
            Ok(p) => Some(p),
            Err(e) => {
                self.skips
                    .record_source(ordinal as usize, source, e.to_string());
                None
            }
        }
    }
    /// Yields the batches of a streamed epoch from `start` on: `quota` samples in all, in as many
    /// batches on every rank; skipped samples are replaced by the next ones of the stream.
    fn stream_batches(
        self,
        mut stream: ShardStream,
        start: StreamPosition,
        quota: usize,
    ) -> impl Iterator<Item = Sent<A::Batch>> {
        let bs = self.cfg.batch_size;
        let total = if self.cfg.drop_last {
            quota / bs
        } else {
            quota.div_ceil(bs)
        } as u64;
        let mut batch_no = start.batches;
        // Past this many items, the shards are mostly unreadable: fail rather than spin.
        let give_up = 4 * quota as u64 + 1024;
        std::iter::from_fn(move || {
            if self.stop.load(Ordering::Relaxed) || batch_no >= total {
                return None;
            }
            let want = bs.min(quota - batch_no as usize * bs);
            let mut ready: Vec<A::Item> = Vec::with_capacity(want);
            while ready.len() < want {
                let base = stream.delivered();
                let items: Vec<_> = stream.by_ref().take(want - ready.len()).collect();
                if items.is_empty() || stream.delivered() > give_up {
                    let e = DataError::Empty(
                        "the shards of this rank yield (almost) no readable sample".into(),
                    );
                    return Some((Err(e), None));
                }
                let done: Vec<Option<A::Item>> = self.pool.install(|| {
                    items
                        .into_par_iter()
                        .enumerate()
                        .map(|(i, item)| self.prepare_raw(base + i as u64, item))
                        .collect()
                });
                ready.extend(done.into_iter().flatten());
            }
            let batch = self.assemble.collate(ready, self.epoch, batch_no);
            batch_no += 1;
            let pos = StreamPosition {
                epoch: self.epoch,
                items: stream.delivered(),
                batches: batch_no,
            };
            Some((batch, Some(pos)))
        })
    }

    /// Yields the epoch's batches; a skipped sample is replaced by the next ones so batches stay full.
    fn batches(self, draws: Vec<Draw>) -> impl Iterator<Item = Result<A::Batch>> {
        let mut cursor = 0usize;
        let mut batch_no = 0u64;
        std::iter::from_fn(move || {
            if self.stop.load(Ordering::Relaxed) {
                return None;
            }
            let bs = self.cfg.batch_size;
            let mut ready: Vec<A::Item> = Vec::with_capacity(bs);
            while ready.len() < bs && cursor < draws.len() {
                let take = (bs - ready.len()).min(draws.len() - cursor);
                let chunk = &draws[cursor..cursor + take];
                cursor += take;
                let done: Vec<Option<A::Item>> = self
                    .pool
                    .install(|| chunk.par_iter().map(|&d| self.prepare(d)).collect());
                ready.extend(done.into_iter().flatten());
            }
            if ready.is_empty() || (self.cfg.drop_last && ready.len() < bs) {
                return None;
            }
            let batch = self.assemble.collate(ready, self.epoch, batch_no);
            batch_no += 1;
            Some(batch)
        })
    }
}

/// The file a stream error names, for the skip report.
fn error_source(e: &DataError) -> String {
    match e {
        DataError::Io { path, .. }
        | DataError::Format { path, .. }
        | DataError::Decode { path, .. } => path.display().to_string(),
        other => other.to_string(),
    }
}

/// The batches of one epoch, produced in the background. Dropping it stops the producer.
pub struct EpochIter<A: Assemble = ImageBatches> {
    rx: Option<Receiver<Sent<A::Batch>>>,
    handle: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    progress: Option<ProgressBar>,
    delivered: Arc<AtomicUsize>,
    started: Instant,
    position: Option<StreamPosition>,
}

impl<A: Assemble> EpochIter<A> {
    /// For a streamed dataset, the position after the last batch delivered (save it with a
    /// checkpoint and pass it to [`Loader::epoch_from`]); `None` before the first batch and for
    /// datasets read by index.
    pub fn position(&self) -> Option<StreamPosition> {
        self.position
    }

    /// Images delivered so far in this epoch.
    pub fn images_delivered(&self) -> usize {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Images per second delivered since the epoch started.
    pub fn images_per_sec(&self) -> f64 {
        self.images_delivered() as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver unblocks a producer waiting on a full channel.
        self.rx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        if let Some(pb) = self.progress.take() {
            pb.finish();
        }
    }
}

impl<A: Assemble> Iterator for EpochIter<A> {
    type Item = Result<A::Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        let sent = self.rx.as_ref()?.recv().ok();
        let item = sent.map(|(item, pos)| {
            if pos.is_some() {
                self.position = pos;
            }
            item
        });
        match &item {
            Some(Ok(b)) => {
                self.delivered.fetch_add(A::batch_len(b), Ordering::Relaxed);
                if let Some(pb) = &self.progress {
                    pb.inc(A::batch_len(b) as u64);
                }
            }
            Some(Err(_)) => self.finish(),
            None => {
                if self.handle.is_some() {
                    tracing::info!(
                        "data: epoch done, {} images at {:.1} images/s",
                        self.images_delivered(),
                        self.images_per_sec()
                    );
                }
                self.finish();
            }
        }
        item
    }
}

impl<A: Assemble> Drop for EpochIter<A> {
    fn drop(&mut self) {
        self.finish();
    }
}
