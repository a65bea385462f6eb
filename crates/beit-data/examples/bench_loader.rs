//! Throughput of decode + BEiT two-view augmentation through the [`Loader`].
//!
//! Usage: `cargo run --release -p beit-data --example bench_loader -- FOLDER [THREADS] [EPOCHS] [BATCH] [finetune]`
//!
//! FOLDER is an `ImageFolder` (`FOLDER/<class>/<image>`), or tar shards (a brace pattern, a folder
//! of shards or a packed root), which the loader streams. Prints images/s per epoch and a last line
//! `rust_images_per_sec <best>` (and `rust_cpu_ms_per_image`) that `scripts/bench/bench_data.sh` parses.
//! Not part of the test suite.

use std::sync::Arc;
use std::time::Instant;

use beit_data::{open_images, Dataset, ImageFolder, Loader, LoaderConfig, TwoViewTransform};
use candle::Device;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let folder = args
        .get(1)
        .ok_or_else(|| anyhow::anyhow!("usage: bench_loader FOLDER [THREADS] [EPOCHS] [BATCH]"))?;
    let threads: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(2);
    let epochs: u64 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(2);
    let batch: usize = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(64);
    // Optional 5th argument `finetune`: the fine-tuning transform (RandAugment, erasing) instead.
    let transform: Arc<dyn beit_data::Transform> = match args.get(5).map(String::as_str) {
        Some("finetune") => Arc::new(beit_data::TrainTransform::beit_finetune(224)),
        _ => Arc::new(TwoViewTransform::beit(224, 112)),
    };
    let ds: Arc<dyn Dataset> = match ImageFolder::new(folder) {
        Ok(f) => Arc::new(f),
        Err(_) => open_images(folder)?.0,
    };
    let n = ds.len();
    let loader = Loader::new(
        ds,
        transform,
        LoaderConfig {
            batch_size: batch,
            num_threads: threads,
            prefetch: 4,
            seed: 0,
            ..LoaderConfig::default()
        },
        Device::Cpu,
    )?;
    let mut best = 0f64;
    let mut best_cpu = f64::MAX;
    for epoch in 0..epochs {
        let start = Instant::now();
        let cpu0 = cpu_seconds();
        let mut images = 0usize;
        for b in loader.epoch(epoch)? {
            images += b?.len();
        }
        let rate = images as f64 / start.elapsed().as_secs_f64();
        best = best.max(rate);
        if let (Some(a), Some(b)) = (cpu0, cpu_seconds()) {
            let ms = (b - a) * 1e3 / images as f64;
            best_cpu = best_cpu.min(ms);
            println!("epoch {epoch}: {ms:.2} CPU ms per image");
        }
        println!(
            "epoch {epoch}: {images}/{n} images in {:.2}s = {rate:.1} images/s ({threads} threads)",
            start.elapsed().as_secs_f64()
        );
    }
    println!("{}", loader.summary());
    println!("rust_images_per_sec {best:.1}");
    if best_cpu < f64::MAX {
        println!("rust_cpu_ms_per_image {best_cpu:.2}");
    }
    Ok(())
}

/// CPU time (user + system) of this process so far, from `/proc/self/stat` (Linux; clock ticks
/// of 1/100 s). `None` elsewhere.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}
