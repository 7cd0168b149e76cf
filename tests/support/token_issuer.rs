//! A registry token issuer for distribution's `auth: token` (the bearer challenge that Harbor, GHCR
//! and Docker Hub send): on `GET /token?scope=…&service=…` with the right basic credentials it
//! returns a JWT granting the scopes asked for, signed RS256 by a self-signed certificate that the
//! registry trusts (`rootcertbundle`) and named in the token's `x5c` header. The key, certificate
//! and signatures come from the `openssl` command line.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::json;
use tempfile::TempDir;

use super::required;

/// The `service` the registry names in its challenge and the tokens' audience.
pub const SERVICE: &str = "sanctum-test-registry";
/// The tokens' issuer, which the registry accepts.
pub const ISSUER: &str = "sanctum-test-issuer";

/// A token issuer on a free loopback port; its thread ends with the test process.
pub struct TokenIssuer {
    /// `http://127.0.0.1:PORT/token`.
    pub realm: String,
    keys: Arc<Keys>,
}

/// A signing key and its self-signed certificate, in a temporary directory.
struct Keys {
    dir: TempDir,
}

impl Keys {
    fn generate() -> Option<Self> {
        let dir = TempDir::new().unwrap();
        let made = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=sanctum-test-token-issuer"])
            .arg("-keyout")
            .arg(dir.path().join("key.pem"))
            .arg("-out")
            .arg(dir.path().join("cert.pem"))
            .stderr(Stdio::null())
            .status()
            .ok()
            .filter(|s| s.success());
        required(made, "openssl is not installed (.ci/run installs it)")?;
        Some(Self { dir })
    }

    fn certificate(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// The certificate's DER in standard base64, as `x5c` carries it (the PEM body).
    fn x5c(&self) -> String {
        std::fs::read_to_string(self.certificate())
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect()
    }

    /// A JWT for `subject` granting `scopes` (`repository:NAME:ACTIONS`).
    fn token(&self, subject: &str, scopes: &[String]) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let access: Vec<_> = scopes
            .iter()
            .filter_map(|scope| {
                let (kind, rest) = scope.split_once(':')?;
                let (name, actions) = rest.rsplit_once(':')?;
                Some(json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
            })
            .collect();
        let header = json!({"typ": "JWT", "alg": "RS256", "x5c": [self.x5c()]});
        let claims = json!({
            "iss": ISSUER, "sub": subject, "aud": SERVICE,
            "iat": now, "nbf": now - 60, "exp": now + 600,
            "jti": format!("{now}-{}", scopes.join(" ")),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = sign(&self.dir.path().join("key.pem"), signing_input.as_bytes());
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }
}

/// RSASSA-PKCS1-v1_5 with SHA-256 (JWS `RS256`) by `openssl dgst`.
fn sign(key: &Path, message: &[u8]) -> Vec<u8> {
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl runs");
    child.stdin.take().unwrap().write_all(message).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl dgst -sign failed");
    out.stdout
}

impl TokenIssuer {
    /// An issuer that hands tokens to `user` with `password` and refuses everyone else with 401.
    pub fn start(user: &str, password: &str) -> Option<Self> {
        let keys = Keys::generate()?;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let realm = format!("http://{}/token", listener.local_addr().unwrap());
        let keys = Arc::new(keys);
        let serving = Arc::clone(&keys);
        let login = format!("Basic {}", STANDARD.encode(format!("{user}:{password}")));
        let user = user.to_owned();
        thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                answer(stream, &serving, &login, &user);
            }
        });
        Some(Self { realm, keys })
    }

    /// The registry configuration that sends clients here for tokens.
    pub fn registry_config(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            self.realm,
            self.keys.certificate().display()
        )
    }

    /// A token for `scopes`, as a CI job that fetched one itself would hold.
    pub fn token(&self, scopes: &[&str]) -> String {
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        self.keys.token("ci", &scopes)
    }
}

/// One request, one response, then the connection closes.
fn answer(stream: TcpStream, keys: &Keys, login: &str, user: &str) {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut authorization = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("authorization")
        {
            authorization = Some(value.trim().to_owned());
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("");
    let scopes: Vec<String> = target
        .split_once('?')
        .map(|(_, query)| query)
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.strip_prefix("scope="))
        .map(percent_decode)
        .collect();
    let (status, body) = if authorization.as_deref() == Some(login) {
        let token = keys.token(user, &scopes);
        (
            "200 OK",
            json!({"token": token, "access_token": token, "expires_in": 600}),
        )
    } else {
        (
            "401 Unauthorized",
            json!({"errors": [{"code": "UNAUTHORIZED", "message": "wrong user name or password"}]}),
        )
    };
    let body = body.to_string();
    let mut stream = reader.into_inner();
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// `%XX` and `+` decoded (the query encoding reqwest writes).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
