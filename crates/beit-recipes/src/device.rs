//! `--device cpu|cuda[:N]|metal[:N]` parsing shared by every command that runs a model.

use anyhow::{bail, Context, Result};
use candle::Device;

/// Turn a `--device` string into a candle [`Device`].
///
/// `cpu`, `cuda`, `cuda:N`, `metal`, `metal:N`. Without an index a GPU is the process's local rank
/// in a data-parallel run (one process per device: `cuda` is `cuda:<local rank>`), else 0. A GPU
/// device in a binary built without the matching cargo feature is a clear error naming the
/// feature to enable.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    let (kind, ordinal) = match spec.split_once(':') {
        Some((k, n)) => {
            let n: usize = n
                .parse()
                .with_context(|| format!("invalid device ordinal in `--device {spec}`"))?;
            (k.to_string(), n)
        }
        None => (spec.clone(), crate::distributed::world().local_rank()),
    };
    match kind.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if !candle::utils::cuda_is_available() {
                bail!("`--device {spec}`: this binary was built without CUDA; rebuild with `--features cuda`");
            }
            Device::new_cuda(ordinal).with_context(|| format!("cannot open CUDA device {ordinal}"))
        }
        "metal" => {
            if !candle::utils::metal_is_available() {
                bail!("`--device {spec}`: this binary was built without Metal; rebuild with `--features metal`");
            }
            Device::new_metal(ordinal)
                .with_context(|| format!("cannot open Metal device {ordinal}"))
        }
        other => bail!("unknown device `{other}`: expected cpu, cuda[:N] or metal[:N]"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_unknown() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("CPU").unwrap().is_cpu());
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("unknown device `tpu`"), "{err}");
        assert!(parse_device("cuda:x").is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_names_the_feature() {
        let err = parse_device("cuda:0").unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }
}
