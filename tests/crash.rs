//! Issue 13: kill -9 at randomized points while sanctum writes (a pull, an import, `--out`, lock
//! signing; the audit log's appends are in `audit.rs`). After every kill what is on disk is either
//! the old state or the complete new one, and it verifies; nothing half-written is read as
//! complete, and the next run cleans up after the killed one.

use std::fs;
use std::path::Path;

use crate::support::{StoreCopy, kill_9_loop, sha256_hex};

/// Every file under `dir` by relative path with its sha256, sorted; None when `dir` is absent.
fn tree_digests(dir: &Path) -> Option<Vec<(String, String)>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
        for e in fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                out.push((rel, sha256_hex(&fs::read(&path).unwrap())));
            }
        }
    }
    if !dir.exists() {
        return None;
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    Some(out)
}

#[test]
fn kill_9_during_pulls_leaves_no_model_but_a_verified_one_and_the_next_pull_cleans_up() {
    let hub = crate::pull::hub();
    let store = hub.home.path().join("store");
    let pull = || {
        let mut cmd = hub.process();
        cmd.args(["--quiet", "models", "pull", "tiny"]);
        cmd
    };
    let (mut present, mut absent) = (0, 0);
    let killed = kill_9_loop(
        12,
        || {
            // Each round pulls from scratch, so every kill lands in a real download.
            let _ = fs::remove_dir_all(store.join("models"));
            pull()
        },
        |_| match tree_digests(&store.join("models/tiny")) {
            Some(files) if !files.is_empty() => {
                present += 1;
                let mut verify = hub.process();
                verify.args(["models", "verify", "tiny"]);
                assert_cmd::Command::from(verify).assert().success();
            }
            _ => absent += 1,
        },
    );
    eprintln!("pull: {killed} of 12 killed; {present} left a model, {absent} none");
    assert!(killed > 0, "no kill landed inside a pull");

    assert_cmd::Command::from(pull()).assert().success();
    let mut verify = hub.process();
    verify.args(["models", "verify", "tiny"]);
    assert_cmd::Command::from(verify).assert().success();
    let left: Vec<String> = fs::read_dir(store.join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("pull-"))
        .collect();
    assert!(left.is_empty(), "staging of killed pulls left: {left:?}");
}

#[test]
fn kill_9_during_a_gguf_import_leaves_no_directory_or_the_whole_one() {
    let Some(gguf) = crate::support::required(
        std::env::var_os("SANCTUM_TEST_SMOLLM2_GGUF"),
        "SANCTUM_TEST_SMOLLM2_GGUF is not set (scripts/test downloads the GGUF)",
    ) else {
        return;
    };
    let work = tempfile::TempDir::new().unwrap();
    let import_into = |out: &Path| {
        let _ = fs::remove_dir_all(out);
        let mut cmd = crate::support::process();
        cmd.args(["import", "gguf"])
            .arg(&gguf)
            .arg("--out")
            .arg(out);
        cmd
    };
    let whole_one = work.path().join("reference");
    assert!(import_into(&whole_one).status().unwrap().success());
    let whole_one = tree_digests(&whole_one).unwrap();

    let out = work.path().join("imported");
    let (mut whole, mut none) = (0, 0);
    let killed = kill_9_loop(
        8,
        || import_into(&out),
        |_| match tree_digests(&out) {
            None => none += 1,
            Some(files) => {
                assert_eq!(
                    files, whole_one,
                    "an import directory that is not the whole one"
                );
                whole += 1;
            }
        },
    );
    eprintln!("import: {killed} of 8 killed; {whole} left the whole directory, {none} none");
    assert!(killed > 0, "no kill landed inside an import");

    // The next import sweeps the staging that killed ones left beside the output (plus one laid
    // out as a killed import leaves it, so the sweep is tested whatever the kills hit), and never
    // anything else there.
    let staging_left = || -> Vec<String> {
        fs::read_dir(work.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(".sanctum-"))
            .collect()
    };
    let dead = work.path().join(".sanctum-import-imported-dead");
    fs::create_dir(&dead).unwrap();
    fs::write(dead.join("model.safetensors"), vec![0u8; 4096]).unwrap();
    fs::write(work.path().join(".sanctum-import-imported-dead.owner"), b"").unwrap();
    eprintln!(
        "import: staging left before the next import: {:?}",
        staging_left()
    );
    assert!(import_into(&out).status().unwrap().success());
    assert_eq!(
        staging_left(),
        Vec::<String>::new(),
        "staging of killed imports left"
    );
    assert_eq!(tree_digests(&out).unwrap(), whole_one);
    assert!(work.path().join("reference").is_dir());
}

/// `run --out`: the output is written whole or not at all, and a bundle beside it is whole too;
/// since every run here gives the same bytes, an output and bundle that are both there verify.
#[test]
fn kill_9_during_out_writes_never_leaves_a_partial_output_or_bundle() {
    let Some(copy) = StoreCopy::of("smollm2-135m-instruct") else {
        return;
    };
    let repo = copy.home.path().join("repo");
    crate::support::git_init(&repo);
    let reply = repo.join("reply.txt");
    let bundle = repo.join(".attestations/reply.txt.sigstore.json");
    let run = || {
        let _ = fs::remove_file(&reply);
        let _ = fs::remove_file(&bundle);
        let mut cmd = copy.process();
        cmd.current_dir(&repo)
            .args(["--quiet", "run", "smollm2-135m-instruct", "Name a colour."])
            .args(["--max-tokens", "6", "--temperature", "0", "--threads", "1"])
            .args(["--out", "reply.txt"]);
        cmd
    };
    assert!(run().status().unwrap().success());
    let expected = fs::read(&reply).unwrap();
    let key = copy.home.path().join("keys/signer.pub");
    let (mut both, mut output_only, mut none) = (0, 0, 0);
    let killed = kill_9_loop(10, run, |_| {
        match (fs::read(&reply).ok(), fs::read(&bundle).ok()) {
            (None, None) => none += 1,
            (Some(output), None) => {
                assert_eq!(output, expected, "a partial output");
                output_only += 1;
            }
            (None, Some(_)) => panic!("a bundle without its output: the output is written first"),
            (Some(output), Some(json)) => {
                assert_eq!(output, expected, "a partial output");
                serde_json::from_slice::<serde_json::Value>(&json).expect("a whole bundle");
                let mut verify = copy.process();
                verify
                    .current_dir(&repo)
                    .args(["attest", "verify", "--artifact", "reply.txt", "--key"])
                    .arg(&key)
                    .arg(&bundle);
                assert_cmd::Command::from(verify).assert().success();
                both += 1;
            }
        }
    });
    eprintln!(
        "--out: {killed} of 10 killed; {both} output and bundle, {output_only} output alone, {none} neither"
    );
    assert!(killed > 0, "no kill landed inside a run");
}

/// `lock sign` replaces the signature atomically: after any kill the lock verifies, under the
/// old signature or the new one.
#[test]
fn kill_9_during_lock_signing_always_leaves_a_verifying_signature() {
    let repo = crate::support::attested::Repo::new();
    let sign = || {
        let mut cmd = repo.process();
        cmd.args(["lock", "sign", "--key", "keys/approver.key"]);
        cmd
    };
    let killed = kill_9_loop(10, sign, |_| {
        let mut verify = repo.process();
        verify.args(["lock", "verify"]);
        assert_cmd::Command::from(verify).assert().success();
    });
    eprintln!("lock sign: {killed} of 10 killed");
    assert!(killed > 0, "no kill landed inside a signing");
}
