//! A readable summary of what a `--data` source holds (`beit-cli data inspect`).

use std::path::Path;

use crate::error::Result;
use crate::hub_layout::hub_splits;
use crate::shard_format::ShardFormat;
use crate::shard_set::ShardSet;
use crate::shard_spec::is_shard_pattern;
use crate::source::{has_shards, load_splits, open_images, DataConfig};

/// One line per split of shards: shards, samples, classes, bytes.
fn describe_shards(name: &str, spec: &str) -> Result<String> {
    describe_set(name, &ShardSet::open(spec)?)
}

/// One line for one split's shard set.
fn describe_set(name: &str, set: &ShardSet) -> Result<String> {
    let bytes: u64 = set
        .shards()
        .iter()
        .filter_map(|s| std::fs::metadata(&s.path).ok())
        .map(|m| m.len())
        .sum();
    let (lo, hi) = set.shards().iter().fold((usize::MAX, 0), |(lo, hi), s| {
        (lo.min(s.samples), hi.max(s.samples))
    });
    let kind = set
        .shards()
        .first()
        .map_or("tar", |s| ShardFormat::of(&s.path).name());
    Ok(format!(
        "{name}: {} {kind} shards, {} samples ({lo} to {hi} per shard), {} classes, {:.1} MB ({})",
        set.shards().len(),
        set.total_samples(),
        set.classes().len(),
        bytes as f64 / 1e6,
        set.spec()
    ))
}

/// One line per split of a hub dataset's Parquet files, if `root` is one.
fn describe_hub(root: &Path) -> Result<Option<String>> {
    let Some(hub) = hub_splits(root)? else {
        return Ok(None);
    };
    let mut lines = Vec::new();
    for (name, files) in &hub.splits {
        let spec = format!("{}/{name}-*.parquet", hub.dir.display());
        lines.push(describe_set(
            name,
            &ShardSet::from_paths(&spec, &hub.dir, files.clone())?,
        )?);
    }
    Ok(Some(lines.join("\n")))
}

/// What `spec` holds: per split for shards (tar or Parquet), else the description the loaders log.
pub fn describe_source(spec: &str) -> Result<String> {
    let root = Path::new(spec);
    let has = has_shards;
    if !is_shard_pattern(spec) {
        if let Some(lines) = describe_hub(root)? {
            return Ok(lines);
        }
    }
    if is_shard_pattern(spec) || has(root) {
        return describe_shards("shards", spec);
    }
    let splits: Vec<&str> = ["train", "val", "validation", "test"]
        .into_iter()
        .filter(|d| has(&root.join(d)))
        .collect();
    if !splits.is_empty() {
        let lines: Result<Vec<String>> = splits
            .iter()
            .map(|d| describe_shards(d, &root.join(d).to_string_lossy()))
            .collect();
        return Ok(lines?.join("\n"));
    }
    let cfg = DataConfig {
        source: spec.to_string(),
        ..DataConfig::default()
    };
    match load_splits(&cfg) {
        Ok(s) => Ok(format!(
            "{} (classes: {})",
            s.description,
            preview(&s.classes)
        )),
        Err(_) => Ok(format!("unlabelled images: {}", open_images(spec)?.1)),
    }
}

/// The first few class names.
fn preview(classes: &[String]) -> String {
    let head: Vec<&str> = classes.iter().take(5).map(String::as_str).collect();
    let more = if classes.len() > 5 { ", ..." } else { "" };
    format!("{}{more}", head.join(", "))
}
