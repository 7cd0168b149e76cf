"""sanctum serve driven by the official `ollama` Python client, as a user would.

Usage: PYTHON tests/clients/ollama_client.py BASE_URL OUTDIR

Prints one line per check and exits non-zero on the first failure. Saves each reply's text in
OUTDIR (ollama-chat.txt, ollama-chat-stream.txt, ollama-generate.txt, ollama-generate-stream.txt)
for `sanctum attest verify --artifact` (tests/serve_clients.rs). The client drops the `sanctum`
field of its responses (its models ignore unknown fields), so each reply's attestation is fetched
from the server's store by the sha256 of the text.
"""

import math
import sys
from importlib.metadata import version
from pathlib import Path

import ollama

import attestation

CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"
DIMENSIONS = 384
NUM_PREDICT = 24
OPTIONS = {"temperature": 0, "seed": 7, "num_predict": NUM_PREDICT}
MESSAGES = [{"role": "user", "content": "Write one short sentence about the sea."}]
PROMPT = "Give one tip for writing clear code."


def ok(what: str) -> None:
    print(f"ok   ollama: {what}", flush=True)


def save(outdir: Path, name: str, text: str) -> None:
    # Bytes, not text mode: the file must hold exactly the UTF-8 the attestation names.
    (outdir / name).write_bytes(text.encode("utf-8"))


def check_final(resp, what: str) -> None:
    """The `done` response's fields: reason, counts, durations."""
    assert resp.done is True, f"{what}: done is {resp.done}"
    assert resp.model == CHAT_MODEL, f"{what}: model {resp.model}"
    assert resp.done_reason in ("stop", "length"), f"{what}: done_reason {resp.done_reason}"
    assert resp.prompt_eval_count and resp.prompt_eval_count > 0, f"{what}: {resp}"
    assert resp.eval_count and 0 < resp.eval_count <= NUM_PREDICT, f"{what}: {resp.eval_count}"
    if resp.done_reason == "length":
        assert resp.eval_count == NUM_PREDICT, f"{what}: length after {resp.eval_count}"
    for field in ("total_duration", "prompt_eval_duration", "eval_duration"):
        value = getattr(resp, field)
        assert value is not None and value > 0, f"{what}: {field} = {value}"
    assert resp.total_duration >= resp.eval_duration, f"{what}: {resp}"
    assert resp.created_at, f"{what}: no created_at"


def listing(client: ollama.Client) -> None:
    names = [m.model for m in client.list().models]
    assert CHAT_MODEL in names and EMBED_MODEL in names, names
    for m in client.list().models:
        assert m.digest and m.size and m.size > 0 and m.modified_at is not None, m
        assert m.details is not None and m.details.format == "safetensors", m.details
    ok(f"list(): {', '.join(names)}")


def show(client: ollama.Client) -> None:
    info = client.show(CHAT_MODEL)
    assert info.capabilities and "completion" in info.capabilities, info.capabilities
    assert info.details is not None and info.details.family, info.details
    assert info.license, "show() has no license"
    assert info.modelinfo, "show() has no model_info"
    context = info.modelinfo.get("general.context_length")
    assert isinstance(context, int) and context > 0, info.modelinfo
    embed_info = client.show(EMBED_MODEL)
    assert embed_info.capabilities and "embedding" in embed_info.capabilities, embed_info
    assert embed_info.modelinfo.get("embedding_length") == DIMENSIONS, embed_info.modelinfo
    ok(
        f"show(): {info.details.family}, {info.details.quantization_level}, context {context}, "
        f"license {info.license}; the embedder has {DIMENSIONS} dimensions"
    )


def stream_text(chunks, field: str, what: str) -> tuple[str, object, int]:
    """Concatenates a stream's text; checks its shape: text lines, then the attestation line
    (empty text, done false), then one done line. Returns the text, the done line and the number
    of text lines."""
    lines = list(chunks)
    assert len(lines) >= 3, f"{what}: {len(lines)} lines"
    *body, done = lines
    assert all(line.done is False for line in body), f"{what}: done before the last line"
    texts = [
        line.message.content if field == "message" else line.response for line in body
    ]
    assert texts[-1] == "", f"{what}: the line before done has text {texts[-1]!r}"
    assert all(t for t in texts[:-1]), f"{what}: an empty text line before the attestation line"
    last = done.message.content if field == "message" else done.response
    assert last == "", f"{what}: the done line has text {last!r}"
    check_final(done, what)
    return "".join(texts), done, len(texts) - 1


def chat(client: ollama.Client, base_url: str, outdir: Path) -> None:
    resp = client.chat(model=CHAT_MODEL, messages=MESSAGES, options=OPTIONS)
    assert resp.message.role == "assistant", resp.message.role
    text = resp.message.content
    assert isinstance(text, str) and text.strip(), f"empty reply {text!r}"
    check_final(resp, "chat")
    attestation.check_stored(base_url, text.encode("utf-8"))
    save(outdir, "ollama-chat.txt", text)
    ok(
        f"chat(): {len(text)} chars, {resp.prompt_eval_count}+{resp.eval_count} tokens, "
        f"done_reason {resp.done_reason}, attested in the store"
    )

    streamed, done, pieces = stream_text(
        client.chat(model=CHAT_MODEL, messages=MESSAGES, options=OPTIONS, stream=True),
        "message",
        "chat(stream=True)",
    )
    assert streamed == text, f"stream {streamed!r} differs from the non-stream reply {text!r}"
    assert (done.prompt_eval_count, done.eval_count, done.done_reason) == (
        resp.prompt_eval_count,
        resp.eval_count,
        resp.done_reason,
    ), (done, resp)
    attestation.check_stored(base_url, streamed.encode("utf-8"))
    save(outdir, "ollama-chat-stream.txt", streamed)
    ok(
        f"chat(stream=True): {pieces} pieces equal the non-stream reply, then the attestation "
        f"line (empty content, done false), then done"
    )


def generate(client: ollama.Client, base_url: str, outdir: Path) -> None:
    resp = client.generate(model=CHAT_MODEL, prompt=PROMPT, options=OPTIONS)
    text = resp.response
    assert isinstance(text, str) and text.strip(), f"empty reply {text!r}"
    check_final(resp, "generate")
    attestation.check_stored(base_url, text.encode("utf-8"))
    save(outdir, "ollama-generate.txt", text)
    ok(f"generate(): {len(text)} chars, done_reason {resp.done_reason}, attested in the store")

    streamed, _done, pieces = stream_text(
        client.generate(model=CHAT_MODEL, prompt=PROMPT, options=OPTIONS, stream=True),
        "response",
        "generate(stream=True)",
    )
    assert streamed == text, f"stream {streamed!r} differs from the non-stream reply {text!r}"
    attestation.check_stored(base_url, streamed.encode("utf-8"))
    save(outdir, "ollama-generate-stream.txt", streamed)
    ok(f"generate(stream=True): {pieces} pieces equal the non-stream reply")


def embed(client: ollama.Client) -> None:
    inputs = ["Lighthouses guide ships.", "A signed record of every output."]
    resp = client.embed(model=EMBED_MODEL, input=inputs)
    assert resp.model == EMBED_MODEL, resp.model
    vectors = [list(v) for v in resp.embeddings]
    assert len(vectors) == 2, len(vectors)
    for v in vectors:
        assert len(v) == DIMENSIONS, len(v)
        norm = math.sqrt(sum(x * x for x in v))
        assert abs(norm - 1) < 1e-3, f"norm {norm}"
    assert vectors[0] != vectors[1], "two different inputs, one vector"
    assert resp.prompt_eval_count and resp.prompt_eval_count > 0, resp.prompt_eval_count
    one = client.embed(model=EMBED_MODEL, input=inputs[0])
    assert len(one.embeddings) == 1, len(one.embeddings)
    single = list(one.embeddings[0])
    # Alone or in a batch (padded), the same vector up to rounding.
    diff = max(abs(a - b) for a, b in zip(single, vectors[0], strict=True))
    assert diff < 1e-4, f"one input differs from the batch by {diff}"
    legacy = client.embeddings(model=EMBED_MODEL, prompt=inputs[0])
    assert list(legacy.embedding) == single, "/api/embeddings differs from /api/embed"
    ok(f"embed(): 2 x {DIMENSIONS} normalized; one input and embeddings() give the same vector")


def ps(client: ollama.Client) -> None:
    loaded = {m.model: m for m in client.ps().models}
    assert CHAT_MODEL in loaded and EMBED_MODEL in loaded, sorted(loaded)
    for m in loaded.values():
        assert m.size and m.size > 0 and m.digest and m.expires_at is not None, m
    ok(f"ps(): {', '.join(sorted(loaded))} loaded")


def errors(client: ollama.Client) -> None:
    calls = {
        "chat": lambda: client.chat(model="llama3.2", messages=MESSAGES),
        "chat(stream=True)": lambda: list(
            client.chat(model="llama3.2", messages=MESSAGES, stream=True)
        ),
        "generate": lambda: client.generate(model="llama3.2", prompt=PROMPT),
        "embed": lambda: client.embed(model="nomic-embed-text", input="x"),
        "show": lambda: client.show("llama3.2"),
        "pull": lambda: client.pull("llama3.2"),
    }
    for what, call in calls.items():
        try:
            call()
        except ollama.ResponseError as e:
            assert e.status_code == 404, f"{what}: status {e.status_code}: {e.error}"
            assert CHAT_MODEL in e.error and EMBED_MODEL in e.error, f"{what}: {e.error}"
        else:
            raise AssertionError(f"{what}: an unapproved model was served")
    ok(f"unapproved models -> ResponseError 404 naming the approved models ({', '.join(calls)})")

    try:
        client.chat(model=CHAT_MODEL, messages=MESSAGES, options={"num_predict": -5})
    except ollama.ResponseError as e:
        assert e.status_code == 400, e.status_code
        ok(f"num_predict=-5 -> ResponseError 400: {e.error}")
    else:
        raise AssertionError("num_predict=-5 was accepted")

    pulled = client.pull(CHAT_MODEL)
    assert pulled.status == "success", pulled
    statuses = [p.status for p in client.pull(CHAT_MODEL, stream=True)]
    assert statuses and statuses[-1] == "success", statuses
    ok(f"pull() of an approved, pulled model: success ({len(statuses)} progress lines streamed)")


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} BASE_URL OUTDIR")
    base_url = sys.argv[1].rstrip("/")
    outdir = Path(sys.argv[2])
    outdir.mkdir(parents=True, exist_ok=True)
    print(f"ollama {version('ollama')} against {base_url}", flush=True)
    client = ollama.Client(host=base_url, timeout=240)
    listing(client)
    show(client)
    chat(client, base_url, outdir)
    generate(client, base_url, outdir)
    embed(client)
    ps(client)
    errors(client)
    print("ollama: all checks passed", flush=True)


if __name__ == "__main__":
    main()
