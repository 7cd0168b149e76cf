//! Where model bytes come from: pinned wheels (pip) and hub repositories (hf-hub).
pub mod hf;
pub mod pypi;
