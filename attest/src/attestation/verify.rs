//! Verification of output attestations, in eight numbered steps, each with its own error variant:
//!
//! 1. **well-formed bundle**: a Sigstore bundle v0.3 with a key hint, one DSSE signature, keyid = hint;
//! 2. **trusted signer**: the hint names a signer key the policy trusts;
//! 3. **signature**: the signature verifies over the DSSE PAE of the payload, with that key;
//! 4. **statement type**: an in-toto Statement v1 with sanctum's output predicate type and schema;
//! 5. **subject digest**: the output's sha256 is the subject's (when the output is given);
//! 6. **model in lock**: the lock approves that model name at that digest, with the same files;
//! 7. **license**: the lock's license for the model is allowed by the policy;
//! 8. **lock signature**: the lock itself passed the policy (signed by an approver when required).
//!
//! Steps run in order and stop at the first failure: nothing in the payload is looked at before its
//! signature has been checked.

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::bundle::{BundleError, CheckedBundle};
use crate::digest::Sha256Digest;
use crate::keys::KeyHint;
use crate::lock_signature::{LockStatus, LockTrustError};
use crate::lockfile::{LockedFile, Lockfile, ModelEntry, model_digest};
use crate::policy::{Denied, KeyRing, LicensePolicy};
use crate::statement::{
    BENCH_PREDICATE_TYPE, BenchPredicate, OUTPUT_PREDICATE_TYPE, OutputPredicate, Statement,
    StatementError, Subject, parse_statement,
};

/// One verification step. Every check sanctum makes of a signed bundle (an output or bench
/// attestation, a lock signature, an OpenSSF model signature) is numbered here once, so a step
/// number names the same check whatever was verified: a lock signature goes through steps 1 to
/// 5 (its subject is the lock), a model signature through 1 to 4 and 9.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Step {
    /// 1.
    WellFormed,
    /// 2.
    TrustedSigner,
    /// 3.
    Signature,
    /// 4.
    StatementType,
    /// 5.
    SubjectDigest,
    /// 6.
    ModelInLock,
    /// 7.
    License,
    /// 8.
    LockSignature,
    /// 9: the model directory holds exactly the signed files (OpenSSF model signatures).
    ModelFiles,
}

impl Step {
    /// The steps of an output or bench attestation, in order.
    pub const OUTPUT: [Step; 8] = [
        Step::WellFormed,
        Step::TrustedSigner,
        Step::Signature,
        Step::StatementType,
        Step::SubjectDigest,
        Step::ModelInLock,
        Step::License,
        Step::LockSignature,
    ];

    /// 1 to 9.
    pub fn number(self) -> u8 {
        self as u8 + 1
    }

    /// The step's name, e.g. `well-formed bundle`.
    pub fn name(self) -> &'static str {
        match self {
            Step::WellFormed => "well-formed bundle",
            Step::TrustedSigner => "trusted signer",
            Step::Signature => "signature",
            Step::StatementType => "statement type",
            Step::SubjectDigest => "subject digest",
            Step::ModelInLock => "model in lock",
            Step::License => "license",
            Step::LockSignature => "lock signature",
            Step::ModelFiles => "model files",
        }
    }

    /// A stable identifier for reports, e.g. `well-formed-bundle`.
    pub fn id(self) -> &'static str {
        match self {
            Step::WellFormed => "well-formed-bundle",
            Step::TrustedSigner => "trusted-signer",
            Step::Signature => "signature",
            Step::StatementType => "statement-type",
            Step::SubjectDigest => "subject-digest",
            Step::ModelInLock => "model-in-lock",
            Step::License => "license",
            Step::LockSignature => "lock-signature",
            Step::ModelFiles => "model-files",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "step {} ({})", self.number(), self.name())
    }
}

impl Serialize for Step {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.id())
    }
}

/// How the attested model differs from the lock (step 6).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LockMismatch {
    /// No model of that name.
    #[error("model {name:?} (sha256 {digest}) is not in the lock")]
    UnknownModel {
        /// Attested name.
        name: String,
        /// Attested digest.
        digest: Sha256Digest,
    },
    /// The name is approved, at another digest.
    #[error(
        "model {name:?} at sha256 {attested} is not in the lock, which approves it at sha256 {locked}"
    )]
    OtherDigest {
        /// Name.
        name: String,
        /// Attested digest.
        attested: Sha256Digest,
        /// The lock's digest.
        locked: Sha256Digest,
    },
    /// The attested file list does not give the attested digest, or differs from the lock's.
    #[error("model {name:?}: the attested files do not match the lock's files for sha256 {digest}")]
    Files {
        /// Name.
        name: String,
        /// Digest.
        digest: Sha256Digest,
    },
}

/// Why an attestation was refused: the failing step and what it found.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerificationError {
    /// Step 1.
    #[error("step 1 (well-formed bundle): {0}")]
    Malformed(#[from] BundleError),
    /// Step 2.
    #[error(
        "step 2 (trusted signer): key {0} is not a trusted signer (add it to the policy's [[signer]] keys)"
    )]
    UntrustedSigner(KeyHint),
    /// Step 3.
    #[error(
        "step 3 (signature): the signature does not verify over the DSSE PAE with signer {signer:?}'s key {hint}"
    )]
    BadSignature {
        /// The signer the hint names.
        signer: String,
        /// Its hint.
        hint: KeyHint,
    },
    /// Step 4.
    #[error("step 4 (statement type): {0}")]
    Statement(#[from] StatementError),
    /// Step 5.
    #[error(
        "step 5 (subject digest): {name}: the output's sha256 is {actual}, the attestation names {attested}"
    )]
    SubjectMismatch {
        /// Subject name.
        name: String,
        /// Attested digest.
        attested: Sha256Digest,
        /// Digest of the given output.
        actual: Sha256Digest,
    },
    /// Step 6.
    #[error("step 6 (model in lock): {0}")]
    ModelNotInLock(#[from] LockMismatch),
    /// Step 7.
    #[error("step 7 (license): model {model:?} is licensed {license}: {reason}")]
    License {
        /// Model name.
        model: String,
        /// The lock's license expression.
        license: String,
        /// Why the policy refuses it.
        reason: Denied,
    },
    /// Step 8.
    #[error("step 8 (lock signature): {0}")]
    LockSignature(String),
}

impl VerificationError {
    /// The step that failed.
    pub fn step(&self) -> Step {
        match self {
            VerificationError::Malformed(_) => Step::WellFormed,
            VerificationError::UntrustedSigner(_) => Step::TrustedSigner,
            VerificationError::BadSignature { .. } => Step::Signature,
            VerificationError::Statement(_) => Step::StatementType,
            VerificationError::SubjectMismatch { .. } => Step::SubjectDigest,
            VerificationError::ModelNotInLock(_) => Step::ModelInLock,
            VerificationError::License { .. } => Step::License,
            VerificationError::LockSignature(_) => Step::LockSignature,
        }
    }
}

/// An attestation that passed every step.
#[derive(Debug, Clone)]
pub struct VerifiedAttestation {
    /// The signer's name in the policy.
    pub signer: String,
    /// The signer's key hint.
    pub hint: KeyHint,
    /// The statement.
    pub statement: Statement<OutputPredicate>,
    /// Whether step 5 compared an output (false: no output was given).
    pub subject_checked: bool,
    /// The lock's standing.
    pub lock: LockStatus,
}

impl VerifiedAttestation {
    /// The one subject.
    pub fn subject(&self) -> &Subject {
        &self.statement.subject[0]
    }

    /// The predicate.
    pub fn predicate(&self) -> &OutputPredicate {
        &self.statement.predicate
    }
}

/// Checks output attestations against trusted signers, a lock and a license policy.
#[derive(Debug)]
pub struct Verifier<'a> {
    signers: &'a KeyRing,
    lock: &'a Lockfile,
    licenses: &'a LicensePolicy,
    lock_status: Result<LockStatus, String>,
}

impl<'a> Verifier<'a> {
    /// A verifier; `lock_status` is the lock's standing under the policy (from
    /// [`crate::lock_signature::check_lock`]), reported by step 8 of every attestation.
    pub fn new(
        signers: &'a KeyRing,
        lock: &'a Lockfile,
        licenses: &'a LicensePolicy,
        lock_status: Result<LockStatus, &LockTrustError>,
    ) -> Self {
        Self {
            signers,
            lock,
            licenses,
            lock_status: lock_status.map_err(|e| e.to_string()),
        }
    }

    /// Runs the eight steps on bundle JSON; `output` is the sha256 of the output, when it is at hand.
    pub fn verify(
        &self,
        bundle: &[u8],
        output: Option<&Sha256Digest>,
    ) -> Result<VerifiedAttestation, VerificationError> {
        let (statement, signer, hint) =
            self.signed_statement::<OutputPredicate>(bundle, OUTPUT_PREDICATE_TYPE, output)?;
        // 6. model in lock
        let model = &statement.predicate.model;
        let digest = model.digest.sha256;
        let entry = self.approved(&model.name, digest)?;
        let attested: Vec<LockedFile> = model.files.iter().map(LockedFile::from).collect();
        let mut sorted_attested: Vec<_> = attested
            .iter()
            .map(|f| (&f.path, f.sha256, f.size))
            .collect();
        let mut sorted_locked: Vec<_> = entry
            .files
            .iter()
            .map(|f| (&f.path, f.sha256, f.size))
            .collect();
        sorted_attested.sort();
        sorted_locked.sort();
        if model_digest(&attested) != digest || sorted_attested != sorted_locked {
            return Err(LockMismatch::Files {
                name: model.name.clone(),
                digest,
            }
            .into());
        }
        let lock = self.license_and_lock(entry)?;
        Ok(VerifiedAttestation {
            signer,
            hint,
            subject_checked: output.is_some(),
            statement,
            lock,
        })
    }

    /// The same eight steps for a benchmark result's attestation (`sanctum bench --attest`): the
    /// statement must carry the bench predicate, `result` is the sha256 of the result file, and
    /// step 6 checks the model's name and digest (a benchmark records no per-file list).
    pub fn verify_bench(
        &self,
        bundle: &[u8],
        result: &Sha256Digest,
    ) -> Result<VerifiedBench, VerificationError> {
        let (statement, signer, _) =
            self.signed_statement::<BenchPredicate>(bundle, BENCH_PREDICATE_TYPE, Some(result))?;
        let model = &statement.predicate.model;
        let entry = self.approved(&model.name, model.digest.sha256)?;
        let lock = self.license_and_lock(entry)?;
        Ok(VerifiedBench {
            signer,
            statement,
            lock,
        })
    }

    /// Steps 1 to 5: a well-formed bundle signed by a trusted signer, holding a statement of
    /// `predicate_type` about `output` (when given). Returns it with the signer's name and hint.
    fn signed_statement<P: DeserializeOwned>(
        &self,
        bundle: &[u8],
        predicate_type: &'static str,
        output: Option<&Sha256Digest>,
    ) -> Result<(Statement<P>, String, KeyHint), VerificationError> {
        // 1. well-formed bundle
        let bundle = CheckedBundle::from_json(bundle)?;
        // 2. trusted signer
        let signer = self
            .signers
            .get(&bundle.hint)
            .ok_or_else(|| VerificationError::UntrustedSigner(bundle.hint.clone()))?;
        // 3. signature
        signer
            .key
            .verify(&bundle.envelope.pae(), bundle.signature())
            .map_err(|_| VerificationError::BadSignature {
                signer: signer.name.clone(),
                hint: bundle.hint.clone(),
            })?;
        // 4. statement type
        let statement: Statement<P> = parse_statement(
            &bundle.envelope.payload_type,
            &bundle.envelope.payload,
            predicate_type,
        )?;
        // 5. subject digest
        let subject = &statement.subject[0];
        if let Some(actual) = output
            && *actual != subject.digest.sha256
        {
            return Err(VerificationError::SubjectMismatch {
                name: subject.name.clone(),
                attested: subject.digest.sha256,
                actual: *actual,
            });
        }
        Ok((statement, signer.name.clone(), bundle.hint))
    }

    /// Step 6's first half: the lock approves `name` at `digest`.
    fn approved(&self, name: &str, digest: Sha256Digest) -> Result<&ModelEntry, VerificationError> {
        match self.lock.models.iter().find(|m| m.name == name) {
            None => Err(LockMismatch::UnknownModel {
                name: name.to_owned(),
                digest,
            }
            .into()),
            Some(entry) if entry.digest != digest => Err(LockMismatch::OtherDigest {
                name: name.to_owned(),
                attested: digest,
                locked: entry.digest,
            }
            .into()),
            Some(entry) => Ok(entry),
        }
    }

    /// Steps 7 and 8: the policy allows the model's license, and the lock passed the policy.
    fn license_and_lock(&self, entry: &ModelEntry) -> Result<LockStatus, VerificationError> {
        self.licenses
            .check(&entry.license)
            .map_err(|reason| VerificationError::License {
                model: entry.name.clone(),
                license: entry.license.clone(),
                reason,
            })?;
        self.lock_status
            .clone()
            .map_err(VerificationError::LockSignature)
    }
}

/// A benchmark attestation that passed every step.
#[derive(Debug, Clone)]
pub struct VerifiedBench {
    /// The signer's name in the policy.
    pub signer: String,
    /// The statement.
    pub statement: Statement<BenchPredicate>,
    /// The lock's standing.
    pub lock: LockStatus,
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use base64::Engine as _;

    use super::*;
    use crate::keys::SigningKey;
    use crate::lock_signature::VerifiedLockSignature;
    use crate::lockfile::{HfSource, LockedFile, ModelEntry, Source, Task};
    use crate::stamp::{LockInfo, OutputRecord, RunnerInfo, Stamper};
    use crate::statement::{
        OutputTask, RuntimeRecord, SamplingRecord, UsageRecord, f32_as_decimal,
    };

    struct Fixture {
        lock: Lockfile,
        signers: KeyRing,
        licenses: LicensePolicy,
        stamper: Stamper,
    }

    fn entry(name: &str, license: &str, weights: &[u8]) -> ModelEntry {
        let files = vec![
            LockedFile {
                path: "config.json".into(),
                sha256: Sha256Digest::of(b"{}"),
                size: 2,
            },
            LockedFile {
                path: "model.safetensors".into(),
                sha256: Sha256Digest::of(weights),
                size: weights.len() as u64,
            },
        ];
        let source = Source::Hf(HfSource {
            repo: "o/m".into(),
            revision: "r".into(),
            files: None,
        });
        ModelEntry::new(name, Task::Chat, "llama", license, source, files)
    }

    fn fixture() -> Fixture {
        let key = SigningKey::generate().unwrap();
        let mut signers = KeyRing::new();
        signers.add("ci", key.public().clone());
        let mut lock = Lockfile::new();
        lock.models
            .push(entry("chat-model", "Apache-2.0", b"weights"));
        lock.models
            .push(entry("nc-model", "CC-BY-NC-4.0", b"nc weights"));
        let stamper = Stamper::new(
            key,
            RunnerInfo {
                version: "0.1.0".into(),
                git_commit: Some("abc".into()),
                binary_sha256: Sha256Digest::of(b"exe"),
            },
            LockInfo {
                digest: Sha256Digest::of(lock.to_toml().as_bytes()),
                signer: None,
            },
        );
        Fixture {
            lock,
            signers,
            licenses: LicensePolicy::default(),
            stamper,
        }
    }

    fn record<'a>(model: &'a ModelEntry, bytes: &'a [u8]) -> OutputRecord<'a> {
        OutputRecord {
            name: "out.txt",
            bytes,
            task: OutputTask::Run,
            model,
            runtime: RuntimeRecord {
                device: "cpu".into(),
                threads: 2,
                quantization: Some("q8_0".into()),
            },
            sampling: Some(SamplingRecord {
                temperature: f32_as_decimal(0.8),
                top_k: 40,
                top_p: f32_as_decimal(0.95),
                min_p: f32_as_decimal(0.05),
                repeat_penalty: 1.0,
                repeat_last_n: 64,
                seed: 42,
                max_tokens: Some(16),
                stop: vec![],
            }),
            prompt: "rendered prompt",
            include_prompt_text: false,
            usage: UsageRecord {
                prompt_tokens: 3,
                completion_tokens: 5,
            },
            request: None,
            started: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            finished: UNIX_EPOCH + Duration::from_secs(1_800_000_001),
        }
    }

    impl Fixture {
        fn verifier(&self) -> Verifier<'_> {
            Verifier::new(
                &self.signers,
                &self.lock,
                &self.licenses,
                Ok(LockStatus::Unsigned),
            )
        }

        fn bundle(&self, bytes: &[u8]) -> Vec<u8> {
            self.stamper
                .stamp(&record(&self.lock.models[0], bytes))
                .unwrap()
                .json
        }
    }

    fn edit(bundle: &[u8], f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_slice(bundle).unwrap();
        f(&mut v);
        serde_json::to_vec(&v).unwrap()
    }

    fn payload(v: &serde_json::Value) -> serde_json::Value {
        let b64 = v["dsseEnvelope"]["payload"].as_str().unwrap();
        serde_json::from_slice(&crate::dsse::decode_base64(b64).unwrap()).unwrap()
    }

    fn set_payload(v: &mut serde_json::Value, statement: &serde_json::Value) {
        v["dsseEnvelope"]["payload"] = base64::engine::general_purpose::STANDARD
            .encode(serde_json::to_vec(statement).unwrap())
            .into();
    }

    fn step_of(r: Result<VerifiedAttestation, VerificationError>) -> Step {
        let err = r.expect_err("refused");
        assert!(
            err.to_string().starts_with(&err.step().to_string()),
            "{err}"
        );
        err.step()
    }

    /// A benchmark result's bundle verifies; a result edited afterwards, a forged signature, an
    /// output bundle passed off as a benchmark and a model the lock does not approve are refused.
    #[test]
    fn bench_attestations_verify_and_attacks_are_refused() {
        use crate::stamp::BenchRecord;
        let f = fixture();
        let result = br#"{"results":[{"test":"pp512","avg_ts":512.0}]}"#;
        let stamp = |model: &ModelEntry| {
            f.stamper
                .stamp_bench(
                    "bench.json",
                    result,
                    BenchRecord {
                        model,
                        hardware: serde_json::json!({"cpu": {"model": "AMD EPYC"}}),
                        profile: None,
                        started: UNIX_EPOCH,
                        finished: UNIX_EPOCH + Duration::from_secs(60),
                    },
                )
                .unwrap()
                .json
        };
        let bundle = stamp(&f.lock.models[0]);
        let verified = f
            .verifier()
            .verify_bench(&bundle, &Sha256Digest::of(result))
            .unwrap();
        assert_eq!(verified.signer, "ci");
        assert_eq!(verified.statement.predicate.model.name, "chat-model");
        assert_eq!(
            verified.statement.predicate.hardware["cpu"]["model"],
            "AMD EPYC"
        );

        let bench_step =
            |r: Result<VerifiedBench, VerificationError>| r.expect_err("refused").step();
        let edited = br#"{"results":[{"test":"pp512","avg_ts":999.0}]}"#;
        assert_eq!(
            bench_step(
                f.verifier()
                    .verify_bench(&bundle, &Sha256Digest::of(edited))
            ),
            Step::SubjectDigest
        );
        let forged = edit(&bundle, |v| {
            let mut statement = payload(v);
            statement["predicate"]["hardware"]["cpu"]["model"] = "Faster CPU".into();
            set_payload(v, &statement);
        });
        assert_eq!(
            bench_step(
                f.verifier()
                    .verify_bench(&forged, &Sha256Digest::of(result))
            ),
            Step::Signature
        );
        let output_bundle = f.bundle(result);
        assert_eq!(
            bench_step(
                f.verifier()
                    .verify_bench(&output_bundle, &Sha256Digest::of(result))
            ),
            Step::StatementType
        );
        let unlisted = entry("other-model", "MIT", b"other");
        assert_eq!(
            bench_step(
                f.verifier()
                    .verify_bench(&stamp(&unlisted), &Sha256Digest::of(result))
            ),
            Step::ModelInLock
        );
    }

    #[test]
    fn round_trip_passes_every_step() {
        let f = fixture();
        let out = b"generated text\n";
        let bundle = f.bundle(out);
        let v = f
            .verifier()
            .verify(&bundle, Some(&Sha256Digest::of(out)))
            .unwrap();
        assert!(v.subject_checked);
        assert_eq!(v.signer, "ci");
        assert_eq!(v.subject().name, "out.txt");
        let p = v.predicate();
        assert_eq!(p.model.name, "chat-model");
        assert_eq!(p.sampling.as_ref().unwrap().temperature, 0.8);
        assert_eq!(p.started_at, "2027-01-15T08:00:00.000Z");
        assert_eq!(p.prompt.sha256, Sha256Digest::of(b"rendered prompt"));
        assert_eq!(p.prompt.text, None);
        // Without the output, step 5 is not run.
        assert!(!f.verifier().verify(&bundle, None).unwrap().subject_checked);
    }

    #[test]
    fn each_attack_is_refused_at_its_step() {
        let f = fixture();
        let out = b"generated text\n";
        let bundle = f.bundle(out);
        let digest = Sha256Digest::of(out);
        let v = f.verifier();

        // One byte of the output changed.
        let mut changed = out.to_vec();
        changed[0] ^= 1;
        assert_eq!(
            step_of(v.verify(&bundle, Some(&Sha256Digest::of(&changed)))),
            Step::SubjectDigest
        );

        // One byte of the payload changed.
        let tampered = edit(&bundle, |b| {
            let mut s = payload(b);
            s["predicate"]["runtime"]["threads"] = 3.into();
            set_payload(b, &s);
        });
        assert_eq!(step_of(v.verify(&tampered, Some(&digest))), Step::Signature);

        // One byte of the signature changed.
        let tampered = edit(&bundle, |b| {
            let sig = b["dsseEnvelope"]["signatures"][0]["sig"].as_str().unwrap();
            let mut raw = crate::dsse::decode_base64(sig).unwrap();
            let n = raw.len() - 1;
            raw[n] ^= 1;
            b["dsseEnvelope"]["signatures"][0]["sig"] =
                base64::engine::general_purpose::STANDARD.encode(raw).into();
        });
        assert_eq!(step_of(v.verify(&tampered, Some(&digest))), Step::Signature);

        // A signature moved from another bundle by the same key.
        let other = f.bundle(b"other output");
        let moved = edit(&bundle, |b| {
            let o: serde_json::Value = serde_json::from_slice(&other).unwrap();
            b["dsseEnvelope"]["signatures"] = o["dsseEnvelope"]["signatures"].clone();
        });
        assert_eq!(step_of(v.verify(&moved, Some(&digest))), Step::Signature);

        // A key that is not trusted.
        let stranger = SigningKey::generate().unwrap();
        let strange = Stamper::new(
            stranger,
            RunnerInfo {
                version: "0.1.0".into(),
                git_commit: None,
                binary_sha256: Sha256Digest::of(b"exe"),
            },
            LockInfo {
                digest: Sha256Digest::of(b"l"),
                signer: None,
            },
        );
        let untrusted = strange.stamp(&record(&f.lock.models[0], out)).unwrap().json;
        assert_eq!(
            step_of(v.verify(&untrusted, Some(&digest))),
            Step::TrustedSigner
        );

        // The untrusted key's signature relabelled with the trusted key's hint.
        let trusted_hint = f.stamper.hint().as_str().to_owned();
        let relabelled = edit(&untrusted, |b| {
            b["verificationMaterial"]["publicKey"]["hint"] = trusted_hint.clone().into();
            b["dsseEnvelope"]["signatures"][0]["keyid"] = trusted_hint.clone().into();
        });
        assert_eq!(
            step_of(v.verify(&relabelled, Some(&digest))),
            Step::Signature
        );

        // Hint and keyid disagree.
        let disagree = edit(&bundle, |b| {
            b["dsseEnvelope"]["signatures"][0]["keyid"] = "0".repeat(64).into();
        });
        assert_eq!(
            step_of(v.verify(&disagree, Some(&digest))),
            Step::WellFormed
        );

        // Not a bundle at all.
        assert_eq!(
            step_of(v.verify(b"{\"mediaType\": 1}", None)),
            Step::WellFormed
        );

        // A model digest not in the lock (signed honestly by the trusted key).
        let unknown = entry("chat-model", "Apache-2.0", b"other weights");
        let b = f.stamper.stamp(&record(&unknown, out)).unwrap().json;
        let err = v.verify(&b, Some(&digest)).unwrap_err();
        assert_eq!(err.step(), Step::ModelInLock);
        assert!(matches!(
            err,
            VerificationError::ModelNotInLock(LockMismatch::OtherDigest { .. })
        ));
        let unknown = entry("ghost", "Apache-2.0", b"weights");
        let b = f.stamper.stamp(&record(&unknown, out)).unwrap().json;
        assert_eq!(step_of(v.verify(&b, Some(&digest))), Step::ModelInLock);

        // A denied license.
        let b = f
            .stamper
            .stamp(&record(&f.lock.models[1], out))
            .unwrap()
            .json;
        let err = v.verify(&b, Some(&digest)).unwrap_err();
        assert_eq!(err.step(), Step::License);
        assert!(err.to_string().contains("non-commercial"), "{err}");

        // The lock refused by the policy.
        let lock_err = LockTrustError::Unsigned("models.lock.sigstore.json".into());
        let strict = Verifier::new(&f.signers, &f.lock, &f.licenses, Err(&lock_err));
        assert_eq!(
            step_of(strict.verify(&bundle, Some(&digest))),
            Step::LockSignature
        );
        let signed = Verifier::new(
            &f.signers,
            &f.lock,
            &f.licenses,
            Ok(LockStatus::Signed(VerifiedLockSignature {
                hint: KeyHint::new("h"),
                approver: "sec".into(),
            })),
        );
        assert!(matches!(
            signed.verify(&bundle, None).unwrap().lock,
            LockStatus::Signed(_)
        ));
    }

    #[test]
    fn wrong_statement_and_predicate_types_are_refused_at_step_4() {
        // Signed honestly, but not sanctum's predicate: the key is trusted, so only step 4 can refuse.
        let f = fixture();
        let statement = f.stamper.statement(&record(&f.lock.models[0], b"x"));
        let mut value = serde_json::to_value(&statement).unwrap();
        value["predicateType"] = "https://slsa.dev/provenance/v1".into();
        let key_bundle = |v: &serde_json::Value, payload_type: &str| {
            // Re-sign with the fixture's key through a stamper-independent path.
            let key = SigningKey::generate().unwrap();
            let mut ring = KeyRing::new();
            ring.add("ci", key.public().clone());
            let b = crate::bundle::Bundle::sign(payload_type, serde_json::to_vec(v).unwrap(), &key)
                .unwrap();
            (ring, b.to_json())
        };
        for (v, payload_type) in [
            (value.clone(), crate::dsse::IN_TOTO_PAYLOAD_TYPE),
            (
                serde_json::to_value(&statement).unwrap(),
                "application/json",
            ),
            (
                {
                    let mut v = serde_json::to_value(&statement).unwrap();
                    v["predicate"]["unknownField"] = 1.into();
                    v
                },
                crate::dsse::IN_TOTO_PAYLOAD_TYPE,
            ),
        ] {
            let (ring, b) = key_bundle(&v, payload_type);
            let verifier = Verifier::new(&ring, &f.lock, &f.licenses, Ok(LockStatus::Unsigned));
            assert_eq!(step_of(verifier.verify(&b, None)), Step::StatementType);
        }
    }

    #[test]
    fn predicate_serializes_as_its_schema_says() {
        let f = fixture();
        let mut r = record(&f.lock.models[0], b"x");
        r.include_prompt_text = true;
        let statement = f.stamper.statement(&r);
        let value = serde_json::to_value(&statement.predicate).unwrap();
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../../docs/schema/output-v1.schema.json"))
                .unwrap();
        assert_eq!(schema["$id"], OUTPUT_PREDICATE_TYPE);
        check_against_schema(&value, &schema, "predicate");
    }

    /// A small structural check: every property of the value is declared in the schema, every required
    /// property is present, and nested objects and arrays follow their subschemas.
    fn check_against_schema(value: &serde_json::Value, schema: &serde_json::Value, at: &str) {
        let schema = match schema.get("$ref").and_then(|r| r.as_str()) {
            Some(r) => {
                let root: serde_json::Value = serde_json::from_str(include_str!(
                    "../../../docs/schema/output-v1.schema.json"
                ))
                .unwrap();
                root["$defs"][r.trim_start_matches("#/$defs/")].clone()
            }
            None => schema.clone(),
        };
        match value {
            serde_json::Value::Object(map) => {
                let props = schema["properties"]
                    .as_object()
                    .unwrap_or_else(|| panic!("{at}: no properties"));
                for key in map.keys() {
                    assert!(props.contains_key(key), "{at}.{key} is not in the schema");
                    check_against_schema(&map[key], &props[key], &format!("{at}.{key}"));
                }
                for req in schema["required"].as_array().into_iter().flatten() {
                    assert!(
                        map.contains_key(req.as_str().unwrap()),
                        "{at}: required {req} missing"
                    );
                }
                assert_eq!(
                    schema["additionalProperties"], false,
                    "{at}: schema must be closed"
                );
            }
            serde_json::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    check_against_schema(item, &schema["items"], &format!("{at}[{i}]"));
                }
            }
            _ => {}
        }
    }
}
