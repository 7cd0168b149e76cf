//! sanctum's runner: the local model store, the sources models are pulled from, the import that turns
//! other formats into Safetensors, and (later) inference. Nothing here loads a byte that `attest` has not
//! verified against the lock.

pub mod import;
pub mod source;
pub mod store;
