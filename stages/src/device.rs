//! Which device a stage computes on: the `device:` setting (`auto`, `cpu`, `cuda`, `cuda:N`).
//!
//! Like `executor:` it is not part of a stage's key: a result is the same computation wherever
//! it ran (up to floating-point order), so a result computed on a GPU is reused on a laptop.
//! With the `candle` feature, [`DeviceChoice::open`] turns the choice into a candle device and
//! says plainly when CUDA was asked for but is not built in or not there.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The `device:` setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum DeviceChoice {
    /// The first CUDA device when sdpipe was built with CUDA and one is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// CUDA device N (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl DeviceChoice {
    /// The accepted spellings, for help texts.
    pub const FORMS: &'static str = "auto, cpu, cuda or cuda:N";

    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        match t {
            "auto" => return Ok(DeviceChoice::Auto),
            "cpu" => return Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => return Ok(DeviceChoice::Cuda(0)),
            _ => {}
        }
        let ordinal = t.strip_prefix("cuda:").or_else(|| t.strip_prefix("gpu:"));
        match ordinal.map(|n| n.parse::<usize>()) {
            Some(Ok(n)) if n < 1024 => Ok(DeviceChoice::Cuda(n)),
            _ => Err(format!("`{text}` is not a device: write {}", Self::FORMS)),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        DeviceChoice::parse(s)
    }
}

// As the text a pipeline file holds, so a job file reads like the pipeline.
impl Serialize for DeviceChoice {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceChoice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        DeviceChoice::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(feature = "candle")]
mod open {
    use super::DeviceChoice;
    use crate::api::StageError;
    use candle_core::Device;

    /// Why a CUDA device could not be opened.
    fn cuda_error(ordinal: usize, cause: candle_core::Error) -> StageError {
        if !candle_core::utils::cuda_is_available() {
            return StageError::failed(format!(
                "`device: cuda:{ordinal}` but this sdpipe was built without CUDA: rebuild with \
                 `cargo build --release --features cuda`, or set `device: cpu`"
            ));
        }
        StageError::failed(format!(
            "`device: cuda:{ordinal}`: cannot open the GPU ({cause}); check `nvidia-smi`, or \
             set `device: cpu`"
        ))
    }

    impl DeviceChoice {
        /// The candle device this choice names. `auto` never fails: it falls back to the CPU
        /// when CUDA is not built in or no GPU opens.
        pub fn open(self) -> Result<Device, StageError> {
            match self {
                DeviceChoice::Cpu => Ok(Device::Cpu),
                DeviceChoice::Cuda(n) => Device::new_cuda(n).map_err(|e| cuda_error(n, e)),
                DeviceChoice::Auto if candle_core::utils::cuda_is_available() => {
                    Ok(Device::new_cuda(0).unwrap_or(Device::Cpu))
                }
                DeviceChoice::Auto => Ok(Device::Cpu),
            }
        }
    }

    /// A device as a person reads it in a stage's log: `cpu`, `cuda:0`.
    pub fn describe(device: &Device) -> String {
        match device.location() {
            candle_core::DeviceLocation::Cpu => "cpu".into(),
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        }
    }
}

#[cfg(feature = "candle")]
pub use open::describe;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_form_parses() {
        assert_eq!(DeviceChoice::parse("auto"), Ok(DeviceChoice::Auto));
        assert_eq!(DeviceChoice::parse("cpu"), Ok(DeviceChoice::Cpu));
        assert_eq!(DeviceChoice::parse("cuda"), Ok(DeviceChoice::Cuda(0)));
        assert_eq!(DeviceChoice::parse("cuda:3"), Ok(DeviceChoice::Cuda(3)));
    }

    #[test]
    fn anything_else_is_refused_with_the_forms() {
        for bad in ["", "CUDA", "cuda:", "cuda:-1", "cuda:x", "tpu", "cuda:99999999999999999999"] {
            let message = DeviceChoice::parse(bad).unwrap_err();
            assert!(message.contains(DeviceChoice::FORMS), "{bad:?}: {message}");
        }
    }

    #[test]
    fn a_choice_round_trips_through_its_text() {
        for choice in [DeviceChoice::Auto, DeviceChoice::Cpu, DeviceChoice::Cuda(2)] {
            let json = serde_json::to_string(&choice).unwrap();
            assert_eq!(serde_json::from_str::<DeviceChoice>(&json).unwrap(), choice);
        }
    }

    #[cfg(feature = "candle")]
    #[test]
    fn auto_and_cpu_always_open() {
        assert!(DeviceChoice::Cpu.open().unwrap().is_cpu());
        DeviceChoice::Auto.open().unwrap();
    }

    #[cfg(feature = "candle")]
    #[test]
    fn cuda_without_a_cuda_build_says_how_to_get_one() {
        if candle_core::utils::cuda_is_available() {
            return; // a CUDA build: the refusal under test cannot happen
        }
        let message = DeviceChoice::Cuda(0).open().unwrap_err().to_string();
        assert!(message.contains("--features cuda"), "{message}");
    }
}
