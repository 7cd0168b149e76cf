//! The endpoint inventory behind `sanctum scan`: which model files a machine holds (found by content,
//! under given paths and the well-known caches), how each stands against the approved-models lock
//! (approved, tampered, unapproved, dangerous), and which local inference servers are listening.
//! Nothing found is ever loaded or executed: pickles are read as opcode streams
//! (`attest::pickle`), other formats only as far as their headers.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let lock = attest::lockfile::Lockfile::parse(&std::fs::read_to_string("models.lock")?)?;
//! let roots = vec![scan::Root { path: "/srv/models".into(), cache: None }];
//! let report = scan::scan(&scan::ScanOptions::new(roots, Some(&lock)), &attest::progress::NoProgress);
//! for model in &report.models {
//!     println!("{} {:?}", model.name, model.standing);
//! }
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

pub mod caches;
pub mod inspect;
pub mod listeners;
pub mod report;
mod standing;
mod walk;

pub use caches::{CacheKind, Origin, Root};
pub use inspect::{Format, Inspection};
pub use report::{FailOn, FileFinding, ModelFinding, Report, Standing, Unreadable};

use attest::lockfile::Lockfile;
use attest::policy::Rules;
use attest::progress::Progress;

/// What to scan and against what.
#[derive(Debug, Clone)]
pub struct ScanOptions<'a> {
    /// Directories and files to walk.
    pub roots: Vec<Root>,
    /// The approved models; without one every model is unapproved.
    pub lock: Option<&'a Lockfile>,
    /// Threads that inspect and hash files (at least 1).
    pub threads: usize,
    /// Whether to list listening sockets and GPU processes.
    pub listeners: bool,
    /// The policy's rules: a file in a format `formats.files` leaves out stands at least
    /// unapproved, with the rule named in its reasons.
    pub rules: Option<&'a Rules>,
}

impl<'a> ScanOptions<'a> {
    /// Scans `roots` against `lock` with a thread per core, listeners included.
    pub fn new(roots: Vec<Root>, lock: Option<&'a Lockfile>) -> Self {
        Self {
            roots,
            lock,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            listeners: true,
            rules: None,
        }
    }
}

/// Walks the roots, inspects and hashes every model file found by content, judges each against the
/// lock, and lists the listening inference servers. Never fails: unreadable files and directories
/// are reported in [`Report::unreadable`].
pub fn scan(options: &ScanOptions<'_>, progress: &dyn Progress) -> Report {
    let walked = walk::walk(&options.roots);
    let mut unreadable = walked.unreadable;
    let found = walk::examine(walked.files, options.threads, progress, &mut unreadable);
    let (mut files, mut models) = standing::judge(found, options.lock, &mut unreadable);
    if let Some(rules) = options.rules {
        apply_format_rule(rules, &mut files, &mut models);
    }
    let inventory = options.listeners.then(listeners::scan).unwrap_or_default();
    unreadable.sort_by(|a, b| a.path.cmp(&b.path));
    Report {
        roots: options.roots.clone(),
        files,
        models,
        listeners: inventory.listeners,
        gpu_processes: inventory.gpu_processes,
        notes: inventory.notes,
        unreadable,
    }
}

/// Marks files in formats the policy's `formats.files` does not allow, and the models holding them.
fn apply_format_rule(rules: &Rules, files: &mut [FileFinding], models: &mut [ModelFinding]) {
    for file in files.iter_mut() {
        if let Err(violation) = rules.check_file_format(file.format.name()) {
            file.standing = file.standing.max(Standing::Unapproved);
            file.reasons.push(violation.to_string());
        }
    }
    for model in models.iter_mut() {
        model.standing = standing::worst(model.standing, &model.files, files);
    }
}
