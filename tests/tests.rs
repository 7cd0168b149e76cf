//! Integration tests: drive the `sanctum` binary against real and synthetic models.

mod support;

mod attacks;
mod attestation;
mod audit;
mod bench;
mod crash;
mod hostile;
mod hub;
mod import;
mod inference;
mod lockfile;
mod oci;
mod policy;
mod pull;
mod scan;
mod serve;
mod serve_clients;
