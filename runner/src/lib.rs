//! sanctum's runner: the local model store, the sources models are pulled from, the import that turns
//! other formats into Safetensors, and inference:
//! chat models ([`chat`]) and sentence embeddings ([`embed`]) built from verified bytes only, with
//! weights quantized in memory at load ([`quant`]). Nothing here loads a byte that `attest` has not
//! verified against the lock.

pub mod batch;
pub mod bench;
pub mod chat;
pub mod device;
pub mod embed;
pub mod engine;
pub mod hardware;
pub mod import;
pub mod kernels;
pub mod models;
pub mod quality;
pub mod quant;
pub mod quantize;
pub mod sampling;
pub mod source;
pub mod staging;
pub mod store;
pub mod stream;
pub mod template;
#[doc(hidden)]
pub mod testing;
pub mod weights;

/// candle at the version the runner is built with, so benchmarks can compare its kernels with
/// [`kernels`].
pub use candle_core;
