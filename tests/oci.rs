//! `sanctum hub push` and the `oci` source against a real registry (Debian's `docker-registry`,
//! distribution 2.8, on 127.0.0.1 with a temporary storage directory): both real models pushed and
//! pulled back into a fresh store, the artifact read back with `skopeo` (manifest, media types,
//! layer digests, signature referrers through the tag fallback), a layer swapped in the registry's
//! storage and a manifest whose layers disagree with the lock refused, and a pull whose connection
//! is cut mid-layer resumed and verified; basic logins and bearer-token challenges (with a token
//! service of the test's) answered, and missing, wrong, misscoped and forged credentials refused.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use std::{fs, thread};

use attest::lockfile::{Lockfile, OciSource, Source};
use predicates::str::contains;
use serde_json::Value;
use tempfile::TempDir;

use crate::support::token_issuer::TokenIssuer;
use crate::support::{real_store, repo_lock, required, sanctum, system_program};

const PASSWORD: &str = "oci test";

/// A `docker-registry` on a free loopback port, storing into a temporary directory; killed when
/// dropped.
struct Registry {
    child: Child,
    storage: TempDir,
    /// `127.0.0.1:PORT`.
    addr: String,
    /// Keeps the htpasswd file of [`Registry::with_login`].
    _auth_dir: Option<TempDir>,
}

impl Registry {
    fn start() -> Option<Self> {
        Self::start_with("")
    }

    /// A registry that wants basic auth for `user` with `password` (an htpasswd file made with
    /// Apache's `htpasswd`, bcrypt as distribution requires).
    fn with_login(user: &str, password: &str) -> Option<Self> {
        let htpasswd = required(
            Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .ok()
                .filter(|o| o.status.success()),
            "htpasswd is not installed (Debian package apache2-utils; .ci/run installs it)",
        )?;
        let dir = TempDir::new().unwrap();
        let file = dir.path().join("htpasswd");
        fs::write(&file, &htpasswd.stdout).unwrap();
        let mut registry = Self::start_with(&format!(
            "auth:\n  htpasswd:\n    realm: sanctum-test\n    path: {}\n",
            file.display()
        ))?;
        registry._auth_dir = Some(dir);
        Some(registry)
    }

    /// A registry with `extra` appended to its configuration.
    fn start_with(extra: &str) -> Option<Self> {
        let binary = system_program(
            &["/usr/bin/docker-registry", "/usr/sbin/docker-registry"],
            "docker-registry",
        )?;
        let storage = TempDir::new().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = storage.path().join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n{extra}",
                storage.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new(binary)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry starts");
        let registry = Self {
            child,
            storage,
            addr,
            _auth_dir: None,
        };
        let started = Instant::now();
        while TcpStream::connect(&registry.addr).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "docker-registry did not listen"
            );
            thread::sleep(Duration::from_millis(50));
        }
        Some(registry)
    }

    /// Where the registry keeps a blob's bytes.
    fn blob_file(&self, sha256: &str) -> PathBuf {
        self.storage
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&sha256[..2])
            .join(sha256)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sanctum hub push MODEL REFERENCE --insecure [ARGS]` from `store`, to spawn.
fn push_process(store: &Path, lock: &Path, model: &str, reference: &str, args: &[&str]) -> Command {
    let mut cmd = crate::support::process();
    cmd.arg("--store")
        .arg(store)
        .arg("--lock")
        .arg(lock)
        .args(["--quiet", "hub", "push", model, reference, "--insecure"])
        .args(args);
    cmd
}

/// [`push_process`], to run and assert on.
fn push_command(
    store: &Path,
    lock: &Path,
    model: &str,
    reference: &str,
    args: &[&str],
) -> assert_cmd::Command {
    assert_cmd::Command::from(push_process(store, lock, model, reference, args))
}

/// The pushed manifest's digest, from what `hub push` printed.
fn manifest_of(stdout: &[u8]) -> String {
    let stdout = String::from_utf8_lossy(stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("manifest = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap_or_else(|| panic!("no manifest digest in {stdout}"))
        .to_owned()
}

/// `sanctum hub push MODEL REFERENCE --insecure [ARGS]` from the real store: the pushed manifest's
/// digest, from what it prints.
fn push(store: &Path, lock: &Path, model: &str, reference: &str, args: &[&str]) -> String {
    let out = push_command(store, lock, model, reference, args)
        .env("SANCTUM_KEY_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "push failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    manifest_of(&out.stdout)
}

/// The repository's lock with each of `sources` (model → (repository, manifest)) as `oci`.
fn oci_lock(dir: &Path, sources: &[(&str, String, &str)]) -> PathBuf {
    let mut lock = Lockfile::parse(&fs::read_to_string(repo_lock()).unwrap()).unwrap();
    for (model, repository, manifest) in sources {
        let entry = lock.models.iter_mut().find(|m| m.name == *model).unwrap();
        entry.source = Source::Oci(OciSource {
            repository: repository.clone(),
            manifest: manifest.parse().unwrap(),
            tag: Some("v1".into()),
        });
        entry.import = None;
    }
    let path = dir.join("oci.lock");
    fs::write(&path, lock.to_toml()).unwrap();
    path
}

fn pull(lock: &Path, store: &Path, models: &[&str]) -> assert_cmd::assert::Assert {
    pull_with(lock, store, models, &[])
}

/// `models pull MODELS --insecure` from `lock` into `store`, with `env` set.
fn pull_with(
    lock: &Path,
    store: &Path,
    models: &[&str],
    env: &[(&str, &str)],
) -> assert_cmd::assert::Assert {
    let mut cmd = sanctum();
    cmd.arg("--store")
        .arg(store)
        .arg("--lock")
        .arg(lock)
        .args(["--quiet", "models", "pull"])
        .args(models)
        .arg("--insecure");
    for (name, value) in env {
        cmd.env(name, value);
    }
    cmd.assert()
}

fn skopeo_raw(reference: &str) -> Value {
    let skopeo = required(
        Command::new("skopeo").arg("--version").output().ok(),
        "skopeo is not installed (.ci/run installs it)",
    );
    if skopeo.is_none() {
        return Value::Null;
    }
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo inspect {reference}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn hub_push_and_oci_pull_round_trip_the_real_models_with_their_signatures() {
    let Some(store) = real_store() else { return };
    let Some(registry) = Registry::start() else {
        return;
    };
    // A signed copy of the lock, and the chat model's OMS signature.
    let work = TempDir::new().unwrap();
    let lock = work.path().join("models.lock");
    fs::copy(repo_lock(), &lock).unwrap();
    let key = work.path().join("approver");
    sanctum()
        .env("SANCTUM_KEY_PASSWORD", PASSWORD)
        .args(["keys", "generate", "--out"])
        .arg(&key)
        .assert()
        .success();
    let signing = |args: &[&str]| {
        let mut cmd = sanctum();
        cmd.current_dir(work.path())
            .env("SANCTUM_KEY_PASSWORD", PASSWORD)
            .arg("--store")
            .arg(&store)
            .arg("--lock")
            .arg(&lock)
            .args(args)
            .arg("--key")
            .arg(key.with_extension("key"));
        cmd.assert().success();
    };
    signing(&["lock", "sign"]);
    signing(&["models", "sign", "smollm2-135m-instruct"]);
    let model_sig = work.path().join("smollm2-135m-instruct.model.sig");
    assert!(model_sig.is_file());

    let chat_repo = format!("{}/models/smollm2", registry.addr);
    let embed_repo = format!("{}/models/minilm", registry.addr);
    let chat = push(
        &store,
        &lock,
        "smollm2-135m-instruct",
        &format!("{chat_repo}:v1"),
        &["--model-signature", model_sig.to_str().unwrap()],
    );
    let embed = push(
        &store,
        &lock,
        "all-minilm-l6-v2",
        &format!("{embed_repo}:v1"),
        &[],
    );
    // The same model always pushes to the same manifest.
    assert_eq!(
        push(
            &store,
            &lock,
            "all-minilm-l6-v2",
            &format!("{embed_repo}:again"),
            &[]
        ),
        embed
    );

    // Pulled back into a fresh store, verified.
    let oci = oci_lock(
        work.path(),
        &[
            ("smollm2-135m-instruct", chat_repo.clone(), &chat),
            ("all-minilm-l6-v2", embed_repo.clone(), &embed),
        ],
    );
    let fresh = TempDir::new().unwrap();
    pull(
        &oci,
        fresh.path(),
        &["smollm2-135m-instruct", "all-minilm-l6-v2"],
    )
    .success()
    .stderr(contains("smollm2-135m-instruct: pulled and verified"))
    .stderr(contains("all-minilm-l6-v2: pulled and verified"));
    sanctum()
        .arg("--store")
        .arg(fresh.path())
        .arg("--lock")
        .arg(&oci)
        .args(["models", "verify"])
        .assert()
        .success()
        .stdout(contains("2 model(s) checked, 0 failed"));

    // A second client reads the artifact as documented.
    let manifest = skopeo_raw(&format!("{chat_repo}:v1"));
    if manifest.is_null() {
        return;
    }
    assert_eq!(
        manifest["artifactType"],
        "application/vnd.cncf.model.manifest.v1+json"
    );
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.cncf.model.config.v1+json"
    );
    let parsed = Lockfile::parse(&fs::read_to_string(repo_lock()).unwrap()).unwrap();
    let entry = parsed.model("smollm2-135m-instruct").unwrap();
    let layers: BTreeMap<String, (String, String)> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["annotations"]["org.cncf.model.filepath"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
                (
                    l["digest"].as_str().unwrap().to_owned(),
                    l["mediaType"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect();
    assert_eq!(layers.len(), entry.files.len());
    for file in &entry.files {
        assert_eq!(
            layers[&file.path].0,
            format!("sha256:{}", file.sha256),
            "{}",
            file.path
        );
    }
    assert_eq!(
        layers["model.safetensors"].1,
        "application/vnd.cncf.model.weight.v1.raw"
    );
    assert_eq!(
        layers["config.json"].1,
        "application/vnd.cncf.model.weight.config.v1.raw"
    );

    // The signatures, found through the referrers tag schema (this registry has no referrers API).
    let index = skopeo_raw(&format!("{chat_repo}:sha256-{chat}"));
    let referrers = index["manifests"].as_array().unwrap();
    assert_eq!(referrers.len(), 2, "{index}");
    let mut predicate_types = Vec::new();
    for referrer in referrers {
        assert_eq!(
            referrer["artifactType"],
            "application/vnd.dev.sigstore.bundle.v0.3+json"
        );
        let bundle_manifest = skopeo_raw(&format!(
            "{chat_repo}@{}",
            referrer["digest"].as_str().unwrap()
        ));
        assert_eq!(
            bundle_manifest["subject"]["digest"],
            format!("sha256:{chat}")
        );
        assert_eq!(
            bundle_manifest["config"]["mediaType"],
            "application/vnd.oci.empty.v1+json"
        );
        assert_eq!(bundle_manifest["layers"].as_array().unwrap().len(), 1);
        predicate_types.push(
            bundle_manifest["annotations"]["dev.sigstore.bundle.predicateType"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert!(
        predicate_types.iter().any(|t| t.contains("model_signing")),
        "{predicate_types:?}"
    );
    // The bytes of the lock's signature are the bundle the registry holds.
    let lock_signature = fs::read(work.path().join("models.lock.sigstore.json")).unwrap();
    let digest = crate::support::sha256_hex(&lock_signature);
    assert_eq!(
        fs::read(registry.blob_file(&digest)).unwrap(),
        lock_signature
    );
}

#[test]
fn oci_pull_refuses_a_swapped_layer_and_a_manifest_that_disagrees_with_the_lock() {
    let Some(store) = real_store() else { return };
    sanctum()
        .arg("--store")
        .arg(&store)
        .arg("--lock")
        .arg(repo_lock())
        .args([
            "hub",
            "push",
            "all-minilm-l6-v2",
            "10.1.2.3:5000/models/minilm:v1",
            "--insecure",
        ])
        .assert()
        .code(2)
        .stderr(contains(
            "plain HTTP is allowed only for a registry on this machine",
        ));
    let Some(registry) = Registry::start() else {
        return;
    };
    let work = TempDir::new().unwrap();
    let embed_repo = format!("{}/models/minilm", registry.addr);
    let chat_repo = format!("{}/models/smollm2", registry.addr);
    let embed = push(
        &store,
        &repo_lock(),
        "all-minilm-l6-v2",
        &format!("{embed_repo}:v1"),
        &[],
    );
    let chat = push(
        &store,
        &repo_lock(),
        "smollm2-135m-instruct",
        &format!("{chat_repo}:v1"),
        &[],
    );

    // The lock pins the chat model's manifest for the embedding model: refused before any layer.
    let wrong = oci_lock(
        work.path(),
        &[("all-minilm-l6-v2", chat_repo.clone(), &chat)],
    );
    let fresh = TempDir::new().unwrap();
    pull(&wrong, fresh.path(), &["all-minilm-l6-v2"])
        .code(1)
        .stderr(contains(
            "the manifest disagrees with the lock, nothing downloaded",
        ));
    assert!(!fresh.path().join("models/all-minilm-l6-v2").exists());

    // A layer's bytes swapped inside the registry's storage (same size): refused, nothing stored.
    let config_sha = "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41";
    let blob = registry.blob_file(config_sha);
    let mut bytes = fs::read(&blob).unwrap();
    bytes[10] ^= 0x20;
    fs::write(&blob, &bytes).unwrap();
    let good = oci_lock(work.path(), &[("all-minilm-l6-v2", embed_repo, &embed)]);
    pull(&good, fresh.path(), &["all-minilm-l6-v2"])
        .code(1)
        .stderr(contains("config.json"))
        .stderr(contains("sha256"));
    assert!(!fresh.path().join("models/all-minilm-l6-v2").exists());
}

/// A TCP proxy in front of the registry that cuts the first connection carrying more than
/// `cut_after` bytes back to the client, and records the `Range` headers clients send.
struct CuttingProxy {
    addr: String,
    cut: Arc<AtomicBool>,
    ranges: Arc<Mutex<Vec<String>>>,
}

impl CuttingProxy {
    fn start(upstream: String, cut_after: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let ranges = Arc::new(Mutex::new(Vec::new()));
        {
            let (cut, ranges) = (Arc::clone(&cut), Arc::clone(&ranges));
            thread::spawn(move || {
                for client in listener.incoming().map_while(Result::ok) {
                    let Ok(server) = TcpStream::connect(&upstream) else {
                        continue;
                    };
                    let (cut, ranges) = (Arc::clone(&cut), Arc::clone(&ranges));
                    thread::spawn(move || {
                        proxy_connection(client, server, cut_after, &cut, &ranges)
                    });
                }
            });
        }
        Self { addr, cut, ranges }
    }
}

fn proxy_connection(
    client: TcpStream,
    server: TcpStream,
    cut_after: u64,
    cut: &AtomicBool,
    ranges: &Mutex<Vec<String>>,
) {
    let sent = Arc::new(AtomicU64::new(0));
    let (mut from_client, mut to_server) =
        (client.try_clone().unwrap(), server.try_clone().unwrap());
    let ranges_seen = thread::scope(|scope| {
        let upward = scope.spawn(move || {
            let mut seen = Vec::new();
            let mut buf = [0u8; 16 << 10];
            while let Ok(n) = from_client.read(&mut buf) {
                if n == 0 || to_server.write_all(&buf[..n]).is_err() {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
                seen.extend(
                    text.lines()
                        .filter_map(|l| l.strip_prefix("range: "))
                        .map(str::to_owned),
                );
            }
            let _ = to_server.shutdown(Shutdown::Write);
            seen
        });
        let (mut from_server, mut to_client) = (server, client);
        let mut buf = [0u8; 16 << 10];
        while let Ok(n) = from_server.read(&mut buf) {
            if n == 0 || to_client.write_all(&buf[..n]).is_err() {
                break;
            }
            let total = sent.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
            if total > cut_after && !cut.swap(true, Ordering::SeqCst) {
                // Mid-layer: the client sees the connection drop.
                let _ = to_client.shutdown(Shutdown::Both);
                let _ = from_server.shutdown(Shutdown::Both);
                break;
            }
        }
        let _ = to_client.shutdown(Shutdown::Both);
        upward.join().unwrap_or_default()
    });
    ranges.lock().unwrap().extend(ranges_seen);
}

#[test]
fn oci_pull_resumes_a_layer_whose_connection_was_cut() {
    let Some(store) = real_store() else { return };
    let Some(registry) = Registry::start() else {
        return;
    };
    let embed = push(
        &store,
        &repo_lock(),
        "all-minilm-l6-v2",
        &format!("{}/models/minilm:v1", registry.addr),
        &[],
    );
    // 8 MB into the 91 MB weights' transfer, the proxy drops the connection.
    let proxy = CuttingProxy::start(registry.addr.clone(), 8 << 20);
    let work = TempDir::new().unwrap();
    let lock = oci_lock(
        work.path(),
        &[(
            "all-minilm-l6-v2",
            format!("{}/models/minilm", proxy.addr),
            &embed,
        )],
    );
    let fresh = TempDir::new().unwrap();
    pull(&lock, fresh.path(), &["all-minilm-l6-v2"])
        .success()
        .stderr(contains("all-minilm-l6-v2: pulled and verified"));
    assert!(
        proxy.cut.load(Ordering::SeqCst),
        "the proxy never cut a transfer"
    );
    let ranges = proxy.ranges.lock().unwrap().clone();
    assert!(
        ranges
            .iter()
            .any(|r| r.starts_with("bytes=") && !r.starts_with("bytes=0-")),
        "no resumed range request: {ranges:?}"
    );
}

/// `sanctum hub push` (then `models pull`) of the small real model against a registry that wants
/// alice's login: refused without credentials, with a hint that names the variables, and with a
/// wrong password; accepted with hers. Returns the lock naming the pushed manifest.
fn push_and_pull_with_login(registry: &Registry, user: &str, password: &str) -> (PathBuf, TempDir) {
    let store = real_store().expect("the real store");
    let reference = format!("{}/models/minilm:v1", registry.addr);
    let push = |creds: Option<(&str, &str)>| {
        let mut cmd = push_command(&store, &repo_lock(), "all-minilm-l6-v2", &reference, &[]);
        if let Some((user, password)) = creds {
            cmd.env("SANCTUM_REGISTRY_USERNAME", user)
                .env("SANCTUM_REGISTRY_PASSWORD", password);
        }
        cmd.assert()
    };
    push(None).code(2).stderr(contains(
        "no credentials were sent: set SANCTUM_REGISTRY_USERNAME",
    ));
    push(Some((user, "wrong"))).code(2).stderr(contains(
        "the registry refused the user name and password sent",
    ));
    let out = push(Some((user, password))).success();
    let manifest = manifest_of(&out.get_output().stdout);
    let work = TempDir::new().unwrap();
    let lock = oci_lock(
        work.path(),
        &[(
            "all-minilm-l6-v2",
            format!("{}/models/minilm", registry.addr),
            &manifest,
        )],
    );
    let fresh = TempDir::new().unwrap();
    pull(&lock, fresh.path(), &["all-minilm-l6-v2"])
        .code(2)
        .stderr(contains("no credentials were sent"));
    assert!(!fresh.path().join("models/all-minilm-l6-v2").exists());
    pull_with(
        &lock,
        fresh.path(),
        &["all-minilm-l6-v2"],
        &[
            ("SANCTUM_REGISTRY_USERNAME", user),
            ("SANCTUM_REGISTRY_PASSWORD", password),
        ],
    )
    .success()
    .stderr(contains("all-minilm-l6-v2: pulled and verified"));
    (lock, work)
}

#[test]
fn hub_push_and_oci_pull_log_in_with_basic_credentials() {
    if real_store().is_none() {
        return;
    }
    let Some(registry) = Registry::with_login("alice", "s3cret") else {
        return;
    };
    push_and_pull_with_login(&registry, "alice", "s3cret");
}

#[test]
fn hub_push_and_oci_pull_answer_a_bearer_token_challenge() {
    if real_store().is_none() {
        return;
    }
    let Some(issuer) = TokenIssuer::start("alice", "s3cret") else {
        return;
    };
    let Some(registry) = Registry::start_with(&issuer.registry_config()) else {
        return;
    };
    // Basic credentials exchanged at the issuer for a token scoped to the repository.
    let (lock, _work) = push_and_pull_with_login(&registry, "alice", "s3cret");

    // A token the caller already holds (SANCTUM_REGISTRY_TOKEN) is sent as is: one for this
    // repository pulls; one for another repository, or signed by a key the registry does not
    // trust, is refused and stores nothing.
    let fresh = TempDir::new().unwrap();
    let pull_with_token = |token: &str| {
        pull_with(
            &lock,
            fresh.path(),
            &["all-minilm-l6-v2"],
            &[("SANCTUM_REGISTRY_TOKEN", token)],
        )
    };
    let elsewhere = issuer.token(&["repository:models/other:pull"]);
    pull_with_token(&elsewhere)
        .code(2)
        .stderr(contains("the registry refused the token sent"));
    let forged = TokenIssuer::start("alice", "s3cret")
        .unwrap()
        .token(&["repository:models/minilm:pull"]);
    pull_with_token(&forged)
        .code(2)
        .stderr(contains("the registry refused the token sent"));
    assert!(!fresh.path().join("models/all-minilm-l6-v2").exists());
    let token = issuer.token(&["repository:models/minilm:pull"]);
    pull_with_token(&token)
        .success()
        .stderr(contains("all-minilm-l6-v2: pulled and verified"));
}

/// Issue 13: kill -9 at random points of `hub push`, each round into a fresh repository so the
/// kills land in blob uploads as well as in the manifest's: whenever the registry serves the tag,
/// every blob its manifest names is there in full; a push into a repository a killed push left
/// completes, and what it pushed pulls back verified.
#[test]
fn kill_9_during_hub_pushes_never_leaves_a_tag_on_missing_blobs() {
    use std::cell::Cell;

    let Some(store) = real_store() else { return };
    let Some(registry) = Registry::start() else {
        return;
    };
    const MODEL: &str = "all-minilm-l6-v2";
    let round = Cell::new(0u32);
    let repository = |n: u32| format!("{}/models/crash{n}", registry.addr);
    let lock = repo_lock();
    let push_round = || {
        round.set(round.get() + 1);
        let reference = format!("{}:v1", repository(round.get()));
        let mut cmd = push_process(&store, &lock, MODEL, &reference, &[]);
        cmd.env("SANCTUM_KEY_PASSWORD", PASSWORD);
        cmd
    };
    let (mut tagged, mut untagged) = (0, 0);
    let killed = crate::support::kill_9_loop(10, push_round, |_| {
        let name = format!("models/crash{}", round.get());
        let base = format!("http://{}/v2/{name}", registry.addr);
        let (status, _, body) = crate::hub::request(
            "GET",
            &format!("{base}/manifests/v1"),
            &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
        );
        if status == 404 {
            untagged += 1;
            return;
        }
        assert_eq!(status, 200, "{name}:v1: {}", String::from_utf8_lossy(&body));
        tagged += 1;
        let manifest: Value = serde_json::from_slice(&body).unwrap();
        let layers = manifest["layers"].as_array().unwrap();
        for blob in layers.iter().chain([&manifest["config"]]) {
            let digest = blob["digest"].as_str().unwrap();
            let (status, headers, _) =
                crate::hub::request("HEAD", &format!("{base}/blobs/{digest}"), &[]);
            assert_eq!(status, 200, "{name}:v1 names {digest}, which is missing");
            let length = headers
                .get("content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            assert_eq!(
                length,
                blob["size"].as_u64(),
                "{name}: {digest} is cut short"
            );
        }
    });
    eprintln!("hub push: {killed} of 10 killed; {tagged} left a tag, {untagged} none");
    assert!(killed > 0, "no kill landed inside a push");

    // Into the last round's repository, whatever its kill left there.
    let last = repository(round.get());
    let work = TempDir::new().unwrap();
    let manifest = push(&store, &lock, MODEL, &format!("{last}:v1"), &[]);
    let lock = oci_lock(work.path(), &[(MODEL, last, &manifest)]);
    pull(&lock, &work.path().join("store"), &[MODEL]).success();
}
