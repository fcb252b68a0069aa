//! What a caller learns while files download, and how it stops them.
//!
//! A download of SD1.5 is gigabytes: the caller shows bytes as they arrive and may want to stop
//! (Ctrl-C). `hf-hub`'s client can neither report to a borrowed sink nor be interrupted, so
//! each file downloads on a thread of its own that reports over a channel, and the calling
//! thread forwards the reports and polls [`Observer::should_stop`]. Stopping abandons that
//! thread: its partial `blobs/<etag>.part` stays behind, never a blob or a snapshot link, and
//! the next download of the file resumes from it (hf-hub appends to an existing part file; its
//! lock is an `flock`, released when the process ends).

/// Told about downloads as they happen.
pub trait Observer: Sync {
    /// `file` (its name in the repository) starts downloading; `bytes` is its size.
    fn started(&self, _file: &str, _bytes: u64) {}
    /// `bytes` more of the current file arrived.
    fn advanced(&self, _bytes: u64) {}
    /// Whether to stop now; asked a few times a second while a file downloads.
    fn should_stop(&self) -> bool {
        false
    }
}

/// Observes nothing and never stops.
pub struct Quiet;
impl Observer for Quiet {}

/// An [`Observer`] made of closures, for callers whose progress type this crate does not know.
pub struct FnObserver<S, A, T> {
    pub started: S,
    pub advanced: A,
    pub should_stop: T,
}

impl<S, A, T> Observer for FnObserver<S, A, T>
where
    S: Fn(&str, u64) + Sync,
    A: Fn(u64) + Sync,
    T: Fn() -> bool + Sync,
{
    fn started(&self, file: &str, bytes: u64) {
        (self.started)(file, bytes)
    }
    fn advanced(&self, bytes: u64) {
        (self.advanced)(bytes)
    }
    fn should_stop(&self) -> bool {
        (self.should_stop)()
    }
}
