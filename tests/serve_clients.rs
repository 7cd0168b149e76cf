//! `sanctum serve` driven by the official `openai` and `ollama` Python clients.
//!
//! The client scripts (`tests/clients/`) run with the Python of `SANCTUM_TEST_PYTHON`, the venv
//! `scripts/test` makes with the pinned clients (`tests/clients/requirements.txt`); every reply
//! they save is then verified with `sanctum attest verify --artifact` and refused once changed.
//! curl checks the stream framing byte for byte (SSE and NDJSON). Each test's server has a home of
//! its own, with the real models and signer key but an empty attestation store, so every bundle a
//! test finds was made by its server in this run.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::support::server::Server;
use crate::support::{self, python, repo_lock, required, sha256_hex};

const CHAT_MODEL: &str = "smollm2-135m-instruct";
const SERVER_ARGS: &[&str] = &["--quant", "q8_0", "--preload"];
/// How long one client script may take before it is killed.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);

/// What `sanctum attest verify` must find for one saved reply: the requests (API, route, stream)
/// whose attestations name its bytes.
struct Expected {
    file: &'static str,
    requests: &'static [(&'static str, &'static str, bool)],
}

/// A sanctum home for one server: the real store's models hard-linked (copied across file
/// systems), its signer key copied, and nothing else.
struct Home {
    dir: TempDir,
}

impl Home {
    /// None (skipped, with a notice) when the real models are not available.
    fn new() -> Option<Self> {
        let real = support::real_store()?;
        let dir = TempDir::new().expect("a temporary directory");
        link_tree(&real.join("models"), &dir.path().join("models"));
        fs::create_dir_all(dir.path().join("keys")).expect("keys directory");
        for name in ["signer.key", "signer.pub"] {
            let from = real.join("keys").join(name);
            fs::copy(&from, dir.path().join("keys").join(name)).unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (scripts/test makes the signer key)",
                    from.display()
                )
            });
        }
        Some(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn start(&self) -> Server {
        Server::start_with(self.path(), SERVER_ARGS)
    }

    /// `sanctum --store HOME --lock models.lock attest verify [BUNDLE] --artifact FILE --key
    /// HOME/keys/signer.pub --format json`.
    fn verify(&self, bundle: Option<&Path>, artifact: &Path) -> Output {
        let mut cmd = support::sanctum();
        cmd.arg("--store")
            .arg(self.path())
            .arg("--lock")
            .arg(repo_lock())
            .args(["attest", "verify"]);
        if let Some(bundle) = bundle {
            cmd.arg(bundle);
        }
        cmd.arg("--artifact")
            .arg(artifact)
            .arg("--key")
            .arg(self.path().join("keys/signer.pub"))
            .args(["--format", "json"])
            .output()
            .expect("sanctum attest verify runs")
    }

    /// Verifies every saved reply (exactly the expected files are there) against the store, then
    /// a copy of each with one character appended, which must be refused.
    fn check_replies(&self, outdir: &Path, expected: &[Expected]) {
        let saved: BTreeSet<String> = fs::read_dir(outdir)
            .expect("the client's output folder")
            .map(|e| {
                e.expect("a directory entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        let wanted: BTreeSet<String> = expected.iter().map(|e| e.file.to_owned()).collect();
        assert_eq!(saved, wanted, "the replies the client saved");
        let tampered_dir = TempDir::new().expect("a temporary directory");
        for e in expected {
            let reply = outdir.join(e.file);
            let bytes = fs::read(&reply).expect("a saved reply");
            assert!(!bytes.is_empty(), "{} is empty", e.file);
            let bundle = self.verify_reply(&reply, e.requests);

            let tampered = tampered_dir.path().join(e.file);
            let mut changed = bytes.clone();
            changed.push(b'!');
            fs::write(&tampered, &changed).expect("write the changed copy");
            // Looked up by its sha256, a changed reply has no attestation...
            let out = self.verify(None, &tampered);
            assert_eq!(
                out.status.code(),
                Some(1),
                "a changed {} was not refused: {}",
                e.file,
                describe(&out)
            );
            // ...and against the reply's own bundle, the subject digest no longer matches.
            let out = self.verify(Some(&bundle), &tampered);
            assert_eq!(
                out.status.code(),
                Some(1),
                "a changed {} passed against its bundle: {}",
                e.file,
                describe(&out)
            );
            let report: Value =
                serde_json::from_slice(&out.stdout).expect("verify --format json prints JSON");
            let failed: Vec<&str> = report["attestations"][0]["steps"]
                .as_array()
                .expect("the verification steps")
                .iter()
                .filter(|s| s["result"] == "fail")
                .filter_map(|s| s["id"].as_str())
                .collect();
            assert_eq!(failed, ["subject-digest"], "{}", describe(&out));
        }
    }

    /// Verifies one reply by the store lookup: exit 0, every bundle found passes, names the
    /// reply's sha256 and the chat model, and the bundles' requests are exactly `requests`.
    /// Returns one of the bundles.
    fn verify_reply(&self, reply: &Path, requests: &[(&str, &str, bool)]) -> PathBuf {
        let out = self.verify(None, reply);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{} does not verify: {}",
            reply.display(),
            describe(&out)
        );
        let report: Value =
            serde_json::from_slice(&out.stdout).expect("verify --format json prints JSON");
        let list = report["attestations"]
            .as_array()
            .expect("the attestations verified");
        assert!(!list.is_empty(), "no attestation: {}", describe(&out));
        assert_eq!(report["ok"], true, "{}", describe(&out));
        assert_eq!(
            report["summary"],
            json!({"failed": 0, "passed": list.len(), "total": list.len()})
        );
        let digest = sha256_hex(&fs::read(reply).expect("the reply"));
        let mut found = BTreeSet::new();
        for a in list {
            assert_eq!(a["ok"], true, "{a}");
            assert_eq!(a["subject"]["sha256"], digest.as_str(), "{a}");
            assert_eq!(a["model"]["name"], CHAT_MODEL, "{a}");
            let request = &a["predicate"]["request"];
            found.insert((
                request["api"].as_str().expect("request.api").to_owned(),
                request["route"].as_str().expect("request.route").to_owned(),
                request["stream"].as_bool().expect("request.stream"),
            ));
        }
        let wanted: BTreeSet<(String, String, bool)> = requests
            .iter()
            .map(|&(api, route, stream)| (api.to_owned(), route.to_owned(), stream))
            .collect();
        assert_eq!(
            found,
            wanted,
            "the requests attested for {}",
            reply.display()
        );
        PathBuf::from(list[0]["bundle"].as_str().expect("the bundle's path"))
    }
}

/// Hard-links every file of `from` into `to` (copies it where a link cannot be made).
fn link_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create the directory");
    for entry in fs::read_dir(from).unwrap_or_else(|e| panic!("{}: {e}", from.display())) {
        let entry = entry.expect("a directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("a file type").is_dir() {
            link_tree(&entry.path(), &target);
        } else if fs::hard_link(entry.path(), &target).is_err() {
            fs::copy(entry.path(), &target).expect("copy a model file");
        }
    }
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `PYTHON tests/clients/SCRIPT URL OUTDIR` (killed after [`CLIENT_TIMEOUT`]) and asserts
/// that every check passed; returns what it printed.
fn run_client(python: &Path, script: &str, server: &Server, outdir: &Path) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(script);
    let log_dir = TempDir::new().expect("a temporary directory");
    let log_path = log_dir.path().join("client.log");
    let log = fs::File::create(&log_path).expect("the client's log");
    let mut cmd = Command::new(python);
    cmd.arg(&script)
        .arg(&server.url)
        .arg(outdir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("the log, for stdout"))
        .stderr(log)
        // Nothing from the environment may point the clients elsewhere.
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
    for var in [
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "OPENAI_ORG_ID",
        "OPENAI_PROJECT_ID",
        "OLLAMA_HOST",
        "OLLAMA_API_KEY",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
        "PYTHONPATH",
        "PYTHONHOME",
    ] {
        cmd.env_remove(var);
    }
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", python.display()));
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the client") {
            break status;
        }
        if started.elapsed() > CLIENT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} ran over {} s and was killed:\n{}\n--- server log\n{}",
                script.display(),
                CLIENT_TIMEOUT.as_secs(),
                fs::read_to_string(&log_path).unwrap_or_default(),
                server.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = fs::read_to_string(&log_path).expect("the client's log");
    assert!(
        status.success() && output.contains("all checks passed"),
        "{} failed ({status}):\n{output}\n--- server log\n{}",
        script.display(),
        server.log()
    );
    eprintln!(
        "{output}{} took {:.1} s",
        script.display(),
        started.elapsed().as_secs_f64()
    );
    output
}

/// Stops the server with SIGTERM and asserts it exits cleanly.
fn stop(server: Server) {
    let (status, log) = server.terminate();
    assert!(
        status.success(),
        "sanctum serve exited with {status}:\n{log}"
    );
}

#[test]
fn official_openai_client() {
    let Some(python) = python() else { return };
    let Some(home) = Home::new() else { return };
    let server = home.start();
    let outdir = TempDir::new().expect("a temporary directory");
    run_client(&python, "openai_client.py", &server, outdir.path());
    stop(server);
    const CHAT: &[(&str, &str, bool)] = &[
        ("openai", "/v1/chat/completions", false),
        ("openai", "/v1/chat/completions", true),
    ];
    home.check_replies(
        outdir.path(),
        &[
            // The streamed reply equals the non-stream one: both attestations name it.
            Expected {
                file: "openai-chat.txt",
                requests: CHAT,
            },
            Expected {
                file: "openai-chat-stream.txt",
                requests: CHAT,
            },
            Expected {
                file: "openai-completion.txt",
                requests: &[("openai", "/v1/completions", false)],
            },
        ],
    );
}

#[test]
fn official_ollama_client() {
    let Some(python) = python() else { return };
    let Some(home) = Home::new() else { return };
    let server = home.start();
    let outdir = TempDir::new().expect("a temporary directory");
    run_client(&python, "ollama_client.py", &server, outdir.path());
    stop(server);
    const CHAT: &[(&str, &str, bool)] = &[
        ("ollama", "/api/chat", false),
        ("ollama", "/api/chat", true),
    ];
    const GENERATE: &[(&str, &str, bool)] = &[
        ("ollama", "/api/generate", false),
        ("ollama", "/api/generate", true),
    ];
    home.check_replies(
        outdir.path(),
        &[
            Expected {
                file: "ollama-chat.txt",
                requests: CHAT,
            },
            Expected {
                file: "ollama-chat-stream.txt",
                requests: CHAT,
            },
            Expected {
                file: "ollama-generate.txt",
                requests: GENERATE,
            },
            Expected {
                file: "ollama-generate-stream.txt",
                requests: GENERATE,
            },
        ],
    );
}

/// An HTTP response as curl received it.
struct Received {
    status_line: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `curl -sN -i` (no proxy, at most 4 minutes): a POST of `body` when given, else a GET.
fn curl(url: &str, body: Option<&Value>) -> Received {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-N", "-i", "--noproxy", "*", "--max-time", "240"]);
    if let Some(body) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(body.to_string());
    }
    let out = cmd.arg(url).output().expect("curl runs");
    assert!(out.status.success(), "curl {url}: {}", describe(&out));
    let text = String::from_utf8(out.stdout).expect("the response is UTF-8");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default().to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Received {
        status_line,
        headers,
        body: body.to_owned(),
    }
}

fn curl_available() -> Option<()> {
    let found = Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    required(found.then_some(()), "curl is not installed")
}

/// The sha256 an attestation bundle's statement names as its subject.
fn attested_sha256(bundle: &Value) -> String {
    let payload = bundle["dsseEnvelope"]["payload"]
        .as_str()
        .unwrap_or_else(|| panic!("no DSSE payload in {bundle}"));
    let statement: Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(payload)
            .expect("the payload is base64"),
    )
    .expect("the payload is a JSON statement");
    statement["subject"][0]["digest"]["sha256"]
        .as_str()
        .unwrap_or_else(|| panic!("no subject in {statement}"))
        .to_owned()
}

/// Checks an SSE chat stream event by event; returns the text of its deltas.
fn check_sse(body: &str) -> String {
    assert!(!body.contains('\r'), "CR in the stream: {body:?}");
    let events: Vec<&str> = body
        .strip_suffix("\n\n")
        .unwrap_or_else(|| panic!("the stream does not end with a blank line: {body:?}"))
        .split("\n\n")
        .collect();
    assert!(events.len() >= 5, "too few events: {body:?}");
    assert!(
        events.iter().all(|e| !e.is_empty()),
        "an event is empty (extra blank lines): {body:?}"
    );
    let (done, rest) = events.split_last().expect("events");
    assert_eq!(*done, "data: [DONE]", "the last event");
    let (attestation, chunks) = rest.split_last().expect("events");
    let attestation = attestation
        .strip_prefix("event: sanctum.attestation\ndata: ")
        .unwrap_or_else(|| {
            panic!("the event before [DONE] is not the attestation: {attestation:?}")
        });
    assert!(!attestation.contains('\n'), "{attestation:?}");
    // Every other event is one `data: ` line holding one chunk.
    let chunks: Vec<Value> = chunks
        .iter()
        .map(|e| {
            let data = e
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("an event that is not one data line: {e:?}"));
            assert!(!data.contains('\n'), "a multi-line event: {e:?}");
            serde_json::from_str(data).unwrap_or_else(|err| panic!("{err}: {data}"))
        })
        .collect();
    let attestation: Value = serde_json::from_str(attestation).expect("the attestation chunk");
    let id = chunks[0]["id"].clone();
    for c in chunks.iter().chain([&attestation]) {
        assert_eq!(c["object"], "chat.completion.chunk", "{c}");
        assert_eq!(c["id"], id, "one id per stream: {c}");
        assert_eq!(c["model"], CHAT_MODEL, "{c}");
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    // The content chunks, the one with the finish reason, then the usage chunk.
    let (usage, content) = chunks.split_last().expect("chunks");
    assert_eq!(usage["choices"], json!([]), "{usage}");
    let tokens = &usage["usage"];
    let (prompt, completion) = (
        tokens["prompt_tokens"].as_u64().expect("prompt_tokens"),
        tokens["completion_tokens"]
            .as_u64()
            .expect("completion_tokens"),
    );
    assert!(prompt > 0 && completion > 0, "{usage}");
    assert_eq!(tokens["total_tokens"], prompt + completion, "{usage}");
    let (last, deltas) = content.split_last().expect("content chunks");
    assert!(
        matches!(
            last["choices"][0]["finish_reason"].as_str(),
            Some("stop" | "length")
        ),
        "{last}"
    );
    let mut text = String::new();
    for c in deltas {
        assert_eq!(c["choices"][0]["finish_reason"], Value::Null, "{c}");
        text.push_str(
            c["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or_else(|| panic!("a delta without content: {c}")),
        );
    }
    assert!(!text.is_empty(), "no text streamed");
    assert_eq!(attestation["choices"], json!([]), "{attestation}");
    assert_eq!(
        attested_sha256(&attestation["sanctum"]["attestation"]),
        sha256_hex(text.as_bytes()),
        "the attestation event does not name the streamed text"
    );
    text
}

/// Checks an NDJSON `/api/chat` stream line by line; returns the text of its messages.
fn check_ndjson(body: &str) -> String {
    assert!(!body.contains('\r'), "CR in the stream: {body:?}");
    let lines: Vec<Value> = body
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("the stream does not end with a newline: {body:?}"))
        .split('\n')
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: line {l:?}")))
        .collect();
    assert!(lines.len() >= 3, "too few lines: {body:?}");
    for l in &lines {
        assert!(l.is_object(), "{l}");
        assert_eq!(l["model"], CHAT_MODEL, "{l}");
        assert_eq!(l["message"]["role"], "assistant", "{l}");
        assert!(l["created_at"].is_string(), "{l}");
    }
    let (done, rest) = lines.split_last().expect("lines");
    assert_eq!(done["done"], true, "the last line: {done}");
    assert_eq!(done["message"]["content"], "", "{done}");
    assert!(
        matches!(done["done_reason"].as_str(), Some("stop" | "length")),
        "{done}"
    );
    for field in [
        "eval_count",
        "prompt_eval_count",
        "total_duration",
        "eval_duration",
        "prompt_eval_duration",
    ] {
        assert!(
            done[field].as_u64().is_some_and(|n| n > 0),
            "{field}: {done}"
        );
    }
    let (attestation, pieces) = rest.split_last().expect("lines");
    assert_eq!(attestation["done"], false, "{attestation}");
    assert_eq!(attestation["message"]["content"], "", "{attestation}");
    let mut text = String::new();
    for p in pieces {
        assert_eq!(p["done"], false, "{p}");
        assert!(p.get("sanctum").is_none(), "an attestation mid-stream: {p}");
        let piece = p["message"]["content"].as_str().expect("content");
        assert!(!piece.is_empty(), "an empty piece mid-stream: {p}");
        text.push_str(piece);
    }
    assert_eq!(
        attested_sha256(&attestation["sanctum"]["attestation"]),
        sha256_hex(text.as_bytes()),
        "the attestation line does not name the streamed text"
    );
    assert!(
        done["eval_count"]
            .as_u64()
            .is_some_and(|n| n >= pieces.len() as u64),
        "more lines than tokens: {done}"
    );
    text
}

#[test]
fn stream_framing_with_curl() {
    let Some(()) = curl_available() else { return };
    let Some(home) = Home::new() else { return };
    let server = home.start();
    let replies = TempDir::new().expect("a temporary directory");

    let sse = curl(
        &format!("{}/v1/chat/completions", server.url),
        Some(&json!({
            "model": CHAT_MODEL,
            "messages": [{"role": "user", "content": "What is a lighthouse?"}],
            "stream": true,
            "stream_options": {"include_usage": true},
            "temperature": 0,
            "seed": 3,
            "max_tokens": 16,
        })),
    );
    assert!(
        sse.status_line.starts_with("HTTP/1.1 200"),
        "{}",
        sse.status_line
    );
    assert_eq!(sse.header("content-type"), Some("text/event-stream"));
    assert_eq!(sse.header("cache-control"), Some("no-cache"));
    let text = check_sse(&sse.body);
    let sse_reply = replies.path().join("sse.txt");
    fs::write(&sse_reply, &text).expect("save the reply");
    home.verify_reply(&sse_reply, &[("openai", "/v1/chat/completions", true)]);

    let ndjson = curl(
        &format!("{}/api/chat", server.url),
        Some(&json!({
            "model": CHAT_MODEL,
            "messages": [{"role": "user", "content": "What is a harbour?"}],
            "options": {"temperature": 0, "seed": 3, "num_predict": 16},
        })),
    );
    assert!(
        ndjson.status_line.starts_with("HTTP/1.1 200"),
        "{}",
        ndjson.status_line
    );
    assert_eq!(ndjson.header("content-type"), Some("application/x-ndjson"));
    let text = check_ndjson(&ndjson.body);
    let ndjson_reply = replies.path().join("ndjson.txt");
    fs::write(&ndjson_reply, &text).expect("save the reply");
    home.verify_reply(&ndjson_reply, &[("ollama", "/api/chat", true)]);

    // Not streamed: the bundle in the body, its file's sha256 in X-Sanctum-Attestation, and the
    // same file served by the attestation route.
    let single = curl(
        &format!("{}/api/chat", server.url),
        Some(&json!({
            "model": CHAT_MODEL,
            "messages": [{"role": "user", "content": "What is a harbour?"}],
            "options": {"temperature": 0, "seed": 3, "num_predict": 16},
            "stream": false,
        })),
    );
    assert!(
        single.status_line.starts_with("HTTP/1.1 200"),
        "{}",
        single.status_line
    );
    assert_eq!(single.header("content-type"), Some("application/json"));
    let reply: Value = serde_json::from_str(&single.body).expect("one JSON object");
    let content = reply["message"]["content"].as_str().expect("content");
    assert_eq!(
        content, text,
        "the non-stream reply differs from the stream"
    );
    let digest = sha256_hex(content.as_bytes());
    assert_eq!(attested_sha256(&reply["sanctum"]["attestation"]), digest);
    let stored = curl(
        &format!("{}/sanctum/v1/attestations/{digest}", server.url),
        None,
    );
    assert!(
        stored.status_line.starts_with("HTTP/1.1 200"),
        "{}",
        stored.status_line
    );
    assert_eq!(stored.header("x-sanctum-attestation-count"), Some("2"));
    assert_eq!(
        single.header("x-sanctum-attestation"),
        Some(format!("sha256:{}", sha256_hex(stored.body.as_bytes())).as_str()),
        "X-Sanctum-Attestation is not the sha256 of the newest stored bundle"
    );
    assert_eq!(
        serde_json::from_str::<Value>(&stored.body).expect("the stored bundle"),
        reply["sanctum"]["attestation"]
    );
    home.verify_reply(
        &ndjson_reply,
        &[
            ("ollama", "/api/chat", true),
            ("ollama", "/api/chat", false),
        ],
    );
    stop(server);
}
