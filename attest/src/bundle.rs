//! Sigstore bundles, v0.3, for signatures made with a plain key: `verificationMaterial.publicKey.hint`
//! names the key, there are no transparency-log entries, and the content is a DSSE envelope.
//!
//! [`Bundle`] mirrors the JSON (what `sigstore-python`, `model_signing` and sanctum write).
//! [`CheckedBundle`] is what a verifier may go on with: parsed with [`CheckedBundle::from_json`], which
//! checks the media type, that a key hint is there, that exactly one signature is there and that its
//! keyid, when given, is the hint.

use serde::{Deserialize, Serialize};

use crate::dsse::Envelope;
use crate::keys::{KeyError, KeyHint, SigningKey};

/// Media type of the bundles sanctum writes and reads.
pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";

/// Longest bundle a verifier reads; real ones are a few kilobytes.
pub const MAX_BUNDLE_BYTES: usize = 16 << 20;

/// A Sigstore bundle as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bundle {
    /// [`BUNDLE_MEDIA_TYPE`].
    pub media_type: String,
    /// How to find the key.
    pub verification_material: VerificationMaterial,
    /// The signed content. (A bundle may carry a `messageSignature` instead, which sanctum does not read.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dsse_envelope: Option<Envelope>,
}

/// The bundle's key material.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerificationMaterial {
    /// The key, by hint. (Keyless bundles carry a `certificate` instead, which sanctum does not read.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<PublicKeyIdentifier>,
    /// Transparency-log entries: always empty here (no Rekor offline).
    #[serde(default)]
    pub tlog_entries: Vec<serde_json::Value>,
    /// Keyless material, only read to give a clear refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<serde_json::Value>,
    /// Older keyless material, only read to give a clear refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509_certificate_chain: Option<serde_json::Value>,
}

/// `publicKey` in a bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublicKeyIdentifier {
    /// The key hint; see [`KeyHint`].
    #[serde(default)]
    pub hint: Option<String>,
}

impl Bundle {
    /// Signs `payload` into a DSSE envelope and wraps it in a v0.3 bundle naming the key by hint.
    pub fn sign(payload_type: &str, payload: Vec<u8>, key: &SigningKey) -> Result<Self, KeyError> {
        Ok(Self {
            media_type: BUNDLE_MEDIA_TYPE.to_owned(),
            verification_material: VerificationMaterial {
                public_key: Some(PublicKeyIdentifier {
                    hint: Some(key.hint().as_str().to_owned()),
                }),
                tlog_entries: Vec::new(),
                certificate: None,
                x509_certificate_chain: None,
            },
            dsse_envelope: Some(Envelope::sign(payload_type, payload, key)?),
        })
    }

    /// Compact JSON followed by a newline, the bytes sanctum writes to `*.sigstore.json` files.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(self)
            .unwrap_or_else(|e| unreachable!("a bundle always serializes to JSON: {e}"));
        out.push(b'\n');
        out
    }
}

/// Why a bundle is not well-formed (verification step 1).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// Larger than [`MAX_BUNDLE_BYTES`].
    #[error("{0} bytes is too large for a bundle")]
    TooLarge(usize),
    /// Not JSON, or not shaped like a bundle.
    #[error("not a Sigstore bundle: {0}")]
    Json(#[from] serde_json::Error),
    /// Another media type.
    #[error("media type {0:?}: expected {BUNDLE_MEDIA_TYPE}")]
    MediaType(String),
    /// A keyless (certificate) bundle.
    #[error(
        "keyless bundle (a certificate instead of a public key hint): sanctum verifies key-signed bundles only"
    )]
    Keyless,
    /// No `publicKey.hint`.
    #[error("no verificationMaterial.publicKey.hint naming the key")]
    NoHint,
    /// No DSSE envelope (for example a bundle of a bare message signature).
    #[error("no dsseEnvelope")]
    NoEnvelope,
    /// Zero or several signatures.
    #[error("{0} signatures in the envelope: expected exactly one")]
    SignatureCount(usize),
    /// The envelope's keyid names another key than the hint.
    #[error("the key hint {hint} and the signature's keyid {keyid} disagree")]
    HintKeyidMismatch {
        /// `verificationMaterial.publicKey.hint`.
        hint: String,
        /// `dsseEnvelope.signatures[0].keyid`.
        keyid: String,
    },
}

/// A bundle that passed step 1: one DSSE signature, by the key its hint names.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedBundle {
    /// The key hint (equal to the signature's keyid when that is given).
    pub hint: KeyHint,
    /// The envelope, with exactly one signature.
    pub envelope: Envelope,
}

impl CheckedBundle {
    /// Parses and checks bundle JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Self, BundleError> {
        if bytes.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge(bytes.len()));
        }
        Self::try_from(serde_json::from_slice::<Bundle>(bytes)?)
    }

    /// The signature bytes.
    pub fn signature(&self) -> &[u8] {
        &self.envelope.signatures[0].sig
    }
}

impl TryFrom<Bundle> for CheckedBundle {
    type Error = BundleError;

    fn try_from(bundle: Bundle) -> Result<Self, BundleError> {
        if bundle.media_type != BUNDLE_MEDIA_TYPE {
            return Err(BundleError::MediaType(bundle.media_type));
        }
        let material = bundle.verification_material;
        if material.certificate.is_some() || material.x509_certificate_chain.is_some() {
            return Err(BundleError::Keyless);
        }
        let hint = material
            .public_key
            .and_then(|k| k.hint)
            .filter(|h| !h.is_empty())
            .ok_or(BundleError::NoHint)?;
        let envelope = bundle.dsse_envelope.ok_or(BundleError::NoEnvelope)?;
        if envelope.signatures.len() != 1 {
            return Err(BundleError::SignatureCount(envelope.signatures.len()));
        }
        let keyid = &envelope.signatures[0].keyid;
        if !keyid.is_empty() && *keyid != hint {
            return Err(BundleError::HintKeyidMismatch {
                hint,
                keyid: keyid.clone(),
            });
        }
        Ok(Self {
            hint: KeyHint::new(hint),
            envelope,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dsse::IN_TOTO_PAYLOAD_TYPE;

    fn signed() -> (SigningKey, Bundle) {
        let key = SigningKey::generate().unwrap();
        let bundle = Bundle::sign(IN_TOTO_PAYLOAD_TYPE, b"{}".to_vec(), &key).unwrap();
        (key, bundle)
    }

    #[test]
    fn writes_the_v03_shape() {
        let (key, bundle) = signed();
        let json: serde_json::Value = serde_json::from_slice(&bundle.to_json()).unwrap();
        assert_eq!(json["mediaType"], BUNDLE_MEDIA_TYPE);
        assert_eq!(
            json["verificationMaterial"]["publicKey"]["hint"],
            key.hint().as_str()
        );
        assert_eq!(
            json["verificationMaterial"]["tlogEntries"],
            serde_json::json!([])
        );
        assert_eq!(json["dsseEnvelope"]["payloadType"], IN_TOTO_PAYLOAD_TYPE);
        assert_eq!(
            json["dsseEnvelope"]["signatures"][0]["keyid"],
            key.hint().as_str()
        );
        let checked = CheckedBundle::from_json(&bundle.to_json()).unwrap();
        assert_eq!(&checked.hint, key.hint());
    }

    #[test]
    fn refuses_malformed_bundles_each_with_its_reason() {
        let (_, good) = signed();
        let check = |b: Bundle| CheckedBundle::try_from(b).unwrap_err();

        let mut b = good.clone();
        b.media_type = "application/vnd.dev.sigstore.bundle+json;version=0.2".into();
        assert!(matches!(check(b), BundleError::MediaType(_)));

        let mut b = good.clone();
        b.verification_material.public_key = None;
        assert!(matches!(check(b), BundleError::NoHint));

        let mut b = good.clone();
        b.verification_material.certificate = Some(serde_json::json!({"rawBytes": "AA=="}));
        assert!(matches!(check(b), BundleError::Keyless));

        let mut b = good.clone();
        b.dsse_envelope = None;
        assert!(matches!(check(b), BundleError::NoEnvelope));

        let mut b = good.clone();
        let sig = b.dsse_envelope.as_ref().unwrap().signatures[0].clone();
        b.dsse_envelope.as_mut().unwrap().signatures.push(sig);
        assert!(matches!(check(b), BundleError::SignatureCount(2)));

        let mut b = good.clone();
        b.dsse_envelope.as_mut().unwrap().signatures[0].keyid = "0".repeat(64);
        assert!(matches!(check(b), BundleError::HintKeyidMismatch { .. }));

        // An empty keyid (as model_signing writes) is accepted.
        let mut b = good;
        b.dsse_envelope.as_mut().unwrap().signatures[0]
            .keyid
            .clear();
        CheckedBundle::try_from(b).unwrap();

        assert!(matches!(
            CheckedBundle::from_json(b"[]").unwrap_err(),
            BundleError::Json(_)
        ));
    }
}
