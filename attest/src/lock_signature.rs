//! Signatures over `models.lock`: a Sigstore bundle beside the lock (`models.lock.sigstore.json`) whose
//! in-toto statement names the lock's exact bytes by sha256, signed by an approver key.
//!
//! Any change to the lock after signing, even a comment, changes its sha256 and is refused as "edited
//! after signing". [`check_lock`] applies the policy: whether a signature is required, and whose.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::attestation::Step;
use crate::bundle::{Bundle, BundleError, CheckedBundle};
use crate::digest::Sha256Digest;
use crate::dsse::IN_TOTO_PAYLOAD_TYPE;
use crate::keys::{KeyError, KeyHint, SigningKey};
use crate::lockfile::Lockfile;
use crate::policy::{KeyRing, Policy};
use crate::statement::{
    DigestSet, STATEMENT_TYPE, SignerRecord, Statement, StatementError, Subject, canonical_json,
    parse_statement,
};

/// predicateType of a lock signature's statement.
pub const LOCK_PREDICATE_TYPE: &str = "https://example.invalid/sanctum/attestation/lock/v1";

/// Where a lock's signature lives: beside it, `<lock file name>.sigstore.json`.
pub fn signature_path(lock: &Path) -> PathBuf {
    let mut name = lock.file_name().unwrap_or_default().to_os_string();
    name.push(".sigstore.json");
    lock.with_file_name(name)
}

/// What an approver states about the lock (informative: the subject digest is what binds it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LockPredicate {
    /// The lockfile format version.
    pub lockfile_version: u32,
    /// The approved models.
    pub models: Vec<ApprovedModel>,
}

/// One approved model, as listed in a lock predicate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovedModel {
    /// Name.
    pub name: String,
    /// Model digest.
    pub digest: DigestSet,
    /// License.
    pub license: String,
}

/// Signs a lockfile's exact bytes. `lock` must be the parse of `lock_bytes`; `name` is the subject name
/// (the lock's file name).
pub fn sign_lock(
    name: &str,
    lock_bytes: &[u8],
    lock: &Lockfile,
    key: &SigningKey,
) -> Result<Bundle, KeyError> {
    let statement = Statement {
        type_: STATEMENT_TYPE.to_owned(),
        subject: vec![Subject {
            name: name.to_owned(),
            digest: Sha256Digest::of(lock_bytes).into(),
        }],
        predicate_type: LOCK_PREDICATE_TYPE.to_owned(),
        predicate: LockPredicate {
            lockfile_version: lock.version,
            models: lock
                .models
                .iter()
                .map(|m| ApprovedModel {
                    name: m.name.clone(),
                    digest: m.digest.into(),
                    license: m.license.clone(),
                })
                .collect(),
        },
    };
    Bundle::sign(IN_TOTO_PAYLOAD_TYPE, canonical_json(&statement), key)
}

/// Why a lock signature was refused; each variant is one verification step.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockSignatureError {
    /// Step 1.
    #[error("{step}: {0}", step = Step::WellFormed)]
    Malformed(#[from] BundleError),
    /// Step 2.
    #[error(
        "{step}: the lock is signed by key {0}, which is not an approver in the policy",
        step = Step::TrustedSigner
    )]
    UntrustedApprover(KeyHint),
    /// Step 3.
    #[error(
        "{step}: the signature does not verify with approver {approver}'s key",
        step = Step::Signature
    )]
    BadSignature {
        /// The approver the hint named.
        approver: String,
    },
    /// Step 4.
    #[error("{step}: {0}", step = Step::StatementType)]
    Statement(#[from] StatementError),
    /// Step 5.
    #[error(
        "{step}: the lock was edited after signing (signed sha256 {signed}, now {actual})",
        step = Step::SubjectDigest
    )]
    EditedAfterSigning {
        /// The digest the approver signed.
        signed: Sha256Digest,
        /// The lock's digest now.
        actual: Sha256Digest,
    },
}

/// A lock signature that passed every step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedLockSignature {
    /// The approver's key hint.
    pub hint: KeyHint,
    /// The approver's name in the policy.
    pub approver: String,
}

/// Verifies `bundle` as a signature of exactly `lock_bytes` by one of `approvers`.
pub fn verify_lock_signature(
    lock_bytes: &[u8],
    bundle: &[u8],
    approvers: &KeyRing,
) -> Result<VerifiedLockSignature, LockSignatureError> {
    let bundle = CheckedBundle::from_json(bundle)?;
    let trusted = approvers
        .get(&bundle.hint)
        .ok_or_else(|| LockSignatureError::UntrustedApprover(bundle.hint.clone()))?;
    trusted
        .key
        .verify(&bundle.envelope.pae(), bundle.signature())
        .map_err(|_| LockSignatureError::BadSignature {
            approver: trusted.name.clone(),
        })?;
    let statement: Statement<LockPredicate> = parse_statement(
        &bundle.envelope.payload_type,
        &bundle.envelope.payload,
        LOCK_PREDICATE_TYPE,
    )?;
    let signed = statement.subject[0].digest.sha256;
    let actual = Sha256Digest::of(lock_bytes);
    if signed != actual {
        return Err(LockSignatureError::EditedAfterSigning { signed, actual });
    }
    Ok(VerifiedLockSignature {
        hint: bundle.hint,
        approver: trusted.name.clone(),
    })
}

/// Where a lock stands under a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockStatus {
    /// Signed by a trusted approver, and unchanged since.
    Signed(VerifiedLockSignature),
    /// No signature, and the policy does not ask for one.
    Unsigned,
    /// A signature is there but the policy names no approver to check it against.
    NotChecked {
        /// The hint the signature names, when it is readable.
        hint: Option<KeyHint>,
    },
}

impl LockStatus {
    /// The signer to record in an output attestation: only a verified one.
    pub fn signer_record(&self) -> Option<SignerRecord> {
        match self {
            LockStatus::Signed(sig) => Some(SignerRecord {
                hint: sig.hint.as_str().to_owned(),
                name: Some(sig.approver.clone()),
            }),
            _ => None,
        }
    }

    /// One line for people.
    pub fn describe(&self) -> String {
        match self {
            LockStatus::Signed(sig) => format!(
                "signed by approver {} (key {})",
                sig.approver,
                sig.hint.short()
            ),
            LockStatus::Unsigned => "unsigned; the policy does not require a signature".into(),
            LockStatus::NotChecked { hint } => format!(
                "signed by key {}, not checked: the policy names no approver",
                hint.as_ref().map_or("(unreadable)", |h| h.short())
            ),
        }
    }
}

/// A lock the policy refuses.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockTrustError {
    /// No signature, and the policy requires one.
    #[error(
        "the lockfile is not signed, and the policy requires a signature by an approver (expected {0})"
    )]
    Unsigned(PathBuf),
    /// A signature that fails a step.
    #[error("lock signature {path}: {error}")]
    Signature {
        /// The signature file.
        path: PathBuf,
        /// The failing step.
        error: LockSignatureError,
    },
}

/// Applies `policy` to a lock: `signature` is the content of its signature file, when there is one.
/// A signature that is there is always checked when the policy names approvers, even when it does
/// not require one: a bad signature is never ignored.
pub fn check_lock(
    policy: &Policy,
    lock_bytes: &[u8],
    signature: Option<&[u8]>,
    signature_path: &Path,
) -> Result<LockStatus, LockTrustError> {
    match signature {
        None if policy.require_lock_signature => {
            Err(LockTrustError::Unsigned(signature_path.to_owned()))
        }
        None => Ok(LockStatus::Unsigned),
        Some(_) if policy.approvers.is_empty() => Ok(LockStatus::NotChecked {
            hint: signature
                .and_then(|s| CheckedBundle::from_json(s).ok())
                .map(|b| b.hint),
        }),
        Some(bundle) => verify_lock_signature(lock_bytes, bundle, &policy.approvers)
            .map(LockStatus::Signed)
            .map_err(|error| LockTrustError::Signature {
                path: signature_path.to_owned(),
                error,
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCK: &str = "version = 1\n";

    fn ring(key: &SigningKey) -> KeyRing {
        let mut ring = KeyRing::new();
        ring.add("sec", key.public().clone());
        ring
    }

    #[test]
    fn sign_and_verify_and_each_refusal() {
        let approver = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let lock = Lockfile::parse(LOCK).unwrap();
        let bundle = sign_lock("models.lock", LOCK.as_bytes(), &lock, &approver)
            .unwrap()
            .to_json();
        let ok = verify_lock_signature(LOCK.as_bytes(), &bundle, &ring(&approver)).unwrap();
        assert_eq!(ok.approver, "sec");

        let err = verify_lock_signature(b"version = 1\n# edited\n", &bundle, &ring(&approver))
            .unwrap_err();
        assert!(
            matches!(err, LockSignatureError::EditedAfterSigning { .. }),
            "{err}"
        );
        assert!(
            err.to_string()
                .starts_with("step 5 (subject digest): the lock was edited after signing")
        );

        let err = verify_lock_signature(LOCK.as_bytes(), &bundle, &ring(&other)).unwrap_err();
        assert!(
            matches!(err, LockSignatureError::UntrustedApprover(_)),
            "{err}"
        );

        // The other key's signature under the approver's hint: the signature step refuses it.
        let forged = sign_lock("models.lock", LOCK.as_bytes(), &lock, &other).unwrap();
        let mut forged: serde_json::Value = serde_json::from_slice(&forged.to_json()).unwrap();
        forged["verificationMaterial"]["publicKey"]["hint"] = approver.hint().as_str().into();
        forged["dsseEnvelope"]["signatures"][0]["keyid"] = approver.hint().as_str().into();
        let err = verify_lock_signature(
            LOCK.as_bytes(),
            &serde_json::to_vec(&forged).unwrap(),
            &ring(&approver),
        )
        .unwrap_err();
        assert!(
            matches!(err, LockSignatureError::BadSignature { .. }),
            "{err}"
        );

        let err = verify_lock_signature(LOCK.as_bytes(), b"{}", &ring(&approver)).unwrap_err();
        assert!(matches!(err, LockSignatureError::Malformed(_)), "{err}");
    }

    #[test]
    fn policy_decides_whether_unsigned_locks_pass() {
        let approver = SigningKey::generate().unwrap();
        let lock = Lockfile::parse(LOCK).unwrap();
        let bundle = sign_lock("models.lock", LOCK.as_bytes(), &lock, &approver)
            .unwrap()
            .to_json();
        let path = Path::new("models.lock.sigstore.json");
        let open = Policy::builtin();
        let strict = Policy {
            approvers: ring(&approver),
            require_lock_signature: true,
            ..Policy::builtin()
        };
        let optional = Policy {
            require_lock_signature: false,
            ..strict.clone()
        };
        assert_eq!(
            check_lock(&open, LOCK.as_bytes(), None, path).unwrap(),
            LockStatus::Unsigned
        );
        assert!(matches!(
            check_lock(&open, LOCK.as_bytes(), Some(&bundle), path).unwrap(),
            LockStatus::NotChecked { hint: Some(_) }
        ));
        assert!(matches!(
            check_lock(&strict, LOCK.as_bytes(), None, path).unwrap_err(),
            LockTrustError::Unsigned(_)
        ));
        assert!(matches!(
            check_lock(&strict, LOCK.as_bytes(), Some(&bundle), path).unwrap(),
            LockStatus::Signed(_)
        ));
        assert!(matches!(
            check_lock(&optional, b"version = 1\n\n", Some(&bundle), path).unwrap_err(),
            LockTrustError::Signature { .. }
        ));
        assert_eq!(
            check_lock(&optional, LOCK.as_bytes(), None, path).unwrap(),
            LockStatus::Unsigned
        );
        assert_eq!(
            signature_path(Path::new("a/models.lock")),
            Path::new("a/models.lock.sigstore.json")
        );
    }
}
