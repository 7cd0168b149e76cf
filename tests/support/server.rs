//! `sanctum serve` (or `sanctum hub serve`) started for a test: on a free loopback port (`--addr 127.0.0.1:0`, the bound
//! address read from its log), on the real models, killed when dropped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running server.
pub struct Server {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    log: Arc<Mutex<String>>,
}

/// How long a server may take to load its models and bind.
const START_TIMEOUT: Duration = Duration::from_secs(300);

impl Server {
    /// Starts `sanctum --store STORE --lock models.lock serve --addr 127.0.0.1:0 ARGS…` on the
    /// real models; None (skipped) when they are not available.
    pub fn start(args: &[&str]) -> Option<Self> {
        let store = super::real_store()?;
        Some(Self::start_with(&store, args))
    }

    /// As [`Self::start`], with the store given.
    pub fn start_with(store: &std::path::Path, args: &[&str]) -> Self {
        let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("sanctum"));
        cmd.arg("--store")
            .arg(store)
            .arg("--lock")
            .arg(super::repo_lock())
            .args(["serve", "--addr", "127.0.0.1:0"])
            .args(args);
        Self::launch(cmd)
    }

    /// `sanctum hub serve --addr 127.0.0.1:0 ARGS…` on `store` and `lock`.
    pub fn hub(store: &std::path::Path, lock: &std::path::Path, args: &[&str]) -> Self {
        let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("sanctum"));
        cmd.arg("--store")
            .arg(store)
            .arg("--lock")
            .arg(lock)
            .args(["hub", "serve", "--addr", "127.0.0.1:0"])
            .args(args);
        Self::launch(cmd)
    }

    /// Starts `cmd` (a server that logs `listening on http://ADDR` on stderr) and waits for it to bind.
    pub fn launch(mut cmd: Command) -> Self {
        for var in super::ISOLATED_VARS {
            cmd.env_remove(var);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("the server starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(rest) = line.split("listening on http://").nth(1) {
                        let addr = rest
                            .split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_owned();
                        let _ = tx.send(addr);
                    }
                    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let started = Instant::now();
        let addr = loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(addr) => break addr,
                Err(_) if started.elapsed() > START_TIMEOUT => {
                    let _ = child.kill();
                    panic!("the server did not start: {}", log.lock().unwrap());
                }
                Err(_) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        std::thread::sleep(Duration::from_millis(200));
                        panic!("the server exited with {status}: {}", log.lock().unwrap());
                    }
                }
            }
        };
        Self {
            child: Some(child),
            url: format!("http://{addr}"),
            log,
        }
    }

    /// What it wrote on stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends SIGTERM and waits (at most a minute) for the exit.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                return (status, self.log());
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("the server ignored SIGTERM: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
