//! sanctum's trust core: digests, the approved-models lockfile, weight-format checks and verification of
//! model directories against the lock; and provenance: signing keys, DSSE envelopes in Sigstore bundles,
//! in-toto statements, the trust policy, output attestations (stamping and verification), lock
//! signatures and OpenSSF model signatures. It has no inference engine, so CI can build it quickly.

#![forbid(unsafe_code)]

pub mod attestation;
pub mod audit;
pub mod bundle;
pub mod digest;
pub mod dsse;
pub mod files;
pub mod format;
pub mod gguf;
pub mod keys;
pub mod lock_signature;
pub mod lockfile;
pub mod model_signing;
pub mod pickle;
pub mod policy;
pub mod progress;
pub mod stamp;
pub mod statement;
pub mod verify;

pub use digest::Sha256Digest;
