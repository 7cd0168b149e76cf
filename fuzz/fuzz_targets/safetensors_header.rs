//! Safetensors: `attest::format`'s checks that every weight file passes before a byte reaches a
//! loader (`check_model_file` by name and content, the streamed form `check_model_file_start`
//! with `start_len`, `check_safetensors`: length prefix, header JSON with duplicate keys,
//! dtypes, shapes, offsets, coverage, metadata, and the `safetensors` crate's own verdict), then,
//! for a file that passed, runner's streaming intake (`SafetensorsIntake`, through
//! `Weights::from_bytes` and in small chunks as the verifier streams) under the plans the loaders
//! use: the embedder's (every float tensor dense), the chat model's `--quant auto`, and q4_K.

#![no_main]

use attest::format::{
    check_model_file, check_model_file_start, check_safetensors, sniff, start_len,
};
use attest::verify::Intake;
use libfuzzer_sys::fuzz_target;
use runner::candle_core::Device;
use runner::kernels::Activations;
use runner::models::llama;
use runner::quant::Quant;
use runner::weights::{SafetensorsIntake, TensorHeader, Weights};

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    let _ = sniff(data);
    let _ = check_model_file("config.json", data);
    let _ = check_model_file("model.safetensors", data);
    let want = usize::try_from(start_len(data, len)).unwrap_or(usize::MAX);
    let start = &data[..want.min(data.len())];
    let _ = check_model_file_start("model.safetensors", start, len);

    // Only a file that passed reaches an intake (attest::verify runs the check on its start).
    if check_safetensors(data).is_err() {
        return;
    }
    let device = Device::Cpu;
    let _ = Weights::from_bytes(data, &device, &mut runner::embed::plan);
    let mut auto =
        |t: &[TensorHeader]| llama::plan(t, llama::auto_quant(t), true, Activations::Int16, false);
    {
        let mut intake = SafetensorsIntake::new(&device, &mut auto);
        let chunk = 1 + data.len() % 61;
        for piece in data.chunks(chunk) {
            if intake.take(piece).is_err() {
                break;
            }
        }
    }
    let mut q4k = |t: &[TensorHeader]| llama::plan(t, Quant::Q4K, false, Activations::Int8, true);
    let _ = Weights::from_bytes(data, &device, &mut q4k);
});
