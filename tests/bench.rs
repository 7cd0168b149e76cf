//! `sanctum bench`, `bench compare` and `hw detect` on the real SmolLM2 (skipped without it): the
//! results' shape, signed results and attacks on them, hardware-profile refusals.
//!
//! Each test runs the model with one thread and holds the lock of the inference tests (see there).

use std::fs;
use std::path::Path;

use assert_cmd::Command;
use predicates::str::contains;
use tempfile::TempDir;

use crate::inference::one_at_a_time;
use crate::support::{self, sanctum};

const SMOL: &str = "smollm2-135m-instruct";

/// `sanctum` on the real store, with a signing key and an empty policy of `dir`.
fn real(dir: &Path) -> Option<Command> {
    real_process(dir).map(Command::from)
}

/// [`real`] as a plain process.
fn real_process(dir: &Path) -> Option<std::process::Command> {
    let store = support::real_store()?;
    let mut cmd = support::process();
    cmd.arg("--store")
        .arg(store)
        .arg("--lock")
        .arg(support::repo_lock())
        .arg("--policy")
        .arg(dir.join("policy.toml"))
        .env("SANCTUM_SIGNING_KEY", dir.join("ci.key"))
        .env("SANCTUM_KEY_PASSWORD", "bench test");
    Some(cmd)
}

fn setup() -> TempDir {
    let dir = TempDir::new().unwrap();
    fs::write(dir.path().join("policy.toml"), "version = 1\n").unwrap();
    sanctum()
        .args(["keys", "generate", "--out"])
        .arg(dir.path().join("ci"))
        .env("SANCTUM_KEY_PASSWORD", "bench test")
        .assert()
        .success();
    dir
}

/// A small run: pp16 and tg4, two repetitions, one thread.
const SMALL: [&str; 8] = ["-p", "16", "-n", "4", "-r", "2", "--threads", "1"];

#[test]
fn json_results_have_every_sample_and_the_extras() {
    let dir = setup();
    let Some(mut cmd) = real(dir.path()) else {
        return;
    };
    let _guard = one_at_a_time();
    let out = dir.path().join("bench.json");
    cmd.args([
        "bench",
        SMOL,
        "--quant",
        "q8_0,q4_0",
        "-o",
        "json",
        "--busy-neighbour",
    ])
    .arg("--out")
    .arg(&out)
    .args(SMALL)
    .assert()
    .success()
    .stderr(contains("q4_0+int16 tg4 2/2"))
    .stderr(contains(
        "a busy-looping neighbour process runs beside the tests",
    ));
    let report: serde_json::Value = serde_json::from_slice(&fs::read(&out).unwrap()).unwrap();
    let results = report["results"].as_array().unwrap();
    let tests: Vec<(&str, &str)> = results
        .iter()
        .map(|r| (r["quant"].as_str().unwrap(), r["test"].as_str().unwrap()))
        .collect();
    assert_eq!(
        tests,
        [
            ("q8_0+int16", "pp16"),
            ("q8_0+int16", "tg4"),
            ("q4_0+int16", "pp16"),
            ("q4_0+int16", "tg4")
        ]
    );
    for r in results {
        assert_eq!(r["samples_ts"].as_array().unwrap().len(), 2, "{r}");
        assert!(r["avg_ts"].as_f64().unwrap() > 0.0);
        assert!(r["load_verify_s"].as_f64().unwrap() > 0.0);
        assert_eq!(r["n_threads"], 1);
        assert_eq!(r["model_n_params"], 134_515_008);
        if cfg!(target_os = "linux") {
            assert!(r["peak_rss_bytes"].as_u64().unwrap() > 100 << 20);
        }
        assert_eq!(r["ttft_ms"].is_number(), r["test"] == "pp16", "{r}");
    }
    // q4_0 weights take less memory than q8_0 ones (the output head stays q8_0).
    assert!(results[2]["model_size"].as_u64() < results[0]["model_size"].as_u64());
    assert!(report["hardware"]["cpu"]["cores"].as_u64().unwrap() >= 1);
    assert_eq!(report["busy_neighbour"], true);
    if cfg!(target_os = "linux") {
        assert_eq!(report["load_average"].as_array().unwrap().len(), 3);
    }
    assert!(
        report["hardware"]["memory"]["read_bandwidth_gbs"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}

/// A benchmark killed with -9 takes its busy neighbour with it: the neighbour sees its parent gone
/// and exits, so nothing is left spinning on the developer's machine.
#[cfg(target_os = "linux")]
#[test]
fn a_benchmark_killed_with_9_leaves_no_busy_neighbour_spinning() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let dir = setup();
    let Some(mut cmd) = real_process(dir.path()) else {
        return;
    };
    let _guard = one_at_a_time();
    let mut bench = cmd
        .args(["bench", SMOL, "--quant", "q8_0", "--busy-neighbour"])
        .args(["-p", "16", "-n", "512", "-r", "50", "--threads", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Held open until the kill: a closed pipe would end the benchmark by an error, not the kill.
    let mut stderr = BufReader::new(bench.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("neighbour process runs") {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "bench ended early"
        );
    }
    // The notice comes just before the fork.
    let children = || -> Vec<u32> {
        let tasks = fs::read_dir(format!("/proc/{}/task", bench.id())).unwrap();
        tasks
            .flat_map(|task| {
                let children = task.unwrap().path().join("children");
                let pids = fs::read_to_string(children).unwrap_or_default();
                pids.split_whitespace()
                    .map(|pid| pid.parse().unwrap())
                    .collect::<Vec<u32>>()
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let neighbour = loop {
        match children()[..] {
            [neighbour] => break neighbour,
            [] if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            ref other => panic!("one busy neighbour expected, children: {other:?}"),
        }
    };
    bench.kill().unwrap();
    bench.wait().unwrap();
    // Gone, or a zombie its new parent has not reaped yet: either way no longer running.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stat = fs::read_to_string(format!("/proc/{neighbour}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next());
        if matches!(state, None | Some("Z" | "X")) {
            break;
        }
        if Instant::now() > deadline {
            // Not left spinning after the test either.
            let _ = std::process::Command::new("kill")
                .args(["-9", &neighbour.to_string()])
                .status();
            panic!("neighbour {neighbour} still {state:?} after its benchmark was killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(stderr);
}

#[test]
fn markdown_uses_llama_bench_columns() {
    let dir = setup();
    let Some(mut cmd) = real(dir.path()) else {
        return;
    };
    let _guard = one_at_a_time();
    // llama.cpp's arithmetic, named as llama-bench names it.
    cmd.args(["bench", SMOL, "--quant", "q8_0", "--activations", "int8"])
        .args(SMALL)
        .assert()
        .success()
        .stdout(contains(
            "| model | size | params | backend | threads | test | t/s |",
        ))
        .stdout(contains("| smollm2-135m-instruct q8_0 | "))
        .stdout(contains(" | 134.52 M | CPU | 1 | pp16 | "))
        .stdout(contains("| TTFT ms | load+verify s | peak RSS MiB |"));
}

/// Signed results compare and verify; a result edited after signing is refused by `--verify`; a
/// drop beyond the threshold exits 1.
#[test]
fn signed_results_compare_and_edits_are_refused() {
    let dir = setup();
    let Some(mut cmd) = real(dir.path()) else {
        return;
    };
    let _guard = one_at_a_time();
    let base = dir.path().join("base.json");
    cmd.args([
        "bench", SMOL, "--quant", "q8_0", "-o", "json", "--attest", "--out",
    ])
    .arg(&base)
    .args(SMALL)
    .assert()
    .success()
    .stderr(contains("attestation: "));
    let bundle = dir.path().join("base.json.sigstore.json");
    assert!(bundle.is_file());
    let key = dir.path().join("ci.pub");
    let compare = |base: &Path, new: &Path| {
        let mut cmd = real(dir.path()).unwrap();
        cmd.args(["bench", "compare"]).arg(base).arg(new);
        cmd
    };
    compare(&base, &base)
        .args(["--verify", "--key"])
        .arg(&key)
        .assert()
        .success()
        .stdout(contains("| 1.000 | ok |"))
        .stderr(contains("signed by"));

    // A faster result, edited in after signing: the numbers compare, but the signature says no.
    let mut report: serde_json::Value = serde_json::from_slice(&fs::read(&base).unwrap()).unwrap();
    for r in report["results"].as_array_mut().unwrap() {
        let ts = r["avg_ts"].as_f64().unwrap();
        r["avg_ts"] = (ts * 2.0).into();
    }
    let edited = dir.path().join("edited.json");
    fs::write(&edited, serde_json::to_vec(&report).unwrap()).unwrap();
    fs::copy(&bundle, dir.path().join("edited.json.sigstore.json")).unwrap();
    compare(&base, &edited).assert().success();
    compare(&base, &edited)
        .args(["--verify", "--key"])
        .arg(&key)
        .assert()
        .code(1)
        .stderr(contains("step 5 (subject digest)"));

    // Half the speed: a regression (exit 1); within a 60 % threshold: fine.
    compare(&edited, &base)
        .assert()
        .code(1)
        .stdout(contains("| 0.500 | REGRESSION |"));
    compare(&edited, &base)
        .args(["--threshold", "60"])
        .assert()
        .success();
    compare(&base, &dir.path().join("policy.toml"))
        .assert()
        .code(2)
        .stderr(contains("policy.toml is not a `sanctum bench -o json`"));
}

/// `hw detect` writes a profile this machine matches; a profile of another machine is refused
/// unless `--force`, which records the differences.
#[test]
fn hardware_profiles_gate_the_run() {
    let dir = setup();
    let Some(mut cmd) = real(dir.path()) else {
        return;
    };
    let detected = sanctum()
        .args(["hw", "detect", "--name", "here", "--no-bandwidth"])
        .output()
        .unwrap();
    assert!(detected.status.success());
    let here = String::from_utf8(detected.stdout).unwrap();
    assert!(
        here.contains("name = \"here\"") && here.contains("[cpu]"),
        "{here}"
    );
    let profile = dir.path().join("here.toml");
    fs::write(&profile, &here).unwrap();
    let _guard = one_at_a_time();
    cmd.args([
        "bench", SMOL, "--quant", "q4_0", "-p", "8", "-n", "0", "-r", "1",
    ])
    .args(["--threads", "1", "--profile"])
    .arg(&profile)
    .assert()
    .success();

    let mut other: toml::Table = toml::from_str(&here).unwrap();
    other["cpu"]["threads"] = toml::Value::Integer(99);
    let other_path = dir.path().join("other.toml");
    fs::write(&other_path, toml::to_string(&other).unwrap()).unwrap();
    let bench_other = |extra: &[&str]| {
        let mut cmd = real(dir.path()).unwrap();
        cmd.args([
            "bench", SMOL, "--quant", "q4_0", "-p", "8", "-n", "0", "-r", "1",
        ])
        .args(["--threads", "1", "-o", "json", "--profile"])
        .arg(&other_path)
        .args(extra);
        cmd
    };
    bench_other(&[])
        .assert()
        .code(1)
        .stderr(contains("does not match hardware profile"))
        .stderr(contains("the profile has"));
    let forced = bench_other(&["--force"]).output().unwrap();
    assert!(forced.status.success());
    let stderr = String::from_utf8_lossy(&forced.stderr);
    assert!(
        stderr.contains("warning: this machine does not match"),
        "{stderr}"
    );
    let report: serde_json::Value = serde_json::from_slice(&forced.stdout).unwrap();
    let mismatches = report["profile"]["mismatches"].to_string();
    assert!(mismatches.contains(" / 99"), "{mismatches}");
    assert_eq!(report["results"][0]["test"], "pp8");
}

/// `bench --quality`: the reference scores itself perfectly; the default (the stored q4_1 blocks
/// with 16-bit activations) stays closer to f32 than llama.cpp's 8-bit arithmetic at q8_0; every
/// number is in range; a text shorter than one window is refused with its name.
#[test]
fn quality_compares_formats_with_the_f32_reference() {
    let dir = setup();
    let Some(mut cmd) = real(dir.path()) else {
        return;
    };
    let _guard = one_at_a_time();
    let text = dir.path().join("text.txt");
    fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog. ".repeat(4)
            + "Licenses grant rights to copy, modify and distribute software under conditions \
               that protect the authors and the users who receive it, and they say so in words \
               a court can read.",
    )
    .unwrap();
    let out = cmd
        .args(["bench", SMOL, "--quality"])
        .arg(&text)
        .args(["--quant", "auto,q8_0,q4k", "--activations", "int16,int8"])
        .args([
            "--window",
            "48",
            "--windows",
            "1",
            "-o",
            "json",
            "--threads",
            "1",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = report["results"].as_array().unwrap();
    let formats: Vec<&str> = rows.iter().map(|r| r["format"].as_str().unwrap()).collect();
    // q4k (q4_K, q5_0 where rows of 576 do not fit it) runs on sanctum's kernels too: its two
    // activation precisions are two arithmetics.
    assert_eq!(
        formats,
        [
            "f32",
            "q4_1+int16",
            "q4_1",
            "q8_0+int16",
            "q8_0",
            "q4k+int16",
            "q4k"
        ]
    );
    let kl = |i: usize| rows[i]["mean_kl"].as_f64().unwrap();
    assert_eq!((kl(0), rows[0]["top1"].as_f64()), (0.0, Some(1.0)));
    assert!(kl(1) < kl(4), "{kl:?}", kl = (kl(1), kl(4)));
    for r in rows {
        assert_eq!(r["positions"], 24, "{r}");
        let ppl = r["perplexity"].as_f64().unwrap();
        assert!(ppl.is_finite() && ppl >= 1.0, "{r}");
        let top1 = r["top1"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&top1), "{r}");
        assert!(
            r["max_kl"].as_f64().unwrap() >= r["mean_kl"].as_f64().unwrap(),
            "{r}"
        );
    }

    let short = dir.path().join("short.txt");
    fs::write(&short, "Too short.").unwrap();
    let Some(mut cmd) = real(dir.path()) else {
        return;
    };
    cmd.args(["bench", SMOL, "--quality"])
        .arg(&short)
        .args(["--window", "48", "--threads", "1"])
        .assert()
        .code(2)
        .stderr(contains("short.txt"))
        .stderr(contains("fewer than one window of 48"));
}
