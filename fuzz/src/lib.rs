//! Helpers the fuzz targets share: a fixed signing key (so that a payload can be signed and then
//! reach the code behind the signature check), scratch directories, an in-memory model directory
//! for the loaders, and the splitting of one input into several files.
//!
//! Nothing here asserts anything about the code under test: a target only calls it, and a panic,
//! a hang (libFuzzer's `-timeout`) or a memory blow-up (`-rss_limit_mb`, `-malloc_limit_mb`) is the
//! finding.

use std::path::Path;
use std::sync::OnceLock;

use attest::Sha256Digest;
use attest::keys::{PublicKey, SigningKey};
use attest::verify::{FileProblem, Intake, ModelFiles, VerifiedFile, VerifyError};

/// A P-256 key made for fuzzing only (never trusted by anything but these targets). Fixed, so an
/// input that crashes behind a signature check crashes again when replayed.
const FUZZ_KEY_PEM: &[u8] = include_bytes!("fuzz-signer.key");

/// The fuzzing key.
pub fn key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(owned_key)
}

/// Another handle on the fuzzing key, for an API that takes the key by value (a `Stamper`).
pub fn owned_key() -> SigningKey {
    SigningKey::from_pem(FUZZ_KEY_PEM, b"").expect("the fuzz key parses")
}

/// The fuzzing key's public half.
pub fn public() -> &'static PublicKey {
    key().public()
}

/// A fresh scratch directory, on tmpfs when there is one (the import and the audit log fsync: on
/// a disk that costs milliseconds per run). Removed when dropped.
pub fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let builder = {
        let mut b = tempfile::Builder::new();
        b.prefix("sanctum-fuzz-");
        b
    };
    if shm.is_dir()
        && let Ok(dir) = builder.tempdir_in(shm)
    {
        return dir;
    }
    builder.tempdir().expect("a scratch directory")
}

/// Splits `data` at each occurrence of `sep`, at most `max` parts (the last one keeps the rest).
/// Seeds write their files joined by the same separator.
pub fn split<'a>(data: &'a [u8], sep: &[u8], max: usize) -> Vec<&'a [u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while parts.len() + 1 < max {
        match rest.windows(sep.len()).position(|w| w == sep) {
            Some(at) => {
                parts.push(&rest[..at]);
                rest = &rest[at + sep.len()..];
            }
            None => break,
        }
    }
    parts.push(rest);
    parts
}

/// The separator between the files of a multi-file input (model_config, chat_template).
pub const FILE_SEP: &[u8] = b"\n--8<--\n";

/// A model directory held in memory, as `attest::verify` hands one to the loaders after every
/// file matched the lock: kept files by path, weight files streamed to the loader's intake.
pub struct MemoryModel {
    /// Files kept in memory (configs, tokenizer).
    pub files: Vec<VerifiedFile>,
    /// Weight files, streamed, in order.
    pub weights: Vec<(String, Vec<u8>)>,
    /// Bytes handed to an intake per `take` call (the verifier uses 1 MiB).
    pub chunk: usize,
}

impl MemoryModel {
    /// A model with the given kept files and weight files.
    pub fn new(files: Vec<(&str, Vec<u8>)>, weights: Vec<(&str, Vec<u8>)>) -> Self {
        Self {
            files: files
                .into_iter()
                .map(|(path, bytes)| VerifiedFile {
                    path: path.to_owned(),
                    sha256: Sha256Digest::of(&bytes),
                    bytes,
                })
                .collect(),
            weights: weights
                .into_iter()
                .map(|(p, b)| (p.to_owned(), b))
                .collect(),
            chunk: 1 << 20,
        }
    }
}

impl ModelFiles for MemoryModel {
    fn name(&self) -> &str {
        "fuzz"
    }
    fn digest(&self) -> Sha256Digest {
        Sha256Digest::of(b"fuzz")
    }
    fn file(&self, path: &str) -> Option<&VerifiedFile> {
        self.files.iter().find(|f| f.path == path)
    }
    fn weight_files(&self) -> Vec<String> {
        self.weights.iter().map(|(p, _)| p.clone()).collect()
    }
    fn other_files(&self) -> Vec<&VerifiedFile> {
        self.files.iter().collect()
    }
    fn stream(&mut self, path: &str, intake: &mut dyn Intake) -> Result<(), VerifyError> {
        let Some((_, bytes)) = self.weights.iter().find(|(p, _)| p == path) else {
            return Err(VerifyError::File {
                model: "fuzz".to_owned(),
                path: path.to_owned(),
                problem: FileProblem::NotStreamed,
            });
        };
        // As the verifier does: an intake's refusal ends the load as a file problem.
        for chunk in bytes.chunks(self.chunk.max(1)) {
            intake.take(chunk).map_err(|e| VerifyError::File {
                model: "fuzz".to_owned(),
                path: path.to_owned(),
                problem: FileProblem::Intake(e),
            })?;
        }
        Ok(())
    }
    fn finish(self) -> Result<(), VerifyError> {
        Ok(())
    }
}

/// A Safetensors file with no tensors: the weight file of a [`MemoryModel`] whose loader is to be
/// reached without building weights.
pub fn empty_safetensors() -> Vec<u8> {
    let header = b"{}      ";
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes
}

/// The repository's `models.lock`: the lock the verifiers check attested models against (the
/// seeds' statements name its models).
pub const LOCK: &str = include_str!("../../models.lock");

struct Trust {
    lock: attest::lockfile::Lockfile,
    ring: attest::policy::KeyRing,
    licenses: attest::policy::LicensePolicy,
}

fn trust() -> &'static Trust {
    static TRUST: OnceLock<Trust> = OnceLock::new();
    TRUST.get_or_init(|| {
        let mut ring = attest::policy::KeyRing::new();
        ring.add("fuzz", public().clone());
        Trust {
            lock: attest::lockfile::Lockfile::parse(LOCK).expect("models.lock parses"),
            ring,
            licenses: attest::policy::LicensePolicy::default(),
        }
    })
}

/// Runs every reader of signed bundles on `bundle` with the fuzzing key trusted: output and
/// benchmark attestations (`attest verify`, all eight steps), the lock signature, the OpenSSF
/// model signature. A bundle signed by the fuzzing key gets past the signature check.
pub fn verify_bundle(bundle: &[u8]) {
    let t = trust();
    let status = attest::lock_signature::LockStatus::Unsigned;
    let verifier =
        attest::attestation::verify::Verifier::new(&t.ring, &t.lock, &t.licenses, Ok(status));
    let _ = verifier.verify(bundle, None);
    let _ = verifier.verify(bundle, Some(&Sha256Digest::of(b"")));
    let _ = verifier.verify_bench(bundle, &Sha256Digest::of(b""));
    let _ = attest::lock_signature::verify_lock_signature(LOCK.as_bytes(), bundle, &t.ring);
    let _ = attest::model_signing::verify_signature(bundle, public());
}

/// A Safetensors file of f32 tensors with small, varied values (so norms and softmax stay
/// finite), in the given order.
pub fn safetensors_f32(tensors: &[(String, Vec<usize>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * 4;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header)).expect("JSON");
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    let values = offset / 4;
    out.reserve(offset);
    for i in 0..values {
        let x = ((i * 7919) % 97) as f32 / 97.0 - 0.5;
        out.extend_from_slice(&(x * 0.1 + if i % 5 == 0 { 1.0 } else { 0.0 }).to_le_bytes());
    }
    out
}
