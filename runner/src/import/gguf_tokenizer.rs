//! `tokenizer.json` and `tokenizer_config.json` from a GGUF's `tokenizer.ggml.*` metadata.
//!
//! Only byte-level BPE (`tokenizer.ggml.model = "gpt2"`) is converted, and only with pre-tokenizers
//! whose llama.cpp regexes have an exact Hugging Face equivalent. (candle's own `TokenizerFromGguf`
//! falls back to adding a leading space for unknown pre-tokenizers, which gives SmolLM2 wrong ids.)
//! The tokenizer is built with the `tokenizers` crate, whose serialization orders the vocabulary by
//! id, the merges by rank and the added tokens by id, so the bytes are the same on every run.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr as _;

use serde::Serialize;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::gguf::{ImportError, Meta, describe, json_bytes};

/// Values of `tokenizer.ggml.pre` this import converts (with their aliases).
pub(crate) const SUPPORTED_PRE: &[&str] = &["smollm", "gpt2", "llama-bpe (llama3, llama-v3)"];

/// Llama 3's pre-tokenizer regex, as in its `tokenizer.json` (llama.cpp's `LLAMA3` pre-type).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp token types (`llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The tokenizer files, serialized, and the ids `config.json` needs.
pub(crate) struct TokenizerFiles {
    pub(crate) tokenizer_json: Vec<u8>,
    pub(crate) tokenizer_config_json: Vec<u8>,
    pub(crate) bos_token_id: Option<u32>,
    pub(crate) eos_token_id: Option<u32>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pre {
    /// Digits split one by one, then GPT-2's regex (llama.cpp: SMOLLM, same as STARCODER).
    Smollm,
    /// GPT-2's regex alone.
    Gpt2,
    /// Llama 3's regex; merges ignored for whole-word vocabulary hits; BOS added by default.
    Llama3,
}

/// `tokenizer_config.json`, keys in alphabetical order as transformers writes them.
#[derive(Serialize)]
struct TokenizerConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    add_bos_token: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    add_eos_token: Option<bool>,
    add_prefix_space: bool,
    added_tokens_decoder: BTreeMap<u32, AddedTokenEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bos_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    chat_template: Option<String>,
    clean_up_tokenization_spaces: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    eos_token: Option<String>,
    model_max_length: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pad_token: Option<String>,
    tokenizer_class: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    unk_token: Option<String>,
}

#[derive(Serialize)]
struct AddedTokenEntry {
    content: String,
    lstrip: bool,
    normalized: bool,
    rstrip: bool,
    single_word: bool,
    special: bool,
}

/// Builds both tokenizer files. `vocab_size` is the embedding's row count (ids must fit in it).
pub(crate) fn build(
    meta: &Meta<'_>,
    vocab_size: usize,
    context_length: usize,
) -> Result<TokenizerFiles, ImportError> {
    let path = meta.path.to_path_buf();
    let tok_err = |problem: String| ImportError::Tokenizer {
        path: path.clone(),
        problem,
    };

    let model = meta.string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(ImportError::UnsupportedTokenizer { path, model });
    }
    let pre = match meta.opt_string("tokenizer.ggml.pre")?.as_deref() {
        Some("smollm") => Pre::Smollm,
        Some("gpt2") => Pre::Gpt2,
        Some("llama-bpe" | "llama3" | "llama-v3") => Pre::Llama3,
        other => {
            return Err(ImportError::UnsupportedPreTokenizer {
                path,
                pre: other.unwrap_or("(missing)").to_owned(),
            });
        }
    };

    let tokens_key = "tokenizer.ggml.tokens";
    let tokens = meta
        .array(tokens_key)?
        .iter()
        .map(|v| {
            v.to_string().map(String::as_str).map_err(|_| {
                meta.bad(
                    tokens_key,
                    format!("expected strings, found {}", describe(v)),
                )
            })
        })
        .collect::<Result<Vec<&str>, _>>()?;
    if tokens.is_empty() || tokens.len() > vocab_size {
        return Err(meta.bad(
            tokens_key,
            format!(
                "{} tokens, but token_embd.weight has {vocab_size} rows",
                tokens.len()
            ),
        ));
    }
    let types_key = "tokenizer.ggml.token_type";
    let types: Vec<i64> = match meta.opt_array(types_key)? {
        None => vec![1; tokens.len()],
        Some(values) => {
            let types = values
                .iter()
                .map(|v| {
                    v.to_i32()
                        .map(i64::from)
                        .or_else(|_| v.to_u32().map(i64::from))
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| meta.bad(types_key, "expected integers"))?;
            if types.len() != tokens.len() {
                return Err(meta.bad(
                    types_key,
                    format!("{} types for {} tokens", types.len(), tokens.len()),
                ));
            }
            types
        }
    };
    let merges_key = "tokenizer.ggml.merges";
    let merges = meta
        .array(merges_key)?
        .iter()
        .map(|v| {
            let s = v.to_string().map_err(|_| {
                meta.bad(
                    merges_key,
                    format!("expected strings, found {}", describe(v)),
                )
            })?;
            s.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| {
                    meta.bad(
                        merges_key,
                        format!("merge {s:?} is not two tokens separated by a space"),
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        let id = u32::try_from(id).map_err(|_| meta.bad(tokens_key, "too many tokens"))?;
        if let Some(first) = vocab.insert((*token).to_owned(), id) {
            return Err(tok_err(format!(
                "token {token:?} appears twice (ids {first} and {id}); a Hugging Face vocabulary cannot hold that"
            )));
        }
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre == Pre::Llama3)
        .build()
        .map_err(|e| tok_err(format!("BPE: {e}")))?;

    let special_id = |key: &str| -> Result<Option<u32>, ImportError> {
        match meta.opt_u64(key)? {
            None => Ok(None),
            Some(id) if (id as usize) < tokens.len() => Ok(Some(id as u32)),
            Some(id) => Err(meta.bad(
                key,
                format!(
                    "token id {id} is outside the vocabulary of {}",
                    tokens.len()
                ),
            )),
        }
    };
    let bos = special_id("tokenizer.ggml.bos_token_id")?;
    let eos = special_id("tokenizer.ggml.eos_token_id")?;
    let unk = special_id("tokenizer.ggml.unknown_token_id")?;
    let pad = special_id("tokenizer.ggml.padding_token_id")?;
    let add_bos_meta = meta.opt_bool("tokenizer.ggml.add_bos_token")?;
    let add_eos_meta = meta.opt_bool("tokenizer.ggml.add_eos_token")?;
    // llama.cpp's defaults when the keys are absent: BOS for Llama 3's tokenizer, nothing otherwise.
    let add_bos = add_bos_meta.unwrap_or(pre == Pre::Llama3);
    let add_eos = add_eos_meta.unwrap_or(false);

    let mut tokenizer = Tokenizer::new(bpe);
    let byte_level_regex = ByteLevel::new(false, true, true);
    let pre_tokenizer = match pre {
        Pre::Smollm => PreTokenizerWrapper::Sequence(
            tokenizers::pre_tokenizers::sequence::Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(byte_level_regex),
            ]),
        ),
        Pre::Gpt2 => PreTokenizerWrapper::ByteLevel(byte_level_regex),
        Pre::Llama3 => PreTokenizerWrapper::Sequence(
            tokenizers::pre_tokenizers::sequence::Sequence::new(vec![
                PreTokenizerWrapper::Split(
                    Split::new(
                        SplitPattern::Regex(LLAMA3_SPLIT.into()),
                        SplitDelimiterBehavior::Isolated,
                        false,
                    )
                    .map_err(|e| tok_err(format!("pre-tokenizer regex: {e}")))?,
                ),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
            ]),
        ),
    };
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    let byte_level_post = PostProcessorWrapper::ByteLevel(ByteLevel::new(false, false, true));
    let post = if add_bos || add_eos {
        let template = template(
            &tokens,
            add_bos.then_some(bos),
            add_eos.then_some(eos),
            meta,
        )?;
        PostProcessorWrapper::Sequence(tokenizers::processors::sequence::Sequence::new(vec![
            byte_level_post,
            PostProcessorWrapper::Template(template),
        ]))
    } else {
        byte_level_post
    };
    tokenizer.with_post_processor(Some(post));

    let mut added_tokens_decoder = BTreeMap::new();
    for (id, (token, kind)) in tokens.iter().zip(&types).enumerate() {
        let special = match *kind {
            TOKEN_TYPE_CONTROL => true,
            TOKEN_TYPE_USER_DEFINED => false,
            _ => continue,
        };
        let added = AddedToken::from(*token, special).normalized(false);
        let result = if special {
            tokenizer.add_special_tokens([added])
        } else {
            tokenizer.add_tokens([added])
        };
        result.map_err(|e| tok_err(format!("added token {token:?}: {e}")))?;
        added_tokens_decoder.insert(
            id as u32,
            AddedTokenEntry {
                content: (*token).to_owned(),
                lstrip: false,
                normalized: false,
                rstrip: false,
                single_word: false,
                special,
            },
        );
    }

    let mut tokenizer_json = tokenizer
        .to_string(true)
        .map_err(|e| tok_err(format!("serializing: {e}")))?;
    drop(tokenizer);
    // What is written must load: check it the way every consumer will read it.
    Tokenizer::from_str(&tokenizer_json)
        .map_err(|e| tok_err(format!("the result does not load: {e}")))?;
    tokenizer_json.push('\n');

    let name = |id: Option<u32>| id.map(|id| tokens[id as usize].to_owned());
    let config = TokenizerConfig {
        add_bos_token: add_bos_meta,
        add_eos_token: add_eos_meta,
        add_prefix_space: false,
        added_tokens_decoder,
        bos_token: name(bos),
        chat_template: meta.opt_string("tokenizer.chat_template")?,
        clean_up_tokenization_spaces: false,
        eos_token: name(eos),
        model_max_length: context_length,
        pad_token: name(pad),
        tokenizer_class: "GPT2Tokenizer",
        unk_token: name(unk),
    };
    Ok(TokenizerFiles {
        tokenizer_json: tokenizer_json.into_bytes(),
        tokenizer_config_json: json_bytes(&config),
        bos_token_id: bos,
        eos_token_id: eos,
    })
}

/// The post-processor adding BOS and/or EOS, shaped like Llama 3's (`<bos> $A:0 <bos>:1 $B:1`).
fn template(
    tokens: &[&str],
    bos: Option<Option<u32>>,
    eos: Option<Option<u32>>,
    meta: &Meta<'_>,
) -> Result<TemplateProcessing, ImportError> {
    let mut specials: HashMap<&str, u32> = HashMap::new();
    let mut piece = |want: Option<Option<u32>>,
                     id_key: &str,
                     flag_key: &str|
     -> Result<Option<&str>, ImportError> {
        let Some(id) = want else { return Ok(None) };
        let id =
            id.ok_or_else(|| meta.bad(flag_key, format!("is true, but {id_key} is missing")))?;
        let token = tokens[id as usize];
        // Template pieces are parsed from text: `$…` names a sequence, `:` starts a type id.
        if token.is_empty() || token.starts_with('$') || token.contains([':', ' ']) {
            return Err(ImportError::Unsupported {
                path: meta.path.to_path_buf(),
                problem: format!("adding the special token {token:?} in a tokenizer.json template"),
            });
        }
        specials.insert(token, id);
        Ok(Some(token))
    };
    let bos = piece(
        bos,
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.add_bos_token",
    )?;
    let eos = piece(
        eos,
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.add_eos_token",
    )?;
    let mut single = Vec::new();
    let mut pair = Vec::new();
    if let Some(b) = bos {
        single.push(format!("{b}:0"));
        pair.push(format!("{b}:0"));
    }
    single.push("$A:0".to_owned());
    pair.push("$A:0".to_owned());
    if let Some(e) = eos {
        single.push(format!("{e}:0"));
        pair.push(format!("{e}:0"));
    }
    if let Some(b) = bos {
        pair.push(format!("{b}:1"));
    }
    pair.push("$B:1".to_owned());
    if let Some(e) = eos {
        pair.push(format!("{e}:1"));
    }
    let mut specials: Vec<(String, u32)> = specials
        .into_iter()
        .map(|(t, id)| (t.to_owned(), id))
        .collect();
    specials.sort();
    let template_err = |problem: String| ImportError::Tokenizer {
        path: meta.path.to_path_buf(),
        problem: format!("template: {problem}"),
    };
    let mut builder = TemplateProcessing::builder();
    builder.try_single(single).map_err(template_err)?;
    builder.try_pair(pair).map_err(template_err)?;
    builder.special_tokens(specials);
    builder.build().map_err(|e| template_err(e.to_string()))
}
