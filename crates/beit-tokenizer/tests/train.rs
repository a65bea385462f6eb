//! The dVAE trainer: gradients reach every parameter, the loss falls, checkpoints resume exactly,
//! and exported weights load as a DALL-E-layout tokenizer.

use anyhow::Result;
use beit_tokenizer::train::{ReconLoss, TokenizerTrainFile};
use beit_tokenizer::{Decoder, DvaeConfig, Encoder, TrainConfig, Trainer, VisualTokenizer};
use candle::{DType, Device, Tensor};

fn tiny_model() -> DvaeConfig {
    DvaeConfig {
        image_size: 16,
        channels: 3,
        vocab_size: 16,
        downsample: 4,
        n_hid: 8,
        n_init: 8,
        n_blk_per_group: 1,
    }
}

fn tiny_train(recon_loss: ReconLoss, straight_through: bool) -> TrainConfig {
    TrainConfig {
        steps: 40,
        batch_size: 8,
        lr: 3e-3,
        warmup_steps: 2,
        kl_warmup_steps: 10,
        kl_weight: 1e-2,
        recon_loss,
        straight_through,
        seed: 7,
        ..Default::default()
    }
}

/// Eight 16x16 images with structure: gradients, stripes and blobs of different colours.
fn batch() -> Result<Tensor> {
    let mut v = Vec::with_capacity(8 * 3 * 256);
    for i in 0..8 {
        for c in 0..3 {
            for y in 0..16 {
                for x in 0..16 {
                    let fx = x as f32 / 15.0;
                    let fy = y as f32 / 15.0;
                    let val = match (i + c) % 4 {
                        0 => fx,
                        1 => fy,
                        2 => ((x / 4 + y / 4 + i) % 2) as f32,
                        _ => (-((fx - 0.5).powi(2) + (fy - 0.5).powi(2)) * 8.0).exp(),
                    };
                    v.push(val);
                }
            }
        }
    }
    Ok(Tensor::from_vec(v, (8, 3, 16, 16), &Device::Cpu)?)
}

#[test]
fn every_parameter_gets_a_finite_nonzero_gradient() -> Result<()> {
    for (loss, st, usage) in [
        (ReconLoss::LogitLaplace, false, 0.0),
        (ReconLoss::Mse, true, 0.1),
        (ReconLoss::L1, false, 0.0),
    ] {
        let cfg = TrainConfig {
            usage_weight: usage,
            ..tiny_train(loss, st)
        };
        let trainer = Trainer::new(&tiny_model(), &cfg, &Device::Cpu)?;
        let (value, grads) = trainer.gradients(&batch()?)?;
        assert!(value.is_finite());
        let vars = trainer.dvae().named_vars();
        assert!(vars.len() > 20);
        for (name, var) in vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{loss:?}: no gradient for {name}"));
            let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
            assert!(
                norm.is_finite() && norm > 0.0,
                "{loss:?}/{name}: |g|^2 = {norm}"
            );
        }
    }
    Ok(())
}

#[test]
fn training_lowers_the_loss_and_resumes_exactly() -> Result<()> {
    let dev = Device::Cpu;
    let images = batch()?;
    let cfg = tiny_train(ReconLoss::LogitLaplace, false);
    let mut trainer = Trainer::new(&tiny_model(), &cfg, &dev)?;
    let first = trainer.step(&images)?;
    let mut last = first;
    for _ in 0..29 {
        last = trainer.step(&images)?;
    }
    assert_eq!(last.step, 30);
    assert!(
        last.recon < first.recon - 0.05,
        "reconstruction loss {} -> {}",
        first.recon,
        last.recon
    );
    assert!(last.tau < first.tau && last.kl_weight > first.kl_weight);

    // Checkpoint, continue; a fresh trainer resumed from the checkpoint must take the same step.
    let dir = tempfile::tempdir()?;
    let ckpt = dir.path().join("checkpoint.safetensors");
    trainer.save_checkpoint(&ckpt)?;
    let a = trainer.step(&images)?;
    let mut resumed = Trainer::new(&tiny_model(), &cfg, &dev)?;
    resumed.resume(&ckpt)?;
    assert_eq!(resumed.step_count(), 30);
    let b = resumed.step(&images)?;
    assert_eq!(a.step, b.step);
    assert!((a.loss - b.loss).abs() < 1e-6, "{} vs {}", a.loss, b.loss);

    // A checkpoint of another architecture is refused, naming the field.
    let other = DvaeConfig {
        vocab_size: 32,
        ..tiny_model()
    };
    let err = Trainer::new(&other, &cfg, &dev)?
        .resume(&ckpt)
        .unwrap_err()
        .to_string();
    assert!(err.contains("dvae_config"), "{err}");

    // Export: the DALL-E loaders read our dVAE unchanged and tokenize identically.
    trainer.dvae().export(dir.path())?;
    let enc = Encoder::load(&dir.path().join("encoder.safetensors"), &dev)?;
    let dec = Decoder::load(&dir.path().join("decoder.safetensors"), &dev)?;
    assert_eq!(enc.input_size(), 16);
    assert_eq!(enc.downsample(), 4);
    assert_eq!(enc.vocab_size(), 16);
    assert_eq!(dec.config(), &tiny_model().decoder_config());
    let mapped = beit_tokenizer::pixels::map_pixels(&images)?;
    let ids = enc.tokenize(&mapped)?;
    assert_eq!(ids.dims(), &[8, 4, 4]);
    let ids_ref = trainer.dvae().encoder.tokenize(&mapped)?;
    let same = ids
        .eq(&ids_ref)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()?;
    assert_eq!(same, 128);
    let stats = trainer.evaluate(&images, 3)?;
    assert!(stats.mse.is_finite() && stats.codebook.used >= 1);
    Ok(())
}

#[test]
fn config_file_errors_name_the_file_and_field() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[model]\ndownsample = 3\n")?;
    let err = TokenizerTrainFile::from_toml_file(&path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.toml") && err.contains("downsample"),
        "{err}"
    );
    std::fs::write(&path, "[train]\nstepz = 3\n")?;
    let err = TokenizerTrainFile::from_toml_file(&path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("bad.toml") && err.contains("stepz"), "{err}");
    let shipped = TokenizerTrainFile::from_toml_file(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../configs/tokenizer_fashion_mnist.toml"
    )))?;
    assert_eq!(shipped.model.image_size, 28);
    assert_eq!(shipped.model.tokens_per_side(), 7);
    Ok(())
}

#[test]
fn schedules_have_the_documented_shape() {
    let cfg = TrainConfig {
        steps: 100,
        warmup_steps: 10,
        lr: 1e-3,
        lr_min: 1e-5,
        kl_weight: 0.5,
        kl_warmup_steps: 20,
        ..Default::default()
    };
    assert!((cfg.temperature(0) - 1.0).abs() < 1e-12);
    assert!((cfg.temperature(100) - 1.0 / 16.0).abs() < 1e-12);
    assert!((cfg.temperature(50) - 0.25).abs() < 1e-12); // geometric midpoint
    assert!((cfg.lr_at(9) - 1e-3).abs() < 1e-12);
    assert!((cfg.lr_at(100) - 1e-5).abs() < 1e-12);
    assert!((cfg.kl_weight_at(10) - 0.25).abs() < 1e-12);
    assert!((cfg.kl_weight_at(40) - 0.5).abs() < 1e-12);
}
