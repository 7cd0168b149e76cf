//! Sentence embeddings: a BERT encoder with the pooling and normalization its sentence-transformers
//! configuration names (`modules.json`, `1_Pooling/config.json`), run in batches padded to the
//! longest sentence of each batch.

use attest::Sha256Digest;
use attest::verify::ModelFiles;
use candle_core::{D, DType, Device, Tensor};
use serde::Deserialize;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::models::bert::{self, Bert};
use crate::models::{self, Family, LoadError};
use crate::weights::{Plan, TensorHeader, Weights};

/// Sentences per forward pass.
pub const BATCH: usize = 32;

/// How token embeddings become one sentence embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Average over the real (unpadded) tokens.
    Mean,
    /// The first token (`[CLS]`).
    Cls,
    /// Element-wise maximum over the real tokens.
    Max,
    /// Sum over the real tokens divided by the square root of their count.
    MeanSqrtLen,
}

impl Pooling {
    /// Name as sentence-transformers spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mean => "mean",
            Self::Cls => "cls",
            Self::Max => "max",
            Self::MeanSqrtLen => "mean_sqrt_len_tokens",
        }
    }
}

/// Embedding failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmbedError {
    /// Tokenizing failed.
    #[error("cannot tokenize: {0}")]
    Tokenize(String),
    /// The network failed.
    #[error("inference failed: {0}")]
    Model(#[from] candle_core::Error),
    /// A text is longer than the model's input and truncation was not allowed.
    #[error("text {text} is longer than the model's {max} tokens: shorten it, or allow truncation")]
    TooLong {
        /// Index of the text, from 0.
        text: usize,
        /// The model's input length in tokens.
        max: usize,
    },
    /// An embedding holds NaN or infinity: the weights or config are broken.
    #[error(
        "the model computed a non-finite embedding (text {text}): its weights or config.json are broken"
    )]
    NonFinite {
        /// Index of the text, from 0.
        text: usize,
    },
}

/// Embeddings of several texts, with what they cost and which were cut.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    /// One vector per text, in order.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens the texts made (special tokens included, padding not), after truncation.
    pub tokens: usize,
    /// Per text: whether it was cut to the model's input length.
    pub truncated: Vec<bool>,
}

#[derive(Debug, Deserialize)]
struct Module {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Debug, Default, Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

#[derive(Debug, Default, Deserialize)]
struct SentenceBertConfig {
    #[serde(default)]
    max_seq_length: Option<usize>,
}

/// A loaded sentence-embedding model.
pub struct Embedder {
    name: String,
    digest: Sha256Digest,
    bert: Bert,
    tokenizer: Tokenizer,
    pooling: Pooling,
    normalize: bool,
    max_tokens: usize,
    device: Device,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("name", &self.name)
            .field("pooling", &self.pooling)
            .field("normalize", &self.normalize)
            .finish_non_exhaustive()
    }
}

/// How an embedding model's weights load: every float tensor as f32; integer buffers
/// (`position_ids`) are not weights.
pub fn plan(tensors: &[TensorHeader]) -> Vec<Plan> {
    tensors
        .iter()
        .map(|t| {
            if t.is_loadable() {
                Plan::Dense
            } else {
                Plan::Skip
            }
        })
        .collect()
}

impl Embedder {
    /// Loads an embedding model from verified bytes.
    pub fn load(mut model: impl ModelFiles, device: &Device) -> Result<Self, LoadError> {
        let name = model.name().to_owned();
        if let Family::Llama(_) = models::family(&model)? {
            return Err(LoadError::WrongTask {
                model: name,
                found: "chat",
                wanted: "use `sanctum run` or `sanctum chat` for it",
            });
        }
        let config: bert::Config = models::config::read(&model)?;
        let (pooling, normalize) = sentence_transformers_head(&model)?;
        let st_config: SentenceBertConfig =
            models::optional_json(&model, "sentence_bert_config.json")?.unwrap_or_default();
        let max_tokens = st_config
            .max_seq_length
            .unwrap_or(config.max_position_embeddings)
            .min(config.max_position_embeddings);

        let tok_err = |problem: String| LoadError::Tokenizer {
            model: name.clone(),
            problem,
        };
        let mut tokenizer = Tokenizer::from_bytes(models::file_bytes(&model, "tokenizer.json")?)
            .map_err(|e| tok_err(e.to_string()))?;
        // The shipped tokenizer.json may pad every input to a fixed length; pad to the longest
        // sentence of the batch instead.
        let padding = PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..tokenizer.get_padding().cloned().unwrap_or_default()
        };
        tokenizer.with_padding(Some(padding));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| tok_err(e.to_string()))?;

        let weights = Weights::load(&mut model, device, &mut plan)?;
        let digest = model.digest();
        model.finish()?;
        // Verified: the weights may be used from here on.
        let bert = Bert::load(&config, weights.into_dense(), device).map_err(|source| {
            LoadError::Weights {
                model: name.clone(),
                source,
            }
        })?;
        Ok(Self {
            name,
            digest,
            bert,
            tokenizer,
            pooling,
            normalize,
            max_tokens,
            device: device.clone(),
        })
    }

    /// Model name from the lock.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Model digest from the lock.
    pub fn digest(&self) -> Sha256Digest {
        self.digest
    }

    /// Length of each embedding.
    pub fn dimensions(&self) -> usize {
        self.bert.hidden_size()
    }

    /// The pooling used.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Whether embeddings are scaled to length 1.
    pub fn normalize(&self) -> bool {
        self.normalize
    }

    /// Longest input in tokens; longer texts are truncated.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Embeds `texts`, in order, truncating any longer than [`Embedder::max_tokens`]. Texts are
    /// batched by similar length to keep padding small.
    pub fn embed<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<f32>>, EmbedError> {
        Ok(self.embed_counted(texts, true)?.vectors)
    }

    /// [`Embedder::embed`], also saying how many tokens the texts made (special tokens included,
    /// padding not), for usage reports and attestations, and which texts were cut to fit. With
    /// `truncate` false, a text that does not fit is an error instead (as Ollama's `truncate`).
    pub fn embed_counted<S: AsRef<str>>(
        &self,
        texts: &[S],
        truncate: bool,
    ) -> Result<Embedded, EmbedError> {
        let encodings: Vec<(usize, bool)> = texts
            .iter()
            .map(|t| {
                self.tokenizer
                    .encode(t.as_ref(), true)
                    .map(|e| (e.len(), !e.get_overflowing().is_empty()))
                    .map_err(|e| EmbedError::Tokenize(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        if !truncate && let Some(text) = encodings.iter().position(|&(_, cut)| cut) {
            return Err(EmbedError::TooLong {
                text,
                max: self.max_tokens,
            });
        }
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| encodings[i].0);
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
        for batch in order.chunks(BATCH) {
            let batch_texts: Vec<&str> = batch.iter().map(|&i| texts[i].as_ref()).collect();
            let vectors = self.embed_batch(&batch_texts)?;
            for (&i, v) in batch.iter().zip(vectors) {
                out[i] = v;
            }
        }
        if let Some(text) = out.iter().position(|v| v.iter().any(|x| !x.is_finite())) {
            return Err(EmbedError::NonFinite { text });
        }
        Ok(Embedded {
            vectors: out,
            tokens: encodings.iter().map(|&(n, _)| n).sum(),
            truncated: encodings.iter().map(|&(_, cut)| cut).collect(),
        })
    }

    /// One forward pass over up to a batch of texts.
    fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| EmbedError::Tokenize(e.to_string()))?;
        let rows = |f: &dyn Fn(&tokenizers::Encoding) -> Vec<u32>| -> candle_core::Result<Tensor> {
            let rows: Vec<Tensor> = encodings
                .iter()
                .map(|e| Tensor::new(f(e).as_slice(), &self.device))
                .collect::<candle_core::Result<_>>()?;
            Tensor::stack(&rows, 0)
        };
        let ids = rows(&|e| e.get_ids().to_vec())?;
        let type_ids = rows(&|e| e.get_type_ids().to_vec())?;
        let mask = rows(&|e| e.get_attention_mask().to_vec())?;
        let hidden = self.bert.forward(&ids, &type_ids, &mask)?;
        let pooled = pool(&hidden, &mask, self.pooling)?;
        let pooled = if self.normalize {
            let norm = pooled
                .sqr()?
                .sum_keepdim(1)?
                .sqrt()?
                .clamp(1e-12, f64::MAX)?;
            pooled.broadcast_div(&norm)?
        } else {
            pooled
        };
        Ok(pooled.to_vec2()?)
    }
}

/// Pools `[batch, seq, hidden]` token embeddings under a `[batch, seq]` mask into `[batch, hidden]`.
pub fn pool(hidden: &Tensor, mask: &Tensor, pooling: Pooling) -> candle_core::Result<Tensor> {
    let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    match pooling {
        Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1),
        Pooling::Mean | Pooling::MeanSqrtLen => {
            let sum = hidden.broadcast_mul(&mask)?.sum(1)?;
            let count = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
            let count = if pooling == Pooling::MeanSqrtLen {
                count.sqrt()?
            } else {
                count
            };
            sum.broadcast_div(&count)
        }
        Pooling::Max => {
            // Padding gets a very low value so it never wins.
            let penalty = ((mask.ones_like()? - &mask)? * -1e9)?;
            hidden.broadcast_add(&penalty)?.max(D::Minus2)
        }
    }
}

/// Reads `modules.json` and the pooling config: (pooling, normalize). Without `modules.json` the
/// model is taken as a plain encoder with mean pooling and no normalization.
fn sentence_transformers_head(model: &impl ModelFiles) -> Result<(Pooling, bool), LoadError> {
    let Some(modules) = models::optional_json::<Vec<Module>>(model, "modules.json")? else {
        return Ok((Pooling::Mean, false));
    };
    let mut pooling = None;
    let mut normalize = false;
    for module in &modules {
        let kind = module.kind.rsplit('.').next().unwrap_or(&module.kind);
        match kind {
            "Transformer" => {}
            "Normalize" => normalize = true,
            "Pooling" => {
                let path = if module.path.is_empty() {
                    "config.json".to_owned()
                } else {
                    format!("{}/config.json", module.path.trim_end_matches('/'))
                };
                let cfg: PoolingConfig = models::json_file(model, &path)?;
                pooling = Some(pooling_of(&cfg).map_err(|problem| LoadError::Unsupported {
                    model: model.name().to_owned(),
                    problem: format!("{path}: {problem}"),
                })?);
            }
            other => {
                return Err(LoadError::Unsupported {
                    model: model.name().to_owned(),
                    problem: format!(
                        "modules.json: sentence-transformers module {other:?} is not supported"
                    ),
                });
            }
        }
    }
    Ok((pooling.unwrap_or(Pooling::Mean), normalize))
}

fn pooling_of(cfg: &PoolingConfig) -> Result<Pooling, String> {
    if cfg.pooling_mode_weightedmean_tokens || cfg.pooling_mode_lasttoken {
        return Err("weighted-mean and last-token pooling are not supported".into());
    }
    let modes = [
        (cfg.pooling_mode_mean_tokens, Pooling::Mean),
        (cfg.pooling_mode_cls_token, Pooling::Cls),
        (cfg.pooling_mode_max_tokens, Pooling::Max),
        (cfg.pooling_mode_mean_sqrt_len_tokens, Pooling::MeanSqrtLen),
    ];
    let on: Vec<Pooling> = modes
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, p)| *p)
        .collect();
    match on.as_slice() {
        [one] => Ok(*one),
        [] => Err("no pooling mode is set".into()),
        _ => {
            Err("several pooling modes at once (concatenated embeddings) are not supported".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_pooling_ignores_padding() -> candle_core::Result<()> {
        let hidden = Tensor::new(&[[[1f32, 2.], [3., 4.], [100., 100.]]], &Device::Cpu)?;
        let mask = Tensor::new(&[[1u32, 1, 0]], &Device::Cpu)?;
        let v: Vec<Vec<f32>> = pool(&hidden, &mask, Pooling::Mean)?.to_vec2()?;
        assert_eq!(v, [[2.0, 3.0]]);
        let v: Vec<Vec<f32>> = pool(&hidden, &mask, Pooling::Max)?.to_vec2()?;
        assert_eq!(v, [[3.0, 4.0]]);
        let v: Vec<Vec<f32>> = pool(&hidden, &mask, Pooling::Cls)?.to_vec2()?;
        assert_eq!(v, [[1.0, 2.0]]);
        Ok(())
    }

    #[test]
    fn pooling_modes_from_config() {
        let cfg = |json: &str| pooling_of(&serde_json::from_str(json).unwrap());
        assert_eq!(
            cfg(r#"{"pooling_mode_mean_tokens": true}"#),
            Ok(Pooling::Mean)
        );
        assert_eq!(cfg(r#"{"pooling_mode_cls_token": true}"#), Ok(Pooling::Cls));
        assert!(cfg(r#"{}"#).is_err());
        assert!(
            cfg(r#"{"pooling_mode_cls_token": true, "pooling_mode_max_tokens": true}"#).is_err()
        );
    }
}
