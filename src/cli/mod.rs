//! Argument definitions and dispatch. Exit codes: 0 ok, 1 a verification or policy said no, 2 an error.

mod attest;
mod audit;
#[cfg(feature = "inference")]
mod bench;
#[cfg(feature = "inference")]
mod chat;
mod context;
#[cfg(feature = "inference")]
mod embed;
#[cfg(feature = "inference")]
mod hub;
#[cfg(feature = "inference")]
mod hw;
#[cfg(feature = "inference")]
mod import;
mod keys;
mod lock;
#[cfg(feature = "inference")]
mod model_signing;
#[cfg(feature = "inference")]
mod models;
mod policy;
mod progress;
#[cfg(feature = "inference")]
mod quality;
#[cfg(feature = "inference")]
mod quantize;
#[cfg(feature = "inference")]
mod run;
mod scan;
#[cfg(feature = "inference")]
mod serve;
#[cfg(feature = "inference")]
mod stamp;
mod trust;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

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
    /// The trust policy (keys, licenses, lock signatures) [default: ./sanctum-policy.toml or the
    /// nearest one above, else $SANCTUM_HOME/policy.toml, else built-in defaults].
    #[arg(long, global = true, env = "SANCTUM_POLICY", value_name = "FILE")]
    policy: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Approved models: pull, list, verify.
    #[cfg(feature = "inference")]
    #[command(subcommand)]
    Models(models::ModelsCommand),
    /// Convert another format into a Safetensors model directory.
    #[cfg(feature = "inference")]
    #[command(subcommand)]
    Import(import::ImportCommand),
    /// Rewrite an approved chat model in one format (quantized Safetensors) and print its lock
    /// entry, so the quantized model itself can be approved and loads without quantizing.
    #[cfg(feature = "inference")]
    Quantize(quantize::QuantizeArgs),
    /// Generate a reply from an approved chat model, streamed to stdout.
    #[cfg(feature = "inference")]
    Run(run::RunArgs),
    /// Chat with an approved model interactively.
    #[cfg(feature = "inference")]
    Chat(chat::ChatArgs),
    /// Sentence embeddings from an approved embedding model, as JSON.
    #[cfg(feature = "inference")]
    Embed(embed::EmbedArgs),
    /// Serve approved models over the OpenAI and Ollama APIs, every response stamped.
    #[cfg(feature = "inference")]
    Serve(serve::ServeArgs),
    /// The internal model hub: serve the approved models to other machines.
    #[cfg(feature = "inference")]
    #[command(subcommand)]
    Hub(hub::HubCommand),
    /// Benchmark a model per weight format (llama-bench's tests and more); compare results.
    #[cfg(feature = "inference")]
    Bench(Box<bench::BenchArgs>),
    /// This machine as a hardware profile.
    #[cfg(feature = "inference")]
    #[command(subcommand)]
    Hw(hw::HwCommand),
    /// Signing keys: generate, show.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Output attestations: verify (for CI).
    #[command(subcommand)]
    Attest(attest::AttestCommand),
    /// The lockfile's signature: sign, verify; fetch a signed lock from a hub.
    #[command(subcommand)]
    Lock(lock::LockCommand),
    /// Inventory this machine: model files found by content under PATHs and the well-known caches,
    /// judged against the lock (approved, tampered, unapproved, dangerous), and the inference servers
    /// listening. Never loads or unpickles anything.
    Scan(scan::ScanArgs),
    /// The tamper-evident log of what ran: show, verify, prove, checkpoint, export to syslog.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// The policy in force: check prints each setting, its value and where it came from.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
}

/// `--format` of the commands that print a table for people or JSON for scripts.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum TableOrJson {
    Table,
    Json,
}

/// Parses the command line and runs it.
pub fn run() -> anyhow::Result<ExitCode> {
    let matches = with_negative_numbers(Cli::command()).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
    let ctx = Context::new(cli.lock, cli.store, cli.quiet).with_policy(cli.policy);
    let audited = audited(&cli.command);
    let result = dispatch(cli.command, &ctx);
    if let (Some(event), Err(err)) = (audited, &result)
        && !is_broken_pipe(err)
    {
        record_failure(&ctx, event, err);
    }
    result
}

/// Lets every command take a negative number as a value, so `--temperature -1` reaches the
/// value's own check ("must be 0 or more") instead of being read as an unknown flag.
fn with_negative_numbers(command: clap::Command) -> clap::Command {
    command
        .allow_negative_numbers(true)
        .mut_subcommands(with_negative_numbers)
}

/// The audit log's name for a command that acts on models (its failures are logged; what it
/// does is logged where it happens), None for one that only reads or checks.
fn audited(command: &Command) -> Option<&'static str> {
    match command {
        #[cfg(feature = "inference")]
        Command::Models(models::ModelsCommand::Pull(_)) => Some("pull"),
        #[cfg(feature = "inference")]
        Command::Import(_) => Some("import"),
        #[cfg(feature = "inference")]
        Command::Quantize(_) => Some("quantize"),
        #[cfg(feature = "inference")]
        Command::Run(_) => Some("run"),
        #[cfg(feature = "inference")]
        Command::Chat(_) => Some("chat"),
        #[cfg(feature = "inference")]
        Command::Embed(_) => Some("embed"),
        #[cfg(feature = "inference")]
        Command::Serve(_) => Some("serve"),
        #[cfg(feature = "inference")]
        Command::Hub(_) => Some("hub"),
        #[cfg(feature = "inference")]
        Command::Bench(_) => Some("bench"),
        _ => None,
    }
}

/// The error and its causes on one line, `a: b: c`, leaving out a cause whose text the line
/// already holds: many errors print their source in their own message too, and `{:#}` would
/// repeat it ("cannot read DIR: not a directory: not a directory").
pub fn describe(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Logs a refusal (exit 1) or a failure; a log that cannot take it is a warning, the command's
/// own error staying the one reported.
fn record_failure(ctx: &Context, event: &str, err: &anyhow::Error) {
    let refused = exit_code_for(err) == 1;
    let mut detail = describe(err);
    if detail.len() > 2000 {
        let cut = (0..=2000)
            .rev()
            .find(|&i| detail.is_char_boundary(i))
            .unwrap_or(0);
        detail.truncate(cut);
        detail.push('…');
    }
    let entry = ::attest::audit::Event {
        event: event.to_owned(),
        command: format!("sanctum {event}"),
        outcome: if refused {
            ::attest::audit::Outcome::Refused
        } else {
            ::attest::audit::Outcome::Error
        },
        detail: Some(detail),
        ..Default::default()
    };
    if let Err(e) = audit::record(ctx, &entry) {
        eprintln!(
            "sanctum: warning: this failure is not in the audit log: {}",
            describe(&e)
        );
    }
}

fn dispatch(command: Command, ctx: &Context) -> anyhow::Result<ExitCode> {
    match command {
        #[cfg(feature = "inference")]
        Command::Models(cmd) => models::run(cmd, ctx),
        #[cfg(feature = "inference")]
        Command::Import(cmd) => import::run(cmd, ctx),
        #[cfg(feature = "inference")]
        Command::Quantize(args) => quantize::run(args, ctx),
        #[cfg(feature = "inference")]
        Command::Run(args) => run::run(args, ctx),
        #[cfg(feature = "inference")]
        Command::Chat(args) => chat::run(args, ctx),
        #[cfg(feature = "inference")]
        Command::Embed(args) => embed::run(args, ctx),
        #[cfg(feature = "inference")]
        Command::Serve(args) => serve::run(args, ctx),
        #[cfg(feature = "inference")]
        Command::Hub(cmd) => hub::run(cmd, ctx),
        #[cfg(feature = "inference")]
        Command::Bench(args) => bench::run(*args, ctx),
        #[cfg(feature = "inference")]
        Command::Hw(cmd) => hw::run(cmd),
        Command::Keys(cmd) => keys::run(cmd, ctx),
        Command::Attest(cmd) => attest::run(cmd, ctx),
        Command::Lock(cmd) => lock::run(cmd, ctx),
        Command::Audit(cmd) => audit::run(cmd, ctx),
        Command::Scan(args) => scan::scan(ctx, args),
        Command::Policy(cmd) => policy::run(cmd, ctx),
    }
}

/// 1 when the error is a refusal (verification, lock membership), 2 for anything else.
pub fn exit_code_for(err: &anyhow::Error) -> u8 {
    use ::attest::verify::VerifyError;
    let refused = err.chain().any(|cause| {
        cause
            .downcast_ref::<VerifyError>()
            .is_some_and(VerifyError::is_refusal)
            || cause.is::<::attest::lockfile::UnknownModel>()
            || cause.is::<trust::Refused>()
            || cause.is::<::attest::lock_signature::LockTrustError>()
            || cause.is::<::attest::policy::Violation>()
            || cause
                .downcast_ref::<::attest::audit::AuditError>()
                .is_some_and(::attest::audit::AuditError::is_refusal)
            || inference_refusal(cause)
    });
    if refused { 1 } else { 2 }
}

#[cfg(feature = "inference")]
fn inference_refusal(cause: &(dyn std::error::Error + 'static)) -> bool {
    use runner::device::DeviceError;
    use runner::engine::EngineError;
    use runner::store::PullError;
    cause
        .downcast_ref::<PullError>()
        .is_some_and(PullError::is_refusal)
        || cause
            .downcast_ref::<DeviceError>()
            .is_some_and(DeviceError::is_refusal)
        || cause
            .downcast_ref::<EngineError>()
            .is_some_and(EngineError::is_refusal)
}

#[cfg(not(feature = "inference"))]
fn inference_refusal(_: &(dyn std::error::Error + 'static)) -> bool {
    false
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
