//! One freshness decision for `run` and `status`: does this cache already hold a usable result
//! for a stage's key, and if not, why must the stage run?
//!
//! In order: the stage's result hint (current only while the index is unchanged, so a no-op
//! rerun never opens the index), then the index's record for the key, usable only when every
//! object it names is present, then an explanation diffed against the stage's previous run.
//! A run ([`Mode::Run`]) notes a reused result in the stage's history and refreshes its hint;
//! `status` ([`Mode::Look`]) writes nothing and creates no index. Whether a remote cache has
//! the result is asked by the caller afterwards (a run pulls it, `status` only looks).

use std::io;

use crate::cache::{Cache, Index, ObjectStore, Record};
use crate::fingerprint::Fingerprint;
use crate::hash::Digest;
use crate::key::{self, KeyManifest, Reason};
use crate::materialize;

/// Whether a stage's result is here.
#[derive(Debug)]
pub enum Freshness {
    /// In this cache, complete.
    Fresh(Record),
    /// Not here (or forced): the stage runs unless a remote has it, and why.
    Dirty(Vec<Reason>),
}

/// Who asks: a run, which records what it reuses, or `status`, which only looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Run,
    Look,
}

/// The freshness of the stage `identity` (of the pipeline file `pipeline_file`) at `fp`'s key.
pub fn decide(
    cache: &Cache,
    identity: &str,
    pipeline_file: &str,
    fp: &Fingerprint,
    mode: Mode,
) -> io::Result<Freshness> {
    // An unchanged stage of an unchanged index is found without opening the index.
    if let Some(record) = hinted_record(cache, identity, &fp.key) {
        return Ok(Freshness::Fresh(record));
    }
    let lookup = |index: &dyn Index| -> io::Result<Freshness> {
        let Some(record) = usable_record(cache, index, &fp.key)? else {
            return Ok(Freshness::Dirty(explain(cache, index, identity, &fp.manifest)?));
        };
        if mode == Mode::Run {
            // Note the reuse in the stage's history in the session that found it: a second
            // session would cost a no-op run another sled open.
            match index.commit(&record, identity, pipeline_file) {
                Ok(()) => cache.note_result(index, identity, &record),
                Err(e) => tracing::warn!("could not update the history of {identity}: {e}"),
            }
        }
        Ok(Freshness::Fresh(record))
    };
    match mode {
        Mode::Run => cache.with_index(lookup),
        // No index yet: nothing was ever recorded.
        Mode::Look => Ok(cache
            .with_index_if_present(lookup)?
            .unwrap_or(Freshness::Dirty(vec![Reason::NewStage]))),
    }
}

/// A record for `key` whose objects are all present.
pub fn usable_record(
    cache: &Cache,
    index: &dyn Index,
    key: &Digest,
) -> std::io::Result<Option<Record>> {
    let Some(record) = index.record(key)? else {
        return Ok(None);
    };
    let complete = record.outputs.values().all(|o| materialize::is_complete(cache.store(), o));
    Ok(complete.then_some(record))
}

/// `identity`'s result for `key` from its result hint, without opening the index, when the
/// hint is current and every object it needs is present (see [`Cache::result_hint`]).
pub fn hinted_record(cache: &Cache, identity: &str, key: &Digest) -> Option<Record> {
    let record = cache.result_hint(identity, key)?;
    let complete = record.outputs.values().all(|o| materialize::is_complete(cache.store(), o));
    complete.then_some(record)
}

/// Why `manifest` has no usable result: a diff against the stage's previous run.
pub fn explain(
    cache: &Cache,
    index: &dyn Index,
    identity: &str,
    manifest: &KeyManifest,
) -> std::io::Result<Vec<Reason>> {
    let history = index.history(identity)?;
    let Some(last) = history.entries.last() else {
        return Ok(vec![Reason::NewStage]);
    };
    let previous = index
        .record(&last.key)?
        .and_then(|r| std::fs::read(cache.store().path(&r.manifest)).ok())
        .and_then(|bytes| serde_json::from_slice::<KeyManifest>(&bytes).ok());
    Ok(match previous {
        Some(previous) => key::diff(&previous, manifest),
        // The last run's record was collected or evicted: nothing left to compare with.
        None if last.key == manifest.key() => vec![Reason::ResultMissing],
        None => vec![Reason::Other {
            detail: "previous run's record is gone; inputs not comparable".into(),
        }],
    })
}
