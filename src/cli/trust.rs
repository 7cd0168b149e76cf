//! The trust policy and the lock's standing under it: where the policy file is, and the lockfile read
//! together with its signature (`models.lock.sigstore.json`), refused when the policy says so.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use attest::Sha256Digest;
use attest::lock_signature::{self, LockStatus, LockTrustError};
use attest::lockfile::Lockfile;
use attest::policy::Policy;

use super::Context;

/// Name of the policy file looked for in the current directory and above.
pub const POLICY_FILE: &str = "sanctum-policy.toml";
/// Name of the policy file in the sanctum home.
pub const HOME_POLICY_FILE: &str = "policy.toml";

/// A check said no; the details were already printed (exit code 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// The lockfile with its bytes, digest and standing under the policy.
#[derive(Debug)]
#[allow(dead_code)] // digest and status: read by OutputStamper, bytes by hub serve
pub struct TrustedLock {
    /// Where it was read.
    pub path: PathBuf,
    /// Its parse.
    pub lock: Lockfile,
    /// sha256 of its bytes.
    pub digest: Sha256Digest,
    /// Signed, unsigned (allowed), or signature not checked.
    pub status: LockStatus,
    /// The bytes that were judged.
    pub bytes: Vec<u8>,
}

/// The lockfile read but not judged (for `lock sign`, `lock verify` and `attest verify`).
#[derive(Debug)]
pub struct LockFile {
    /// Where it was read.
    pub path: PathBuf,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Its parse.
    pub lock: Lockfile,
}

impl LockFile {
    /// Where its signature lives.
    pub fn signature_path(&self) -> PathBuf {
        lock_signature::signature_path(&self.path)
    }

    /// Its signature's bytes, when there is a signature file.
    pub fn signature(&self) -> anyhow::Result<Option<Vec<u8>>> {
        read_optional(&self.signature_path())
    }

    /// Its standing under `policy`.
    pub fn status(&self, policy: &Policy) -> anyhow::Result<Result<LockStatus, LockTrustError>> {
        let signature = self.signature()?;
        Ok(lock_signature::check_lock(
            policy,
            &self.bytes,
            signature.as_deref(),
            &self.signature_path(),
        ))
    }
}

/// How the policy file was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyFound {
    /// `--policy` or `$SANCTUM_POLICY`.
    Named,
    /// The nearest `sanctum-policy.toml` in the current directory or above.
    Nearest,
    /// `$SANCTUM_HOME/policy.toml`.
    InHome,
}

impl PolicyFound {
    /// How `sanctum policy check` says it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Named => "named by --policy or $SANCTUM_POLICY",
            Self::Nearest => "the nearest sanctum-policy.toml at or above the current directory",
            Self::InHome => "$SANCTUM_HOME/policy.toml",
        }
    }
}

impl Context {
    /// The policy: `--policy`/`$SANCTUM_POLICY`, else the nearest `sanctum-policy.toml` in the current
    /// directory or above, else `$SANCTUM_HOME/policy.toml`, else the built-in default (no trusted keys,
    /// unsigned locks allowed, non-commercial licenses denied, nothing else restricted).
    pub fn policy(&self) -> anyhow::Result<Policy> {
        Ok(self.policy_found()?.0)
    }

    /// [`Self::policy`] with how its file was found (None: the built-in default).
    pub fn policy_found(&self) -> anyhow::Result<(Policy, Option<PolicyFound>)> {
        if let Some(loaded) = self.loaded_policy.get() {
            return Ok(loaded.clone());
        }
        let loaded = match self.policy_path()? {
            None => (Policy::builtin(), None),
            Some((path, found)) => {
                let mut policy = Policy::load(&path)?;
                canonical_weight_names(&mut policy, &path)?;
                (policy, Some(found))
            }
        };
        // A thread that read it at the same time keeps its own, identical, copy.
        let _ = self.loaded_policy.set(loaded.clone());
        Ok(loaded)
    }

    fn policy_path(&self) -> anyhow::Result<Option<(PathBuf, PolicyFound)>> {
        if let Some(path) = self.policy_flag() {
            return Ok(Some((path.to_owned(), PolicyFound::Named)));
        }
        let cwd = std::env::current_dir().context("cannot read the current directory")?;
        if let Some(found) = cwd
            .ancestors()
            .map(|d| d.join(POLICY_FILE))
            .find(|p| p.is_file())
        {
            return Ok(Some((found, PolicyFound::Nearest)));
        }
        let in_home = self.home()?.join(HOME_POLICY_FILE);
        Ok(in_home.is_file().then_some((in_home, PolicyFound::InHome)))
    }

    /// The lockfile read and parsed, not judged by the policy.
    pub fn lock_file(&self) -> anyhow::Result<LockFile> {
        let path = self.lock_path()?;
        let bytes = ::attest::files::read_bounded(&path, ::attest::files::MAX_DOCUMENT_BYTES)
            .with_context(|| format!("cannot read lockfile {}", path.display()))?;
        let text = std::str::from_utf8(&bytes)
            .with_context(|| format!("lockfile {}: not UTF-8", path.display()))?;
        let lock = Lockfile::parse(text).with_context(|| format!("lockfile {}", path.display()))?;
        Ok(LockFile { path, bytes, lock })
    }

    /// The lockfile, refused when the policy requires a signature and it is unsigned, edited after
    /// signing, or signed by a key that is not an approver.
    pub fn trusted_lock(&self) -> anyhow::Result<TrustedLock> {
        let file = self.lock_file()?;
        let policy = self.policy()?;
        let status = file.status(&policy)?.with_context(|| {
            format!(
                "lockfile {} refused by the policy{}",
                file.path.display(),
                policy
                    .source
                    .as_deref()
                    .map(|p| format!(" {}", p.display()))
                    .unwrap_or_default()
            )
        })?;
        Ok(TrustedLock {
            digest: Sha256Digest::of(&file.bytes),
            path: file.path,
            lock: file.lock,
            status,
            bytes: file.bytes,
        })
    }
}

/// The content of `path`, or None when it does not exist.
pub fn read_optional(path: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    match ::attest::files::read_bounded(path, ::attest::files::MAX_DOCUMENT_BYTES) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// `formats.weights` must name formats this build knows (a misspelt one would refuse every
/// model); aliases (`q4_k`) become the names weights report (`q4k`).
#[cfg(feature = "inference")]
fn canonical_weight_names(policy: &mut Policy, path: &Path) -> anyhow::Result<()> {
    if let Some(weights) = policy.rules.formats.weights.as_mut() {
        for name in weights.iter_mut() {
            let quant: runner::quant::Quant = name
                .parse()
                .with_context(|| format!("policy {}: formats.weights", path.display()))?;
            *name = quant.name().to_owned();
        }
    }
    Ok(())
}

/// Without the engine there are no weight formats to check the names against.
#[cfg(not(feature = "inference"))]
fn canonical_weight_names(_: &mut Policy, _: &Path) -> anyhow::Result<()> {
    Ok(())
}
