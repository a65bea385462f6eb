//! A readable summary of what a `--data` source holds (`beit-cli data inspect`).

use std::path::Path;

use crate::error::Result;
use crate::shard_set::ShardSet;
use crate::shard_spec::{is_shard_pattern, tar_files_in};
use crate::source::{load_splits, open_images, DataConfig};

/// One line per split of tar shards: shards, samples, classes, bytes.
fn describe_shards(name: &str, spec: &str) -> Result<String> {
    let set = ShardSet::open(spec)?;
    let bytes: u64 = set
        .shards()
        .iter()
        .filter_map(|s| std::fs::metadata(&s.path).ok())
        .map(|m| m.len())
        .sum();
    let (lo, hi) = set.shards().iter().fold((usize::MAX, 0), |(lo, hi), s| {
        (lo.min(s.samples), hi.max(s.samples))
    });
    Ok(format!(
        "{name}: {} tar shards, {} samples ({lo} to {hi} per shard), {} classes, {:.1} MB ({spec})",
        set.shards().len(),
        set.total_samples(),
        set.classes().len(),
        bytes as f64 / 1e6
    ))
}

/// What `spec` holds: per split for tar shards, else the description the loaders log.
pub fn describe_source(spec: &str) -> Result<String> {
    let root = Path::new(spec);
    let has = |d: &Path| d.is_dir() && tar_files_in(d).is_ok_and(|t| !t.is_empty());
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
