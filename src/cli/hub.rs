//! `sanctum hub serve`: the approved models of the lock, from this machine's store, over the
//! Hugging Face hub's routes (the `hub` crate).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
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
    }
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
