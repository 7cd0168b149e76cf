//! GGUF (llama.cpp's format), as `sanctum import gguf` and `sanctum scan` read it:
//! `attest::gguf::read_header` (every count, length, type, alignment and tensor extent checked
//! against the file size) on the bytes, then the whole import, `runner::import::gguf::import_gguf`
//! (header check, candle's parse, hyperparameters, tensor plan, tokenizer and chat template from
//! the metadata, config validation, deterministic Safetensors), on a scratch file into a scratch
//! directory.

#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use runner::import::gguf::import_gguf;

fuzz_target!(|data: &[u8]| {
    let _ = attest::gguf::read_header(Cursor::new(data), data.len() as u64);
    let scratch = sanctum_fuzz::scratch();
    let input = scratch.path().join("model.gguf");
    if std::fs::write(&input, data).is_err() {
        return;
    }
    let _ = import_gguf(&input, &scratch.path().join("out"));
});
