//! `sanctum hub serve`: the real models pulled back by sanctum itself (into a fresh store,
//! verified), by hf-hub (Rust) and by the official `huggingface_hub` Python client; the refusals
//! (a model not in the lock, a path outside a model, a tampered or swapped store file, a missing
//! token, a non-loopback address without one); and `sanctum lock fetch`, which replaces the local
//! lock only with one an approver signed.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use predicates::str::contains;
use serde_json::Value;
use tempfile::TempDir;

use crate::support::attested::Repo;
use crate::support::server::Server;
use crate::support::{StoreCopy, TinyModel, python, real_store, repo_lock, sanctum, sha256_hex};

/// A GET (or HEAD) with headers: the status, the response's headers and its body.
pub(crate) fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> (u16, ureq::http::HeaderMap, Vec<u8>) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .build()
        .into();
    let mut req = ureq::http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let mut response = agent
        .run(req.body(()).expect("a request"))
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let body = if method == "HEAD" {
        Vec::new()
    } else {
        response
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .expect("the body")
    };
    (response.status().as_u16(), response.headers().clone(), body)
}

fn get(url: &str) -> (u16, ureq::http::HeaderMap, Vec<u8>) {
    request("GET", url, &[])
}

fn header<'a>(headers: &'a ureq::http::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// The lock's files of `model`: path → sha256.
fn locked_files(model: &str) -> Vec<(String, String)> {
    let lock =
        attest::lockfile::Lockfile::parse(&fs::read_to_string(repo_lock()).unwrap()).unwrap();
    let entry = lock.model(model).unwrap();
    let mut files: Vec<(String, String)> = entry
        .files
        .iter()
        .map(|f| (f.path.clone(), f.sha256.to_hex()))
        .collect();
    files.sort();
    files
}

#[test]
fn hub_serves_the_approved_models_to_sanctum_hf_hub_and_huggingface_hub() {
    let Some(store) = real_store() else { return };
    let hub = Server::hub(&store, &repo_lock(), &[]);
    let models = ["smollm2-135m-instruct", "all-minilm-l6-v2"];

    // sanctum itself, into a fresh store, verified against the lock.
    let fresh = TempDir::new().unwrap();
    sanctum()
        .arg("--store")
        .arg(fresh.path())
        .arg("--lock")
        .arg(repo_lock())
        .args(["--quiet", "models", "pull"])
        .args(models)
        .args(["--hub", &hub.url])
        .assert()
        .success()
        .stderr(contains("smollm2-135m-instruct: pulled and verified"))
        .stderr(contains("all-minilm-l6-v2: pulled and verified"));
    sanctum()
        .arg("--store")
        .arg(fresh.path())
        .arg("--lock")
        .arg(repo_lock())
        .args(["models", "verify"])
        .assert()
        .success()
        .stdout(contains("2 model(s) checked, 0 failed"));

    // hf-hub, the Rust client, with its own cache.
    let cache = TempDir::new().unwrap();
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_endpoint(hub.url.clone())
        .with_cache_dir(cache.path().to_path_buf())
        .with_progress(false)
        .build()
        .unwrap();
    let repo = api.model("all-minilm-l6-v2".to_owned());
    for (path, sha256) in locked_files("all-minilm-l6-v2") {
        let got = repo
            .get(&path)
            .unwrap_or_else(|e| panic!("hf-hub {path}: {e}"));
        assert_eq!(
            sha256_hex(&fs::read(&got).unwrap()),
            sha256,
            "hf-hub {path}"
        );
    }
    let info = repo.info().unwrap();
    assert_eq!(info.sha, "7b0c46ff596be83ecae3e495b8de16acfdb97cdc");

    // The official huggingface_hub client: snapshot_download and hf_hub_download.
    if let Some(python) = python() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/hub_client.py");
        let cache = TempDir::new().unwrap();
        let out = Command::new(python)
            .arg(script)
            .arg(cache.path())
            .args(models)
            .env("HF_ENDPOINT", &hub.url)
            .env("HF_HUB_DISABLE_TELEMETRY", "1")
            .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            .env("HF_HOME", cache.path().join("home"))
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env_remove("HF_TOKEN")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "hub_client.py failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            hub.log()
        );
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        for model in models {
            let mut got: Vec<(String, String)> = report["snapshot"][model]
                .as_object()
                .unwrap()
                .iter()
                .map(|(p, d)| (p.clone(), d.as_str().unwrap().to_owned()))
                .collect();
            got.sort();
            let expected = locked_files(model);
            assert_eq!(got, expected, "snapshot_download of {model}");
            let config = expected.iter().find(|(p, _)| p == "config.json").unwrap();
            assert_eq!(report["file"][model], config.1.as_str(), "hf_hub_download");
        }
        assert_eq!(report["listed"], serde_json::json!(models));
        assert_eq!(report["not_approved"], "RepositoryNotFoundError");
        assert_eq!(report["not_in_lock"], "RemoteEntryNotFoundError");
    }

    // Refusals, with the hub's error codes.
    let (status, headers, body) = get(&format!(
        "{}/not-approved/resolve/main/config.json",
        hub.url
    ));
    assert_eq!(
        (status, header(&headers, "x-error-code")),
        (404, "RepoNotFound")
    );
    assert!(String::from_utf8_lossy(&body).contains("not an approved model"));
    let (status, headers, _) = get(&format!(
        "{}/all-minilm-l6-v2/resolve/main/pytorch_model.bin",
        hub.url
    ));
    assert_eq!(
        (status, header(&headers, "x-error-code")),
        (404, "EntryNotFound")
    );
    let (status, headers, _) = get(&format!(
        "{}/all-minilm-l6-v2/resolve/0000000000000000000000000000000000000000/config.json",
        hub.url
    ));
    assert_eq!(
        (status, header(&headers, "x-error-code")),
        (404, "RevisionNotFound")
    );
    // A path outside the model, sent as is (a client would normalize `..` away).
    let traversal = Command::new("curl")
        .args(["-s", "--path-as-is", "-w", "\n%{http_code}"])
        .arg(format!(
            "{}/all-minilm-l6-v2/resolve/main/../smollm2-135m-instruct/config.json",
            hub.url
        ))
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&traversal.stdout);
    assert!(text.ends_with("\n400"), "{text}");
    assert!(text.contains("escapes the model directory"), "{text}");
}

#[test]
fn hub_answers_ranges_and_heads_as_the_hub_does() {
    let Some(store) = real_store() else { return };
    let hub = Server::hub(&store, &repo_lock(), &[]);
    let url = format!(
        "{}/all-minilm-l6-v2/resolve/main/model.safetensors",
        hub.url
    );
    let (status, headers, body) = request("HEAD", &url, &[]);
    assert_eq!(status, 200);
    assert!(body.is_empty());
    assert_eq!(header(&headers, "content-length"), "90868376");
    assert_eq!(header(&headers, "x-linked-size"), "90868376");
    let etag = "\"53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db\"";
    assert_eq!(header(&headers, "etag"), etag);
    assert_eq!(header(&headers, "x-linked-etag"), etag);
    assert_eq!(
        header(&headers, "x-repo-commit"),
        "7b0c46ff596be83ecae3e495b8de16acfdb97cdc"
    );
    assert!(headers.get("x-xet-hash").is_none());
    let (status, headers, body) = request("GET", &url, &[("Range", "bytes=8-15")]);
    assert_eq!(status, 206);
    assert_eq!(header(&headers, "content-range"), "bytes 8-15/90868376");
    // The first bytes after Safetensors' 8-byte header length: the JSON header's start.
    assert_eq!(body.len(), 8);
    assert_eq!(body[0], b'{');
    let (status, headers, _) = request("GET", &url, &[("Range", "bytes=90868376-")]);
    assert_eq!(status, 416);
    assert_eq!(header(&headers, "content-range"), "bytes */90868376");
    // The tree lists every file with its LFS digest, directories too.
    let (status, _, body) = get(&format!(
        "{}/api/models/all-minilm-l6-v2/tree/main?recursive=true",
        hub.url
    ));
    assert_eq!(status, 200);
    let tree: Value = serde_json::from_slice(&body).unwrap();
    let files: Vec<&str> = tree
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "file")
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(files.len(), 9);
    assert!(files.contains(&"1_Pooling/config.json"));
    let weights = tree
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"] == "model.safetensors")
        .unwrap();
    assert_eq!(
        weights["lfs"]["oid"],
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    );
    let (_, _, body) = get(&format!(
        "{}/api/models/all-minilm-l6-v2/tree/main",
        hub.url
    ));
    let top: Value = serde_json::from_slice(&body).unwrap();
    assert!(
        top.as_array()
            .unwrap()
            .iter()
            .any(|e| e["path"] == "1_Pooling" && e["type"] == "directory")
    );
    assert!(
        !top.as_array()
            .unwrap()
            .iter()
            .any(|e| e["path"] == "1_Pooling/config.json")
    );
}

#[test]
fn hub_refuses_a_tampered_or_swapped_store_file_and_never_serves_it() {
    let Some(copy) = StoreCopy::of("all-minilm-l6-v2") else {
        return;
    };
    let hub = Server::hub(copy.home.path(), &repo_lock(), &[]);
    let base = format!("{}/all-minilm-l6-v2/resolve/main", hub.url);
    let url = |path: &str| format!("{base}/{path}");
    assert_eq!(get(&url("config.json")).0, 200);

    // One byte flipped in place after the hub verified the file at startup.
    let config = copy.file("config.json");
    let mut bytes = fs::read(&config).unwrap();
    bytes[10] ^= 0x20;
    fs::OpenOptions::new()
        .write(true)
        .open(&config)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &bytes))
        .unwrap();
    let (status, _, body) = get(&url("config.json"));
    assert_eq!(status, 500, "{}", String::from_utf8_lossy(&body));
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("does not match the lock"), "{body}");
    assert!(
        !body.contains("MiniLM"),
        "no byte of the file is sent: {body}"
    );

    // A file swapped for another of the same size by rename.
    let modules = copy.file("modules.json");
    let mut swapped = fs::read(&modules).unwrap();
    swapped[0] = b' ';
    let other = copy.home.path().join("swap");
    fs::write(&other, &swapped).unwrap();
    fs::rename(&other, &modules).unwrap();
    assert_eq!(get(&url("modules.json")).0, 500);
    // The untouched files are still served.
    assert_eq!(get(&url("tokenizer_config.json")).0, 200);

    // A pull from it fails at the tampered file and leaves nothing in the fresh store.
    let fresh = TempDir::new().unwrap();
    sanctum()
        .arg("--store")
        .arg(fresh.path())
        .arg("--lock")
        .arg(repo_lock())
        .args([
            "--quiet",
            "models",
            "pull",
            "all-minilm-l6-v2",
            "--hub",
            &hub.url,
        ])
        .assert()
        .failure()
        .stderr(contains("500"));
    assert!(!fresh.path().join("models/all-minilm-l6-v2").exists());
    let (_, log) = hub.terminate();
    assert!(
        log.contains("REFUSED all-minilm-l6-v2/config.json: sha256"),
        "{log}"
    );
    assert!(
        log.contains("REFUSED all-minilm-l6-v2/modules.json"),
        "{log}"
    );

    // Restarted on the damaged store, the hub leaves the model out and says why.
    let hub = Server::hub(copy.home.path(), &repo_lock(), &[]);
    assert!(
        hub.log().contains("not serving all-minilm-l6-v2"),
        "{}",
        hub.log()
    );
    let (status, _, body) = get(&format!(
        "{}/all-minilm-l6-v2/resolve/main/tokenizer_config.json",
        hub.url
    ));
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains("approved but not served"));
}

#[test]
fn hub_needs_its_token_and_refuses_other_addresses_without_one() {
    let weights = crate::support::tiny_safetensors();
    let model = TinyModel::new(&[("model.safetensors", &weights), ("config.json", b"{}")]);
    sanctum()
        .arg("--store")
        .arg(model.home.path())
        .arg("--lock")
        .arg(&model.lock)
        .args(["hub", "serve", "--addr", "0.0.0.0:0"])
        .assert()
        .code(2)
        .stderr(contains("without a token"));

    // The model's OpenSSF Model Signing signature, served beside it.
    let signatures = model.home.path().join("signatures");
    let key = model.home.path().join("keys/approver");
    sanctum()
        .env("SANCTUM_KEY_PASSWORD", "hub test")
        .args(["keys", "generate", "--out"])
        .arg(&key)
        .assert()
        .success();
    model
        .sanctum()
        .env("SANCTUM_KEY_PASSWORD", "hub test")
        .args(["models", "sign", "tiny", "--key"])
        .arg(key.with_extension("key"))
        .arg("--signature")
        .arg(signatures.join("tiny.model.sig"))
        .assert()
        .success();

    let token_file = model.home.path().join("token");
    fs::write(&token_file, "s3cret\n").unwrap();
    let hub = Server::hub(
        model.home.path(),
        &model.lock,
        &[
            "--token-file",
            token_file.to_str().unwrap(),
            "--model-signatures",
            signatures.to_str().unwrap(),
        ],
    );
    let url = format!("{}/tiny/resolve/main/config.json", hub.url);
    let (status, headers, _) = get(&url);
    assert_eq!(
        (status, header(&headers, "www-authenticate")),
        (401, "Bearer")
    );
    assert_eq!(
        request("GET", &url, &[("Authorization", "Bearer wrong")]).0,
        401
    );
    assert_eq!(get(&format!("{}/sanctum/models.lock", hub.url)).0, 401);
    let (status, _, body) = request("GET", &url, &[("Authorization", "Bearer s3cret")]);
    assert_eq!((status, body.as_slice()), (200, b"{}".as_slice()));
    let (status, _, signature) = request(
        "GET",
        &format!("{}/sanctum/models/tiny/model.sig", hub.url),
        &[("Authorization", "Bearer s3cret")],
    );
    assert_eq!(status, 200);
    let fetched = model.home.path().join("fetched.model.sig");
    fs::write(&fetched, &signature).unwrap();
    model
        .sanctum()
        .args(["models", "verify-signature", "tiny", "--key"])
        .arg(key.with_extension("pub"))
        .arg("--signature")
        .arg(&fetched)
        .assert()
        .success();

    // sanctum sends the token from SANCTUM_HUB_TOKEN, and pulls the model.
    let fresh = TempDir::new().unwrap();
    let pull = |token: Option<&str>| {
        let mut cmd = sanctum();
        cmd.arg("--store")
            .arg(fresh.path())
            .arg("--lock")
            .arg(&model.lock)
            .args(["--quiet", "models", "pull", "tiny"])
            .env("SANCTUM_HUB", &hub.url);
        if let Some(token) = token {
            cmd.env("SANCTUM_HUB_TOKEN", token);
        }
        cmd.assert()
    };
    pull(None).failure().stderr(contains("401"));
    // The lock's own source (an hf repository on the public hub) is never asked.
    pull(Some("s3cret"))
        .success()
        .stderr(contains("tiny: pulled and verified"));
}

#[test]
fn lock_fetch_takes_a_lock_only_with_an_approvers_signature() {
    let repo = Repo::new();
    let empty_store = TempDir::new().unwrap();
    let hub = Server::hub(empty_store.path(), &repo.path("models.lock"), &[]);
    let (status, _, served) = get(&format!("{}/sanctum/models.lock", hub.url));
    assert_eq!(status, 200);
    assert_eq!(served, fs::read(repo.path("models.lock")).unwrap());
    assert_eq!(
        get(&format!("{}/sanctum/models.lock.sigstore.json", hub.url)).0,
        200
    );

    // A laptop whose policy names the approver: the lock and its signature land in its home.
    let laptop = TempDir::new().unwrap();
    let policy = laptop.path().join("policy.toml");
    fs::write(
        &policy,
        format!(
            "version = 1\n\n[[approver]]\nname = \"security\"\nkey = \"{}\"\n",
            repo.path("keys/approver.pub").display()
        ),
    )
    .unwrap();
    let fetch = |policy: &Path| {
        let mut cmd = sanctum();
        cmd.current_dir(laptop.path())
            .env("SANCTUM_HOME", laptop.path().join("home"))
            .arg("--policy")
            .arg(policy)
            .args(["lock", "fetch", "--hub", &hub.url]);
        cmd.assert()
    };
    fetch(&policy)
        .success()
        .stdout(contains("2 models"))
        .stdout(contains("signed by approver security"));
    let fetched = laptop.path().join("home/models.lock");
    assert_eq!(fs::read(&fetched).unwrap(), served);
    assert!(
        laptop
            .path()
            .join("home/models.lock.sigstore.json")
            .is_file()
    );

    // A policy that trusts another key refuses it, and the fetched lock stays as it was.
    let stranger = laptop.path().join("stranger.toml");
    fs::write(
        &stranger,
        format!(
            "version = 1\n\n[[approver]]\nname = \"other\"\nkey = \"{}\"\n",
            repo.path("keys/stranger.pub").display()
        ),
    )
    .unwrap();
    fs::write(&fetched, "version = 1\n").unwrap();
    fetch(&stranger)
        .code(1)
        .stderr(contains("failed verification, the local lock is unchanged"));
    assert_eq!(fs::read_to_string(&fetched).unwrap(), "version = 1\n");
    drop(hub);

    // A hub serving a lock edited after it was signed: refused.
    let edited = repo.path("models.lock");
    let mut text = fs::read_to_string(&edited).unwrap();
    text.push_str("\n# edited after signing\n");
    fs::write(&edited, text).unwrap();
    let lax = laptop.path().join("lax.toml");
    fs::write(&lax, "version = 1\n").unwrap();
    let hub = Server::launch({
        let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("sanctum"));
        cmd.arg("--store")
            .arg(empty_store.path())
            .arg("--lock")
            .arg(&edited)
            .arg("--policy")
            .arg(&lax)
            .args(["hub", "serve", "--addr", "127.0.0.1:0"]);
        cmd
    });
    let mut cmd = sanctum();
    cmd.current_dir(laptop.path())
        .env("SANCTUM_HOME", laptop.path().join("home"))
        .arg("--policy")
        .arg(&policy)
        .args(["lock", "fetch", "--hub", &hub.url]);
    cmd.assert().code(1).stderr(contains("failed verification"));
    assert_eq!(fs::read_to_string(&fetched).unwrap(), "version = 1\n");
}
