//! `sanctum import gguf`: turns a Llama-architecture GGUF file into a Hugging Face–layout Safetensors
//! directory (`model.safetensors`, `config.json`, `tokenizer.json`, `tokenizer_config.json`).
//!
//! The conversion is deterministic: the same input gives the same bytes on every run and every
//! machine, so the lock can pin the outputs' digests. It is lossless: quantized matrices keep their
//! ggml blocks as they are, as `U8` tensors in the layout of docs/quantized-safetensors.md (a
//! 98 MB Q4_1 file stays about that size), and f32/f16/bf16 tensors keep their type. Tensors are
//! renamed to the Hugging Face names, and the rows of `q_proj` / `k_proj` are put back in Hugging
//! Face's order (llama.cpp's converter permutes them for its RoPE layout; rows are whole runs of
//! blocks, so this moves bytes and changes no value).
//!
//! Tensors are read one at a time while `model.safetensors` is written, so memory stays near the
//! size of the largest tensor. The output appears at `out_dir` by one rename of a fully written,
//! fsynced temporary directory: on any error nothing is left there.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use attest::Sha256Digest;
use attest::statement::f32_as_decimal;
use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::{DType, Device, Tensor};
use safetensors::Dtype;
use serde::Serialize;

use super::gguf_tokenizer;
use crate::models::config::ModelConfig;
use crate::staging::{self, Staging};
use crate::weights::{Stored, StoredTensor, block_type_name, safetensors_header};

/// Name of the weights file written by the import.
pub const MODEL_FILE: &str = "model.safetensors";
/// Name of the model configuration written by the import.
pub const CONFIG_FILE: &str = "config.json";
/// Name of the tokenizer written by the import.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Name of the tokenizer configuration (chat template, special tokens) written by the import.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// One file the import produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedFile {
    /// Path relative to the output directory, e.g. `model.safetensors`.
    pub path: String,
    /// SHA-256 of the file's bytes.
    pub sha256: Sha256Digest,
    /// Size in bytes.
    pub size: u64,
}

impl ImportedFile {
    /// Its `[[model.file]]` entry.
    pub fn locked(&self) -> attest::lockfile::LockedFile {
        attest::lockfile::LockedFile {
            path: self.path.clone(),
            sha256: self.sha256,
            size: self.size,
        }
    }
}

/// What [`import_gguf`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufImport {
    /// The GGUF's `general.architecture` (always `"llama"` today).
    pub architecture: String,
    /// The files written, sorted by path.
    pub files: Vec<ImportedFile>,
    /// SHA-256 of the GGUF file read.
    pub input_sha256: Sha256Digest,
    /// Number of tensors written to `model.safetensors`.
    pub tensors: usize,
}

/// Why a GGUF could not be imported.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// The file does not start with the GGUF magic.
    #[error("{}: not a GGUF file ({problem})", path.display())]
    NotGguf {
        /// The input file.
        path: PathBuf,
        /// What was found instead.
        problem: String,
    },
    /// The file starts like a GGUF but cannot be read: truncated or corrupt.
    #[error("{}: truncated or malformed GGUF: {problem}", path.display())]
    Malformed {
        /// The input file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// `general.architecture` is not one this import converts.
    #[error("{}: unsupported architecture {architecture:?} (only llama)", path.display())]
    UnsupportedArchitecture {
        /// The input file.
        path: PathBuf,
        /// The architecture found.
        architecture: String,
    },
    /// A required metadata key is absent.
    #[error("{}: missing metadata key {key}", path.display())]
    MissingMetadata {
        /// The input file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A metadata value has the wrong type or an impossible value.
    #[error("{}: metadata key {key}: {problem}", path.display())]
    BadMetadata {
        /// The input file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A tensor the model needs is absent.
    #[error("{}: missing tensor {tensor}", path.display())]
    MissingTensor {
        /// The input file.
        path: PathBuf,
        /// The GGUF tensor name.
        tensor: String,
    },
    /// A tensor this import does not know what to do with (rather than silently dropping it).
    #[error("{}: unexpected tensor {tensor} (not part of a plain llama model)", path.display())]
    UnexpectedTensor {
        /// The input file.
        path: PathBuf,
        /// The GGUF tensor name.
        tensor: String,
    },
    /// A tensor's shape disagrees with the model's hyperparameters.
    #[error("{}: tensor {tensor} has shape {found:?}, expected {expected:?}", path.display())]
    TensorShape {
        /// The input file.
        path: PathBuf,
        /// The GGUF tensor name.
        tensor: String,
        /// Shape implied by the metadata (row-major, outermost first).
        expected: Vec<usize>,
        /// Shape found.
        found: Vec<usize>,
    },
    /// A tensor could not be read or dequantized.
    #[error("{}: tensor {tensor}: {problem}", path.display())]
    Tensor {
        /// The input file.
        path: PathBuf,
        /// The GGUF tensor name.
        tensor: String,
        /// What went wrong.
        problem: String,
    },
    /// A model feature this import does not convert (yet).
    #[error("{}: unsupported: {problem}", path.display())]
    Unsupported {
        /// The input file.
        path: PathBuf,
        /// What is unsupported.
        problem: String,
    },
    /// `tokenizer.ggml.model` is not byte-level BPE.
    #[error(
        "{}: unsupported tokenizer model {model:?} (tokenizer.ggml.model; only \"gpt2\", byte-level BPE)",
        path.display()
    )]
    UnsupportedTokenizer {
        /// The input file.
        path: PathBuf,
        /// The tokenizer model found.
        model: String,
    },
    /// `tokenizer.ggml.pre` names a pre-tokenizer with no exact Hugging Face equivalent here.
    #[error(
        "{}: unsupported pre-tokenizer {pre:?} (tokenizer.ggml.pre; supported: {})",
        path.display(),
        gguf_tokenizer::SUPPORTED_PRE.join(", ")
    )]
    UnsupportedPreTokenizer {
        /// The input file.
        path: PathBuf,
        /// The pre-tokenizer named, or `(missing)`.
        pre: String,
    },
    /// The tokenizer metadata is inconsistent (e.g. a merge of tokens not in the vocabulary).
    #[error("{}: cannot build tokenizer.json: {problem}", path.display())]
    Tokenizer {
        /// The input file.
        path: PathBuf,
        /// What went wrong.
        problem: String,
    },
    /// The output directory already holds something.
    #[error("output directory {} exists and is not empty", path.display())]
    OutDirNotEmpty {
        /// The output directory.
        path: PathBuf,
    },
    /// Reading the input or writing the output failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImportError + '_ {
    move |source| ImportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Converts a Llama-architecture GGUF into a Hugging Face–layout Safetensors directory, deterministically.
///
/// `out_dir` must not exist or be an empty directory; its parent is created if needed. The files are
/// written to a temporary directory next to `out_dir`, fsynced, and renamed into place.
pub fn import_gguf(input: &Path, out_dir: &Path) -> Result<GgufImport, ImportError> {
    check_out_dir(out_dir)?;

    let file = attest::files::open_regular(input).map_err(io_err(input))?;
    let (input_sha256, file_len) =
        Sha256Digest::of_reader(BufReader::new(&file)).map_err(io_err(input))?;
    let mut reader = BufReader::new(file);
    let content = read_content(input, &mut reader, file_len)?;
    let Content {
        metadata,
        tensor_infos,
        tensor_data_offset,
        ..
    } = content;

    let meta = Meta {
        path: input,
        map: &metadata,
    };
    let architecture = meta.string("general.architecture")?;
    if architecture != "llama" {
        return Err(ImportError::UnsupportedArchitecture {
            path: input.to_path_buf(),
            architecture,
        });
    }
    let hp = Hparams::read(&meta)?;
    let plan = plan_tensors(input, &hp, &tensor_infos)?;
    let vocab_size = plan[0].shape[0]; // model.embed_tokens: [vocab, hidden]
    let tie_word_embeddings = !plan.iter().any(|t| t.hf == "lm_head.weight");

    let tokenizer = gguf_tokenizer::build(&meta, vocab_size, hp.context_length)?;
    let config = json_bytes(&LlamaConfig {
        architectures: ["LlamaForCausalLM"],
        attention_bias: false,
        bos_token_id: tokenizer.bos_token_id,
        eos_token_id: tokenizer.eos_token_id,
        head_dim: hp.head_dim,
        hidden_act: "silu",
        hidden_size: hp.hidden,
        intermediate_size: hp.ffn,
        max_position_embeddings: hp.context_length,
        mlp_bias: false,
        model_type: "llama",
        num_attention_heads: hp.n_head,
        num_hidden_layers: hp.n_layer,
        num_key_value_heads: hp.n_head_kv,
        rms_norm_eps: hp.rms_norm_eps,
        rope_theta: hp.rope_theta,
        tie_word_embeddings,
        torch_dtype: "float32",
        vocab_size,
    });
    drop(metadata);
    check_config(input, &config)?;

    // Everything is known to be convertible; now write.
    let staging = staging_dir(out_dir, staging::IMPORT)?;
    let dir = staging.path();
    let mut files = vec![
        write_bytes(dir, CONFIG_FILE, &config)?,
        write_bytes(dir, TOKENIZER_FILE, &tokenizer.tokenizer_json)?,
        write_bytes(dir, TOKENIZER_CONFIG_FILE, &tokenizer.tokenizer_config_json)?,
    ];
    drop(tokenizer);

    let mut source = TensorSource {
        path: input,
        reader,
        infos: &tensor_infos,
        data_offset: tensor_data_offset,
    };
    let model_path = dir.join(MODEL_FILE);
    write_safetensors(&model_path, &plan, &mut source)?;
    files.push(hash_and_sync(dir, MODEL_FILE)?);
    files.sort_by(|a, b| a.path.cmp(&b.path));

    publish(staging, out_dir)?;
    Ok(GgufImport {
        architecture,
        files,
        input_sha256,
        tensors: plan.len(),
    })
}

/// Refuses to write a `config.json` that loading would refuse (the same [`ModelConfig`] rules).
fn check_config(input: &Path, config: &[u8]) -> Result<(), ImportError> {
    let parsed: Result<crate::models::llama::Config, String> =
        serde_json::from_slice(config).map_err(|e| e.to_string());
    parsed
        .and_then(|c| c.validate().map_err(|e| e.to_string()))
        .map_err(|problem| ImportError::Malformed {
            path: input.to_path_buf(),
            problem: format!("the config.json it converts to is invalid: {problem}"),
        })
}

/// Refuses an `out_dir` that exists and is not an empty directory.
pub(crate) fn check_out_dir(out_dir: &Path) -> Result<(), ImportError> {
    match fs::read_dir(out_dir) {
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(Ok(_)) => Err(ImportError::OutDirNotEmpty {
                path: out_dir.to_path_buf(),
            }),
            Some(Err(e)) => Err(io_err(out_dir)(e)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) if out_dir.exists() && !out_dir.is_dir() => Err(ImportError::OutDirNotEmpty {
            path: out_dir.to_path_buf(),
        }),
        Err(e) => Err(io_err(out_dir)(e)),
    }
}

/// Checks the header's structure ([`attest::gguf::read_header`]: counts, lengths, alignment, each
/// tensor's bytes inside the file and apart from the others), then parses it with candle, which
/// trusts what it reads.
fn read_content(
    input: &Path,
    reader: &mut BufReader<File>,
    file_len: u64,
) -> Result<Content, ImportError> {
    if file_len < 4 {
        return Err(ImportError::NotGguf {
            path: input.to_path_buf(),
            problem: "shorter than the 4-byte magic".into(),
        });
    }
    reader.seek(SeekFrom::Start(0)).map_err(io_err(input))?;
    let malformed = |problem: String| ImportError::Malformed {
        path: input.to_path_buf(),
        problem,
    };
    match attest::gguf::read_header(&mut *reader, file_len) {
        Ok(_) => {}
        Err(attest::gguf::GgufError::Magic) => {
            return Err(ImportError::NotGguf {
                path: input.to_path_buf(),
                problem: "it does not start with \"GGUF\"".into(),
            });
        }
        Err(attest::gguf::GgufError::Io(e)) => return Err(io_err(input)(e)),
        Err(e) => return Err(malformed(e.to_string())),
    }
    reader.seek(SeekFrom::Start(0)).map_err(io_err(input))?;
    Content::read(reader).map_err(|e| malformed(e.to_string()))
}

/// Typed access to the GGUF metadata, with errors naming the file and key.
pub(crate) struct Meta<'a> {
    pub(crate) path: &'a Path,
    map: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }

    fn missing(&self, key: &str) -> ImportError {
        ImportError::MissingMetadata {
            path: self.path.to_path_buf(),
            key: key.to_owned(),
        }
    }

    pub(crate) fn bad(&self, key: &str, problem: impl Into<String>) -> ImportError {
        ImportError::BadMetadata {
            path: self.path.to_path_buf(),
            key: key.to_owned(),
            problem: problem.into(),
        }
    }

    pub(crate) fn opt_u64(&self, key: &str) -> Result<Option<u64>, ImportError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n = match *v {
            Value::U8(n) => Some(u64::from(n)),
            Value::U16(n) => Some(u64::from(n)),
            Value::U32(n) => Some(u64::from(n)),
            Value::U64(n) => Some(n),
            Value::I8(n) => u64::try_from(n).ok(),
            Value::I16(n) => u64::try_from(n).ok(),
            Value::I32(n) => u64::try_from(n).ok(),
            Value::I64(n) => u64::try_from(n).ok(),
            _ => {
                return Err(self.bad(
                    key,
                    format!("expected an unsigned integer, found {}", describe(v)),
                ));
            }
        };
        n.map(Some)
            .ok_or_else(|| self.bad(key, "expected an unsigned integer, found a negative one"))
    }

    pub(crate) fn u64(&self, key: &str) -> Result<u64, ImportError> {
        self.opt_u64(key)?.ok_or_else(|| self.missing(key))
    }

    /// A count or size, which must be positive and fit in memory.
    fn positive(&self, key: &str) -> Result<usize, ImportError> {
        match usize::try_from(self.u64(key)?) {
            Ok(0) => Err(self.bad(key, "must be positive")),
            Ok(n) => Ok(n),
            Err(_) => Err(self.bad(key, "too large")),
        }
    }

    fn opt_f32(&self, key: &str) -> Result<Option<f32>, ImportError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x)),
            #[allow(clippy::cast_possible_truncation)]
            Some(Value::F64(x)) => Ok(Some(*x as f32)),
            Some(v) => Err(self.bad(key, format!("expected a float, found {}", describe(v)))),
        }
    }

    pub(crate) fn opt_bool(&self, key: &str) -> Result<Option<bool>, ImportError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.bad(key, format!("expected a bool, found {}", describe(v)))),
        }
    }

    pub(crate) fn opt_string(&self, key: &str) -> Result<Option<String>, ImportError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.bad(key, format!("expected a string, found {}", describe(v)))),
        }
    }

    pub(crate) fn string(&self, key: &str) -> Result<String, ImportError> {
        self.opt_string(key)?.ok_or_else(|| self.missing(key))
    }

    pub(crate) fn opt_array(&self, key: &str) -> Result<Option<&[Value]>, ImportError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.bad(key, format!("expected an array, found {}", describe(v)))),
        }
    }

    pub(crate) fn array(&self, key: &str) -> Result<&[Value], ImportError> {
        self.opt_array(key)?.ok_or_else(|| self.missing(key))
    }
}

/// A short description of a metadata value's type, for errors.
pub(crate) fn describe(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("an array of {}", a.len()),
        Value::String(_) => "a string".into(),
        other => format!("{:?}", other.value_type()),
    }
}

/// The hyperparameters read from `llama.*` metadata.
struct Hparams {
    hidden: usize,
    n_layer: usize,
    ffn: usize,
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
    context_length: usize,
    rms_norm_eps: f64,
    rope_theta: f64,
}

impl Hparams {
    fn read(meta: &Meta<'_>) -> Result<Self, ImportError> {
        let unsupported = |problem: String| ImportError::Unsupported {
            path: meta.path.to_path_buf(),
            problem,
        };
        let hidden = meta.positive("llama.embedding_length")?;
        let n_layer = meta.positive("llama.block_count")?;
        let ffn = meta.positive("llama.feed_forward_length")?;
        let n_head = meta.positive("llama.attention.head_count")?;
        let n_head_kv = match meta.get("llama.attention.head_count_kv") {
            None => n_head,
            Some(_) => meta.positive("llama.attention.head_count_kv")?,
        };
        let context_length = meta.positive("llama.context_length")?;
        let eps_key = "llama.attention.layer_norm_rms_epsilon";
        let eps = meta
            .opt_f32(eps_key)?
            .ok_or_else(|| meta.missing(eps_key))?;
        if !(eps.is_finite() && eps > 0.0) {
            return Err(meta.bad(eps_key, format!("must be a positive number, found {eps}")));
        }
        let theta_key = "llama.rope.freq_base";
        let theta = meta.opt_f32(theta_key)?.unwrap_or(10_000.0);
        if !(theta.is_finite() && theta > 0.0) {
            return Err(meta.bad(
                theta_key,
                format!("must be a positive number, found {theta}"),
            ));
        }
        if !hidden.is_multiple_of(n_head) || !(hidden / n_head).is_multiple_of(2) {
            return Err(meta.bad(
                "llama.attention.head_count",
                format!(
                    "{n_head} heads do not split embedding_length {hidden} into even head sizes"
                ),
            ));
        }
        if !n_head.is_multiple_of(n_head_kv) {
            return Err(meta.bad(
                "llama.attention.head_count_kv",
                format!("{n_head_kv} is not a divisor of head_count {n_head}"),
            ));
        }
        let head_dim = hidden / n_head;
        for key in [
            "llama.attention.key_length",
            "llama.attention.value_length",
            "llama.rope.dimension_count",
        ] {
            if let Some(n) = meta.opt_u64(key)?
                && n != head_dim as u64
            {
                return Err(unsupported(format!(
                    "{key} = {n} differs from the head size {head_dim} (embedding_length / head_count)"
                )));
            }
        }
        if let Some(n) = meta.opt_u64("llama.expert_count")?
            && n > 0
        {
            return Err(unsupported(format!(
                "mixture of experts (llama.expert_count = {n})"
            )));
        }
        if let Some(kind) = meta.opt_string("llama.rope.scaling.type")?
            && kind != "none"
        {
            return Err(unsupported(format!(
                "RoPE scaling {kind:?} (llama.rope.scaling.type)"
            )));
        }
        Ok(Self {
            hidden,
            n_layer,
            ffn,
            n_head,
            n_head_kv,
            head_dim,
            context_length,
            rms_norm_eps: f32_as_decimal(eps),
            rope_theta: f32_as_decimal(theta),
        })
    }
}

/// One tensor to write: where it comes from, its Hugging Face name and shape.
struct PlannedTensor {
    gguf: String,
    hf: String,
    /// Hugging Face shape, outermost first (candle reports GGUF shapes in the same order).
    shape: Vec<usize>,
    /// `Some(n_head)` for q/k: undo llama.cpp's rotary row permutation with that many heads.
    unpermute_heads: Option<usize>,
    /// How it is written: its GGUF type, or f32 for what has no Safetensors form.
    form: Form,
}

/// A GGUF tensor's form in `model.safetensors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// Values of this float type, as in the GGUF.
    Float(Dtype),
    /// A matrix's raw ggml blocks.
    Blocks(GgmlDType),
    /// Dequantized to f32: quantized tensors that are not matrices.
    Dequantized,
}

impl PlannedTensor {
    /// The tensor as `model.safetensors` holds it.
    fn written(&self) -> StoredTensor {
        let stored = match self.form {
            Form::Float(dtype) => Stored::Values(dtype),
            Form::Blocks(t) => Stored::Blocks(t),
            Form::Dequantized => Stored::Values(Dtype::F32),
        };
        StoredTensor {
            name: self.hf.clone(),
            shape: self.shape.clone(),
            stored,
        }
    }
}

/// Maps every GGUF tensor to its Hugging Face name and checks shapes. The first entry is the embedding.
fn plan_tensors(
    input: &Path,
    hp: &Hparams,
    infos: &HashMap<String, TensorInfo>,
) -> Result<Vec<PlannedTensor>, ImportError> {
    let (h, f, q, kv) = (
        hp.hidden,
        hp.ffn,
        hp.n_head * hp.head_dim,
        hp.n_head_kv * hp.head_dim,
    );
    let mut plan = Vec::with_capacity(infos.len());
    let mut add = |gguf: String,
                   hf: String,
                   shape: Vec<usize>,
                   unpermute_heads: Option<usize>,
                   required: bool| {
        let Some(info) = infos.get(&gguf) else {
            return if required {
                Err(ImportError::MissingTensor {
                    path: input.to_path_buf(),
                    tensor: gguf,
                })
            } else {
                Ok(())
            };
        };
        let found = info.shape.dims().to_vec();
        // The vocabulary size is whatever the embedding has (0 here stands for "any").
        let matches =
            found.len() == shape.len() && found.iter().zip(&shape).all(|(a, b)| *b == 0 || a == b);
        if !matches {
            let expected = shape
                .iter()
                .zip(&found)
                .map(|(b, a)| if *b == 0 { *a } else { *b })
                .collect();
            return Err(ImportError::TensorShape {
                path: input.to_path_buf(),
                tensor: gguf,
                expected,
                found,
            });
        }
        let form = match info.ggml_dtype {
            GgmlDType::F32 => Form::Float(Dtype::F32),
            GgmlDType::F16 => Form::Float(Dtype::F16),
            GgmlDType::BF16 => Form::Float(Dtype::BF16),
            t if found.len() == 2 && block_type_name(t).is_some() => Form::Blocks(t),
            _ => Form::Dequantized,
        };
        plan.push(PlannedTensor {
            gguf,
            hf,
            shape: found,
            unpermute_heads,
            form,
        });
        Ok(())
    };
    add(
        "token_embd.weight".into(),
        "model.embed_tokens.weight".into(),
        vec![0, h],
        None,
        true,
    )?;
    for n in 0..hp.n_layer {
        let layer: [(&str, &str, Vec<usize>, Option<usize>); 9] = [
            ("attn_norm", "input_layernorm", vec![h], None),
            ("attn_q", "self_attn.q_proj", vec![q, h], Some(hp.n_head)),
            (
                "attn_k",
                "self_attn.k_proj",
                vec![kv, h],
                Some(hp.n_head_kv),
            ),
            ("attn_v", "self_attn.v_proj", vec![kv, h], None),
            ("attn_output", "self_attn.o_proj", vec![h, q], None),
            ("ffn_norm", "post_attention_layernorm", vec![h], None),
            ("ffn_gate", "mlp.gate_proj", vec![f, h], None),
            ("ffn_up", "mlp.up_proj", vec![f, h], None),
            ("ffn_down", "mlp.down_proj", vec![h, f], None),
        ];
        for (gguf, hf, shape, unpermute) in layer {
            add(
                format!("blk.{n}.{gguf}.weight"),
                format!("model.layers.{n}.{hf}.weight"),
                shape,
                unpermute,
                true,
            )?;
        }
    }
    add(
        "output_norm.weight".into(),
        "model.norm.weight".into(),
        vec![h],
        None,
        true,
    )?;
    // Present with rank 2: checked by the first `add`.
    let vocab = infos["token_embd.weight"].shape.dims()[0];
    add(
        "output.weight".into(),
        "lm_head.weight".into(),
        vec![vocab, h],
        None,
        false,
    )?;

    if plan.len() != infos.len() {
        let known: std::collections::HashSet<&str> = plan.iter().map(|t| t.gguf.as_str()).collect();
        let mut unknown: Vec<&String> = infos
            .keys()
            .filter(|k| !known.contains(k.as_str()))
            .collect();
        unknown.sort();
        return Err(ImportError::UnexpectedTensor {
            path: input.to_path_buf(),
            tensor: unknown.first().map(|s| s.to_string()).unwrap_or_default(),
        });
    }
    Ok(plan)
}

/// The open GGUF, read one tensor at a time while `model.safetensors` is written.
struct TensorSource<'a> {
    path: &'a Path,
    reader: BufReader<File>,
    infos: &'a HashMap<String, TensorInfo>,
    data_offset: u64,
}

impl TensorSource<'_> {
    /// Reads one tensor and returns its bytes as stored (raw blocks or values; f32 for the
    /// dequantized), with q/k rows un-permuted.
    fn load(&mut self, plan: &PlannedTensor) -> Result<Vec<u8>, ImportError> {
        let tensor_err = |e: candle_core::Error| ImportError::Tensor {
            path: self.path.to_path_buf(),
            tensor: plan.gguf.clone(),
            problem: e.to_string(),
        };
        let info = &self.infos[&plan.gguf];
        let qtensor = info
            .read(&mut self.reader, self.data_offset, &Device::Cpu)
            .map_err(tensor_err)?;
        if plan.form != Form::Dequantized {
            let mut bytes = qtensor.data().map_err(tensor_err)?.into_owned();
            if let Some(n_head) = plan.unpermute_heads {
                let rows = plan.shape[0];
                bytes = unpermute_row_bytes(&bytes, rows, n_head);
            }
            return Ok(bytes);
        }
        let mut tensor = qtensor.dequantize(&Device::Cpu).map_err(tensor_err)?;
        drop(qtensor);
        if tensor.dtype() != DType::F32 {
            tensor = tensor.to_dtype(DType::F32).map_err(tensor_err)?;
        }
        if let Some(n_head) = plan.unpermute_heads {
            tensor = unpermute_rows(&tensor, n_head).map_err(tensor_err)?;
        }
        let values: Vec<f32> = tensor
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .map_err(tensor_err)?;
        drop(tensor);
        Ok(f32_le_bytes(&values))
    }
}

/// Writes `model.safetensors`: the header ([`safetensors_header`]), then each tensor's bytes in
/// plan order, read one at a time.
fn write_safetensors(
    path: &Path,
    plan: &[PlannedTensor],
    source: &mut TensorSource<'_>,
) -> Result<(), ImportError> {
    let layout: Vec<StoredTensor> = plan.iter().map(PlannedTensor::written).collect();
    let mut out = io::BufWriter::new(File::create(path).map_err(io_err(path))?);
    out.write_all(&safetensors_header(&layout))
        .map_err(io_err(path))?;
    for (t, written) in plan.iter().zip(&layout) {
        let bytes = source.load(t)?;
        if bytes.len() != written.byte_len() {
            return Err(ImportError::Tensor {
                path: source.path.to_path_buf(),
                tensor: t.gguf.clone(),
                problem: format!(
                    "{} bytes read, {} expected",
                    bytes.len(),
                    written.byte_len()
                ),
            });
        }
        out.write_all(&bytes).map_err(io_err(path))?;
    }
    out.flush().map_err(io_err(path))
}

/// Little-endian bytes of `values`: one copy (a per-element loop is slow in debug builds).
#[cfg(target_endian = "little")]
fn f32_le_bytes(values: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(values).to_vec()
}

/// Little-endian bytes of `values`.
#[cfg(not(target_endian = "little"))]
fn f32_le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Undoes llama.cpp's `permute` of q/k rows (`reshape(n_head, 2, hd/2, cols).swapaxes(1, 2)`): view the
/// `[rows, cols]` matrix as `[n_head, head_dim/2, 2, cols]`, swap dims 1 and 2, reshape back.
fn unpermute_rows(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    w.reshape((n_head, rows / n_head / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// [`unpermute_rows`] on raw rows (`rows` equal runs of bytes): output row `h·hd + a·hd/2 + b`
/// is input row `h·hd + 2b + a`.
fn unpermute_row_bytes(bytes: &[u8], rows: usize, n_head: usize) -> Vec<u8> {
    let row = bytes.len() / rows.max(1);
    let hd = rows / n_head.max(1);
    let mut out = Vec::with_capacity(bytes.len());
    for o in 0..rows {
        let (h, r) = (o / hd, o % hd);
        let (a, b) = (r / (hd / 2), r % (hd / 2));
        let i = h * hd + 2 * b + a;
        out.extend_from_slice(&bytes[i * row..(i + 1) * row]);
    }
    out
}

/// `config.json`, fields in alphabetical order as transformers writes them.
#[derive(Serialize)]
struct LlamaConfig {
    architectures: [&'static str; 1],
    attention_bias: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    bos_token_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    eos_token_id: Option<u32>,
    head_dim: usize,
    hidden_act: &'static str,
    hidden_size: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    mlp_bias: bool,
    model_type: &'static str,
    num_attention_heads: usize,
    num_hidden_layers: usize,
    num_key_value_heads: usize,
    rms_norm_eps: f64,
    rope_theta: f64,
    tie_word_embeddings: bool,
    torch_dtype: &'static str,
    vocab_size: usize,
}

/// Pretty JSON with a trailing newline. Only structs and BTreeMaps are serialized, so the key order
/// never depends on hashing.
pub(crate) fn json_bytes(value: &impl Serialize) -> Vec<u8> {
    let mut bytes =
        serde_json::to_vec_pretty(value).expect("serializing plain data to JSON cannot fail");
    bytes.push(b'\n');
    bytes
}

/// Writes `bytes` to `dir/name`, fsyncs it, and returns its digest.
pub(crate) fn write_bytes(
    dir: &Path,
    name: &str,
    bytes: &[u8],
) -> Result<ImportedFile, ImportError> {
    let path = dir.join(name);
    let mut file = File::create(&path).map_err(io_err(&path))?;
    file.write_all(bytes).map_err(io_err(&path))?;
    file.sync_all().map_err(io_err(&path))?;
    Ok(ImportedFile {
        path: name.to_owned(),
        sha256: Sha256Digest::of(bytes),
        size: bytes.len() as u64,
    })
}

/// Re-reads `dir/name` for its digest and fsyncs it.
pub(crate) fn hash_and_sync(dir: &Path, name: &str) -> Result<ImportedFile, ImportError> {
    let path = dir.join(name);
    let file = File::open(&path).map_err(io_err(&path))?;
    file.sync_all().map_err(io_err(&path))?;
    let (sha256, size) = Sha256Digest::of_reader(&file).map_err(io_err(&path))?;
    Ok(ImportedFile {
        path: name.to_owned(),
        sha256,
        size,
    })
}

/// A staging directory of `kind` beside `out_dir` (same filesystem, so [`publish`] is one
/// rename), after sweeping away the ones killed imports or quantizations left there.
pub(crate) fn staging_dir(out_dir: &Path, kind: staging::Kind) -> Result<Staging, ImportError> {
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::create_dir_all(parent).map_err(io_err(parent))?;
    staging::sweep(parent, kind);
    let name = out_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("model");
    Staging::create(parent, kind, name).map_err(io_err(parent))
}

/// Moves the finished staging directory to `out_dir` with one rename.
pub(crate) fn publish(staging: Staging, out_dir: &Path) -> Result<(), ImportError> {
    let dir = staging.path();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        // Staging is made 0700; a model directory is not secret.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(io_err(dir))?;
    }
    check_out_dir(out_dir)?;
    match fs::remove_dir(out_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(out_dir)(e)),
    }
    staging.move_to(out_dir).map_err(io_err(out_dir))?;
    if let Some(parent) = out_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io_err(parent))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).reshape(w.shape)
        let (n_head, head_dim, cols) = (3, 8, 2);
        let rows = n_head * head_dim;
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..n_head {
            for a in 0..2 {
                for b in 0..head_dim / 2 {
                    let src = h * head_dim + a * (head_dim / 2) + b;
                    let dst = h * head_dim + b * 2 + a;
                    gguf[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_ne!(gguf, hf);
        let gguf = Tensor::from_vec(gguf, (rows, cols), &Device::Cpu).unwrap();
        let back = unpermute_rows(&gguf, n_head).unwrap();
        assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), hf);
    }

    #[test]
    fn unpermuting_raw_rows_moves_them_as_unpermuting_values_does() {
        let (n_head, hd, cols) = (3, 8, 5);
        let rows = n_head * hd;
        let values: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let w = Tensor::from_vec(values.clone(), (rows, cols), &Device::Cpu).unwrap();
        let expected: Vec<f32> = unpermute_rows(&w, n_head)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let moved = unpermute_row_bytes(&f32_le_bytes(&values), rows, n_head);
        assert_eq!(moved, f32_le_bytes(&expected));
    }

    #[test]
    fn f32_metadata_floats_keep_their_short_form() {
        for (x, short) in [
            (1e-5f32, 1e-5f64),
            (1e-6, 1e-6),
            (100_000.0, 100_000.0),
            (500_000.0, 500_000.0),
        ] {
            assert_eq!(f32_as_decimal(x), short);
            assert_eq!(
                serde_json::to_string(&f32_as_decimal(x)).unwrap(),
                serde_json::to_string(&short).unwrap()
            );
        }
    }
}
