//! `sanctum quantize`: an approved chat model rewritten in one format, and its lock entry.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use attest::lockfile::{Derived, HfSource, LockedFile, ModelEntry, Source, Task};
use clap::Args;
use runner::quant::Quant;
use runner::quantize::quantize_model;

use super::Context;

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// The approved chat model to quantize (pulled first when missing, verified as it is read).
    model: String,
    /// The format: q8_0, q4_0, q4_1, q5_0, q5_1, q4k, q5k, q6k, f16, bf16 or f32 (the output head
    /// stays at 6 bits or more, and rows that do not fit a format fall back, as at load).
    #[arg(long)]
    quant: Quant,
    /// Directory to create with the quantized model (must not exist or be empty).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Name for the lock entry [default: MODEL-QUANT].
    #[arg(long)]
    name: Option<String>,
}

pub fn run(args: QuantizeArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let engine = ctx.engine()?;
    super::run::note_pull(ctx, &engine, &args.model, Task::Chat)?;
    let entry = engine.entry(&args.model, Task::Chat)?;
    let progress = ctx.progress();
    engine.ensure_pulled(entry, &progress)?;
    let opened = engine.store().open(entry, &progress)?;
    let quantized = quantize_model(opened, args.quant, &args.out)
        .with_context(|| format!("cannot quantize {}", args.model))?;

    let files: Vec<LockedFile> = quantized.files.iter().map(|f| f.locked()).collect();
    let name = args
        .name
        .unwrap_or_else(|| format!("{}-{}", args.model, args.quant.name()));
    let source = Source::Hf(HfSource {
        repo: "OWNER/NAME".into(),
        revision: "REVISION".into(),
        files: None,
    });
    let derived = ModelEntry {
        upstream: entry.upstream.clone(),
        derived: Some(Derived {
            from: entry.name.clone(),
            from_digest: entry.digest,
            quantization: args.quant.name().to_owned(),
            tool: format!("sanctum {}", env!("CARGO_PKG_VERSION")),
        }),
        ..ModelEntry::new(
            name,
            Task::Chat,
            entry.architecture.clone(),
            entry.license.clone(),
            source,
            files,
        )
    };
    derived
        .check()
        .context("the quantized model does not make a valid lock entry")?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "# Review before approving. The source below is a placeholder: publish the directory (a hub\n\
         # repository at a pinned revision) and name it here."
    )?;
    write!(out, "{}", derived.to_toml())?;
    let size: u64 = quantized.files.iter().map(|f| f.size).sum();
    let mix = runner::bench::mix(&quantized.choices);
    eprintln!(
        "quantized {} into {} ({:.1} MB; {mix}) in {:.1}s",
        args.model,
        args.out.display(),
        size as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
