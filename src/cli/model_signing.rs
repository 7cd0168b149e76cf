//! `sanctum models sign | verify-signature`: OpenSSF Model Signing v1.0 signatures (`model.sig`),
//! interoperable with `model_signing sign key` / `model_signing verify key`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use attest::attestation::layout::write_atomic;
use attest::model_signing::{self, DEFAULT_IGNORE, Manifest, SIGNATURE_FILE};
use attest::verify::verify_model;
use clap::Args;

use super::Context;
use super::context::display_path;
use super::keys::{load_signing_key, read_public};
use super::trust::Refused;

#[derive(Debug, Args)]
pub struct SignArgs {
    /// A model directory, or the name of an approved model in the store.
    model: String,
    /// The private key (encrypted Sigstore PEM or PKCS#8).
    #[arg(long, value_name = "KEY")]
    key: PathBuf,
    /// Where to write the signature [default: DIR/model.sig, or ./NAME.model.sig for a stored model,
    /// whose directory holds exactly the locked files].
    #[arg(long, value_name = "FILE")]
    signature: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct VerifySignatureArgs {
    /// The model directory (or the name of an approved model in the store).
    model: String,
    /// The signer's public key (PEM).
    #[arg(long, value_name = "PUB")]
    key: PathBuf,
    /// The signature [default: DIR/model.sig, or ./NAME.model.sig for a stored model].
    #[arg(long, value_name = "FILE")]
    signature: Option<PathBuf>,
}

/// A directory argument, or a stored model by name (verified against the lock before signing).
enum Target {
    Dir(PathBuf),
    Stored { name: String, dir: PathBuf },
}

fn target(ctx: &Context, model: &str) -> anyhow::Result<Target> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(Target::Dir(path.to_owned()));
    }
    let (_, lock) = ctx.lockfile()?;
    let entry = lock
        .model(model)
        .with_context(|| format!("{model:?} is neither a directory nor an approved model"))?;
    Ok(Target::Stored {
        name: entry.name.clone(),
        dir: ctx.store()?.model_dir(entry),
    })
}

/// The signature's path relative to `dir`, when it lies inside it (then it is left out of the model).
fn inside(dir: &Path, signature: &Path) -> Option<String> {
    let dir = dir.canonicalize().ok()?;
    let parent = signature
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let sig = parent.canonicalize().ok()?.join(signature.file_name()?);
    let rel = sig.strip_prefix(&dir).ok()?;
    Some(
        rel.components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/"),
    )
}

pub fn sign(args: SignArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let key = load_signing_key(&args.key, true)?;
    let mut ignore: Vec<String> = DEFAULT_IGNORE.iter().map(|s| s.to_string()).collect();
    let (manifest, signature) = match target(ctx, &args.model)? {
        Target::Dir(dir) => {
            let signature = args.signature.unwrap_or_else(|| dir.join(SIGNATURE_FILE));
            ignore.extend(inside(&dir, &signature));
            (Manifest::of_dir(&dir, &ignore)?, signature)
        }
        Target::Stored { name, dir } => {
            let (_, lock) = ctx.lockfile()?;
            let entry = lock.model(&name)?;
            let report = verify_model(entry, &dir, &ctx.progress())?;
            report.into_result().with_context(|| {
                format!("{name}: the stored copy does not match the lock; not signing it")
            })?;
            let signature = args
                .signature
                .unwrap_or_else(|| PathBuf::from(format!("{name}.model.sig")));
            (Manifest::from_entry(entry), signature)
        }
    };
    let bundle = model_signing::sign(&manifest, &ignore, &key)?;
    write_atomic(&signature, &bundle.to_json())
        .with_context(|| format!("cannot write {}", signature.display()))?;
    writeln!(
        std::io::stdout().lock(),
        "signed {} ({} files, sha256 {}) with key {}: {}",
        manifest.model_name,
        manifest.resources.len(),
        manifest.root_digest(),
        key.hint(),
        display_path(&signature)
    )?;
    Ok(ExitCode::SUCCESS)
}

pub fn verify_signature(args: VerifySignatureArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let key = read_public(&args.key)?;
    let (dir, signature) = match target(ctx, &args.model)? {
        Target::Dir(dir) => {
            let signature = args.signature.unwrap_or_else(|| dir.join(SIGNATURE_FILE));
            (dir, signature)
        }
        Target::Stored { name, dir } => {
            let signature = args
                .signature
                .unwrap_or_else(|| PathBuf::from(format!("{name}.model.sig")));
            (dir, signature)
        }
    };
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let bytes = ::attest::files::read_bounded(&signature, ::attest::files::MAX_DOCUMENT_BYTES)
        .with_context(|| format!("cannot read signature {}", signature.display()))?;
    let extra: Vec<String> = inside(&dir, &signature).into_iter().collect();
    let mut out = std::io::stdout().lock();
    match model_signing::verify_dir(&dir, &bytes, &key, &extra) {
        Ok(signed) => {
            writeln!(
                out,
                "ok: {} matches {} ({} files, sha256 {}), signed by key {}",
                display_path(&dir),
                display_path(&signature),
                signed.manifest.resources.len(),
                signed.manifest.root_digest(),
                signed.hint
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            writeln!(out, "FAIL {}: {e}", display_path(&dir))?;
            Err(Refused(format!(
                "model signature {} failed verification",
                display_path(&signature)
            ))
            .into())
        }
    }
}
