//! `sanctum scan`'s per-file inspection, `scan::inspect::inspect`: format by content, then the
//! header reads (Safetensors validated and its parameters summed, GGUF through
//! `attest::gguf`, pickles and zip members through `attest::pickle`, numpy, ONNX, SavedModel,
//! llamafile). Some formats are told by name too, so the first input byte picks the file's name
//! and the rest is its content, written to a scratch file.

#![no_main]

use libfuzzer_sys::fuzz_target;

const NAMES: &[&str] = &[
    "model.bin",
    "model.safetensors",
    "model.gguf",
    "pytorch_model.bin",
    "model.pt",
    "weights.npz",
    "model.keras",
    "model.onnx",
    "saved_model.pb",
    "model.llamafile",
    "data.pkl",
    "array.npy",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, content)) = data.split_first() else {
        return;
    };
    let name = NAMES[usize::from(pick) % NAMES.len()];
    let scratch = sanctum_fuzz::scratch();
    let path = scratch.path().join(name);
    if std::fs::write(&path, content).is_err() {
        return;
    }
    if let Ok(Some(inspection)) = scan::inspect::inspect(&path) {
        let _ = inspection.pickle_verdict();
        // The report carries it as JSON.
        let _ = serde_json::to_vec(&inspection);
    }
});
