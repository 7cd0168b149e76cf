//! `sanctum lock sign | verify`: an approver's signature over the exact bytes of `models.lock`, kept
//! beside it as `models.lock.sigstore.json` (a Sigstore bundle v0.3); `sanctum lock fetch`: both from
//! a hub, checked before they replace the local ones.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use attest::Sha256Digest;
use attest::attestation::layout::write_atomic;
use attest::lock_signature::{self, LockStatus};
use clap::{Args, Subcommand};

use super::Context;
use super::context::display_path;
use super::keys::{load_signing_key, read_public};
use super::trust::{Refused, read_optional};

#[derive(Debug, Subcommand)]
pub enum LockCommand {
    /// Sign the lockfile with an approver key: writes models.lock.sigstore.json beside it.
    Sign(SignArgs),
    /// Check the lockfile's signature against the policy's approvers (and --key).
    Verify(VerifyArgs),
    /// Fetch the lock and its signature from a sanctum hub; the local lock is replaced only once
    /// the signature verifies against the policy's approvers (and --key).
    #[cfg(feature = "inference")]
    Fetch(FetchArgs),
}

#[cfg(feature = "inference")]
#[derive(Debug, Args)]
pub struct FetchArgs {
    /// The hub [default: $SANCTUM_HUB, else `hub` in the config file]; the token, if it needs
    /// one, from $SANCTUM_HUB_TOKEN.
    #[arg(long, value_name = "URL")]
    hub: Option<String>,
    /// Trust this approver public key as well as the policy's (repeatable).
    #[arg(long, value_name = "PUB")]
    key: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SignArgs {
    /// The approver's private key (encrypted Sigstore PEM or PKCS#8).
    #[arg(long, value_name = "KEY")]
    key: PathBuf,
    /// Where to write the signature [default: <lockfile>.sigstore.json].
    #[arg(long, value_name = "FILE")]
    signature: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Trust this approver public key as well as the policy's (repeatable).
    #[arg(long, value_name = "PUB")]
    key: Vec<PathBuf>,
    /// The signature [default: <lockfile>.sigstore.json].
    #[arg(long, value_name = "FILE")]
    signature: Option<PathBuf>,
}

pub fn run(cmd: LockCommand, ctx: &Context) -> anyhow::Result<ExitCode> {
    match cmd {
        LockCommand::Sign(args) => sign(args, ctx),
        LockCommand::Verify(args) => verify(args, ctx),
        #[cfg(feature = "inference")]
        LockCommand::Fetch(args) => fetch(args, ctx),
    }
}

fn sign(args: SignArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let file = ctx.lock_file()?;
    let key = load_signing_key(&args.key, true)?;
    let name = file.path.file_name().map_or_else(
        || "models.lock".to_owned(),
        |n| n.to_string_lossy().into_owned(),
    );
    let bundle = lock_signature::sign_lock(&name, &file.bytes, &file.lock, &key)?;
    let out = args.signature.unwrap_or_else(|| file.signature_path());
    write_atomic(&out, &bundle.to_json())
        .with_context(|| format!("cannot write {}", out.display()))?;
    let policy = ctx.policy()?;
    if policy.approvers.get(key.hint()).is_none() {
        eprintln!(
            "sanctum: note: key {} is not an [[approver]] in {}; runners check this signature only against the policy's approvers",
            key.hint().short(),
            policy
                .source
                .as_deref()
                .map_or("any policy (none found)".into(), display_path)
        );
    }
    writeln!(
        std::io::stdout().lock(),
        "signed {} (sha256 {}, {} models) with key {}: {}",
        display_path(&file.path),
        Sha256Digest::of(&file.bytes),
        file.lock.models.len(),
        key.hint(),
        display_path(&out)
    )?;
    Ok(ExitCode::SUCCESS)
}

/// The policy with `keys` added as approvers, requiring a signature; refused without approvers.
fn approver_policy(ctx: &Context, keys: &[PathBuf]) -> anyhow::Result<attest::policy::Policy> {
    let mut policy = ctx.policy()?;
    for path in keys {
        let key = read_public(path)?;
        policy.approvers.add(display_path(path), key);
    }
    if policy.approvers.is_empty() {
        bail!(
            "no approver keys to check against: name them under [[approver]] in the policy, or pass --key PUB"
        );
    }
    policy.require_lock_signature = true;
    Ok(policy)
}

#[cfg(feature = "inference")]
fn fetch(args: FetchArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let hub = ctx.hub(args.hub)?.context(
        "no hub to fetch from: pass --hub URL, set SANCTUM_HUB, or set hub = \"…\" in the config file",
    )?;
    let policy = approver_policy(ctx, &args.key)?;
    let material = hub::client::fetch_trust(&hub, ctx.hub_token().as_deref())?;
    let served = format!("{hub}{}", hub::paths::LOCK);
    let text = std::str::from_utf8(&material.lock)
        .with_context(|| format!("the lock served at {served} is not UTF-8"))?;
    let lock = attest::lockfile::Lockfile::parse(text)
        .with_context(|| format!("the lock served at {served}"))?;
    let signature_url = PathBuf::from(format!("{hub}{}", hub::paths::LOCK_SIGNATURE));
    let signed = match lock_signature::check_lock(
        &policy,
        &material.lock,
        material.signature.as_deref(),
        &signature_url,
    ) {
        Ok(LockStatus::Signed(sig)) => sig,
        Ok(other) => bail!("unexpected lock status: {}", other.describe()),
        Err(e) => {
            return Err(Refused(format!(
                "the lock served at {served} failed verification, the local lock is unchanged: {e}"
            ))
            .into());
        }
    };
    let dest = ctx.lock_destination()?;
    if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    // The signature first: a crash between the two writes leaves the old lock beside a signature
    // that does not match it, which the policy refuses, never a new lock taken as signed.
    let signature_path = lock_signature::signature_path(&dest);
    write_atomic(
        &signature_path,
        material.signature.as_deref().unwrap_or_default(),
    )
    .with_context(|| format!("cannot write {}", signature_path.display()))?;
    write_atomic(&dest, &material.lock)
        .with_context(|| format!("cannot write {}", dest.display()))?;
    writeln!(
        std::io::stdout().lock(),
        "fetched {} (sha256 {}, {} models) from {hub}: signed by approver {} (key {})",
        display_path(&dest),
        Sha256Digest::of(&material.lock),
        lock.models.len(),
        signed.approver,
        signed.hint
    )?;
    Ok(ExitCode::SUCCESS)
}

fn verify(args: VerifyArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let file = ctx.lock_file()?;
    let policy = approver_policy(ctx, &args.key)?;
    let sig_path = args.signature.unwrap_or_else(|| file.signature_path());
    let signature = read_optional(&sig_path)?;
    let status = lock_signature::check_lock(&policy, &file.bytes, signature.as_deref(), &sig_path);
    let mut out = std::io::stdout().lock();
    match status {
        Ok(LockStatus::Signed(sig)) => {
            writeln!(
                out,
                "ok: {} (sha256 {}) is signed by approver {} (key {})",
                display_path(&file.path),
                Sha256Digest::of(&file.bytes),
                sig.approver,
                sig.hint
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Ok(other) => bail!("unexpected lock status: {}", other.describe()),
        Err(e) => {
            writeln!(out, "FAIL {}: {e}", display_path(&file.path))?;
            Err(Refused(format!(
                "lockfile {} failed verification",
                display_path(&file.path)
            ))
            .into())
        }
    }
}
