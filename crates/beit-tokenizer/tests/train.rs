//! The dVAE objective: gradients reach every parameter, the engine's AdamW lowers the loss, and
//! exported weights load as a DALL-E-layout tokenizer.

use anyhow::Result;
use beit_tokenizer::train::{evaluate, ReconLoss};
use beit_tokenizer::{
    dvae_losses, Decoder, Dvae, DvaeConfig, Encoder, GumbelConfig, VisualTokenizer,
};
use beit_train::{AdamW, AdamWConfig, ParamGroup};
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

fn tiny_objective(recon_loss: ReconLoss, straight_through: bool) -> GumbelConfig {
    GumbelConfig {
        kl_warmup_steps: 10,
        kl_weight: 1e-2,
        recon_loss,
        straight_through,
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
        let cfg = GumbelConfig {
            usage_weight: usage,
            ..tiny_objective(loss, st)
        };
        let dvae = Dvae::new(&tiny_model(), 7, &Device::Cpu)?;
        let l = dvae_losses(&dvae, &cfg, &batch()?, 0, 40, 1)?;
        let grads = l.loss.backward()?;
        let vars = dvae.named_vars();
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
fn training_lowers_the_loss_and_exports_a_tokenizer() -> Result<()> {
    let dev = Device::Cpu;
    let images = batch()?;
    let cfg = tiny_objective(ReconLoss::LogitLaplace, false);
    let dvae = Dvae::new(&tiny_model(), 7, &dev)?;
    let mut opt = AdamW::new(
        vec![ParamGroup {
            name: "all".into(),
            params: dvae.named_vars(),
            lr_scale: 1.0,
            weight_decay: false,
        }],
        AdamWConfig::default(),
    )?;
    let total = 30;
    let mut first = None;
    let mut last = None;
    for step in 0..total {
        let l = dvae_losses(&dvae, &cfg, &images, step, total, step)?;
        opt.step(&l.loss.backward()?, 3e-3, 0.0)?;
        if first.is_none() {
            first = Some(l.clone());
        }
        last = Some(l);
    }
    let (first, last) = (first.unwrap(), last.unwrap());
    assert!(
        last.recon < first.recon - 0.05,
        "reconstruction loss {} -> {}",
        first.recon,
        last.recon
    );
    assert!(last.tau < first.tau && last.kl_weight > first.kl_weight);

    // Export: the DALL-E loaders read our dVAE unchanged and tokenize identically.
    let dir = tempfile::tempdir()?;
    dvae.export(dir.path())?;
    let enc = Encoder::load(&dir.path().join("encoder.safetensors"), &dev)?;
    let dec = Decoder::load(&dir.path().join("decoder.safetensors"), &dev)?;
    assert_eq!(enc.input_size(), 16);
    assert_eq!(enc.downsample(), 4);
    assert_eq!(enc.vocab_size(), 16);
    assert_eq!(dec.config(), &tiny_model().decoder_config());
    let mapped = beit_tokenizer::pixels::map_pixels(&images)?;
    let ids = enc.tokenize(&mapped)?;
    assert_eq!(ids.dims(), &[8, 4, 4]);
    let ids_ref = dvae.encoder.tokenize(&mapped)?;
    let same = ids
        .eq(&ids_ref)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()?;
    assert_eq!(same, 128);
    let stats = evaluate(&dvae, &images, 3)?;
    assert!(stats.mse.is_finite() && stats.codebook.used >= 1);
    Ok(())
}

#[test]
fn schedules_have_the_documented_shape() {
    let cfg = GumbelConfig {
        kl_weight: 0.5,
        kl_warmup_steps: 20,
        ..Default::default()
    };
    assert!((cfg.temperature(0, 100) - 1.0).abs() < 1e-12);
    assert!((cfg.temperature(100, 100) - 1.0 / 16.0).abs() < 1e-12);
    assert!((cfg.temperature(50, 100) - 0.25).abs() < 1e-12); // geometric midpoint
    assert!((cfg.kl_weight_at(10) - 0.25).abs() < 1e-12);
    assert!((cfg.kl_weight_at(40) - 0.5).abs() < 1e-12);
    assert!(GumbelConfig {
        tau_end: 0.0,
        ..cfg
    }
    .validate("t")
    .is_err());
}
