//! What a scan found, as plain serializable data: the JSON report is this struct; the CycloneDX and
//! SARIF reports are made from it.

use std::path::PathBuf;

use serde::Serialize;

use crate::caches::{Origin, Root};
use crate::inspect::{Format, Header};
use crate::listeners::{GpuProcess, Listener};

pub mod cyclonedx;
pub mod sarif;

/// How a model or file stands, from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Standing {
    /// Every file of an approved model, each matching the lock.
    Approved,
    /// Not in the lock.
    Unapproved,
    /// An approved model whose files differ from the lock (or are missing), or a file whose cache
    /// names it by a digest its content does not have.
    Tampered,
    /// Runs code when loaded (a pickle importing dangerous globals), or disguised as another format.
    Dangerous,
}

impl Standing {
    /// The lowercase name the reports use.
    pub fn as_str(self) -> &'static str {
        match self {
            Standing::Approved => "approved",
            Standing::Unapproved => "unapproved",
            Standing::Tampered => "tampered",
            Standing::Dangerous => "dangerous",
        }
    }
}

/// One model file found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileFinding {
    /// The path it was found at (a cache's symlink name rather than its blob).
    pub path: PathBuf,
    /// Other paths to the same file.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<PathBuf>,
    /// Size in bytes.
    pub size: u64,
    /// sha256 of its content, hex.
    pub sha256: String,
    /// Its format, by content.
    pub format: Format,
    /// What its header says.
    #[serde(flatten)]
    pub header: Header,
    /// Why its header could not be read fully.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub malformed: Option<String>,
    /// How it stands.
    pub standing: Standing,
    /// The lock's model it belongs to, when it is (or was) an approved model's file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approved_model: Option<String>,
    /// What its cache's layout says it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    /// Why it stands where it does, one line each.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
}

/// A file of an approved model that is missing or differs from the lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileProblem {
    /// The file's path in the model, as the lock writes it.
    pub file: String,
    /// What is wrong.
    pub problem: String,
}

/// A model: the files of one approved model under one directory, one cache entry (a Hugging Face
/// snapshot, an Ollama tag), or a lone model file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelFinding {
    /// The lock's name, the cache's name (`org/repo@rev`, `model:tag`), or the file's path.
    pub name: String,
    /// How it stands: its worst file, or tampered when an approved model's file is missing.
    pub standing: Standing,
    /// The directory the approved model's files were found under.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
    /// For an approved model: the lock's model digest, license and task.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
    /// The format of its weights.
    pub format: Format,
    /// Its architecture, where a header or config says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    /// Parameters, summed over its weight files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<u64>,
    /// Indices into [`Report::files`] of its model files.
    pub files: Vec<usize>,
    /// Files of the approved model that are missing or differ.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<FileProblem>,
}

/// What the lock says of an approved model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Approval {
    /// The model digest (`attest::lockfile::model_digest`).
    pub digest: String,
    /// The license the approver recorded.
    pub license: String,
    /// `chat` or `embed`.
    pub task: String,
    /// The architecture the lock names.
    pub architecture: String,
    /// Every file the lock pins, with sha256 and size.
    pub files: Vec<attest::lockfile::LockedFile>,
}

/// A path the scan could not read; reported, never fatal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unreadable {
    /// The file or directory.
    pub path: PathBuf,
    /// Why.
    pub error: String,
}

/// Everything a scan found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// What was scanned.
    pub roots: Vec<Root>,
    /// Every model file, in path order.
    pub files: Vec<FileFinding>,
    /// The models they make up.
    pub models: Vec<ModelFinding>,
    /// Listening sockets, inference servers flagged.
    pub listeners: Vec<Listener>,
    /// Processes on a GPU, where `nvidia-smi` answered.
    pub gpu_processes: Vec<GpuProcess>,
    /// What the listener scan could not see.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Paths that could not be read.
    pub unreadable: Vec<Unreadable>,
}

/// When `sanctum scan` exits 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOn {
    /// Any model that is not approved (unapproved, tampered or dangerous).
    Unapproved,
    /// Any dangerous model.
    Dangerous,
    /// Never: the report is the whole answer.
    Never,
}

impl Report {
    /// Whether the report trips `fail_on`.
    pub fn fails(&self, fail_on: FailOn) -> bool {
        let threshold = match fail_on {
            FailOn::Unapproved => Standing::Unapproved,
            FailOn::Dangerous => Standing::Dangerous,
            FailOn::Never => return false,
        };
        self.models.iter().any(|m| m.standing >= threshold)
    }

    /// The worst standing of any model, `None` when none was found.
    pub fn worst(&self) -> Option<Standing> {
        self.models.iter().map(|m| m.standing).max()
    }

    /// The files of a model.
    pub fn files_of<'a>(
        &'a self,
        model: &'a ModelFinding,
    ) -> impl Iterator<Item = &'a FileFinding> {
        model.files.iter().filter_map(|&i| self.files.get(i))
    }
}
