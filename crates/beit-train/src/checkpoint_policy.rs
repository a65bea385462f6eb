//! The checkpoint policy of a run: when a checkpoint is due (every N steps, at epoch ends, at
//! the end), which ones stay (the newest `keep_last` step checkpoints and `best`), and how a run
//! directory is opened: a fresh run refuses a directory that holds checkpoints, a resumed run
//! drops those of the abandoned continuation.
//!
//! The files themselves are [`crate::checkpoint`]'s (atomic directories, rotation).

use std::path::{Path, PathBuf};

use crate::checkpoint::CheckpointManager;
use crate::error::{io_err, Result, TrainError};
use crate::train_config::TrainConfig;

/// When to save, where, and what was saved last.
#[derive(Debug)]
pub struct CheckpointPolicy {
    manager: CheckpointManager,
    every: Option<u64>,
    each_epoch: bool,
    last_saved: Option<(u64, PathBuf)>,
}

impl CheckpointPolicy {
    /// The policy of `cfg` for the run directory `out_dir`.
    pub fn new(out_dir: &Path, cfg: &TrainConfig) -> Result<Self> {
        Ok(Self {
            manager: CheckpointManager::new(out_dir, cfg.keep_last)?,
            every: cfg.checkpoint_every,
            each_epoch: cfg.checkpoint_each_epoch,
            last_saved: None,
        })
    }

    /// The checkpoint files.
    pub fn manager(&self) -> &CheckpointManager {
        &self.manager
    }

    /// Whether a checkpoint is due after optimizer step `step` (which ended an epoch when
    /// `epoch_end`, and the run when `done`).
    pub fn due(&self, step: u64, epoch_end: bool, done: bool) -> bool {
        self.every.is_some_and(|n| n > 0 && step % n == 0) || (epoch_end && self.each_epoch) || done
    }

    /// The checkpoint of `step` if it is saved already. In a data-parallel run the answer must
    /// be the same on every rank (a save involves a collective), so it cannot depend on when
    /// rank 0's files appear.
    pub fn saved_at(&self, step: u64, data_parallel: bool) -> Option<&PathBuf> {
        let (s, p) = self.last_saved.as_ref()?;
        (*s == step && (data_parallel || p.exists())).then_some(p)
    }

    /// Remember that `dir` holds the checkpoint of `step`.
    pub fn mark_saved(&mut self, step: u64, dir: PathBuf) {
        self.last_saved = Some((step, dir));
    }
}

/// Refuse to start a fresh run in `out_dir` when it holds checkpoints: the new run would
/// truncate the old log, and rotation (newest steps first) would delete the new checkpoints in
/// favour of the old ones.
pub fn refuse_earlier_run(out_dir: &Path) -> Result<()> {
    if !out_dir.is_dir() {
        return Ok(());
    }
    if let Some((step, _)) = CheckpointManager::new(out_dir, 1)?.list()?.pop() {
        return Err(TrainError::Config(format!(
            "{} already holds checkpoints (latest: step {step}); resume from it or choose another \
             output directory",
            out_dir.display()
        )));
    }
    Ok(())
}

/// Remove the step checkpoints of `out_dir` newer than `step`, the one resumed from: they belong
/// to the abandoned continuation (like its metrics records); left in place, rotation would keep
/// them and delete the new ones.
pub fn drop_abandoned(out_dir: &Path, step: u64) -> Result<()> {
    if !out_dir.is_dir() {
        return Ok(());
    }
    for (s, dir) in CheckpointManager::new(out_dir, 1)?.list()? {
        if s > step {
            tracing::warn!(
                "removing {} (step {s} > resumed step {step})",
                dir.display()
            );
            std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
    }
    Ok(())
}
