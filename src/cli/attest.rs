//! `sanctum attest verify`: checks output attestations in named steps, for CI. Where bundles are looked
//! for follows `attest::attestation::layout` (see `stamp.rs` for where they are written).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context as _, bail};
use attest::Sha256Digest;
use attest::attestation::layout::{self, BUNDLE_SUFFIX, REPO_DIR};
use attest::attestation::{Step, VerificationError, VerifiedAttestation, Verifier};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

use super::Context;
use super::context::display_path;
use super::keys::read_public;
use super::trust::{LockFile, Refused};
use attest::lock_signature::{LockStatus, LockTrustError};
use attest::policy::Policy;

#[derive(Debug, Subcommand)]
pub enum AttestCommand {
    /// Verify output attestations (for CI): bundle files or folders, an artifact, or a git range.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Bundle files, or folders searched for *.sigstore.json.
    bundles: Vec<PathBuf>,
    /// The output the bundles attest: its sha256 must be their subject's. Alone, its bundle is found by
    /// the repository convention or in the local store.
    #[arg(long, value_name = "FILE")]
    artifact: Option<PathBuf>,
    /// Verify every attestation added or changed under .attestations/ in these commits (e.g.
    /// origin/main..HEAD), against the outputs as of the range's end; outputs edited after
    /// generation are allowed and reported.
    #[arg(long, value_name = "REV_RANGE")]
    git: Option<String>,
    /// Trust this signer public key as well as the policy's [[signer]] keys (repeatable).
    #[arg(long, value_name = "PUB")]
    key: Vec<PathBuf>,
    /// Report format.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Human,
    Json,
}

pub fn run(cmd: AttestCommand, ctx: &Context) -> anyhow::Result<ExitCode> {
    match cmd {
        AttestCommand::Verify(args) => verify(args, ctx),
    }
}

/// What the output a bundle attests is compared with.
enum Artifact {
    /// Not available: step 5 is skipped.
    None,
    /// Given with --artifact: must match.
    Strict { label: String, digest: Sha256Digest },
    /// Found by convention (the file beside, or in the repository): a difference means the output was
    /// edited after generation, which is allowed and reported.
    Found {
        label: String,
        digest: Option<Sha256Digest>,
        /// For --git: the repository-relative path, to look for the attested version in history.
        git_path: Option<String>,
    },
}

struct Target {
    label: String,
    bytes: Vec<u8>,
    artifact: Artifact,
}

/// The result for one bundle.
struct Checked {
    label: String,
    outcome: Result<VerifiedAttestation, VerificationError>,
    /// Step 5 outcome when it was not decided by the verifier: checked by convention, or edited.
    subject: SubjectResult,
    artifact: Option<String>,
    notes: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SubjectResult {
    Checked,
    Skipped,
    Edited,
}

/// What checking attestations needs: the policy (plus keys trusted on the command line), the lock
/// and the lock's standing under the policy. Build once, then take a [`Verifier`] from it.
pub struct Trust {
    policy: Policy,
    lock: LockFile,
    lock_status: Result<LockStatus, LockTrustError>,
}

impl Trust {
    /// Reads the policy and the lock; `keys` are public keys to trust as signers as well.
    pub fn open(ctx: &Context, keys: &[PathBuf]) -> anyhow::Result<Self> {
        let mut policy = ctx.policy()?;
        for path in keys {
            policy.signers.add(display_path(path), read_public(path)?);
        }
        let lock = ctx.lock_file()?;
        let lock_status = lock.status(&policy)?;
        Ok(Self {
            policy,
            lock,
            lock_status,
        })
    }

    /// A verifier under this trust.
    pub fn verifier(&self) -> Verifier<'_> {
        Verifier::new(
            &self.policy.signers,
            &self.lock.lock,
            &self.policy.licenses,
            self.lock_status.as_ref().cloned(),
        )
    }
}

fn verify(args: VerifyArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let trust = Trust::open(ctx, &args.key)?;
    let verifier = trust.verifier();

    let mut targets = Vec::new();
    let mut git = None;
    if let Some(range) = &args.git {
        let repo = GitRange::open(range)?;
        targets.extend(repo.targets()?);
        git = Some(repo);
    }
    let strict = match &args.artifact {
        Some(path) => {
            let bytes = std::fs::read(path)
                .with_context(|| format!("cannot read artifact {}", path.display()))?;
            Some((display_path(path), Sha256Digest::of(&bytes)))
        }
        None => None,
    };
    let mut bundle_files = Vec::new();
    for path in &args.bundles {
        if path.is_dir() {
            find_bundles(path, &mut bundle_files)
                .with_context(|| format!("cannot search {}", path.display()))?;
        } else {
            bundle_files.push(path.clone());
        }
    }
    if args.bundles.is_empty()
        && args.git.is_none()
        && let (Some(path), Some((_, digest))) = (&args.artifact, &strict)
    {
        bundle_files.extend(bundles_for_artifact(ctx, path, digest)?);
        if bundle_files.is_empty() {
            eprintln!(
                "sanctum: no attestation found for {} (looked for its bundle by the repository convention and in the local store)",
                display_path(path)
            );
            return Err(Refused(format!("{} has no attestation", display_path(path))).into());
        }
    }
    if args.bundles.is_empty() && args.git.is_none() && args.artifact.is_none() {
        bail!(
            "nothing to verify: give bundle files or folders, --artifact FILE, or --git REV_RANGE"
        );
    }
    for path in bundle_files {
        let bytes = ::attest::files::read_bounded(&path, ::attest::files::MAX_DOCUMENT_BYTES)
            .with_context(|| format!("cannot read bundle {}", path.display()))?;
        let artifact = match &strict {
            Some((label, digest)) => Artifact::Strict {
                label: label.clone(),
                digest: *digest,
            },
            None => match layout::output_for_bundle(&path).filter(|p| p.is_file()) {
                Some(output) => {
                    let digest = std::fs::read(&output).ok().map(|b| Sha256Digest::of(&b));
                    Artifact::Found {
                        label: display_path(&output),
                        digest,
                        git_path: None,
                    }
                }
                None => Artifact::None,
            },
        };
        targets.push(Target {
            label: display_path(&path),
            bytes,
            artifact,
        });
    }

    let checked: Vec<Checked> = targets
        .into_iter()
        .map(|t| check(&verifier, t, git.as_ref()))
        .collect();
    let failed = checked.iter().filter(|c| c.outcome.is_err()).count();
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Json => {
            let doc = json!({
                "ok": failed == 0,
                "policy": trust.policy.source.as_deref().map(display_path),
                "lockfile": {
                    "path": display_path(&trust.lock.path),
                    "sha256": Sha256Digest::of(&trust.lock.bytes).to_hex(),
                    "status": match &trust.lock_status {
                        Ok(s) => s.describe(),
                        Err(e) => format!("refused: {e}"),
                    },
                },
                "git": args.git,
                "attestations": checked.iter().map(report_json).collect::<Vec<_>>(),
                "summary": {"total": checked.len(), "passed": checked.len() - failed, "failed": failed},
            });
            serde_json::to_writer_pretty(&mut out, &doc)?;
            writeln!(out)?;
        }
        Format::Human => {
            writeln!(
                out,
                "lockfile {}: {}",
                display_path(&trust.lock.path),
                match &trust.lock_status {
                    Ok(s) => s.describe(),
                    Err(e) => format!("REFUSED: {e}"),
                }
            )?;
            if checked.is_empty() {
                writeln!(
                    out,
                    "no attestations to verify{}",
                    args.git
                        .as_deref()
                        .map(|r| format!(" in {r}"))
                        .unwrap_or_default()
                )?;
            }
            for c in &checked {
                report_human(&mut out, c)?;
            }
            writeln!(
                out,
                "{} attestation(s): {} passed, {failed} failed",
                checked.len(),
                checked.len() - failed
            )?;
        }
    }
    if failed > 0 {
        return Err(Refused(format!("{failed} attestation(s) failed verification")).into());
    }
    Ok(ExitCode::SUCCESS)
}

fn check(verifier: &Verifier<'_>, target: Target, git: Option<&GitRange>) -> Checked {
    let mut notes = Vec::new();
    let (strict, label) = match &target.artifact {
        Artifact::Strict { digest, label } => (Some(*digest), Some(label.clone())),
        Artifact::Found { label, .. } => (None, Some(label.clone())),
        Artifact::None => (None, None),
    };
    let outcome = verifier.verify(&target.bytes, strict.as_ref());
    let mut subject = if strict.is_some() {
        SubjectResult::Checked
    } else {
        SubjectResult::Skipped
    };
    if let (
        Ok(v),
        Artifact::Found {
            label,
            digest,
            git_path,
        },
    ) = (&outcome, &target.artifact)
    {
        let attested = v.subject().digest.sha256;
        match digest {
            Some(d) if *d == attested => subject = SubjectResult::Checked,
            Some(_) => {
                subject = SubjectResult::Edited;
                let history = match (git, git_path) {
                    (Some(g), Some(p)) => match g.commit_with(p, &attested) {
                        Some(commit) => format!(
                            " (the attested version is in commit {}; it changed since)",
                            &commit[..12.min(commit.len())]
                        ),
                        None => " (no commit in the range holds the attested version)".into(),
                    },
                    _ => String::new(),
                };
                notes.push(format!("{label} was edited after generation{history}"));
            }
            None => notes.push(format!(
                "{label} is gone: the attested output is not there any more"
            )),
        }
        if let Some(p) = git_path
            && v.subject().name != *p
        {
            notes.push(format!(
                "the subject is named {:?} but the attestation sits at the path of {p}",
                v.subject().name
            ));
        }
    }
    Checked {
        label: target.label,
        outcome,
        subject,
        artifact: label,
        notes,
    }
}

fn report_human(out: &mut impl Write, c: &Checked) -> std::io::Result<()> {
    match &c.outcome {
        Ok(v) => {
            writeln!(out, "PASS  {}", c.label)?;
            let subject = v.subject();
            let checked = match c.subject {
                SubjectResult::Checked => format!(
                    "matches {}",
                    c.artifact.as_deref().unwrap_or("the artifact")
                ),
                SubjectResult::Edited => "edited since, see below".into(),
                SubjectResult::Skipped => "output not checked".into(),
            };
            writeln!(
                out,
                "      subject {} sha256:{} ({checked})",
                subject.name,
                &subject.digest.sha256.to_hex()[..16]
            )?;
            let p = v.predicate();
            writeln!(
                out,
                "      {} by model {} sha256:{} ({}), sanctum {}, signed by {} (key {})",
                serde_json::to_value(p.task)
                    .ok()
                    .and_then(|t| t.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                p.model.name,
                &p.model.digest.sha256.to_hex()[..16],
                p.model.license,
                p.runner.version,
                v.signer,
                v.hint.short()
            )?;
        }
        Err(e) => {
            writeln!(out, "FAIL  {}", c.label)?;
            writeln!(out, "      {e}")?;
        }
    }
    for note in &c.notes {
        writeln!(out, "      note: {note}")?;
    }
    Ok(())
}

fn report_json(c: &Checked) -> serde_json::Value {
    let failed_step = c.outcome.as_ref().err().map(VerificationError::step);
    let steps: Vec<_> = Step::OUTPUT
        .iter()
        .map(|&step| {
            let result = match failed_step {
                Some(f) if step == f => "fail",
                Some(f) if step > f => "not-run",
                _ if step == Step::SubjectDigest => match c.subject {
                    SubjectResult::Checked => "pass",
                    SubjectResult::Skipped => "skipped",
                    SubjectResult::Edited => "edited",
                },
                _ => "pass",
            };
            json!({"step": step.number(), "id": step.id(), "name": step.name(), "result": result})
        })
        .collect();
    let mut doc = json!({
        "bundle": c.label,
        "ok": c.outcome.is_ok(),
        "artifact": c.artifact,
        "steps": steps,
        "notes": c.notes,
    });
    match &c.outcome {
        Ok(v) => {
            let p = v.predicate();
            doc["subject"] =
                json!({"name": v.subject().name, "sha256": v.subject().digest.sha256.to_hex()});
            doc["signer"] = json!({"name": v.signer, "hint": v.hint.as_str()});
            doc["model"] = json!({"name": p.model.name, "sha256": p.model.digest.sha256.to_hex(), "license": p.model.license});
            doc["predicate"] = serde_json::to_value(p).unwrap_or_default();
        }
        Err(e) => {
            doc["error"] =
                json!({"step": e.step().number(), "id": e.step().id(), "message": e.to_string()});
        }
    }
    doc
}

/// Every `*.sigstore.json` below `dir` (not inside `.git`), sorted.
fn find_bundles(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries = std::fs::read_dir(dir)?.collect::<Result<Vec<_>, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() && entry.file_name() != ".git" {
            find_bundles(&path, out)?;
        } else if kind.is_file() && path.to_str().is_some_and(|p| p.ends_with(BUNDLE_SUFFIX)) {
            out.push(path);
        }
    }
    Ok(())
}

/// The bundles of an artifact: by the repository convention (or beside it), else in the local store.
fn bundles_for_artifact(
    ctx: &Context,
    artifact: &Path,
    digest: &Sha256Digest,
) -> anyhow::Result<Vec<PathBuf>> {
    if let Ok(placement) = layout::placement_for_output(artifact)
        && placement.bundle.is_file()
    {
        return Ok(vec![placement.bundle]);
    }
    Ok(layout::store_bundles(&ctx.home()?, digest)?)
}

/// A git repository and a revision range in it.
struct GitRange {
    top: PathBuf,
    range: String,
    end: String,
}

impl GitRange {
    fn open(range: &str) -> anyhow::Result<Self> {
        let top = git(None, &["rev-parse", "--show-toplevel"])?;
        let top = PathBuf::from(String::from_utf8_lossy(&top).trim());
        let revs = git(Some(&top), &["rev-parse", range])?;
        let end = String::from_utf8_lossy(&revs)
            .lines()
            .find(|l| !l.starts_with('^'))
            .map(str::to_owned)
            .with_context(|| format!("{range}: no end revision"))?;
        Ok(Self {
            top,
            range: range.to_owned(),
            end,
        })
    }

    /// Bundles added or changed under .attestations/ in the range, read as of its end.
    fn targets(&self) -> anyhow::Result<Vec<Target>> {
        let names = git(
            Some(&self.top),
            &[
                "log",
                "--format=",
                "--name-only",
                "-z",
                "--diff-filter=AM",
                &self.range,
                "--",
                REPO_DIR,
            ],
        )?;
        let paths: BTreeSet<String> = names
            .split(|b| *b == 0)
            .map(|p| String::from_utf8_lossy(p).trim().to_owned())
            .filter(|p| p.ends_with(BUNDLE_SUFFIX))
            .collect();
        let mut targets = Vec::new();
        for path in paths {
            let Some(bytes) = self.blob(&self.end, &path) else {
                continue; // added, then removed within the range
            };
            let artifact = match layout::output_for_repo_bundle(&path) {
                Some(output) => Artifact::Found {
                    label: output.clone(),
                    digest: self.blob(&self.end, &output).map(|b| Sha256Digest::of(&b)),
                    git_path: Some(output),
                },
                None => Artifact::None,
            };
            targets.push(Target {
                label: path,
                bytes,
                artifact,
            });
        }
        Ok(targets)
    }

    fn blob(&self, rev: &str, path: &str) -> Option<Vec<u8>> {
        git(
            Some(&self.top),
            &["cat-file", "blob", &format!("{rev}:{path}")],
        )
        .ok()
    }

    /// The newest commit in the range whose version of `path` has sha256 `digest`.
    fn commit_with(&self, path: &str, digest: &Sha256Digest) -> Option<String> {
        let log = git(
            Some(&self.top),
            &["log", "--format=%H", &self.range, "--", path],
        )
        .ok()?;
        String::from_utf8_lossy(&log)
            .lines()
            .find(|commit| {
                self.blob(commit, path)
                    .is_some_and(|b| Sha256Digest::of(&b) == *digest)
            })
            .map(str::to_owned)
    }
}

fn git(dir: Option<&Path>, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let mut cmd = Command::new("git");
    if let Some(dir) = dir {
        cmd.arg("-C").arg(dir);
    }
    let output = cmd.args(args).output().context("cannot run git")?;
    if !output.status.success() {
        bail!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output.stdout)
}
