//! The run journal: what each `sdpipe run` of a pipeline computed, kept so that runs can be
//! compared after their outputs have been overwritten (`exp show`, `metrics show|diff`,
//! `params diff`: DVC's experiment commands, without git).
//!
//! An entry holds the run's sweep points (each with the stage instances that compute it), and
//! for every stage instance its key, its resolved parameters and the numbers of its `metrics`
//! output (an output named `metrics` that is a JSON file, as the `fid`, `lpips` and
//! `scene-accuracy` kinds write; shell stages opt in by naming an output so).
//!
//! One JSON file per run under `<cache>/journal/<pipeline>/`, written whole (a temporary file,
//! then a rename) and named by the time it was written, so a listing is chronological. A run that
//! computed the same keys as the newest entry adds nothing (a no-op rerun writes no file and
//! stays as fast as it was). The journal is never part of a key; losing it loses only the
//! comparison, and an entry that cannot be read is skipped with a warning.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::spec::Pipeline;
use crate::summary::{State, Summary};

/// Bumped when an entry's shape changes incompatibly; older entries are then skipped.
pub const JOURNAL_SCHEMA: u32 = 1;

/// The output name that marks a stage's metrics file.
pub const METRICS_OUTPUT: &str = "metrics";

/// One run of a pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunEntry {
    pub schema: u32,
    /// Eight hex digits, unique among the pipeline's runs; how commands name the run.
    pub id: String,
    /// Unix seconds.
    pub started_at: u64,
    /// The pipeline file, relative to the project root.
    pub pipeline: String,
    /// Whether every stage of the run succeeded.
    pub ok: bool,
    /// The sweep's points; one unlabelled point holding every stage outside a sweep.
    pub points: Vec<PointEntry>,
    /// Stage instance name → what it was in this run.
    pub stages: BTreeMap<String, StageEntry>,
}

/// One sweep point of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointEntry {
    /// `stage.param=value,...`; empty outside a sweep.
    pub label: String,
    /// The instances computing this point.
    pub instances: Vec<String>,
}

/// One stage instance of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageEntry {
    /// The stage's name in the file (the instance name without `@point`).
    pub stage: String,
    pub kind: String,
    /// The stage key (hex), when it could be computed.
    pub key: Option<String>,
    /// `ran`, `cached`, `failed` or `skipped`.
    pub state: String,
    /// Resolved parameters, defaults included.
    pub params: BTreeMap<String, Json>,
    /// The numeric leaves of its `metrics` output, by dotted path (`kid_mean`, `per_scene.0`).
    pub metrics: BTreeMap<String, f64>,
}

impl RunEntry {
    /// What `summary` (a finished run of `pipeline`) computed, without its metrics
    /// ([`RunEntry::read_metrics`] adds them).
    pub fn of_run(pipeline: &Pipeline, pipeline_rel: &str, summary: &Summary) -> RunEntry {
        let mut stages = BTreeMap::new();
        for s in &summary.stages {
            let Some(stage) = pipeline.stages.get(&s.name) else { continue };
            let state = serde_json::to_value(s.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            stages.insert(
                s.name.clone(),
                StageEntry {
                    stage: s.name.split_once('@').map_or(s.name.as_str(), |(b, _)| b).to_string(),
                    kind: s.kind.clone(),
                    key: s.key.clone(),
                    state,
                    params: stage.params.clone(),
                    metrics: BTreeMap::new(),
                },
            );
        }
        let points = if pipeline.points.is_empty() {
            vec![PointEntry { label: String::new(), instances: stages.keys().cloned().collect() }]
        } else {
            pipeline
                .points
                .iter()
                .map(|p| PointEntry {
                    label: p.label.clone(),
                    instances: p
                        .instances
                        .iter()
                        .filter(|i| stages.contains_key(*i))
                        .cloned()
                        .collect(),
                })
                .collect()
        };
        let started_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .saturating_sub(summary.duration_ms / 1000);
        let mut id_hash = blake3::Hasher::new();
        id_hash.update(&crate::hash::now_ns().to_le_bytes());
        id_hash.update(&std::process::id().to_le_bytes());
        let id = id_hash.finalize().to_hex()[..8].to_string();
        RunEntry {
            schema: JOURNAL_SCHEMA,
            id,
            started_at,
            pipeline: pipeline_rel.to_string(),
            ok: summary.ok,
            points,
            stages,
        }
    }

    /// The metrics of every stage of `summary` that ran or came from the cache, read from its
    /// materialised `metrics` output.
    pub fn read_metrics(&mut self, summary: &Summary) {
        for s in &summary.stages {
            let (Some(entry), Some(path)) =
                (self.stages.get_mut(&s.name), s.outputs.get(METRICS_OUTPUT))
            else {
                continue;
            };
            if matches!(s.state, State::Ran | State::Cached) {
                entry.metrics = read_metrics(Path::new(path));
            }
        }
    }

    /// Instance name → key: what makes two runs the same run.
    fn keys(&self) -> BTreeMap<&str, Option<&str>> {
        self.stages.iter().map(|(n, s)| (n.as_str(), s.key.as_deref())).collect()
    }
}

/// The numeric leaves of a JSON file, by dotted path; nothing if it is not JSON.
fn read_metrics(path: &Path) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    // A metrics file is small; a huge one is not a metrics file.
    let Ok(meta) = std::fs::metadata(path) else { return out };
    if !meta.is_file() || meta.len() > 1 << 20 {
        return out;
    }
    if let Some(value) = std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
        flatten("", &value, &mut out);
    }
    out
}

fn flatten(prefix: &str, value: &Json, out: &mut BTreeMap<String, f64>) {
    let join = |k: &str| if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
    match value {
        Json::Number(n) => {
            if let Some(x) = n.as_f64() {
                out.insert(prefix.to_string(), x);
            }
        }
        Json::Object(map) => map.iter().for_each(|(k, v)| flatten(&join(k), v, out)),
        Json::Array(items) => {
            items.iter().enumerate().for_each(|(i, v)| flatten(&join(&i.to_string()), v, out))
        }
        _ => {}
    }
}

/// The journal of one pipeline.
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// The journal of the pipeline at `pipeline_rel` (relative to the project root) in the
    /// cache at `cache_dir`.
    pub fn new(cache_dir: &Path, pipeline_rel: &str) -> Journal {
        let id = blake3::hash(pipeline_rel.as_bytes()).to_hex();
        Journal { dir: cache_dir.join("journal").join(&id[..16]) }
    }

    /// Add `entry`, whole (a temporary file, then a rename), unless the newest entry computed
    /// the same keys with the same outcome; `complete` fills in first what only a written entry
    /// needs (its metrics: a no-op rerun reads none). Returns whether it was written.
    pub fn append(
        &self,
        mut entry: RunEntry,
        complete: impl FnOnce(&mut RunEntry),
    ) -> io::Result<bool> {
        let newest = self.files()?.pop().and_then(|path| read_entry(&path));
        if newest.is_some_and(|n| n.keys() == entry.keys() && n.ok == entry.ok) {
            return Ok(false);
        }
        complete(&mut entry);
        std::fs::create_dir_all(&self.dir)?;
        // Named by when it was written, to the nanosecond: runs a second apart stay in order.
        let name = format!("{:020}-{}.json", crate::hash::now_ns(), entry.id);
        let tmp = self.dir.join(format!(".{name}.tmp-{}", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec_pretty(&entry)?)?;
        std::fs::rename(&tmp, self.dir.join(name))?;
        Ok(true)
    }

    /// Every readable entry, oldest first.
    pub fn entries(&self) -> io::Result<Vec<RunEntry>> {
        Ok(self.files()?.iter().filter_map(|path| read_entry(path)).collect())
    }

    /// The entries' files, oldest first.
    fn files(&self) -> io::Result<Vec<PathBuf>> {
        let mut names: Vec<PathBuf> = match std::fs::read_dir(&self.dir) {
            Ok(dir) => dir
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.extension().is_some_and(|e| e == "json")
                        && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))
                })
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        names.sort();
        Ok(names)
    }
}

/// One entry; `None` (with a warning) when it cannot be read, or silently when another version
/// of sdpipe wrote it.
fn read_entry(path: &Path) -> Option<RunEntry> {
    match std::fs::read(path).map(|b| serde_json::from_slice::<RunEntry>(&b)) {
        Ok(Ok(e)) if e.schema == JOURNAL_SCHEMA => Some(e),
        Ok(Ok(_)) => None,
        Ok(Err(e)) => {
            tracing::warn!("skipping run journal entry {}: {e}", path.display());
            None
        }
        Err(e) => {
            tracing::warn!("skipping run journal entry {}: {e}", path.display());
            None
        }
    }
}

/// Find the run `reference` names among `entries` (oldest first): `latest`, `latest~N` (N runs
/// before it) or a prefix of a run id.
pub fn resolve<'a>(entries: &'a [RunEntry], reference: &str) -> Result<&'a RunEntry, String> {
    if entries.is_empty() {
        return Err("the pipeline has no recorded runs yet (`sdpipe run` records them)".into());
    }
    let back = match reference.strip_prefix("latest") {
        Some("") => Some(0),
        Some(rest) => rest.strip_prefix('~').and_then(|n| n.parse::<usize>().ok()),
        None => None,
    };
    if let Some(back) = back {
        return entries
            .len()
            .checked_sub(back + 1)
            .map(|i| &entries[i])
            .ok_or_else(|| format!("`{reference}`: only {} runs are recorded", entries.len()));
    }
    let matches: Vec<&RunEntry> = entries.iter().filter(|e| e.id.starts_with(reference)).collect();
    match matches.as_slice() {
        [one] if !reference.is_empty() => Ok(one),
        [] | [_] => Err(format!(
            "no recorded run is `{reference}` (use a run id from `sdpipe exp show`, `latest` or \
             `latest~N`)"
        )),
        _ => Err(format!("`{reference}` is the start of several run ids; give more of it")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, key: &str) -> RunEntry {
        RunEntry {
            schema: JOURNAL_SCHEMA,
            id: id.into(),
            started_at: 1,
            pipeline: "p.yaml".into(),
            ok: true,
            points: vec![],
            stages: BTreeMap::from([(
                "a".into(),
                StageEntry {
                    stage: "a".into(),
                    kind: "shell".into(),
                    key: Some(key.into()),
                    state: "ran".into(),
                    params: BTreeMap::new(),
                    metrics: BTreeMap::new(),
                },
            )]),
        }
    }

    #[test]
    fn metrics_are_the_numeric_leaves_by_dotted_path() {
        let mut out = BTreeMap::new();
        let value = serde_json::json!({"fid": 1.5, "metric": "fid", "kid": {"mean": 2},
            "per": [3, "x"], "ok": true});
        flatten("", &value, &mut out);
        let want = [("fid", 1.5), ("kid.mean", 2.0), ("per.0", 3.0)];
        assert_eq!(out, want.iter().map(|(k, v)| (k.to_string(), *v)).collect());
    }

    #[test]
    fn a_rerun_with_the_same_keys_adds_no_entry() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(dir.path(), "p.yaml");
        assert!(journal.append(entry("aaaa0001", "k1"), |_| {}).unwrap());
        assert!(!journal.append(entry("aaaa0002", "k1"), |_| {}).unwrap());
        let mut changed = entry("aaaa0003", "k2");
        changed.started_at = 2;
        assert!(journal.append(changed, |_| {}).unwrap());
        let ids: Vec<String> = journal.entries().unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["aaaa0001", "aaaa0003"]);
    }

    #[test]
    fn an_unreadable_entry_is_skipped_and_the_others_remain() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(dir.path(), "p.yaml");
        journal.append(entry("aaaa0001", "k1"), |_| {}).unwrap();
        std::fs::write(journal.dir.join("99999999999999999999-torn.json"), b"{\"schema\": 1, ")
            .unwrap();
        let ids: Vec<String> = journal.entries().unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["aaaa0001"]);
        // The torn newest entry is no reason to skip recording the next run.
        assert!(journal.append(entry("aaaa0002", "k1"), |_| {}).unwrap());
    }

    #[test]
    fn references_name_runs_from_the_latest_back_or_by_id_prefix() {
        let entries =
            vec![entry("1a2b3c4d", "k1"), entry("1a99ffff", "k2"), entry("77e0e0e0", "k3")];
        assert_eq!(resolve(&entries, "latest").unwrap().id, "77e0e0e0");
        assert_eq!(resolve(&entries, "latest~2").unwrap().id, "1a2b3c4d");
        assert_eq!(resolve(&entries, "1a9").unwrap().id, "1a99ffff");
        assert!(resolve(&entries, "latest~3").unwrap_err().contains("only 3 runs"));
        assert!(resolve(&entries, "1a").unwrap_err().contains("several"));
        assert!(resolve(&entries, "zz").unwrap_err().contains("no recorded run"));
        assert!(resolve(&[], "latest").unwrap_err().contains("no recorded runs"));
    }
}
