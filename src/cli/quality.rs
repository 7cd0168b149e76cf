//! `sanctum bench MODEL --quality FILE`: perplexity on a text and, against a reference format
//! (f32), KL divergence and top-token agreement per format, as `llama-perplexity --kl-divergence`
//! reports them ([`runner::quality`]).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context as _, bail};
use attest::attestation::layout;
use clap::Args;
use runner::chat::{ChatModel, LoadOptions};
use runner::engine::{Engine, Runtime};
use runner::kernels::Activations;
use runner::models::llama::KvPrecision;
use runner::quality::{self, Quality, Reference};
use serde_json::json;

use super::Context;
use super::run::QuantArg;

/// The quality measurement's flags (with `sanctum bench`'s `--quant`, `--activations`, `-o`,
/// `--out`).
#[derive(Debug, Args)]
pub struct QualityArgs {
    /// Measure output quality on this text instead of speed: perplexity, and KL divergence and
    /// top-1 agreement against --reference, per format.
    #[arg(long, value_name = "FILE")]
    pub quality: Option<PathBuf>,
    /// The format the others are compared with.
    #[arg(
        long,
        default_value = "f32",
        value_name = "FORMAT",
        requires = "quality"
    )]
    pub reference: QuantArg,
    /// Tokens per window; each runs from an empty cache and its second half is scored.
    #[arg(
        long,
        default_value_t = 512,
        value_name = "TOKENS",
        requires = "quality"
    )]
    pub window: usize,
    /// Most windows to score (from the start of the text) [default: 4; 0: all].
    #[arg(long, default_value_t = 4, value_name = "N", requires = "quality")]
    pub windows: usize,
}

/// One format's measurement.
struct Row {
    format: String,
    quality: Quality,
    load_seconds: f64,
    seconds: f64,
}

/// Where the measurement reports.
pub struct Report<'a> {
    /// JSON instead of a Markdown table.
    pub json: bool,
    /// Write here (atomically) instead of stdout.
    pub out: Option<&'a Path>,
}

/// Runs the measurement for each `(format, activations)` on a `kv_cache` cache and prints the
/// table; the reference runs on an f32 cache, so that the figures include the cache's error.
#[allow(
    clippy::too_many_arguments,
    reason = "the bench command's parsed flags, passed on"
)]
pub fn run(
    ctx: &Context,
    engine: &Engine,
    model_name: &str,
    args: &QualityArgs,
    formats: &[(QuantArg, Activations)],
    kv_cache: KvPrecision,
    runtime: &Runtime,
    report: Report<'_>,
) -> anyhow::Result<ExitCode> {
    let Some(text_path) = &args.quality else {
        bail!("no --quality text given");
    };
    let text = std::fs::read_to_string(text_path)
        .with_context(|| format!("cannot read {} as UTF-8 text", text_path.display()))?;
    let say = |line: &str| {
        if !ctx.quiet() {
            eprintln!("bench: {line}");
        }
    };
    let load = |quant: QuantArg,
                activations: Activations,
                kv_cache: KvPrecision|
     -> anyhow::Result<(ChatModel, f64)> {
        let started = Instant::now();
        let options = LoadOptions {
            quant: quant.format(),
            activations: Some(activations),
            device: runtime.device.clone(),
            context: Some(args.window),
            context_cap: None,
            kv_cache,
        };
        let model = engine
            .load_chat(model_name, &options, &ctx.progress())
            .with_context(|| format!("cannot load {model_name} with a context of {}", args.window))?
            .model;
        Ok((model, started.elapsed().as_secs_f64()))
    };

    let (reference_model, load_seconds) =
        load(args.reference, Activations::Int16, KvPrecision::F32)?;
    let tokens = reference_model
        .tokenize_raw(&text)
        .with_context(|| format!("cannot tokenize {}", text_path.display()))?;
    let max = (args.windows > 0).then_some(args.windows);
    let windows = quality::windows(&tokens, args.window, max)
        .with_context(|| format!("{}", text_path.display()))?;
    let count = windows.len();
    say(&format!(
        "{}: {} tokens, {count} windows of {} scored on their second half; reference {} on an \
         f32 cache, the others on an {kv_cache} cache",
        text_path.display(),
        tokens.len(),
        args.window,
        reference_model.arithmetic()
    ));
    let started = Instant::now();
    let reference = Reference::measure(&reference_model, windows)?;
    let mut rows = vec![Row {
        format: reference_model.arithmetic(),
        quality: reference.quality(),
        load_seconds,
        seconds: started.elapsed().as_secs_f64(),
    }];
    drop(reference_model);
    say(&line(&rows[0]));
    for &(quant, activations) in formats {
        let (model, load_seconds) = load(quant, activations, kv_cache)?;
        // `f16` with either precision (nothing on sanctum's kernels) is one measurement.
        if rows.iter().any(|r| r.format == model.arithmetic()) {
            continue;
        }
        let started = Instant::now();
        let quality = reference.compare(&model)?;
        rows.push(Row {
            format: model.arithmetic(),
            quality,
            load_seconds,
            seconds: started.elapsed().as_secs_f64(),
        });
        say(&line(&rows[rows.len() - 1]));
    }
    let rendered = if report.json {
        let rows: Vec<_> = rows.iter().map(|r| row_json(model_name, r)).collect();
        let doc = json!({
            "model": model_name,
            "text": text_path.display().to_string(),
            "tokens": tokens.len(),
            "window": args.window,
            "windows": count,
            "kv_cache": kv_cache.name(),
            "device": runtime.device_name,
            "threads": runtime.threads,
            "results": rows,
        });
        format!("{}\n", serde_json::to_string_pretty(&doc)?)
    } else {
        markdown(model_name, &rows)
    };
    match report.out {
        Some(out) => layout::write_atomic(out, rendered.as_bytes())
            .with_context(|| format!("cannot write {}", out.display()))?,
        None => std::io::stdout().lock().write_all(rendered.as_bytes())?,
    }
    Ok(ExitCode::SUCCESS)
}

fn line(row: &Row) -> String {
    let q = &row.quality;
    format!(
        "{}: PPL {:.4}, mean KL {:.3e}, top-1 {:.2}% over {} positions ({:.1} s)",
        row.format,
        q.perplexity,
        q.mean_kl,
        100.0 * q.top1,
        q.positions,
        row.seconds
    )
}

fn row_json(model: &str, row: &Row) -> serde_json::Value {
    let q = &row.quality;
    json!({
        "model": model,
        "format": row.format,
        "positions": q.positions,
        "perplexity": q.perplexity,
        "mean_kl": q.mean_kl,
        "kl_p99": q.kl_p99,
        "max_kl": q.max_kl,
        "top1": q.top1,
        "load_seconds": row.load_seconds,
        "seconds": row.seconds,
    })
}

/// The table: the reference first, then each format with its perplexity relative to it.
fn markdown(model: &str, rows: &[Row]) -> String {
    let base = rows.first().map_or(1.0, |r| r.quality.perplexity);
    let mut out = String::from(
        "| model | format | positions | PPL | PPL ratio | mean KL | KL p99 | max KL | top-1 % |\n\
         | ----- | ------ | --------: | --: | --------: | ------: | -----: | -----: | ------: |\n",
    );
    for r in rows {
        let q = &r.quality;
        out.push_str(&format!(
            "| {model} | {} | {} | {:.4} | {:.4} | {:.3e} | {:.3e} | {:.3e} | {:.2} |\n",
            r.format,
            q.positions,
            q.perplexity,
            q.perplexity / base,
            q.mean_kl,
            q.kl_p99,
            q.max_kl,
            100.0 * q.top1
        ));
    }
    out
}
