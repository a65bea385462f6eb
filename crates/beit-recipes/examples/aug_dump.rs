//! Draw the fine-tuning recipe's training augmentation many times over the first images of the
//! embedded Fashion-MNIST subset and write the results, so that their statistics can be compared
//! with timm's transform (`scripts/peers/aug_stats.py`, docs/training-parity.md).
//!
//! ```sh
//! cargo run --release -p beit-recipes --example aug_dump -- CONFIG.toml IMAGES DRAWS OUT.f32 [KEY=VALUE ...]
//! ```
//!
//! `OUT.f32` holds `IMAGES x DRAWS` normalised images, image-major, each `3 x H x W`
//! little-endian f32 (draw `d` of image `i` uses the loader's per-sample seed of epoch `d`).

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use beit_data::sampler::sample_rng;
use beit_data::transform::Transform;
use beit_data::FashionMnist;
use beit_recipes::{load_config, FinetuneConfig};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        bail!("usage: aug_dump CONFIG.toml IMAGES DRAWS OUT.f32 [KEY=VALUE ...]");
    }
    let cfg: FinetuneConfig = load_config(Some(Path::new(&args[0])), &args[4..], &[])?;
    let images: usize = args[1].parse().context("IMAGES")?;
    let draws: u64 = args[2].parse().context("DRAWS")?;
    let transform = cfg.aug.train_transform()?;
    let data = FashionMnist::embedded()?;
    let mut out = std::io::BufWriter::new(std::fs::File::create(&args[3])?);
    for i in 0..images.min(data.train.len()) {
        let img = data.train.rgb_image(i);
        for d in 0..draws {
            let mut rng = sample_rng(cfg.train.seed, d, i as u64);
            let views = transform.apply(&img, &mut rng)?;
            for v in views.image.data.iter() {
                out.write_all(&v.to_le_bytes())?;
            }
        }
    }
    out.flush()?;
    Ok(())
}
