//! `models.lock`: TOML parsing and every check of `attest::lockfile` (names, paths, formats,
//! digests), then what sanctum does with a lock that passed: the canonical TOML it writes, the
//! per-entry fragment, the model digest, the policy's format rule.
//!
//! A fuzzer cannot make sha256 digests match, so the same text is also deserialized with the
//! lock's own serde types, its model digests recomputed, and checked again: that reaches the
//! code behind the digest check (paths, duplicates, serialization) with fuzzer-chosen entries.

#![no_main]

use attest::lockfile::{Lockfile, check_relative_path, model_digest};
use attest::policy::Rules;
use attest::policy::rules::origin_format;
use libfuzzer_sys::fuzz_target;

fn after_parse(lock: &Lockfile) {
    let text = lock.to_toml();
    let _ = Lockfile::parse(&text);
    let rules = Rules::default();
    for entry in &lock.models {
        let _ = lock.model(&entry.name);
        let _ = entry.to_toml();
        let _ = entry.total_size();
        let _ = origin_format(entry);
        let _ = rules.check_model_format(entry);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(lock) = Lockfile::parse(text) {
        after_parse(&lock);
    }
    // Behind the digest check: the same entries with their digests made to match.
    if let Ok(mut lock) = toml::from_str::<Lockfile>(text) {
        for entry in &mut lock.models {
            for file in &entry.files {
                let _ = check_relative_path(&file.path);
            }
            entry.digest = model_digest(&entry.files);
        }
        if lock.check().is_ok() {
            after_parse(&lock);
        }
    }
});
