//! Signing keys: ECDSA P-256 in the Sigstore/cosign file formats.
//!
//! A private key is stored as an `ENCRYPTED SIGSTORE PRIVATE KEY` PEM (scrypt + secretbox, the format
//! cosign writes; the older `ENCRYPTED COSIGN PRIVATE KEY` label is read too) or, for keys made by other
//! tools such as `openssl`, an unencrypted PKCS#8 `PRIVATE KEY`. A public key is a PEM
//! `PUBLIC KEY` (SPKI). A key is named by its [`KeyHint`]: the hex sha256 of its public key PEM with LF
//! line endings, the same hint the OpenSSF model-signing tools put in their bundles.

use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sigstore::crypto::signing_key::ecdsa::ec::{EcdsaKeys, EcdsaSigner};
use sigstore::crypto::signing_key::ecdsa::{ECDSAKeys, EllipticCurve};
use sigstore::crypto::signing_key::{KeyPair as _, Signer as _, kdf};
use sigstore::crypto::{CosignVerificationKey, Signature};
use sigstore::errors::SigstoreError;
use zeroize::Zeroizing;

use crate::digest::Sha256Digest;

/// PEM label of the encrypted private keys this module writes.
pub const ENCRYPTED_KEY_LABEL: &str = "ENCRYPTED SIGSTORE PRIVATE KEY";
/// PEM label of cosign's older encrypted private keys (read only).
pub const COSIGN_KEY_LABEL: &str = "ENCRYPTED COSIGN PRIVATE KEY";
/// PEM label of unencrypted PKCS#8 private keys.
pub const PLAIN_KEY_LABEL: &str = "PRIVATE KEY";
/// PEM label of public keys (SPKI).
pub const PUBLIC_KEY_LABEL: &str = "PUBLIC KEY";

/// Names a public key: hex sha256 of its SPKI PEM with LF line endings (64 lowercase hex characters).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyHint(String);

impl KeyHint {
    /// The hint of a public key given as SPKI DER.
    pub fn of_spki_der(der: &[u8]) -> Self {
        Self(Sha256Digest::of(pem_encode(PUBLIC_KEY_LABEL, der).as_bytes()).to_hex())
    }

    /// Wraps a hint read from a bundle; any string is accepted (it is only ever compared).
    pub fn new(hint: impl Into<String>) -> Self {
        Self(hint.into())
    }

    /// The hint as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 16 characters, for messages.
    pub fn short(&self) -> &str {
        self.0.get(..16).unwrap_or(&self.0)
    }
}

impl fmt::Display for KeyHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHint({})", self.short())
    }
}

/// Why a key could not be read, made or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Not PEM, or a PEM label this module does not read.
    #[error("not a key file: {0}")]
    NotPem(String),
    /// PEM whose content is not a key of a supported kind.
    #[error("unsupported or damaged key: {0}")]
    Unsupported(String),
    /// An encrypted key that the passphrase does not open.
    #[error("wrong passphrase, or a damaged key file")]
    WrongPassphrase,
    /// A private key read from a public key file or the other way round.
    #[error("expected a {expected} but the file holds a {found:?} PEM block")]
    WrongKind {
        /// What the caller asked for.
        expected: &'static str,
        /// The PEM label found.
        found: String,
    },
    /// The crypto backend failed.
    #[error("key operation failed: {0}")]
    Backend(String),
}

/// A public key that signatures are checked with.
#[derive(Clone)]
pub struct PublicKey {
    spki_der: Vec<u8>,
    hint: KeyHint,
    verifier: CosignVerificationKey,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublicKey")
            .field("hint", &self.hint)
            .finish_non_exhaustive()
    }
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.spki_der == other.spki_der
    }
}

impl Eq for PublicKey {}

impl PublicKey {
    /// Reads a PEM `PUBLIC KEY` (SPKI) holding an EC key on P-256, P-384 or P-521.
    pub fn from_pem(pem: &[u8]) -> Result<Self, KeyError> {
        let (label, der) = pem_decode(pem)?;
        if label != PUBLIC_KEY_LABEL {
            return Err(KeyError::WrongKind {
                expected: "public key (PEM \"PUBLIC KEY\")",
                found: label,
            });
        }
        Self::from_spki_der(&der)
    }

    /// Reads an SPKI DER public key.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, KeyError> {
        let verifier = CosignVerificationKey::try_from_der(der)
            .map_err(|e| KeyError::Unsupported(e.to_string()))?;
        match verifier {
            CosignVerificationKey::ECDSA_P256_SHA256_ASN1(_)
            | CosignVerificationKey::ECDSA_P384_SHA384_ASN1(_)
            | CosignVerificationKey::ECDSA_P521_SHA512_ASN1(_) => {}
            _ => {
                return Err(KeyError::Unsupported(
                    "only elliptic-curve keys (P-256, P-384, P-521) are accepted".into(),
                ));
            }
        }
        Ok(Self {
            spki_der: der.to_vec(),
            hint: KeyHint::of_spki_der(der),
            verifier,
        })
    }

    /// The key's hint.
    pub fn hint(&self) -> &KeyHint {
        &self.hint
    }

    /// SPKI PEM with LF line endings (the bytes the hint is computed over).
    pub fn to_pem(&self) -> String {
        pem_encode(PUBLIC_KEY_LABEL, &self.spki_der)
    }

    /// SPKI DER.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// Checks an ASN.1 DER ECDSA signature over `message` (hashed with the curve's hash).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), BadSignature> {
        self.verifier
            .verify_signature(Signature::Raw(signature), message)
            .map_err(|_| BadSignature)
    }
}

/// A signature that does not verify with the given key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the signature does not verify with this key")]
pub struct BadSignature;

/// An ECDSA P-256 private key, ready to sign.
pub struct SigningKey {
    keys: EcdsaKeys,
    signer: EcdsaSigner,
    public: PublicKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("hint", self.public.hint())
            .finish_non_exhaustive()
    }
}

/// How a private key file is protected, judged by its PEM label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrivateKeyFormat {
    /// Sigstore/cosign encrypted PEM: needs a passphrase (possibly empty).
    Encrypted,
    /// Unencrypted PKCS#8.
    Plain,
}

impl PrivateKeyFormat {
    /// The format of a private key PEM, or why it is not one.
    pub fn of(pem: &[u8]) -> Result<Self, KeyError> {
        let (label, _) = pem_decode(pem)?;
        match label.as_str() {
            ENCRYPTED_KEY_LABEL | COSIGN_KEY_LABEL => Ok(Self::Encrypted),
            PLAIN_KEY_LABEL => Ok(Self::Plain),
            _ => Err(KeyError::WrongKind {
                expected: "private key",
                found: label,
            }),
        }
    }
}

impl SigningKey {
    /// A fresh random P-256 key.
    pub fn generate() -> Result<Self, KeyError> {
        let keys =
            EcdsaKeys::new(EllipticCurve::P256).map_err(|e| KeyError::Backend(e.to_string()))?;
        Self::from_keys(keys)
    }

    /// Reads a private key PEM: encrypted (Sigstore or cosign label) with `passphrase`, or an unencrypted
    /// PKCS#8 `PRIVATE KEY` (then `passphrase` is ignored). Only P-256 keys sign.
    pub fn from_pem(pem: &[u8], passphrase: &[u8]) -> Result<Self, KeyError> {
        let keys = match PrivateKeyFormat::of(pem)? {
            PrivateKeyFormat::Encrypted => {
                let (_, sealed) = pem_decode(pem)?;
                // sigstore reports a failed secretbox open as `PrivateKeyEncryptError`; every other
                // error (JSON, unknown KDF or cipher) is a damaged or foreign file.
                let der = kdf::decrypt(&sealed, passphrase).map_err(|e| match e {
                    SigstoreError::PrivateKeyEncryptError(_) => KeyError::WrongPassphrase,
                    other => KeyError::Unsupported(other.to_string()),
                })?;
                let der = Zeroizing::new(der);
                EcdsaKeys::from_pkcs8_der(&der).map_err(|e| KeyError::Unsupported(e.to_string()))?
            }
            PrivateKeyFormat::Plain => {
                EcdsaKeys::from_pem(pem).map_err(|e| KeyError::Unsupported(e.to_string()))?
            }
        };
        Self::from_keys(keys)
    }

    fn from_keys(keys: EcdsaKeys) -> Result<Self, KeyError> {
        match keys.to_wrapped_ecdsa_keys() {
            Ok(ECDSAKeys::P256(_)) => {}
            Ok(other) => {
                return Err(KeyError::Unsupported(format!(
                    "{other}: sanctum signs with ECDSA P-256 keys only"
                )));
            }
            Err(e) => return Err(KeyError::Unsupported(e.to_string())),
        }
        let spki = keys
            .public_key_to_der()
            .map_err(|e| KeyError::Backend(e.to_string()))?;
        let public = PublicKey::from_spki_der(&spki)?;
        let signer =
            EcdsaSigner::from_ecdsa_keys(&keys).map_err(|e| KeyError::Backend(e.to_string()))?;
        Ok(Self {
            keys,
            signer,
            public,
        })
    }

    /// The private key as an `ENCRYPTED SIGSTORE PRIVATE KEY` PEM (scrypt with cosign's parameters).
    pub fn to_encrypted_pem(&self, passphrase: &[u8]) -> Result<Zeroizing<String>, KeyError> {
        let pem = self
            .keys
            .private_key_to_encrypted_pem(passphrase)
            .map_err(|e| KeyError::Backend(e.to_string()))?;
        // The pem crate writes CRLF; files are written with LF like the public key.
        Ok(Zeroizing::new(pem.replace("\r\n", "\n")))
    }

    /// The private key as an unencrypted PKCS#8 PEM (for tools that only read that, such as
    /// `model_signing sign key`).
    pub fn to_plain_pem(&self) -> Result<Zeroizing<String>, KeyError> {
        let pem = self
            .keys
            .private_key_to_pem()
            .map_err(|e| KeyError::Backend(e.to_string()))?;
        Ok(Zeroizing::new(pem.replace("\r\n", "\n")))
    }

    /// The public half.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// The public key's hint.
    pub fn hint(&self) -> &KeyHint {
        self.public.hint()
    }

    /// An ASN.1 DER ECDSA-SHA256 signature over `message`.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.signer
            .sign(message)
            .map_err(|e| KeyError::Backend(e.to_string()))
    }
}

/// PEM with LF line endings and 64-character lines, as OpenSSL and Python's `cryptography` write it.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// The label and content of the first PEM block in `pem` (LF or CRLF line endings).
pub fn pem_decode(pem: &[u8]) -> Result<(String, Vec<u8>), KeyError> {
    let text = std::str::from_utf8(pem).map_err(|_| KeyError::NotPem("not UTF-8 text".into()))?;
    let start = text
        .find("-----BEGIN ")
        .ok_or_else(|| KeyError::NotPem("no \"-----BEGIN\" line".into()))?;
    let rest = &text[start + "-----BEGIN ".len()..];
    let label_end = rest
        .find("-----")
        .ok_or_else(|| KeyError::NotPem("unterminated BEGIN line".into()))?;
    let label = &rest[..label_end];
    let body_and_end = &rest[label_end + 5..];
    let end_marker = format!("-----END {label}-----");
    let body_end = body_and_end
        .find(&end_marker)
        .ok_or_else(|| KeyError::NotPem(format!("no {end_marker:?} line")))?;
    let body: String = body_and_end[..body_end]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|e| KeyError::NotPem(format!("bad base64 in the PEM body: {e}")))?;
    Ok((label.to_owned(), der))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_sign_verify_and_reload() {
        let key = SigningKey::generate().unwrap();
        let sig = key.sign(b"message").unwrap();
        key.public().verify(b"message", &sig).unwrap();
        assert_eq!(key.public().verify(b"messagf", &sig), Err(BadSignature));

        let pem = key.to_encrypted_pem(b"pw").unwrap();
        assert!(
            pem.starts_with("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n"),
            "{}",
            *pem
        );
        assert!(!pem.contains('\r'));
        assert_eq!(
            PrivateKeyFormat::of(pem.as_bytes()).unwrap(),
            PrivateKeyFormat::Encrypted
        );
        let again = SigningKey::from_pem(pem.as_bytes(), b"pw").unwrap();
        assert_eq!(again.hint(), key.hint());
        again.public().verify(b"message", &sig).unwrap();
        assert!(matches!(
            SigningKey::from_pem(pem.as_bytes(), b"wrong").unwrap_err(),
            KeyError::WrongPassphrase
        ));

        let plain = key.to_plain_pem().unwrap();
        assert_eq!(
            PrivateKeyFormat::of(plain.as_bytes()).unwrap(),
            PrivateKeyFormat::Plain
        );
        assert_eq!(
            SigningKey::from_pem(plain.as_bytes(), b"").unwrap().hint(),
            key.hint()
        );
    }

    #[test]
    fn public_pem_round_trips_and_hint_is_sha256_of_lf_pem() {
        let key = SigningKey::generate().unwrap();
        let pem = key.public().to_pem();
        assert!(
            pem.starts_with("-----BEGIN PUBLIC KEY-----\n")
                && pem.ends_with("-----END PUBLIC KEY-----\n")
        );
        assert_eq!(
            key.hint().as_str(),
            Sha256Digest::of(pem.as_bytes()).to_hex()
        );
        let crlf = pem.replace('\n', "\r\n");
        assert_eq!(
            PublicKey::from_pem(crlf.as_bytes()).unwrap().hint(),
            key.hint()
        );
        // A private key where a public one is expected is refused by kind.
        let private = key.to_plain_pem().unwrap();
        assert!(matches!(
            PublicKey::from_pem(private.as_bytes()).unwrap_err(),
            KeyError::WrongKind { .. }
        ));
        assert!(matches!(
            PublicKey::from_pem(b"hello").unwrap_err(),
            KeyError::NotPem(_)
        ));
    }

    #[test]
    fn reads_an_openssl_p256_key_and_its_hint_matches_openssl_pem() {
        // openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt
        const PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgBOw0EPT+IdmtT5yg
k9MOgE52yVnRZTno6WRHFg6lgFWhRANCAAQwsza8yFQGa3p+yY/+FmNBpT08TIWD
hapm/z/+bRbGDATLYE/U7fKA5Wu3uLOFm6KJ3bL/Z6Zdw1uSRe6rsL//
-----END PRIVATE KEY-----
";
        // openssl ec -pubout on the same key
        const PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEMLM2vMhUBmt6fsmP/hZjQaU9PEyF
g4WqZv8//m0WxgwEy2BP1O3ygOVrt7izhZuiid2y/2emXcNbkkXuq7C//w==
-----END PUBLIC KEY-----
";
        let key = SigningKey::from_pem(PRIVATE.as_bytes(), b"").unwrap();
        assert_eq!(key.public().to_pem(), PUBLIC);
        let public = PublicKey::from_pem(PUBLIC.as_bytes()).unwrap();
        assert_eq!(public.hint(), key.hint());
        assert_eq!(
            public.hint().as_str(),
            Sha256Digest::of(PUBLIC.as_bytes()).to_hex()
        );
    }
}
