//! Checkpoints: model + optimizer + trainer state, written atomically, rotated, resumable.
//!
//! A checkpoint is a directory
//!
//! ```text
//! <run>/checkpoint-00001200/
//!     model.safetensors       parameters by Hugging Face name (f32 master weights)
//!     optimizer.safetensors   AdamW moments and step counts by parameter name
//!     trainer_state.json      step, epoch, data position (and a streamed source's, per rank),
//!                             RNG state, best metric, config
//! <run>/best/                 a full copy of the best checkpoint so far (same three files)
//! ```
//!
//! **Atomicity:** all files are written into a hidden temporary directory in the same parent,
//! flushed to disk, and the directory is then renamed into place. A crash or an error while
//! writing leaves at most a stale `.tmp-*` directory (removed by the next
//! [`CheckpointManager::new`]) and never a half-written `checkpoint-*`; the previous checkpoints
//! are untouched. When a name is overwritten (`best`), the old directory is first renamed aside
//! and deleted only after the new one is in place.
//!
//! **Rotation:** after each successful save, only the newest `keep_last` `checkpoint-*`
//! directories are kept (`best` is never rotated).
//!
//! `model.safetensors` uses the model's own parameter names, so it can be loaded like any other
//! weights file.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle::Tensor;
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::data_position::DataPosition;
use crate::error::{io_err, Result, TrainError};
use crate::optimizer::AdamW;
use crate::param_groups::named_vars;
use crate::rng::RngState;

/// File name of the model weights inside a checkpoint directory.
pub const MODEL_FILE: &str = "model.safetensors";
/// File name of the optimizer state inside a checkpoint directory.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// File name of the trainer state inside a checkpoint directory.
pub const STATE_FILE: &str = "trainer_state.json";
/// Name of the directory holding the best checkpoint.
pub const BEST_DIR: &str = "best";
const PREFIX: &str = "checkpoint-";
const FORMAT_VERSION: u32 = 1;

/// Everything besides the tensors that a resumed run needs to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Version of this layout.
    pub format_version: u32,
    /// Optimizer steps completed (= position in the lr/wd schedules).
    pub step: u64,
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Micro-batches of `epoch` already consumed (data position).
    pub batch_in_epoch: u64,
    /// Samples seen since the start of the run.
    pub samples_seen: u64,
    /// Seed of the run (data order and per-item generators derive from it).
    pub seed: u64,
    /// Position of the run's main random generator.
    pub rng: RngState,
    /// Running sums of the current epoch's metrics (`name -> [weighted sum, weight]`), so the
    /// epoch record of a resumed epoch covers all of its steps.
    /// Stored as decimal strings: Rust prints and parses f64 exactly, while serde_json's default
    /// number parsing may be off by one unit in the last place, which would break bit-exact
    /// resumption.
    #[serde(default, with = "exact_f64_pairs")]
    pub epoch_sums: std::collections::BTreeMap<String, [f64; 2]>,
    /// Where a streamed data source stood after the checkpoint's last micro-batch, one entry
    /// per rank (empty for data read by index, and in checkpoints written before positions were
    /// recorded): a resumed run continues the stream from there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_positions: Vec<DataPosition>,
    /// Best evaluation metric so far and the step it was reached at.
    pub best_metric: Option<f64>,
    /// Step of the best metric.
    pub best_step: Option<u64>,
    /// The training configuration (engine settings).
    pub train_config: serde_json::Value,
    /// Free-form configuration of the command that runs the training (model, data, flags).
    pub run_config: serde_json::Value,
}

impl TrainerState {
    /// A fresh state at step 0.
    pub fn new(
        seed: u64,
        rng: RngState,
        train_config: serde_json::Value,
        run_config: serde_json::Value,
    ) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            samples_seen: 0,
            seed,
            rng,
            epoch_sums: Default::default(),
            data_positions: Vec::new(),
            best_metric: None,
            best_step: None,
            train_config,
            run_config,
        }
    }
}

/// Serde helper: `name -> [f64; 2]` with the numbers as exact decimal strings.
mod exact_f64_pairs {
    use std::collections::BTreeMap;

    use serde::{de::Error, Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(
        m: &BTreeMap<String, [f64; 2]>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        m.iter()
            .map(|(k, [a, b])| (k.clone(), [format!("{a:?}"), format!("{b:?}")]))
            .collect::<BTreeMap<String, [String; 2]>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, [f64; 2]>, D::Error> {
        BTreeMap::<String, [String; 2]>::deserialize(d)?
            .into_iter()
            .map(|(k, [a, b])| {
                let p = |x: &str| {
                    x.parse::<f64>()
                        .map_err(|_| D::Error::custom(format!("`{k}`: `{x}` is not a number")))
                };
                Ok((k.clone(), [p(&a)?, p(&b)?]))
            })
            .collect()
    }
}

/// A writer of one file of a checkpoint: gets the path to write to.
pub type FileWriter<'a> = Box<dyn FnOnce(&Path) -> Result<()> + 'a>;

/// Writes, lists and rotates checkpoints under one run directory.
#[derive(Debug, Clone)]
pub struct CheckpointManager {
    dir: PathBuf,
    keep_last: usize,
}

impl CheckpointManager {
    /// Use `dir` (created if needed) and keep the newest `keep_last` (at least 1) step
    /// checkpoints. Stale temporary directories of interrupted saves are removed.
    pub fn new(dir: impl Into<PathBuf>, keep_last: usize) -> Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") || name.starts_with(".old-") {
                let p = entry.path();
                tracing::warn!(
                    "removing leftover of an interrupted checkpoint save: {}",
                    p.display()
                );
                fs::remove_dir_all(&p).map_err(io_err(&p))?;
            }
        }
        Ok(Self {
            dir,
            keep_last: keep_last.max(1),
        })
    }

    /// The run directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Directory of the checkpoint of `step`.
    pub fn step_dir(&self, step: u64) -> PathBuf {
        self.dir.join(format!("{PREFIX}{step:08}"))
    }

    /// Directory of the best checkpoint.
    pub fn best_dir(&self) -> PathBuf {
        self.dir.join(BEST_DIR)
    }

    /// Atomically create (or replace) `<dir>/<name>/` holding the given files. Each writer
    /// receives the path inside a temporary directory; if any writer fails, the temporary
    /// directory is removed and the error returned, and an existing `<name>` is left as it was.
    pub fn write_atomic(&self, name: &str, files: Vec<(&str, FileWriter<'_>)>) -> Result<PathBuf> {
        let final_dir = self.dir.join(name);
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let tmp = self
            .dir
            .join(format!(".tmp-{name}-{}-{nonce}", std::process::id()));
        fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        let write_all = || -> Result<()> {
            for (file, writer) in files {
                let p = tmp.join(file);
                writer(&p)?;
                // Flush file contents before the rename makes them visible.
                let f = fs::File::open(&p).map_err(io_err(&p))?;
                f.sync_all().map_err(io_err(&p))?;
            }
            Ok(())
        };
        if let Err(e) = write_all() {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let old = self
            .dir
            .join(format!(".old-{name}-{}-{nonce}", std::process::id()));
        let had_old = final_dir.exists();
        if had_old {
            fs::rename(&final_dir, &old).map_err(io_err(&final_dir))?;
        }
        if let Err(e) = fs::rename(&tmp, &final_dir) {
            // Put the previous version back before reporting.
            if had_old {
                let _ = fs::rename(&old, &final_dir);
            }
            let _ = fs::remove_dir_all(&tmp);
            return Err(io_err(&final_dir)(e));
        }
        if had_old {
            fs::remove_dir_all(&old).map_err(io_err(&old))?;
        }
        if let Ok(d) = fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(final_dir)
    }

    /// Save a full checkpoint under `name` (e.g. `checkpoint-00000100` or `best`).
    pub fn save_as(
        &self,
        name: &str,
        model: &VarMap,
        optimizer: &AdamW,
        state: &TrainerState,
    ) -> Result<PathBuf> {
        let files: Vec<(&str, FileWriter<'_>)> = vec![
            (MODEL_FILE, Box::new(|p: &Path| save_model(model, p))),
            (OPTIMIZER_FILE, Box::new(|p: &Path| optimizer.save(p))),
            (STATE_FILE, Box::new(|p: &Path| write_state(state, p))),
        ];
        self.write_atomic(name, files)
    }

    /// Save the checkpoint of `state.step` and rotate old ones.
    pub fn save(&self, model: &VarMap, optimizer: &AdamW, state: &TrainerState) -> Result<PathBuf> {
        let name = format!("{PREFIX}{:08}", state.step);
        let dir = self.save_as(&name, model, optimizer, state)?;
        self.rotate()?;
        Ok(dir)
    }

    /// Step checkpoints present, oldest first.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        list_checkpoints(&self.dir)
    }

    /// Delete all but the newest `keep_last` step checkpoints.
    pub fn rotate(&self) -> Result<()> {
        let all = self.list()?;
        let n = all.len().saturating_sub(self.keep_last);
        for (_, p) in all.into_iter().take(n) {
            fs::remove_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(())
    }
}

fn list_checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix(PREFIX)
            .and_then(|s| s.parse::<u64>().ok())
        {
            if entry.path().is_dir() {
                out.push((step, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Save the parameters of `varmap` (by name) to a safetensors file.
pub fn save_model(varmap: &VarMap, path: &Path) -> Result<()> {
    let tensors: HashMap<String, Tensor> = named_vars(varmap)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().detach()))
        .collect();
    candle::safetensors::save(&tensors, path).map_err(|e| TrainError::Checkpoint {
        path: path.to_path_buf(),
        message: format!("writing model weights: {e}"),
    })
}

/// Names that did not line up when loading weights into a `VarMap`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Parameters of the model absent from the file (left unchanged).
    pub missing: Vec<String>,
    /// Tensors of the file the model does not have (ignored).
    pub unexpected: Vec<String>,
}

/// Load weights from a safetensors file into the `Var`s of `varmap`, by name.
///
/// A shape mismatch is always an error (naming the tensor). With `strict`, missing or
/// unexpected names are errors too; otherwise they are returned in the report.
pub fn load_model(varmap: &VarMap, path: &Path, strict: bool) -> Result<LoadReport> {
    let ck_err = |message: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    if !path.is_file() {
        return Err(ck_err("model weights file is missing".into()));
    }
    let tensors = candle::safetensors::load(path, &candle::Device::Cpu)
        .map_err(|e| ck_err(format!("cannot read model weights: {e}")))?;
    let vars = named_vars(varmap);
    let mut report = LoadReport::default();
    for (name, var) in &vars {
        match tensors.get(name) {
            None => report.missing.push(name.clone()),
            Some(t) => {
                if t.dims() != var.dims() {
                    return Err(ck_err(format!(
                        "tensor `{name}` has shape {:?}, the model expects {:?}",
                        t.dims(),
                        var.dims()
                    )));
                }
                var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
            }
        }
    }
    let known: std::collections::HashSet<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    report.unexpected = tensors
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .cloned()
        .collect();
    report.unexpected.sort();
    if strict && (!report.missing.is_empty() || !report.unexpected.is_empty()) {
        return Err(ck_err(format!(
            "names do not match the model: missing {:?}, unexpected {:?}",
            first_few(&report.missing),
            first_few(&report.unexpected)
        )));
    }
    Ok(report)
}

fn first_few(v: &[String]) -> Vec<&str> {
    v.iter().take(5).map(String::as_str).collect()
}

fn write_state(state: &TrainerState, path: &Path) -> Result<()> {
    let json = serde_json::to_vec_pretty(state).map_err(|source| TrainError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    fs::write(path, json).map_err(io_err(path))
}

/// A checkpoint found on disk.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Its directory.
    pub dir: PathBuf,
    /// The decoded `trainer_state.json`.
    pub state: TrainerState,
}

impl Checkpoint {
    /// Open a checkpoint: `path` is either a checkpoint directory (holding
    /// `trainer_state.json`) or a run directory, in which case its newest `checkpoint-*` is used.
    /// Errors name the file that is missing or malformed.
    pub fn open(path: &Path) -> Result<Self> {
        let dir = if path.join(STATE_FILE).exists() {
            path.to_path_buf()
        } else if path.is_dir() {
            list_checkpoints(path)?
                .pop()
                .map(|(_, p)| p)
                .ok_or_else(|| TrainError::Checkpoint {
                    path: path.to_path_buf(),
                    message: format!("neither a checkpoint ({STATE_FILE} missing) nor a run directory with {PREFIX}* subdirectories"),
                })?
        } else {
            return Err(TrainError::Checkpoint {
                path: path.to_path_buf(),
                message: "no such checkpoint directory".into(),
            });
        };
        for f in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE] {
            if !dir.join(f).is_file() {
                return Err(TrainError::Checkpoint {
                    path: dir.join(f),
                    message: "file missing from the checkpoint".into(),
                });
            }
        }
        let sp = dir.join(STATE_FILE);
        let bytes = fs::read(&sp).map_err(io_err(&sp))?;
        let state: TrainerState =
            serde_json::from_slice(&bytes).map_err(|source| TrainError::Json {
                path: sp.clone(),
                source,
            })?;
        if state.format_version != FORMAT_VERSION {
            return Err(TrainError::Checkpoint {
                path: sp,
                message: format!(
                    "format version {} is not supported (expected {FORMAT_VERSION})",
                    state.format_version
                ),
            });
        }
        Ok(Self { dir, state })
    }

    /// Path of the model weights.
    pub fn model_path(&self) -> PathBuf {
        self.dir.join(MODEL_FILE)
    }

    /// Path of the optimizer state.
    pub fn optimizer_path(&self) -> PathBuf {
        self.dir.join(OPTIMIZER_FILE)
    }

    /// Load the weights into `varmap` (strictly: every name must match).
    pub fn load_model(&self, varmap: &VarMap) -> Result<()> {
        load_model(varmap, &self.model_path(), true).map(|_| ())
    }

    /// Load the optimizer state.
    pub fn load_optimizer(&self, optimizer: &mut AdamW) -> Result<()> {
        optimizer.load(&self.optimizer_path())
    }
}
