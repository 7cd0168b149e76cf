//! `sanctum run MODEL [PROMPT]`: one reply from a verified chat model, streamed to stdout; and the
//! flags and loading that `sanctum chat` shares.

use std::io::{IsTerminal, Read, Write};
use std::ops::ControlFlow;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use attest::lockfile::Task;
use clap::Args;
use runner::chat::{ChatModel, GenerateOptions, Generation, LoadOptions};
use runner::device::{self, DeviceChoice};
use runner::engine::{Engine, Reply, Runtime};
use runner::models::llama::KvPrecision;
use runner::quant::Quant;
use runner::sampling::SamplingParams;
use runner::template::Message;
use serde_json::json;

use super::Context;
use super::stamp::{OutputArgs, OutputStamper};
use ::attest::stamp::OutputRecord;
use ::attest::statement::{OutputTask, f32_as_decimal};

/// `--quant`: a format, or `auto` (see `runner::models::llama::auto_quant`).
#[derive(Debug, Clone, Copy)]
pub struct QuantArg(Option<Quant>);

impl QuantArg {
    /// The format asked for; None for `auto`.
    pub fn format(self) -> Option<Quant> {
        self.0
    }
}

impl std::str::FromStr for QuantArg {
    type Err = runner::quant::UnknownQuant;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "auto" {
            return Ok(Self(None));
        }
        s.parse().map(|q| Self(Some(q)))
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Model name from the lockfile.
    model: String,
    /// The prompt; `-`, or none with stdin not a terminal, reads it from stdin.
    prompt: Option<String>,
    /// A system message before the prompt.
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// Send the prompt as is, without the chat template.
    #[arg(long, conflicts_with = "system")]
    raw: bool,
    /// Print one JSON object (text, usage, timings, model, quantization, device) instead of streaming.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    generation: GenerationArgs,
    #[command(flatten)]
    model_args: ModelArgs,
}

/// How the model is loaded and run.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Format the weights run in, quantized in memory from the verified Safetensors at load:
    /// f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4k, q5k, q6k; auto keeps the format each
    /// matrix is stored in when sanctum's own kernels run it (q8_0, q4_0, q4_1, q5_0, q4k, q6k),
    /// else q8_0.
    #[arg(long, default_value = "auto", value_name = "FORMAT")]
    quant: QuantArg,
    /// How sanctum's CPU kernels (q8_0, q4_0) quantize activations: int16 keeps f32's answers;
    /// int8 is llama.cpp's arithmetic (bit for bit), faster on prompts.
    #[arg(long, default_value = "int16", value_name = "PRECISION")]
    activations: runner::kernels::Activations,
    /// Context size in tokens (prompt and reply) [default: the model's].
    #[arg(long, value_name = "TOKENS")]
    ctx: Option<usize>,
    /// What the key/value cache holds on sanctum's CPU path: f16 (half the memory, llama.cpp's
    /// default) or f32.
    #[arg(long, default_value = "f16", value_name = "PRECISION")]
    kv_cache: KvPrecision,
    /// Show how each weight was quantized (fallbacks) and other load details on stderr.
    #[arg(long, short)]
    pub verbose: bool,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

/// Where inference runs.
#[derive(Debug, Args)]
pub struct RuntimeArgs {
    /// auto, cpu, cuda, cuda:N or metal (cuda and metal need a build with that cargo feature).
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    device: DeviceChoice,
    /// Most CPU threads [default: the number of physical cores]. On Linux a forward pass runs on
    /// fewer while other programs keep cores busy (a thread they preempt would hold up the others).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    /// Always run on all --threads threads, however busy the machine.
    #[arg(long)]
    fixed_threads: bool,
}

/// What to generate and how to pick tokens.
#[derive(Debug, Args)]
pub struct GenerationArgs {
    /// Most tokens to generate [default: until the end of the turn or a full context].
    #[arg(long, value_name = "N")]
    max_tokens: Option<usize>,
    /// Stop when this text appears (repeatable); it is not printed.
    #[arg(long, value_name = "TEXT")]
    stop: Vec<String>,
    /// Sampling temperature; 0 always takes the most likely token (greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Sample among the K most likely tokens only (0: all).
    #[arg(long, default_value_t = 40, value_name = "K")]
    top_k: usize,
    /// Sample among the most likely tokens whose probabilities add up to P (1: all).
    #[arg(long, default_value_t = 0.95, value_name = "P")]
    top_p: f32,
    /// Drop tokens less likely than P times the most likely one (0: none).
    #[arg(long, default_value_t = 0.05, value_name = "P")]
    min_p: f32,
    /// Penalize tokens seen among the last --repeat-last-n (1: off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    #[arg(long, default_value_t = 64, value_name = "N")]
    repeat_last_n: usize,
    /// Seed of the sampler; the same seed, model, quantization, device and threads give the same
    /// bytes [default: random, shown with --json].
    #[arg(long)]
    seed: Option<u64>,
}

impl GenerationArgs {
    /// The generation options, with a fresh seed when none was given.
    pub fn options(&self) -> GenerateOptions {
        let seed = self.seed.unwrap_or_else(random_seed);
        GenerateOptions {
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repeat_penalty: self.repeat_penalty,
                repeat_last_n: self.repeat_last_n,
                seed,
            },
        }
    }
}

/// What an attestation records of a reply printed as `printed`: the rendered prompt, the settings and
/// the token counts.
pub fn reply_record<'a>(
    loaded: &Loaded,
    entry: &'a ::attest::lockfile::ModelEntry,
    reply: Reply<'a>,
) -> OutputRecord<'a> {
    reply.record(&loaded.model, entry, &loaded.runtime)
}

fn random_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}

/// A chat model loaded, with what the summary reports about the load.
pub struct Loaded {
    pub model: ChatModel,
    pub load_time: Duration,
    pub runtime: Runtime,
}

impl RuntimeArgs {
    /// Sets the thread count for candle (before it starts any thread) and opens the device, if the
    /// policy allows it.
    pub fn start(&self, ctx: &Context) -> anyhow::Result<Runtime> {
        let threads = set_threads(self.threads.map(usize::from));
        if self.fixed_threads {
            runner::kernels::use_every_thread();
        }
        let device = self.device.open(&ctx.policy()?.rules)?;
        Ok(Runtime::new(device, threads))
    }
}

/// Sets candle's CPU thread count; returns it.
///
/// candle reads its thread count from `RAYON_NUM_THREADS` / `CANDLE_NUM_THREADS` when it first
/// builds its pools, so this must run before any inference, and before sanctum starts threads of
/// its own (progress bars, verification workers).
fn set_threads(threads: Option<usize>) -> usize {
    let n = threads.unwrap_or_else(device::physical_cores).max(1);
    #[allow(unsafe_code)]
    // SAFETY: called at the start of a command, while the process has a single thread: no other
    // thread can be reading the environment concurrently.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    }
    n
}

/// Prints the notice that an approved model is about to be pulled, when it is missing.
pub fn note_pull(ctx: &Context, engine: &Engine, name: &str, task: Task) -> anyhow::Result<()> {
    let entry = engine.entry(name, task)?;
    if engine.is_missing(entry) {
        ctx.progress().note(&format!(
            "{name} is approved but not in the store: pulling it ({:.1} MB)",
            entry.total_size() as f64 / 1e6
        ));
    }
    Ok(())
}

/// Opens the signer (key, lock under the policy, the binary's hash) on a thread of its own while
/// the model loads, so neither waits for the other; a signer that cannot be opened still stops
/// the command before anything is generated, and its error comes first.
pub fn open_beside_load(
    ctx: &Context,
    output: &OutputArgs,
    name: &str,
    args: &ModelArgs,
) -> anyhow::Result<(OutputStamper, Loaded)> {
    OutputStamper::check_output(ctx, output)?;
    let (stamper, loaded) = std::thread::scope(|s| {
        let stamper = s.spawn(|| OutputStamper::open(ctx, output));
        let loaded = load_chat(ctx, name, args);
        (stamper.join(), loaded)
    });
    let stamper = stamper.map_err(|_| anyhow::anyhow!("opening the signer failed"))??;
    Ok((stamper, loaded?))
}

/// Loads a chat model as the flags say; `--verbose` details go to stderr.
pub fn load_chat(ctx: &Context, name: &str, args: &ModelArgs) -> anyhow::Result<Loaded> {
    let runtime = args.runtime.start(ctx)?;
    let engine = ctx.engine()?;
    note_pull(ctx, &engine, name, Task::Chat)?;
    let options = args.load_options(&runtime);
    let loaded = engine.load_chat(name, &options, &ctx.progress())?;
    if args.verbose {
        report_load(
            &loaded.model,
            args.quant.0.is_none(),
            loaded.load_time,
            &runtime,
        );
    }
    Ok(Loaded {
        model: loaded.model,
        load_time: loaded.load_time,
        runtime,
    })
}

impl ModelArgs {
    /// How to load the model on `runtime`.
    pub fn load_options(&self, runtime: &Runtime) -> LoadOptions {
        LoadOptions {
            quant: self.quant.0,
            activations: Some(self.activations),
            device: runtime.device.clone(),
            context: self.ctx,
            context_cap: None,
            kv_cache: self.kv_cache,
        }
    }
}

/// The `--verbose` load report on stderr: time, formats and fallbacks.
pub fn report_load(model: &ChatModel, auto: bool, load_time: Duration, runtime: &Runtime) {
    let mix = runner::bench::mix(model.choices());
    eprintln!(
        "{}: loaded and verified in {:.2} s; --quant {}{}: {}{}{}; {}, {} threads; context {}",
        model.name(),
        load_time.as_secs_f64(),
        model.quant(),
        if auto { " (auto)" } else { "" },
        mix,
        model
            .activations()
            .map(|a| format!(", {a} activations"))
            .unwrap_or_default(),
        model
            .kv_precision()
            .map(|p| format!(", {p} key/value cache"))
            .unwrap_or_default(),
        runtime.device_name,
        runtime.threads,
        model.context()
    );
    for choice in model.choices().iter().filter(|c| c.reason.is_some()) {
        eprintln!(
            "  {}: {} instead of {} ({})",
            choice.tensor,
            choice.used,
            choice.requested,
            choice.reason.as_deref().unwrap_or_default()
        );
    }
}

/// The stderr summary line.
pub fn summary(loaded: &Loaded, generation: &Generation) -> String {
    format!(
        "{} tokens prompt ({:.1} tok/s), {} generated ({:.1} tok/s), load+verify {:.2} s [{} on {}, {} threads, stop: {}]",
        generation.prompt_tokens,
        generation.prompt_tokens_per_second(),
        generation.tokens.len(),
        generation.generation_tokens_per_second(),
        loaded.load_time.as_secs_f64(),
        loaded.model.arithmetic(),
        loaded.runtime.device_name,
        loaded.runtime.threads,
        generation.stop.name()
    )
}

/// Writes streamed text to stdout; a failed write (a closed pipe) stops generation and is kept.
pub struct StdoutSink {
    out: std::io::Stdout,
    error: Option<std::io::Error>,
    /// Exactly the bytes written, for the attestation's subject.
    pub written: Vec<u8>,
    pub ends_with_newline: bool,
}

impl StdoutSink {
    pub fn new() -> Self {
        Self {
            out: std::io::stdout(),
            error: None,
            written: Vec::new(),
            ends_with_newline: true,
        }
    }

    pub fn write(&mut self, text: &str) -> ControlFlow<()> {
        let mut out = self.out.lock();
        match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            Ok(()) => {
                self.written.extend_from_slice(text.as_bytes());
                self.ends_with_newline = text.ends_with('\n');
                ControlFlow::Continue(())
            }
            Err(e) => {
                self.error = Some(e);
                ControlFlow::Break(())
            }
        }
    }

    /// The bytes written, or the write error that stopped the stream.
    pub fn finish(self) -> std::io::Result<Vec<u8>> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(self.written),
        }
    }
}

pub fn run(args: RunArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let started = SystemTime::now();
    let prompt = read_prompt(args.prompt.as_deref())?;
    let options = args.generation.options();
    options.sampling.validate()?;
    let (stamper, loaded) = open_beside_load(ctx, &args.output, &args.model, &args.model_args)?;
    let model = &loaded.model;
    let mut session = model.session();
    let rendered = if args.raw {
        prompt
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::new("system", system.as_str()));
        }
        messages.push(Message::new("user", prompt.as_str()));
        model.render(&messages, true)?
    };
    let tokens = if args.raw {
        model.tokenize_raw(&rendered)?
    } else {
        model.tokenize_rendered(&rendered)?
    };

    let out = args.output.out.as_deref();
    let (printed, generation) = if args.json || out.is_some() {
        let generation = model.generate(&mut session, &tokens, &options, &mut |_| {
            ControlFlow::Continue(())
        })?;
        let bytes = if args.json {
            let mut doc = serde_json::to_vec_pretty(&run_json(&loaded, &options, &generation))?;
            doc.push(b'\n');
            doc
        } else {
            generation.text.clone().into_bytes()
        };
        if out.is_none() {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&bytes)?;
            stdout.flush()?;
        }
        (bytes, generation)
    } else {
        let mut sink = StdoutSink::new();
        let generation = model.generate(&mut session, &tokens, &options, &mut |text| {
            sink.write(text)
        })?;
        if !sink.ends_with_newline {
            let _ = sink.write("\n");
        }
        (sink.finish().context("writing to stdout")?, generation)
    };
    let entry = stamper.model(&args.model)?;
    let record = reply_record(
        &loaded,
        entry,
        Reply {
            task: OutputTask::Run,
            options: &options,
            prompt: &rendered,
            bytes: &printed,
            generation: &generation,
            started,
            request: None,
        },
    );
    stamper.emit(out, record)?;
    if !args.json {
        eprintln!("{}", summary(&loaded, &generation));
    }
    Ok(ExitCode::SUCCESS)
}

fn run_json(loaded: &Loaded, options: &GenerateOptions, g: &Generation) -> serde_json::Value {
    let model = &loaded.model;
    let s = &options.sampling;
    json!({
        "model": model.name(),
        "digest": format!("sha256:{}", model.digest()),
        "quant": model.quant().name(),
        "activations": model.activations().map(|a| a.name()),
        "kv_cache": model.kv_precision().map(|p| p.name()),
        "device": loaded.runtime.device_name,
        "threads": loaded.runtime.threads,
        "context": model.context(),
        "text": g.text,
        "stop_reason": g.stop.name(),
        "usage": {
            "prompt_tokens": g.prompt_tokens,
            "completion_tokens": g.tokens.len(),
            "total_tokens": g.prompt_tokens + g.tokens.len(),
        },
        "timings": {
            "load_verify_s": loaded.load_time.as_secs_f64(),
            "prompt_s": g.prompt_time.as_secs_f64(),
            "prompt_tokens_per_s": g.prompt_tokens_per_second(),
            "generation_s": g.decode_time.as_secs_f64(),
            "generation_tokens_per_s": g.generation_tokens_per_second(),
        },
        "sampling": {
            "temperature": f32_as_decimal(s.temperature),
            "top_k": s.top_k,
            "top_p": f32_as_decimal(s.top_p),
            "min_p": f32_as_decimal(s.min_p),
            "repeat_penalty": f32_as_decimal(s.repeat_penalty),
            "repeat_last_n": s.repeat_last_n,
            "seed": s.seed,
            "max_tokens": options.max_tokens,
            "stop": options.stop,
        },
    })
}

/// The prompt argument, or stdin for `-` or when absent and stdin is not a terminal.
fn read_prompt(arg: Option<&str>) -> anyhow::Result<String> {
    match arg {
        Some(p) if p != "-" => return Ok(p.to_owned()),
        None if std::io::stdin().is_terminal() => {
            bail!(
                "no prompt: pass PROMPT, pipe it on stdin, or use `sanctum chat` for a conversation"
            )
        }
        _ => {}
    }
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("reading the prompt from stdin")?;
    let text = text.trim_end_matches(['\n', '\r']).to_owned();
    if text.trim().is_empty() {
        bail!("the prompt read from stdin is empty");
    }
    Ok(text)
}
