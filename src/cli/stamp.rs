//! Stamping outputs of `run`, `chat` and `embed` ([`OutputStamper`]).
//!
//! Where bundles go (`attest::attestation::layout`): `--out FILE` inside a git work tree puts the
//! bundle at `<root>/.attestations/<path of FILE>.sigstore.json`, outside one beside the file as
//! `FILE.sigstore.json`; output printed to stdout gets its bundle in the local store,
//! `$SANCTUM_HOME/attestations/sha256/<output sha256>/<bundle sha256>.sigstore.json`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Context as _;
use attest::Sha256Digest;
use attest::attestation::layout;
use attest::lockfile::ModelEntry;
use attest::stamp::{BenchRecord, LockInfo, OutputRecord, RunnerInfo, Stamp, StampError, Stamper};
use clap::Args;

use super::Context;
use super::context::display_path;
use super::keys::signer_key;
use super::trust::TrustedLock;

/// Flags of the commands whose outputs are stamped; flatten into their arguments.
#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// Write the output to FILE (atomically) instead of stdout; its attestation goes to
    /// <repo>/.attestations/<path>.sigstore.json (or FILE.sigstore.json outside a git work tree).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Put the rendered prompt's text in the attestation (its sha256 is always there).
    #[arg(long)]
    pub attest_prompt: bool,
}

/// Stamps the outputs of one command: open it once, then [`OutputStamper::emit`] each output.
pub struct OutputStamper {
    stamper: Stamper,
    home: PathBuf,
    lock: TrustedLock,
    attest_prompt: bool,
}

impl OutputStamper {
    /// Reads the lock under the policy, opens (or creates, with a notice) the signer key without ever
    /// prompting, and hashes the running binary. Call before generating, so a missing passphrase stops
    /// the command before any work.
    pub fn open(ctx: &Context, args: &OutputArgs) -> anyhow::Result<Self> {
        Self::check_output(ctx, args)?;
        let lock = ctx.trusted_lock()?;
        let key = signer_key(ctx)?;
        let stamper = Stamper::new(
            key,
            runner_info()?,
            LockInfo {
                digest: lock.digest,
                signer: lock.status.signer_record(),
            },
        )
        .with_audit(super::audit::log(ctx)?);
        Ok(Self {
            stamper,
            home: ctx.home()?,
            lock,
            attest_prompt: args.attest_prompt,
        })
    }

    /// Refuses, before any model is loaded, an output the policy's `outputs.require_git` does not
    /// allow (printed, or written outside a git work tree) and an `--out` whose attestation cannot
    /// be placed (its directory missing, a symlink on the bundle's path).
    pub fn check_output(ctx: &Context, args: &OutputArgs) -> anyhow::Result<()> {
        ctx.policy()?.rules.check_output(args.out.as_deref())?;
        if let Some(out) = &args.out {
            layout::placement_for_output(out)
                .with_context(|| format!("cannot place the attestation of {}", out.display()))?;
        }
        Ok(())
    }

    /// The signer, for a front end that places its own bundles (the server).
    pub fn into_stamper(self) -> Stamper {
        self.stamper
    }

    /// The lock entry of an approved model, for [`OutputRecord::model`].
    pub fn model(&self, name: &str) -> anyhow::Result<&ModelEntry> {
        Ok(self.lock.lock.model(name)?)
    }

    /// Stamps one output and stores its attestation. With `out`, writes the output there atomically
    /// and the bundle by the repository convention (the subject name becomes the repository-relative
    /// path); without, puts the bundle in the local store. Prints the bundle's path on stderr and
    /// returns it. `record.include_prompt_text` is set from `--attest-prompt`.
    pub fn emit(
        &self,
        out: Option<&Path>,
        mut record: OutputRecord<'_>,
    ) -> anyhow::Result<PathBuf> {
        record.include_prompt_text = self.attest_prompt;
        let bytes = record.bytes;
        self.place(out, bytes, |name| {
            self.stamper.stamp(&OutputRecord {
                name,
                ..record.clone()
            })
        })
    }

    /// Stamps a benchmark result (`bytes`) and stores it and its attestation as [`Self::emit`] does.
    pub fn emit_bench(
        &self,
        out: Option<&Path>,
        bytes: &[u8],
        record: BenchRecord<'_>,
    ) -> anyhow::Result<PathBuf> {
        self.place(out, bytes, |name| {
            self.stamper.stamp_bench(name, bytes, record.clone())
        })
    }

    /// Signs with `stamp` (given the subject name) and places output and bundle: with `out`, the
    /// output written there atomically and the bundle by the repository convention (the subject
    /// name being the repository-relative path); without, the bundle in the local store under the
    /// subject name `stdout`. Prints the bundle's path on stderr and returns it.
    fn place(
        &self,
        out: Option<&Path>,
        bytes: &[u8],
        stamp: impl FnOnce(&str) -> Result<Stamp, StampError>,
    ) -> anyhow::Result<PathBuf> {
        let path = match out {
            Some(out) => {
                let placement = layout::placement_for_output(out).with_context(|| {
                    format!("cannot place the attestation of {}", out.display())
                })?;
                let stamp = stamp(&placement.subject_name)?;
                layout::write_atomic(out, bytes)
                    .with_context(|| format!("cannot write {}", out.display()))?;
                placement
                    .write_bundle(&stamp.json)
                    .with_context(|| format!("cannot write {}", placement.bundle.display()))?;
                placement.bundle
            }
            None => {
                let stamp = stamp("stdout")?;
                runner::engine::store_stamp(&self.home, &stamp).with_context(|| {
                    format!(
                        "cannot write into the attestation store {}",
                        self.home.join("attestations").display()
                    )
                })?
            }
        };
        eprintln!("sanctum: attestation: {}", display_path(&path));
        Ok(path)
    }
}

/// This build: version, git commit (from build.rs) and the sha256 of the running executable.
pub fn runner_info() -> anyhow::Result<RunnerInfo> {
    static BINARY: OnceLock<Sha256Digest> = OnceLock::new();
    let binary = match BINARY.get() {
        Some(d) => *d,
        None => {
            let exe = std::env::current_exe().context("cannot find the running executable")?;
            let file = std::fs::File::open(&exe)
                .with_context(|| format!("cannot read {}", exe.display()))?;
            let (digest, _) = Sha256Digest::of_reader(file)
                .with_context(|| format!("cannot hash {}", exe.display()))?;
            *BINARY.get_or_init(|| digest)
        }
    };
    Ok(RunnerInfo {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        git_commit: option_env!("SANCTUM_GIT_COMMIT")
            .filter(|c| !c.is_empty())
            .map(str::to_owned),
        binary_sha256: binary,
    })
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use attest::attestation::Verifier;
    use attest::lockfile::{HfSource, LockedFile, Lockfile, ModelEntry, Source, Task};
    use attest::policy::KeyRing;
    use attest::statement::{OutputTask, RuntimeRecord, UsageRecord};

    use super::*;
    use crate::cli::keys::read_public;

    fn context() -> (tempfile::TempDir, Context) {
        let dir = tempfile::tempdir().unwrap();
        let files = vec![LockedFile {
            path: "model.safetensors".into(),
            sha256: Sha256Digest::of(b"w"),
            size: 1,
        }];
        let mut lock = Lockfile::new();
        let source = Source::Hf(HfSource {
            repo: "o/m".into(),
            revision: "r".into(),
            files: None,
        });
        lock.models.push(ModelEntry::new(
            "m",
            Task::Embed,
            "bert",
            "MIT",
            source,
            files,
        ));
        let lock_path = dir.path().join("models.lock");
        std::fs::write(&lock_path, lock.to_toml()).unwrap();
        std::fs::write(dir.path().join("policy.toml"), "version = 1\n").unwrap();
        let ctx = Context::new(Some(lock_path), Some(dir.path().join("home")), true)
            .with_policy(Some(dir.path().join("policy.toml")));
        (dir, ctx)
    }

    fn record<'a>(model: &'a ModelEntry, bytes: &'a [u8]) -> OutputRecord<'a> {
        let now = SystemTime::now();
        OutputRecord {
            name: "stdout",
            bytes,
            task: OutputTask::Embed,
            model,
            runtime: RuntimeRecord {
                device: "cpu".into(),
                threads: 1,
                quantization: None,
            },
            sampling: None,
            prompt: "[\"a text\"]",
            include_prompt_text: false,
            usage: UsageRecord {
                prompt_tokens: 3,
                completion_tokens: 0,
            },
            request: None,
            started: now,
            finished: now,
        }
    }

    /// The signer key is made on first use (0600) and reused; printed outputs go to the store, `--out`
    /// outputs beside their file (outside a repository) or under `.attestations/` (inside one).
    #[test]
    fn output_stamper_creates_the_signer_key_and_places_bundles() {
        if std::env::var_os(super::super::keys::SIGNING_KEY_ENV).is_some() {
            return; // the environment chose another key
        }
        let (dir, ctx) = context();
        let args = OutputArgs {
            out: None,
            attest_prompt: true,
        };
        let stamper = OutputStamper::open(&ctx, &args).unwrap();
        let key_path = dir.path().join("home/keys/signer.key");
        assert!(key_path.is_file() && dir.path().join("home/keys/signer.pub").is_file());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let again = OutputStamper::open(&ctx, &args).unwrap();
        assert_eq!(
            again.stamper.hint(),
            stamper.stamper.hint(),
            "the key is reused"
        );

        let entry = stamper.model("m").unwrap().clone();
        let printed = stamper
            .emit(None, record(&entry, b"[[0.1, 0.2]]\n"))
            .unwrap();
        assert!(printed.starts_with(dir.path().join("home/attestations/sha256")));

        let mut signers = KeyRing::new();
        signers.add(
            "me",
            read_public(&dir.path().join("home/keys/signer.pub")).unwrap(),
        );
        let lock = ctx.lock_file().unwrap();
        let policy = ctx.policy().unwrap();
        let verifier = Verifier::new(
            &signers,
            &lock.lock,
            &policy.licenses,
            Ok(attest::lock_signature::LockStatus::Unsigned),
        );
        let v = verifier
            .verify(
                &std::fs::read(&printed).unwrap(),
                Some(&Sha256Digest::of(b"[[0.1, 0.2]]\n")),
            )
            .unwrap();
        assert_eq!(v.subject().name, "stdout");
        assert_eq!(
            v.predicate().prompt.text.as_deref(),
            Some("[\"a text\"]"),
            "--attest-prompt"
        );

        // Inside a git work tree: the output written atomically, the bundle under .attestations/.
        let repo = dir.path().join("repo");
        std::fs::create_dir_all(repo.join(".git")).unwrap();
        std::fs::create_dir_all(repo.join("gen")).unwrap();
        let out = repo.join("gen/e.json");
        let bundle = stamper.emit(Some(&out), record(&entry, b"[]\n")).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"[]\n");
        assert_eq!(
            bundle,
            repo.canonicalize()
                .unwrap()
                .join(".attestations/gen/e.json.sigstore.json")
        );
        let v = verifier
            .verify(
                &std::fs::read(&bundle).unwrap(),
                Some(&Sha256Digest::of(b"[]\n")),
            )
            .unwrap();
        assert_eq!(v.subject().name, "gen/e.json");
    }
}
