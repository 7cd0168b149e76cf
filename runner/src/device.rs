//! Where inference runs: the CPU by default, CUDA or Metal when this build has them.
//!
//! CUDA and Metal are cargo features (`cuda`, `metal`) passed through to candle; asking for a device
//! this build lacks is an error that names the feature to build with.

use std::fmt;
use std::str::FromStr;

use attest::policy::rules::DeviceKind;
use attest::policy::{Rules, Violation};
pub use candle_core::Device;

/// The device asked for on the command line or in a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA when built in and present, else Metal when built in and present, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// One CUDA GPU, by ordinal.
    Cuda(usize),
    /// The Metal GPU.
    Metal,
}

/// Why a device could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// Not a device name.
    #[error("unknown device {0:?}: use auto, cpu, cuda, cuda:N or metal")]
    Unknown(String),
    /// The device's backend was not compiled into this build.
    #[error(
        "this sanctum was built without {backend} support: rebuild with `cargo build --release --features {feature}`"
    )]
    NotBuilt {
        /// `CUDA` or `Metal`.
        backend: &'static str,
        /// The cargo feature that adds it.
        feature: &'static str,
    },
    /// The policy does not allow the device (`devices.allow`).
    #[error(transparent)]
    Policy(#[from] Violation),
    /// The backend is built in but the device could not be opened.
    #[error("cannot open {device}: {source}")]
    Open {
        /// The device asked for.
        device: String,
        /// candle's reason.
        source: candle_core::Error,
    },
}

impl DeviceError {
    /// True when the policy said no, rather than the device failing.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Policy(_))
    }
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            "metal" => Ok(Self::Metal),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| DeviceError::Unknown(s.to_owned())),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal => f.write_str("metal"),
        }
    }
}

impl DeviceChoice {
    /// The device family, for the policy's `devices.allow`; None for `Auto`.
    fn kind(self) -> Option<DeviceKind> {
        match self {
            Self::Auto => None,
            Self::Cpu => Some(DeviceKind::Cpu),
            Self::Cuda(_) => Some(DeviceKind::Cuda),
            Self::Metal => Some(DeviceKind::Metal),
        }
    }

    /// Opens the device, if `rules` allow it. `Auto` tries only the allowed devices and falls back
    /// to the CPU; it fails only when the CPU is not allowed and no allowed GPU opens.
    pub fn open(self, rules: &Rules) -> Result<Device, DeviceError> {
        if let Some(kind) = self.kind() {
            rules.check_device(kind, &self.to_string())?;
        }
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => {
                if cfg!(feature = "cuda")
                    && rules.allows_device(DeviceKind::Cuda)
                    && candle_core::utils::cuda_is_available()
                    && let Ok(device) = Device::new_cuda(0)
                {
                    return Ok(device);
                }
                if cfg!(feature = "metal")
                    && rules.allows_device(DeviceKind::Metal)
                    && candle_core::utils::metal_is_available()
                    && let Ok(device) = Device::new_metal(0)
                {
                    return Ok(device);
                }
                rules.check_device(DeviceKind::Cpu, "the CPU (no allowed GPU could be opened)")?;
                Ok(Device::Cpu)
            }
            Self::Cuda(ordinal) => {
                if !cfg!(feature = "cuda") {
                    return Err(DeviceError::NotBuilt {
                        backend: "CUDA",
                        feature: "cuda",
                    });
                }
                Device::new_cuda(ordinal).map_err(|source| DeviceError::Open {
                    device: self.to_string(),
                    source,
                })
            }
            Self::Metal => {
                if !cfg!(feature = "metal") {
                    return Err(DeviceError::NotBuilt {
                        backend: "Metal",
                        feature: "metal",
                    });
                }
                Device::new_metal(0).map_err(|source| DeviceError::Open {
                    device: self.to_string(),
                    source,
                })
            }
        }
    }
}

/// A short name for an opened device: `cpu`, `cuda:0`, `metal:0`.
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_owned(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Physical CPU cores (not hyper-threads): the default thread count, since candle's kernels gain
/// nothing from sibling threads and its thread pool spins while waiting.
pub fn physical_cores() -> usize {
    num_cpus::get_physical().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!(
            "auto".parse::<DeviceChoice>().ok(),
            Some(DeviceChoice::Auto)
        );
        assert_eq!("cpu".parse::<DeviceChoice>().ok(), Some(DeviceChoice::Cpu));
        assert_eq!(
            "cuda".parse::<DeviceChoice>().ok(),
            Some(DeviceChoice::Cuda(0))
        );
        assert_eq!(
            "cuda:3".parse::<DeviceChoice>().ok(),
            Some(DeviceChoice::Cuda(3))
        );
        assert_eq!(
            "metal".parse::<DeviceChoice>().ok(),
            Some(DeviceChoice::Metal)
        );
        assert!("gpu".parse::<DeviceChoice>().is_err());
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_names_the_feature() {
        let err = DeviceChoice::Cuda(0).open(&Rules::default()).unwrap_err();
        assert!(err.to_string().contains("--features cuda"), "{err}");
    }

    #[test]
    fn auto_opens_something() {
        assert!(DeviceChoice::Auto.open(&Rules::default()).is_ok());
    }

    fn allowing(devices: &[DeviceKind]) -> Rules {
        Rules {
            devices: attest::policy::rules::DeviceRules {
                allow: Some(devices.to_vec()),
            },
            ..Rules::default()
        }
    }

    #[test]
    fn the_policy_decides_which_devices_open() {
        let cpu_only = allowing(&[DeviceKind::Cpu]);
        assert!(DeviceChoice::Cpu.open(&cpu_only).is_ok());
        assert!(matches!(
            DeviceChoice::Auto.open(&cpu_only),
            Ok(Device::Cpu)
        ));
        for asked in [DeviceChoice::Cuda(1), DeviceChoice::Metal] {
            let err = DeviceChoice::open(asked, &cpu_only).unwrap_err();
            assert!(
                matches!(&err, DeviceError::Policy(v) if v.rule == "devices.allow"),
                "{err}"
            );
        }
        let gpu_only = allowing(&[DeviceKind::Cuda, DeviceKind::Metal]);
        let err = DeviceChoice::Cpu.open(&gpu_only).unwrap_err();
        assert!(err.to_string().contains("devices.allow"), "{err}");
        if !candle_core::utils::cuda_is_available() && !candle_core::utils::metal_is_available() {
            let err = DeviceChoice::Auto.open(&gpu_only).unwrap_err();
            assert!(err.to_string().contains("devices.allow"), "{err}");
        }
    }
}
