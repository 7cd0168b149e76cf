//! Every refusal of the verified store, shown by attacking real models pulled by scripts/test (and tiny
//! synthetic ones where the lock itself must pin the malicious file).

use std::fs::{self, OpenOptions};
use std::io::Write;

use predicates::prelude::*;
use predicates::str::contains;

use crate::support::{StoreCopy, TinyModel, tiny_safetensors};

const MINILM: &str = "all-minilm-l6-v2";
const SMOLLM: &str = "smollm2-135m-instruct";

/// A pickle stream (protocol 4) like the start of a PyTorch checkpoint's data.pkl.
const PICKLE: &[u8] =
    b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94.";

fn refused(copy: &StoreCopy, model: &str) -> assert_cmd::assert::Assert {
    copy.sanctum()
        .args(["models", "verify", model])
        .assert()
        .code(1)
}

#[test]
fn untouched_real_models_verify() {
    for model in [MINILM, SMOLLM] {
        let Some(copy) = StoreCopy::of(model) else {
            return;
        };
        copy.sanctum()
            .args(["models", "verify", model])
            .assert()
            .success()
            .stdout(contains("0 failed"))
            .stdout(contains("ok    model.safetensors"));
    }
}

#[test]
fn one_flipped_byte_is_refused_with_both_digests() {
    let Some(copy) = StoreCopy::of(MINILM) else {
        return;
    };
    let path = copy.file("model.safetensors");
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    fs::write(&path, &bytes).unwrap();
    refused(&copy, MINILM)
        .stdout(contains(
            "FAIL  model.safetensors: sha256 mismatch: expected 53aa51172d142c89",
        ))
        .stderr(contains("failed verification"));
}

#[test]
fn truncated_and_appended_files_are_refused() {
    let Some(copy) = StoreCopy::of(SMOLLM) else {
        return;
    };
    let path = copy.file("model.safetensors");
    let size = fs::metadata(&path).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(size - 4096)
        .unwrap();
    refused(&copy, SMOLLM).stdout(contains(format!(
        "model.safetensors: size mismatch: the lock says {size} bytes, the file has {}",
        size - 4096
    )));

    let Some(copy) = StoreCopy::of(MINILM) else {
        return;
    };
    OpenOptions::new()
        .append(true)
        .open(copy.file("tokenizer.json"))
        .unwrap()
        .write_all(b" ")
        .unwrap();
    refused(&copy, MINILM).stdout(contains("tokenizer.json: size mismatch"));
}

#[test]
fn unlisted_missing_and_pickle_files_are_refused() {
    let Some(copy) = StoreCopy::of(MINILM) else {
        return;
    };
    fs::write(copy.file("notes.txt"), "hello").unwrap();
    refused(&copy, MINILM).stdout(contains("notes.txt: not listed in the lock"));
    fs::remove_file(copy.file("notes.txt")).unwrap();

    fs::write(copy.file("pytorch_model.bin"), PICKLE).unwrap();
    refused(&copy, MINILM).stdout(contains(
        "pytorch_model.bin: not listed in the lock (pickle data",
    ));
    fs::remove_file(copy.file("pytorch_model.bin")).unwrap();

    fs::remove_file(copy.file("1_Pooling/config.json")).unwrap();
    refused(&copy, MINILM).stdout(contains("1_Pooling/config.json: missing"));
}

#[test]
fn pickle_named_safetensors_is_refused_as_pickle() {
    // In the store, replacing the real weights.
    let Some(copy) = StoreCopy::of(MINILM) else {
        return;
    };
    let path = copy.file("model.safetensors");
    let size = fs::metadata(&path).unwrap().len() as usize;
    let mut evil = PICKLE.to_vec();
    evil.resize(size, 0);
    fs::write(&path, &evil).unwrap();
    refused(&copy, MINILM).stdout(contains("model.safetensors").and(contains("pickle")));

    // Even when an (ill-advised) lock pins the pickle's exact digest.
    let tiny = TinyModel::new(&[("model.safetensors", PICKLE), ("config.json", b"{}")]);
    tiny.sanctum()
        .args(["models", "verify", "tiny"])
        .assert()
        .code(1)
        .stdout(contains("model.safetensors").and(contains("pickle")));
}

/// Header edits that keep the file's size, so the format check (not the size check) must catch them.
#[test]
fn malformed_headers_in_real_weights_are_refused() {
    let Some(copy) = StoreCopy::of(MINILM) else {
        return;
    };
    let path = copy.file("model.safetensors");
    let original = fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(original[8..8 + header_len].to_vec()).unwrap();

    let with_header = |new_header: &str| {
        assert_eq!(
            new_header.len(),
            header.len(),
            "edits keep the header length"
        );
        let mut bytes = original.clone();
        bytes[8..8 + header_len].copy_from_slice(new_header.as_bytes());
        bytes
    };
    let with_len = |len: u64| {
        let mut bytes = original.clone();
        bytes[..8].copy_from_slice(&len.to_le_bytes());
        bytes
    };
    // Each case: the edit, and the words its refusal must contain.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("exceeds the file", with_len(original.len() as u64)),
        ("is absurd", with_len(u64::MAX / 2)),
        (
            "unknown dtype \"Q32\"",
            with_header(&header.replacen("\"F32\"", "\"Q32\"", 1)),
        ),
        ("not valid JSON", with_header(&header.replacen('{', "[", 1))),
        (
            "overlap",
            with_header(&header.replacen("[4096,5632]", "[2560,4096]", 1)),
        ),
        (
            "belong to no tensor",
            with_header(&header.replacen("[4096,5632]", "[5632,7168]", 1)),
        ),
        (
            "which has only",
            with_header(&header.replacen(",47678464]", ",97678464]", 1)),
        ),
    ];
    for (refusal, bytes) in cases {
        assert_eq!(bytes.len(), original.len());
        fs::write(&path, &bytes).unwrap();
        let out = refused(&copy, MINILM).get_output().stdout.clone();
        let out = String::from_utf8_lossy(&out);
        let line = out.lines().find(|l| l.contains("FAIL")).unwrap_or("");
        assert!(
            line.contains("FAIL  model.safetensors: ") && line.contains(refusal),
            "expected a format refusal with {refusal:?}, got: {out}"
        );
    }
}

#[test]
fn symlinks_out_of_the_model_directory_are_refused() {
    let Some(copy) = StoreCopy::of(MINILM) else {
        return;
    };
    let outside = copy.home.path().join("outside.json");
    fs::copy(copy.file("config.json"), &outside).unwrap();
    fs::remove_file(copy.file("config.json")).unwrap();
    std::os::unix::fs::symlink(&outside, copy.file("config.json")).unwrap();
    refused(&copy, MINILM).stdout(contains("config.json: is a symlink"));
}

#[test]
fn models_not_in_the_lock_are_refused() {
    let Some(copy) = StoreCopy::of(MINILM) else {
        return;
    };
    copy.sanctum()
        .args(["models", "verify", "llama-unapproved"])
        .assert()
        .code(1)
        .stderr(contains(
            "model \"llama-unapproved\" is not in the lockfile (approved: ",
        ));
}

/// A file swapped on disk after verification cannot reach the loader: the loader gets the verified
/// bytes, which stay those the lock pins.
#[test]
fn file_replaced_after_verification_cannot_reach_the_loader() {
    let Some(copy) = StoreCopy::of(MINILM) else {
        return;
    };
    let (_, lock) = load_repo_lock();
    let entry = lock.model(MINILM).unwrap();
    let progress = attest::progress::NoProgress;
    let verified = attest::verify::load_verified(entry, &copy.model_dir, &progress).unwrap();

    // Swap the weights for different, well-formed Safetensors: rename over the original.
    let evil = copy.home.path().join("evil.safetensors");
    fs::write(&evil, tiny_safetensors()).unwrap();
    fs::rename(&evil, copy.file("model.safetensors")).unwrap();

    let weights = verified.file("model.safetensors").unwrap();
    assert_eq!(
        weights.sha256,
        entry
            .files
            .iter()
            .find(|f| f.path == "model.safetensors")
            .unwrap()
            .sha256
    );
    assert_eq!(attest::Sha256Digest::of(&weights.bytes), weights.sha256);
    let tensors = safetensors::SafeTensors::deserialize(&weights.bytes).unwrap();
    assert!(
        tensors
            .names()
            .iter()
            .any(|n| n.contains("embeddings.word_embeddings"))
    );
    // A fresh load now refuses the swapped file.
    let err = attest::verify::load_verified(entry, &copy.model_dir, &progress).unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

/// A writer racing the loaders, flipping a multi-chunk weight file between good and bad in place
/// until they are done: every load, kept in memory or streamed into an intake chunk by chunk,
/// either fails naming the file or yields exactly the locked bytes; and the writer did race them
/// (some loads were refused).
#[test]
fn in_place_rewrites_racing_the_loader_never_leak_through() {
    let data = vec![7u8; 3 << 20];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![data.len()], &data)
            .unwrap();
    let good = safetensors::serialize([("w", view)], None).unwrap();
    let mut evil = good.clone();
    let middle = evil.len() / 2;
    evil[middle] ^= 0xff;
    let tiny = TinyModel::new(&[("model.safetensors", &good), ("config.json", b"{}")]);
    let (_, lock) = tiny_lock(&tiny);
    let entry = &lock.models[0];
    let path = tiny.model_dir.join("model.safetensors");
    let stop = std::sync::atomic::AtomicBool::new(false);

    struct Collect(Vec<u8>);
    impl attest::verify::Intake for Collect {
        fn take(&mut self, chunk: &[u8]) -> Result<(), attest::verify::IntakeError> {
            self.0.extend_from_slice(chunk);
            Ok(())
        }
    }
    let progress = attest::progress::NoProgress;
    let streamed = || -> Result<Vec<u8>, attest::verify::VerifyError> {
        let mut load = attest::verify::begin_load(
            entry,
            &tiny.model_dir,
            &progress,
            attest::format::is_safetensors_name,
        )?;
        let mut intake = Collect(Vec::new());
        load.stream("model.safetensors", &mut intake)?;
        load.finish()?;
        Ok(intake.0)
    };
    let kept = || {
        attest::verify::load_verified(entry, &tiny.model_dir, &progress)
            .map(|m| m.file("model.safetensors").unwrap().bytes.clone())
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let bytes = if i.is_multiple_of(2) { &evil } else { &good };
                let _ = fs::write(&path, bytes);
                i += 1;
                // Long enough for some loads to read a whole good copy.
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        });
        let (mut ok, mut refused) = (0, 0);
        for i in 0..200usize {
            let loaded = if i.is_multiple_of(2) {
                streamed()
            } else {
                kept()
            };
            match loaded {
                Ok(bytes) => {
                    assert!(
                        bytes == good,
                        "load {i} got bytes other than the locked ones"
                    );
                    ok += 1;
                }
                Err(e) => {
                    assert!(e.to_string().contains("model.safetensors"), "{e}");
                    refused += 1;
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        eprintln!("{ok} loads got the locked bytes, {refused} were refused");
        assert!(refused > 0, "the writer never raced a load");
    });
}

fn load_repo_lock() -> (std::path::PathBuf, attest::lockfile::Lockfile) {
    let path = crate::support::repo_lock();
    let lock = attest::lockfile::Lockfile::parse(&fs::read_to_string(&path).unwrap()).unwrap();
    (path, lock)
}

fn tiny_lock(tiny: &TinyModel) -> (std::path::PathBuf, attest::lockfile::Lockfile) {
    let lock = attest::lockfile::Lockfile::parse(&fs::read_to_string(&tiny.lock).unwrap()).unwrap();
    (tiny.lock.clone(), lock)
}
