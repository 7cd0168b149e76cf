//! Sigstore bundle v0.3 JSON (`*.sigstore.json`, `models.lock.sigstore.json`, `model.sig`):
//! `CheckedBundle::from_json` (step 1: media type, key hint, keyless refusal, exactly one DSSE
//! signature), the DSSE envelope with its lenient base64, the PAE, and then every verifier that
//! reads a bundle, with the fuzzing key trusted (seeds signed by it keep a valid signature while
//! the fuzzer changes the parts the signature does not cover).

#![no_main]

use attest::bundle::CheckedBundle;
use attest::dsse::{Envelope, decode_base64};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = decode_base64(text);
    }
    if let Ok(envelope) = serde_json::from_slice::<Envelope>(data) {
        let _ = envelope.pae();
    }
    if let Ok(bundle) = CheckedBundle::from_json(data) {
        let _ = bundle.envelope.pae();
        let _ = bundle.signature();
    }
    sanctum_fuzz::verify_bundle(data);
});
