//! `sdpipe push` and `sdpipe pull`: explicit sync of a pipeline's stages with the remote.
//!
//! Both walk the stages in dependency order, computing each key from its upstream results
//! exactly as a run would; a stage whose upstream has no result anywhere cannot be keyed, so
//! it (and what depends on it) is reported, not guessed.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::{Pushed, Remote};
use crate::cache::{Cache, Record};
use crate::dag::Dag;
use crate::fingerprint;
use crate::project::Project;
use crate::spec::Pipeline;
use sdpipe_stages::api::Fetch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Push,
    Pull,
}

/// What happened to one stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Push: objects and record uploaded.
    Pushed,
    /// Push: the remote already had a result for the key.
    AlreadyOnRemote,
    /// Push: no local result for the key (run the pipeline first).
    NotComputed,
    /// Pull: fetched and recorded in the local cache.
    Pulled,
    /// Pull: the local cache already had it.
    AlreadyLocal,
    /// Pull: the remote has no result for the key.
    NotOnRemote,
    /// An upstream stage has no result, so this stage's key is unknown.
    UpstreamMissing,
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageSync {
    pub name: String,
    pub key: Option<String>,
    pub outcome: Outcome,
    /// Objects and bytes transferred (push only counts uploads it made).
    pub objects: usize,
    pub bytes: u64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    pub schema: u32,
    pub command: &'static str,
    pub pipeline: String,
    pub remote: String,
    /// No stage failed (stages with nothing to sync are not failures).
    pub ok: bool,
    pub stages: Vec<StageSync>,
}

/// Push or pull `targets` (all stages when empty) and what they need.
pub fn sync(
    pipeline: &Pipeline,
    project: &Project,
    cache: &Cache,
    remote: &Remote,
    direction: Direction,
    targets: &[String],
) -> SyncReport {
    let selected: HashSet<String> = if targets.is_empty() {
        pipeline.stages.keys().cloned().collect()
    } else {
        pipeline.with_upstream(targets).into_iter().collect()
    };
    let order: Vec<String> =
        Dag::build(pipeline).topo_order().into_iter().filter(|s| selected.contains(s)).collect();
    let memo = cache.memo();
    let mut records: HashMap<String, Record> = HashMap::new();
    let mut stages = Vec::new();
    for name in &order {
        let stage = &pipeline.stages[name];
        let mut out = StageSync {
            name: name.clone(),
            key: None,
            outcome: Outcome::UpstreamMissing,
            objects: 0,
            bytes: 0,
            error: None,
        };
        if stage.upstream().any(|u| !records.contains_key(u)) {
            stages.push(out);
            continue;
        }
        let upstream: HashMap<String, Record> = pipeline
            .with_upstream(std::slice::from_ref(name))
            .into_iter()
            .filter(|s| s != name)
            .filter_map(|s| records.get(&s).map(|r| (s, r.clone())))
            .collect();
        // Pushing and pulling results never downloads a model to compute a key.
        let fp = match fingerprint::fingerprint(pipeline, stage, &upstream, &memo, Fetch::LocalOnly)
        {
            Ok(fp) => fp,
            Err(e) => {
                out.outcome = Outcome::Failed;
                out.error = Some(e.to_string());
                stages.push(out);
                continue;
            }
        };
        out.key = Some(fp.key.to_hex());
        let local =
            cache.with_index(|index| crate::freshness::usable_record(cache, index, &fp.key));
        let local = match local {
            Ok(local) => local,
            Err(e) => {
                out.outcome = Outcome::Failed;
                out.error = Some(format!("cache index: {e}"));
                stages.push(out);
                continue;
            }
        };
        match (direction, local) {
            (Direction::Push, None) => out.outcome = Outcome::NotComputed,
            (Direction::Push, Some(record)) => {
                match remote.push(cache, &record) {
                    Ok(Pushed::Uploaded { objects, bytes }) => {
                        out.outcome = Outcome::Pushed;
                        out.objects = objects;
                        out.bytes = bytes;
                    }
                    Ok(Pushed::AlreadyThere) => out.outcome = Outcome::AlreadyOnRemote,
                    Err(e) => {
                        out.outcome = Outcome::Failed;
                        out.error = Some(e.to_string());
                    }
                }
                records.insert(name.clone(), record);
            }
            (Direction::Pull, Some(record)) => {
                out.outcome = Outcome::AlreadyLocal;
                records.insert(name.clone(), record);
            }
            (Direction::Pull, None) => match remote.pull(cache, &fp.key) {
                Ok(None) => out.outcome = Outcome::NotOnRemote,
                Ok(Some(record)) => {
                    let identity = project.identity(name);
                    let file = pipeline.file.to_string_lossy();
                    match cache.with_index(|i| i.commit(&record, &identity, &file)) {
                        Ok(()) => {
                            out.outcome = Outcome::Pulled;
                            records.insert(name.clone(), record);
                        }
                        Err(e) => {
                            out.outcome = Outcome::Failed;
                            out.error = Some(format!("cannot record the pulled result: {e}"));
                        }
                    }
                }
                Err(e) => {
                    out.outcome = Outcome::Failed;
                    out.error = Some(e.to_string());
                }
            },
        }
        stages.push(out);
    }
    SyncReport {
        schema: crate::summary::SUMMARY_SCHEMA,
        command: match direction {
            Direction::Push => "push",
            Direction::Pull => "pull",
        },
        pipeline: project.pipeline_rel.clone(),
        remote: remote.url().to_string(),
        ok: stages.iter().all(|s| s.outcome != Outcome::Failed),
        stages,
    }
}
