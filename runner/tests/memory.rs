//! Peak memory of a real-size load: a model of over 300M parameters, written as bf16 Safetensors
//! inside the test, loaded verified with in-situ q4_0. The load streams the file, so the process
//! peaks at about the packed weights, never at a copy of the 600 MB file.
//!
//! Its own test binary, with one test, so that `VmHWM` measures this load and nothing running
//! beside it.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use attest::Sha256Digest;
use attest::digest::Sha256Hasher;
use attest::lockfile::{HfSource, LockedFile, ModelEntry, Source, Task};
use attest::progress::NoProgress;
use attest::verify::begin_load;
use candle_core::Device;
use half::bf16;
use runner::chat::{ChatModel, GenerateOptions, LoadOptions};
use runner::models::llama::KvPrecision;
use runner::quant::Quant;
use runner::sampling::SamplingParams;

const VOCAB: usize = 32768;
const HIDDEN: usize = 1152;
const HEADS: usize = 18;
const KV_HEADS: usize = 6;
const HEAD_DIM: usize = HIDDEN / HEADS;
const FFN: usize = 3072;
const LAYERS: usize = 19;
const CONTEXT: usize = 64;

/// Every tensor of the checkpoint, in file order.
fn tensors() -> Vec<(String, Vec<usize>)> {
    let mut t = vec![("model.embed_tokens.weight".to_owned(), vec![VOCAB, HIDDEN])];
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        let kv = KV_HEADS * HEAD_DIM;
        for (name, shape) in [
            ("input_layernorm.weight", vec![HIDDEN]),
            ("self_attn.q_proj.weight", vec![HIDDEN, HIDDEN]),
            ("self_attn.k_proj.weight", vec![kv, HIDDEN]),
            ("self_attn.v_proj.weight", vec![kv, HIDDEN]),
            ("self_attn.o_proj.weight", vec![HIDDEN, HIDDEN]),
            ("post_attention_layernorm.weight", vec![HIDDEN]),
            ("mlp.gate_proj.weight", vec![FFN, HIDDEN]),
            ("mlp.up_proj.weight", vec![FFN, HIDDEN]),
            ("mlp.down_proj.weight", vec![HIDDEN, FFN]),
        ] {
            t.push((format!("{p}.{name}"), shape));
        }
    }
    t.push(("model.norm.weight".to_owned(), vec![HIDDEN]));
    t
}

/// Writes the bf16 checkpoint a megabyte at a time (random weights; norms at 1), returning its
/// digest and size. The test process never holds the file.
fn write_weights(path: &Path) -> (Sha256Digest, u64, u64) {
    let tensors = tensors();
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    let mut parameters = 0u64;
    for (name, shape) in &tensors {
        let len = shape.iter().product::<usize>() * 2;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
        parameters += (len / 2) as u64;
    }
    let mut header = serde_json::to_vec(&header).expect("header");
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut out = BufWriter::new(File::create(path).expect("creates"));
    let mut hasher = Sha256Hasher::new();
    let mut size = 0u64;
    let mut put = |bytes: &[u8]| {
        hasher.update(bytes);
        out.write_all(bytes).expect("writes");
        size += bytes.len() as u64;
    };
    put(&(header.len() as u64).to_le_bytes());
    put(&header);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = Vec::with_capacity(1 << 20);
    for (name, shape) in &tensors {
        let n: usize = shape.iter().product();
        let norm = name.ends_with("norm.weight");
        for _ in 0..n {
            let value = if norm {
                1.0
            } else {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.06
            };
            buf.extend_from_slice(&bf16::from_f32(value).to_le_bytes());
            if buf.len() >= 1 << 20 {
                put(&buf);
                buf.clear();
            }
        }
    }
    put(&buf);
    out.flush().expect("flushes");
    (hasher.finish(), size, parameters)
}

fn write_file(dir: &Path, path: &str, bytes: &[u8]) -> LockedFile {
    std::fs::write(dir.join(path), bytes).expect("writes");
    LockedFile {
        path: path.to_owned(),
        sha256: Sha256Digest::of(bytes),
        size: bytes.len() as u64,
    }
}

fn vm_hwm_bytes() -> u64 {
    runner::bench::peak_rss_bytes().expect("VmHWM is readable on Linux")
}

#[test]
fn a_300m_parameter_bf16_model_loads_in_q4_0_within_1_3x_of_its_packed_weights() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN, "intermediate_size": FFN,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5, "vocab_size": VOCAB, "tie_word_embeddings": true,
        "max_position_embeddings": 2048,
    });
    let words: serde_json::Map<String, serde_json::Value> =
        (0..64).map(|i| (format!("w{i}"), i.into())).collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": words, "unk_token": "w0"},
    });
    let mut files = vec![
        write_file(dir.path(), "config.json", config.to_string().as_bytes()),
        write_file(
            dir.path(),
            "tokenizer.json",
            tokenizer.to_string().as_bytes(),
        ),
    ];
    let (sha256, size, parameters) = write_weights(&dir.path().join("model.safetensors"));
    assert!(parameters >= 300_000_000, "{parameters} parameters");
    files.push(LockedFile {
        path: "model.safetensors".to_owned(),
        sha256,
        size,
    });
    let source = Source::Hf(HfSource {
        repo: "org/big".to_owned(),
        revision: "0123456789abcdef0123456789abcdef01234567".to_owned(),
        files: None,
    });
    let entry = ModelEntry::new("big", Task::Chat, "llama", "MIT", source, files);

    assert!(runner::bench::reset_peak_rss(), "VmHWM can be reset");
    let before = vm_hwm_bytes();
    let opened = begin_load(
        &entry,
        dir.path(),
        &NoProgress,
        attest::format::is_safetensors_name,
    )
    .expect("opens");
    let options = LoadOptions {
        quant: Some(Quant::Q4_0),
        activations: None,
        device: Device::Cpu,
        context: Some(CONTEXT),
        context_cap: None,
        kv_cache: KvPrecision::F16,
    };
    let model = ChatModel::load(opened, &options).expect("loads");
    let peak = vm_hwm_bytes();

    let weights = model.weight_bytes();
    // Keys and values of every position, 2 bytes each.
    let kv = (2 * LAYERS * KV_HEADS * HEAD_DIM * CONTEXT * 2) as u64;
    assert_eq!(model.parameters(), parameters);
    // The embedding table is the output head, kept at 8 bits; every layer matrix is q4_0.
    assert!(
        model
            .choices()
            .iter()
            .filter(|c| c.tensor != "model.embed_tokens.weight")
            .all(|c| c.used == Quant::Q4_0)
    );
    let budget = (weights + kv) as f64 * 1.3;
    eprintln!(
        "file {:.0} MB, packed weights {:.0} MB, KV {:.1} MB, peak RSS {:.0} MB (before the load {:.0} MB), budget {:.0} MB",
        size as f64 / 1e6,
        weights as f64 / 1e6,
        kv as f64 / 1e6,
        peak as f64 / 1e6,
        before as f64 / 1e6,
        budget / 1e6
    );
    assert!(
        (peak as f64) < budget,
        "peak RSS {peak} bytes is over 1.3 x (weights {weights} + KV {kv})"
    );

    // And it runs.
    let mut session = model.session();
    let options = GenerateOptions {
        max_tokens: Some(2),
        stop: Vec::new(),
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
    };
    let reply = model
        .generate(&mut session, &[1, 2, 3], &options, &mut |_| {
            std::ops::ControlFlow::Continue(())
        })
        .expect("generates");
    assert_eq!(reply.tokens.len(), 2);
}
