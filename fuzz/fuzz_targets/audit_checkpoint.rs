//! The audit log's untrusted inputs (`attest::audit`, docs/audit.md): checkpoints as C2SP signed
//! notes (`Checkpoint::open`: size cap, UTF-8, control characters, the signature lines, base64,
//! key ID, ECDSA, then the checkpoint text), and a log directory read back by `AuditLog`
//! (`entries`, `verify` with an earlier checkpoint's consistency proof, `prove`).
//!
//! The first byte picks what the rest is:
//! - 0: a note, opened as it is (almost never validly signed: the signature-line parsing);
//! - 1: a note's text, signed with the fuzzing key first, so `open` reaches the text parser;
//! - 2: `log.jsonl`, written to a scratch log directory together with checkpoints signed by the
//!   fuzzing key over its lines (the whole log and its first half), so `verify` gets past the
//!   root comparison and to the consistency proof with the fuzzer's entries.

#![no_main]

use attest::audit::merkle;
use attest::audit::note::key_name;
use attest::audit::{AuditLog, Checkpoint};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

/// A note of `text` signed by the fuzzing key, as `Checkpoint::sign` writes one.
fn signed_note(text: &[u8]) -> Option<Vec<u8>> {
    let key = sanctum_fuzz::key();
    let digest = Sha256::digest(key.public().spki_der());
    let mut signature = digest[..4].to_vec();
    signature.extend(key.sign(text).ok()?);
    let mut note = text.to_vec();
    note.extend_from_slice(
        format!(
            "\n\u{2014} {} {}\n",
            key_name(key.public()),
            STANDARD.encode(signature)
        )
        .as_bytes(),
    );
    Some(note)
}

fn checkpoint_note(lines: &[&[u8]]) -> Option<String> {
    let leaves: Vec<merkle::Hash> = lines.iter().map(|l| merkle::leaf_hash(l)).collect();
    Checkpoint {
        origin: key_name(sanctum_fuzz::public()),
        size: leaves.len() as u64,
        root: merkle::root(&leaves),
    }
    .sign(sanctum_fuzz::key())
    .ok()
}

fn log_dir(log: &[u8]) {
    let scratch = sanctum_fuzz::scratch();
    let dir = scratch.path();
    // The complete lines, as the log reads them (a torn last line is not an entry).
    let complete = match log.iter().rposition(|&b| b == b'\n') {
        Some(end) => &log[..end],
        None => &log[..0],
    };
    let lines: Vec<&[u8]> = if log.contains(&b'\n') {
        complete.split(|&b| b == b'\n').collect()
    } else {
        Vec::new()
    };
    if std::fs::write(dir.join("log.jsonl"), log).is_err() {
        return;
    }
    if let Some(note) = checkpoint_note(&lines)
        && std::fs::write(dir.join("checkpoint"), note).is_err()
    {
        return;
    }
    let earlier = checkpoint_note(&lines[..lines.len() / 2]);
    let log = AuditLog::new(dir);
    let public = sanctum_fuzz::public();
    let _ = log.entries();
    let _ = log.verify(public, None);
    if let Some(earlier) = &earlier {
        let path = dir.join("earlier");
        let _ = log.verify(public, Some((path.as_path(), earlier.as_bytes())));
    }
    let _ = log.prove(0, public);
    let _ = log.prove(lines.len().saturating_sub(1) as u64, public);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            let _ = Checkpoint::open(rest, sanctum_fuzz::public());
        }
        1 => {
            if let Some(note) = signed_note(rest) {
                let _ = Checkpoint::open(&note, sanctum_fuzz::public());
            }
        }
        _ => log_dir(rest),
    }
});
