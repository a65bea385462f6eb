//! Writing a model in Hugging Face layout (`config.json` + `model.safetensors`, HF key names), so that
//! `transformers`' `from_pretrained` and [`crate::load::Checkpoint::from_dir`] both load it.

use std::collections::HashMap;
use std::path::Path;

use candle::Tensor;
use candle_nn::VarMap;

use crate::config::BeitConfig;
use crate::error::{BeitError, Result};
use crate::load::{expected_parameters, Architecture};

/// Save `tensors` (HF names) and `cfg` under `dir`; only the parameters of `arch` are written.
/// Each file is written to a temporary name and renamed, so a crash never leaves a torn file.
pub fn save_hf(
    dir: &Path,
    cfg: &BeitConfig,
    arch: Architecture,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    let io = |path: &Path, source| BeitError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let expected = expected_parameters(cfg, arch)?;
    let mut out = HashMap::new();
    for name in expected.keys() {
        let t = tensors.get(name).ok_or_else(|| BeitError::Mismatch {
            source_name: "model being saved".into(),
            report: format!("  missing key `{name}`"),
        })?;
        out.insert(
            name.clone(),
            t.to_device(&candle::Device::Cpu)?.contiguous()?,
        );
    }
    let weights = dir.join("model.safetensors");
    let tmp = dir.join(".model.safetensors.tmp");
    candle::safetensors::save(&out, &tmp)?;
    std::fs::rename(&tmp, &weights).map_err(|e| io(&weights, e))?;
    let config = dir.join("config.json");
    let tmp = dir.join(".config.json.tmp");
    std::fs::write(&tmp, cfg.to_hf_json(arch.hf_class())?).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, &config).map_err(|e| io(&config, e))?;
    Ok(())
}

/// The tensors of a [`VarMap`] by name (detached copies of the current values).
pub fn varmap_tensors(varmap: &VarMap) -> HashMap<String, Tensor> {
    let vars = varmap.data().lock().expect("varmap lock");
    vars.iter()
        .map(|(k, v)| (k.clone(), v.as_detached_tensor()))
        .collect()
}
