//! Cache upkeep: `gc` (drop what no pipeline's recent runs reference), `cache verify` (rehash
//! every object, evict the corrupt and every record that needed them) and `cache stats`.
//!
//! Both gc and verify hold the cache's maintenance lock exclusively, while every run holds it
//! shared: objects a run has stored but not yet recorded are never mistaken for garbage.

use std::collections::{BTreeSet, HashSet};
use std::io;
use std::path::Path;

use rayon::prelude::*;
use sdpipe_stages::api::OutputKind;
use serde::Serialize;

use crate::cache::{store, Cache, ObjectStore, Record};
use crate::hash::Digest;
use crate::materialize::load_tree;

/// Objects a record needs.
fn referenced(cache: &Cache, record: &Record) -> Vec<Digest> {
    let mut out = vec![record.manifest];
    out.extend(record.log);
    for o in record.outputs.values() {
        out.push(o.digest);
        if o.kind == OutputKind::Dir {
            if let Ok(tree) = load_tree(cache.store(), o) {
                out.extend(tree.entries.iter().map(|e| e.digest));
            }
        }
    }
    out
}

#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub records_kept: usize,
    pub records_removed: usize,
    pub objects_removed: usize,
    pub bytes_freed: u64,
    /// Files of `cache/memo/` dropped: hints that only spare work, rebuilt by the next run.
    pub hints_removed: usize,
    pub dry_run: bool,
}

/// Keep, for every stage of every pipeline file that still exists, its `keep_last` most recent
/// results; drop every other record and every object no kept record references.
pub fn gc(cache: &Cache, keep_last: usize, dry_run: bool) -> io::Result<GcReport> {
    let mut report = GcReport { dry_run, ..Default::default() };
    let keep: HashSet<Digest> = cache.with_index(|index| {
        let mut keep = HashSet::new();
        for (identity, mut history) in index.histories()? {
            let alive = Path::new(&history.pipeline_file).exists();
            let n = if alive { keep_last } else { 0 };
            let cut = history.entries.len().saturating_sub(n);
            keep.extend(history.entries[cut..].iter().map(|e| e.key));
            if !dry_run && cut > 0 {
                history.entries.drain(..cut);
                index.set_history(&identity, &history)?;
            }
        }
        Ok(keep)
    })?;
    let records = cache.with_index(|index| index.records())?;
    let mut live: HashSet<Digest> = HashSet::new();
    for record in &records {
        if keep.contains(&record.key) {
            report.records_kept += 1;
            live.extend(referenced(cache, record));
        } else {
            report.records_removed += 1;
            if !dry_run {
                cache.with_index(|index| index.remove_record(&record.key))?;
            }
        }
    }
    // Partial objects of killed runs (never renamed into place) are garbage too.
    let (temps, temp_bytes) = cache.store().remove_stray_temps(dry_run)?;
    report.objects_removed += temps;
    report.bytes_freed += temp_bytes;
    // Memo hints name records and listings that may be gone now; they are only shortcuts (a
    // stale one is detected and ignored), so dropping them all is always safe, and gc holds the
    // maintenance lock exclusively, so no run is reading them.
    let (hints, hint_bytes) = clear_dir(&cache.root().join("memo"), dry_run)?;
    report.hints_removed = hints;
    report.bytes_freed += hint_bytes;
    for (digest, size) in cache.store().list()? {
        if !live.contains(&digest) {
            report.objects_removed += 1;
            report.bytes_freed += size;
            if !dry_run {
                cache.store().remove(&digest)?;
            }
        }
    }
    Ok(report)
}

#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub objects_checked: usize,
    pub corrupt_objects: Vec<String>,
    pub records_evicted: Vec<String>,
    /// The index was damaged and moved here (a fresh one replaces it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub damaged_index_moved_to: Option<String>,
}

/// Rehash every object; remove the ones whose bytes no longer match their name, then evict
/// every record that needs a missing object, so the next run recomputes instead of serving bad
/// bytes.
pub fn verify(cache: &Cache) -> io::Result<VerifyReport> {
    let objects = cache.store().list()?;
    let store = cache.store();
    let corrupt: Vec<Digest> = objects
        .par_iter()
        .filter(|(d, _)| !store::verify_object(store, d).unwrap_or(false))
        .map(|(d, _)| *d)
        .collect();
    for d in &corrupt {
        store.remove(d)?;
    }
    let records = cache.with_index(|index| index.records())?;
    let mut evicted = BTreeSet::new();
    for record in &records {
        let missing = referenced(cache, record).iter().any(|d| !store.contains(d))
            || record
                .outputs
                .values()
                .any(|o| o.kind == OutputKind::Dir && load_tree(store, o).is_err());
        if missing {
            cache.with_index(|index| index.remove_record(&record.key))?;
            evicted.insert(format!("{} ({})", record.stage, record.key.short()));
        }
    }
    Ok(VerifyReport {
        objects_checked: objects.len(),
        corrupt_objects: corrupt.iter().map(Digest::to_hex).collect(),
        records_evicted: evicted.into_iter().collect(),
        damaged_index_moved_to: cache.damaged_index().map(|p| p.display().to_string()),
    })
}

#[derive(Debug, Serialize)]
pub struct Stats {
    pub objects: usize,
    pub object_bytes: u64,
    pub records: usize,
    pub stages_tracked: usize,
    pub index_bytes: u64,
}

pub fn stats(cache: &Cache) -> io::Result<Stats> {
    let objects = cache.store().list()?;
    let (records, stages_tracked, index_bytes) = cache.with_index(|index| {
        Ok((index.records()?.len(), index.histories()?.len(), index.size_on_disk()?))
    })?;
    Ok(Stats {
        objects: objects.len(),
        object_bytes: objects.iter().map(|(_, s)| s).sum(),
        records,
        stages_tracked,
        index_bytes,
    })
}

/// Remove every plain file directly in `dir` (none when it does not exist): (count, bytes).
fn clear_dir(dir: &Path, dry_run: bool) -> io::Result<(usize, u64)> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(e),
    };
    let (mut count, mut bytes) = (0, 0);
    for entry in entries {
        let entry = entry?;
        let meta = entry.metadata()?;
        if !meta.is_file() {
            continue;
        }
        count += 1;
        bytes += meta.len();
        if !dry_run {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok((count, bytes))
}
