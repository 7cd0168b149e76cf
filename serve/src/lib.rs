//! sanctum's local server (`sanctum serve`): the OpenAI and Ollama APIs over approved models, one
//! signed attestation per response, continuous batching per chat model, safe defaults (loopback
//! unless a key is set, body and token limits, errors in each API's shape, graceful shutdown);
//! and the load generator `sanctum bench serve` uses ([`bench`]).

pub mod bench;
mod error;
mod log;
mod ollama;
mod openai;
mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use attest::Sha256Digest;
use attest::attestation::layout;
use axum::Router;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use subtle::ConstantTimeEq;

pub use error::ApiError;
pub use runner::batch::Limits;
pub use state::{DEFAULT_CONTEXT, ModelSelection, ServeConfig};

/// Header carrying the sha256 of a non-stream response's attestation bundle.
pub const ATTESTATION_HEADER: &str = "x-sanctum-attestation";

/// The server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// A non-loopback address without a key.
    #[error(
        "refusing to listen on {0} without an API key: other machines could use your models; pass --api-key-file FILE, or bind to 127.0.0.1"
    )]
    NeedsKey(SocketAddr),
    /// An offered model is not in the lock.
    #[error(transparent)]
    UnknownModel(#[from] attest::lockfile::UnknownModel),
    /// The address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Preloading a model failed.
    #[error("cannot preload: {0}")]
    Preload(String),
    /// The runtime or the listener failed.
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

/// Checks the configuration before anything starts: a non-loopback bind needs a key, and every
/// model named in `--models` must be in the lock.
pub fn check(config: &ServeConfig, addr: SocketAddr) -> Result<(), ServeError> {
    if !addr.ip().is_loopback() && config.api_key.is_none() {
        return Err(ServeError::NeedsKey(addr));
    }
    if let ModelSelection::Only(names) = &config.models {
        for name in names {
            config.engine.lock().model(name)?;
        }
    }
    Ok(())
}

/// Serves on `addr` until SIGINT or SIGTERM, then stops accepting, lets in-flight responses finish
/// (at most `shutdown_grace`) and returns. `on_ready` is called with the bound address.
pub fn run(
    config: ServeConfig,
    addr: SocketAddr,
    on_ready: impl FnOnce(SocketAddr) + Send,
) -> Result<(), ServeError> {
    check(&config, addr)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(serve(config, addr, on_ready))
}

async fn serve(
    config: ServeConfig,
    addr: SocketAddr,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let grace = config.shutdown_grace;
    let preload = config.preload;
    let state = Arc::new(state::AppState::new(config));
    if preload {
        state
            .preload()
            .await
            .map_err(|e| ServeError::Preload(e.message))?;
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let bound = listener.local_addr()?;
    on_ready(bound);
    let app = router(Arc::clone(&state));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });
    shutdown_signal().await;
    state::log("stopping: no new connections; finishing the replies in flight");
    let _ = stop_tx.send(());
    match tokio::time::timeout(grace, server).await {
        Ok(Ok(result)) => result?,
        Ok(Err(e)) => return Err(ServeError::Io(std::io::Error::other(e))),
        Err(_) => state::log(&format!(
            "replies still running after {} s were cut off",
            grace.as_secs()
        )),
    }
    let finishing = Arc::clone(&state);
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::task::spawn_blocking(move || finishing.shutdown()),
    )
    .await;
    state::log("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
}

/// The server's routes over `config`, without a listener or signal handling: for handling requests
/// in-process (the request-body fuzz target drives it with `tower::ServiceExt::oneshot`).
pub fn app(config: ServeConfig) -> Router {
    router(Arc::new(state::AppState::new(config)))
}

fn router(state: Arc<state::AppState>) -> Router {
    let limit = state.config.body_limit;
    Router::new()
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{model}", get(openai::model))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/api/version", get(ollama::version))
        .route("/api/tags", get(ollama::tags))
        .route("/api/show", post(ollama::show))
        .route("/api/ps", get(ollama::ps))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/embed", post(ollama::embed))
        .route("/api/embeddings", post(ollama::embeddings))
        .route("/api/pull", post(ollama::pull))
        .route("/sanctum/v1/attestations/{digest}", get(attestation))
        .route("/", get(|| async { "sanctum is running\n" }))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            authorize,
        ))
        .layer(middleware::from_fn(log::access_log))
        .with_state(state)
}

/// An error in the shape of the API the path belongs to.
fn error_for(path: &str, error: ApiError) -> Response {
    if path.starts_with("/api/") {
        error.ollama()
    } else {
        error.openai()
    }
}

async fn not_found(request: Request) -> Response {
    let path = request.uri().path().to_owned();
    error_for(
        &path,
        ApiError::not_found(format!("no route {} {path}", request.method())),
    )
}

/// Requires `Authorization: Bearer <key>` when a key is set (compared in constant time).
async fn authorize(
    State(state): State<Arc<state::AppState>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(key) = &state.config.api_key
        && !bearer_matches(request.headers(), key)
    {
        let path = request.uri().path().to_owned();
        let mut response = error_for(
            &path,
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key: send Authorization: Bearer <key>",
            ),
        );
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    next.run(request).await
}

/// True when `headers` carry `Authorization: Bearer <expected>`, compared in constant time (shared
/// with the hub).
pub fn bearer_matches(headers: &axum::http::HeaderMap, expected: &str) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

/// `GET /sanctum/v1/attestations/{sha256}`: the newest bundle in the attestation store for an
/// output with that sha256 (`sha256:` prefix optional).
async fn attestation(
    State(state): State<Arc<state::AppState>>,
    Path(digest): Path<String>,
) -> Response {
    let hex = digest.strip_prefix("sha256:").unwrap_or(&digest);
    let Ok(digest) = hex.parse::<Sha256Digest>() else {
        return error_for(
            "/sanctum",
            ApiError::bad_request(format!("{hex:?} is not a sha256 in hex")),
        );
    };
    let bundles = match layout::store_bundles(&state.config.home, &digest) {
        Ok(b) => b,
        Err(e) => return error_for("/sanctum", ApiError::internal(e.to_string())),
    };
    let newest = bundles
        .iter()
        .filter_map(|p| Some((std::fs::metadata(p).ok()?.modified().ok()?, p)))
        .max_by_key(|(t, _)| *t);
    match newest.map(|(_, p)| std::fs::read(p)) {
        Some(Ok(bytes)) => {
            let mut response = bytes.into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            if let Ok(count) = HeaderValue::from_str(&bundles.len().to_string()) {
                response
                    .headers_mut()
                    .insert("x-sanctum-attestation-count", count);
            }
            response
        }
        Some(Err(e)) => error_for("/sanctum", ApiError::internal(e.to_string())),
        None => error_for(
            "/sanctum",
            ApiError::not_found(format!("no attestation for an output with sha256 {digest}")),
        ),
    }
}

/// A body that could not be read: 413 when over the limit.
fn body_error(e: BytesRejection) -> ApiError {
    let status = e.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            status,
            "the request body is larger than this server accepts",
        )
    } else {
        ApiError::new(status, format!("cannot read the request body: {e}"))
    }
}

/// A seed for requests that give none (recorded in the attestation).
fn random_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(32)
}

/// A unique response id (hex).
fn response_id() -> String {
    let seed = random_seed();
    Sha256Digest::of(&seed.to_le_bytes()).to_string()[..24].to_owned()
}

/// `system_fingerprint`: this build.
fn fingerprint() -> String {
    format!("sanctum-{}", env!("CARGO_PKG_VERSION"))
}
