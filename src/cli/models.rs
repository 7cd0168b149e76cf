//! `sanctum models pull | list | verify` (and `sign | verify-signature`, in `model_signing.rs`).

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use attest::audit::Event;
use attest::lockfile::{Lockfile, ModelEntry};
use attest::verify::{VerifyError, VerifyReport};
use clap::{Args, Subcommand};
use runner::store::{ModelState, PullOutcome};
use serde_json::json;

use super::Context;
use super::TableOrJson as Format;
use super::context::display_path;
use super::trust::Refused;

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Fetch approved models into the store, verifying every file against the lock.
    Pull(PullArgs),
    /// List approved models and whether they are in the store.
    List(ListArgs),
    /// Re-hash models in the store against the lock (all pulled models when none are named).
    Verify(VerifyArgs),
    /// Sign a model directory (or a stored model) in the OpenSSF Model Signing format (model.sig).
    Sign(super::model_signing::SignArgs),
    /// Check a model directory against an OpenSSF model signature (model.sig) and a public key.
    VerifySignature(super::model_signing::VerifySignatureArgs),
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Model names from the lockfile.
    #[arg(required = true)]
    names: Vec<String>,
    /// Hub endpoint for `hf` sources [default: $HF_ENDPOINT, the config file, else the public hub].
    #[arg(long, value_name = "URL")]
    hf_endpoint: Option<String>,
    /// Pull from this sanctum hub (`sanctum hub serve`), whatever the lock's sources say
    /// [default: $SANCTUM_HUB, else `hub` in the config file].
    #[arg(long, value_name = "URL")]
    hub: Option<String>,
    /// Reach `oci` sources on a loopback registry over plain HTTP.
    #[arg(long)]
    insecure: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Re-hash pulled models instead of checking presence and sizes only.
    #[arg(long)]
    verify: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Model names; all pulled models when omitted.
    names: Vec<String>,
}

pub fn run(cmd: ModelsCommand, ctx: &Context) -> anyhow::Result<ExitCode> {
    match cmd {
        ModelsCommand::Pull(args) => pull(args, ctx),
        ModelsCommand::List(args) => list(args, ctx),
        ModelsCommand::Verify(args) => verify(args, ctx),
        ModelsCommand::Sign(args) => super::model_signing::sign(args, ctx),
        ModelsCommand::VerifySignature(args) => super::model_signing::verify_signature(args, ctx),
    }
}

fn pull(args: PullArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let (_, lock) = ctx.lockfile()?;
    let store = ctx.store()?;
    let mut options = ctx.pull_options(args.hf_endpoint, args.hub)?;
    options.registry.insecure = args.insecure;
    let progress = ctx.progress();
    let entries = args
        .names
        .iter()
        .map(|name| lock.model(name))
        .collect::<Result<Vec<_>, _>>()?;
    for entry in entries {
        let started = Instant::now();
        progress.note(&format!(
            "pulling {} ({})",
            entry.name,
            human_size(entry.total_size())
        ));
        let outcome = store.pull(entry, &options, &progress)?;
        super::audit::record(
            ctx,
            &Event {
                event: "pull".into(),
                command: "sanctum models pull".into(),
                model: Some(entry.name.clone()),
                model_digest: Some(format!("sha256:{}", entry.digest)),
                detail: match &outcome {
                    PullOutcome::AlreadyPresent => Some("already in the store".into()),
                    PullOutcome::Pulled => None,
                    PullOutcome::Repaired { problem } => Some(format!("repaired: {problem}")),
                },
                ..Event::default()
            },
        )?;
        let dir = display_path(&store.model_dir(entry));
        let took = started.elapsed().as_secs_f64();
        match outcome {
            PullOutcome::AlreadyPresent => {
                eprintln!("{}: already in the store and verified ({dir})", entry.name)
            }
            PullOutcome::Pulled => {
                eprintln!("{}: pulled and verified in {took:.1}s ({dir})", entry.name)
            }
            PullOutcome::Repaired { problem } => eprintln!(
                "{}: the stored copy was damaged ({problem}); replaced with a verified one in {took:.1}s",
                entry.name
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn list(args: ListArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let (lock_path, lock) = ctx.lockfile()?;
    let store = ctx.store()?;
    let progress = ctx.progress();
    // Each model's state, and whether it counts as a failure (with --verify, a damaged or
    // failing model makes the listing exit 1, as `models verify` does).
    let states: Vec<(&ModelEntry, String, bool)> = lock
        .models
        .iter()
        .map(|entry| {
            let (state, failed) = match (store.state(entry), args.verify) {
                (ModelState::Missing, _) => ("not pulled".to_owned(), false),
                (ModelState::Damaged(why), verify) => (format!("damaged: {why}"), verify),
                (ModelState::Present, false) => ("pulled".to_owned(), false),
                (ModelState::Present, true) => {
                    match store.verify(entry, &progress).and_then(|r| r.into_result()) {
                        Ok(_) => ("verified".to_owned(), false),
                        Err(e) => (format!("FAILED: {e}"), true),
                    }
                }
            };
            (entry, state, failed)
        })
        .collect();
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Json => {
            let models: Vec<_> = states
                .iter()
                .map(|(entry, state, _)| {
                    let dir = store.model_dir(entry);
                    json!({
                        "name": entry.name,
                        "task": entry.task.to_string(),
                        "architecture": entry.architecture,
                        "license": entry.license,
                        "size": entry.total_size(),
                        "digest": format!("sha256:{}", entry.digest),
                        "state": state,
                        "dir": dir,
                        "files": entry.files.iter().map(|f| json!({
                            "path": f.path,
                            "sha256": f.sha256.to_hex(),
                            "size": f.size,
                            "store_path": dir.join(&f.path),
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            let doc = json!({ "lockfile": lock_path, "store": store.root(), "models": models });
            writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
        }
        Format::Table => {
            writeln!(
                out,
                "{:<24} {:<6} {:<12} {:>9}  {:<19} STATE",
                "NAME", "TASK", "LICENSE", "SIZE", "DIGEST"
            )?;
            for (entry, state, _) in &states {
                writeln!(
                    out,
                    "{:<24} {:<6} {:<12} {:>9}  sha256:{:<12} {state}",
                    entry.name,
                    entry.task.to_string(),
                    entry.license,
                    human_size(entry.total_size()),
                    &entry.digest.to_hex()[..12],
                )?;
            }
        }
    }
    let failed = states.iter().filter(|(_, _, failed)| *failed).count();
    if failed > 0 {
        return Err(Refused(format!("{failed} model(s) failed verification")).into());
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(args: VerifyArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let (_, lock) = ctx.lockfile()?;
    let store = ctx.store()?;
    let progress = ctx.progress();
    let entries = selected(&lock, &args.names)?;
    let started = Instant::now();
    let mut out = std::io::stdout().lock();
    let (mut failed, mut bytes, mut checked) = (0usize, 0u64, 0usize);
    for entry in entries {
        let report = match store.verify(entry, &progress) {
            Ok(report) => report,
            Err(VerifyError::NotPulled { .. }) if args.names.is_empty() => {
                writeln!(out, "{}: not pulled, skipped", entry.name)?;
                continue;
            }
            Err(e) => {
                writeln!(out, "FAIL {e}")?;
                failed += 1;
                continue;
            }
        };
        checked += 1;
        bytes += entry.total_size();
        print_report(&mut out, &report)?;
        if !report.ok() {
            failed += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    writeln!(
        out,
        "{checked} model(s) checked, {failed} failed; {} hashed in {secs:.2}s ({:.0} MB/s)",
        human_size(bytes),
        bytes as f64 / 1e6 / secs.max(1e-9)
    )?;
    if failed > 0 {
        return Err(Refused(format!("{failed} model(s) failed verification")).into());
    }
    Ok(ExitCode::SUCCESS)
}

fn print_report(out: &mut impl Write, report: &VerifyReport) -> std::io::Result<()> {
    writeln!(out, "{} (sha256:{})", report.model, report.digest)?;
    for file in &report.files {
        match &file.outcome {
            Ok(digest) => writeln!(out, "  ok    {}  sha256:{digest}", file.path)?,
            Err(problem) => writeln!(out, "  FAIL  {}: {problem}", file.path)?,
        }
    }
    Ok(())
}

/// The named entries, or all of them when no names are given.
fn selected<'a>(lock: &'a Lockfile, names: &[String]) -> anyhow::Result<Vec<&'a ModelEntry>> {
    if names.is_empty() {
        return Ok(lock.models.iter().collect());
    }
    names
        .iter()
        .map(|n| lock.model(n).context("cannot verify"))
        .collect()
}

/// Sizes as people read them: 98.4 MB.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
