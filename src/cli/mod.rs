//! Argument definitions and dispatch. Exit codes: 0 ok, 1 a verification or policy said no, 2 an error.

mod chat;
mod context;
mod embed;
mod import;
mod models;
mod progress;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use context::Context;

/// Run only sanctioned, verified AI models locally, and prove what ran.
#[derive(Debug, Parser)]
#[command(name = "sanctum", version, about, propagate_version = true)]
pub struct Cli {
    /// The approved-models lockfile [default: ./models.lock or the nearest one above, else
    /// $SANCTUM_HOME/models.lock].
    #[arg(long, global = true, env = "SANCTUM_LOCK", value_name = "FILE")]
    lock: Option<PathBuf>,
    /// The model store and sanctum's home [default: $SANCTUM_HOME, else the platform data dir].
    #[arg(long, global = true, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Never draw progress bars.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Approved models: pull, list, verify.
    #[command(subcommand)]
    Models(models::ModelsCommand),
    /// Convert another format into a Safetensors model directory.
    #[command(subcommand)]
    Import(import::ImportCommand),
    /// Generate a reply from an approved chat model, streamed to stdout.
    Run(run::RunArgs),
    /// Chat with an approved model interactively.
    Chat(chat::ChatArgs),
    /// Sentence embeddings from an approved embedding model, as JSON.
    Embed(embed::EmbedArgs),
}

/// Parses the command line and runs it.
pub fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let ctx = Context::new(cli.lock, cli.store, cli.quiet);
    match cli.command {
        Command::Models(cmd) => models::run(cmd, &ctx),
        Command::Import(cmd) => import::run(cmd, &ctx),
        Command::Run(args) => run::run(args, &ctx),
        Command::Chat(args) => chat::run(args, &ctx),
        Command::Embed(args) => embed::run(args, &ctx),
    }
}

/// 1 when the error is a refusal (verification, lock membership), 2 for anything else.
pub fn exit_code_for(err: &anyhow::Error) -> u8 {
    use attest::verify::VerifyError;
    use runner::store::PullError;
    let refused = err.chain().any(|cause| {
        cause.is::<VerifyError>()
            || cause.is::<attest::lockfile::UnknownModel>()
            || cause.is::<models::Refused>()
            || cause.downcast_ref::<PullError>().is_some_and(PullError::is_refusal)
    });
    if refused { 1 } else { 2 }
}

/// True when the error is stdout closing under us (`sanctum models list | head`): not a failure.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
