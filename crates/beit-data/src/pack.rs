//! Packing an ImageFolder into tar shards: one folder per split (`OUT/train/shard-000000.tar`,
//! ..., `OUT/val/...`), each with a `manifest.json`. Samples are written in a seeded random order
//! (so that a shuffle buffer over consecutive samples mixes classes), each as `KEY.EXT` (the
//! original image bytes) and `KEY.cls` (the class index). The result is a `--data` root like the
//! ImageFolder it came from.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{DataError, Result};
use crate::image_folder::ImageFolder;
use crate::shard_manifest::{ShardEntry, ShardManifest, MANIFEST_FORMAT};

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

/// Write one split's samples into shards of about `opts.shard_bytes`.
fn pack_split(folder: &ImageFolder, dest: &Path, opts: &PackOptions) -> Result<ShardManifest> {
    let mut order: Vec<usize> = (0..folder.samples().len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(opts.seed));
    let mut shards = Vec::new();
    let mut open: Option<Open> = None;
    for (n, &i) in order.iter().enumerate() {
        let (path, label) = &folder.samples()[i];
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_else(|| "jpg".into());
        let grows = 1536 + bytes.len() as u64;
        if let Some(o) =
            open.take_if(|o| o.entry.bytes + grows > opts.shard_bytes && o.entry.samples > 0)
        {
            shards.push(o.finish()?);
        }
        let o = match &mut open {
            Some(o) => o,
            None => open.insert(Open::create(dest, shards.len())?),
        };
        let key = format!("{n:09}");
        o.append(&format!("{key}.{ext}"), &bytes)?;
        o.append(&format!("{key}.cls"), label.to_string().as_bytes())?;
        o.entry.samples += 1;
        *o.entry.class_counts.entry(*label).or_default() += 1;
    }
    if let Some(o) = open {
        shards.push(o.finish()?);
    }
    Ok(ShardManifest {
        format: MANIFEST_FORMAT.into(),
        classes: folder.classes().to_vec(),
        samples: order.len(),
        shards,
    })
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
