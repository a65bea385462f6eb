//! Time dVAE forward + backward passes on random 28x28 images (batch 64), to size demo configs:
//! `cargo run --release -p beit-tokenizer --example step_timing -- [steps]`.

use beit_tokenizer::{dvae_losses, Dvae, DvaeConfig, GumbelConfig};
use candle::{Device, Tensor};

fn main() -> anyhow::Result<()> {
    let steps: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(5);
    let model = DvaeConfig {
        image_size: 28,
        channels: 3,
        vocab_size: 512,
        downsample: 4,
        n_hid: 32,
        n_init: 32,
        n_blk_per_group: 1,
    };
    let n_hid: usize = std::env::var("N_HID")
        .ok()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(32);
    let batch: usize = std::env::var("BATCH")
        .ok()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(64);
    let model = DvaeConfig {
        n_hid,
        n_init: n_hid,
        ..model
    };
    let dvae = Dvae::new(&model, 0, &Device::Cpu)?;
    let cfg = GumbelConfig::default();
    let x = Tensor::rand(0f32, 1.0, (batch, 3, 28, 28), &Device::Cpu)?;
    for step in 0..steps as u64 {
        let t = std::time::Instant::now();
        let l = dvae_losses(&dvae, &cfg, &x, step, steps as u64, step)?;
        l.loss.backward()?;
        println!(
            "step {step} loss {:.4}: {:.3} s",
            l.recon,
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
