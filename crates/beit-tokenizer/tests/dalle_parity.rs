//! Parity of the DALL-E encoder/decoder port with OpenAI's `dall_e` package.
//!
//! Fixtures from `scripts/fixtures/tokenizer_fixtures.py`: a small random-initialised `dall_e` encoder and
//! decoder (n_hid 16, vocabulary 512, 4 groups x 2 blocks, perturbed biases) in safetensors with
//! `dall_e`'s names, real photo crops, and the logits / ids / decoder outputs PyTorch computed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use beit_tokenizer::pixels::{image_to_tensor, map_pixels, open_image};
use beit_tokenizer::{Decoder, Encoder, VisualTokenizer};
use candle::{DType, Device, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/tokenizer"
    ))
    .join(name)
}

fn expected() -> Result<HashMap<String, Tensor>> {
    Ok(candle::safetensors::load(
        fixture("expected.safetensors"),
        &Device::Cpu,
    )?)
}

/// max |a - b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(diff / scale)
}

fn load_image(name: &str) -> Result<Tensor> {
    let img = open_image(&fixture(&format!("images/{name}.png")))?.to_rgb8();
    Ok(map_pixels(
        &image_to_tensor(&img, 3, &Device::Cpu)?.unsqueeze(0)?,
    )?)
}

#[test]
fn encoder_matches_dall_e_logits_and_ids() -> Result<()> {
    let enc = Encoder::load(&fixture("dalle_small_encoder.safetensors"), &Device::Cpu)?;
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("dalle_small.json"))?)?;
    let cfg = enc.config();
    assert_eq!(cfg.n_hid as u64, json["n_hid"].as_u64().unwrap());
    assert_eq!(cfg.vocab_size as u64, json["vocab_size"].as_u64().unwrap());
    assert_eq!(
        cfg.n_blk_per_group as u64,
        json["n_blk_per_group"].as_u64().unwrap()
    );
    assert_eq!(
        (cfg.group_count, enc.input_size(), enc.downsample()),
        (4, 112, 8)
    );
    let exp = expected()?;
    for (name, side) in [("chelsea_112", 14), ("astronaut_112", 14), ("coffee_64", 8)] {
        let x = load_image(name)?;
        let logits = enc.forward(&x)?.squeeze(0)?;
        let want = &exp[&format!("{name}.logits")];
        assert_eq!(logits.dims(), want.dims());
        let err = rel_err(&logits, want)?;
        eprintln!("{name}: encoder logits max rel err {err:.3e}");
        assert!(err <= 1e-4, "{name}: relative error {err}");
        let ids = enc.tokenize(&x)?.squeeze(0)?;
        assert_eq!(ids.dims(), &[side, side]);
        let want_ids = exp[&format!("{name}.ids")].to_dtype(DType::U32)?;
        let mismatches = ids
            .ne(&want_ids)?
            .to_dtype(DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()?;
        assert_eq!(mismatches, 0, "{name}: {mismatches} token ids differ");
    }
    Ok(())
}

#[test]
fn decoder_matches_dall_e_outputs() -> Result<()> {
    let dec = Decoder::load(&fixture("dalle_small_decoder.safetensors"), &Device::Cpu)?;
    assert_eq!(
        (
            dec.config().n_init,
            dec.config().vocab_size,
            dec.config().output_channels
        ),
        (32, 512, 3)
    );
    let exp = expected()?;
    let ids = exp["chelsea_112.ids"].to_dtype(DType::U32)?.unsqueeze(0)?;
    let want = &exp["chelsea_112.decoder_out"];
    let by_ids = dec.forward_ids(&ids)?.squeeze(0)?;
    let err = rel_err(&by_ids, want)?;
    eprintln!("chelsea_112: decoder output (ids) max rel err {err:.3e}");
    assert!(err <= 1e-4, "decoder from ids: {err}");
    // The same through the one-hot path used in training.
    let one_hot = ids
        .unsqueeze(1)?
        .broadcast_eq(&Tensor::arange(0u32, 512, &Device::Cpu)?.reshape((1, 512, 1, 1))?)?
        .to_dtype(DType::F32)?;
    let err = rel_err(&dec.forward(&one_hot)?.squeeze(0)?, want)?;
    eprintln!("chelsea_112: decoder output (one-hot) max rel err {err:.3e}");
    assert!(err <= 1e-4, "decoder from one-hot: {err}");
    let recon = dec.reconstruct(&ids)?.squeeze(0)?;
    let diff = (recon - &exp["chelsea_112.recon"])?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    eprintln!("chelsea_112: reconstruction max abs err {diff:.3e}");
    assert!(diff <= 1e-5, "reconstruction: {diff}");
    Ok(())
}

#[test]
fn bad_inputs_are_clear_errors() -> Result<()> {
    let enc = Encoder::load(&fixture("dalle_small_encoder.safetensors"), &Device::Cpu)?;
    let err = enc
        .forward(&Tensor::zeros((1, 3, 100, 100), DType::F32, &Device::Cpu)?)
        .unwrap_err()
        .to_string();
    assert!(err.contains("multiples of 8"), "{err}");
    // A decoder file is not an encoder: the missing/mismatched tensor is named with the file.
    let err = Encoder::load(&fixture("dalle_small_decoder.safetensors"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("dalle_small_decoder.safetensors"), "{err}");
    let dec = Decoder::load(&fixture("dalle_small_decoder.safetensors"), &Device::Cpu)?;
    let bad_ids = Tensor::full(600u32, (1, 2, 2), &Device::Cpu)?;
    let err = dec.forward_ids(&bad_ids).unwrap_err().to_string();
    assert!(err.contains("600"), "{err}");
    let err = Encoder::load(Path::new("/nonexistent/enc.safetensors"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/enc.safetensors"), "{err}");
    Ok(())
}

/// The full-size DALL-E encoder (53.8M parameters): run
/// `scripts/fixtures/tokenizer_fixtures.py --full DIR` and `BEIT_DALLE_FULL_DIR=DIR cargo test -p
/// beit-tokenizer --release -- --ignored full_size`.
#[test]
#[ignore = "needs the 215 MB full-size encoder made by scripts/fixtures/tokenizer_fixtures.py --full"]
fn full_size_encoder_matches() -> Result<()> {
    let dir = PathBuf::from(std::env::var("BEIT_DALLE_FULL_DIR")?);
    let enc = Encoder::load(&dir.join("dalle_full_encoder.safetensors"), &Device::Cpu)?;
    assert_eq!(enc.config(), &beit_tokenizer::EncoderConfig::default());
    let exp = candle::safetensors::load(dir.join("dalle_full_expected.safetensors"), &Device::Cpu)?;
    let x = load_image("chelsea_112")?;
    let logits = enc.forward(&x)?.squeeze(0)?;
    assert_eq!(logits.dims(), &[8192, 14, 14]);
    let err = rel_err(&logits, &exp["logits"])?;
    let ids = enc.tokenize(&x)?.squeeze(0)?;
    let same = ids
        .eq(&exp["ids"].to_dtype(DType::U32)?)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()?;
    eprintln!("full-size encoder: logits max rel err {err:.3e}, {same}/196 ids equal");
    assert!(err <= 1e-4);
    assert_eq!(same, 196);
    Ok(())
}
