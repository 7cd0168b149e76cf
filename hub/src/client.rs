//! A hub's trust material, fetched for `sanctum lock fetch`: the lock and its signature as the hub
//! serves them ([`crate::paths`]). Nothing here decides trust: the caller checks the signature
//! against its policy's approvers before the lock replaces anything.

use std::time::Duration;

use crate::paths;

/// Largest lock or signature accepted (a lock of thousands of models is a few MB).
pub const MAX_TRUST_BYTES: u64 = 16 << 20;
/// The whole exchange of one request.
const TIMEOUT: Duration = Duration::from_secs(60);

/// The lock and, when the hub has one, its signature.
#[derive(Debug)]
pub struct TrustMaterial {
    /// The lock's bytes.
    pub lock: Vec<u8>,
    /// The signature's bytes (a Sigstore bundle), or None when the hub answered 404.
    pub signature: Option<Vec<u8>>,
}

/// Why the trust material could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The hub could not be reached or the transfer failed.
    #[error("cannot fetch {url}: {reason}")]
    Transport {
        /// What was asked for.
        url: String,
        /// Why.
        reason: String,
    },
    /// The hub answered with an error.
    #[error("{url}: HTTP {status}: {message}")]
    Status {
        /// What was asked for.
        url: String,
        /// The status.
        status: u16,
        /// The hub's error message, if it sent one.
        message: String,
    },
}

/// Fetches the lock and its signature from the hub at `endpoint`.
pub fn fetch_trust(endpoint: &str, token: Option<&str>) -> Result<TrustMaterial, FetchError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(TIMEOUT))
        .user_agent(concat!("sanctum/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    let base = endpoint.trim_end_matches('/');
    let get = |path: &str| -> Result<Option<Vec<u8>>, FetchError> {
        let url = format!("{base}{path}");
        let transport = |e: ureq::Error| FetchError::Transport {
            url: url.clone(),
            reason: e.to_string(),
        };
        let mut request = agent.get(&url);
        if let Some(token) = token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        let mut response = request.call().map_err(transport)?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_TRUST_BYTES)
            .read_to_vec()
            .map_err(transport)?;
        match status {
            200 => Ok(Some(body)),
            404 if path == paths::LOCK_SIGNATURE => Ok(None),
            _ => Err(FetchError::Status {
                url: url.clone(),
                status,
                message: serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
                    .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect()),
            }),
        }
    };
    let lock = get(paths::LOCK)?.unwrap_or_default();
    let signature = get(paths::LOCK_SIGNATURE)?;
    Ok(TrustMaterial { lock, signature })
}
