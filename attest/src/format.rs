//! Weight-file formats: recognizes pickle, GGUF, ONNX and other formats by name and by content, and
//! validates Safetensors files, so that only well-formed Safetensors reach a loader.
//!
//! Names and contents are both checked because either can lie: a pickle renamed `model.safetensors` is
//! still a pickle, and a loader must never be the first to find out that a header is malformed.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

/// Largest Safetensors header accepted; the `safetensors` crate's own limit (`MAX_HEADER_SIZE`).
pub const MAX_HEADER_SIZE: u64 = 100_000_000;

/// Bytes of the little-endian header length that opens a Safetensors file.
const LEN_PREFIX: usize = 8;

/// The format a file name implies when it is a weight format sanctum refuses (`.bin`, `.pt`, `.gguf`...).
///
/// Case-insensitive on the file name. `None` for Safetensors and for the non-weight files a model ships
/// with (`.json`, `.txt`, `.model` sentencepiece, `.jinja`, `.md`...).
pub fn forbidden_weight_format(path: &Path) -> Option<&'static str> {
    let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();

    // Multi-part suffixes first, so that `x.tar.gz` reads as a tar archive and not as gzip.
    const ARCHIVES: &[&str] = &[
        ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst",
    ];
    if ARCHIVES.iter().any(|s| name.ends_with(s)) {
        return Some("a tar archive");
    }
    // TensorFlow checkpoints: `model.ckpt.index`, `model.ckpt.data-00000-of-00001`, `variables.data-...`.
    if name.contains(".ckpt.") || is_tf_data_shard(&name) {
        return Some("a TensorFlow checkpoint");
    }

    let ext = name.rsplit_once('.')?.1;
    let format = match ext {
        "bin" => "a pickle file (PyTorch .bin)",
        "pt" => "a PyTorch checkpoint (.pt)",
        "pth" => "a PyTorch checkpoint (.pth)",
        "ckpt" => "a checkpoint file (.ckpt)",
        "pkl" => "a pickle file (.pkl)",
        "pickle" => "a pickle file (.pickle)",
        "joblib" => "a joblib pickle (.joblib)",
        "dill" => "a dill pickle (.dill)",
        "mar" => "a TorchServe archive (.mar)",
        "pte" => "an ExecuTorch program (.pte)",
        "ot" => "a libtorch checkpoint (.ot)",
        "gguf" => "a GGUF file",
        "ggml" | "ggjt" | "ggmf" => "a GGML file",
        "llamafile" => "a llamafile executable",
        "onnx" => "an ONNX model",
        "ort" => "an ONNX Runtime model (.ort)",
        "h5" | "hdf5" => "an HDF5 file (Keras/TensorFlow weights)",
        "keras" => "a Keras model (.keras)",
        "msgpack" => "a Flax msgpack checkpoint (.msgpack)",
        "npy" => "a NumPy array (.npy)",
        "npz" => "a NumPy archive (.npz)",
        "pb" => "a TensorFlow protobuf graph (.pb)",
        "tflite" => "a TensorFlow Lite model",
        "mlmodel" => "a Core ML model",
        "pdparams" | "pdmodel" => "a PaddlePaddle model",
        "nemo" => "a NeMo archive (.nemo)",
        "caffemodel" => "a Caffe model",
        "zip" => "a zip archive",
        "7z" => "a 7-Zip archive",
        _ => return None,
    };
    Some(format)
}

/// `....data-00000-of-00001`: a TensorFlow variables shard.
fn is_tf_data_shard(name: &str) -> bool {
    let Some((_, tail)) = name.rsplit_once(".data-") else {
        return false;
    };
    let Some((a, b)) = tail.split_once("-of-") else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    digits(a) && digits(b)
}

/// What a file's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentKind {
    /// Structurally looks like Safetensors (length prefix and `{`); not yet validated.
    Safetensors,
    /// Python pickle, which runs code when loaded. Protocols 0 and 1 are a best guess from the opcodes.
    Pickle {
        /// Pickle protocol, 0 to 5.
        protocol: u8,
    },
    /// A zip archive, including PyTorch zip checkpoints (`torch.save` since 1.6) and `.npz`/`.keras`.
    Zip,
    /// llama.cpp's GGUF.
    Gguf,
    /// llama.cpp's older GGML/GGMF/GGJT files.
    Ggml,
    /// HDF5 (Keras/TensorFlow `.h5` weights).
    Hdf5,
    /// A NumPy `.npy` array.
    Numpy,
    /// None of the above: text, JSON, sentencepiece, or unknown binary.
    Other,
}

/// What a file's bytes are, from its first bytes.
///
/// Safetensors is recognized only when the declared header fits in `bytes` (`2 <= N <= len - 8`,
/// `N <= MAX_HEADER_SIZE`) and starts with `{`, so a short prefix of a Safetensors file sniffs as
/// [`ContentKind::Other`]. It is tested first: a header length such as 1152 (`80 04 00 ...`) would
/// otherwise look like a pickle magic. Every other magic is at offset 0.
pub fn sniff(bytes: &[u8]) -> ContentKind {
    if looks_like_safetensors(bytes) {
        return ContentKind::Safetensors;
    }
    match bytes {
        [0x80, p @ 2..=5, ..] => ContentKind::Pickle { protocol: *p },
        [b'P', b'K', 3, 4, ..] | [b'P', b'K', 5, 6, ..] | [b'P', b'K', 7, 8, ..] => {
            ContentKind::Zip
        }
        [b'G', b'G', b'U', b'F', ..] => ContentKind::Gguf,
        // llama.cpp wrote these magics as little-endian u32s: 'ggml', 'ggmf', 'ggjt', 'ggla' (LoRA).
        [b'l', b'm', b'g', b'g', ..]
        | [b'f', b'm', b'g', b'g', ..]
        | [b't', b'j', b'g', b'g', ..]
        | [b'a', b'l', b'g', b'g', ..] => ContentKind::Ggml,
        [0x89, b'H', b'D', b'F', b'\r', b'\n', 0x1a, b'\n', ..] => ContentKind::Hdf5,
        [0x93, b'N', b'U', b'M', b'P', b'Y', ..] => ContentKind::Numpy,
        _ => match old_pickle_protocol(bytes) {
            Some(protocol) => ContentKind::Pickle { protocol },
            None => ContentKind::Other,
        },
    }
}

fn looks_like_safetensors(bytes: &[u8]) -> bool {
    let Some(n) = header_len(bytes) else {
        return false;
    };
    let room = (bytes.len() - LEN_PREFIX) as u64;
    (2..=room.min(MAX_HEADER_SIZE)).contains(&n) && bytes.get(LEN_PREFIX) == Some(&b'{')
}

fn header_len(bytes: &[u8]) -> Option<u64> {
    let prefix: [u8; LEN_PREFIX] = bytes.get(..LEN_PREFIX)?.try_into().ok()?;
    Some(u64::from_le_bytes(prefix))
}

/// Protocol 0/1 pickles have no magic; these openings are what `pickle`/`cPickle` and `torch.save`
/// actually write, and none can start JSON or ordinary text.
fn old_pickle_protocol(bytes: &[u8]) -> Option<u8> {
    match bytes {
        // Protocol 1: EMPTY_DICT / EMPTY_LIST / EMPTY_TUPLE, then BINPUT with a small binary memo index.
        [b'}' | b']' | b')', b'q', m, ..] if *m < 0x20 => return Some(1),
        // Protocol 0: MARK DICT/LIST/TUPLE, then PUT with a decimal memo index: `(dp0\n`, `(lp1\n`.
        [b'(', b'd' | b'l' | b't', b'p', rest @ ..] => {
            let digits = rest.iter().take_while(|c| c.is_ascii_digit()).count();
            if digits > 0 && rest.get(digits) == Some(&b'\n') {
                return Some(0);
            }
        }
        _ => {}
    }
    // GLOBAL (`c`) or MARK INST (`(i`) naming a module and attribute: `ccopy_reg\n_reconstructor\n`.
    let after = bytes
        .strip_prefix(b"c")
        .or_else(|| bytes.strip_prefix(b"(i"))?;
    let (module, rest) = split_line(after)?;
    let (attr, _) = split_line(rest)?;
    if !is_dotted_identifier(module) || !is_dotted_identifier(attr) {
        return None;
    }
    // Modules pickles of weights name; anything else must at least end with STOP, as every pickle does.
    const KNOWN: &[&[u8]] = &[
        b"copy_reg",
        b"copyreg",
        b"__builtin__",
        b"builtins",
        b"collections",
        b"torch",
        b"numpy",
        b"_codecs",
        b"sklearn",
    ];
    let root = module.split(|&c| c == b'.').next().unwrap_or_default();
    (KNOWN.contains(&root) || bytes.last() == Some(&b'.')).then_some(0)
}

fn split_line(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = bytes.iter().position(|&c| c == b'\n')?;
    Some((bytes.get(..end)?, bytes.get(end + 1..)?))
}

fn is_dotted_identifier(s: &[u8]) -> bool {
    !s.is_empty()
        && s.split(|&c| c == b'.').all(|part| match part {
            [first, rest @ ..] => {
                (first.is_ascii_alphabetic() || *first == b'_')
                    && rest.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
            }
            [] => false,
        })
}

/// Summary of a valid Safetensors file.
#[derive(Debug, Clone, PartialEq)]
pub struct SafetensorsInfo {
    /// Number of tensors.
    pub tensors: usize,
    /// Length of the JSON header in bytes (the file's first 8 bytes, little-endian).
    pub header_len: u64,
    /// The `__metadata__` strings, if the header has them.
    pub metadata: Option<BTreeMap<String, String>>,
}

/// A tensor as its header entry describes it, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorDesc {
    /// Tensor name.
    pub name: String,
    /// Its dtype, as written.
    pub dtype: String,
    /// Its shape.
    pub shape: Vec<u64>,
}

/// Where a tensor lies in the data section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// Tensor name.
    pub tensor: String,
    /// Begin offset.
    pub begin: u64,
    /// End offset (exclusive).
    pub end: u64,
}

/// Why a file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// Not even room for the header length.
    #[error("file is {len} bytes, too short for Safetensors (at least 8 bytes of header length)")]
    TooShort {
        /// File size.
        len: usize,
    },
    /// A header length no real file has; refused before trying to read it.
    #[error("header length {header_len} is absurd (the limit is {MAX_HEADER_SIZE} bytes)")]
    HeaderTooLarge {
        /// Declared header length.
        header_len: u64,
    },
    /// The header would run past the end of the file.
    #[error("header length {header_len} exceeds the file ({file_len} bytes)")]
    HeaderBeyondFile {
        /// Declared header length.
        header_len: u64,
        /// File size.
        file_len: usize,
    },
    /// The header is not UTF-8 text.
    #[error("header is not UTF-8: {0}")]
    HeaderNotUtf8(#[source] std::str::Utf8Error),
    /// The header is not JSON.
    #[error("header is not valid JSON: {0}")]
    HeaderNotJson(#[source] serde_json::Error),
    /// The header is JSON, but not an object of tensors.
    #[error("header is JSON {found}, not an object")]
    HeaderNotObject {
        /// What it is instead, e.g. "an array".
        found: &'static str,
    },
    /// Whitespace before the opening `{`: JSON allows it, Safetensors does not.
    #[error("header does not start with '{{'")]
    HeaderStart,
    /// The same key twice: parsers disagree on which one wins, so neither is trusted.
    #[error("header declares {key:?} twice")]
    DuplicateKey {
        /// The repeated key.
        key: String,
    },
    /// A tensor entry lacking `dtype`, `shape` or `data_offsets`, or with the wrong JSON types.
    #[error("tensor {tensor:?}: {problem}")]
    BadTensorEntry {
        /// Tensor name.
        tensor: String,
        /// What is wrong.
        problem: &'static str,
    },
    /// A dtype the `safetensors` crate does not know.
    #[error("unknown dtype {dtype:?} for tensor {tensor:?}")]
    UnknownDtype {
        /// Tensor name.
        tensor: String,
        /// The dtype as written.
        dtype: String,
    },
    /// Element count times element size overflows: no such tensor can exist.
    #[error("tensor {:?} has dtype {} and shape {:?}, too large to have a size", .tensor.name, .tensor.dtype, .tensor.shape)]
    SizeOverflow {
        /// The tensor.
        tensor: Box<TensorDesc>,
    },
    /// A sub-byte dtype (F4, F6) whose elements do not fill a whole number of bytes.
    #[error("tensor {:?} has dtype {} and shape {:?} = {bits} bits, not a whole number of bytes", .tensor.name, .tensor.dtype, .tensor.shape)]
    Misaligned {
        /// The tensor.
        tensor: Box<TensorDesc>,
        /// Its size in bits.
        bits: u64,
    },
    /// Shape and dtype call for a different number of bytes than the offsets give.
    #[error("tensor {:?} has dtype {} and shape {:?} = {expected} bytes, but its offsets span {actual} bytes", .tensor.name, .tensor.dtype, .tensor.shape)]
    SizeMismatch {
        /// The tensor.
        tensor: Box<TensorDesc>,
        /// Bytes shape and dtype call for.
        expected: u64,
        /// Bytes between its offsets.
        actual: u64,
    },
    /// `data_offsets` with begin after end.
    #[error("tensor {tensor:?} has data_offsets [{begin}, {end}]: begin is after end")]
    OffsetsReversed {
        /// Tensor name.
        tensor: String,
        /// Begin offset.
        begin: u64,
        /// End offset.
        end: u64,
    },
    /// A tensor reaching past the data section (often a truncated file).
    #[error(
        "tensor {tensor:?} occupies bytes {begin}..{end} of the data section, which has only {data_len} bytes"
    )]
    OffsetOutOfRange {
        /// Tensor name.
        tensor: String,
        /// Begin offset.
        begin: u64,
        /// End offset.
        end: u64,
        /// Size of the data section.
        data_len: u64,
    },
    /// Two tensors sharing bytes: writing one would change the other.
    #[error("tensors {:?} and {:?} overlap (bytes {}..{} and {}..{})", .first.tensor, .second.tensor, .first.begin, .first.end, .second.begin, .second.end)]
    Overlap {
        /// The tensor starting first.
        first: Box<Span>,
        /// The tensor starting inside it.
        second: Box<Span>,
    },
    /// Bytes between tensors that belong to none: room for hidden content.
    #[error("bytes {begin}..{end} of the data section belong to no tensor")]
    Gap {
        /// Start of the unused bytes.
        begin: u64,
        /// End of the unused bytes.
        end: u64,
    },
    /// Bytes after the last tensor (often something appended to the file).
    #[error("{} unused bytes at the end of the data section (bytes {begin}..{end}), after the last tensor", .end - .begin)]
    TrailingBytes {
        /// Start of the unused bytes.
        begin: u64,
        /// End of the data section.
        end: u64,
    },
    /// `__metadata__` that is not an object of strings.
    #[error("__metadata__ {problem}")]
    BadMetadata {
        /// What is wrong.
        problem: String,
    },
    /// Passed every check here, but the `safetensors` crate, which the loader uses, still refuses it.
    #[error("the safetensors library refuses it: {reason}")]
    Rejected {
        /// The library's message.
        reason: String,
    },
    /// Content in another weight format, whatever the name says.
    #[error("content is {found}, not Safetensors")]
    NotSafetensors {
        /// What the content is, e.g. "pickle data (protocol 4)".
        found: &'static str,
    },
    /// A file name that says it is a refused weight format.
    #[error("{format}, which sanctum never loads: only Safetensors weights are accepted")]
    ForbiddenName {
        /// The format its name implies.
        format: &'static str,
    },
}

/// Validates a whole Safetensors file: header, every tensor's dtype, shape and offsets, and that the
/// tensors cover the data section exactly, with no overlap, gap or trailing bytes.
///
/// Stricter than the `safetensors` crate (duplicate keys, leading whitespace, `null` metadata), and the
/// crate's own parser is run last, so nothing accepted here is refused by a loader using it.
pub fn check_safetensors(bytes: &[u8]) -> Result<SafetensorsInfo, FormatError> {
    check_safetensors_start(bytes, bytes.len() as u64)
}

/// [`check_safetensors`] for a file of `file_len` bytes of which only the start is at hand (a file
/// being streamed): every check needs only the length prefix and the header, so `start` must hold
/// them (see [`start_len`]); the data section is judged by its length alone.
pub fn check_safetensors_start(
    start: &[u8],
    file_len: u64,
) -> Result<SafetensorsInfo, FormatError> {
    let len = usize::try_from(file_len).unwrap_or(usize::MAX);
    let header_len = header_len(start).ok_or(FormatError::TooShort { len })?;
    if header_len > MAX_HEADER_SIZE {
        return Err(FormatError::HeaderTooLarge { header_len });
    }
    let room = file_len.saturating_sub(LEN_PREFIX as u64);
    if header_len > room {
        return Err(FormatError::HeaderBeyondFile {
            header_len,
            file_len: len,
        });
    }
    // Fits in usize: header_len <= MAX_HEADER_SIZE.
    let header_end = LEN_PREFIX + header_len as usize;
    let header = start
        .get(LEN_PREFIX..header_end)
        .ok_or(FormatError::HeaderBeyondFile {
            header_len,
            file_len: len,
        })?;
    let data_len = room - header_len;

    let header = std::str::from_utf8(header).map_err(FormatError::HeaderNotUtf8)?;
    let entries = parse_header(header)?;
    if !header.starts_with('{') {
        return Err(FormatError::HeaderStart);
    }

    let mut metadata = None;
    let mut spans: Vec<(u64, u64, &str)> = Vec::with_capacity(entries.len());
    for (name, value) in &entries {
        if name == "__metadata__" {
            metadata = Some(parse_metadata(value)?);
        } else {
            let (begin, end) = check_tensor(name, value, data_len)?;
            spans.push((begin, end, name));
        }
    }
    check_coverage(&mut spans, data_len)?;

    // Defence in depth: the loader parses with this crate, so its verdict must agree. These are the
    // checks of its `read_metadata`, which wants the whole file only to compare its length.
    let crate_view =
        serde_json::from_str::<safetensors::tensor::Metadata>(header).map_err(|e| {
            FormatError::Rejected {
                reason: e.to_string(),
            }
        })?;
    if crate_view.data_len() as u64 != data_len {
        return Err(FormatError::Rejected {
            reason: format!(
                "its tensors end at byte {} of a {data_len}-byte data section",
                crate_view.data_len()
            ),
        });
    }

    Ok(SafetensorsInfo {
        tensors: spans.len(),
        header_len,
        metadata,
    })
}

/// How many leading bytes of a `file_len`-byte file that starts with `start` the checks of
/// [`check_model_file_start`] need: a Safetensors file's length prefix and header (as far as the file
/// and [`MAX_HEADER_SIZE`] allow), else enough to recognize a format. Ask again as `start` grows: the
/// answer can grow once the length prefix is in.
pub fn start_len(start: &[u8], file_len: u64) -> u64 {
    let want = match header_len(start) {
        Some(n) if n <= MAX_HEADER_SIZE => LEN_PREFIX as u64 + n,
        _ => 0,
    };
    want.max(SNIFF_LEN).min(file_len)
}

/// Bytes that recognizing a format by content looks at (every magic sits in them).
const SNIFF_LEN: u64 = 64;

/// The header's top-level entries in file order, keeping duplicates so they can be refused.
struct Entries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor)
    }
}

fn parse_header(header: &str) -> Result<Vec<(String, Value)>, FormatError> {
    let entries = match serde_json::from_str::<Entries>(header) {
        Ok(Entries(entries)) => entries,
        Err(e) if e.classify() == serde_json::error::Category::Data => {
            // Valid JSON of the wrong type; say which.
            let found = match serde_json::from_str::<Value>(header) {
                Ok(v) => json_kind(&v),
                Err(e) => return Err(FormatError::HeaderNotJson(e)),
            };
            return Err(FormatError::HeaderNotObject { found });
        }
        Err(e) => return Err(FormatError::HeaderNotJson(e)),
    };
    let mut seen = std::collections::HashSet::with_capacity(entries.len());
    for (key, _) in &entries {
        if !seen.insert(key.as_str()) {
            return Err(FormatError::DuplicateKey { key: key.clone() });
        }
    }
    Ok(entries)
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_metadata(value: &Value) -> Result<BTreeMap<String, String>, FormatError> {
    let Value::Object(map) = value else {
        return Err(FormatError::BadMetadata {
            problem: format!("is {}, not an object of strings", json_kind(value)),
        });
    };
    map.iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            other => Err(FormatError::BadMetadata {
                problem: format!("value for {k:?} is {}, not a string", json_kind(other)),
            }),
        })
        .collect()
}

/// Checks one tensor entry on its own and returns its offsets.
fn check_tensor(name: &str, value: &Value, data_len: u64) -> Result<(u64, u64), FormatError> {
    let bad = |problem| FormatError::BadTensorEntry {
        tensor: name.to_owned(),
        problem,
    };
    let Value::Object(info) = value else {
        return Err(bad("entry is not an object"));
    };
    let dtype = match info.get("dtype") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(bad("dtype is not a string")),
        None => return Err(bad("no dtype")),
    };
    let shape = match info.get("shape") {
        Some(Value::Array(dims)) => dims
            .iter()
            .map(Value::as_u64)
            .collect::<Option<Vec<u64>>>()
            .ok_or_else(|| bad("shape is not a list of non-negative integers"))?,
        Some(_) => return Err(bad("shape is not a list")),
        None => return Err(bad("no shape")),
    };
    let (begin, end) = match info.get("data_offsets") {
        Some(Value::Array(pair)) => match pair.as_slice() {
            [b, e] => b
                .as_u64()
                .zip(e.as_u64())
                .ok_or_else(|| bad("data_offsets are not non-negative integers"))?,
            _ => return Err(bad("data_offsets is not a pair [begin, end]")),
        },
        Some(_) => return Err(bad("data_offsets is not a pair [begin, end]")),
        None => return Err(bad("no data_offsets")),
    };

    // The crate's own list of dtypes, so this stays in step with what it can load.
    let bits = serde_json::from_value::<safetensors::Dtype>(Value::String(dtype.to_owned()))
        .map(|d| d.bitsize() as u64)
        .map_err(|_| FormatError::UnknownDtype {
            tensor: name.to_owned(),
            dtype: dtype.to_owned(),
        })?;

    if begin > end {
        return Err(FormatError::OffsetsReversed {
            tensor: name.to_owned(),
            begin,
            end,
        });
    }
    if end > data_len {
        return Err(FormatError::OffsetOutOfRange {
            tensor: name.to_owned(),
            begin,
            end,
            data_len,
        });
    }

    let desc = |shape: Vec<u64>| {
        Box::new(TensorDesc {
            name: name.to_owned(),
            dtype: dtype.to_owned(),
            shape,
        })
    };
    let total_bits = shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .and_then(|n| n.checked_mul(bits))
        // The crate computes in usize; refuse what it would overflow on.
        .filter(|&b| usize::try_from(b).is_ok())
        .ok_or_else(|| FormatError::SizeOverflow {
            tensor: desc(shape.clone()),
        })?;
    if total_bits % 8 != 0 {
        return Err(FormatError::Misaligned {
            tensor: desc(shape),
            bits: total_bits,
        });
    }
    let expected = total_bits / 8;
    if expected != end - begin {
        return Err(FormatError::SizeMismatch {
            tensor: desc(shape),
            expected,
            actual: end - begin,
        });
    }
    Ok((begin, end))
}

/// The tensors must tile `0..data_len` exactly. Empty tensors may sit at any boundary.
fn check_coverage(spans: &mut [(u64, u64, &str)], data_len: u64) -> Result<(), FormatError> {
    spans.sort_unstable();
    // The tensor reaching furthest so far, to name it when a later one starts inside it.
    let mut furthest: Option<(u64, u64, &str)> = None;
    for &(begin, end, name) in spans.iter() {
        let covered_end = furthest.map_or(0, |(_, e, _)| e);
        if let Some((b, e, first)) = furthest.filter(|_| begin < covered_end) {
            let span = |tensor: &str, begin, end| {
                Box::new(Span {
                    tensor: tensor.to_owned(),
                    begin,
                    end,
                })
            };
            return Err(FormatError::Overlap {
                first: span(first, b, e),
                second: span(name, begin, end),
            });
        }
        if begin > covered_end {
            return Err(FormatError::Gap {
                begin: covered_end,
                end: begin,
            });
        }
        if furthest.is_none() || end > covered_end {
            furthest = Some((begin, end, name));
        }
    }
    let covered_end = furthest.map_or(0, |(_, e, _)| e);
    if covered_end < data_len {
        return Err(FormatError::TrailingBytes {
            begin: covered_end,
            end: data_len,
        });
    }
    Ok(())
}

/// True for a name ending `.safetensors` (any case): a weight file, which must pass
/// [`check_safetensors`] and which loaders stream rather than keep.
pub fn is_safetensors_name(path: &str) -> bool {
    path.to_ascii_lowercase().ends_with(".safetensors")
}

/// The policy applied to every file of a model directory. `path` is the file's relative path in it,
/// used for the name checks.
///
/// - a name [`forbidden_weight_format`] recognizes → [`FormatError::ForbiddenName`];
/// - content that sniffs as pickle, zip, GGUF, GGML, HDF5 or NumPy → [`FormatError::NotSafetensors`],
///   whatever the name (a pickle renamed `model.safetensors` is reported as pickle);
/// - a name ending `.safetensors` (any case), or content that sniffs as Safetensors under any name →
///   must pass [`check_safetensors`];
/// - anything else (`config.json`, `tokenizer.json`...) → `Ok`.
///
/// So `Ok(ContentKind::Safetensors)` always means the file was fully validated.
pub fn check_model_file(path: &str, bytes: &[u8]) -> Result<ContentKind, FormatError> {
    check_model_file_start(path, bytes, bytes.len() as u64)
}

/// [`check_model_file`] for a file being streamed: `start` is its first [`start_len`] bytes (the
/// whole file when it is that short), `file_len` its size. Judges exactly as [`check_model_file`]
/// does except that content is recognized from `start` alone.
pub fn check_model_file_start(
    path: &str,
    start: &[u8],
    file_len: u64,
) -> Result<ContentKind, FormatError> {
    if let Some(format) = forbidden_weight_format(Path::new(path)) {
        return Err(FormatError::ForbiddenName { format });
    }
    let kind = sniff(start);
    let found = match kind {
        ContentKind::Pickle { protocol } => Some(match protocol {
            0 => "pickle data (protocol 0)",
            1 => "pickle data (protocol 1)",
            2 => "pickle data (protocol 2)",
            3 => "pickle data (protocol 3)",
            4 => "pickle data (protocol 4)",
            _ => "pickle data (protocol 5)",
        }),
        ContentKind::Zip => Some("a zip archive (e.g. a PyTorch checkpoint)"),
        ContentKind::Gguf => Some("GGUF data"),
        ContentKind::Ggml => Some("GGML data"),
        ContentKind::Hdf5 => Some("HDF5 data (e.g. Keras weights)"),
        ContentKind::Numpy => Some("a NumPy array"),
        ContentKind::Safetensors | ContentKind::Other => None,
    };
    if let Some(found) = found {
        return Err(FormatError::NotSafetensors { found });
    }
    if is_safetensors_name(path) || kind == ContentKind::Safetensors {
        check_safetensors_start(start, file_len)?;
        return Ok(ContentKind::Safetensors);
    }
    Ok(kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;
    use std::collections::HashMap;

    /// A valid file from the `safetensors` crate itself: "a" F32 [2] and "b" U8 [4], with metadata.
    fn valid() -> Vec<u8> {
        let a = [0u8; 8];
        let b = [1u8, 2, 3, 4];
        let tensors = [
            (
                "a",
                TensorView::new(safetensors::Dtype::F32, vec![2], &a).expect("view a"),
            ),
            (
                "b",
                TensorView::new(safetensors::Dtype::U8, vec![4], &b).expect("view b"),
            ),
        ];
        let meta = HashMap::from([("format".to_owned(), "pt".to_owned())]);
        safetensors::serialize(tensors, Some(meta)).expect("serialize")
    }

    /// Hand-crafted file: length prefix, `header` as is, then `data_len` zero bytes.
    fn craft(header: &str, data_len: usize) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.resize(out.len() + data_len, 0);
        out
    }

    fn err(bytes: &[u8]) -> FormatError {
        check_safetensors(bytes).expect_err("should be refused")
    }

    #[test]
    fn valid_file_passes() {
        let bytes = valid();
        let info = check_safetensors(&bytes).expect("valid");
        assert_eq!(info.tensors, 2);
        assert_eq!(
            info.metadata,
            Some(BTreeMap::from([("format".to_owned(), "pt".to_owned())]))
        );
        assert_eq!(sniff(&bytes), ContentKind::Safetensors);
        assert_eq!(
            check_model_file("model.safetensors", &bytes).expect("ok"),
            ContentKind::Safetensors
        );
        assert_eq!(
            check_model_file("sub/Model.SafeTensors", &bytes).expect("ok"),
            ContentKind::Safetensors
        );
    }

    #[test]
    fn hand_crafted_valid_and_empty() {
        let h = r#"{"w":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]},"e":{"dtype":"F32","shape":[0],"data_offsets":[8,8]}}"#;
        let info = check_safetensors(&craft(h, 8)).expect("valid");
        assert_eq!(info.tensors, 2);
        assert_eq!(info.metadata, None);
        check_safetensors(&craft("{}", 0)).expect("no tensors is valid");
        // Sub-byte dtype filling whole bytes.
        let h = r#"{"q":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}"#;
        check_safetensors(&craft(h, 2)).expect("F4 x4 = 2 bytes");
    }

    #[test]
    fn short_and_bad_lengths() {
        assert!(matches!(
            err(b"\x02\x00\x00"),
            FormatError::TooShort { len: 3 }
        ));
        assert!(matches!(err(b""), FormatError::TooShort { len: 0 }));

        let mut bytes = 1_234_567u64.to_le_bytes().to_vec();
        bytes.resize(90, b' ');
        let e = err(&bytes);
        assert!(matches!(
            e,
            FormatError::HeaderBeyondFile {
                header_len: 1_234_567,
                file_len: 90
            }
        ));
        assert_eq!(
            e.to_string(),
            "header length 1234567 exceeds the file (90 bytes)"
        );

        let mut bytes = (MAX_HEADER_SIZE + 1).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        assert!(matches!(err(&bytes), FormatError::HeaderTooLarge { .. }));
        let mut bytes = u64::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        assert!(matches!(err(&bytes), FormatError::HeaderTooLarge { .. }));
    }

    #[test]
    fn header_text() {
        let mut bytes = craft("{\"a\":1}", 0);
        bytes[9] = 0xff;
        assert!(matches!(err(&bytes), FormatError::HeaderNotUtf8(_)));
        assert!(matches!(
            err(&craft("{\"w\":", 0)),
            FormatError::HeaderNotJson(_)
        ));
        assert!(matches!(
            err(&craft("{} x", 0)),
            FormatError::HeaderNotJson(_)
        ));
        assert!(matches!(err(&craft("", 0)), FormatError::HeaderNotJson(_)));
        let e = err(&craft("[1, 2]", 0));
        assert!(
            matches!(e, FormatError::HeaderNotObject { found: "an array" }),
            "{e}"
        );
        assert!(matches!(
            err(&craft("\"x\"", 0)),
            FormatError::HeaderNotObject { found: "a string" }
        ));
        assert!(matches!(err(&craft("  {}", 0)), FormatError::HeaderStart));
        // Trailing padding spaces, as the crate writes, are fine.
        check_safetensors(&craft("{}      ", 0)).expect("padded");
    }

    #[test]
    fn duplicate_keys() {
        let h = r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"w":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}"#;
        let e = err(&craft(h, 8));
        assert!(
            matches!(&e, FormatError::DuplicateKey { key } if key == "w"),
            "{e}"
        );
    }

    #[test]
    fn truncated_and_appended_data() {
        let bytes = valid();
        let e = err(&bytes[..bytes.len() - 1]);
        assert!(matches!(e, FormatError::OffsetOutOfRange { .. }), "{e}");

        let mut more = bytes.clone();
        more.extend_from_slice(b"hidden");
        let e = err(&more);
        assert!(
            matches!(e, FormatError::TrailingBytes { end, begin } if end - begin == 6),
            "{e}"
        );
    }

    #[test]
    fn offsets() {
        let h = r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[8],"data_offsets":[4,12]}}"#;
        let e = err(&craft(h, 12));
        assert!(matches!(e, FormatError::Overlap { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "tensors \"a\" and \"b\" overlap (bytes 0..8 and 4..12)"
        );

        // Identical ranges: a sort by offsets alone would call these contiguous.
        let h = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
        assert!(matches!(err(&craft(h, 4)), FormatError::Overlap { .. }));

        // Contained inside a longer tensor.
        let h = r#"{"a":{"dtype":"U8","shape":[16],"data_offsets":[0,16]},"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]},"c":{"dtype":"U8","shape":[0],"data_offsets":[16,16]}}"#;
        assert!(matches!(err(&craft(h, 16)), FormatError::Overlap { .. }));

        let h = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[8,12]}}"#;
        assert!(matches!(
            err(&craft(h, 12)),
            FormatError::Gap { begin: 4, end: 8 }
        ));
        let h = r#"{"b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}"#;
        assert!(matches!(
            err(&craft(h, 8)),
            FormatError::Gap { begin: 0, end: 4 }
        ));

        let h = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,400]}}"#;
        assert!(matches!(
            err(&craft(h, 4)),
            FormatError::OffsetOutOfRange { .. }
        ));
        let h = r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[18446744073709551615,18446744073709551615]}}"#;
        assert!(matches!(
            err(&craft(h, 0)),
            FormatError::OffsetOutOfRange { .. }
        ));

        let h = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[8,4]}}"#;
        assert!(matches!(
            err(&craft(h, 8)),
            FormatError::OffsetsReversed {
                begin: 8,
                end: 4,
                ..
            }
        ));

        for bad in [
            r#"[0]"#,
            r#"[0,1,2]"#,
            r#"[-1,4]"#,
            r#"[0,4.0]"#,
            r#"{"a":1}"#,
        ] {
            let h = format!(r#"{{"a":{{"dtype":"U8","shape":[4],"data_offsets":{bad}}}}}"#);
            assert!(
                matches!(err(&craft(&h, 4)), FormatError::BadTensorEntry { .. }),
                "{bad}"
            );
        }
    }

    #[test]
    fn dtype_and_shape() {
        let h = r#"{"w":{"dtype":"Q4","shape":[4],"data_offsets":[0,2]}}"#;
        let e = err(&craft(h, 2));
        assert!(matches!(e, FormatError::UnknownDtype { .. }), "{e}");
        assert_eq!(e.to_string(), "unknown dtype \"Q4\" for tensor \"w\"");

        let h = r#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}"#;
        let e = err(&craft(h, 20));
        assert!(
            matches!(
                e,
                FormatError::SizeMismatch {
                    expected: 24,
                    actual: 20,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "tensor \"w\" has dtype F32 and shape [2, 3] = 24 bytes, but its offsets span 20 bytes"
        );

        let h = r#"{"w":{"dtype":"F64","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}}"#;
        assert!(matches!(
            err(&craft(h, 8)),
            FormatError::SizeOverflow { .. }
        ));
        let h = r#"{"w":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,8]}}"#;
        assert!(matches!(
            err(&craft(h, 8)),
            FormatError::SizeOverflow { .. }
        ));

        let h = r#"{"w":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#;
        assert!(matches!(
            err(&craft(h, 2)),
            FormatError::Misaligned { bits: 12, .. }
        ));

        for (entry, what) in [
            (r#"[1]"#, "not object"),
            (r#"{"shape":[1],"data_offsets":[0,1]}"#, "no dtype"),
            (
                r#"{"dtype":1,"shape":[1],"data_offsets":[0,1]}"#,
                "dtype number",
            ),
            (r#"{"dtype":"U8","data_offsets":[0,1]}"#, "no shape"),
            (
                r#"{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}"#,
                "negative dim",
            ),
            (
                r#"{"dtype":"U8","shape":"1","data_offsets":[0,1]}"#,
                "shape string",
            ),
            (r#"{"dtype":"U8","shape":[1]}"#, "no offsets"),
        ] {
            let h = format!(r#"{{"w":{entry}}}"#);
            assert!(
                matches!(err(&craft(&h, 1)), FormatError::BadTensorEntry { .. }),
                "{what}"
            );
        }
    }

    #[test]
    fn metadata() {
        let t = r#""w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}"#;
        for bad in [r#"{"a":1}"#, r#"{"a":null}"#, r#"["a"]"#, r#""a""#, "null"] {
            let h = format!(r#"{{"__metadata__":{bad},{t}}}"#);
            let e = err(&craft(&h, 1));
            assert!(matches!(e, FormatError::BadMetadata { .. }), "{bad}: {e}");
        }
        let h = format!(r#"{{"__metadata__":{{"k":"v"}},{t}}}"#);
        let info = check_safetensors(&craft(&h, 1)).expect("valid");
        assert_eq!(info.tensors, 1);
        assert_eq!(info.metadata.expect("metadata")["k"], "v");
    }

    #[test]
    fn sniff_magics() {
        assert_eq!(
            sniff(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94."),
            ContentKind::Pickle { protocol: 4 }
        );
        assert_eq!(
            sniff(b"\x80\x02}q\x00."),
            ContentKind::Pickle { protocol: 2 }
        );
        assert_eq!(sniff(b"\x80\x05N."), ContentKind::Pickle { protocol: 5 });
        assert_eq!(sniff(b"\x80\x06N."), ContentKind::Other);
        assert_eq!(
            sniff(b"(dp0\nS'a'\np1\nI1\ns."),
            ContentKind::Pickle { protocol: 0 }
        );
        assert_eq!(sniff(b"(lp1\nI1\na."), ContentKind::Pickle { protocol: 0 });
        assert_eq!(
            sniff(b"}q\x00(U\x01aK\x01u."),
            ContentKind::Pickle { protocol: 1 }
        );
        assert_eq!(sniff(b"]q\x01."), ContentKind::Pickle { protocol: 1 });
        assert_eq!(
            sniff(b"ccopy_reg\n_reconstructor\np0\n"),
            ContentKind::Pickle { protocol: 0 }
        );
        assert_eq!(
            sniff(b"cmymod.sub\nThing\n(tR."),
            ContentKind::Pickle { protocol: 0 }
        );
        assert_eq!(
            sniff(b"PK\x03\x04\x14\x00\x00\x00\x08\x00"),
            ContentKind::Zip
        );
        assert_eq!(sniff(b"PK\x05\x06\x00\x00\x00\x00"), ContentKind::Zip);
        assert_eq!(sniff(b"GGUF\x03\x00\x00\x00"), ContentKind::Gguf);
        assert_eq!(sniff(&0x6767_6d6c_u32.to_le_bytes()), ContentKind::Ggml);
        assert_eq!(sniff(&0x6767_6a74_u32.to_le_bytes()), ContentKind::Ggml);
        assert_eq!(sniff(&0x6767_6d66_u32.to_le_bytes()), ContentKind::Ggml);
        assert_eq!(sniff(b"\x89HDF\r\n\x1a\n\x00"), ContentKind::Hdf5);
        assert_eq!(sniff(b"\x93NUMPY\x01\x00v\x00"), ContentKind::Numpy);

        // Text must stay Other.
        for text in [
            &b"{\"architectures\": [\"LlamaForCausalLM\"]}"[..],
            b"[1, 2, 3]",
            b"\"x\"",
            b"",
            b"c",
            b"cat\ndog\nbird",
            b"# Model card\n",
            b"(dp)",
            b"{% for m in messages %}",
            b"\n\x0e\n\x05<unk>",
        ] {
            assert_eq!(
                sniff(text),
                ContentKind::Other,
                "{:?}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn safetensors_header_len_looking_like_pickle_magic() {
        // A header of 1152 bytes starts `80 04 00 ...`: it must not be taken for pickle protocol 4.
        let mut h = r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#.to_owned();
        h.push_str(&" ".repeat(1152 - h.len()));
        let bytes = craft(&h, 1);
        assert_eq!(&bytes[..2], b"\x80\x04");
        assert_eq!(sniff(&bytes), ContentKind::Safetensors);
        check_model_file("model.safetensors", &bytes).expect("valid");
    }

    #[test]
    fn model_file_policy() {
        let pickle = b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94.";
        let e = check_model_file("model.safetensors", pickle).expect_err("pickle");
        assert!(matches!(
            e,
            FormatError::NotSafetensors {
                found: "pickle data (protocol 4)"
            }
        ));
        assert!(e.to_string().contains("pickle"), "{e}");
        for (name, bytes) in [
            ("model.safetensors", &b"PK\x03\x04\x14\x00\x00\x00"[..]),
            ("weights.dat", b"GGUF\x03\x00\x00\x00"),
            ("config.json", b"\x89HDF\r\n\x1a\n"),
        ] {
            let e = check_model_file(name, bytes).expect_err(name);
            assert!(
                matches!(e, FormatError::NotSafetensors { .. }),
                "{name}: {e}"
            );
        }
        let e = check_model_file("pytorch_model.bin", b"{}").expect_err("bin");
        assert!(matches!(
            e,
            FormatError::ForbiddenName {
                format: "a pickle file (PyTorch .bin)"
            }
        ));

        let json = br#"{"model_type": "llama", "vocab_size": 32000}"#;
        assert_eq!(
            check_model_file("config.json", json).expect("json"),
            ContentKind::Other
        );
        assert_eq!(
            check_model_file("tokenizer.model", b"\n\x0e\n\x05<unk>").expect("spm"),
            ContentKind::Other
        );
        // A .safetensors name with other content gets the precise header error.
        assert!(matches!(
            check_model_file("model.safetensors", b"hello world, plain text").expect_err("text"),
            FormatError::HeaderTooLarge { .. } | FormatError::HeaderBeyondFile { .. }
        ));
        // Safetensors content under another name is validated too.
        let mut bad = valid();
        bad.push(0);
        assert!(matches!(
            check_model_file("weights.data", &bad).expect_err("appended"),
            FormatError::TrailingBytes { .. }
        ));
    }

    #[test]
    fn error_stays_small() {
        // It is embedded in the caller's errors; clippy's result_large_err starts at 128 bytes.
        assert!(std::mem::size_of::<FormatError>() <= 56);
    }

    #[test]
    fn forbidden_names() {
        let f = |p: &str| forbidden_weight_format(Path::new(p));
        for p in [
            "pytorch_model.bin",
            "x.PT",
            "a/b.pth",
            "m.ckpt",
            "m.pkl",
            "m.pickle",
            "m.joblib",
            "m.gguf",
            "m.ggml",
            "m.ggjt",
            "m.onnx",
            "m.h5",
            "m.hdf5",
            "m.keras",
            "flax_model.msgpack",
            "m.npy",
            "m.npz",
            "saved_model.pb",
            "m.tflite",
            "m.mlmodel",
            "m.pdparams",
            "m.nemo",
            "m.tar",
            "m.tar.gz",
            "m.TGZ",
            "m.zip",
            "model.ckpt.index",
            "variables.data-00000-of-00001",
            "model.safetensors.bin",
        ] {
            assert!(f(p).is_some(), "{p}");
        }
        assert_eq!(f("x.BIN"), Some("a pickle file (PyTorch .bin)"));
        assert_eq!(f("x.pt"), Some("a PyTorch checkpoint (.pt)"));
        assert_eq!(f("x.gguf"), Some("a GGUF file"));
        assert_eq!(f("x.onnx"), Some("an ONNX model"));
        for p in [
            "model.safetensors",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "config.json",
            "merges.txt",
            "tokenizer.model",
            "chat_template.jinja",
            "README.md",
            "LICENSE",
            ".gitattributes",
            "",
        ] {
            assert_eq!(f(p), None, "{p}");
        }
    }

    #[test]
    fn never_panics_on_corruption() {
        let bytes = valid();
        let header_end = LEN_PREFIX + header_len(&bytes).expect("len") as usize;
        for i in 0..header_end {
            for v in 0..=255u8 {
                let mut b = bytes.clone();
                b[i] = v;
                let _ = check_safetensors(&b);
                let _ = check_model_file("model.safetensors", &b);
                let _ = sniff(&b);
            }
        }
        for len in 0..=bytes.len() {
            let cut = &bytes[..len];
            let r = check_safetensors(cut);
            assert_eq!(r.is_ok(), len == bytes.len(), "truncated at {len}");
            let _ = check_model_file("model.safetensors", cut);
            let _ = sniff(cut);
        }
    }

    #[test]
    fn agrees_with_the_crate_when_accepting() {
        // Whatever we accept after a byte flip, the crate must accept too (the backstop guarantees it,
        // but a Rejected here would show a check missing above).
        let bytes = valid();
        let header_end = LEN_PREFIX + header_len(&bytes).expect("len") as usize;
        for i in 0..header_end {
            for v in [b'0', b'1', b'9', b' ', b'"', b'{', b'}', b',', b'U', b'F'] {
                let mut b = bytes.clone();
                b[i] = v;
                if let Err(FormatError::Rejected { reason }) = check_safetensors(&b) {
                    panic!("flip {i}={v}: only the crate caught it: {reason}");
                }
            }
        }
    }
}
