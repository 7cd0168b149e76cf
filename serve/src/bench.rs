//! The load generator behind `sanctum bench serve`, like `vllm bench serve`: it drives any
//! OpenAI-compatible server over HTTP (sanctum's own, llama-server, vLLM) with streamed chat
//! completions from a number of concurrent clients, and reports time to first token (TTFT), time
//! per output token (TPOT), inter-token latency (ITL) and end-to-end latency (E2E), with every
//! per-request sample.
//!
//! Each client is one OS thread with its own blocking HTTP agent; every request has a timeout, so a
//! run always ends by itself. Arrivals are either a closed loop (each client sends its next request
//! as soon as its previous one ends) or a seeded Poisson process (at most `clients` in flight).
//!
//! ```no_run
//! use serve::bench::{self, BenchOptions};
//!
//! let mut options = BenchOptions::new("http://127.0.0.1:8080", "smollm2-135m-instruct");
//! options.clients = 4;
//! options.requests = 16;
//! let report = bench::run(&options, &|_sample| {})?;
//! println!("{}", report.markdown());
//! # Ok::<_, bench::BenchError>(())
//! ```

use std::fmt::Write as _;
use std::io::Read as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::{Value, json};

/// The prompts sent when none are given: short and varied, cycled in order (request `i` sends
/// prompt `i % len`).
pub const DEFAULT_PROMPTS: &[&str] = &[
    "Explain in a few sentences why the sky is blue.",
    "Write a short poem about a lighthouse keeper.",
    "List five uses for a paperclip other than holding paper.",
    "What is the difference between a list and a tuple in Python?",
    "Invent the plot of a heist movie and summarize it in one paragraph.",
    "Give three tips for writing clear commit messages.",
];

/// The longest SSE line or event payload accepted from a server.
const MAX_EVENT_BYTES: usize = 1 << 20;
/// How much of an error response's body is kept.
const MAX_ERROR_BODY: u64 = 4096;

/// What a benchmark run does. [`BenchOptions::new`] gives the defaults; [`run`] validates.
#[derive(Debug, Clone, Serialize)]
pub struct BenchOptions {
    /// The server's base URL, e.g. `http://127.0.0.1:8080` (`/v1/...` is appended).
    pub url: String,
    /// The model name sent in each request.
    pub model: String,
    /// Concurrent clients: at most this many requests in flight.
    pub clients: usize,
    /// Requests in the whole run.
    pub requests: usize,
    /// `max_tokens` of each request (default 128).
    pub max_tokens: u32,
    /// Sampling temperature (default 0: greedy).
    pub temperature: f64,
    /// The sampling seed sent with each request, if any.
    pub seed: Option<u64>,
    /// The prompts, cycled in order (default [`DEFAULT_PROMPTS`]).
    pub prompts: Vec<String>,
    /// When requests are sent.
    pub arrival: Arrival,
    /// Sent as `Authorization: Bearer ...`; never serialized.
    #[serde(skip)]
    pub api_key: Option<ApiKey>,
    /// The most one request may take, from sending it to the end of its stream (default 600 s).
    #[serde(rename = "timeout_s", serialize_with = "seconds")]
    pub timeout: Duration,
}

/// When requests are sent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Arrival {
    /// Each client sends its next request as soon as its previous one ends.
    Closed,
    /// Requests are due at exponentially distributed intervals (a Poisson process of `rate`
    /// requests per second, drawn from `seed`); a due request waits for a free client.
    Poisson {
        /// Requests per second.
        rate: f64,
        /// Seed of the inter-arrival times.
        seed: u64,
    },
}

/// A bearer token; its `Debug` does not show it.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// A token, as given (without `Bearer `).
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    fn header(&self) -> String {
        format!("Bearer {}", self.0)
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Why a benchmark could not run. Failed requests are not errors: they are counted in the
/// [`Report`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// No client.
    #[error("at least one client is needed")]
    NoClients,
    /// No request.
    #[error("at least one request is needed")]
    NoRequests,
    /// `max_tokens` is 0.
    #[error("max_tokens must be at least 1")]
    NoMaxTokens,
    /// The temperature is negative or not finite.
    #[error("temperature {0} is not a finite number of at least 0")]
    Temperature(f64),
    /// The Poisson rate is not a finite positive number.
    #[error("request rate {0} is not a finite number above 0")]
    Rate(f64),
    /// The prompt list is empty.
    #[error("no prompt to send")]
    NoPrompts,
    /// The per-request timeout is zero.
    #[error("the request timeout must be above 0")]
    Timeout,
    /// The base URL is not an HTTP one.
    #[error("server URL {0:?} does not start with http:// or https://")]
    Url(String),
    /// `GET /v1/models` failed.
    #[error("cannot list the models at {url}")]
    Models {
        /// The URL asked.
        url: String,
        /// What went wrong.
        #[source]
        source: ureq::Error,
    },
    /// `GET /v1/models` answered something other than an OpenAI model list.
    #[error("{url} did not answer an OpenAI model list (`data[].id`)")]
    ModelList {
        /// The URL asked.
        url: String,
    },
}

impl BenchOptions {
    /// The defaults for a server and model: 1 client, 1 request, 128 tokens, temperature 0, no seed,
    /// [`DEFAULT_PROMPTS`], closed loop, no API key, 600 s per request.
    pub fn new(url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            model: model.into(),
            clients: 1,
            requests: 1,
            max_tokens: 128,
            temperature: 0.0,
            seed: None,
            prompts: DEFAULT_PROMPTS.iter().map(|p| (*p).to_owned()).collect(),
            arrival: Arrival::Closed,
            api_key: None,
            timeout: Duration::from_secs(600),
        }
    }

    /// Checks the options as [`run`] does.
    pub fn validate(&self) -> Result<(), BenchError> {
        check_url(&self.url)?;
        if self.clients == 0 {
            return Err(BenchError::NoClients);
        }
        if self.requests == 0 {
            return Err(BenchError::NoRequests);
        }
        if self.max_tokens == 0 {
            return Err(BenchError::NoMaxTokens);
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(BenchError::Temperature(self.temperature));
        }
        if let Arrival::Poisson { rate, .. } = self.arrival
            && !(rate.is_finite() && rate > 0.0)
        {
            return Err(BenchError::Rate(rate));
        }
        if self.prompts.is_empty() {
            return Err(BenchError::NoPrompts);
        }
        if self.timeout.is_zero() {
            return Err(BenchError::Timeout);
        }
        Ok(())
    }
}

fn check_url(url: &str) -> Result<(), BenchError> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(())
    } else {
        Err(BenchError::Url(url.to_owned()))
    }
}

fn endpoint(base: &str, path: &str) -> String {
    format!("{}{path}", base.trim_end_matches('/'))
}

/// One agent per client: no proxy (a benchmark measures the server, and libraries read no
/// environment), status codes as responses, the request timeout over the whole exchange.
fn agent(timeout: Duration, status_as_error: bool) -> ureq::Agent {
    ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(status_as_error)
        .timeout_global(Some(timeout))
        .user_agent(concat!("sanctum-bench/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// The model ids of `GET {url}/v1/models`, in the server's order.
pub fn list_models(
    url: &str,
    api_key: Option<&ApiKey>,
    timeout: Duration,
) -> Result<Vec<String>, BenchError> {
    check_url(url)?;
    let models_url = endpoint(url, "/v1/models");
    let mut request = agent(timeout, true).get(&models_url);
    if let Some(key) = api_key {
        request = request.header("Authorization", key.header());
    }
    let body: Value = request
        .call()
        .and_then(|mut r| r.body_mut().read_json())
        .map_err(|source| BenchError::Models {
            url: models_url.clone(),
            source,
        })?;
    body.get("data")
        .and_then(Value::as_array)
        .map(|data| {
            data.iter()
                .filter_map(|m| m.get("id").and_then(Value::as_str).map(str::to_owned))
                .collect()
        })
        .ok_or(BenchError::ModelList { url: models_url })
}

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The stream ended with `data: [DONE]`.
    Completed,
    /// A transport error, a timeout, an error status, an error event or a malformed stream.
    Failed,
    /// HTTP 503 with `Retry-After`: the server shed the load, as it should when full.
    Rejected,
}

/// One request's measurements. Times are milliseconds; `scheduled_ms` and `sent_ms` count from the
/// start of the run, the others from sending the request.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// The request's number in the run (0-based).
    pub index: usize,
    /// The client that sent it.
    pub client: usize,
    /// The prompt's index in [`BenchOptions::prompts`].
    pub prompt: usize,
    /// How it ended.
    pub outcome: Outcome,
    /// The HTTP status, when a response came.
    pub status: Option<u16>,
    /// What went wrong, for failed and rejected requests.
    pub error: Option<String>,
    /// The `Retry-After` header of a rejection.
    pub retry_after: Option<String>,
    /// When the request was due (Poisson arrivals; 0 in a closed loop).
    pub scheduled_ms: f64,
    /// When it was sent.
    pub sent_ms: f64,
    /// Time to the first chunk with non-empty content.
    pub ttft_ms: Option<f64>,
    /// Time to the end of the response (`[DONE]`, or the failure).
    pub e2e_ms: f64,
    /// (e2e − ttft) / (tokens − 1), for more than one token.
    pub tpot_ms: Option<f64>,
    /// The time between each two successive content chunks.
    pub itl_ms: Vec<f64>,
    /// Prompt tokens, from the usage chunk.
    pub prompt_tokens: Option<u64>,
    /// Completion tokens: from the usage chunk, else the number of content chunks.
    pub completion_tokens: u64,
    /// Whether the server sent a usage chunk.
    pub usage_reported: bool,
}

/// Mean and percentiles of a latency, in milliseconds (percentiles interpolated linearly between
/// the closest ranks, as numpy's default).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stats {
    /// The number of values.
    pub count: usize,
    /// Their mean.
    pub mean_ms: f64,
    /// The median.
    pub p50_ms: f64,
    /// The 90th percentile.
    pub p90_ms: f64,
    /// The 99th percentile.
    pub p99_ms: f64,
}

impl Stats {
    /// The statistics of `values` (in any order); None when empty.
    fn of(mut values: Vec<f64>) -> Option<Self> {
        values.sort_by(f64::total_cmp);
        Some(Self {
            count: values.len(),
            mean_ms: values.iter().sum::<f64>() / values.len() as f64,
            p50_ms: percentile(&values, 50.0)?,
            p90_ms: percentile(&values, 90.0)?,
            p99_ms: percentile(&values, 99.0)?,
        })
    }
}

/// The `p`th percentile (0..=100) of sorted values, linearly interpolated (numpy's default).
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let rank = p / 100.0 * last as f64;
    let low = (rank.floor() as usize).min(last);
    let high = (rank.ceil() as usize).min(last);
    Some(sorted[low] + (sorted[high] - sorted[low]) * (rank - low as f64))
}

/// The results of a run. Latency statistics cover completed requests only.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// What was run.
    pub options: BenchOptions,
    /// When the run started (RFC 3339, UTC).
    pub started_at: String,
    /// When the last request ended.
    pub finished_at: String,
    /// Wall time of the whole run, in seconds.
    pub duration_s: f64,
    /// Requests that completed.
    pub completed: usize,
    /// Requests that failed.
    pub failed: usize,
    /// Requests rejected with 503 and `Retry-After`.
    pub rejected: usize,
    /// Prompt tokens of the completed requests (as their usage chunks reported).
    pub prompt_tokens: u64,
    /// Completion tokens of the completed requests.
    pub completion_tokens: u64,
    /// `completion_tokens` over the wall time of the whole run.
    pub output_tokens_per_s: f64,
    /// Completed requests over the wall time of the whole run.
    pub requests_per_s: f64,
    /// Time to first token.
    pub ttft: Option<Stats>,
    /// Time per output token after the first.
    pub tpot: Option<Stats>,
    /// Inter-token latency, over every gap of every completed request.
    pub itl: Option<Stats>,
    /// End-to-end latency.
    pub e2e: Option<Stats>,
    /// Every request, by index.
    pub samples: Vec<Sample>,
}

/// Runs the benchmark: `options.requests` streamed chat completions from `options.clients`
/// threads. `on_sample` sees each request as it ends (from the client's thread). Returns once every
/// request has ended; each one is bounded by `options.timeout`.
pub fn run(
    options: &BenchOptions,
    on_sample: &(dyn Fn(&Sample) + Sync),
) -> Result<Report, BenchError> {
    options.validate()?;
    let due = arrivals(options.arrival, options.requests);
    let url = endpoint(&options.url, "/v1/chat/completions");
    let next = AtomicUsize::new(0);
    let samples = Mutex::new(Vec::with_capacity(options.requests));
    let started_at = SystemTime::now();
    let start = Instant::now();
    std::thread::scope(|scope| {
        for client in 0..options.clients.min(options.requests) {
            let (due, url, next, samples) = (&due, &url, &next, &samples);
            scope.spawn(move || {
                let agent = agent(options.timeout, false);
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(due) = due.get(index) else { break };
                    if let Some(wait) = (start + *due).checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let request = Request {
                        index,
                        client,
                        scheduled: *due,
                    };
                    let sample = send(&agent, url, options, &request, start);
                    on_sample(&sample);
                    samples
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(sample);
                }
            });
        }
    });
    let duration = start.elapsed();
    let mut samples = samples.into_inner().unwrap_or_else(PoisonError::into_inner);
    samples.sort_by_key(|s| s.index);
    Ok(Report::new(
        options.clone(),
        started_at,
        SystemTime::now(),
        duration,
        samples,
    ))
}

/// When each request is due, from the start of the run.
fn arrivals(arrival: Arrival, requests: usize) -> Vec<Duration> {
    match arrival {
        Arrival::Closed => vec![Duration::ZERO; requests],
        Arrival::Poisson { rate, seed } => {
            let mut rng = SplitMix64(seed);
            let mut at = 0.0_f64;
            (0..requests)
                .map(|_| {
                    let due = Duration::from_secs_f64(at);
                    // 1 − u is in (0, 1]: its logarithm is finite.
                    at += -(1.0 - rng.unit()).ln() / rate;
                    due
                })
                .collect()
        }
    }
}

/// A small seeded generator (SplitMix64) for the inter-arrival times.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Which request a client is sending.
struct Request {
    index: usize,
    client: usize,
    scheduled: Duration,
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Sends one request and measures its stream.
fn send(
    agent: &ureq::Agent,
    url: &str,
    options: &BenchOptions,
    request: &Request,
    start: Instant,
) -> Sample {
    let prompt = request.index % options.prompts.len();
    let mut body = json!({
        "model": options.model,
        "messages": [{"role": "user", "content": options.prompts[prompt]}],
        "max_tokens": options.max_tokens,
        "temperature": options.temperature,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(seed) = options.seed {
        body["seed"] = json!(seed);
    }
    let mut http = agent
        .post(url)
        .header("Content-Type", "application/json")
        .header("Accept", "text/event-stream");
    if let Some(key) = &options.api_key {
        http = http.header("Authorization", key.header());
    }
    let sent = Instant::now();
    let mut sample = Sample {
        index: request.index,
        client: request.client,
        prompt,
        outcome: Outcome::Failed,
        status: None,
        error: None,
        retry_after: None,
        scheduled_ms: millis(request.scheduled),
        sent_ms: millis(sent.duration_since(start)),
        ttft_ms: None,
        e2e_ms: 0.0,
        tpot_ms: None,
        itl_ms: Vec::new(),
        prompt_tokens: None,
        completion_tokens: 0,
        usage_reported: false,
    };
    let mut stream = StreamState::new(sent);
    // Compact JSON (ureq's `send_json` pretty-prints).
    let ended = match http.send(body.to_string()) {
        Err(e) => {
            sample.error = Some(e.to_string());
            Instant::now()
        }
        Ok(response) => {
            let status = response.status();
            sample.status = Some(status.as_u16());
            if status.is_success() {
                read_stream(response.into_body(), &mut stream)
            } else {
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let mut text = Vec::new();
                let _ = response
                    .into_body()
                    .into_reader()
                    .take(MAX_ERROR_BODY)
                    .read_to_end(&mut text);
                let ended = Instant::now();
                sample.error = Some(format!(
                    "HTTP {}: {}",
                    status.as_u16(),
                    String::from_utf8_lossy(&text).trim()
                ));
                if status.as_u16() == 503 && retry_after.is_some() {
                    sample.outcome = Outcome::Rejected;
                }
                sample.retry_after = retry_after;
                ended
            }
        }
    };
    sample.e2e_ms = millis(ended.duration_since(sent));
    if sample.status.is_some_and(|s| (200..300).contains(&s)) {
        stream.finish(&mut sample);
    }
    sample
}

/// What a response stream has shown so far.
struct StreamState {
    sent: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    itl: Vec<f64>,
    content_chunks: u64,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    done: bool,
    error: Option<String>,
}

impl StreamState {
    fn new(sent: Instant) -> Self {
        Self {
            sent,
            first: None,
            last: None,
            itl: Vec::new(),
            content_chunks: 0,
            prompt_tokens: None,
            completion_tokens: None,
            done: false,
            error: None,
        }
    }

    /// Takes one server-sent event received at `at`.
    fn event(&mut self, event: SseEvent, at: Instant) {
        if !matches!(event.event.as_deref(), None | Some("" | "message")) {
            return; // another event type, such as `sanctum.attestation`
        }
        if event.data == "[DONE]" {
            self.done = true;
            return;
        }
        let chunk = match serde_json::from_str::<Value>(&event.data) {
            Ok(chunk) => chunk,
            Err(e) => {
                self.error = Some(format!("a stream chunk is not JSON ({e})"));
                return;
            }
        };
        if let Some(error) = chunk.get("error") {
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| error.to_string(), str::to_owned);
            self.error = Some(format!("error event: {message}"));
            return;
        }
        let has_content = chunk
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(|choices| {
                choices.iter().any(|choice| {
                    let delta = &choice["delta"];
                    ["content", "reasoning_content"]
                        .iter()
                        .any(|field| delta[field].as_str().is_some_and(|s| !s.is_empty()))
                })
            });
        if has_content {
            match self.last {
                None => self.first = Some(at),
                Some(last) => self.itl.push(millis(at.duration_since(last))),
            }
            self.last = Some(at);
            self.content_chunks += 1;
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.prompt_tokens = usage["prompt_tokens"].as_u64();
            self.completion_tokens = usage["completion_tokens"].as_u64();
        }
    }

    /// Fills in the sample of a successful response.
    fn finish(self, sample: &mut Sample) {
        sample.usage_reported = self.completion_tokens.is_some();
        sample.completion_tokens = self.completion_tokens.unwrap_or(self.content_chunks);
        sample.prompt_tokens = self.prompt_tokens;
        sample.itl_ms = self.itl;
        if let Some(error) = self.error {
            sample.error = Some(error);
            return;
        }
        if !self.done {
            sample.error = Some("the stream ended before `data: [DONE]`".to_owned());
            return;
        }
        sample.outcome = Outcome::Completed;
        if let Some(first) = self.first {
            let ttft = millis(first.duration_since(self.sent));
            sample.ttft_ms = Some(ttft);
            if sample.completion_tokens > 1 {
                sample.tpot_ms =
                    Some((sample.e2e_ms - ttft) / (sample.completion_tokens - 1) as f64);
            }
        }
    }
}

/// Reads a streamed response until `[DONE]`, an error or its end; returns when it ended.
fn read_stream(body: ureq::Body, stream: &mut StreamState) -> Instant {
    let mut reader = body.into_reader();
    let mut parser = SseParser::default();
    let mut events = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let read = reader.read(&mut buf);
        let at = Instant::now();
        let (fed, end) = match read {
            Ok(0) => (parser.finish(&mut events), true),
            Ok(n) => (parser.feed(&buf[..n], &mut events), false),
            Err(e) => {
                stream.error = Some(format!("reading the stream: {e}"));
                return at;
            }
        };
        for event in events.drain(..) {
            stream.event(event, at);
            if stream.done || stream.error.is_some() {
                return at;
            }
        }
        if let Err(e) = fed {
            stream.error = Some(e.to_string());
            return at;
        }
        if end {
            return at;
        }
    }
}

/// One server-sent event: its type (`event:`; None for the default, `message`) and its data lines
/// joined by newlines.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SseEvent {
    event: Option<String>,
    data: String,
}

/// A malformed event stream.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("the event stream has a line or event longer than {MAX_EVENT_BYTES} bytes")]
    TooLong,
    #[error("the event stream is not UTF-8")]
    NotUtf8,
}

/// An incremental parser of `text/event-stream` (LF or CRLF line ends), fed bytes as they come.
#[derive(Debug, Default)]
struct SseParser {
    line: Vec<u8>,
    event: Option<String>,
    data: Option<String>,
}

impl SseParser {
    /// Takes the next bytes of the stream; the events they complete go to `out`.
    fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<SseEvent>) -> Result<(), StreamError> {
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            self.line.extend_from_slice(&bytes[..end]);
            bytes = &bytes[end + 1..];
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let result = self.take_line(&line, out);
            line.clear();
            self.line = line;
            result?;
        }
        self.line.extend_from_slice(bytes);
        if self.line.len() > MAX_EVENT_BYTES {
            return Err(StreamError::TooLong);
        }
        Ok(())
    }

    /// The end of the stream: a last line without its line end, and an event without its blank
    /// line, are taken as if they were complete.
    fn finish(&mut self, out: &mut Vec<SseEvent>) -> Result<(), StreamError> {
        let line = std::mem::take(&mut self.line);
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        if !line.is_empty() {
            self.take_line(line, out)?;
        }
        self.take_line(b"", out)
    }

    fn take_line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) -> Result<(), StreamError> {
        let line = std::str::from_utf8(line).map_err(|_| StreamError::NotUtf8)?;
        if line.is_empty() {
            let event = self.event.take();
            if let Some(data) = self.data.take() {
                out.push(SseEvent { event, data });
            }
            return Ok(());
        }
        if line.starts_with(':') {
            return Ok(()); // a comment (keep-alive)
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "data" => match &mut self.data {
                Some(data) => {
                    if data.len() + value.len() >= MAX_EVENT_BYTES {
                        return Err(StreamError::TooLong);
                    }
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            "event" => self.event = Some(value.to_owned()),
            _ => {} // id, retry and unknown fields
        }
        Ok(())
    }
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Report {
    fn new(
        options: BenchOptions,
        started: SystemTime,
        finished: SystemTime,
        duration: Duration,
        samples: Vec<Sample>,
    ) -> Self {
        let count = |outcome| samples.iter().filter(|s| s.outcome == outcome).count();
        let completed: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.outcome == Outcome::Completed)
            .collect();
        let prompt_tokens = completed.iter().filter_map(|s| s.prompt_tokens).sum();
        let completion_tokens: u64 = completed.iter().map(|s| s.completion_tokens).sum();
        let seconds = duration.as_secs_f64();
        let per_second = |n: f64| if seconds > 0.0 { n / seconds } else { 0.0 };
        Self {
            started_at: attest::statement::rfc3339(started),
            finished_at: attest::statement::rfc3339(finished),
            duration_s: seconds,
            completed: completed.len(),
            failed: count(Outcome::Failed),
            rejected: count(Outcome::Rejected),
            prompt_tokens,
            completion_tokens,
            output_tokens_per_s: per_second(completion_tokens as f64),
            requests_per_s: per_second(completed.len() as f64),
            ttft: Stats::of(completed.iter().filter_map(|s| s.ttft_ms).collect()),
            tpot: Stats::of(completed.iter().filter_map(|s| s.tpot_ms).collect()),
            itl: Stats::of(
                completed
                    .iter()
                    .flat_map(|s| s.itl_ms.iter().copied())
                    .collect(),
            ),
            e2e: Stats::of(completed.iter().map(|s| s.e2e_ms).collect()),
            options,
            samples,
        }
    }

    /// The report as pretty JSON, with a final newline.
    pub fn json(&self) -> Result<String, serde_json::Error> {
        Ok(serde_json::to_string_pretty(self)? + "\n")
    }

    /// A summary like `vllm bench serve`'s, as Markdown tables, and the most frequent errors.
    pub fn markdown(&self) -> String {
        let o = &self.options;
        let arrival = match o.arrival {
            Arrival::Closed => "closed loop".to_owned(),
            Arrival::Poisson { rate, seed } => format!("Poisson, {rate} req/s (seed {seed})"),
        };
        let mut out = format!(
            "Serving benchmark: `{}` at {}\n\n| | |\n| --- | ---: |\n",
            cell(&o.model),
            cell(&o.url)
        );
        let rows = [
            ("Clients (max concurrency)", o.clients.to_string()),
            ("Arrivals", arrival),
            ("Max tokens per request", o.max_tokens.to_string()),
            ("Successful requests", self.completed.to_string()),
            ("Failed requests", self.failed.to_string()),
            ("Rejected requests (503)", self.rejected.to_string()),
            ("Benchmark duration (s)", format!("{:.2}", self.duration_s)),
            ("Total input tokens", self.prompt_tokens.to_string()),
            ("Total generated tokens", self.completion_tokens.to_string()),
            (
                "Request throughput (req/s)",
                format!("{:.2}", self.requests_per_s),
            ),
            (
                "Output token throughput (tok/s)",
                format!("{:.2}", self.output_tokens_per_s),
            ),
        ];
        for (name, value) in rows {
            let _ = writeln!(out, "| {name} | {value} |");
        }
        out.push_str(
            "\n| latency | mean ms | p50 ms | p90 ms | p99 ms |\n\
             | ------- | ------: | -----: | -----: | -----: |\n",
        );
        for (name, stats) in [
            ("TTFT", self.ttft),
            ("TPOT", self.tpot),
            ("ITL", self.itl),
            ("E2E", self.e2e),
        ] {
            let _ = match stats {
                Some(s) => writeln!(
                    out,
                    "| {name} | {:.2} | {:.2} | {:.2} | {:.2} |",
                    s.mean_ms, s.p50_ms, s.p90_ms, s.p99_ms
                ),
                None => writeln!(out, "| {name} | - | - | - | - |"),
            };
        }
        let mut errors: Vec<(&str, usize)> = Vec::new();
        for error in self.samples.iter().filter_map(|s| s.error.as_deref()) {
            match errors.iter_mut().find(|(e, _)| *e == error) {
                Some((_, n)) => *n += 1,
                None => errors.push((error, 1)),
            }
        }
        if !errors.is_empty() {
            errors.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
            out.push_str("\n| requests | error |\n| -------: | ----- |\n");
            for (error, n) in errors.iter().take(5) {
                let _ = writeln!(out, "| {n} | {} |", cell(error));
            }
        }
        out
    }
}

/// Text fit for one Markdown table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    use std::net::{TcpListener, TcpStream};
    use std::sync::Arc;
    use std::thread;

    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    /// Values from `numpy.percentile(a, [50, 90, 99])` (linear interpolation), computed by hand.
    #[test]
    fn percentiles_interpolate_like_numpy() {
        let cases: [(&[f64], [f64; 3]); 4] = [
            (&[1.0, 2.0, 3.0, 4.0], [2.5, 3.7, 3.97]),
            (&[15.0, 20.0, 35.0, 40.0, 50.0], [35.0, 46.0, 49.6]),
            (&[10.0, 1.0, 7.0, 2.0, 9.0, 4.0], [5.5, 9.5, 9.95]),
            (&[3.5], [3.5, 3.5, 3.5]),
        ];
        for (values, [p50, p90, p99]) in cases {
            let stats = Stats::of(values.to_vec()).unwrap();
            assert!(close(stats.p50_ms, p50), "{values:?}: p50 {}", stats.p50_ms);
            assert!(close(stats.p90_ms, p90), "{values:?}: p90 {}", stats.p90_ms);
            assert!(close(stats.p99_ms, p99), "{values:?}: p99 {}", stats.p99_ms);
            let mean = values.iter().sum::<f64>() / values.len() as f64;
            assert!(close(stats.mean_ms, mean));
            assert_eq!(stats.count, values.len());
        }
        assert!(Stats::of(Vec::new()).is_none());
        assert!(close(percentile(&[0.0, 10.0], 0.0).unwrap(), 0.0));
        assert!(close(percentile(&[0.0, 10.0], 100.0).unwrap(), 10.0));
    }

    /// A stream as sanctum serve sends it: role chunk, content, finish, usage, the attestation event.
    const RECORDED: &str = concat!(
        ": keep-alive\n\n",
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo, \u{e9}t\u{e9}\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"!\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":4,\"total_tokens\":13}}\n\n",
        "event: sanctum.attestation\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"not a token\"}}],\"bundle\":{}}\n\n",
        "data: [DONE]\n\n",
    );

    fn parse_in_pieces(stream: &[u8], piece: usize) -> Vec<SseEvent> {
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        for chunk in stream.chunks(piece) {
            parser.feed(chunk, &mut events).unwrap();
        }
        parser.finish(&mut events).unwrap();
        events
    }

    #[test]
    fn sse_parser_reads_a_recorded_stream_however_it_is_split() {
        let crlf = RECORDED.replace('\n', "\r\n");
        let expected = parse_in_pieces(RECORDED.as_bytes(), RECORDED.len());
        assert_eq!(expected.len(), 8, "{expected:?}");
        assert_eq!(expected[6].event.as_deref(), Some("sanctum.attestation"));
        assert_eq!(expected[7].data, "[DONE]");
        assert!(expected.iter().filter(|e| e.event.is_none()).count() == 7);
        // Splits inside CRLF pairs, inside the multi-byte `é` and inside `data:`.
        for stream in [RECORDED.as_bytes(), crlf.as_bytes()] {
            for piece in [1, 2, 3, 7, 64, 1000] {
                assert_eq!(
                    parse_in_pieces(stream, piece),
                    expected,
                    "pieces of {piece}"
                );
            }
        }

        let start = Instant::now();
        let mut state = StreamState::new(start);
        for (i, event) in expected.into_iter().enumerate() {
            state.event(event, start + Duration::from_millis(10 * (i as u64 + 1)));
        }
        assert!(state.done && state.error.is_none());
        assert_eq!(
            state.content_chunks, 3,
            "the role chunk and the attestation are no tokens"
        );
        assert_eq!(state.itl, vec![10.0, 10.0]);
        let mut sample = failed_sample();
        sample.e2e_ms = 80.0;
        state.finish(&mut sample);
        assert_eq!(sample.outcome, Outcome::Completed);
        assert_eq!(
            sample.ttft_ms,
            Some(20.0),
            "the first content chunk, 2nd event"
        );
        assert_eq!(
            (sample.completion_tokens, sample.prompt_tokens),
            (4, Some(9))
        );
        assert!(sample.usage_reported);
        assert_eq!(sample.tpot_ms, Some((80.0 - 20.0) / 3.0));
    }

    #[test]
    fn sse_streams_without_done_usage_or_valid_chunks() {
        let start = Instant::now();
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}";
        let mut state = StreamState::new(start);
        for event in parse_in_pieces(stream.as_bytes(), 5) {
            state.event(event, start);
        }
        let mut sample = failed_sample();
        state.finish(&mut sample);
        assert_eq!(sample.outcome, Outcome::Failed, "no [DONE]");
        assert_eq!(
            sample.completion_tokens, 2,
            "content chunks counted without usage"
        );
        assert!(!sample.usage_reported);

        let mut state = StreamState::new(start);
        state.event(
            SseEvent {
                event: None,
                data: "{\"error\":{\"message\":\"out of memory\"}}".into(),
            },
            start,
        );
        assert_eq!(state.error.as_deref(), Some("error event: out of memory"));

        let mut parser = SseParser::default();
        let long = vec![b'x'; MAX_EVENT_BYTES + 1];
        assert!(matches!(
            parser.feed(&long, &mut Vec::new()),
            Err(StreamError::TooLong)
        ));
    }

    fn failed_sample() -> Sample {
        Sample {
            index: 0,
            client: 0,
            prompt: 0,
            outcome: Outcome::Failed,
            status: Some(200),
            error: None,
            retry_after: None,
            scheduled_ms: 0.0,
            sent_ms: 0.0,
            ttft_ms: None,
            e2e_ms: 0.0,
            tpot_ms: None,
            itl_ms: Vec::new(),
            prompt_tokens: None,
            completion_tokens: 0,
            usage_reported: false,
        }
    }

    #[test]
    fn options_are_validated() {
        let good = BenchOptions::new("http://127.0.0.1:1", "m");
        assert!(good.validate().is_ok());
        let bad = |edit: fn(&mut BenchOptions)| {
            let mut o = good.clone();
            edit(&mut o);
            o.validate().unwrap_err()
        };
        assert!(matches!(bad(|o| o.clients = 0), BenchError::NoClients));
        assert!(matches!(bad(|o| o.requests = 0), BenchError::NoRequests));
        assert!(matches!(bad(|o| o.max_tokens = 0), BenchError::NoMaxTokens));
        assert!(matches!(
            bad(|o| o.temperature = f64::NAN),
            BenchError::Temperature(_)
        ));
        assert!(matches!(bad(|o| o.prompts.clear()), BenchError::NoPrompts));
        assert!(matches!(
            bad(|o| o.timeout = Duration::ZERO),
            BenchError::Timeout
        ));
        assert!(matches!(
            bad(|o| o.url = "127.0.0.1:8080".into()),
            BenchError::Url(_)
        ));
        for rate in [0.0, -1.0, f64::INFINITY, f64::NAN] {
            let mut o = good.clone();
            o.arrival = Arrival::Poisson { rate, seed: 0 };
            assert!(matches!(o.validate(), Err(BenchError::Rate(_))), "{rate}");
        }
        let mut o = good.clone();
        o.api_key = Some(ApiKey::new("sk-secret"));
        assert!(!format!("{o:?}").contains("sk-secret"));
        assert!(!serde_json::to_string(&o).unwrap().contains("sk-secret"));
    }

    #[test]
    fn poisson_arrivals_are_seeded_and_at_the_rate() {
        let poisson = Arrival::Poisson { rate: 4.0, seed: 7 };
        let a = arrivals(poisson, 10_000);
        assert_eq!(
            a,
            arrivals(poisson, 10_000),
            "the same seed, the same times"
        );
        assert_ne!(a, arrivals(Arrival::Poisson { rate: 4.0, seed: 8 }, 10_000));
        assert_eq!(a[0], Duration::ZERO);
        assert!(a.windows(2).all(|w| w[0] <= w[1]));
        let mean_gap = a[a.len() - 1].as_secs_f64() / (a.len() - 1) as f64;
        assert!((mean_gap - 0.25).abs() < 0.0125, "mean gap {mean_gap}");
        assert!(arrivals(Arrival::Closed, 3).iter().all(|d| d.is_zero()));
    }

    /// A one-shot HTTP server on 127.0.0.1:0: answers `connections` requests with `respond`, each on
    /// its own thread, then stops (or after 20 s); returns the base URL and the request bodies.
    fn serve(
        connections: usize,
        respond: impl Fn(&mut TcpStream) + Send + Sync + 'static,
    ) -> (String, thread::JoinHandle<Vec<Value>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        listener.set_nonblocking(true).unwrap();
        let respond = Arc::new(respond);
        let server = thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut workers = Vec::new();
            while workers.len() < connections && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let respond = Arc::clone(&respond);
                        workers.push(thread::spawn(move || answer(stream, &*respond)));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        (url, server)
    }

    /// Reads one request (headers, then a Content-Length body) and answers it.
    fn answer(mut stream: TcpStream, respond: &dyn Fn(&mut TcpStream)) -> Value {
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        respond(&mut stream);
        if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).unwrap()
        }
    }

    const FIRST_TOKEN_DELAY: Duration = Duration::from_millis(60);

    fn stream_reply(stream: &mut TcpStream) {
        let mut write = |text: &str| {
            stream.write_all(text.as_bytes()).unwrap();
            stream.flush().unwrap();
        };
        write("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n");
        let mut parts = RECORDED.split_inclusive("\n\n");
        write(parts.next().unwrap()); // keep-alive comment
        write(parts.next().unwrap()); // role chunk
        thread::sleep(FIRST_TOKEN_DELAY);
        for part in parts {
            write(part);
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn loopback_run_measures_a_streaming_server() {
        let (url, server) = serve(8, stream_reply);
        let mut options = BenchOptions::new(url, "smollm2");
        options.clients = 2;
        options.requests = 4;
        options.seed = Some(3);
        options.timeout = Duration::from_secs(10);
        let seen = AtomicUsize::new(0);
        // 4 of the 8 connections are used; the server stops at its deadline otherwise, so run
        // twice (closed loop, then Poisson) to use all 8.
        let report = run(&options, &|_| {
            seen.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        options.arrival = Arrival::Poisson {
            rate: 50.0,
            seed: 1,
        };
        let poisson = run(&options, &|_| {}).unwrap();
        let bodies = server.join().unwrap();

        assert_eq!(seen.load(Ordering::Relaxed), 4);
        for report in [&report, &poisson] {
            assert_eq!(
                (report.completed, report.failed, report.rejected),
                (4, 0, 0),
                "{:?}",
                report.samples
            );
            assert_eq!(report.completion_tokens, 16, "usage: 4 tokens each");
            assert_eq!(report.prompt_tokens, 36);
            let indices: Vec<usize> = report.samples.iter().map(|s| s.index).collect();
            assert_eq!(indices, [0, 1, 2, 3]);
            for s in &report.samples {
                assert_eq!(s.prompt, s.index % DEFAULT_PROMPTS.len());
                assert_eq!(s.itl_ms.len(), 2);
                let ttft = s.ttft_ms.unwrap();
                assert!(ttft >= millis(FIRST_TOKEN_DELAY), "ttft {ttft}");
                assert!(s.e2e_ms >= ttft && s.tpot_ms.is_some());
            }
            let ttft = report.ttft.unwrap();
            assert!(ttft.count == 4 && ttft.p50_ms >= millis(FIRST_TOKEN_DELAY));
            assert_eq!(report.itl.unwrap().count, 8);
            assert!(report.output_tokens_per_s > 0.0);
            let rps = report.requests_per_s;
            assert!(close(rps, 4.0 / report.duration_s));
        }
        let scheduled: Vec<f64> = poisson.samples.iter().map(|s| s.scheduled_ms).collect();
        assert!(scheduled[0] == 0.0 && scheduled[3] > 0.0, "{scheduled:?}");
        assert!(
            poisson
                .samples
                .iter()
                .all(|s| s.sent_ms + 1.0 >= s.scheduled_ms)
        );

        assert_eq!(bodies.len(), 8);
        let mut prompts: Vec<&str> = Vec::new();
        for body in &bodies {
            assert_eq!(body["model"], "smollm2");
            assert_eq!(body["stream"], true);
            assert_eq!(body["stream_options"]["include_usage"], true);
            assert_eq!(
                (body["max_tokens"].as_u64(), body["seed"].as_u64()),
                (Some(128), Some(3))
            );
            assert_eq!(body["temperature"], 0.0);
            assert_eq!(body["messages"][0]["role"], "user");
            prompts.push(body["messages"][0]["content"].as_str().unwrap());
        }
        prompts.sort_unstable();
        let mut expected: Vec<&str> = DEFAULT_PROMPTS[..4]
            .iter()
            .chain(&DEFAULT_PROMPTS[..4])
            .copied()
            .collect();
        expected.sort_unstable();
        assert_eq!(prompts, expected);

        let markdown = report.markdown();
        assert!(
            markdown.contains("| Successful requests | 4 |"),
            "{markdown}"
        );
        assert!(markdown.contains("| TTFT |"));
        let json: Value = serde_json::from_str(&report.json().unwrap()).unwrap();
        assert_eq!(json["completed"], 4);
        assert_eq!(json["samples"].as_array().unwrap().len(), 4);
        assert_eq!(json["options"]["arrival"]["mode"], "closed");
    }

    #[test]
    fn loopback_run_counts_rejections_failures_and_timeouts() {
        let (url, server) = serve(2, |stream| {
            let body = "{\"error\":{\"message\":\"server busy\"}}";
            let reply = format!(
                "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(reply.as_bytes()).unwrap();
        });
        let mut options = BenchOptions::new(url, "m");
        options.requests = 2;
        options.timeout = Duration::from_secs(10);
        let report = run(&options, &|_| {}).unwrap();
        server.join().unwrap();
        assert_eq!(
            (report.completed, report.failed, report.rejected),
            (0, 0, 2)
        );
        let s = &report.samples[0];
        assert_eq!((s.status, s.retry_after.as_deref()), (Some(503), Some("1")));
        assert!(s.error.as_deref().unwrap().contains("server busy"));
        assert!(report.ttft.is_none() && report.output_tokens_per_s == 0.0);
        assert!(report.markdown().contains("| 2 | HTTP 503:"));

        // 503 without Retry-After is a failure, not load shedding.
        let (url, server) = serve(1, |stream| {
            let reply = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
            stream.write_all(reply.as_bytes()).unwrap();
        });
        options.url = url;
        options.requests = 1;
        let report = run(&options, &|_| {}).unwrap();
        server.join().unwrap();
        assert_eq!(
            (report.completed, report.failed, report.rejected),
            (0, 1, 0)
        );

        // A server that stops talking: the request ends at its timeout.
        let (url, server) = serve(1, |stream| {
            let head =
                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n";
            stream.write_all(head.as_bytes()).unwrap();
            thread::sleep(Duration::from_millis(1500));
        });
        options.url = url;
        options.timeout = Duration::from_millis(300);
        let started = Instant::now();
        let report = run(&options, &|_| {}).unwrap();
        assert!(started.elapsed() < Duration::from_millis(1200));
        server.join().unwrap();
        assert_eq!(report.failed, 1);
        let error = report.samples[0].error.as_deref().unwrap();
        assert!(error.contains("reading the stream"), "{error}");

        // Nobody listening.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        options.url = format!("http://{port}");
        let report = run(&options, &|_| {}).unwrap();
        assert_eq!((report.failed, report.samples[0].status), (1, None));
    }

    #[test]
    fn models_are_listed_in_order() {
        let (url, server) = serve(1, |stream| {
            let body = "{\"object\":\"list\",\"data\":[{\"id\":\"b\"},{\"id\":\"a\"}]}";
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(reply.as_bytes()).unwrap();
        });
        let models = list_models(&url, None, Duration::from_secs(5)).unwrap();
        assert_eq!(models, ["b", "a"]);
        assert_eq!(server.join().unwrap(), vec![Value::Null]);
    }
}
