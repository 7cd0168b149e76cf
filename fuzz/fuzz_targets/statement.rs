//! in-toto Statement v1 payloads and their predicates: the input is a DSSE payload. It is parsed
//! as each predicate sanctum reads (output, bench, lock signature), then signed with the fuzzing
//! key into a bundle and run through every verifier, so the code behind the signature check
//! (statement and predicate types, subject, the model in the lock, file lists and the model
//! digest, licenses, the OpenSSF model-signing predicate) sees the fuzzer's payload.

#![no_main]

use attest::bundle::Bundle;
use attest::dsse::IN_TOTO_PAYLOAD_TYPE;
use attest::lock_signature::{LOCK_PREDICATE_TYPE, LockPredicate};
use attest::statement::{
    BENCH_PREDICATE_TYPE, BenchPredicate, OUTPUT_PREDICATE_TYPE, OutputPredicate, parse_statement,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_statement::<OutputPredicate>(IN_TOTO_PAYLOAD_TYPE, data, OUTPUT_PREDICATE_TYPE);
    let _ = parse_statement::<BenchPredicate>(IN_TOTO_PAYLOAD_TYPE, data, BENCH_PREDICATE_TYPE);
    let _ = parse_statement::<LockPredicate>(IN_TOTO_PAYLOAD_TYPE, data, LOCK_PREDICATE_TYPE);
    let Ok(bundle) = Bundle::sign(IN_TOTO_PAYLOAD_TYPE, data.to_vec(), sanctum_fuzz::key()) else {
        return;
    };
    sanctum_fuzz::verify_bundle(&bundle.to_json());
});
