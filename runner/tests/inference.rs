//! Inference on tiny models made here: Safetensors weights and tokenizer files written to a temporary
//! directory, approved through a lock entry built on the spot, and read back verified, exactly as
//! sanctum loads real models.
//!
//! The "chain" Llama has identity embeddings, zero attention and MLP weights and an output head that
//! maps each token to one successor, so greedy generation follows a table: after "\n" it writes
//! `Hé€!` byte by byte (é and € are split across tokens) and then `<|im_end|>`.

#[path = "../../tests/support/byte_level.rs"]
mod byte_level;
use byte_level::bytes_to_unicode;

use std::collections::HashMap;
use std::fs;
use std::ops::ControlFlow;

use attest::Sha256Digest;
use attest::format::is_safetensors_name;
use attest::lockfile::{HfSource, LockedFile, ModelEntry, Source, Task};
use attest::progress::NoProgress;
use attest::verify::{VerifiedModel, begin_load, load_verified};
use runner::batch::{Batcher, Event, Job, Limits, Sink};
use runner::chat::{
    ChatModel, GenerateError, GenerateOptions, Generation, LoadOptions, StopReason,
};
use runner::device::Device;
use runner::embed::{Embedder, Pooling};
use runner::kernels::Activations;
use runner::models::LoadError;
use runner::quant::Quant;
use runner::sampling::SamplingParams;
use runner::template::Message;
use safetensors::{Dtype, tensor::TensorView};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// Making and verifying models

/// Writes `files` into a fresh directory, approves them in a lock entry, and loads them verified,
/// every file kept in memory.
fn verified(
    name: &str,
    task: Task,
    architecture: &str,
    files: &[(&str, Vec<u8>)],
) -> (TempDir, VerifiedModel) {
    let (dir, entry) = stored(name, task, architecture, files);
    let model = load_verified(&entry, dir.path(), &NoProgress).unwrap();
    (dir, model)
}

/// Writes `files` into a fresh directory and approves them in a lock entry.
fn stored(
    name: &str,
    task: Task,
    architecture: &str,
    files: &[(&str, Vec<u8>)],
) -> (TempDir, ModelEntry) {
    let dir = TempDir::new().unwrap();
    let mut locked = Vec::new();
    for (path, bytes) in files {
        let full = dir.path().join(path);
        fs::create_dir_all(full.parent().unwrap()).unwrap();
        fs::write(&full, bytes).unwrap();
        locked.push(LockedFile {
            path: (*path).to_owned(),
            sha256: Sha256Digest::of(bytes),
            size: bytes.len() as u64,
        });
    }
    let source = Source::Hf(HfSource {
        repo: "org/tiny".to_owned(),
        revision: "0123456789abcdef0123456789abcdef01234567".to_owned(),
        files: None,
    });
    let entry = ModelEntry::new(name, task, architecture, "Apache-2.0", source, locked);
    (dir, entry)
}

fn safetensors_f32(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            (
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

/// Deterministic pseudo-random values in [-scale, scale): `runner::testing::values` from a seed
/// stepped once, so nearby seeds give unrelated sequences.
fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    runner::testing::values(n, runner::testing::lcg_step(seed), scale)
}

// ---------------------------------------------------------------------------------------------
// A byte-level BPE tokenizer: ids 0..=255 are the bytes, then three special tokens.

const EOT: u32 = 256; // <|endoftext|>
const IM_START: u32 = 257;
const IM_END: u32 = 258;
const VOCAB: usize = 288; // model rows; ids above 258 are never produced by the tokenizer

fn tokenizer_json() -> Vec<u8> {
    let vocab: serde_json::Map<String, serde_json::Value> = bytes_to_unicode()
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i.into()))
        .chain([
            ("<|endoftext|>".to_owned(), EOT.into()),
            ("<|im_start|>".to_owned(), IM_START.into()),
            ("<|im_end|>".to_owned(), IM_END.into()),
        ])
        .collect();
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    serde_json::to_vec(&serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(EOT, "<|endoftext|>"), special(IM_START, "<|im_start|>"), special(IM_END, "<|im_end|>")],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []}
    }))
    .unwrap()
}

const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are tiny.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn tokenizer_config() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "chat_template": CHATML,
    }))
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tiny Llamas

struct Shape {
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    ffn: usize,
    layers: usize,
}

fn llama_config(s: &Shape, max_positions: usize, architecture: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architectures": [architecture],
        "model_type": "llama",
        "hidden_size": s.hidden,
        "intermediate_size": s.ffn,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.hidden / s.heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": max_positions,
        "vocab_size": VOCAB,
        "tie_word_embeddings": false,
        "hidden_act": "silu",
        "bos_token_id": IM_START,
        "eos_token_id": IM_END,
    }))
    .unwrap()
}

/// Layer weights: zero (chain model) or small random values; with q, k, v biases for Qwen2.
fn llama_weights(
    s: &Shape,
    embed: Vec<f32>,
    head: Vec<f32>,
    random_layers: bool,
    qkv_bias: bool,
) -> Vec<u8> {
    let h = s.hidden;
    let hd = h / s.heads;
    let mut seed = 1;
    let mut w = |rows: usize, cols: usize| {
        seed += 1;
        if random_layers {
            values(seed, rows * cols, 0.2)
        } else {
            vec![0.0; rows * cols]
        }
    };
    let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = vec![
        ("model.embed_tokens.weight".into(), vec![VOCAB, h], embed),
        ("lm_head.weight".into(), vec![VOCAB, h], head),
        ("model.norm.weight".into(), vec![h], vec![1.0; h]),
    ];
    for i in 0..s.layers {
        let p = format!("model.layers.{i}");
        let mut add =
            |name: &str, shape: Vec<usize>, v: Vec<f32>| t.push((format!("{p}.{name}"), shape, v));
        add("input_layernorm.weight", vec![h], vec![1.0; h]);
        add("post_attention_layernorm.weight", vec![h], vec![1.0; h]);
        add(
            "self_attn.q_proj.weight",
            vec![s.heads * hd, h],
            w(s.heads * hd, h),
        );
        add(
            "self_attn.k_proj.weight",
            vec![s.kv_heads * hd, h],
            w(s.kv_heads * hd, h),
        );
        add(
            "self_attn.v_proj.weight",
            vec![s.kv_heads * hd, h],
            w(s.kv_heads * hd, h),
        );
        add(
            "self_attn.o_proj.weight",
            vec![h, s.heads * hd],
            w(h, s.heads * hd),
        );
        if qkv_bias {
            add(
                "self_attn.q_proj.bias",
                vec![s.heads * hd],
                w(s.heads * hd, 1),
            );
            add(
                "self_attn.k_proj.bias",
                vec![s.kv_heads * hd],
                w(s.kv_heads * hd, 1),
            );
            add(
                "self_attn.v_proj.bias",
                vec![s.kv_heads * hd],
                w(s.kv_heads * hd, 1),
            );
        }
        add("mlp.gate_proj.weight", vec![s.ffn, h], w(s.ffn, h));
        add("mlp.up_proj.weight", vec![s.ffn, h], w(s.ffn, h));
        add("mlp.down_proj.weight", vec![h, s.ffn], w(h, s.ffn));
    }
    safetensors_f32(&t)
}

/// The text the chain model writes after "\n".
const CHAIN_TEXT: &str = "Hé€!";

const CHAIN: Shape = Shape {
    hidden: VOCAB,
    heads: 2,
    kv_heads: 1,
    ffn: 64,
    layers: 2,
};

/// Identity embeddings, an output head mapping "\n" → H → é → € → ! → <|im_end|> (each other token
/// → <|im_end|>), its logits scaled by `sharpness`.
fn chain_files(sharpness: f32, max_positions: usize) -> Vec<(&'static str, Vec<u8>)> {
    let h = CHAIN.hidden;
    let mut embed = vec![0.0; VOCAB * h];
    for i in 0..VOCAB {
        embed[i * h + i] = 1.0;
    }
    let mut next: HashMap<u32, u32> = HashMap::new();
    let mut prev = u32::from(b'\n');
    for b in CHAIN_TEXT.bytes() {
        next.insert(prev, u32::from(b));
        prev = u32::from(b);
    }
    next.insert(prev, IM_END);
    let mut head = vec![0.0; VOCAB * h];
    for t in 0..VOCAB as u32 {
        let to = next.get(&t).copied().unwrap_or(IM_END);
        head[to as usize * h + t as usize] = sharpness;
    }
    vec![
        (
            "config.json",
            llama_config(&CHAIN, max_positions, "LlamaForCausalLM"),
        ),
        (
            "model.safetensors",
            llama_weights(&CHAIN, embed, head, false, false),
        ),
        ("tokenizer.json", tokenizer_json()),
        ("tokenizer_config.json", tokenizer_config()),
    ]
}

fn random_llama_files() -> Vec<(&'static str, Vec<u8>)> {
    random_files("LlamaForCausalLM", false)
}

fn random_files(architecture: &str, qkv_bias: bool) -> Vec<(&'static str, Vec<u8>)> {
    let s = Shape {
        hidden: 64,
        heads: 4,
        kv_heads: 2,
        ffn: 128,
        layers: 2,
    };
    let embed = values(100, VOCAB * s.hidden, 1.0);
    let head = values(200, VOCAB * s.hidden, 1.0);
    vec![
        ("config.json", llama_config(&s, 256, architecture)),
        (
            "model.safetensors",
            llama_weights(&s, embed, head, true, qkv_bias),
        ),
        ("tokenizer.json", tokenizer_json()),
        ("tokenizer_config.json", tokenizer_config()),
    ]
}

fn load(
    files: &[(&str, Vec<u8>)],
    quant: Quant,
    context: Option<usize>,
) -> Result<ChatModel, LoadError> {
    let (dir, entry) = stored("tiny-llama", Task::Chat, "llama", files);
    let opened = begin_load(&entry, dir.path(), &NoProgress, is_safetensors_name).unwrap();
    ChatModel::load(
        opened,
        &LoadOptions {
            quant: Some(quant),
            activations: None,
            device: Device::Cpu,
            context,
            context_cap: None,
            kv_cache: Default::default(),
        },
    )
}

fn chain_model(quant: Quant) -> ChatModel {
    load(&chain_files(1.0, 64), quant, None).unwrap()
}

fn greedy() -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    }
}

fn options(max_tokens: Option<usize>, stop: &[&str], sampling: SamplingParams) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        stop: stop.iter().map(|s| s.to_string()).collect(),
        sampling,
    }
}

/// Runs one user turn through the template; returns the generation and the streamed pieces.
fn ask(model: &mut ChatModel, user: &str, opts: &GenerateOptions) -> (Generation, Vec<String>) {
    let prompt = model.render(&[Message::new("user", user)], true).unwrap();
    let tokens = model.tokenize_rendered(&prompt).unwrap();
    let mut pieces = Vec::new();
    let g = model
        .generate(&mut model.session(), &tokens, opts, &mut |t| {
            pieces.push(t.to_owned());
            ControlFlow::Continue(())
        })
        .unwrap();
    (g, pieces)
}

// ---------------------------------------------------------------------------------------------
// Chat template

#[test]
fn template_renders_like_transformers() {
    let model = chain_model(Quant::F32);
    let text = model
        .render(
            &[Message::new("user", "Hi"), Message::new("assistant", "Yo")],
            false,
        )
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are tiny.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
    );
    let text = model
        .render(
            &[
                Message::new("system", "Be brief."),
                Message::new("user", "Hi"),
            ],
            true,
        )
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    // Special tokens written in the text become single ids.
    let ids = model.tokenize_rendered(&text).unwrap();
    assert_eq!(ids[0], IM_START);
    assert_eq!(*ids.last().unwrap(), u32::from(b'\n'));
    assert_eq!(ids.iter().filter(|&&t| t == IM_END).count(), 2);
}

#[test]
fn template_variables_and_helpers() {
    let mut files = chain_files(1.0, 64);
    let template = "{{ bos_token }}{% for m in messages %}{{ m.content | trim | upper }}{% endfor %}\
                    {{ eos_token }}{% if strftime_now('%Y') | length != 4 %}{{ raise_exception('bad date') }}{% endif %}\
                    {% if messages | length > 1 %}{{ raise_exception('only one message, please') }}{% endif %}";
    files[3].1 = serde_json::to_vec(&serde_json::json!({
        "bos_token": {"content": "<s>", "__type": "AddedToken"},
        "eos_token": "</s>",
        "chat_template": template,
    }))
    .unwrap();
    let model = load(&files, Quant::F32, None).unwrap();
    assert_eq!(
        model
            .render(&[Message::new("user", "  hi ")], false)
            .unwrap(),
        "<s>HI</s>"
    );
    let err = model
        .render(
            &[Message::new("user", "a"), Message::new("user", "b")],
            false,
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("only one message, please"),
        "{err}"
    );
}

#[test]
fn a_model_without_template_asks_for_raw() {
    let mut files = chain_files(1.0, 64);
    files[3].1 = br#"{"eos_token": "<|im_end|>"}"#.to_vec();
    let model = load(&files, Quant::F32, None).unwrap();
    assert!(!model.has_template());
    let err = model
        .render(&[Message::new("user", "x")], true)
        .unwrap_err();
    assert!(matches!(err, GenerateError::NoTemplate(_)), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Generation, stops and streaming

#[test]
fn greedy_follows_the_chain_and_stops_at_end_of_turn() {
    let mut model = chain_model(Quant::F32);
    let (g, _) = ask(&mut model, "go", &options(None, &[], greedy()));
    assert_eq!(g.text, CHAIN_TEXT);
    assert_eq!(g.stop, StopReason::EndOfTurn);
    assert_eq!(g.tokens.len(), CHAIN_TEXT.len());
    assert_eq!(model.stop_tokens(), [EOT, IM_END]);
}

#[test]
fn characters_split_across_tokens_stream_whole() {
    let mut model = chain_model(Quant::F32);
    let (g, pieces) = ask(&mut model, "go", &options(None, &[], greedy()));
    // é is two tokens and € three: each arrives only once complete.
    assert_eq!(pieces, ["H", "é", "€", "!"]);
    assert_eq!(pieces.concat(), g.text);
}

#[test]
fn stop_strings_and_max_tokens() {
    let mut model = chain_model(Quant::F32);
    let (g, pieces) = ask(&mut model, "go", &options(None, &["€"], greedy()));
    assert_eq!((g.text.as_str(), g.stop), ("Hé", StopReason::StopString));
    assert_eq!(pieces.concat(), "Hé");

    let (g, _) = ask(&mut model, "go", &options(None, &["é€"], greedy()));
    assert_eq!((g.text.as_str(), g.stop), ("H", StopReason::StopString));

    // Two tokens: "H" and the first byte of é, which is never emitted half.
    let (g, _) = ask(&mut model, "go", &options(Some(2), &[], greedy()));
    assert_eq!(g.stop, StopReason::MaxTokens);
    assert_eq!(g.tokens.len(), 2);
    assert!(g.text.starts_with('H'));

    let (g, _) = ask(&mut model, "go", &options(Some(0), &[], greedy()));
    assert_eq!((g.text.as_str(), g.stop), ("", StopReason::MaxTokens));
}

#[test]
fn a_sink_can_cancel() {
    let model = chain_model(Quant::F32);
    let tokens = model
        .tokenize_rendered(&model.render(&[Message::new("user", "x")], true).unwrap())
        .unwrap();
    let g = model
        .generate(
            &mut model.session(),
            &tokens,
            &options(None, &[], greedy()),
            &mut |_| ControlFlow::Break(()),
        )
        .unwrap();
    assert_eq!((g.text.as_str(), g.stop), ("H", StopReason::Cancelled));
}

#[test]
fn float_checkpoints_default_to_q8_0_with_16_bit_activations() {
    let (_dir, model) = verified("tiny-llama", Task::Chat, "llama", &chain_files(1.0, 64));
    let options = LoadOptions {
        quant: None,
        activations: None,
        device: Device::Cpu,
        context: None,
        context_cap: None,
        kv_cache: Default::default(),
    };
    let model = ChatModel::load(model, &options).unwrap();
    assert_eq!(model.quant(), runner::quant::AUTO_FOR_FLOATS);
    assert_eq!(model.quant(), Quant::Q8_0);
    assert_eq!(model.activations(), Some(Activations::Int16));
    assert_eq!(model.arithmetic(), "q8_0+int16");
}

#[test]
fn every_quantization_runs_and_reports_fallbacks() {
    for quant in runner::quant::ALL {
        let mut model = chain_model(quant);
        let (g, _) = ask(&mut model, "go", &options(None, &[], greedy()));
        assert_eq!(g.text, CHAIN_TEXT, "{quant}");
        let fallbacks: Vec<_> = model.choices().iter().filter(|c| c.used != quant).collect();
        match quant {
            // Rows of 288 and 64 do not fit blocks of 256.
            Quant::Q4K | Quant::Q5K | Quant::Q6K => assert!(!fallbacks.is_empty(), "{quant}"),
            // q4_1, q5_0 and q5_1 need an even number of blocks: 288 is 9 blocks.
            Quant::Q4_1 | Quant::Q5_0 | Quant::Q5_1 => {
                assert!(fallbacks.iter().any(|c| c.used == Quant::F16), "{quant}")
            }
            // The output head is kept at 6 bits (here q8_0: rows of 288).
            Quant::Q4_0 => {
                assert_eq!(fallbacks.len(), 1, "{quant}");
                assert_eq!(fallbacks[0].tensor, "lm_head.weight");
                assert!(fallbacks[0].reason.is_some());
            }
            _ => assert!(fallbacks.is_empty(), "{quant}: {fallbacks:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sampling determinism

fn sampled(seed: u64, quant: Quant) -> Vec<u8> {
    // A flat head: every token about as likely, so the seed decides everything.
    let mut model = load(&chain_files(0.05, 64), quant, None).unwrap();
    let sampling = SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        seed,
        ..SamplingParams::default()
    };
    let (g, pieces) = ask(&mut model, "go", &options(Some(24), &[], sampling));
    assert_eq!(pieces.concat(), g.text);
    g.tokens
        .iter()
        .flat_map(|t| t.to_le_bytes())
        .chain(g.text.into_bytes())
        .collect()
}

#[test]
fn same_seed_same_bytes() {
    assert_eq!(sampled(42, Quant::F32), sampled(42, Quant::F32));
    assert_eq!(sampled(42, Quant::Q8_0), sampled(42, Quant::Q8_0));
    assert_ne!(sampled(42, Quant::F32), sampled(43, Quant::F32));
}

#[test]
fn invalid_sampling_is_refused() {
    let model = chain_model(Quant::F32);
    let bad = SamplingParams {
        top_p: 1.5,
        ..SamplingParams::default()
    };
    let err = model.generate(
        &mut model.session(),
        &[1, 2],
        &options(None, &[], bad),
        &mut |_| ControlFlow::Continue(()),
    );
    assert!(matches!(err, Err(GenerateError::Sampling(_))));
}

// ---------------------------------------------------------------------------------------------
// Context and the key/value cache

#[test]
fn a_prompt_longer_than_the_context_is_an_error() {
    let model = load(&chain_files(1.0, 64), Quant::F32, Some(16)).unwrap();
    assert_eq!(model.context(), 16);
    let long: Vec<u32> = vec![u32::from(b'a'); 16];
    let err = model
        .generate(
            &mut model.session(),
            &long,
            &options(None, &[], greedy()),
            &mut |_| ControlFlow::Continue(()),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            GenerateError::PromptTooLong {
                tokens: 16,
                context: 16
            }
        ),
        "{err}"
    );

    // Generation that reaches the end of the context stops there: after "\n" the chain goes on
    // for eight tokens ("Hé€!" byte by byte, then <|im_end|>); a context of 16 after 13 prompt
    // tokens takes three more, and the fourth is sampled from the last position.
    let mut short: Vec<u32> = vec![u32::from(b'a'); 12];
    short.push(u32::from(b'\n'));
    let g = model
        .generate(
            &mut model.session(),
            &short,
            &options(None, &[], greedy()),
            &mut |_| ControlFlow::Continue(()),
        )
        .unwrap();
    assert_eq!(g.stop, StopReason::ContextFull);
    assert_eq!(g.tokens, [u32::from(b'H'), 0xC3, 0xA9, 0xE2]);
}

#[test]
fn a_context_above_the_models_is_refused() {
    let err = load(&chain_files(1.0, 64), Quant::F32, Some(65)).unwrap_err();
    assert!(
        matches!(
            err,
            LoadError::Context {
                requested: 65,
                max: 64,
                ..
            }
        ),
        "{err}"
    );
}

/// A cap (the server's default context) shortens a long context and never lengthens a short one;
/// an explicit context is not capped.
#[test]
fn a_context_cap_applies_only_without_a_context() {
    let files = chain_files(1.0, 64);
    let with = |context, cap| {
        let (_dir, model) = verified("tiny-llama", Task::Chat, "llama", &files);
        let options = LoadOptions {
            quant: Some(Quant::F32),
            activations: None,
            device: Device::Cpu,
            context,
            context_cap: cap,
            kv_cache: Default::default(),
        };
        ChatModel::load(model, &options).unwrap().context()
    };
    assert_eq!(with(None, Some(16)), 16);
    assert_eq!(with(None, Some(1000)), 64);
    assert_eq!(with(Some(40), Some(16)), 40);
    assert_eq!(with(None, None), 64);
}

#[test]
fn the_cache_is_reused_across_turns_and_gives_the_same_tokens() {
    let files = random_llama_files();
    let opts = options(Some(6), &[], greedy());
    let chat = load(&files, Quant::F32, None).unwrap();
    let mut session = chat.session();
    let mut history = vec![Message::new("user", "first question")];
    let t1 = chat
        .tokenize_rendered(&chat.render(&history, true).unwrap())
        .unwrap();
    let g1 = chat
        .generate(&mut session, &t1, &opts, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(g1.prompt_evaluated, t1.len());
    history.push(Message::new("assistant", g1.text.as_str()));
    history.push(Message::new("user", "second"));
    let t2 = chat
        .tokenize_rendered(&chat.render(&history, true).unwrap())
        .unwrap();
    let g2 = chat
        .generate(&mut session, &t2, &opts, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    assert!(
        g2.prompt_evaluated < t2.len() - t1.len() + 8,
        "{} of {}",
        g2.prompt_evaluated,
        t2.len()
    );

    let fresh = load(&files, Quant::F32, None).unwrap();
    let g3 = fresh
        .generate(&mut fresh.session(), &t2, &opts, &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(g3.prompt_evaluated, t2.len());
    assert_eq!(g2.tokens, g3.tokens);

    assert!(session.cached_tokens() > t2.len());
    session.reset();
    assert_eq!(session.cached_tokens(), 0);
}

#[test]
fn qwen2_checkpoints_run_with_their_biases() {
    let err = load(&random_files("Qwen2ForCausalLM", false), Quant::F32, None).unwrap_err();
    assert!(err.to_string().contains("q_proj.bias"), "{err}");

    let files = random_files("Qwen2ForCausalLM", true);
    let mut model = load(&files, Quant::F32, None).unwrap();
    let (with_bias, _) = ask(&mut model, "hi", &options(Some(8), &[], greedy()));
    assert!(!with_bias.tokens.is_empty());
    // The same weights read as Llama ignore the biases and generate something else.
    let mut files = files;
    let config = String::from_utf8(files[0].1.clone()).unwrap();
    files[0].1 = config
        .replace("Qwen2ForCausalLM", "LlamaForCausalLM")
        .into_bytes();
    let mut llama = load(&files, Quant::F32, None).unwrap();
    let (without, _) = ask(&mut llama, "hi", &options(Some(8), &[], greedy()));
    assert_ne!(with_bias.tokens, without.tokens);
}

#[test]
fn unsupported_architectures_are_named() {
    let mut files = chain_files(1.0, 64);
    files[0].1 = br#"{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}"#.to_vec();
    let err = load(&files, Quant::F32, None).unwrap_err();
    assert!(
        matches!(&err, LoadError::UnsupportedArchitecture { architecture, .. } if architecture == "GPT2LMHeadModel"),
        "{err}"
    );
    assert!(err.to_string().contains("GPT2LMHeadModel"));
}

// ---------------------------------------------------------------------------------------------
// A tiny BERT

const BERT_WORDS: [&str; 16] = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "man", "is", "eating", "food", "bread", "riding",
    "horse", ".", "piece", "of", "the",
];

fn bert_files(with_head: bool) -> Vec<(&'static str, Vec<u8>)> {
    let (h, layers, ffn, positions) = (32usize, 2usize, 64usize, 64usize);
    let vocab = BERT_WORDS.len();
    let config = serde_json::json!({
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": vocab, "hidden_size": h,
        "num_hidden_layers": layers, "num_attention_heads": 2, "intermediate_size": ffn,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": positions, "type_vocab_size": 2, "initializer_range": 0.02,
        "layer_norm_eps": 1e-12, "pad_token_id": 0, "position_embedding_type": "absolute",
    });
    let mut seed = 10;
    let mut rand = |n: usize| {
        seed += 1;
        values(seed, n, 0.5)
    };
    let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = vec![
        (
            "embeddings.word_embeddings.weight".into(),
            vec![vocab, h],
            rand(vocab * h),
        ),
        (
            "embeddings.position_embeddings.weight".into(),
            vec![positions, h],
            rand(positions * h),
        ),
        (
            "embeddings.token_type_embeddings.weight".into(),
            vec![2, h],
            rand(2 * h),
        ),
        ("embeddings.LayerNorm.weight".into(), vec![h], vec![1.0; h]),
        ("embeddings.LayerNorm.bias".into(), vec![h], vec![0.0; h]),
    ];
    for i in 0..layers {
        let p = format!("encoder.layer.{i}");
        for (name, rows, cols) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", ffn, h),
            ("output.dense", h, ffn),
        ] {
            t.push((
                format!("{p}.{name}.weight"),
                vec![rows, cols],
                rand(rows * cols),
            ));
            t.push((format!("{p}.{name}.bias"), vec![rows], rand(rows)));
        }
        for name in ["attention.output.LayerNorm", "output.LayerNorm"] {
            t.push((format!("{p}.{name}.weight"), vec![h], vec![1.0; h]));
            t.push((format!("{p}.{name}.bias"), vec![h], vec![0.0; h]));
        }
    }
    let vocab_map: serde_json::Map<String, serde_json::Value> = BERT_WORDS
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), i.into()))
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": {"direction": "Right", "max_length": 128, "strategy": "LongestFirst", "stride": 0},
        // As all-MiniLM-L6-v2 ships it: padded to a fixed 128 tokens.
        "padding": {"strategy": {"Fixed": 128}, "direction": "Right", "pad_to_multiple_of": null,
            "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
        "added_tokens": [],
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
            "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100, "vocab": vocab_map},
    });
    let mut files = vec![
        ("config.json", serde_json::to_vec(&config).unwrap()),
        ("model.safetensors", safetensors_f32(&t)),
        ("tokenizer.json", serde_json::to_vec(&tokenizer).unwrap()),
    ];
    if with_head {
        files.push((
            "modules.json",
            br#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
                {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
                {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]"#
                .to_vec(),
        ));
        files.push((
            "1_Pooling/config.json",
            br#"{"word_embedding_dimension": 32, "pooling_mode_cls_token": false,
                "pooling_mode_mean_tokens": true, "pooling_mode_max_tokens": false,
                "pooling_mode_mean_sqrt_len_tokens": false}"#
                .to_vec(),
        ));
        files.push((
            "sentence_bert_config.json",
            br#"{"max_seq_length": 16, "do_lower_case": false}"#.to_vec(),
        ));
    }
    files
}

fn embedder(with_head: bool) -> Embedder {
    let (dir, entry) = stored("tiny-bert", Task::Embed, "bert", &bert_files(with_head));
    let opened = begin_load(&entry, dir.path(), &NoProgress, is_safetensors_name).unwrap();
    Embedder::load(opened, &Device::Cpu).unwrap()
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4)
}

#[test]
fn embeddings_follow_the_sentence_transformers_config() {
    let e = embedder(true);
    assert_eq!(
        (e.pooling(), e.normalize(), e.dimensions(), e.max_tokens()),
        (Pooling::Mean, true, 32, 16)
    );
    let v = e.embed(&["a man is eating food ."]).unwrap();
    let norm: f32 = v[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "{norm}");

    let plain = embedder(false);
    assert_eq!((plain.pooling(), plain.normalize()), (Pooling::Mean, false));
}

#[test]
fn batching_and_padding_do_not_change_embeddings() {
    let e = embedder(true);
    let texts = [
        "a man is eating a piece of bread .",
        "a man",
        "the man is riding a horse .",
        "food",
    ];
    let embedded = e.embed_counted(&texts, true).unwrap();
    let (batch, tokens) = (embedded.vectors, embedded.tokens);
    assert_eq!(batch.len(), texts.len());
    // "a man" is [CLS] a man [SEP]: 4 tokens; the batch counts each text once, without padding.
    assert_eq!(e.embed_counted(&["a man"], true).unwrap().tokens, 4);
    assert!(tokens > 4 * texts.len(), "{tokens}");
    for (text, v) in texts.iter().zip(&batch) {
        let alone = e.embed(&[text]).unwrap();
        assert!(close(&alone[0], v), "{text}");
    }
    // Long inputs are truncated to max_seq_length and say so, or refused when truncation is off.
    let long = vec!["a man"; 40].join(" ");
    assert_eq!(e.embed(&[&long]).unwrap()[0].len(), 32);
    let cut = e.embed_counted(&["food", &long], true).unwrap();
    assert_eq!(cut.truncated, [false, true]);
    assert_eq!(cut.tokens, 3 + 16);
    let err = e.embed_counted(&["food", &long], false).unwrap_err();
    assert!(
        matches!(err, runner::embed::EmbedError::TooLong { text: 1, max: 16 }),
        "{err}"
    );
    assert!(e.embed::<&str>(&[]).unwrap().is_empty());
}

#[test]
fn the_wrong_kind_of_model_is_refused() {
    let (_dir, model) = verified("tiny-llama", Task::Chat, "llama", &chain_files(1.0, 64));
    let err = Embedder::load(model, &Device::Cpu).unwrap_err();
    assert!(matches!(err, LoadError::WrongTask { .. }), "{err}");
    let (_dir, model) = verified("tiny-bert", Task::Embed, "bert", &bert_files(true));
    let err = ChatModel::load(
        model,
        &LoadOptions {
            quant: Some(Quant::F32),
            activations: None,
            device: Device::Cpu,
            context: None,
            context_cap: None,
            kv_cache: Default::default(),
        },
    )
    .unwrap_err();
    assert!(matches!(err, LoadError::WrongTask { .. }), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Continuous batching

/// Flat sampling: the seed decides every token.
fn sampling(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        seed,
        ..SamplingParams::default()
    }
}

type Outcome = Result<Generation, GenerateError>;

/// A sink that sends job `index`'s text and end to `tx`, and stops after `cancel_after` pieces.
fn sink(
    tx: std::sync::mpsc::Sender<(usize, String, Outcome)>,
    index: usize,
    cancel_after: Option<usize>,
) -> Sink {
    let mut text = String::new();
    let mut pieces = 0;
    Box::new(move |event| match event {
        Event::Text(t) => {
            text.push_str(t);
            pieces += 1;
            if cancel_after.is_some_and(|n| pieces >= n) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        }
        Event::Done(result) => {
            let _ = tx.send((index, std::mem::take(&mut text), result));
            ControlFlow::Continue(())
        }
    })
}

/// Batched replies are byte-identical to solo ones (same seed, model, quantization); a full
/// batcher refuses at once; a cancelled reply frees its slot.
#[test]
fn batched_replies_equal_solo_replies_and_the_queue_is_bounded() {
    for quant in [Quant::Q8_0, Quant::F32] {
        let files = chain_files(0.05, 256);
        let model = std::sync::Arc::new(load(&files, quant, None).unwrap());
        let prompt = model
            .tokenize_rendered(&model.render(&[Message::new("user", "go")], true).unwrap())
            .unwrap();
        let jobs: Vec<(u64, usize)> = vec![(1, 30), (2, 5), (3, 40), (4, 17), (5, 1), (6, 25)];
        let solo: Vec<Generation> = jobs
            .iter()
            .map(|&(seed, max)| {
                model
                    .generate(
                        &mut model.session(),
                        &prompt,
                        &options(Some(max), &[], sampling(seed)),
                        &mut |_| ControlFlow::Continue(()),
                    )
                    .unwrap()
            })
            .collect();

        let batcher = Batcher::new(
            std::sync::Arc::clone(&model),
            Limits {
                parallel: 3,
                queue: 3,
            },
        );
        // The first job's sink holds the batch thread until released, so the load is known.
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let (tx, rx) = std::sync::mpsc::channel();
        let first = {
            let tx = tx.clone();
            let mut inner = sink(tx, 0, None);
            let mut waited = false;
            Box::new(move |event: Event<'_>| {
                if !waited {
                    waited = true;
                    let _ = gate_rx.recv();
                }
                inner(event)
            }) as Sink
        };
        let mut sinks = vec![first];
        sinks.extend((1..jobs.len()).map(|i| sink(tx.clone(), i, None)));
        for (&(seed, max), sink) in jobs.iter().zip(sinks) {
            batcher
                .submit(Job {
                    prompt: prompt.clone(),
                    options: options(Some(max), &[], sampling(seed)),
                    sink,
                })
                .unwrap();
        }
        let busy = batcher
            .submit(Job {
                prompt: prompt.clone(),
                options: options(Some(3), &[], greedy()),
                sink: sink(tx.clone(), 99, None),
            })
            .unwrap_err();
        assert_eq!(busy.active + busy.waiting, 6, "{busy}");
        gate_tx.send(()).unwrap();

        let mut done: Vec<(usize, String, Generation)> = (0..jobs.len())
            .map(|_| {
                let (index, text, result) = rx.recv().unwrap();
                (index, text, result.unwrap())
            })
            .collect();
        done.sort_by_key(|(index, _, _)| *index);
        for ((_, text, got), want) in done.iter().zip(&solo) {
            assert_eq!(text, &got.text, "{quant}: the pieces make the text");
            assert_eq!(
                (&got.text, &got.tokens),
                (&want.text, &want.tokens),
                "{quant}"
            );
        }

        // A reply whose client goes away ends at its next step and frees its slot.
        batcher
            .submit(Job {
                prompt: prompt.clone(),
                options: options(Some(200), &[], sampling(9)),
                sink: sink(tx.clone(), 7, Some(2)),
            })
            .unwrap();
        let (_, _, result) = rx.recv().unwrap();
        assert_eq!(result.unwrap().stop, StopReason::Cancelled);
        for _ in 0..100 {
            if batcher.accepted() == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(batcher.accepted(), 0);
        batcher.shutdown();
    }
}

// ---------------------------------------------------------------------------------------------
// sanctum quantize

/// A model quantized by `quantize_model` holds ggml blocks, loads in its format without
/// requantizing, and generates exactly what in-situ quantization of its source generates.
#[test]
fn a_quantized_copy_generates_what_in_situ_quantization_of_its_source_does() {
    let files = random_llama_files();
    for quant in [
        Quant::Q8_0,
        Quant::Q4_0,
        Quant::Q4_1,
        Quant::Q4K,
        Quant::F16,
    ] {
        let (dir, entry) = stored("tiny-llama", Task::Chat, "llama", &files);
        let opened = begin_load(&entry, dir.path(), &NoProgress, is_safetensors_name).unwrap();
        let out = TempDir::new().unwrap();
        let out_dir = out.path().join("quantized");
        let report = runner::quantize::quantize_model(opened, quant, &out_dir).unwrap();
        let paths: Vec<&str> = report.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "config.json",
                "model.safetensors",
                "tokenizer.json",
                "tokenizer_config.json"
            ]
        );
        let derived: Vec<(&str, Vec<u8>)> = files
            .iter()
            .map(|(path, _)| (*path, fs::read(out_dir.join(path)).unwrap()))
            .collect();
        let weights = &derived[1].1;
        let (_, header) = safetensors::SafeTensors::read_metadata(weights).unwrap();
        let metadata = header.metadata().clone().unwrap();
        let q_proj = metadata.get("sanctum.ggml_type.model.layers.0.self_attn.q_proj.weight");
        match quant {
            Quant::F16 => assert!(q_proj.is_none()),
            // 64-wide rows do not fit q4_K's 256-value blocks: llama.cpp's fallback, q5_0.
            Quant::Q4K => assert_eq!(q_proj.map(String::as_str), Some("q5_0")),
            _ => assert_eq!(q_proj.map(String::as_str), Some(quant.name())),
        }
        assert!(
            weights.len() < files[1].1.len() * 6 / 10,
            "{quant}: {} bytes",
            weights.len()
        );

        let prompt = [1, 2, 3, 4, 5];
        let reply = |model: &ChatModel| {
            model
                .generate(
                    &mut model.session(),
                    &prompt,
                    &options(Some(12), &[], greedy()),
                    &mut |_| ControlFlow::Continue(()),
                )
                .unwrap()
                .tokens
        };
        let in_situ = load(&files, quant, None).unwrap();
        let quantized = load(&derived, quant, None).unwrap();
        assert_eq!(quantized.choices(), in_situ.choices(), "{quant}");
        assert_eq!(reply(&quantized), reply(&in_situ), "{quant}");
    }
}

/// Only chat models are quantized, and a source that fails verification leaves no output.
#[test]
fn quantize_refuses_embedding_models_and_tampered_sources() {
    let (dir, entry) = stored("tiny-bert", Task::Embed, "bert", &bert_files(true));
    let opened = begin_load(&entry, dir.path(), &NoProgress, is_safetensors_name).unwrap();
    let out = TempDir::new().unwrap();
    let err =
        runner::quantize::quantize_model(opened, Quant::Q8_0, &out.path().join("q")).unwrap_err();
    assert!(
        err.to_string().contains("only chat models are quantized"),
        "{err}"
    );

    let files = random_llama_files();
    let (dir, entry) = stored("tiny-llama", Task::Chat, "llama", &files);
    let weights = dir.path().join("model.safetensors");
    let mut bytes = fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&weights, bytes).unwrap();
    let opened = begin_load(&entry, dir.path(), &NoProgress, is_safetensors_name).unwrap();
    let out_dir = out.path().join("q");
    let err = runner::quantize::quantize_model(opened, Quant::Q8_0, &out_dir).unwrap_err();
    assert!(
        err.to_string()
            .contains("model.safetensors: sha256 mismatch"),
        "{err}"
    );
    assert!(!out_dir.exists());
    assert_eq!(
        fs::read_dir(out.path()).unwrap().count(),
        0,
        "no staging left"
    );
}
