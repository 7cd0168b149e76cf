//! Model families, one file each, and how a verified model directory says which one it is.
//!
//! Every loader here reads only verified bytes ([`ModelFiles`]): small files kept in memory, weights
//! streamed from the verified read; nothing is opened from disk.

pub mod bert;
pub mod config;
pub mod llama;

use attest::verify::ModelFiles;
use serde::de::DeserializeOwned;

/// What `config.json` says the model is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// A causal language model of the Llama family.
    Llama(llama::Variant),
    /// A BERT encoder (sentence embeddings).
    Bert,
}

/// The architectures this build runs, for messages.
pub const SUPPORTED: &str = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, BertModel";

/// Why a verified model could not be turned into a runnable one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// A file the loader needs is not part of the model.
    #[error("model {model:?} has no {path}, which sanctum needs to run it")]
    MissingFile {
        /// Model name.
        model: String,
        /// The file.
        path: String,
    },
    /// A JSON file does not parse or lacks fields.
    #[error("model {model:?}: {path}: {source}")]
    Json {
        /// Model name.
        model: String,
        /// The file.
        path: String,
        /// The parse error.
        source: serde_json::Error,
    },
    /// `config.json` names an architecture this build does not run.
    #[error(
        "model {model:?}: unsupported architecture {architecture:?} (sanctum runs {SUPPORTED})"
    )]
    UnsupportedArchitecture {
        /// Model name.
        model: String,
        /// What `config.json` names.
        architecture: String,
    },
    /// The model is of the wrong kind for the command (an embedding model asked to chat...).
    #[error("model {model:?} is a {found} model; {wanted}")]
    WrongTask {
        /// Model name.
        model: String,
        /// What it is.
        found: &'static str,
        /// What was needed, as advice.
        wanted: &'static str,
    },
    /// A field of `config.json` is out of range.
    #[error("model {model:?}: config.json: {source}")]
    Config {
        /// Model name.
        model: String,
        /// The field and its range.
        source: config::ConfigError,
    },
    /// A setting of the model that this build does not support.
    #[error("model {model:?}: {problem}")]
    Unsupported {
        /// Model name.
        model: String,
        /// What is unsupported.
        problem: String,
    },
    /// The tokenizer could not be read or configured.
    #[error("model {model:?}: tokenizer: {problem}")]
    Tokenizer {
        /// Model name.
        model: String,
        /// What went wrong.
        problem: String,
    },
    /// The chat template does not compile.
    #[error("model {model:?}: chat template: {source}")]
    Template {
        /// Model name.
        model: String,
        /// The template error.
        source: crate::template::TemplateError,
    },
    /// Weights missing, misshapen, or a device operation failed.
    #[error("model {model:?}: cannot load weights: {source}")]
    Weights {
        /// Model name.
        model: String,
        /// candle's error.
        source: candle_core::Error,
    },
    /// A weight file failed verification while it streamed in, or its bytes could not be built.
    #[error(transparent)]
    Verify(Box<attest::verify::VerifyError>),
    /// A context of 0 tokens, or more than the model supports.
    #[error(
        "model {model:?}: a context of {requested} tokens is out of range: the model takes 1 to {max}"
    )]
    Context {
        /// Model name.
        model: String,
        /// Asked for.
        requested: usize,
        /// The model's maximum.
        max: usize,
    },
}

impl From<attest::verify::VerifyError> for LoadError {
    fn from(e: attest::verify::VerifyError) -> Self {
        Self::Verify(Box::new(e))
    }
}

impl LoadError {
    /// True when a check said no (a weight file that does not match the lock).
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Verify(e) if e.is_refusal())
    }
}

/// The bytes of one file of a verified model, or a `MissingFile` error.
pub fn file_bytes<'a>(
    model: &'a (impl ModelFiles + ?Sized),
    path: &str,
) -> Result<&'a [u8], LoadError> {
    model
        .file(path)
        .map(|f| f.bytes.as_slice())
        .ok_or_else(|| LoadError::MissingFile {
            model: model.name().to_owned(),
            path: path.to_owned(),
        })
}

/// The model's weight files, or a `MissingFile` error when it has none.
pub fn weight_files(model: &(impl ModelFiles + ?Sized)) -> Result<Vec<String>, LoadError> {
    let files = model.weight_files();
    if files.is_empty() {
        return Err(LoadError::MissingFile {
            model: model.name().to_owned(),
            path: "model.safetensors".to_owned(),
        });
    }
    Ok(files)
}

/// Parses one JSON file of a verified model.
pub fn json_file<T: DeserializeOwned>(
    model: &(impl ModelFiles + ?Sized),
    path: &str,
) -> Result<T, LoadError> {
    serde_json::from_slice(file_bytes(model, path)?).map_err(|source| LoadError::Json {
        model: model.name().to_owned(),
        path: path.to_owned(),
        source,
    })
}

/// Parses an optional JSON file: None when the model has no such file.
pub fn optional_json<T: DeserializeOwned>(
    model: &(impl ModelFiles + ?Sized),
    path: &str,
) -> Result<Option<T>, LoadError> {
    match model.file(path) {
        None => Ok(None),
        Some(_) => json_file(model, path).map(Some),
    }
}

/// Just enough of `config.json` to tell families apart.
#[derive(Debug, serde::Deserialize)]
struct ArchitectureFields {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
}

/// Reads `config.json` and names the family, or says which architecture is unsupported.
pub fn family(model: &(impl ModelFiles + ?Sized)) -> Result<Family, LoadError> {
    let fields: ArchitectureFields = json_file(model, "config.json")?;
    family_of(&fields.architectures, fields.model_type.as_deref()).ok_or_else(|| {
        LoadError::UnsupportedArchitecture {
            model: model.name().to_owned(),
            architecture: fields
                .architectures
                .first()
                .cloned()
                .or(fields.model_type)
                .unwrap_or_else(|| "(none named in config.json)".to_owned()),
        }
    })
}

fn family_of(architectures: &[String], model_type: Option<&str>) -> Option<Family> {
    let by_class = |name: &str| match name {
        "LlamaForCausalLM" => Some(Family::Llama(llama::Variant::Llama)),
        "MistralForCausalLM" => Some(Family::Llama(llama::Variant::Mistral)),
        "Qwen2ForCausalLM" => Some(Family::Llama(llama::Variant::Qwen2)),
        "BertModel" | "BertForMaskedLM" | "BertForPreTraining" => Some(Family::Bert),
        _ => None,
    };
    if let Some(first) = architectures.first() {
        return by_class(first);
    }
    match model_type? {
        "llama" => Some(Family::Llama(llama::Variant::Llama)),
        "mistral" => Some(Family::Llama(llama::Variant::Mistral)),
        "qwen2" => Some(Family::Llama(llama::Variant::Qwen2)),
        "bert" => Some(Family::Bert),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_by_class_then_model_type() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            family_of(&s(&["Qwen2ForCausalLM"]), None),
            Some(Family::Llama(llama::Variant::Qwen2))
        );
        assert_eq!(family_of(&[], Some("bert")), Some(Family::Bert));
        assert_eq!(family_of(&s(&["GPT2LMHeadModel"]), Some("llama")), None);
        assert_eq!(family_of(&[], None), None);
    }
}
