//! The samples of one split's shards, in an epoch's order, with bounded memory: a reader thread
//! reads the split's shards front to back (through a small channel) and a shuffle buffer of a
//! fixed number of samples, drawn from by a generator seeded from `(seed, epoch, split)`, mixes
//! them. When the split's shards run out before its quota, it starts over its shards (the buffer
//! is emptied first, so every sample of a pass comes out before any of the next).
//!
//! The position in the stream is a [`StreamPosition`]: the items delivered so far (samples and
//! errors). Opening the same plan and skipping that many items gives exactly the remaining items,
//! so a run resumed from a checkpoint sees the samples it would have seen.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::shard_set::EpochPlan;
use crate::tar_shard::{read_shard, RawSample};

/// Items the reader thread reads ahead of the shuffle buffer.
const READ_AHEAD: usize = 16;

/// Where a loader stands in a streaming epoch; small and serialisable, for checkpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPosition {
    /// The epoch.
    pub epoch: u64,
    /// Stream items consumed (delivered samples, skipped samples and shard errors).
    pub items: u64,
    /// Batches delivered.
    pub batches: u64,
}

/// What the reader thread sends.
enum Message {
    Item(Result<RawSample>),
    /// All shards of the split read once.
    PassEnd,
    /// A whole pass gave no sample: nothing more will come.
    Exhausted,
}

/// The stream of one split in one epoch; dropping it stops its reader thread.
pub struct ShardStream {
    rx: Receiver<Message>,
    buffer: Vec<Result<RawSample>>,
    capacity: usize,
    rng: Option<StdRng>,
    draining: bool,
    ended: bool,
    delivered: u64,
}

impl ShardStream {
    /// Start reading `plan`'s shards; `classes` resolves class names in `.txt`/`.json` labels;
    /// `buffer` samples are shuffled together (ignored without a buffer seed).
    pub fn open(plan: &EpochPlan, classes: Arc<Vec<String>>, buffer: usize) -> Result<Self> {
        let (tx, rx) = sync_channel(READ_AHEAD);
        let shards = plan.shards.clone();
        std::thread::Builder::new()
            .name("beit-data-shards".into())
            .spawn(move || read_passes(&shards, &classes, &tx))
            .map_err(|e| DataError::param("shard reader thread", e.to_string()))?;
        let rng = plan.buffer_seed.map(StdRng::seed_from_u64);
        let capacity = if rng.is_some() { buffer.max(1) } else { 1 };
        Ok(ShardStream {
            rx,
            buffer: Vec::with_capacity(capacity),
            capacity,
            rng,
            draining: false,
            ended: false,
            delivered: 0,
        })
    }

    /// Open `plan` and skip the first `items` items, for a resumed epoch.
    pub fn open_at(
        plan: &EpochPlan,
        classes: Arc<Vec<String>>,
        buffer: usize,
        items: u64,
    ) -> Result<Self> {
        let mut s = Self::open(plan, classes, buffer)?;
        for _ in 0..items {
            if s.next().is_none() {
                break;
            }
        }
        Ok(s)
    }

    /// Items delivered so far.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Fill the buffer until it holds `capacity` items, a pass ends, or the reader is done.
    fn fill(&mut self) {
        while !self.draining && !self.ended && self.buffer.len() < self.capacity {
            match self.rx.recv() {
                Ok(Message::Item(item)) => self.buffer.push(item),
                Ok(Message::PassEnd) => self.draining = true,
                Ok(Message::Exhausted) | Err(_) => self.ended = true,
            }
        }
    }
}

impl Iterator for ShardStream {
    type Item = Result<RawSample>;

    fn next(&mut self) -> Option<Self::Item> {
        self.fill();
        if self.buffer.is_empty() && self.draining {
            self.draining = false;
            self.fill();
        }
        if self.buffer.is_empty() {
            return None;
        }
        let j = match &mut self.rng {
            Some(rng) => rng.random_range(0..self.buffer.len()),
            None => 0,
        };
        self.delivered += 1;
        Some(self.buffer.swap_remove(j))
    }
}

/// The reader thread: pass after pass over `shards` until the receiver is gone or a pass yields
/// no sample.
fn read_passes(shards: &[std::path::PathBuf], classes: &[String], tx: &SyncSender<Message>) {
    loop {
        let mut good = 0usize;
        let mut open = true;
        for shard in shards {
            read_shard(shard, classes, &mut |item| {
                good += usize::from(item.is_ok());
                open = tx.send(Message::Item(item)).is_ok();
                open
            });
            if !open {
                return;
            }
        }
        let last = if good == 0 {
            Message::Exhausted
        } else {
            Message::PassEnd
        };
        if tx.send(last).is_err() || good == 0 {
            return;
        }
    }
}
