//! The index: small records mapping a stage key to what its run produced, each stage's run
//! history (for `status` diffs and `gc --keep-last`). (The stat → digest memo is not here: it
//! is a hint, kept in unsynced files of `cache/memo/`; indexes written by earlier versions may
//! still hold an unused `stat-memo` tree.)
//!
//! sled 0.34 is pinned and unmaintained, so everything goes through [`Index`]; records stay
//! small (big bytes, tree manifests and key manifests included, live in the object store).

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use sdpipe_stages::api::OutputKind;
use serde::{Deserialize, Serialize};

use crate::hash::Digest;

/// What one output of a finished stage is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputRecord {
    /// Declared relative path inside the stage's directory.
    pub path: String,
    pub kind: OutputKind,
    /// File: its content digest. Dir: the digest of its tree manifest (itself an object).
    pub digest: Digest,
    pub size: u64,
    pub files: u64,
}

/// A finished stage, written last when it commits: present means complete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub key: Digest,
    pub stage: String,
    pub kind: String,
    /// Object holding the canonical key manifest.
    pub manifest: Digest,
    pub outputs: BTreeMap<String, OutputRecord>,
    /// Object holding the stage's stdout/stderr.
    pub log: Option<Digest>,
    /// Unix seconds.
    pub started_at: u64,
    pub duration_ms: u64,
    pub threads: usize,
    pub sdpipe_version: String,
}

/// One run of a stage identity (pipeline path + stage name), newest last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub key: Digest,
    /// Unix seconds.
    pub at: u64,
}

/// A stage's identity across runs and its history, plus where its pipeline lives (only used by
/// `gc` to notice deleted pipelines, never in a key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct History {
    pub pipeline_file: String,
    pub entries: Vec<HistoryEntry>,
}

/// How many past keys each stage identity remembers.
pub const HISTORY_LEN: usize = 16;

pub trait Index {
    fn record(&self, key: &Digest) -> io::Result<Option<Record>>;
    /// Write a record and append it to `identity`'s history, atomically.
    fn commit(&self, record: &Record, identity: &str, pipeline_file: &str) -> io::Result<()>;
    fn remove_record(&self, key: &Digest) -> io::Result<()>;
    fn records(&self) -> io::Result<Vec<Record>>;
    fn history(&self, identity: &str) -> io::Result<History>;
    fn histories(&self) -> io::Result<Vec<(String, History)>>;
    fn set_history(&self, identity: &str, history: &History) -> io::Result<()>;
    fn size_on_disk(&self) -> io::Result<u64>;
    /// The token naming the index's current state of records and histories (see
    /// `Cache::result_hint`), created if the last change removed it.
    fn generation(&self) -> io::Result<Vec<u8>>;
}

/// The sled-backed index. Open it only while holding the cache's index lock.
pub struct SledIndex {
    dir: std::path::PathBuf,
    db: sled::Db,
    records: sled::Tree,
    history: sled::Tree,
}

fn db_err(e: sled::Error) -> io::Error {
    match e {
        sled::Error::Io(e) => e,
        // Its own kind, so the cache can tell a damaged index from a busy or missing one.
        // sled reports a damaged `conf` file as "unsupported" (a version or buffer-size
        // mismatch): for a cache that is the same thing, an index it cannot read.
        damaged @ (sled::Error::Corruption { .. } | sled::Error::Unsupported(_)) => io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the cache index is damaged ({damaged})"),
        ),
        other => io::Error::other(format!("cache index: {other}")),
    }
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    serde_json::from_slice(bytes).map_err(|e| {
        io::Error::new(io::ErrorKind::InvalidData, format!("corrupt index entry: {e}"))
    })
}

impl SledIndex {
    pub fn open(dir: &Path) -> io::Result<SledIndex> {
        remove_unfinished_snapshots(dir);
        // No background flusher: the index is opened for short sessions and flushed explicitly
        // on every write, and a flusher thread would delay releasing sled's own file lock.
        let db = sled::Config::new().path(dir).flush_every_ms(None).open().map_err(db_err)?;
        Ok(SledIndex {
            dir: dir.to_path_buf(),
            records: db.open_tree("records").map_err(db_err)?,
            history: db.open_tree("history").map_err(db_err)?,
            db,
        })
    }

    fn flush(&self) -> io::Result<()> {
        self.db.flush().map(|_| ()).map_err(db_err)
    }

    /// Where the generation token lives: inside the index directory, so that a new, replaced
    /// or deleted index has none and every result hint taken from an earlier one is void.
    fn generation_path(&self) -> std::path::PathBuf {
        self.dir.join(GENERATION_FILE)
    }

    /// Called before any change to records or histories: removes the generation token, durably,
    /// so no result hint taken before the change can match afterwards.
    fn void_hints(&self) -> io::Result<()> {
        match std::fs::remove_file(self.generation_path()) {
            Ok(()) => std::fs::File::open(&self.dir)?.sync_all(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// See [`SledIndex::generation`].
pub const GENERATION_FILE: &str = "sdpipe-generation";

/// sled 0.34 writes a snapshot to `snap.<lsn>.generating` and renames it when complete, but on
/// opening takes the newest `snap.*` file, unfinished ones included: after a kill mid-write it
/// finds an empty snapshot and refuses to open the database ever again (found by the crash
/// torture test). The index lock is held whenever the index is opened, so an unfinished
/// snapshot is always a dead writer's, and the finished one before it is still there.
fn remove_unfinished_snapshots(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

impl Index for SledIndex {
    fn record(&self, key: &Digest) -> io::Result<Option<Record>> {
        match self.records.get(key.0).map_err(db_err)? {
            None => Ok(None),
            // An undecodable record is treated as absent: the stage reruns and overwrites it.
            Some(bytes) => Ok(decode(&bytes).ok()),
        }
    }

    fn commit(&self, record: &Record, identity: &str, pipeline_file: &str) -> io::Result<()> {
        use sled::Transactional;
        let before = self.history(identity)?;
        let mut history = before.clone();
        history.pipeline_file = pipeline_file.to_string();
        history.entries.retain(|e| e.key != record.key);
        history.entries.push(HistoryEntry { key: record.key, at: record.started_at });
        let excess = history.entries.len().saturating_sub(HISTORY_LEN);
        history.entries.drain(..excess);
        let record_bytes = serde_json::to_vec(record)?;
        // A cached result reused again changes nothing: write (and sync) nothing, so that a
        // no-op run leaves the index exactly as it found it.
        if history == before
            && self.records.get(record.key.0).map_err(db_err)?.as_deref()
                == Some(record_bytes.as_slice())
        {
            return Ok(());
        }
        let history_bytes = serde_json::to_vec(&history)?;
        self.void_hints()?;
        (&self.records, &self.history)
            .transaction(|(records, hist)| {
                records.insert(&record.key.0, record_bytes.as_slice())?;
                hist.insert(identity.as_bytes(), history_bytes.as_slice())?;
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| io::Error::other(format!("cache index transaction: {e:?}")))?;
        self.flush()
    }

    fn remove_record(&self, key: &Digest) -> io::Result<()> {
        self.void_hints()?;
        self.records.remove(key.0).map_err(db_err)?;
        self.flush()
    }

    fn records(&self) -> io::Result<Vec<Record>> {
        let mut out = Vec::new();
        for item in self.records.iter() {
            let (_, v) = item.map_err(db_err)?;
            if let Ok(r) = decode(&v) {
                out.push(r);
            }
        }
        Ok(out)
    }

    fn history(&self, identity: &str) -> io::Result<History> {
        match self.history.get(identity.as_bytes()).map_err(db_err)? {
            Some(bytes) => Ok(decode(&bytes).unwrap_or_default()),
            None => Ok(History::default()),
        }
    }

    fn histories(&self) -> io::Result<Vec<(String, History)>> {
        let mut out = Vec::new();
        for item in self.history.iter() {
            let (k, v) = item.map_err(db_err)?;
            out.push((String::from_utf8_lossy(&k).into_owned(), decode(&v).unwrap_or_default()));
        }
        Ok(out)
    }

    fn set_history(&self, identity: &str, history: &History) -> io::Result<()> {
        self.void_hints()?;
        if history.entries.is_empty() {
            self.history.remove(identity.as_bytes()).map_err(db_err)?;
        } else {
            self.history
                .insert(identity.as_bytes(), serde_json::to_vec(history)?)
                .map_err(db_err)?;
        }
        self.flush()
    }

    fn size_on_disk(&self) -> io::Result<u64> {
        self.db.size_on_disk().map_err(db_err)
    }

    fn generation(&self) -> io::Result<Vec<u8>> {
        let path = self.generation_path();
        if let Ok(token) = std::fs::read(&path) {
            if token.len() == 32 {
                return Ok(token);
            }
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(&std::process::id().to_le_bytes());
        hasher.update(&crate::hash::now_ns().to_le_bytes());
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        hasher.update(&N.fetch_add(1, std::sync::atomic::Ordering::Relaxed).to_le_bytes());
        let token = hasher.finalize().as_bytes().to_vec();
        let tmp = self.dir.join(format!("{GENERATION_FILE}.new-{}", std::process::id()));
        // Not synced: a token lost in a crash only voids the hints that named it.
        std::fs::write(&tmp, &token).and_then(|()| std::fs::rename(&tmp, &path))?;
        Ok(token)
    }
}
