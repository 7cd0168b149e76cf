//! Errors as each API spells them: OpenAI's `{"error": {"message", "type", "param", "code"}}` and
//! Ollama's `{"error": "…"}`, with the right status code (and `Retry-After` when busy).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::json;

/// Seconds a busy server asks clients to wait before retrying.
pub const RETRY_AFTER_SECONDS: u64 = 1;

/// A request that failed, before or while it was served.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for the client.
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
}

impl ApiError {
    /// An error with `status`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
        }
    }

    /// 400: the request is wrong.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 400 naming the field at fault.
    pub fn bad_field(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_owned()),
            ..Self::bad_request(message)
        }
    }

    /// 404: no such model (or route).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// 500: the server failed.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// 503: every slot and the queue are taken.
    pub fn busy(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    /// OpenAI's `type` for this status.
    fn openai_type(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => "server_busy",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// OpenAI's `code` for this status.
    fn openai_code(&self) -> Option<&'static str> {
        match self.status {
            StatusCode::UNAUTHORIZED => Some("invalid_api_key"),
            StatusCode::NOT_FOUND => Some("model_not_found"),
            StatusCode::PAYLOAD_TOO_LARGE => Some("request_too_large"),
            _ => None,
        }
    }

    /// The error in OpenAI's shape.
    pub fn openai(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.openai_type(),
                "param": self.param,
                "code": self.openai_code(),
            }
        });
        self.respond(body)
    }

    /// The error in Ollama's shape.
    pub fn ollama(self) -> Response {
        let body = json!({ "error": self.message });
        self.respond(body)
    }

    fn respond(self, body: serde_json::Value) -> Response {
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        response
    }
}

/// Parses a request body, naming the field at fault (`messages[0].content: invalid type…`).
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize(&mut de) {
        Ok(value) => Ok(value),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                Err(ApiError::bad_request(format!(
                    "the request body is not valid JSON: {inner}"
                )))
            } else if path == "." {
                Err(ApiError::bad_request(format!(
                    "invalid request body: {inner}"
                )))
            } else {
                Err(ApiError::bad_field(
                    &path,
                    format!("invalid request field {path}: {inner}"),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Body {
        model: String,
        messages: Vec<Message>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Message {
        content: String,
    }

    #[test]
    fn parse_errors_name_the_field() {
        let e = parse_body::<Body>(br#"{"model":"m","messages":[{"content":5}]}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("messages[0].content"));
        assert!(e.message.contains("messages[0].content"), "{}", e.message);

        let e = parse_body::<Body>(b"{not json").unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = parse_body::<Body>(br#"{"messages":[]}"#).unwrap_err();
        assert!(e.message.contains("missing field `model`"), "{}", e.message);
    }
}
