//! OpenSSF Model Signing v1.0 (`model.sig`), interoperable with the PyPI package `model-signing`
//! (`model_signing sign key` / `model_signing verify key`).
//!
//! A signature is a Sigstore bundle v0.3 (key hint = hex sha256 of the public key's PEM) holding a DSSE
//! envelope of an in-toto statement:
//! - predicateType `https://model_signing/signature/v1.0`;
//! - one subject: the model's name and, as its sha256, the sha256 of every resource digest concatenated
//!   as raw bytes in the listed order;
//! - `predicate.resources`: `{name, algorithm: "sha256", digest}` per file, `name` the POSIX path
//!   relative to the model directory, sorted by path components;
//! - `predicate.serialization`: `{method: "files", hash_type: "sha256", allow_symlinks: false,
//!   ignore_paths}`; paths in `ignore_paths` (and below them) are not part of the model.
//!
//! Only the `files` serialization is read (`shards` is refused with a clear message), and symlinks are
//! always refused.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};

use serde::{Deserialize, Serialize};

use crate::attestation::Step;
use crate::bundle::{Bundle, BundleError, CheckedBundle};
use crate::digest::{Sha256Digest, Sha256Hasher};
use crate::dsse::IN_TOTO_PAYLOAD_TYPE;
use crate::keys::{KeyError, KeyHint, PublicKey, SigningKey};
use crate::lockfile::{ModelEntry, check_relative_path};
use crate::statement::{
    STATEMENT_TYPE, Statement, StatementError, Subject, canonical_json, parse_statement,
};

/// predicateType of OpenSSF model signatures, v1.0.
pub const PREDICATE_TYPE: &str = "https://model_signing/signature/v1.0";
/// The conventional signature file name inside a model directory.
pub const SIGNATURE_FILE: &str = "model.sig";
/// Paths the model-signing tools leave out of a model by default.
pub const DEFAULT_IGNORE: [&str; 4] = [".git", ".gitattributes", ".github", ".gitignore"];

/// One file of a model and its sha256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// POSIX path relative to the model directory.
    pub name: String,
    /// sha256 of the file.
    pub digest: Sha256Digest,
}

/// A model as a list of files with digests, sorted the way the model-signing tools sort them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The model's name (informative: the directory or lock name).
    pub model_name: String,
    /// The files, sorted by path components.
    pub resources: Vec<Resource>,
}

/// Sorts paths component by component, as Python's `PurePosixPath` compares (`a/b` < `a.b`).
fn component_order(a: &str, b: &str) -> Ordering {
    a.split('/').cmp(b.split('/'))
}

impl Manifest {
    /// A manifest from resources in any order.
    pub fn new(model_name: impl Into<String>, mut resources: Vec<Resource>) -> Self {
        resources.sort_by(|a, b| component_order(&a.name, &b.name));
        Self {
            model_name: model_name.into(),
            resources,
        }
    }

    /// The manifest of a lock entry (its files and digests, as approved).
    pub fn from_entry(entry: &ModelEntry) -> Self {
        Self::new(
            entry.name.clone(),
            entry
                .files
                .iter()
                .map(|f| Resource {
                    name: f.path.clone(),
                    digest: f.sha256,
                })
                .collect(),
        )
    }

    /// Hashes every regular file below `dir` except the `ignore` paths (relative, and what lies below
    /// them). Symlinks and special files are refused. Files are hashed in parallel.
    pub fn of_dir(dir: &Path, ignore: &[String]) -> Result<Self, ManifestError> {
        let mut files = Vec::new();
        walk(dir, dir, ignore, &mut files)?;
        let next = AtomicUsize::new(0);
        let results = Mutex::new(Vec::with_capacity(files.len()));
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(files.len().max(1));
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, AtomicOrdering::Relaxed);
                        let Some((name, path)) = files.get(i) else {
                            break;
                        };
                        let digest = crate::files::open_regular(path)
                            .and_then(Sha256Digest::of_reader)
                            .map(|(d, _)| d)
                            .map_err(|error| ManifestError::Read {
                                path: path.clone(),
                                error,
                            });
                        let item = digest.map(|digest| Resource {
                            name: name.clone(),
                            digest,
                        });
                        results.lock().unwrap_or_else(|p| p.into_inner()).push(item);
                    }
                });
            }
        });
        let resources = results
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        Ok(Self::new(name, resources))
    }

    /// The subject digest: sha256 of the raw resource digests concatenated in order.
    pub fn root_digest(&self) -> Sha256Digest {
        let mut hasher = Sha256Hasher::new();
        for r in &self.resources {
            hasher.update(r.digest.as_bytes());
        }
        hasher.finish()
    }
}

fn is_ignored(relative: &str, ignore: &[String]) -> bool {
    ignore.iter().any(|p| {
        let p = p.trim_end_matches('/');
        relative == p
            || relative
                .strip_prefix(p)
                .is_some_and(|rest| rest.starts_with('/'))
    })
}

fn walk(
    root: &Path,
    dir: &Path,
    ignore: &[String],
    out: &mut Vec<(String, PathBuf)>,
) -> Result<(), ManifestError> {
    let read = |error| ManifestError::Read {
        path: dir.to_owned(),
        error,
    };
    let mut entries = fs::read_dir(dir)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let relative = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .components()
            .map(|c| c.as_os_str().to_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ManifestError::NonUtf8Path(path.clone()))?
            .join("/");
        if is_ignored(&relative, ignore) {
            continue;
        }
        let kind = entry.file_type().map_err(|error| ManifestError::Read {
            path: path.clone(),
            error,
        })?;
        if kind.is_symlink() {
            return Err(ManifestError::Symlink(relative));
        } else if kind.is_dir() {
            walk(root, &path, ignore, out)?;
        } else if kind.is_file() {
            out.push((relative, path));
        } else {
            return Err(ManifestError::NotRegular(relative));
        }
    }
    Ok(())
}

/// A model directory that cannot be hashed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// Reading failed.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The cause.
        error: io::Error,
    },
    /// A symlink (`allow_symlinks` is always false).
    #[error("{0} is a symlink; symlinks are refused")]
    Symlink(String),
    /// A device, socket or pipe.
    #[error("{0} is not a regular file")]
    NotRegular(String),
    /// A path that is not UTF-8 and so has no name in a manifest.
    #[error("{0}: path is not UTF-8")]
    NonUtf8Path(PathBuf),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Predicate {
    serialization: Serialization,
    resources: Vec<ResourceDescriptor>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Serialization {
    method: String,
    hash_type: String,
    allow_symlinks: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ignore_paths: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ResourceDescriptor {
    name: String,
    algorithm: String,
    digest: String,
}

/// Signs a manifest; `ignore_paths` are recorded in the serialization (they should include the
/// signature file when it lies inside the model directory).
pub fn sign(
    manifest: &Manifest,
    ignore_paths: &[String],
    key: &SigningKey,
) -> Result<Bundle, KeyError> {
    let mut ignore: Vec<String> = ignore_paths.to_vec();
    ignore.sort();
    ignore.dedup();
    let statement = Statement {
        type_: STATEMENT_TYPE.to_owned(),
        subject: vec![Subject {
            name: manifest.model_name.clone(),
            digest: manifest.root_digest().into(),
        }],
        predicate_type: PREDICATE_TYPE.to_owned(),
        predicate: Predicate {
            serialization: Serialization {
                method: "files".into(),
                hash_type: "sha256".into(),
                allow_symlinks: false,
                ignore_paths: ignore,
            },
            resources: manifest
                .resources
                .iter()
                .map(|r| ResourceDescriptor {
                    name: r.name.clone(),
                    algorithm: "sha256".into(),
                    digest: r.digest.to_hex(),
                })
                .collect(),
        },
    };
    Bundle::sign(IN_TOTO_PAYLOAD_TYPE, canonical_json(&statement), key)
}

/// A model signature whose signature verified.
#[derive(Debug, Clone)]
pub struct SignedManifest {
    /// The signed manifest.
    pub manifest: Manifest,
    /// Paths the signer left out of the model.
    pub ignore_paths: Vec<String>,
    /// The signing key's hint.
    pub hint: KeyHint,
}

/// Differences between a signed manifest and the files on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManifestDiff {
    /// Signed, absent on disk.
    pub missing: Vec<String>,
    /// On disk, not signed.
    pub extra: Vec<String>,
    /// Present in both with different digests.
    pub changed: Vec<String>,
}

impl ManifestDiff {
    /// True when there is no difference.
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty() && self.changed.is_empty()
    }
}

impl std::fmt::Display for ManifestDiff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        for (what, list) in [
            ("changed", &self.changed),
            ("missing", &self.missing),
            ("not signed", &self.extra),
        ] {
            if !list.is_empty() {
                parts.push(format!("{what}: {}", list.join(", ")));
            }
        }
        f.write_str(&parts.join("; "))
    }
}

/// Compares a signed manifest with the actual one.
pub fn diff(signed: &Manifest, actual: &Manifest) -> ManifestDiff {
    let signed: BTreeMap<&str, Sha256Digest> = signed
        .resources
        .iter()
        .map(|r| (r.name.as_str(), r.digest))
        .collect();
    let actual: BTreeMap<&str, Sha256Digest> = actual
        .resources
        .iter()
        .map(|r| (r.name.as_str(), r.digest))
        .collect();
    let mut d = ManifestDiff::default();
    for (name, digest) in &signed {
        match actual.get(name) {
            None => d.missing.push((*name).to_owned()),
            Some(a) if a != digest => d.changed.push((*name).to_owned()),
            Some(_) => {}
        }
    }
    d.extra = actual
        .keys()
        .filter(|n| !signed.contains_key(*n))
        .map(|n| (*n).to_owned())
        .collect();
    d
}

/// Why a model signature was refused; each variant is one verification step.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelSignatureError {
    /// Step 1.
    #[error("{step}: {0}", step = Step::WellFormed)]
    Malformed(#[from] BundleError),
    /// Step 2.
    #[error(
        "{step}: the signature names key {signed}, but the key given is {given}",
        step = Step::TrustedSigner
    )]
    KeyMismatch {
        /// The bundle's hint.
        signed: KeyHint,
        /// The given key's hint.
        given: KeyHint,
    },
    /// Step 3.
    #[error(
        "{step}: the signature does not verify over the DSSE PAE with the given key",
        step = Step::Signature
    )]
    BadSignature,
    /// Step 4.
    #[error("{step}: {0}", step = Step::StatementType)]
    Statement(#[from] StatementError),
    /// Step 4, predicate content.
    #[error("{step}: {0}", step = Step::StatementType)]
    Predicate(String),
    /// Step 9, reading the directory.
    #[error("{step}: {0}", step = Step::ModelFiles)]
    Manifest(#[from] ManifestError),
    /// Step 9.
    #[error(
        "{step}: the model directory differs from the signed files: {0}",
        step = Step::ModelFiles
    )]
    Files(ManifestDiff),
}

/// Verifies a `model.sig` with `key` (steps 1 to 4) and returns the signed manifest.
pub fn verify_signature(
    signature: &[u8],
    key: &PublicKey,
) -> Result<SignedManifest, ModelSignatureError> {
    let bundle = CheckedBundle::from_json(signature)?;
    if &bundle.hint != key.hint() {
        return Err(ModelSignatureError::KeyMismatch {
            signed: bundle.hint,
            given: key.hint().clone(),
        });
    }
    key.verify(&bundle.envelope.pae(), bundle.signature())
        .map_err(|_| ModelSignatureError::BadSignature)?;
    let statement: Statement<Predicate> = parse_statement(
        &bundle.envelope.payload_type,
        &bundle.envelope.payload,
        PREDICATE_TYPE,
    )?;
    let predicate = statement.predicate;
    let ser = &predicate.serialization;
    if ser.method != "files" {
        return Err(ModelSignatureError::Predicate(format!(
            "serialization method {:?}: only \"files\" is supported",
            ser.method
        )));
    }
    if ser.hash_type != "sha256" {
        return Err(ModelSignatureError::Predicate(format!(
            "hash type {:?}: only sha256 is supported",
            ser.hash_type
        )));
    }
    if ser.allow_symlinks {
        return Err(ModelSignatureError::Predicate(
            "allow_symlinks is true: symlinks are refused".into(),
        ));
    }
    let mut resources = Vec::with_capacity(predicate.resources.len());
    let mut hasher = Sha256Hasher::new();
    for r in &predicate.resources {
        if r.algorithm != "sha256" {
            return Err(ModelSignatureError::Predicate(format!(
                "{}: algorithm {:?}",
                r.name, r.algorithm
            )));
        }
        check_relative_path(&r.name).map_err(|why| {
            ModelSignatureError::Predicate(format!("resource {:?}: {why}", r.name))
        })?;
        let digest: Sha256Digest = r
            .digest
            .parse()
            .map_err(|e| ModelSignatureError::Predicate(format!("resource {:?}: {e}", r.name)))?;
        hasher.update(digest.as_bytes());
        resources.push(Resource {
            name: r.name.clone(),
            digest,
        });
    }
    let subject = &statement.subject[0];
    let root = hasher.finish();
    if root != subject.digest.sha256 {
        return Err(ModelSignatureError::Predicate(format!(
            "the subject digest {} is not the digest of the listed resources ({root})",
            subject.digest.sha256
        )));
    }
    Ok(SignedManifest {
        manifest: Manifest::new(subject.name.clone(), resources),
        ignore_paths: ser.ignore_paths.clone(),
        hint: bundle.hint,
    })
}

/// Verifies a model directory against a signature: steps 1 to 4, then hashes the directory (minus
/// the signed ignore paths and `extra_ignore`, e.g. the signature file itself) and compares (step 9).
pub fn verify_dir(
    dir: &Path,
    signature: &[u8],
    key: &PublicKey,
    extra_ignore: &[String],
) -> Result<SignedManifest, ModelSignatureError> {
    let signed = verify_signature(signature, key)?;
    let mut ignore = signed.ignore_paths.clone();
    ignore.extend(extra_ignore.iter().cloned());
    let actual = Manifest::of_dir(dir, &ignore)?;
    let d = diff(&signed.manifest, &actual);
    if !d.is_empty() {
        return Err(ModelSignatureError::Files(d));
    }
    Ok(signed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, content) in [
            ("model.safetensors", "hello\n"),
            ("sub/c.json", "x\n"),
            ("a.txt", "y\n"),
            ("a.b/q", "z\n"),
            (".git/HEAD", "ref"),
        ] {
            let p = dir.path().join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, content).unwrap();
        }
        dir
    }

    fn default_ignore() -> Vec<String> {
        DEFAULT_IGNORE.iter().map(|s| s.to_string()).collect()
    }

    /// The manifest `model_signing sign key` 1.1.1 made of the same directory (see /tmp notes in the
    /// issue): resources in this order and this root digest.
    #[test]
    fn manifest_matches_model_signing_for_the_same_tree() {
        let dir = model_dir();
        let m = Manifest::of_dir(dir.path(), &default_ignore()).unwrap();
        let names: Vec<&str> = m.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a.b/q", "a.txt", "model.safetensors", "sub/c.json"]);
        assert_eq!(
            m.root_digest().to_hex(),
            "58b79f56c00a872873a0a8cdd2b0a82c8921a2c897c9f9f61fed403da8f14f62"
        );
    }

    #[test]
    fn component_order_is_not_byte_order() {
        let m = Manifest::new(
            "m",
            ["a.b", "a/b", "a-c"]
                .iter()
                .map(|n| Resource {
                    name: n.to_string(),
                    digest: Sha256Digest::of(n.as_bytes()),
                })
                .collect(),
        );
        let names: Vec<&str> = m.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a/b", "a-c", "a.b"]);
    }

    #[test]
    fn sign_then_verify_and_attacks() {
        let dir = model_dir();
        let key = SigningKey::generate().unwrap();
        let mut ignore = default_ignore();
        ignore.push(SIGNATURE_FILE.into());
        let manifest = Manifest::of_dir(dir.path(), &ignore).unwrap();
        let sig = sign(&manifest, &ignore, &key).unwrap().to_json();
        fs::write(dir.path().join(SIGNATURE_FILE), &sig).unwrap();
        let ok = verify_dir(dir.path(), &sig, key.public(), &[]).unwrap();
        assert_eq!(ok.manifest.resources.len(), 4);

        let other = SigningKey::generate().unwrap();
        assert!(matches!(
            verify_dir(dir.path(), &sig, other.public(), &[]).unwrap_err(),
            ModelSignatureError::KeyMismatch { .. }
        ));

        fs::write(dir.path().join("a.txt"), "Y\n").unwrap();
        fs::write(dir.path().join("new.bin"), "n").unwrap();
        fs::remove_file(dir.path().join("sub/c.json")).unwrap();
        match verify_dir(dir.path(), &sig, key.public(), &[]).unwrap_err() {
            ModelSignatureError::Files(d) => {
                assert_eq!(d.changed, ["a.txt"]);
                assert_eq!(d.missing, ["sub/c.json"]);
                assert_eq!(d.extra, ["new.bin"]);
            }
            other => panic!("{other}"),
        }

        #[cfg(unix)]
        {
            std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
            assert!(matches!(
                verify_dir(dir.path(), &sig, key.public(), &[]).unwrap_err(),
                ModelSignatureError::Manifest(ManifestError::Symlink(_))
            ));
        }

        // A payload byte changed: the signature step refuses.
        let mut bundle: serde_json::Value = serde_json::from_slice(&sig).unwrap();
        let payload =
            crate::dsse::decode_base64(bundle["dsseEnvelope"]["payload"].as_str().unwrap())
                .unwrap();
        let edited = String::from_utf8(payload)
            .unwrap()
            .replace("a.txt", "a.tx_");
        bundle["dsseEnvelope"]["payload"] =
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, edited).into();
        assert!(matches!(
            verify_signature(&serde_json::to_vec(&bundle).unwrap(), key.public()).unwrap_err(),
            ModelSignatureError::BadSignature
        ));
    }
}
