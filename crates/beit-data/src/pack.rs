//! Packing an ImageFolder, or Parquet files in the Hugging Face layout, into tar shards: one folder per split (`OUT/train/shard-000000.tar`,
//! ..., `OUT/val/...`), each with a `manifest.json`. Samples are written in a seeded random order
//! (so that a shuffle buffer over consecutive samples mixes classes), each as `KEY.EXT` (the
//! original image bytes) and `KEY.cls` (the class index). The result is a `--data` root like the
//! ImageFolder it came from. Parquet rows are written in the order of a shuffled pass (files
//! permuted, rows mixed by a shuffle buffer), their image bytes unchanged.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use std::sync::Arc;

use crate::error::{DataError, Result};
use crate::hub_layout::hub_splits;
use crate::image_folder::ImageFolder;
use crate::shard_format::ShardFormat;
use crate::shard_manifest::{ShardEntry, ShardManifest, MANIFEST_FORMAT};
use crate::shard_set::ShardSet;
use crate::shard_spec::{is_shard_pattern, shard_files_in};
use crate::shard_stream::ShardStream;

/// Skipped samples named in a warning each; the rest are only counted.
const WARN_SKIPPED: usize = 10;

/// How to pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackOptions {
    /// A new shard starts when the current one would grow past this many bytes (a shard holds at
    /// least one sample).
    pub shard_bytes: u64,
    /// Seed of the sample order.
    pub seed: u64,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            shard_bytes: 1_000_000_000,
            seed: 0,
        }
    }
}

/// Parse a size such as `1GB`, `500MB`, `64KiB` or `1000000` (bytes; decimal and binary units).
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1_000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => {
            return Err(DataError::param(
                "shard-size",
                format!("unknown unit in `{text}`"),
            ))
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| DataError::param("shard-size", format!("`{text}` is not a size")))?;
    let bytes = (n * scale as f64) as u64;
    if bytes == 0 {
        return Err(DataError::param("shard-size", "must be positive"));
    }
    Ok(bytes)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The split folders of an ImageFolder root: `train` plus `val`/`validation`/`test` when present,
/// else the root itself as `train`.
fn split_dirs(data: &Path) -> Vec<(String, PathBuf)> {
    if !data.join("train").is_dir() {
        return vec![("train".into(), data.to_path_buf())];
    }
    let mut out = vec![("train".to_string(), data.join("train"))];
    out.extend(
        ["val", "validation", "test"]
            .iter()
            .filter(|d| data.join(d).is_dir())
            .map(|d| (d.to_string(), data.join(d))),
    );
    out
}

/// Pack the ImageFolder at `data` into shards under `out`; returns each split's manifest.
pub fn pack_image_folder(
    data: &Path,
    out: &Path,
    opts: &PackOptions,
) -> Result<Vec<(String, ShardManifest)>> {
    let mut done = Vec::new();
    for (name, dir) in split_dirs(data) {
        let folder = ImageFolder::new(&dir)?;
        let dest = out.join(&name);
        std::fs::create_dir_all(&dest).map_err(io_err(&dest))?;
        let manifest = pack_split(&folder, &dest, opts)?;
        manifest.write(&dest)?;
        tracing::info!(
            "packed {} ({} images) into {} shards in {}",
            dir.display(),
            manifest.samples,
            manifest.shards.len(),
            dest.display()
        );
        done.push((name, manifest));
    }
    Ok(done)
}

/// The shard being written.
struct Open {
    entry: ShardEntry,
    path: PathBuf,
    builder: tar::Builder<BufWriter<File>>,
}

impl Open {
    fn create(dest: &Path, index: usize) -> Result<Self> {
        let file = format!("shard-{index:06}.tar");
        let path = dest.join(&file);
        let f = File::create(&path).map_err(io_err(&path))?;
        Ok(Open {
            entry: ShardEntry {
                file,
                samples: 0,
                bytes: 0,
                class_counts: BTreeMap::new(),
            },
            path,
            builder: tar::Builder::new(BufWriter::new(f)),
        })
    }

    fn append(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let mut header = tar::Header::new_ustar();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        self.builder
            .append_data(&mut header, name, bytes)
            .map_err(io_err(&self.path))?;
        self.entry.bytes += 512 + (bytes.len() as u64).div_ceil(512) * 512;
        Ok(())
    }

    fn finish(self) -> Result<ShardEntry> {
        let mut w = self.builder.into_inner().map_err(io_err(&self.path))?;
        w.flush().map_err(io_err(&self.path))?;
        let mut entry = self.entry;
        entry.bytes = std::fs::metadata(&self.path)
            .map_err(io_err(&self.path))?
            .len();
        Ok(entry)
    }
}

/// Writes one split's samples into shards of about `shard_bytes`, in the order given.
struct Packer<'a> {
    dest: &'a Path,
    opts: &'a PackOptions,
    shards: Vec<ShardEntry>,
    open: Option<Open>,
    samples: usize,
}

impl<'a> Packer<'a> {
    fn new(dest: &'a Path, opts: &'a PackOptions) -> Self {
        Packer {
            dest,
            opts,
            shards: Vec::new(),
            open: None,
            samples: 0,
        }
    }

    /// Append a sample as `KEY.EXT` (and `KEY.cls` when labelled).
    fn add(&mut self, ext: &str, bytes: &[u8], label: Option<u32>) -> Result<()> {
        let grows = 1536 + bytes.len() as u64;
        let full =
            |o: &mut Open| o.entry.bytes + grows > self.opts.shard_bytes && o.entry.samples > 0;
        if let Some(o) = self.open.take_if(full) {
            self.shards.push(o.finish()?);
        }
        let o = match &mut self.open {
            Some(o) => o,
            None => self
                .open
                .insert(Open::create(self.dest, self.shards.len())?),
        };
        let key = format!("{:09}", self.samples);
        o.append(&format!("{key}.{ext}"), bytes)?;
        if let Some(label) = label {
            o.append(&format!("{key}.cls"), label.to_string().as_bytes())?;
            *o.entry.class_counts.entry(label).or_default() += 1;
        }
        o.entry.samples += 1;
        self.samples += 1;
        Ok(())
    }

    fn finish(mut self, classes: Vec<String>) -> Result<ShardManifest> {
        if let Some(o) = self.open.take() {
            self.shards.push(o.finish()?);
        }
        Ok(ShardManifest {
            format: MANIFEST_FORMAT.into(),
            classes,
            samples: self.samples,
            shards: self.shards,
        })
    }
}

/// Write an ImageFolder's samples in a random order seeded by `opts.seed`.
fn pack_split(folder: &ImageFolder, dest: &Path, opts: &PackOptions) -> Result<ShardManifest> {
    let mut order: Vec<usize> = (0..folder.samples().len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(opts.seed));
    let mut packer = Packer::new(dest, opts);
    for &i in &order {
        let (path, label) = &folder.samples()[i];
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_else(|| "jpg".into());
        packer.add(&ext, &bytes, Some(*label))?;
    }
    packer.finish(folder.classes().to_vec())
}

/// Write a shard set's samples (Parquet files, say) in a seeded shuffled order: the files in a
/// permutation, the rows mixed by the set's shuffle buffer. Unreadable samples are skipped and
/// counted; the count is returned with the manifest.
pub fn pack_shard_set(
    set: &ShardSet,
    dest: &Path,
    opts: &PackOptions,
) -> Result<(ShardManifest, usize)> {
    std::fs::create_dir_all(dest).map_err(io_err(dest))?;
    let plan = set.epoch_plan(true, opts.seed, 0, 0, 1)?;
    let classes = Arc::new(set.classes().to_vec());
    let stream = ShardStream::open_once(&plan, classes, set.shuffle_buffer())?;
    let mut packer = Packer::new(dest, opts);
    let mut skipped = 0usize;
    for item in stream {
        match item {
            Ok(raw) => packer.add(&raw.image_ext, &raw.image, raw.label)?,
            Err(e) => {
                skipped += 1;
                if skipped <= WARN_SKIPPED {
                    tracing::warn!("skipped: {e}");
                }
            }
        }
    }
    let manifest = packer.finish(set.classes().to_vec())?;
    manifest.write(dest)?;
    Ok((manifest, skipped))
}

/// Pack what `data` names into shards under `out`: Parquet files (a hub dataset folder, `train/`
/// and `validation/` folders of them, or one file or brace pattern, packed as `train/`), else an
/// ImageFolder root. Returns each split's manifest.
pub fn pack_source(
    data: &str,
    out: &Path,
    opts: &PackOptions,
) -> Result<Vec<(String, ShardManifest)>> {
    let Some(splits) = parquet_splits(data)? else {
        return pack_image_folder(Path::new(data), out, opts);
    };
    let train_classes = splits[0].1.classes().to_vec();
    let mut done = Vec::new();
    for (name, set) in splits {
        let set = if by_index(set.classes()) && set.classes().len() <= train_classes.len() {
            set.with_classes(train_classes.clone())
        } else {
            set
        };
        let dest = out.join(&name);
        let (manifest, skipped) = pack_shard_set(&set, &dest, opts)?;
        if manifest.samples == 0 {
            // A split with no usable row (the hub's unlabelled `test` splits, label -1).
            tracing::warn!(
                "{}: no usable sample ({skipped} skipped), not packed",
                set.spec()
            );
            std::fs::remove_dir_all(&dest).map_err(io_err(&dest))?;
            continue;
        }
        tracing::info!(
            "packed {} ({} images, {skipped} unreadable skipped) into {} shards in {}",
            set.spec(),
            manifest.samples,
            manifest.shards.len(),
            dest.display()
        );
        done.push((name, manifest));
    }
    Ok(done)
}

/// Whether class names are the indices `0`, `1`, ... (labels without names).
fn by_index(classes: &[String]) -> bool {
    classes.iter().enumerate().all(|(i, c)| *c == i.to_string())
}

/// Whether `dir` holds Parquet files.
fn has_parquet(dir: &Path) -> bool {
    dir.is_dir()
        && shard_files_in(dir)
            .is_ok_and(|f| f.iter().any(|p| ShardFormat::of(p) == ShardFormat::Parquet))
}

/// The splits of `data` (train first) if it names Parquet files.
fn parquet_splits(data: &str) -> Result<Option<Vec<(String, ShardSet)>>> {
    let root = Path::new(data);
    if is_shard_pattern(data) {
        return Ok(Some(vec![("train".into(), ShardSet::open(data)?)]));
    }
    if let Some(hub) = hub_splits(root)? {
        let mut names: Vec<&String> = hub.splits.keys().collect();
        names.sort_by_key(|n| *n != "train");
        let open = |name: &String| {
            let spec = format!("{data} ({name})");
            ShardSet::from_paths(&spec, &hub.dir, hub.splits[name].clone())
                .map(|s| (name.clone(), s))
        };
        return names.into_iter().map(open).collect::<Result<_>>().map(Some);
    }
    if !has_parquet(&root.join("train")) {
        return Ok(None);
    }
    ["train", "val", "validation", "test"]
        .iter()
        .filter(|d| has_parquet(&root.join(d)))
        .map(|d| {
            Ok((
                d.to_string(),
                ShardSet::open(&root.join(d).to_string_lossy())?,
            ))
        })
        .collect::<Result<_>>()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GB").unwrap(), 1_000_000_000);
        assert_eq!(parse_size("64KiB").unwrap(), 65_536);
        assert_eq!(parse_size("1.5 MB").unwrap(), 1_500_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        for bad in ["", "GB", "1XB", "0"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
