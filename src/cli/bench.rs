//! `sanctum bench MODEL`: llama-bench's tests (ppN, tgN) per weight format, with what perf teams
//! need on top (time to first token, load+verify time, peak memory, every sample), optionally
//! checked against a hardware profile and signed; `sanctum bench compare` for CI; `sanctum bench
//! serve` to load-test an OpenAI-compatible server (`sanctum serve`, or any other at `--url`).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use attest::Sha256Digest;
use attest::attestation::layout;
use attest::lockfile::Task;
use attest::stamp::BenchRecord;
use attest::statement::{ProfileRecord, rfc3339};
use clap::{Args, Subcommand, ValueEnum};
use runner::bench::{self, BenchReport, BuildInfo, Event, ProfileUse, RunInfo, Test, TestResult};
use runner::chat::LoadOptions;
use runner::hardware::{self, HardwareProfile};
use serve::bench::{self as load, ApiKey, Arrival, BenchOptions, Outcome, Report, Sample};

use super::Context;
use super::attest::Trust;
use super::context::display_path;
use super::run::{QuantArg, RuntimeArgs, note_pull};
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
    /// Load-test an OpenAI-compatible server with streamed chat completions from concurrent
    /// clients, like `vllm bench serve`: TTFT, TPOT, ITL, end-to-end latency and throughput. Starts
    /// `sanctum serve` for MODEL, or drives the server at --url (llama-server, vLLM, ...).
    Serve(ServeBenchArgs),
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
    /// Activation precisions of sanctum's CPU kernels to test with each format, comma-separated
    /// (as `run --activations`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "int16",
        value_name = "PRECISIONS"
    )]
    activations: Vec<runner::kernels::Activations>,
    /// What the key/value cache holds on sanctum's CPU path (as `run --kv-cache`); quality
    /// measurements compare with the reference format on an f32 cache.
    #[arg(long, default_value = "f16", value_name = "PRECISION")]
    kv_cache: runner::models::llama::KvPrecision,
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
    /// Run the tests with one busy-looping process beside them (a neighbour wanting a core), to
    /// measure how speed holds up under contention; recorded in the report. Passes run on the
    /// cores it leaves free unless --fixed-threads is given.
    #[arg(long)]
    busy_neighbour: bool,
    #[command(flatten)]
    quality: super::quality::QualityArgs,
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

/// `sanctum bench serve ...`.
#[derive(Debug, Args)]
struct ServeBenchArgs {
    /// The model: a lockfile name for `sanctum serve` to serve, or with --url the name sent to that
    /// server [default with --url: the first id of its /v1/models].
    model: Option<String>,
    /// Drive the OpenAI-compatible server at this base URL instead of starting `sanctum serve`.
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// Concurrent clients: the most requests in flight (and `sanctum serve --parallel`).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    clients: u32,
    /// Requests in the whole run.
    #[arg(long, value_name = "M", value_parser = clap::value_parser!(u32).range(1..))]
    requests: u32,
    /// `max_tokens` of each request.
    #[arg(long, value_name = "N", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    max_tokens: u32,
    /// Sampling temperature of each request (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Sampling seed sent with each request; also seeds the --rate arrivals [default: none sent,
    /// arrivals seeded with 0].
    #[arg(long)]
    seed: Option<u64>,
    /// Poisson arrivals at R requests per second, at most --clients in flight [default: closed
    /// loop, each client sending its next request when its previous one ends].
    #[arg(long, value_name = "R")]
    rate: Option<f64>,
    /// Send the token in FILE as `Authorization: Bearer` (and, without --url, have `sanctum serve`
    /// require it).
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// The most one request may take, to the end of its stream.
    #[arg(long, value_name = "SECONDS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
    /// Without --url: how long `sanctum serve` may take to load and answer.
    #[arg(long, value_name = "SECONDS", default_value_t = 120, conflicts_with = "url", value_parser = clap::value_parser!(u64).range(1..))]
    startup_timeout: u64,
    /// Without --url: the weight format `sanctum serve` runs (see `sanctum run --help`).
    #[arg(long, value_name = "FORMAT", conflicts_with = "url", value_parser = quant_name)]
    quant: Option<String>,
    /// Without --url: CPU threads of `sanctum serve`.
    #[arg(long, value_name = "N", conflicts_with = "url", value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = ServeFormat::Md)]
    format: ServeFormat,
    /// Write the report to FILE (atomically) instead of stdout.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Sign the report as `sanctum bench --attest` does (the model must be in the lock).
    #[arg(long)]
    attest: bool,
}

/// `--quant` of `bench serve`: checked here, passed on to `sanctum serve` as written.
fn quant_name(s: &str) -> Result<String, runner::quant::UnknownQuant> {
    s.parse::<QuantArg>().map(|_| s.to_owned())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ServeFormat {
    /// A summary table like vllm's, and the latencies.
    Md,
    /// The whole report, every request included.
    Json,
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
        (Some(BenchCommand::Serve(serve)), _) => run_serve(serve, ctx),
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
    if args.quality.quality.is_some() {
        let runtime = args.runtime.start(ctx)?;
        let engine = ctx.engine()?;
        note_pull(ctx, &engine, model_name, Task::Chat)?;
        let formats: Vec<_> = args
            .quant
            .iter()
            .flat_map(|&q| args.activations.iter().map(move |&a| (q, a)))
            .collect();
        if matches!(args.format, Format::Jsonl | Format::Csv) {
            bail!("--quality reports as -o md or -o json");
        }
        let report = super::quality::Report {
            json: args.format == Format::Json,
            out: args.out.as_deref(),
        };
        return super::quality::run(
            ctx,
            &engine,
            model_name,
            &args.quality,
            &formats,
            args.kv_cache,
            &runtime,
            report,
        );
    }
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
    let runtime = args.runtime.start(ctx)?;
    let started = SystemTime::now();
    let load_average = hardware::load_average();
    let say = |line: &str| {
        if !ctx.quiet() {
            eprintln!("bench: {line}");
        }
    };
    if let Some([one, five, fifteen]) = load_average {
        say(&format!(
            "load average at start: {one:.2} {five:.2} {fifteen:.2} (1, 5, 15 min)"
        ));
    }

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

    let engine = ctx.engine()?;
    note_pull(ctx, &engine, model_name, Task::Chat)?;
    let mut results: Vec<TestResult> = Vec::new();
    let formats = args
        .quant
        .iter()
        .flat_map(|q| args.activations.iter().map(move |&a| (q, a)));
    for (quant, activations) in formats {
        bench::reset_peak_rss();
        let load_started = Instant::now();
        let options = LoadOptions {
            quant: quant.format(),
            activations: Some(activations),
            device: runtime.device.clone(),
            context: None,
            context_cap: None,
            kv_cache: args.kv_cache,
        };
        let model = engine
            .load_chat(model_name, &options, &ctx.progress())?
            .model;
        let load_verify = load_started.elapsed();
        let mix = bench::mix(model.choices());
        let quant_name = model.arithmetic();
        say(&format!(
            "{model_name} {quant_name}: loaded and verified in {:.2} s ({mix})",
            load_verify.as_secs_f64()
        ));
        let neighbour = if args.busy_neighbour {
            say("a busy-looping neighbour process runs beside the tests");
            Some(bench::BusyNeighbour::start().context("starting the busy neighbour")?)
        } else {
            None
        };
        let samples = bench::run(
            &model,
            &tests,
            args.repetitions as usize,
            args.seed,
            &mut |event| progress(&say, &quant_name, event),
        )?;
        drop(neighbour);
        let info = RunInfo {
            quant: quant_name.clone(),
            mix,
            backend: runtime.device_name.clone(),
            threads: runtime.threads,
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
        load_average,
        busy_neighbour: args.busy_neighbour,
        results,
    };
    let bytes = render(&report, args.format)?.into_bytes();
    let signed = match &stamper {
        Some(stamper) => Some((
            stamper,
            BenchRecord {
                model: stamper.model(model_name)?,
                hardware: serde_json::to_value(&report.hardware)?,
                profile: profile.map(|(_, record)| record),
                started,
                finished: SystemTime::now(),
            },
        )),
        None => None,
    };
    write_results(&bytes, args.out.as_deref(), signed)?;
    Ok(ExitCode::SUCCESS)
}

/// Writes results to `out` (atomically) or stdout; with a stamper and record, signs them too.
fn write_results(
    bytes: &[u8],
    out: Option<&Path>,
    signed: Option<(&OutputStamper, BenchRecord<'_>)>,
) -> anyhow::Result<()> {
    match signed {
        Some((stamper, record)) => {
            if out.is_none() {
                std::io::stdout().lock().write_all(bytes)?;
            }
            stamper.emit_bench(out, bytes, record)?;
        }
        None => match out {
            Some(out) => layout::write_atomic(out, bytes)
                .with_context(|| format!("cannot write {}", out.display()))?,
            None => std::io::stdout().lock().write_all(bytes)?,
        },
    }
    Ok(())
}

/// How long each `GET /v1/models` may take: discovering the model, or polling a starting server.
const MODELS_TIMEOUT: Duration = Duration::from_secs(10);

fn run_serve(args: ServeBenchArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let say = |line: &str| {
        if !ctx.quiet() {
            eprintln!("bench: {line}");
        }
    };
    let api_key = match &args.api_key_file {
        Some(path) => Some(read_api_key(path)?),
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
    let (server, url, model) = match &args.url {
        Some(url) => {
            let model = match &args.model {
                Some(model) => model.clone(),
                None => first_model(url, api_key.as_ref())?,
            };
            (None, url.trim_end_matches('/').to_owned(), model)
        }
        None => {
            let Some(model) = args.model.clone() else {
                bail!(
                    "name the model for `sanctum serve` to serve, or drive a running server with \
                     --url URL"
                );
            };
            // A model the lock does not approve is refused before anything starts.
            ctx.lockfile()?.1.model(&model)?;
            let server = SpawnedServer::start(ctx, &model, &args, api_key.as_ref(), &say)?;
            let url = server.url.clone();
            (Some(server), url, model)
        }
    };
    let entry = match &stamper {
        Some(stamper) => Some(stamper.model(&model).with_context(|| {
            format!(
                "--attest signs results of models in the lock only, and {url} serves {model:?} \
                 (drop --attest to measure it)"
            )
        })?),
        None => None,
    };

    let mut options = BenchOptions::new(url, model.clone());
    options.clients = args.clients as usize;
    options.requests = args.requests as usize;
    options.max_tokens = args.max_tokens;
    options.temperature = args.temperature;
    options.seed = args.seed;
    options.api_key = api_key;
    options.timeout = Duration::from_secs(args.timeout);
    if let Some(rate) = args.rate {
        options.arrival = Arrival::Poisson {
            rate,
            seed: args.seed.unwrap_or(0),
        };
    }
    options.validate()?;
    say(&format!(
        "{} requests to {model} at {}, {} clients, {}",
        options.requests,
        options.url,
        options.clients,
        match options.arrival {
            Arrival::Closed => "closed loop".to_owned(),
            Arrival::Poisson { rate, .. } => format!("Poisson arrivals at {rate} req/s"),
        }
    ));
    let started = SystemTime::now();
    let done = AtomicUsize::new(0);
    let report = load::run(&options, &|sample| {
        let n = done.fetch_add(1, Ordering::Relaxed) + 1;
        say(&sample_line(n, options.requests, sample));
    })?;
    let finished = SystemTime::now();
    if let Some(server) = server {
        server.stop(&say);
    }

    let bytes = match args.format {
        ServeFormat::Md => report.markdown(),
        ServeFormat::Json => report.json()?,
    }
    .into_bytes();
    let signed = match (&stamper, entry) {
        (Some(stamper), Some(entry)) => Some((
            stamper,
            BenchRecord {
                model: entry,
                hardware: serde_json::to_value(hardware::detect(None, &build_features(), false))?,
                profile: None,
                started,
                finished,
            },
        )),
        _ => None,
    };
    write_results(&bytes, args.out.as_deref(), signed)?;
    summarize(&report, &say)
}

/// One line of progress per request.
fn sample_line(n: usize, of: usize, s: &Sample) -> String {
    match s.outcome {
        Outcome::Completed => format!(
            "{n}/{of}: {} tokens, TTFT {}, {:.2} s",
            s.completion_tokens,
            s.ttft_ms
                .map_or_else(|| "-".to_owned(), |t| format!("{t:.1} ms")),
            s.e2e_ms / 1e3
        ),
        Outcome::Failed | Outcome::Rejected => format!(
            "{n}/{of}: request {} {}: {}",
            s.index,
            if s.outcome == Outcome::Rejected {
                "rejected"
            } else {
                "failed"
            },
            s.error.as_deref().unwrap_or("")
        ),
    }
}

/// The closing line on stderr; an error when no request completed.
fn summarize(report: &Report, say: &dyn Fn(&str)) -> anyhow::Result<ExitCode> {
    say(&format!(
        "{} completed, {} failed, {} rejected in {:.2} s: {:.2} output tok/s, TTFT p50 {}",
        report.completed,
        report.failed,
        report.rejected,
        report.duration_s,
        report.output_tokens_per_s,
        report
            .ttft
            .map_or_else(|| "-".to_owned(), |t| format!("{:.1} ms", t.p50_ms))
    ));
    if report.completed == 0 {
        let first = report
            .samples
            .iter()
            .find_map(|s| s.error.as_deref())
            .unwrap_or("none");
        bail!(
            "no request completed ({} failed, {} rejected); the first error: {first}",
            report.failed,
            report.rejected
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn read_api_key(path: &Path) -> anyhow::Result<ApiKey> {
    let text = ::attest::files::read_bounded_text(path, ::attest::files::MAX_DOCUMENT_BYTES)
        .with_context(|| format!("cannot read the API key file {}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        bail!("the API key file {} is empty", path.display());
    }
    Ok(ApiKey::new(token))
}

/// The first model id the server at `url` lists.
fn first_model(url: &str, api_key: Option<&ApiKey>) -> anyhow::Result<String> {
    load::list_models(url, api_key, MODELS_TIMEOUT)?
        .into_iter()
        .next()
        .with_context(|| format!("{url}/v1/models lists no model: name the one to send"))
}

/// Lines of the server's stderr kept for error messages.
const STDERR_LINES: usize = 40;

/// `sanctum serve`, started by `bench serve` on a free loopback port; stopped when dropped.
struct SpawnedServer {
    child: Child,
    url: String,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl SpawnedServer {
    /// Starts `<this exe> --lock L --store S [--policy P] --quiet serve --addr 127.0.0.1:PORT
    /// --models MODEL --parallel CLIENTS --preload [--quant Q] [--threads T] [--api-key-file F]`
    /// and waits until its `/v1/models` answers.
    fn start(
        ctx: &Context,
        model: &str,
        args: &ServeBenchArgs,
        api_key: Option<&ApiKey>,
        say: &dyn Fn(&str),
    ) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("cannot find a free port on 127.0.0.1")?
            .port();
        let exe = std::env::current_exe().context("cannot find the running executable")?;
        let mut command = Command::new(exe);
        command
            .arg("--lock")
            .arg(ctx.lock_path()?)
            .arg("--store")
            .arg(ctx.home()?);
        if let Some(policy) = ctx.policy_flag() {
            command.arg("--policy").arg(policy);
        }
        let addr = format!("127.0.0.1:{port}");
        command
            .args(["--quiet", "serve", "--addr", &addr, "--models", model])
            .args(["--parallel", &args.clients.to_string(), "--preload"]);
        if let Some(quant) = &args.quant {
            command.args(["--quant", quant]);
        }
        if let Some(threads) = args.threads {
            command.args(["--threads", &threads.to_string()]);
        }
        if let Some(key_file) = &args.api_key_file {
            command.arg("--api-key-file").arg(key_file);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        say(&format!("starting `sanctum serve` for {model} on {addr}"));
        let started = Instant::now();
        let mut child = command.spawn().context("cannot start `sanctum serve`")?;
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(pipe) = child.stderr.take() {
            let lines = Arc::clone(&stderr);
            // Drained all along, so a chatty server never blocks on a full pipe.
            std::thread::spawn(move || keep_tail(pipe, &lines));
        }
        let mut server = Self {
            child,
            url: format!("http://{addr}"),
            stderr,
        };
        server.wait_ready(Duration::from_secs(args.startup_timeout), api_key)?;
        say(&format!(
            "`sanctum serve` answered after {:.1} s",
            started.elapsed().as_secs_f64()
        ));
        Ok(server)
    }

    fn wait_ready(&mut self, timeout: Duration, api_key: Option<&ApiKey>) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                // Let the reader take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                let message = format!(
                    "`sanctum serve` exited ({status}) before answering:\n{}",
                    self.tail()
                );
                // Its refusal (exit 1: the policy, the lock) stays a refusal.
                if status.code() == Some(1) {
                    return Err(Refused(message).into());
                }
                bail!(message);
            }
            match load::list_models(&self.url, api_key, MODELS_TIMEOUT) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => bail!(
                    "`sanctum serve` did not answer {}/v1/models within {} s ({e}); its last \
                     lines:\n{}",
                    self.url,
                    timeout.as_secs(),
                    self.tail()
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }

    fn tail(&self) -> String {
        let lines = self.stderr.lock().unwrap_or_else(PoisonError::into_inner);
        if lines.is_empty() {
            return "  (nothing on stderr)".to_owned();
        }
        lines
            .iter()
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Stops the server, saying so if it had already exited during the run.
    fn stop(mut self, say: &dyn Fn(&str)) {
        if let Ok(Some(status)) = self.child.try_wait() {
            say(&format!(
                "warning: `sanctum serve` exited during the run ({status}):\n{}",
                self.tail()
            ));
        }
        self.terminate();
    }

    /// SIGTERM (for a graceful shutdown), then SIGKILL after 10 s; bounded either way.
    fn terminate(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        if cfg!(unix) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SpawnedServer {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Keeps the last [`STDERR_LINES`] lines (each cut at 1 KiB) of `pipe` until it closes.
fn keep_tail(pipe: impl std::io::Read, lines: &Mutex<VecDeque<String>>) {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        // A line longer than 1 KiB is cut (the rest reads as the next lines).
        match reader.by_ref().take(1024).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                let mut lines = lines.lock().unwrap_or_else(PoisonError::into_inner);
                if lines.len() == STDERR_LINES {
                    lines.pop_front();
                }
                lines.push_back(text);
            }
        }
    }
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
    let text = ::attest::files::read_bounded_text(path, ::attest::files::MAX_DOCUMENT_BYTES)
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
        let bytes = ::attest::files::read_bounded(path, ::attest::files::MAX_DOCUMENT_BYTES)
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
        let bundle =
            ::attest::files::read_bounded(&placement.bundle, ::attest::files::MAX_DOCUMENT_BYTES)
                .with_context(|| {
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
    use std::io::Read as _;
    use std::net::{TcpListener, TcpStream};

    use attest::lockfile::{HfSource, LockedFile, Lockfile, ModelEntry, Source};
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: ServeBenchArgs,
    }

    fn serve_args(args: &[&str]) -> ServeBenchArgs {
        Wrap::try_parse_from(std::iter::once("bench-serve").chain(args.iter().copied()))
            .unwrap()
            .args
    }

    /// An OpenAI-compatible stand-in on 127.0.0.1:0 for `connections` connections (or 20 s):
    /// `GET /v1/models` lists `fake-model`, anything else gets a short streamed reply.
    fn fake_server(connections: usize) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        listener.set_nonblocking(true).unwrap();
        let server = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut workers = Vec::new();
            while workers.len() < connections && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => workers.push(std::thread::spawn(move || answer(stream))),
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        (url, server)
    }

    /// Answers one request; returns its request line and body.
    fn answer(mut stream: TcpStream) -> String {
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let (mut request_line, mut length) = (String::new(), 0);
        reader.read_line(&mut request_line).unwrap();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            match line.trim_end().split_once(':') {
                Some((name, value)) if name.eq_ignore_ascii_case("content-length") => {
                    length = value.trim().parse().unwrap();
                }
                Some(_) => {}
                None => break,
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let reply = if request_line.starts_with("GET /v1/models ") {
            let list = r#"{"object":"list","data":[{"id":"fake-model"},{"id":"other"}]}"#;
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{list}",
                list.len()
            )
        } else {
            let mut reply = String::from(
                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n",
            );
            for text in ["Hi", " there", "!"] {
                reply += &format!(
                    "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n"
                );
            }
            reply += "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3}}\n\n";
            reply + "data: [DONE]\n\n"
        };
        stream.write_all(reply.as_bytes()).unwrap();
        format!(
            "{}{}",
            request_line.trim_end(),
            String::from_utf8_lossy(&body)
        )
    }

    /// A lock approving `m`, a policy, an empty home.
    fn context(dir: &Path) -> Context {
        let files = vec![LockedFile {
            path: "model.safetensors".into(),
            sha256: Sha256Digest::of(b"w"),
            size: 1,
        }];
        let source = Source::Hf(HfSource {
            repo: "o/m".into(),
            revision: "r".into(),
            files: None,
        });
        let mut lock = Lockfile::new();
        lock.models.push(ModelEntry::new(
            "m",
            Task::Chat,
            "llama",
            "MIT",
            source,
            files,
        ));
        std::fs::write(dir.join("models.lock"), lock.to_toml()).unwrap();
        std::fs::write(dir.join("policy.toml"), "version = 1\n").unwrap();
        Context::new(Some(dir.join("models.lock")), Some(dir.join("home")), true)
            .with_policy(Some(dir.join("policy.toml")))
    }

    #[test]
    fn bench_serve_drives_a_foreign_server_and_signs_only_locked_models() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let (url, server) = fake_server(4);
        let out = dir.path().join("serve.json");
        let out_arg = out.to_str().unwrap();
        // The model from /v1/models, 2 clients, JSON into --out.
        let args = serve_args(&[
            "--url",
            &url,
            "--clients",
            "2",
            "--requests",
            "2",
            "-o",
            "json",
            "--out",
            out_arg,
        ]);
        assert_eq!(run_serve(args, &ctx).unwrap(), ExitCode::SUCCESS);
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(report["options"]["model"], "fake-model");
        assert_eq!(
            (
                report["completed"].as_u64(),
                report["completion_tokens"].as_u64()
            ),
            (Some(2), Some(6))
        );

        let signing = std::env::var_os(super::super::keys::SIGNING_KEY_ENV).is_none();
        if signing {
            // A model the lock does not approve: refused (exit 1) before any request.
            let args = serve_args(&[
                "--url",
                &url,
                "fake-model",
                "--clients",
                "1",
                "--requests",
                "1",
                "--attest",
            ]);
            let err = run_serve(args, &ctx).unwrap_err();
            assert_eq!(super::super::exit_code_for(&err), 1, "{err:#}");
            assert!(
                format!("{err:#}").contains("models in the lock only"),
                "{err:#}"
            );

            // A locked model's results are signed as `bench --attest` signs its own.
            let args = serve_args(&[
                "--url",
                &url,
                "m",
                "--clients",
                "1",
                "--requests",
                "1",
                "--attest",
                "--out",
                out_arg,
            ]);
            assert_eq!(run_serve(args, &ctx).unwrap(), ExitCode::SUCCESS);
            let bytes = std::fs::read(&out).unwrap();
            let key = dir.path().join("home/keys/signer.pub");
            verify_results(&ctx, &[key], [(&out, &bytes), (&out, &bytes)]).unwrap();
        }
        let requests = server.join().unwrap();
        assert_eq!(requests.len(), if signing { 4 } else { 3 }, "{requests:?}");
        assert!(requests.iter().any(|r| r.starts_with("GET /v1/models ")));
        let chats: Vec<&String> = requests
            .iter()
            .filter(|r| r.starts_with("POST /v1/chat/completions "))
            .collect();
        assert!(
            chats.iter().all(|r| r.contains("\"stream\":true")),
            "{chats:?}"
        );
        assert!(chats.iter().any(|r| r.contains("\"model\":\"fake-model\"")));
    }

    #[test]
    fn bench_serve_needs_a_model_or_a_url() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let err = run_serve(serve_args(&["--clients", "1", "--requests", "1"]), &ctx).unwrap_err();
        assert!(err.to_string().contains("--url"), "{err}");
        let err = run_serve(
            serve_args(&["nope", "--clients", "1", "--requests", "1"]),
            &ctx,
        )
        .unwrap_err();
        assert_eq!(
            super::super::exit_code_for(&err),
            1,
            "not in the lock: {err:#}"
        );
        assert!(
            Wrap::try_parse_from([
                "x",
                "--url",
                "http://h",
                "--quant",
                "q8_0",
                "--clients",
                "1",
                "--requests",
                "1"
            ])
            .is_err()
        );
        assert!(
            Wrap::try_parse_from(["x", "--quant", "q9", "--clients", "1", "--requests", "1"])
                .is_err()
        );
    }

    #[test]
    fn params_and_backends_read_like_llama_bench() {
        assert_eq!(params(134_515_008), "134.52 M");
        assert_eq!(params(6_738_415_616), "6.74 B");
        assert_eq!(backend_name("cuda:0"), "CUDA");
        assert_eq!(backend_name("cpu"), "CPU");
    }
}
