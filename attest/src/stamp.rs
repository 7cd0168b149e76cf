//! Stamping outputs: one signed attestation per output, a Sigstore bundle v0.3 holding a DSSE envelope
//! of an in-toto statement whose subject is the output and whose predicate is an [`OutputPredicate`].
//!
//! ```
//! use std::time::SystemTime;
//! use attest::Sha256Digest;
//! use attest::keys::SigningKey;
//! use attest::lockfile::{HfSource, LockedFile, ModelEntry, Source, Task};
//! use attest::stamp::{LockInfo, OutputRecord, RunnerInfo, Stamper};
//! use attest::statement::{OutputTask, RuntimeRecord, UsageRecord};
//!
//! # let files = vec![LockedFile { path: "model.safetensors".into(), sha256: Sha256Digest::of(b"w"), size: 1 }];
//! # let source = Source::Hf(HfSource { repo: "o/m".into(), revision: "r".into(), files: None });
//! # let entry = ModelEntry::new("m", Task::Chat, "llama", "MIT", source, files);
//! // Once per process: the key, the runner build and the lock in force.
//! let runner = RunnerInfo { version: "0.1.0".into(), git_commit: None, binary_sha256: Sha256Digest::of(b"exe") };
//! let lock = LockInfo { digest: Sha256Digest::of(b"lock"), signer: None };
//! let stamper = Stamper::new(SigningKey::generate()?, runner, lock);
//! // Once per output.
//! let now = SystemTime::now();
//! let stamp = stamper.stamp(&OutputRecord {
//!     name: "stdout",
//!     bytes: b"Hello!\n",
//!     task: OutputTask::Run,
//!     model: &entry, // the lock entry of the model that ran
//!     runtime: RuntimeRecord { device: "cpu".into(), threads: 4, quantization: Some("q8_0".into()) },
//!     sampling: None,
//!     prompt: "<|im_start|>user\nHi<|im_end|>\n",
//!     include_prompt_text: false,
//!     usage: UsageRecord { prompt_tokens: 9, completion_tokens: 3 },
//!     request: None,
//!     started: now,
//!     finished: now,
//! })?;
//! assert_eq!(stamp.subject.digest.sha256, Sha256Digest::of(b"Hello!\n"));
//! // stamp.json: the bundle bytes to write (see attestation::layout for where).
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::time::SystemTime;

use crate::audit::{AuditError, AuditLog, Event};
use crate::bundle::Bundle;
use crate::digest::Sha256Digest;
use crate::dsse::IN_TOTO_PAYLOAD_TYPE;
use crate::keys::{KeyError, KeyHint, SigningKey};
use crate::lockfile::ModelEntry;
use crate::statement::{
    BENCH_PREDICATE_TYPE, BenchModelRecord, BenchPredicate, FileRecord, LockRecord, ModelRecord,
    OUTPUT_PREDICATE_TYPE, OutputPredicate, OutputTask, ProfileRecord, PromptRecord, RequestRecord,
    RunnerRecord, RuntimeRecord, STATEMENT_TYPE, SamplingRecord, SignerRecord, Statement, Subject,
    UsageRecord, canonical_json, rfc3339,
};

/// The sanctum build doing the stamping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerInfo {
    /// `CARGO_PKG_VERSION` of the binary.
    pub version: String,
    /// The git commit it was built from, when known.
    pub git_commit: Option<String>,
    /// sha256 of the running executable.
    pub binary_sha256: Sha256Digest,
}

/// The lockfile in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockInfo {
    /// sha256 of its bytes.
    pub digest: Sha256Digest,
    /// Who signed it, when the policy verified the signature
    /// ([`crate::lock_signature::LockStatus::signer_record`]).
    pub signer: Option<SignerRecord>,
}

/// One output to stamp and what produced it.
#[derive(Debug, Clone)]
pub struct OutputRecord<'a> {
    /// Subject name: the repository-relative path or file name of `--out`, or e.g. `stdout`.
    pub name: &'a str,
    /// Exactly the bytes written or printed.
    pub bytes: &'a [u8],
    /// Which command.
    pub task: OutputTask,
    /// The lock entry of the model that ran (name, digest, license, files).
    pub model: &'a ModelEntry,
    /// Device, threads, quantization.
    pub runtime: RuntimeRecord,
    /// Sampling settings and seed (None for embeddings).
    pub sampling: Option<SamplingRecord>,
    /// The fully rendered prompt (chat template applied), or the texts embedded.
    pub prompt: &'a str,
    /// Put the prompt text itself in the attestation (`--attest-prompt`); otherwise only its sha256.
    pub include_prompt_text: bool,
    /// Token counts.
    pub usage: UsageRecord,
    /// The HTTP request answered (`sanctum serve`); None for the CLI.
    pub request: Option<RequestRecord>,
    /// When the work started (before loading the model).
    pub started: SystemTime,
    /// When the output was complete.
    pub finished: SystemTime,
}

/// A stamped output.
#[derive(Debug, Clone)]
pub struct Stamp {
    /// The subject (name and sha256 of the output).
    pub subject: Subject,
    /// The bundle.
    pub bundle: Bundle,
    /// The bundle as the bytes to write (compact JSON and a newline).
    pub json: Vec<u8>,
    /// sha256 of `json`: what the audit log, the server's header and its access log name.
    pub bundle_sha256: Sha256Digest,
}

/// Signs output attestations with one key, for one runner build and lock.
#[derive(Debug)]
pub struct Stamper {
    key: SigningKey,
    runner: RunnerRecord,
    lock: LockRecord,
    audit: Option<AuditLog>,
}

/// Why an output could not be stamped.
#[derive(Debug, thiserror::Error)]
pub enum StampError {
    /// Signing failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The audit log refused the entry (nothing is stamped that is not logged).
    #[error("audit log: {0}")]
    Audit(#[from] AuditError),
}

impl Stamper {
    /// A stamper signing with `key`.
    pub fn new(key: SigningKey, runner: RunnerInfo, lock: LockInfo) -> Self {
        Self {
            key,
            runner: RunnerRecord {
                name: "sanctum".into(),
                version: runner.version,
                git_commit: runner.git_commit,
                binary: runner.binary_sha256.into(),
            },
            lock: LockRecord {
                digest: lock.digest.into(),
                signer: lock.signer,
            },
            audit: None,
        }
    }

    /// Records every stamp in `log` too, its checkpoint signed with the same key.
    pub fn with_audit(mut self, log: AuditLog) -> Self {
        self.audit = Some(log);
        self
    }

    /// The key, for a front end that records other actions in the same audit log.
    pub fn key(&self) -> &SigningKey {
        &self.key
    }

    /// The signing key's hint.
    pub fn hint(&self) -> &KeyHint {
        self.key.hint()
    }

    /// The statement an output gets.
    pub fn statement(&self, record: &OutputRecord<'_>) -> Statement<OutputPredicate> {
        let model = record.model;
        Statement {
            type_: STATEMENT_TYPE.to_owned(),
            subject: vec![Subject {
                name: record.name.to_owned(),
                digest: Sha256Digest::of(record.bytes).into(),
            }],
            predicate_type: OUTPUT_PREDICATE_TYPE.to_owned(),
            predicate: OutputPredicate {
                task: record.task,
                model: ModelRecord {
                    name: model.name.clone(),
                    digest: model.digest.into(),
                    license: model.license.clone(),
                    files: model.files.iter().map(FileRecord::from).collect(),
                },
                lockfile: self.lock.clone(),
                runner: self.runner.clone(),
                runtime: record.runtime.clone(),
                sampling: record.sampling.clone(),
                prompt: PromptRecord {
                    sha256: Sha256Digest::of(record.prompt.as_bytes()),
                    text: record.include_prompt_text.then(|| record.prompt.to_owned()),
                },
                usage: record.usage.clone(),
                request: record.request.clone(),
                started_at: rfc3339(record.started),
                finished_at: rfc3339(record.finished),
            },
        }
    }

    /// Signs the output's attestation (and logs it).
    pub fn stamp(&self, record: &OutputRecord<'_>) -> Result<Stamp, StampError> {
        let stamp = self.sign(self.statement(record))?;
        let event = match record.task {
            OutputTask::Run => "run",
            OutputTask::Chat => "chat",
            OutputTask::Embed => "embed",
        };
        let command = match &record.request {
            Some(request) => format!("{} {}", request.api, request.route),
            None => format!("sanctum {event}"),
        };
        self.log(event, command, record.model, &stamp)?;
        Ok(stamp)
    }

    /// Appends `event` to the audit log (when there is one), signed with this stamper's key: for a
    /// front end's refusals, which have no stamp.
    pub fn record(&self, event: &Event) -> Result<(), AuditError> {
        match &self.audit {
            Some(audit) => audit.append(event, &self.key).map(drop),
            None => Ok(()),
        }
    }

    fn log(
        &self,
        event: &str,
        command: String,
        model: &ModelEntry,
        stamp: &Stamp,
    ) -> Result<(), AuditError> {
        self.record(&Event {
            event: event.into(),
            command,
            model: Some(model.name.clone()),
            model_digest: Some(format!("sha256:{}", model.digest)),
            output_digest: Some(format!("sha256:{}", stamp.subject.digest.sha256)),
            bundle_digest: Some(format!("sha256:{}", stamp.bundle_sha256)),
            ..Event::default()
        })
    }

    /// Signs a benchmark result's attestation: the subject is the result file (`name`, exactly
    /// `bytes`), the predicate records the build, the model, the hardware and the profile.
    pub fn stamp_bench(
        &self,
        name: &str,
        bytes: &[u8],
        record: BenchRecord,
    ) -> Result<Stamp, StampError> {
        let stamp = self.sign(Statement {
            type_: STATEMENT_TYPE.to_owned(),
            subject: vec![Subject {
                name: name.to_owned(),
                digest: Sha256Digest::of(bytes).into(),
            }],
            predicate_type: BENCH_PREDICATE_TYPE.to_owned(),
            predicate: BenchPredicate {
                runner: self.runner.clone(),
                model: BenchModelRecord {
                    name: record.model.name.clone(),
                    digest: record.model.digest.into(),
                },
                lockfile: self.lock.clone(),
                hardware: record.hardware,
                profile: record.profile,
                started_at: rfc3339(record.started),
                finished_at: rfc3339(record.finished),
            },
        })?;
        self.log("bench", "sanctum bench".into(), record.model, &stamp)?;
        Ok(stamp)
    }

    fn sign<P: serde::Serialize>(&self, statement: Statement<P>) -> Result<Stamp, KeyError> {
        let subject = statement.subject[0].clone();
        let bundle = Bundle::sign(IN_TOTO_PAYLOAD_TYPE, canonical_json(&statement), &self.key)?;
        let json = bundle.to_json();
        Ok(Stamp {
            subject,
            bundle,
            bundle_sha256: Sha256Digest::of(&json),
            json,
        })
    }
}

/// A benchmark result to stamp and what produced it.
#[derive(Debug, Clone)]
pub struct BenchRecord<'a> {
    /// The lock entry of the model benchmarked.
    pub model: &'a ModelEntry,
    /// The machine as detected (`runner::hardware::HardwareProfile` as JSON).
    pub hardware: serde_json::Value,
    /// The profile the results were filed under.
    pub profile: Option<ProfileRecord>,
    /// When the benchmark started.
    pub started: SystemTime,
    /// When its results were complete.
    pub finished: SystemTime,
}
