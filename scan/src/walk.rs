//! Walking the roots and examining what is found: every regular file once (a file reached by several
//! paths, as a Hugging Face snapshot's symlink and its blob, is one file with aliases), recognized by
//! content, and the model files hashed, in parallel and in bounded chunks.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use attest::Sha256Digest;
use attest::progress::Progress;

use crate::caches::Root;
use crate::inspect::{self, Inspection};
use crate::report::Unreadable;

/// A regular file the walk reached.
#[derive(Debug)]
pub(crate) struct Candidate {
    /// The path it is reported under: a symlink's own path when reached through one (the name a
    /// cache gives the content), else the file's.
    pub path: PathBuf,
    /// Other paths to the same file.
    pub aliases: Vec<PathBuf>,
    /// The symlink's target as written, when `path` is a symlink.
    pub link: Option<PathBuf>,
    pub size: u64,
}

/// What the walk found.
pub(crate) struct Walked {
    pub files: Vec<Candidate>,
    pub unreadable: Vec<Unreadable>,
}

/// Every regular file under the roots, once per (device, inode). Directory symlinks are not
/// followed (no loops, no escaping the roots); file symlinks are, since caches name content
/// through them.
pub(crate) fn walk(roots: &[Root]) -> Walked {
    let mut by_id: HashMap<(u64, u64), usize> = HashMap::new();
    let mut files: Vec<Candidate> = Vec::new();
    let mut unreadable = Vec::new();
    for root in roots {
        for entry in walkdir::WalkDir::new(&root.path).follow_links(false) {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    let path = e.path().unwrap_or(&root.path).to_path_buf();
                    unreadable.push(Unreadable {
                        path,
                        error: io_message(e.into()),
                    });
                    continue;
                }
            };
            let path = entry.path();
            let (metadata, link) = if entry.path_is_symlink() {
                match (fs::metadata(path), fs::read_link(path)) {
                    (Ok(m), Ok(target)) if m.is_file() => (m, Some(target)),
                    // Dangling links and links to directories.
                    _ => continue,
                }
            } else if entry.file_type().is_file() {
                match entry.metadata() {
                    Ok(m) => (m, None),
                    Err(e) => {
                        unreadable.push(Unreadable {
                            path: path.to_path_buf(),
                            error: io_message(e.into()),
                        });
                        continue;
                    }
                }
            } else {
                continue;
            };
            let id = (metadata.dev(), metadata.ino());
            match by_id.get(&id) {
                Some(&at) => {
                    let known = &mut files[at];
                    // The same path again, from a root inside another.
                    if known.path == path || known.aliases.iter().any(|a| a == path) {
                        continue;
                    }
                    // A named link replaces a blob path found first.
                    if link.is_some() && known.link.is_none() {
                        let blob = std::mem::replace(&mut known.path, path.to_path_buf());
                        known.aliases.push(blob);
                        known.link = link;
                    } else {
                        known.aliases.push(path.to_path_buf());
                    }
                }
                None => {
                    by_id.insert(id, files.len());
                    files.push(Candidate {
                        path: path.to_path_buf(),
                        aliases: Vec::new(),
                        link,
                        size: metadata.len(),
                    });
                }
            }
        }
    }
    Walked { files, unreadable }
}

/// A model file, recognized and hashed.
#[derive(Debug)]
pub(crate) struct Found {
    pub candidate: Candidate,
    pub inspection: Inspection,
    pub sha256: Sha256Digest,
}

/// Recognizes every candidate by content on `threads` threads, then hashes the model files among
/// them, reporting the bytes hashed to `progress`. Files that cannot be read go to `unreadable`.
pub(crate) fn examine(
    candidates: Vec<Candidate>,
    threads: usize,
    progress: &dyn Progress,
    unreadable: &mut Vec<Unreadable>,
) -> Vec<Found> {
    let problems = Mutex::new(Vec::new());
    let recognized: Vec<(Candidate, Inspection)> = parallel(candidates, threads, |candidate| {
        match inspect::inspect(&candidate.path) {
            Ok(Some(inspection)) => Some((candidate, inspection)),
            Ok(None) => None,
            Err(e) => {
                lock(&problems).push(Unreadable {
                    path: candidate.path,
                    error: io_message(e),
                });
                None
            }
        }
    });
    let total = recognized.iter().map(|(c, _)| c.size).sum();
    // One task for every thread: `ProgressTask` is `Send`, not `Sync`.
    let task = Mutex::new(progress.start("hashing model files", Some(total)));
    let advance = |bytes: u64| lock(&task).advance(bytes);
    let found = parallel(recognized, threads, |(candidate, inspection)| {
        match hash(&candidate.path, &advance) {
            Ok(sha256) => Some(Found {
                candidate,
                inspection,
                sha256,
            }),
            Err(e) => {
                lock(&problems).push(Unreadable {
                    path: candidate.path,
                    error: io_message(e),
                });
                None
            }
        }
    });
    drop(task);
    unreadable.extend(problems.into_inner().unwrap_or_else(|e| e.into_inner()));
    found
}

/// The sha256 of a file, read in bounded chunks, each chunk's length passed to `advance`.
pub(crate) fn hash(path: &Path, advance: &(dyn Fn(u64) + Sync)) -> io::Result<Sha256Digest> {
    let file = attest::files::open_regular(path)?;
    Sha256Digest::of_reader(Advancing { file, advance }).map(|(digest, _)| digest)
}

/// A reader that reports how many bytes each read gave.
struct Advancing<'a, R> {
    file: R,
    advance: &'a (dyn Fn(u64) + Sync),
}

impl<R: Read> Read for Advancing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        (self.advance)(n as u64);
        Ok(n)
    }
}

/// `work` over every item on a pool of `threads` threads (rayon), keeping the order of the items.
fn parallel<T: Send, U: Send>(
    items: Vec<T>,
    threads: usize,
    work: impl Fn(T) -> Option<U> + Sync + Send,
) -> Vec<U> {
    use rayon::prelude::*;
    match rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
    {
        Ok(pool) => pool.install(|| items.into_par_iter().filter_map(&work).collect()),
        // No threads to be had: the same work, in order, on this one.
        Err(_) => items.into_iter().filter_map(work).collect(),
    }
}

/// A poisoned lock still holds usable data here (each slot is written once).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn io_message(e: io::Error) -> String {
    e.to_string()
}
