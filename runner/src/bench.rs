//! Benchmarks with llama-bench's tests, so that sanctum's numbers paste beside llama.cpp's.
//!
//! `ppN` feeds N random tokens as one prompt (in micro-batches of 512, llama-bench's default) into an
//! empty cache and times it up to the logits; `tgN` generates N tokens one at a time from an empty
//! cache, each fed token drawn at random (no sampling cost, as llama-bench). Each test runs once
//! unrecorded to warm caches and repacked kernels, then `repetitions` times. On top of llama-bench,
//! a result keeps every sample, the time to first token (prompt plus picking the first token), the
//! load-and-verify time and the peak resident memory.

use std::time::{Duration, Instant};

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::chat::{ChatModel, GenerateError, Session};

/// One llama-bench test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Test {
    /// Prompt processing of this many tokens.
    Prompt(usize),
    /// Generation of this many tokens.
    Generate(usize),
}

impl Test {
    /// llama-bench's name for it: `pp512`, `tg128`.
    pub fn name(self) -> String {
        match self {
            Self::Prompt(n) => format!("pp{n}"),
            Self::Generate(n) => format!("tg{n}"),
        }
    }

    /// Tokens it processes (what tokens per second counts).
    pub fn tokens(self) -> usize {
        match self {
            Self::Prompt(n) | Self::Generate(n) => n,
        }
    }
}

/// What one test measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Samples {
    /// The test.
    pub test: Test,
    /// Each repetition's time.
    pub times: Vec<Duration>,
    /// Each prompt repetition's time to first token (prompt, then picking the first token); empty
    /// for generation tests.
    pub first_token: Vec<Duration>,
}

/// Progress of a benchmark, for a display.
#[derive(Debug, Clone, Copy)]
pub enum Event {
    /// A test's unrecorded warm-up run is starting.
    WarmUp(Test),
    /// One repetition finished, `done` of `of`, at this speed.
    Repetition {
        /// The test.
        test: Test,
        /// Repetitions done.
        done: usize,
        /// Repetitions in all.
        of: usize,
        /// Its tokens per second.
        tokens_per_second: f64,
    },
}

/// Runs `tests`, each warmed up once and then repeated `repetitions` times, on an emptied cache each
/// time. Random token ids come from a generator seeded with `seed`, so runs feed identical inputs.
pub fn run(
    model: &ChatModel,
    tests: &[Test],
    repetitions: usize,
    seed: u64,
    on_event: &mut dyn FnMut(Event),
) -> Result<Vec<Samples>, GenerateError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let vocab = model.vocab().max(1) as u32;
    let mut random_token = move || rng.next_u32() % vocab;
    let mut results = Vec::with_capacity(tests.len());
    let mut session = model.session();
    for &test in tests {
        on_event(Event::WarmUp(test));
        let warm_up = match test {
            Test::Prompt(_) => test,
            Test::Generate(_) => Test::Generate(1),
        };
        once(model, &mut session, warm_up, &mut random_token)?;
        let mut samples = Samples {
            test,
            times: Vec::with_capacity(repetitions),
            first_token: Vec::new(),
        };
        for done in 1..=repetitions {
            let (time, first_token) = once(model, &mut session, test, &mut random_token)?;
            samples.times.push(time);
            samples.first_token.extend(first_token);
            on_event(Event::Repetition {
                test,
                done,
                of: repetitions,
                tokens_per_second: tokens_per_second(test.tokens(), time),
            });
        }
        results.push(samples);
    }
    Ok(results)
}

/// One run of a test from an empty cache: its time, and for prompts the time to first token.
fn once(
    model: &ChatModel,
    session: &mut Session,
    test: Test,
    random_token: &mut dyn FnMut() -> u32,
) -> Result<(Duration, Option<Duration>), GenerateError> {
    session.reset();
    match test {
        Test::Prompt(n) => {
            let prompt: Vec<u32> = (0..n).map(|_| random_token()).collect();
            let started = Instant::now();
            let logits = model.eval(session, &prompt)?;
            let time = started.elapsed();
            std::hint::black_box(argmax(&logits));
            Ok((time, Some(started.elapsed())))
        }
        Test::Generate(n) => {
            let mut token = random_token();
            let started = Instant::now();
            for _ in 0..n {
                std::hint::black_box(model.eval(session, &[token])?);
                token = random_token();
            }
            Ok((started.elapsed(), None))
        }
    }
}

fn argmax(values: &[f32]) -> Option<usize> {
    values
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
}

/// `tokens` over `time`, 0 for a zero time.
pub fn tokens_per_second(tokens: usize, time: Duration) -> f64 {
    let s = time.as_secs_f64();
    if s > 0.0 { tokens as f64 / s } else { 0.0 }
}

/// Mean and sample standard deviation (n − 1, as llama-bench), 0 deviation for fewer than two.
pub fn mean_stddev(values: &[f64]) -> (f64, f64) {
    if values.is_empty() {
        return (0.0, 0.0);
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// One test's result as written out, with llama-bench's JSON field names where it has them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestResult {
    /// Model name from the lock.
    pub model: String,
    /// Model digest (sha256) from the lock.
    pub model_digest: String,
    /// The format asked for (`q8_0`); `mix` lists what the matrices got.
    pub quant: String,
    /// Formats the weight matrices ran in, with counts (`"168 × q4_0, 1 × q8_0"`).
    pub mix: String,
    /// Bytes of the weights in memory.
    pub model_size: u64,
    /// Parameters.
    pub model_n_params: u64,
    /// Where it ran (`cpu`, `cuda:0`).
    pub backend: String,
    /// CPU threads.
    pub n_threads: usize,
    /// llama-bench's test name.
    pub test: String,
    /// Prompt tokens (0 for generation tests).
    pub n_prompt: usize,
    /// Generated tokens (0 for prompt tests).
    pub n_gen: usize,
    /// Mean time per repetition, ns.
    pub avg_ns: u64,
    /// Its standard deviation, ns.
    pub stddev_ns: u64,
    /// Mean tokens per second over the repetitions.
    pub avg_ts: f64,
    /// Its standard deviation.
    pub stddev_ts: f64,
    /// Every repetition's time, ns.
    pub samples_ns: Vec<u64>,
    /// Every repetition's tokens per second.
    pub samples_ts: Vec<f64>,
    /// Mean time to first token in ms (prompt tests only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<f64>,
    /// Reading and verifying the model plus quantizing it, seconds (once per format).
    pub load_verify_s: f64,
    /// Peak resident memory while this format was loaded and tested, bytes (Linux only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
    /// What the key and value caches held (`f16`, `f32`), under llama-bench's names; absent on
    /// candle's path, which keeps the model's dtype.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub type_k: Option<String>,
    /// As `type_k`, for the values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub type_v: Option<String>,
}

/// What is the same for every test of one loaded model.
#[derive(Debug, Clone)]
pub struct RunInfo {
    /// `--quant` as asked.
    pub quant: String,
    /// The formats matrices got.
    pub mix: String,
    /// Device name.
    pub backend: String,
    /// CPU threads.
    pub threads: usize,
    /// Load and verify time.
    pub load_verify: Duration,
    /// Peak RSS.
    pub peak_rss_bytes: Option<u64>,
}

impl TestResult {
    /// The result of one test's samples on `model`.
    pub fn new(model: &ChatModel, info: &RunInfo, samples: &Samples) -> Self {
        let ns: Vec<u64> = samples.times.iter().map(|t| t.as_nanos() as u64).collect();
        let ts: Vec<f64> = samples
            .times
            .iter()
            .map(|t| tokens_per_second(samples.test.tokens(), *t))
            .collect();
        let (avg_ns, stddev_ns) = mean_stddev(&ns.iter().map(|n| *n as f64).collect::<Vec<_>>());
        let (avg_ts, stddev_ts) = mean_stddev(&ts);
        let ttft: Vec<f64> = samples
            .first_token
            .iter()
            .map(|t| t.as_secs_f64() * 1e3)
            .collect();
        let (n_prompt, n_gen) = match samples.test {
            Test::Prompt(n) => (n, 0),
            Test::Generate(n) => (0, n),
        };
        Self {
            model: model.name().to_owned(),
            model_digest: model.digest().to_string(),
            quant: info.quant.clone(),
            mix: info.mix.clone(),
            model_size: model.weight_bytes(),
            model_n_params: model.parameters(),
            backend: info.backend.clone(),
            n_threads: info.threads,
            test: samples.test.name(),
            n_prompt,
            n_gen,
            avg_ns: avg_ns as u64,
            stddev_ns: stddev_ns as u64,
            avg_ts,
            stddev_ts,
            samples_ns: ns,
            samples_ts: ts,
            ttft_ms: (!ttft.is_empty()).then(|| mean_stddev(&ttft).0),
            load_verify_s: info.load_verify.as_secs_f64(),
            peak_rss_bytes: info.peak_rss_bytes,
            type_k: model.kv_precision().map(|p| p.name().to_owned()),
            type_v: model.kv_precision().map(|p| p.name().to_owned()),
        }
    }

    /// What identifies the same measurement in two reports.
    fn key(&self) -> (&str, &str, &str, &str, usize) {
        (
            &self.model,
            &self.quant,
            &self.test,
            &self.backend,
            self.n_threads,
        )
    }
}

/// The count of each format among `choices`, in first-seen order: `"168 × q4_0, 1 × q8_0"`.
pub fn mix(choices: &[crate::quant::Choice]) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for choice in choices {
        match counts.iter_mut().find(|(q, _)| *q == choice.used.name()) {
            Some((_, n)) => *n += 1,
            None => counts.push((choice.used.name(), 1)),
        }
    }
    let parts: Vec<String> = counts.iter().map(|(q, n)| format!("{n} × {q}")).collect();
    parts.join(", ")
}

/// One process spinning on integer work until dropped, beside a benchmark (`--busy-neighbour`):
/// how speed holds up when another program wants a core too, as on a developer's laptop during a
/// build. A process, as such a program is: a thread of the benchmark's own would count as its own
/// load, which the kernels' pool does not make room for. It checks every millisecond or so that
/// the benchmark still lives, and exits when not, so even a kill -9 does not leave it spinning.
#[derive(Debug)]
pub struct BusyNeighbour {
    #[cfg(unix)]
    pid: libc::pid_t,
}

impl BusyNeighbour {
    /// Starts spinning (unix only: elsewhere an `Unsupported` error).
    #[cfg(not(unix))]
    pub fn start() -> std::io::Result<Self> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "a busy neighbour is a forked process, on unix only",
        ))
    }

    /// Starts spinning (unix only: elsewhere an `Unsupported` error).
    #[cfg(unix)]
    pub fn start() -> std::io::Result<Self> {
        #[allow(unsafe_code)]
        // SAFETY: the child runs only arithmetic and the async-signal-safe `getppid` and `_exit`:
        // nothing that could need a lock another thread of the parent held at the fork.
        let pid = unsafe {
            let parent = libc::getpid();
            match libc::fork() {
                0 => {
                    let mut x = 1u64;
                    while libc::getppid() == parent {
                        for _ in 0..1 << 20 {
                            x = std::hint::black_box(
                                x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1),
                            );
                        }
                    }
                    libc::_exit(0)
                }
                -1 => return Err(std::io::Error::last_os_error()),
                pid => pid,
            }
        };
        Ok(Self { pid })
    }
}

#[cfg(unix)]
impl Drop for BusyNeighbour {
    fn drop(&mut self) {
        #[allow(unsafe_code)]
        // SAFETY: `pid` is this process's own child, not yet reaped, so it names no other process.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

/// Peak resident memory of this process so far, bytes (`VmHWM`; None off Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    crate::hardware::proc_kib("/proc/self/status", "VmHWM").map(|kib| kib * 1024)
}

/// Starts a new peak-memory window (Linux: `5` into `/proc/self/clear_refs` resets `VmHWM`), so
/// each format's peak is its own. Returns false where that is not possible.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// A whole benchmark run as `sanctum bench -o json` writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// The sanctum build.
    pub sanctum: BuildInfo,
    /// The machine, detected while the benchmark ran.
    pub hardware: crate::hardware::HardwareProfile,
    /// The profile the run was filed under, when `--profile` was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<ProfileUse>,
    /// RFC 3339 UTC start time.
    pub started_at: String,
    /// The machine's 1-, 5- and 15-minute load averages at the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_average: Option<[f64; 3]>,
    /// A busy-looping neighbour process ran during the tests ([`BusyNeighbour`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub busy_neighbour: bool,
    /// Every test's result.
    pub results: Vec<TestResult>,
}

/// The sanctum build that ran a benchmark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildInfo {
    /// Crate version.
    pub version: String,
    /// Git commit, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_commit: Option<String>,
    /// Cargo features.
    pub features: Vec<String>,
}

/// The hardware profile a run was filed under.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileUse {
    /// Its name.
    pub name: String,
    /// The file it was read from.
    pub path: String,
    /// sha256 of the file.
    pub sha256: String,
    /// Where the machine differed from it (only with `--force`).
    pub mismatches: Vec<String>,
}

/// Reads the results of a benchmark file: a `-o json` report, or `-o jsonl` lines.
pub fn parse_results(bytes: &[u8]) -> Result<Vec<TestResult>, serde_json::Error> {
    match serde_json::from_slice::<BenchReport>(bytes) {
        Ok(report) => Ok(report.results),
        Err(report_error) => {
            let lines = serde_json::Deserializer::from_slice(bytes).into_iter::<TestResult>();
            let results: Vec<TestResult> =
                lines.collect::<Result<_, _>>().map_err(|_| report_error)?;
            if results.is_empty() {
                return Err(serde::de::Error::custom("no benchmark results in it"));
            }
            Ok(results)
        }
    }
}

/// One test present in both reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Compared {
    /// `model quant test threads backend`.
    pub label: String,
    /// The base's tokens per second.
    pub base: f64,
    /// The new report's.
    pub new: f64,
    /// new / base.
    pub ratio: f64,
    /// The ratio is below 1 − threshold.
    pub regression: bool,
}

/// Two reports side by side.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// Tests in both.
    pub tests: Vec<Compared>,
    /// Labels of tests in only one of the two.
    pub unmatched: Vec<String>,
}

impl Comparison {
    /// True when any test regressed.
    pub fn regressed(&self) -> bool {
        self.tests.iter().any(|t| t.regression)
    }
}

/// Compares `new` against `base` test by test (same model, format, test, backend and threads);
/// a test regresses when its speed falls by more than `threshold` (0.05 = 5 %).
pub fn compare(base: &[TestResult], new: &[TestResult], threshold: f64) -> Comparison {
    let label = |r: &TestResult| {
        format!(
            "{} {} {} t{} {}",
            r.model, r.quant, r.test, r.n_threads, r.backend
        )
    };
    let mut tests = Vec::new();
    let mut unmatched = Vec::new();
    for b in base {
        match new.iter().find(|n| n.key() == b.key()) {
            Some(n) => {
                let ratio = if b.avg_ts > 0.0 {
                    n.avg_ts / b.avg_ts
                } else {
                    f64::INFINITY
                };
                tests.push(Compared {
                    label: label(b),
                    base: b.avg_ts,
                    new: n.avg_ts,
                    ratio,
                    regression: ratio < 1.0 - threshold,
                });
            }
            None => unmatched.push(format!("{} (only in the base)", label(b))),
        }
    }
    for n in new {
        if !base.iter().any(|b| b.key() == n.key()) {
            unmatched.push(format!("{} (only in the new report)", label(n)));
        }
    }
    Comparison { tests, unmatched }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The state letter and parent of process `pid` (`/proc/<pid>/stat`), None once it is gone.
    #[cfg(target_os = "linux")]
    fn state_and_parent(pid: libc::pid_t) -> Option<(char, i64)> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
        let state = fields.next()?.chars().next()?;
        Some((state, fields.next()?.parse().ok()?))
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_busy_neighbour_is_a_child_that_spins_until_dropped() {
        let neighbour = BusyNeighbour::start().unwrap();
        let pid = neighbour.pid;
        let ours = i64::from(std::process::id());
        // Running (or about to run: the fork may not have been scheduled yet).
        let deadline = Instant::now() + Duration::from_secs(5);
        while state_and_parent(pid) != Some(('R', ours)) {
            assert!(Instant::now() < deadline, "{:?}", state_and_parent(pid));
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(neighbour);
        assert_eq!(state_and_parent(pid), None, "killed and reaped");
    }

    fn result(quant: &str, test: &str, ts: f64) -> TestResult {
        TestResult {
            model: "m".into(),
            model_digest: "d".into(),
            quant: quant.into(),
            mix: String::new(),
            model_size: 1,
            model_n_params: 1,
            backend: "cpu".into(),
            n_threads: 2,
            test: test.into(),
            n_prompt: 512,
            n_gen: 0,
            avg_ns: 1,
            stddev_ns: 0,
            avg_ts: ts,
            stddev_ts: 0.0,
            samples_ns: vec![1],
            samples_ts: vec![ts],
            ttft_ms: None,
            load_verify_s: 1.0,
            peak_rss_bytes: None,
            type_k: None,
            type_v: None,
        }
    }

    #[test]
    fn test_names_follow_llama_bench() {
        assert_eq!(Test::Prompt(512).name(), "pp512");
        assert_eq!(Test::Generate(128).name(), "tg128");
    }

    #[test]
    fn stddev_is_the_sample_deviation() {
        let (m, s) = mean_stddev(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!(m, 5.0);
        assert!((s - 2.138).abs() < 1e-3, "{s}");
        assert_eq!(mean_stddev(&[3.0]), (3.0, 0.0));
        assert_eq!(mean_stddev(&[]), (0.0, 0.0));
    }

    #[test]
    fn comparison_flags_only_drops_beyond_the_threshold() {
        let base = [
            result("q8_0", "pp512", 500.0),
            result("q8_0", "tg128", 100.0),
        ];
        let new = [
            result("q8_0", "pp512", 480.0), // −4 %: within 5 %
            result("q8_0", "tg128", 90.0),  // −10 %
            result("q4_0", "tg128", 150.0),
        ];
        let c = compare(&base, &new, 0.05);
        assert_eq!(c.tests.len(), 2);
        assert!(!c.tests[0].regression && (c.tests[0].ratio - 0.96).abs() < 1e-9);
        assert!(c.tests[1].regression);
        assert!(c.regressed());
        assert_eq!(
            c.unmatched,
            ["m q4_0 tg128 t2 cpu (only in the new report)"]
        );
        assert!(!compare(&base, &base, 0.05).regressed());
    }

    #[test]
    fn peak_rss_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().is_some_and(|b| b > 0));
        }
    }
}
