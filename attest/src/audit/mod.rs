//! The tamper-evident audit log: one JSON entry per audited action (what ran, on which model, the
//! digests of its output and attestation, how it ended; never prompt text), kept as an RFC 6962
//! Merkle tree whose signed checkpoints (C2SP tlog-checkpoint) let the security team prove later
//! that nothing was edited, dropped, reordered or rewritten.

pub mod log;
pub mod merkle;
pub mod note;
pub mod syslog;

pub use log::{AuditError, AuditLog, Entry, Event, Outcome, Verified};
pub use note::Checkpoint;
