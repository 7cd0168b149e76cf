//! Conversions of other formats into verified-store Safetensors directories.
pub mod gguf;
mod gguf_tokenizer;
pub mod pickle;
