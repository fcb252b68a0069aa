//! The shared remote cache: a prefix of an S3-compatible bucket that holds the same
//! content-addressed objects as the local store and one JSON record per stage key.
//!
//! ```text
//! s3://bucket/prefix/sdpipe-v1/
//!   objects/ab/cdef…      object bytes, named by their blake3 digest (as in cache/objects/)
//!   records/<key>.json    a finished stage's record (outputs, manifest, log, timings)
//! ```
//!
//! Consistency comes from two rules. Objects are immutable and named by content, so writing
//! one twice is harmless and a reader can check what it got. A record is written after every
//! object it names, with a conditional create (`If-None-Match: *`), so a reader that finds a
//! record finds its objects, and two writers of the same key never replace each other's record.
//! A pull checks the blake3 of every object before it enters the local store, and that the
//! record's key manifest hashes to the key asked for.
//!
//! A remote is a convenience, never a dependency: the scheduler turns every error here into a
//! warning and runs (or keeps) the stage locally. After the first transport or server failure
//! the remote is skipped for the rest of the process, so a dead bucket costs one timeout.

pub mod config;
mod profile;
mod s3;
pub mod sync;

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::sync::Mutex;

use futures_util::StreamExt;
use object_store::path::Path as Key;
use sdpipe_stages::api::OutputKind;

use crate::cache::{Cache, LocalStore, ObjectStore, Record};
use crate::hash::Digest;
use crate::key::KeyManifest;
use crate::materialize;
pub use config::RemoteConfig;
use s3::{Bucket, GetError, PutFileError, S3Error};

/// Version of the bucket layout, part of every key: a future layout lives beside this one.
const LAYOUT: &str = "sdpipe-v1";

/// Objects at least this large are checked with a HEAD before uploading (skipping the upload
/// when present); smaller ones go straight to a conditional PUT, which costs the same.
const HEAD_FIRST_ABOVE: u64 = 1 << 20;

/// Transfers in flight at once for one stage (directory outputs can hold thousands of files).
const CONCURRENCY: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("remote cache {url}: {source}{}", skipped_note(.gives_up))]
    S3 {
        url: String,
        source: Box<S3Error>,
        /// This failure made the remote unused for the rest of the process.
        gives_up: bool,
    },
    #[error(
        "remote cache {url}: object {key} does not match its name (its content hashes to \
         {actual}); refused"
    )]
    Corrupt { url: String, key: String, actual: Digest },
    #[error("remote cache {url}: object {key} is missing, though record {record} names it")]
    Missing { url: String, key: String, record: String },
    #[error("remote cache {url}: record {key} is not valid: {reason}")]
    BadRecord { url: String, key: String, reason: String },
    #[error(
        "local object {digest} does not match its name: not pushed (run `sdpipe cache verify`)"
    )]
    LocalCorrupt { digest: Digest },
    #[error("local cache: {0}")]
    Local(#[from] io::Error),
    #[error("remote cache {url} is not used for the rest of this run after an earlier failure")]
    Unavailable { url: String },
    #[error("remote cache {url} is read-only: nothing is pushed")]
    ReadOnly { url: String },
    #[error("remote cache: {0}")]
    Config(String),
}

fn skipped_note(gives_up: &bool) -> &'static str {
    if *gives_up {
        " (the remote is not used again in this run)"
    } else {
        ""
    }
}

impl RemoteError {
    /// A consequence of an error already reported (not worth another warning).
    pub fn is_repeat(&self) -> bool {
        matches!(self, RemoteError::Unavailable { .. })
    }
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// The record was written, after `objects` objects (`bytes` bytes) it needed.
    Uploaded { objects: usize, bytes: u64 },
    /// The remote already had a record for the key (this writer's or another's).
    AlreadyThere,
}

pub struct Remote {
    config: RemoteConfig,
    url: String,
    bucket: Bucket,
    /// The first transport or server failure, after which the remote is not asked again.
    broken: Mutex<Option<String>>,
}

impl Remote {
    pub fn open(config: RemoteConfig) -> Result<Remote, RemoteError> {
        let bucket = Bucket::open(&config).map_err(RemoteError::Config)?;
        Ok(Remote { url: config.url(), config, bucket, broken: Mutex::new(None) })
    }

    pub fn config(&self) -> &RemoteConfig {
        &self.config
    }

    /// `s3://bucket/prefix`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn read_only(&self) -> bool {
        self.config.read_only
    }

    fn key(&self, rest: &str) -> Key {
        let prefix = &self.config.prefix;
        if prefix.is_empty() {
            Key::from(format!("{LAYOUT}/{rest}"))
        } else {
            Key::from(format!("{prefix}/{LAYOUT}/{rest}"))
        }
    }

    /// Where object `digest` lives in the bucket.
    pub fn object_key(&self, digest: &Digest) -> String {
        let hex = digest.to_hex();
        self.key(&format!("objects/{}/{}", &hex[..2], &hex[2..])).to_string()
    }

    /// Where the record of stage key `key` lives in the bucket.
    pub fn record_key(&self, key: &Digest) -> String {
        self.key(&format!("records/{}.json", key.to_hex())).to_string()
    }

    fn check_usable(&self) -> Result<(), RemoteError> {
        match &*self.broken.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(_) => Err(RemoteError::Unavailable { url: self.url.clone() }),
            None => Ok(()),
        }
    }

    /// An S3 error as a [`RemoteError`]; a failure to reach or be served by the remote also
    /// disables it for the rest of the process.
    fn s3_error(&self, source: S3Error) -> RemoteError {
        let mut gives_up = false;
        if !source.is_answer() {
            let mut broken = self.broken.lock().unwrap_or_else(|p| p.into_inner());
            gives_up = broken.is_none();
            broken.get_or_insert_with(|| source.to_string());
        }
        RemoteError::S3 { url: self.url.clone(), source: Box::new(source), gives_up }
    }

    /// The record the remote holds for `key`, if any. Fetches no objects.
    pub fn fetch_record(&self, key: &Digest) -> Result<Option<Record>, RemoteError> {
        self.check_usable()?;
        let path = Key::from(self.record_key(key));
        let got = self.bucket.block_on(self.bucket.get_bytes(&path));
        let Some(bytes) = got.map_err(|e| self.s3_error(e))? else {
            return Ok(None);
        };
        let bad = |reason: String| RemoteError::BadRecord {
            url: self.url.clone(),
            key: path.to_string(),
            reason,
        };
        let record: Record = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if record.key != *key {
            return Err(bad(format!("it is the record of key {}", record.key)));
        }
        Ok(Some(record))
    }

    /// Fetch the record of `key` and every object it needs into the local store, checking each.
    /// The record is returned, not committed to the local index: that is the caller's (it
    /// knows the stage's identity). `None`: the remote has no result for `key`.
    pub fn pull(&self, cache: &Cache, key: &Digest) -> Result<Option<Record>, RemoteError> {
        let Some(record) = self.fetch_record(key)? else {
            return Ok(None);
        };
        let scratch = cache.scratch("pull")?;
        let store = cache.store();
        let fetch = |digests: Vec<Digest>| self.fetch_objects(store, &scratch.dir, digests, key);

        // The key manifest first: it proves the record answers this key (a record stored
        // under another key's name would otherwise pass every object check).
        fetch(vec![record.manifest])?;
        let manifest = fs::read(store.path(&record.manifest))?;
        let matches = serde_json::from_slice::<KeyManifest>(&manifest)
            .map(|m| m.key() == *key)
            .unwrap_or(false);
        if !matches {
            return Err(RemoteError::BadRecord {
                url: self.url.clone(),
                key: self.record_key(key),
                reason: "its key manifest does not hash to the key".into(),
            });
        }
        // Then outputs (directory outputs' tree manifests among them), then the trees' files.
        fetch(record.log.into_iter().chain(record.outputs.values().map(|o| o.digest)).collect())?;
        let mut files = Vec::new();
        for output in record.outputs.values().filter(|o| o.kind == OutputKind::Dir) {
            files.extend(materialize::load_tree(store, output)?.entries.iter().map(|e| e.digest));
        }
        fetch(files)?;
        Ok(Some(record))
    }

    /// Bring objects into the local store (those not already there, several at a time),
    /// refusing any whose bytes do not match their name.
    fn fetch_objects(
        &self,
        store: &LocalStore,
        tmp_dir: &std::path::Path,
        digests: Vec<Digest>,
        record: &Digest,
    ) -> Result<(), RemoteError> {
        let missing: BTreeSet<Digest> =
            digests.into_iter().filter(|d| !store.contains(d)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        self.check_usable()?;
        let results: Vec<_> = self.bucket.block_on(
            futures_util::stream::iter(missing)
                .map(|digest| async move {
                    let key = Key::from(self.object_key(&digest));
                    let tmp = tmp_dir.join(digest.to_hex());
                    let got = self.bucket.get_to_file(&key, &tmp).await;
                    (digest, key, tmp, got)
                })
                .buffer_unordered(CONCURRENCY)
                .collect(),
        );
        for (digest, key, tmp, got) in results {
            match got {
                Err(GetError::S3(e)) => return Err(self.s3_error(e)),
                Err(GetError::Local(e)) => return Err(RemoteError::Local(e)),
                Ok(None) => {
                    return Err(RemoteError::Missing {
                        url: self.url.clone(),
                        key: key.to_string(),
                        record: record.to_hex(),
                    })
                }
                Ok(Some(actual)) if actual != digest => {
                    let _ = fs::remove_file(&tmp);
                    return Err(RemoteError::Corrupt {
                        url: self.url.clone(),
                        key: key.to_string(),
                        actual,
                    });
                }
                Ok(Some(_)) => store.put_file(&tmp, &digest)?,
            }
        }
        Ok(())
    }

    /// Whether the remote has a record for `key`.
    pub fn has_record(&self, key: &Digest) -> Result<bool, RemoteError> {
        self.check_usable()?;
        let exists = self.bucket.block_on(self.bucket.exists(&Key::from(self.record_key(key))));
        exists.map_err(|e| self.s3_error(e))
    }

    /// Upload a finished stage: every object its record needs, then the record. An existing
    /// remote record for the key is left alone (first writer wins).
    pub fn push(&self, cache: &Cache, record: &Record) -> Result<Pushed, RemoteError> {
        if self.read_only() {
            return Err(RemoteError::ReadOnly { url: self.url.clone() });
        }
        if self.has_record(&record.key)? {
            return Ok(Pushed::AlreadyThere);
        }
        let store = cache.store();
        let results: Vec<Result<Option<u64>, RemoteError>> = self.bucket.block_on(
            futures_util::stream::iter(objects_of(store, record)?)
                .map(|digest| self.push_object(store, digest))
                .buffer_unordered(CONCURRENCY)
                .collect(),
        );
        let (mut objects, mut bytes) = (0, 0);
        for result in results {
            if let Some(size) = result? {
                objects += 1;
                bytes += size;
            }
        }
        // Only now, with every object in place, may the record appear.
        let json = serde_json::to_vec_pretty(record).map_err(io::Error::from)?;
        self.check_usable()?;
        let key = Key::from(self.record_key(&record.key));
        let created = self.bucket.block_on(self.bucket.put_new(&key, json));
        let created = created.map_err(|e| self.s3_error(e))?;
        Ok(if created { Pushed::Uploaded { objects, bytes } } else { Pushed::AlreadyThere })
    }
}

impl Remote {
    /// Upload one object unless the remote has it; `Some(size)` when this call uploaded it.
    async fn push_object(
        &self,
        store: &LocalStore,
        digest: Digest,
    ) -> Result<Option<u64>, RemoteError> {
        self.check_usable()?;
        let path = store.path(&digest);
        let size = fs::metadata(&path)?.len();
        let key = Key::from(self.object_key(&digest));
        if size >= HEAD_FIRST_ABOVE
            && self.bucket.exists(&key).await.map_err(|e| self.s3_error(e))?
        {
            return Ok(None);
        }
        // What goes up must be what the name says: a damaged local object would otherwise
        // spread to every machine (they would refuse it, but recompute every time).
        if crate::hash::hash_file(&path)? != digest {
            return Err(RemoteError::LocalCorrupt { digest });
        }
        match self.bucket.put_file(&key, &path).await {
            Ok(true) => Ok(Some(size)),
            Ok(false) => Ok(None),
            Err(PutFileError::S3(e)) => Err(self.s3_error(e)),
            Err(PutFileError::Local(e)) => Err(RemoteError::Local(e)),
        }
    }
}

/// Every object a record needs, each once: key manifest, log, outputs and their trees' files.
fn objects_of(store: &LocalStore, record: &Record) -> io::Result<Vec<Digest>> {
    let mut out = BTreeSet::new();
    out.insert(record.manifest);
    out.extend(record.log);
    for output in record.outputs.values() {
        out.insert(output.digest);
        if output.kind == OutputKind::Dir {
            out.extend(materialize::load_tree(store, output)?.entries.iter().map(|e| e.digest));
        }
    }
    Ok(out.into_iter().collect())
}
