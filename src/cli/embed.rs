//! `sanctum embed MODEL [TEXT...]`: sentence embeddings from a verified embedding model, as JSON.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context as _, bail};
use attest::lockfile::Task;
use clap::{Args, ValueEnum};
use runner::engine::Embeddings;
use serde_json::json;

use super::Context;
use super::run::{RuntimeArgs, note_pull};
use super::stamp::{OutputArgs, OutputStamper};

#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// Model name from the lockfile.
    model: String,
    /// Texts to embed; none reads one text per line from stdin.
    texts: Vec<String>,
    /// `json`: one object holding every embedding; `jsonl`: one object per text and line.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    format: Format,
    /// Cut texts longer than the model's input to fit (each one cut is named on stderr and marked
    /// `truncated` in the output); `--truncate false` makes such a text an error instead.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    truncate: bool,
    /// Print load and speed details on stderr.
    #[arg(long, short)]
    verbose: bool,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Json,
    Jsonl,
}

pub fn run(args: EmbedArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let started_at = std::time::SystemTime::now();
    let stamper = OutputStamper::open(ctx, &args.output)?;
    let runtime = args.runtime.start(ctx)?;
    let texts = if args.texts.is_empty() {
        read_lines()?
    } else {
        args.texts
    };
    let engine = ctx.engine()?;
    note_pull(ctx, &engine, &args.model, Task::Embed)?;
    let loaded = engine.load_embedder(&args.model, &runtime.device, &ctx.progress())?;
    let (embedder, load_time) = (loaded.model, loaded.load_time);

    let started = Instant::now();
    let embedded = embedder.embed_counted(&texts, args.truncate)?;
    let (vectors, tokens, truncated) = (embedded.vectors, embedded.tokens, embedded.truncated);
    let took = started.elapsed().as_secs_f64();
    for (index, _) in truncated.iter().enumerate().filter(|(_, cut)| **cut) {
        eprintln!(
            "sanctum: text {index} was cut to the model's {} tokens (--truncate false refuses it)",
            embedder.max_tokens()
        );
    }
    if args.verbose {
        eprintln!(
            "{}: loaded and verified in {:.2} s; {} texts in {took:.2} s ({:.1}/s); {} pooling{}, {} dimensions; {}, {} threads",
            embedder.name(),
            load_time.as_secs_f64(),
            texts.len(),
            texts.len() as f64 / took.max(1e-9),
            embedder.pooling().name(),
            if embedder.normalize() {
                ", normalized"
            } else {
                ""
            },
            embedder.dimensions(),
            runtime.device_name,
            runtime.threads,
        );
    }

    let mut out = Vec::new();
    match args.format {
        Format::Json => {
            let items: Vec<_> = (0..texts.len())
                .map(|index| item(index, &texts, &vectors, &truncated))
                .collect();
            let doc = json!({
                "model": embedder.name(),
                "digest": format!("sha256:{}", embedder.digest()),
                "dimensions": embedder.dimensions(),
                "pooling": embedder.pooling().name(),
                "normalized": embedder.normalize(),
                "device": runtime.device_name,
                "embeddings": items,
            });
            serde_json::to_writer(&mut out, &doc)?;
            writeln!(out)?;
        }
        Format::Jsonl => {
            for index in 0..texts.len() {
                serde_json::to_writer(&mut out, &item(index, &texts, &vectors, &truncated))?;
                writeln!(out)?;
            }
        }
    }
    let path = args.output.out.as_deref();
    if path.is_none() {
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(&out)?;
        stdout.flush()?;
    }
    let prompt = texts.join("\n");
    let embeddings = Embeddings {
        bytes: &out,
        texts: &prompt,
        tokens,
        started: started_at,
        request: None,
    };
    stamper.emit(
        path,
        embeddings.record(stamper.model(&args.model)?, &runtime),
    )?;
    Ok(ExitCode::SUCCESS)
}

/// One text's entry in the output.
fn item(
    index: usize,
    texts: &[String],
    vectors: &[Vec<f32>],
    truncated: &[bool],
) -> serde_json::Value {
    json!({
        "index": index,
        "text": texts[index],
        "embedding": vectors[index],
        "truncated": truncated[index],
    })
}

/// One text per line of stdin (blank lines skipped).
fn read_lines() -> anyhow::Result<Vec<String>> {
    if std::io::stdin().is_terminal() {
        bail!("no texts: pass them as arguments or one per line on stdin");
    }
    let mut texts = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line.context("reading stdin")?;
        if !line.trim().is_empty() {
            texts.push(line);
        }
    }
    if texts.is_empty() {
        bail!("no texts on stdin");
    }
    Ok(texts)
}
