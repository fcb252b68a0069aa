//! The cache directory: object store, index, locks, scratch space and resumable state.
//!
//! ```text
//! cache/
//!   objects/ab/cdef…   content-addressed, read-only files (outputs, trees, manifests, logs)
//!   index/             sled: key → record, stage history
//!   memo/<listing>     tree digest of a directory or glob whose stat listing is unchanged
//!   memo/stats-<scope> file stat → digest for one dependency's files (see `hash::memo_scope`)
//!   memo/result-<id>   a stage's last result, valid while the index's generation is unchanged
//!   index.lock         held while the index is open (short sessions)
//!   maintenance.lock   shared by runs, exclusive for gc and verify
//!   locks/<key>.lock   held while a process computes that key
//!   tmp/<name>/        scratch for running stages (removed when its owner is gone)
//!   state/<key>/       checkpoints a stage keeps across interruptions
//!   downloads/<kind>/  what a kind fetched from the network, keyed by URL, shared across keys
//!   logs/<key>.log     log of a running or failed stage
//! ```

pub mod index;
pub mod store;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::hash::{Digest, DigestMemo, FileStat};
use crate::lock::FileLock;
pub use index::{HistoryEntry, Index, OutputRecord, Record, SledIndex};
pub use store::{LocalStore, ObjectStore};

pub struct Cache {
    root: PathBuf,
    store: LocalStore,
    /// Serialises index sessions between this process's threads; the file lock does the same
    /// between processes (sled itself refuses a second opener instead of waiting).
    session: Mutex<()>,
    /// Set when this process found the index damaged and moved it aside.
    damaged_index: Mutex<Option<PathBuf>>,
}

/// A stage's private working directory, deleted on drop.
pub struct Scratch {
    pub dir: PathBuf,
    _lock: FileLock,
    lock_path: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = make_writable_recursive(&self.dir);
        let _ = fs::remove_dir_all(&self.dir);
        let _ = fs::remove_file(&self.lock_path);
    }
}

impl Cache {
    /// Open (creating if needed) the cache at `root`, and sweep scratch left by dead processes.
    pub fn open(root: &Path) -> io::Result<Cache> {
        for sub in ["objects", "locks", "tmp", "state", "logs", "memo"] {
            fs::create_dir_all(root.join(sub)).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot create cache dir {}: {e}", root.join(sub).display()),
                )
            })?;
        }
        let cache = Cache {
            store: LocalStore::new(root.join("objects"))?,
            root: root.to_path_buf(),
            session: Mutex::new(()),
            damaged_index: Mutex::new(None),
        };
        cache.sweep_scratch();
        Ok(cache)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn store(&self) -> &LocalStore {
        &self.store
    }

    /// Run `f` with the index open; waits (saying so) while another process holds it.
    pub fn with_index<T>(&self, f: impl FnOnce(&dyn Index) -> io::Result<T>) -> io::Result<T> {
        let _guard = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let lock_path = self.root.join("index.lock");
        let _lock = FileLock::acquire(&lock_path, Duration::from_secs(2), |pid| {
            let who = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
            tracing::warn!(
                "waiting for another sdpipe process{who} to release the cache index {}",
                lock_path.display()
            );
        })?;
        let dir = self.root.join("index");
        if !dir.exists() {
            self.create_index(&dir)?;
        }
        let index = match open_patiently(&dir) {
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                self.replace_damaged_index(&dir, e)?
            }
            other => other?,
        };
        f(&index)
    }

    /// [`Cache::with_index`] if the cache has an index; `None`, creating nothing, if it has
    /// none yet (a cache that has never recorded a result: `status` on a fresh project need
    /// not create one, which costs a few syncs).
    pub fn with_index_if_present<T>(
        &self,
        f: impl FnOnce(&dyn Index) -> io::Result<T>,
    ) -> io::Result<Option<T>> {
        if !self.root.join("index").exists() {
            return Ok(None);
        }
        self.with_index(f).map(Some)
    }

    /// Make a new, empty index appear at `dir` whole. sled writes its `conf` file
    /// non-atomically when it creates a database, and a kill in that instant leaves an index
    /// it refuses to open; so it is created under a temporary name and renamed into place.
    /// Called with the index lock held: any earlier temporary is a killed creator's.
    fn create_index(&self, dir: &Path) -> io::Result<()> {
        let tmp = self.root.join(format!("index.new-{}", std::process::id()));
        if let Ok(entries) = fs::read_dir(&self.root) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with("index.new-") {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
        drop(SledIndex::open(&tmp)?);
        fs::rename(&tmp, dir)
    }

    /// A damaged index is a lost cache, not a reason to stop working: it is moved aside (for
    /// inspection) and a fresh one started, so every stage recomputes — objects are
    /// content-addressed and never trusted through the index alone, so no wrong result can
    /// come of it. `cache verify` reports it.
    fn replace_damaged_index(&self, dir: &Path, error: io::Error) -> io::Result<SledIndex> {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let aside = self.root.join(format!("index.damaged-{secs}-{}", std::process::id()));
        fs::rename(dir, &aside).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{error}; moving it aside to {} failed ({e}): delete {} to start a fresh \
                     index (results will be recomputed; objects are kept)",
                    aside.display(),
                    dir.display()
                ),
            )
        })?;
        tracing::warn!(
            "{error}: moved it to {} and started a fresh index; stages will be recomputed",
            aside.display()
        );
        *self.damaged_index.lock().unwrap_or_else(|p| p.into_inner()) = Some(aside);
        SledIndex::open(dir)
    }

    /// Where a damaged index found by this process was moved, if one was.
    pub fn damaged_index(&self) -> Option<PathBuf> {
        self.damaged_index.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Hold the lock that says "this process is computing `key`". `on_wait` is called if
    /// another process holds it; this call then blocks until that process finishes.
    pub fn lock_key(
        &self,
        key: &Digest,
        on_wait: impl FnOnce(Option<u32>),
    ) -> io::Result<FileLock> {
        let path = self.root.join("locks").join(format!("{}.lock", key.to_hex()));
        FileLock::acquire(&path, Duration::ZERO, on_wait)
    }

    /// A fresh scratch directory, owned (locked) by this process until dropped.
    pub fn scratch(&self, tag: &str) -> io::Result<Scratch> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!("{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let tmp = self.root.join("tmp");
        let lock_path = tmp.join(format!("{name}.lock"));
        let lock = FileLock::try_acquire(&lock_path)?
            .ok_or_else(|| io::Error::other(format!("scratch {name} is unexpectedly in use")))?;
        let dir = tmp.join(&name);
        fs::create_dir_all(&dir)?;
        Ok(Scratch { dir, _lock: lock, lock_path })
    }

    /// Remove scratch directories whose owning process is gone (its lock is free).
    fn sweep_scratch(&self) {
        let tmp = self.root.join("tmp");
        let Ok(entries) = fs::read_dir(&tmp) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "lock") {
                continue;
            }
            let lock_path = path.with_extension("lock");
            if let Ok(Some(_lock)) = FileLock::try_acquire(&lock_path) {
                tracing::debug!("removing abandoned scratch {}", path.display());
                let _ = make_writable_recursive(&path);
                let _ = fs::remove_dir_all(&path);
                let _ = fs::remove_file(&lock_path);
            }
        }
    }

    /// Held shared by every run for its whole duration and exclusively by `gc` and `cache
    /// verify`, so maintenance never deletes objects a run has stored but not yet recorded.
    pub fn maintenance_lock(&self, exclusive: bool) -> io::Result<FileLock> {
        let path = self.root.join("maintenance.lock");
        if exclusive {
            FileLock::acquire(&path, Duration::ZERO, |pid| {
                let who = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
                tracing::warn!(
                    "waiting for running sdpipe processes{who} to finish before maintenance"
                );
            })
        } else {
            FileLock::acquire_shared(&path, || {
                tracing::warn!("waiting for cache maintenance (gc/verify) to finish")
            })
        }
    }

    /// Checkpoint space for one key, kept until the stage succeeds.
    pub fn state_dir(&self, key: &Digest) -> PathBuf {
        self.root.join("state").join(key.to_hex())
    }

    /// The download cache shared by every stage of one kind (created on demand).
    pub fn downloads_dir(&self, kind: &str) -> io::Result<PathBuf> {
        let dir = self.root.join("downloads").join(kind);
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Where a running (or failed) stage's log is written.
    pub fn log_path(&self, key: &Digest) -> PathBuf {
        self.root.join("logs").join(format!("{}.log", key.to_hex()))
    }

    pub fn memo(&self) -> CacheMemo<'_> {
        CacheMemo(self)
    }

    fn hint_path(&self, identity: &str) -> PathBuf {
        let id = Digest::of_bytes(identity.as_bytes());
        self.root.join("memo").join(format!("result-{}", id.to_hex()))
    }

    /// `identity`'s result for `key` as the index last showed it, if no record or history has
    /// changed since (the index's generation token is the one the hint names). This lets a
    /// no-op rerun find its results without opening the index: every sled open replays the
    /// log and syncs the file twice, which on a busy disk is most of a no-op's time. The caller
    /// still checks that the result's objects are present.
    pub fn result_hint(&self, identity: &str, key: &Digest) -> Option<Record> {
        let token = fs::read(self.root.join("index").join(index::GENERATION_FILE)).ok()?;
        let bytes = fs::read(self.hint_path(identity)).ok()?;
        let (body, check) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
        if Digest::of_bytes(body).0 != check {
            return None;
        }
        let hint: ResultHint = serde_json::from_slice(body).ok()?;
        let matches = hint.generation == hex::encode(token)
            && hint.identity == identity
            && hint.record.key == *key;
        matches.then_some(hint.record)
    }

    /// Remember `record` as `identity`'s current result, for [`Cache::result_hint`]. Only
    /// inside an index session (hence the `index`), after the stage's history names `record`.
    pub fn note_result(&self, index: &dyn Index, identity: &str, record: &Record) {
        let write = || -> io::Result<()> {
            let hint = ResultHint {
                generation: hex::encode(index.generation()?),
                identity: identity.to_string(),
                record: record.clone(),
            };
            let mut bytes = serde_json::to_vec(&hint)?;
            let check = Digest::of_bytes(&bytes);
            bytes.extend_from_slice(&check.0);
            let tmp = self.root.join("memo").join(format!(".tmp-hint-{}", std::process::id()));
            fs::write(&tmp, bytes)
                .and_then(|()| fs::rename(&tmp, self.hint_path(identity)))
                .inspect_err(|_| drop(fs::remove_file(&tmp)))
        };
        if let Err(e) = write() {
            tracing::debug!("could not write the result hint of {identity}: {e}");
        }
    }

    fn tree_memo_path(&self, listing: &Digest) -> PathBuf {
        self.root.join("memo").join(listing.to_hex())
    }

    /// The tree digest remembered for a stat listing. Kept as one small file per listing, out
    /// of the index: an unchanged dependency of thousands of files is then answered by one
    /// file read, with no index session (an index session opens sled, which replays its log
    /// and syncs it).
    fn tree_memo_get(&self, listing: &Digest) -> Option<Digest> {
        let bytes = fs::read(self.tree_memo_path(listing)).ok()?;
        TreeMemoEntry::decode(listing, &bytes)
    }

    fn tree_memo_put(&self, listing: &Digest, tree: &Digest) -> io::Result<()> {
        self.memo_write(&self.tree_memo_path(listing), &TreeMemoEntry::encode(listing, tree))
    }

    fn stat_memo_path(&self, scope: &Digest) -> PathBuf {
        self.root.join("memo").join(format!("stats-{}", scope.to_hex()))
    }

    /// Replace a memo file whole (write aside, rename). Not synced: a memo file lost or torn
    /// by a crash only costs a rehash (a torn one fails its check), so it is not worth making
    /// every run wait for the disk.
    fn memo_write(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let tmp = self.root.join("memo").join(format!(".tmp-{}-{n}", std::process::id()));
        fs::write(&tmp, bytes)
            .and_then(|()| fs::rename(&tmp, path))
            .inspect_err(|_| drop(fs::remove_file(&tmp)))
    }
}

/// A stage's last result and the index generation it was read in (see
/// [`Cache::result_hint`]). Followed on disk by the blake3 of its JSON, so a torn file is a miss.
#[derive(serde::Serialize, serde::Deserialize)]
struct ResultHint {
    generation: String,
    identity: String,
    record: Record,
}

/// A tree memo file: the tree digest and a check binding it to its listing, so that a torn,
/// truncated or foreign file reads as a miss, never as a wrong digest.
struct TreeMemoEntry;

impl TreeMemoEntry {
    fn check(listing: &Digest, tree: &Digest) -> Digest {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"sdpipe tree memo 1\n");
        hasher.update(&listing.0);
        hasher.update(&tree.0);
        Digest(*hasher.finalize().as_bytes())
    }

    fn encode(listing: &Digest, tree: &Digest) -> Vec<u8> {
        [tree.0, Self::check(listing, tree).0].concat()
    }

    fn decode(listing: &Digest, bytes: &[u8]) -> Option<Digest> {
        let (tree, check) = (bytes.get(..32)?, bytes.get(32..)?);
        let tree = Digest(tree.try_into().ok()?);
        (check == Self::check(listing, &tree).0).then_some(tree)
    }
}

/// Open the index, waiting out sled's own file lock. With `index.lock` held and the session
/// mutex taken, nobody else uses the index; but sled releases its file lock only when its last
/// internal handle drops, which can trail the drop of ours (seen when several quick stages
/// finish at once), so "busy" here is that lag and worth a short wait.
fn open_patiently(dir: &Path) -> io::Result<SledIndex> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut wait = Duration::from_millis(5);
    loop {
        match SledIndex::open(dir) {
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

/// The stat memo, kept in `memo/` as plain files outside the index: per dependency scope its
/// files' digests, per stat listing its tree digest. Nothing there is synced or locked: a lost
/// or torn file (each carries a check) only costs a rehash, so writing it never makes a run
/// wait for the disk, and a no-op run answers from it without opening the index (a sled open
/// replays the log and syncs it). Failures are logged, not raised.
pub struct CacheMemo<'a>(&'a Cache);

impl DigestMemo for CacheMemo<'_> {
    fn get_many(&self, scope: &Digest, stats: &[FileStat]) -> Vec<Option<Digest>> {
        let known = fs::read(self.0.stat_memo_path(scope))
            .ok()
            .and_then(|bytes| StatMemoFile::decode(scope, &bytes))
            .unwrap_or_default();
        stats.iter().map(|s| known.get(&s.key()).copied()).collect()
    }
    fn put_many(&self, scope: &Digest, entries: &[(FileStat, Digest)]) {
        let bytes = StatMemoFile::encode(scope, entries);
        if let Err(e) = self.0.memo_write(&self.0.stat_memo_path(scope), &bytes) {
            tracing::debug!("could not update the stat memo: {e}");
        }
    }
    fn get_tree(&self, listing: &Digest) -> Option<Digest> {
        self.0.tree_memo_get(listing)
    }
    fn put_tree(&self, listing: &Digest, tree: &Digest) {
        if let Err(e) = self.0.tree_memo_put(listing, tree) {
            tracing::debug!("could not remember the tree of listing {listing:?}: {e}");
        }
    }
}

/// A scope's stat memo file: a header naming the scope, then (stat key, digest) pairs, then the
/// blake3 of everything before it, so that a torn, truncated or foreign file reads as empty.
struct StatMemoFile;

impl StatMemoFile {
    const MAGIC: &'static [u8] = b"sdpipe stat memo 1\n";
    const ENTRY: usize = 56 + 32;

    fn encode(scope: &Digest, entries: &[(FileStat, Digest)]) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::MAGIC.len() + 64 + entries.len() * Self::ENTRY);
        out.extend_from_slice(Self::MAGIC);
        out.extend_from_slice(&scope.0);
        for (stat, digest) in entries {
            out.extend_from_slice(&stat.key());
            out.extend_from_slice(&digest.0);
        }
        let check = Digest::of_bytes(&out);
        out.extend_from_slice(&check.0);
        out
    }

    fn decode(scope: &Digest, bytes: &[u8]) -> Option<std::collections::HashMap<[u8; 56], Digest>> {
        let (body, check) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
        if Digest::of_bytes(body).0 != check {
            return None;
        }
        let body = body.strip_prefix(Self::MAGIC)?.strip_prefix(&scope.0[..])?;
        if body.len() % Self::ENTRY != 0 {
            return None;
        }
        Some(
            body.chunks_exact(Self::ENTRY)
                .map(|e| {
                    let (key, digest) = e.split_at(56);
                    (key.try_into().unwrap(), Digest(digest.try_into().unwrap()))
                })
                .collect(),
        )
    }
}

/// Read-only files (hardlinks of objects) would block deleting a scratch tree's directories'
/// contents on some filesystems; make directories writable first.
pub fn make_writable_recursive(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for entry in walkdir::WalkDir::new(dir).into_iter().flatten() {
        if entry.file_type().is_dir() {
            let _ = fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o755));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u8) -> Record {
        Record {
            key: Digest([n; 32]),
            stage: "s".into(),
            kind: "shell".into(),
            manifest: Digest([0; 32]),
            outputs: Default::default(),
            log: None,
            started_at: 1,
            duration_ms: 2,
            threads: 1,
            sdpipe_version: "test".into(),
        }
    }

    /// A cache whose index has `record(1)` as the result of `p#s`, with a hint noted for it.
    fn hinted_cache() -> (tempfile::TempDir, Cache, Record) {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let r = record(1);
        cache
            .with_index(|i| {
                i.commit(&r, "p#s", "p.yaml")?;
                cache.note_result(i, "p#s", &r);
                Ok(())
            })
            .unwrap();
        (dir, cache, r)
    }

    #[test]
    fn a_result_hint_answers_only_its_stage_and_key() {
        let (_dir, cache, r) = hinted_cache();
        assert_eq!(cache.result_hint("p#s", &r.key), Some(r.clone()));
        assert_eq!(cache.result_hint("p#s", &Digest([2; 32])), None);
        assert_eq!(cache.result_hint("p#t", &r.key), None);
    }

    #[test]
    fn reusing_a_result_again_changes_nothing_and_keeps_the_hint() {
        let (_dir, cache, r) = hinted_cache();
        cache.with_index(|i| i.commit(&r, "p#s", "p.yaml")).unwrap();
        assert_eq!(cache.result_hint("p#s", &r.key), Some(r));
    }

    type Change<'a> = &'a dyn Fn(&dyn Index) -> io::Result<()>;

    #[test]
    fn any_change_to_records_or_histories_voids_every_hint() {
        let changes: [Change; 3] = [
            &|i| i.commit(&record(2), "p#t", "p.yaml"),
            &|i| i.remove_record(&Digest([1; 32])),
            &|i| i.set_history("p#s", &index::History::default()),
        ];
        for change in changes {
            let (_dir, cache, r) = hinted_cache();
            cache.with_index(change).unwrap();
            assert_eq!(cache.result_hint("p#s", &r.key), None);
        }
    }

    #[test]
    fn a_new_index_voids_every_hint() {
        let (dir, cache, r) = hinted_cache();
        fs::remove_dir_all(dir.path().join("index")).unwrap();
        cache.with_index(|_| Ok(())).unwrap();
        assert_eq!(cache.result_hint("p#s", &r.key), None);
    }

    #[test]
    fn a_torn_hint_or_tree_memo_entry_is_a_miss() {
        let (_dir, cache, r) = hinted_cache();
        let path = cache.hint_path("p#s");
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert_eq!(cache.result_hint("p#s", &r.key), None);

        let (listing, tree) = (Digest([3; 32]), Digest([4; 32]));
        cache.tree_memo_put(&listing, &tree).unwrap();
        assert_eq!(cache.tree_memo_get(&listing), Some(tree));
        let path = cache.tree_memo_path(&listing);
        let mut bytes = fs::read(&path).unwrap();
        bytes[0] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(cache.tree_memo_get(&listing), None);
    }

    fn stat(n: u64) -> FileStat {
        FileStat { dev: 1, ino: n, size: 10, mtime_ns: 5, ctime_ns: 6 }
    }

    #[test]
    fn the_stat_memo_answers_only_the_exact_stat_in_its_scope() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let memo = cache.memo();
        let (scope, other) = (Digest([1; 32]), Digest([2; 32]));
        memo.put_many(&scope, &[(stat(1), Digest([7; 32]))]);
        assert_eq!(memo.get_many(&scope, &[stat(1)]), vec![Some(Digest([7; 32]))]);
        assert_eq!(memo.get_many(&other, &[stat(1)]), vec![None]);
        for changed in [
            FileStat { dev: 2, ..stat(1) },
            FileStat { ino: 2, ..stat(1) },
            FileStat { size: 11, ..stat(1) },
            FileStat { mtime_ns: 4, ..stat(1) },
            FileStat { ctime_ns: 7, ..stat(1) },
        ] {
            assert_eq!(memo.get_many(&scope, &[changed]), vec![None]);
        }
    }

    #[test]
    fn a_stat_memo_put_replaces_what_its_scope_held() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let memo = cache.memo();
        let scope = Digest([1; 32]);
        memo.put_many(&scope, &[(stat(1), Digest([7; 32]))]);
        memo.put_many(&scope, &[(stat(2), Digest([8; 32]))]);
        assert_eq!(memo.get_many(&scope, &[stat(1), stat(2)]), vec![None, Some(Digest([8; 32]))]);
    }

    #[test]
    fn a_torn_or_foreign_stat_memo_file_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let memo = cache.memo();
        let (scope, other) = (Digest([1; 32]), Digest([2; 32]));
        memo.put_many(&scope, &[(stat(1), Digest([7; 32])), (stat(2), Digest([8; 32]))]);
        let path = cache.stat_memo_path(&scope);
        let bytes = fs::read(&path).unwrap();
        // Cut mid-entry, cut at an entry boundary, one flipped bit.
        let mut flipped = bytes.clone();
        flipped[40] ^= 1;
        for damaged in [&bytes[..bytes.len() - 50], &bytes[..bytes.len() - 88], &flipped[..]] {
            fs::write(&path, damaged).unwrap();
            assert_eq!(memo.get_many(&scope, &[stat(1), stat(2)]), vec![None, None]);
        }
        // Another scope's (valid) file under this scope's name.
        fs::write(&path, &bytes).unwrap();
        fs::rename(&path, cache.stat_memo_path(&other)).unwrap();
        assert_eq!(memo.get_many(&other, &[stat(1)]), vec![None]);
    }

    /// A project dir holding `data/` with `n` files, all old enough to be memoised.
    fn project_with_data(n: usize) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let old = std::time::SystemTime::now() - Duration::from_secs(60);
        for i in 0..n {
            let p = dir.path().join(format!("data/{}/f{i}", i % 3));
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, format!("content {i}")).unwrap();
            fs::File::options().write(true).open(&p).unwrap().set_modified(old).unwrap();
        }
        dir
    }

    #[test]
    fn after_a_change_unchanged_files_are_served_by_the_stat_memo_and_the_tree_stays_exact() {
        use crate::hash::{hash_entries, hash_path, memo_scope, walk_files, Hashed, Tree};
        let project = project_with_data(6);
        let cache_dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(cache_dir.path()).unwrap();
        let memo = cache.memo();
        let data = project.path().join("data");
        let full = || hash_entries(&walk_files(&data).unwrap()).unwrap().digest();
        let through_memo = || hash_path(project.path(), "data", false, &memo).unwrap();
        assert_eq!(through_memo().digest(), full());

        // Plant a digest for one file's exact stat: if the next hash shows it, that file was
        // served by the memo instead of being read.
        let kept = data.join("0/f0");
        let planted = Digest([9; 32]);
        let scope = memo_scope(project.path(), "data", false);
        let mut table: Vec<(FileStat, Digest)> = walk_files(&data)
            .unwrap()
            .iter()
            .map(|f| (FileStat::of(&fs::metadata(&f.abs).unwrap()), Digest([0; 32])))
            .collect();
        table.retain(|(s, _)| *s == FileStat::of(&fs::metadata(&kept).unwrap()));
        table[0].1 = planted;
        memo.put_many(&scope, &table);
        // Another file changes (new bytes, same size, an old mtime): the listing misses.
        let changed = data.join("1/f1");
        fs::write(&changed, "CONTENT 1").unwrap();
        let old = std::time::SystemTime::now() - Duration::from_secs(30);
        fs::File::options().write(true).open(&changed).unwrap().set_modified(old).unwrap();
        let Hashed::Tree { digest, .. } = through_memo() else { panic!("a directory") };
        let expected = Tree {
            entries: hash_entries(&walk_files(&data).unwrap())
                .unwrap()
                .entries
                .into_iter()
                .map(|mut e| {
                    if e.path == "0/f0" {
                        e.digest = planted;
                    }
                    e
                })
                .collect(),
        };
        assert_eq!(digest, expected.digest(), "f0 came from the memo, f1 was reread");

        // Once the planted file changes, its old stat never matches again: the tree is exact.
        fs::write(&kept, "content 0!").unwrap();
        fs::File::options().write(true).open(&kept).unwrap().set_modified(old).unwrap();
        assert_eq!(through_memo().digest(), full());
    }
}
