//! The OpenAI API: `/v1/models`, `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`.
//!
//! Streams are `text/event-stream`: `data: <chunk>` events, the role in the first delta, the
//! finish reason on the last content chunk, a usage chunk with `stream_options.include_usage`,
//! then the attestation (`event: sanctum.attestation`, a chunk with no choices and a `sanctum`
//! field) and `data: [DONE]`. Non-stream responses carry the bundle in a `sanctum` field and its
//! sha256 in `X-Sanctum-Attestation`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use attest::statement::{OutputTask, RequestRecord};
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use runner::chat::{GenerateOptions, Generation};
use runner::sampling::SamplingParams;
use runner::template::Message;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{ApiError, parse_body};
use crate::log::{AccessLog, Deferred};
use crate::state::{AppState, Prepared, PromptInput, Stamped, finish_reason, truncated_indexes};
use crate::{ATTESTATION_HEADER, body_error, random_seed};

/// Errors of these routes, in OpenAI's shape.
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        self.0.openai()
    }
}

type Result<T> = std::result::Result<T, OpenAiError>;

fn created() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn model_object(name: &str) -> Value {
    json!({"id": name, "object": "model", "created": 0, "owned_by": "sanctum"})
}

/// `GET /v1/models`.
pub async fn models(State(state): State<Arc<AppState>>) -> Response {
    let data: Vec<Value> = state
        .offered()
        .iter()
        .map(|m| model_object(&m.name))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/models/{model}`.
pub async fn model(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Response> {
    let entry = state.entry(&name, None)?;
    Ok(axum::Json(model_object(&entry.name)).into_response())
}

/// `content`: a string, or parts of which the text ones are joined.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// `stop`: one string or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// A chat or text completion request (one struct for both: `#[serde(flatten)]` would hide the
/// path of a bad field from the error message).
#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: String,
    /// Chat completions.
    #[serde(default)]
    messages: Option<Vec<ChatMessage>>,
    /// Text completions.
    #[serde(default)]
    prompt: Option<PromptField>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    n: Option<i64>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    logit_bias: Option<serde_json::Map<String, Value>>,
}

impl CompletionRequest {
    /// The generation options; OpenAI's defaults are temperature 1 and top-p 1, no top-k.
    fn options(&mut self) -> std::result::Result<(GenerateOptions, bool, bool), ApiError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::bad_field("n", "only n = 1 is supported"));
        }
        for (name, value) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(ApiError::bad_field(
                    name,
                    format!("{name} is not supported"),
                ));
            }
        }
        if self.logprobs == Some(true) {
            return Err(ApiError::bad_field(
                "logprobs",
                "logprobs are not supported",
            ));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::bad_field("tools", "tool calls are not supported"));
        }
        match &self.response_format {
            None | Some(Value::Null) => {}
            Some(f) if f["type"] == "text" => {}
            Some(_) => {
                return Err(ApiError::bad_field(
                    "response_format",
                    "structured output (response_format other than text) is not supported",
                ));
            }
        }
        if self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return Err(ApiError::bad_field(
                "logit_bias",
                "logit_bias is not supported",
            ));
        }
        let max = match (self.max_completion_tokens, self.max_tokens) {
            (Some(n), _) => Some(("max_completion_tokens", n)),
            (None, Some(n)) => Some(("max_tokens", n)),
            (None, None) => None,
        };
        let max_tokens = match max {
            Some((field, n)) if n < 1 => {
                return Err(ApiError::bad_field(
                    field,
                    format!("{field} must be at least 1, not {n}"),
                ));
            }
            Some((_, n)) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            None => None,
        };
        let seed = match self.seed {
            Some(s) => s as u64,
            None => random_seed(),
        };
        let options = GenerateOptions {
            max_tokens,
            stop: self.stop.take().map(Stop::into_vec).unwrap_or_default(),
            sampling: SamplingParams {
                temperature: self.temperature.unwrap_or(1.0),
                top_k: 0,
                top_p: self.top_p.unwrap_or(1.0),
                min_p: 0.0,
                repeat_penalty: 1.0,
                repeat_last_n: 64,
                seed,
            },
        };
        let usage = self
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage);
        Ok((options, self.stream, usage))
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptField {
    One(String),
    Many(Vec<String>),
}

fn messages(list: Vec<ChatMessage>) -> std::result::Result<Vec<Message>, ApiError> {
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.into_iter().enumerate() {
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.into_iter().enumerate() {
                    match (part.kind.as_str(), part.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(ApiError::bad_field(
                                &format!("messages[{i}].content[{j}]"),
                                format!(
                                    "content parts of type {kind:?} are not supported (text only)"
                                ),
                            ));
                        }
                    }
                }
                text
            }
        };
        if !matches!(
            m.role.as_str(),
            "system" | "developer" | "user" | "assistant" | "tool"
        ) {
            return Err(ApiError::bad_field(
                &format!("messages[{i}].role"),
                format!("unknown role {:?}", m.role),
            ));
        }
        let role = if m.role == "developer" {
            "system"
        } else {
            m.role.as_str()
        };
        out.push(Message::new(role, content));
    }
    Ok(out)
}

/// What differs between chat and text completions in the response.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Chat,
    Text,
}

impl Kind {
    fn route(self) -> &'static str {
        match self {
            Self::Chat => "/v1/chat/completions",
            Self::Text => "/v1/completions",
        }
    }

    fn task(self) -> OutputTask {
        match self {
            Self::Chat => OutputTask::Chat,
            Self::Text => OutputTask::Run,
        }
    }
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let clock = Instant::now();
    let body = body.map_err(body_error)?;
    let mut request: CompletionRequest = parse_body(&body)?;
    let (options, stream, usage) = request.options()?;
    let list = request
        .messages
        .take()
        .ok_or_else(|| ApiError::bad_field("messages", "missing field `messages`"))?;
    let messages = messages(list)?;
    let slot = state.chat(&request.model).await?;
    let prepared = state.prepare(slot, PromptInput::Messages(&messages), options, clock)?;
    respond(state, prepared, Kind::Chat, stream, usage).await
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let clock = Instant::now();
    let body = body.map_err(body_error)?;
    let mut request: CompletionRequest = parse_body(&body)?;
    let (options, stream, usage) = request.options()?;
    let prompt = match request.prompt.take() {
        None => return Err(ApiError::bad_field("prompt", "missing field `prompt`").into()),
        Some(prompt) => prompt,
    };
    let prompt = match prompt {
        PromptField::One(p) => p,
        PromptField::Many(mut list) if list.len() == 1 => list.remove(0),
        PromptField::Many(_) => {
            return Err(ApiError::bad_field("prompt", "give one prompt (n = 1 only)").into());
        }
    };
    let slot = state.chat(&request.model).await?;
    let prepared = state.prepare(slot, PromptInput::Raw(&prompt), options, clock)?;
    respond(state, prepared, Kind::Text, stream, usage).await
}

fn request_record(kind: Kind, stream: bool, id: &str) -> RequestRecord {
    RequestRecord {
        api: "openai".into(),
        route: kind.route().into(),
        stream,
        id: Some(id.to_owned()),
    }
}

fn usage_json(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

async fn respond(
    state: Arc<AppState>,
    prepared: Prepared,
    kind: Kind,
    stream: bool,
    usage: bool,
) -> Result<Response> {
    let id = match kind {
        Kind::Chat => format!("chatcmpl-{}", crate::response_id()),
        Kind::Text => format!("cmpl-{}", crate::response_id()),
    };
    let mut rx = prepared.start()?;
    let model_name = prepared.slot.entry.name.clone();
    if !stream {
        let (text, generation, stamped) = prepared
            .complete(
                &state,
                &mut rx,
                (kind.task(), request_record(kind, false, &id)),
            )
            .await?;
        let reason = finish_reason(generation.stop);
        let choice = match kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": reason,
            }),
            Kind::Text => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": reason})
            }
        };
        let object = match kind {
            Kind::Chat => "chat.completion",
            Kind::Text => "text_completion",
        };
        let body = json!({
            "id": id,
            "object": object,
            "created": created(),
            "model": model_name,
            "system_fingerprint": crate::fingerprint(),
            "choices": [choice],
            "usage": usage_json(generation.prompt_tokens, generation.tokens.len()),
            "sanctum": {"attestation": stamped.bundle},
        });
        return Ok(prepared.json_response(&state, body, &generation, &stamped));
    }

    let created = created();
    let stream_id = id.clone();
    let chunk = move |choices: Value, extra: Option<(&str, Value)>| {
        let object = match kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Text => "text_completion",
        };
        let mut c = json!({
            "id": id,
            "object": object,
            "created": created,
            "model": model_name,
            "system_fingerprint": crate::fingerprint(),
            "choices": choices,
        });
        if let (Some((key, value)), Some(map)) = (extra, c.as_object_mut()) {
            map.insert(key.to_owned(), value);
        }
        c
    };
    let delta = move |text: &str, first: bool, reason: Option<&str>| match kind {
        Kind::Chat => {
            let delta = if first {
                json!({"role": "assistant", "content": text})
            } else if reason.is_some() {
                json!({})
            } else {
                json!({"content": text})
            };
            json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": reason}])
        }
        Kind::Text => {
            json!([{"index": 0, "text": text, "logprobs": null, "finish_reason": reason}])
        }
    };
    let events = async_stream(move |tx| async move {
        let data = |v: &Value| Bytes::from(format!("data: {v}\n\n"));
        if matches!(kind, Kind::Chat) {
            // The role first, as OpenAI does, so clients see the reply start at once.
            if tx
                .send(data(&chunk(delta("", true, None), None)))
                .await
                .is_err()
            {
                return;
            }
        }
        let end = |generation: &Generation, stamped: &Stamped| {
            let reason = finish_reason(generation.stop);
            let mut frames = vec![data(&chunk(delta("", false, Some(reason)), None))];
            if usage {
                let u = usage_json(generation.prompt_tokens, generation.tokens.len());
                frames.push(data(&chunk(json!([]), Some(("usage", u)))));
            }
            let event = chunk(
                json!([]),
                Some(("sanctum", json!({"attestation": stamped.bundle}))),
            );
            frames.push(Bytes::from(format!(
                "event: sanctum.attestation\ndata: {event}\n\n"
            )));
            frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
            frames
        };
        crate::state::drive_stream(
            state,
            prepared,
            rx,
            tx,
            (kind.task(), request_record(kind, true, &stream_id)),
            (
                |t| data(&chunk(delta(t, false, None), None)),
                end,
                |message| data(&json!({"error": {"message": message, "type": "server_error"}})),
            ),
        )
        .await;
    });
    let mut response = Response::new(Body::from_stream(events));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response.extensions_mut().insert(Deferred);
    Ok(response)
}

/// Adds the `X-Sanctum-Attestation` header and the access-log fields.
pub fn with_attestation(mut response: Response, stamped: &Stamped, log: AccessLog) -> Response {
    if let Ok(value) = HeaderValue::from_str(&format!("sha256:{}", stamped.bundle_sha256)) {
        response.headers_mut().insert(ATTESTATION_HEADER, value);
    }
    response.extensions_mut().insert(log);
    response
}

/// A body stream fed by a task through a small channel: the task stops when the client goes.
pub fn async_stream<F, Fut>(
    produce: F,
) -> impl futures_util::Stream<Item = std::result::Result<Bytes, Infallible>> + Send
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(produce(tx));
    futures_util::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok)
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct EmbeddingRequest {
    model: String,
    input: EmbeddingInput,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<usize>,
}

/// `POST /v1/embeddings`.
pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let body = body.map_err(body_error)?;
    let request: EmbeddingRequest = parse_body(&body)?;
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_field(
                "encoding_format",
                format!("encoding_format {other:?} is not supported (float or base64)"),
            )
            .into());
        }
    };
    let texts = match request.input {
        EmbeddingInput::One(t) => vec![t],
        EmbeddingInput::Many(v) => v,
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
    let record = RequestRecord {
        api: "openai".into(),
        route: "/v1/embeddings".into(),
        stream: false,
        id: None,
    };
    // Texts longer than the model's input are cut, as sentence-transformers cuts them; the
    // response names them under `sanctum.truncated`.
    let (embedded, stamped) = state.embed(Arc::clone(&slot), texts, true, record).await?;
    let tokens = embedded.tokens;
    let data: Vec<Value> = embedded
        .vectors
        .iter()
        .enumerate()
        .map(|(index, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let body = json!({
        "object": "list",
        "data": data,
        "model": slot.entry.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "sanctum": {
            "attestation": stamped.bundle,
            "truncated": truncated_indexes(&embedded.truncated),
        },
    });
    let log = AccessLog::embedding(&slot.entry.name, tokens, &stamped);
    Ok(with_attestation(
        axum::Json(body).into_response(),
        &stamped,
        log,
    ))
}
