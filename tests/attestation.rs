//! Attestations, lock signatures and model signatures through the CLI: every check of
//! `sanctum attest verify` attacked and refused with its step named, `--git` ranges with edited
//! outputs, the runner refusing a lock the policy does not accept, and OpenSSF model signatures
//! cross-verified with the `model_signing` tool in both directions.

use std::fs;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use predicates::prelude::*;
use predicates::str::contains;

use crate::support::attested::{Repo, edit_bundle, model, model_signing, record, tool};

const OUTPUT: &[u8] = b"print(\"hello, world\")\n";

fn verify(repo: &Repo, bundle: &std::path::Path, artifact: &str) -> assert_cmd::assert::Assert {
    repo.sanctum()
        .args(["attest", "verify", "--artifact", artifact])
        .arg(bundle)
        .assert()
}

/// Exit 1 with the step's number and name on stdout.
fn refused_at(assert: assert_cmd::assert::Assert, step: &str) {
    assert
        .code(1)
        .stdout(contains("FAIL"))
        .stdout(contains(step))
        .stderr(contains("failed verification"));
}

#[test]
fn a_stamped_output_passes_every_step() {
    let repo = Repo::new();
    let tiny = &repo.lock.models[0];
    let bundle = repo.emit("ci", tiny, "src/hello.py", OUTPUT);
    assert_eq!(
        bundle,
        repo.path(".attestations/src/hello.py.sigstore.json")
    );
    verify(&repo, &bundle, "src/hello.py")
        .success()
        .stdout(contains(
            "lockfile models.lock: signed by approver security",
        ))
        .stdout(contains("PASS  .attestations/src/hello.py.sigstore.json"))
        .stdout(contains("subject src/hello.py"))
        .stdout(contains("run by model tiny"))
        .stdout(contains("signed by ci"))
        .stdout(contains("1 attestation(s): 1 passed, 0 failed"));

    let out = repo
        .sanctum()
        .args([
            "attest",
            "verify",
            "--format",
            "json",
            "--artifact",
            "src/hello.py",
        ])
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], true);
    let a = &report["attestations"][0];
    let steps: Vec<(&str, &str)> = a["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_str().unwrap(), s["result"].as_str().unwrap()))
        .collect();
    assert_eq!(
        steps,
        [
            ("well-formed-bundle", "pass"),
            ("trusted-signer", "pass"),
            ("signature", "pass"),
            ("statement-type", "pass"),
            ("subject-digest", "pass"),
            ("model-in-lock", "pass"),
            ("license", "pass"),
            ("lock-signature", "pass"),
        ]
    );
    let predicate = &a["predicate"];
    assert_eq!(predicate["model"]["digest"]["sha256"], tiny.digest.to_hex());
    assert_eq!(predicate["model"]["files"].as_array().unwrap().len(), 2);
    assert_eq!(predicate["lockfile"]["signer"]["name"], "security");
    assert_eq!(predicate["sampling"]["seed"], 7);
    assert!(
        predicate["prompt"]["text"].is_null(),
        "the prompt text only with --attest-prompt"
    );

    // The bundle is a Sigstore v0.3 bundle with a key hint and an in-toto DSSE envelope.
    let b: serde_json::Value = serde_json::from_slice(&fs::read(&bundle).unwrap()).unwrap();
    assert_eq!(
        b["mediaType"],
        "application/vnd.dev.sigstore.bundle.v0.3+json"
    );
    assert_eq!(
        b["verificationMaterial"]["tlogEntries"],
        serde_json::json!([])
    );
    assert_eq!(
        b["dsseEnvelope"]["payloadType"],
        "application/vnd.in-toto+json"
    );
    let hint = b["verificationMaterial"]["publicKey"]["hint"]
        .as_str()
        .unwrap();
    let public = fs::read(repo.path("keys/ci.pub")).unwrap();
    assert_eq!(hint, crate::support::sha256_hex(&public));
}

#[test]
fn one_byte_changed_in_the_output_is_refused_at_the_subject_step() {
    let repo = Repo::new();
    let bundle = repo.emit("ci", &repo.lock.models[0], "out.txt", OUTPUT);
    let mut edited = OUTPUT.to_vec();
    edited[3] ^= 0x20;
    fs::write(repo.path("out.txt"), &edited).unwrap();
    refused_at(
        verify(&repo, &bundle, "out.txt"),
        "step 5 (subject digest): out.txt: the output's sha256 is",
    );
}

#[test]
fn one_byte_changed_in_the_payload_or_the_signature_is_refused_at_the_signature_step() {
    let repo = Repo::new();
    let bundle = repo.emit("ci", &repo.lock.models[0], "out.txt", OUTPUT);
    let original = fs::read(&bundle).unwrap();

    edit_bundle(&bundle, |b| {
        let mut payload = STANDARD
            .decode(b["dsseEnvelope"]["payload"].as_str().unwrap())
            .unwrap();
        let at = payload.windows(4).position(|w| w == b"tiny").unwrap();
        payload[at] = b'T';
        b["dsseEnvelope"]["payload"] = STANDARD.encode(payload).into();
    });
    refused_at(
        verify(&repo, &bundle, "out.txt"),
        "step 3 (signature): the signature does not verify",
    );

    fs::write(&bundle, &original).unwrap();
    edit_bundle(&bundle, |b| {
        let mut sig = STANDARD
            .decode(b["dsseEnvelope"]["signatures"][0]["sig"].as_str().unwrap())
            .unwrap();
        let last = sig.len() - 1;
        sig[last] ^= 0x01;
        b["dsseEnvelope"]["signatures"][0]["sig"] = STANDARD.encode(sig).into();
    });
    refused_at(verify(&repo, &bundle, "out.txt"), "step 3 (signature)");
}

#[test]
fn a_signature_moved_from_another_bundle_is_refused() {
    let repo = Repo::new();
    let bundle = repo.emit("ci", &repo.lock.models[0], "a.txt", OUTPUT);
    let other = repo.emit("ci", &repo.lock.models[0], "b.txt", b"another output\n");
    let other: serde_json::Value = serde_json::from_slice(&fs::read(other).unwrap()).unwrap();
    edit_bundle(&bundle, |b| {
        b["dsseEnvelope"]["signatures"] = other["dsseEnvelope"]["signatures"].clone();
    });
    refused_at(verify(&repo, &bundle, "a.txt"), "step 3 (signature)");
}

#[test]
fn an_untrusted_key_is_refused_even_under_a_trusted_hint() {
    let repo = Repo::new();
    let bundle = repo.emit("stranger", &repo.lock.models[0], "out.txt", OUTPUT);
    refused_at(
        verify(&repo, &bundle, "out.txt"),
        "step 2 (trusted signer): key",
    );

    // Relabelled with the trusted signer's hint (and keyid): the signature step catches it.
    let ci_hint = repo.key("ci").hint().as_str().to_owned();
    edit_bundle(&bundle, |b| {
        b["verificationMaterial"]["publicKey"]["hint"] = ci_hint.clone().into();
        b["dsseEnvelope"]["signatures"][0]["keyid"] = ci_hint.clone().into();
    });
    refused_at(verify(&repo, &bundle, "out.txt"), "step 3 (signature)");

    // Trusted ad hoc with --key, the stranger's honest bundle passes.
    let bundle = repo.emit("stranger", &repo.lock.models[0], "out.txt", OUTPUT);
    repo.sanctum()
        .args([
            "attest",
            "verify",
            "--key",
            "keys/stranger.pub",
            "--artifact",
            "out.txt",
        ])
        .arg(&bundle)
        .assert()
        .success();
}

#[test]
fn a_bundle_whose_hint_and_keyid_disagree_is_malformed() {
    let repo = Repo::new();
    let bundle = repo.emit("ci", &repo.lock.models[0], "out.txt", OUTPUT);
    let stranger = repo.key("stranger").hint().as_str().to_owned();
    edit_bundle(&bundle, |b| {
        b["dsseEnvelope"]["signatures"][0]["keyid"] = stranger.clone().into();
    });
    refused_at(
        verify(&repo, &bundle, "out.txt"),
        "step 1 (well-formed bundle): the key hint",
    );
    fs::write(
        &bundle,
        b"{\"mediaType\": \"application/vnd.dev.sigstore.bundle.v0.3+json\"}",
    )
    .unwrap();
    refused_at(
        verify(&repo, &bundle, "out.txt"),
        "step 1 (well-formed bundle)",
    );
}

#[test]
fn a_model_digest_not_in_the_lock_is_refused() {
    let repo = Repo::new();
    let retrained = model("tiny", "Apache-2.0", b"other weights");
    let bundle = repo.emit("ci", &retrained, "out.txt", OUTPUT);
    refused_at(
        verify(&repo, &bundle, "out.txt"),
        "step 6 (model in lock): model \"tiny\" at sha256",
    );
    let ghost = model("ghost", "Apache-2.0", b"w");
    let bundle = repo.emit("ci", &ghost, "out.txt", OUTPUT);
    refused_at(
        verify(&repo, &bundle, "out.txt"),
        "step 6 (model in lock): model \"ghost\"",
    );
}

#[test]
fn a_denied_license_is_refused() {
    let repo = Repo::new();
    let bundle = repo.emit("ci", &repo.lock.models[1], "out.txt", OUTPUT);
    refused_at(
        verify(&repo, &bundle, "out.txt"),
        "step 7 (license): model \"nc\" is licensed CC-BY-NC-4.0: CC-BY-NC-4.0 is a non-commercial license",
    );
    // Allowed explicitly by the policy, it passes.
    let policy = fs::read_to_string(repo.path("sanctum-policy.toml")).unwrap();
    fs::write(
        repo.path("sanctum-policy.toml"),
        format!("{policy}\n[licenses]\nallow = [\"Apache-2.0\", \"CC-BY-NC-4.0\"]\n"),
    )
    .unwrap();
    verify(&repo, &bundle, "out.txt").success();
}

#[test]
fn a_lock_edited_after_signing_is_refused_by_the_verifier_and_the_runner() {
    let repo = Repo::new();
    let bundle = repo.emit("ci", &repo.lock.models[0], "out.txt", OUTPUT);
    let lock = repo.path("models.lock");
    let mut text = fs::read_to_string(&lock).unwrap();
    text.push_str("# an innocent comment\n");
    fs::write(&lock, text).unwrap();
    refused_at(
        verify(&repo, &bundle, "out.txt"),
        "step 8 (lock signature): lock signature",
    );
    repo.sanctum()
        .args(["attest", "verify", "--artifact", "out.txt"])
        .arg(&bundle)
        .assert()
        .stdout(contains("the lock was edited after signing"));
    repo.sanctum()
        .args(["lock", "verify"])
        .assert()
        .code(1)
        .stdout(contains(
            "step 5 (subject digest): the lock was edited after signing",
        ));
    // The runner refuses it before loading anything.
    repo.sanctum()
        .args(["models", "verify", "tiny"])
        .assert()
        .code(1)
        .stderr(contains("refused by the policy"))
        .stderr(contains("edited after signing"));
}

#[test]
fn the_runner_refuses_unsigned_and_untrusted_locks_when_the_policy_requires_a_signature() {
    let repo = Repo::new();
    repo.sanctum()
        .args(["lock", "verify"])
        .assert()
        .success()
        .stdout(contains("signed by approver security"));
    fs::remove_file(repo.path("models.lock.sigstore.json")).unwrap();
    repo.sanctum()
        .args(["models", "list"])
        .assert()
        .code(1)
        .stderr(contains(
            "the lockfile is not signed, and the policy requires a signature",
        ));
    repo.sanctum().args(["lock", "verify"]).assert().code(1);

    // Signed by a key that is not an approver.
    repo.sanctum()
        .args(["lock", "sign", "--key", "keys/stranger.key"])
        .assert()
        .success()
        .stderr(contains("is not an [[approver]]"));
    repo.sanctum()
        .args(["models", "list"])
        .assert()
        .code(1)
        .stderr(contains(
            "step 2 (trusted signer): the lock is signed by key",
        ));

    // Without approvers in the policy, an unsigned lock is fine (the default).
    fs::remove_file(repo.path("models.lock.sigstore.json")).unwrap();
    fs::write(repo.path("sanctum-policy.toml"), "version = 1\n").unwrap();
    repo.sanctum().args(["models", "list"]).assert().success();
}

#[test]
fn git_range_checks_added_attestations_and_reports_edits() {
    let repo = Repo::new();
    let base = repo.commit("base");
    repo.emit("ci", &repo.lock.models[0], "src/a.py", OUTPUT);
    repo.emit("ci", &repo.lock.models[0], "src/b.py", b"b = 1\n");
    let generated = repo.commit("generated code");
    // A developer edits one output after generation: allowed, but shown.
    fs::write(repo.path("src/a.py"), b"print('hello')\n").unwrap();
    repo.commit("hand edit");

    repo.sanctum()
        .args(["attest", "verify", "--git", &format!("{base}..HEAD")])
        .assert()
        .success()
        .stdout(contains("PASS  .attestations/src/a.py.sigstore.json"))
        .stdout(contains(format!(
            "note: src/a.py was edited after generation (the attested version is in commit {}",
            &generated[..12]
        )))
        .stdout(contains("PASS  .attestations/src/b.py.sigstore.json"))
        .stdout(contains("subject src/b.py").and(contains("(matches src/b.py)")))
        .stdout(contains("2 attestation(s): 2 passed, 0 failed"));

    let out = repo
        .sanctum()
        .args([
            "attest",
            "verify",
            "--format",
            "json",
            "--git",
            &format!("{base}..HEAD"),
        ])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let a = &report["attestations"][0];
    assert_eq!(a["steps"][4]["result"], "edited");
    assert!(
        a["notes"][0]
            .as_str()
            .unwrap()
            .contains("edited after generation")
    );

    // A forged attestation in a later commit fails the range.
    let before = repo.git(&["rev-parse", "HEAD"]);
    repo.emit("stranger", &repo.lock.models[0], "src/c.py", b"c = 3\n");
    repo.commit("untrusted");
    repo.sanctum()
        .args(["attest", "verify", "--git", &format!("{before}..HEAD")])
        .assert()
        .code(1)
        .stdout(contains("FAIL  .attestations/src/c.py.sigstore.json"))
        .stdout(contains("step 2 (trusted signer)"));

    // A range adding no attestation passes with a message.
    fs::write(repo.path("README"), "x").unwrap();
    let head = repo.commit("docs");
    repo.sanctum()
        .args(["attest", "verify", "--git", &format!("{head}~1..{head}")])
        .assert()
        .success()
        .stdout(contains("no attestations to verify"));
}

#[test]
fn an_artifact_alone_finds_its_bundle_in_the_repo_or_the_local_store() {
    let repo = Repo::new();
    repo.emit("ci", &repo.lock.models[0], "gen/x.txt", OUTPUT);
    repo.sanctum()
        .args(["attest", "verify", "--artifact", "gen/x.txt"])
        .assert()
        .success()
        .stdout(contains("PASS  .attestations/gen/x.txt.sigstore.json"));

    // Printed output: the bundle lives in the local store, keyed by the output's sha256.
    let stamp = repo
        .stamper("ci")
        .stamp(&record("stdout", &repo.lock.models[0], b"printed\n"))
        .unwrap();
    let stored = attest::attestation::layout::store_path(
        repo.home.path(),
        &stamp.subject.digest.sha256,
        &stamp.json,
    );
    attest::attestation::layout::write_atomic(&stored, &stamp.json).unwrap();
    fs::write(repo.path("captured.txt"), b"printed\n").unwrap();
    repo.sanctum()
        .args(["attest", "verify", "--artifact", "captured.txt"])
        .assert()
        .success()
        .stdout(contains("subject stdout"));

    fs::write(repo.path("unknown.txt"), b"never stamped\n").unwrap();
    repo.sanctum()
        .args(["attest", "verify", "--artifact", "unknown.txt"])
        .assert()
        .code(1)
        .stderr(contains("no attestation found for unknown.txt"));
}

#[test]
fn folders_are_searched_and_usage_errors_exit_2() {
    let repo = Repo::new();
    repo.emit("ci", &repo.lock.models[0], "a/one.txt", b"1\n");
    repo.emit("ci", &repo.lock.models[0], "a/b/two.txt", b"2\n");
    repo.sanctum()
        .args(["attest", "verify", ".attestations"])
        .assert()
        .success()
        .stdout(contains("2 attestation(s): 2 passed"));
    repo.sanctum()
        .args(["attest", "verify"])
        .assert()
        .code(2)
        .stderr(contains("nothing to verify"));
    repo.sanctum()
        .args(["attest", "verify", "missing.sigstore.json"])
        .assert()
        .code(2)
        .stderr(contains("cannot read bundle"));
    fs::write(repo.path("sanctum-policy.toml"), "version = 7\n").unwrap();
    repo.sanctum()
        .args(["attest", "verify", ".attestations"])
        .assert()
        .code(2)
        .stderr(contains("unsupported policy version 7"));
}

#[test]
fn keys_generate_refuses_to_overwrite_and_show_prints_the_hint() {
    let repo = Repo::new();
    repo.sanctum()
        .args(["keys", "generate", "--out", "keys/ci"])
        .assert()
        .code(2)
        .stderr(contains("exists: pass --force"));
    let hint = repo.key("ci").hint().as_str().to_owned();
    for file in ["keys/ci.pub", "keys/ci.key"] {
        repo.sanctum()
            .args(["keys", "show", file])
            .assert()
            .success()
            .stdout(contains(format!("hint: {hint}")))
            .stdout(contains("-----BEGIN PUBLIC KEY-----"));
    }
    let key = fs::read_to_string(repo.path("keys/ci.key")).unwrap();
    assert!(
        key.starts_with("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----"),
        "{key}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(repo.path("keys/ci.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // A wrong passphrase is an error, never a prompt when stdin is not a terminal.
    repo.sanctum()
        .env("SANCTUM_KEY_PASSWORD", "wrong")
        .args(["lock", "sign", "--key", "keys/approver.key"])
        .assert()
        .code(2)
        .stderr(contains("wrong passphrase"));
    repo.sanctum()
        .env_remove("SANCTUM_KEY_PASSWORD")
        .args(["lock", "sign", "--key", "keys/approver.key"])
        .assert()
        .code(2)
        .stderr(contains(
            "protected by a passphrase: set $SANCTUM_KEY_PASSWORD",
        ));
    repo.sanctum()
        .args(["keys", "show"])
        .assert()
        .code(2)
        .stderr(contains("no signer key yet"));
}

/// A model directory for the model-signing tests.
fn model_dir(repo: &Repo) -> std::path::PathBuf {
    let dir = repo.path("mymodel");
    fs::create_dir_all(dir.join("tokenizer")).unwrap();
    fs::write(
        dir.join("model.safetensors"),
        crate::support::tiny_safetensors(),
    )
    .unwrap();
    fs::write(dir.join("config.json"), b"{\"model_type\": \"llama\"}").unwrap();
    fs::write(dir.join("tokenizer/tokenizer.json"), b"{}").unwrap();
    dir
}

#[test]
fn sanctum_model_signatures_verify_and_refuse_tampering() {
    let repo = Repo::new();
    let dir = model_dir(&repo);
    repo.sanctum()
        .args(["models", "sign", "mymodel", "--key", "keys/approver.key"])
        .assert()
        .success()
        .stdout(contains("signed mymodel (3 files"));
    assert!(dir.join("model.sig").is_file());
    repo.sanctum()
        .args([
            "models",
            "verify-signature",
            "mymodel",
            "--key",
            "keys/approver.pub",
        ])
        .assert()
        .success()
        .stdout(contains("ok: mymodel matches mymodel/model.sig (3 files"));
    repo.sanctum()
        .args([
            "models",
            "verify-signature",
            "mymodel",
            "--key",
            "keys/ci.pub",
        ])
        .assert()
        .code(1)
        .stdout(contains("step 2 (trusted signer): the signature names key"));
    fs::write(dir.join("extra.bin"), b"smuggled").unwrap();
    repo.sanctum()
        .args(["models", "verify-signature", "mymodel", "--key", "keys/approver.pub"])
        .assert()
        .code(1)
        .stdout(contains("step 9 (model files): the model directory differs from the signed files: not signed: extra.bin"));
}

#[test]
fn model_signing_tool_accepts_sanctum_signatures_and_sanctum_accepts_its() {
    let Some(argv) = model_signing() else { return };
    let repo = Repo::new();
    let dir = model_dir(&repo);

    // sanctum signs (with its encrypted key) → `model_signing verify key` accepts.
    repo.sanctum()
        .args(["models", "sign", "mymodel", "--key", "keys/approver.key"])
        .assert()
        .success();
    let out = tool(argv)
        .current_dir(repo.dir.path())
        .args([
            "verify",
            "key",
            "mymodel",
            "--signature",
            "mymodel/model.sig",
            "--public_key",
            "keys/approver.pub",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "model_signing verify key refused sanctum's model.sig:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // `model_signing sign key` signs (with a PKCS#8 key it reads) → sanctum verifies.
    let key = repo.key("ci");
    fs::write(repo.path("oms.pem"), key.to_plain_pem().unwrap().as_bytes()).unwrap();
    fs::remove_file(dir.join("model.sig")).unwrap();
    let out = tool(argv)
        .current_dir(repo.dir.path())
        .args([
            "sign",
            "key",
            "mymodel",
            "--private_key",
            "oms.pem",
            "--signature",
            "mymodel/model.sig",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "model_signing sign key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    repo.sanctum()
        .args([
            "models",
            "verify-signature",
            "mymodel",
            "--key",
            "keys/ci.pub",
        ])
        .assert()
        .success()
        .stdout(contains("ok: mymodel matches mymodel/model.sig (3 files"));
    // ...and refuses it once a file changed, naming the file.
    fs::write(dir.join("config.json"), b"{\"model_type\": \"bert\"}").unwrap();
    repo.sanctum()
        .args([
            "models",
            "verify-signature",
            "mymodel",
            "--key",
            "keys/ci.pub",
        ])
        .assert()
        .code(1)
        .stdout(contains("changed: config.json"));
    // The tool agrees.
    let out = tool(argv)
        .current_dir(repo.dir.path())
        .args([
            "verify",
            "key",
            "mymodel",
            "--signature",
            "mymodel/model.sig",
            "--public_key",
            "keys/ci.pub",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
