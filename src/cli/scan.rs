//! `sanctum scan [PATH...]`: the endpoint inventory (`scan` crate) of model files under the given
//! paths, the well-known caches and sanctum's store, judged against the lock, and the listening
//! inference servers; printed as a table, JSON, CycloneDX 1.6 or SARIF 2.1.0.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use scan::report::{cyclonedx, sarif};
use scan::{CacheKind, FailOn, Report, Root, ScanOptions, Standing};

use super::Context;
use super::context::{display_path, hostname};

#[derive(Debug, Args)]
pub struct ScanArgs {
    /// Directories or files to scan, beside the well-known caches.
    #[arg(value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    format: OutputFormat,
    /// Exit 1 when a model is at least this bad: `unapproved` (also tampered and dangerous),
    /// `dangerous`, or `never`.
    #[arg(long, value_enum, default_value_t = FailOnArg::Dangerous)]
    fail_on: FailOnArg,
    /// Scan only the given paths: not the Hugging Face, Ollama, LM Studio and llama.cpp caches nor
    /// sanctum's store.
    #[arg(long)]
    no_caches: bool,
    /// Do not list listening sockets and GPU processes.
    #[arg(long)]
    no_listeners: bool,
    /// Threads that inspect and hash files [default: one per core].
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OutputFormat {
    Table,
    Json,
    Cyclonedx,
    Sarif,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FailOnArg {
    Unapproved,
    Dangerous,
    Never,
}

pub fn scan(ctx: &Context, args: ScanArgs) -> anyhow::Result<ExitCode> {
    let lock = match ctx.lock_path() {
        Ok(_) => Some(ctx.trusted_lock()?.lock),
        Err(e) => {
            eprintln!(
                "sanctum: warning: {}; every model found is unapproved",
                super::describe(&e)
            );
            None
        }
    };
    let mut roots: Vec<Root> = Vec::new();
    for path in &args.paths {
        let path = std::path::absolute(path)
            .with_context(|| format!("cannot resolve {}", path.display()))?;
        if !path.exists() {
            anyhow::bail!("{}: no such file or directory", path.display());
        }
        roots.push(Root { path, cache: None });
    }
    if !args.no_caches {
        let home = dirs::home_dir().unwrap_or_default();
        roots.extend(scan::caches::well_known(&home, |name| {
            std::env::var_os(name)
        }));
        let store = ctx.home()?.join("models");
        if store.is_dir() {
            roots.push(Root {
                path: store,
                cache: Some(CacheKind::Sanctum),
            });
        }
    }
    let policy = ctx.policy()?;
    let mut options = ScanOptions::new(roots, lock.as_ref());
    options.rules = Some(&policy.rules);
    options.listeners = !args.no_listeners;
    if let Some(threads) = args.threads {
        options.threads = threads;
    }
    let report = scan::scan(&options, &ctx.progress());

    let version = env!("CARGO_PKG_VERSION");
    let mut out = std::io::stdout().lock();
    match args.format {
        OutputFormat::Table => print_table(&mut out, &report)?,
        OutputFormat::Json => writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?,
        OutputFormat::Cyclonedx => {
            let meta = cyclonedx::BomMeta {
                serial_number: cyclonedx::serial_number(random_bytes()),
                timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                tool_version: version.to_string(),
                hostname: hostname(),
            };
            let bom = cyclonedx::bom(&report, &meta);
            writeln!(out, "{}", serde_json::to_string_pretty(&bom)?)?;
        }
        OutputFormat::Sarif => {
            let log = sarif::log(&report, version, env!("CARGO_PKG_REPOSITORY"));
            writeln!(out, "{}", serde_json::to_string_pretty(&log)?)?;
        }
    }
    out.flush()?;
    let fail_on = match args.fail_on {
        FailOnArg::Unapproved => FailOn::Unapproved,
        FailOnArg::Dangerous => FailOn::Dangerous,
        FailOnArg::Never => FailOn::Never,
    };
    Ok(if report.fails(fail_on) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_table(out: &mut impl Write, report: &Report) -> anyhow::Result<()> {
    if report.models.is_empty() {
        writeln!(out, "no model files found")?;
    } else {
        writeln!(
            out,
            "{:<11} {:<13} {:>8} {:>10}  MODEL",
            "STANDING", "FORMAT", "PARAMS", "SIZE"
        )?;
    }
    for model in &report.models {
        let size: u64 = report.files_of(model).map(|f| f.size).sum();
        let format = serde_json::to_value(model.format)?;
        writeln!(
            out,
            "{:<11} {:<13} {:>8} {:>10}  {}",
            model.standing.as_str(),
            format.as_str().unwrap_or_default(),
            model.parameters.map(count).unwrap_or_else(|| "-".into()),
            bytes(size),
            model.name
        )?;
        if let Some(root) = &model.root {
            writeln!(out, "{:46}in {}", "", display_path(root))?;
        }
        for problem in &model.problems {
            writeln!(out, "{:46}{}: {}", "", problem.file, problem.problem)?;
        }
        for file in report.files_of(model) {
            if file.standing == Standing::Approved && model.root.is_some() {
                continue;
            }
            if model.root.is_some() || report.files_of(model).count() > 1 {
                writeln!(out, "{:46}{}", "", display_path(&file.path))?;
            }
            for reason in &file.reasons {
                writeln!(out, "{:48}{reason}", "")?;
            }
        }
    }
    let servers: Vec<_> = report.listeners.iter().filter(|l| l.inference).collect();
    if !servers.is_empty() {
        writeln!(out, "\n{:<24} {:<24} WHY", "LISTENING", "PROCESS")?;
    }
    for listener in &servers {
        let process = listener
            .process
            .as_ref()
            .map(|p| format!("{} (pid {})", p.name, p.pid))
            .unwrap_or_else(|| "(another user's)".into());
        let why: Vec<String> = listener
            .runner
            .iter()
            .cloned()
            .chain(
                listener
                    .known_port
                    .iter()
                    .map(|p| format!("{p}'s default port")),
            )
            .collect();
        let address = std::net::SocketAddr::new(listener.address, listener.port);
        writeln!(out, "{address:<24} {process:<24} {}", why.join(", "))?;
    }
    for note in &report.notes {
        writeln!(out, "note: {note}")?;
    }
    for unreadable in &report.unreadable {
        writeln!(
            out,
            "unreadable: {}: {}",
            display_path(&unreadable.path),
            unreadable.error
        )?;
    }
    let tally = |standing: Standing| {
        report
            .models
            .iter()
            .filter(|m| m.standing == standing)
            .count()
    };
    writeln!(
        out,
        "\n{} approved, {} tampered, {} unapproved, {} dangerous; {} inference server(s) listening; {} unreadable",
        tally(Standing::Approved),
        tally(Standing::Tampered),
        tally(Standing::Unapproved),
        tally(Standing::Dangerous),
        servers.len(),
        report.unreadable.len()
    )?;
    Ok(())
}

fn count(n: u64) -> String {
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.1}K", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1}M", n as f64 / 1e6),
        _ => format!("{:.2}B", n as f64 / 1e9),
    }
}

fn bytes(n: u64) -> String {
    match n {
        0..1_000_000 => format!("{:.1} KB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.2} GB", n as f64 / 1e9),
    }
}

/// 16 bytes from the kernel's generator, for the BOM's serial number; a digest of the time and
/// process id where there is none (a serial number must be unique, not secret).
fn random_bytes() -> [u8; 16] {
    let mut bytes = [0u8; 16];
    let read = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
    if read.is_err() {
        let seed = format!("{:?} {}", std::time::SystemTime::now(), std::process::id());
        let digest = attest::Sha256Digest::of(seed.as_bytes());
        bytes.copy_from_slice(&digest.as_bytes()[..16]);
    }
    bytes
}
