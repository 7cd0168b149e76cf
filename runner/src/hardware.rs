//! Hardware profiles: what makes two benchmark results comparable.
//!
//! A profile (`hardware-profiles/*.toml`) names a machine class: CPU model, cores and threads, the
//! instruction sets sanctum's kernels dispatch on, memory size and measured bandwidth, GPU, OS and
//! the sanctum build features. [`detect`] reads the running machine into the same shape, and
//! [`mismatches`] says where a machine differs from a profile, so that `sanctum bench --profile`
//! refuses to file results under the wrong class.

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// One machine class, as `hardware-profiles/NAME.toml` describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareProfile {
    /// Short name (the file's stem by convention).
    pub name: String,
    /// What the class is, in words.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// `measured` when `results` were measured on this class, `not-measured` for a target profile
    /// shipped ahead of access to such a machine.
    pub status: ProfileStatus,
    /// Processor.
    pub cpu: CpuProfile,
    /// Main memory.
    pub memory: MemoryProfile,
    /// Accelerator, when the class has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuProfile>,
    /// Operating system family (`linux`, `macos`, `windows`).
    pub os: String,
    /// The sanctum build.
    pub build: BuildProfile,
    /// Results measured on this class (informative; `sanctum bench compare` works on result files).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<ProfileResult>,
}

/// Whether a profile's machine class has been measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProfileStatus {
    /// Results were measured on such a machine.
    Measured,
    /// A target shipped before anyone ran sanctum on it.
    NotMeasured,
}

/// The processor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuProfile {
    /// Marketing name as the OS reports it (`AMD EPYC`, `Apple M3 Pro`).
    pub model: String,
    /// Architecture (`x86_64`, `aarch64`).
    pub arch: String,
    /// Physical cores.
    pub cores: usize,
    /// Hardware threads.
    pub threads: usize,
    /// The instruction-set features sanctum's kernels care about that the CPU has, sorted; names
    /// as Rust's `is_x86_feature_detected!` / `is_aarch64_feature_detected!` spell them (AMX from
    /// CPUID: a process must still ask Linux for its tile state before using it).
    pub features: Vec<String>,
    /// Cache sizes of one core (L3: shared), informative: what tile sizes fit in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSizes>,
}

/// Data cache sizes in KiB, as the OS reports them for the first CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSizes {
    /// Level 1 data cache.
    pub l1d_kib: u64,
    /// Level 2.
    pub l2_kib: u64,
    /// Level 3, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l3_kib: Option<u64>,
}

/// Main memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryProfile {
    /// Total memory in GiB.
    pub total_gib: f64,
    /// Read bandwidth in GB/s with all cores streaming (informative: it varies from run to run, so
    /// it is not part of the match). Absent in a profile not yet measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_bandwidth_gbs: Option<f64>,
}

/// An accelerator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuProfile {
    /// Model name (`NVIDIA H100 80GB HBM3`, `Apple M3 Pro`).
    pub model: String,
    /// Memory in GiB (unified memory counts for Apple GPUs).
    pub memory_gib: f64,
}

/// The sanctum build that ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildProfile {
    /// Cargo features of the sanctum build, sorted (`cuda`, `inference`, `metal`).
    pub features: Vec<String>,
}

/// One measured figure recorded in a profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileResult {
    /// Model name from the lock.
    pub model: String,
    /// Weight format.
    pub quant: String,
    /// llama-bench's test name (`pp512`, `tg128`).
    pub test: String,
    /// CPU threads.
    pub threads: usize,
    /// sanctum's mean tokens per second.
    pub tokens_per_second: f64,
    /// llama.cpp's `llama-bench` on the same weights in the same sitting, when measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llama_cpp_tokens_per_second: Option<f64>,
}

/// A profile file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// It could not be read.
    #[error("cannot read hardware profile {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// It is not a profile.
    #[error("hardware profile {path} is malformed: {source}")]
    Parse {
        /// The file.
        path: String,
        /// What the TOML parser said.
        source: Box<toml::de::Error>,
    },
}

impl HardwareProfile {
    /// Reads and parses a profile file.
    pub fn read(path: &Path) -> Result<Self, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses the text of a profile file read from `path` (named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ProfileError> {
        toml::from_str(text).map_err(|source| ProfileError::Parse {
            path: path.display().to_string(),
            source: Box::new(source),
        })
    }

    /// The profile as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self)
            .unwrap_or_else(|e| unreachable!("a hardware profile always serializes: {e}"))
    }
}

/// Instruction sets the kernels (sanctum's, candle's, gemm's) dispatch on, as detected at run time.
fn isa_features() -> Vec<String> {
    let mut found: Vec<&str> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => { $( if std::arch::is_x86_feature_detected!($f) { found.push($f); } )* };
        }
        probe!(
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni",
            "avx512bf16",
            "avxvnni",
            "sha"
        );
        // `is_x86_feature_detected!` does not take AMX names on stable Rust: CPUID leaf 7 says.
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        for (bit, name) in [(22, "amx-bf16"), (24, "amx-tile"), (25, "amx-int8")] {
            if leaf7.edx & (1 << bit) != 0 {
                found.push(name);
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => { $( if std::arch::is_aarch64_feature_detected!($f) { found.push($f); } )* };
        }
        probe!("neon", "dotprod", "i8mm", "fp16", "bf16", "sha2", "sve");
    }
    let mut features: Vec<String> = found.into_iter().map(str::to_owned).collect();
    features.sort();
    features
}

/// The CPU's marketing name.
fn cpu_model() -> String {
    #[cfg(target_os = "linux")]
    if let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") {
        let name = info.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            matches!(key.trim(), "model name" | "Model" | "Hardware").then(|| value.trim())
        });
        if let Some(name) = name.filter(|n| !n.is_empty()) {
            return name.to_owned();
        }
    }
    #[cfg(target_os = "macos")]
    if let Some(name) = command_output("sysctl", &["-n", "machdep.cpu.brand_string"]) {
        return name;
    }
    format!("unknown {} CPU", std::env::consts::ARCH)
}

/// The first CPU's data cache sizes (Linux: sysfs), None where the OS does not say.
fn cache_sizes() -> Option<CacheSizes> {
    #[cfg(target_os = "linux")]
    {
        let (mut l1d, mut l2, mut l3) = (None, None, None);
        let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
        for entry in dir.flatten() {
            let read = |name: &str| std::fs::read_to_string(entry.path().join(name)).ok();
            let (Some(level), Some(kind), Some(size)) = (read("level"), read("type"), read("size"))
            else {
                continue;
            };
            let Some(kib) = size.trim().strip_suffix('K').and_then(|k| k.parse().ok()) else {
                continue;
            };
            match (level.trim(), kind.trim()) {
                ("1", "Data") => l1d = Some(kib),
                ("2", "Unified") => l2 = Some(kib),
                ("3", "Unified") => l3 = Some(kib),
                _ => {}
            }
        }
        Some(CacheSizes {
            l1d_kib: l1d?,
            l2_kib: l2?,
            l3_kib: l3,
        })
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Total memory in GiB, rounded to a tenth.
fn total_memory_gib() -> f64 {
    let bytes: Option<u64> = {
        #[cfg(target_os = "linux")]
        {
            proc_kib("/proc/meminfo", "MemTotal").map(|kib| kib * 1024)
        }
        #[cfg(target_os = "macos")]
        {
            command_output("sysctl", &["-n", "hw.memsize"]).and_then(|s| s.parse().ok())
        }
        #[cfg(not(any(target_os = "linux", target_os = "macos")))]
        {
            None
        }
    };
    bytes.map_or(0.0, |b| round1(b as f64 / (1u64 << 30) as f64))
}

/// A `Key:   N kB` field of a Linux `/proc` file (`/proc/meminfo`, `/proc/self/status`), in KiB.
/// The 1-, 5- and 15-minute load averages (`/proc/loadavg`; None elsewhere): a benchmark records
/// them at its start, since a busy neighbour changes every figure.
pub fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some([fields.next()??, fields.next()??, fields.next()??])
}

pub(crate) fn proc_kib(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?;
    value.trim().trim_end_matches("kB").trim().parse().ok()
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// The first line a command prints, when it runs and succeeds.
fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let line = text.lines().next()?.trim().to_owned();
    (out.status.success() && !line.is_empty()).then_some(line)
}

/// The NVIDIA GPU `nvidia-smi` reports first, if any.
fn nvidia_gpu() -> Option<GpuProfile> {
    let line = command_output(
        "nvidia-smi",
        &[
            "--query-gpu=name,memory.total",
            "--format=csv,noheader,nounits",
        ],
    )?;
    let (model, mib) = line.split_once(',')?;
    let mib: f64 = mib.trim().parse().ok()?;
    Some(GpuProfile {
        model: model.trim().to_owned(),
        memory_gib: round1(mib / 1024.0),
    })
}

/// Reads the running machine into a profile named `name` (default: [`default_name`]).
/// `build_features` are the cargo features of this sanctum build. With `measure_bandwidth`, streams
/// a 512 MiB buffer with every core to fill in the memory bandwidth (about a second).
pub fn detect(
    name: Option<&str>,
    build_features: &[&str],
    measure_bandwidth: bool,
) -> HardwareProfile {
    let model = cpu_model();
    let cores = num_cpus::get_physical();
    let name = name.map_or_else(|| default_name(&model, cores), str::to_owned);
    let memory_gib = total_memory_gib();
    let gpu = nvidia_gpu().or_else(|| {
        // Apple GPUs share the SoC's name and its unified memory.
        (cfg!(target_os = "macos") && cfg!(target_arch = "aarch64")).then(|| GpuProfile {
            model: model.clone(),
            memory_gib,
        })
    });
    let mut features: Vec<String> = build_features.iter().map(|f| (*f).to_owned()).collect();
    features.sort();
    HardwareProfile {
        name,
        description: String::new(),
        status: ProfileStatus::Measured,
        cpu: CpuProfile {
            model,
            arch: std::env::consts::ARCH.to_owned(),
            cores,
            threads: num_cpus::get(),
            features: isa_features(),
            cache: cache_sizes(),
        },
        memory: MemoryProfile {
            total_gib: memory_gib,
            read_bandwidth_gbs: measure_bandwidth.then(read_bandwidth_gbs),
        },
        gpu,
        os: std::env::consts::OS.to_owned(),
        build: BuildProfile { features },
        results: Vec::new(),
    }
}

/// A profile name for a machine: the CPU's name and its core count as a slug (`amd-epyc-2c`).
pub fn default_name(cpu_model: &str, cores: usize) -> String {
    let mut slug = String::new();
    for c in cpu_model.chars() {
        if c.is_ascii_alphanumeric() {
            slug.push(c.to_ascii_lowercase());
        } else if !slug.ends_with('-') && !slug.is_empty() {
            slug.push('-');
        }
    }
    format!("{}-{cores}c", slug.trim_end_matches('-'))
}

/// Memory read bandwidth in GB/s: every hardware thread sums its share of a 512 MiB buffer (far
/// beyond any cache); the best of three passes.
pub fn read_bandwidth_gbs() -> f64 {
    const BYTES: usize = 512 << 20;
    let words = vec![1u64; BYTES / 8];
    let threads = num_cpus::get().max(1);
    let share = words.len().div_ceil(threads);
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let started = Instant::now();
        let total: u64 = std::thread::scope(|scope| {
            let workers: Vec<_> = words
                .chunks(share)
                .map(|part| scope.spawn(move || sum_words(part)))
                .collect();
            workers.into_iter().map(|w| w.join().unwrap_or(0)).sum()
        });
        let seconds = started.elapsed().as_secs_f64();
        // The sum is checked so the reads cannot be optimized away.
        if total == words.len() as u64 {
            best = best.min(seconds);
        }
    }
    if best.is_finite() {
        round1(BYTES as f64 / best / 1e9)
    } else {
        0.0
    }
}

/// Sums in eight independent lanes, so the loop is bound by loads rather than by one add chain.
fn sum_words(words: &[u64]) -> u64 {
    let mut lanes = [0u64; 8];
    let mut chunks = words.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, w) in lanes.iter_mut().zip(chunk) {
            *lane = lane.wrapping_add(*w);
        }
    }
    let tail: u64 = chunks.remainder().iter().sum();
    lanes.iter().fold(tail, |a, b| a.wrapping_add(*b))
}

/// Memory sizes within this fraction match (firmware and kernels reserve different amounts).
const MEMORY_TOLERANCE: f64 = 0.10;

/// Where `machine` differs from `profile`, one sentence each; empty when it matches. Bandwidth
/// and results are not compared: they are measurements, not identity.
pub fn mismatches(profile: &HardwareProfile, machine: &HardwareProfile) -> Vec<String> {
    let mut out = Vec::new();
    let (p, m) = (&profile.cpu, &machine.cpu);
    if p.model != m.model {
        out.push(format!(
            "CPU is {:?}, the profile has {:?}",
            m.model, p.model
        ));
    }
    if p.arch != m.arch {
        out.push(format!(
            "architecture is {}, the profile has {}",
            m.arch, p.arch
        ));
    }
    if (p.cores, p.threads) != (m.cores, m.threads) {
        out.push(format!(
            "{} cores / {} threads, the profile has {} / {}",
            m.cores, m.threads, p.cores, p.threads
        ));
    }
    let missing: Vec<&str> = p
        .features
        .iter()
        .filter(|f| !m.features.contains(f))
        .map(String::as_str)
        .collect();
    let extra: Vec<&str> = m
        .features
        .iter()
        .filter(|f| !p.features.contains(f))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        out.push(format!("CPU lacks {}", missing.join(", ")));
    }
    if !extra.is_empty() {
        out.push(format!(
            "CPU has {}, which the profile lacks",
            extra.join(", ")
        ));
    }
    let (pm, mm) = (profile.memory.total_gib, machine.memory.total_gib);
    if (pm - mm).abs() > pm * MEMORY_TOLERANCE {
        out.push(format!("{mm} GiB of memory, the profile has {pm} GiB"));
    }
    match (&profile.gpu, &machine.gpu) {
        (Some(p), Some(m)) if p.model != m.model => {
            out.push(format!(
                "GPU is {:?}, the profile has {:?}",
                m.model, p.model
            ));
        }
        (Some(p), None) => out.push(format!("no GPU found, the profile has {:?}", p.model)),
        (None, Some(m)) => out.push(format!("GPU {:?} found, the profile has none", m.model)),
        _ => {}
    }
    if profile.os != machine.os {
        out.push(format!(
            "OS is {}, the profile has {}",
            machine.os, profile.os
        ));
    }
    if profile.build.features != machine.build.features {
        out.push(format!(
            "sanctum built with features [{}], the profile has [{}]",
            machine.build.features.join(", "),
            profile.build.features.join(", ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detected_machine_round_trips_and_matches_itself() {
        let machine = detect(Some("here"), &["inference"], false);
        assert!(machine.cpu.cores >= 1 && machine.cpu.threads >= machine.cpu.cores);
        assert!(machine.memory.total_gib > 0.0 || !cfg!(target_os = "linux"));
        let parsed: HardwareProfile = toml::from_str(&machine.to_toml()).unwrap();
        assert_eq!(parsed, machine);
        assert!(mismatches(&machine, &machine).is_empty());
    }

    #[test]
    fn default_names_are_slugs() {
        assert_eq!(default_name("AMD EPYC", 2), "amd-epyc-2c");
        assert_eq!(
            default_name("12th Gen Intel(R) Core(TM) i7-1255U", 10),
            "12th-gen-intel-r-core-tm-i7-1255u-10c"
        );
        assert_eq!(
            detect(None, &[], false).name,
            default_name(&cpu_model(), num_cpus::get_physical())
        );
    }

    #[test]
    fn every_difference_is_named() {
        let profile = detect(Some("here"), &["inference"], false);
        let mut other = profile.clone();
        other.cpu.model = "Other CPU".into();
        other.cpu.threads += 2;
        other.cpu.features.push("made-up-isa".into());
        other.memory.total_gib = profile.memory.total_gib * 2.0 + 1.0;
        other.gpu = Some(GpuProfile {
            model: "NVIDIA H100".into(),
            memory_gib: 80.0,
        });
        other.build.features = vec!["cuda".into(), "inference".into()];
        other.os = "plan9".into();
        let found = mismatches(&profile, &other).join("\n");
        for needle in [
            "Other CPU",
            "threads",
            "made-up-isa",
            "GiB of memory",
            "H100",
            "plan9",
            "cuda",
        ] {
            assert!(found.contains(needle), "{needle} missing from:\n{found}");
        }
        // Bandwidth is a measurement, not identity.
        let mut measured = profile.clone();
        measured.memory.read_bandwidth_gbs = Some(1.0);
        assert!(mismatches(&profile, &measured).is_empty());
    }

    #[test]
    fn malformed_profile_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "name = \"x\"\nstatus = \"sometimes\"\n").unwrap();
        let err = HardwareProfile::read(&path).unwrap_err().to_string();
        assert!(
            err.contains("bad.toml") && err.contains("sometimes"),
            "{err}"
        );
    }

    /// Every profile shipped in `hardware-profiles/` parses, is named after its file, and says
    /// whether it was measured (a measured one carries its results).
    #[test]
    fn shipped_profiles_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../hardware-profiles");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let profile = HardwareProfile::read(&path).unwrap_or_else(|e| panic!("{e}"));
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            assert_eq!(profile.name, stem, "{}", path.display());
            assert_eq!(
                profile.status == ProfileStatus::Measured,
                !profile.results.is_empty(),
                "{}: measured profiles carry results, targets none",
                path.display()
            );
            seen += 1;
        }
        assert!(
            seen >= 4,
            "expected the shipped profiles in {}",
            dir.display()
        );
    }

    #[test]
    fn bandwidth_sum_counts_every_word() {
        let words = vec![1u64; 1003];
        assert_eq!(sum_words(&words), 1003);
    }
}
