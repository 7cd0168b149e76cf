//! The `hf` source against a real HTTP server on 127.0.0.1 (tests/support/hf_server.rs): hf-hub's real
//! protocol, byte-exact downloads, and every failure leaving no file behind.

#[path = "../../tests/support/hf_server.rs"]
mod hf_server;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use attest::Sha256Digest;
use attest::progress::{NoProgress, Progress, ProgressTask};
use hf_server::HfServer;
use runner::source::hf::{HfError, HfFile, HfRequest, fetch};

const REPO: &str = "sanctum-test/tiny-embed";
const COMMIT: &str = "a3f1c4e8b2d7960f5e1a4c3b2d1e0f9a8b7c6d5e";
const OTHER_COMMIT: &str = "0000000000000000000000000000000000000001";
const WEIGHTS: &str = "model.safetensors";
const POOLING: &str = "1_Pooling/config.json";

/// Deterministic incompressible bytes.
fn noise(len: usize) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

fn repo_files() -> Vec<(String, Vec<u8>)> {
    vec![
        (
            "config.json".to_string(),
            b"{\"hidden_size\": 8, \"num_layers\": 1}\n".to_vec(),
        ),
        (
            POOLING.to_string(),
            b"{\"pooling_mode_mean_tokens\": true}\n".to_vec(),
        ),
        // Over the server's LFS threshold: served through a redirect, with ranges.
        (WEIGHTS.to_string(), noise(3 * 1024 * 1024 + 4321)),
    ]
}

/// What a lock would say about `files`.
fn locked(files: &[(String, Vec<u8>)]) -> Vec<HfFile> {
    files
        .iter()
        .map(|(path, bytes)| HfFile {
            path: path.clone(),
            size: Some(bytes.len() as u64),
            sha256: Some(Sha256Digest::of(bytes)),
        })
        .collect()
}

fn request<'a>(endpoint: &'a str, revision: &'a str, files: &'a [HfFile]) -> HfRequest<'a> {
    HfRequest {
        endpoint,
        repo: REPO,
        revision,
        files,
        token: None,
    }
}

/// A staging directory `dest` inside a temporary directory of its own (where the fetch puts its cache).
struct Staging {
    root: tempfile::TempDir,
    dest: PathBuf,
}

impl Staging {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("staging");
        Staging { root, dest }
    }

    /// Every entry under `dest`, relative, `/`-separated; panics on anything but directories and files.
    fn files(&self) -> Vec<String> {
        fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries {
                let entry = entry.unwrap();
                let kind = entry.file_type().unwrap();
                if kind.is_dir() {
                    walk(&entry.path(), base, out);
                } else {
                    assert!(
                        kind.is_file(),
                        "{} is not a regular file",
                        entry.path().display()
                    );
                    let rel = entry
                        .path()
                        .strip_prefix(base)
                        .unwrap()
                        .to_string_lossy()
                        .replace('\\', "/");
                    out.push(rel);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.dest, &self.dest, &mut out);
        out.sort();
        out
    }

    /// The temporary cache is gone: only `dest` is left beside it.
    fn assert_cache_removed(&self) {
        let left: Vec<_> = std::fs::read_dir(self.root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name != "staging")
            .collect();
        assert!(left.is_empty(), "left beside dest: {left:?}");
    }
}

/// One started task: label, announced total, bytes reported so far.
type Task = (String, Option<u64>, Arc<AtomicU64>);

/// Records the progress tasks started and the bytes each reported.
#[derive(Default)]
struct Recorder {
    tasks: Mutex<Vec<Task>>,
}

struct Counter(Arc<AtomicU64>);

impl ProgressTask for Counter {
    fn advance(&self, bytes: u64) {
        self.0.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl Progress for Recorder {
    fn start(&self, label: &str, total: Option<u64>) -> Box<dyn ProgressTask + '_> {
        let counter = Arc::new(AtomicU64::new(0));
        self.tasks
            .lock()
            .unwrap()
            .push((label.to_string(), total, Arc::clone(&counter)));
        Box::new(Counter(counter))
    }
}

impl Recorder {
    fn totals(&self) -> Vec<(String, Option<u64>, u64)> {
        let mut out: Vec<_> = self
            .tasks
            .lock()
            .unwrap()
            .iter()
            .map(|(label, total, done)| (label.clone(), *total, done.load(Ordering::Relaxed)))
            .collect();
        out.sort();
        out
    }
}

#[test]
fn fetches_a_pinned_commit_byte_for_byte() {
    let files = repo_files();
    let server = HfServer::start(REPO, COMMIT, files.clone());
    let lock = locked(&files);
    let staging = Staging::new();
    let progress = Recorder::default();
    let endpoint = server.endpoint();

    let commit = fetch(&request(&endpoint, COMMIT, &lock), &staging.dest, &progress).unwrap();

    assert_eq!(commit, COMMIT);
    for (path, bytes) in &files {
        assert_eq!(
            &std::fs::read(staging.dest.join(path)).unwrap(),
            bytes,
            "{path}"
        );
    }
    assert_eq!(
        staging.files(),
        ["1_Pooling/config.json", "config.json", "model.safetensors"]
    );
    staging.assert_cache_removed();

    let mut expected: Vec<_> = files
        .iter()
        .map(|(path, bytes)| (path.clone(), Some(bytes.len() as u64), bytes.len() as u64))
        .collect();
    expected.sort();
    assert_eq!(progress.totals(), expected);

    let requests = server.requests();
    let resolves: Vec<_> = requests.iter().filter(|r| r.is_resolve()).collect();
    assert!(!resolves.is_empty());
    for r in &resolves {
        assert!(
            r.target.starts_with(&format!("/{REPO}/resolve/{COMMIT}/")),
            "{}",
            r.target
        );
        assert_eq!(
            r.status,
            if r.target.ends_with(WEIGHTS) {
                302
            } else {
                206
            },
            "{}",
            r.target
        );
    }
    assert!(
        resolves
            .iter()
            .any(|r| r.target.ends_with("/1_Pooling/config.json"))
    );
    // The weights came from the "CDN" in ranged requests: a probe of byte 0, then the body.
    let lfs: Vec<_> = requests.iter().filter(|r| r.is_lfs()).collect();
    assert!(
        lfs.iter()
            .any(|r| r.header("range") == Some("bytes=0-0") && r.status == 206)
    );
    assert!(
        lfs.iter()
            .any(|r| r.header("range") == Some("bytes=0-") && r.status == 206)
    );
    assert!(requests.iter().all(|r| r.header("authorization").is_none()));
    assert!(
        requests
            .iter()
            .all(|r| r.header("user-agent").unwrap_or("").contains("sanctum/"))
    );
}

#[test]
fn resolves_a_branch_once_and_pins_every_file_to_its_commit() {
    let files = repo_files();
    let server = HfServer::start(REPO, COMMIT, files.clone());
    server.add_ref("v1.0");
    // No expectations: the server's sizes are used and nothing is hashed.
    let lock: Vec<_> = files
        .iter()
        .map(|(path, _)| HfFile::unpinned(path))
        .collect();
    let staging = Staging::new();
    let endpoint = server.endpoint();

    let commit = fetch(
        &request(&endpoint, "v1.0", &lock),
        &staging.dest,
        &NoProgress,
    )
    .unwrap();

    assert_eq!(commit, COMMIT);
    for (path, bytes) in &files {
        assert_eq!(
            &std::fs::read(staging.dest.join(path)).unwrap(),
            bytes,
            "{path}"
        );
    }
    let resolves: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.is_resolve())
        .map(|r| r.target)
        .collect();
    assert_eq!(resolves[0], format!("/{REPO}/resolve/v1.0/config.json"));
    assert!(
        resolves[1..]
            .iter()
            .all(|t| t.contains(&format!("/resolve/{COMMIT}/"))),
        "{resolves:#?}"
    );
}

#[test]
fn sends_the_token_and_reports_a_refusal() {
    let files = repo_files();
    let server = HfServer::start(REPO, COMMIT, files.clone());
    server.require_token("hf_secret");
    let lock = locked(&files);
    let endpoint = server.endpoint();

    let staging = Staging::new();
    let err = fetch(
        &request(&endpoint, COMMIT, &lock),
        &staging.dest,
        &NoProgress,
    )
    .unwrap_err();
    assert!(
        matches!(
            &err,
            HfError::Unauthorized {
                status: 401,
                token_given: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("needs a token"), "{err}");
    assert!(staging.files().is_empty());

    let mut req = request(&endpoint, COMMIT, &lock);
    req.token = Some("hf_wrong");
    let err = fetch(&req, &staging.dest, &NoProgress).unwrap_err();
    assert!(
        matches!(
            &err,
            HfError::Unauthorized {
                token_given: true,
                ..
            }
        ),
        "{err:?}"
    );

    req.token = Some("hf_secret");
    server.clear_requests();
    assert_eq!(fetch(&req, &staging.dest, &NoProgress).unwrap(), COMMIT);
    assert_eq!(staging.files().len(), 3);
    for r in server.requests().iter().filter(|r| r.is_resolve()) {
        assert_eq!(r.header("authorization"), Some("Bearer hf_secret"));
    }
}

#[test]
fn a_wrong_sha256_fails_and_leaves_no_file() {
    let files = repo_files();
    let server = HfServer::start(REPO, COMMIT, files.clone());
    let mut lock = locked(&files);
    lock[1].sha256 = Some(Sha256Digest::of(b"something else"));
    let staging = Staging::new();
    let endpoint = server.endpoint();

    let err = fetch(
        &request(&endpoint, COMMIT, &lock),
        &staging.dest,
        &NoProgress,
    )
    .unwrap_err();

    match &err {
        HfError::Sha256Mismatch {
            path,
            expected,
            actual,
            ..
        } => {
            assert_eq!(path, POOLING);
            assert_eq!(*expected, Sha256Digest::of(b"something else"));
            assert_eq!(*actual, Sha256Digest::of(&files[1].1));
        }
        other => panic!("expected a sha256 mismatch, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains(POOLING) && message.contains(REPO),
        "{message}"
    );
    assert!(!staging.dest.join(POOLING).exists());
    assert!(!staging.files().contains(&POOLING.to_string()));
    staging.assert_cache_removed();
}

#[test]
fn a_stream_corrupted_midway_fails_and_leaves_no_file() {
    let files = repo_files();
    let server = HfServer::start(REPO, COMMIT, files.clone());
    server.corrupt_after(WEIGHTS, 2 * 1024 * 1024 + 17);
    let lock = locked(&files);
    let staging = Staging::new();
    let endpoint = server.endpoint();

    let err = fetch(
        &request(&endpoint, COMMIT, &lock),
        &staging.dest,
        &NoProgress,
    )
    .unwrap_err();

    assert!(
        matches!(&err, HfError::Sha256Mismatch { path, .. } if path == WEIGHTS),
        "{err:?}"
    );
    assert!(!staging.dest.join(WEIGHTS).exists());
    assert!(
        !staging.files().iter().any(|f| f.contains("safetensors")),
        "{:?}",
        staging.files()
    );
    staging.assert_cache_removed();
}

#[test]
fn a_stream_cut_midway_fails_even_without_expectations_and_leaves_no_file() {
    let files = repo_files();
    let server = HfServer::start(REPO, COMMIT, files.clone());
    server.truncate_after(WEIGHTS, 1024 * 1024 + 5);
    let lock: Vec<_> = files
        .iter()
        .map(|(path, _)| HfFile::unpinned(path))
        .collect();
    let staging = Staging::new();
    let endpoint = server.endpoint();

    let err = fetch(
        &request(&endpoint, COMMIT, &lock),
        &staging.dest,
        &NoProgress,
    )
    .unwrap_err();

    assert!(
        matches!(&err, HfError::Download { path, .. } if path == WEIGHTS),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&endpoint) && message.contains(WEIGHTS),
        "{message}"
    );
    assert!(!staging.dest.join(WEIGHTS).exists());
    staging.assert_cache_removed();
    // hf-hub resumed from where the body broke off before giving up.
    let resumed = format!("bytes={}-", 1024 * 1024 + 5);
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.header("range") == Some(resumed.as_str()))
    );
}

#[test]
fn a_missing_file_is_a_404_naming_it_and_nothing_is_downloaded() {
    let files = repo_files();
    let server = HfServer::start(REPO, COMMIT, files.clone());
    let mut lock = locked(&files);
    lock.push(HfFile::unpinned("2_Dense/model.safetensors"));
    let staging = Staging::new();
    let endpoint = server.endpoint();

    let err = fetch(
        &request(&endpoint, COMMIT, &lock),
        &staging.dest,
        &NoProgress,
    )
    .unwrap_err();

    assert!(
        matches!(&err, HfError::NotFound { path, revision, .. } if path == "2_Dense/model.safetensors" && revision == COMMIT),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("2_Dense/model.safetensors") && message.contains(&endpoint),
        "{message}"
    );
    // Every file is resolved before any is downloaded: the weights' body was never asked for.
    assert!(staging.files().is_empty());
    assert!(
        !server
            .requests()
            .iter()
            .any(|r| r.header("range") == Some("bytes=0-"))
    );
}

#[test]
fn a_server_error_is_reported_with_its_status() {
    let files = repo_files();
    let server = HfServer::start(REPO, COMMIT, files.clone());
    server.fail_with("config.json", 502);
    let lock = locked(&files);
    let staging = Staging::new();
    let endpoint = server.endpoint();

    let err = fetch(
        &request(&endpoint, COMMIT, &lock),
        &staging.dest,
        &NoProgress,
    )
    .unwrap_err();

    assert!(
        matches!(&err, HfError::Status { status: 502, path, .. } if path == "config.json"),
        "{err:?}"
    );
    assert!(staging.files().is_empty());
}

#[test]
fn another_commit_than_the_pinned_one_is_refused() {
    let files = repo_files();
    let server = HfServer::start(REPO, COMMIT, files.clone());
    server.report_commit(OTHER_COMMIT);
    let lock = locked(&files);
    let staging = Staging::new();
    let endpoint = server.endpoint();

    let err = fetch(
        &request(&endpoint, COMMIT, &lock),
        &staging.dest,
        &NoProgress,
    )
    .unwrap_err();

    match &err {
        HfError::RevisionMismatch {
            requested,
            resolved,
            ..
        } => {
            assert_eq!(requested, COMMIT);
            assert_eq!(resolved, OTHER_COMMIT);
        }
        other => panic!("expected a revision mismatch, got {other:?}"),
    }
    assert!(staging.files().is_empty());
}

#[test]
fn a_size_differing_from_the_lock_fails_before_downloading() {
    let files = repo_files();
    let server = HfServer::start(REPO, COMMIT, files.clone());
    let mut lock = locked(&files);
    lock[2].size = Some(1000);
    let staging = Staging::new();
    let endpoint = server.endpoint();

    let err = fetch(
        &request(&endpoint, COMMIT, &lock),
        &staging.dest,
        &NoProgress,
    )
    .unwrap_err();

    match &err {
        HfError::SizeMismatch {
            path,
            expected,
            actual,
            ..
        } => {
            assert_eq!(path, WEIGHTS);
            assert_eq!(*expected, 1000);
            assert_eq!(*actual, files[2].1.len() as u64);
        }
        other => panic!("expected a size mismatch, got {other:?}"),
    }
    assert!(staging.files().is_empty());
    assert!(
        !server
            .requests()
            .iter()
            .any(|r| r.header("range") == Some("bytes=0-"))
    );
}

#[test]
fn an_endpoint_with_nothing_listening_is_named_in_the_error() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let lock = locked(&repo_files());
    let staging = Staging::new();

    let err = fetch(
        &request(&endpoint, COMMIT, &lock),
        &staging.dest,
        &NoProgress,
    )
    .unwrap_err();

    assert!(
        matches!(&err, HfError::Connect { endpoint: e, .. } if *e == endpoint),
        "{err:?}"
    );
    assert!(err.to_string().contains(&endpoint), "{err}");
    assert!(staging.files().is_empty());
    staging.assert_cache_removed();
}

#[test]
fn paths_that_could_leave_dest_are_refused_before_any_request() {
    let server = HfServer::start(REPO, COMMIT, repo_files());
    let endpoint = server.endpoint();
    let staging = Staging::new();
    for bad in ["../escape", "/etc/passwd", "a/./b", "dir/"] {
        let lock = [HfFile::unpinned(bad)];
        let err = fetch(
            &request(&endpoint, COMMIT, &lock),
            &staging.dest,
            &NoProgress,
        )
        .unwrap_err();
        assert!(
            matches!(&err, HfError::InvalidPath { path, .. } if path == bad),
            "{err:?}"
        );
    }
    assert!(server.requests().is_empty());
}

#[test]
fn an_empty_file_list_resolves_the_commit_through_the_model_api() {
    let server = HfServer::start(REPO, COMMIT, repo_files());
    let endpoint = server.endpoint();
    let staging = Staging::new();

    let commit = fetch(&request(&endpoint, "main", &[]), &staging.dest, &NoProgress).unwrap();

    assert_eq!(commit, COMMIT);
    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].target,
        format!("/api/models/{REPO}/revision/main")
    );
    staging.assert_cache_removed();
}
