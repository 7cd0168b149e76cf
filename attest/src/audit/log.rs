//! The log on disk, in `$SANCTUM_HOME/audit/`:
//!
//! - `log.jsonl`: one [`Entry`] per line, appended with one `write` and fsynced; the RFC 6962
//!   leaf of an entry is its line without the newline. Each entry names its index and the leaf hash
//!   of the one before (`prev`), so an edit, a drop or a swap is pinned to the first bad index.
//! - `checkpoint`: the signed tree head after the latest append (written by rename).
//! - `tree`: the tree's right edge and how many bytes of the log it covers, so an append costs
//!   O(log n) instead of a read of the whole log. Only a cache: nothing is trusted from it, and
//!   lines beyond it (a crash between the append and its update) are replayed at the next append.
//! - `lock`: appends from concurrent processes (a server and a CLI) take it in turn.
//! - `pruned`: the leaf hashes (32 bytes each) of entries `0..k` removed by retention
//!   ([`AuditLog::prune`]). The tree still covers them, so the log verifies, old checkpoints stay
//!   consistent and a pruned entry kept elsewhere (a SIEM) can still be proven; only its content is
//!   gone. A prune writes `pruned` first, then rewrites `log.jsonl` without those lines: a kill in
//!   between leaves lines that `pruned` also holds, and they must hash to it.
//!
//! A kill at any point leaves a log that verifies: a torn last line (no newline) is ignored by
//! [`AuditLog::verify`] and cut off by the next append; a checkpoint that lags the log covers a
//! prefix of it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::merkle::{self, Frontier, Hash};
use super::note::{Checkpoint, NoteError, key_name};
use crate::attestation::layout::write_atomic;
use crate::keys::{PublicKey, SigningKey};
use crate::statement::rfc3339;

/// Longest entry line accepted: entries hold names and digests, never prompt text.
pub const MAX_ENTRY_BYTES: usize = 16 << 10;

/// How an audited action ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Done as asked.
    #[default]
    Ok,
    /// Refused by a check (a digest, a signature, the policy).
    Refused,
    /// Failed for another reason.
    Error,
}

/// What is recorded of one action; never prompt or output text, only digests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    /// The kind of action: `run`, `chat`, `embed`, `bench`, `pull`, `refusal`, ….
    pub event: String,
    /// The command (`sanctum models pull`) or the route (`POST /v1/chat/completions`).
    pub command: String,
    /// The model's lock name.
    pub model: Option<String>,
    /// The model's lock digest (`sha256:…`).
    pub model_digest: Option<String>,
    /// sha256 of the output.
    pub output_digest: Option<String>,
    /// sha256 of the output's attestation bundle.
    pub bundle_digest: Option<String>,
    /// How it ended.
    pub outcome: Outcome,
    /// Why it was refused or failed.
    pub detail: Option<String>,
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Position in the log, from 0.
    pub index: u64,
    /// When it was appended (RFC 3339, UTC).
    pub time: String,
    /// Who ran sanctum (`$USER`, else `uid N`).
    pub user: String,
    /// See [`Event::event`].
    pub event: String,
    /// See [`Event::command`].
    pub command: String,
    /// See [`Event::model`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// See [`Event::model_digest`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_digest: Option<String>,
    /// See [`Event::output_digest`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_digest: Option<String>,
    /// See [`Event::bundle_digest`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_digest: Option<String>,
    /// How it ended.
    pub outcome: Outcome,
    /// See [`Event::detail`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Hex leaf hash of the entry before (64 zeros for the first).
    pub prev: String,
}

/// Why the log could not be read, appended to, or verified.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A file of the log could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The log does not match itself or its checkpoint; `index` is the first entry found bad.
    #[error("{path}: entry {index}: {reason}")]
    Tampered {
        /// The log file.
        path: PathBuf,
        /// First bad index.
        index: u64,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint was not accepted.
    #[error("{path}: {source}")]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// The cause.
        source: NoteError,
    },
    /// An index asked for is not in the log.
    #[error("entry {index} is not in the log: it holds {size} entries")]
    NoSuchEntry {
        /// Asked for.
        index: u64,
        /// Entries the checkpoint covers.
        size: u64,
    },
}

impl AuditError {
    /// True when the log or a checkpoint failed a check (not when a file could not be read).
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Tampered { .. } | Self::Checkpoint { .. })
    }
}

/// What [`AuditLog::verify`] established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Complete entries in the log.
    pub entries: u64,
    /// The stored checkpoint the entries match (None for an empty log without one).
    pub checkpoint: Option<Checkpoint>,
    /// A torn last line (a crash mid-append) was ignored.
    pub torn_tail: bool,
    /// Size of the earlier checkpoint the log was shown consistent with, when one was given.
    pub consistent_with: Option<u64>,
    /// Entries pruned by retention: only their leaf hashes are kept (counted in `entries`).
    pub pruned: u64,
}

/// The audit log in one directory.
#[derive(Debug, Clone)]
pub struct AuditLog {
    dir: PathBuf,
    retention: Option<Duration>,
}

/// How far past the retention the oldest entry may get before an append prunes: pruning rewrites
/// the log, so it runs in daily batches rather than at every append.
pub const PRUNE_SLACK: Duration = Duration::from_secs(24 * 3600);

/// The `tree` cache: the right edge of the tree over the first `bytes` bytes of the log.
#[derive(Debug, Default, Serialize, Deserialize)]
struct TreeCache {
    bytes: u64,
    size: u64,
    last_leaf: String,
    peaks: Vec<String>,
}

impl AuditLog {
    /// The log kept in `dir` (created at the first append).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            retention: None,
        }
    }

    /// Keeps entries for `retention`: an append prunes the ones older than that once the oldest
    /// is [`PRUNE_SLACK`] past it.
    pub fn with_retention(mut self, retention: Option<Duration>) -> Self {
        self.retention = retention;
        self
    }

    fn pruned_path(&self) -> PathBuf {
        self.dir.join("pruned")
    }

    fn tree_path(&self) -> PathBuf {
        self.dir.join("tree")
    }

    /// How many entries retention pruned (they are `0..n`).
    pub fn pruned(&self) -> Result<u64, AuditError> {
        Ok(self.pruned_leaves()?.len() as u64)
    }

    /// The leaf hashes of the pruned entries, in order.
    fn pruned_leaves(&self) -> Result<Vec<Hash>, AuditError> {
        let path = self.pruned_path();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Self::io(&path)(e)),
        };
        if bytes.len() % 32 != 0 {
            return Err(AuditError::Tampered {
                path,
                index: (bytes.len() / 32) as u64,
                reason: format!(
                    "{} bytes is not a whole number of 32-byte leaf hashes: the file was cut or edited",
                    bytes.len()
                ),
            });
        }
        Ok(bytes
            .chunks_exact(32)
            .map(|c| {
                let mut leaf = [0; 32];
                leaf.copy_from_slice(c);
                leaf
            })
            .collect())
    }

    /// The entries file.
    pub fn path(&self) -> PathBuf {
        self.dir.join("log.jsonl")
    }

    /// The latest signed checkpoint's file.
    pub fn checkpoint_path(&self) -> PathBuf {
        self.dir.join("checkpoint")
    }

    fn io(path: &Path) -> impl Fn(io::Error) -> AuditError + '_ {
        move |source| AuditError::Io {
            path: path.to_owned(),
            source,
        }
    }

    /// Appends `event` and signs the new checkpoint with `key`. Returns the entry's index.
    pub fn append(&self, event: &Event, key: &SigningKey) -> Result<u64, AuditError> {
        let _lock = self.lock()?;
        let index = self.append_locked(event, key)?;
        if let Some(retention) = self.retention
            && let Some(cutoff) = SystemTime::now().checked_sub(retention)
            && self
                .oldest_time()?
                .is_some_and(|oldest| oldest + PRUNE_SLACK < cutoff)
        {
            self.prune_locked(cutoff)?;
        }
        Ok(index)
    }

    /// Takes the log's lock (released when the file is dropped).
    fn lock(&self) -> Result<File, AuditError> {
        create_private_dir(&self.dir).map_err(Self::io(&self.dir))?;
        let lock_path = self.dir.join("lock");
        let lock = private_options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(Self::io(&lock_path))?;
        lock.lock().map_err(Self::io(&lock_path))?;
        Ok(lock)
    }

    fn append_locked(&self, event: &Event, key: &SigningKey) -> Result<u64, AuditError> {
        let log_path = self.path();
        let mut log = private_options()
            .create(true)
            .read(true)
            .append(true)
            .open(&log_path)
            .map_err(Self::io(&log_path))?;
        let (mut frontier, mut last_leaf, covered) = self.catch_up(&mut log)?;

        let entry = Entry {
            index: frontier.size(),
            time: rfc3339(SystemTime::now()),
            user: current_user(),
            event: event.event.clone(),
            command: event.command.clone(),
            model: event.model.clone(),
            model_digest: event.model_digest.clone(),
            output_digest: event.output_digest.clone(),
            bundle_digest: event.bundle_digest.clone(),
            outcome: event.outcome,
            detail: event.detail.clone(),
            prev: hex::encode(last_leaf),
        };
        let mut line = serde_json::to_vec(&entry).unwrap_or_default();
        let leaf = merkle::leaf_hash(&line);
        line.push(b'\n');
        log.write_all(&line).map_err(Self::io(&log_path))?;
        log.sync_data().map_err(Self::io(&log_path))?;
        frontier.push(leaf);
        last_leaf = leaf;

        self.write_tree(&frontier, &last_leaf, covered + line.len() as u64)?;
        let checkpoint = Checkpoint {
            origin: key_name(key.public()),
            size: frontier.size(),
            root: frontier.root(),
        };
        let note = checkpoint
            .sign(key)
            .map_err(|source| AuditError::Checkpoint {
                path: self.checkpoint_path(),
                source,
            })?;
        write_atomic(&self.checkpoint_path(), note.as_bytes())
            .map_err(Self::io(&self.checkpoint_path()))?;
        Ok(entry.index)
    }

    /// Writes the `tree` cache: the tree's right edge over the first `bytes` bytes of the log.
    fn write_tree(
        &self,
        frontier: &Frontier,
        last_leaf: &Hash,
        bytes: u64,
    ) -> Result<(), AuditError> {
        let cache = TreeCache {
            bytes,
            size: frontier.size(),
            last_leaf: hex::encode(last_leaf),
            peaks: frontier.peaks().iter().map(hex::encode).collect(),
        };
        let tree_path = self.tree_path();
        write_atomic(&tree_path, &serde_json::to_vec(&cache).unwrap_or_default())
            .map_err(Self::io(&tree_path))
    }

    /// The time of the oldest entry still in the log (None for an empty one).
    fn oldest_time(&self) -> Result<Option<SystemTime>, AuditError> {
        let path = self.path();
        let file = File::open(&path).map_err(Self::io(&path))?;
        let mut line = Vec::new();
        read_line(&mut BufReader::new(file), &mut line).map_err(Self::io(&path))?;
        if line.last() != Some(&b'\n') {
            return Ok(None);
        }
        Ok(parse_entry(&line[..line.len() - 1])
            .ok()
            .and_then(|e| entry_time(&e)))
    }

    /// Removes the entries older than `cutoff` from the log, keeping their leaf hashes; returns how
    /// many were pruned. The tree, and so every checkpoint, stays the same.
    pub fn prune(&self, cutoff: SystemTime) -> Result<u64, AuditError> {
        let _lock = self.lock()?;
        self.prune_locked(cutoff)
    }

    fn prune_locked(&self, cutoff: SystemTime) -> Result<u64, AuditError> {
        let log_path = self.path();
        let mut expired = Vec::new();
        let mut stop = false;
        let (mut pruned, _) = self.walk(|_, line, leaf, _| {
            if !stop {
                let old = parse_entry(line)
                    .ok()
                    .and_then(|e| entry_time(&e))
                    .is_some_and(|time| time <= cutoff);
                if old {
                    expired.push(*leaf);
                } else {
                    stop = true;
                }
            }
            Ok(())
        })?;
        if expired.is_empty() {
            return Ok(0);
        }
        let count = expired.len() as u64;
        pruned.extend(expired);
        let pruned_bytes: Vec<u8> = pruned.iter().flatten().copied().collect();
        write_atomic(&self.pruned_path(), &pruned_bytes).map_err(Self::io(&self.pruned_path()))?;
        // The cache counts bytes of the log about to be rewritten.
        match fs::remove_file(self.tree_path()) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(Self::io(&self.tree_path())(e));
            }
            _ => {}
        }
        let mut rewritten = tempfile::Builder::new()
            .prefix(".sanctum-")
            .tempfile_in(&self.dir)
            .map_err(Self::io(&self.dir))?;
        let mut bytes = 0u64;
        let mut last_leaf = pruned.last().copied().unwrap_or([0; 32]);
        let mut leaves = Frontier::of(&pruned);
        let mut failed = None;
        // `walk` now reads the longer `pruned`: it hands over only the lines kept.
        self.walk(|_, line, leaf, _| {
            if failed.is_none() {
                let write = rewritten
                    .write_all(line)
                    .and_then(|()| rewritten.write_all(b"\n"));
                failed = write.err();
                bytes += line.len() as u64 + 1;
                last_leaf = *leaf;
                leaves.push(last_leaf);
            }
            Ok(())
        })?;
        if let Some(e) = failed {
            return Err(Self::io(&self.dir)(e));
        }
        rewritten
            .as_file()
            .sync_all()
            .map_err(Self::io(&self.dir))?;
        rewritten
            .persist(&log_path)
            .map_err(|e| Self::io(&log_path)(e.error))?;
        self.write_tree(&leaves, &last_leaf, bytes)?;
        Ok(count)
    }

    /// The tree over the log's complete lines, from the cache plus the lines written after it; a
    /// torn last line is cut off. Returns the frontier, the last leaf and the log's length.
    fn catch_up(&self, log: &mut File) -> Result<(Frontier, Hash, u64), AuditError> {
        let log_path = self.path();
        let len = log.metadata().map_err(Self::io(&log_path))?.len();
        let cache = fs::read(self.dir.join("tree"))
            .ok()
            .and_then(|b| serde_json::from_slice::<TreeCache>(&b).ok())
            .and_then(|c| {
                let peaks = c
                    .peaks
                    .iter()
                    .map(|p| parse_hash(p))
                    .collect::<Option<_>>()?;
                let frontier = Frontier::from_parts(c.size, peaks)?;
                Some((frontier, parse_hash(&c.last_leaf)?, c.bytes))
            });
        // Without the cache, the first lines may be ones a prune cut short of removing: already
        // leaves, to skip until the first line beyond them.
        let mut may_overlap = false;
        let (mut frontier, mut last_leaf, start) = match cache {
            Some((frontier, _, bytes)) if bytes > len => {
                return Err(AuditError::Tampered {
                    path: log_path,
                    index: frontier.size(),
                    reason: format!(
                        "the log is {len} bytes but {bytes} were appended: entries were removed (run `sanctum audit verify`)"
                    ),
                });
            }
            Some(state) => state,
            None => {
                let pruned = self.pruned_leaves()?;
                may_overlap = !pruned.is_empty();
                let last = pruned.last().copied().unwrap_or([0; 32]);
                (Frontier::of(&pruned), last, 0)
            }
        };
        log.seek(SeekFrom::Start(start))
            .map_err(Self::io(&log_path))?;
        let mut reader = BufReader::new(&*log);
        let mut complete = start;
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = read_line(&mut reader, &mut line).map_err(Self::io(&log_path))?;
            if n == 0 || line.last() != Some(&b'\n') {
                break;
            }
            let body = &line[..n - 1];
            complete += n as u64;
            if may_overlap {
                if parse_entry(body).is_ok_and(|e| e.index < frontier.size()) {
                    continue;
                }
                may_overlap = false;
            }
            let leaf = merkle::leaf_hash(body);
            frontier.push(leaf);
            last_leaf = leaf;
        }
        if complete < len {
            log.set_len(complete).map_err(Self::io(&log_path))?;
            log.sync_data().map_err(Self::io(&log_path))?;
        }
        Ok((frontier, last_leaf, complete))
    }

    /// Every complete entry, in order, parsed and as its exact line (for `audit show` and
    /// `export`); a torn last line is left out.
    pub fn entries(&self) -> Result<Vec<(Entry, Vec<u8>)>, AuditError> {
        let mut entries = Vec::new();
        self.walk(|index, line, _, _| {
            let entry = parse_entry(line).map_err(|reason| (index, reason))?;
            entries.push((entry, line.to_vec()));
            Ok(())
        })?;
        Ok(entries)
    }

    /// Reads the log: returns the pruned entries' leaf hashes and whether a torn last line was
    /// left, and calls `f` with each complete line kept: its index, the line without its newline,
    /// its leaf hash, and the leaf hash of the entry before it (zeros for entry 0).
    /// The first line must continue where `pruned` ends, or overlap it (a prune cut short) with
    /// lines that hash to what `pruned` holds.
    fn walk(
        &self,
        mut f: impl FnMut(u64, &[u8], &Hash, &Hash) -> Result<(), (u64, String)>,
    ) -> Result<(Vec<Hash>, bool), AuditError> {
        let path = self.path();
        // Opened before `pruned` is read: a prune in between only makes `pruned` overlap this file.
        let file = match File::open(&path) {
            Ok(file) => Some(file),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(Self::io(&path)(e)),
        };
        let pruned = self.pruned_leaves()?;
        let Some(file) = file else {
            return Ok((pruned, false));
        };
        let kept_from = pruned.len() as u64;
        let mut reader = BufReader::new(file);
        let mut line = Vec::new();
        let mut next: Option<u64> = None;
        let mut prev_leaf: Hash = [0; 32];
        let tampered = |(index, reason)| AuditError::Tampered {
            path: path.clone(),
            index,
            reason,
        };
        loop {
            line.clear();
            let n = read_line(&mut reader, &mut line).map_err(Self::io(&path))?;
            if n == 0 {
                return Ok((pruned, false));
            }
            if line.last() != Some(&b'\n') {
                return Ok((pruned, true));
            }
            let body = &line[..n - 1];
            let index = match next {
                Some(index) => index,
                None => first_index(body, kept_from).map_err(tampered)?,
            };
            let leaf = merkle::leaf_hash(body);
            if index < kept_from {
                if leaf != pruned[index as usize] {
                    return Err(tampered((
                        index,
                        "it differs from the hash kept when it was pruned: it was altered".into(),
                    )));
                }
            } else {
                let prev = match index.checked_sub(1) {
                    None => [0; 32],
                    Some(before) if before < kept_from => pruned[before as usize],
                    Some(_) => prev_leaf,
                };
                f(index, body, &leaf, &prev).map_err(tampered)?;
            }
            prev_leaf = leaf;
            next = Some(index + 1);
        }
    }

    /// All leaf hashes: the pruned ones, then the complete lines'.
    fn leaves(&self) -> Result<Vec<Hash>, AuditError> {
        let mut kept = Vec::new();
        let (mut leaves, _) = self.walk(|_, _, leaf, _| {
            kept.push(*leaf);
            Ok(())
        })?;
        leaves.extend(kept);
        Ok(leaves)
    }

    /// The stored checkpoint, checked against `key`; None when there is none yet.
    pub fn checkpoint(&self, key: &PublicKey) -> Result<Option<(Checkpoint, String)>, AuditError> {
        let path = self.checkpoint_path();
        match read_capped(&path, super::note::MAX_NOTE_BYTES) {
            Ok(bytes) => {
                let checkpoint = open_checkpoint(&path, &bytes, key)?;
                Ok(Some((
                    checkpoint,
                    String::from_utf8_lossy(&bytes).into_owned(),
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Self::io(&path)(e)),
        }
    }

    /// Recomputes the tree from every entry and checks it against the stored checkpoint (signed by
    /// `key`) and, when given, an earlier exported `checkpoint` (note bytes): each entry parses,
    /// holds its index and its predecessor's leaf hash, the checkpoint's size is reached and its
    /// root matches, and the earlier checkpoint's tree is a prefix of today's (an RFC 6962
    /// consistency proof, made and checked). The first bad index is named.
    pub fn verify(
        &self,
        key: &PublicKey,
        earlier: Option<(&Path, &[u8])>,
    ) -> Result<Verified, AuditError> {
        let path = self.path();
        let stored = self.checkpoint(key)?.map(|(c, _)| c);
        let earlier = earlier
            .map(|(path, bytes)| open_checkpoint(path, bytes, key))
            .transpose()?;
        let tampered = |index: u64, reason: String| AuditError::Tampered {
            path: path.clone(),
            index,
            reason,
        };
        let mut kept: Vec<Hash> = Vec::new();
        let (pruned, torn_tail) = self.walk(|index, line, leaf, prev| {
            let entry = parse_entry(line).map_err(|reason| (index, reason))?;
            if entry.index != index {
                return Err((
                    index,
                    format!(
                        "it says it is entry {}: entries were dropped, inserted or reordered",
                        entry.index
                    ),
                ));
            }
            if entry.prev != hex::encode(prev) {
                let bad = index.saturating_sub(1);
                return Err((
                    bad,
                    format!(
                        "it is not the entry that entry {index} follows (its hash is not entry {index}'s prev): it was altered"
                    ),
                ));
            }
            kept.push(*leaf);
            Ok(())
        })?;
        let pruned_count = pruned.len() as u64;
        let mut leaves = pruned;
        leaves.extend(kept);
        let entries = leaves.len() as u64;
        let Some(checkpoint) = stored else {
            if entries > 0 {
                return Err(tampered(
                    0,
                    format!(
                        "{} is missing: nothing signed covers the {entries} entries",
                        self.checkpoint_path().display()
                    ),
                ));
            }
            return Ok(Verified {
                entries,
                checkpoint: None,
                torn_tail,
                consistent_with: None,
                pruned: pruned_count,
            });
        };
        for signed in std::iter::once(&checkpoint).chain(earlier.as_ref()) {
            if signed.size > entries {
                return Err(tampered(
                    entries,
                    format!(
                        "the log ends after {entries} entries but a checkpoint covers {}: entries {entries}..{} were removed",
                        signed.size,
                        signed.size - 1
                    ),
                ));
            }
        }
        if merkle::root(&leaves[..checkpoint.size as usize]) != checkpoint.root {
            return Err(tampered(
                checkpoint.size.saturating_sub(1),
                format!(
                    "the first {} entries do not hash to the signed checkpoint's root: this entry was altered (or earlier ones, with their chain rewritten)",
                    checkpoint.size
                ),
            ));
        }
        let consistent_with = match earlier {
            None => None,
            Some(old) => {
                let (small, large) = if old.size <= checkpoint.size {
                    (&old, &checkpoint)
                } else {
                    (&checkpoint, &old)
                };
                let tree = &leaves[..large.size as usize];
                let consistent = small.size == 0
                    || merkle::consistency_proof(tree, small.size).is_some_and(|proof| {
                        merkle::verify_consistency(
                            small.size,
                            large.size,
                            &proof,
                            &small.root,
                            &large.root,
                        )
                    });
                if !consistent || merkle::root(tree) != large.root {
                    return Err(tampered(
                        old.size.saturating_sub(1),
                        format!(
                            "the log was rewritten since the earlier checkpoint of {} entries: today's first {} entries hash to another root",
                            old.size, old.size
                        ),
                    ));
                }
                Some(old.size)
            }
        };
        Ok(Verified {
            entries,
            checkpoint: Some(checkpoint),
            torn_tail,
            consistent_with,
            pruned: pruned_count,
        })
    }

    /// The C2SP tlog-proof (`c2sp.org/tlog-proof@v1`) that entry `index` is in the tree of the
    /// stored checkpoint, after checking the proof against it.
    pub fn prove(&self, index: u64, key: &PublicKey) -> Result<String, AuditError> {
        let (checkpoint, note) = self
            .checkpoint(key)?
            .ok_or(AuditError::NoSuchEntry { index, size: 0 })?;
        if index >= checkpoint.size {
            return Err(AuditError::NoSuchEntry {
                index,
                size: checkpoint.size,
            });
        }
        let leaves = self.leaves()?;
        let tree = leaves
            .get(..checkpoint.size as usize)
            .ok_or_else(|| AuditError::Tampered {
                path: self.path(),
                index: leaves.len() as u64,
                reason: "the log is shorter than its checkpoint".into(),
            })?;
        let proof = merkle::inclusion_proof(tree, index).unwrap_or_default();
        let leaf = tree[index as usize];
        if !merkle::verify_inclusion(&leaf, index, checkpoint.size, &proof, &checkpoint.root) {
            return Err(AuditError::Tampered {
                path: self.path(),
                index,
                reason: "its inclusion proof does not reach the signed checkpoint's root".into(),
            });
        }
        let mut out = format!("c2sp.org/tlog-proof@v1\nindex {index}\n");
        for hash in &proof {
            out.push_str(&base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                hash,
            ));
            out.push('\n');
        }
        out.push('\n');
        out.push_str(&note);
        Ok(out)
    }
}

fn open_checkpoint(path: &Path, bytes: &[u8], key: &PublicKey) -> Result<Checkpoint, AuditError> {
    let checkpoint = Checkpoint::open(bytes, key).map_err(|source| AuditError::Checkpoint {
        path: path.to_owned(),
        source,
    })?;
    if checkpoint.origin != key_name(key) {
        return Err(AuditError::Checkpoint {
            path: path.to_owned(),
            source: NoteError::Malformed(format!(
                "origin {:?} is not this log's ({})",
                checkpoint.origin,
                key_name(key)
            )),
        });
    }
    Ok(checkpoint)
}

/// The index of the log's first line, which must be at most `pruned` (the entries before it
/// pruned, or overlapping the pruned ones).
fn first_index(line: &[u8], pruned: u64) -> Result<u64, (u64, String)> {
    let entry = parse_entry(line).map_err(|reason| (pruned, reason))?;
    if entry.index > pruned {
        let missing = if pruned == 0 {
            format!(
                "the log starts at entry {}: entries 0..{} were removed",
                entry.index,
                entry.index - 1
            )
        } else {
            format!(
                "the log starts at entry {} but only entries 0..{} were pruned: entries {pruned}..{} were removed",
                entry.index,
                pruned - 1,
                entry.index - 1
            )
        };
        return Err((pruned, missing));
    }
    Ok(entry.index)
}

/// When an entry was appended.
fn entry_time(entry: &Entry) -> Option<SystemTime> {
    let time = chrono::DateTime::parse_from_rfc3339(&entry.time).ok()?;
    let seconds = u64::try_from(time.timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
}

fn parse_entry(line: &[u8]) -> Result<Entry, String> {
    serde_json::from_slice(line).map_err(|e| format!("not a valid entry: {e}"))
}

fn parse_hash(hex: &str) -> Option<Hash> {
    hex::decode(hex).ok()?.try_into().ok()
}

/// One line, at most [`MAX_ENTRY_BYTES`] (a longer one is returned cut, without a newline, and so
/// counts as torn or bad).
fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>) -> io::Result<usize> {
    reader
        .take(MAX_ENTRY_BYTES as u64 + 1)
        .read_until(b'\n', line)
}

fn read_capped(path: &Path, cap: usize) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?
        .take(cap as u64 + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() > cap {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {cap} bytes"),
        ));
    }
    Ok(bytes)
}

/// Files only their owner reads: the log says what its user ran.
fn private_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
    }
    #[cfg(not(unix))]
    fs::create_dir_all(dir)
}

/// `$USER` (or `$LOGNAME`), else the uid that owns this process.
fn current_user() -> String {
    if let Some(user) = ["USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
    {
        return user;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let Ok(meta) = fs::metadata("/proc/self") {
            return format!("uid {}", meta.uid());
        }
    }
    "unknown".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: usize) -> Event {
        Event {
            event: "run".into(),
            command: "sanctum run".into(),
            model: Some(format!("model-{n}")),
            ..Event::default()
        }
    }

    fn log_with(n: usize) -> (tempfile::TempDir, AuditLog, SigningKey) {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path().join("audit"));
        let key = SigningKey::generate().unwrap();
        for i in 0..n {
            assert_eq!(log.append(&event(i), &key).unwrap(), i as u64);
        }
        (dir, log, key)
    }

    fn lines(log: &AuditLog) -> Vec<String> {
        fs::read_to_string(log.path())
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write_lines(log: &AuditLog, lines: &[String]) {
        fs::write(log.path(), lines.join("\n") + "\n").unwrap();
    }

    fn bad_index(log: &AuditLog, key: &SigningKey, earlier: Option<&[u8]>) -> u64 {
        match log.verify(key.public(), earlier.map(|b| (Path::new("earlier"), b))) {
            Err(AuditError::Tampered { index, .. }) => index,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn appends_verify_and_prove() {
        let (_dir, log, key) = log_with(11);
        let verified = log.verify(key.public(), None).unwrap();
        assert_eq!(verified.entries, 11);
        assert_eq!(verified.checkpoint.unwrap().size, 11);
        let proof = log.prove(4, key.public()).unwrap();
        assert!(proof.starts_with("c2sp.org/tlog-proof@v1\nindex 4\n"));
        assert!(matches!(
            log.prove(11, key.public()),
            Err(AuditError::NoSuchEntry {
                index: 11,
                size: 11
            })
        ));
        let entries = log.entries().unwrap();
        assert_eq!(entries[3].0.model.as_deref(), Some("model-3"));
        assert_eq!(entries[0].0.prev, "0".repeat(64));
    }

    #[test]
    fn an_edit_a_drop_a_swap_and_a_truncation_name_the_first_bad_index() {
        let (_dir, log, key) = log_with(6);
        let good = lines(&log);

        let mut edited = good.clone();
        edited[2] = edited[2].replace("model-2", "model-9");
        write_lines(&log, &edited);
        assert_eq!(bad_index(&log, &key, None), 2);

        let mut last = good.clone();
        last[5] = last[5].replace("model-5", "model-9");
        write_lines(&log, &last);
        assert_eq!(bad_index(&log, &key, None), 5);

        let mut dropped = good.clone();
        dropped.remove(3);
        write_lines(&log, &dropped);
        assert_eq!(bad_index(&log, &key, None), 3);

        let mut swapped = good.clone();
        swapped.swap(1, 4);
        write_lines(&log, &swapped);
        assert_eq!(bad_index(&log, &key, None), 1);

        write_lines(&log, &good[..4]);
        assert_eq!(bad_index(&log, &key, None), 4);
        // Appending to a log cut short is refused too, rather than papered over.
        assert!(matches!(
            log.append(&event(9), &key),
            Err(AuditError::Tampered { .. })
        ));

        write_lines(&log, &good);
        log.verify(key.public(), None).unwrap();
    }

    #[test]
    fn a_consistently_rewritten_log_fails_against_an_earlier_checkpoint() {
        let (dir, log, key) = log_with(5);
        let exported = fs::read(log.checkpoint_path()).unwrap();
        for i in 5..9 {
            log.append(&event(i), &key).unwrap();
        }
        let verified = log
            .verify(key.public(), Some((Path::new("e"), &exported)))
            .unwrap();
        assert_eq!(verified.consistent_with, Some(5));

        // Whoever holds the machine's key rewrites history from scratch: it verifies on its own...
        fs::remove_dir_all(dir.path().join("audit")).unwrap();
        for i in 0..9 {
            let mut e = event(i);
            if i == 2 {
                e.model = Some("something else".into());
            }
            log.append(&e, &key).unwrap();
        }
        log.verify(key.public(), None).unwrap();
        // ...but not against the checkpoint exported before.
        assert_eq!(bad_index(&log, &key, Some(&exported)), 4);
    }

    #[test]
    fn a_torn_last_line_is_ignored_then_cut_and_a_stale_cache_replayed() {
        let (_dir, log, key) = log_with(3);
        let mut file = OpenOptions::new().append(true).open(log.path()).unwrap();
        file.write_all(br#"{"index":3,"ti"#).unwrap();
        let verified = log.verify(key.public(), None).unwrap();
        assert!(verified.torn_tail);
        assert_eq!(verified.entries, 3);
        // The cache lags (as after a kill between the append and its update).
        let tree = log.dir.join("tree");
        let stale = fs::read(&tree).unwrap();
        log.append(&event(3), &key).unwrap();
        fs::write(&tree, stale).unwrap();
        assert_eq!(log.append(&event(4), &key).unwrap(), 4);
        let verified = log.verify(key.public(), None).unwrap();
        assert!(!verified.torn_tail);
        assert_eq!(verified.entries, 5);
    }

    #[test]
    fn a_forged_checkpoint_is_refused() {
        let (_dir, log, key) = log_with(2);
        let note = fs::read_to_string(log.checkpoint_path()).unwrap();
        fs::write(log.checkpoint_path(), note.replacen("\n2\n", "\n1\n", 1)).unwrap();
        assert!(matches!(
            log.verify(key.public(), None),
            Err(AuditError::Checkpoint { .. })
        ));
        let other = SigningKey::generate().unwrap();
        fs::write(log.checkpoint_path(), note).unwrap();
        assert!(matches!(
            log.verify(other.public(), None),
            Err(AuditError::Checkpoint { .. })
        ));
    }

    /// Writes a log whose entries carry the given ages (days), as the key holder could: lines
    /// chained by hand and a checkpoint signed over them.
    fn aged_log(ages: &[u64]) -> (tempfile::TempDir, AuditLog, SigningKey) {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path().join("audit"));
        let key = SigningKey::generate().unwrap();
        fs::create_dir_all(&log.dir).unwrap();
        let mut leaves = Vec::new();
        let mut text = String::new();
        for (index, age) in ages.iter().enumerate() {
            let time = SystemTime::now() - Duration::from_secs(age * 24 * 3600);
            let entry = Entry {
                index: index as u64,
                time: rfc3339(time),
                user: "u".into(),
                event: "run".into(),
                command: "sanctum run".into(),
                model: None,
                model_digest: None,
                output_digest: None,
                bundle_digest: None,
                outcome: Outcome::Ok,
                detail: None,
                prev: hex::encode(leaves.last().copied().unwrap_or([0u8; 32])),
            };
            let line = serde_json::to_string(&entry).unwrap();
            leaves.push(merkle::leaf_hash(line.as_bytes()));
            text.push_str(&line);
            text.push('\n');
        }
        fs::write(log.path(), text).unwrap();
        let checkpoint = Checkpoint {
            origin: key_name(key.public()),
            size: leaves.len() as u64,
            root: merkle::root(&leaves),
        };
        fs::write(log.checkpoint_path(), checkpoint.sign(&key).unwrap()).unwrap();
        (dir, log, key)
    }

    #[test]
    fn an_append_prunes_past_the_retention_and_the_log_still_verifies() {
        let (_dir, log, key) = aged_log(&[40, 35, 32, 10, 1]);
        let exported = fs::read(log.checkpoint_path()).unwrap();
        let kept = log.with_retention(Some(Duration::from_secs(30 * 24 * 3600)));
        assert_eq!(kept.append(&event(5), &key).unwrap(), 5);
        assert_eq!(kept.pruned().unwrap(), 3);
        let indices: Vec<u64> = kept
            .entries()
            .unwrap()
            .iter()
            .map(|(e, _)| e.index)
            .collect();
        assert_eq!(indices, [3, 4, 5]);
        let verified = kept
            .verify(key.public(), Some((Path::new("e"), &exported)))
            .unwrap();
        assert_eq!((verified.entries, verified.pruned), (6, 3));
        assert_eq!(verified.consistent_with, Some(5));
        // A pruned entry kept elsewhere can still be proven; the next append builds on the tree.
        assert!(kept.prove(1, key.public()).is_ok());
        fs::remove_file(kept.tree_path()).unwrap();
        assert_eq!(kept.append(&event(6), &key).unwrap(), 6);
        kept.verify(key.public(), None).unwrap();

        // Within the slack nothing is rewritten.
        let (_dir, log, key) = aged_log(&[30, 1]);
        let log = log.with_retention(Some(Duration::from_secs(29 * 24 * 3600 + 3600)));
        log.append(&event(2), &key).unwrap();
        assert_eq!(log.pruned().unwrap(), 0);
    }

    #[test]
    fn a_prune_cut_short_verifies_and_pruned_entries_cannot_be_altered() {
        let (_dir, log, key) = log_with(6);
        let good = lines(&log);
        // `pruned` written, the log not yet rewritten, the cache gone: a kill mid-prune.
        let leaves: Vec<u8> = good[..3]
            .iter()
            .flat_map(|l| merkle::leaf_hash(l.as_bytes()))
            .collect();
        fs::write(log.pruned_path(), &leaves).unwrap();
        fs::remove_file(log.tree_path()).unwrap();
        let verified = log.verify(key.public(), None).unwrap();
        assert_eq!((verified.entries, verified.pruned), (6, 3));
        assert_eq!(log.entries().unwrap()[0].0.index, 3);
        assert_eq!(log.append(&event(6), &key).unwrap(), 6);
        let good = lines(&log);

        let mut edited = good.clone();
        edited[1] = edited[1].replace("model-1", "model-9");
        write_lines(&log, &edited);
        assert_eq!(bad_index(&log, &key, None), 1);

        // Lines dropped beyond what was pruned.
        write_lines(&log, &good[5..]);
        assert_eq!(bad_index(&log, &key, None), 3);

        write_lines(&log, &good);
        log.verify(key.public(), None).unwrap();
        assert_eq!(
            log.prune(SystemTime::now() + Duration::from_secs(60))
                .unwrap(),
            4
        );
        assert!(lines(&log).is_empty());
        let verified = log.verify(key.public(), None).unwrap();
        assert_eq!((verified.entries, verified.pruned), (7, 7));

        // A cut `pruned` file is named, not misread.
        fs::write(log.pruned_path(), &leaves[..40]).unwrap();
        assert!(matches!(
            log.verify(key.public(), None),
            Err(AuditError::Tampered { .. })
        ));
    }
}
