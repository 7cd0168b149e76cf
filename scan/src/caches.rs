//! Where model runners keep their models, and what their layouts say about a file: the Hugging Face
//! hub cache (repository and revision, and the blob name that is the file's sha256), Ollama's
//! manifests and content-addressed blobs, LM Studio's and llama.cpp's model folders.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::path::{Component, Path, PathBuf};

use serde::Serialize;

/// Largest Ollama manifest read (real ones are about a kilobyte).
const MAX_MANIFEST: u64 = 1 << 20;

/// Manifests read per Ollama models directory, at most.
const MAX_MANIFESTS: usize = 100_000;

/// A well-known model cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheKind {
    /// The Hugging Face hub cache (`huggingface_hub`, transformers, hf-hub).
    HuggingFace,
    /// Ollama's models directory.
    Ollama,
    /// LM Studio's models folder.
    LmStudio,
    /// llama.cpp's download cache (`-hf`, `--model-url`).
    LlamaCpp,
    /// sanctum's own store.
    Sanctum,
}

/// A directory to scan, and whether it is a known cache (whose layout names what is in it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Root {
    /// The directory or file.
    pub path: PathBuf,
    /// The cache it is, `None` for a path given by the user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheKind>,
}

/// The well-known caches of a user whose home is `home`, honouring the variables that move them
/// (`HF_HUB_CACHE`, `HF_HOME`, `XDG_CACHE_HOME`, `OLLAMA_MODELS`, `LLAMA_CACHE`), as each tool
/// resolves them. `var` reads the environment (the CLI passes `std::env::var_os`). Only the
/// directories that exist are returned.
pub fn well_known(home: &Path, var: impl Fn(&str) -> Option<OsString>) -> Vec<Root> {
    let var = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let cache_home = var("XDG_CACHE_HOME").unwrap_or_else(|| home.join(".cache"));
    let hf = var("HF_HUB_CACHE").unwrap_or_else(|| {
        var("HF_HOME")
            .unwrap_or_else(|| cache_home.join("huggingface"))
            .join("hub")
    });
    let candidates = [
        (hf, CacheKind::HuggingFace),
        (
            var("OLLAMA_MODELS").unwrap_or_else(|| home.join(".ollama/models")),
            CacheKind::Ollama,
        ),
        // Ollama's Linux service runs as the `ollama` user.
        (
            PathBuf::from("/usr/share/ollama/.ollama/models"),
            CacheKind::Ollama,
        ),
        (home.join(".lmstudio/models"), CacheKind::LmStudio),
        (cache_home.join("lm-studio/models"), CacheKind::LmStudio),
        (
            var("LLAMA_CACHE").unwrap_or_else(|| cache_home.join("llama.cpp")),
            CacheKind::LlamaCpp,
        ),
    ];
    let mut roots: Vec<Root> = Vec::new();
    for (path, cache) in candidates {
        if path.is_dir() && !roots.iter().any(|r| r.path == path) {
            roots.push(Root {
                path,
                cache: Some(cache),
            });
        }
    }
    roots
}

/// What a cache's layout says a file is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "cache", rename_all = "kebab-case")]
pub enum Origin {
    /// A file of a Hugging Face hub cache snapshot.
    HuggingFace {
        /// The repository, `org/name`.
        repo: String,
        /// The snapshot's commit.
        revision: String,
        /// The file's path in the repository.
        file: String,
    },
    /// An Ollama blob that a manifest names.
    Ollama {
        /// `model:tag` (the registry and `library/` namespace left out for Ollama's own library).
        model: String,
        /// The layer's media type (`application/vnd.ollama.image.model`...).
        media_type: String,
    },
}

impl Origin {
    /// The name the model goes by in its cache.
    pub fn model_name(&self) -> String {
        match self {
            Origin::HuggingFace { repo, revision, .. } => format!("{repo}@{revision}"),
            Origin::Ollama { model, .. } => model.clone(),
        }
    }
}

/// The sha256 a content-addressed layout names a file by: an Ollama `sha256-<hex>` blob, or a
/// Hugging Face blob named by its LFS sha256 (small git files are named by their git sha1, which
/// says nothing here). `link` is the symlink's target when the file was reached through one.
pub fn named_sha256(path: &Path, link: Option<&Path>) -> Option<String> {
    let name = link.unwrap_or(path).file_name()?.to_str()?;
    let hex = name.strip_prefix("sha256-").unwrap_or(name);
    let is_hex = hex.len() == 64
        && hex
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
    let in_blobs = link
        .unwrap_or(path)
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|d| d == "blobs");
    (is_hex && in_blobs).then(|| hex.to_string())
}

/// Reads a Hugging Face hub cache path: `…/models--org--name/snapshots/<rev>/<file>`.
pub fn hugging_face_origin(path: &Path) -> Option<Origin> {
    let parts: Vec<&str> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect();
    let at = parts.iter().rposition(|p| p.starts_with("models--"))?;
    if parts.get(at + 1) != Some(&"snapshots") {
        return None;
    }
    let repo = parts.get(at)?.strip_prefix("models--")?.replace("--", "/");
    let revision = (*parts.get(at + 2)?).to_string();
    let file = parts.get(at + 3..)?.join("/");
    (!file.is_empty()).then_some(Origin::HuggingFace {
        repo,
        revision,
        file,
    })
}

/// The blobs an Ollama models directory's manifests name, by sha256 hex: every manifest under
/// `manifests/<registry>/<namespace>/<model>/<tag>`. Unreadable or malformed manifests are
/// returned as problems, never fatal.
pub fn ollama_blobs(models: &Path) -> (HashMap<String, Origin>, Vec<(PathBuf, String)>) {
    #[derive(serde::Deserialize)]
    struct Manifest {
        #[serde(default)]
        layers: Vec<Layer>,
    }
    #[derive(serde::Deserialize)]
    struct Layer {
        #[serde(rename = "mediaType")]
        media_type: String,
        digest: String,
    }
    let manifests = models.join("manifests");
    let mut blobs = HashMap::new();
    let mut problems = Vec::new();
    let walk = walkdir::WalkDir::new(&manifests)
        .follow_links(false)
        .into_iter();
    for entry in walk.take(MAX_MANIFESTS) {
        let entry = match entry {
            Ok(entry) if entry.file_type().is_file() => entry,
            Ok(_) => continue,
            Err(e) if manifests.exists() => {
                let path = e.path().unwrap_or(&manifests).to_path_buf();
                problems.push((path, e.to_string()));
                continue;
            }
            Err(_) => break,
        };
        let path = entry.path();
        let Ok(relative) = path.strip_prefix(&manifests) else {
            continue;
        };
        let read = fs::File::open(path).and_then(|f| {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::Read::take(f, MAX_MANIFEST), &mut text)?;
            Ok(text)
        });
        let manifest: Manifest = match read
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
        {
            Ok(m) => m,
            Err(e) => {
                problems.push((path.to_path_buf(), format!("not an Ollama manifest: {e}")));
                continue;
            }
        };
        let model = ollama_model_name(relative);
        for layer in manifest.layers {
            if let Some(hex) = layer.digest.strip_prefix("sha256:") {
                blobs
                    .entry(hex.to_string())
                    .or_insert_with(|| Origin::Ollama {
                        model: model.clone(),
                        media_type: layer.media_type,
                    });
            }
        }
    }
    (blobs, problems)
}

/// `registry.ollama.ai/library/llama3/8b` → `llama3:8b`; other registries and namespaces are kept:
/// `hf.co/org/repo/Q4_K_M` → `hf.co/org/repo:Q4_K_M`, as `ollama list` shows them.
fn ollama_model_name(relative: &Path) -> String {
    let parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let (tag, rest) = match parts.split_last() {
        Some((tag, rest)) => (tag.as_str(), rest),
        None => return String::new(),
    };
    let rest = match rest {
        [registry, namespace, model]
            if registry == "registry.ollama.ai" && namespace == "library" =>
        {
            model.clone()
        }
        [registry, rest @ ..] if registry == "registry.ollama.ai" => rest.join("/"),
        _ => rest.join("/"),
    };
    format!("{rest}:{tag}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugging_face_paths_name_repo_revision_and_file() {
        let origin = hugging_face_origin(Path::new(
            "/h/.cache/huggingface/hub/models--sentence-transformers--all-MiniLM-L6-v2/snapshots/c9745ed/1_Pooling/config.json",
        ));
        assert_eq!(
            origin,
            Some(Origin::HuggingFace {
                repo: "sentence-transformers/all-MiniLM-L6-v2".into(),
                revision: "c9745ed".into(),
                file: "1_Pooling/config.json".into(),
            })
        );
        assert_eq!(
            hugging_face_origin(Path::new("/h/hub/models--a--b/blobs/0123")),
            None
        );
    }

    #[test]
    fn ollama_names_follow_ollama_list() {
        assert_eq!(
            ollama_model_name(Path::new("registry.ollama.ai/library/llama3/8b")),
            "llama3:8b"
        );
        assert_eq!(
            ollama_model_name(Path::new("registry.ollama.ai/someone/tiny/latest")),
            "someone/tiny:latest"
        );
        assert_eq!(
            ollama_model_name(Path::new("hf.co/org/repo/Q4_K_M")),
            "hf.co/org/repo:Q4_K_M"
        );
    }

    #[test]
    fn blob_names_are_sha256_only_in_blobs_dirs() {
        let hex = "a".repeat(64);
        let blob = PathBuf::from(format!("/m/blobs/sha256-{hex}"));
        assert_eq!(named_sha256(&blob, None), Some(hex.clone()));
        let link = PathBuf::from(format!("../../blobs/{hex}"));
        assert_eq!(
            named_sha256(Path::new("/c/snapshots/r/model.safetensors"), Some(&link)),
            Some(hex.clone())
        );
        assert_eq!(named_sha256(Path::new(&format!("/m/x/{hex}")), None), None);
        let sha1 = PathBuf::from("../../blobs/0123456789abcdef0123456789abcdef01234567");
        assert_eq!(
            named_sha256(Path::new("/c/s/r/config.json"), Some(&sha1)),
            None
        );
    }

    #[test]
    fn caches_follow_the_variables_that_move_them() {
        let home = tempfile::tempdir().unwrap();
        let moved = home.path().join("elsewhere/hub");
        fs::create_dir_all(&moved).unwrap();
        fs::create_dir_all(home.path().join(".ollama/models")).unwrap();
        fs::create_dir_all(home.path().join(".cache/huggingface/hub")).unwrap();
        let roots = well_known(home.path(), |name| {
            (name == "HF_HUB_CACHE").then(|| moved.clone().into_os_string())
        });
        let paths: Vec<_> = roots.iter().map(|r| r.path.clone()).collect();
        assert!(paths.contains(&moved), "{paths:?}");
        assert!(paths.contains(&home.path().join(".ollama/models")));
        assert!(!paths.contains(&home.path().join(".cache/huggingface/hub")));
    }
}
