//! `sanctum run`, `chat` and `embed`: on a tiny chat model made here (always), and on the real
//! SmolLM2-135M-Instruct and all-MiniLM-L6-v2 pulled by `scripts/test` (skipped without them).
//!
//! Tests that run a model hold [`MODEL_RUNS`] and use one thread: candle's thread pool spins while it
//! waits, and two models computing at once on a 2-core machine slow each other down by 20x.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use assert_cmd::Command;
use predicates::prelude::PredicateBooleanExt;
use predicates::str::contains;
use tempfile::TempDir;

use crate::support::byte_level::bytes_to_unicode;
use crate::support::hf_server::HfServer;
use crate::support::{self, TinyModel, lock_text, sanctum, tiny_safetensors};

static MODEL_RUNS: Mutex<()> = Mutex::new(());

/// Serializes the tests that run a model.
pub(crate) fn one_at_a_time() -> MutexGuard<'static, ()> {
    MODEL_RUNS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------------
// A tiny chat model: byte-level tokenizer, ChatML template, and weights that make greedy
// generation write "Hé€!" after "\n" (é and € split across byte tokens), then <|im_end|>.

const VOCAB: usize = 288;
const IM_END: usize = 258;
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn chain_model_files() -> Vec<(String, Vec<u8>)> {
    let h = VOCAB;
    let mut vocab: serde_json::Map<String, serde_json::Value> = bytes_to_unicode()
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i.into()))
        .collect();
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let mut added = Vec::new();
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), (256 + i).into());
        added.push(
            serde_json::json!({"id": 256 + i, "content": s, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true}),
        );
    }
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let tokenizer = serde_json::json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []}});
    let template = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let tokenizer_config = serde_json::json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": template});
    let config = serde_json::json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64, "vocab_size": VOCAB,
        "tie_word_embeddings": false, "hidden_act": "silu", "eos_token_id": IM_END});

    let mut next: HashMap<usize, usize> = HashMap::new();
    let mut prev = usize::from(b'\n');
    for b in "Hé€!".bytes() {
        next.insert(prev, usize::from(b));
        prev = usize::from(b);
    }
    next.insert(prev, IM_END);
    let mut embed = vec![0f32; VOCAB * h];
    let mut head = vec![0f32; VOCAB * h];
    for t in 0..VOCAB {
        embed[t * h + t] = 1.0;
        head[next.get(&t).copied().unwrap_or(IM_END) * h + t] = 1.0;
    }
    let zeros = |n: usize| vec![0f32; n];
    let tensors: Vec<(&str, Vec<usize>, Vec<f32>)> = vec![
        ("model.embed_tokens.weight", vec![VOCAB, h], embed),
        ("lm_head.weight", vec![VOCAB, h], head),
        ("model.norm.weight", vec![h], vec![1.0; h]),
        (
            "model.layers.0.input_layernorm.weight",
            vec![h],
            vec![1.0; h],
        ),
        (
            "model.layers.0.post_attention_layernorm.weight",
            vec![h],
            vec![1.0; h],
        ),
        (
            "model.layers.0.self_attn.q_proj.weight",
            vec![h, h],
            zeros(h * h),
        ),
        (
            "model.layers.0.self_attn.k_proj.weight",
            vec![h / 2, h],
            zeros(h * h / 2),
        ),
        (
            "model.layers.0.self_attn.v_proj.weight",
            vec![h / 2, h],
            zeros(h * h / 2),
        ),
        (
            "model.layers.0.self_attn.o_proj.weight",
            vec![h, h],
            zeros(h * h),
        ),
        (
            "model.layers.0.mlp.gate_proj.weight",
            vec![64, h],
            zeros(64 * h),
        ),
        (
            "model.layers.0.mlp.up_proj.weight",
            vec![64, h],
            zeros(64 * h),
        ),
        (
            "model.layers.0.mlp.down_proj.weight",
            vec![h, 64],
            zeros(64 * h),
        ),
    ];
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors.iter().zip(&data).map(|((name, shape, _), bytes)| {
        (
            *name,
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .unwrap(),
        )
    });
    vec![
        ("config.json".into(), serde_json::to_vec(&config).unwrap()),
        (
            "model.safetensors".into(),
            safetensors::serialize(views, None).unwrap(),
        ),
        (
            "tokenizer.json".into(),
            serde_json::to_vec(&tokenizer).unwrap(),
        ),
        (
            "tokenizer_config.json".into(),
            serde_json::to_vec(&tokenizer_config).unwrap(),
        ),
    ]
}

fn chat_lock_text(files: &[(String, Vec<u8>)]) -> String {
    let borrowed: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    let source = format!("kind = \"hf\"\nrepo = \"org/tiny\"\nrevision = \"{COMMIT}\"");
    lock_text("tiny", &borrowed, &source)
        .replace("task = \"embed\"", "task = \"chat\"")
        .replace("architecture = \"bert\"", "architecture = \"llama\"")
}

/// The tiny chat model, pulled into a fresh store.
struct TinyChat {
    home: TempDir,
    lock: PathBuf,
}

impl TinyChat {
    fn new() -> Self {
        let files = chain_model_files();
        let home = TempDir::new().unwrap();
        let lock = home.path().join("models.lock");
        let text = chat_lock_text(&files);
        fs::write(&lock, &text).unwrap();
        let digest = attest::lockfile::Lockfile::parse(&text).unwrap().models[0]
            .digest
            .to_hex();
        let dir = home.path().join("store/models/tiny").join(digest);
        for (path, bytes) in &files {
            fs::create_dir_all(dir.join(path).parent().unwrap()).unwrap();
            fs::write(dir.join(path), bytes).unwrap();
        }
        Self { home, lock }
    }

    fn sanctum(&self) -> Command {
        let mut cmd = sanctum();
        cmd.arg("--store")
            .arg(self.home.path().join("store"))
            .arg("--lock")
            .arg(&self.lock);
        cmd
    }
}

#[test]
fn run_streams_the_reply_and_summarizes_on_stderr() {
    let _guard = one_at_a_time();
    TinyChat::new()
        .sanctum()
        .args([
            "run",
            "tiny",
            "hello",
            "--temperature",
            "0",
            "--threads",
            "1",
        ])
        .assert()
        .success()
        .stdout("Hé€!\n")
        .stderr(
            contains("tokens prompt")
                .and(contains("tok/s"))
                .and(contains("load+verify"))
                .and(contains("stop: eos")),
        );
}

#[test]
fn run_reads_the_prompt_from_stdin_and_honours_stop_and_max_tokens() {
    let _guard = one_at_a_time();
    let tiny = TinyChat::new();
    tiny.sanctum()
        .args([
            "run",
            "tiny",
            "-",
            "--temperature",
            "0",
            "--threads",
            "1",
            "--stop",
            "€",
        ])
        .write_stdin("hello from stdin\n")
        .assert()
        .success()
        .stdout("Hé\n")
        .stderr(contains("stop: stop"));
    tiny.sanctum()
        .args([
            "run",
            "tiny",
            "--temperature",
            "0",
            "--threads",
            "1",
            "--max-tokens",
            "1",
        ])
        .write_stdin("piped")
        .assert()
        .success()
        .stdout("H\n")
        .stderr(contains("stop: length"));
}

#[test]
fn run_json_reports_usage_timings_model_and_settings() {
    let _guard = one_at_a_time();
    let out = TinyChat::new()
        .sanctum()
        .args([
            "run",
            "tiny",
            "hi",
            "--json",
            "--temperature",
            "0",
            "--threads",
            "1",
            "--quant",
            "q8_0",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["text"], "Hé€!");
    assert_eq!(v["model"], "tiny");
    assert!(v["digest"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(v["quant"], "q8_0");
    assert_eq!(v["device"], "cpu");
    assert_eq!(v["threads"], 1);
    assert_eq!(v["stop_reason"], "eos");
    assert_eq!(v["usage"]["completion_tokens"], 7);
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 5);
    assert!(v["timings"]["load_verify_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["sampling"]["temperature"], 0.0);
}

#[test]
fn raw_prompts_skip_the_template_and_system_messages_use_it() {
    let _guard = one_at_a_time();
    let tiny = TinyChat::new();
    // Without the template the prompt does not end in "\n", so the chain ends at once.
    tiny.sanctum()
        .args([
            "run",
            "tiny",
            "no newline",
            "--raw",
            "--temperature",
            "0",
            "--threads",
            "1",
        ])
        .assert()
        .success()
        .stdout("")
        .stderr(contains("0 generated"));
    tiny.sanctum()
        .args([
            "run",
            "tiny",
            "hi",
            "--system",
            "Be kind.",
            "--temperature",
            "0",
            "--threads",
            "1",
        ])
        .assert()
        .success()
        .stdout("Hé€!\n");
}

#[test]
fn chat_keeps_going_until_exit() {
    let _guard = one_at_a_time();
    TinyChat::new()
        .sanctum()
        .args([
            "chat",
            "tiny",
            "--temperature",
            "0",
            "--threads",
            "1",
            "--verbose",
        ])
        .write_stdin("first\nsecond\n/reset\nthird\n/exit\nnever sent\n")
        .assert()
        .success()
        .stdout("Hé€!\n\nHé€!\n\nHé€!\n\n")
        // The second turn reuses the first turn's cache.
        .stderr(contains("prompt tokens computed"));
}

#[test]
fn a_model_missing_from_the_store_is_pulled_first() {
    let _guard = one_at_a_time();
    let files = chain_model_files();
    let home = TempDir::new().unwrap();
    let lock = home.path().join("models.lock");
    fs::write(&lock, chat_lock_text(&files)).unwrap();
    let server = HfServer::start("org/tiny", COMMIT, files);
    sanctum()
        .arg("--store")
        .arg(home.path().join("store"))
        .arg("--lock")
        .arg(&lock)
        .env("HF_ENDPOINT", server.endpoint())
        .args(["run", "tiny", "hi", "--temperature", "0", "--threads", "1"])
        .assert()
        .success()
        .stdout("Hé€!\n")
        .stderr(contains("not in the store: pulling it"));
}

#[test]
fn a_device_this_build_lacks_names_the_feature() {
    let tiny = TinyModel::new(&[("model.safetensors", &tiny_safetensors())]);
    tiny.sanctum()
        .args(["embed", "tiny", "text", "--device", "metal"])
        .assert()
        .code(2)
        .stderr(contains("--features metal"));
    tiny.sanctum()
        .args(["embed", "tiny", "text", "--device", "tpu"])
        .assert()
        .code(2)
        .stderr(contains("unknown device"));
}

#[test]
fn commands_refuse_models_approved_for_another_task() {
    let tiny = TinyModel::new(&[("model.safetensors", &tiny_safetensors())]);
    tiny.sanctum()
        .args(["run", "tiny", "hi", "--device", "cpu"])
        .assert()
        .code(2)
        .stderr(contains("sanctum embed"));
    TinyChat::new()
        .sanctum()
        .args(["embed", "tiny", "hi"])
        .assert()
        .code(2)
        .stderr(contains("sanctum run"));
}

#[test]
fn a_tampered_model_is_refused_before_inference() {
    let tiny = TinyChat::new();
    let dir = fs::read_dir(tiny.home.path().join("store/models/tiny"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let weights = dir.join("model.safetensors");
    let mut bytes = fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&weights, bytes).unwrap();
    tiny.sanctum()
        .args(["run", "tiny", "hi", "--threads", "1"])
        .assert()
        .code(1)
        .stdout("")
        .stderr(contains("sha256 mismatch"));
}

#[test]
fn a_prompt_beyond_the_context_is_a_clear_error() {
    let _guard = one_at_a_time();
    TinyChat::new()
        .sanctum()
        .args(["run", "tiny", &"x".repeat(100), "--threads", "1"])
        .assert()
        .code(2)
        .stderr(contains("the context holds 64"));
    TinyChat::new()
        .sanctum()
        .args(["run", "tiny", "hi", "--ctx", "65", "--threads", "1"])
        .assert()
        .code(2)
        .stderr(contains(
            "a context of 65 tokens is out of range: the model takes 1 to 64",
        ));
}

// ---------------------------------------------------------------------------------------------
// The real models

const SMOL: &str = "smollm2-135m-instruct";

fn real() -> Option<Command> {
    let store = support::real_store()?;
    let mut cmd = sanctum();
    cmd.arg("--store")
        .arg(store)
        .arg("--lock")
        .arg(support::repo_lock());
    Some(cmd)
}

fn run_json(args: &[&str]) -> Option<serde_json::Value> {
    Some(reply_json(real()?, SMOL, args))
}

/// `run MODEL ARGS --json` with one thread through `cmd`; the reply's JSON.
fn reply_json(mut cmd: Command, model: &str, args: &[&str]) -> serde_json::Value {
    let out = cmd
        .args(["run", model])
        .args(args)
        .args(["--json", "--threads", "1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn smollm2_knows_the_capital_of_france() {
    let _guard = one_at_a_time();
    let Some(mut cmd) = real() else { return };
    cmd.args([
        "run",
        SMOL,
        "What is the capital of France?",
        "--temperature",
        "0",
        "--max-tokens",
        "32",
        "--threads",
        "1",
    ])
    .assert()
    .success()
    .stdout(contains("Paris"))
    .stderr(contains("tok/s"));
}

/// Greedy texts of the first 20 tokens: (f32, `quant`).
fn greedy_texts(prompt: &str, quant: &str) -> Option<(String, String)> {
    let text = |q: &str| -> Option<String> {
        let v = run_json(&[
            prompt,
            "--temperature",
            "0",
            "--max-tokens",
            "20",
            "--quant",
            q,
        ])?;
        Some(v["text"].as_str().unwrap().to_owned())
    };
    Some((text("f32")?, text(quant)?))
}

#[test]
fn q8_0_greedy_matches_f32_for_20_tokens() {
    let _guard = one_at_a_time();
    // A prompt whose f32 top-2 logits are not a near tie (on "What is the capital of France?" they
    // differ by 0.08 at the first token, and q8_0's activation quantization flips it).
    let Some((f32_text, q8_text)) = greedy_texts("Give me a tip for learning Rust.", "q8_0") else {
        return;
    };
    assert_eq!(q8_text, f32_text);
}

/// The default (the shipped q4_1 blocks on sanctum's kernels, 16-bit activations) answers as f32
/// does where 8-bit activations flip the answer (q8_0 gives "L'Étoile…", as llama.cpp's Q8_0 does).
#[test]
fn the_default_matches_f32_on_the_france_prompt() {
    let _guard = one_at_a_time();
    let Some((f32_text, default_text)) = greedy_texts("What is the capital of France?", "auto")
    else {
        return;
    };
    assert_eq!(default_text, f32_text);
    assert!(f32_text.contains("Paris"), "{f32_text}");
    let Some(v) = run_json(&["Hi", "--max-tokens", "1"]) else {
        return;
    };
    assert_eq!(
        (&v["quant"], &v["activations"]),
        (&serde_json::json!("q4_1"), &serde_json::json!("int16"))
    );
}

/// `sanctum quantize` writes a copy an approver can pin: the printed entry parses, names its
/// source, and the copy, approved in a lock of its own, answers as in-situ q8_0 of its source does.
#[test]
fn a_quantized_smollm2_is_approvable_and_answers_as_in_situ_q8_0() {
    let _guard = one_at_a_time();
    let Some(mut cmd) = real() else { return };
    let tmp = TempDir::new().unwrap();
    let out_dir = tmp.path().join("q8");
    let out = cmd
        .args(["quantize", SMOL, "--quant", "q8_0", "--out"])
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entry_text = String::from_utf8(out.stdout).unwrap();
    let lock_text = format!("version = 1\n\n{entry_text}");
    let lock = attest::lockfile::Lockfile::parse(&lock_text).unwrap();
    let entry = &lock.models[0];
    let derived = entry.derived.as_ref().unwrap();
    assert_eq!(
        (derived.from.as_str(), derived.quantization.as_str()),
        (SMOL, "q8_0")
    );
    assert_eq!(entry.name, "smollm2-135m-instruct-q8_0");

    // Approve the copy in a store of its own and run it beside its source.
    let home = tmp.path().join("home");
    let dir = home
        .join("models")
        .join(&entry.name)
        .join(entry.digest.to_string());
    fs::create_dir_all(dir.parent().unwrap()).unwrap();
    fs::rename(&out_dir, &dir).unwrap();
    let lock_path = tmp.path().join("models.lock");
    fs::write(&lock_path, lock_text).unwrap();
    let args = [
        "Give me a tip for learning Rust.",
        "--temperature",
        "0",
        "--max-tokens",
        "20",
        "--quant",
        "q8_0",
    ];
    let mut cmd = sanctum();
    cmd.arg("--store").arg(&home).arg("--lock").arg(&lock_path);
    let copy = reply_json(cmd, &entry.name, &args);
    let source = run_json(&args).unwrap();
    assert_eq!(copy["text"], source["text"]);
}

#[test]
fn the_same_seed_gives_the_same_bytes() {
    let _guard = one_at_a_time();
    let run = |seed: &str| -> Option<Vec<u8>> {
        let mut cmd = real()?;
        let out = cmd
            .args([
                "run",
                SMOL,
                "Tell me a story about a robot.",
                "--temperature",
                "0.9",
                "--max-tokens",
                "24",
            ])
            .args(["--seed", seed, "--quant", "q8_0", "--threads", "1"])
            .output()
            .unwrap();
        assert!(out.status.success());
        Some(out.stdout)
    };
    let Some(first) = run("7") else { return };
    assert_eq!(run("7").unwrap(), first);
    assert_ne!(run("8").unwrap(), first);
}

#[test]
fn minilm_embeddings_rank_paraphrases_above_unrelated_sentences() {
    let _guard = one_at_a_time();
    let Some(mut cmd) = real() else { return };
    let out = cmd
        .args([
            "embed",
            "all-minilm-l6-v2",
            "--threads",
            "1",
            "--format",
            "jsonl",
        ])
        .write_stdin(
            "A man is eating food.\nA man is eating a piece of bread.\nA man is riding a horse.\n",
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vectors: Vec<Vec<f64>> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            v["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(vectors.len(), 3);
    assert_eq!(vectors[0].len(), 384);
    // Normalized, so the dot product is the cosine.
    let cos = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let (bread, horse) = (cos(&vectors[0], &vectors[1]), cos(&vectors[0], &vectors[2]));
    assert!((bread - 0.755).abs() < 0.01, "{bread}");
    assert!((horse - 0.247).abs() < 0.01, "{horse}");
}

/// `run` stamps what it writes: with `--out` inside a git work tree the bundle lands in
/// `.attestations/`, verifies with the signer key made on first use, and an edit to the output is
/// caught; printed output gets its bundle in the local store, named by the printed bytes' sha256.
#[test]
fn every_output_is_stamped_and_verifies() {
    let _guard = one_at_a_time();
    let tiny = TinyChat::new();
    let repo = tiny.home.path().join("repo");
    crate::support::git_init(&repo);
    let reply = [
        "run",
        "tiny",
        "hello",
        "--temperature",
        "0",
        "--threads",
        "1",
    ];
    tiny.sanctum()
        .current_dir(&repo)
        .args(reply)
        .args(["--out", "reply.txt"])
        .assert()
        .success()
        .stdout("")
        .stderr(contains(
            "attestation: .attestations/reply.txt.sigstore.json",
        ));
    assert_eq!(fs::read_to_string(repo.join("reply.txt")).unwrap(), "Hé€!");

    let key = tiny.home.path().join("store/keys/signer.pub");
    let verify = |artifact_edited: bool| {
        let mut cmd = tiny.sanctum();
        cmd.current_dir(&repo)
            .args([
                "attest",
                "verify",
                ".attestations",
                "--artifact",
                "reply.txt",
                "--key",
            ])
            .arg(&key);
        let assert = cmd.assert();
        if artifact_edited {
            assert.code(1).stdout(contains("step 5 (subject digest)"));
        } else {
            assert.success().stdout(contains("PASS"));
        }
    };
    verify(false);
    fs::write(repo.join("reply.txt"), "Paris").unwrap();
    verify(true);

    let printed = "Hé€!\n";
    let digest = crate::support::sha256_hex(printed.as_bytes());
    tiny.sanctum()
        .args(reply)
        .assert()
        .success()
        .stdout(printed)
        .stderr(contains(format!("attestations/sha256/{digest}/")));
}
