//! Metrics: a JSONL log (one JSON object per line, flushed after each) and running averages.
//!
//! Every record carries `"kind"` (`"step"`, `"epoch"`, `"eval"`, …) and `"step"` (optimizer
//! steps completed when it was written), which lets a resumed run drop the records written after
//! its checkpoint ([`MetricsWriter::resume`]) so the log reads as one uninterrupted run.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{Map, Value};

use crate::error::{io_err, Result, TrainError};

/// Appends records to a JSONL file.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    out: BufWriter<fs::File>,
}

impl MetricsWriter {
    /// Start a new log (an existing file is truncated).
    pub fn create(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        let f = fs::File::create(&path).map_err(io_err(&path))?;
        Ok(Self {
            path,
            out: BufWriter::new(f),
        })
    }

    /// Continue a log after resuming from step `step`: records with `"step" > step` (written
    /// by the interrupted run after its last checkpoint) are dropped, then new records are
    /// appended. A missing file starts a new log.
    pub fn resume(path: impl Into<PathBuf>, step: u64) -> Result<Self> {
        let path = path.into();
        if !path.exists() {
            return Self::create(path);
        }
        // Keep the surviving lines verbatim (re-serialising parsed numbers could change their
        // last digit).
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        let mut kept = String::with_capacity(text.len());
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let rec: Value = serde_json::from_str(line).map_err(|source| TrainError::Json {
                path: PathBuf::from(format!("{}:{}", path.display(), i + 1)),
                source,
            })?;
            if rec
                .get("step")
                .and_then(Value::as_u64)
                .is_none_or(|s| s <= step)
            {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        // Rewrite through a temporary file so a crash here cannot lose the log.
        let tmp = path.with_extension("jsonl.tmp");
        fs::write(&tmp, kept).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        let f = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(Self {
            path,
            out: BufWriter::new(f),
        })
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write one record (must be a JSON object) and flush. Non-finite numbers become `null`.
    pub fn write(&mut self, record: &Value) -> Result<()> {
        if !record.is_object() {
            return Err(TrainError::Config(format!(
                "metrics record must be a JSON object, got {record}"
            )));
        }
        serde_json::to_writer(&mut self.out, record).map_err(|source| TrainError::Json {
            path: self.path.clone(),
            source,
        })?;
        self.out.write_all(b"\n").map_err(io_err(&self.path))?;
        self.out.flush().map_err(io_err(&self.path))
    }
}

/// Read a JSONL file into objects; the error names the file and the line.
pub fn read_jsonl(path: &Path) -> Result<Vec<Map<String, Value>>> {
    let f = fs::File::open(path).map_err(io_err(path))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(io_err(path))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(&line) {
            Ok(Value::Object(m)) => out.push(m),
            Ok(_) => {
                return Err(TrainError::Config(format!(
                    "{}: line {} is not a JSON object",
                    path.display(),
                    i + 1
                )))
            }
            Err(source) => {
                return Err(TrainError::Json {
                    path: PathBuf::from(format!("{}:{}", path.display(), i + 1)),
                    source,
                })
            }
        }
    }
    Ok(out)
}

/// Weighted running means of named metrics (e.g. loss weighted by batch size).
#[derive(Debug, Clone, Default)]
pub struct MetricAverager {
    sums: BTreeMap<String, (f64, f64)>,
}

impl MetricAverager {
    /// Empty averager.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add `value` with `weight`. Non-finite values are ignored (they would poison the mean).
    pub fn add(&mut self, name: &str, value: f64, weight: f64) {
        if !value.is_finite() {
            return;
        }
        let e = self.sums.entry(name.to_string()).or_insert((0.0, 0.0));
        e.0 += value * weight;
        e.1 += weight;
    }

    /// Mean of one metric, if any value was added.
    pub fn mean(&self, name: &str) -> Option<f64> {
        self.sums
            .get(name)
            .filter(|(_, w)| *w > 0.0)
            .map(|(s, w)| s / w)
    }

    /// All means, by name.
    pub fn means(&self) -> BTreeMap<String, f64> {
        self.sums
            .iter()
            .filter(|(_, (_, w))| *w > 0.0)
            .map(|(k, (s, w))| (k.clone(), s / w))
            .collect()
    }

    /// Forget everything.
    pub fn reset(&mut self) {
        self.sums.clear();
    }

    /// The raw `[weighted sum, weight]` pairs (to save in a checkpoint).
    pub fn sums(&self) -> BTreeMap<String, [f64; 2]> {
        self.sums
            .iter()
            .map(|(k, (s, w))| (k.clone(), [*s, *w]))
            .collect()
    }

    /// Rebuild from [`MetricAverager::sums`].
    pub fn from_sums(sums: &BTreeMap<String, [f64; 2]>) -> Self {
        Self {
            sums: sums
                .iter()
                .map(|(k, [s, w])| (k.clone(), (*s, *w)))
                .collect(),
        }
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.sums.is_empty()
    }
}

/// Items per second over a window of wall time.
#[derive(Debug, Clone)]
pub struct Throughput {
    start: Instant,
    items: u64,
}

impl Default for Throughput {
    fn default() -> Self {
        Self::new()
    }
}

impl Throughput {
    /// Start a window now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            items: 0,
        }
    }

    /// Count `n` more items.
    pub fn add(&mut self, n: u64) {
        self.items += n;
    }

    /// Items per second since the window started.
    pub fn rate(&self) -> f64 {
        let s = self.start.elapsed().as_secs_f64();
        if s > 0.0 {
            self.items as f64 / s
        } else {
            0.0
        }
    }

    /// Return the rate and start a new window.
    pub fn lap(&mut self) -> f64 {
        let r = self.rate();
        *self = Self::new();
        r
    }
}
