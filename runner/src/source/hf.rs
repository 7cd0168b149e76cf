//! The `hf` source: pinned files of a Hugging Face hub repository, downloaded with the hf-hub crate.
//!
//! hf-hub (its blocking `api::sync`, over ureq with rustls) speaks the protocol: it resolves each file with a
//! `GET {endpoint}/{repo}/resolve/{revision}/{path}` for `Range: bytes=0-0` (reading `X-Repo-Commit`,
//! `ETag`/`X-Linked-Etag` and the size from `Content-Range`, following redirects to a CDN), then downloads
//! the bytes with `Range: bytes={resume}-` into a blob of its cache and links it from a snapshot
//! directory. sanctum gives it a throw-away cache next to `dest`, never `~/.cache`, and moves each blob
//! into `dest/<path>` as a regular file only once its size and sha256 are checked.
//!
//! Before downloading anything, every file is resolved once: a missing file, a refused token or a size
//! that differs from the lock fails before gigabytes move. The revision is resolved to a commit on the
//! first file and every later request names that commit, so all files come from one snapshot even if a
//! branch moves meanwhile.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use attest::Sha256Digest;
use attest::progress::{Progress, ProgressTask};
use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

/// The public hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The commit id a sanctum hub serves `entry` at: the first 40 hex digits of the model digest, so
/// a revision pins exactly the files the lock lists (a new lock entry is a new commit).
pub fn hub_commit(entry: &attest::lockfile::ModelEntry) -> String {
    entry.digest.to_hex()[..40].to_owned()
}

/// How many times hf-hub resumes a download that broke off (with `Range: bytes={done}-`).
const DOWNLOAD_RETRIES: usize = 3;

/// What to fetch: `files` of the model repository `repo` at `revision`, from `endpoint`.
#[derive(Clone, Copy)]
pub struct HfRequest<'a> {
    /// Base URL of the hub, e.g. [`DEFAULT_ENDPOINT`] or `http://127.0.0.1:PORT` (a trailing `/` is ignored).
    pub endpoint: &'a str,
    /// Model repository id, e.g. `sentence-transformers/all-MiniLM-L6-v2`.
    pub repo: &'a str,
    /// A 40-hex commit (then the hub must report exactly that commit), a branch or a tag.
    pub revision: &'a str,
    /// The files to download, with what the lock says about them.
    pub files: &'a [HfFile],
    /// Bearer token for gated or private repositories.
    pub token: Option<&'a str>,
}

impl fmt::Debug for HfRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HfRequest")
            .field("endpoint", &self.endpoint)
            .field("repo", &self.repo)
            .field("revision", &self.revision)
            .field("files", &self.files)
            .field("token", &self.token.map(|_| "<redacted>"))
            .finish()
    }
}

/// One file of the repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfFile {
    /// Path inside the repository, `/`-separated, e.g. `1_Pooling/config.json`.
    pub path: String,
    /// Expected size in bytes, checked against the hub's answer before downloading and against the bytes after.
    pub size: Option<u64>,
    /// Expected digest, checked before the file is put into `dest`.
    pub sha256: Option<Sha256Digest>,
}

impl HfFile {
    /// A file to fetch with no expectations: the hub's size is used and nothing is hashed.
    pub fn unpinned(path: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            size: None,
            sha256: None,
        }
    }
}

/// Why a fetch failed. Each names the repository, and the file and endpoint where they matter.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    /// A file path that could leave `dest` or is not a plain relative path.
    #[error("{repo}: invalid file path {path:?}: {reason}")]
    InvalidPath {
        /// Repository id.
        repo: String,
        /// The path as given.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The endpoint could not be reached (refused, unknown host, connect timeout, connection dropped while
    /// resolving).
    #[error("cannot connect to {endpoint} to fetch {repo}: {reason}")]
    Connect {
        /// Endpoint.
        endpoint: String,
        /// Repository id.
        repo: String,
        /// The transport's explanation.
        reason: String,
    },
    /// HTTP 404: the repository, the revision or the file does not exist (the hub answers all three alike).
    #[error(
        "{endpoint}: {repo} at revision {revision} has no file {path:?} (HTTP 404: the repository, revision or file does not exist)"
    )]
    NotFound {
        /// Endpoint.
        endpoint: String,
        /// Repository id.
        repo: String,
        /// Revision asked for.
        revision: String,
        /// File path.
        path: String,
    },
    /// HTTP 401/403: the repository is gated or private and the token is missing or not accepted.
    #[error("{endpoint}: access to {repo} (file {path:?}) refused with HTTP {status}: {}",
        if *.token_given { "the token was not accepted" } else { "the repository needs a token" })]
    Unauthorized {
        /// Endpoint.
        endpoint: String,
        /// Repository id.
        repo: String,
        /// File path.
        path: String,
        /// 401 or 403.
        status: u16,
        /// Whether a token was sent.
        token_given: bool,
    },
    /// Any other HTTP error status.
    #[error("{endpoint}: {repo} at revision {revision}, file {path:?}: HTTP {status}")]
    Status {
        /// Endpoint.
        endpoint: String,
        /// Repository id.
        repo: String,
        /// Revision asked for.
        revision: String,
        /// File path.
        path: String,
        /// The status code.
        status: u16,
    },
    /// The hub resolved the revision to another commit than the one pinned.
    #[error(
        "{endpoint}: {repo}: asked for commit {requested}, the hub answered with commit {resolved}"
    )]
    RevisionMismatch {
        /// Endpoint.
        endpoint: String,
        /// Repository id.
        repo: String,
        /// The commit asked for (or resolved from the first file).
        requested: String,
        /// The commit the hub reported.
        resolved: String,
    },
    /// The size differs from the expected one: as the hub reports it, or as downloaded.
    #[error("{repo}: {path}: size mismatch: expected {expected} bytes, {found} {actual}")]
    SizeMismatch {
        /// Repository id.
        repo: String,
        /// File path.
        path: String,
        /// Expected size (the lock's, or the hub's for a download).
        expected: u64,
        /// The other size.
        actual: u64,
        /// Where `actual` comes from: "the hub reports" or "downloaded".
        found: &'static str,
    },
    /// The downloaded bytes hash to another digest than expected.
    #[error("{repo}: {path}: sha256 mismatch: expected {expected}, got {actual}")]
    Sha256Mismatch {
        /// Repository id.
        repo: String,
        /// File path.
        path: String,
        /// Expected digest.
        expected: Sha256Digest,
        /// Digest of the downloaded bytes.
        actual: Sha256Digest,
    },
    /// The transfer broke off or failed after the connection was made.
    #[error("{endpoint}: downloading {repo} file {path:?} failed: {reason}")]
    Download {
        /// Endpoint.
        endpoint: String,
        /// Repository id.
        repo: String,
        /// File path.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The hub's answer lacks what the protocol needs (e.g. `X-Repo-Commit`, `ETag`, `Content-Range`).
    #[error("{endpoint}: {repo} file {path:?}: unexpected answer: {reason}")]
    Protocol {
        /// Endpoint.
        endpoint: String,
        /// Repository id.
        repo: String,
        /// File path.
        path: String,
        /// What is missing or wrong.
        reason: String,
    },
    /// Local file-system error.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The local path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Downloads each file of `req.repo` at `req.revision` into `dest/<path>` (dest is a staging directory the
/// caller owns; it is created if missing), checking size and sha256 where given, and reports the bytes
/// received to `progress`, one task per file. Returns the resolved commit hash.
///
/// On error, no file whose download failed or did not check out is left in `dest`; files fetched before it
/// are (the caller discards the staging directory). The hf-hub cache used meanwhile is a temporary directory
/// next to `dest`, removed before returning.
pub fn fetch(req: &HfRequest<'_>, dest: &Path, progress: &dyn Progress) -> Result<String, HfError> {
    for file in req.files {
        check_path(&file.path).map_err(|reason| HfError::InvalidPath {
            repo: req.repo.to_string(),
            path: file.path.clone(),
            reason,
        })?;
    }
    let ctx = Ctx {
        endpoint: req.endpoint.trim_end_matches('/'),
        repo: req.repo,
        token_given: req.token.is_some(),
    };

    fs::create_dir_all(dest).map_err(io_error(dest))?;
    let dest = fs::canonicalize(dest).map_err(io_error(dest))?;
    let cache_dir = cache_dir_for(&dest)?;
    let cache = Cache::new(cache_dir.path().to_path_buf());
    let api = ApiBuilder::from_cache(cache.clone())
        .with_endpoint(ctx.endpoint.to_string())
        .with_token(req.token.map(str::to_owned))
        .with_progress(false)
        .with_retries(DOWNLOAD_RETRIES)
        .with_user_agent("sanctum", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| ctx.api_error(e, "", req.revision, Stage::Resolve))?;

    let (commit, sizes) = resolve(&api, &ctx, req)?;

    let pinned = Repo::with_revision(req.repo.to_string(), RepoType::Model, commit.clone());
    let api_repo = api.repo(pinned.clone());
    let snapshot = cache.repo(pinned).pointer_path(&commit);
    for (file, size) in req.files.iter().zip(sizes) {
        let url_path = encode_path(&file.path);
        let task = TaskProgress::new(progress, &file.path, size);
        let pointer = api_repo
            .download_with_progress(&url_path, task)
            .map_err(|e| ctx.api_error(e, &file.path, &commit, Stage::Download))?;
        if pointer != snapshot.join(&url_path) {
            return Err(ctx.protocol(
                &file.path,
                "the hub switched to another commit during the download",
            ));
        }
        let blob = fs::canonicalize(&pointer).map_err(io_error(&pointer))?;
        check_download(req.repo, file, size, &blob)?;
        place(&blob, &dest.join(&file.path))?;
    }
    cache_dir.close().map_err(io_error(&dest))?;
    Ok(commit)
}

/// Resolves every file once (no body transferred): the commit, and each file's size as the hub reports it.
fn resolve(api: &Api, ctx: &Ctx<'_>, req: &HfRequest<'_>) -> Result<(String, Vec<u64>), HfError> {
    let mut commit: Option<String> = None;
    let mut sizes = Vec::with_capacity(req.files.len());
    for file in req.files {
        let revision = commit.as_deref().unwrap_or(req.revision);
        let repo = Repo::with_revision(req.repo.to_string(), RepoType::Model, revision.to_string());
        let url = api.repo(repo).url(&encode_path(&file.path));
        let meta = api
            .metadata(&url)
            .map_err(|e| ctx.api_error(e, &file.path, revision, Stage::Resolve))?;
        // hf-hub names cache paths after these two values: refuse anything that is not a plain name.
        if !is_commit(meta.commit_hash()) {
            return Err(ctx.protocol(
                &file.path,
                &format!(
                    "X-Repo-Commit {:?} is not a commit hash",
                    meta.commit_hash()
                ),
            ));
        }
        let etag = meta.etag();
        if etag.is_empty() || etag.contains(['/', '\\']) || etag.starts_with('.') {
            return Err(ctx.protocol(&file.path, &format!("unusable ETag {etag:?}")));
        }
        match &commit {
            None => {
                check_revision(ctx, req.revision, meta.commit_hash())?;
                commit = Some(meta.commit_hash().to_ascii_lowercase());
            }
            Some(pinned) => check_revision(ctx, pinned, meta.commit_hash())?,
        }
        let size = meta.size() as u64;
        if let Some(expected) = file.size
            && expected != size
        {
            return Err(HfError::SizeMismatch {
                repo: req.repo.to_string(),
                path: file.path.clone(),
                expected,
                actual: size,
                found: "the hub reports",
            });
        }
        sizes.push(size);
    }
    let commit = match commit {
        Some(commit) => commit,
        None => {
            // No files: ask the model API (`/api/models/{repo}/revision/{revision}`) for the commit.
            let repo = Repo::with_revision(
                req.repo.to_string(),
                RepoType::Model,
                req.revision.to_string(),
            );
            let info = api
                .repo(repo)
                .info()
                .map_err(|e| ctx.api_error(e, "", req.revision, Stage::Resolve))?;
            if !is_commit(&info.sha) {
                return Err(ctx.protocol("", &format!("sha {:?} is not a commit hash", info.sha)));
            }
            check_revision(ctx, req.revision, &info.sha)?;
            info.sha.to_ascii_lowercase()
        }
    };
    Ok((commit, sizes))
}

/// A 40-hex `requested` revision must be exactly the commit the hub resolved.
fn check_revision(ctx: &Ctx<'_>, requested: &str, resolved: &str) -> Result<(), HfError> {
    if is_commit(requested) && !requested.eq_ignore_ascii_case(resolved) {
        return Err(HfError::RevisionMismatch {
            endpoint: ctx.endpoint.to_string(),
            repo: ctx.repo.to_string(),
            requested: requested.to_string(),
            resolved: resolved.to_string(),
        });
    }
    Ok(())
}

/// Checks the downloaded blob: a regular file of the size the hub announced (which equals the lock's size
/// when given) and, when given, of the expected digest.
fn check_download(repo: &str, file: &HfFile, size: u64, blob: &Path) -> Result<(), HfError> {
    let meta = fs::symlink_metadata(blob).map_err(io_error(blob))?;
    if !meta.is_file() {
        return Err(HfError::Io {
            path: blob.to_path_buf(),
            source: io::Error::other("hf-hub's cache entry is not a regular file"),
        });
    }
    if meta.len() != size {
        return Err(HfError::SizeMismatch {
            repo: repo.to_string(),
            path: file.path.clone(),
            expected: size,
            actual: meta.len(),
            found: "downloaded",
        });
    }
    if let Some(expected) = file.sha256 {
        let reader = fs::File::open(blob).map_err(io_error(blob))?;
        let (actual, _) = Sha256Digest::of_reader(reader).map_err(io_error(blob))?;
        if actual != expected {
            return Err(HfError::Sha256Mismatch {
                repo: repo.to_string(),
                path: file.path.clone(),
                expected,
                actual,
            });
        }
    }
    Ok(())
}

/// Moves the checked blob to `target`: a rename when the cache is on the same file system (it normally is),
/// else a copy to a temporary name in the target directory, renamed when complete.
fn place(blob: &Path, target: &Path) -> Result<(), HfError> {
    let dir = target.parent().unwrap_or(target);
    fs::create_dir_all(dir).map_err(io_error(dir))?;
    if fs::rename(blob, target).is_ok() {
        return Ok(());
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(".hf-partial-")
        .tempfile_in(dir)
        .map_err(io_error(dir))?;
    let mut reader = fs::File::open(blob).map_err(io_error(blob))?;
    io::copy(&mut reader, tmp.as_file_mut()).map_err(io_error(tmp.path()))?;
    tmp.as_file().sync_all().map_err(io_error(tmp.path()))?;
    tmp.persist(target).map_err(|e| HfError::Io {
        path: target.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

/// hf-hub's cache for one fetch: a hidden temporary directory beside `dest` (same file system, so blobs are
/// renamed into place), or in the system temp directory if that one is not writable.
fn cache_dir_for(dest: &Path) -> Result<tempfile::TempDir, HfError> {
    let beside = dest.parent().and_then(|parent| {
        tempfile::Builder::new()
            .prefix(".hf-cache-")
            .tempdir_in(parent)
            .ok()
    });
    match beside {
        Some(dir) => Ok(dir),
        None => tempfile::Builder::new()
            .prefix("sanctum-hf-cache-")
            .tempdir()
            .map_err(io_error(&std::env::temp_dir())),
    }
}

/// Why `path` is not a plain relative `/`-separated path that stays inside `dest`.
fn check_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("empty");
    }
    if path.contains(['\\', '\0']) {
        return Err("contains a backslash or NUL");
    }
    if path.starts_with('/') || path.ends_with('/') || path.contains("//") {
        return Err("must be relative, without empty components");
    }
    // `Path::components` drops inner `.` segments, so look at the segments themselves too.
    if path
        .split('/')
        .any(|segment| segment == "." || segment == "..")
        || !Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err("must not contain '.' or '..' components");
    }
    Ok(())
}

/// `path` with each `/`-separated segment percent-encoded (hf-hub puts it into the URL verbatim).
fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for byte in path.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> HfError + '_ {
    move |source| HfError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Which requests failed: the first resolution of each file (no body), or a download.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Resolve,
    Download,
}

/// What every error names.
struct Ctx<'a> {
    endpoint: &'a str,
    repo: &'a str,
    token_given: bool,
}

impl Ctx<'_> {
    fn protocol(&self, path: &str, reason: &str) -> HfError {
        HfError::Protocol {
            endpoint: self.endpoint.to_string(),
            repo: self.repo.to_string(),
            path: path.to_string(),
            reason: reason.to_string(),
        }
    }

    fn download(&self, path: &str, reason: String) -> HfError {
        HfError::Download {
            endpoint: self.endpoint.to_string(),
            repo: self.repo.to_string(),
            path: path.to_string(),
            reason,
        }
    }

    fn api_error(&self, err: ApiError, path: &str, revision: &str, stage: Stage) -> HfError {
        match err {
            ApiError::TooManyRetries(last) => match self.api_error(*last, path, revision, stage) {
                HfError::Download { reason, .. } => self.download(
                    path,
                    format!("{reason} (after {DOWNLOAD_RETRIES} resumed attempts)"),
                ),
                other => other,
            },
            ApiError::RequestError(err) => self.transport_error(*err, path, revision, stage),
            ApiError::IoError(err) => self.download(path, err.to_string()),
            ApiError::MissingHeader(header) => self.protocol(path, &format!("no {header} header")),
            ApiError::InvalidHeader(header) => {
                self.protocol(path, &format!("invalid {header} header"))
            }
            ApiError::ParseIntError(err) => {
                self.protocol(path, &format!("invalid Content-Range size: {err}"))
            }
            other => self.download(path, other.to_string()),
        }
    }

    fn transport_error(
        &self,
        err: ureq::Error,
        path: &str,
        revision: &str,
        stage: Stage,
    ) -> HfError {
        let connect = |reason: String| HfError::Connect {
            endpoint: self.endpoint.to_string(),
            repo: self.repo.to_string(),
            reason,
        };
        match err {
            ureq::Error::StatusCode(404) => HfError::NotFound {
                endpoint: self.endpoint.to_string(),
                repo: self.repo.to_string(),
                revision: revision.to_string(),
                path: path.to_string(),
            },
            ureq::Error::StatusCode(status @ (401 | 403)) => HfError::Unauthorized {
                endpoint: self.endpoint.to_string(),
                repo: self.repo.to_string(),
                path: path.to_string(),
                status,
                token_given: self.token_given,
            },
            ureq::Error::StatusCode(status) => HfError::Status {
                endpoint: self.endpoint.to_string(),
                repo: self.repo.to_string(),
                revision: revision.to_string(),
                path: path.to_string(),
                status,
            },
            // While resolving, no body is transferred: an I/O failure (refused, name lookup, reset) means
            // the endpoint is not reachable. Later, only connect-level kinds are.
            ureq::Error::Io(err)
                if stage == Stage::Resolve
                    || matches!(
                        err.kind(),
                        io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::AddrNotAvailable
                            | io::ErrorKind::HostUnreachable
                            | io::ErrorKind::NetworkUnreachable
                            | io::ErrorKind::NotConnected
                    ) =>
            {
                connect(err.to_string())
            }
            err @ (ureq::Error::HostNotFound
            | ureq::Error::ConnectionFailed
            | ureq::Error::Timeout(ureq::Timeout::Resolve | ureq::Timeout::Connect)
            | ureq::Error::BadUri(_)) => connect(err.to_string()),
            err => self.download(path, err.to_string()),
        }
    }
}

/// Feeds hf-hub's progress callbacks into one sanctum progress task. hf-hub re-announces a resumed download
/// from its resume offset, so only bytes past the furthest point reported so far are counted.
struct TaskProgress<'p> {
    progress: &'p dyn Progress,
    label: &'p str,
    total: u64,
    task: Option<Box<dyn ProgressTask + 'p>>,
    position: u64,
    reported: u64,
}

impl<'p> TaskProgress<'p> {
    fn new(progress: &'p dyn Progress, label: &'p str, total: u64) -> Self {
        Self {
            progress,
            label,
            total,
            task: None,
            position: 0,
            reported: 0,
        }
    }
}

impl hf_hub::api::Progress for TaskProgress<'_> {
    fn init(&mut self, _size: usize, _filename: &str) {
        if self.task.is_none() {
            self.task = Some(self.progress.start(self.label, Some(self.total)));
        }
        self.position = 0;
    }

    fn update(&mut self, bytes: usize) {
        self.position += bytes as u64;
        if self.position > self.reported {
            if let Some(task) = &self.task {
                task.advance(self.position - self.reported);
            }
            self.reported = self.position;
        }
    }

    fn finish(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert!(check_path("model.safetensors").is_ok());
        assert!(check_path("1_Pooling/config.json").is_ok());
        for bad in [
            "",
            "/etc/passwd",
            "a/../b",
            "../x",
            "./x",
            "a//b",
            "a/",
            "a\\b",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn encoding() {
        assert_eq!(
            encode_path("1_Pooling/config.json"),
            "1_Pooling/config.json"
        );
        assert_eq!(encode_path("a b/c#d?.bin"), "a%20b/c%23d%3F.bin");
    }

    #[test]
    fn commits() {
        assert!(is_commit("0123456789abcdef0123456789abcdef01234567"));
        assert!(!is_commit("main"));
        assert!(!is_commit("../../0123456789abcdef0123456789abcdef0123"));
    }
}
