//! Output attestations: where they are kept ([`layout`]) and how they are verified ([`verify`]).
//! Making them is [`crate::stamp`].

pub mod layout;
pub mod verify;

pub use verify::{Step, VerificationError, VerifiedAttestation, VerifiedBench, Verifier};
