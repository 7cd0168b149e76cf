"""sanctum serve driven by the official `openai` Python client, as a user would.

Usage: PYTHON tests/clients/openai_client.py BASE_URL OUTDIR

Prints one line per check and exits non-zero on the first failure. Saves each reply's text in
OUTDIR (openai-chat.txt, openai-chat-stream.txt, openai-completion.txt) for
`sanctum attest verify --artifact` (tests/serve_clients.rs).
"""

import array
import base64
import math
import sys
from pathlib import Path

import openai
from openai import OpenAI

import attestation

CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"
DIMENSIONS = 384
MAX_TOKENS = 24
SEED = 42
MESSAGES = [{"role": "user", "content": "Name three colors of the rainbow."}]


def ok(what: str) -> None:
    print(f"ok   openai: {what}", flush=True)


def save(outdir: Path, name: str, text: str) -> None:
    # Bytes, not text mode: the file must hold exactly the UTF-8 the attestation names.
    (outdir / name).write_bytes(text.encode("utf-8"))


def sanctum_extra(model) -> dict:
    """The response's `sanctum` field, which pydantic keeps as an extra field."""
    extra = model.model_extra or {}
    assert "sanctum" in extra, f"no sanctum field among the extra fields {sorted(extra)}"
    return extra["sanctum"]


def check_usage(usage, max_tokens: int) -> None:
    assert usage is not None, "no usage"
    assert usage.prompt_tokens > 0, usage
    assert 0 < usage.completion_tokens <= max_tokens, usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage


def check_finish(reason: str, usage, max_tokens: int) -> None:
    assert reason in ("stop", "length"), reason
    if reason == "length":
        assert usage.completion_tokens == max_tokens, (reason, usage)


def models(client: OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert CHAT_MODEL in ids and EMBED_MODEL in ids, ids
    model = client.models.retrieve(CHAT_MODEL)
    assert model.id == CHAT_MODEL, model
    ok(f"models.list() has {CHAT_MODEL} and {EMBED_MODEL}; models.retrieve() finds {model.id}")


def chat(client: OpenAI, base_url: str, outdir: Path) -> tuple[str, object]:
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL,
        messages=MESSAGES,
        temperature=0,
        seed=SEED,
        max_tokens=MAX_TOKENS,
    )
    header = raw.headers.get("x-sanctum-attestation")
    resp = raw.parse()
    assert resp.object == "chat.completion", resp.object
    assert resp.model == CHAT_MODEL, resp.model
    assert resp.id.startswith("chatcmpl-"), resp.id
    assert len(resp.choices) == 1, resp.choices
    choice = resp.choices[0]
    assert choice.message.role == "assistant", choice.message.role
    text = choice.message.content
    assert isinstance(text, str) and text.strip(), f"empty reply {text!r}"
    check_usage(resp.usage, MAX_TOKENS)
    check_finish(choice.finish_reason, resp.usage, MAX_TOKENS)
    bundle = sanctum_extra(resp)["attestation"]
    attestation.check_output_bundle(bundle, text.encode("utf-8"))
    stored = attestation.check_stored(base_url, text.encode("utf-8"), bundle)
    assert header == f"sha256:{attestation.sha256_hex(stored)}", (
        f"X-Sanctum-Attestation {header!r} is not the sha256 of the stored bundle"
    )
    save(outdir, "openai-chat.txt", text)
    ok(
        f"chat.completions.create: {len(text)} chars, usage {resp.usage.prompt_tokens}+"
        f"{resp.usage.completion_tokens}, finish {choice.finish_reason}, attested "
        f"(X-Sanctum-Attestation is the stored bundle's sha256)"
    )
    return text, resp.usage


def chat_stream(client: OpenAI, base_url: str, outdir: Path, expected: str, usage) -> None:
    stream = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=MESSAGES,
        temperature=0,
        seed=SEED,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts = []
    reasons = []
    usage_chunks = []
    bundles = []
    ids = set()
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk", chunk.object
        assert chunk.model == CHAT_MODEL, chunk.model
        ids.add(chunk.id)
        extra = chunk.model_extra or {}
        if "sanctum" in extra:
            assert chunk.choices == [], "the attestation chunk has choices"
            assert not bundles, "two attestation chunks"
            bundles.append(extra["sanctum"]["attestation"])
            continue
        assert not bundles, "a chunk after the attestation"
        if chunk.usage is not None:
            assert chunk.choices == [], "the usage chunk has choices"
            usage_chunks.append(chunk.usage)
            continue
        assert not usage_chunks, "a content chunk after the usage chunk"
        for choice in chunk.choices:
            if choice.delta.content:
                parts.append(choice.delta.content)
            if choice.finish_reason is not None:
                reasons.append(choice.finish_reason)
    text = "".join(parts)
    assert len(ids) == 1, f"chunks of one stream have several ids {ids}"
    assert len(usage_chunks) == 1, f"{len(usage_chunks)} usage chunks"
    assert len(bundles) == 1, f"{len(bundles)} attestation chunks"
    assert len(reasons) == 1, f"finish reasons {reasons}"
    streamed_usage = usage_chunks[0]
    check_usage(streamed_usage, MAX_TOKENS)
    check_finish(reasons[0], streamed_usage, MAX_TOKENS)
    assert text == expected, f"stream {text!r} differs from the non-stream reply {expected!r}"
    assert streamed_usage.model_dump() == usage.model_dump(), (streamed_usage, usage)
    attestation.check_output_bundle(bundles[0], text.encode("utf-8"))
    attestation.check_stored(base_url, text.encode("utf-8"), bundles[0])
    save(outdir, "openai-chat-stream.txt", text)
    ok(
        f"chat.completions.create(stream=True): {len(parts)} deltas equal the non-stream reply, "
        f"usage chunk {streamed_usage.prompt_tokens}+{streamed_usage.completion_tokens}, "
        f"attestation chunk names the text"
    )


def completion(client: OpenAI, base_url: str, outdir: Path) -> None:
    max_tokens = 16
    resp = client.completions.create(
        model=CHAT_MODEL,
        prompt="The three primary colors are",
        temperature=0,
        seed=SEED,
        max_tokens=max_tokens,
    )
    assert resp.object == "text_completion", resp.object
    assert resp.model == CHAT_MODEL, resp.model
    assert len(resp.choices) == 1, resp.choices
    text = resp.choices[0].text
    assert isinstance(text, str) and text.strip(), f"empty completion {text!r}"
    check_usage(resp.usage, max_tokens)
    check_finish(resp.choices[0].finish_reason, resp.usage, max_tokens)
    bundle = sanctum_extra(resp)["attestation"]
    attestation.check_output_bundle(bundle, text.encode("utf-8"))
    attestation.check_stored(base_url, text.encode("utf-8"), bundle)
    save(outdir, "openai-completion.txt", text)
    ok(f"completions.create: {len(text)} chars, finish {resp.choices[0].finish_reason}, attested")


def check_vectors(vectors: list, what: str) -> None:
    assert len(vectors) == 2, f"{what}: {len(vectors)} vectors"
    for v in vectors:
        assert len(v) == DIMENSIONS, f"{what}: {len(v)} dimensions"
        assert all(math.isfinite(x) for x in v), what
        norm = math.sqrt(sum(x * x for x in v))
        assert abs(norm - 1) < 1e-3, f"{what}: norm {norm}"
    assert vectors[0] != vectors[1], f"{what}: two different inputs, one vector"


def f32(values) -> array.array:
    return array.array("f", values)


def embeddings(client: OpenAI) -> None:
    inputs = ["The sky is blue.", "Attested outputs, signed locally."]
    floats = client.embeddings.create(model=EMBED_MODEL, input=inputs, encoding_format="float")
    assert floats.model == EMBED_MODEL, floats.model
    assert [d.index for d in floats.data] == [0, 1], [d.index for d in floats.data]
    assert floats.usage.prompt_tokens > 0, floats.usage
    assert floats.usage.total_tokens == floats.usage.prompt_tokens, floats.usage
    as_floats = [d.embedding for d in floats.data]
    check_vectors(as_floats, "float")
    attestation.statement(sanctum_extra(floats)["attestation"])
    ok(f"embeddings.create(float): 2 x {DIMENSIONS} normalized, attested")

    # Asked for base64, the client hands back the server's strings as they came.
    b64 = client.embeddings.create(model=EMBED_MODEL, input=inputs, encoding_format="base64")
    strings = [d.embedding for d in b64.data]
    assert all(isinstance(s, str) for s in strings), [type(s).__name__ for s in strings]
    decoded = [f32(base64.b64decode(s, validate=True)) for s in strings]
    assert all(len(v) == DIMENSIONS for v in decoded), [len(v) for v in decoded]
    assert decoded == [f32(v) for v in as_floats], "base64 and float embeddings differ"
    ok("embeddings.create(base64): little-endian f32, the same vectors as float")

    # Without encoding_format the client itself asks for base64 and decodes it.
    default = client.embeddings.create(model=EMBED_MODEL, input=inputs)
    as_default = [d.embedding for d in default.data]
    assert all(isinstance(v, list) for v in as_default), [type(v).__name__ for v in as_default]
    assert [f32(v) for v in as_default] == [f32(v) for v in as_floats], "default differs"
    ok("embeddings.create(): the client's own base64 decoding gives the same vectors")

    one = client.embeddings.create(model=EMBED_MODEL, input=inputs[0], encoding_format="float")
    assert len(one.data) == 1, len(one.data)
    # Alone or in a batch (padded), the same vector up to rounding.
    diff = max(abs(a - b) for a, b in zip(one.data[0].embedding, as_floats[0], strict=True))
    assert diff < 1e-4, f"one input differs from the batch by {diff}"
    ok("embeddings.create(one string): the first vector of the batch")


def errors(client: OpenAI) -> None:
    try:
        client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, max_tokens=4, temperature=0
        )
    except openai.NotFoundError as e:
        assert e.status_code == 404, e.status_code
        assert e.code == "model_not_found", e.code
        assert e.param == "model", e.param
        message = e.body["message"] if isinstance(e.body, dict) else str(e)
        assert "gpt-4o" in message, message
        assert CHAT_MODEL in message and EMBED_MODEL in message, message
        ok(f"unapproved model -> NotFoundError: {message}")
    else:
        raise AssertionError("an unapproved model was served")

    try:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    except openai.NotFoundError as e:
        ok(f"unapproved embedding model -> NotFoundError ({e.code})")
    else:
        raise AssertionError("an unapproved embedding model was served")

    try:
        client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=-1)
    except openai.BadRequestError as e:
        assert e.status_code == 400, e.status_code
        assert e.param == "max_tokens", e.param
        ok(f"max_tokens=-1 -> BadRequestError: {e.body['message']}")
    else:
        raise AssertionError("max_tokens=-1 was accepted")

    try:
        client.chat.completions.create(
            model=CHAT_MODEL, messages=MESSAGES, max_tokens=4, extra_body={"temperature": "hot"}
        )
    except openai.BadRequestError as e:
        assert e.status_code == 400, e.status_code
        ok(f"a string temperature -> BadRequestError: {e.body['message']}")
    else:
        raise AssertionError("a string temperature was accepted")

    try:
        client.chat.completions.create(model=EMBED_MODEL, messages=MESSAGES, max_tokens=4)
    except openai.BadRequestError as e:
        assert e.param == "model", e.param
        ok(f"chat with the embedding model -> BadRequestError: {e.body['message']}")
    else:
        raise AssertionError("the embedding model chatted")


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} BASE_URL OUTDIR")
    base_url = sys.argv[1].rstrip("/")
    outdir = Path(sys.argv[2])
    outdir.mkdir(parents=True, exist_ok=True)
    print(f"openai {openai.__version__} against {base_url}/v1", flush=True)
    # No retries: a failure must show as what the server answered first.
    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=240)
    models(client)
    text, usage = chat(client, base_url, outdir)
    chat_stream(client, base_url, outdir, text, usage)
    completion(client, base_url, outdir)
    embeddings(client)
    errors(client)
    print("openai: all checks passed", flush=True)


if __name__ == "__main__":
    main()
