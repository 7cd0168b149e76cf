//! `sanctum-policy.toml`: `Policy::from_toml` (TOML, version, approver and signer keys as inline
//! PEM or key files, license lists, the lock-signature rule, `[sources]`, `[devices]`,
//! `[formats]`, `[outputs]`, `[audit]` validated by `Rules::validate`), the SPDX expression parser
//! the license rule uses on a lock's `license` field, and the rule checks run against a parsed
//! policy. Key files are looked up in a scratch directory holding one real public key
//! (`approver.pub`); nothing is written.

#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use attest::policy::rules::{DeviceKind, SourceKind};
use attest::policy::{LicenseExpr, Policy};
use libfuzzer_sys::fuzz_target;

fn base() -> &'static Path {
    static BASE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &BASE
        .get_or_init(|| {
            let dir = sanctum_fuzz::scratch();
            std::fs::write(
                dir.path().join("approver.pub"),
                sanctum_fuzz::public().to_pem(),
            )
            .expect("write the key file");
            let path = dir.path().to_owned();
            (dir, path)
        })
        .1
}

const EXPRESSIONS: &[&str] = &[
    "MIT",
    "Apache-2.0 OR MIT",
    "CC-BY-NC-4.0",
    "(MIT AND BSD-3-Clause) OR GPL-3.0-only WITH Classpath-exception-2.0",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A lock entry's `license` is judged by the policy's license rule.
    let _ = LicenseExpr::parse(text);
    let _ = Policy::builtin().licenses.check(text);

    let Ok(policy) = Policy::from_toml(text, base()) else {
        return;
    };
    for expression in EXPRESSIONS {
        let _ = policy.licenses.check(expression);
    }
    let _ = policy.approvers.get(sanctum_fuzz::public().hint());
    let _ = policy.signers.get(sanctum_fuzz::public().hint());
    let rules = &policy.rules;
    for kind in [
        SourceKind::Pypi,
        SourceKind::Hf,
        SourceKind::Oci,
        SourceKind::Hub,
    ] {
        for endpoint in [
            "https://huggingface.co",
            "https://pypi.org/simple/",
            "http://127.0.0.1:8080/hub",
            "ghcr.io",
        ] {
            let _ = rules.check_source("fuzz", kind, endpoint);
        }
    }
    for format in ["safetensors", "gguf", "pickle"] {
        let _ = rules.check_file_format(format);
    }
    for weights in ["q8_0", "Q4_K", "f32"] {
        let _ = rules.check_weights("fuzz", weights);
    }
    for device in [DeviceKind::Cpu, DeviceKind::Cuda, DeviceKind::Metal] {
        let _ = rules.check_device(device, "cpu");
    }
    let _ = rules.check_output(None);
});
