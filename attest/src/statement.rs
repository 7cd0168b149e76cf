//! in-toto Statement v1 and sanctum's own predicate for model outputs.
//!
//! An output attestation's statement names the output as its one subject (a name and the sha256 of
//! exactly the bytes written or printed) and carries an [`OutputPredicate`] under the predicate type
//! [`OUTPUT_PREDICATE_TYPE`]. Its JSON Schema is `docs/schema/output-v1.schema.json`. Payloads are
//! written as canonical JSON ([`canonical_json`]): keys sorted, no insignificant whitespace.

use std::collections::BTreeMap;
use std::time::SystemTime;

use chrono::{DateTime, SecondsFormat, Utc};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::digest::Sha256Digest;
use crate::lockfile::LockedFile;

/// `_type` of an in-toto Statement v1.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";

/// predicateType of sanctum's output attestations; the version is part of the URI, and a new version
/// gets a new URI.
pub const OUTPUT_PREDICATE_TYPE: &str = "https://example.invalid/sanctum/attestation/output/v1";

/// predicateType of sanctum's benchmark attestations (`sanctum bench --attest`): the subject is the
/// result JSON, the predicate a [`BenchPredicate`].
pub const BENCH_PREDICATE_TYPE: &str = "https://example.invalid/sanctum/attestation/bench/v1";

/// An in-toto Statement v1 with a predicate of type `P`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Statement<P> {
    /// [`STATEMENT_TYPE`].
    #[serde(rename = "_type")]
    pub type_: String,
    /// What the statement is about.
    pub subject: Vec<Subject>,
    /// What the predicate means.
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    /// The claims.
    pub predicate: P,
}

/// A subject: a name and its digests (`{"sha256": hex}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subject {
    /// A name for the artifact (a file name or repository-relative path).
    pub name: String,
    /// Digests by algorithm.
    pub digest: DigestSet,
}

/// `{"sha256": "<hex>"}`, as in-toto's DigestSet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestSet {
    /// The sha256.
    pub sha256: Sha256Digest,
}

impl From<Sha256Digest> for DigestSet {
    fn from(sha256: Sha256Digest) -> Self {
        Self { sha256 }
    }
}

/// Why a payload is not a statement of the expected kind (verification step 4).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StatementError {
    /// DSSE payloadType other than in-toto's.
    #[error("payload type {0:?}: expected {IN_TOTO}", IN_TOTO = crate::dsse::IN_TOTO_PAYLOAD_TYPE)]
    PayloadType(String),
    /// Not JSON, or a predicate of the right type that does not follow its schema.
    #[error("the payload is not a valid statement: {0}")]
    Json(#[from] serde_json::Error),
    /// Another `_type`.
    #[error("statement type {0:?}: expected {STATEMENT_TYPE}")]
    StatementType(String),
    /// Another predicateType.
    #[error("predicate type {found:?}: expected {expected}")]
    PredicateType {
        /// In the statement.
        found: String,
        /// What the verifier reads.
        expected: &'static str,
    },
    /// Not exactly one subject.
    #[error("{0} subjects: expected exactly one")]
    SubjectCount(usize),
}

/// Parses a DSSE payload as a statement with exactly one subject and predicate type `expected`.
/// The type fields are checked before the predicate is parsed, so an unknown type gets its own message.
pub fn parse_statement<P: DeserializeOwned>(
    payload_type: &str,
    payload: &[u8],
    expected: &'static str,
) -> Result<Statement<P>, StatementError> {
    if payload_type != crate::dsse::IN_TOTO_PAYLOAD_TYPE {
        return Err(StatementError::PayloadType(payload_type.to_owned()));
    }
    let raw: Statement<serde_json::Value> = serde_json::from_slice(payload)?;
    if raw.type_ != STATEMENT_TYPE {
        return Err(StatementError::StatementType(raw.type_));
    }
    if raw.predicate_type != expected {
        return Err(StatementError::PredicateType {
            found: raw.predicate_type,
            expected,
        });
    }
    if raw.subject.len() != 1 {
        return Err(StatementError::SubjectCount(raw.subject.len()));
    }
    Ok(Statement {
        type_: raw.type_,
        subject: raw.subject,
        predicate_type: raw.predicate_type,
        predicate: serde_json::from_value(raw.predicate)?,
    })
}

/// Canonical JSON of a value: object keys sorted by code point, no whitespace, numbers as `serde_json`
/// prints them. For the values sanctum writes (strings, integers, finite floats, booleans) this is
/// RFC 8785 (JCS).
pub fn canonical_json<T: Serialize>(value: &T) -> Vec<u8> {
    // serde_json::Value keeps objects in a BTreeMap (sorted) unless `preserve_order` is enabled; sort
    // explicitly so that a feature switched on elsewhere in the build cannot change the bytes.
    fn sort(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(map) => {
                let sorted: BTreeMap<String, serde_json::Value> =
                    map.into_iter().map(|(k, v)| (k, sort(v))).collect();
                serde_json::Value::Object(sorted.into_iter().collect())
            }
            serde_json::Value::Array(items) => {
                serde_json::Value::Array(items.into_iter().map(sort).collect())
            }
            other => other,
        }
    }
    let value = serde_json::to_value(value)
        .unwrap_or_else(|e| unreachable!("statements always serialize to JSON: {e}"));
    serde_json::to_vec(&sort(value))
        .unwrap_or_else(|e| unreachable!("JSON values always serialize: {e}"))
}

/// sanctum's predicate: what produced an output. Field by field, `docs/schema/output-v1.schema.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutputPredicate {
    /// The command that produced the output.
    pub task: OutputTask,
    /// The approved model version.
    pub model: ModelRecord,
    /// The lockfile that approved it.
    pub lockfile: LockRecord,
    /// The sanctum build that ran it.
    pub runner: RunnerRecord,
    /// Where and how it ran.
    pub runtime: RuntimeRecord,
    /// Sampling settings; absent for embeddings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<SamplingRecord>,
    /// The fully rendered prompt (or the embedded texts).
    pub prompt: PromptRecord,
    /// Token counts.
    pub usage: UsageRecord,
    /// The HTTP request it answered, for outputs of `sanctum serve`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<RequestRecord>,
    /// RFC 3339 UTC time the work started.
    pub started_at: String,
    /// RFC 3339 UTC time the output was complete.
    pub finished_at: String,
}

/// What produced a benchmark result: the build, the model, the hardware it ran on and the profile it
/// was filed under. Hardware and profile are kept as the JSON the runner wrote (their shape is
/// `runner::hardware::HardwareProfile`), so that verifying needs no inference code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BenchPredicate {
    /// The sanctum build that ran the benchmark.
    pub runner: RunnerRecord,
    /// The model benchmarked: name and model digest.
    pub model: BenchModelRecord,
    /// The lockfile that approved it.
    pub lockfile: LockRecord,
    /// The machine as detected while the benchmark ran.
    pub hardware: serde_json::Value,
    /// The hardware profile the results were filed under, when one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<ProfileRecord>,
    /// RFC 3339 UTC time the benchmark started.
    pub started_at: String,
    /// RFC 3339 UTC time the results were complete.
    pub finished_at: String,
}

/// The model of a benchmark.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchModelRecord {
    /// Name in the lock.
    pub name: String,
    /// The model digest.
    pub digest: DigestSet,
}

/// The hardware profile a benchmark was run under.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProfileRecord {
    /// The profile's name.
    pub name: String,
    /// sha256 of the profile file's bytes.
    pub digest: DigestSet,
    /// Where the machine differed from it (non-empty only when run with `--force`).
    pub mismatches: Vec<String>,
    /// The profile's content.
    pub content: serde_json::Value,
}

/// Which command made an output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputTask {
    /// `sanctum run`: one reply.
    Run,
    /// `sanctum chat`: one reply of a conversation.
    Chat,
    /// `sanctum embed`: embeddings.
    Embed,
}

/// The model, as the lock pins it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelRecord {
    /// Name in the lock.
    pub name: String,
    /// The model digest.
    pub digest: DigestSet,
    /// The license the lock records (informative: verifiers judge the lock's own entry).
    pub license: String,
    /// Every file with its sha256 and size.
    pub files: Vec<FileRecord>,
}

/// One model file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRecord {
    /// Relative path.
    pub path: String,
    /// sha256 of its bytes.
    pub sha256: Sha256Digest,
    /// Size in bytes.
    pub size: u64,
}

impl From<&LockedFile> for FileRecord {
    fn from(f: &LockedFile) -> Self {
        Self {
            path: f.path.clone(),
            sha256: f.sha256,
            size: f.size,
        }
    }
}

impl From<&FileRecord> for LockedFile {
    fn from(f: &FileRecord) -> Self {
        Self {
            path: f.path.clone(),
            sha256: f.sha256,
            size: f.size,
        }
    }
}

/// The lockfile the model was approved by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LockRecord {
    /// sha256 of the lockfile's bytes.
    pub digest: DigestSet,
    /// Who signed it, when its signature was verified against the policy's approvers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<SignerRecord>,
}

/// A key that signed something.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignerRecord {
    /// The key's hint.
    pub hint: String,
    /// The name the policy gives the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The sanctum build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunnerRecord {
    /// Always `sanctum`.
    pub name: String,
    /// Its version.
    pub version: String,
    /// The git commit it was built from, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_commit: Option<String>,
    /// sha256 of the running executable.
    pub binary: DigestSet,
}

/// Where inference ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuntimeRecord {
    /// The device as sanctum describes it (`cpu`, `cuda:0 (NVIDIA H100)`...).
    pub device: String,
    /// CPU threads.
    pub threads: u32,
    /// The weight format inference ran in (`q8_0`, `f32`...), when the command has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<String>,
}

/// Every sampling setting and the seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SamplingRecord {
    /// Temperature (0: greedy).
    pub temperature: f64,
    /// top-k (0: off).
    pub top_k: u64,
    /// top-p (1: off).
    pub top_p: f64,
    /// min-p (0: off).
    pub min_p: f64,
    /// Repeat penalty (1: off).
    pub repeat_penalty: f64,
    /// Window of the repeat penalty.
    pub repeat_last_n: u64,
    /// The sampler's seed.
    pub seed: u64,
    /// Most tokens to generate, when limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Vec<String>,
}

/// The prompt, by digest, and its text only when asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptRecord {
    /// sha256 of the fully rendered prompt's bytes.
    pub sha256: Sha256Digest,
    /// The rendered prompt itself (`--attest-prompt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// Token counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UsageRecord {
    /// Tokens in the prompt (all texts, for embeddings).
    pub prompt_tokens: u64,
    /// Tokens generated (0 for embeddings).
    pub completion_tokens: u64,
}

/// The server request an output answered: which API and route, and the response id the client saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestRecord {
    /// `openai` or `ollama`.
    pub api: String,
    /// The route, e.g. `/v1/chat/completions` or `/api/chat`.
    pub route: String,
    /// Whether the reply was streamed.
    pub stream: bool,
    /// The response id (`chatcmpl-…`), when the API has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// `f32` settings recorded as the decimal they were written as (`0.8`, not `0.800000011920929`).
pub fn f32_as_decimal(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-25T19:40:06.123Z`.
pub fn rfc3339(time: SystemTime) -> String {
    DateTime::<Utc>::from(time).to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // date -u -d @1795635606 → Wed Nov 25 19:40:06 UTC 2026
        let t = UNIX_EPOCH + Duration::from_millis(1_795_635_606_123);
        assert_eq!(rfc3339(t), "2026-11-25T19:40:06.123Z");
        // A leap day.
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn canonical_json_sorts_keys_and_has_no_whitespace() {
        let v = serde_json::json!({"b": 1, "a": {"d": [1, {"z": 0, "y": "é\n"}], "c": 0.8}});
        assert_eq!(
            String::from_utf8(canonical_json(&v)).unwrap(),
            r#"{"a":{"c":0.8,"d":[1,{"y":"é\n","z":0}]},"b":1}"#
        );
        assert_eq!(f32_as_decimal(0.8), 0.8);
        assert_eq!(f32_as_decimal(0.95), 0.95);
    }

    #[test]
    fn parse_statement_names_each_wrong_type() {
        let ok = |t: &str, p: &str, n: usize| {
            let subject: Vec<_> = (0..n)
                .map(|_| serde_json::json!({"name": "x", "digest": {"sha256": "0".repeat(64)}}))
                .collect();
            serde_json::to_vec(&serde_json::json!({"_type": t, "predicateType": p, "subject": subject, "predicate": {}}))
                .unwrap()
        };
        const P: &str = "https://example.invalid/p/v1";
        let good = ok(STATEMENT_TYPE, P, 1);
        parse_statement::<serde_json::Value>(crate::dsse::IN_TOTO_PAYLOAD_TYPE, &good, P).unwrap();
        assert!(matches!(
            parse_statement::<serde_json::Value>("text/plain", &good, P).unwrap_err(),
            StatementError::PayloadType(_)
        ));
        assert!(matches!(
            parse_statement::<serde_json::Value>(
                crate::dsse::IN_TOTO_PAYLOAD_TYPE,
                &ok("https://in-toto.io/Statement/v0.1", P, 1),
                P
            )
            .unwrap_err(),
            StatementError::StatementType(_)
        ));
        assert!(matches!(
            parse_statement::<serde_json::Value>(
                crate::dsse::IN_TOTO_PAYLOAD_TYPE,
                &ok(STATEMENT_TYPE, "x", 1),
                P
            )
            .unwrap_err(),
            StatementError::PredicateType { .. }
        ));
        assert!(matches!(
            parse_statement::<serde_json::Value>(
                crate::dsse::IN_TOTO_PAYLOAD_TYPE,
                &ok(STATEMENT_TYPE, P, 2),
                P
            )
            .unwrap_err(),
            StatementError::SubjectCount(2)
        ));
    }
}
