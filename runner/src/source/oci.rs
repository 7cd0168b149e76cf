//! The `oci` source and `sanctum hub push`: approved models as CNCF ModelPack artifacts in an OCI
//! registry (Harbor, Artifactory, ECR, GHCR, Zot, distribution), over oci-client.
//!
//! Layout (`docs/hub.md`): one **raw** layer per model file (`org.cncf.model.filepath` names it),
//! so every layer digest is the sha256 the lock already pins; a config with the ModelPack
//! `descriptor`, `config` and `modelfs`; the manifest's `artifactType` is ModelPack's. The JSON is
//! written with sorted keys and no timestamps, so a model always pushes to the same manifest
//! digest, which is what an `oci` lock entry pins. Signatures (the lock's, the model's OMS
//! `model.sig`) go as referrers of the model manifest in cosign's bundle layout, listed in the
//! referrers tag schema's index (`sha256-<hex>`) for registries without the referrers API.
//!
//! A pull fetches the manifest by its pinned digest, checks its bytes hash to that digest and that
//! its layers are exactly the lock's files (paths, digests, sizes) before any layer moves, then
//! downloads each layer with ranged requests, resuming where a broken transfer stopped, hashing as
//! the bytes arrive.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::net::IpAddr;
use std::path::Path;

use attest::Sha256Digest;
use attest::digest::Sha256Hasher;
use attest::lockfile::{LockedFile, ModelEntry, OciSource};
use attest::progress::Progress;
use futures_util::StreamExt;
use http::HeaderValue;
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// An OCI image manifest.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// An OCI image index (the referrers tag schema's list).
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// ModelPack's manifest `artifactType`.
pub const MODEL_ARTIFACT_TYPE: &str = "application/vnd.cncf.model.manifest.v1+json";
/// ModelPack's config media type.
pub const MODEL_CONFIG_MEDIA_TYPE: &str = "application/vnd.cncf.model.config.v1+json";
/// The layer annotation naming the file a layer holds.
pub const FILEPATH_ANNOTATION: &str = "org.cncf.model.filepath";
/// A Sigstore bundle as a referrer (cosign's bundle layout).
pub const BUNDLE_ARTIFACT_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// The empty config of artifacts that have none.
const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY_CONFIG: &[u8] = b"{}";

/// Largest manifest or index accepted from a registry.
const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Bytes read from a model file per pushed chunk.
const PUSH_CHUNK: usize = 8 << 20;
/// How many times a broken layer transfer is resumed.
const RESUMES: usize = 5;

/// How to reach a registry.
#[derive(Clone, Default)]
pub struct RegistryAccess {
    /// Credentials; anonymous when None.
    pub credentials: Option<Credentials>,
    /// Plain HTTP, allowed only for a loopback registry.
    pub insecure: bool,
}

impl std::fmt::Debug for RegistryAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAccess")
            .field(
                "credentials",
                &self.credentials.as_ref().map(|_| "<redacted>"),
            )
            .field("insecure", &self.insecure)
            .finish()
    }
}

/// Registry credentials: basic (exchanged for a bearer token when the registry challenges) or a
/// bearer token.
#[derive(Clone)]
pub enum Credentials {
    /// User name and password.
    Basic(String, String),
    /// A bearer token.
    Bearer(String),
}

/// What a push wrote.
#[derive(Debug)]
pub struct Pushed {
    /// The repository, with its registry.
    pub repository: String,
    /// The tag pushed.
    pub tag: String,
    /// The model manifest's digest (what an `oci` lock entry pins).
    pub manifest: Sha256Digest,
    /// The signature referrers pushed, by manifest digest.
    pub referrers: Vec<Sha256Digest>,
}

/// Why a push or a pull failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OciError {
    /// Not a valid image reference.
    #[error("{reference:?} is not a registry reference (REGISTRY/REPOSITORY:TAG): {reason}")]
    Reference {
        /// As given.
        reference: String,
        /// Why.
        reason: String,
    },
    /// `--insecure` for a registry that is not on this machine.
    #[error(
        "plain HTTP is allowed only for a registry on this machine (127.0.0.1, ::1, localhost), not {registry}"
    )]
    Insecure {
        /// The registry.
        registry: String,
    },
    /// The registry refused a request or could not be reached.
    #[error("{registry}: {what}: {reason}")]
    Registry {
        /// The registry.
        registry: String,
        /// What was asked.
        what: String,
        /// The client's explanation.
        reason: String,
    },
    /// The manifest's bytes do not hash to the digest the lock pins.
    #[error("{reference}: the registry's manifest has sha256 {actual}, the lock pins {expected}")]
    ManifestDigest {
        /// What was pulled.
        reference: String,
        /// The pinned digest.
        expected: Sha256Digest,
        /// What the bytes hash to.
        actual: Sha256Digest,
    },
    /// The manifest is not a model artifact whose layers are the lock's files.
    #[error("{reference}: the manifest disagrees with the lock, nothing downloaded: {problem}")]
    Disagrees {
        /// What was pulled.
        reference: String,
        /// The first difference.
        problem: String,
    },
    /// A layer's bytes do not match the lock, or its transfer failed for good.
    #[error("{path}: {problem}")]
    Layer {
        /// The model file.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: io::Error,
    },
}

impl OciError {
    /// True when the registry's content contradicts the lock (a refusal), not a failure to reach it.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::ManifestDigest { .. } | Self::Disagrees { .. } | Self::Layer { .. }
        )
    }
}

/// An OCI descriptor.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    annotations: Option<BTreeMap<String, String>>,
}

impl Descriptor {
    fn of(media_type: &str, bytes: &[u8]) -> Self {
        Self {
            media_type: media_type.to_owned(),
            digest: digest_string(&Sha256Digest::of(bytes)),
            size: bytes.len() as u64,
            artifact_type: None,
            annotations: None,
        }
    }
}

/// An OCI image manifest.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    artifact_type: Option<String>,
    config: Descriptor,
    layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    annotations: Option<BTreeMap<String, String>>,
}

/// An OCI image index.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

impl Default for Index {
    fn default() -> Self {
        Self {
            schema_version: 2,
            media_type: Some(INDEX_MEDIA_TYPE.to_owned()),
            manifests: Vec::new(),
        }
    }
}

fn digest_string(digest: &Sha256Digest) -> String {
    format!("sha256:{digest}")
}

/// The ModelPack layer media type of a model file.
pub fn layer_media_type(path: &str) -> &'static str {
    let name = path.rsplit('/').next().unwrap_or(path).to_ascii_lowercase();
    if name.ends_with(".safetensors") {
        "application/vnd.cncf.model.weight.v1.raw"
    } else if name.starts_with("readme") || name.starts_with("license") || name.ends_with(".md") {
        "application/vnd.cncf.model.doc.v1.raw"
    } else if name.ends_with(".py") {
        "application/vnd.cncf.model.code.v1.raw"
    } else {
        "application/vnd.cncf.model.weight.config.v1.raw"
    }
}

/// The config blob and manifest of `entry`, byte for byte as pushed.
fn model_artifact(entry: &ModelEntry) -> (Vec<u8>, Vec<u8>) {
    let diff_ids: Vec<String> = entry
        .files
        .iter()
        .map(|f| digest_string(&f.sha256))
        .collect();
    let config = json!({
        "descriptor": {
            "name": entry.name,
            "family": entry.architecture,
            "licenses": [entry.license],
            "sourceURL": entry.upstream.as_ref().map(|u| format!("https://huggingface.co/{}", u.repo)),
        },
        "config": { "format": "safetensors" },
        "modelfs": { "type": "layers", "diffIds": diff_ids },
    });
    let config = serde_json::to_vec(&config).unwrap_or_default();
    let layers = entry
        .files
        .iter()
        .map(|f| Descriptor {
            media_type: layer_media_type(&f.path).to_owned(),
            digest: digest_string(&f.sha256),
            size: f.size,
            artifact_type: None,
            annotations: Some(BTreeMap::from([
                (FILEPATH_ANNOTATION.to_owned(), f.path.clone()),
                ("org.opencontainers.image.title".to_owned(), f.path.clone()),
            ])),
        })
        .collect();
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(MANIFEST_MEDIA_TYPE.to_owned()),
        artifact_type: Some(MODEL_ARTIFACT_TYPE.to_owned()),
        config: Descriptor::of(MODEL_CONFIG_MEDIA_TYPE, &config),
        layers,
        subject: None,
        annotations: Some(BTreeMap::from([
            (
                "org.opencontainers.image.title".to_owned(),
                entry.name.clone(),
            ),
            ("dev.sanctum.model.digest".to_owned(), entry.digest.to_hex()),
            (
                "org.opencontainers.image.licenses".to_owned(),
                entry.license.clone(),
            ),
        ])),
    };
    (config, serde_json::to_vec(&manifest).unwrap_or_default())
}

/// A client for `reference`'s registry, with the access checked.
fn client(
    reference: &Reference,
    access: &RegistryAccess,
) -> Result<(Client, RegistryAuth), OciError> {
    let registry = reference.resolve_registry().to_owned();
    let protocol = if access.insecure {
        if !is_loopback(&registry) {
            return Err(OciError::Insecure { registry });
        }
        ClientProtocol::HttpsExcept(vec![registry])
    } else {
        ClientProtocol::Https
    };
    let client = Client::new(ClientConfig {
        protocol,
        user_agent: concat!("sanctum/", env!("CARGO_PKG_VERSION")),
        ..ClientConfig::default()
    });
    let auth = match &access.credentials {
        None => RegistryAuth::Anonymous,
        Some(Credentials::Basic(user, password)) => {
            RegistryAuth::Basic(user.clone(), password.clone())
        }
        Some(Credentials::Bearer(token)) => RegistryAuth::Bearer(token.clone()),
    };
    Ok((client, auth))
}

/// True for `127.0.0.1:PORT`, `[::1]:PORT`, `localhost:PORT` and the like.
fn is_loopback(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The registry's refusal, with what to do about a missing or refused login.
fn registry_error(
    registry: String,
    what: String,
    auth: &RegistryAuth,
    e: &oci_client::errors::OciDistributionError,
) -> OciError {
    use oci_client::errors::{OciDistributionError as E, OciErrorCode};
    let refused_login = match e {
        E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => true,
        E::ServerError { code, .. } => matches!(code, 401 | 403),
        E::RequestError(e) => e
            .status()
            .is_some_and(|status| matches!(status.as_u16(), 401 | 403)),
        E::RegistryError { envelope, .. } => envelope.errors.iter().any(|error| {
            matches!(
                error.code,
                OciErrorCode::Unauthorized | OciErrorCode::Denied
            )
        }),
        _ => false,
    };
    let mut reason = e.to_string();
    if refused_login {
        reason.push_str(match auth {
            RegistryAuth::Anonymous => {
                " (no credentials were sent: set SANCTUM_REGISTRY_USERNAME and SANCTUM_REGISTRY_PASSWORD, or SANCTUM_REGISTRY_TOKEN)"
            }
            RegistryAuth::Basic(..) => " (the registry refused the user name and password sent)",
            RegistryAuth::Bearer(_) => " (the registry refused the token sent)",
        });
    }
    OciError::Registry {
        registry,
        what,
        reason,
    }
}

fn parse_reference(reference: &str) -> Result<Reference, OciError> {
    reference
        .parse()
        .map_err(|e: oci_client::ParseError| OciError::Reference {
            reference: reference.to_owned(),
            reason: e.to_string(),
        })
}

fn runtime() -> Result<tokio::runtime::Runtime, OciError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| OciError::Io {
            path: "the async runtime".into(),
            source,
        })
}

/// Pushes the verified model in `dir` to `reference` (`REGISTRY/REPOSITORY:TAG`), then each of
/// `signatures` (Sigstore bundles: the lock's, the model's `model.sig`) as a referrer of its
/// manifest. The caller has verified `dir` against `entry`; the registry checks every blob's
/// digest (the lock's) when the upload completes.
pub fn push(
    entry: &ModelEntry,
    dir: &Path,
    reference: &str,
    access: &RegistryAccess,
    signatures: &[Vec<u8>],
    progress: &dyn Progress,
) -> Result<Pushed, OciError> {
    let image = parse_reference(reference)?;
    if image.digest().is_some() {
        return Err(OciError::Reference {
            reference: reference.to_owned(),
            reason: "push to a tag, not a digest".into(),
        });
    }
    let (client, auth) = client(&image, access)?;
    let registry = image.resolve_registry().to_owned();
    let failed = |what: String| {
        let registry = registry.clone();
        let auth = &auth;
        move |e: oci_client::errors::OciDistributionError| registry_error(registry, what, auth, &e)
    };
    runtime()?.block_on(async {
        client
            .auth(&image, &auth, RegistryOperation::Push)
            .await
            .map_err(failed("authenticate for push".into()))?;
        for file in &entry.files {
            let digest = digest_string(&file.sha256);
            let exists = client
                .blob_exists(&image, &digest)
                .await
                .map_err(failed(format!("check blob {digest}")))?;
            let task = progress.start(&file.path, Some(file.size));
            if exists {
                task.advance(file.size);
                continue;
            }
            let path = dir.join(&file.path);
            let reader = File::open(&path).map_err(|source| OciError::Io {
                path: path.display().to_string(),
                source,
            })?;
            let chunks = futures_util::stream::unfold(reader, |mut reader| async move {
                let mut buf = vec![0u8; PUSH_CHUNK];
                match reader.read(&mut buf) {
                    Ok(0) => None,
                    Ok(n) => {
                        buf.truncate(n);
                        Some((Ok(bytes::Bytes::from(buf)), reader))
                    }
                    Err(e) => Some((
                        Err(oci_client::errors::OciDistributionError::from(e)),
                        reader,
                    )),
                }
            });
            client
                .push_blob_stream(&image, chunks, &digest, Some(file.size))
                .await
                .map_err(failed(format!("push {} ({digest})", file.path)))?;
            task.advance(file.size);
        }
        let (config, manifest) = model_artifact(entry);
        let config_digest = digest_string(&Sha256Digest::of(&config));
        client
            .push_blob(&image, config.clone(), &config_digest)
            .await
            .map_err(failed("push the model config".into()))?;
        client
            .push_manifest_raw(
                &image,
                manifest.clone(),
                HeaderValue::from_static(MANIFEST_MEDIA_TYPE),
            )
            .await
            .map_err(failed(format!("push the manifest to {image}")))?;
        let subject = Descriptor::of(MANIFEST_MEDIA_TYPE, &manifest);
        let mut referrers = Vec::new();
        for bundle in signatures {
            referrers.push(push_referrer(&client, &image, &auth, &subject, bundle, &failed).await?);
        }
        Ok(Pushed {
            repository: format!("{}/{}", image.resolve_registry(), image.repository()),
            tag: image.tag().unwrap_or("latest").to_owned(),
            manifest: Sha256Digest::of(&manifest),
            referrers,
        })
    })
}

/// Pushes `bundle` as a referrer of `subject` and lists it in the referrers tag schema's index.
async fn push_referrer<F>(
    client: &Client,
    image: &Reference,
    auth: &RegistryAuth,
    subject: &Descriptor,
    bundle: &[u8],
    failed: &impl Fn(String) -> F,
) -> Result<Sha256Digest, OciError>
where
    F: FnOnce(oci_client::errors::OciDistributionError) -> OciError,
{
    let predicate_type = bundle_predicate_type(bundle).unwrap_or_default();
    let annotations = BTreeMap::from([
        (
            "dev.sigstore.bundle.content".to_owned(),
            "dsse-envelope".to_owned(),
        ),
        (
            "dev.sigstore.bundle.predicateType".to_owned(),
            predicate_type,
        ),
    ]);
    let layer = Descriptor::of(BUNDLE_ARTIFACT_TYPE, bundle);
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(MANIFEST_MEDIA_TYPE.to_owned()),
        artifact_type: Some(BUNDLE_ARTIFACT_TYPE.to_owned()),
        config: Descriptor::of(EMPTY_MEDIA_TYPE, EMPTY_CONFIG),
        layers: vec![layer.clone()],
        subject: Some(subject.clone()),
        annotations: Some(annotations.clone()),
    };
    let manifest = serde_json::to_vec(&manifest).unwrap_or_default();
    let digest = Sha256Digest::of(&manifest);
    client
        .push_blob(
            image,
            EMPTY_CONFIG.to_vec(),
            &digest_string(&Sha256Digest::of(EMPTY_CONFIG)),
        )
        .await
        .map_err(failed("push the empty config".into()))?;
    client
        .push_blob(image, bundle.to_vec(), &layer.digest)
        .await
        .map_err(failed("push a signature bundle".into()))?;
    let by_digest = Reference::with_digest(
        image.registry().to_owned(),
        image.repository().to_owned(),
        digest_string(&digest),
    );
    client
        .push_manifest_raw(
            &by_digest,
            manifest.clone(),
            HeaderValue::from_static(MANIFEST_MEDIA_TYPE),
        )
        .await
        .map_err(failed("push a signature referrer".into()))?;
    // The referrers tag schema: an index under `sha256-<hex of the subject>`, kept by clients.
    let tag = subject.digest.replace(':', "-");
    let index_ref = Reference::with_tag(
        image.registry().to_owned(),
        image.repository().to_owned(),
        tag,
    );
    // A missing, oversized or unreadable index starts a new one.
    let mut index = match client
        .pull_manifest_raw(&index_ref, auth, &[INDEX_MEDIA_TYPE])
        .await
    {
        Ok((bytes, _)) if bytes.len() <= MAX_MANIFEST_BYTES => {
            serde_json::from_slice::<Index>(&bytes).unwrap_or_default()
        }
        _ => Index::default(),
    };
    index.media_type = Some(INDEX_MEDIA_TYPE.to_owned());
    let entry = Descriptor {
        media_type: MANIFEST_MEDIA_TYPE.to_owned(),
        digest: digest_string(&digest),
        size: manifest.len() as u64,
        artifact_type: Some(BUNDLE_ARTIFACT_TYPE.to_owned()),
        annotations: Some(annotations),
    };
    if !index.manifests.iter().any(|m| m.digest == entry.digest) {
        index.manifests.push(entry);
    }
    let index = serde_json::to_vec(&index).unwrap_or_default();
    client
        .push_manifest_raw(
            &index_ref,
            index,
            HeaderValue::from_static(INDEX_MEDIA_TYPE),
        )
        .await
        .map_err(failed("push the referrers index".into()))?;
    Ok(digest)
}

/// The `predicateType` of a Sigstore bundle's DSSE statement, if it has one.
fn bundle_predicate_type(bundle: &[u8]) -> Option<String> {
    use base64::Engine as _;
    let bundle: serde_json::Value = serde_json::from_slice(bundle).ok()?;
    let payload = bundle.get("dsseEnvelope")?.get("payload")?.as_str()?;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(payload)
        .ok()?;
    let statement: serde_json::Value = serde_json::from_slice(&payload).ok()?;
    Some(statement.get("predicateType")?.as_str()?.to_owned())
}

/// The registry (`host` or `host:port`) an `oci` source's repository is in.
pub fn registry_of(source: &OciSource) -> Result<String, OciError> {
    Ok(parse_reference(&source.repository)?.registry().to_owned())
}

/// Fetches the model `files` of the artifact `source` pins into `dest`, each file checked for
/// size and sha256 as it arrives.
pub fn fetch(
    source: &OciSource,
    files: &[LockedFile],
    dest: &Path,
    access: &RegistryAccess,
    progress: &dyn Progress,
) -> Result<(), OciError> {
    let reference = format!("{}@{}", source.repository, digest_string(&source.manifest));
    let image = parse_reference(&reference)?;
    let (client, auth) = client(&image, access)?;
    let registry = image.resolve_registry().to_owned();
    runtime()?.block_on(async {
        let (bytes, _) = client
            .pull_manifest_raw(&image, &auth, &[MANIFEST_MEDIA_TYPE])
            .await
            .map_err(|e| {
                registry_error(
                    registry.clone(),
                    format!("pull the manifest {reference}"),
                    &auth,
                    &e,
                )
            })?;
        let actual = Sha256Digest::of(&bytes);
        if actual != source.manifest {
            return Err(OciError::ManifestDigest {
                reference: reference.clone(),
                expected: source.manifest,
                actual,
            });
        }
        let layers = check_layers(&bytes, files).map_err(|problem| OciError::Disagrees {
            reference: reference.clone(),
            problem,
        })?;
        for (file, digest) in files.iter().zip(layers) {
            download(&client, &image, &digest, file, dest, progress).await?;
        }
        Ok(())
    })
}

/// The manifest's layer digest for each of `files`, in their order, or the first way the manifest
/// disagrees with them.
fn check_layers(manifest: &[u8], files: &[LockedFile]) -> Result<Vec<String>, String> {
    if manifest.len() > MAX_MANIFEST_BYTES {
        return Err(format!("a manifest of {} bytes", manifest.len()));
    }
    let manifest: Manifest =
        serde_json::from_slice(manifest).map_err(|e| format!("not an OCI image manifest: {e}"))?;
    if manifest.artifact_type.as_deref() != Some(MODEL_ARTIFACT_TYPE) {
        return Err(format!(
            "artifactType {:?}, not {MODEL_ARTIFACT_TYPE}",
            manifest.artifact_type
        ));
    }
    let mut by_path = BTreeMap::new();
    for layer in &manifest.layers {
        let path = layer
            .annotations
            .as_ref()
            .and_then(|a| a.get(FILEPATH_ANNOTATION))
            .ok_or_else(|| format!("layer {} has no {FILEPATH_ANNOTATION}", layer.digest))?;
        if by_path.insert(path.clone(), layer).is_some() {
            return Err(format!("two layers for {path}"));
        }
    }
    let mut digests = Vec::new();
    for file in files {
        let layer = by_path
            .remove(&file.path)
            .ok_or_else(|| format!("no layer for {}", file.path))?;
        let expected = digest_string(&file.sha256);
        if layer.digest != expected || layer.size != file.size {
            return Err(format!(
                "{}: layer {} of {} bytes, the lock says {expected} of {} bytes",
                file.path, layer.digest, layer.size, file.size
            ));
        }
        digests.push(layer.digest.clone());
    }
    if let Some(extra) = by_path.keys().next() {
        return Err(format!("a layer for {extra}, which the lock does not list"));
    }
    Ok(digests)
}

/// Downloads one layer into `dest/<path>`: into `<path>.part`, resumed with a range request where a
/// transfer broke off, hashed as it arrives, renamed once size and digest match the lock.
async fn download(
    client: &Client,
    image: &Reference,
    digest: &str,
    file: &LockedFile,
    dest: &Path,
    progress: &dyn Progress,
) -> Result<(), OciError> {
    let target = dest.join(&file.path);
    let part = dest.join(format!("{}.part", file.path));
    let io_err = |path: &Path| {
        let path = path.display().to_string();
        move |source| OciError::Io { path, source }
    };
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let mut out = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&part)
        .map_err(io_err(&part))?;
    let layer_err = |problem: String| OciError::Layer {
        path: file.path.clone(),
        problem,
    };
    let task = progress.start(&file.path, Some(file.size));
    let mut hasher = Sha256Hasher::new();
    let mut done = 0u64;
    let mut breaks = 0usize;
    while done < file.size {
        let broke = match client
            .pull_blob_stream_partial(image, digest, done, None)
            .await
        {
            Err(e) => Some(e.to_string()),
            Ok(response) => {
                let stream = match response {
                    BlobResponse::Partial(stream) => stream,
                    BlobResponse::Full(stream) => {
                        // The registry ignored the range: start over.
                        if done > 0 {
                            out.set_len(0).map_err(io_err(&part))?;
                            out.rewind().map_err(io_err(&part))?;
                            hasher = Sha256Hasher::new();
                            done = 0;
                        }
                        stream
                    }
                };
                let mut stream = stream.stream;
                let mut broke = None;
                while let Some(chunk) = stream.next().await {
                    let chunk = match chunk {
                        Ok(chunk) => chunk,
                        Err(e) => {
                            broke = Some(e.to_string());
                            break;
                        }
                    };
                    if done + chunk.len() as u64 > file.size {
                        return Err(layer_err(format!(
                            "the registry sent more than the lock's {} bytes",
                            file.size
                        )));
                    }
                    out.write_all(&chunk).map_err(io_err(&part))?;
                    hasher.update(&chunk);
                    done += chunk.len() as u64;
                    task.advance(chunk.len() as u64);
                }
                broke.or_else(|| (done < file.size).then(|| "the transfer ended early".to_owned()))
            }
        };
        if let Some(reason) = broke {
            breaks += 1;
            if breaks > RESUMES {
                return Err(layer_err(format!(
                    "the transfer broke off {breaks} times, the last at byte {done}: {reason}"
                )));
            }
        }
    }
    let actual = hasher.finish();
    if actual != file.sha256 {
        return Err(layer_err(format!(
            "the registry's layer has sha256 {actual}, the lock says {}",
            file.sha256
        )));
    }
    out.sync_all().map_err(io_err(&part))?;
    drop(out);
    fs::rename(&part, &target).map_err(io_err(&target))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> Vec<LockedFile> {
        vec![
            LockedFile {
                path: "config.json".into(),
                sha256: Sha256Digest::of(b"{}"),
                size: 2,
            },
            LockedFile {
                path: "model.safetensors".into(),
                sha256: Sha256Digest::of(b"weights"),
                size: 7,
            },
        ]
    }

    fn manifest(layers: &[(&str, &[u8])]) -> Vec<u8> {
        let layers: Vec<Descriptor> = layers
            .iter()
            .map(|(path, bytes)| Descriptor {
                annotations: Some(BTreeMap::from([(
                    FILEPATH_ANNOTATION.to_owned(),
                    path.to_string(),
                )])),
                ..Descriptor::of(layer_media_type(path), bytes)
            })
            .collect();
        serde_json::to_vec(&Manifest {
            schema_version: 2,
            media_type: Some(MANIFEST_MEDIA_TYPE.into()),
            artifact_type: Some(MODEL_ARTIFACT_TYPE.into()),
            config: Descriptor::of(MODEL_CONFIG_MEDIA_TYPE, b"{}"),
            layers,
            subject: None,
            annotations: None,
        })
        .unwrap()
    }

    #[test]
    fn layers_must_be_exactly_the_locked_files() {
        let good = manifest(&[("model.safetensors", b"weights"), ("config.json", b"{}")]);
        assert_eq!(check_layers(&good, &files()).unwrap().len(), 2);
        let swapped = manifest(&[("model.safetensors", b"other!!"), ("config.json", b"{}")]);
        assert!(
            check_layers(&swapped, &files())
                .unwrap_err()
                .contains("model.safetensors: layer sha256:")
        );
        let missing = manifest(&[("config.json", b"{}")]);
        assert!(
            check_layers(&missing, &files())
                .unwrap_err()
                .contains("no layer for model.safetensors")
        );
        let extra = manifest(&[
            ("model.safetensors", b"weights"),
            ("config.json", b"{}"),
            ("x.py", b""),
        ]);
        assert!(
            check_layers(&extra, &files())
                .unwrap_err()
                .contains("x.py, which the lock does not list")
        );
        assert!(
            check_layers(b"{\"schemaVersion\": 2}", &files())
                .unwrap_err()
                .contains("not an OCI image manifest")
        );
    }

    #[test]
    fn plain_http_only_on_loopback() {
        for registry in [
            "127.0.0.1:5000",
            "localhost:5000",
            "[::1]:5000",
            "127.0.0.1",
        ] {
            assert!(is_loopback(registry), "{registry}");
        }
        for registry in [
            "registry.example.com",
            "10.0.0.1:5000",
            "localhost.evil.com:5000",
        ] {
            assert!(!is_loopback(registry), "{registry}");
        }
    }
}
