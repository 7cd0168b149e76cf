//! Issue 13: an approved model is still input. Real models whose config or weights were made
//! hostile, then pinned in a lock of their own (an approver can be fooled), must be refused with
//! the file and field named, never panic, and never have garbage stamped as their output.

use std::fs;
use std::path::Path;

use crate::support::{TinyModel, real_store};

const MINILM: &str = "all-minilm-l6-v2";
const SMOLLM: &str = "smollm2-135m-instruct";

/// Every file of the real model `name`, by path inside its directory.
fn real_files(name: &str) -> Option<Vec<(String, Vec<u8>)>> {
    let models = real_store()?.join("models").join(name);
    let dir = fs::read_dir(&models)
        .unwrap_or_else(|e| panic!("{}: {e}: run scripts/test", models.display()))
        .next()
        .expect("one pulled version")
        .unwrap()
        .path();
    let mut files = Vec::new();
    collect(&dir, &dir, &mut files);
    files.sort();
    Some(files)
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for e in fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            collect(root, &path, out);
        } else {
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.push((rel, fs::read(&path).unwrap()));
        }
    }
}

/// The real model `name` with `change` applied to its files, approved as `tiny` in a lock.
fn approved_altered(name: &str, change: impl Fn(&str, &mut Vec<u8>)) -> Option<TinyModel> {
    let mut files = real_files(name)?;
    for (path, bytes) in &mut files {
        change(path, bytes);
    }
    let borrowed: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    Some(if name == SMOLLM {
        TinyModel::of_task(&borrowed, "chat", "llama")
    } else {
        TinyModel::new(&borrowed)
    })
}

/// Sets `field` of `config.json` to `value`.
fn set_config(field: &'static str, value: serde_json::Value) -> impl Fn(&str, &mut Vec<u8>) {
    move |path, bytes| {
        if path == "config.json" {
            let mut config: serde_json::Value = serde_json::from_slice(bytes).unwrap();
            config[field] = value.clone();
            *bytes = serde_json::to_vec_pretty(&config).unwrap();
        }
    }
}

/// Sets every value of the f32 Safetensors tensor `tensor` to `value`.
fn fill_tensor(tensor: &'static str, value: f32) -> impl Fn(&str, &mut Vec<u8>) {
    move |path, bytes| {
        if path != "model.safetensors" {
            return;
        }
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
        let offsets = &header[tensor]["data_offsets"];
        let (begin, end) = (
            offsets[0].as_u64().unwrap() as usize,
            offsets[1].as_u64().unwrap() as usize,
        );
        for v in bytes[8 + header_len + begin..8 + header_len + end].chunks_exact_mut(4) {
            v.copy_from_slice(&value.to_le_bytes());
        }
    }
}

/// Bundles written anywhere under the store.
fn bundles(model: &TinyModel) -> usize {
    fn count(dir: &Path) -> usize {
        fs::read_dir(dir).map_or(0, |entries| {
            entries
                .map(|e| e.unwrap().path())
                .map(|p| {
                    if p.is_dir() {
                        count(&p)
                    } else {
                        usize::from(p.to_string_lossy().ends_with(".sigstore.json"))
                    }
                })
                .sum()
        })
    }
    count(model.home.path())
}

/// Runs `args` on `model` and checks that it failed (exit 2) saying each of `expected`, with
/// nothing on stdout and no bundle written anywhere in the store.
fn refused_unstamped(model: &TinyModel, args: &[&str], expected: &[&str]) {
    let stderr = model
        .sanctum()
        .args(args)
        .assert()
        .code(2)
        .stdout("")
        .get_output()
        .stderr
        .clone();
    let stderr = String::from_utf8_lossy(&stderr);
    for part in expected {
        assert!(stderr.contains(part), "expected {part:?} in: {stderr}");
    }
    assert_eq!(bundles(model), 0);
}

#[test]
fn config_values_that_break_arithmetic_are_refused_by_field() {
    for (field, value, expected) in [
        (
            "num_attention_heads",
            serde_json::json!(0),
            "num_attention_heads is 0",
        ),
        (
            "layer_norm_eps",
            serde_json::json!(-1e-12),
            "layer_norm_eps is -0.000000000001",
        ),
        (
            "hidden_size",
            serde_json::json!(1u64 << 40),
            "hidden_size is 1099511627776",
        ),
    ] {
        let Some(model) = approved_altered(MINILM, set_config(field, value)) else {
            return;
        };
        refused_unstamped(
            &model,
            &["embed", "tiny", "a sentence"],
            &["config.json", expected],
        );
    }
    for (field, value, expected) in [
        ("rope_theta", serde_json::json!(0), "rope_theta is 0"),
        (
            "num_key_value_heads",
            serde_json::json!(2),
            "must divide num_attention_heads (9)",
        ),
        ("rms_norm_eps", serde_json::json!(f64::MAX), "rms_norm_eps"),
    ] {
        let Some(model) = approved_altered(SMOLLM, set_config(field, value)) else {
            return;
        };
        refused_unstamped(
            &model,
            &["run", "tiny", "Hello", "--max-tokens", "2"],
            &["config.json", expected],
        );
    }
}

#[test]
fn nan_weights_are_refused_at_load() {
    for (name, tensor, command) in [
        (MINILM, "embeddings.LayerNorm.weight", "embed"),
        (SMOLLM, "model.norm.weight", "run"),
    ] {
        let Some(model) = approved_altered(name, fill_tensor(tensor, f32::NAN)) else {
            return;
        };
        refused_unstamped(
            &model,
            &[command, "tiny", "Hello"],
            &[&format!(
                "model.safetensors: cannot be loaded: tensor \"{tensor}\" holds NaN or infinite values"
            )],
        );
    }
}

/// Finite weights so large that the network overflows: the output is refused, not stamped.
#[test]
fn overflowing_outputs_are_an_error_never_a_stamped_output() {
    let Some(model) =
        approved_altered(MINILM, fill_tensor("embeddings.LayerNorm.weight", f32::MAX))
    else {
        return;
    };
    refused_unstamped(
        &model,
        &["embed", "tiny", "a sentence"],
        &["non-finite embedding"],
    );

    let Some(model) = approved_altered(SMOLLM, fill_tensor("model.norm.weight", f32::MAX)) else {
        return;
    };
    refused_unstamped(
        &model,
        &["run", "tiny", "Hello", "--max-tokens", "2"],
        &["non-finite logit"],
    );
}

// ---------------------------------------------------------------------------------------------
// Files that are not what they seem, and messages that must say so once

/// How long a command that must refuse at once may take before it counts as a hang.
const NO_HANG: std::time::Duration = std::time::Duration::from_secs(120);

fn mkfifo(path: &Path) {
    fs::remove_file(path).unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

fn stderr_of(assert: &assert_cmd::assert::Assert) -> String {
    String::from_utf8_lossy(&assert.get_output().stderr).into_owned()
}

#[test]
fn a_fifo_in_place_of_the_weights_is_refused_without_hanging() {
    let Some(copy) = crate::support::StoreCopy::of(MINILM) else {
        return;
    };
    mkfifo(&copy.file("model.safetensors"));
    copy.sanctum()
        .args(["models", "verify", MINILM])
        .timeout(NO_HANG)
        .assert()
        .code(1)
        .stdout(predicates::str::contains(
            "model.safetensors: not a regular file but a FIFO",
        ));
    copy.sanctum()
        .args(["embed", MINILM, "a sentence"])
        .timeout(NO_HANG)
        .assert()
        .code(1)
        .stdout("")
        .stderr(predicates::str::contains(
            "model.safetensors: not a regular file but a FIFO",
        ));
    // A damaged model makes the verifying listing fail as `models verify` does.
    copy.sanctum()
        .args(["models", "list", "--verify"])
        .timeout(NO_HANG)
        .assert()
        .code(1)
        .stdout(predicates::str::contains(
            "damaged: model.safetensors: not a regular file",
        ));
}

#[test]
fn a_symlinked_model_directory_is_named_as_one_and_said_once() {
    let Some(copy) = crate::support::StoreCopy::of(MINILM) else {
        return;
    };
    let elsewhere = copy.home.path().join("elsewhere");
    fs::rename(&copy.model_dir, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &copy.model_dir).unwrap();
    let assert = copy
        .sanctum()
        .args(["embed", MINILM, "a sentence"])
        .assert()
        .code(1);
    let stderr = stderr_of(&assert);
    assert_eq!(
        stderr.matches("not a directory").count(),
        1,
        "the cause once: {stderr}"
    );
    assert!(stderr.contains("not a directory but a symlink"), "{stderr}");
    copy.sanctum()
        .args(["models", "list"])
        .assert()
        .success()
        .stdout(predicates::str::contains(
            "damaged: the model directory is a symlink",
        ));
}

#[test]
fn a_device_as_lockfile_is_refused_without_reading_it() {
    crate::support::sanctum()
        .args(["--lock", "/dev/zero", "models", "list"])
        .timeout(NO_HANG)
        .assert()
        .code(2)
        .stderr(predicates::str::contains(
            "cannot read lockfile /dev/zero: not a regular file but a character device",
        ));
}

/// `--out` is placed before any model loads: into a missing directory it fails with the
/// directory named, never with the model's own problem (here NaN weights, met only at load).
#[test]
fn out_into_a_missing_directory_fails_before_the_model_loads() {
    let Some(model) = approved_altered(SMOLLM, fill_tensor("model.norm.weight", f32::NAN)) else {
        return;
    };
    let repo = model.home.path().join("repo");
    crate::support::git_init(&repo);
    let out = repo.join("missing/reply.txt");
    let assert = model
        .sanctum()
        .args(["run", "tiny", "Hello", "--max-tokens", "2", "--out"])
        .arg(&out)
        .assert()
        .code(2)
        .stdout("");
    let stderr = stderr_of(&assert);
    assert!(stderr.contains("missing"), "{stderr}");
    assert!(
        !stderr.contains("NaN"),
        "the model was loaded first: {stderr}"
    );
    assert_eq!(bundles(&model), 0);
}

/// A committed `.attestations` symlink pointing outside the repository: placement refuses it,
/// naming it, and writes nothing through it.
#[test]
fn out_never_writes_through_a_symlinked_attestations_directory() {
    let Some(model) = approved_altered(SMOLLM, |_, _| {}) else {
        return;
    };
    let repo = model.home.path().join("repo");
    crate::support::git_init(&repo);
    let outside = model.home.path().join("outside");
    fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, repo.join(".attestations")).unwrap();
    let assert = model
        .sanctum()
        .args(["run", "tiny", "Hello", "--max-tokens", "2", "--out"])
        .arg(repo.join("reply.txt"))
        .assert()
        .failure();
    let stderr = stderr_of(&assert);
    assert!(
        stderr.contains(".attestations") && stderr.contains("symlink"),
        "{stderr}"
    );
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    assert!(!repo.join("reply.txt").exists());
}

/// Values are checked against their range with the flag named, and printed as given.
#[test]
fn generation_settings_are_refused_by_range_and_printed_as_given() {
    let Some(model) = approved_altered(SMOLLM, |_, _| {}) else {
        return;
    };
    // A negative number is a value, not a flag.
    refused_unstamped(
        &model,
        &["run", "tiny", "Hello", "--temperature", "-1"],
        &["temperature must be 0 or more, got -1"],
    );
    refused_unstamped(
        &model,
        &["run", "tiny", "Hello", "--ctx", "0"],
        &["a context of 0 tokens is out of range: the model takes 1 to 8192"],
    );
    let out = model
        .sanctum()
        .args(["run", "tiny", "Hello", "--max-tokens", "1", "--json"])
        .args(["--top-p", "0.9", "--min-p", "0.05", "--temperature", "0.7"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let reply: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let sampling = &reply["sampling"];
    // 0.9 as an f32 widened to f64 is 0.8999999761581421: the decimal given must come back.
    for (setting, given) in [("top_p", 0.9), ("min_p", 0.05), ("temperature", 0.7)] {
        assert_eq!(
            sampling[setting].as_f64(),
            Some(given),
            "{setting} in {sampling}"
        );
    }
}
