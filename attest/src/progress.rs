//! Progress reporting without printing: libraries report, the CLI draws (indicatif on a terminal).

/// Receives progress of long byte-oriented work (downloads, hashing). Implementations must be cheap to
/// call often and safe to share between the threads that hash files in parallel.
pub trait Progress: Sync {
    /// A task over `total` bytes (when known) starts; `label` names it, e.g. the file being hashed.
    fn start(&self, label: &str, total: Option<u64>) -> Box<dyn ProgressTask + '_>;
}

/// One running task; finished when dropped.
pub trait ProgressTask: Send {
    /// `bytes` more were processed.
    fn advance(&self, bytes: u64);
}

/// Reports nothing: for tests and non-interactive use.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

struct NoTask;

impl ProgressTask for NoTask {
    fn advance(&self, _bytes: u64) {}
}

impl Progress for NoProgress {
    fn start(&self, _label: &str, _total: Option<u64>) -> Box<dyn ProgressTask + '_> {
        Box::new(NoTask)
    }
}
