//! `sanctum hub serve`: the approved models of the lock, from this machine's store, over the
//! Hugging Face hub's routes (the `hub` crate); `sanctum hub push`: one of them to an OCI registry
//! (`runner::source::oci`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use std::io::Write as _;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};

use super::Context;
use super::context::display_path;
use super::serve::read_secret;
use super::trust::read_optional;

#[derive(Debug, Subcommand)]
pub enum HubCommand {
    /// Serve every model of the lock that is in the store (verified) to sanctum, hf-hub and
    /// huggingface_hub clients, with the lock and its signature.
    Serve(ServeArgs),
    /// Push an approved model from the store to an OCI registry as a CNCF ModelPack artifact (one
    /// raw layer per file), with the lock's signature and --model-signature as referrers; prints
    /// the `oci` source to put in its lock entry.
    Push(PushArgs),
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The approved model (its lock name).
    model: String,
    /// Where to: REGISTRY/REPOSITORY:TAG, e.g. registry.example.com/models/smollm2:v1.
    reference: String,
    /// The model's OpenSSF Model Signing signature (`sanctum models sign`), pushed as a referrer.
    #[arg(long, value_name = "FILE")]
    model_signature: Option<PathBuf>,
    /// Plain HTTP, for a registry on this machine only.
    #[arg(long)]
    insecure: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on; another than loopback requires --token-file.
    #[arg(long, default_value = "127.0.0.1:11436", value_name = "HOST:PORT")]
    addr: SocketAddr,
    /// File holding the bearer token every request must send (`Authorization: Bearer …`).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Directory of NAME.model.sig files (as `sanctum models sign NAME` writes them) to serve at
    /// /sanctum/models/NAME/model.sig.
    #[arg(long, value_name = "DIR")]
    model_signatures: Option<PathBuf>,
}

pub fn run(cmd: HubCommand, ctx: &Context) -> anyhow::Result<ExitCode> {
    match cmd {
        HubCommand::Serve(args) => serve(args, ctx),
        HubCommand::Push(args) => push(args, ctx),
    }
}

fn push(args: PushArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let trusted = ctx.trusted_lock()?;
    let entry = trusted.lock.model(&args.model)?;
    let store = ctx.store()?;
    let progress = ctx.progress();
    // Only a copy that verifies leaves this machine.
    store.verify(entry, &progress)?.into_result()?;
    let mut signatures = Vec::new();
    if let Some(lock_signature) =
        read_optional(&attest::lock_signature::signature_path(&trusted.path))?
    {
        signatures.push(lock_signature);
    }
    if let Some(path) = &args.model_signature {
        signatures.push(
            ::attest::files::read_bounded(path, ::attest::files::MAX_DOCUMENT_BYTES)
                .with_context(|| format!("cannot read the model signature {}", path.display()))?,
        );
    }
    let pushed = runner::source::oci::push(
        entry,
        &store.model_dir(entry),
        &args.reference,
        &ctx.registry_access(args.insecure),
        &signatures,
        &progress,
    )?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "pushed {} to {}:{} (manifest sha256:{}, {} signature referrers)",
        entry.name,
        pushed.repository,
        pushed.tag,
        pushed.manifest,
        pushed.referrers.len()
    )?;
    writeln!(
        out,
        "\n# the lock entry's source, to pull it from there:\n[model.source]\nkind = \"oci\"\nrepository = \"{}\"\nmanifest = \"{}\"\ntag = \"{}\"",
        pushed.repository, pushed.manifest, pushed.tag
    )?;
    Ok(ExitCode::SUCCESS)
}

fn serve(args: ServeArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let token = match &args.token_file {
        Some(path) => Some(read_secret(path, "token file")?),
        None => None,
    };
    // The lock as the policy judges it (a policy that requires a signed lock refuses to serve an
    // unsigned one), then its exact bytes and signature for the trust routes.
    let trusted = ctx.trusted_lock()?;
    if trusted.bytes.len() as u64 > hub::client::MAX_TRUST_BYTES {
        bail!(
            "lockfile {} is larger than the {} bytes clients accept",
            trusted.path.display(),
            hub::client::MAX_TRUST_BYTES
        );
    }
    let store = ctx.store()?;
    let lock_path = trusted.path.clone();
    let config = hub::HubConfig {
        lock_signature: read_optional(&attest::lock_signature::signature_path(&trusted.path))?,
        lock_bytes: trusted.bytes,
        lock: trusted.lock,
        store: store.clone(),
        model_signatures: args.model_signatures,
        token,
    };
    hub::run(config, args.addr, |started| {
        for unserved in started.unserved {
            eprintln!(
                "sanctum hub: not serving {}: {}",
                unserved.name, unserved.reason
            );
        }
        eprintln!(
            "sanctum hub: serving {} from {} (lock {})",
            if started.served.is_empty() {
                "no models".to_owned()
            } else {
                started.served.join(", ")
            },
            display_path(store.root()),
            display_path(&lock_path),
        );
        eprintln!(
            "sanctum hub: listening on http://{} (HF_ENDPOINT=http://{})",
            started.addr, started.addr
        );
    })?;
    Ok(ExitCode::SUCCESS)
}
