//! sanctum's internal model hub (`sanctum hub serve`): the approved models of a (signed) lock,
//! served from a verified store over the Hugging Face hub's HTTP routes, so sanctum, hf-hub and
//! `huggingface_hub` pull from it unchanged; and the lock, its signature and each model's
//! `model.sig` beside them, so a client fetches its trust material from the same place
//! ([`client`]). Read-only; loopback unless a token is set; every file verified against the lock
//! before it is sent (see [`catalog`]). The routes are documented in `docs/hub.md`.

pub mod catalog;
pub mod client;
mod routes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use attest::lockfile::Lockfile;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use runner::store::Store;

pub use catalog::{Catalog, Unserved};

/// Where the trust material is served.
pub mod paths {
    /// The lockfile, byte for byte as the hub read it.
    pub const LOCK: &str = "/sanctum/models.lock";
    /// The lock's signature (Sigstore bundle), when the hub has one.
    pub const LOCK_SIGNATURE: &str = "/sanctum/models.lock.sigstore.json";
    /// A model's OpenSSF Model Signing signature: `/sanctum/models/{name}/model.sig`.
    pub fn model_signature(name: &str) -> String {
        format!("/sanctum/models/{name}/model.sig")
    }
}

/// What the hub serves and how.
#[derive(Debug)]
pub struct HubConfig {
    /// The lock, parsed (and already judged by the policy).
    pub lock: Lockfile,
    /// Its bytes, served as they are.
    pub lock_bytes: Vec<u8>,
    /// Its signature's bytes, when it has one.
    pub lock_signature: Option<Vec<u8>>,
    /// The store the models are served from.
    pub store: Store,
    /// A directory of `NAME.model.sig` files (what `sanctum models sign NAME` writes), if any.
    pub model_signatures: Option<PathBuf>,
    /// The bearer token every request must carry, if any.
    pub token: Option<String>,
}

/// The hub could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// A non-loopback address without a token.
    #[error(
        "refusing to listen on {0} without a token: any machine could read the approved models; pass --token-file FILE, or bind to 127.0.0.1"
    )]
    NeedsToken(SocketAddr),
    /// The address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The runtime or the listener failed.
    #[error("hub: {0}")]
    Io(#[from] std::io::Error),
}

/// A model left out, and the served ones, as the hub reports them at startup.
pub struct Started<'a> {
    /// The bound address.
    pub addr: SocketAddr,
    /// The names served.
    pub served: Vec<&'a str>,
    /// The lock's models that are not served, and why.
    pub unserved: &'a [Unserved],
}

/// Shared by every request.
struct Hub {
    catalog: Catalog,
    unserved: Vec<Unserved>,
    lock_bytes: Vec<u8>,
    lock_signature: Option<Vec<u8>>,
    model_signatures: Option<PathBuf>,
    token: Option<String>,
}

/// Verifies the store against the lock, then serves on `addr` until SIGINT or SIGTERM.
/// `on_ready` is called once the port is bound, with what is served.
pub fn run(
    config: HubConfig,
    addr: SocketAddr,
    on_ready: impl FnOnce(&Started<'_>) + Send,
) -> Result<(), HubError> {
    if !addr.ip().is_loopback() && config.token.is_none() {
        return Err(HubError::NeedsToken(addr));
    }
    let (catalog, unserved) = Catalog::open(&config.lock, &config.store);
    let hub = Arc::new(Hub {
        catalog,
        unserved,
        lock_bytes: config.lock_bytes,
        lock_signature: config.lock_signature,
        model_signatures: config.model_signatures,
        token: config.token,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| HubError::Bind { addr, source })?;
        on_ready(&Started {
            addr: listener.local_addr()?,
            served: hub
                .catalog
                .models()
                .iter()
                .map(|m| m.entry.name.as_str())
                .collect(),
            unserved: &hub.unserved,
        });
        let app = routes::router()
            .layer(middleware::from_fn_with_state(Arc::clone(&hub), authorize))
            .layer(middleware::from_fn(access_log))
            .with_state(hub);
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await?;
        Ok(())
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

/// 401 unless the request carries the token (when one is set), compared in constant time.
async fn authorize(State(hub): State<Arc<Hub>>, request: Request, next: Next) -> Response {
    if let Some(token) = &hub.token
        && !serve::bearer_matches(request.headers(), token)
    {
        let mut response = routes::error(
            StatusCode::UNAUTHORIZED,
            None,
            "this hub needs a bearer token (Authorization: Bearer …); set HF_TOKEN or SANCTUM_HUB_TOKEN",
        )
        .into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        );
        return response;
    }
    next.run(request).await
}

/// One line per request on stderr: time, method, path, status, bytes announced, milliseconds.
async fn access_log(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let range = request
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(|r| format!(" range={r}"))
        .unwrap_or_default();
    let response = next.run(request).await;
    let length = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    eprintln!(
        "{} {method} {path}{range} {} {length} {}ms",
        chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ"),
        response.status().as_u16(),
        started.elapsed().as_millis()
    );
    response.into_response()
}
