//! [`LoaderEpochs`]: a beit-data [`Loader`] as the engine's [`EpochSource`], so that a run on
//! streamed data (tar shards, Parquet files) saves the loader's [`StreamPosition`] with each
//! checkpoint and a resumed run reopens the interrupted epoch there ([`Loader::epoch_from`]),
//! each rank at its own. A loader of a dataset read by index reports no position: a resumed run
//! replays the epoch's first micro-batches, as before.

use beit_data::{Assemble, DataError, EpochIter, Loader, StreamPosition};
use beit_train::{DataPosition, EpochSource};

/// The epochs of a loader, its errors as `anyhow` errors.
pub struct LoaderEpochs<'a, A: Assemble>(pub &'a Loader<A>);

/// One epoch of a [`LoaderEpochs`].
pub struct Epoch<A: Assemble>(EpochIter<A>);

impl<A: Assemble> Iterator for Epoch<A> {
    type Item = anyhow::Result<A::Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|b| b.map_err(anyhow::Error::from))
    }
}

impl<A: Assemble> EpochSource for LoaderEpochs<'_, A> {
    type Batch = A::Batch;
    type Error = anyhow::Error;
    type Iter = Epoch<A>;

    fn epoch(&mut self, epoch: u64) -> anyhow::Result<Epoch<A>> {
        Ok(Epoch(self.0.epoch(epoch)?))
    }

    fn epoch_from(&mut self, pos: DataPosition) -> Option<anyhow::Result<Epoch<A>>> {
        self.0.is_streamed().then(|| {
            let pos = StreamPosition {
                epoch: pos.epoch,
                items: pos.items,
                batches: pos.batches,
            };
            let epoch = self.0.epoch_from(pos).map_err(|e: DataError| {
                anyhow::Error::from(e).context(format!("resuming the data stream at {pos:?}"))
            })?;
            Ok(Epoch(epoch))
        })
    }

    fn position(&self, iter: &Epoch<A>) -> Option<DataPosition> {
        iter.0.position().map(|p| DataPosition {
            epoch: p.epoch,
            items: p.items,
            batches: p.batches,
        })
    }
}
