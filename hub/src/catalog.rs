//! What the hub serves: the lock's models that are in the store and verify, and each file only
//! after its bytes matched the lock.
//!
//! Every file is hashed in full at startup. A request then opens the file, checks it is the same
//! regular file it names (no symlink, same inode as the path's) and compares its identity (device,
//! inode, size, modification and change times) with the one that verified; any write or swap
//! changes the change time or the inode, so the file is hashed again before a byte goes out, and
//! refused when it no longer matches. The bytes are then sent from the handle that was checked.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Mutex;

use attest::Sha256Digest;
use attest::lockfile::{LockedFile, Lockfile, ModelEntry};
use runner::store::{ModelState, Store};

/// One model the hub serves.
#[derive(Debug)]
pub struct ServedModel {
    /// Its lock entry.
    pub entry: ModelEntry,
    /// The commit id it is served at.
    pub commit: String,
    /// Its directory in the store.
    pub dir: PathBuf,
}

impl ServedModel {
    /// The locked file at `path`, if the lock lists one.
    pub fn file(&self, path: &str) -> Option<&LockedFile> {
        self.entry.files.iter().find(|f| f.path == path)
    }

    /// True for the revisions this model answers to: `main` and its commit.
    pub fn has_revision(&self, revision: &str) -> bool {
        revision == "main" || revision == self.commit
    }
}

/// Why a lock entry is not served.
#[derive(Debug)]
pub struct Unserved {
    /// The model's name.
    pub name: String,
    /// Why.
    pub reason: String,
}

/// A file refused at request time.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The store's copy no longer matches the lock (or cannot be checked).
    #[error("{model}/{path}: {reason}")]
    Refused {
        /// The model.
        model: String,
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// A file that matched the lock, open for reading.
#[derive(Debug)]
pub struct VerifiedFile {
    /// The handle whose bytes were checked.
    pub file: File,
    /// Its size.
    pub size: u64,
}

/// The identity of a file's current contents, as far as the kernel tracks writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Identity {
    fn of(meta: &fs::Metadata) -> Self {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// The served models and the identities of the files that verified.
#[derive(Debug)]
pub struct Catalog {
    models: Vec<ServedModel>,
    verified: Mutex<HashMap<(String, String), Identity>>,
}

impl Catalog {
    /// Every model of `lock` present in `store` whose every file verifies; the others with why
    /// they are left out.
    pub fn open(lock: &Lockfile, store: &Store) -> (Self, Vec<Unserved>) {
        let catalog = Self {
            models: Vec::new(),
            verified: Mutex::new(HashMap::new()),
        };
        let mut models = Vec::new();
        let mut unserved = Vec::new();
        for entry in &lock.models {
            let unserve = |reason: String| Unserved {
                name: entry.name.clone(),
                reason,
            };
            match store.state(entry) {
                ModelState::Present => {}
                ModelState::Missing => {
                    unserved.push(unserve("not in the store (sanctum models pull it)".into()));
                    continue;
                }
                ModelState::Damaged(problem) => {
                    unserved.push(unserve(format!("damaged in the store: {problem}")));
                    continue;
                }
            }
            let model = ServedModel {
                commit: runner::source::hf::hub_commit(entry),
                dir: store.model_dir(entry),
                entry: entry.clone(),
            };
            let failed = model
                .entry
                .files
                .iter()
                .find_map(|file| catalog.open_file(&model, file).err());
            match failed {
                None => models.push(model),
                Some(e) => unserved.push(unserve(e.to_string())),
            }
        }
        (Self { models, ..catalog }, unserved)
    }

    /// The served models, in lock order.
    pub fn models(&self) -> &[ServedModel] {
        &self.models
    }

    /// The served model named `name`.
    pub fn model(&self, name: &str) -> Option<&ServedModel> {
        self.models.iter().find(|m| m.entry.name == name)
    }

    /// Opens `file` of `model`, checked against the lock (hashed again unless its identity is the
    /// one that verified last).
    pub fn open_file(
        &self,
        model: &ServedModel,
        file: &LockedFile,
    ) -> Result<VerifiedFile, FileError> {
        let refused = |reason: String| FileError::Refused {
            model: model.entry.name.clone(),
            path: file.path.clone(),
            reason,
        };
        let io_refused = |what: &str, e: io::Error| refused(format!("{what}: {e}"));
        let path = model.dir.join(&file.path);
        let link = fs::symlink_metadata(&path).map_err(|e| io_refused("cannot stat", e))?;
        if !link.is_file() {
            return Err(refused("not a regular file".into()));
        }
        let handle =
            attest::files::open_regular(&path).map_err(|e| io_refused("cannot open", e))?;
        let meta = handle
            .metadata()
            .map_err(|e| io_refused("cannot stat", e))?;
        let identity = Identity::of(&meta);
        if identity.dev != link.dev() || identity.ino != link.ino() {
            return Err(refused("replaced while it was opened".into()));
        }
        if meta.len() != file.size {
            return Err(refused(format!(
                "{} bytes, the lock says {}",
                meta.len(),
                file.size
            )));
        }
        let key = (model.entry.name.clone(), file.path.clone());
        let known = self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .copied();
        if known != Some(identity) {
            // At most the locked size: a file that grew is caught by the identity check below.
            let (actual, read) = Sha256Digest::of_reader((&handle).take(file.size))
                .map_err(|e| io_refused("cannot read", e))?;
            if read != file.size {
                return Err(refused(format!(
                    "ended after {read} of {} bytes",
                    file.size
                )));
            }
            if actual != file.sha256 {
                return Err(refused(format!(
                    "sha256 {actual} does not match the lock's {}",
                    file.sha256
                )));
            }
            let after = handle
                .metadata()
                .map_err(|e| io_refused("cannot stat", e))?;
            if Identity::of(&after) != identity {
                return Err(refused("written to while it was being verified".into()));
            }
            self.verified
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, identity);
        }
        Ok(VerifiedFile {
            file: handle,
            size: file.size,
        })
    }
}
