//! [`DataPosition`]: how far a streamed data source has read into an epoch, saved with each
//! checkpoint so that a resumed run continues the stream where it stopped.
//!
//! A source read by index (an ImageFolder, Fashion-MNIST, cached features) has no position: a
//! resumed run re-produces the interrupted epoch's first micro-batches and drops them
//! ([`crate::fit`]). A streamed source (tar shards, Parquet files: beit-data's `StreamPosition`,
//! field for field) reports after each micro-batch how far it has read; [`crate::TrainLoop`]
//! keeps the latest one and, at each checkpoint, gathers every rank's (each rank reads shards of
//! its own) into [`crate::TrainerState::data_positions`].

use serde::{Deserialize, Serialize};

use crate::distributed::Collective;
use crate::error::{Result, TrainError};

/// Where a streamed data source stands after the micro-batches it delivered in an epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    /// The epoch (or the id of the supplementary pass being read, see [`crate::top_up_epoch`]).
    pub epoch: u64,
    /// Stream items consumed: delivered samples, skipped samples and unreadable shards.
    pub items: u64,
    /// Micro-batches delivered in the epoch.
    pub batches: u64,
}

/// Largest integer every `f64` of the all-reduce carries exactly.
const EXACT_F64: u64 = 1 << 53;

/// Every rank's position, in rank order; empty when no rank has one (a source read by index, or
/// no micro-batch read yet). In a data-parallel world, this is a collective: every rank must call
/// it at the same point.
pub fn gather_positions(
    world: &dyn Collective,
    local: Option<DataPosition>,
) -> Result<Vec<DataPosition>> {
    let n = world.size();
    if n <= 1 {
        return Ok(local.into_iter().collect());
    }
    let mut buf = vec![0f64; 4 * n];
    if let Some(p) = local {
        if [p.epoch, p.items, p.batches]
            .iter()
            .any(|&v| v >= EXACT_F64)
        {
            return Err(TrainError::Config(format!(
                "data position {p:?} is too large to gather across ranks"
            )));
        }
        let slot = &mut buf[4 * world.rank()..4 * world.rank() + 4];
        slot.copy_from_slice(&[1.0, p.epoch as f64, p.items as f64, p.batches as f64]);
    }
    world.all_reduce_sum_f64("data positions", &mut buf)?;
    let present = buf.chunks(4).filter(|s| s[0] != 0.0).count();
    if present == 0 {
        return Ok(Vec::new());
    }
    if present != n {
        return Err(TrainError::Config(format!(
            "{present} of {n} ranks report a data position: the ranks read different kinds of data"
        )));
    }
    Ok(buf
        .chunks(4)
        .map(|s| DataPosition {
            epoch: s[1] as u64,
            items: s[2] as u64,
            batches: s[3] as u64,
        })
        .collect())
}

/// The position this rank resumes `epoch` from after `done` micro-batches, from the positions
/// saved in a checkpoint (`saved`, one per rank): `None` when they do not describe that point of
/// this world (another epoch or pass, or another number of ranks); the epoch is then replayed.
pub fn resume_position(
    saved: &[DataPosition],
    world: &dyn Collective,
    epoch: u64,
    done: u64,
) -> Option<DataPosition> {
    if done == 0 || saved.is_empty() {
        return None;
    }
    if saved.len() != world.size() {
        tracing::warn!(
            "the checkpoint's data positions are those of {} processes, this run has {}: \
             replaying the epoch's first {done} micro-batches instead",
            saved.len(),
            world.size()
        );
        return None;
    }
    let p = saved[world.rank()];
    (p.epoch == epoch && p.batches == done).then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributed::tests::Replicated;
    use crate::distributed::SingleProcess;

    #[test]
    fn one_process_keeps_its_own_position_and_none_is_empty() {
        let p = DataPosition {
            epoch: 2,
            items: 37,
            batches: 9,
        };
        assert_eq!(gather_positions(&SingleProcess, Some(p)).unwrap(), vec![p]);
        assert!(gather_positions(&SingleProcess, None).unwrap().is_empty());
    }

    #[test]
    fn a_world_gathers_every_rank_and_refuses_a_mixture() {
        // Two identical ranks (rank 0 of the fake world holds the slot the reduction doubles).
        let world = Replicated::new(2);
        assert!(gather_positions(&world, None).unwrap().is_empty());
        let p = DataPosition {
            epoch: 1,
            items: 20,
            batches: 5,
        };
        let err = gather_positions(&world, Some(p)).unwrap_err().to_string();
        assert!(err.contains("ranks"), "{err}");
    }

    #[test]
    fn a_saved_position_applies_only_to_its_epoch_point_and_world() {
        let p = DataPosition {
            epoch: 3,
            items: 50,
            batches: 6,
        };
        let one = SingleProcess;
        assert_eq!(resume_position(&[p], &one, 3, 6), Some(p));
        assert_eq!(resume_position(&[p], &one, 3, 4), None);
        assert_eq!(resume_position(&[p], &one, 4, 6), None);
        assert_eq!(resume_position(&[p], &one, 3, 0), None);
        assert_eq!(resume_position(&[], &one, 3, 6), None);
        assert_eq!(resume_position(&[p, p], &one, 3, 6), None);
    }

    #[test]
    fn a_state_without_positions_reads_and_writes_as_before() {
        let rng = crate::rng::TrainRng::seed_from_u64(1).state();
        let mut state = crate::TrainerState::new(1, rng, Default::default(), Default::default());
        let old = serde_json::to_value(&state).unwrap();
        assert!(old.get("data_positions").is_none(), "{old}");
        let back: crate::TrainerState = serde_json::from_value(old).unwrap();
        assert_eq!(back, state);
        state.data_positions = vec![DataPosition::default()];
        let text = serde_json::to_string(&state).unwrap();
        let back: crate::TrainerState = serde_json::from_str(&text).unwrap();
        assert_eq!(back.data_positions, state.data_positions);
    }
}
