#!/usr/bin/env python3
"""Writes the committed seed corpora under fuzz/seeds/<target>/ (docs/fuzzing.md).

Seeds are small real inputs: the repository's models.lock, the docs' examples, attest's pickle
fixtures, and, when the test home exists (target/sanctum-test-home, made by scripts/test), the real
models' configs, tokenizer configs, Safetensors headers, attestation bundles and audit log. Bundles
and notes that should get past a signature check are signed with the fuzzing key
(fuzz/src/fuzz-signer.key) through `openssl`. Tiny GGUF and Safetensors files are made here.

Run from anywhere: python3 fuzz/make_seeds.py. Re-running rewrites the same files; a seed the
fuzzers should keep for good (a fixed crash) belongs in its target's folder too.
"""

import base64
import glob
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import tempfile

FUZZ = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(FUZZ)
SEEDS = os.path.join(FUZZ, "seeds")
HOME = os.path.join(ROOT, "target", "sanctum-test-home")
KEY = os.path.join(FUZZ, "src", "fuzz-signer.key")
SEP = b"\n--8<--\n"
MAX = 64 * 1024


def write(target, name, data):
    if isinstance(data, str):
        data = data.encode()
    if len(data) > MAX:
        sys.exit(f"seed {target}/{name} is {len(data)} bytes, over {MAX}")
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def home(pattern):
    return sorted(glob.glob(os.path.join(HOME, pattern)))


def code_blocks(path, lang):
    text = read(path).decode()
    return re.findall(r"```" + lang + r"\n(.*?)```", text, re.S)


# --- the fuzzing key ---------------------------------------------------------------------------

def public_pem():
    return subprocess.run(["openssl", "pkey", "-in", KEY, "-pubout"], check=True,
                          capture_output=True).stdout.decode().replace("\r\n", "\n")


def spki_der():
    return subprocess.run(["openssl", "pkey", "-in", KEY, "-pubout", "-outform", "DER"],
                          check=True, capture_output=True).stdout


def hint():
    return hashlib.sha256(public_pem().encode()).hexdigest()


def sign(message):
    with tempfile.NamedTemporaryFile() as f:
        f.write(message)
        f.flush()
        return subprocess.run(["openssl", "dgst", "-sha256", "-sign", KEY, f.name], check=True,
                              capture_output=True).stdout


def pae(payload_type, payload):
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def bundle(payload, payload_type="application/vnd.in-toto+json"):
    h = hint()
    return json.dumps({
        "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
        "verificationMaterial": {"publicKey": {"hint": h}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": payload_type,
            "signatures": [{"sig": base64.b64encode(sign(pae(payload_type, payload))).decode(),
                            "keyid": h}],
        },
    }, separators=(",", ":")).encode() + b"\n"


def canonical(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# --- lockfile and policy -----------------------------------------------------------------------

def lockfile_seeds():
    write("lockfile", "models.lock", read(os.path.join(ROOT, "models.lock")))
    for i, block in enumerate(code_blocks(os.path.join(ROOT, "docs", "lockfile.md"), "toml")):
        write("lockfile", f"docs-lockfile-{i}.toml", block)
    write("lockfile", "empty.toml", "version = 1\n")
    write("lockfile", "future.toml", "version = 2\n")


def policy_seeds():
    for i, block in enumerate(code_blocks(os.path.join(ROOT, "docs", "policy.md"), "toml")):
        write("policy", f"docs-policy-{i}.toml", block)
    pem = public_pem()
    write("policy", "keys.toml", f'''version = 1

[[approver]]
name = "security"
key = "approver.pub"

[[signer]]
name = "ci"
pem = """
{pem}"""

[licenses]
allow = ["Apache-2.0", "MIT"]
deny = ["CC-BY-NC-4.0"]

[lock]
require_signature = true
''')
    write("policy", "minimal.toml", "version = 1\n")
    write("policy", "license-expr.txt", "(Apache-2.0 OR MIT) AND BSD-3-Clause WITH LLVM-exception")


# --- bundles and statements --------------------------------------------------------------------

def real_bundles():
    return home("attestations/sha256/*/*.sigstore.json")


def statement_seeds():
    payloads = []
    for path in real_bundles():
        b = json.loads(read(path))
        payloads.append(base64.b64decode(b["dsseEnvelope"]["payload"]))
    # One output and one bench statement, at most, from the real ones, by predicate type.
    seen = {}
    for p in payloads:
        seen.setdefault(json.loads(p)["predicateType"], p)
    for i, (_, p) in enumerate(sorted(seen.items())):
        write("statement", f"real-{i}.json", p)
    lock_bytes = read(os.path.join(ROOT, "models.lock"))
    lock_statement = canonical({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": "models.lock",
                     "digest": {"sha256": hashlib.sha256(lock_bytes).hexdigest()}}],
        "predicateType": "https://example.invalid/sanctum/attestation/lock/v1",
        "predicate": {"lockfileVersion": 1, "models": [
            {"name": "smollm2-135m-instruct", "digest": {"sha256": "00" * 32},
             "license": "Apache-2.0"}]},
    })
    write("statement", "lock.json", lock_statement)
    model_sig = canonical({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": "tiny", "digest": {"sha256": "11" * 32}}],
        "predicateType": "https://model_signing/signature/v1.0",
        "predicate": {
            "serialization": {"method": "files", "hash_type": "sha256", "allow_symlinks": False,
                              "ignore_paths": ["model.sig"]},
            "resources": [{"name": "config.json", "algorithm": "sha256", "digest": "22" * 32},
                          {"name": "model.safetensors", "algorithm": "sha256",
                           "digest": "33" * 32}],
        },
    })
    write("statement", "model-signing.json", model_sig)
    return [p for _, p in sorted(seen.items())] + [lock_statement, model_sig]


def bundle_seeds(statements):
    for i, path in enumerate(real_bundles()[:2]):
        write("bundle", f"real-{i}.sigstore.json", read(path))
    for i, p in enumerate(statements):
        write("bundle", f"fuzz-signed-{i}.sigstore.json", bundle(p))
    write("bundle", "docs-shape.json", code_blocks(os.path.join(ROOT, "docs", "attestation.md"),
                                                   "json")[0])


# --- Safetensors -------------------------------------------------------------------------------

def safetensors(tensors, metadata=None):
    """tensors: (name, dtype, shape, data bytes)."""
    header, offset, data = {}, 0, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def f32(n, seed=1):
    return b"".join(struct.pack("<f", ((i * 7919 + seed) % 97) / 97.0 - 0.5) for i in range(n))


def q8_0_blocks(rows, cols):
    out = b""
    for r in range(rows * cols // 32):
        out += struct.pack("<e", 0.01) + bytes((i * 13 + r) % 256 for i in range(32))
    return out


def tiny_llama_safetensors(hidden=32, vocab=8, inter=64, quant=False):
    t = [("model.embed_tokens.weight", "F32", [vocab, hidden], f32(vocab * hidden)),
         ("model.norm.weight", "F32", [hidden], f32(hidden, 2))]
    meta = {}
    p = "model.layers.0"
    t += [(f"{p}.input_layernorm.weight", "F32", [hidden], f32(hidden, 3)),
          (f"{p}.post_attention_layernorm.weight", "F32", [hidden], f32(hidden, 4))]
    for name, rows, cols in [("self_attn.q_proj", hidden, hidden), ("self_attn.k_proj", hidden, hidden),
                             ("self_attn.v_proj", hidden, hidden), ("self_attn.o_proj", hidden, hidden),
                             ("mlp.gate_proj", inter, hidden), ("mlp.up_proj", inter, hidden),
                             ("mlp.down_proj", hidden, inter)]:
        full = f"{p}.{name}.weight"
        if quant and name.startswith("mlp"):
            raw = q8_0_blocks(rows, cols)
            t.append((full, "U8", [rows, len(raw) // rows], raw))
            meta[f"sanctum.ggml_type.{full}"] = "q8_0"
            meta[f"sanctum.shape.{full}"] = f"{rows},{cols}"
        else:
            t.append((full, "F16" if name.endswith("v_proj") else "F32", [rows, cols],
                      f32(rows * cols // 2) if name.endswith("v_proj") else f32(rows * cols)))
    return safetensors(t, meta or None)


def header_only(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        if n + 8 > MAX:
            return None
        f.seek(0)
        return f.read(8 + n)


def safetensors_seeds():
    write("safetensors_header", "tiny-llama-f32.safetensors", tiny_llama_safetensors())
    write("safetensors_header", "tiny-llama-q8_0.safetensors", tiny_llama_safetensors(quant=True))
    write("safetensors_header", "bf16-and-i64.safetensors", safetensors([
        ("a", "BF16", [2, 2], b"\x80\x3f" * 4), ("position_ids", "I64", [1, 2], struct.pack("<qq", 0, 1)),
        ("b", "BOOL", [1], b"\x01")], {"format": "pt"}))
    write("safetensors_header", "empty.safetensors", safetensors([]))
    for path in home("models/*/*/model.safetensors"):
        head = header_only(path)
        if head:
            write("safetensors_header", f"real-header-{os.path.basename(os.path.dirname(os.path.dirname(path)))}", head)


# --- GGUF --------------------------------------------------------------------------------------

def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_value(v):
    kind, x = v
    if kind == "u32":
        return struct.pack("<I", 4) + struct.pack("<I", x)
    if kind == "i32":
        return struct.pack("<I", 5) + struct.pack("<i", x)
    if kind == "f32":
        return struct.pack("<I", 6) + struct.pack("<f", x)
    if kind == "bool":
        return struct.pack("<I", 7) + bytes([x])
    if kind == "str":
        return struct.pack("<I", 8) + gguf_string(x)
    if kind == "strs":
        return struct.pack("<I", 9) + struct.pack("<IQ", 8, len(x)) + b"".join(gguf_string(s) for s in x)
    if kind == "i32s":
        return struct.pack("<I", 9) + struct.pack("<IQ", 5, len(x)) + b"".join(struct.pack("<i", i) for i in x)
    raise ValueError(kind)


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
                 "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def gguf(hidden=32, heads=4, kv_heads=2, ffn=64, layers=1, types=("f32", "q8_0"), alignment=None,
         version=3):
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + bytes_to_unicode()
    merges = ["Ġ t", "h e", "Ġt he", "i n"]
    tokens += [m.replace(" ", "") for m in merges]
    token_types = [3, 3, 3] + [1] * (len(tokens) - 3)
    vocab = len(tokens)
    head_dim = hidden // heads
    meta = [
        ("general.architecture", ("str", "llama")), ("general.name", ("str", "tiny")),
        ("llama.block_count", ("u32", layers)), ("llama.context_length", ("u32", 256)),
        ("llama.embedding_length", ("u32", hidden)), ("llama.feed_forward_length", ("u32", ffn)),
        ("llama.attention.head_count", ("u32", heads)), ("llama.attention.head_count_kv", ("u32", kv_heads)),
        ("llama.rope.freq_base", ("f32", 100000.0)), ("llama.attention.layer_norm_rms_epsilon", ("f32", 1e-5)),
        ("llama.rope.dimension_count", ("u32", head_dim)),
        ("tokenizer.ggml.model", ("str", "gpt2")), ("tokenizer.ggml.pre", ("str", "smollm")),
        ("tokenizer.ggml.tokens", ("strs", tokens)), ("tokenizer.ggml.token_type", ("i32s", token_types)),
        ("tokenizer.ggml.merges", ("strs", merges)),
        ("tokenizer.ggml.bos_token_id", ("u32", 1)), ("tokenizer.ggml.eos_token_id", ("u32", 2)),
        ("tokenizer.ggml.unknown_token_id", ("u32", 0)), ("tokenizer.ggml.padding_token_id", ("u32", 2)),
        ("tokenizer.ggml.add_bos_token", ("bool", 0)), ("tokenizer.chat_template", ("str", CHAT_TEMPLATE)),
    ]
    align = alignment or 32
    if alignment:
        meta.append(("general.alignment", ("u32", alignment)))
    ty = {"f32": 0, "f16": 1, "q8_0": 8}

    def tensor_bytes(kind, rows, cols):
        if kind == "f32":
            return f32(rows * cols)
        if kind == "f16":
            return b"".join(struct.pack("<e", ((i % 17) - 8) / 64) for i in range(rows * cols))
        return q8_0_blocks(rows, cols)

    tensors = [("token_embd.weight", types[1], vocab, hidden), ("output_norm.weight", "f32", 1, hidden)]
    for n in range(layers):
        for name, kind, rows, cols in [
            ("attn_norm", "f32", 1, hidden), ("attn_q", types[0], hidden, hidden),
            ("attn_k", types[0], kv_heads * head_dim, hidden), ("attn_v", types[1], kv_heads * head_dim, hidden),
            ("attn_output", types[1], hidden, hidden), ("ffn_norm", "f32", 1, hidden),
            ("ffn_gate", types[1], ffn, hidden), ("ffn_up", types[1], ffn, hidden),
            ("ffn_down", types[1], hidden, ffn)]:
            tensors.append((f"blk.{n}.{name}.weight", kind, rows, cols))
    infos, data = b"", b""
    for name, kind, rows, cols in tensors:
        raw = tensor_bytes(kind, rows, cols)
        data += b"\0" * (-len(data) % align)
        dims = [cols] if rows == 1 else [cols, rows]
        infos += gguf_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        infos += struct.pack("<IQ", ty[kind], len(data))
        data += raw
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(meta))
    out += b"".join(gguf_string(k) + gguf_value(v) for k, v in meta) + infos
    out += b"\0" * (-len(out) % align)
    return out + data


def gguf_seeds():
    write("gguf", "tiny-f32-q8_0.gguf", gguf())
    write("gguf", "tiny-f16-aligned64.gguf", gguf(types=("f16", "f16"), alignment=64, hidden=32, ffn=32))
    write("gguf", "tiny-v2-mha.gguf", gguf(version=2, heads=2, kv_heads=2, hidden=16, ffn=16,
                                          types=("f32", "f32")))
    write("gguf", "header-only.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
          + gguf_string("general.architecture") + gguf_value(("str", "llama")))


# --- model configs and chat templates ----------------------------------------------------------

def model_config_seeds():
    files = ["generation_config.json", "tokenizer_config.json", "modules.json", "1_Pooling/config.json",
             "sentence_bert_config.json", "model.safetensors.index.json"]
    for d in home("models/*/*"):
        name = os.path.basename(os.path.dirname(d))
        parts = [read(os.path.join(d, "config.json"))]
        for f in files:
            p = os.path.join(d, f)
            parts.append(read(p) if os.path.exists(p) else b"")
        write("model_config", f"real-{name}", SEP.join(parts).rstrip(SEP))
    tiny_llama = {"architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 32,
                  "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
                  "vocab_size": 3, "tie_word_embeddings": True, "hidden_act": "silu"}
    write("model_config", "tiny-llama", SEP.join([json.dumps(tiny_llama).encode(),
                                                  b'{"eos_token_id": [2, 0]}']))
    qwen = dict(tiny_llama, architectures=["Qwen2ForCausalLM"], tie_word_embeddings=False,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    write("model_config", "tiny-qwen2-llama3-rope", json.dumps(qwen))
    mistral = dict(tiny_llama, architectures=["MistralForCausalLM"], head_dim=8, attention_bias=True,
                   mlp_bias=True, rope_scaling={"type": "linear", "factor": 2.0})
    write("model_config", "tiny-mistral-bias", json.dumps(mistral))
    tiny_bert = {"architectures": ["BertModel"], "vocab_size": 3, "hidden_size": 8, "num_hidden_layers": 1,
                 "num_attention_heads": 2, "intermediate_size": 16, "hidden_act": "gelu",
                 "hidden_dropout_prob": 0.1, "max_position_embeddings": 16, "type_vocab_size": 2,
                 "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
                 "model_type": "bert"}
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    write("model_config", "tiny-bert", SEP.join([
        json.dumps(tiny_bert).encode(), b"", b"", json.dumps(modules).encode(),
        b'{"word_embedding_dimension": 8, "pooling_mode_cls_token": true}', b'{"max_seq_length": 8}']))


TEMPLATES = {
    # Llama 3's (shortened): bos, header ids, trimmed content.
    "llama3.jinja": "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
    # Mistral's: alternation enforced with raise_exception.
    "mistral.jinja": "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
                     "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
                     "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
                     "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                     "{{ message['content'] + eos_token }}{% endif %}{% endfor %}",
    # Qwen2's: a default system prompt, namespace and loop controls.
    "qwen2.jinja": "{% set ns = namespace(system=false) %}{% for message in messages %}{% if loop.first and "
                   "message['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
                   "{% endif %}{% if message.role == 'system' %}{% set ns.system = true %}{% endif %}"
                   "{{ '<|im_start|>' + message.role + '\\n' + message.content.strip() + '<|im_end|>\\n' }}"
                   "{% if loop.last %}{% break %}{% endif %}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "tojson-strftime.jinja": "{{ strftime_now('%Y-%m-%d') }}{{ messages | tojson(indent=2) }}"
                             "{{ messages[0].content.startswith('You') }}{{ messages | length }}",
    "chatml.jinja": CHAT_TEMPLATE,
}


def chat_template_seeds():
    for path in home("models/*/*/tokenizer_config.json"):
        name = os.path.basename(os.path.dirname(os.path.dirname(path)))
        write("chat_template", f"real-{name}.json", read(path))
    for name, source in TEMPLATES.items():
        write("chat_template", name, source)
    write("chat_template", "named-templates.json", json.dumps({
        "chat_template": [{"name": "default", "template": TEMPLATES["chatml.jinja"]},
                          {"name": "tool_use", "template": "{{ raise_exception('no tools') }}"}],
        "bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>"}))
    write("chat_template", "messages.txt", SEP.join([TEMPLATES["mistral.jinja"].encode(),
                                                      b"user:Hi", b"assistant:Hello", b"user:\xc3\xa9\n"]))


# --- pickles, audit, scan ----------------------------------------------------------------------

def pickle_seeds():
    for path in sorted(glob.glob(os.path.join(ROOT, "attest", "src", "pickle", "fixtures", "*"))):
        if not path.endswith(".py"):
            write("pickle", os.path.basename(path), read(path))
    npy = b"\x93NUMPY\x01\x00" + b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }".ljust(117) + b"\n"
    write("pickle", "object-array.npy", npy + read(os.path.join(ROOT, "attest", "src", "pickle", "fixtures", "os_system_p2.pkl")))


def audit_seeds():
    checkpoint = os.path.join(HOME, "audit", "checkpoint")
    if os.path.exists(checkpoint):
        note = read(checkpoint)
        write("audit_checkpoint", "open-real-checkpoint", b"\x00" + note)
        text = note[:note.rfind(b"\n\n") + 1]
        write("audit_checkpoint", "signed-real-text", b"\x01" + text)
    log = os.path.join(HOME, "audit", "log.jsonl")
    if os.path.exists(log):
        lines = read(log).splitlines(keepends=True)
        write("audit_checkpoint", "log-first-8", b"\x02" + b"".join(lines[:8]))
        write("audit_checkpoint", "log-torn-tail", b"\x02" + b"".join(lines[:3]) + lines[3][:40])
    write("audit_checkpoint", "signed-minimal", b"\x01" + b"sanctum/audit/0000000000000000\n0\n"
          + base64.b64encode(hashlib.sha256(b"").digest()) + b"\n")


def scan_seeds():
    names = ["model.bin", "model.safetensors", "model.gguf", "pytorch_model.bin", "model.pt", "weights.npz",
             "model.keras", "model.onnx", "saved_model.pb", "model.llamafile", "data.pkl", "array.npy"]
    pick = {n: bytes([i]) for i, n in enumerate(names)}
    write("scan_inspect", "safetensors", pick["model.safetensors"] + tiny_llama_safetensors(quant=True))
    write("scan_inspect", "gguf", pick["model.gguf"] + gguf(types=("f32", "f32"), hidden=16, heads=2, kv_heads=1, ffn=16))
    fixtures = os.path.join(ROOT, "attest", "src", "pickle", "fixtures")
    write("scan_inspect", "torch-zip", pick["model.pt"] + read(os.path.join(fixtures, "torch_os_system.zip")))
    write("scan_inspect", "legacy-torch", pick["pytorch_model.bin"] + read(os.path.join(fixtures, "torch_legacy.bin")))
    write("scan_inspect", "raw-pickle", pick["data.pkl"] + read(os.path.join(fixtures, "popen_p4.pkl")))
    write("scan_inspect", "onnx", pick["model.onnx"] + b"\x08\x07\x12\x07pytorch\x1a\x032.1")
    write("scan_inspect", "npy", pick["array.npy"] + read(os.path.join(SEEDS, "pickle", "object-array.npy")))
    write("scan_inspect", "llamafile", pick["model.llamafile"] + b"MZqFpD='\n" + b"\0" * 56)


def serve_seeds():
    # The first byte picks the route, in the order of ROUTES in fuzz_targets/serve_request.rs.
    routes = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/api/show", "/api/chat",
              "/api/generate", "/api/embed", "/api/embeddings", "/api/pull"]
    pick = {r: bytes([i]) for i, r in enumerate(routes)}
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
    bodies = {
        "openai-chat": ("/v1/chat/completions", {
            "model": "smollm2-135m-instruct", "messages": messages, "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": 8, "temperature": 0.7,
            "top_p": 0.9, "seed": 1, "stop": ["\n"], "response_format": {"type": "text"}}),
        "openai-completion": ("/v1/completions", {
            "model": "smollm2-135m-instruct", "prompt": ["Once upon"], "max_completion_tokens": 4}),
        "openai-embedding": ("/v1/embeddings", {
            "model": "all-minilm-l6-v2", "input": ["a", "b"], "encoding_format": "float"}),
        "ollama-show": ("/api/show", {"model": "smollm2-135m-instruct:latest"}),
        "ollama-chat": ("/api/chat", {
            "model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}],
            "stream": False, "keep_alive": "5m",
            "options": {"temperature": 0, "num_predict": 8, "top_k": 40, "top_p": 0.9, "min_p": 0.05,
                        "repeat_penalty": 1.1, "repeat_last_n": 64, "seed": 7, "stop": ["</s>"],
                        "num_ctx": 2048}}),
        "ollama-generate": ("/api/generate", {
            "model": "smollm2-135m-instruct", "prompt": "Why is the sky blue?", "system": "Short.",
            "raw": False, "options": {"num_predict": 4}}),
        "ollama-embed": ("/api/embed", {"model": "all-minilm-l6-v2", "input": "text", "truncate": False}),
        "ollama-embeddings": ("/api/embeddings", {"model": "all-minilm-l6-v2", "prompt": "text"}),
        "ollama-pull": ("/api/pull", {"model": "smollm2-135m-instruct", "stream": False}),
    }
    for name, (route, body) in bodies.items():
        write("serve_request", name, pick[route] + json.dumps(body).encode())
    write("serve_request", "not-json", pick["/api/chat"] + b"{\"model\": ")


def main():
    lockfile_seeds()
    policy_seeds()
    statements = statement_seeds()
    bundle_seeds(statements)
    safetensors_seeds()
    gguf_seeds()
    model_config_seeds()
    chat_template_seeds()
    pickle_seeds()
    audit_seeds()
    scan_seeds()
    serve_seeds()


if __name__ == "__main__":
    main()
