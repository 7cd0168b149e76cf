//! Verification of a model directory against its lock entry.
//!
//! The core invariant of sanctum: inference only ever sees bytes that were hashed and matched the lock.
//! [`load_verified`] reads each file once into memory, hashing the very buffer it hands to the loader, so
//! a file swapped or rewritten on disk after the check cannot reach inference. [`verify_model`] runs the
//! same checks without keeping the bytes, reporting every file.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::digest::{HASH_CHUNK, Sha256Digest, Sha256Hasher};
use crate::format::{ContentKind, FormatError, check_model_file, forbidden_weight_format, sniff};
use crate::lockfile::{LockedFile, ModelEntry};
use crate::progress::Progress;

/// A file whose bytes matched the lock; `bytes` are exactly the bytes that were hashed.
#[derive(Debug)]
pub struct VerifiedFile {
    /// Relative path in the model directory, as in the lock.
    pub path: String,
    /// Its sha256 (equal to the lock's).
    pub sha256: Sha256Digest,
    /// The verified content.
    pub bytes: Vec<u8>,
}

/// A model whose every file matched the lock, with nothing unlisted beside them.
#[derive(Debug)]
pub struct VerifiedModel {
    /// Model name.
    pub name: String,
    /// Model digest from the lock.
    pub digest: Sha256Digest,
    /// Directory the files were read from.
    pub dir: PathBuf,
    /// The files, in lock order.
    pub files: Vec<VerifiedFile>,
}

impl VerifiedModel {
    /// The verified file at `path`, if the model has one.
    pub fn file(&self, path: &str) -> Option<&VerifiedFile> {
        self.files.iter().find(|f| f.path == path)
    }
}

/// What is wrong with one file of a model directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileProblem {
    /// Listed in the lock, absent on disk.
    #[error("missing (the lock lists it)")]
    Missing,
    /// A directory, device or other non-regular file where a file belongs.
    #[error("not a regular file")]
    NotRegularFile,
    /// A symbolic link; the store never creates them, and they could point anywhere.
    #[error(
        "is a symlink (to {target}); symlinks are refused because they can lead out of the model directory"
    )]
    Symlink {
        /// Where the link points.
        target: String,
    },
    /// Size differs from the lock.
    #[error("size mismatch: the lock says {expected} bytes, the file has {actual}")]
    SizeMismatch {
        /// Size in the lock.
        expected: u64,
        /// Size read.
        actual: u64,
    },
    /// Digest differs from the lock.
    #[error("sha256 mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// Digest in the lock.
        expected: Sha256Digest,
        /// Digest of the bytes read.
        actual: Sha256Digest,
    },
    /// Not acceptable content (pickle, malformed Safetensors...).
    #[error(transparent)]
    Format(#[from] FormatError),
    /// Present on disk but not in the lock.
    #[error("not listed in the lock{}", describe_unlisted(.format, .content))]
    Unlisted {
        /// Weight format its name implies, if any.
        format: Option<&'static str>,
        /// What its first bytes look like.
        content: ContentKind,
    },
    /// Reading failed.
    #[error("cannot read: {0}")]
    Io(#[from] io::Error),
}

fn describe_unlisted(format: &Option<&'static str>, content: &ContentKind) -> String {
    match (format, content) {
        (_, ContentKind::Pickle { protocol }) => {
            format!(" (pickle data, protocol {protocol}: it could run code when loaded)")
        }
        (Some(format), _) => format!(" ({format})"),
        (None, ContentKind::Other) => String::new(),
        (None, kind) => format!(" ({kind:?} content)"),
    }
}

/// Why a model could not be verified or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The model directory does not exist.
    #[error("model {model:?} is not in the store ({dir}); pull it first")]
    NotPulled {
        /// Model name.
        model: String,
        /// Where it was looked for.
        dir: PathBuf,
    },
    /// The model directory could not be listed.
    #[error("model {model:?}: cannot read {dir}: {source}")]
    Dir {
        /// Model name.
        model: String,
        /// The directory.
        dir: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// One file failed a check.
    #[error("model {model:?}: {path}: {problem}")]
    File {
        /// Model name.
        model: String,
        /// Path of the file inside the model directory.
        path: String,
        /// What is wrong.
        problem: FileProblem,
    },
}

/// Outcome of checking one file.
#[derive(Debug)]
pub struct FileReport {
    /// Relative path.
    pub path: String,
    /// Size on disk when known.
    pub size: Option<u64>,
    /// The verified digest, or the problem.
    pub outcome: Result<Sha256Digest, FileProblem>,
}

/// Every file of a model directory checked: listed files in lock order, then unlisted ones.
#[derive(Debug)]
pub struct VerifyReport {
    /// Model name.
    pub model: String,
    /// Model digest from the lock.
    pub digest: Sha256Digest,
    /// One entry per listed file, then one per unlisted file.
    pub files: Vec<FileReport>,
}

impl VerifyReport {
    /// True when every file matched and nothing unlisted was found.
    pub fn ok(&self) -> bool {
        self.files.iter().all(|f| f.outcome.is_ok())
    }

    /// The first problem as an error, if any.
    pub fn into_result(self) -> Result<Self, VerifyError> {
        let model = self.model.clone();
        match self.files.iter().position(|f| f.outcome.is_err()) {
            None => Ok(self),
            Some(i) => {
                let mut files = self.files;
                let report = files.swap_remove(i);
                let Err(problem) = report.outcome else {
                    unreachable!("position() found an error")
                };
                Err(VerifyError::File {
                    model,
                    path: report.path,
                    problem,
                })
            }
        }
    }
}

/// Re-hashes every file of `dir` against `entry`, reporting each file (bytes are not kept).
pub fn verify_model(
    entry: &ModelEntry,
    dir: &Path,
    progress: &dyn Progress,
) -> Result<VerifyReport, VerifyError> {
    let (listed, unlisted) = check_dir(entry, dir, progress, false)?;
    let files = listed
        .into_iter()
        .map(|(report, _bytes)| report)
        .chain(unlisted)
        .collect();
    Ok(VerifyReport {
        model: entry.name.clone(),
        digest: entry.digest,
        files,
    })
}

/// Reads and verifies every file of `dir` against `entry`, returning the verified bytes. Fails on the
/// first problem in lock order (unlisted files after listed ones).
pub fn load_verified(
    entry: &ModelEntry,
    dir: &Path,
    progress: &dyn Progress,
) -> Result<VerifiedModel, VerifyError> {
    let (listed, unlisted) = check_dir(entry, dir, progress, true)?;
    let mut files = Vec::with_capacity(listed.len());
    let mut reports = Vec::new();
    for (report, bytes) in listed {
        match (&report.outcome, bytes) {
            (Ok(sha256), Some(bytes)) => files.push(VerifiedFile {
                path: report.path.clone(),
                sha256: *sha256,
                bytes,
            }),
            _ => reports.push(report),
        }
    }
    reports.extend(unlisted);
    VerifyReport {
        model: entry.name.clone(),
        digest: entry.digest,
        files: reports,
    }
    .into_result()?;
    Ok(VerifiedModel {
        name: entry.name.clone(),
        digest: entry.digest,
        dir: dir.to_owned(),
        files,
    })
}

type Checked = (FileReport, Option<Vec<u8>>);

/// Checks listed files in parallel (one thread per core) and finds unlisted ones.
fn check_dir(
    entry: &ModelEntry,
    dir: &Path,
    progress: &dyn Progress,
    keep_bytes: bool,
) -> Result<(Vec<Checked>, Vec<FileReport>), VerifyError> {
    let dir_error = |source: io::Error| VerifyError::Dir {
        model: entry.name.clone(),
        dir: dir.to_owned(),
        source,
    };
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(VerifyError::NotPulled {
                model: entry.name.clone(),
                dir: dir.to_owned(),
            });
        }
        Err(e) => return Err(dir_error(e)),
        Ok(m) if !m.is_dir() => {
            return Err(dir_error(io::Error::other("not a directory")));
        }
        Ok(_) => {}
    }
    let mut on_disk = Vec::new();
    list_files(dir, "", &mut on_disk).map_err(dir_error)?;

    let results: Mutex<Vec<Option<Checked>>> =
        Mutex::new((0..entry.files.len()).map(|_| None).collect());
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(entry.files.len())
        .max(1);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(file) = entry.files.get(i) else {
                        break;
                    };
                    let checked = check_listed(dir, file, progress, keep_bytes);
                    if let Ok(mut slots) = results.lock() {
                        slots[i] = Some(checked);
                    }
                }
            });
        }
    });
    let listed = results
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .into_iter()
        .zip(&entry.files)
        .map(|(slot, file)| {
            slot.unwrap_or_else(|| {
                let problem = io::Error::other("verification worker stopped");
                (report(file, None, Err(problem.into())), None)
            })
        })
        .collect();

    let unlisted = on_disk
        .into_iter()
        .filter(|(path, _)| !entry.files.iter().any(|f| &f.path == path))
        .map(|(path, kind)| {
            let full = dir.join(&path);
            let problem = match kind {
                DiskEntry::Symlink => FileProblem::Symlink {
                    target: link_target(&full),
                },
                DiskEntry::Other => FileProblem::NotRegularFile,
                DiskEntry::File => FileProblem::Unlisted {
                    format: forbidden_weight_format(Path::new(&path)),
                    content: sniff(&read_prefix(&full)),
                },
            };
            FileReport {
                path,
                size: fs::symlink_metadata(&full).ok().map(|m| m.len()),
                outcome: Err(problem),
            }
        })
        .collect();
    Ok((listed, unlisted))
}

fn report(
    file: &LockedFile,
    size: Option<u64>,
    outcome: Result<Sha256Digest, FileProblem>,
) -> FileReport {
    FileReport {
        path: file.path.clone(),
        size,
        outcome,
    }
}

/// Opens, reads (hashing as it reads), format-checks and compares one listed file.
fn check_listed(
    dir: &Path,
    file: &LockedFile,
    progress: &dyn Progress,
    keep_bytes: bool,
) -> Checked {
    match read_listed(dir, file, progress) {
        Ok((bytes, actual)) => {
            let size = Some(bytes.len() as u64);
            let outcome = if bytes.len() as u64 != file.size {
                Err(FileProblem::SizeMismatch {
                    expected: file.size,
                    actual: bytes.len() as u64,
                })
            } else if let Err(e) = check_model_file(&file.path, &bytes) {
                Err(e.into())
            } else if actual != file.sha256 {
                Err(FileProblem::DigestMismatch {
                    expected: file.sha256,
                    actual,
                })
            } else {
                Ok(actual)
            };
            let keep = keep_bytes && outcome.is_ok();
            (report(file, size, outcome), keep.then_some(bytes))
        }
        Err((size, problem)) => (report(file, size, Err(problem)), None),
    }
}

/// Reads a listed file into memory, hashing the buffer as it fills. Reads at most one byte more than
/// the lock's size, so an oversized file is caught without reading it all.
fn read_listed(
    dir: &Path,
    file: &LockedFile,
    progress: &dyn Progress,
) -> Result<(Vec<u8>, Sha256Digest), (Option<u64>, FileProblem)> {
    let full = dir.join(&file.path);
    // Every component must be a real directory or file: a symlinked parent could lead anywhere.
    let mut at = dir.to_path_buf();
    for component in file.path.split('/') {
        at.push(component);
        match fs::symlink_metadata(&at) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err((None, FileProblem::Missing));
            }
            Err(e) => return Err((None, e.into())),
            Ok(m) if m.file_type().is_symlink() => {
                return Err((
                    None,
                    FileProblem::Symlink {
                        target: link_target(&at),
                    },
                ));
            }
            Ok(_) => {}
        }
    }
    let handle = File::open(&full).map_err(|e| (None, e.into()))?;
    let meta = handle.metadata().map_err(|e| (None, e.into()))?;
    if !meta.is_file() {
        return Err((None, FileProblem::NotRegularFile));
    }
    if meta.len() != file.size {
        return Err((
            Some(meta.len()),
            FileProblem::SizeMismatch {
                expected: file.size,
                actual: meta.len(),
            },
        ));
    }
    let task = progress.start(&file.path, Some(file.size));
    let limit = file.size.saturating_add(1);
    let mut reader = handle.take(limit);
    let capacity = usize::try_from(limit).unwrap_or(usize::MAX).min(1 << 34);
    let mut bytes = Vec::with_capacity(capacity);
    let mut hasher = Sha256Hasher::new();
    loop {
        // read_to_end fills spare capacity without zeroing it first; each round hashes what it added.
        let start = bytes.len();
        let n = (&mut reader)
            .take(HASH_CHUNK as u64)
            .read_to_end(&mut bytes)
            .map_err(|e| (None, e.into()))?;
        if n == 0 {
            break;
        }
        hasher.update(&bytes[start..]);
        task.advance(n as u64);
    }
    bytes.shrink_to_fit();
    Ok((bytes, hasher.finish()))
}

enum DiskEntry {
    File,
    Symlink,
    Other,
}

/// Lists every non-directory entry under `dir`, with `/`-separated relative paths. Symlinks are listed,
/// never followed.
fn list_files(dir: &Path, prefix: &str, out: &mut Vec<(String, DiskEntry)>) -> io::Result<()> {
    let mut entries = fs::read_dir(dir)?.collect::<Result<Vec<_>, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let kind = e.file_type()?;
        if kind.is_dir() {
            list_files(&e.path(), &rel, out)?;
        } else if kind.is_symlink() {
            out.push((rel, DiskEntry::Symlink));
        } else if kind.is_file() {
            out.push((rel, DiskEntry::File));
        } else {
            out.push((rel, DiskEntry::Other));
        }
    }
    Ok(())
}

fn link_target(path: &Path) -> String {
    fs::read_link(path).map_or_else(|_| "?".into(), |t| t.display().to_string())
}

/// The first bytes of a file, enough to recognize its format.
fn read_prefix(path: &Path) -> Vec<u8> {
    let mut prefix = Vec::with_capacity(64);
    if let Ok(f) = File::open(path) {
        // An unreadable prefix only makes the message less specific; the file is refused regardless.
        let _ = f.take(64).read_to_end(&mut prefix);
    }
    prefix
}
