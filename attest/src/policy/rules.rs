//! What may run, from where and on what: the `[sources]`, `[devices]`, `[formats]`, `[outputs]` and
//! `[audit]` tables of the policy file. Every table is optional and every setting left out allows
//! everything it governs, so a policy only says what it restricts.
//!
//! ```toml
//! [sources]
//! kinds = ["hub", "oci"]                      # pypi, hf, oci, hub (a sanctum hub)
//! endpoints = ["https://hub.corp.example"]    # HF endpoints, sanctum hubs, Python package indexes
//! registries = ["registry.corp.example:5000"] # OCI registries
//!
//! [devices]
//! allow = ["cpu"]                             # cpu, cuda, metal
//!
//! [formats]
//! files = ["safetensors", "gguf"]             # what a model may come from, and what scan accepts
//! weights = ["q8_0", "q4_0"]                  # what weights may run in
//!
//! [outputs]
//! require_git = true                          # outputs go with --out into a git work tree
//!
//! [audit]
//! retention_days = 365                        # entries older than this are pruned (hashes kept)
//! ```
//!
//! A refusal is a [`Violation`] naming the rule by its key (`sources.kinds`) and the policy file.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::attestation::layout;
use crate::lockfile::{ImportFormat, ModelEntry};

/// A policy rule said no.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused by policy rule {rule}{}: {reason}", in_file(.policy))]
pub struct Violation {
    /// The rule, as its key in the policy file (`sources.kinds`, `devices.allow`...).
    pub rule: &'static str,
    /// What it refused, and what it allows.
    pub reason: String,
    /// The policy file the rule is in.
    pub policy: Option<PathBuf>,
}

fn in_file(policy: &Option<PathBuf>) -> String {
    policy
        .as_deref()
        .map(|p| format!(" in {}", p.display()))
        .unwrap_or_default()
}

/// Where a model is fetched from, for `sources.kinds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A wheel on a Python package index.
    Pypi,
    /// A Hugging Face hub (or a mirror speaking its protocol).
    Hf,
    /// An OCI registry.
    Oci,
    /// A sanctum hub (`sanctum hub serve`), which every pull goes to when one is configured.
    Hub,
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pypi => "pypi",
            Self::Hf => "hf",
            Self::Oci => "oci",
            Self::Hub => "hub",
        })
    }
}

/// A device family, for `devices.allow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// The CPU.
    Cpu,
    /// Any CUDA GPU.
    Cuda,
    /// The Metal GPU.
    Metal,
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::Metal => "metal",
        })
    }
}

/// The file formats `formats.files` may name: the scanner's names for what it finds by content.
/// A model imported from a GGUF came from `gguf`, one imported from a torch checkpoint from
/// `pytorch-zip`; every model sanctum runs is `safetensors` on disk.
pub const FILE_FORMATS: &[&str] = &[
    "safetensors",
    "gguf",
    "ggml",
    "pickle",
    "pytorch-zip",
    "numpy",
    "numpy-zip",
    "keras",
    "hdf5",
    "onnx",
    "tf-saved-model",
    "llamafile",
];

/// `[sources]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceRules {
    /// The kinds of source models may be fetched from; None: all.
    pub kinds: Option<Vec<SourceKind>>,
    /// URLs models may be fetched from (HF endpoints, sanctum hubs, package indexes): a URL is
    /// allowed when scheme, host and port are equal and its path is at or below one of these.
    /// None: any.
    pub endpoints: Option<Vec<String>>,
    /// OCI registries (`host` or `host:port`) models may be fetched from; None: any.
    pub registries: Option<Vec<String>>,
}

/// `[devices]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRules {
    /// The devices inference may run on; None: all this build has.
    pub allow: Option<Vec<DeviceKind>>,
}

/// `[formats]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FormatRules {
    /// File formats ([`FILE_FORMATS`]) a model may come from, and that `scan` accepts; None: all.
    pub files: Option<Vec<String>>,
    /// Formats weights may run in (`f32`, `f16`, `bf16`, `q8_0`, `q4_0`, `q4k`...); None: all.
    pub weights: Option<Vec<String>>,
}

/// `[outputs]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputRules {
    /// Outputs must be written with `--out` to a file inside a git work tree, so their
    /// attestations are committed with them; None: false.
    pub require_git: Option<bool>,
}

/// `[audit]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRules {
    /// Days an audit entry is kept; older ones are pruned to their leaf hashes, so the log still
    /// verifies and old checkpoints still prove it was not rewritten. None: kept for ever.
    pub retention_days: Option<u32>,
}

/// The rules of what may run, from the policy's optional tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// `[sources]`.
    pub sources: SourceRules,
    /// `[devices]`.
    pub devices: DeviceRules,
    /// `[formats]`.
    pub formats: FormatRules,
    /// `[outputs]`.
    pub outputs: OutputRules,
    /// `[audit]`.
    pub audit: AuditRules,
    /// The policy file they came from (named in refusals).
    pub policy: Option<PathBuf>,
}

/// Why a table of rules was refused when the policy was read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{rule}: {reason}")]
pub struct InvalidRule {
    /// The setting.
    pub rule: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl Rules {
    /// Checks the settings that can be checked without the engine: file formats are known names,
    /// endpoints are http(s) URLs, registries are hosts, retention is at least a day, no list is
    /// empty (an empty list would refuse everything: leave the setting out, or say so by naming
    /// one thing).
    pub fn validate(&self) -> Result<(), InvalidRule> {
        let invalid = |rule, reason: String| Err(InvalidRule { rule, reason });
        let lists: [(&'static str, Option<usize>); 6] = [
            ("sources.kinds", self.sources.kinds.as_ref().map(Vec::len)),
            (
                "sources.endpoints",
                self.sources.endpoints.as_ref().map(Vec::len),
            ),
            (
                "sources.registries",
                self.sources.registries.as_ref().map(Vec::len),
            ),
            ("devices.allow", self.devices.allow.as_ref().map(Vec::len)),
            ("formats.files", self.formats.files.as_ref().map(Vec::len)),
            (
                "formats.weights",
                self.formats.weights.as_ref().map(Vec::len),
            ),
        ];
        for (rule, len) in lists {
            if len == Some(0) {
                return invalid(
                    rule,
                    "an empty list would refuse everything; leave the setting out to allow all"
                        .into(),
                );
            }
        }
        for endpoint in self.sources.endpoints.iter().flatten() {
            if let Err(reason) = Endpoint::parse(endpoint) {
                return invalid("sources.endpoints", format!("{endpoint:?}: {reason}"));
            }
        }
        for registry in self.sources.registries.iter().flatten() {
            if registry.is_empty() || registry.contains(['/', ' ']) || registry.contains("://") {
                return invalid(
                    "sources.registries",
                    format!("{registry:?} is not a registry host (`host` or `host:port`)"),
                );
            }
        }
        for format in self.formats.files.iter().flatten() {
            if !FILE_FORMATS.contains(&format.as_str()) {
                return invalid(
                    "formats.files",
                    format!(
                        "{format:?} is not a file format sanctum knows ({})",
                        FILE_FORMATS.join(", ")
                    ),
                );
            }
        }
        if self.audit.retention_days == Some(0) {
            return invalid(
                "audit.retention_days",
                "0 would prune every entry as it is written; give at least 1".into(),
            );
        }
        Ok(())
    }

    fn violation(&self, rule: &'static str, reason: String) -> Violation {
        Violation {
            rule,
            reason,
            policy: self.policy.clone(),
        }
    }

    /// Whether a model may be fetched from a source of `kind` at `endpoint` (a URL for pypi, hf
    /// and hub; the registry host for oci).
    pub fn check_source(
        &self,
        model: &str,
        kind: SourceKind,
        endpoint: &str,
    ) -> Result<(), Violation> {
        if let Some(kinds) = &self.sources.kinds
            && !kinds.contains(&kind)
        {
            return Err(self.violation(
                "sources.kinds",
                format!(
                    "model {model:?} would be fetched from a {kind} source, and the policy allows only {}",
                    join(kinds)
                ),
            ));
        }
        match kind {
            SourceKind::Oci => {
                if let Some(registries) = &self.sources.registries
                    && !registries.iter().any(|r| r.eq_ignore_ascii_case(endpoint))
                {
                    return Err(self.violation(
                        "sources.registries",
                        format!(
                            "model {model:?} is in the registry {endpoint}, and the policy allows only {}",
                            registries.join(", ")
                        ),
                    ));
                }
            }
            SourceKind::Pypi | SourceKind::Hf | SourceKind::Hub => {
                if let Some(endpoints) = &self.sources.endpoints {
                    let allowed = Endpoint::parse(endpoint).is_ok_and(|asked| {
                        endpoints
                            .iter()
                            .filter_map(|e| Endpoint::parse(e).ok())
                            .any(|allowed| allowed.covers(&asked))
                    });
                    if !allowed {
                        return Err(self.violation(
                            "sources.endpoints",
                            format!(
                                "model {model:?} would be fetched from {endpoint} ({kind}), and the policy allows only {}",
                                endpoints.join(", ")
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether a model of this lock entry may be pulled or run, by the format it came from
    /// ([`origin_format`]).
    pub fn check_model_format(&self, entry: &ModelEntry) -> Result<(), Violation> {
        let format = origin_format(entry);
        self.check_file_format(format).map_err(|v| Violation {
            reason: format!("model {:?} comes from {}", entry.name, v.reason),
            ..v
        })
    }

    /// Whether a file of `format` ([`FILE_FORMATS`]) is allowed.
    pub fn check_file_format(&self, format: &str) -> Result<(), Violation> {
        match &self.formats.files {
            Some(files) if !files.iter().any(|f| f == format) => Err(self.violation(
                "formats.files",
                format!("{format}, and the policy allows only {}", files.join(", ")),
            )),
            _ => Ok(()),
        }
    }

    /// Whether weights may run in `format` (`q8_0`...).
    pub fn check_weights(&self, model: &str, format: &str) -> Result<(), Violation> {
        match &self.formats.weights {
            Some(weights) if !weights.iter().any(|w| w.eq_ignore_ascii_case(format)) => {
                Err(self.violation(
                    "formats.weights",
                    format!(
                        "model {model:?} would run in {format}, and the policy allows only {} (pass --quant)",
                        weights.join(", ")
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Whether inference may run on `device`.
    pub fn allows_device(&self, device: DeviceKind) -> bool {
        self.devices
            .allow
            .as_ref()
            .is_none_or(|allow| allow.contains(&device))
    }

    /// [`Self::allows_device`] as a refusal naming the rule.
    pub fn check_device(&self, device: DeviceKind, asked: &str) -> Result<(), Violation> {
        match &self.devices.allow {
            Some(allow) if !self.allows_device(device) => Err(self.violation(
                "devices.allow",
                format!(
                    "inference on {asked} is not allowed; the policy allows only {}",
                    join(allow)
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Whether an output may be written to `out` (None: printed to stdout). Checked before any
    /// model is loaded. The output's directory must exist.
    pub fn check_output(&self, out: Option<&Path>) -> Result<(), Violation> {
        if self.outputs.require_git != Some(true) {
            return Ok(());
        }
        let Some(out) = out else {
            return Err(self.violation(
                "outputs.require_git",
                "outputs must be written with --out FILE inside a git work tree, not printed"
                    .into(),
            ));
        };
        match layout::placement_for_output(out) {
            Ok(placement) if placement.repo_root.is_some() => Ok(()),
            Ok(_) => Err(self.violation(
                "outputs.require_git",
                format!(
                    "{} is not inside a git work tree; outputs must be written into one",
                    out.display()
                ),
            )),
            Err(e) => Err(self.violation(
                "outputs.require_git",
                format!(
                    "cannot tell whether {} is inside a git work tree: {e}",
                    out.display()
                ),
            )),
        }
    }
}

/// The file format a lock entry's model came from: what it was imported from, else `safetensors`.
pub fn origin_format(entry: &ModelEntry) -> &'static str {
    match entry.import.as_ref().map(|i| i.format) {
        Some(ImportFormat::Gguf) => "gguf",
        Some(ImportFormat::Pickle) => "pytorch-zip",
        None => "safetensors",
    }
}

fn join<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// An endpoint URL as the rules compare it: scheme, host and port (defaults filled in, case
/// folded by the URL parser), and the path as `/`-ended segments.
#[derive(Debug, PartialEq, Eq)]
struct Endpoint {
    origin: url::Origin,
    path: String,
}

impl Endpoint {
    fn parse(text: &str) -> Result<Self, String> {
        let url = url::Url::parse(text).map_err(|e| e.to_string())?;
        if !matches!(url.scheme(), "http" | "https" | "file") {
            return Err(format!(
                "scheme {} is not http, https or file",
                url.scheme()
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("a URL with credentials in it".into());
        }
        let mut path = url.path().to_owned();
        if !path.ends_with('/') {
            path.push('/');
        }
        Ok(Self {
            origin: url.origin(),
            path,
        })
    }

    /// True when `other` is this endpoint or below it.
    fn covers(&self, other: &Endpoint) -> bool {
        self.origin == other.origin && other.path.starts_with(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(tables: &str) -> Result<Rules, super::super::PolicyError> {
        let text = format!("version = 1\n{tables}");
        super::super::Policy::from_toml(&text, Path::new(".")).map(|p| p.rules)
    }

    fn rules(tables: &str) -> Rules {
        Rules {
            policy: Some(PathBuf::from("p.toml")),
            ..parse(tables).unwrap()
        }
    }

    #[test]
    fn endpoints_match_by_origin_and_path_segments() {
        let r = rules(
            "[sources]\nendpoints = [\"https://Hub.Corp.example/mirror\", \"http://127.0.0.1:8080\"]",
        );
        for (url, ok) in [
            ("https://hub.corp.example/mirror", true),
            ("https://hub.corp.example:443/mirror/", true),
            ("https://hub.corp.example/mirror/sub", true),
            ("https://hub.corp.example/mirrored", false),
            ("https://hub.corp.example", false),
            ("http://hub.corp.example/mirror", false),
            ("https://hub.corp.example.evil.com/mirror", false),
            ("https://hub.corp.example@evil.com/mirror", false),
            ("https://evil.com/https://hub.corp.example/mirror", false),
            ("http://127.0.0.1:8080/", true),
            ("http://127.0.0.1:8081/", false),
            ("not a url", false),
        ] {
            let got = r.check_source("m", SourceKind::Hf, url);
            assert_eq!(got.is_ok(), ok, "{url}: {got:?}");
            if let Err(v) = got {
                assert_eq!(v.rule, "sources.endpoints");
                assert!(
                    v.to_string()
                        .contains("policy rule sources.endpoints in p.toml"),
                    "{v}"
                );
            }
        }
    }

    #[test]
    fn kinds_and_registries() {
        let r =
            rules("[sources]\nkinds = [\"oci\", \"hub\"]\nregistries = [\"Registry.corp:5000\"]");
        assert_eq!(
            r.check_source("m", SourceKind::Hf, "https://huggingface.co")
                .unwrap_err()
                .rule,
            "sources.kinds"
        );
        assert!(
            r.check_source("m", SourceKind::Hub, "https://anything.example")
                .is_ok()
        );
        assert!(
            r.check_source("m", SourceKind::Oci, "registry.corp:5000")
                .is_ok()
        );
        let v = r
            .check_source("m", SourceKind::Oci, "registry.corp")
            .unwrap_err();
        assert_eq!(v.rule, "sources.registries");
        assert!(v.reason.contains("Registry.corp:5000"), "{v}");
        assert!(
            Rules::default()
                .check_source("m", SourceKind::Pypi, "x")
                .is_ok()
        );
    }

    #[test]
    fn devices_weights_and_formats() {
        let r = rules(
            "[devices]\nallow = [\"cpu\"]\n[formats]\nfiles = [\"safetensors\"]\nweights = [\"q8_0\"]",
        );
        assert!(r.check_device(DeviceKind::Cpu, "cpu").is_ok());
        assert_eq!(
            r.check_device(DeviceKind::Cuda, "cuda:0").unwrap_err().rule,
            "devices.allow"
        );
        assert!(r.check_weights("m", "Q8_0").is_ok());
        assert_eq!(
            r.check_weights("m", "q4_0").unwrap_err().rule,
            "formats.weights"
        );
        assert!(r.check_file_format("safetensors").is_ok());
        let v = r.check_file_format("gguf").unwrap_err();
        assert_eq!(v.rule, "formats.files");
        assert!(v.reason.ends_with("allows only safetensors"), "{v}");
        assert!(
            Rules::default()
                .check_device(DeviceKind::Metal, "metal")
                .is_ok()
        );
    }

    #[test]
    fn outputs_in_a_git_work_tree() {
        let r = rules("[outputs]\nrequire_git = true");
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        std::fs::create_dir_all(repo.join(".git")).unwrap();
        assert!(r.check_output(Some(&repo.join("a.txt"))).is_ok());
        for out in [
            None,
            Some(dir.path().join("a.txt")),
            Some(dir.path().join("missing/a.txt")),
        ] {
            let v = r.check_output(out.as_deref()).unwrap_err();
            assert_eq!(v.rule, "outputs.require_git", "{out:?}");
        }
        assert!(Rules::default().check_output(None).is_ok());
    }

    #[test]
    fn invalid_settings_are_named() {
        for (text, rule) in [
            ("[sources]\nkinds = []", "sources.kinds"),
            ("[sources]\nendpoints = [\"ftp://x\"]", "sources.endpoints"),
            (
                "[sources]\nendpoints = [\"https://u:p@x\"]",
                "sources.endpoints",
            ),
            (
                "[sources]\nregistries = [\"https://r\"]",
                "sources.registries",
            ),
            ("[formats]\nfiles = [\"exe\"]", "formats.files"),
            ("[formats]\nweights = []", "formats.weights"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.starts_with(&format!("{rule}: ")), "{text}: {err}");
        }
        let err = parse("[audit]\nretention_days = 0")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("audit.retention_days: "), "{err}");
        let err = parse("[devices]\nallow = [\"tpu\"]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `tpu`"), "{err}");
    }
}
