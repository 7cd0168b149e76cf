//! Verification of a model directory against its lock entry.
//!
//! The core invariant of sanctum: inference only ever sees bytes that were hashed and matched the lock.
//! Every file is read exactly once, and the bytes that are hashed are the bytes the loader gets, so a
//! file swapped or rewritten on disk during or after the check cannot reach inference:
//! - [`load_verified`] keeps each file in memory (configs, tokenizers, small models);
//! - [`begin_load`] and [`StreamedLoad::stream`] pass large weight files in bounded chunks to an
//!   [`Intake`] that builds the final weights as the bytes go by, with no second copy of the file;
//!   what it built is used only after [`StreamedLoad::finish`] confirmed every digest;
//! - [`verify_model`] runs the same checks keeping nothing, reporting every file.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::digest::{HASH_CHUNK, Sha256Digest, Sha256Hasher};
use crate::format::{
    ContentKind, FormatError, check_model_file_start, forbidden_weight_format, is_safetensors_name,
    sniff, start_len,
};
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
    /// The files kept in memory, in lock order.
    pub files: Vec<VerifiedFile>,
    /// The files streamed to a loader, in lock order.
    pub streamed: Vec<StreamedFile>,
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
    #[error("not a regular file but {0}")]
    NotRegularFile(&'static str),
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
    /// The loader could not use the bytes it was streamed (a dtype or shape it cannot run...).
    #[error("cannot be loaded: {0}")]
    Intake(IntakeError),
    /// Streamed twice, or not one of the files to stream (a loader's mistake).
    #[error("is not a file waiting to be streamed")]
    NotStreamed,
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

impl VerifyError {
    /// True when a check said no (missing, tampered, malformed); false when verified bytes could
    /// not be used by the loader ([`FileProblem::Intake`]), which is a failure, not a refusal.
    pub fn is_refusal(&self) -> bool {
        !matches!(
            self,
            Self::File {
                problem: FileProblem::Intake(_) | FileProblem::NotStreamed,
                ..
            }
        )
    }
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

/// Re-hashes every file of `dir` against `entry`, reporting each file. Memory stays bounded: bytes
/// are hashed as they pass and not kept.
pub fn verify_model(
    entry: &ModelEntry,
    dir: &Path,
    progress: &dyn Progress,
) -> Result<VerifyReport, VerifyError> {
    let (listed, unlisted) = check_dir(entry, dir, progress, &|_| Mode::Discard)?;
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

/// Reads and verifies every file of `dir` against `entry`, keeping every file's verified bytes.
/// Fails on the first problem in lock order (unlisted files after listed ones). Loaders of large
/// weights use [`begin_load`] instead, which keeps no second copy of them.
pub fn load_verified(
    entry: &ModelEntry,
    dir: &Path,
    progress: &dyn Progress,
) -> Result<VerifiedModel, VerifyError> {
    begin_load(entry, dir, progress, |_| false)?.finish()
}

/// Receives a streamed file's bytes as they are hashed (see [`StreamedLoad::stream`]).
pub trait Intake {
    /// The file's next bytes: from its first byte on, in order, each exactly once, and only once
    /// its format check passed on its start (for Safetensors, the whole header). An error stops
    /// the read and fails the load, naming the file.
    fn take(&mut self, chunk: &[u8]) -> Result<(), IntakeError>;
}

/// Why an [`Intake`] could not use a file's bytes.
pub type IntakeError = Box<dyn std::error::Error + Send + Sync>;

/// A model being opened for inference, before its weights are read.
///
/// [`begin_load`] has verified and kept every file except the streamed ones (configs, tokenizers)
/// and checked that nothing unlisted is present; [`Self::stream`] then reads each streamed file
/// once, in bounded chunks, hashing the bytes as they pass on to an [`Intake`] that builds the
/// final weights from them. What an intake built may reach inference only after
/// [`Self::finish`] returned `Ok`: only then is every file's digest known to match the lock. On
/// any error the caller drops what it built.
pub struct StreamedLoad<'a> {
    entry: &'a ModelEntry,
    dir: PathBuf,
    progress: &'a dyn Progress,
    kept: Vec<VerifiedFile>,
    /// The files to stream, in lock order, with their digest once streamed.
    deferred: Vec<(&'a LockedFile, Option<Sha256Digest>)>,
}

/// A streamed file whose bytes matched the lock; they went to an [`Intake`], not kept here.
#[derive(Debug, Clone)]
pub struct StreamedFile {
    /// Relative path in the model directory, as in the lock.
    pub path: String,
    /// Its sha256 (equal to the lock's).
    pub sha256: Sha256Digest,
}

/// Starts opening a model: files for which `stream(path)` is true are only checked for presence,
/// type and size; every other file is read, verified and kept (in parallel); unlisted files are
/// refused. Fails on the first problem in lock order (unlisted files after listed ones).
pub fn begin_load<'a>(
    entry: &'a ModelEntry,
    dir: &Path,
    progress: &'a dyn Progress,
    stream: impl Fn(&str) -> bool + Sync,
) -> Result<StreamedLoad<'a>, VerifyError> {
    let mode = |file: &LockedFile| {
        if stream(&file.path) {
            Mode::Defer
        } else {
            Mode::Keep
        }
    };
    let (listed, unlisted) = check_dir(entry, dir, progress, &mode)?;
    let mut kept = Vec::with_capacity(listed.len());
    let mut deferred = Vec::new();
    let mut problems = Vec::new();
    for ((report, bytes), file) in listed.into_iter().zip(&entry.files) {
        match (&report.outcome, bytes) {
            (Ok(sha256), Some(bytes)) => kept.push(VerifiedFile {
                path: report.path.clone(),
                sha256: *sha256,
                bytes,
            }),
            (Ok(_), None) => deferred.push((file, None)),
            (Err(_), _) => problems.push(report),
        }
    }
    problems.extend(unlisted);
    VerifyReport {
        model: entry.name.clone(),
        digest: entry.digest,
        files: problems,
    }
    .into_result()?;
    Ok(StreamedLoad {
        entry,
        dir: dir.to_owned(),
        progress,
        kept,
        deferred,
    })
}

impl StreamedLoad<'_> {
    /// A verified, kept file (not a streamed one).
    pub fn file(&self, path: &str) -> Option<&VerifiedFile> {
        self.kept.iter().find(|f| f.path == path)
    }

    /// The paths still to stream, in lock order.
    pub fn to_stream(&self) -> Vec<String> {
        self.deferred
            .iter()
            .filter(|(_, done)| done.is_none())
            .map(|(file, _)| file.path.clone())
            .collect()
    }

    /// Reads the streamed file `path` once, hashing it, and hands its bytes to `intake`. An
    /// `Ok` means every byte went to `intake` and the file's size and digest match the lock.
    pub fn stream(&mut self, path: &str, intake: &mut dyn Intake) -> Result<(), VerifyError> {
        let model = self.entry.name.clone();
        let fail = |problem| VerifyError::File {
            model: model.clone(),
            path: path.to_owned(),
            problem,
        };
        let Some((file, done)) = self.deferred.iter_mut().find(|(f, _)| f.path == path) else {
            return Err(fail(FileProblem::NotStreamed));
        };
        if done.is_some() {
            return Err(fail(FileProblem::NotStreamed));
        }
        let mut sink = |chunk: &[u8]| intake.take(chunk).map_err(FileProblem::Intake);
        let sha256 = read_listed(&self.dir, file, self.progress, &mut sink)
            .and_then(|actual| matches_lock(file, actual))
            .map_err(|(_, problem)| fail(problem))?;
        *done = Some(sha256);
        Ok(())
    }

    /// Ends the load: streamed files nobody asked for are hashed now (the whole model is always
    /// verified), then the verified model is returned.
    pub fn finish(mut self) -> Result<VerifiedModel, VerifyError> {
        struct Discard;
        impl Intake for Discard {
            fn take(&mut self, _: &[u8]) -> Result<(), IntakeError> {
                Ok(())
            }
        }
        for path in self.to_stream() {
            self.stream(&path, &mut Discard)?;
        }
        let streamed = self
            .deferred
            .iter()
            .filter_map(|(file, sha256)| {
                sha256.map(|sha256| StreamedFile {
                    path: file.path.clone(),
                    sha256,
                })
            })
            .collect();
        Ok(VerifiedModel {
            name: self.entry.name.clone(),
            digest: self.entry.digest,
            dir: self.dir,
            files: self.kept,
            streamed,
        })
    }
}

/// A verified model as a loader reads it: small files kept in memory, weight files streamed to an
/// [`Intake`]. [`StreamedLoad`] reads weights from disk once; a [`VerifiedModel`] hands over the
/// bytes it already holds, so both go through the same loader code.
pub trait ModelFiles {
    /// Model name from the lock.
    fn name(&self) -> &str;
    /// Model digest from the lock.
    fn digest(&self) -> Sha256Digest;
    /// A verified file kept in memory.
    fn file(&self, path: &str) -> Option<&VerifiedFile>;
    /// The weight files to stream, in lock order.
    fn weight_files(&self) -> Vec<String>;
    /// Every other file (configs, tokenizer), verified and in memory, in lock order.
    fn other_files(&self) -> Vec<&VerifiedFile>;
    /// Hands one weight file's verified bytes to `intake`.
    fn stream(&mut self, path: &str, intake: &mut dyn Intake) -> Result<(), VerifyError>;
    /// Completes verification; only after `Ok` may what the intakes built be used.
    fn finish(self) -> Result<(), VerifyError>;
}

impl ModelFiles for StreamedLoad<'_> {
    fn name(&self) -> &str {
        &self.entry.name
    }
    fn digest(&self) -> Sha256Digest {
        self.entry.digest
    }
    fn file(&self, path: &str) -> Option<&VerifiedFile> {
        StreamedLoad::file(self, path)
    }
    fn weight_files(&self) -> Vec<String> {
        self.to_stream()
    }
    fn other_files(&self) -> Vec<&VerifiedFile> {
        self.kept.iter().collect()
    }
    fn stream(&mut self, path: &str, intake: &mut dyn Intake) -> Result<(), VerifyError> {
        StreamedLoad::stream(self, path, intake)
    }
    fn finish(self) -> Result<(), VerifyError> {
        StreamedLoad::finish(self).map(drop)
    }
}

impl ModelFiles for VerifiedModel {
    fn name(&self) -> &str {
        &self.name
    }
    fn digest(&self) -> Sha256Digest {
        self.digest
    }
    fn file(&self, path: &str) -> Option<&VerifiedFile> {
        VerifiedModel::file(self, path)
    }
    /// Its kept Safetensors files.
    fn weight_files(&self) -> Vec<String> {
        self.files
            .iter()
            .filter(|f| is_safetensors_name(&f.path))
            .map(|f| f.path.clone())
            .collect()
    }
    fn other_files(&self) -> Vec<&VerifiedFile> {
        let weights = ModelFiles::weight_files(self);
        self.files
            .iter()
            .filter(|f| !weights.contains(&f.path))
            .collect()
    }
    fn stream(&mut self, path: &str, intake: &mut dyn Intake) -> Result<(), VerifyError> {
        let fail = |problem| VerifyError::File {
            model: self.name.clone(),
            path: path.to_owned(),
            problem,
        };
        let file = VerifiedModel::file(self, path).ok_or_else(|| fail(FileProblem::NotStreamed))?;
        intake
            .take(&file.bytes)
            .map_err(|e| fail(FileProblem::Intake(e)))
    }
    fn finish(self) -> Result<(), VerifyError> {
        Ok(())
    }
}

/// What to do with a listed file's bytes while checking a directory.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Read, verify and keep them.
    Keep,
    /// Read and verify them, keeping nothing.
    Discard,
    /// Only check that the file is there, a regular file, of the right size; it is read later.
    Defer,
}

type Checked = (FileReport, Option<Vec<u8>>);

/// Checks listed files in parallel (one thread per core) and finds unlisted ones.
fn check_dir(
    entry: &ModelEntry,
    dir: &Path,
    progress: &dyn Progress,
    mode: &(dyn Fn(&LockedFile) -> Mode + Sync),
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
            return Err(dir_error(io::Error::other(format!(
                "not a directory but {}",
                crate::files::kind_of(m.file_type())
            ))));
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
                    let checked = check_listed(dir, file, progress, mode(file));
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
                DiskEntry::Other(kind) => FileProblem::NotRegularFile(kind),
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

/// Checks one listed file as `mode` says. A deferred file reports the lock's digest, which its
/// stream must still match.
fn check_listed(dir: &Path, file: &LockedFile, progress: &dyn Progress, mode: Mode) -> Checked {
    let mut kept = (mode == Mode::Keep).then(Vec::new);
    let outcome = match mode {
        Mode::Defer => open_listed(dir, file).map(|_| file.sha256),
        Mode::Keep | Mode::Discard => read_listed(dir, file, progress, &mut |chunk| {
            if let Some(bytes) = &mut kept {
                bytes.extend_from_slice(chunk);
            }
            Ok(())
        })
        .and_then(|actual| matches_lock(file, actual)),
    };
    match outcome {
        Ok(sha256) => (report(file, Some(file.size), Ok(sha256)), kept),
        Err((size, problem)) => (report(file, size, Err(problem)), None),
    }
}

type Problem = (Option<u64>, FileProblem);

fn matches_lock(file: &LockedFile, actual: Sha256Digest) -> Result<Sha256Digest, Problem> {
    if actual == file.sha256 {
        Ok(actual)
    } else {
        Err((
            Some(file.size),
            FileProblem::DigestMismatch {
                expected: file.sha256,
                actual,
            },
        ))
    }
}

/// Opens a listed file, refusing symlinks anywhere on its path, non-regular files and a size other
/// than the lock's.
fn open_listed(dir: &Path, file: &LockedFile) -> Result<File, Problem> {
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
            Ok(m) if !m.is_dir() && !m.is_file() => {
                return Err((
                    None,
                    FileProblem::NotRegularFile(crate::files::kind_of(m.file_type())),
                ));
            }
            Ok(_) => {}
        }
    }
    // Opened without blocking and judged by its handle: a FIFO put in the file's place can neither
    // hang the open nor be read.
    let path = dir.join(&file.path);
    let handle = crate::files::open_regular(&path).map_err(|e| {
        if e.kind() == io::ErrorKind::InvalidInput {
            let kind = fs::symlink_metadata(&path).map_or("a file of another type", |m| {
                crate::files::kind_of(m.file_type())
            });
            (None, FileProblem::NotRegularFile(kind))
        } else {
            (None, e.into())
        }
    })?;
    let meta = handle.metadata().map_err(|e| (None, e.into()))?;
    if meta.len() != file.size {
        return Err((
            Some(meta.len()),
            FileProblem::SizeMismatch {
                expected: file.size,
                actual: meta.len(),
            },
        ));
    }
    Ok(handle)
}

/// Reads a listed file once in chunks of [`HASH_CHUNK`], hashing every byte, and passes the bytes
/// to `sink` in order: first its start, once the format check passed on it
/// ([`check_model_file_start`]: for Safetensors, the whole header), then each chunk as it is read.
/// Reads at most one byte more than the lock's size, so a file that grows is caught without
/// reading it all. Returns the digest of what was read.
fn read_listed(
    dir: &Path,
    file: &LockedFile,
    progress: &dyn Progress,
    sink: &mut dyn FnMut(&[u8]) -> Result<(), FileProblem>,
) -> Result<Sha256Digest, Problem> {
    let handle = open_listed(dir, file)?;
    let task = progress.start(&file.path, Some(file.size));
    let mut reader = handle.take(file.size.saturating_add(1));
    let mut buf = vec![0u8; HASH_CHUNK];
    let mut hasher = Sha256Hasher::new();
    let mut total = 0u64;
    // The file's start, gathered until the format check has what it needs; None once passed on.
    let mut start = Some(Vec::new());
    let fail = |problem| (Some(file.size), problem);
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err((None, e.into())),
        };
        let chunk = &buf[..n];
        hasher.update(chunk);
        total += n as u64;
        task.advance(n as u64);
        match &mut start {
            None => sink(chunk).map_err(fail)?,
            Some(gathered) => {
                gathered.extend_from_slice(chunk);
                if (gathered.len() as u64) >= start_len(gathered, file.size) {
                    check_model_file_start(&file.path, gathered, file.size)
                        .map_err(|e| fail(e.into()))?;
                    sink(gathered).map_err(fail)?;
                    start = None;
                }
            }
        }
    }
    if total != file.size {
        return Err((
            Some(total),
            FileProblem::SizeMismatch {
                expected: file.size,
                actual: total,
            },
        ));
    }
    if let Some(gathered) = start {
        // Only an empty file gets here: any other reaches its start length by its end.
        check_model_file_start(&file.path, &gathered, file.size).map_err(|e| fail(e.into()))?;
        sink(&gathered).map_err(fail)?;
    }
    Ok(hasher.finish())
}

enum DiskEntry {
    File,
    Symlink,
    /// A FIFO, socket or device, named for the message.
    Other(&'static str),
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
            out.push((rel, DiskEntry::Other(crate::files::kind_of(kind))));
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
    if let Ok(f) = crate::files::open_regular(path) {
        // An unreadable prefix only makes the message less specific; the file is refused regardless.
        let _ = f.take(64).read_to_end(&mut prefix);
    }
    prefix
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lockfile::{HfSource, Source, Task};

    /// A Safetensors file of one U8 tensor of `len` bytes (several read chunks when large).
    fn safetensors(len: usize, fill: u8) -> Vec<u8> {
        let data = vec![fill; len];
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![len], &data)
            .expect("view");
        safetensors::serialize([("w", view)], None).expect("serializes")
    }

    fn model(files: &[(&str, &[u8])]) -> (tempfile::TempDir, ModelEntry) {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let locked = files
            .iter()
            .map(|(path, bytes)| {
                fs::write(dir.path().join(path), bytes).expect("writes");
                LockedFile {
                    path: (*path).to_owned(),
                    sha256: Sha256Digest::of(bytes),
                    size: bytes.len() as u64,
                }
            })
            .collect();
        let source = Source::Hf(HfSource {
            repo: "org/tiny".to_owned(),
            revision: "0123456789abcdef0123456789abcdef01234567".to_owned(),
            files: None,
        });
        let entry = ModelEntry::new("tiny", Task::Chat, "llama", "MIT", source, locked);
        (dir, entry)
    }

    /// Opens `entry` in `dir` as the store does: Safetensors files streamed, the rest kept.
    fn open<'a>(
        entry: &'a ModelEntry,
        dir: &tempfile::TempDir,
    ) -> Result<StreamedLoad<'a>, VerifyError> {
        begin_load(
            entry,
            dir.path(),
            &crate::progress::NoProgress,
            is_safetensors_name,
        )
    }

    /// Gathers what it is streamed, recording each chunk's size.
    #[derive(Default)]
    struct Collect {
        bytes: Vec<u8>,
        chunks: Vec<usize>,
    }

    impl Intake for Collect {
        fn take(&mut self, chunk: &[u8]) -> Result<(), IntakeError> {
            self.bytes.extend_from_slice(chunk);
            self.chunks.push(chunk.len());
            Ok(())
        }
    }

    #[test]
    fn streamed_bytes_are_the_file_in_bounded_chunks_and_kept_files_stay_in_memory() {
        let weights = safetensors(3 * HASH_CHUNK + 17, 7);
        let (dir, entry) = model(&[("config.json", b"{}"), ("model.safetensors", &weights)]);
        let mut load = open(&entry, &dir).expect("begins");
        assert_eq!(load.to_stream(), ["model.safetensors"]);
        assert_eq!(
            load.file("config.json").map(|f| f.bytes.as_slice()),
            Some(&b"{}"[..])
        );
        let mut intake = Collect::default();
        load.stream("model.safetensors", &mut intake)
            .expect("streams");
        assert_eq!(intake.bytes, weights);
        assert!(intake.chunks.iter().all(|&n| n <= HASH_CHUNK));
        let verified = load.finish().expect("finishes");
        assert!(verified.file("model.safetensors").is_none());
        assert_eq!(verified.streamed.len(), 1);
        assert_eq!(verified.streamed[0].sha256, entry.files[1].sha256);
    }

    #[test]
    fn a_byte_changed_after_the_lock_was_made_fails_the_stream_after_its_bytes_went_by() {
        let weights = safetensors(2 * HASH_CHUNK, 1);
        let (dir, entry) = model(&[("model.safetensors", &weights)]);
        let mut tampered = weights.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        fs::write(dir.path().join("model.safetensors"), &tampered).expect("writes");
        let mut load = open(&entry, &dir).expect("sizes still match");
        let mut intake = Collect::default();
        let err = load
            .stream("model.safetensors", &mut intake)
            .expect_err("refused");
        assert!(
            matches!(&err, VerifyError::File { path, problem: FileProblem::DigestMismatch { .. }, .. } if path == "model.safetensors"),
            "{err}"
        );
        assert!(err.is_refusal());
        // The intake did see the bytes: the refusal is what keeps them from inference.
        assert_eq!(intake.bytes, tampered);
    }

    #[test]
    fn a_malformed_header_is_refused_before_any_byte_reaches_the_intake() {
        let mut weights = safetensors(64, 0);
        weights[8] = b' '; // Whitespace before the header's `{`.
        let (dir, entry) = model(&[("model.safetensors", &weights)]);
        let mut load = open(&entry, &dir).expect("begins");
        let mut intake = Collect::default();
        let err = load
            .stream("model.safetensors", &mut intake)
            .expect_err("refused");
        assert!(matches!(
            err,
            VerifyError::File {
                problem: FileProblem::Format(_),
                ..
            }
        ));
        assert!(intake.bytes.is_empty());
    }

    #[test]
    fn missing_weights_fail_at_the_start_and_unstreamed_ones_are_hashed_at_the_end() {
        let weights = safetensors(100, 3);
        let (dir, entry) = model(&[("a.safetensors", &weights), ("b.safetensors", &weights)]);
        fs::remove_file(dir.path().join("b.safetensors")).expect("removes");
        let err = open(&entry, &dir).err().expect("refused");
        assert!(err.to_string().contains("b.safetensors: missing"), "{err}");

        fs::write(dir.path().join("b.safetensors"), safetensors(100, 4)).expect("writes");
        let load = open(&entry, &dir).expect("sizes match");
        // Nothing streamed: finish still hashes both and finds b's swap.
        let err = load.finish().expect_err("refused");
        assert!(
            err.to_string().contains("b.safetensors: sha256 mismatch"),
            "{err}"
        );
    }

    #[test]
    fn an_intake_error_names_the_file_and_is_not_a_refusal() {
        struct Refuse;
        impl Intake for Refuse {
            fn take(&mut self, _: &[u8]) -> Result<(), IntakeError> {
                Err("dtype I64 cannot be a weight".into())
            }
        }
        let weights = safetensors(10, 0);
        let (dir, entry) = model(&[("model.safetensors", &weights)]);
        let mut load = open(&entry, &dir).expect("begins");
        let err = load
            .stream("model.safetensors", &mut Refuse)
            .expect_err("fails");
        assert_eq!(
            err.to_string(),
            "model \"tiny\": model.safetensors: cannot be loaded: dtype I64 cannot be a weight"
        );
        assert!(!err.is_refusal());
        assert!(load.stream("config.json", &mut Refuse).is_err());
    }
}
