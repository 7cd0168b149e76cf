//! Where model bytes come from: pinned wheels (pip), hub repositories (hf-hub) and OCI registries
//! (oci-client).
pub mod hf;
pub mod oci;
pub mod pypi;
