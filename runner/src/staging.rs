//! Staging directories, owned while their writer lives, and the sweep that removes the ones a
//! killed writer left: a pull's under `<store>/tmp/`, an import's or a quantization's beside its
//! output directory.
//!
//! A live writer holds an exclusive lock on its directory's `.owner` file for as long as it runs;
//! the kernel drops the lock when the process dies, however it dies. A directory appears under its
//! [`Kind`]'s live name only after that lock is held (it is made under the kind's fresh name,
//! locked, then renamed), so the sweep never mistakes a starting writer for a dead one: a live-named
//! directory whose `.owner` it can lock is dead. A fresh-named directory (whose writer may be
//! between making its owner file and locking it, or died before its rename) and a live-named one
//! without an owner file (left by a sanctum from before owner files, or by a publish killed between
//! removing its owner file and its rename) are removed once they are an hour old.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The file whose lock marks a staging directory as owned by a live writer.
const OWNER: &str = ".owner";

/// What a staging directory is for. Its names are how a sweep knows its own directories, so each
/// kind's are distinct from any other's (and, beside a user's output directory, from theirs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    /// Prefix of a directory whose owner lock is held.
    live: &'static str,
    /// Prefix of a directory not yet locked.
    fresh: &'static str,
}

/// A pull's staging, under the store's `tmp/`.
pub const PULL: Kind = Kind {
    live: "pull-",
    fresh: ".new-",
};
/// An import's staging (`import gguf|pickle`), beside the output directory.
pub const IMPORT: Kind = Kind {
    live: ".sanctum-import-",
    fresh: ".sanctum-new-import-",
};
/// `sanctum quantize`'s staging, beside the output directory.
pub const QUANTIZE: Kind = Kind {
    live: ".sanctum-quantize-",
    fresh: ".sanctum-new-quantize-",
};
/// Age past which a staging directory without an owner file is taken as abandoned.
const UNOWNED_GRACE: Duration = Duration::from_secs(3600);

/// A staging directory, removed when dropped unless it was moved into place; owned (locked)
/// while it lives.
pub struct Staging {
    dir: PathBuf,
    /// Held open for its lock; closing it (drop, or the process dying) releases the directory.
    _owner: File,
    /// Whether the directory is still here to remove (not yet moved into place).
    staged: bool,
}

impl Staging {
    /// Creates `<root>/<kind's live prefix><name>-<random>/` (mode 0700) with its owner lock held.
    pub fn create(root: &Path, kind: Kind, name: &str) -> io::Result<Self> {
        let fresh = tempfile::Builder::new()
            .prefix(kind.fresh)
            .tempdir_in(root)?;
        let owner = File::create_new(fresh.path().join(OWNER))?;
        owner.lock()?;
        let suffix = fresh
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(kind.fresh))
            .unwrap_or("0")
            .to_owned();
        let dir = root.join(format!("{}{name}-{suffix}", kind.live));
        fs::rename(fresh.path(), &dir)?;
        // Renamed away: the TempDir has nothing left to delete at its old path.
        let _ = fresh.keep();
        Ok(Self {
            dir,
            _owner: owner,
            staged: true,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Moves the whole directory to `target` with one rename, its owner file removed (and that
    /// removal synced) first so that nothing of the staging is published. The lock is held until
    /// the rename is done; a sweep in between finds no owner file in a directory just changed, and
    /// leaves it for an hour. If the rename fails the directory is removed as on drop.
    pub fn move_to(mut self, target: &Path) -> io::Result<()> {
        fs::remove_file(self.dir.join(OWNER))?;
        File::open(&self.dir)?.sync_all()?;
        fs::rename(&self.dir, target)?;
        self.staged = false;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.staged {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Removes the staging directories of `kind` under `root` that no live writer owns, returning
/// them. Nothing else under `root` is touched, and a directory that cannot be judged (unreadable,
/// a lock that fails for another reason than being held) is left alone.
pub fn sweep(root: &Path, kind: Kind) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let path = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_dir || !(name.starts_with(kind.live) || name.starts_with(kind.fresh)) {
            continue;
        }
        // A fresh directory may belong to a writer between making its owner file and locking it.
        if name.starts_with(kind.fresh) {
            if older_than(&path, UNOWNED_GRACE) && remove(&path) {
                removed.push(path);
            }
            continue;
        }
        let stale = match File::open(path.join(OWNER)) {
            // Held while the sweep removes it, so no writer can take it meanwhile.
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
        let live = Staging::create(tmp.path(), PULL, "live").unwrap();
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

        assert_eq!(sweep(tmp.path(), PULL), vec![dead.clone()]);
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

    #[test]
    fn a_sweep_beside_an_output_takes_only_dead_staging_of_its_own_kind() {
        let dir = tempfile::tempdir().unwrap();
        let live = Staging::create(dir.path(), IMPORT, "out").unwrap();
        let dead_import = dir.path().join(".sanctum-import-out-dead");
        fs::create_dir(&dead_import).unwrap();
        fs::write(dead_import.join(OWNER), b"").unwrap();
        let dead_quantize = dir.path().join(".sanctum-quantize-out-dead");
        fs::create_dir(&dead_quantize).unwrap();
        fs::write(dead_quantize.join(OWNER), b"").unwrap();
        // A user's own directories beside the output, whatever they are called.
        for theirs in ["pull-mine", ".new-mine", "out"] {
            fs::create_dir(dir.path().join(theirs)).unwrap();
            fs::write(dir.path().join(theirs).join(OWNER), b"").unwrap();
        }

        assert_eq!(sweep(dir.path(), IMPORT), vec![dead_import]);
        assert_eq!(sweep(dir.path(), QUANTIZE), vec![dead_quantize]);
        assert!(live.path().exists());
        for theirs in ["pull-mine", ".new-mine", "out"] {
            assert!(dir.path().join(theirs).exists(), "{theirs} swept");
        }

        // Published: the directory is the output, without the owner file, and dropping the staging
        // no longer removes anything.
        fs::write(live.path().join("model.safetensors"), b"weights").unwrap();
        let target = dir.path().join("published");
        live.move_to(&target).unwrap();
        assert!(target.join("model.safetensors").exists());
        assert!(!target.join(OWNER).exists());
        assert!(sweep(dir.path(), IMPORT).is_empty());
    }
}
