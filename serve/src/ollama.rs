//! The Ollama API: `/api/version`, `/api/tags`, `/api/show`, `/api/ps`, `/api/chat`,
//! `/api/generate`, `/api/embed`, `/api/embeddings`, `/api/pull`.
//!
//! Streaming (NDJSON, one object per line) is the default. Before the final `done: true` line a
//! stream carries one line with empty content, `done: false` and the attestation in a `sanctum`
//! field, which clients that concatenate content ignore; `"stream": false` gives one object with
//! the bundle in `sanctum` and its sha256 in `X-Sanctum-Attestation`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use attest::lockfile::{ModelEntry, Task};
use attest::progress::NoProgress;
use attest::statement::{OutputTask, RequestRecord, rfc3339};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use runner::chat::{GenerateOptions, Generation};
use runner::sampling::SamplingParams;
use runner::template::Message;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{ApiError, parse_body};
use crate::log::{AccessLog, Deferred};
use crate::openai::{async_stream, with_attestation};
use crate::state::{
    AppState, LoadedModel, Prepared, PromptInput, Stamped, blocking, finish_reason,
    truncated_indexes,
};
use crate::{body_error, random_seed};

/// Errors of these routes, in Ollama's shape.
pub struct OllamaError(pub ApiError);

impl From<ApiError> for OllamaError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for OllamaError {
    fn into_response(self) -> Response {
        self.0.ollama()
    }
}

type Result<T> = std::result::Result<T, OllamaError>;

fn now() -> String {
    rfc3339(SystemTime::now())
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// `GET /api/version`.
pub async fn version() -> Response {
    axum::Json(json!({"version": env!("CARGO_PKG_VERSION")})).into_response()
}

fn details(entry: &ModelEntry, quant: Option<String>) -> Value {
    json!({
        "parent_model": "",
        "format": "safetensors",
        "family": entry.architecture,
        "families": [entry.architecture],
        "parameter_size": "",
        "quantization_level": quant.unwrap_or_else(|| "auto".into()),
    })
}

fn tag(entry: &ModelEntry, state: &AppState) -> Value {
    json!({
        "name": entry.name,
        "model": entry.name,
        "modified_at": state.model_time(entry),
        "size": entry.total_size(),
        "digest": entry.digest.to_string(),
        "details": details(entry, state.config.quant.map(|q| q.name().to_owned())),
    })
}

impl AppState {
    /// When the model's store copy was written, or the server start when it is not pulled yet.
    fn model_time(&self, entry: &ModelEntry) -> String {
        let dir = self.config.engine.store().model_dir(entry);
        let time = std::fs::metadata(dir)
            .and_then(|m| m.modified())
            .unwrap_or_else(|_| SystemTime::now());
        rfc3339(time)
    }
}

/// `GET /api/tags`: the approved models offered.
pub async fn tags(State(state): State<Arc<AppState>>) -> Response {
    let models: Vec<Value> = state.offered().iter().map(|e| tag(e, &state)).collect();
    axum::Json(json!({"models": models})).into_response()
}

#[derive(Debug, Deserialize)]
struct ModelRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
}

impl ModelRequest {
    fn model(&self) -> std::result::Result<&str, ApiError> {
        self.model
            .as_deref()
            .or(self.name.as_deref())
            .ok_or_else(|| ApiError::bad_field("model", "model is required"))
    }
}

/// `POST /api/show`.
pub async fn show(
    State(state): State<Arc<AppState>>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let body = body.map_err(body_error)?;
    let request: ModelRequest = parse_body(&body)?;
    let entry = state.entry(request.model()?, None)?.clone();
    let (capabilities, template, info) = match entry.task {
        Task::Chat => {
            let slot = state.chat(&entry.name).await?;
            let model = slot.batcher.model();
            let info = json!({
                "general.architecture": entry.architecture,
                "general.parameter_count": model.parameters(),
                "general.context_length": model.context(),
                "general.quantization": model.quant().name(),
            });
            (json!(["completion"]), String::new(), info)
        }
        Task::Embed => {
            let slot = state.embedder(&entry.name).await?;
            let info = json!({
                "general.architecture": entry.architecture,
                "embedding_length": slot.embedder.dimensions(),
                "context_length": slot.embedder.max_tokens(),
            });
            (json!(["embedding"]), String::new(), info)
        }
    };
    Ok(axum::Json(json!({
        "license": entry.license,
        "modelfile": "",
        "parameters": "",
        "template": template,
        "details": details(&entry, state.config.quant.map(|q| q.name().to_owned())),
        "model_info": info,
        "capabilities": capabilities,
        "modified_at": state.model_time(&entry),
        "sanctum": {"digest": entry.digest.to_string(), "task": entry.task.to_string()},
    }))
    .into_response())
}

/// `GET /api/ps`: the models loaded now.
pub async fn ps(State(state): State<Arc<AppState>>) -> Response {
    let models: Vec<Value> = state
        .loaded()
        .iter()
        .map(|loaded| {
            let (entry, quant, size) = match loaded {
                LoadedModel::Chat(slot) => {
                    let m = slot.batcher.model();
                    (
                        &slot.entry,
                        Some(m.quant().name().to_owned()),
                        m.weight_bytes(),
                    )
                }
                LoadedModel::Embed(slot) => {
                    (&slot.entry, Some("f32".into()), slot.entry.total_size())
                }
            };
            json!({
                "name": entry.name,
                "model": entry.name,
                "size": size,
                "digest": entry.digest.to_string(),
                "details": details(entry, quant),
                "expires_at": "9999-12-31T23:59:59Z",
                "size_vram": 0,
            })
        })
        .collect();
    axum::Json(json!({"models": models})).into_response()
}

/// `options` of chat and generate requests: Ollama's names and defaults.
#[derive(Debug, Default, Deserialize)]
struct Options {
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    num_predict: Option<i64>,
    #[serde(default)]
    stop: Option<Vec<String>>,
    #[serde(default)]
    repeat_penalty: Option<f32>,
    #[serde(default)]
    repeat_last_n: Option<i64>,
    /// Accepted; each sequence's context is the server's (`--ctx`).
    #[serde(default)]
    #[allow(dead_code)]
    num_ctx: Option<i64>,
}

impl Options {
    fn generate(self) -> std::result::Result<GenerateOptions, ApiError> {
        let non_negative = |field: &str, v: Option<i64>, default: usize| match v {
            None => Ok(default),
            Some(n) if n < 0 => Err(ApiError::bad_field(
                &format!("options.{field}"),
                format!("options.{field} must not be negative, not {n}"),
            )),
            Some(n) => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
        };
        let max_tokens = match self.num_predict {
            None | Some(-1 | -2) => None,
            Some(n) if n < 0 => {
                return Err(ApiError::bad_field(
                    "options.num_predict",
                    format!("options.num_predict must be -1 (no limit) or positive, not {n}"),
                ));
            }
            Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        };
        Ok(GenerateOptions {
            max_tokens,
            stop: self.stop.unwrap_or_default(),
            sampling: SamplingParams {
                temperature: self.temperature.unwrap_or(0.8),
                top_k: non_negative("top_k", self.top_k, 40)?,
                top_p: self.top_p.unwrap_or(0.9),
                min_p: self.min_p.unwrap_or(0.0),
                repeat_penalty: self.repeat_penalty.unwrap_or(1.1),
                repeat_last_n: non_negative("repeat_last_n", self.repeat_last_n, 64)?,
                seed: match self.seed {
                    Some(s) => s as u64,
                    None => random_seed(),
                },
            },
        })
    }
}

#[derive(Debug, Deserialize)]
struct OllamaMessage {
    role: String,
    #[serde(default)]
    content: String,
    #[serde(default)]
    images: Option<Vec<Value>>,
}

/// A chat or generate request (one struct for both: `#[serde(flatten)]` would hide the path of a
/// bad field from the error message). The official client sends `format: ""`, `tools: []` and
/// `images: []`, which change nothing; anything else in them is refused.
#[derive(Debug, Deserialize)]
struct GenerateRequest {
    model: String,
    /// `/api/chat`.
    #[serde(default)]
    messages: Vec<OllamaMessage>,
    /// `/api/generate`.
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    raw: bool,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    options: Option<Options>,
    #[serde(default)]
    format: Option<Value>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    images: Option<Vec<Value>>,
}

impl GenerateRequest {
    fn check(&self) -> std::result::Result<(), ApiError> {
        match &self.format {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s.is_empty() => {}
            Some(_) => {
                return Err(ApiError::bad_field(
                    "format",
                    "structured output (format) is not supported",
                ));
            }
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::bad_field("tools", "tool calls are not supported"));
        }
        if self.images.as_ref().is_some_and(|i| !i.is_empty()) {
            return Err(ApiError::bad_field("images", "images are not supported"));
        }
        Ok(())
    }
}

/// Chat or generate: where the text goes in each line.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Chat,
    Generate,
}

impl Kind {
    fn route(self) -> &'static str {
        match self {
            Self::Chat => "/api/chat",
            Self::Generate => "/api/generate",
        }
    }

    fn task(self) -> OutputTask {
        match self {
            Self::Chat => OutputTask::Chat,
            Self::Generate => OutputTask::Run,
        }
    }

    /// One line: `model`, `created_at`, the text, `done`.
    fn line(self, model: &str, text: &str, done: bool) -> Value {
        let mut v = json!({"model": model, "created_at": now(), "done": done});
        if let Some(map) = v.as_object_mut() {
            match self {
                Self::Chat => map.insert(
                    "message".into(),
                    json!({"role": "assistant", "content": text}),
                ),
                Self::Generate => map.insert("response".into(), json!(text)),
            };
        }
        v
    }
}

/// `POST /api/chat`.
pub async fn chat(
    State(state): State<Arc<AppState>>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let clock = Instant::now();
    let body = body.map_err(body_error)?;
    let request: GenerateRequest = parse_body(&body)?;
    request.check()?;
    let options = request.options.unwrap_or_default().generate()?;
    let mut messages = Vec::with_capacity(request.messages.len());
    for (i, m) in request.messages.iter().enumerate() {
        if m.images.as_ref().is_some_and(|v| !v.is_empty()) {
            return Err(ApiError::bad_field(
                &format!("messages[{i}].images"),
                "images are not supported",
            )
            .into());
        }
        if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool") {
            return Err(ApiError::bad_field(
                &format!("messages[{i}].role"),
                format!("unknown role {:?}", m.role),
            )
            .into());
        }
        messages.push(Message::new(m.role.as_str(), m.content.as_str()));
    }
    let slot = state.chat(&request.model).await?;
    if messages.is_empty() {
        // Ollama loads the model and answers `done` for an empty conversation.
        let mut line = Kind::Chat.line(&slot.entry.name, "", true);
        if let Some(map) = line.as_object_mut() {
            map.insert("done_reason".into(), json!("load"));
        }
        return Ok(axum::Json(line).into_response());
    }
    let prepared = state.prepare(slot, PromptInput::Messages(&messages), options, clock)?;
    respond(state, prepared, Kind::Chat, request.stream.unwrap_or(true)).await
}

/// `POST /api/generate`.
pub async fn generate(
    State(state): State<Arc<AppState>>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let clock = Instant::now();
    let body = body.map_err(body_error)?;
    let request: GenerateRequest = parse_body(&body)?;
    request.check()?;
    let options = request.options.unwrap_or_default().generate()?;
    let slot = state.chat(&request.model).await?;
    if request.prompt.is_empty() {
        let mut line = Kind::Generate.line(&slot.entry.name, "", true);
        if let Some(map) = line.as_object_mut() {
            map.insert("done_reason".into(), json!("load"));
        }
        return Ok(axum::Json(line).into_response());
    }
    let input = if request.raw {
        PromptInput::Raw(&request.prompt)
    } else {
        PromptInput::User {
            prompt: &request.prompt,
            system: request.system.as_deref(),
        }
    };
    let prepared = state.prepare(slot, input, options, clock)?;
    respond(
        state,
        prepared,
        Kind::Generate,
        request.stream.unwrap_or(true),
    )
    .await
}

/// The `done` line's counts and durations (nanoseconds); `clock` started when the request came.
fn final_fields(line: &mut Value, clock: &Instant, generation: &Generation) {
    if let Some(map) = line.as_object_mut() {
        map.insert("done_reason".into(), json!(finish_reason(generation.stop)));
        map.insert("total_duration".into(), json!(nanos(clock.elapsed())));
        map.insert("load_duration".into(), json!(0));
        map.insert("prompt_eval_count".into(), json!(generation.prompt_tokens));
        map.insert(
            "prompt_eval_duration".into(),
            json!(nanos(generation.prompt_time)),
        );
        map.insert("eval_count".into(), json!(generation.tokens.len()));
        map.insert("eval_duration".into(), json!(nanos(generation.decode_time)));
    }
}

fn request_record(kind: Kind, stream: bool) -> RequestRecord {
    RequestRecord {
        api: "ollama".into(),
        route: kind.route().into(),
        stream,
        id: None,
    }
}

async fn respond(
    state: Arc<AppState>,
    prepared: Prepared,
    kind: Kind,
    stream: bool,
) -> Result<Response> {
    let mut rx = prepared.start()?;
    let name = prepared.slot.entry.name.clone();
    let prepared_clock = prepared.clock;
    if !stream {
        let (text, generation, stamped) = prepared
            .complete(&state, &mut rx, (kind.task(), request_record(kind, false)))
            .await?;
        let mut line = kind.line(&name, &text, true);
        final_fields(&mut line, &prepared.clock, &generation);
        if let Some(map) = line.as_object_mut() {
            map.insert("sanctum".into(), json!({"attestation": stamped.bundle}));
        }
        return Ok(prepared.json_response(&state, line, &generation, &stamped));
    }
    let events = async_stream(move |tx| async move {
        let ndjson = |v: &Value| Bytes::from(format!("{v}\n"));
        let end = |generation: &Generation, stamped: &Stamped| {
            let mut attestation = kind.line(&name, "", false);
            let mut done = kind.line(&name, "", true);
            if let Some(map) = attestation.as_object_mut() {
                map.insert("sanctum".into(), json!({"attestation": stamped.bundle}));
            }
            final_fields(&mut done, &prepared_clock, generation);
            vec![ndjson(&attestation), ndjson(&done)]
        };
        crate::state::drive_stream(
            state,
            prepared,
            rx,
            tx,
            (kind.task(), request_record(kind, true)),
            (
                |t| ndjson(&kind.line(&name, t, false)),
                end,
                |message| ndjson(&json!({"error": message})),
            ),
        )
        .await;
    });
    let mut response = Response::new(Body::from_stream(events));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    response.extensions_mut().insert(Deferred);
    Ok(response)
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct EmbedRequest {
    model: String,
    #[serde(default)]
    input: Option<Input>,
    /// The older `/api/embeddings` field.
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    dimensions: Option<usize>,
    /// Cut texts longer than the model's input (Ollama's default); false makes them a 400.
    #[serde(default = "yes")]
    truncate: bool,
}

fn yes() -> bool {
    true
}

/// `POST /api/embed` and (with `prompt`, answering `embedding`) the older `/api/embeddings`.
async fn embed_request(state: Arc<AppState>, body: &[u8], legacy: bool) -> Result<Response> {
    let clock = Instant::now();
    let request: EmbedRequest = parse_body(body)?;
    let texts = match (legacy, request.input, request.prompt) {
        (true, _, Some(p)) => vec![p],
        (true, _, None) => return Err(ApiError::bad_field("prompt", "prompt is required").into()),
        (false, Some(Input::One(t)), _) => vec![t],
        (false, Some(Input::Many(v)), _) => v,
        (false, None, _) => return Err(ApiError::bad_field("input", "input is required").into()),
    };
    let slot = state.embedder(&request.model).await?;
    if let Some(d) = request.dimensions
        && d != slot.embedder.dimensions()
    {
        return Err(ApiError::bad_field(
            "dimensions",
            format!(
                "this model's embeddings have {} dimensions, not {d}",
                slot.embedder.dimensions()
            ),
        )
        .into());
    }
    let route = if legacy {
        "/api/embeddings"
    } else {
        "/api/embed"
    };
    let record = RequestRecord {
        api: "ollama".into(),
        route: route.into(),
        stream: false,
        id: None,
    };
    let (embedded, stamped) = state
        .embed(Arc::clone(&slot), texts, request.truncate, record)
        .await?;
    let (vectors, tokens) = (&embedded.vectors, embedded.tokens);
    let attestation = json!({
        "attestation": stamped.bundle,
        "truncated": truncated_indexes(&embedded.truncated),
    });
    let body = if legacy {
        json!({"embedding": vectors.first(), "sanctum": attestation})
    } else {
        json!({
            "model": slot.entry.name,
            "embeddings": vectors,
            "total_duration": nanos(clock.elapsed()),
            "load_duration": 0,
            "prompt_eval_count": tokens,
            "sanctum": attestation,
        })
    };
    let log = AccessLog::embedding(&slot.entry.name, tokens, &stamped);
    Ok(with_attestation(
        axum::Json(body).into_response(),
        &stamped,
        log,
    ))
}

/// `POST /api/embed`.
pub async fn embed(
    State(state): State<Arc<AppState>>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let body = body.map_err(body_error)?;
    embed_request(state, &body, false).await
}

/// `POST /api/embeddings` (the older route).
pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let body = body.map_err(body_error)?;
    embed_request(state, &body, true).await
}

/// `POST /api/pull`: an approved model is pulled through the verified store; anything else is
/// refused with 404 naming the approved models.
pub async fn pull(
    State(state): State<Arc<AppState>>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let body = body.map_err(body_error)?;
    let request: ModelRequest = parse_body(&body)?;
    let entry = state.entry(request.model()?, None)?.clone();
    let total = entry.total_size();
    let worker = Arc::clone(&state);
    let pulled = entry.clone();
    blocking(move || {
        worker
            .config
            .engine
            .ensure_pulled(&pulled, &NoProgress)
            .map_err(|e| ApiError::internal(format!("cannot pull {}: {e}", pulled.name)))
    })
    .await?;
    let lines = [
        json!({"status": "pulling manifest"}),
        json!({"status": format!("pulling {}", entry.digest), "digest": format!("sha256:{}", entry.digest), "total": total, "completed": total}),
        json!({"status": "verifying sha256 digest"}),
        json!({"status": "success"}),
    ];
    if request.stream == Some(false) {
        return Ok(axum::Json(json!({"status": "success"})).into_response());
    }
    let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let mut response = Response::new(Body::from(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(response)
}
