//! Export in HF layout and load back: identical logits; and an ignored check at full base size.

use std::path::Path;

use anyhow::Result;
use beit_model::load::{Architecture, Checkpoint};
use beit_model::save::save_hf;
use beit_model::ForwardOptions;
use candle::Device;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/model")
        .join(name)
}

#[test]
fn export_round_trips_with_identical_logits() -> Result<()> {
    for (name, arch) in [
        ("cls_per_layer", Architecture::ImageClassification),
        ("mim_shared", Architecture::MaskedImageModeling),
    ] {
        let src = Checkpoint::from_dir(fixture(name))?;
        let tmp = tempfile::tempdir()?;
        save_hf(tmp.path(), &src.config, arch, &src.tensors)?;
        let back = Checkpoint::from_dir(tmp.path())?;
        assert_eq!(back.config, {
            let mut c = src.config.clone();
            c.extra = back.config.extra.clone();
            c
        });
        assert_eq!(back.architecture(), arch);
        let exp =
            candle::safetensors::load(fixture(name).join("expected.safetensors"), &Device::Cpu)?;
        let x = &exp["pixel_values"];
        let (a, b) = match arch {
            Architecture::MaskedImageModeling => {
                let m = Some(&exp["bool_masked_pos"]);
                (
                    src.mim(&Device::Cpu)?
                        .forward(x, m, ForwardOptions::default())?
                        .logits,
                    back.mim(&Device::Cpu)?
                        .forward(x, m, ForwardOptions::default())?
                        .logits,
                )
            }
            _ => (
                src.classifier(&Device::Cpu)?
                    .forward(x, ForwardOptions::default())?
                    .logits,
                back.classifier(&Device::Cpu)?
                    .forward(x, ForwardOptions::default())?
                    .logits,
            ),
        };
        let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "{name}: exported model differs");
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(tmp.path())?
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
    Ok(())
}

/// Full-size base models: `python scripts/fixtures/model_fixtures.py --base DIR`, then
/// `BEIT_BASE_FIXTURES=DIR cargo test -p beit-model --release --test save_load -- --ignored --nocapture`.
#[test]
#[ignore = "needs full-size fixtures made by scripts/fixtures/model_fixtures.py --base"]
fn base_size_parity() -> Result<()> {
    let root = std::env::var("BEIT_BASE_FIXTURES").expect("set BEIT_BASE_FIXTURES");
    for name in ["base_mim", "base_cls"] {
        let dir = Path::new(&root).join(name);
        let ckpt = Checkpoint::from_dir(&dir)?;
        let exp = candle::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)?;
        let opts = ForwardOptions {
            output_hidden_states: true,
            ..Default::default()
        };
        let (logits, last) = if name == "base_mim" {
            let out = ckpt.mim(&Device::Cpu)?.forward(
                &exp["pixel_values"],
                Some(&exp["bool_masked_pos"]),
                opts,
            )?;
            (out.logits, out.backbone.hidden_states[12].clone())
        } else {
            let out = ckpt
                .classifier(&Device::Cpu)?
                .forward(&exp["pixel_values"], opts)?;
            (out.logits, out.backbone.hidden_states[12].clone())
        };
        let e = (logits - &exp["logits"])?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        let h = (last - &exp["hidden_states.12"])?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        println!("{name}: logits max abs err {e:.2e}, last hidden state max abs err {h:.2e}");
        assert!(e <= 1e-4 && h <= 1e-4);
    }
    Ok(())
}

/// Writes our exports for `scripts/fixtures/model_fixtures.py --check-export DIR/<name>` (transformers must
/// load them and reproduce the logits): `BEIT_EXPORT_DIR=DIR cargo test -p beit-model --test
/// save_load -- --ignored export_for_transformers`.
#[test]
#[ignore = "writes exports for the Python round-trip check"]
fn export_for_transformers() -> Result<()> {
    let root =
        std::path::PathBuf::from(std::env::var("BEIT_EXPORT_DIR").expect("set BEIT_EXPORT_DIR"));
    for (name, arch) in [
        ("cls_per_layer", Architecture::ImageClassification),
        ("mim_shared", Architecture::MaskedImageModeling),
        ("abs_pos_cls_pool", Architecture::ImageClassification),
    ] {
        let src = Checkpoint::from_dir(fixture(name))?;
        let out = root.join(name);
        save_hf(&out, &src.config, arch, &src.tensors)?;
        std::fs::copy(
            fixture(name).join("expected.safetensors"),
            out.join("expected.safetensors"),
        )?;
    }
    Ok(())
}
