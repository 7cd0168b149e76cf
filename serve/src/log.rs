//! The access log: one line per request on stderr with the route, model, tokens, status, duration
//! and attestation digest; the prompt only with `--log-prompts`. Handlers attach an [`AccessLog`]
//! to their response; streamed responses are marked [`Deferred`] and log when the stream ends.

use std::fmt::Write as _;
use std::time::Instant;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use runner::chat::Generation;

use crate::error::ApiError;
use crate::state::{Prepared, Stamped, log};

/// What a handler knows of its request for the log line.
#[derive(Debug, Clone, Default)]
pub struct AccessLog {
    model: Option<String>,
    prompt_tokens: Option<usize>,
    completion_tokens: Option<usize>,
    attestation: Option<String>,
    prompt: Option<String>,
}

/// Marks a streamed response: its line is written when the stream ends.
#[derive(Debug, Clone, Copy)]
pub struct Deferred;

impl AccessLog {
    /// A generated reply.
    pub fn reply(
        generation: &Generation,
        stamped: &Stamped,
        prepared: &Prepared,
        log_prompt: bool,
    ) -> Self {
        Self {
            model: Some(prepared.slot.entry.name.clone()),
            prompt_tokens: Some(generation.prompt_tokens),
            completion_tokens: Some(generation.tokens.len()),
            attestation: Some(format!("sha256:{}", stamped.bundle_sha256)),
            prompt: log_prompt.then(|| prepared.rendered.clone()),
        }
    }

    /// An embedding.
    pub fn embedding(model: &str, tokens: usize, stamped: &Stamped) -> Self {
        Self {
            model: Some(model.to_owned()),
            prompt_tokens: Some(tokens),
            attestation: Some(format!("sha256:{}", stamped.bundle_sha256)),
            ..Self::default()
        }
    }

    fn line(&self, method: &str, route: &str, status: u16, started: Instant) -> String {
        let mut line = format!("{method} {route} {status}");
        if let Some(m) = &self.model {
            let _ = write!(line, " model={m}");
        }
        if let Some(n) = self.prompt_tokens {
            let _ = write!(line, " prompt_tokens={n}");
        }
        if let Some(n) = self.completion_tokens {
            let _ = write!(line, " completion_tokens={n}");
        }
        let _ = write!(line, " duration_ms={}", started.elapsed().as_millis());
        if let Some(a) = &self.attestation {
            let _ = write!(line, " attestation={a}");
        }
        if let Some(p) = &self.prompt {
            let _ = write!(line, " prompt={p:?}");
        }
        line
    }

    /// Writes the line of a stream that ended well; `started` is when the request arrived.
    pub fn print_streamed(&self, route: &str, started: Instant) {
        log(&self.line("POST", route, 200, started));
    }
}

/// Logs a stream that failed after its headers were sent.
pub fn stream_failed(prepared: &Prepared, error: &ApiError) {
    log(&format!(
        "stream for {} failed after {} ms: {}",
        prepared.slot.entry.name,
        prepared.clock.elapsed().as_millis(),
        error.message
    ));
}

/// The middleware that writes one line per request that is not a stream.
pub async fn access_log(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let route = request.uri().path().to_owned();
    let response = next.run(request).await;
    if response.extensions().get::<Deferred>().is_some() {
        return response;
    }
    let fields = response
        .extensions()
        .get::<AccessLog>()
        .cloned()
        .unwrap_or_default();
    log(&fields.line(&method, &route, response.status().as_u16(), started));
    response
}
