//! Computing a stage's key manifest from its definition, its upstream results and the current
//! content of its dependencies, and explaining how it differs from the last run's.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use crate::cache::{Cache, Index, ObjectStore, Record};
use crate::hash::{self, Digest, DigestMemo, Hashed};
use crate::key::{self, DepDigest, KeyManifest, Reason, KEY_SCHEMA};
use crate::materialize;
use crate::spec::{Action, Pipeline, Stage};
use serde_json::Value as Json;

/// A stage whose key is known.
pub struct Fingerprint {
    pub manifest: KeyManifest,
    pub key: Digest,
    /// Dependency name → absolute paths (for `${deps.x}` and `SDPIPE_DEP_X`).
    pub dep_paths: BTreeMap<String, Vec<PathBuf>>,
    /// What the result derives from, for kinds that show it (`Null` for the others).
    pub provenance: Json,
}

#[derive(Debug, thiserror::Error)]
pub enum FingerprintError {
    #[error("dependency `{name}` ({path}): {source}")]
    Dep { name: String, path: String, source: std::io::Error },
    #[error("input `{0}` has no result from its upstream stage")]
    MissingInput(String),
    #[error("{0}")]
    Kind(String),
}

/// Hash everything `stage` depends on. `upstream` holds the records of its finished upstream
/// stages (all ancestors, for provenance).
pub fn fingerprint(
    pipeline: &Pipeline,
    stage: &Stage,
    upstream: &HashMap<String, Record>,
    memo: &dyn DigestMemo,
) -> Result<Fingerprint, FingerprintError> {
    let mut inputs = BTreeMap::new();
    for (name, binding) in &stage.inputs {
        let digest = upstream
            .get(&binding.stage)
            .and_then(|r| r.outputs.get(&binding.output))
            .map(|o| o.digest)
            .ok_or_else(|| FingerprintError::MissingInput(name.clone()))?;
        inputs.insert(name.clone(), digest);
    }

    let mut deps = BTreeMap::new();
    let mut dep_paths = BTreeMap::new();
    for (name, dep) in &stage.deps {
        let hashed =
            hash::hash_path(&pipeline.dir, &dep.pattern, dep.is_glob, memo).map_err(|source| {
                FingerprintError::Dep { name: name.clone(), path: dep.pattern.clone(), source }
            })?;
        let paths = match (&hashed, dep.is_glob) {
            (Hashed::Tree { files, .. }, true) => {
                files.iter().map(|rel| pipeline.dir.join(rel)).collect()
            }
            _ => vec![pipeline.dir.join(&dep.pattern)],
        };
        deps.insert(name.clone(), DepDigest { path: dep.pattern.clone(), digest: hashed.digest() });
        dep_paths.insert(name.clone(), paths);
    }

    let (command, env) = match &stage.action {
        Action::Shell { command, env } => {
            let env = env.iter().map(|v| (v.clone(), std::env::var(v).ok())).collect();
            (Some(command.clone()), env)
        }
        Action::Builtin(kind) => {
            // Content the kind resolves itself (model weights in a hub cache): its bytes are in
            // the key, its location is not.
            // Bound inputs are visible as their `stage.output` text, so a kind can tell that
            // an upstream model replaces the one it would otherwise resolve.
            let mut params = stage.params.clone();
            for (name, binding) in stage.inputs.iter().filter(|(n, _)| !n.contains('@')) {
                params.insert(name.clone(), Json::String(binding.to_string()));
            }
            let external =
                kind.external_deps(&params).map_err(|e| FingerprintError::Kind(e.to_string()))?;
            for (name, path) in external {
                let hashed = hash::hash_path(&path, ".", false, memo).map_err(|source| {
                    FingerprintError::Dep {
                        name: name.clone(),
                        path: path.display().to_string(),
                        source,
                    }
                })?;
                let label = format!("<{name}>");
                deps.insert(
                    label.clone(),
                    DepDigest { path: label.clone(), digest: hashed.digest() },
                );
                dep_paths.insert(label, vec![path]);
            }
            (None, BTreeMap::new())
        }
    };

    let provenance = match &stage.action {
        Action::Builtin(kind) if kind.wants_provenance() => {
            let provenance = provenance(pipeline, stage, upstream);
            // In the key: a report never shows another run's keys. Compute times are not: they
            // differ on every run, and an upstream result recomputed with the same key (or
            // pulled from a teammate's run) must not make the report stale.
            let label = "<provenance>".to_string();
            let bytes = serde_json::to_vec(&without_timings(&provenance)).unwrap_or_default();
            deps.insert(label.clone(), DepDigest { path: label, digest: Digest::of_bytes(&bytes) });
            provenance
        }
        _ => Json::Null,
    };

    let manifest = KeyManifest {
        schema: KEY_SCHEMA,
        kind: stage.action.kind_name().to_string(),
        kind_version: stage.action.kind_version(),
        params: stage.params.clone(),
        inputs,
        deps,
        command,
        env,
        outputs: stage.outputs.iter().map(|o| (o.name.clone(), o.path.clone())).collect(),
    };
    let key = manifest.key();
    Ok(Fingerprint { manifest, key, dep_paths, provenance })
}

/// Every ancestor of `stage` with a result, in pipeline order: what it is, its parameters, its
/// key and how long its result took to compute.
fn provenance(pipeline: &Pipeline, stage: &Stage, upstream: &HashMap<String, Record>) -> Json {
    let ancestors = pipeline.with_upstream(std::slice::from_ref(&stage.name));
    let stages: Vec<Json> = ancestors
        .iter()
        .filter(|name| **name != stage.name)
        .filter_map(|name| {
            let (s, record) = (pipeline.stages.get(name)?, upstream.get(name)?);
            Some(serde_json::json!({
                "name": name,
                "kind": s.action.kind_name(),
                "version": s.action.kind_version(),
                "params": s.params,
                "key": record.key.to_hex(),
                "seconds": record.duration_ms as f64 / 1000.0,
                "point": s.point.as_ref().map(|p| p.label.clone()).unwrap_or_default(),
            }))
        })
        .collect();
    serde_json::json!({ "stages": stages })
}

/// `provenance` without its stages' compute times.
fn without_timings(provenance: &Json) -> Json {
    let mut p = provenance.clone();
    for stage in p["stages"].as_array_mut().into_iter().flatten() {
        if let Some(fields) = stage.as_object_mut() {
            fields.remove("seconds");
        }
    }
    p
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
