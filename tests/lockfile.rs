//! Lockfiles that must be refused before anything is read, and the listing commands.

use std::fs;

use predicates::str::contains;

use crate::support::{HF_SOURCE, TinyModel, lock_text, repo_lock, sanctum, tiny_safetensors};

#[test]
fn lock_paths_that_escape_the_model_directory_are_refused() {
    let weights = tiny_safetensors();
    for (path, reason) in [
        ("../model.safetensors", "escapes the model directory"),
        ("/etc/model.safetensors", "absolute path"),
        ("a/./model.safetensors", "'.' component"),
    ] {
        let tiny = TinyModel::new(&[("model.safetensors", &weights)]);
        fs::write(
            &tiny.lock,
            lock_text("tiny", &[(path, &weights)], HF_SOURCE),
        )
        .unwrap();
        tiny.sanctum()
            .args(["models", "verify", "tiny"])
            .assert()
            .code(2)
            .stderr(contains(format!("invalid file path {path:?}: ")))
            .stderr(contains(reason));
    }
}

#[test]
fn a_lock_edited_by_hand_is_refused() {
    let weights = tiny_safetensors();
    let tiny = TinyModel::new(&[("model.safetensors", &weights)]);
    let text = fs::read_to_string(&tiny.lock).unwrap();
    // Point the file at other bytes without updating the model digest.
    let edited = text.replace(&crate::support::sha256_hex(&weights), &"0".repeat(64));
    fs::write(&tiny.lock, edited).unwrap();
    tiny.sanctum()
        .args(["models", "list"])
        .assert()
        .code(2)
        .stderr(contains("does not match its files"));
}

#[test]
fn lock_listing_pickle_weights_is_refused() {
    let tiny = TinyModel::new(&[("model.safetensors", &tiny_safetensors())]);
    let text = lock_text(
        "tiny",
        &[
            ("model.safetensors", &tiny_safetensors()),
            ("pytorch_model.bin", b"x"),
        ],
        HF_SOURCE,
    );
    fs::write(&tiny.lock, text).unwrap();
    tiny.sanctum()
        .args(["models", "list"])
        .assert()
        .code(2)
        .stderr(contains("pytorch_model.bin"))
        .stderr(contains("only Safetensors weights can be approved"));
}

#[test]
fn the_shipped_lock_lists_both_real_models() {
    let home = tempfile::TempDir::new().unwrap();
    let out = sanctum()
        .arg("--store")
        .arg(home.path())
        .arg("--lock")
        .arg(repo_lock())
        .args(["models", "list", "--format", "json"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let doc: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let models = doc["models"].as_array().unwrap();
    let names: Vec<&str> = models.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert!(
        names.contains(&"smollm2-135m-instruct") && names.contains(&"all-minilm-l6-v2"),
        "{names:?}"
    );
    for m in models {
        assert_eq!(m["state"], "not pulled");
        assert_eq!(m["license"], "Apache-2.0");
        for f in m["files"].as_array().unwrap() {
            assert!(
                f["store_path"]
                    .as_str()
                    .unwrap()
                    .starts_with(home.path().to_str().unwrap())
            );
        }
    }
}

#[test]
fn list_shows_state_of_a_pulled_model() {
    let tiny = TinyModel::new(&[
        ("model.safetensors", &tiny_safetensors()),
        ("config.json", b"{}"),
    ]);
    tiny.sanctum()
        .args(["models", "list"])
        .assert()
        .success()
        .stdout(contains("tiny"))
        .stdout(contains("pulled"));
    tiny.sanctum()
        .args(["models", "list", "--verify"])
        .assert()
        .success()
        .stdout(contains("verified"));
    fs::write(tiny.model_dir.join("config.json"), b"[]").unwrap();
    tiny.sanctum()
        .args(["models", "list", "--verify"])
        .assert()
        .code(1)
        .stdout(contains("FAILED"))
        .stderr(contains("1 model(s) failed verification"));
}
