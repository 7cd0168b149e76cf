//! sanctum's trust core: digests, the approved-models lockfile, weight-format checks and verification of
//! model directories against the lock. It has no inference engine, so CI can build it quickly.

#![forbid(unsafe_code)]

pub mod digest;
pub mod format;
pub mod lockfile;
pub mod progress;
pub mod verify;

pub use digest::Sha256Digest;
