//! `sanctum serve`: the OpenAI- and Ollama-compatible local server (the `serve` crate), with
//! every response stamped by this machine's signer key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use serve::{Limits, ModelSelection, ServeConfig};

use super::Context;
use super::run::{QuantArg, RuntimeArgs};
use super::stamp::{OutputArgs, OutputStamper};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on; another than loopback requires --api-key-file.
    #[arg(long, default_value = "127.0.0.1:11435", value_name = "HOST:PORT")]
    addr: SocketAddr,
    /// Models offered, comma-separated lock names, or `all`.
    #[arg(
        long,
        default_value = "all",
        value_delimiter = ',',
        value_name = "NAMES"
    )]
    models: Vec<String>,
    /// File holding the bearer token every request must send (`Authorization: Bearer …`).
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// Replies generated at once per chat model (continuous batching).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    parallel: u16,
    /// Requests that may wait for a slot per chat model; beyond, 503 with Retry-After.
    #[arg(long, default_value_t = 16)]
    queue: u16,
    /// Load the offered models before accepting requests (else on first use).
    #[arg(long)]
    preload: bool,
    /// Weight format of chat models (as `run --quant`).
    #[arg(long, default_value = "auto", value_name = "FORMAT")]
    quant: QuantArg,
    /// How sanctum's CPU kernels quantize activations (as `run --activations`).
    #[arg(long, default_value = "int16", value_name = "PRECISION")]
    activations: runner::kernels::Activations,
    /// What the key/value cache holds on sanctum's CPU path (as `run --kv-cache`).
    #[arg(long, default_value = "f16", value_name = "PRECISION")]
    kv_cache: runner::models::llama::KvPrecision,
    /// Context of each sequence in tokens [default: the model's, at most 4096].
    #[arg(long, value_name = "TOKENS", value_parser = clap::value_parser!(u32).range(2..))]
    ctx: Option<u32>,
    /// The most tokens one reply may ask for (and what a request without a limit gets).
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..))]
    max_tokens: u32,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 4 << 20, value_name = "BYTES")]
    body_limit: usize,
    /// Seconds in-flight replies may take to finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    shutdown_grace: u64,
    /// Write each request's rendered prompt into the access log (off: prompts stay private).
    #[arg(long)]
    log_prompts: bool,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

pub fn run(args: ServeArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let api_key = match &args.api_key_file {
        Some(path) => Some(read_secret(path, "API key file")?),
        None => None,
    };
    let runtime = args.runtime.start(ctx)?;
    let stamper = OutputStamper::open(
        ctx,
        &OutputArgs {
            out: None,
            attest_prompt: false,
        },
    )?
    .into_stamper();
    let models = if args.models.iter().any(|m| m == "all") {
        ModelSelection::All
    } else {
        ModelSelection::Only(args.models.clone())
    };
    let config = ServeConfig {
        engine: ctx.engine()?,
        runtime,
        models,
        quant: args.quant.format(),
        activations: Some(args.activations),
        kv_cache: args.kv_cache,
        context: args.ctx.map(|c| c as usize),
        limits: Limits {
            parallel: usize::from(args.parallel),
            queue: usize::from(args.queue),
        },
        max_tokens: args.max_tokens as usize,
        body_limit: args.body_limit,
        api_key,
        preload: args.preload,
        log_prompts: args.log_prompts,
        stamper,
        home: ctx.home()?,
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
    };
    serve::run(config, args.addr, |addr| {
        eprintln!(
            "sanctum serve: listening on http://{addr} (OpenAI: http://{addr}/v1, Ollama: http://{addr})"
        );
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The first line of a secret's file (an API key, a token), refused when empty.
pub(super) fn read_secret(path: &std::path::Path, what: &str) -> anyhow::Result<String> {
    let text = ::attest::files::read_bounded_text(path, ::attest::files::MAX_DOCUMENT_BYTES)
        .with_context(|| format!("cannot read the {what} {}", path.display()))?;
    let secret = text.lines().next().unwrap_or_default().trim().to_owned();
    if secret.is_empty() {
        bail!("the {what} {} is empty", path.display());
    }
    Ok(secret)
}
