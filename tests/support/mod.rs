//! Shared helpers: a fresh directory per test, the `sanctum` binary with an isolated environment, the
//! real models pulled by `scripts/test`, and tiny Safetensors models made on the spot.

#![allow(dead_code)]

pub mod attested;
pub mod byte_level;
pub mod hf_server;
pub mod server;
pub mod token_issuer;

use std::fs;
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// The `sanctum` binary with no inherited sanctum or hub settings.
pub fn sanctum() -> Command {
    Command::from(process())
}

/// [`sanctum`] as a plain process, for tests that spawn and kill it.
pub fn process() -> std::process::Command {
    let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("sanctum"));
    for var in ISOLATED_VARS {
        cmd.env_remove(var);
    }
    cmd
}

/// A small xorshift generator seeded from the clock, its seed printed, for randomized kill
/// points that differ between runs yet can be told from the log.
pub struct Jitter(u64);

impl Jitter {
    pub fn from_clock() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.subsec_nanos() as u64)
            | 1;
        eprintln!("jitter seed {seed}");
        Self(seed)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0.checked_rem(n).unwrap_or(0)
    }
}

/// Kill -9 at randomized points: runs `command()` once to completion (it must succeed) to time
/// it, then `rounds` more times, each killed with SIGKILL at a point in its own slice of that
/// time, calling `after(finished)` once the killed process is reaped (`finished`: it had already
/// exited). Returns how many rounds were killed before they finished.
pub fn kill_9_loop(
    rounds: u32,
    mut command: impl FnMut() -> std::process::Command,
    mut after: impl FnMut(bool),
) -> u32 {
    use std::process::Stdio;
    let started = std::time::Instant::now();
    let output = command().stdin(Stdio::null()).output().unwrap();
    assert!(
        output.status.success(),
        "the uninterrupted run failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let slice = started.elapsed() / rounds.max(1);
    let mut jitter = Jitter::from_clock();
    let mut killed = 0;
    for round in 0..rounds {
        let at = slice * round
            + std::time::Duration::from_nanos(jitter.below(slice.as_nanos() as u64 + 1));
        let mut child = command()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(at);
        let finished = child.try_wait().unwrap().is_some();
        let _ = child.kill();
        let _ = child.wait();
        killed += u32::from(!finished);
        after(finished);
    }
    killed
}

/// The environment a test's sanctum never inherits: where its home, lock and hubs are, and the
/// credentials it sends.
pub const ISOLATED_VARS: [&str; 9] = [
    "SANCTUM_HOME",
    "SANCTUM_LOCK",
    "SANCTUM_HUB",
    "SANCTUM_HUB_TOKEN",
    "SANCTUM_REGISTRY_TOKEN",
    "SANCTUM_REGISTRY_USERNAME",
    "SANCTUM_REGISTRY_PASSWORD",
    "HF_ENDPOINT",
    "HF_TOKEN",
];

/// The store `scripts/test` pulled the real models into, or None (with a notice) when the tests run
/// without it. With `SANCTUM_REQUIRE_REAL_MODELS=1` (as in CI) a missing store is a failure.
pub fn real_store() -> Option<PathBuf> {
    match std::env::var_os("SANCTUM_TEST_HOME") {
        Some(home) => Some(PathBuf::from(home)),
        None if std::env::var_os("SANCTUM_REQUIRE_REAL_MODELS").is_some() => {
            panic!(
                "SANCTUM_REQUIRE_REAL_MODELS is set but SANCTUM_TEST_HOME is not: run scripts/test"
            )
        }
        None => {
            runner::testing::skip("real models not available (run scripts/test to pull them)");
            None
        }
    }
}

/// A tool the tests need: None (skipped, with a notice) when it is missing, a failure when
/// `SANCTUM_REQUIRE_REAL_MODELS` is set (as in CI).
pub fn required<T>(found: Option<T>, what: &str) -> Option<T> {
    match found {
        Some(t) => Some(t),
        None if std::env::var_os("SANCTUM_REQUIRE_REAL_MODELS").is_some() => {
            panic!("SANCTUM_REQUIRE_REAL_MODELS is set but {what}")
        }
        None => {
            runner::testing::skip(what);
            None
        }
    }
}

/// The Python with the official clients (`SANCTUM_TEST_PYTHON`, set by scripts/test).
pub fn python() -> Option<PathBuf> {
    required(
        std::env::var_os("SANCTUM_TEST_PYTHON").map(PathBuf::from),
        "SANCTUM_TEST_PYTHON is not set (scripts/test makes target/venv with the official clients)",
    )
}

/// A system program installed from a Debian package: the first of `paths` that exists, else
/// [`required`]'s notice or failure naming `package`.
pub fn system_program(paths: &[&str], package: &str) -> Option<PathBuf> {
    required(
        paths.iter().map(PathBuf::from).find(|p| p.is_file()),
        &format!(
            "{} is not installed (Debian package {package}; .ci/run installs it)",
            paths[0]
        ),
    )
}

/// The repository's `models.lock`.
pub fn repo_lock() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models.lock")
}

/// A private copy of one real model in a fresh store, so a test can attack it.
pub struct StoreCopy {
    pub home: TempDir,
    pub model_dir: PathBuf,
}

impl StoreCopy {
    /// Copies the real model `name` (pulled by scripts/test) into a new store.
    pub fn of(name: &str) -> Option<Self> {
        let real = real_store()?;
        let source_parent = real.join("models").join(name);
        let digest_dir = fs::read_dir(&source_parent)
            .unwrap_or_else(|e| panic!("{}: {e}: run scripts/test", source_parent.display()))
            .next()
            .expect("one pulled version")
            .unwrap();
        let home = TempDir::new().unwrap();
        let model_dir = home
            .path()
            .join("models")
            .join(name)
            .join(digest_dir.file_name());
        copy_tree(&digest_dir.path(), &model_dir);
        Some(Self { home, model_dir })
    }

    /// `sanctum --store <copy> --lock <repo lock> ARGS`.
    pub fn sanctum(&self) -> Command {
        Command::from(self.process())
    }

    /// [`Self::sanctum`] as a plain process.
    pub fn process(&self) -> std::process::Command {
        let mut cmd = process();
        cmd.arg("--store")
            .arg(self.home.path())
            .arg("--lock")
            .arg(repo_lock());
        cmd
    }

    pub fn file(&self, path: &str) -> PathBuf {
        self.model_dir.join(path)
    }
}

pub fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Makes `dir` (and its parents) a new git work tree.
pub fn git_init(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    let status = std::process::Command::new("git")
        .args(["init", "-q"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success(), "git init {}", dir.display());
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A tiny valid Safetensors file: one f32 tensor "w" of shape [2, 3].
pub fn tiny_safetensors() -> Vec<u8> {
    let data: Vec<u8> = (0..6u8).flat_map(|i| f32::from(i).to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 3], &data).unwrap();
    safetensors::serialize([("w", view)], None).unwrap()
}

/// A lockfile text with one model `name` whose files are `files` (path, bytes) and the given source
/// table (TOML lines after `[model.source]`).
pub fn lock_text(name: &str, files: &[(&str, &[u8])], source: &str) -> String {
    let mut listing: Vec<(String, String)> = files
        .iter()
        .map(|(p, b)| (p.to_string(), sha256_hex(b)))
        .collect();
    listing.sort();
    let text: String = listing.iter().map(|(p, d)| format!("{d}  {p}\n")).collect();
    let digest = sha256_hex(text.as_bytes());
    let mut out = format!(
        "version = 1\n\n[[model]]\nname = \"{name}\"\ntask = \"embed\"\narchitecture = \"bert\"\n\
         license = \"Apache-2.0\"\ndigest = \"{digest}\"\n\n[model.source]\n{source}\n"
    );
    for (path, bytes) in files {
        out += &format!(
            "\n[[model.file]]\npath = \"{path}\"\nsha256 = \"{}\"\nsize = {}\n",
            sha256_hex(bytes),
            bytes.len()
        );
    }
    out
}

/// A store holding one synthetic model exactly as `lock_text` describes it.
pub struct TinyModel {
    pub home: TempDir,
    pub lock: PathBuf,
    pub model_dir: PathBuf,
}

pub const HF_SOURCE: &str =
    "kind = \"hf\"\nrepo = \"org/tiny\"\nrevision = \"0123456789abcdef0123456789abcdef01234567\"";

impl TinyModel {
    pub fn new(files: &[(&str, &[u8])]) -> Self {
        Self::of_task(files, "embed", "bert")
    }

    /// A model approved with this task and architecture in its lock entry.
    pub fn of_task(files: &[(&str, &[u8])], task: &str, architecture: &str) -> Self {
        let home = TempDir::new().unwrap();
        let lock = home.path().join("models.lock");
        let text = lock_text("tiny", files, HF_SOURCE)
            .replace("task = \"embed\"", &format!("task = \"{task}\""))
            .replace(
                "architecture = \"bert\"",
                &format!("architecture = \"{architecture}\""),
            );
        fs::write(&lock, &text).unwrap();
        let parsed = attest::lockfile::Lockfile::parse(&text).unwrap();
        let model_dir = home
            .path()
            .join("models/tiny")
            .join(parsed.models[0].digest.to_hex());
        for (path, bytes) in files {
            let p = model_dir.join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, bytes).unwrap();
        }
        Self {
            home,
            lock,
            model_dir,
        }
    }

    pub fn sanctum(&self) -> Command {
        Command::from(self.process())
    }

    /// [`Self::sanctum`] as a plain process.
    pub fn process(&self) -> std::process::Command {
        let mut cmd = process();
        cmd.arg("--store")
            .arg(self.home.path())
            .arg("--lock")
            .arg(&self.lock);
        cmd
    }
}
