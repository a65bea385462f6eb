//! Reading pickled whole modules (`torch.save(module)`, the form of OpenAI's `encoder.pkl`).

use std::path::{Path, PathBuf};

use anyhow::Result;
use beit_tokenizer::pkl::load_dalle_pkl;
use beit_tokenizer::weights::WeightsFile;
use beit_tokenizer::{Encoder, EncoderConfig};
use candle::Device;

fn fixture(name: &str) -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/tokenizer"
    ))
    .join(name)
}

#[test]
fn zip_pickle_of_whole_encoder_equals_its_state_dict() -> Result<()> {
    let from_pkl = load_dalle_pkl(&fixture("dalle_small_encoder.pkl"))?;
    let reference =
        candle::safetensors::load(fixture("dalle_small_encoder.safetensors"), &Device::Cpu)?;
    let mut a: Vec<&String> = from_pkl.keys().collect();
    let mut b: Vec<&String> = reference.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    for (name, t) in &reference {
        let p = &from_pkl[name];
        assert_eq!(p.dims(), t.dims(), "{name}");
        let diff = (p - t)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "{name}");
    }
    // And it loads as an encoder.
    let weights = WeightsFile::from_tensors(fixture("dalle_small_encoder.pkl"), from_pkl);
    let enc = Encoder::from_weights(&weights)?;
    assert_eq!(enc.config().vocab_size, 512);
    assert_eq!(EncoderConfig::infer(&weights)?.n_hid, 16);
    Ok(())
}

#[test]
fn legacy_pickle_is_read_too() -> Result<()> {
    let from_pkl = load_dalle_pkl(&fixture("legacy_block.pkl"))?;
    let expected = candle::safetensors::load(fixture("expected.safetensors"), &Device::Cpu)?;
    let mut n = 0;
    for (key, want) in &expected {
        let Some(name) = key.strip_prefix("legacy_block.") else {
            continue;
        };
        let got = from_pkl
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing"));
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "{name}");
        n += 1;
    }
    assert_eq!(n, from_pkl.len());
    assert!(from_pkl.contains_key("res_path.conv_1.w") && from_pkl.contains_key("id_path.b"));
    Ok(())
}

#[test]
fn non_pickles_are_rejected_with_the_path() -> Result<()> {
    let err = load_dalle_pkl(&fixture("dalle_small.json"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("dalle_small.json"), "{err}");
    Ok(())
}
