//! `--device cpu|cuda[:N]|metal[:N]` parsing shared by every command that runs a model.

use crate::distributed::World;
use anyhow::{bail, Context, Result};
use candle::Device;

/// A device as recipes and `--device` name it: `cpu` (the default), `cuda`, `cuda:N`, `metal`,
/// `metal:N` (any case). Checked when a recipe is read (a typo names the field), opened by
/// [`DeviceSpec::open`]; written back in lower case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU.
    #[default]
    Cpu,
    /// A CUDA GPU; without an index, the process's local rank in a data-parallel run, else 0.
    Cuda(Option<usize>),
    /// A Metal GPU; without an index as CUDA.
    Metal(Option<usize>),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;

    fn from_str(spec: &str) -> std::result::Result<Self, String> {
        let spec = spec.trim().to_ascii_lowercase();
        let (kind, ordinal) = match spec.split_once(':') {
            Some((k, n)) => {
                let n: usize = n
                    .parse()
                    .map_err(|_| format!("invalid device ordinal in `--device {spec}`"))?;
                (k, Some(n))
            }
            None => (spec.as_str(), None),
        };
        match (kind, ordinal) {
            ("cpu", _) => Ok(Self::Cpu),
            ("cuda", n) => Ok(Self::Cuda(n)),
            ("metal", n) => Ok(Self::Metal(n)),
            (other, _) => Err(format!(
                "unknown device `{other}`: expected cpu, cuda[:N] or metal[:N]"
            )),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(None) => write!(f, "cuda"),
            Self::Cuda(Some(n)) => write!(f, "cuda:{n}"),
            Self::Metal(None) => write!(f, "metal"),
            Self::Metal(Some(n)) => write!(f, "metal:{n}"),
        }
    }
}

impl serde::Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl DeviceSpec {
    /// Open the device of a single process ([`DeviceSpec::open_in`] a single-process world).
    pub fn open(self) -> Result<Device> {
        self.open_in(&World::default())
    }

    /// Open the device for this process of `world`: a GPU without an ordinal is the one of the
    /// process's local rank. A GPU in a binary built without the matching cargo feature is a clear
    /// error naming the feature to enable.
    pub fn open_in(self, world: &World) -> Result<Device> {
        let local = || world.local_rank();
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => {
                if !candle::utils::cuda_is_available() {
                    bail!("`--device {self}`: this binary was built without CUDA; rebuild with `--features cuda`");
                }
                let ordinal = n.unwrap_or_else(local);
                Device::new_cuda(ordinal)
                    .with_context(|| format!("cannot open CUDA device {ordinal}"))
            }
            Self::Metal(n) => {
                if !candle::utils::metal_is_available() {
                    bail!("`--device {self}`: this binary was built without Metal; rebuild with `--features metal`");
                }
                let ordinal = n.unwrap_or_else(local);
                Device::new_metal(ordinal)
                    .with_context(|| format!("cannot open Metal device {ordinal}"))
            }
        }
    }
}

/// Turn a `--device` string into a candle [`Device`] ([`DeviceSpec`], then
/// [`DeviceSpec::open`]).
pub fn parse_device(spec: &str) -> Result<Device> {
    spec.parse::<DeviceSpec>()
        .map_err(anyhow::Error::msg)?
        .open()
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

    #[test]
    fn specs_round_trip_through_recipes() {
        for s in ["cpu", "cuda", "cuda:1", "metal:0"] {
            let d: DeviceSpec = s.parse().unwrap();
            assert_eq!(d.to_string(), s);
        }
        assert_eq!(
            "CUDA:2".parse::<DeviceSpec>(),
            Ok(DeviceSpec::Cuda(Some(2)))
        );
        assert!("tpu".parse::<DeviceSpec>().is_err());
    }
}
