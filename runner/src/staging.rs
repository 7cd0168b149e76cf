//! Staging directories, owned while their writer lives, and the sweep that removes the ones a
//! killed writer left: a pull's under `<store>/tmp/`, an import's or a quantization's beside its
//! output directory.
//!
//! A live writer holds an exclusive lock on an owner file *beside* its directory (`pull-x-AbC/` and
//! `pull-x-AbC.owner`) for as long as it runs; the kernel drops the lock when the process dies,
//! however it dies. The owner file is outside the directory so that nothing has to be taken out
//! of the directory before it is published, and it goes last: a directory is published (renamed)
//! or removed while its owner is still held, and only then is the owner file deleted. So a kill at
//! any point leaves either nothing or an owner file that can be locked, with or without what is
//! left of its directory, and the next sweep removes both.
//!
//! The owner file appears under its [`Kind`]'s live name only once locked (it is made under the
//! kind's fresh name, locked, then renamed), and the directory only after that, so the sweep never
//! mistakes a starting writer for a dead one. Fresh-named leftovers (a writer killed before its
//! rename) and a live-named directory with no owner file (left by a sanctum that kept the owner
//! inside the directory) are removed once they are an hour old.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Suffix of the file beside a staging directory whose lock marks it as owned by a live writer.
const OWNER: &str = ".owner";

/// What a staging directory is for. Its names are how a sweep knows its own directories, so each
/// kind's are distinct from any other's (and, beside a user's output directory, from theirs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    /// Prefix of a directory and its owner file once the owner's lock is held.
    live: &'static str,
    /// Prefix of an owner file not yet locked.
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
/// Most bytes of the writer's name in a staging name: with the longest prefix, the random part and
/// [`OWNER`] the whole stays far below the 255 bytes a file name may have.
const NAME_PART: usize = 96;
/// Age past which a fresh-named leftover or a directory without an owner file is taken as abandoned.
const UNOWNED_GRACE: Duration = Duration::from_secs(3600);

/// A staging directory, removed when dropped unless it was moved into place; owned (locked)
/// while it lives.
pub struct Staging {
    dir: PathBuf,
    /// Held open for its lock; closing it (after the drop has removed the directory and then this
    /// file, or the process dying) releases the directory.
    _owner: File,
    /// Whether the directory is still here to remove (not yet moved into place).
    staged: bool,
}

impl Staging {
    /// Creates `<root>/<kind's live prefix><name>-<random>/` (mode 0700) with its owner lock held.
    pub fn create(root: &Path, kind: Kind, name: &str) -> io::Result<Self> {
        let fresh = tempfile::Builder::new()
            .prefix(kind.fresh)
            .suffix(OWNER)
            .tempfile_in(root)?;
        fresh.as_file().lock()?;
        let random = fresh
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(kind.fresh))
            .and_then(|n| n.strip_suffix(OWNER))
            .unwrap_or("0")
            .to_owned();
        let dir = root.join(format!("{}{}-{random}", kind.live, shortened(name)));
        // On failure the temporary file is deleted with `fresh`.
        let owner = fresh
            .persist_noclobber(owner_of(&dir))
            .map_err(|e| e.error)?;
        if let Err(e) = create_private_dir(&dir) {
            // Not ours to remove if it was there already; the owner file is.
            let _ = fs::remove_file(owner_of(&dir));
            return Err(e);
        }
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

    /// Moves the whole directory to `target` with one rename; its owner file, beside it, is removed
    /// after. If the rename fails the directory is removed as on drop.
    pub fn move_to(mut self, target: &Path) -> io::Result<()> {
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
        // Last, and still locked: until here a kill leaves an owner file the next sweep can lock.
        let _ = fs::remove_file(owner_of(&self.dir));
    }
}

/// Removes the staging of `kind` under `root` that no live writer owns (directories and their
/// owner files), returning what it removed. Nothing else under `root` is touched, and an entry that
/// cannot be judged (unreadable, a lock that fails for another reason than being held) is left
/// alone.
pub fn sweep(root: &Path, kind: Kind) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let path = entry.path();
        let Ok(file_type) = entry.file_type() else {
            continue;
        };
        if name.starts_with(kind.fresh) {
            // May belong to a writer between making its owner file and locking it.
            if older_than(&path, UNOWNED_GRACE) && remove(&path, file_type) {
                removed.push(path);
            }
            continue;
        }
        if !name.starts_with(kind.live) {
            continue;
        }
        if let Some(dir) = name.strip_suffix(OWNER).filter(|_| file_type.is_file()) {
            let Ok(owner) = File::open(&path) else {
                continue;
            };
            // Held while the sweep removes the directory, so no writer can take it meanwhile.
            if owner.try_lock().is_err() {
                continue;
            }
            let dir = root.join(dir);
            let dir_gone = match fs::symlink_metadata(&dir) {
                Ok(meta) if meta.is_dir() => {
                    let gone = fs::remove_dir_all(&dir).is_ok();
                    if gone {
                        removed.push(dir);
                    }
                    gone
                }
                Ok(_) => false,
                Err(e) => e.kind() == io::ErrorKind::NotFound,
            };
            if dir_gone && fs::remove_file(&path).is_ok() {
                removed.push(path);
            }
        } else if file_type.is_dir()
            && fs::symlink_metadata(owner_of(&path))
                .is_err_and(|e| e.kind() == io::ErrorKind::NotFound)
            && older_than(&path, UNOWNED_GRACE)
            && remove(&path, file_type)
        {
            removed.push(path);
        }
    }
    removed
}

/// `name` cut to at most [`NAME_PART`] bytes (at a character boundary): it only tells a person what
/// the staging is for, and a whole file name may be no longer than 255 bytes.
fn shortened(name: &str) -> &str {
    let mut end = name.len().min(NAME_PART);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// The owner file of the staging directory `dir`: beside it, its name plus [`OWNER`].
fn owner_of(dir: &Path) -> PathBuf {
    let mut name = dir.as_os_str().to_owned();
    name.push(OWNER);
    PathBuf::from(name)
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        fs::DirBuilder::new().mode(0o700).create(dir)
    }
    #[cfg(not(unix))]
    fs::create_dir(dir)
}

fn remove(path: &Path, file_type: fs::FileType) -> bool {
    if file_type.is_dir() {
        fs::remove_dir_all(path).is_ok()
    } else {
        fs::remove_file(path).is_ok()
    }
}

fn older_than(path: &Path, age: Duration) -> bool {
    fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .is_ok_and(|t| SystemTime::now().duration_since(t).is_ok_and(|d| d > age))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lays out what a writer killed with its staging at `dir` leaves: the owner file beside it, its
    /// lock gone with the process, and (`with_dir`) what was left of the directory.
    fn killed(dir: &Path, with_dir: bool) {
        fs::write(owner_of(dir), b"").unwrap();
        if with_dir {
            fs::create_dir_all(dir.join("fetched")).unwrap();
            fs::write(dir.join("fetched/blob"), vec![0u8; 4096]).unwrap();
        }
    }

    fn sorted(mut paths: Vec<PathBuf>) -> Vec<PathBuf> {
        paths.sort();
        paths
    }

    fn age(path: &Path, by: Duration) {
        File::open(path)
            .unwrap()
            .set_modified(SystemTime::now() - by)
            .unwrap();
    }

    #[test]
    fn sweep_removes_dead_staging_and_keeps_live_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let live = Staging::create(tmp.path(), PULL, "live").unwrap();
        fs::write(live.path().join("part"), b"x").unwrap();
        assert!(owner_of(live.path()).is_file());
        let dead = tmp.path().join("pull-dead-abc123");
        killed(&dead, true);
        // Killed after its directory was renamed into place or removed, before its owner file was.
        let published = tmp.path().join("pull-published-def456");
        killed(&published, false);
        // No owner file and just made: maybe a pull about to lock it.
        let young = tmp.path().join(".new-young.owner");
        fs::write(&young, b"").unwrap();
        // Not staging: a file under a live name, a directory under another kind's.
        fs::write(tmp.path().join("pull-not-a-dir"), b"").unwrap();
        fs::create_dir(tmp.path().join(".sanctum-import-x")).unwrap();

        assert_eq!(
            sorted(sweep(tmp.path(), PULL)),
            sorted(vec![dead.clone(), owner_of(&dead), owner_of(&published)])
        );
        assert!(!dead.exists());
        assert!(live.path().join("part").exists());
        assert!(young.exists());
        assert!(tmp.path().join("pull-not-a-dir").exists());
        assert!(tmp.path().join(".sanctum-import-x").exists());
        let live_path = live.path().to_owned();
        drop(live);
        assert!(
            !live_path.exists() && !owner_of(&live_path).exists(),
            "a finished pull removes its own staging"
        );
    }

    #[test]
    fn an_output_named_at_the_longest_still_stages() {
        let tmp = tempfile::tempdir().unwrap();
        let longest = "é".repeat(127) + "x";
        assert_eq!(longest.len(), 255);
        let staging = Staging::create(tmp.path(), QUANTIZE, &longest).unwrap();
        let name = staging.path().file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with(&format!(".sanctum-quantize-{}-", "é".repeat(48))));
        staging.move_to(&tmp.path().join(&longest)).unwrap();
        assert!(tmp.path().join(&longest).is_dir());
    }

    #[test]
    fn unowned_leftovers_go_after_an_hour() {
        let tmp = tempfile::tempdir().unwrap();
        // Left by a sanctum that kept the owner file inside the directory, and a writer killed
        // before locking its fresh owner file.
        let inside = tmp.path().join("pull-old-abc123");
        fs::create_dir(&inside).unwrap();
        fs::write(inside.join(OWNER), b"").unwrap();
        let fresh = tmp.path().join(".new-abc123.owner");
        fs::write(&fresh, b"").unwrap();
        assert!(sweep(tmp.path(), PULL).is_empty());

        age(&inside, 2 * UNOWNED_GRACE);
        age(&fresh, 2 * UNOWNED_GRACE);
        assert_eq!(sorted(sweep(tmp.path(), PULL)), sorted(vec![inside, fresh]));
    }

    #[test]
    fn a_sweep_beside_an_output_takes_only_dead_staging_of_its_own_kind() {
        let dir = tempfile::tempdir().unwrap();
        let live = Staging::create(dir.path(), IMPORT, "out").unwrap();
        let dead_import = dir.path().join(".sanctum-import-out-dead");
        killed(&dead_import, true);
        let dead_quantize = dir.path().join(".sanctum-quantize-out-dead");
        killed(&dead_quantize, true);
        // A user's own files beside the output, whatever they are called.
        for theirs in ["pull-mine", ".new-mine", "out"] {
            fs::create_dir(dir.path().join(theirs)).unwrap();
            fs::write(owner_of(&dir.path().join(theirs)), b"").unwrap();
        }

        assert_eq!(
            sorted(sweep(dir.path(), IMPORT)),
            vec![dead_import.clone(), owner_of(&dead_import)]
        );
        assert_eq!(
            sorted(sweep(dir.path(), QUANTIZE)),
            vec![dead_quantize.clone(), owner_of(&dead_quantize)]
        );
        assert!(live.path().exists());
        for theirs in ["pull-mine", ".new-mine", "out"] {
            let theirs = dir.path().join(theirs);
            assert!(
                theirs.exists() && owner_of(&theirs).exists(),
                "{theirs:?} swept"
            );
        }

        // Published: the directory is the output, its owner file gone, and nothing of the staging
        // is left to remove.
        fs::write(live.path().join("model.safetensors"), b"weights").unwrap();
        let staged = live.path().to_owned();
        let target = dir.path().join("published");
        live.move_to(&target).unwrap();
        assert!(target.join("model.safetensors").exists());
        assert_eq!(fs::read_dir(&target).unwrap().count(), 1);
        assert!(!staged.exists() && !owner_of(&staged).exists());
        assert!(sweep(dir.path(), IMPORT).is_empty());
    }
}
