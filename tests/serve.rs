//! `sanctum serve` driven over HTTP: many clients at once, the queue's limit, clients that go away,
//! hostile requests, keys and binds, graceful shutdown.

use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::Digest as _;

use crate::support::server::Server;

const CHAT_MODEL: &str = "smollm2-135m-instruct";

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into()
}

/// POSTs `body`; returns the status, the response and nothing read yet.
fn post(url: &str, body: &str) -> ureq::http::Response<ureq::Body> {
    agent()
        .post(url)
        .header("Content-Type", "application/json")
        .send(body)
        .expect("the server answers")
}

fn chat_request(seed: u64, max_tokens: usize, stream: bool) -> String {
    json!({
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "Write a short poem about the sea."}],
        "temperature": 0.9,
        "seed": seed,
        "max_tokens": max_tokens,
        "stream": stream,
    })
    .to_string()
}

/// The content of an SSE chat stream, and whether it ended with `[DONE]`.
fn read_stream(body: ureq::Body) -> (String, bool) {
    let mut text = String::new();
    let mut event: Option<String> = None;
    for line in BufReader::new(body.into_reader()).lines() {
        let Ok(line) = line else { break };
        if let Some(name) = line.strip_prefix("event: ") {
            event = Some(name.to_owned());
        } else if let Some(data) = line.strip_prefix("data: ") {
            if data == "[DONE]" {
                return (text, true);
            }
            let chunk: Value = serde_json::from_str(data).expect("each data line is JSON");
            if event.take().is_none()
                && let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str()
            {
                text.push_str(piece);
            }
        }
    }
    (text, false)
}

/// The server's resident memory, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// 16 streaming clients against `--parallel 4 --queue 8`: every accepted request returns the bytes
/// it gets alone (same seed), the rest get 503 with Retry-After; clients that disconnect free
/// their slots; memory stays bounded; SIGTERM lets a reply in flight finish and exits 0.
#[test]
fn sixteen_clients_share_four_slots_and_a_bounded_queue() {
    let Some(server) = Server::start(&[
        "--quant",
        "q8_0",
        "--parallel",
        "4",
        "--queue",
        "8",
        "--preload",
    ]) else {
        return;
    };
    let url = format!("{}/v1/chat/completions", server.url);
    let seeds = [11u64, 12, 13, 14];
    let solo: Vec<String> = seeds
        .iter()
        .map(|&seed| {
            let response = post(&url, &chat_request(seed, 40, false));
            assert_eq!(response.status(), 200);
            let body: Value =
                serde_json::from_reader(response.into_body().into_reader()).expect("JSON response");
            body["choices"][0]["message"]["content"]
                .as_str()
                .expect("content")
                .to_owned()
        })
        .collect();
    assert!(solo.iter().all(|t| !t.is_empty()), "{solo:?}");

    let barrier = Arc::new(Barrier::new(16));
    let outcomes: Vec<(u16, Option<String>, String, bool)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let (barrier, url) = (Arc::clone(&barrier), url.clone());
                s.spawn(move || {
                    barrier.wait();
                    let response = post(&url, &chat_request(seeds[i % 4], 40, true));
                    let status = response.status().as_u16();
                    let retry = response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    if status == 200 {
                        let (text, done) = read_stream(response.into_body());
                        (status, retry, text, done)
                    } else {
                        let mut body = String::new();
                        let _ = response.into_body().into_reader().read_to_string(&mut body);
                        (status, retry, body, false)
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    let mut accepted = 0;
    for (i, (status, retry, text, done)) in outcomes.iter().enumerate() {
        match status {
            200 => {
                accepted += 1;
                assert!(done, "client {i}: the stream ended without [DONE]");
                assert_eq!(
                    text,
                    &solo[i % 4],
                    "client {i}: batched bytes differ from solo"
                );
            }
            503 => {
                assert!(retry.is_some(), "client {i}: 503 without Retry-After");
                let body: Value = serde_json::from_str(text).expect("OpenAI error JSON");
                assert!(body["error"]["message"].as_str().is_some(), "{text}");
            }
            other => panic!("client {i}: status {other}: {text}"),
        }
    }
    // All 16 arrive within milliseconds, long before the first reply is done.
    assert!(
        (4..=12).contains(&accepted),
        "{accepted} of 16 accepted with 4 slots and a queue of 8"
    );

    // Twelve long streams fill every slot and the queue; a thirteenth is refused; once those
    // clients disconnect, their slots are free again.
    let mut streams: Vec<BufReader<Box<dyn Read + Send>>> = (0..12)
        .map(|i| {
            let response = post(&url, &chat_request(100 + i, 2000, true));
            assert_eq!(response.status(), 200);
            let reader: Box<dyn Read + Send> = Box::new(response.into_body().into_reader());
            BufReader::new(reader)
        })
        .collect();
    for stream in streams.iter_mut().take(4) {
        let mut line = String::new();
        stream.read_line(&mut line).expect("a first chunk");
        assert!(line.starts_with("data: "), "{line}");
    }
    let refused = post(&url, &chat_request(1, 5, false));
    assert_eq!(refused.status(), 503);
    drop(streams);
    let freed = Instant::now();
    loop {
        let response = post(&url, &chat_request(1, 5, false));
        if response.status() == 200 {
            break;
        }
        assert!(
            freed.elapsed() < Duration::from_secs(60),
            "disconnected clients still hold their slots"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let rss = rss_kib(server.pid());
    assert!(rss > 0 && rss < 3 * 1024 * 1024, "server RSS {rss} KiB");

    // SIGTERM with a reply in flight: it finishes, then the server exits 0.
    let response = post(&url, &chat_request(5, 30, true));
    assert_eq!(response.status(), 200);
    let mut reader = BufReader::new(response.into_body().into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).expect("a first chunk");
    let ending = std::thread::spawn(move || server.terminate());
    let mut rest = String::new();
    let _ = reader.read_to_string(&mut rest);
    assert!(
        rest.contains("data: [DONE]"),
        "the reply in flight was cut: {rest}"
    );
    let (status, log) = ending.join().expect("terminate");
    assert!(status.success(), "exit {status}: {log}");
    assert!(log.contains("stopping"), "{log}");
    assert!(
        !log.contains("Write a short poem"),
        "prompts are logged without --log-prompts"
    );
}

/// Each hostile request gets its clear status in the API's own error shape, and the server keeps
/// serving.
#[test]
fn hostile_requests_get_clear_errors() {
    let Some(server) = Server::start(&["--quant", "q8_0", "--body-limit", "2000000"]) else {
        return;
    };
    let openai = format!("{}/v1/chat/completions", server.url);
    let read = |response: ureq::http::Response<ureq::Body>| -> (u16, Value) {
        let status = response.status().as_u16();
        let mut body = String::new();
        let _ = response.into_body().into_reader().read_to_string(&mut body);
        let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{status}: {e}: {body}"));
        (status, json)
    };
    let openai_error = |body: &str, status: u16, needle: &str, param: Option<&str>| {
        let (got, json) = read(post(&openai, body));
        assert_eq!(got, status, "{json}");
        let message = json["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        if let Some(param) = param {
            assert_eq!(json["error"]["param"], param, "{json}");
        }
    };
    openai_error("{\"model\": ", 400, "not valid JSON", None);
    openai_error(
        &json!({"model": CHAT_MODEL, "messages": "hello"}).to_string(),
        400,
        "messages",
        Some("messages"),
    );
    openai_error(
        &json!({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5})
            .to_string(),
        400,
        "max_tokens must be at least 1",
        Some("max_tokens"),
    );
    openai_error(
        &json!({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"})
            .to_string(),
        400,
        "temperature",
        Some("temperature"),
    );
    openai_error(
        &json!({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1_000_000})
            .to_string(),
        400,
        "limit",
        Some("max_tokens"),
    );
    openai_error(
        &json!({"model": "llama-3-70b", "messages": [{"role": "user", "content": "hi"}]})
            .to_string(),
        404,
        CHAT_MODEL,
        Some("model"),
    );
    // A 1 MB prompt: far beyond the context.
    let long = "word ".repeat(200_000);
    openai_error(
        &json!({"model": CHAT_MODEL, "messages": [{"role": "user", "content": long}]}).to_string(),
        400,
        "context holds",
        None,
    );
    // Over the body limit: refused at once from Content-Length (curl, unlike ureq, reads a
    // response that arrives while it is still sending).
    let dir = tempfile::tempdir().expect("temp dir");
    let huge = dir.path().join("huge.json");
    let pad = "x".repeat(3_000_000);
    std::fs::write(
        &huge,
        format!("{{\"model\": \"{CHAT_MODEL}\", \"pad\": \"{pad}\"}}"),
    )
    .expect("write");
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
        ])
        .arg(format!("@{}", huge.display()))
        .args(["-w", "\n%{http_code}", &openai])
        .output()
        .expect("curl runs");
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = out.rsplit_once('\n').expect("status line");
    assert_eq!(status, "413", "{out}");
    let json: Value = serde_json::from_str(body).expect("OpenAI error JSON");
    assert!(json["error"]["message"].is_string(), "{json}");

    // Ollama's shape: {"error": "..."}.
    let (status, json) = read(post(
        &format!("{}/api/chat", server.url),
        &json!({"model": "mistral", "messages": [{"role": "user", "content": "hi"}]}).to_string(),
    ));
    assert_eq!(status, 404);
    assert!(
        json["error"]
            .as_str()
            .is_some_and(|e| e.contains(CHAT_MODEL)),
        "{json}"
    );
    let (status, json) = read(post(
        &format!("{}/api/generate", server.url),
        &json!({"model": CHAT_MODEL, "prompt": "hi", "options": {"num_predict": "many"}})
            .to_string(),
    ));
    assert_eq!(status, 400, "{json}");
    assert!(
        json["error"]
            .as_str()
            .is_some_and(|e| e.contains("options.num_predict")),
        "{json}"
    );
    let (status, json) = read(post(
        &format!("{}/api/pull", server.url),
        &json!({"model": "llama3.2"}).to_string(),
    ));
    assert_eq!(status, 404, "{json}");
    let (status, json) = read(post(
        &format!("{}/api/embed", server.url),
        &json!({"model": CHAT_MODEL, "input": "x"}).to_string(),
    ));
    assert_eq!(status, 400, "an embedding of a chat model: {json}");
    let (status, _) = read(post(&format!("{}/v1/nothing", server.url), "{}"));
    assert_eq!(status, 404);

    // Still serving, and the attestation of the reply is fetchable by its text's digest.
    let response = post(
        &openai,
        &json!({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0})
            .to_string(),
    );
    assert_eq!(response.status(), 200);
    let header = response
        .headers()
        .get("x-sanctum-attestation")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .expect("X-Sanctum-Attestation");
    let (_, json) = read(response);
    let text = json["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    let digest = hex::encode(sha2::Sha256::digest(text.as_bytes()));
    let fetched = agent()
        .get(&format!("{}/sanctum/v1/attestations/{digest}", server.url))
        .call()
        .expect("answers");
    assert_eq!(fetched.status(), 200);
    let mut bundle = Vec::new();
    fetched
        .into_body()
        .into_reader()
        .read_to_end(&mut bundle)
        .expect("bundle");
    assert_eq!(
        header,
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bundle)))
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&bundle).expect("JSON"),
        json["sanctum"]["attestation"]
    );

    // The reply is in the audit log with its route and the bundle's digest, and the request for
    // a model the lock does not approve is there as a refusal.
    let out = crate::support::sanctum()
        .arg("--store")
        .arg(crate::support::real_store().expect("the real store"))
        .args(["audit", "show", "--format", "json"])
        .output()
        .expect("sanctum runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entries: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(
        entries.iter().any(|e| e["bundle_digest"] == header.as_str()
            && e["command"] == "openai /v1/chat/completions"
            && e["event"] == "chat"
            && e["model"] == CHAT_MODEL),
        "no audit entry for the reply"
    );
    assert!(
        entries
            .iter()
            .any(|e| e["event"] == "serve" && e["outcome"] == "refused" && e["model"] == "mistral"),
        "no audit entry for the refused model"
    );
}

/// A non-loopback bind without a key is refused before anything starts; with a key, requests
/// without it or with a wrong one get 401.
#[test]
fn binds_and_keys() {
    let Some(store) = crate::support::real_store() else {
        return;
    };
    crate::support::sanctum()
        .arg("--store")
        .arg(&store)
        .arg("--lock")
        .arg(crate::support::repo_lock())
        .args(["serve", "--addr", "0.0.0.0:0"])
        .timeout(Duration::from_secs(60))
        .assert()
        .code(2)
        .stderr(predicates::str::contains("--api-key-file"));

    let dir = tempfile::tempdir().expect("temp dir");
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "s3cret-token\n").expect("key file");
    let key_arg = key_file.to_string_lossy().into_owned();
    let server = Server::start_with(&store, &["--api-key-file", &key_arg]);
    let models = format!("{}/v1/models", server.url);
    for (header, status) in [
        (None, 401),
        (Some("Bearer wrong-token!"), 401),
        (Some("Bearer s3cret-token"), 200),
    ] {
        let mut request = agent().get(&models);
        if let Some(h) = header {
            request = request.header("Authorization", h);
        }
        let response = request.call().expect("answers");
        assert_eq!(response.status(), status, "{header:?}");
    }
    let response = agent()
        .get(&format!("{}/api/tags", server.url))
        .call()
        .expect("answers");
    assert_eq!(response.status(), 401);
    let body: Value = serde_json::from_reader(response.into_body().into_reader()).expect("JSON");
    assert!(body["error"].is_string(), "Ollama's shape: {body}");
}
