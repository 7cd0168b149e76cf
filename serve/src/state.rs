//! What every route shares: the configuration, the models loaded on first use (one batch thread
//! per chat model), request preparation (template, tokens, limits), and per-response stamping.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use attest::audit::{Event as AuditEvent, Outcome};
use attest::lockfile::{ModelEntry, Task};
use attest::stamp::{OutputRecord, Stamper};
use attest::statement::{OutputTask, RequestRecord};
use attest::{Sha256Digest, progress::NoProgress};
use axum::response::IntoResponse as _;
use runner::batch::{Batcher, Event, Job, Limits};
use runner::chat::{GenerateError, GenerateOptions, Generation, LoadOptions, StopReason};
use runner::embed::{EmbedError, Embedded, Embedder};
use runner::engine::{Embeddings, Engine, EngineError, Reply, Runtime};
use runner::kernels::Activations;
use runner::models::llama::KvPrecision;
use runner::quant::Quant;
use runner::template::Message;
use tokio::sync::{OnceCell, mpsc};

use crate::error::ApiError;

/// Which approved models the server offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSelection {
    /// Every model of the lock.
    All,
    /// These, by lock name.
    Only(Vec<String>),
}

/// How `sanctum serve` runs.
#[derive(Debug)]
pub struct ServeConfig {
    /// The approved models and the store.
    pub engine: Engine,
    /// Where inference runs.
    pub runtime: Runtime,
    /// Which of the lock's models are offered.
    pub models: ModelSelection,
    /// Weight format of chat models; None: by size, as `run --quant auto`.
    pub quant: Option<Quant>,
    /// How sanctum's CPU kernels quantize activations; None: as `run` does by default.
    pub activations: Option<Activations>,
    /// What the key/value caches hold on sanctum's CPU path.
    pub kv_cache: KvPrecision,
    /// Context of each sequence; None: the model's own, at most [`DEFAULT_CONTEXT`].
    pub context: Option<usize>,
    /// Active sequences and waiting requests per chat model.
    pub limits: Limits,
    /// The most tokens one reply may ask for (and what a request without a limit gets).
    pub max_tokens: usize,
    /// Largest request body, in bytes.
    pub body_limit: usize,
    /// Bearer token every request must carry, when set.
    pub api_key: Option<String>,
    /// Load the offered models before accepting requests.
    pub preload: bool,
    /// Put prompts in the access log.
    pub log_prompts: bool,
    /// Signs each response's attestation.
    pub stamper: Stamper,
    /// sanctum's home: the attestation store is `<home>/attestations/`.
    pub home: PathBuf,
    /// How long in-flight responses may take to finish after SIGINT/SIGTERM.
    pub shutdown_grace: Duration,
}

/// The context a sequence gets when neither `--ctx` nor a smaller model maximum says otherwise:
/// Ollama's default, so `--parallel` sequences fit a laptop's memory.
pub const DEFAULT_CONTEXT: usize = 4096;

/// A chat model being served.
pub struct ChatSlot {
    /// Its lock entry.
    pub entry: ModelEntry,
    /// The batch scheduler running it.
    pub batcher: Batcher,
}

/// An embedding model being served.
pub struct EmbedSlot {
    /// Its lock entry.
    pub entry: ModelEntry,
    /// The model (shared by concurrent requests).
    pub embedder: Embedder,
}

/// A loaded model of either task, as `/api/ps` lists them.
pub enum LoadedModel {
    /// A chat model.
    Chat(Arc<ChatSlot>),
    /// An embedding model.
    Embed(Arc<EmbedSlot>),
}

type Cell<T> = Arc<OnceCell<Arc<T>>>;

/// The server's shared state.
pub struct AppState {
    /// The configuration.
    pub config: ServeConfig,
    chat: Mutex<HashMap<String, Cell<ChatSlot>>>,
    embed: Mutex<HashMap<String, Cell<EmbedSlot>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl AppState {
    /// State over `config`; nothing is loaded yet.
    pub fn new(config: ServeConfig) -> Self {
        Self {
            config,
            chat: Mutex::new(HashMap::new()),
            embed: Mutex::new(HashMap::new()),
        }
    }

    /// The lock entries offered, in lock order.
    pub fn offered(&self) -> Vec<&ModelEntry> {
        self.config
            .engine
            .lock()
            .models
            .iter()
            .filter(|m| match &self.config.models {
                ModelSelection::All => true,
                ModelSelection::Only(names) => names.contains(&m.name),
            })
            .collect()
    }

    /// The offered model called `name` (an Ollama-style `:latest` tag is accepted), for `task`:
    /// 404 naming the offered models when there is none, 400 when it is of the other task.
    pub fn entry(&self, name: &str, task: Option<Task>) -> Result<&ModelEntry, ApiError> {
        let bare = name.strip_suffix(":latest").unwrap_or(name);
        let offered = self.offered();
        let Some(entry) = offered.iter().find(|m| m.name == bare) else {
            let names: Vec<&str> = offered.iter().map(|m| m.name.as_str()).collect();
            let message = if name.is_empty() {
                format!(
                    "no model named: the approved models are {}",
                    names.join(", ")
                )
            } else {
                format!(
                    "model {name:?} is not approved here: the approved models are {}",
                    names.join(", ")
                )
            };
            self.record_refusal(bare, true, &message);
            return Err(ApiError {
                param: Some("model".into()),
                ..ApiError::not_found(message)
            });
        };
        if let Some(task) = task
            && entry.task != task
        {
            let what = match entry.task {
                Task::Chat => "a chat model: use a chat or generate route",
                Task::Embed => "an embedding model: use an embeddings route",
            };
            return Err(ApiError::bad_field(
                "model",
                format!("model {bare:?} is {what}"),
            ));
        }
        Ok(entry)
    }

    /// The chat model `name`, loaded on first use (concurrent first requests wait for one load).
    pub async fn chat(self: &Arc<Self>, name: &str) -> Result<Arc<ChatSlot>, ApiError> {
        let entry = self.entry(name, Some(Task::Chat))?.clone();
        let cell = Arc::clone(lock(&self.chat).entry(entry.name.clone()).or_default());
        let state = Arc::clone(self);
        cell.get_or_try_init(|| async move { blocking(move || state.load_chat(entry)).await })
            .await
            .cloned()
    }

    /// The embedding model `name`, loaded on first use.
    pub async fn embedder(self: &Arc<Self>, name: &str) -> Result<Arc<EmbedSlot>, ApiError> {
        let entry = self.entry(name, Some(Task::Embed))?.clone();
        let cell = Arc::clone(lock(&self.embed).entry(entry.name.clone()).or_default());
        let state = Arc::clone(self);
        cell.get_or_try_init(|| async move { blocking(move || state.load_embedder(entry)).await })
            .await
            .cloned()
    }

    /// Loads every offered model (`--preload`).
    pub async fn preload(self: &Arc<Self>) -> Result<(), ApiError> {
        let offered: Vec<(String, Task)> = self
            .offered()
            .iter()
            .map(|m| (m.name.clone(), m.task))
            .collect();
        for (name, task) in offered {
            match task {
                Task::Chat => drop(self.chat(&name).await?),
                Task::Embed => drop(self.embedder(&name).await?),
            }
        }
        Ok(())
    }

    /// The models loaded now, by name.
    pub fn loaded(&self) -> Vec<LoadedModel> {
        let mut out: Vec<LoadedModel> = lock(&self.chat)
            .values()
            .filter_map(|c| c.get().cloned().map(LoadedModel::Chat))
            .collect();
        out.extend(
            lock(&self.embed)
                .values()
                .filter_map(|c| c.get().cloned().map(LoadedModel::Embed)),
        );
        out
    }

    /// Lets every batch thread finish its accepted requests and stop.
    pub fn shutdown(&self) {
        for cell in lock(&self.chat).values() {
            if let Some(slot) = cell.get() {
                slot.batcher.shutdown();
            }
        }
    }

    /// A model that failed to load: 500, and an audit entry (a refusal when a check said no).
    fn load_error(&self, entry: &ModelEntry, e: EngineError) -> ApiError {
        let message = format!("cannot load the model: {e}");
        self.record_refusal(&entry.name, e.is_refusal(), &message);
        ApiError::internal(message)
    }

    /// Logs a request the server refused (a check said no) or failed.
    fn record_refusal(&self, model: &str, refused: bool, detail: &str) {
        let outcome = if refused {
            Outcome::Refused
        } else {
            Outcome::Error
        };
        let event = AuditEvent {
            event: "serve".into(),
            command: "sanctum serve".into(),
            model: Some(model.to_owned()),
            outcome,
            detail: Some(detail.to_owned()),
            ..AuditEvent::default()
        };
        if let Err(e) = self.config.stamper.record(&event) {
            log(&format!("this refusal is not in the audit log: {e}"));
        }
    }

    fn load_chat(&self, entry: ModelEntry) -> Result<Arc<ChatSlot>, ApiError> {
        // Without --ctx: the model's own context, capped so that `--parallel` caches fit.
        let options = LoadOptions {
            quant: self.config.quant,
            activations: self.config.activations,
            device: self.config.runtime.device.clone(),
            context: self.config.context,
            context_cap: Some(DEFAULT_CONTEXT),
            kv_cache: self.config.kv_cache,
        };
        let loaded = self
            .config
            .engine
            .load_chat(&entry.name, &options, &NoProgress)
            .map_err(|e| self.load_error(&entry, e))?;
        let model = Arc::new(loaded.model);
        log(&format!(
            "loaded {} ({}, context {}) in {:.2} s",
            entry.name,
            model.arithmetic(),
            model.context(),
            loaded.load_time.as_secs_f64()
        ));
        Ok(Arc::new(ChatSlot {
            batcher: Batcher::new(model, self.config.limits),
            entry,
        }))
    }

    fn load_embedder(&self, entry: ModelEntry) -> Result<Arc<EmbedSlot>, ApiError> {
        let loaded = self
            .config
            .engine
            .load_embedder(&entry.name, &self.config.runtime.device, &NoProgress)
            .map_err(|e| self.load_error(&entry, e))?;
        log(&format!(
            "loaded {} in {:.2} s",
            entry.name,
            loaded.load_time.as_secs_f64()
        ));
        Ok(Arc::new(EmbedSlot {
            entry,
            embedder: loaded.model,
        }))
    }

    /// Signs an output's attestation and puts it in the attestation store.
    pub fn stamp(&self, record: &OutputRecord<'_>) -> Result<Stamped, ApiError> {
        let stamp = self
            .config
            .stamper
            .stamp(record)
            .map_err(|e| ApiError::internal(format!("cannot sign the attestation: {e}")))?;
        runner::engine::store_stamp(&self.config.home, &stamp).map_err(|e| {
            ApiError::internal(format!("cannot write the attestation into the store: {e}"))
        })?;
        let bundle: serde_json::Value = serde_json::from_slice(&stamp.json)
            .map_err(|e| ApiError::internal(format!("attestation bundle: {e}")))?;
        Ok(Stamped {
            bundle,
            bundle_sha256: stamp.bundle_sha256,
        })
    }
}

/// An attestation made for a response.
#[derive(Debug, Clone)]
pub struct Stamped {
    /// The Sigstore bundle.
    pub bundle: serde_json::Value,
    /// sha256 of the bundle file (the `X-Sanctum-Attestation` header).
    pub bundle_sha256: Sha256Digest,
}

/// A line on stderr, the server's log.
pub fn log(line: &str) {
    eprintln!("sanctum serve: {line}");
}

/// Runs blocking work (loading, hashing, embedding) off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(ApiError::internal(format!("worker failed: {e}"))))
}

/// What a prompt is made of.
pub enum PromptInput<'a> {
    /// A conversation, rendered with the model's chat template.
    Messages(&'a [Message]),
    /// Text through the template as one user turn (Ollama `generate` without `raw`), with an
    /// optional system message.
    User {
        /// The user's text.
        prompt: &'a str,
        /// A system message before it.
        system: Option<&'a str>,
    },
    /// Text as is (OpenAI completions, Ollama `raw`).
    Raw(&'a str),
}

/// A request ready to run: rendered, tokenized and checked.
pub struct Prepared {
    /// The model.
    pub slot: Arc<ChatSlot>,
    /// The rendered prompt.
    pub rendered: String,
    /// Its tokens.
    pub tokens: Vec<u32>,
    /// Generation settings.
    pub options: GenerateOptions,
    /// When the request arrived.
    pub started: SystemTime,
    /// For the durations Ollama reports.
    pub clock: Instant,
}

impl AppState {
    /// Renders and tokenizes `input` and checks the limits, so that every refusal is a clean 400
    /// before any response starts.
    pub fn prepare(
        &self,
        slot: Arc<ChatSlot>,
        input: PromptInput<'_>,
        mut options: GenerateOptions,
        clock: Instant,
    ) -> Result<Prepared, ApiError> {
        let model = slot.batcher.model();
        let ceiling = self.config.max_tokens;
        match options.max_tokens {
            Some(n) if n > ceiling => {
                return Err(ApiError::bad_field(
                    "max_tokens",
                    format!("max_tokens {n} is above this server's limit of {ceiling}"),
                ));
            }
            None => options.max_tokens = Some(ceiling),
            Some(_) => {}
        }
        options
            .sampling
            .validate()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let generate_error = |e: GenerateError| ApiError::bad_request(e.to_string());
        let (rendered, tokens) = match input {
            PromptInput::Messages(messages) => {
                if messages.is_empty() {
                    return Err(ApiError::bad_field("messages", "messages is empty"));
                }
                let rendered = model.render(messages, true).map_err(generate_error)?;
                let tokens = model.tokenize_rendered(&rendered).map_err(generate_error)?;
                (rendered, tokens)
            }
            PromptInput::User { prompt, system } => {
                let mut messages: Vec<Message> = system
                    .map(|s| Message::new("system", s))
                    .into_iter()
                    .collect();
                messages.push(Message::new("user", prompt));
                let rendered = model.render(&messages, true).map_err(generate_error)?;
                let tokens = model.tokenize_rendered(&rendered).map_err(generate_error)?;
                (rendered, tokens)
            }
            PromptInput::Raw(text) => {
                let tokens = model.tokenize_raw(text).map_err(generate_error)?;
                (text.to_owned(), tokens)
            }
        };
        if tokens.is_empty() {
            return Err(ApiError::bad_request("the prompt is empty"));
        }
        if tokens.len() >= model.context() {
            return Err(ApiError::bad_request(format!(
                "the prompt has {} tokens, but the context holds {} (with room for at least one more): shorten it",
                tokens.len(),
                model.context()
            )));
        }
        Ok(Prepared {
            slot,
            rendered,
            tokens,
            options,
            started: SystemTime::now(),
            clock,
        })
    }
}

/// A piece of a reply as it reaches the async side.
#[derive(Debug)]
pub enum Piece {
    /// Text.
    Text(String),
    /// The end.
    Done(Result<Generation, GenerateError>),
}

impl Prepared {
    /// Queues the request on the model's batcher; 503 when it is full. Pieces arrive on the
    /// returned channel; dropping it cancels the reply at the next step.
    pub fn start(&self) -> Result<mpsc::UnboundedReceiver<Piece>, ApiError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let sink = Box::new(move |event: Event<'_>| {
            let piece = match event {
                Event::Text(t) => Piece::Text(t.to_owned()),
                Event::Done(result) => Piece::Done(result),
            };
            if tx.send(piece).is_err() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        self.slot
            .batcher
            .submit(Job {
                prompt: self.tokens.clone(),
                options: self.options.clone(),
                sink,
            })
            .map_err(|busy| ApiError::busy(busy.to_string()))?;
        Ok(rx)
    }

    /// The attestation of a finished reply whose returned text is `text`.
    pub fn stamp(
        &self,
        state: &AppState,
        task: OutputTask,
        text: &str,
        generation: &Generation,
        request: &RequestRecord,
    ) -> Result<Stamped, ApiError> {
        let reply = Reply {
            task,
            options: &self.options,
            prompt: &self.rendered,
            bytes: text.as_bytes(),
            generation,
            started: self.started,
            request: Some(request),
        };
        let model = self.slot.batcher.model();
        state.stamp(&reply.record(model, &self.slot.entry, &state.config.runtime))
    }
}

/// Streams one reply to `tx`: each text piece as `text_frame(piece)`; once the reply is complete,
/// its attestation is made and `end_frames` gives the closing frames (finish, usage, attestation,
/// done). A failure is logged and sent as `error_frame(message)`; a client that went away
/// (`tx` closed) ends the reply at its next token by dropping `rx`.
pub async fn drive_stream(
    state: Arc<AppState>,
    prepared: Prepared,
    mut rx: mpsc::UnboundedReceiver<Piece>,
    tx: mpsc::Sender<axum::body::Bytes>,
    (task, request): (OutputTask, RequestRecord),
    (text_frame, end_frames, error_frame): (
        impl Fn(&str) -> axum::body::Bytes,
        impl FnOnce(&Generation, &Stamped) -> Vec<axum::body::Bytes>,
        impl Fn(&str) -> axum::body::Bytes,
    ),
) {
    let mut text = String::new();
    let outcome = loop {
        match rx.recv().await {
            Some(Piece::Text(t)) => {
                text.push_str(&t);
                if tx.send(text_frame(&t)).await.is_err() {
                    return;
                }
            }
            Some(Piece::Done(result)) => break result,
            None => return,
        }
    };
    let stamped = match outcome {
        Ok(g) if g.stop == StopReason::Cancelled => return,
        Ok(g) => prepared
            .stamp(&state, task, &text, &g, &request)
            .map(|stamped| (g, stamped)),
        Err(e) => Err(generation_error(&e)),
    };
    match stamped {
        Ok((generation, stamped)) => {
            for frame in end_frames(&generation, &stamped) {
                if tx.send(frame).await.is_err() {
                    return;
                }
            }
            crate::log::AccessLog::reply(
                &generation,
                &stamped,
                &prepared,
                state.config.log_prompts,
            )
            .print_streamed(&request.route, prepared.clock);
        }
        Err(e) => {
            crate::log::stream_failed(&prepared, &e);
            let _ = tx.send(error_frame(&e.message)).await;
        }
    }
}

impl Prepared {
    /// Waits for the whole reply and stamps it (non-stream responses).
    pub async fn complete(
        &self,
        state: &AppState,
        rx: &mut mpsc::UnboundedReceiver<Piece>,
        (task, request): (OutputTask, RequestRecord),
    ) -> Result<(String, Generation, Stamped), ApiError> {
        let mut text = String::new();
        while let Some(piece) = rx.recv().await {
            match piece {
                Piece::Text(t) => text.push_str(&t),
                Piece::Done(Ok(generation)) => {
                    let stamped = self.stamp(state, task, &text, &generation, &request)?;
                    return Ok((text, generation, stamped));
                }
                Piece::Done(Err(e)) => return Err(generation_error(&e)),
            }
        }
        Err(ApiError::internal("the reply ended without a result"))
    }

    /// A non-stream reply: its JSON `body`, the attestation header and the access-log fields.
    pub fn json_response(
        &self,
        state: &AppState,
        body: serde_json::Value,
        generation: &Generation,
        stamped: &Stamped,
    ) -> axum::response::Response {
        let log = crate::log::AccessLog::reply(generation, stamped, self, state.config.log_prompts);
        crate::openai::with_attestation(axum::Json(body).into_response(), stamped, log)
    }
}

/// A generation failure as a response status.
pub fn generation_error(e: &GenerateError) -> ApiError {
    match e {
        GenerateError::PromptTooLong { .. }
        | GenerateError::EmptyPrompt
        | GenerateError::Sampling(_)
        | GenerateError::Template(_)
        | GenerateError::Tokenize(_) => ApiError::bad_request(e.to_string()),
        GenerateError::Stopped => ApiError::busy(e.to_string()),
        _ => ApiError::internal(e.to_string()),
    }
}

/// `stop` or `length`, as both APIs name why a reply ended.
pub fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        _ => "stop",
    }
}

/// The indexes of the texts that were cut to fit, for a response's `sanctum.truncated`.
pub fn truncated_indexes(truncated: &[bool]) -> Vec<usize> {
    truncated
        .iter()
        .enumerate()
        .filter_map(|(i, &cut)| cut.then_some(i))
        .collect()
}

/// An embedding request's output as an attestation covers it: the vectors as little-endian f32,
/// one after the other (the bytes `encoding_format: "base64"` carries per vector).
pub fn embedding_bytes(vectors: &[Vec<f32>]) -> Vec<u8> {
    vectors
        .iter()
        .flatten()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

impl AppState {
    /// Embeds `texts` on a worker thread and stamps the result. A text longer than the model's
    /// input is cut to fit (and says so in [`Embedded::truncated`]), or with `truncate` false
    /// answered 400.
    pub async fn embed(
        &self,
        slot: Arc<EmbedSlot>,
        texts: Vec<String>,
        truncate: bool,
        request: RequestRecord,
    ) -> Result<(Embedded, Stamped), ApiError> {
        if texts.is_empty() {
            return Err(ApiError::bad_field("input", "input is empty"));
        }
        let started = SystemTime::now();
        let worker = Arc::clone(&slot);
        let inputs = texts.clone();
        let embedded = blocking(move || {
            worker
                .embedder
                .embed_counted(&inputs, truncate)
                .map_err(|e| match e {
                    EmbedError::TooLong { .. } => ApiError::bad_field("truncate", e.to_string()),
                    e => ApiError::internal(e.to_string()),
                })
        })
        .await?;
        let bytes = embedding_bytes(&embedded.vectors);
        let texts = texts.join("\n");
        let embeddings = Embeddings {
            bytes: &bytes,
            texts: &texts,
            tokens: embedded.tokens,
            started,
            request: Some(&request),
        };
        let stamped = self.stamp(&OutputRecord {
            name: "response",
            ..embeddings.record(&slot.entry, &self.config.runtime)
        })?;
        Ok((embedded, stamped))
    }
}
