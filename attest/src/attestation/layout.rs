//! Where attestations are kept.
//!
//! - **The local store** (outputs printed, not written to a file):
//!   `<sanctum home>/attestations/sha256/<output sha256>/<bundle sha256>.sigstore.json`. Content
//!   addressed twice over: the directory is the output's digest, so a verifier given the output finds
//!   every attestation of it, and the file name is the bundle's own digest, so nothing is overwritten.
//! - **The repository convention** (`--out FILE` inside a git work tree):
//!   `<repo root>/.attestations/<FILE's path from the root>.sigstore.json`, and the statement's subject
//!   name is that repository-relative path. One folder mirrors the tree, so `git add -A` (or
//!   `git add . .attestations`) carries the attestations with the code, a reviewer sees them in the
//!   diff, and `sanctum attest verify --git BASE..HEAD` finds those a pull request adds.
//! - Outside a git work tree, `--out FILE` puts the bundle beside it: `FILE.sigstore.json`.

use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};

use crate::digest::Sha256Digest;

/// Folder at the repository root holding committed attestations.
pub const REPO_DIR: &str = ".attestations";
/// Suffix of bundle files.
pub const BUNDLE_SUFFIX: &str = ".sigstore.json";
/// Folder of the local store under the sanctum home.
pub const STORE_DIR: &str = "attestations";

/// Where the bundle of an output written to a file goes, and the subject name to give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The bundle file.
    pub bundle: PathBuf,
    /// The subject name: the repository-relative path (`/`-separated), or the file name outside a
    /// repository.
    pub subject_name: String,
    /// The repository root, when the output is inside one.
    pub repo_root: Option<PathBuf>,
}

/// The placement for an output file by the repository convention. The file need not exist yet, but its
/// directory must.
pub fn placement_for_output(output: &Path) -> io::Result<Placement> {
    let file_name = output.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the output path has no file name",
        )
    })?;
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir = parent.canonicalize().map_err(|e| {
        io::Error::new(e.kind(), format!("its directory {}: {e}", parent.display()))
    })?;
    let absolute = dir.join(file_name);
    let placement = if let Some(root) = repo_root(&dir) {
        let relative = absolute
            .strip_prefix(&root)
            .map_err(|_| io::Error::other("output is not below its repository root"))?;
        let subject_name = slash_path(relative);
        let mut bundle = root.join(REPO_DIR).join(relative).into_os_string();
        bundle.push(BUNDLE_SUFFIX);
        Placement {
            bundle: PathBuf::from(bundle),
            subject_name,
            repo_root: Some(root),
        }
    } else {
        let mut bundle = absolute.clone().into_os_string();
        bundle.push(BUNDLE_SUFFIX);
        Placement {
            bundle: PathBuf::from(bundle),
            subject_name: file_name.to_string_lossy().into_owned(),
            repo_root: None,
        }
    };
    placement.walk(false)?;
    Ok(placement)
}

impl Placement {
    /// Writes the bundle atomically, creating the directories of the repository convention one
    /// at a time. Nothing on the way is followed: a committed `.attestations` that is a symlink
    /// (or any symlink below it, or at the bundle's own path) is refused, naming it.
    pub fn write_bundle(&self, json: &[u8]) -> io::Result<()> {
        self.walk(true)?;
        write_atomic(&self.bundle, json)
    }

    /// Checks every existing step from the repository root (or the output's own, canonical,
    /// directory) to the bundle: directories, never symlinks. With `create`, makes the missing ones.
    fn walk(&self, create: bool) -> io::Result<()> {
        let parent = self.bundle.parent().unwrap_or(Path::new("."));
        let (mut at, below) = match &self.repo_root {
            Some(root) => (
                root.clone(),
                parent
                    .strip_prefix(root)
                    .unwrap_or(Path::new(""))
                    .to_path_buf(),
            ),
            None => (parent.to_path_buf(), PathBuf::new()),
        };
        for component in below.components() {
            at.push(component);
            match std::fs::symlink_metadata(&at) {
                Ok(m) if m.file_type().is_symlink() => return Err(symlink_refused(&at)),
                Ok(m) if !m.is_dir() => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{} is not a directory", at.display()),
                    ));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    match std::fs::create_dir(&at) {
                        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                        // Made here, or by a racing writer: either way it is checked again.
                        _ if std::fs::symlink_metadata(&at)?.is_dir() => {}
                        _ => return Err(symlink_refused(&at)),
                    }
                }
                // Nothing further exists, so nothing further can be a symlink.
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        match std::fs::symlink_metadata(&self.bundle) {
            Ok(m) if m.file_type().is_symlink() => Err(symlink_refused(&self.bundle)),
            _ => Ok(()),
        }
    }
}

fn symlink_refused(path: &Path) -> io::Error {
    let target = std::fs::read_link(path).map_or_else(|_| "?".into(), |t| t.display().to_string());
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{} is a symlink (to {target}); sanctum never writes through one",
            path.display()
        ),
    )
}

/// The nearest directory at or above `dir` holding `.git` (a directory, or a file in worktrees).
pub fn repo_root(dir: &Path) -> Option<PathBuf> {
    dir.ancestors()
        .find(|d| d.join(".git").exists())
        .map(Path::to_path_buf)
}

/// The output a bundle file is about, by the conventions: `<root>/.attestations/<rel>.sigstore.json` →
/// `<root>/<rel>`; `FILE.sigstore.json` elsewhere → `FILE`; a bundle of the local store → None.
pub fn output_for_bundle(bundle: &Path) -> Option<PathBuf> {
    let name = bundle.file_name()?.to_str()?;
    let stem = name.strip_suffix(BUNDLE_SUFFIX)?;
    let components: Vec<Component<'_>> = bundle.components().collect();
    if let Some(i) = components.iter().rposition(|c| c.as_os_str() == REPO_DIR) {
        let root: PathBuf = components[..i].iter().collect();
        let mut rel: PathBuf = components[i + 1..components.len() - 1].iter().collect();
        rel.push(stem);
        return Some(root.join(rel));
    }
    if components.iter().any(|c| c.as_os_str() == STORE_DIR) && stem.parse::<Sha256Digest>().is_ok()
    {
        return None;
    }
    Some(bundle.with_file_name(stem))
}

/// For `--git`: the repository-relative output path a committed bundle path names
/// (`.attestations/src/a.py.sigstore.json` → `src/a.py`).
pub fn output_for_repo_bundle(relative_bundle: &str) -> Option<String> {
    relative_bundle
        .strip_prefix(REPO_DIR)?
        .strip_prefix('/')?
        .strip_suffix(BUNDLE_SUFFIX)
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
}

/// The local store's path for a bundle of the output with digest `output`.
pub fn store_path(home: &Path, output: &Sha256Digest, bundle_json: &[u8]) -> PathBuf {
    home.join(STORE_DIR)
        .join("sha256")
        .join(output.to_hex())
        .join(format!(
            "{}{BUNDLE_SUFFIX}",
            Sha256Digest::of(bundle_json).to_hex()
        ))
}

/// Every bundle the local store holds for an output.
pub fn store_bundles(home: &Path, output: &Sha256Digest) -> io::Result<Vec<PathBuf>> {
    let dir = home.join(STORE_DIR).join("sha256").join(output.to_hex());
    let mut found = Vec::new();
    match std::fs::read_dir(&dir) {
        Ok(entries) => {
            for entry in entries {
                let path = entry?.path();
                if path.to_str().is_some_and(|p| p.ends_with(BUNDLE_SUFFIX)) {
                    found.push(path);
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    found.sort();
    Ok(found)
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, synced, then renamed
/// over `path`. Creates the directory when missing.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".sanctum-")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

fn slash_path(path: &Path) -> String {
    path.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_convention_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join(".git")).unwrap();
        std::fs::create_dir_all(root.join("src/gen")).unwrap();
        let p = placement_for_output(&root.join("src/gen/a.py")).unwrap();
        assert_eq!(p.subject_name, "src/gen/a.py");
        assert_eq!(
            p.bundle,
            root.join(".attestations/src/gen/a.py.sigstore.json")
        );
        assert_eq!(p.repo_root.as_deref(), Some(root.as_path()));
        assert_eq!(
            output_for_bundle(&p.bundle).unwrap(),
            root.join("src/gen/a.py")
        );
        assert_eq!(
            output_for_repo_bundle(".attestations/src/gen/a.py.sigstore.json").as_deref(),
            Some("src/gen/a.py")
        );
        assert_eq!(output_for_repo_bundle("src/a.sigstore.json"), None);
        assert_eq!(output_for_repo_bundle(".attestations/.sigstore.json"), None);
    }

    #[test]
    fn outside_a_repo_the_bundle_sits_beside_the_output() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        if repo_root(&root).is_some() {
            return; // the temp dir is inside a repository on this machine
        }
        let p = placement_for_output(&root.join("out.txt")).unwrap();
        assert_eq!(p.subject_name, "out.txt");
        assert_eq!(p.bundle, root.join("out.txt.sigstore.json"));
        assert_eq!(output_for_bundle(&p.bundle).unwrap(), root.join("out.txt"));
    }

    #[test]
    fn store_is_content_addressed() {
        let dir = tempfile::tempdir().unwrap();
        let out = Sha256Digest::of(b"output");
        let path = store_path(dir.path(), &out, b"bundle");
        assert!(path.starts_with(dir.path().join("attestations/sha256").join(out.to_hex())));
        assert!(path.ends_with(format!("{}.sigstore.json", Sha256Digest::of(b"bundle"))));
        write_atomic(&path, b"bundle").unwrap();
        assert_eq!(store_bundles(dir.path(), &out).unwrap(), vec![path.clone()]);
        assert_eq!(output_for_bundle(&path), None);
        assert!(
            store_bundles(dir.path(), &Sha256Digest::of(b"other"))
                .unwrap()
                .is_empty()
        );
    }
}
