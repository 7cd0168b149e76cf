//! A small but real HTTP/1.1 server on 127.0.0.1 that serves one in-memory Hugging Face model repository,
//! for tests of the `hf` source (hf-hub's blocking client). Include it with
//! `#[path = "../../tests/support/hf_server.rs"] mod hf_server;` (runner tests) or `mod hf_server;` from
//! `tests/support/mod.rs`. It needs no crate beyond `attest` (for sha256).
//!
//! Routes, as the hub answers them (and as hf-hub 0.5 reads them):
//! - `GET|HEAD /{repo}/resolve/{revision}/{path}`: `X-Repo-Commit`, `ETag`, `Accept-Ranges: bytes`,
//!   `Content-Length`; `Range: bytes=a-b` / `bytes=a-` / `bytes=-n` answered with 206 + `Content-Range`
//!   (416 when unsatisfiable). Files of [`LFS_THRESHOLD`] bytes or more are "LFS" files: the resolve URL
//!   answers `302` to `/lfs/{sha256}` (absolute URL, as the hub redirects to its CDN) with `X-Repo-Commit`,
//!   `X-Linked-Etag` and `X-Linked-Size`; the `/lfs/` URL serves the bytes (with ranges) and needs no token.
//!   Errors: 404 with `X-Error-Code: RevisionNotFound` / `EntryNotFound` / `RepoNotFound`, 401 without the
//!   token set by [`HfServer::require_token`].
//! - `GET /api/models/{repo}/revision/{revision}`: `{"id", "sha", "siblings": [{"rfilename"}]}`.
//!
//! Revisions served: the commit itself, `main`, and names added with [`HfServer::add_ref`]. Every answer
//! closes its connection. The server listens on 127.0.0.1 only, each connection has read/write timeouts,
//! and dropping the [`HfServer`] stops the accept loop and joins every thread.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// Files this large or larger are served like LFS files: resolve redirects to `/lfs/{sha256}`.
pub const LFS_THRESHOLD: usize = 1 << 20;

/// Largest request head (request line and headers) accepted.
const MAX_HEAD: u64 = 16 * 1024;
/// Most headers in one request.
const MAX_HEADERS: usize = 100;
/// Read and write timeout of every connection: a stalled client frees its thread after this.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are answered 503 at once.
const MAX_CONNECTIONS: usize = 64;
/// Bytes written per `write` of a body.
const CHUNK: usize = 64 * 1024;

/// A fault injected into the answers for one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The resolve URL answers this status (no body).
    Status(u16),
    /// The byte at this file offset is sent inverted, on every request whose range covers it.
    Corrupt(usize),
    /// The connection is closed once the body reaches this file offset, though `Content-Length` promised more.
    Truncate(usize),
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct LoggedRequest {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// The request target as sent (still percent-encoded), e.g. `/org/model/resolve/main/config.json`.
    pub target: String,
    /// Headers, names lowercased, in order.
    pub headers: Vec<(String, String)>,
    /// The status answered.
    pub status: u16,
}

impl LoggedRequest {
    /// The value of header `name` (case-insensitive), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the request target (as sent, percent-encoded) contains `needle`, e.g. a commit.
    pub fn contains(&self, needle: &str) -> bool {
        self.target.contains(needle)
    }

    /// Whether this was a request for `/{repo}/resolve/...`.
    pub fn is_resolve(&self) -> bool {
        self.target.contains("/resolve/")
    }

    /// Whether this was a request for the LFS ("CDN") copy of a file.
    pub fn is_lfs(&self) -> bool {
        self.target.starts_with("/lfs/")
    }
}

/// The running server; stops when dropped.
pub struct HfServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

struct Shared {
    repo: String,
    commit: String,
    addr: SocketAddr,
    stop: AtomicBool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    files: BTreeMap<String, Arc<ServedFile>>,
    refs: Vec<String>,
    faults: HashMap<String, Fault>,
    reported_commit: Option<String>,
    token: Option<String>,
    log: Vec<LoggedRequest>,
}

struct ServedFile {
    path: String,
    bytes: Vec<u8>,
    sha256: String,
}

impl ServedFile {
    fn lfs(&self) -> bool {
        self.bytes.len() >= LFS_THRESHOLD
    }
}

impl HfServer {
    /// Starts serving `files` (path, contents) of model repository `repo` (e.g. `org/name`) at `commit`
    /// (40 hex) on 127.0.0.1 with a free port.
    pub fn start(repo: &str, commit: &str, files: Vec<(String, Vec<u8>)>) -> HfServer {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let files = files
            .into_iter()
            .map(|(path, bytes)| {
                let sha256 = attest::Sha256Digest::of(&bytes).to_hex();
                (
                    path.clone(),
                    Arc::new(ServedFile {
                        path,
                        bytes,
                        sha256,
                    }),
                )
            })
            .collect();
        let shared = Arc::new(Shared {
            repo: repo.to_string(),
            commit: commit.to_string(),
            addr,
            stop: AtomicBool::new(false),
            state: Mutex::new(State {
                files,
                refs: vec!["main".to_string()],
                ..State::default()
            }),
        });
        let accept = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("hf-server-accept".into())
                .spawn(move || accept_loop(&shared, &listener))
                .expect("spawn accept thread")
        };
        HfServer {
            shared,
            addr,
            accept: Some(accept),
        }
    }

    /// `http://127.0.0.1:PORT`, the endpoint to give the client.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The socket address listened on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The repository id served.
    pub fn repo(&self) -> &str {
        &self.shared.repo
    }

    /// The commit served.
    pub fn commit(&self) -> &str {
        &self.shared.commit
    }

    /// Also serves the commit under revision `name` (a branch or tag).
    pub fn add_ref(&self, name: &str) {
        self.shared.state().refs.push(name.to_string());
    }

    /// Reports `commit` in `X-Repo-Commit` (and the API's `sha`) instead of the real one, like a hub whose
    /// branch moved or a mirror that serves another snapshot.
    pub fn report_commit(&self, commit: &str) {
        self.shared.state().reported_commit = Some(commit.to_string());
    }

    /// Answers 401 to resolve and API requests without `Authorization: Bearer {token}`.
    pub fn require_token(&self, token: &str) {
        self.shared.state().token = Some(token.to_string());
    }

    /// The resolve URL of `path` answers `status`.
    pub fn fail_with(&self, path: &str, status: u16) {
        self.set_fault(path, Fault::Status(status));
    }

    /// The byte of `path` at offset `n` is sent inverted (the size stays right).
    pub fn corrupt_after(&self, path: &str, n: usize) {
        self.set_fault(path, Fault::Corrupt(n));
    }

    /// Bodies of `path` stop at offset `n`: the connection closes short of `Content-Length`.
    pub fn truncate_after(&self, path: &str, n: usize) {
        self.set_fault(path, Fault::Truncate(n));
    }

    /// Sets the one fault of `path`, replacing any earlier one.
    pub fn set_fault(&self, path: &str, fault: Fault) {
        self.shared.state().faults.insert(path.to_string(), fault);
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        self.shared.state().faults.clear();
    }

    /// The requests answered so far, in order.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.shared.state().log.clone()
    }

    /// Forgets the requests logged so far.
    pub fn clear_requests(&self) {
        self.shared.state().log.clear();
    }
}

impl Drop for HfServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept; it sees the flag and returns.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let (done, running): (Vec<_>, Vec<_>) = workers.into_iter().partition(|w| w.is_finished());
        for worker in done {
            let _ = worker.join();
        }
        workers = running;
        if workers.len() >= MAX_CONNECTIONS {
            let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
            let _ = write_head(&stream, 503, &[], 0);
            continue;
        }
        let shared = Arc::clone(shared);
        match std::thread::Builder::new()
            .name("hf-server-conn".into())
            .spawn(move || serve_connection(&shared, stream))
        {
            Ok(worker) => workers.push(worker),
            Err(_) => continue,
        }
    }
    for worker in workers {
        let _ = worker.join();
    }
}

struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

enum Body {
    Empty,
    Bytes(Vec<u8>),
    File {
        file: Arc<ServedFile>,
        start: usize,
        end: usize,
        fault: Option<Fault>,
    },
}

impl Body {
    fn len(&self) -> usize {
        match self {
            Body::Empty => 0,
            Body::Bytes(bytes) => bytes.len(),
            Body::File { start, end, .. } => end - start,
        }
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Body,
}

impl Response {
    fn new(status: u16) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: Body::Empty,
        }
    }

    fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    fn error(status: u16, code: &str) -> Self {
        Response::new(status)
            .header("X-Error-Code", code)
            .header("Content-Type", "text/plain")
            .body(Body::Bytes(code.as_bytes().to_vec()))
    }

    fn body(mut self, body: Body) -> Self {
        self.body = body;
        self
    }
}

fn serve_connection(shared: &Shared, stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let request = match read_request(&stream) {
        Ok(Some(request)) => request,
        Ok(None) => return,
        Err(_) => {
            let _ = write_head(&stream, 400, &[], 0);
            return;
        }
    };
    if shared.stop.load(Ordering::SeqCst) {
        return;
    }
    let response = route(shared, &request);
    shared.state().log.push(LoggedRequest {
        method: request.method.clone(),
        target: request.target.clone(),
        headers: request.headers.clone(),
        status: response.status,
    });
    let _ = write_response(&stream, &response, request.method == "HEAD");
    let _ = stream.shutdown(Shutdown::Write);
}

/// Reads the request head; `None` when the client closed without sending one. Bodies are not read (the
/// client sends none: only GET and HEAD are served).
fn read_request(stream: &TcpStream) -> io::Result<Option<Request>> {
    let mut reader = BufReader::new(stream).take(MAX_HEAD);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad request line",
        ));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not HTTP/1.x"));
    }
    let mut request = Request {
        method: method.to_string(),
        target: target.to_string(),
        headers: Vec::new(),
    };
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "request head cut short",
            ));
        }
        let header = line.trim_end_matches(['\r', '\n']);
        if header.is_empty() {
            return Ok(Some(request));
        }
        if request.headers.len() >= MAX_HEADERS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "too many headers",
            ));
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "bad header"));
        };
        request
            .headers
            .push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
}

fn route(shared: &Shared, request: &Request) -> Response {
    if request.method != "GET" && request.method != "HEAD" {
        return Response::error(405, "MethodNotAllowed").header("Allow", "GET, HEAD");
    }
    let path = request.target.split(['?', '#']).next().unwrap_or("");
    if let Some(sha) = path.strip_prefix("/lfs/") {
        return serve_lfs(shared, request, sha);
    }
    if let Some(revision) = path.strip_prefix(&format!("/api/models/{}/revision/", shared.repo)) {
        return serve_api(shared, request, &percent_decode(revision));
    }
    if let Some(rest) = path.strip_prefix(&format!("/{}/resolve/", shared.repo)) {
        let Some((revision, file)) = rest.split_once('/') else {
            return Response::error(404, "EntryNotFound");
        };
        return serve_resolve(
            shared,
            request,
            &percent_decode(revision),
            &percent_decode(file),
        );
    }
    Response::error(404, "RepoNotFound")
}

/// The commit to report, or the error answer for a request that lacks the token or names an unknown revision.
fn check_access(
    state: &State,
    shared: &Shared,
    request: &Request,
    revision: &str,
) -> Result<String, Response> {
    if let Some(token) = &state.token
        && request.header("authorization") != Some(format!("Bearer {token}").as_str())
    {
        return Err(Response::error(401, "GatedRepo"));
    }
    if revision != shared.commit && !state.refs.iter().any(|r| r == revision) {
        return Err(Response::error(404, "RevisionNotFound"));
    }
    Ok(state
        .reported_commit
        .clone()
        .unwrap_or_else(|| shared.commit.clone()))
}

fn serve_resolve(shared: &Shared, request: &Request, revision: &str, path: &str) -> Response {
    let state = shared.state();
    let commit = match check_access(&state, shared, request, revision) {
        Ok(commit) => commit,
        Err(response) => return response,
    };
    let fault = state.faults.get(path).copied();
    if let Some(Fault::Status(status)) = fault {
        return Response::error(status, "InjectedFault");
    }
    let Some(file) = state.files.get(path).cloned() else {
        return Response::error(404, "EntryNotFound").header("X-Repo-Commit", commit);
    };
    drop(state);
    if file.lfs() {
        // The hub's ETag here is the pointer file's; the content's digest is X-Linked-Etag.
        let pointer = format!(
            "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize {}\n",
            file.sha256,
            file.bytes.len()
        );
        let pointer_etag = attest::Sha256Digest::of(pointer.as_bytes()).to_hex();
        return Response::new(302)
            .header(
                "Location",
                format!("http://{}/lfs/{}", shared.addr, file.sha256),
            )
            .header("X-Repo-Commit", commit)
            .header("ETag", format!("\"{pointer_etag}\""))
            .header("X-Linked-Etag", format!("\"{}\"", file.sha256))
            .header("X-Linked-Size", file.bytes.len().to_string());
    }
    serve_bytes(request, file, fault).header("X-Repo-Commit", commit)
}

fn serve_lfs(shared: &Shared, request: &Request, sha: &str) -> Response {
    let state = shared.state();
    let Some(file) = state
        .files
        .values()
        .find(|f| f.sha256 == sha && f.lfs())
        .cloned()
    else {
        return Response::error(404, "NoSuchKey");
    };
    let fault = state.faults.get(&file.path).copied();
    drop(state);
    serve_bytes(request, file, fault)
}

fn serve_api(shared: &Shared, request: &Request, revision: &str) -> Response {
    let state = shared.state();
    let commit = match check_access(&state, shared, request, revision) {
        Ok(commit) => commit,
        Err(response) => return response,
    };
    let siblings: Vec<String> = state
        .files
        .keys()
        .map(|path| format!("{{\"rfilename\":{}}}", json_string(path)))
        .collect();
    let json = format!(
        "{{\"id\":{repo},\"modelId\":{repo},\"sha\":{sha},\"private\":false,\"siblings\":[{siblings}]}}",
        repo = json_string(&shared.repo),
        sha = json_string(&commit),
        siblings = siblings.join(","),
    );
    Response::new(200)
        .header("Content-Type", "application/json")
        .body(Body::Bytes(json.into_bytes()))
}

/// 200 with the whole file, or 206 with one `Range`; 416 when the range starts past the end.
fn serve_bytes(request: &Request, file: Arc<ServedFile>, fault: Option<Fault>) -> Response {
    let len = file.bytes.len();
    let etag = format!("\"{}\"", file.sha256);
    let base = |status| {
        Response::new(status)
            .header("ETag", etag.clone())
            .header("Accept-Ranges", "bytes")
            .header("Content-Type", "application/octet-stream")
    };
    let fault = fault.filter(|f| !matches!(f, Fault::Status(_)));
    match request.header("range").map(|r| parse_range(r, len)) {
        None | Some(RangeSpec::Ignored) => base(200).body(Body::File {
            file,
            start: 0,
            end: len,
            fault,
        }),
        Some(RangeSpec::Unsatisfiable) => {
            base(416).header("Content-Range", format!("bytes */{len}"))
        }
        Some(RangeSpec::Range(start, end)) => base(206)
            .header("Content-Range", format!("bytes {start}-{}/{len}", end - 1))
            .body(Body::File {
                file,
                start,
                end,
                fault,
            }),
    }
}

enum RangeSpec {
    /// Serve the whole file (no usable single range).
    Ignored,
    Unsatisfiable,
    /// `start..end`, end exclusive.
    Range(usize, usize),
}

fn parse_range(value: &str, len: usize) -> RangeSpec {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeSpec::Ignored;
    };
    if spec.contains(',') {
        return RangeSpec::Ignored;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return RangeSpec::Ignored;
    };
    let (first, last) = (first.trim(), last.trim());
    let parse = |s: &str| s.parse::<usize>().ok();
    let (start, end) = match (first.is_empty(), last.is_empty()) {
        // bytes=-n: the last n bytes.
        (true, false) => match parse(last) {
            Some(0) => return RangeSpec::Unsatisfiable,
            Some(n) => (len.saturating_sub(n), len),
            None => return RangeSpec::Ignored,
        },
        (false, true) => match parse(first) {
            Some(start) => (start, len),
            None => return RangeSpec::Ignored,
        },
        (false, false) => match (parse(first), parse(last)) {
            (Some(start), Some(last)) if start <= last => (start, len.min(last.saturating_add(1))),
            _ => return RangeSpec::Ignored,
        },
        (true, true) => return RangeSpec::Ignored,
    };
    if start >= len {
        RangeSpec::Unsatisfiable
    } else {
        RangeSpec::Range(start, end)
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        416 => "Range Not Satisfiable",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn write_head(
    mut stream: &TcpStream,
    status: u16,
    headers: &[(String, String)],
    len: usize,
) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {len}\r\nConnection: close\r\nServer: sanctum-test-hf\r\n\r\n"
    ));
    stream.write_all(head.as_bytes())
}

fn write_response(mut stream: &TcpStream, response: &Response, head_only: bool) -> io::Result<()> {
    write_head(
        stream,
        response.status,
        &response.headers,
        response.body.len(),
    )?;
    if head_only {
        return stream.flush();
    }
    match &response.body {
        Body::Empty => {}
        Body::Bytes(bytes) => stream.write_all(bytes)?,
        Body::File {
            file,
            start,
            end,
            fault,
        } => {
            let mut offset = *start;
            while offset < *end {
                let chunk_end = (*end).min(offset + CHUNK);
                if let Some(Fault::Truncate(cut)) = fault
                    && *cut < chunk_end
                {
                    if *cut > offset {
                        stream.write_all(&file.bytes[offset..*cut])?;
                    }
                    stream.flush()?;
                    // Closing short of Content-Length: the client must see an incomplete body.
                    return stream.shutdown(Shutdown::Both);
                }
                let chunk = &file.bytes[offset..chunk_end];
                match fault {
                    Some(Fault::Corrupt(at)) if (offset..chunk_end).contains(at) => {
                        let mut chunk = chunk.to_vec();
                        chunk[at - offset] ^= 0xFF;
                        stream.write_all(&chunk)?;
                    }
                    _ => stream.write_all(chunk)?,
                }
                offset = chunk_end;
            }
        }
    }
    stream.flush()
}

/// Decodes `%XX` escapes (invalid ones are kept as they are).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex_value(bytes[i + 1]), hex_value(bytes[i + 2]))
        {
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_value(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
