//! Staging directories of pulls under `<root>/tmp/`, and the sweep that removes the ones killed
//! pulls left behind.
//!
//! A live pull holds an exclusive lock on its directory's `.owner` file for as long as it runs; the
//! kernel drops the lock when the process dies, however it dies. A directory appears under its
//! `pull-` name only after that lock is held (it is made as `.new-…`, locked, then renamed), so the
//! sweep never mistakes a starting pull for a dead one: a `pull-` directory whose `.owner` it can
//! lock is dead. A `.new-…` directory (whose pull may be between making its owner file and locking
//! it, or died before its rename) and a `pull-` one without an owner file (left by a sanctum from
//! before owner files) are removed once they are an hour old.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The file whose lock marks a staging directory as owned by a live pull.
const OWNER: &str = ".owner";
/// Prefix of a staging directory in use.
const PULL_PREFIX: &str = "pull-";
/// Prefix of a staging directory not yet locked.
const NEW_PREFIX: &str = ".new-";
/// Age past which a staging directory without an owner file is taken as abandoned.
const UNOWNED_GRACE: Duration = Duration::from_secs(3600);

/// A pull's staging directory, removed when dropped; owned (locked) while it lives.
pub struct Staging {
    dir: PathBuf,
    /// Held open for its lock; closing it (drop, or the process dying) releases the directory.
    _owner: File,
}

impl Staging {
    /// Creates `<tmp_root>/pull-<name>-<random>/` with its owner lock held.
    pub fn create(tmp_root: &Path, name: &str) -> io::Result<Self> {
        let fresh = tempfile::Builder::new()
            .prefix(NEW_PREFIX)
            .tempdir_in(tmp_root)?;
        let owner = File::create_new(fresh.path().join(OWNER))?;
        owner.lock()?;
        let suffix = fresh
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(NEW_PREFIX))
            .unwrap_or("0")
            .to_owned();
        let dir = tmp_root.join(format!("{PULL_PREFIX}{name}-{suffix}"));
        fs::rename(fresh.path(), &dir)?;
        // Renamed away: the TempDir has nothing left to delete at its old path.
        let _ = fresh.keep();
        Ok(Self { dir, _owner: owner })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Removes the staging directories under `tmp_root` that no live pull owns, returning them. A
/// directory that cannot be judged (unreadable, a lock that fails for another reason than being
/// held) is left alone.
pub fn sweep(tmp_root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(tmp_root) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let path = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_dir || !(name.starts_with(PULL_PREFIX) || name.starts_with(NEW_PREFIX)) {
            continue;
        }
        // A `.new-` directory may belong to a pull between making its owner file and locking it.
        if name.starts_with(NEW_PREFIX) {
            if older_than(&path, UNOWNED_GRACE) && remove(&path) {
                removed.push(path);
            }
            continue;
        }
        let stale = match File::open(path.join(OWNER)) {
            // Held while the sweep removes it, so no pull can take it meanwhile.
            Ok(owner) => match owner.try_lock() {
                Ok(()) => remove(&path),
                Err(_) => false,
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                older_than(&path, UNOWNED_GRACE) && remove(&path)
            }
            Err(_) => false,
        };
        if stale {
            removed.push(path);
        }
    }
    removed
}

fn remove(path: &Path) -> bool {
    fs::remove_dir_all(path).is_ok()
}

fn older_than(path: &Path, age: Duration) -> bool {
    fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .is_ok_and(|t| SystemTime::now().duration_since(t).is_ok_and(|d| d > age))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_removes_dead_staging_and_keeps_live_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let live = Staging::create(tmp.path(), "live").unwrap();
        fs::write(live.path().join("part"), b"x").unwrap();
        // As a killed pull leaves its directory: the owner file there, its lock gone with the process.
        let dead = tmp.path().join("pull-dead-abc123");
        fs::create_dir_all(dead.join("fetched")).unwrap();
        fs::write(dead.join(OWNER), b"").unwrap();
        fs::write(dead.join("fetched/blob"), vec![0u8; 4096]).unwrap();
        // No owner file and just made: maybe a pull about to lock it.
        let young = tmp.path().join(".new-young");
        fs::create_dir(&young).unwrap();
        // Not a staging directory.
        fs::write(tmp.path().join("pull-not-a-dir"), b"").unwrap();

        assert_eq!(sweep(tmp.path()), vec![dead.clone()]);
        assert!(!dead.exists());
        assert!(live.path().join("part").exists());
        assert!(young.exists());
        assert!(tmp.path().join("pull-not-a-dir").exists());
        let live_path = live.path().to_owned();
        drop(live);
        assert!(
            !live_path.exists(),
            "a finished pull removes its own staging"
        );
    }
}
