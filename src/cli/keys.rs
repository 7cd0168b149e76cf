//! `sanctum keys generate | show`, and reading keys for the commands that sign.
//!
//! Passphrases come from `$SANCTUM_KEY_PASSWORD`, else a prompt on the terminal (never during `run`,
//! `chat` or `embed`: those read the signer key with the environment or the empty passphrase only).
//!
//! The default signer key, `$SANCTUM_HOME/keys/signer.key` (or `$SANCTUM_SIGNING_KEY`), is created on
//! first use, in the same encrypted format as every other key, with the passphrase from
//! `$SANCTUM_KEY_PASSWORD` when set and the empty passphrase otherwise, mode 0600 in a 0700 directory.
//! Why not prompt, or refuse: stamping must never stand between a developer and `sanctum run`, and a
//! passphrase typed by nobody protects nothing. What protects an empty-passphrase key is the file
//! mode, like an SSH key without a passphrase, and the notice says so; a stronger key is one
//! `sanctum keys generate` away (it then needs `$SANCTUM_KEY_PASSWORD` to stamp). Trust is never
//! automatic: a new key signs, but no verifier accepts its stamps until the policy names it.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use attest::keys::{KeyError, PrivateKeyFormat, PublicKey, SigningKey};
use clap::{Args, Subcommand};
use zeroize::Zeroizing;

use super::Context;

/// Environment variable holding the passphrase of private keys.
pub const PASSWORD_ENV: &str = "SANCTUM_KEY_PASSWORD";
/// Environment variable naming the signer key that stamps outputs.
pub const SIGNING_KEY_ENV: &str = "SANCTUM_SIGNING_KEY";

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make an ECDSA P-256 key pair: PREFIX.key (encrypted, Sigstore format) and PREFIX.pub (PEM).
    Generate(GenerateArgs),
    /// Print a key's hint and public key (default: the signer key that stamps outputs).
    Show(ShowArgs),
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Path prefix of the two files [default: the signer key, $SANCTUM_HOME/keys/signer].
    #[arg(long, value_name = "PREFIX")]
    out: Option<PathBuf>,
    /// Replace existing files.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// A public (.pub) or private (.key) key file [default: the signer key].
    key: Option<PathBuf>,
}

pub fn run(cmd: KeysCommand, ctx: &Context) -> anyhow::Result<ExitCode> {
    match cmd {
        KeysCommand::Generate(args) => generate(args, ctx),
        KeysCommand::Show(args) => show(args, ctx),
    }
}

/// `$SANCTUM_SIGNING_KEY`, else `$SANCTUM_HOME/keys/signer.key`.
pub fn signer_key_path(ctx: &Context) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(SIGNING_KEY_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    Ok(ctx.home()?.join("keys").join("signer.key"))
}

/// `X.key` → `X.pub`.
pub fn public_path(private: &Path) -> PathBuf {
    private.with_extension("pub")
}

fn generate(args: GenerateArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let (private, public) = match &args.out {
        Some(prefix) => (with_suffix(prefix, ".key"), with_suffix(prefix, ".pub")),
        None => {
            let private = signer_key_path(ctx)?;
            let public = public_path(&private);
            (private, public)
        }
    };
    for path in [&private, &public] {
        if path.exists() && !args.force {
            bail!("{} exists: pass --force to replace it", path.display());
        }
    }
    let passphrase = new_passphrase()?;
    let key = SigningKey::generate()?;
    write_key_pair(&key, &private, &public, passphrase.as_bytes())?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "private key: {} (encrypted)", private.display())?;
    writeln!(out, "public key:  {}", public.display())?;
    writeln!(out, "hint:        {}", key.hint())?;
    Ok(ExitCode::SUCCESS)
}

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// Writes the encrypted private key (mode 0600, directory 0700 when created) and the public key.
fn write_key_pair(
    key: &SigningKey,
    private: &Path,
    public: &Path,
    passphrase: &[u8],
) -> anyhow::Result<()> {
    if let Some(dir) = private.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        create_private_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let pem = key.to_encrypted_pem(passphrase)?;
    write_private(private, pem.as_bytes())
        .with_context(|| format!("cannot write {}", private.display()))?;
    attest::attestation::layout::write_atomic(public, key.public().to_pem().as_bytes())
        .with_context(|| format!("cannot write {}", public.display()))?;
    Ok(())
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // tempfile creates files with mode 0600; the rename keeps it.
    let mut tmp = tempfile::Builder::new()
        .prefix(".sanctum-key-")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

fn show(args: ShowArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let path = match args.key {
        Some(path) => path,
        None => {
            let private = signer_key_path(ctx)?;
            let public = public_path(&private);
            if !public.exists() {
                bail!(
                    "no signer key yet at {}: it is made on the first stamped output, or with `sanctum keys generate`",
                    private.display()
                );
            }
            public
        }
    };
    let key = read_public_or_private(&path)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "hint: {}", key.hint())?;
    writeln!(out, "file: {}", path.display())?;
    write!(out, "{}", key.to_pem())?;
    Ok(ExitCode::SUCCESS)
}

/// A public key from a `.pub` file, or from a private key file (its `.pub` sibling when there is one,
/// else by opening the private key).
pub fn read_public_or_private(path: &Path) -> anyhow::Result<PublicKey> {
    let bytes = ::attest::files::read_bounded(path, ::attest::files::MAX_DOCUMENT_BYTES)
        .with_context(|| format!("cannot read {}", path.display()))?;
    match PublicKey::from_pem(&bytes) {
        Ok(key) => Ok(key),
        Err(KeyError::WrongKind { .. }) => {
            let sibling = public_path(path);
            if sibling != path && sibling.exists() {
                return read_public(&sibling);
            }
            Ok(load_signing_key(path, true)?.public().clone())
        }
        Err(e) => Err(e).with_context(|| format!("{}", path.display())),
    }
}

/// Reads a public key file.
pub fn read_public(path: &Path) -> anyhow::Result<PublicKey> {
    let bytes = ::attest::files::read_bounded(path, ::attest::files::MAX_DOCUMENT_BYTES)
        .with_context(|| format!("cannot read {}", path.display()))?;
    PublicKey::from_pem(&bytes).with_context(|| format!("public key {}", path.display()))
}

/// Opens a private key: unencrypted PKCS#8 as is; encrypted with `$SANCTUM_KEY_PASSWORD` when set,
/// else the empty passphrase, else (with `prompt` and a terminal) a typed one.
pub fn load_signing_key(path: &Path, prompt: bool) -> anyhow::Result<SigningKey> {
    let pem = Zeroizing::new(
        ::attest::files::read_bounded(path, ::attest::files::MAX_DOCUMENT_BYTES)
            .with_context(|| format!("cannot read key {}", path.display()))?,
    );
    let format = PrivateKeyFormat::of(&pem).with_context(|| format!("key {}", path.display()))?;
    if format == PrivateKeyFormat::Plain {
        return SigningKey::from_pem(&pem, b"").with_context(|| format!("key {}", path.display()));
    }
    if let Some(pass) = env_passphrase() {
        return SigningKey::from_pem(&pem, pass.as_bytes())
            .with_context(|| format!("key {} with ${PASSWORD_ENV}", path.display()));
    }
    match SigningKey::from_pem(&pem, b"") {
        Err(KeyError::WrongPassphrase) if prompt && std::io::stdin().is_terminal() => {
            let pass = Zeroizing::new(
                rpassword::prompt_password(format!("Passphrase for {}: ", path.display()))
                    .context("reading the passphrase")?,
            );
            SigningKey::from_pem(&pem, pass.as_bytes())
                .with_context(|| format!("key {}", path.display()))
        }
        Err(KeyError::WrongPassphrase) => bail!(
            "key {} is protected by a passphrase: set ${PASSWORD_ENV}{}",
            path.display(),
            if prompt {
                " or run on a terminal"
            } else {
                " (stamping never prompts)"
            }
        ),
        other => other.with_context(|| format!("key {}", path.display())),
    }
}

/// The signer key that stamps outputs, created on first use (with a notice on stderr). Never prompts.
#[allow(dead_code)] // until run/chat/embed stamp through OutputStamper
pub fn signer_key(ctx: &Context) -> anyhow::Result<SigningKey> {
    let private = signer_key_path(ctx)?;
    if private.exists() {
        return load_signing_key(&private, false);
    }
    if std::env::var_os(SIGNING_KEY_ENV).is_some_and(|p| !p.is_empty()) {
        bail!(
            "${SIGNING_KEY_ENV} names {}, which does not exist",
            private.display()
        );
    }
    let passphrase = env_passphrase().unwrap_or_default();
    let key = SigningKey::generate()?;
    let public = public_path(&private);
    write_key_pair(&key, &private, &public, passphrase.as_bytes())?;
    eprintln!(
        "sanctum: created a signer key to stamp outputs: {} (hint {}).\n\
         sanctum: it is {}; anyone who can read it can stamp as you. \
         Verifiers trust its stamps only once a policy lists {} under [[signer]].",
        private.display(),
        key.hint().short(),
        if passphrase.is_empty() {
            format!(
                "protected by file permissions only (mode 0600, empty passphrase; set ${PASSWORD_ENV} before first use for one)"
            )
        } else {
            format!("encrypted with ${PASSWORD_ENV}")
        },
        public.display()
    );
    Ok(key)
}

fn env_passphrase() -> Option<Zeroizing<String>> {
    std::env::var(PASSWORD_ENV).ok().map(Zeroizing::new)
}

/// A passphrase for a new key: `$SANCTUM_KEY_PASSWORD`, else typed twice on the terminal.
fn new_passphrase() -> anyhow::Result<Zeroizing<String>> {
    if let Some(pass) = env_passphrase() {
        return Ok(pass);
    }
    if !std::io::stdin().is_terminal() {
        bail!("no passphrase: set ${PASSWORD_ENV} (it may be empty) or run on a terminal");
    }
    let first = Zeroizing::new(rpassword::prompt_password("Passphrase for the new key: ")?);
    let second = Zeroizing::new(rpassword::prompt_password("Again: ")?);
    if *first != *second {
        bail!("the passphrases differ");
    }
    Ok(first)
}
