//! The structure of a GGUF file (llama.cpp's format), checked without trusting any of it: every
//! count and length is bounded by the file's size before it is used, and the tensors' bytes must
//! lie inside the file, aligned and without overlap: the same rules the Safetensors checker applies
//! ([`crate::format`]). `sanctum import gguf` runs this before candle parses the file, and `scan`
//! reads its reports from it. Weights are never read.

use std::collections::HashSet;
use std::io::{self, Read, Seek};

/// GGUF versions this reader knows (version 1 used 32-bit counts and is long gone).
const VERSIONS: std::ops::RangeInclusive<u32> = 2..=3;

/// More tensors than this is not a model anyone ships (the largest have a few thousand).
pub const MAX_TENSORS: u64 = 1 << 20;

/// More metadata entries than this is not a model either.
const MAX_METADATA: u64 = 1 << 20;

/// Array items summed over all metadata: a reader that keeps every item (candle does, about
/// 32 bytes each) must not be made to hold more than a few hundred MiB by a small header. Real
/// vocabularies take under a million.
const MAX_ARRAY_ITEMS: u64 = 1 << 24;

/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;

/// ggml's `GGML_MAX_NAME`: a tensor name is shorter than this.
const MAX_NAME: u64 = 64;

/// Metadata strings longer than this are skipped, not kept (only short ones are reported).
const KEPT_STRING: u64 = 4096;

/// The alignment of tensor data when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;

/// ggml's tensor types: id, name, values per block, bytes per block (`ggml_type_traits`).
const GGML_TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "f32", 1, 4),
    (1, "f16", 1, 2),
    (2, "q4_0", 32, 18),
    (3, "q4_1", 32, 20),
    (6, "q5_0", 32, 22),
    (7, "q5_1", 32, 24),
    (8, "q8_0", 32, 34),
    (9, "q8_1", 32, 36),
    (10, "q2_k", 256, 84),
    (11, "q3_k", 256, 110),
    (12, "q4_k", 256, 144),
    (13, "q5_k", 256, 176),
    (14, "q6_k", 256, 210),
    (15, "q8_k", 256, 292),
    (16, "iq2_xxs", 256, 66),
    (17, "iq2_xs", 256, 74),
    (18, "iq3_xxs", 256, 98),
    (19, "iq1_s", 256, 50),
    (20, "iq4_nl", 32, 18),
    (21, "iq3_s", 256, 110),
    (22, "iq2_s", 256, 82),
    (23, "iq4_xs", 256, 136),
    (24, "i8", 1, 1),
    (25, "i16", 1, 2),
    (26, "i32", 1, 4),
    (27, "i64", 1, 8),
    (28, "f64", 1, 8),
    (29, "iq1_m", 256, 56),
    (30, "bf16", 1, 2),
    (34, "tq1_0", 256, 54),
    (35, "tq2_0", 256, 66),
    (39, "mxfp4", 32, 17),
];

/// Values per block and bytes per block of the ggml type written under `name` (`q4_0`, `q6_k`...),
/// as sanctum's quantized Safetensors layout names them (docs/quantized-safetensors.md).
pub fn block_shape(name: &str) -> Option<(u64, u64)> {
    GGML_TYPES
        .iter()
        .find(|(_, n, ..)| *n == name)
        .map(|&(_, _, values, bytes)| (values, bytes))
}

/// Metadata value types (`gguf_type` in ggml's gguf.h).
mod value_type {
    pub const U32: u32 = 4;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
}

/// Why a GGUF file is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// It does not start with `GGUF`.
    #[error("it does not start with the magic \"GGUF\"")]
    Magic,
    /// A version this reader does not know.
    #[error("GGUF version {0} (2 and 3 are known)")]
    Version(u32),
    /// The header claims more than the file holds.
    #[error("the header ends early (at byte {at} of {len}, reading {what})")]
    EndsEarly {
        /// Where it was.
        at: u64,
        /// The file's length.
        len: u64,
        /// What was being read.
        what: &'static str,
    },
    /// A count, type or value outside what the format allows.
    #[error("{0}")]
    Invalid(String),
    /// A tensor's bytes are misplaced.
    #[error("tensor {tensor:?}: {problem}")]
    Tensor {
        /// Its name.
        tensor: String,
        /// What is wrong.
        problem: String,
    },
    /// Reading failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensor {
    /// Its name.
    pub name: String,
    /// Its dimensions, innermost first (ggml's `ne`).
    pub dims: Vec<u64>,
    /// Its ggml type's name (`q4_0`, `f16`...).
    pub ggml_type: &'static str,
    /// Where its bytes start, from the start of the file.
    pub start: u64,
    /// Its size in bytes.
    pub len: u64,
}

impl GgufTensor {
    /// How many values it holds.
    pub fn elements(&self) -> u64 {
        // Checked not to overflow when the header was read.
        self.dims.iter().product()
    }
}

/// A GGUF header whose structure has been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufHeader {
    /// Format version.
    pub version: u32,
    /// `general.architecture`, when it is a short string.
    pub architecture: Option<String>,
    /// `general.name`, when it is a short string.
    pub name: Option<String>,
    /// The tensors' alignment.
    pub alignment: u64,
    /// Where tensor data starts.
    pub data_offset: u64,
    /// The tensors, in header order.
    pub tensors: Vec<GgufTensor>,
}

/// Reads and checks the header of a GGUF file of `len` bytes from its start: version, counts,
/// string lengths, metadata types, `general.alignment` (a power of two), and that every tensor
/// has a known type, at most four dimensions, a row of whole blocks, an aligned offset, and
/// bytes inside the file that no other tensor uses.
pub fn read_header(reader: impl Read + Seek, len: u64) -> Result<GgufHeader, GgufError> {
    let mut r = Reader {
        inner: reader,
        at: 0,
        len,
    };
    if r.fill::<4>("the magic")? != *b"GGUF" {
        return Err(GgufError::Magic);
    }
    let version = r.u32("the version")?;
    if !VERSIONS.contains(&version) {
        return Err(GgufError::Version(version));
    }
    let tensor_count = r.u64("the tensor count")?;
    let metadata_count = r.u64("the metadata count")?;
    if tensor_count > MAX_TENSORS {
        return Err(GgufError::Invalid(format!(
            "{tensor_count} tensors declared (at most {MAX_TENSORS} are accepted)"
        )));
    }
    if metadata_count > MAX_METADATA {
        return Err(GgufError::Invalid(format!(
            "{metadata_count} metadata entries declared (at most {MAX_METADATA} are accepted)"
        )));
    }

    let mut header = GgufHeader {
        version,
        architecture: None,
        name: None,
        alignment: DEFAULT_ALIGNMENT,
        data_offset: 0,
        tensors: Vec::new(),
    };
    let mut array_items: u64 = 0;
    for _ in 0..metadata_count {
        let key = r.string("a metadata key")?;
        let kind = r.u32("a metadata type")?;
        let key = key.as_deref().unwrap_or("");
        match (key, kind) {
            ("general.alignment", value_type::U32) => {
                let alignment = r.u32("general.alignment")?;
                if alignment == 0 || !alignment.is_power_of_two() {
                    return Err(GgufError::Invalid(format!(
                        "general.alignment is {alignment}, not a power of two"
                    )));
                }
                header.alignment = u64::from(alignment);
            }
            ("general.alignment", other) => {
                return Err(GgufError::Invalid(format!(
                    "general.alignment has type {other}, not uint32"
                )));
            }
            ("general.architecture", value_type::STRING) => {
                header.architecture = r.string("general.architecture")?;
            }
            ("general.name", value_type::STRING) => header.name = r.string("general.name")?,
            (_, kind) => r.skip_value(kind, &mut array_items)?,
        }
    }

    let mut names = HashSet::new();
    for _ in 0..tensor_count {
        let tensor = r.tensor_info(header.alignment)?;
        if !names.insert(tensor.name.clone()) {
            return Err(GgufError::Invalid(format!(
                "tensor {:?} is declared twice",
                tensor.name
            )));
        }
        header.tensors.push(tensor);
    }

    header.data_offset = r.at.next_multiple_of(header.alignment);
    check_layout(&mut header, len)?;
    Ok(header)
}

/// Places each tensor after the data offset, inside the file, without overlap.
fn check_layout(header: &mut GgufHeader, len: u64) -> Result<(), GgufError> {
    for t in &mut header.tensors {
        // `start` holds the offset relative to the data section until here.
        let start = header.data_offset.checked_add(t.start);
        let end = start.and_then(|s| s.checked_add(t.len));
        match (start, end) {
            (Some(start), Some(end)) if end <= len => t.start = start,
            _ => {
                return Err(GgufError::Tensor {
                    tensor: t.name.clone(),
                    problem: format!(
                        "its {} bytes at data offset {} lie past the end of the file ({len} bytes)",
                        t.len, t.start
                    ),
                });
            }
        }
    }
    let mut order: Vec<&GgufTensor> = header.tensors.iter().filter(|t| t.len > 0).collect();
    order.sort_by_key(|t| t.start);
    for pair in order.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if a.start + a.len > b.start {
            return Err(GgufError::Tensor {
                tensor: b.name.clone(),
                problem: format!(
                    "its bytes {}..{} overlap tensor {:?} (bytes {}..{})",
                    b.start,
                    b.start + b.len,
                    a.name,
                    a.start,
                    a.start + a.len
                ),
            });
        }
    }
    Ok(())
}

/// A reader that knows where it is and never goes past the file's end.
struct Reader<R> {
    inner: R,
    at: u64,
    len: u64,
}

impl<R: Read + Seek> Reader<R> {
    fn ends_early(&self, what: &'static str) -> GgufError {
        GgufError::EndsEarly {
            at: self.at,
            len: self.len,
            what,
        }
    }

    /// Refuses to read `n` bytes that the file does not have.
    fn room(&self, n: u64, what: &'static str) -> Result<(), GgufError> {
        match self.at.checked_add(n) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(self.ends_early(what)),
        }
    }

    fn fill<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        self.room(N as u64, what)?;
        let mut bytes = [0; N];
        self.inner.read_exact(&mut bytes).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                self.ends_early(what)
            } else {
                GgufError::Io(e)
            }
        })?;
        self.at += N as u64;
        Ok(bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        self.fill(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        self.fill(what).map(u64::from_le_bytes)
    }

    fn skip(&mut self, n: u64, what: &'static str) -> Result<(), GgufError> {
        self.room(n, what)?;
        let offset = i64::try_from(n).map_err(|_| self.ends_early(what))?;
        self.inner.seek(io::SeekFrom::Current(offset))?;
        self.at += n;
        Ok(())
    }

    /// A length-prefixed string: kept when short and UTF-8, skipped otherwise.
    fn string(&mut self, what: &'static str) -> Result<Option<String>, GgufError> {
        let n = self.u64(what)?;
        if n > KEPT_STRING {
            self.skip(n, what)?;
            return Ok(None);
        }
        Ok(String::from_utf8(self.bytes(n, what)?).ok())
    }

    /// `n` bytes that the file is known to hold.
    fn bytes(&mut self, n: u64, what: &'static str) -> Result<Vec<u8>, GgufError> {
        self.room(n, what)?;
        let mut bytes = vec![0; n as usize];
        self.inner.read_exact(&mut bytes)?;
        self.at += n;
        Ok(bytes)
    }

    fn skip_value(&mut self, kind: u32, array_items: &mut u64) -> Result<(), GgufError> {
        match kind {
            value_type::STRING => self.string("a metadata string").map(drop),
            value_type::ARRAY => {
                let item = self.u32("an array's item type")?;
                let n = self.u64("an array's length")?;
                *array_items = array_items.saturating_add(n);
                if *array_items > MAX_ARRAY_ITEMS {
                    return Err(GgufError::Invalid(format!(
                        "the metadata arrays hold more than {MAX_ARRAY_ITEMS} items"
                    )));
                }
                match scalar_size(item) {
                    Some(size) => self.skip(n.saturating_mul(size), "an array"),
                    None if item == value_type::STRING => {
                        (0..n).try_for_each(|_| self.string("an array's string").map(drop))
                    }
                    None if item == value_type::ARRAY => Err(GgufError::Invalid(
                        "a metadata array of arrays (ggml reads none)".into(),
                    )),
                    None => Err(GgufError::Invalid(format!(
                        "a metadata array of unknown type {item}"
                    ))),
                }
            }
            _ => match scalar_size(kind) {
                Some(size) => self.skip(size, "a metadata value"),
                None => Err(GgufError::Invalid(format!("unknown metadata type {kind}"))),
            },
        }
    }

    /// One tensor entry; its `start` is still relative to the data section.
    fn tensor_info(&mut self, alignment: u64) -> Result<GgufTensor, GgufError> {
        let length = self.u64("a tensor name")?;
        if length >= MAX_NAME {
            return Err(GgufError::Invalid(format!(
                "a tensor name of {length} bytes (ggml allows {})",
                MAX_NAME - 1
            )));
        }
        let name = String::from_utf8(self.bytes(length, "a tensor name")?)
            .map_err(|_| GgufError::Invalid("a tensor name is not UTF-8".into()))?;
        let invalid = |problem: String| GgufError::Tensor {
            tensor: name.clone(),
            problem,
        };
        let rank = self.u32("a tensor's rank")?;
        if rank > MAX_DIMS {
            return Err(invalid(format!(
                "{rank} dimensions (ggml allows {MAX_DIMS})"
            )));
        }
        let mut dims = Vec::with_capacity(rank as usize);
        for _ in 0..rank {
            dims.push(self.u64("a tensor's dimension")?);
        }
        let type_id = self.u32("a tensor's type")?;
        let offset = self.u64("a tensor's offset")?;
        let Some(&(_, ggml_type, block_values, block_bytes)) =
            GGML_TYPES.iter().find(|(id, ..)| *id == type_id)
        else {
            return Err(invalid(format!("unknown ggml type {type_id}")));
        };
        let elements = dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .ok_or_else(|| invalid(format!("dimensions {dims:?} overflow")))?;
        let row = dims.first().copied().unwrap_or(1);
        if !row.is_multiple_of(block_values) {
            return Err(invalid(format!(
                "a row of {row} values is not a whole number of {ggml_type} blocks of {block_values}"
            )));
        }
        if !offset.is_multiple_of(alignment) {
            return Err(invalid(format!(
                "data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        let len = (elements / block_values)
            .checked_mul(block_bytes)
            .ok_or_else(|| invalid(format!("dimensions {dims:?} overflow")))?;
        Ok(GgufTensor {
            name,
            dims,
            ggml_type,
            start: offset,
            len,
        })
    }
}

fn scalar_size(kind: u32) -> Option<u64> {
    match kind {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A GGUF v3 file: metadata entries (already encoded), tensors (name, dims, type, offset),
    /// then `data` bytes of tensor data at 32-byte alignment unless metadata changes it.
    fn gguf(metadata: &[Vec<u8>], tensors: &[(&str, &[u64], u32, u64)], data: usize) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((metadata.len() as u64).to_le_bytes());
        for m in metadata {
            b.extend(m);
        }
        for (name, dims, kind, offset) in tensors {
            b.extend((name.len() as u64).to_le_bytes());
            b.extend(name.as_bytes());
            b.extend((dims.len() as u32).to_le_bytes());
            for d in *dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(kind.to_le_bytes());
            b.extend(offset.to_le_bytes());
        }
        b.resize(b.len().next_multiple_of(32), 0);
        b.resize(b.len() + data, 0);
        b
    }

    fn key(name: &str, kind: u32, value: &[u8]) -> Vec<u8> {
        let mut b = (name.len() as u64).to_le_bytes().to_vec();
        b.extend(name.as_bytes());
        b.extend(kind.to_le_bytes());
        b.extend(value);
        b
    }

    fn string(s: &str) -> Vec<u8> {
        let mut b = (s.len() as u64).to_le_bytes().to_vec();
        b.extend(s.as_bytes());
        b
    }

    fn read(bytes: &[u8]) -> Result<GgufHeader, GgufError> {
        read_header(Cursor::new(bytes), bytes.len() as u64)
    }

    #[test]
    fn a_well_formed_header_reads_back() {
        let bytes = gguf(
            &[key("general.architecture", 8, &string("llama"))],
            &[("a", &[32, 2], 8, 0), ("b", &[4], 0, 96)],
            128,
        );
        let header = read(&bytes).unwrap();
        assert_eq!(header.architecture.as_deref(), Some("llama"));
        assert_eq!(header.tensors.len(), 2);
        assert_eq!(header.tensors[0].len, 68);
        assert_eq!(header.tensors[1].start, header.data_offset + 96);
        assert_eq!(header.tensors[1].elements(), 4);
    }

    #[test]
    fn alignment_zero_or_not_a_power_of_two_is_refused() {
        for alignment in [0u32, 48] {
            let bytes = gguf(
                &[key("general.alignment", 4, &alignment.to_le_bytes())],
                &[],
                0,
            );
            let e = read(&bytes).unwrap_err().to_string();
            assert!(e.contains("not a power of two"), "{e}");
        }
    }

    #[test]
    fn overlapping_tensors_are_refused() {
        let bytes = gguf(&[], &[("a", &[64], 0, 0), ("b", &[64], 0, 128)], 512);
        let e = read(&bytes).unwrap_err().to_string();
        assert!(e.contains("\"b\"") && e.contains("overlap"), "{e}");
    }

    #[test]
    fn misplaced_or_misshapen_tensors_are_refused() {
        for (tensors, expected) in [
            (vec![("a", &[64u64][..], 0u32, 64u64)], "past the end"),
            (
                vec![("a", &[8][..], 0, 4)],
                "not a multiple of the alignment",
            ),
            (vec![("a", &[33][..], 8, 0)], "whole number of q8_0 blocks"),
            (vec![("a", &[1, 1, 1, 1, 1][..], 0, 0)], "5 dimensions"),
            (vec![("a", &[4][..], 77, 0)], "unknown ggml type 77"),
            (vec![("a", &[u64::MAX, 4][..], 0, 0)], "overflow"),
            (vec![("a", &[4][..], 0, 0), ("a", &[4][..], 0, 32)], "twice"),
        ] {
            let bytes = gguf(&[], &tensors, 64);
            let e = read(&bytes).unwrap_err().to_string();
            assert!(e.contains(expected), "{expected}: {e}");
        }
    }

    #[test]
    fn counts_and_lengths_beyond_the_file_are_refused_without_allocating() {
        let bytes = gguf(&[key("k", 8, &u64::MAX.to_le_bytes())], &[], 0);
        assert!(matches!(read(&bytes), Err(GgufError::EndsEarly { .. })));

        let mut array = 8u32.to_le_bytes().to_vec();
        array.extend((1u64 << 40).to_le_bytes());
        let bytes = gguf(&[key("k", 9, &array)], &[], 0);
        assert!(read(&bytes).unwrap_err().to_string().contains("items"));

        let mut nested = 9u32.to_le_bytes().to_vec();
        nested.extend(1u64.to_le_bytes());
        let bytes = gguf(&[key("k", 9, &nested)], &[], 0);
        assert!(read(&bytes).unwrap_err().to_string().contains("arrays"));

        let mut bytes = gguf(&[], &[], 0);
        bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(
            read(&bytes)
                .unwrap_err()
                .to_string()
                .contains("tensors declared")
        );

        for cut in 0..gguf(&[], &[("a", &[4], 0, 0)], 16).len() - 16 {
            let bytes = gguf(&[], &[("a", &[4], 0, 0)], 16);
            assert!(read(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}
