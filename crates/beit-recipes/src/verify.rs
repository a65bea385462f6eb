//! `beit-cli verify`: the parity fixtures on any device and precision. Each fixture directory
//! (`fixtures/model/*`, `fixtures/family/*`, named `model/mim_shared` etc.: a small random model saved by `transformers` or timm,
//! with its input and the output that library computed, `expected.safetensors`) is loaded, run
//! on its committed input, and compared with the committed output: the largest absolute error and
//! whether every row's five largest outputs are the same five.
//!
//! In f32 a fixture passes at a max abs error <= 1e-4 (the Rust parity tests' bound). In bf16 the
//! model runs with its matrix products in bf16 ([`beit_model::kernels::with_matmul_dtype`], the
//! mixed precision of training) and passes when the top five logits agree (features, which have
//! no ranking: when the error is within 2^-6 of their largest magnitude); its error is reported.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use beit_model::kernels::with_matmul_dtype;
use beit_model::load::{Architecture, Checkpoint};
use beit_model::{BeitConfig, ForwardOptions};
use candle::{DType, Device, Tensor};
use serde::Serialize;

/// The f32 bound of a fixture's max abs error.
pub const F32_TOLERANCE: f32 = 1e-4;

/// The bf16 bound of a feature output's max abs error, relative to its largest magnitude: 2^-6,
/// four roundings to bf16's 8 significant bits.
pub const BF16_FEATURE_TOLERANCE: f32 = 1.0 / 64.0;

/// The comparison of one fixture model's output with the committed one.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyRecord {
    /// Always `verify`.
    pub kind: &'static str,
    /// The fixture directory relative to the fixtures root, e.g. `model/mim_shared`.
    pub name: String,
    /// The output compared: `logits` or `last_hidden_state`.
    pub output: &'static str,
    /// The device it ran on.
    pub device: String,
    /// `f32` or `bf16`.
    pub dtype: String,
    /// Largest absolute difference from the committed output.
    pub max_abs_err: f32,
    /// Whether every row's five largest logits are the committed ones (none for features).
    pub top5_equal: Option<bool>,
    /// f32: `max_abs_err <= 1e-4`; bf16: `top5_equal`, or for features (no ranking) a max abs
    /// error within [`BF16_FEATURE_TOLERANCE`] of the committed output's largest magnitude.
    pub pass: bool,
}

/// Every fixture under `root` (directories holding `expected.safetensors`, searched two levels
/// deep), in name order.
pub fn fixture_dirs(root: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut stack = vec![(root.to_path_buf(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        if dir.join("expected.safetensors").is_file() && dir.join("config.json").is_file() {
            found.push(dir);
            continue;
        }
        if depth == 2 {
            continue;
        }
        let entries = std::fs::read_dir(&dir)
            .with_context(|| format!("cannot read the fixtures directory {}", dir.display()))?;
        for e in entries {
            let p = e?.path();
            if p.is_dir() {
                stack.push((p, depth + 1));
            }
        }
    }
    if found.is_empty() {
        bail!(
            "no fixture (a directory with config.json and expected.safetensors) under {}",
            root.display()
        );
    }
    found.sort();
    Ok(found)
}

/// Verify every fixture under `root` on `device` in `dtype` (f32 or bf16).
pub fn verify_fixtures(root: &Path, device: &Device, dtype: &str) -> Result<Vec<VerifyRecord>> {
    let matmul = match dtype {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => bail!("unknown `--dtype {other}`: expected f32 or bf16"),
    };
    fixture_dirs(root)?
        .iter()
        .map(|dir| {
            let name = fixture_name(dir);
            let (output, got, want) = with_matmul_dtype(matmul, || run_fixture(dir, device))
                .with_context(|| format!("fixture {}", dir.display()))?;
            let max_abs_err = (got.to_device(&Device::Cpu)? - &want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            let top5_equal = match output {
                "logits" => Some(same_top5(&got, &want)?),
                _ => None,
            };
            let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            let pass = match (matmul, top5_equal) {
                (DType::F32, _) => max_abs_err <= F32_TOLERANCE,
                (_, Some(top5)) => top5,
                (_, None) => max_abs_err <= BF16_FEATURE_TOLERANCE * scale,
            };
            Ok(VerifyRecord {
                kind: "verify",
                name,
                output,
                device: format!("{device:?}"),
                dtype: dtype.to_string(),
                max_abs_err,
                top5_equal,
                pass,
            })
        })
        .collect()
}

/// `family/timm_beit` for `.../fixtures/family/timm_beit`: the directory and its parent's name.
fn fixture_name(dir: &Path) -> String {
    let name = |p: Option<&Path>| {
        p.and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    format!("{}/{}", name(dir.parent()), name(Some(dir)))
}

/// Load the fixture in `dir`, run its input; the output's name, the output and the committed one.
fn run_fixture(dir: &Path, device: &Device) -> Result<(&'static str, Tensor, Tensor)> {
    let exp: HashMap<String, Tensor> =
        candle::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).with_context(
            || format!("cannot read {}", dir.join("expected.safetensors").display()),
        )?;
    let input = |key: &str| -> Result<Tensor> {
        let t = exp
            .get(key)
            .with_context(|| format!("expected.safetensors has no `{key}`"))?;
        Ok(t.to_device(device)?)
    };
    let ckpt = load(dir)?;
    let pixels = input("pixel_values")?;
    let opts = ForwardOptions::default();
    let (output, got) = match ckpt.architecture() {
        Architecture::ImageClassification => (
            "logits",
            ckpt.classifier(device)?.forward(&pixels, opts)?.logits,
        ),
        Architecture::MaskedImageModeling => {
            let mask = input("bool_masked_pos")?;
            let out = ckpt.mim(device)?.forward(&pixels, Some(&mask), opts)?;
            ("logits", out.logits)
        }
        Architecture::Backbone => {
            let out = ckpt.backbone(device)?.forward(&pixels, None, opts)?;
            ("last_hidden_state", out.last_hidden_state)
        }
    };
    let want = exp
        .get(output)
        .with_context(|| format!("expected.safetensors has no `{output}`"))?
        .clone();
    if got.dims() != want.dims() {
        bail!(
            "{output} is {:?}, the fixture's {:?}",
            got.dims(),
            want.dims()
        );
    }
    Ok((output, got.to_dtype(DType::F32)?, want))
}

/// The checkpoint of a fixture directory: its own layout, or `config.json` with
/// `model.safetensors` (a timm/unilm key layout that `from_dir` does not recognise by name).
fn load(dir: &Path) -> Result<Checkpoint> {
    match Checkpoint::from_dir(dir) {
        Ok(c) => Ok(c),
        Err(first) => {
            let config = BeitConfig::from_file(dir.join("config.json"))?;
            Checkpoint::from_files(config, &dir.join("model.safetensors"))
                .with_context(|| format!("{first}"))
        }
    }
}

/// Whether every row (last dimension) of `a` and `b` has the same five largest entries (as a set;
/// all of them when a row is shorter).
fn same_top5(a: &Tensor, b: &Tensor) -> Result<bool> {
    let width = *a.dims().last().context("a scalar output")?;
    let rows = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let (a, b) = (rows(a)?, rows(b)?);
    Ok(a.chunks(width)
        .zip(b.chunks(width))
        .all(|(x, y)| top5(x) == top5(y)))
}

fn top5(row: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&i, &j| row[j].total_cmp(&row[i]));
    idx.truncate(5);
    idx.sort_unstable();
    idx
}
