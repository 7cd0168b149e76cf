//! The local server's request bodies: every POST route of `sanctum serve` (OpenAI chat, text
//! completions and embeddings; Ollama show, chat, generate, embed, embeddings and pull), driven
//! in-process through the real router (`serve::app`) with its middleware and body limit. The
//! first input byte picks the route, the rest is the body. The lock holds no models, so a body
//! that parses and validates ends at the model lookup (404): nothing is loaded, pulled or
//! fetched, and a request gets through parsing, field checks and generation options every time.

#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use attest::Sha256Digest;
use attest::lockfile::Lockfile;
use attest::policy::Rules;
use attest::stamp::{LockInfo, RunnerInfo, Stamper};
use libfuzzer_sys::fuzz_target;
use runner::engine::{Engine, Runtime};
use runner::source::oci::RegistryAccess;
use runner::source::pypi::Pip;
use runner::store::{PullOptions, Store};
use serve::{Limits, ModelSelection, ServeConfig};
use tower::ServiceExt;

const ROUTES: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/api/show",
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/api/pull",
];

/// The body limit the fuzzer's inputs are measured against (the CLI's default is larger; this
/// one lets inputs cross it).
const BODY_LIMIT: usize = 64 * 1024;

struct Server {
    runtime: tokio::runtime::Runtime,
    app: axum::Router,
    _home: tempfile::TempDir,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let home = sanctum_fuzz::scratch();
        let pull = PullOptions {
            hf_endpoint: "http://127.0.0.1:9".into(),
            hf_token: None,
            pip: Pip::default(),
            hub: None,
            hub_token: None,
            registry: RegistryAccess {
                credentials: None,
                insecure: false,
            },
            rules: Rules::default(),
        };
        let lock = Lockfile::new();
        let stamper = Stamper::new(
            sanctum_fuzz::owned_key(),
            RunnerInfo {
                version: "fuzz".into(),
                git_commit: None,
                binary_sha256: Sha256Digest::of(b"fuzz"),
            },
            LockInfo {
                digest: Sha256Digest::of(lock.to_toml().as_bytes()),
                signer: None,
            },
        );
        let config = ServeConfig {
            engine: Engine::new(Store::new(home.path().join("store")), lock, pull),
            runtime: Runtime::new(runner::device::Device::Cpu, 1),
            models: ModelSelection::All,
            quant: None,
            activations: None,
            kv_cache: Default::default(),
            context: None,
            limits: Limits {
                parallel: 1,
                queue: 1,
            },
            max_tokens: 16,
            body_limit: BODY_LIMIT,
            api_key: None,
            preload: false,
            log_prompts: false,
            stamper,
            home: home.path().to_owned(),
            shutdown_grace: Duration::from_secs(1),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        Server {
            runtime,
            app: serve::app(config),
            _home: home,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let route = ROUTES[usize::from(pick) % ROUTES.len()];
    let server = server();
    let request = axum::http::Request::post(route)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.to_vec()))
        .expect("a request");
    server.runtime.block_on(async {
        let response = server
            .app
            .clone()
            .oneshot(request)
            .await
            .expect("the router is infallible");
        // The whole reply is read: an error body is made lazily too.
        let _ = axum::body::to_bytes(response.into_body(), 1 << 20).await;
    });
});
