//! `sanctum import pickle`: the real all-MiniLM model written as torch.save's zip checkpoint
//! (tests/pickle/torch_checkpoint.py, from the shipped Safetensors) converts back to the shipped
//! files byte for byte, so its printed lock entry has the lock's model digest; a checkpoint whose
//! pickle would run `os.system`, a pre-1.6 pickle, and a storage that is shorter than its tensor are
//! refused naming what is wrong, with nothing written and nothing run; and a lock entry with a
//! pickle import pulls the checkpoint from a hub and converts it again into the locked files.

use std::path::{Path, PathBuf};
use std::process::Command as Process;

use attest::lockfile::Source;
use tempfile::TempDir;

use crate::support::hf_server::HfServer;
use crate::support::{real_store, sanctum};

const COMMIT: &str = "89abcdef0123456789abcdef0123456789abcdef";

/// The real all-MiniLM directory pulled by scripts/test.
fn minilm() -> Option<PathBuf> {
    let store = real_store()?;
    Some(
        std::fs::read_dir(store.join("models/all-minilm-l6-v2"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
    )
}

/// The model directory as torch.save would have written it, under `dir/checkpoint`.
fn checkpoint(dir: &Path, model: &Path, evil_marker: Option<&Path>) -> PathBuf {
    let out = dir.join("checkpoint");
    let mut cmd = Process::new("python3");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pickle/torch_checkpoint.py"))
        .arg(model)
        .arg(&out);
    if let Some(marker) = evil_marker {
        cmd.arg("--evil").arg(marker);
    }
    assert!(
        cmd.status().unwrap().success(),
        "torch_checkpoint.py failed"
    );
    out
}

fn lock_digest(name: &str) -> String {
    let lock = attest::lockfile::Lockfile::parse(
        &std::fs::read_to_string(crate::support::repo_lock()).unwrap(),
    )
    .unwrap();
    lock.model(name).unwrap().digest.to_hex()
}

#[test]
fn pickle_import_gives_back_the_shipped_files_byte_for_byte() {
    let Some(model) = minilm() else { return };
    let dir = TempDir::new().unwrap();
    let input = checkpoint(dir.path(), &model, None);
    assert!(!input.join("model.safetensors").exists());
    let out = dir.path().join("out");
    let run = sanctum()
        .args(["import", "pickle"])
        .arg(&input)
        .arg("--out")
        .arg(&out)
        .args(["--name", "all-minilm-l6-v2", "--license", "Apache-2.0"])
        .args([
            "--hf",
            &format!("sentence-transformers/all-MiniLM-L6-v2@{COMMIT}"),
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let entry = String::from_utf8(run.stdout).unwrap();
    let lock = attest::lockfile::Lockfile::parse(&format!("version = 1\n\n{entry}")).unwrap();
    let imported = &lock.models[0];
    assert_eq!(imported.digest.to_hex(), lock_digest("all-minilm-l6-v2"));
    assert_eq!(imported.task, attest::lockfile::Task::Embed);
    let import = imported.import.as_ref().unwrap();
    assert_eq!(import.input, "pytorch_model.bin");
    for file in &imported.files {
        let ours = std::fs::read(out.join(&file.path)).unwrap();
        let shipped = std::fs::read(model.join(&file.path)).unwrap();
        assert!(
            ours == shipped,
            "{} differs from the shipped file",
            file.path
        );
    }

    // The entry as printed pulls: the hub serves the checkpoint directory, the pull converts it.
    let Source::Hf(source) = &imported.source else {
        panic!("{entry}")
    };
    let served = source
        .files
        .iter()
        .flatten()
        .map(|f| (f.clone(), std::fs::read(input.join(f)).unwrap()))
        .collect();
    let server = HfServer::start("sentence-transformers/all-MiniLM-L6-v2", COMMIT, served);
    let lock_path = dir.path().join("models.lock");
    std::fs::write(&lock_path, lock.to_toml()).unwrap();
    let store = dir.path().join("store");
    sanctum()
        .arg("--store")
        .arg(&store)
        .arg("--lock")
        .arg(&lock_path)
        .args([
            "models",
            "pull",
            "all-minilm-l6-v2",
            "--hf-endpoint",
            &server.endpoint(),
        ])
        .assert()
        .success();
    let pulled = store
        .join("models/all-minilm-l6-v2")
        .join(imported.digest.to_hex());
    let weights = std::fs::read(pulled.join("model.safetensors")).unwrap();
    assert!(weights == std::fs::read(model.join("model.safetensors")).unwrap());
}

#[test]
fn pickle_import_refuses_code_old_checkpoints_and_short_storages() {
    let Some(model) = minilm() else { return };
    let refused = |input: &Path, want: &str| {
        let out = input.parent().unwrap().join("out");
        let run = sanctum()
            .args(["import", "pickle"])
            .arg(input)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(want), "wanted {want:?} in: {stderr}");
        assert!(!out.exists(), "an output was left at {}", out.display());
    };

    // A state dict that would run os.system if loaded: refused naming the global, nothing run.
    let dir = TempDir::new().unwrap();
    let marker = dir.path().join("MARKER");
    let evil = checkpoint(dir.path(), &model, Some(&marker));
    refused(&evil, "refused global posix.system");
    refused(
        &evil.join("pytorch_model.bin"),
        "refused global posix.system",
    );
    assert!(!marker.exists(), "the pickle was executed");

    // torch.save before 1.6 wrote bare pickles, not zips.
    let dir = TempDir::new().unwrap();
    let legacy = dir.path().join("legacy.pt");
    std::fs::write(&legacy, b"\x80\x02}q\x00.").unwrap();
    refused(&legacy, "torch 1.6");

    // A storage cut short: named with its tensor before anything is written.
    let dir = TempDir::new().unwrap();
    let input = checkpoint(dir.path(), &model, None);
    let bin = input.join("pytorch_model.bin");
    let script = "import sys, zipfile\n\
        src = zipfile.ZipFile(sys.argv[1]); members = {n: src.read(n) for n in src.namelist()}\n\
        members['pytorch_model/data/0'] = members['pytorch_model/data/0'][:-8]\n\
        with zipfile.ZipFile(sys.argv[1], 'w') as z:\n\
        \x20   [z.writestr(n, b) for n, b in members.items()]\n";
    assert!(
        Process::new("python3")
            .args(["-c", script])
            .arg(&bin)
            .status()
            .unwrap()
            .success()
    );
    refused(&input, "storage pytorch_model/data/0 holds");
}
