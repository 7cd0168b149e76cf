//! DSSE (Dead Simple Signing Envelope) v1: the envelope, and the pre-authentication encoding (PAE) that
//! is what actually gets signed.
//!
//! `PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`, LEN the decimal byte length
//! (<https://github.com/secure-systems-lab/dsse/blob/v1.0.0/protocol.md>). A verifier checks the
//! signature over the PAE of the payload bytes as transmitted, and only then parses the payload.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::keys::{KeyError, SigningKey};

/// The DSSE payload type of in-toto statements.
pub const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";

/// The bytes a DSSE signature covers.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let type_len = payload_type.len().to_string();
    let body_len = payload.len().to_string();
    let mut out = Vec::with_capacity(
        16 + type_len.len() + payload_type.len() + body_len.len() + payload.len(),
    );
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(type_len.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(body_len.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

/// A DSSE envelope as it appears in JSON; `payload` and `sig` are base64 there and raw bytes here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// The signed payload's bytes.
    #[serde(with = "b64")]
    pub payload: Vec<u8>,
    /// What the payload is, e.g. [`IN_TOTO_PAYLOAD_TYPE`].
    pub payload_type: String,
    /// Signatures over `PAE(payload_type, payload)`.
    pub signatures: Vec<EnvelopeSignature>,
}

/// One signature of an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeSignature {
    /// The signature bytes (ASN.1 DER ECDSA for sanctum's keys).
    #[serde(with = "b64")]
    pub sig: Vec<u8>,
    /// Names the key; empty when the signer gave none (the model-signing tools write `""`).
    #[serde(default)]
    pub keyid: String,
}

impl Envelope {
    /// Signs `payload` with `key`; the signature's keyid is the key's hint.
    pub fn sign(payload_type: &str, payload: Vec<u8>, key: &SigningKey) -> Result<Self, KeyError> {
        let sig = key.sign(&pae(payload_type, &payload))?;
        Ok(Self {
            payload,
            payload_type: payload_type.to_owned(),
            signatures: vec![EnvelopeSignature {
                sig,
                keyid: key.hint().as_str().to_owned(),
            }],
        })
    }

    /// The bytes the signatures cover.
    pub fn pae(&self) -> Vec<u8> {
        pae(&self.payload_type, &self.payload)
    }
}

/// Decodes base64 written with the standard or the URL-safe alphabet, padded or not, as the DSSE spec
/// asks verifiers to accept.
pub fn decode_base64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    if text.contains(['-', '_']) {
        LENIENT.decode(text.replace('-', "+").replace('_', "/"))
    } else {
        LENIENT.decode(text)
    }
}

/// Serde adapter: bytes as standard base64 out, standard or URL-safe in.
pub(crate) mod b64 {
    use super::*;

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        decode_base64(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn pae_matches_the_spec_test_vector() {
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
        // Lengths are bytes, not characters.
        assert_eq!(pae("t", "é".as_bytes()), "DSSEv1 1 t 2 é".as_bytes());
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ");
    }

    #[test]
    fn accepts_standard_and_url_safe_base64_with_or_without_padding() {
        let bytes = [0xfbu8, 0xff, 0xfe, 0x01];
        for text in ["+//+AQ==", "-__-AQ==", "+//+AQ", "-__-AQ"] {
            assert_eq!(decode_base64(text).unwrap(), bytes, "{text}");
        }
        assert!(decode_base64("not base64!").is_err());
    }

    #[test]
    fn envelope_json_round_trip_and_keyid_defaults_to_empty() {
        let json = r#"{"payload":"aGk=","payloadType":"t","signatures":[{"sig":"AQI="}]}"#;
        let env: Envelope = serde_json::from_str(json).unwrap();
        assert_eq!(env.payload, b"hi");
        assert_eq!(env.signatures[0].sig, [1, 2]);
        assert_eq!(env.signatures[0].keyid, "");
        let back = serde_json::to_string(&env).unwrap();
        assert_eq!(
            back,
            r#"{"payload":"aGk=","payloadType":"t","signatures":[{"sig":"AQI=","keyid":""}]}"#
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn sign_verify_round_trip_and_any_flip_breaks_it(
            payload in proptest::collection::vec(any::<u8>(), 0..256),
            flip in any::<prop::sample::Index>(),
        ) {
            let key = test_key();
            let env = Envelope::sign(IN_TOTO_PAYLOAD_TYPE, payload.clone(), key).unwrap();
            let json = serde_json::to_vec(&env).unwrap();
            let back: Envelope = serde_json::from_slice(&json).unwrap();
            prop_assert_eq!(&back, &env);
            prop_assert!(key.public().verify(&back.pae(), &back.signatures[0].sig).is_ok());
            if !payload.is_empty() {
                let mut bad = back.clone();
                let i = flip.index(payload.len());
                bad.payload[i] ^= 0x01;
                prop_assert!(key.public().verify(&bad.pae(), &bad.signatures[0].sig).is_err());
            }
            let mut other_type = back;
            other_type.payload_type.push('x');
            prop_assert!(key.public().verify(&other_type.pae(), &other_type.signatures[0].sig).is_err());
        }
    }

    fn test_key() -> &'static SigningKey {
        static KEY: std::sync::OnceLock<SigningKey> = std::sync::OnceLock::new();
        KEY.get_or_init(|| SigningKey::generate().unwrap())
    }
}
