//! Advisory file locks between sdpipe processes (flock through std's `File::lock`).
//!
//! The lock file records the holder's pid so a waiting process can say who it waits for. The
//! kernel drops the lock when the holder dies, even on SIGKILL, so a crash never wedges a cache.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// An exclusive lock, held until dropped.
pub struct FileLock {
    file: File,
    path: PathBuf,
}

impl FileLock {
    /// Take the lock, blocking until it is free. If another process still holds it after
    /// `patience`, `on_wait` is called once (with the holder's pid, if known) so the user learns
    /// why nothing happens; shorter waits stay silent.
    pub fn acquire(
        path: &Path,
        patience: Duration,
        on_wait: impl FnOnce(Option<u32>),
    ) -> io::Result<FileLock> {
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let deadline = Instant::now() + patience;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(TryLockError::WouldBlock) => {
                    on_wait(read_pid(&mut file));
                    file.lock()?;
                    break;
                }
                Err(TryLockError::Error(e)) => return Err(e),
            }
        }
        let mut lock = FileLock { file, path: path.to_path_buf() };
        lock.write_pid()?;
        Ok(lock)
    }

    /// Take the lock shared (many holders at once, none exclusive); `on_wait` is called if an
    /// exclusive holder makes this wait.
    pub fn acquire_shared(path: &Path, on_wait: impl FnOnce()) -> io::Result<FileLock> {
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        match file.try_lock_shared() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                on_wait();
                file.lock_shared()?;
            }
            Err(TryLockError::Error(e)) => return Err(e),
        }
        Ok(FileLock { file, path: path.to_path_buf() })
    }

    /// Take the lock only if it is free.
    pub fn try_acquire(path: &Path) -> io::Result<Option<FileLock>> {
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        match file.try_lock() {
            Ok(()) => {
                let mut lock = FileLock { file, path: path.to_path_buf() };
                lock.write_pid()?;
                Ok(Some(lock))
            }
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(e),
        }
    }

    fn write_pid(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.rewind()?;
        write!(self.file, "{}", std::process::id())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut s = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_until_the_first_drops() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        let first = FileLock::try_acquire(&p).unwrap().expect("free");
        assert!(FileLock::try_acquire(&p).unwrap().is_none());
        drop(first);
        assert!(FileLock::try_acquire(&p).unwrap().is_some());
    }
}
