//! Chat models: a verified model turned into a tokenizer, a chat template and a quantized Llama-family
//! network, and the generation loop that streams text out of them.
//!
//! A [`ChatModel`] is shared (`Arc`) by every conversation on it; each conversation has its own
//! [`Session`] (key/value cache and position). The cache outlives a generation: the next prompt is
//! compared with the tokens already in the cache and only the part after their common prefix is
//! fed, so a multi-turn chat does not re-read its history. [`Decoder`] is one sequence's sampling
//! and text state, shared by [`ChatModel::generate`] and the batch scheduler (`crate::batch`), so
//! that a request gives the same bytes alone or batched.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use attest::Sha256Digest;
use attest::verify::ModelFiles;
use candle_core::Device;
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::kernels::Activations;
use crate::models::llama::{self, Cache, HeadTying, KvPrecision, Llama, Workspace};
use crate::models::{self, Family, LoadError};
use crate::quant::{Choice, Quant};
use crate::sampling::{InvalidParams, Sampler, SamplingParams};
use crate::stream::{DecodeError, StopMatcher, TextStream};
use crate::template::{ChatTemplate, Message, TemplateError, TokenizerConfig};
use crate::weights::{TensorHeader, Weights};

/// Tokens that end a turn in common chat formats, used when present in the vocabulary.
const END_OF_TURN: [&str; 8] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
];

/// Prompt tokens are fed in chunks of this many, to bound the attention matrix's size.
pub(crate) const PROMPT_CHUNK: usize = 512;

/// How to load a chat model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The format weights run in; None: the block format they are stored in when sanctum's kernels
    /// run it, else [`crate::quant::AUTO_FOR_FLOATS`] ([`crate::models::llama::auto_quant`]).
    pub quant: Option<Quant>,
    /// How sanctum's kernels quantize activations; None: [`Activations::Int16`], which keeps
    /// f32's answers (see [`crate::kernels::Activations`]).
    pub activations: Option<Activations>,
    /// Where to run.
    pub device: Device,
    /// Most tokens (prompt and reply) held at once; None: the model's own maximum, capped by
    /// `context_cap`. More than the model's maximum is refused.
    pub context: Option<usize>,
    /// Without `context`: at most this many (a server sizing `--parallel` caches); never more
    /// than the model's maximum.
    pub context_cap: Option<usize>,
    /// What the key/value cache holds on sanctum's CPU path.
    pub kv_cache: KvPrecision,
}

/// How to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate; None: until the end of the turn or the context is full.
    pub max_tokens: Option<usize>,
    /// Strings that end the reply (they are not part of it).
    pub stop: Vec<String>,
    /// Sampling settings.
    pub sampling: SamplingParams,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-turn token.
    EndOfTurn,
    /// A stop string appeared.
    StopString,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The context is full.
    ContextFull,
    /// The text sink asked to stop.
    Cancelled,
}

impl StopReason {
    /// Short name for reports: `eos`, `stop`, `length`, `context`, `cancelled`.
    pub fn name(self) -> &'static str {
        match self {
            Self::EndOfTurn => "eos",
            Self::StopString => "stop",
            Self::MaxTokens => "length",
            Self::ContextFull => "context",
            Self::Cancelled => "cancelled",
        }
    }
}

/// The result of one generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The text emitted (without stop strings or the end-of-turn token).
    pub text: String,
    /// Generated token ids (the end-of-turn token excluded).
    pub tokens: Vec<u32>,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Prompt tokens actually computed (the rest came from the cache).
    pub prompt_evaluated: usize,
    /// Time spent on the prompt, up to the first token's logits.
    pub prompt_time: Duration,
    /// Forward passes after the prompt.
    pub decode_passes: usize,
    /// Time spent generating after the prompt.
    pub decode_time: Duration,
    /// Why it stopped.
    pub stop: StopReason,
}

impl Generation {
    /// Prompt tokens per second (over the tokens computed).
    pub fn prompt_tokens_per_second(&self) -> f64 {
        rate(self.prompt_evaluated, self.prompt_time)
    }

    /// Generated tokens per second (forward passes over their time, as llama.cpp counts).
    pub fn generation_tokens_per_second(&self) -> f64 {
        rate(self.decode_passes, self.decode_time)
    }
}

fn rate(n: usize, t: Duration) -> f64 {
    let s = t.as_secs_f64();
    if s > 0.0 { n as f64 / s } else { 0.0 }
}

/// Generation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GenerateError {
    /// The prompt has no tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The prompt does not fit the context.
    #[error(
        "the prompt has {tokens} tokens, but the context holds {context} (with room for at least one more): shorten it or raise --ctx"
    )]
    PromptTooLong {
        /// Prompt tokens.
        tokens: usize,
        /// The context.
        context: usize,
    },
    /// The model has no chat template.
    #[error("model {0:?} has no chat template: send the prompt as is with --raw")]
    NoTemplate(String),
    /// Rendering the template failed (including the template's own `raise_exception`).
    #[error("chat template: {0}")]
    Template(#[from] TemplateError),
    /// Tokenizing failed.
    #[error("cannot tokenize: {0}")]
    Tokenize(String),
    /// Decoding failed.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A sampling setting is out of range.
    #[error(transparent)]
    Sampling(#[from] InvalidParams),
    /// The network failed.
    #[error("inference failed: {0}")]
    Model(#[from] candle_core::Error),
    /// A batched step failed for every sequence in it.
    #[error("inference failed: {0}")]
    Batch(String),
    /// The model computed a NaN or infinite logit: its weights or config are broken, and
    /// nothing it says from here can be trusted (or stamped).
    #[error(
        "the model computed a non-finite logit (token id {token}, after {generated} generated tokens): its weights or config.json are broken"
    )]
    NonFinite {
        /// The first vocabulary entry with a non-finite logit.
        token: usize,
        /// Tokens generated before it.
        generated: usize,
    },
    /// The batch scheduler has stopped (the server is shutting down).
    #[error("the model is shutting down")]
    Stopped,
}

/// A loaded chat model: tokenizer, template and weights, shared by every [`Session`] on it.
pub struct ChatModel {
    name: String,
    digest: Sha256Digest,
    model: Llama,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    stop_tokens: Vec<u32>,
    quant: Quant,
    /// The activations of the matrices on sanctum's kernels; None when there are none.
    activations: Option<Activations>,
    choices: Vec<Choice>,
    /// Weights in the checkpoint.
    parameters: u64,
    /// Bytes the weights take in the formats they run in.
    weight_bytes: u64,
    device: Device,
}

/// One conversation's state on a [`ChatModel`]: its key/value cache, the tokens in it, and the
/// buffers its forward passes reuse.
#[derive(Debug)]
pub struct Session {
    cache: Cache,
    work: Workspace,
    /// Tokens whose keys and values are in the cache, in order.
    cached: Vec<u32>,
}

impl Session {
    /// Forgets the cached conversation.
    pub fn reset(&mut self) {
        self.cache.clear();
        self.cached.clear();
    }

    /// Tokens currently in the key/value cache.
    pub fn cached_tokens(&self) -> usize {
        self.cached.len()
    }

    /// The cache, for a batched step.
    pub(crate) fn cache_mut(&mut self) -> &mut Cache {
        &mut self.cache
    }

    /// Records that a batched step put `tokens` into the cache.
    pub(crate) fn push_cached(&mut self, tokens: &[u32]) {
        self.cached.extend_from_slice(tokens);
    }
}

impl std::fmt::Debug for ChatModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatModel")
            .field("name", &self.name)
            .field("quant", &self.quant)
            .field("context", &self.model.context())
            .finish_non_exhaustive()
    }
}

/// `eos_token_id` as `config.json` and `generation_config.json` write it.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Debug, Default, Deserialize)]
struct EosFields {
    #[serde(default)]
    eos_token_id: Option<TokenIds>,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
}

impl ChatModel {
    /// Builds a chat model from a verified model: configs and tokenizer from its kept files, the
    /// weights built as they stream in ([`Weights::load`]), and used only once every file
    /// verified.
    pub fn load(mut model: impl ModelFiles, options: &LoadOptions) -> Result<Self, LoadError> {
        let name = model.name().to_owned();
        let variant = match models::family(&model)? {
            Family::Llama(v) => v,
            Family::Bert => {
                return Err(LoadError::WrongTask {
                    model: name,
                    found: "BERT embedding",
                    wanted: "use `sanctum embed` for it",
                });
            }
        };
        let config: llama::Config = models::config::read(&model)?;
        let eos: EosFields = models::json_file(&model, "config.json")?;
        let generation: Option<EosFields> =
            models::optional_json(&model, "generation_config.json")?;
        let max = eos.max_position_embeddings.unwrap_or(4096);
        let context = match options.context {
            Some(c) if c == 0 || c > max => {
                return Err(LoadError::Context {
                    model: name,
                    requested: c,
                    max,
                });
            }
            Some(c) => c,
            None => options.context_cap.map_or(max, |cap| cap.min(max)).max(1),
        };

        let tokenizer = Tokenizer::from_bytes(models::file_bytes(&model, "tokenizer.json")?)
            .map_err(|e| LoadError::Tokenizer {
                model: name.clone(),
                problem: e.to_string(),
            })?;
        let tok_config = match model.file("tokenizer_config.json") {
            Some(f) => TokenizerConfig::parse(&f.bytes).map_err(|e| LoadError::Tokenizer {
                model: name.clone(),
                problem: format!("tokenizer_config.json: {e}"),
            })?,
            None => TokenizerConfig::default(),
        };
        let template = match &tok_config.chat_template {
            Some(source) => Some(
                ChatTemplate::new(source, tok_config.special.clone()).map_err(|source| {
                    LoadError::Template {
                        model: name.clone(),
                        source,
                    }
                })?,
            ),
            None => None,
        };

        let mut stop_tokens: Vec<u32> = Vec::new();
        for ids in [eos.eos_token_id, generation.and_then(|g| g.eos_token_id)]
            .into_iter()
            .flatten()
        {
            match ids {
                TokenIds::One(id) => stop_tokens.push(id),
                TokenIds::Many(list) => stop_tokens.extend(list),
            }
        }
        let named = tok_config
            .special
            .eos
            .iter()
            .map(String::as_str)
            .chain(END_OF_TURN);
        stop_tokens.extend(named.filter_map(|t| tokenizer.token_to_id(t)));
        stop_tokens.sort_unstable();
        stop_tokens.dedup();

        let digest = model.digest();
        let mut tying = HeadTying::new(&model, &config)?;
        let activations = options.activations.unwrap_or(Activations::Int16);
        // `auto` is decided by the first weight file's header ([`llama::auto_quant`]).
        let mut chosen = options.quant;
        let auto = chosen.is_none();
        let mut plan = |tensors: &[TensorHeader]| {
            let quant = *chosen.get_or_insert_with(|| llama::auto_quant(tensors));
            tying.plan(tensors, quant, auto, activations)
        };
        let mut weights = Weights::load(&mut model, &options.device, &mut plan)?;
        let quant = chosen.unwrap_or(crate::quant::AUTO_FOR_FLOATS);
        model.finish()?;
        // Verified: the weights may be used from here on.
        let parameters: u64 = weights.headers().iter().map(|t| t.elements() as u64).sum();
        let weight_bytes = weights.bytes();
        let weights_error = |source| LoadError::Weights {
            model: name.clone(),
            source,
        };
        let (mut llama, choices) = Llama::load(
            &config,
            variant,
            &mut weights,
            tying.tied(),
            &options.device,
            context,
        )
        .map_err(weights_error)?;
        llama.set_kv_precision(options.kv_cache);
        drop(weights);
        // Two tokens through the network: kernels that repack weights on first use (for
        // prompts or for single tokens) do it now, so that the first prompt runs at full speed.
        llama
            .forward(
                &mut llama.new_cache(),
                &mut Workspace::default(),
                &[0, 0][..context.min(2)],
            )
            .map_err(weights_error)?;
        Ok(Self {
            name,
            digest,
            model: llama,
            tokenizer,
            template,
            stop_tokens,
            quant,
            activations: choices
                .iter()
                .any(|c| options.device.is_cpu() && c.used.packed_format().is_some())
                .then_some(activations),
            choices,
            parameters,
            weight_bytes,
            device: options.device.clone(),
        })
    }

    /// A new, empty conversation on this model.
    pub fn session(&self) -> Session {
        Session {
            cache: self.model.new_cache(),
            work: Workspace::default(),
            cached: Vec::new(),
        }
    }

    /// The network, for the batch scheduler.
    pub(crate) fn network(&self) -> &Llama {
        &self.model
    }

    /// Model name from the lock.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Model digest from the lock.
    pub fn digest(&self) -> Sha256Digest {
        self.digest
    }

    /// The format asked for (or picked by size).
    pub fn quant(&self) -> Quant {
        self.quant
    }

    /// How activations are quantized for the matrices on sanctum's kernels (None: no matrix is).
    pub fn activations(&self) -> Option<Activations> {
        self.activations
    }

    /// What the key/value cache holds on sanctum's CPU path; None on candle's path.
    pub fn kv_precision(&self) -> Option<KvPrecision> {
        self.model.kv_precision()
    }

    /// The format, and the activations when they are not llama.cpp's 8 bits: `q8_0`,
    /// `q4_0+int16`; what reports and attestations name.
    pub fn arithmetic(&self) -> String {
        match self.activations {
            Some(a @ Activations::Int16) => format!("{}+{a}", self.quant),
            _ => self.quant.name().to_owned(),
        }
    }

    /// The format each weight matrix got, with the reason when it differs from the one asked for.
    pub fn choices(&self) -> &[Choice] {
        &self.choices
    }

    /// Weights in the checkpoint (llama-bench's `params`).
    pub fn parameters(&self) -> u64 {
        self.parameters
    }

    /// Bytes the weights take in the formats they run in (llama-bench's `size`); a tied output head
    /// counts once.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.model.vocab()
    }

    /// Where it runs.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Most tokens held at once.
    pub fn context(&self) -> usize {
        self.model.context()
    }

    /// Token ids that end a turn.
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop_tokens
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// True when the model ships a chat template.
    pub fn has_template(&self) -> bool {
        self.template.is_some()
    }

    /// Renders a conversation with the model's chat template.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, GenerateError> {
        let template = self
            .template
            .as_ref()
            .ok_or_else(|| GenerateError::NoTemplate(self.name.clone()))?;
        Ok(template.render(messages, add_generation_prompt)?)
    }

    /// Tokenizes a rendered prompt (its special tokens are already written out in the text).
    pub fn tokenize_rendered(&self, text: &str) -> Result<Vec<u32>, GenerateError> {
        self.encode(text, false)
    }

    /// Tokenizes raw text as the tokenizer's post-processor would (BOS added where it adds it).
    pub fn tokenize_raw(&self, text: &str) -> Result<Vec<u32>, GenerateError> {
        self.encode(text, true)
    }

    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, GenerateError> {
        let enc = self
            .tokenizer
            .encode(text, add_special)
            .map_err(|e| GenerateError::Tokenize(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Feeds `tokens` after the ones cached in `session` (in chunks of at most 512, llama.cpp's
    /// default micro-batch) and returns the logits that follow the last. Generation and benchmarks
    /// share it.
    pub fn eval(&self, session: &mut Session, tokens: &[u32]) -> Result<Vec<f32>, GenerateError> {
        if session.cached.len() + tokens.len() > self.model.context() {
            return Err(GenerateError::PromptTooLong {
                tokens: session.cached.len() + tokens.len(),
                context: self.model.context(),
            });
        }
        let mut logits = None;
        for chunk in tokens.chunks(PROMPT_CHUNK) {
            logits = Some(
                self.model
                    .forward(&mut session.cache, &mut session.work, chunk)?,
            );
            session.cached.extend_from_slice(chunk);
        }
        logits.ok_or(GenerateError::EmptyPrompt)
    }

    /// Checks `prompt` against the context and `options`, keeps the longest prefix `session`
    /// already holds, and returns the decoder for the reply with the number of prompt tokens
    /// already cached (the rest is still to feed, in chunks of [`PROMPT_CHUNK`]).
    pub(crate) fn begin(
        &self,
        session: &mut Session,
        prompt: &[u32],
        options: &GenerateOptions,
    ) -> Result<(Decoder, usize), GenerateError> {
        options.sampling.validate()?;
        let context = self.model.context();
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        if prompt.len() >= context {
            return Err(GenerateError::PromptTooLong {
                tokens: prompt.len(),
                context,
            });
        }
        // Reuse the cached prefix; always compute at least the last prompt token for its logits.
        let common = session
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt.len() - 1);
        session.cache.truncate(common);
        session.cached.truncate(common);
        let decoder = Decoder {
            sampler: Sampler::new(options.sampling.clone()),
            history: prompt.to_vec(),
            tokens: Vec::new(),
            text: String::new(),
            stream: TextStream::new(),
            stops: StopMatcher::new(&options.stop),
            max_tokens: options.max_tokens,
            prompt_tokens: prompt.len(),
            prompt_evaluated: prompt.len() - common,
            prompt_time: Duration::ZERO,
            passes: 0,
            decode_started: Instant::now(),
        };
        Ok((decoder, common))
    }

    /// Generates a reply to `prompt` (token ids) in `session`, calling `on_text` with each piece of
    /// text as soon as it is complete; `on_text` returning `Break` stops generation.
    pub fn generate(
        &self,
        session: &mut Session,
        prompt: &[u32],
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation, GenerateError> {
        let started = Instant::now();
        let (mut decoder, common) = self.begin(session, prompt, options)?;
        let mut logits = self.eval(session, &prompt[common..])?;
        decoder.prompt_done(started.elapsed());
        loop {
            match decoder.step(self, &mut logits, session.cached.len(), on_text)? {
                Step::Next(token) => {
                    logits = self.eval(session, &[token])?;
                    decoder.passes += 1;
                }
                Step::Finished(stop) => return decoder.finish(self, stop, on_text),
            }
        }
    }
}

/// What a sequence does after a token is picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Feed this token and call [`Decoder::step`] with the logits that follow it.
    Next(u32),
    /// The reply is complete.
    Finished(StopReason),
}

/// One reply being generated: the sampler, the token history the repeat penalty reads, the
/// incremental detokenizer, the stop strings, and the counts and times of the reply.
#[derive(Debug)]
pub(crate) struct Decoder {
    sampler: Sampler,
    history: Vec<u32>,
    tokens: Vec<u32>,
    text: String,
    stream: TextStream,
    stops: StopMatcher,
    max_tokens: Option<usize>,
    prompt_tokens: usize,
    prompt_evaluated: usize,
    prompt_time: Duration,
    /// Forward passes after the prompt.
    pub(crate) passes: usize,
    decode_started: Instant,
}

impl Decoder {
    /// Records that the prompt has been fed (in `time`): generation starts now.
    pub(crate) fn prompt_done(&mut self, time: Duration) {
        self.prompt_time = time;
        self.decode_started = Instant::now();
    }

    /// Picks the next token from `logits` (which follow `cached` positions), emits its text, and
    /// says whether to go on.
    pub(crate) fn step(
        &mut self,
        model: &ChatModel,
        logits: &mut [f32],
        cached: usize,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Step, GenerateError> {
        if self.max_tokens == Some(0) {
            return Ok(Step::Finished(StopReason::MaxTokens));
        }
        if let Some(token) = logits.iter().position(|l| !l.is_finite()) {
            return Err(GenerateError::NonFinite {
                token,
                generated: self.tokens.len(),
            });
        }
        let next = self.sampler.sample(logits, &self.history);
        if model.stop_tokens.contains(&next) {
            return Ok(Step::Finished(StopReason::EndOfTurn));
        }
        self.tokens.push(next);
        self.history.push(next);
        let piece = self.stream.push(&model.tokenizer, next)?;
        let (emit, stopped) = self.stops.push(&piece);
        if !emit.is_empty() {
            self.text.push_str(&emit);
            if on_text(&emit).is_break() {
                return Ok(Step::Finished(StopReason::Cancelled));
            }
        }
        if stopped {
            return Ok(Step::Finished(StopReason::StopString));
        }
        if self.max_tokens.is_some_and(|max| self.tokens.len() >= max) {
            return Ok(Step::Finished(StopReason::MaxTokens));
        }
        if cached >= model.model.context() {
            return Ok(Step::Finished(StopReason::ContextFull));
        }
        Ok(Step::Next(next))
    }

    /// Flushes the text still held back (an incomplete character, a possible stop string) and
    /// returns the reply.
    pub(crate) fn finish(
        mut self,
        model: &ChatModel,
        mut stop: StopReason,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation, GenerateError> {
        let decode_time = self.decode_started.elapsed();
        if !matches!(stop, StopReason::StopString | StopReason::Cancelled) {
            let piece = self.stream.finish(&model.tokenizer)?;
            let (mut emit, stopped) = self.stops.push(&piece);
            if stopped {
                stop = StopReason::StopString;
            } else {
                emit.push_str(&self.stops.finish());
            }
            if !emit.is_empty() {
                self.text.push_str(&emit);
                // Nothing more follows, so a request to stop changes nothing.
                let _ = on_text(&emit);
            }
        }
        Ok(Generation {
            text: self.text,
            tokens: self.tokens,
            prompt_tokens: self.prompt_tokens,
            prompt_evaluated: self.prompt_evaluated,
            prompt_time: self.prompt_time,
            decode_passes: self.passes,
            decode_time,
            stop,
        })
    }
}
