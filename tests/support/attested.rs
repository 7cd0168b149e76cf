//! A repository with keys, a policy, a signed lock and stamped outputs, for the attestation tests.
//!
//! Outputs are stamped with `attest::stamp::Stamper` (what `run`, `chat` and `embed` call) using the
//! key that `sanctum keys generate` made, and placed by `attest::attestation::layout`, so that the tests
//! exercise the CLI's verifier on exactly what the runner writes.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::time::SystemTime;

use assert_cmd::Command;
use attest::Sha256Digest;
use attest::attestation::layout;
use attest::keys::SigningKey;
use attest::lockfile::{HfSource, LockedFile, Lockfile, ModelEntry, Source, Task};
use attest::stamp::{LockInfo, OutputRecord, RunnerInfo, Stamper};
use attest::statement::{OutputTask, RuntimeRecord, SamplingRecord, UsageRecord};
use tempfile::TempDir;

/// Passphrase of every key the fixture makes.
pub const PASSWORD: &str = "correct horse";

/// A git work tree with `models.lock` (an Apache-2.0 chat model `tiny` and a CC-BY-NC-4.0 model
/// `nc`), an approver and a signer key, and `sanctum-policy.toml` trusting them.
pub struct Repo {
    pub dir: TempDir,
    pub home: TempDir,
    pub lock: Lockfile,
}

pub fn model(name: &str, license: &str, weights: &[u8]) -> ModelEntry {
    let files = vec![
        LockedFile {
            path: "config.json".into(),
            sha256: Sha256Digest::of(b"{}"),
            size: 2,
        },
        LockedFile {
            path: "model.safetensors".into(),
            sha256: Sha256Digest::of(weights),
            size: weights.len() as u64,
        },
    ];
    let source = Source::Hf(HfSource {
        repo: format!("org/{name}"),
        revision: "0123456789abcdef0123456789abcdef01234567".into(),
        files: None,
    });
    ModelEntry::new(name, Task::Chat, "llama", license, source, files)
}

impl Repo {
    /// The repository, keys generated through the CLI, the lock signed by the approver.
    pub fn new() -> Self {
        let dir = TempDir::new().unwrap();
        let home = TempDir::new().unwrap();
        let mut lock = Lockfile::new();
        lock.models
            .push(model("tiny", "Apache-2.0", b"tiny weights"));
        lock.models.push(model("nc", "CC-BY-NC-4.0", b"nc weights"));
        fs::write(dir.path().join("models.lock"), lock.to_toml()).unwrap();
        let repo = Self { dir, home, lock };
        repo.git(&["init", "-q", "-b", "main"]);
        for who in ["approver", "ci", "stranger"] {
            repo.sanctum()
                .args(["keys", "generate", "--out"])
                .arg(repo.path(&format!("keys/{who}")))
                .assert()
                .success();
        }
        fs::write(
            repo.path("sanctum-policy.toml"),
            "version = 1\n\n[[approver]]\nname = \"security\"\nkey = \"keys/approver.pub\"\n\n\
             [[signer]]\nname = \"ci\"\nkey = \"keys/ci.pub\"\n",
        )
        .unwrap();
        repo.sanctum()
            .args(["lock", "sign", "--key", "keys/approver.key"])
            .assert()
            .success();
        repo
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `sanctum` run in the repository, with its home and the fixture's passphrase.
    pub fn sanctum(&self) -> Command {
        Command::from(self.process())
    }

    /// [`Self::sanctum`] as a plain process.
    pub fn process(&self) -> std::process::Command {
        let mut cmd = super::process();
        for var in ["SANCTUM_POLICY", "SANCTUM_SIGNING_KEY"] {
            cmd.env_remove(var);
        }
        cmd.current_dir(self.dir.path())
            .env("SANCTUM_HOME", self.home.path())
            .env("SANCTUM_KEY_PASSWORD", PASSWORD);
        cmd
    }

    /// Runs git in the repository; panics on failure; returns stdout.
    pub fn git(&self, args: &[&str]) -> String {
        let out = Process::new("git")
            .current_dir(self.dir.path())
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@example.invalid",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", self.dir.path())
            .output()
            .expect("git runs");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Commits everything; returns the commit.
    pub fn commit(&self, message: &str) -> String {
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "-m", message]);
        self.git(&["rev-parse", "HEAD"])
    }

    /// A key the fixture generated (`approver`, `ci`, `stranger`).
    pub fn key(&self, who: &str) -> SigningKey {
        let pem = fs::read(self.path(&format!("keys/{who}.key"))).unwrap();
        SigningKey::from_pem(&pem, PASSWORD.as_bytes()).unwrap()
    }

    /// A stamper as the runner builds it: the lock's digest and approver, this build's version.
    pub fn stamper(&self, who: &str) -> Stamper {
        let lock_bytes = fs::read(self.path("models.lock")).unwrap();
        let approver = self.key("approver");
        Stamper::new(
            self.key(who),
            RunnerInfo {
                version: env!("CARGO_PKG_VERSION").into(),
                git_commit: None,
                binary_sha256: Sha256Digest::of(b"sanctum"),
            },
            LockInfo {
                digest: Sha256Digest::of(&lock_bytes),
                signer: Some(attest::statement::SignerRecord {
                    hint: approver.hint().as_str().into(),
                    name: Some("security".into()),
                }),
            },
        )
    }

    /// Writes `bytes` to `rel` in the repository and its bundle by the convention, stamped by `who`
    /// as an output of `model`; returns the bundle's path.
    pub fn emit(&self, who: &str, model: &ModelEntry, rel: &str, bytes: &[u8]) -> PathBuf {
        let out = self.path(rel);
        fs::create_dir_all(out.parent().unwrap()).unwrap();
        let placement = layout::placement_for_output(&out).unwrap();
        let stamp = self
            .stamper(who)
            .stamp(&record(&placement.subject_name, model, bytes))
            .unwrap();
        layout::write_atomic(&out, bytes).unwrap();
        layout::write_atomic(&placement.bundle, &stamp.json).unwrap();
        placement.bundle
    }
}

/// An output record with fixed settings.
pub fn record<'a>(name: &'a str, model: &'a ModelEntry, bytes: &'a [u8]) -> OutputRecord<'a> {
    let now = SystemTime::now();
    OutputRecord {
        name,
        bytes,
        task: OutputTask::Run,
        model,
        runtime: RuntimeRecord {
            device: "cpu".into(),
            threads: 1,
            quantization: Some("f16".into()),
        },
        sampling: Some(SamplingRecord {
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 7,
            max_tokens: Some(32),
            stop: vec![],
        }),
        prompt: "<|im_start|>user\nWrite hello world<|im_end|>\n<|im_start|>assistant\n",
        include_prompt_text: false,
        usage: UsageRecord {
            prompt_tokens: 12,
            completion_tokens: 8,
        },
        request: None,
        started: now,
        finished: now,
    }
}

/// A `model_signing` command line, `argv` from [`model_signing`].
pub fn tool(argv: &[&str]) -> Process {
    let mut cmd = Process::new(argv[0]);
    cmd.args(&argv[1..]);
    cmd
}

/// Rewrites a bundle file's JSON.
pub fn edit_bundle(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
    f(&mut v);
    fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
}

/// How to run the OpenSSF `model_signing` tool: `model_signing` on PATH, else
/// `python3 -m model_signing`. None (with a notice) when neither works; with
/// `SANCTUM_REQUIRE_REAL_MODELS` set (CI, scripts/test) its absence fails the test instead.
pub fn model_signing() -> Option<&'static [&'static str]> {
    let candidates: [&'static [&'static str]; 2] =
        [&["model_signing"], &["python3", "-m", "model_signing"]];
    for argv in candidates {
        let works = Process::new(argv[0])
            .args(&argv[1..])
            .arg("--help")
            .output()
            .is_ok_and(|o| o.status.success());
        if works {
            return Some(argv);
        }
    }
    assert!(
        std::env::var_os("SANCTUM_REQUIRE_REAL_MODELS").is_none(),
        "SANCTUM_REQUIRE_REAL_MODELS is set but `model_signing` is not installed: \
         python3 -m pip install model-signing==1.1.1 pyopenssl (scripts/test does)"
    );
    runner::testing::skip(
        "`model_signing` not installed (python3 -m pip install model-signing==1.1.1 pyopenssl)",
    );
    None
}
