//! [`EpochSource`]: the micro-batches [`crate::fit_source`] trains on, epoch by epoch, and, for a
//! streamed source, how far it has read.
//!
//! A source read by index needs only [`EpochSource::epoch`] (a closure `epoch -> micro-batches`
//! is one: [`EpochFn`], what [`crate::fit`] takes). A streamed source also reports its
//! [`DataPosition`] after each micro-batch and reopens an epoch there
//! ([`EpochSource::epoch_from`]), so that a resumed run reads on instead of re-producing the
//! micro-batches it already trained on.

use crate::data_position::DataPosition;

/// The micro-batches of a run, epoch by epoch.
pub trait EpochSource {
    /// One micro-batch.
    type Batch;
    /// What reading can fail with.
    type Error;
    /// The micro-batches of one epoch, in order.
    type Iter: Iterator<Item = Result<Self::Batch, Self::Error>>;

    /// The micro-batches of `epoch` (or of a supplementary pass, see [`crate::top_up_epoch`])
    /// from its start: a function of the epoch alone (and the run's seed), so that resumed and
    /// supplementary passes see the same data.
    fn epoch(&mut self, epoch: u64) -> Result<Self::Iter, Self::Error>;

    /// The rest of epoch `pos.epoch` after the `pos.batches` micro-batches that
    /// [`EpochSource::position`] reported `pos` for: exactly those the epoch would have gone on
    /// with. `None` when this source does not resume from positions (the caller then replays
    /// the epoch and drops its first micro-batches).
    fn epoch_from(&mut self, _pos: DataPosition) -> Option<Result<Self::Iter, Self::Error>> {
        None
    }

    /// Where `iter` stands after the last micro-batch it delivered; `None` for a source read by
    /// index (and before the first micro-batch).
    fn position(&self, _iter: &Self::Iter) -> Option<DataPosition> {
        None
    }
}

/// A closure `epoch -> micro-batches` as an [`EpochSource`] without positions.
pub struct EpochFn<F>(pub F);

impl<F, I, B, E> EpochSource for EpochFn<F>
where
    F: FnMut(u64) -> Result<I, E>,
    I: Iterator<Item = Result<B, E>>,
{
    type Batch = B;
    type Error = E;
    type Iter = I;

    fn epoch(&mut self, epoch: u64) -> Result<I, E> {
        (self.0)(epoch)
    }
}
