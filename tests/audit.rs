//! The audit log through the CLI: the real model's embeddings, a refused tampered model and a pull
//! logged with the digests of what was written; an edited byte, a dropped entry, two swapped, a
//! truncated file and a consistently rewritten log each refused naming the entry; kill -9 during
//! appends never leaving a log that fails to verify; and the entries exported to a real `rsyslogd`
//! on loopback, arriving as the exact log lines.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};
use std::{fs, thread};

use predicates::prelude::*;
use predicates::str::contains;
use serde_json::Value;
use tempfile::TempDir;

use crate::support::{StoreCopy, repo_lock, sanctum, sha256_hex, system_program};

/// `sanctum --store HOME --lock <repo lock> --quiet ARGS`.
fn in_home(home: &Path, args: &[&str]) -> assert_cmd::Command {
    let mut cmd = sanctum();
    cmd.arg("--store")
        .arg(home)
        .arg("--lock")
        .arg(repo_lock())
        .arg("--quiet")
        .args(args);
    cmd
}

/// A refused `run` of a model the lock does not approve: the cheapest audited action.
fn refusal(home: &Path) {
    in_home(home, &["run", "not-approved", "hi"])
        .assert()
        .code(1);
}

fn entries(home: &Path) -> Vec<Value> {
    let out = in_home(home, &["audit", "show", "--format", "json"])
        .assert()
        .success();
    serde_json::from_slice(&out.get_output().stdout).unwrap()
}

fn log_file(home: &Path) -> PathBuf {
    home.join("audit/log.jsonl")
}

fn lines(home: &Path) -> Vec<String> {
    fs::read_to_string(log_file(home))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(home: &Path, lines: &[String]) {
    fs::write(log_file(home), lines.join("\n") + "\n").unwrap();
}

fn verify(home: &Path) -> assert_cmd::assert::Assert {
    in_home(home, &["audit", "verify"]).assert()
}

#[test]
fn embeddings_refusals_and_pulls_are_logged_with_their_digests() {
    let Some(copy) = StoreCopy::of("all-minilm-l6-v2") else {
        return;
    };
    let home = copy.home.path();
    let work = TempDir::new().unwrap();
    let out = work.path().join("vectors.json");
    in_home(
        home,
        &["embed", "all-minilm-l6-v2", "audited text", "--out"],
    )
    .arg(&out)
    .assert()
    .success();
    in_home(home, &["models", "pull", "all-minilm-l6-v2"])
        .assert()
        .success();
    // One byte of the weights flipped: the next embed is refused, and that is logged too.
    let weights = copy.file("model.safetensors");
    let mut bytes = fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&weights, &bytes).unwrap();
    in_home(home, &["embed", "all-minilm-l6-v2", "x"])
        .assert()
        .code(1);

    let entries = entries(home);
    assert_eq!(entries.len(), 3, "{entries:#?}");
    let (embed, pull, refused) = (&entries[0], &entries[1], &entries[2]);
    assert_eq!(embed["event"], "embed");
    assert_eq!(embed["model"], "all-minilm-l6-v2");
    assert_eq!(embed["outcome"], "ok");
    assert_eq!(
        embed["output_digest"],
        format!("sha256:{}", sha256_hex(&fs::read(&out).unwrap()))
    );
    let bundle = work.path().join("vectors.json.sigstore.json");
    assert_eq!(
        embed["bundle_digest"],
        format!("sha256:{}", sha256_hex(&fs::read(&bundle).unwrap()))
    );
    assert!(
        !fs::read_to_string(log_file(home))
            .unwrap()
            .contains("audited text"),
        "the prompt text is never logged"
    );
    assert_eq!(pull["event"], "pull");
    assert_eq!(pull["outcome"], "ok");
    assert_eq!(refused["event"], "embed");
    assert_eq!(refused["outcome"], "refused");
    assert!(
        refused["detail"]
            .as_str()
            .unwrap()
            .contains("model.safetensors"),
        "{refused}"
    );

    verify(home)
        .success()
        .stdout(contains("audit log verified: 3 entries"));
    in_home(home, &["audit", "prove", "1"])
        .assert()
        .success()
        .stdout(contains("c2sp.org/tlog-proof@v1\nindex 1\n"));
    in_home(home, &["audit", "prove", "3"])
        .assert()
        .code(2)
        .stderr(contains("entry 3 is not in the log: it holds 3 entries"));
    in_home(home, &["audit", "show", "--model", "nothing-like-it"])
        .assert()
        .success()
        .stdout(contains("INDEX").and(contains("all-minilm").not()));
}

#[test]
fn edits_drops_swaps_truncations_and_rewrites_are_refused_naming_the_entry() {
    let home = TempDir::new().unwrap();
    let home = home.path();
    for _ in 0..5 {
        refusal(home);
    }
    verify(home).success();
    let good = lines(home);

    let mut edited = good.clone();
    edited[1] = edited[1].replacen("not-approved", "not-approvee", 1);
    write_lines(home, &edited);
    verify(home).code(1).stderr(contains("entry 1: "));

    let mut dropped = good.clone();
    dropped.remove(2);
    write_lines(home, &dropped);
    verify(home)
        .code(1)
        .stderr(contains("entry 2: it says it is entry 3"));

    let mut swapped = good.clone();
    swapped.swap(0, 3);
    write_lines(home, &swapped);
    verify(home).code(1).stderr(contains("entry 0: "));

    let whole = good.join("\n") + "\n";
    fs::write(log_file(home), &whole[..whole.len() - 40]).unwrap();
    verify(home)
        .code(1)
        .stderr(contains("entry 4: the log ends after 4 entries"));
    // Nothing is appended to a log cut short: the refusal says so, and the command's own
    // error is still the one reported.
    in_home(home, &["run", "not-approved", "hi"])
        .assert()
        .code(1)
        .stderr(contains("not in the lockfile"))
        .stderr(contains("this failure is not in the audit log"));

    // An exported checkpoint, then a rewrite by someone holding the machine's key: the rewritten
    // log verifies on its own but not against the checkpoint exported before.
    write_lines(home, &good);
    verify(home).success();
    let exported = home.join("exported.checkpoint");
    let out = in_home(home, &["audit", "checkpoint"]).assert().success();
    fs::write(&exported, &out.get_output().stdout).unwrap();
    refusal(home);
    in_home(home, &["audit", "verify", "--checkpoint"])
        .arg(&exported)
        .assert()
        .success()
        .stdout(contains(
            "consistent with the earlier checkpoint of 5 entries",
        ));
    for file in ["log.jsonl", "tree", "checkpoint"] {
        fs::remove_file(home.join("audit").join(file)).unwrap();
    }
    for _ in 0..6 {
        refusal(home);
    }
    verify(home).success();
    in_home(home, &["audit", "verify", "--checkpoint"])
        .arg(&exported)
        .assert()
        .code(1)
        .stderr(contains(
            "entry 4: the log was rewritten since the earlier checkpoint",
        ));
}

#[test]
fn kill_9_during_appends_never_leaves_a_log_that_fails_to_verify() {
    let home = TempDir::new().unwrap();
    let home = home.path();
    refusal(home); // the signer key exists before the processes race
    let binary = assert_cmd::cargo::cargo_bin("sanctum");
    let spawn = || -> Vec<Child> {
        (0..3)
            .map(|_| {
                Process::new(&binary)
                    .arg("--store")
                    .arg(home)
                    .arg("--lock")
                    .arg(repo_lock())
                    .args(["--quiet", "run", "not-approved", "hi"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect()
    };
    // Kill points around the end of three racing runs, where their appends happen.
    let started = Instant::now();
    for mut child in spawn() {
        child.wait().unwrap();
    }
    let lifetime = started.elapsed().as_millis() as u64;
    let mut jitter = crate::support::Jitter::from_clock();
    let (mut killed, mut finished, mut torn) = (0, 0, 0);
    let mut size = entries(home).len();
    for _ in 0..25 {
        let children = spawn();
        thread::sleep(Duration::from_millis(
            lifetime / 2 + jitter.below(lifetime * 3 / 4 + 1),
        ));
        for mut child in children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let out = verify(home).success();
        torn += usize::from(String::from_utf8_lossy(&out.get_output().stdout).contains("torn"));
        let now = entries(home).len();
        finished += now - size;
        killed += 3 - (now - size);
        size = now;
    }
    eprintln!(
        "kill -9 rounds: {finished} appends done, {killed} processes killed first, {torn} torn tails seen"
    );
    assert!(
        killed > 0 && finished > 0,
        "the kills missed the appends' window"
    );
    // The next append cuts off any torn tail and extends the one chain.
    refusal(home);
    let out = verify(home).success();
    let stdout = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    assert!(!stdout.contains("torn"), "{stdout}");
}

/// `rsyslogd` in the foreground on a free loopback port, writing what its TCP input receives to a
/// file; killed when dropped.
struct Rsyslog {
    child: Child,
    dir: TempDir,
    port: u16,
}

impl Rsyslog {
    fn start() -> Option<Self> {
        let binary = system_program(&["/usr/sbin/rsyslogd", "/usr/bin/rsyslogd"], "rsyslog")?;
        let dir = TempDir::new().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.path().display();
        let config = dir.path().join("rsyslog.conf");
        fs::write(
            &config,
            format!(
                "global(workDirectory=\"{d}\")\n\
                 module(load=\"imtcp\")\n\
                 input(type=\"imtcp\" address=\"127.0.0.1\" port=\"{port}\" ruleset=\"audit\")\n\
                 template(name=\"fields\" type=\"string\" string=\"%pri% %app-name% %msgid% %msg%\\n\")\n\
                 ruleset(name=\"audit\") {{ action(type=\"omfile\" file=\"{d}/received.log\" template=\"fields\") }}\n"
            ),
        )
        .unwrap();
        let child = Process::new(binary)
            .arg("-n")
            .arg("-f")
            .arg(&config)
            .arg("-i")
            .arg(dir.path().join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rsyslogd starts");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "rsyslogd did not listen"
            );
            thread::sleep(Duration::from_millis(50));
        }
        Some(Self { child, dir, port })
    }

    /// The lines received, once there are `n` of them (rsyslog writes asynchronously).
    fn received(&self, n: usize) -> Vec<String> {
        let path = self.dir.path().join("received.log");
        let started = Instant::now();
        loop {
            let lines: Vec<String> = fs::File::open(&path)
                .map(|f| BufReader::new(f).lines().map_while(Result::ok).collect())
                .unwrap_or_default();
            if lines.len() >= n || started.elapsed() > Duration::from_secs(30) {
                return lines;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn entries_reach_a_real_rsyslog_as_the_exact_log_lines() {
    let Some(rsyslog) = Rsyslog::start() else {
        return;
    };
    let home = TempDir::new().unwrap();
    let home = home.path();
    for _ in 0..3 {
        refusal(home);
    }
    let collector = format!("127.0.0.1:{}", rsyslog.port);
    in_home(home, &["audit", "export", "--syslog", &collector])
        .assert()
        .success()
        .stderr(contains("sent 3 entries"));
    in_home(
        home,
        &["audit", "export", "--syslog", &collector, "--since", "2"],
    )
    .assert()
    .success()
    .stderr(contains("sent 1 entries"));
    let received = rsyslog.received(4);
    let logged = lines(home);
    let expected: Vec<String> = logged
        .iter()
        .chain(&logged[2..])
        .map(|line| format!("108 sanctum run {line}"))
        .collect();
    assert_eq!(received, expected);
    in_home(home, &["audit", "export", "--syslog", "127.0.0.1:1"])
        .assert()
        .code(2)
        .stderr(contains(
            "cannot connect to the syslog collector 127.0.0.1:1",
        ));
}
