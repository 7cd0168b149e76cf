"""Checks of sanctum's per-response attestations that need only the standard library.

The client scripts import this: it fetches a reply's bundle from the server's attestation store
(`GET /sanctum/v1/attestations/{sha256}`) and checks that the bundle is a Sigstore bundle with a
signed DSSE envelope whose in-toto statement names exactly the reply's bytes as its subject. The
signature itself is verified afterwards by `sanctum attest verify` (tests/serve_clients.rs).
"""

import base64
import hashlib
import json
import urllib.request

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
OUTPUT_PREDICATE_TYPE = "https://example.invalid/sanctum/attestation/output/v1"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def statement(bundle: dict) -> dict:
    """The in-toto statement a bundle signs, after checking the bundle's shape."""
    assert isinstance(bundle, dict), f"a bundle is a JSON object, not {type(bundle).__name__}"
    assert bundle.get("mediaType") == BUNDLE_MEDIA_TYPE, bundle.get("mediaType")
    envelope = bundle.get("dsseEnvelope")
    assert isinstance(envelope, dict), f"no dsseEnvelope in {sorted(bundle)}"
    assert envelope.get("payloadType") == IN_TOTO_PAYLOAD_TYPE, envelope.get("payloadType")
    signatures = envelope.get("signatures")
    assert isinstance(signatures, list) and signatures, "the envelope has no signature"
    assert all(s.get("sig") for s in signatures), signatures
    stmt = json.loads(base64.b64decode(envelope["payload"], validate=True))
    assert stmt.get("_type") == STATEMENT_TYPE, stmt.get("_type")
    return stmt


def check_output_bundle(bundle: dict, reply: bytes) -> dict:
    """Checks that `bundle` attests exactly `reply` as a model output; returns its statement."""
    stmt = statement(bundle)
    assert stmt.get("predicateType") == OUTPUT_PREDICATE_TYPE, stmt.get("predicateType")
    subjects = stmt.get("subject")
    assert isinstance(subjects, list) and len(subjects) == 1, subjects
    got = subjects[0]["digest"]["sha256"]
    want = sha256_hex(reply)
    assert got == want, f"the attestation's subject is sha256:{got}, the reply's is sha256:{want}"
    return stmt


def fetch_stored(base_url: str, reply: bytes) -> tuple[bytes, dict]:
    """The newest stored bundle for `reply` (raw bytes) and the response headers."""
    url = f"{base_url}/sanctum/v1/attestations/{sha256_hex(reply)}"
    with urllib.request.urlopen(url, timeout=60) as response:
        assert response.status == 200, response.status
        content_type = response.headers.get("Content-Type", "")
        assert content_type.startswith("application/json"), content_type
        return response.read(), dict(response.headers)


def check_stored(base_url: str, reply: bytes, expected: dict | None = None) -> bytes:
    """Fetches the stored bundle for `reply`, checks it (and that it is `expected`, the bundle the
    response carried, when given); returns the stored bundle's bytes."""
    raw, _headers = fetch_stored(base_url, reply)
    stored = json.loads(raw)
    check_output_bundle(stored, reply)
    if expected is not None:
        assert stored == expected, "the stored bundle is not the one the response carried"
    return raw
