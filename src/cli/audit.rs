//! `sanctum audit show | verify | prove | checkpoint | export | prune`: the tamper-evident log of what ran
//! (`attest::audit`), kept in `$SANCTUM_HOME/audit/` and signed with the signer key; and
//! [`record`], which the commands that act on models call to log a pull or a refusal.

use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use attest::audit::{AuditLog, Entry, Event, syslog};
use attest::keys::PublicKey;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};

use super::Context;
use super::TableOrJson as Format;
use super::context::{display_path, hostname};
use super::keys::{public_path, read_public_or_private, signer_key, signer_key_path};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print the entries: what ran, on which model, with the output's and bundle's digests.
    Show(ShowArgs),
    /// Recompute the tree and check every entry and the signed checkpoint; with --checkpoint, that
    /// the log is consistent with one exported earlier. Names the first bad entry.
    Verify(VerifyArgs),
    /// Print a C2SP tlog-proof that entry INDEX is in the log's signed checkpoint.
    Prove(ProveArgs),
    /// Print the latest signed checkpoint (C2SP tlog-checkpoint), to keep elsewhere.
    Checkpoint(KeyArgs),
    /// Send entries as RFC 5424 syslog messages over TCP (octet-counted) to a collector.
    Export(ExportArgs),
    /// Remove entries older than the policy's audit.retention_days (or --older-than), keeping
    /// their leaf hashes: the log still verifies and old checkpoints stay consistent.
    Prune(PruneArgs),
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Prune entries older than DAYS days [default: the policy's audit.retention_days].
    #[arg(long, value_name = "DAYS")]
    older_than: Option<u32>,
}

#[derive(Debug, Args)]
pub struct KeyArgs {
    /// The public key the log's checkpoints are signed with [default: the signer key's].
    #[arg(long, value_name = "PUB")]
    key: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Only entries at or after this time (RFC 3339, e.g. 2026-12-01T00:00:00Z).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Only entries about this model.
    #[arg(long, value_name = "NAME")]
    model: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    key: KeyArgs,
    /// A checkpoint exported earlier (`sanctum audit checkpoint`): the log must extend it.
    #[arg(long, value_name = "FILE")]
    checkpoint: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ProveArgs {
    /// The entry's index.
    index: u64,
    #[command(flatten)]
    key: KeyArgs,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The collector (rsyslog's imtcp, a SIEM's syslog input).
    #[arg(long, value_name = "HOST:PORT")]
    syslog: String,
    /// Send entries from this index on.
    #[arg(long, value_name = "INDEX", default_value_t = 0)]
    since: u64,
}

pub fn run(cmd: AuditCommand, ctx: &Context) -> anyhow::Result<ExitCode> {
    let log = log(ctx)?;
    match cmd {
        AuditCommand::Show(args) => show(&log, args),
        AuditCommand::Verify(args) => verify(&log, args, ctx),
        AuditCommand::Prove(args) => {
            let proof = log.prove(args.index, &public_key(&args.key, ctx)?)?;
            print(&proof)
        }
        AuditCommand::Checkpoint(args) => match log.checkpoint(&public_key(&args, ctx)?)? {
            Some((_, note)) => print(&note),
            None => bail!("the audit log is empty: nothing to checkpoint"),
        },
        AuditCommand::Export(args) => export(&log, args),
        AuditCommand::Prune(args) => prune(&log, args, ctx),
    }
}

/// The audit log of this home, keeping entries as long as the policy's `audit.retention_days`.
pub fn log(ctx: &Context) -> anyhow::Result<AuditLog> {
    // A policy that cannot be read is reported by the command that reads it; the log still takes
    // that command's refusal, and `audit show`/`verify` still read the log.
    let retention = ctx
        .policy()
        .ok()
        .and_then(|p| p.rules.audit.retention_days)
        .map(days);
    Ok(AuditLog::new(ctx.home()?.join("audit")).with_retention(retention))
}

fn days(n: u32) -> Duration {
    Duration::from_secs(u64::from(n) * 24 * 3600)
}

fn prune(log: &AuditLog, args: PruneArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let Some(older_than) = args.older_than.or(ctx.policy()?.rules.audit.retention_days) else {
        bail!(
            "the policy sets no audit.retention_days: pass --older-than DAYS to say what to prune"
        );
    };
    let cutoff = std::time::SystemTime::now()
        .checked_sub(days(older_than))
        .context("--older-than reaches before the epoch")?;
    let pruned = log.prune(cutoff)?;
    print(&format!(
        "pruned {pruned} entries older than {older_than} days (their leaf hashes are kept)\n"
    ))
}

/// Appends `event` to the log, signed with the signer key.
pub fn record(ctx: &Context, event: &Event) -> anyhow::Result<()> {
    let log = log(ctx)?;
    log.append(event, &signer_key(ctx)?).with_context(|| {
        format!(
            "cannot append to the audit log {}",
            display_path(&log.path())
        )
    })?;
    Ok(())
}

fn public_key(args: &KeyArgs, ctx: &Context) -> anyhow::Result<PublicKey> {
    match &args.key {
        Some(path) => read_public_or_private(path),
        None => {
            let private = signer_key_path(ctx)?;
            let public = public_path(&private);
            read_public_or_private(if public.exists() { &public } else { &private })
        }
    }
}

fn print(text: &str) -> anyhow::Result<ExitCode> {
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

fn show(log: &AuditLog, args: ShowArgs) -> anyhow::Result<ExitCode> {
    let since = args
        .since
        .as_deref()
        .map(|s| {
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .with_context(|| format!("--since {s:?} is not an RFC 3339 time"))
        })
        .transpose()?;
    let selected = log.entries()?.into_iter().filter(|(entry, _)| {
        args.model
            .as_ref()
            .is_none_or(|m| entry.model.as_ref() == Some(m))
            && since.is_none_or(|since| {
                DateTime::parse_from_rfc3339(&entry.time).is_ok_and(|t| t >= since)
            })
    });
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Json => {
            let entries: Vec<Entry> = selected.map(|(entry, _)| entry).collect();
            // Serialized first, so a closed stdout is an io::Error (quiet), not a JSON one.
            let json = serde_json::to_string_pretty(&entries)?;
            writeln!(out, "{json}")?;
        }
        Format::Table => {
            let pruned = log.pruned()?;
            if pruned > 0 {
                writeln!(
                    out,
                    "(entries 0..{} were pruned by retention; only their hashes are kept)",
                    pruned - 1
                )?;
            }
            writeln!(
                out,
                "{:>5}  {:<24}  {:<10}  {:<8}  {:<20}  {:<8}  OUTPUT",
                "INDEX", "TIME", "USER", "EVENT", "MODEL", "OUTCOME"
            )?;
            for (entry, _) in selected {
                let outcome = serde_json::to_value(entry.outcome)?;
                writeln!(
                    out,
                    "{:>5}  {:<24}  {:<10}  {:<8}  {:<20}  {:<8}  {}",
                    entry.index,
                    entry.time,
                    entry.user,
                    entry.event,
                    entry.model.as_deref().unwrap_or("-"),
                    outcome.as_str().unwrap_or("?"),
                    entry
                        .output_digest
                        .as_deref()
                        .or(entry.detail.as_deref())
                        .unwrap_or("-"),
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(log: &AuditLog, args: VerifyArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let key = public_key(&args.key, ctx)?;
    let earlier = args
        .checkpoint
        .as_ref()
        .map(|path| {
            ::attest::files::read_bounded(path, ::attest::files::MAX_DOCUMENT_BYTES)
                .with_context(|| format!("cannot read the checkpoint {}", path.display()))
                .map(|bytes| (path.as_path(), bytes))
        })
        .transpose()?;
    let verified = log.verify(&key, earlier.as_ref().map(|(p, b)| (*p, b.as_slice())))?;
    let mut out = std::io::stdout().lock();
    match &verified.checkpoint {
        Some(checkpoint) => writeln!(
            out,
            "audit log verified: {} entries, the signed checkpoint covers {} ({})",
            verified.entries, checkpoint.size, checkpoint.origin
        )?,
        None => writeln!(out, "audit log verified: empty")?,
    }
    if verified.pruned > 0 {
        writeln!(
            out,
            "entries 0..{} were pruned by retention: their hashes are in the tree, their content is gone",
            verified.pruned - 1
        )?;
    }
    if let Some(size) = verified.consistent_with {
        writeln!(
            out,
            "consistent with the earlier checkpoint of {size} entries: nothing before it was rewritten"
        )?;
    }
    if verified.torn_tail {
        writeln!(
            out,
            "note: a torn last line (an append cut short by a crash) was ignored"
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn export(log: &AuditLog, args: ExportArgs) -> anyhow::Result<ExitCode> {
    let entries = log.entries()?;
    let hostname = hostname();
    let connect = || -> std::io::Result<TcpStream> {
        let stream = TcpStream::connect(&args.syslog)?;
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        Ok(stream)
    };
    let mut stream = connect()
        .with_context(|| format!("cannot connect to the syslog collector {}", args.syslog))?;
    let mut sent = 0;
    for (entry, line) in entries.iter().filter(|(e, _)| e.index >= args.since) {
        syslog::send(&mut stream, &syslog::message(entry, line, &hostname))
            .with_context(|| format!("sending entry {} to {}", entry.index, args.syslog))?;
        sent += 1;
    }
    stream.flush()?;
    stream.shutdown(std::net::Shutdown::Write).ok();
    eprintln!(
        "sent {sent} entries to {} (from index {})",
        args.syslog, args.since
    );
    Ok(ExitCode::SUCCESS)
}
