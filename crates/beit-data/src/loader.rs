//! The parallel, prefetching batch loader.
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

use candle::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::dataset::Dataset;
use crate::decode::DecodeOptions;
use crate::error::{DataError, Result};
use crate::mixup::Mixup;
use crate::sampler::{derive_seed, epoch_indices, sample_rng};
use crate::shard_dataset::decode_raw;
use crate::shard_set::ShardSet;
use crate::shard_stream::{ShardStream, StreamPosition};
use crate::tar_shard::RawSample;
use crate::transform::{Transform, Views};

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

/// One batch, as candle tensors on the loader's device.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Model inputs, f32 `(B, 3, H, W)`.
    pub images: Tensor,
    /// Hard labels, u32 `(B,)`, for labelled datasets.
    pub labels: Option<Tensor>,
    /// Soft targets, f32 `(B, num_classes)`, when mixup/CutMix is enabled.
    pub soft_targets: Option<Tensor>,
    /// Tokenizer view, f32 `(B, 3, h, w)` in `[0.1, 0.9]`, for the two-view transform.
    pub tokenizer_images: Option<Tensor>,
    /// Dataset indices of the samples, in batch order.
    pub indices: Vec<usize>,
}

impl Batch {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether the batch is empty (never true for batches the loader yields).
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
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

/// Loads batches of a [`Dataset`] through a [`Transform`].
pub struct Loader {
    dataset: Arc<dyn Dataset>,
    transform: Arc<dyn Transform>,
    mixup: Option<Mixup>,
    cfg: LoaderConfig,
    device: Device,
    pool: Arc<rayon::ThreadPool>,
    skips: Arc<SkipLog>,
    shards: Option<Arc<ShardSet>>,
}

/// What the producer thread sends: a batch and, when streaming, the position after it.
type Sent = (Result<Batch>, Option<StreamPosition>);

impl Loader {
    /// A loader producing tensors on `device`. Errors on an empty dataset or invalid settings.
    pub fn new(
        dataset: Arc<dyn Dataset>,
        transform: Arc<dyn Transform>,
        cfg: LoaderConfig,
        device: Device,
    ) -> Result<Self> {
        if dataset.is_empty() {
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
        let shards = dataset.shards();
        if let Some(s) = &shards {
            s.epoch_plan(cfg.shuffle, cfg.seed, 0, cfg.rank, cfg.world_size)?;
        }
        Ok(Loader {
            shards,
            dataset,
            transform,
            mixup: None,
            cfg,
            device,
            pool: Arc::new(pool),
            skips: Arc::new(SkipLog::default()),
        })
    }

    /// Enable mixup/CutMix: batches then carry soft targets. The dataset must be labelled.
    pub fn with_mixup(mut self, mixup: Mixup) -> Result<Self> {
        mixup.validate()?;
        self.mixup = Some(mixup);
        Ok(self)
    }

    /// The settings.
    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// Samples this rank sees per epoch.
    pub fn samples_per_epoch(&self) -> usize {
        if let Some(s) = &self.shards {
            return s.quota(self.cfg.world_size);
        }
        self.dataset.len().div_ceil(self.cfg.world_size)
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
    pub fn epoch(&self, epoch: u64) -> Result<EpochIter> {
        if self.shards.is_some() {
            return self.epoch_from(StreamPosition {
                epoch,
                ..StreamPosition::default()
            });
        }
        let indices = epoch_indices(
            self.dataset.len(),
            self.cfg.shuffle,
            self.cfg.seed,
            epoch,
            self.cfg.rank,
            self.cfg.world_size,
        )?;
        self.start(epoch, move |p| {
            Box::new(p.batches(indices).map(|b| (b, None)))
        })
    }

    /// Resume a streamed epoch at `pos` (from [`EpochIter::position`]): the remaining batches are
    /// those the interrupted epoch would have delivered. Only for sharded datasets.
    pub fn epoch_from(&self, pos: StreamPosition) -> Result<EpochIter> {
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
        work: impl FnOnce(Producer) -> Box<dyn Iterator<Item = Sent>> + Send + 'static,
    ) -> Result<EpochIter> {
        let (tx, rx) = sync_channel(self.cfg.prefetch.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let delivered = Arc::new(AtomicUsize::new(0));
        let producer = Producer {
            dataset: self.dataset.clone(),
            transform: self.transform.clone(),
            mixup: self.mixup,
            cfg: self.cfg.clone(),
            device: self.device.clone(),
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
struct Producer {
    dataset: Arc<dyn Dataset>,
    transform: Arc<dyn Transform>,
    mixup: Option<Mixup>,
    cfg: LoaderConfig,
    device: Device,
    pool: Arc<rayon::ThreadPool>,
    skips: Arc<SkipLog>,
    epoch: u64,
    stop: Arc<AtomicBool>,
}

/// A transformed sample.
struct Prepared {
    index: usize,
    label: Option<u32>,
    views: Views,
}

impl Producer {
    fn prepare(&self, index: usize) -> Option<Prepared> {
        let result = self.dataset.get(index).and_then(|s| {
            let mut rng = sample_rng(self.cfg.seed, self.epoch, index as u64);
            let views = self.transform.apply(&s.image, &mut rng)?;
            Ok(Prepared {
                index,
                label: s.label,
                views,
            })
        });
        match result {
            Ok(p) => Some(p),
            Err(e) => {
                self.skips
                    .record(index, self.dataset.describe(index), e.to_string());
                None
            }
        }
    }

    /// A streamed sample (or the stream's error) transformed; `ordinal` is its place in the epoch.
    fn prepare_raw(&self, ordinal: u64, item: Result<RawSample>) -> Option<Prepared> {
        let (source, result) = match item {
            Ok(raw) => (
                raw.describe(),
                decode_raw(&raw, &DecodeOptions::default()).and_then(|s| {
                    let mut rng = sample_rng(self.cfg.seed, self.epoch, ordinal);
                    Ok((s.label, self.transform.apply(&s.image, &mut rng)?))
                }),
            ),
            Err(e) => (error_source(&e), Err(e)),
        };
        match result {
            Ok((label, views)) => Some(Prepared {
                index: ordinal as usize,
                label,
                views,
            }),
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
    ) -> impl Iterator<Item = Sent> {
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
            let mut ready: Vec<Prepared> = Vec::with_capacity(want);
            while ready.len() < want {
                let base = stream.delivered();
                let items: Vec<_> = stream.by_ref().take(want - ready.len()).collect();
                if items.is_empty() || stream.delivered() > give_up {
                    let e = DataError::Empty(
                        "the shards of this rank yield (almost) no readable sample".into(),
                    );
                    return Some((Err(e), None));
                }
                let done: Vec<Option<Prepared>> = self.pool.install(|| {
                    items
                        .into_par_iter()
                        .enumerate()
                        .map(|(i, item)| self.prepare_raw(base + i as u64, item))
                        .collect()
                });
                ready.extend(done.into_iter().flatten());
            }
            let batch = self.collate(ready, batch_no);
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
    fn batches(self, indices: Vec<usize>) -> impl Iterator<Item = Result<Batch>> {
        let mut cursor = 0usize;
        let mut batch_no = 0u64;
        std::iter::from_fn(move || {
            if self.stop.load(Ordering::Relaxed) {
                return None;
            }
            let bs = self.cfg.batch_size;
            let mut ready: Vec<Prepared> = Vec::with_capacity(bs);
            while ready.len() < bs && cursor < indices.len() {
                let take = (bs - ready.len()).min(indices.len() - cursor);
                let chunk = &indices[cursor..cursor + take];
                cursor += take;
                let done: Vec<Option<Prepared>> = self
                    .pool
                    .install(|| chunk.par_iter().map(|&i| self.prepare(i)).collect());
                ready.extend(done.into_iter().flatten());
            }
            if ready.is_empty() || (self.cfg.drop_last && ready.len() < bs) {
                return None;
            }
            let batch = self.collate(ready, batch_no);
            batch_no += 1;
            Some(batch)
        })
    }

    fn collate(&self, ready: Vec<Prepared>, batch_no: u64) -> Result<Batch> {
        let b = ready.len();
        let (h, w) = self.transform.output_size();
        let mut images = Vec::with_capacity(b * 3 * h * w);
        let mut tok = Vec::new();
        let mut labels = Vec::with_capacity(b);
        let mut indices = Vec::with_capacity(b);
        let tok_size = self.transform.tokenizer_size();
        for p in &ready {
            if (p.views.image.height, p.views.image.width) != (h, w) {
                return Err(DataError::param(
                    "transform",
                    format!(
                        "sample {} came out {}x{}, expected {h}x{w}",
                        p.index, p.views.image.height, p.views.image.width
                    ),
                ));
            }
            images.extend_from_slice(&p.views.image.data);
            if let (Some(t), Some(_)) = (&p.views.tokenizer, tok_size) {
                tok.extend_from_slice(&t.data);
            }
            if let Some(l) = p.label {
                labels.push(l);
            }
            indices.push(p.index);
        }
        let labelled = labels.len() == b;
        let mut soft_targets = None;
        if let Some(m) = &self.mixup {
            if !labelled {
                return Err(DataError::param(
                    "mixup",
                    "mixup/CutMix needs a labelled dataset",
                ));
            }
            let mut rng =
                StdRng::seed_from_u64(derive_seed(self.cfg.seed, &[self.epoch, batch_no, 2]));
            let t = m.apply(&mut images, (b, 3, h, w), &labels, &mut rng)?;
            soft_targets = Some(
                Tensor::from_vec(t, (b, m.num_classes), &Device::Cpu)?.to_device(&self.device)?,
            );
        }
        let images =
            Tensor::from_vec(images, (b, 3, h, w), &Device::Cpu)?.to_device(&self.device)?;
        let tokenizer_images = match tok_size {
            Some((th, tw)) if tok.len() == b * 3 * th * tw => {
                Some(Tensor::from_vec(tok, (b, 3, th, tw), &Device::Cpu)?.to_device(&self.device)?)
            }
            _ => None,
        };
        let labels = if labelled {
            Some(Tensor::from_vec(labels, b, &Device::Cpu)?.to_device(&self.device)?)
        } else {
            None
        };
        Ok(Batch {
            images,
            labels,
            soft_targets,
            tokenizer_images,
            indices,
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
pub struct EpochIter {
    rx: Option<Receiver<Sent>>,
    handle: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    progress: Option<ProgressBar>,
    delivered: Arc<AtomicUsize>,
    started: Instant,
    position: Option<StreamPosition>,
}

impl EpochIter {
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

impl Iterator for EpochIter {
    type Item = Result<Batch>;

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
                self.delivered.fetch_add(b.len(), Ordering::Relaxed);
                if let Some(pb) = &self.progress {
                    pb.inc(b.len() as u64);
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

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.finish();
    }
}
