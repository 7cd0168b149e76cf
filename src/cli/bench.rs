//! `sanctum bench MODEL`: llama-bench's tests (ppN, tgN) per weight format, with what perf teams
//! need on top (time to first token, load+verify time, peak memory, every sample), optionally
//! checked against a hardware profile and signed; `sanctum bench compare` for CI.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime};

use anyhow::{Context as _, bail};
use attest::Sha256Digest;
use attest::attestation::layout;
use attest::lockfile::Task;
use attest::stamp::BenchRecord;
use attest::statement::{ProfileRecord, rfc3339};
use clap::{Args, Subcommand, ValueEnum};
use runner::bench::{self, BenchReport, BuildInfo, Event, ProfileUse, RunInfo, Test, TestResult};
use runner::chat::{ChatModel, LoadOptions};
use runner::hardware::{self, HardwareProfile};

use super::Context;
use super::attest::Trust;
use super::context::display_path;
use super::run::{QuantArg, RuntimeArgs, open_verified};
use super::stamp::{OutputArgs, OutputStamper, runner_info};
use super::trust::Refused;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: Option<BenchCommand>,
    #[command(flatten)]
    run: RunBench,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Compare two result files (`-o json` or `-o jsonl`) test by test; exit 1 on a regression.
    Compare(CompareArgs),
}

/// `sanctum bench MODEL ...`.
#[derive(Debug, Args)]
struct RunBench {
    /// Chat model name from the lockfile.
    model: Option<String>,
    /// Weight formats to test, comma-separated (`auto` picks by model size, as `run` does).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "auto",
        value_name = "FORMATS"
    )]
    quant: Vec<QuantArg>,
    /// Prompt-processing tests: prompt lengths, comma-separated (0: none).
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "512"
    )]
    prompt: Vec<usize>,
    /// Generation tests: tokens to generate, comma-separated (0: none).
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128"
    )]
    generate: Vec<usize>,
    /// Repetitions of each test (after one warm-up run).
    #[arg(short = 'r', long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    repetitions: u32,
    /// Refuse to run unless this machine matches the hardware profile (see `sanctum hw detect`).
    #[arg(long, value_name = "FILE")]
    profile: Option<PathBuf>,
    /// Run even if the machine does not match --profile (the differences are recorded).
    #[arg(long, requires = "profile")]
    force: bool,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Md)]
    format: Format,
    /// Write the results to FILE (atomically) instead of stdout.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Sign the results: a bundle whose subject is the results file and whose predicate records the
    /// profile, the detected hardware, the model digest and the sanctum build.
    #[arg(long)]
    attest: bool,
    /// Seed of the random prompt tokens.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(Debug, Args)]
struct CompareArgs {
    /// The baseline results.
    base: PathBuf,
    /// The results to judge.
    new: PathBuf,
    /// A test regresses when its speed drops by more than this many percent.
    #[arg(long, default_value_t = 5.0, value_name = "PERCENT")]
    threshold: f64,
    /// Require both files to carry a valid `--attest` bundle (by the repository convention, or
    /// FILE.sigstore.json) from a trusted signer.
    #[arg(long)]
    verify: bool,
    /// Trust this signer public key as well as the policy's [[signer]] keys (repeatable).
    #[arg(long, value_name = "PUB", requires = "verify")]
    key: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// llama-bench's Markdown table, then the extra measurements.
    Md,
    /// One report: build, hardware, profile, results.
    Json,
    /// One result per line.
    Jsonl,
    /// One result per row.
    Csv,
}

pub fn run(args: BenchArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    match (args.command, args.run.model.clone()) {
        (Some(BenchCommand::Compare(compare)), _) => run_compare(compare, ctx),
        (None, Some(model)) => run_bench(&model, args.run, ctx),
        (None, None) => bail!("name a model to benchmark, or `sanctum bench compare BASE NEW`"),
    }
}

/// The cargo features of this build, as profiles record them.
pub fn build_features() -> Vec<&'static str> {
    let mut features = vec!["inference"];
    if cfg!(feature = "cuda") {
        features.push("cuda");
    }
    if cfg!(feature = "metal") {
        features.push("metal");
    }
    features.sort_unstable();
    features
}

fn run_bench(model_name: &str, args: RunBench, ctx: &Context) -> anyhow::Result<ExitCode> {
    let tests: Vec<Test> = args
        .prompt
        .iter()
        .filter(|n| **n > 0)
        .map(|n| Test::Prompt(*n))
        .chain(
            args.generate
                .iter()
                .filter(|n| **n > 0)
                .map(|n| Test::Generate(*n)),
        )
        .collect();
    if tests.is_empty() {
        bail!("nothing to run: -p and -n are all 0");
    }
    let (device, threads, backend) = args.runtime.start()?;
    let started = SystemTime::now();
    let say = |line: &str| {
        if !ctx.quiet() {
            eprintln!("bench: {line}");
        }
    };

    say("measuring memory bandwidth");
    let machine = hardware::detect(None, &build_features(), true);
    let profile = match &args.profile {
        Some(path) => Some(check_profile(path, &machine, args.force)?),
        None => None,
    };
    // Signing is set up before any work, so a key problem stops the run at once.
    let stamper = if args.attest {
        let output = OutputArgs {
            out: args.out.clone(),
            attest_prompt: false,
        };
        Some(OutputStamper::open(ctx, &output)?)
    } else {
        None
    };

    let mut results: Vec<TestResult> = Vec::new();
    for quant in &args.quant {
        bench::reset_peak_rss();
        let load_started = Instant::now();
        let (verified, _) = open_verified(ctx, model_name, Task::Chat)?;
        let options = LoadOptions {
            quant: quant.format(),
            device: device.clone(),
            context: None,
        };
        let mut model = ChatModel::load(verified, &options)?;
        let load_verify = load_started.elapsed();
        let mix = bench::mix(model.choices());
        say(&format!(
            "{model_name} {}: loaded and verified in {:.2} s ({mix})",
            model.quant(),
            load_verify.as_secs_f64()
        ));
        let quant_name = model.quant().name();
        let samples = bench::run(
            &mut model,
            &tests,
            args.repetitions as usize,
            args.seed,
            &mut |event| progress(&say, quant_name, event),
        )?;
        let info = RunInfo {
            quant: model.quant().name().to_owned(),
            mix,
            backend: backend.clone(),
            threads,
            load_verify,
            peak_rss_bytes: bench::peak_rss_bytes(),
        };
        results.extend(samples.iter().map(|s| TestResult::new(&model, &info, s)));
    }

    let build = runner_info()?;
    let report = BenchReport {
        sanctum: BuildInfo {
            version: build.version,
            git_commit: build.git_commit,
            features: build_features().into_iter().map(str::to_owned).collect(),
        },
        hardware: machine,
        profile: profile.as_ref().map(|(use_, _)| use_.clone()),
        started_at: rfc3339(started),
        results,
    };
    let bytes = render(&report, args.format)?.into_bytes();
    match &stamper {
        Some(stamper) => {
            let entry = stamper.model(model_name)?;
            let record = BenchRecord {
                model: entry,
                hardware: serde_json::to_value(&report.hardware)?,
                profile: profile.map(|(_, record)| record),
                started,
                finished: SystemTime::now(),
            };
            if args.out.is_none() {
                std::io::stdout().lock().write_all(&bytes)?;
            }
            stamper.emit_bench(args.out.as_deref(), &bytes, record)?;
        }
        None => match &args.out {
            Some(out) => layout::write_atomic(out, &bytes)
                .with_context(|| format!("cannot write {}", out.display()))?,
            None => std::io::stdout().lock().write_all(&bytes)?,
        },
    }
    Ok(ExitCode::SUCCESS)
}

fn progress(say: &dyn Fn(&str), quant: &str, event: Event) {
    match event {
        Event::WarmUp(test) => say(&format!("{quant} {}: warm-up", test.name())),
        Event::Repetition {
            test,
            done,
            of,
            tokens_per_second,
        } => say(&format!(
            "{quant} {} {done}/{of}: {tokens_per_second:.2} t/s",
            test.name()
        )),
    }
}

/// Reads `--profile` and holds the machine against it: a mismatch is a refusal unless `force`.
fn check_profile(
    path: &Path,
    machine: &HardwareProfile,
    force: bool,
) -> anyhow::Result<(ProfileUse, ProfileRecord)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read hardware profile {}", path.display()))?;
    let profile = HardwareProfile::parse(&text, path)?;
    let mismatches = hardware::mismatches(&profile, machine);
    if !mismatches.is_empty() {
        let list = mismatches
            .iter()
            .map(|m| format!("  - {m}"))
            .collect::<Vec<_>>()
            .join("\n");
        if !force {
            return Err(Refused(format!(
                "this machine does not match hardware profile {} ({}):\n{list}\n\
                 (run `sanctum hw detect` to write a profile for it, or pass --force to run anyway)",
                display_path(path),
                profile.name
            ))
            .into());
        }
        eprintln!(
            "bench: warning: this machine does not match hardware profile {} (--force):\n{list}",
            display_path(path)
        );
    }
    let digest = Sha256Digest::of(text.as_bytes());
    let record = ProfileRecord {
        name: profile.name.clone(),
        digest: digest.into(),
        mismatches: mismatches.clone(),
        content: serde_json::to_value(&profile)?,
    };
    let used = ProfileUse {
        name: profile.name,
        path: display_path(path),
        sha256: digest.to_string(),
        mismatches,
    };
    Ok((used, record))
}

fn render(report: &BenchReport, format: Format) -> anyhow::Result<String> {
    Ok(match format {
        Format::Json => serde_json::to_string_pretty(report)? + "\n",
        Format::Jsonl => {
            let mut out = String::new();
            for r in &report.results {
                out.push_str(&serde_json::to_string(r)?);
                out.push('\n');
            }
            out
        }
        Format::Csv => csv(&report.results),
        Format::Md => markdown(&report.results),
    })
}

const MIB: f64 = (1u64 << 20) as f64;

/// llama-bench's table (same columns, so rows paste beside its own), then what it lacks.
fn markdown(results: &[TestResult]) -> String {
    let mut out = String::from(
        "| model | size | params | backend | threads | test | t/s |\n\
         | ----- | ---: | -----: | ------- | ------: | ---: | --: |\n",
    );
    for r in results {
        let _ = writeln!(
            out,
            "| {} {} | {:.2} MiB | {} | {} | {} | {} | {:.2} ± {:.2} |",
            r.model,
            r.quant,
            r.model_size as f64 / MIB,
            params(r.model_n_params),
            backend_name(&r.backend),
            r.n_threads,
            r.test,
            r.avg_ts,
            r.stddev_ts
        );
    }
    out.push_str(
        "\n| model | test | TTFT ms | load+verify s | peak RSS MiB | samples t/s |\n\
         | ----- | ---: | ------: | ------------: | -----------: | ----------- |\n",
    );
    for r in results {
        let samples: Vec<String> = r.samples_ts.iter().map(|t| format!("{t:.2}")).collect();
        let _ = writeln!(
            out,
            "| {} {} | {} | {} | {:.2} | {} | {} |",
            r.model,
            r.quant,
            r.test,
            r.ttft_ms
                .map_or_else(|| "-".to_owned(), |t| format!("{t:.1}")),
            r.load_verify_s,
            r.peak_rss_bytes
                .map_or_else(|| "-".to_owned(), |b| format!("{:.0}", b as f64 / MIB)),
            samples.join(", ")
        );
    }
    out
}

/// llama-bench's parameter count: `134.52 M`, `6.74 B`.
fn params(n: u64) -> String {
    if n >= 1_000_000_000 {
        format!("{:.2} B", n as f64 / 1e9)
    } else {
        format!("{:.2} M", n as f64 / 1e6)
    }
}

/// llama-bench's backend names: `CPU`, `CUDA`, `Metal`.
fn backend_name(device: &str) -> &'static str {
    if device.starts_with("cuda") {
        "CUDA"
    } else if device.starts_with("metal") {
        "Metal"
    } else {
        "CPU"
    }
}

fn csv(results: &[TestResult]) -> String {
    let mut out = String::from(
        "model,model_digest,quant,mix,model_size,model_n_params,backend,n_threads,test,n_prompt,n_gen,\
         avg_ns,stddev_ns,avg_ts,stddev_ts,ttft_ms,load_verify_s,peak_rss_bytes,samples_ts\n",
    );
    for r in results {
        let samples: Vec<String> = r.samples_ts.iter().map(|t| format!("{t:.4}")).collect();
        let _ = writeln!(
            out,
            "{},{},{},\"{}\",{},{},{},{},{},{},{},{},{},{:.4},{:.4},{},{:.4},{},\"{}\"",
            r.model,
            r.model_digest,
            r.quant,
            r.mix,
            r.model_size,
            r.model_n_params,
            r.backend,
            r.n_threads,
            r.test,
            r.n_prompt,
            r.n_gen,
            r.avg_ns,
            r.stddev_ns,
            r.avg_ts,
            r.stddev_ts,
            r.ttft_ms.map_or_else(String::new, |t| format!("{t:.3}")),
            r.load_verify_s,
            r.peak_rss_bytes.map_or_else(String::new, |b| b.to_string()),
            samples.join(";")
        );
    }
    out
}

fn run_compare(args: CompareArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    if !(0.0..100.0).contains(&args.threshold) {
        bail!(
            "--threshold {} is not a percentage between 0 and 100",
            args.threshold
        );
    }
    let read = |path: &Path| -> anyhow::Result<(Vec<u8>, Vec<TestResult>)> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read benchmark results {}", path.display()))?;
        let results = bench::parse_results(&bytes).with_context(|| {
            format!(
                "{} is not a `sanctum bench -o json` or `-o jsonl` file",
                path.display()
            )
        })?;
        Ok((bytes, results))
    };
    let (base_bytes, base) = read(&args.base)?;
    let (new_bytes, new) = read(&args.new)?;
    if args.verify {
        verify_results(
            ctx,
            &args.key,
            [(&args.base, &base_bytes), (&args.new, &new_bytes)],
        )?;
    }
    let comparison = bench::compare(&base, &new, args.threshold / 100.0);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "| test | base t/s | new t/s | ratio | |\n| ---- | -------: | ------: | ----: | - |"
    )?;
    for t in &comparison.tests {
        writeln!(
            out,
            "| {} | {:.2} | {:.2} | {:.3} | {} |",
            t.label,
            t.base,
            t.new,
            t.ratio,
            if t.regression { "REGRESSION" } else { "ok" }
        )?;
    }
    for label in &comparison.unmatched {
        eprintln!("bench: not compared: {label}");
    }
    if comparison.tests.is_empty() {
        bail!(
            "{} and {} have no test in common (same model, format, test, backend and threads)",
            args.base.display(),
            args.new.display()
        );
    }
    let regressions = comparison.tests.iter().filter(|t| t.regression).count();
    if regressions > 0 {
        eprintln!(
            "bench: {regressions} of {} tests regressed by more than {}%",
            comparison.tests.len(),
            args.threshold
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// Verifies each result file's `--attest` bundle against the policy's signers (and `keys`).
fn verify_results<'a>(
    ctx: &Context,
    keys: &[PathBuf],
    files: [(&'a PathBuf, &'a Vec<u8>); 2],
) -> anyhow::Result<()> {
    let trust = Trust::open(ctx, keys)?;
    let verifier = trust.verifier();
    for (path, bytes) in files {
        let placement = layout::placement_for_output(path).with_context(|| {
            format!(
                "cannot find where the attestation of {} lives",
                path.display()
            )
        })?;
        let bundle = std::fs::read(&placement.bundle).with_context(|| {
            format!(
                "{} has no attestation at {} (made by `sanctum bench --attest --out`)",
                path.display(),
                placement.bundle.display()
            )
        })?;
        let verified = verifier
            .verify_bench(&bundle, &Sha256Digest::of(bytes))
            .map_err(|e| Refused(format!("{}: {e}", display_path(&placement.bundle))))?;
        eprintln!(
            "bench: {}: signed by {} ({})",
            display_path(path),
            verified.signer,
            verified.statement.predicate.model.name
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_and_backends_read_like_llama_bench() {
        assert_eq!(params(134_515_008), "134.52 M");
        assert_eq!(params(6_738_415_616), "6.74 B");
        assert_eq!(backend_name("cuda:0"), "CUDA");
        assert_eq!(backend_name("cpu"), "CPU");
    }
}
