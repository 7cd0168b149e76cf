//! The hub's routes: the Hugging Face hub's (as hf-hub and `huggingface_hub` read them) and the
//! trust material's. A model's repository id is its lock name; it answers to the revisions `main`
//! and its commit (`runner::source::hf::hub_commit`). Errors carry the hub's `X-Error-Code`
//! (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`) and a JSON `{"error": …}` body.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use attest::lockfile::{LockedFile, Task, check_relative_path};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio_stream::wrappers::ReceiverStream;

use crate::catalog::{ServedModel, VerifiedFile};
use crate::{Hub, paths};

/// Bytes sent per chunk of a file.
const SEND_CHUNK: usize = 256 << 10;
/// Largest `model.sig` served (OMS signatures are a few KB).
const MAX_SIGNATURE_BYTES: u64 = 1 << 20;

pub(crate) fn router() -> Router<Arc<Hub>> {
    Router::new()
        .route("/api/models", get(list_models))
        .route("/api/models/{*rest}", get(model_api))
        .route(paths::LOCK, get(lock))
        .route(paths::LOCK_SIGNATURE, get(lock_signature))
        .route(&paths::model_signature("{name}"), get(model_signature))
        .route("/{repo}/resolve/{revision}/{*path}", get(resolve))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                None,
                "no such route on this hub (docs/hub.md lists them)",
            )
        })
}

/// An error in the hub's shape: the status, the hub's `X-Error-Code` when there is one, and the
/// message (in the body's `error` and in `X-Error-Message`).
pub(crate) struct Failure {
    status: StatusCode,
    code: Option<&'static str>,
    message: String,
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let mut response =
            (self.status, axum::Json(json!({ "error": self.message }))).into_response();
        if let Some(code) = self.code {
            response
                .headers_mut()
                .insert("x-error-code", HeaderValue::from_static(code));
        }
        if let Ok(value) = HeaderValue::from_str(&self.message) {
            response.headers_mut().insert("x-error-message", value);
        }
        response
    }
}

pub(crate) fn error(status: StatusCode, code: Option<&'static str>, message: &str) -> Failure {
    Failure {
        status,
        code,
        message: message.to_owned(),
    }
}

fn repo_not_found(hub: &Hub, repo: &str) -> Failure {
    let message = match hub.unserved.iter().find(|u| u.name == repo) {
        Some(unserved) => format!("{repo} is approved but not served: {}", unserved.reason),
        None => format!("{repo:?} is not an approved model of this hub's lock"),
    };
    error(StatusCode::NOT_FOUND, Some("RepoNotFound"), &message)
}

/// The served model `repo` at `revision`, or the error response.
fn find<'a>(hub: &'a Hub, repo: &str, revision: &str) -> Result<&'a ServedModel, Failure> {
    let model = hub
        .catalog
        .model(repo)
        .ok_or_else(|| repo_not_found(hub, repo))?;
    if !model.has_revision(revision) {
        return Err(error(
            StatusCode::NOT_FOUND,
            Some("RevisionNotFound"),
            &format!(
                "{repo} has no revision {revision:?}: this hub serves it at `main` = {}",
                model.commit
            ),
        ));
    }
    Ok(model)
}

async fn list_models(State(hub): State<Arc<Hub>>) -> Response {
    let models: Vec<Value> = hub.catalog.models().iter().map(model_info).collect();
    axum::Json(models).into_response()
}

/// `GET /api/models/{repo}`, `…/revision/{rev}`, `…/tree/{rev}[/{path}]`.
async fn model_api(
    State(hub): State<Arc<Hub>>,
    Path(rest): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let mut parts = rest.split('/');
    let repo = parts.next().unwrap_or_default();
    let rest: Vec<&str> = parts.collect();
    match rest.as_slice() {
        [] => find(&hub, repo, "main").map(model_info),
        ["revision", revision] => find(&hub, repo, revision).map(model_info),
        ["tree", revision, path @ ..] => find(&hub, repo, revision).and_then(|model| {
            let recursive = query
                .get("recursive")
                .is_some_and(|v| v == "true" || v == "1");
            tree(model, &path.join("/"), recursive)
        }),
        _ => Err(error(
            StatusCode::NOT_FOUND,
            None,
            &format!("no such model route: /api/models/{repo}/{}", rest.join("/")),
        )),
    }
    .map_or_else(IntoResponse::into_response, |v| {
        axum::Json(v).into_response()
    })
}

/// What `huggingface_hub`'s `ModelInfo` and hf-hub's `RepoInfo` read, plus the lock's word on it.
fn model_info(model: &ServedModel) -> Value {
    let entry = &model.entry;
    let siblings: Vec<Value> = entry
        .files
        .iter()
        .map(|f| json!({ "rfilename": f.path, "size": f.size, "blobId": f.sha256.to_hex(), "lfs": lfs(f, "sha256") }))
        .collect();
    json!({
        "_id": model.commit,
        "id": entry.name,
        "modelId": entry.name,
        "sha": model.commit,
        "private": false,
        "disabled": false,
        "gated": false,
        "pipeline_tag": match entry.task {
            Task::Chat => "text-generation",
            Task::Embed => "sentence-similarity",
        },
        "tags": [entry.architecture, format!("license:{}", entry.license.to_lowercase())],
        "cardData": { "license": entry.license },
        "siblings": siblings,
        "sanctum": {
            "digest": entry.digest.to_hex(),
            "license": entry.license,
            "task": entry.task.to_string(),
            "architecture": entry.architecture,
            "upstream": entry.upstream.as_ref().map(|u| &u.repo),
        },
    })
}

/// The Git LFS view of a file (every file is content-addressed by its sha256), its digest under
/// `digest_key`: the model API says `sha256`, the tree API `oid`.
fn lfs(file: &LockedFile, digest_key: &str) -> Value {
    let pointer = format!(
        "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize {}\n",
        file.sha256, file.size
    );
    json!({ digest_key: file.sha256.to_hex(), "size": file.size, "pointerSize": pointer.len() })
}

/// `GET /api/models/{repo}/tree/{rev}/{path}`: the entries under `path` (all of them when
/// `recursive`), directories first as the hub lists them.
fn tree(model: &ServedModel, path: &str, recursive: bool) -> Result<Value, Failure> {
    let path = path.trim_matches('/');
    let below = |p: &str| path.is_empty() || p.starts_with(&format!("{path}/"));
    let parent = |p: &str| p.rsplit_once('/').map_or("", |(dir, _)| dir).to_owned();
    let mut dirs: BTreeMap<String, Vec<&LockedFile>> = BTreeMap::new();
    for file in &model.entry.files {
        let mut dir = parent(&file.path);
        while !dir.is_empty() {
            dirs.entry(dir.clone()).or_default().push(file);
            dir = parent(&dir);
        }
    }
    if !path.is_empty() && !dirs.contains_key(path) {
        return Err(error(
            StatusCode::NOT_FOUND,
            Some("EntryNotFound"),
            &format!("{} has no directory {path:?}", model.entry.name),
        ));
    }
    let shown = |p: &str| below(p) && (recursive || parent(p) == path);
    let mut entries: Vec<Value> = dirs
        .iter()
        .filter(|(dir, _)| shown(dir))
        .map(|(dir, files)| {
            let listing: BTreeSet<String> = files
                .iter()
                .map(|f| format!("{} {}\n", f.path, f.sha256))
                .collect();
            let oid = attest::Sha256Digest::of(listing.into_iter().collect::<String>().as_bytes());
            json!({ "type": "directory", "oid": &oid.to_hex()[..40], "size": 0, "path": dir })
        })
        .collect();
    entries.extend(model.entry.files.iter().filter(|f| shown(&f.path)).map(|f| {
        json!({ "type": "file", "oid": f.sha256.to_hex(), "size": f.size, "path": f.path, "lfs": lfs(f, "oid") })
    }));
    Ok(Value::Array(entries))
}

/// `HEAD|GET /{repo}/resolve/{rev}/{path}`: the file's bytes (a range of them with `Range`),
/// after they matched the lock; `ETag`/`X-Linked-Etag` = its sha256.
async fn resolve(
    State(hub): State<Arc<Hub>>,
    Path((repo, revision, path)): Path<(String, String, String)>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let model = match find(&hub, &repo, &revision) {
        Ok(model) => model,
        Err(failure) => return failure.into_response(),
    };
    if let Err(reason) = check_relative_path(&path) {
        return error(
            StatusCode::BAD_REQUEST,
            None,
            &format!("invalid file path {path:?}: {reason}"),
        )
        .into_response();
    }
    let Some(file) = model.file(&path).cloned() else {
        let mut response = error(
            StatusCode::NOT_FOUND,
            Some("EntryNotFound"),
            &format!("{repo} has no file {path:?} (the lock lists every file of a model)"),
        )
        .into_response();
        insert(response.headers_mut(), "x-repo-commit", &model.commit);
        return response;
    };
    let commit = model.commit.clone();
    let checked = {
        let hub = Arc::clone(&hub);
        let file = file.clone();
        tokio::task::spawn_blocking(move || {
            let model = hub.catalog.model(&repo).ok_or(())?;
            hub.catalog.open_file(model, &file).map_err(|e| {
                eprintln!("sanctum hub: REFUSED {e}: not served");
            })
        })
        .await
    };
    let Ok(Ok(VerifiedFile { file: handle, size })) = checked else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            None,
            &format!(
                "the hub's copy of {}/{} does not match the lock, so it is not served (the hub's log says why)",
                model.entry.name, file.path
            ),
        )
        .into_response();
    };
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| size > 0)
        .and_then(|r| http_range_header::parse_range_header(r).ok())
        .map(|parsed| parsed.validate(size));
    let (status, start, len) = match range {
        Some(Ok(ranges)) if ranges.len() == 1 => {
            let (start, end) = (*ranges[0].start(), *ranges[0].end());
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        Some(Err(_)) => {
            let mut response = error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                None,
                &format!("{path} has {size} bytes"),
            )
            .into_response();
            insert(
                response.headers_mut(),
                "content-range",
                &format!("bytes */{size}"),
            );
            return response;
        }
        // No range, a malformed one or several: the whole file (RFC 9110 lets a server ignore them).
        _ => (StatusCode::OK, 0, size),
    };
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        stream(handle, start, len)
    };
    let mut response = (status, body).into_response();
    let h = response.headers_mut();
    let etag = format!("\"{}\"", file.sha256);
    insert(h, "content-type", "application/octet-stream");
    insert(h, "content-length", &len.to_string());
    insert(h, "accept-ranges", "bytes");
    insert(h, "etag", &etag);
    insert(h, "x-linked-etag", &etag);
    insert(h, "x-linked-size", &size.to_string());
    insert(h, "x-repo-commit", &commit);
    if status == StatusCode::PARTIAL_CONTENT {
        insert(
            h,
            "content-range",
            &format!("bytes {start}-{}/{size}", start + len - 1),
        );
    }
    response
}

fn insert(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

/// `len` bytes of `file` from `start`, read on a blocking thread as the client takes them.
fn stream(file: File, start: u64, len: u64) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let end = start + len;
        let mut at = start;
        while at < end {
            let want = usize::try_from(end - at).map_or(SEND_CHUNK, |n| n.min(SEND_CHUNK));
            let mut buf = vec![0u8; want];
            let sent = match file.read_at(&mut buf, at) {
                Ok(0) => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file ended early",
                )),
                Ok(n) => {
                    buf.truncate(n);
                    at += n as u64;
                    Ok(Bytes::from(buf))
                }
                Err(e) => Err(e),
            };
            let failed = sent.is_err();
            // A closed channel means the client went away.
            if tx.blocking_send(sent).is_err() || failed {
                break;
            }
        }
    });
    Body::from_stream(ReceiverStream::new(rx))
}

async fn lock(State(hub): State<Arc<Hub>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/toml")],
        hub.lock_bytes.clone(),
    )
        .into_response()
}

async fn lock_signature(State(hub): State<Arc<Hub>>) -> Response {
    match &hub.lock_signature {
        Some(bytes) => {
            ([(header::CONTENT_TYPE, "application/json")], bytes.clone()).into_response()
        }
        None => error(
            StatusCode::NOT_FOUND,
            None,
            "this hub's lock is not signed (sanctum lock sign)",
        )
        .into_response(),
    }
}

async fn model_signature(State(hub): State<Arc<Hub>>, Path(name): Path<String>) -> Response {
    let Some(model) = hub.catalog.model(&name) else {
        return repo_not_found(&hub, &name).into_response();
    };
    let Some(dir) = &hub.model_signatures else {
        return error(
            StatusCode::NOT_FOUND,
            None,
            "this hub serves no model signatures (sanctum hub serve --model-signatures DIR)",
        )
        .into_response();
    };
    let path = dir.join(format!("{}.model.sig", model.entry.name));
    let read = std::fs::symlink_metadata(&path).and_then(|meta| {
        if !meta.is_file() || meta.len() > MAX_SIGNATURE_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a regular file of at most 1 MiB",
            ));
        }
        std::fs::read(&path)
    });
    match read {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => error(
            StatusCode::NOT_FOUND,
            None,
            &format!("{name} has no model signature on this hub"),
        )
        .into_response(),
        Err(e) => {
            eprintln!("sanctum hub: cannot serve {}: {e}", path.display());
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                None,
                &format!("{name}'s model signature cannot be read (the hub's log says why)"),
            )
            .into_response()
        }
    }
}
