//! Throughput of decode + BEiT two-view augmentation through the [`Loader`].
//!
//! Usage: `cargo run --release -p beit-data --example bench_loader -- FOLDER [THREADS] [EPOCHS] [BATCH]`
//!
//! FOLDER is an `ImageFolder` (`FOLDER/<class>/<image>`). Prints images/s per epoch and a last line
//! `rust_images_per_sec <best>` that `scripts/bench_data.sh` parses. Not part of the test suite.

use std::sync::Arc;
use std::time::Instant;

use beit_data::{ImageFolder, Loader, LoaderConfig, TwoViewTransform};
use candle::Device;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let folder = args
        .get(1)
        .ok_or_else(|| anyhow::anyhow!("usage: bench_loader FOLDER [THREADS] [EPOCHS] [BATCH]"))?;
    let threads: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(2);
    let epochs: u64 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(2);
    let batch: usize = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(64);
    let ds = Arc::new(ImageFolder::new(folder)?);
    let n = ds.samples().len();
    let loader = Loader::new(
        ds,
        Arc::new(TwoViewTransform::beit(224, 112)),
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
    for epoch in 0..epochs {
        let start = Instant::now();
        let mut images = 0usize;
        for b in loader.epoch(epoch)? {
            images += b?.len();
        }
        let rate = images as f64 / start.elapsed().as_secs_f64();
        best = best.max(rate);
        println!(
            "epoch {epoch}: {images}/{n} images in {:.2}s = {rate:.1} images/s ({threads} threads)",
            start.elapsed().as_secs_f64()
        );
    }
    println!("{}", loader.summary());
    println!("rust_images_per_sec {best:.1}");
    Ok(())
}
