//! A model directory's JSON configs, as the loaders read them from verified bytes: `config.json`
//! of each family runner supports (Llama, Mistral and Qwen2 through `llama::Config`, BERT through
//! candle's `bert::Config`, both with `ModelConfig::validate`), `generation_config.json`,
//! `tokenizer_config.json`, sentence-transformers' `modules.json`, pooling config and
//! `sentence_bert_config.json`, and `model.safetensors.index.json`.
//!
//! Input: those files joined by `sanctum_fuzz::FILE_SEP`, in that order (a missing or empty part
//! is a file the model does not have; `config.json` is always there). They go through the real
//! loaders, `ChatModel::load` and `Embedder::load`, on an in-memory model (`MemoryModel`) with a
//! tiny tokenizer. When a validated config is small enough, the weight file holds tensors of the
//! shapes it names, so the load goes through `Llama::load`/`Bert::load` and one forward pass
//! (`ChatModel::eval`, `Embedder::embed`); otherwise the weight file is empty and the load stops
//! at the first missing tensor.

#![no_main]

use libfuzzer_sys::fuzz_target;
use runner::candle_core::Device;
use runner::chat::{ChatModel, LoadOptions};
use runner::embed::Embedder;
use runner::models::config::ModelConfig;
use runner::models::llama::{self, KvPrecision, Variant};
use runner::models::{Family, bert, family};
use sanctum_fuzz::{FILE_SEP, MemoryModel, empty_safetensors, safetensors_f32, split};

/// The other files, in input order after `config.json`.
const FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer_config.json",
    "modules.json",
    "1_Pooling/config.json",
    "sentence_bert_config.json",
    "model.safetensors.index.json",
];

/// A three-word tokenizer: configs are the input here, not tokenizers.
const TOKENIZER: &[u8] = br#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,"model":{"type":"WordLevel","vocab":{"[UNK]":0,"hello":1,"world":2},"unk_token":"[UNK]"}}"#;

/// Most f32 values a generated weight file may hold (2 MiB).
const MAX_VALUES: usize = 1 << 19;

type Shapes = Vec<(String, Vec<usize>)>;

fn total(shapes: &Shapes) -> usize {
    shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .fold(0usize, usize::saturating_add)
}

fn llama_shapes(c: &llama::Config, variant: Variant) -> Option<Shapes> {
    if c.num_hidden_layers > 8 {
        return None;
    }
    let (hidden, hd, inter) = (c.hidden_size, c.head_dim(), c.intermediate_size);
    let (q, kv) = (
        c.num_attention_heads.checked_mul(hd)?,
        c.kv_heads().checked_mul(hd)?,
    );
    let qkv_bias = c.attention_bias.unwrap_or(variant == Variant::Qwen2);
    let o_bias = c.attention_bias.unwrap_or(false) && variant != Variant::Qwen2;
    let mut s: Shapes = vec![
        (
            "model.embed_tokens.weight".into(),
            vec![c.vocab_size, hidden],
        ),
        ("model.norm.weight".into(), vec![hidden]),
    ];
    if !c.tie_word_embeddings {
        s.push(("lm_head.weight".into(), vec![c.vocab_size, hidden]));
    }
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        s.push((format!("{p}.input_layernorm.weight"), vec![hidden]));
        s.push((format!("{p}.post_attention_layernorm.weight"), vec![hidden]));
        for (name, rows, cols, bias) in [
            ("self_attn.q_proj", q, hidden, qkv_bias),
            ("self_attn.k_proj", kv, hidden, qkv_bias),
            ("self_attn.v_proj", kv, hidden, qkv_bias),
            ("self_attn.o_proj", hidden, q, o_bias),
            ("mlp.gate_proj", inter, hidden, c.mlp_bias),
            ("mlp.up_proj", inter, hidden, c.mlp_bias),
            ("mlp.down_proj", hidden, inter, c.mlp_bias),
        ] {
            s.push((format!("{p}.{name}.weight"), vec![rows, cols]));
            if bias {
                s.push((format!("{p}.{name}.bias"), vec![rows]));
            }
        }
    }
    Some(s)
}

fn bert_shapes(c: &bert::Config) -> Option<Shapes> {
    if c.num_hidden_layers > 8 {
        return None;
    }
    let (hidden, inter) = (c.hidden_size, c.intermediate_size);
    let mut s: Shapes = vec![
        (
            "embeddings.word_embeddings.weight".into(),
            vec![c.vocab_size, hidden],
        ),
        (
            "embeddings.position_embeddings.weight".into(),
            vec![c.max_position_embeddings, hidden],
        ),
        (
            "embeddings.token_type_embeddings.weight".into(),
            vec![c.type_vocab_size, hidden],
        ),
        ("embeddings.LayerNorm.weight".into(), vec![hidden]),
        ("embeddings.LayerNorm.bias".into(), vec![hidden]),
    ];
    for i in 0..c.num_hidden_layers {
        let p = format!("encoder.layer.{i}");
        for (name, rows, cols) in [
            ("attention.self.query", hidden, hidden),
            ("attention.self.key", hidden, hidden),
            ("attention.self.value", hidden, hidden),
            ("attention.output.dense", hidden, hidden),
            ("intermediate.dense", inter, hidden),
            ("output.dense", hidden, inter),
        ] {
            s.push((format!("{p}.{name}.weight"), vec![rows, cols]));
            s.push((format!("{p}.{name}.bias"), vec![rows]));
        }
        for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
            s.push((format!("{p}.{norm}.weight"), vec![hidden]));
            s.push((format!("{p}.{norm}.bias"), vec![hidden]));
        }
    }
    Some(s)
}

fn model(parts: &[&[u8]], weights: Vec<u8>) -> MemoryModel {
    let mut files = vec![
        ("config.json", parts[0].to_vec()),
        ("tokenizer.json", TOKENIZER.to_vec()),
    ];
    for (name, part) in FILES.iter().zip(&parts[1..]) {
        if !part.is_empty() {
            files.push((*name, part.to_vec()));
        }
    }
    MemoryModel::new(files, vec![("model.safetensors", weights)])
}

fn options() -> LoadOptions {
    // As `sanctum run` loads: the model's own context, no cap.
    LoadOptions {
        quant: None,
        activations: None,
        device: Device::Cpu,
        context: None,
        context_cap: None,
        kv_cache: KvPrecision::F16,
    }
}

fuzz_target!(|data: &[u8]| {
    let parts = split(data, FILE_SEP, FILES.len() + 1);
    let config = parts[0];

    let probe = model(&parts, empty_safetensors());
    let weights = match family(&probe) {
        Ok(Family::Llama(variant)) => serde_json::from_slice::<llama::Config>(config)
            .ok()
            .filter(|c| c.validate().is_ok())
            .and_then(|c| llama_shapes(&c, variant)),
        Ok(Family::Bert) => serde_json::from_slice::<bert::Config>(config)
            .ok()
            .filter(|c| c.validate().is_ok())
            .and_then(|c| bert_shapes(&c)),
        Err(_) => None,
    }
    .filter(|s| total(s) <= MAX_VALUES)
    .map(|s| safetensors_f32(&s))
    .unwrap_or_else(empty_safetensors);

    if let Ok(chat) = ChatModel::load(model(&parts, weights.clone()), &options()) {
        let mut session = chat.session();
        let last = u32::try_from(chat.vocab().saturating_sub(1)).unwrap_or(0);
        let _ = chat.eval(&mut session, &[0, last.min(1), last]);
    }
    if let Ok(embedder) = Embedder::load(model(&parts, weights), &Device::Cpu) {
        let _ = embedder.embed(&["hello world", ""]);
    }
});
