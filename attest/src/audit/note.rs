//! Checkpoints (c2sp.org/tlog-checkpoint) as signed notes (c2sp.org/signed-note), signed with the
//! machine's ECDSA P-256 key: signature type 0x02, whose key ID is the first four bytes of the
//! SHA-256 of the key's SPKI DER, and whose signature is ASN.1 DER ECDSA-SHA256 over the note text.
//!
//! ```text
//! sanctum/audit/1f3a…            origin (also the key name)
//! 42                             tree size
//! pB2X…=                         base64 RFC 6962 root hash
//!
//! — sanctum/audit/1f3a… AAAAAE…  base64(key ID ‖ signature)
//! ```

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

use super::merkle::Hash;
use crate::keys::{KeyError, PublicKey, SigningKey};

/// Largest note read: a checkpoint is a few hundred bytes; cosignatures add lines, not megabytes.
pub const MAX_NOTE_BYTES: usize = 64 << 10;

/// A tree head: which log, how many entries, their root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's name; sanctum uses its key name, `sanctum/audit/<key hint prefix>`.
    pub origin: String,
    /// Entries covered.
    pub size: u64,
    /// RFC 6962 root of the first `size` entries.
    pub root: Hash,
}

/// Why a note or checkpoint was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum NoteError {
    /// Not a signed note, or not a checkpoint.
    #[error("malformed checkpoint: {0}")]
    Malformed(String),
    /// A signature by the expected key does not verify.
    #[error("the signature of {0} does not verify: the checkpoint was altered or forged")]
    BadSignature(String),
    /// No signature by the expected key.
    #[error("not signed by {0}")]
    Unsigned(String),
    /// Signing failed.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// The note key name (and checkpoint origin) of a machine's key.
pub fn key_name(key: &PublicKey) -> String {
    format!("sanctum/audit/{}", &key.hint().as_str()[..16])
}

/// The 4-byte key ID of an ECDSA note key.
fn key_id(key: &PublicKey) -> [u8; 4] {
    let digest = Sha256::digest(key.spki_der());
    [digest[0], digest[1], digest[2], digest[3]]
}

impl Checkpoint {
    /// The note text: origin, size and base64 root, one per line.
    pub fn text(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            STANDARD.encode(self.root)
        )
    }

    /// The signed note.
    pub fn sign(&self, key: &SigningKey) -> Result<String, NoteError> {
        let text = self.text();
        let mut signature = key_id(key.public()).to_vec();
        signature.extend(key.sign(text.as_bytes())?);
        Ok(format!(
            "{text}\n\u{2014} {} {}\n",
            key_name(key.public()),
            STANDARD.encode(signature)
        ))
    }

    /// Reads a signed checkpoint and checks it carries a valid signature by `key`. Signatures by
    /// other keys (witnesses' cosignatures) are ignored, as the spec requires.
    pub fn open(note: &[u8], key: &PublicKey) -> Result<Self, NoteError> {
        let malformed = |why: &str| NoteError::Malformed(why.to_owned());
        if note.len() > MAX_NOTE_BYTES {
            return Err(malformed("larger than 64 KiB"));
        }
        let note = std::str::from_utf8(note).map_err(|_| malformed("not UTF-8"))?;
        if note.chars().any(|c| c.is_control() && c != '\n') {
            return Err(malformed("a control character other than newline"));
        }
        let split = note
            .rfind("\n\n")
            .ok_or_else(|| malformed("no blank line before the signatures"))?;
        let (text, signatures) = (&note[..split + 1], &note[split + 2..]);
        let name = key_name(key);
        let id = key_id(key);
        let mut verified = false;
        for line in signatures.lines() {
            let rest = line
                .strip_prefix("\u{2014} ")
                .ok_or_else(|| malformed("a signature line not starting with an em dash"))?;
            let (signer, encoded) = rest
                .split_once(' ')
                .ok_or_else(|| malformed("a signature line without a signature"))?;
            let bytes = STANDARD
                .decode(encoded)
                .map_err(|_| malformed("a signature that is not base64"))?;
            if signer != name || bytes.len() < 4 || bytes[..4] != id {
                continue;
            }
            key.verify(text.as_bytes(), &bytes[4..])
                .map_err(|_| NoteError::BadSignature(name.clone()))?;
            verified = true;
        }
        if !verified {
            return Err(NoteError::Unsigned(name));
        }
        Self::parse_text(text)
    }

    fn parse_text(text: &str) -> Result<Self, NoteError> {
        let malformed = |why: String| NoteError::Malformed(why);
        let mut lines = text.lines();
        let origin = lines
            .next()
            .filter(|l| !l.is_empty())
            .ok_or_else(|| malformed("no origin line".into()))?;
        let size_line = lines
            .next()
            .ok_or_else(|| malformed("no tree size line".into()))?;
        let size = size_line
            .parse::<u64>()
            .ok()
            .filter(|s| s.to_string() == size_line)
            .ok_or_else(|| malformed(format!("tree size {size_line:?} is not a decimal")))?;
        let root_line = lines
            .next()
            .ok_or_else(|| malformed("no root hash line".into()))?;
        let root = STANDARD
            .decode(root_line)
            .ok()
            .and_then(|b| Hash::try_from(b).ok())
            .ok_or_else(|| malformed(format!("root {root_line:?} is not a base64 SHA-256")))?;
        Ok(Self {
            origin: origin.to_owned(),
            size,
            root,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(key: &SigningKey) -> Checkpoint {
        Checkpoint {
            origin: key_name(key.public()),
            size: 7,
            root: [9; 32],
        }
    }

    #[test]
    fn a_signed_checkpoint_opens_with_its_key_only() {
        let key = SigningKey::generate().unwrap();
        let note = checkpoint(&key).sign(&key).unwrap();
        assert!(note.contains("\n7\nCQkJ"));
        assert_eq!(
            Checkpoint::open(note.as_bytes(), key.public()).unwrap(),
            checkpoint(&key)
        );
        let other = SigningKey::generate().unwrap();
        assert!(matches!(
            Checkpoint::open(note.as_bytes(), other.public()),
            Err(NoteError::Unsigned(_))
        ));
    }

    #[test]
    fn an_altered_checkpoint_is_refused_and_cosignatures_are_ignored() {
        let key = SigningKey::generate().unwrap();
        let note = checkpoint(&key).sign(&key).unwrap();
        let altered = note.replacen("\n7\n", "\n8\n", 1);
        assert!(matches!(
            Checkpoint::open(altered.as_bytes(), key.public()),
            Err(NoteError::BadSignature(_))
        ));
        let cosigned = format!(
            "{note}\u{2014} witness.example {}\n",
            STANDARD.encode([1u8; 68])
        );
        assert!(Checkpoint::open(cosigned.as_bytes(), key.public()).is_ok());
        for bad in [
            "no blank line",
            "origin\n7\nroot\n\n\u{2014} x y\n",
            "origin\n07\nCQ==\n\n",
        ] {
            assert!(
                Checkpoint::open(bad.as_bytes(), key.public()).is_err(),
                "{bad:?}"
            );
        }
    }
}
