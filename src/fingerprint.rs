//! Computing a stage's key manifest from its definition, its upstream results and the current
//! content of its dependencies, and explaining how it differs from the last run's.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use crate::cache::Record;
use crate::hash::{self, Digest, DigestMemo, Hashed};
use crate::key::{DepDigest, KeyManifest, KEY_SCHEMA};
use crate::spec::{Action, Pipeline, Stage};
use sdpipe_stages::api::{Fetch, Provenance, ProvenanceStage, StageError};
use serde_json::Value as Json;

/// A stage whose key is known.
pub struct Fingerprint {
    pub manifest: KeyManifest,
    pub key: Digest,
    /// Dependency name → absolute paths (for `${deps.x}` and `SDPIPE_DEP_X`).
    pub dep_paths: BTreeMap<String, Vec<PathBuf>>,
    /// What the result derives from, for kinds that show it (`None` for the others).
    pub provenance: Option<Provenance>,
}

#[derive(Debug, thiserror::Error)]
pub enum FingerprintError {
    #[error("dependency `{name}` ({path}): {source}")]
    Dep { name: String, path: String, source: std::io::Error },
    #[error("input `{0}` has no result from its upstream stage")]
    MissingInput(String),
    #[error("{0}")]
    Kind(String),
    /// Under [`Fetch::LocalOnly`]: the kind's external content is not local yet, and a run
    /// would fetch it, so the key cannot be known before the run.
    #[error("{0}")]
    NotLocal(String),
}

/// Hash everything `stage` depends on. `upstream` holds the records of its finished upstream
/// stages (all ancestors, for provenance). `fetch` says whether a kind may download what it
/// resolves outside the project (a run may; `status` only looks).
pub fn fingerprint(
    pipeline: &Pipeline,
    stage: &Stage,
    upstream: &HashMap<String, Record>,
    memo: &dyn DigestMemo,
    fetch: Fetch,
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
            let external = kind.external_deps(&params, fetch).map_err(|e| match e {
                StageError::NotLocal(message) => FingerprintError::NotLocal(message),
                e => FingerprintError::Kind(e.to_string()),
            })?;
            for (name, path) in external {
                let hashed =
                    hash::hash_external(&path, memo).map_err(|source| FingerprintError::Dep {
                        name: name.clone(),
                        path: path.display().to_string(),
                        source,
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
            Some(provenance)
        }
        _ => None,
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
fn provenance(
    pipeline: &Pipeline,
    stage: &Stage,
    upstream: &HashMap<String, Record>,
) -> Provenance {
    let ancestors = pipeline.with_upstream(std::slice::from_ref(&stage.name));
    let stages = ancestors
        .iter()
        .filter(|name| **name != stage.name)
        .filter_map(|name| {
            let (s, record) = (pipeline.stages.get(name)?, upstream.get(name)?);
            Some(ProvenanceStage {
                name: name.clone(),
                kind: s.action.kind_name().to_string(),
                version: s.action.kind_version(),
                params: s.params.clone(),
                key: record.key.to_hex(),
                seconds: record.duration_ms as f64 / 1000.0,
                point: s.point.as_ref().map(|p| p.label.clone()).unwrap_or_default(),
            })
        })
        .collect();
    Provenance { stages }
}

/// `provenance` without its stages' compute times, as the JSON the key hashes.
fn without_timings(provenance: &Provenance) -> Json {
    let mut p = serde_json::to_value(provenance).unwrap_or_default();
    for stage in p["stages"].as_array_mut().into_iter().flatten() {
        if let Some(fields) = stage.as_object_mut() {
            fields.remove("seconds");
        }
    }
    p
}

#[cfg(test)]
mod tests {
    //! A kind whose `external_deps` names content outside the project, in the three shapes real
    //! kinds report: a weight file, a model folder, and a Hugging Face cache snapshot whose
    //! files are relative links into `blobs/`.
    use super::*;
    use sdpipe_stages::api::{
        OutputKind, OutputSpec, ParamSpec, ParamType, Params, Registry, StageContext, StageError,
        StageKind,
    };
    use std::path::Path;
    use std::sync::Arc;

    /// Depends on whatever its `model` parameter names.
    struct ExternalKind;
    impl StageKind for ExternalKind {
        fn name(&self) -> &'static str {
            "external"
        }
        fn version(&self) -> u32 {
            1
        }
        fn doc(&self) -> &'static str {
            "test kind"
        }
        fn params(&self) -> Vec<ParamSpec> {
            vec![ParamSpec::required("model", ParamType::String, "a path outside the project")]
        }
        fn outputs(&self) -> Vec<OutputSpec> {
            vec![OutputSpec { name: "out", path: "out", kind: OutputKind::File, doc: "" }]
        }
        fn external_deps(
            &self,
            params: &Params,
            fetch: Fetch,
        ) -> Result<BTreeMap<String, PathBuf>, StageError> {
            let model = params["model"].as_str().unwrap_or_default();
            if matches!(fetch, Fetch::LocalOnly) && !Path::new(model).exists() {
                return Err(StageError::NotLocal(format!("{model} would be downloaded")));
            }
            Ok(BTreeMap::from([("model".to_string(), PathBuf::from(model))]))
        }
        fn run(&self, _ctx: &mut StageContext<'_>) -> Result<(), StageError> {
            Ok(())
        }
    }

    fn key_for(model: &Path) -> Result<Fingerprint, FingerprintError> {
        key_with(model, Fetch::allowed())
    }

    fn key_with(model: &Path, fetch: Fetch) -> Result<Fingerprint, FingerprintError> {
        let project = tempfile::tempdir().unwrap();
        let mut registry = Registry::new();
        registry.register(Arc::new(ExternalKind));
        let text = format!(
            "stages:\n  s:\n    uses: external\n    with: {{model: {:?}}}\n",
            model.display().to_string()
        );
        let file = project.path().join("p.yaml");
        let pipeline = Pipeline::from_source(&file, "p.yaml".into(), text, &registry, &[])
            .unwrap_or_else(|e| panic!("{e:?}"));
        fingerprint(&pipeline, &pipeline.stages["s"], &HashMap::new(), &hash::NoMemo, fetch)
    }

    /// The digest the key holds for the external dependency (the key itself also holds the
    /// `model` parameter, here the path).
    fn dep_digest(model: &Path) -> Digest {
        key_for(model).unwrap().manifest.deps["<model>"].digest
    }

    /// `models--org--name` as huggingface_hub writes it, with `files` in one snapshot.
    fn hub_cache(root: &Path, commit: &str, files: &[(&str, &[u8])]) -> PathBuf {
        let repo = root.join("models--org--name");
        let snapshot = repo.join("snapshots").join(commit);
        fs::create_dir_all(repo.join("blobs")).unwrap();
        fs::create_dir_all(repo.join("refs")).unwrap();
        fs::write(repo.join("refs/main"), commit).unwrap();
        for (name, bytes) in files {
            let blob = Digest::of_bytes(bytes).to_hex();
            fs::write(repo.join("blobs").join(&blob), bytes).unwrap();
            let link = snapshot.join(name);
            fs::create_dir_all(link.parent().unwrap()).unwrap();
            let depth = name.matches('/').count() + 2;
            let target = format!("{}blobs/{blob}", "../".repeat(depth));
            std::os::unix::fs::symlink(target, &link).unwrap();
        }
        snapshot
    }

    use std::fs;

    #[test]
    fn content_a_kind_would_fetch_is_not_local_when_only_looking() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("not-downloaded");
        let err = key_with(&missing, Fetch::LocalOnly).err().expect("no key without the content");
        assert!(matches!(err, FingerprintError::NotLocal(_)), "{err}");
    }

    #[test]
    fn an_external_file_is_keyed_on_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.safetensors"), dir.path().join("b.safetensors"));
        fs::write(&a, b"weights").unwrap();
        fs::write(&b, b"weights").unwrap();
        assert_eq!(dep_digest(&a), Digest::of_bytes(b"weights"));
        assert_eq!(dep_digest(&a), dep_digest(&b), "the location is not in the digest");
        let before = key_for(&a).unwrap().key;
        fs::write(&a, b"other weights").unwrap();
        assert_ne!(before, key_for(&a).unwrap().key);
    }

    #[test]
    fn an_external_folder_is_keyed_on_its_tree() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("m/unet")).unwrap();
        fs::write(dir.path().join("m/unet/config.json"), b"{}").unwrap();
        let before = key_for(&dir.path().join("m")).unwrap();
        assert!(matches!(before.dep_paths["<model>"].as_slice(), [p] if p.ends_with("m")));
        fs::write(dir.path().join("m/unet/config.json"), b"{\"x\": 1}").unwrap();
        assert_ne!(before.key, key_for(&dir.path().join("m")).unwrap().key);
    }

    #[test]
    fn a_hub_snapshot_file_is_keyed_on_the_blob_it_links_to() {
        let cache = tempfile::tempdir().unwrap();
        let snapshot = hub_cache(cache.path(), "c0ffee", &[("unet/config.json", b"{\"a\": 1}")]);
        let link = snapshot.join("unet/config.json");
        assert!(fs::symlink_metadata(&link).unwrap().is_symlink());
        assert_eq!(dep_digest(&link), Digest::of_bytes(b"{\"a\": 1}"));

        // Another revision sharing the blob, in another cache: the same digest.
        let other = tempfile::tempdir().unwrap();
        let moved = hub_cache(other.path(), "beef", &[("unet/config.json", b"{\"a\": 1}")]);
        assert_eq!(dep_digest(&link), dep_digest(&moved.join("unet/config.json")));
    }

    #[test]
    fn a_hub_snapshot_folder_is_hashed_through_its_links() {
        let cache = tempfile::tempdir().unwrap();
        let files: &[(&str, &[u8])] = &[("model_index.json", b"{}"), ("vae/config.json", b"[]")];
        let snapshot = hub_cache(cache.path(), "c0ffee", files);
        let plain = tempfile::tempdir().unwrap();
        for (name, bytes) in files {
            let path = plain.path().join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, bytes).unwrap();
        }
        assert_eq!(dep_digest(&snapshot), dep_digest(plain.path()));
    }

    #[test]
    fn a_dangling_link_names_the_dependency_and_the_link() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("config.json");
        std::os::unix::fs::symlink("../blobs/gone", &link).unwrap();
        let err = key_for(&link).err().expect("a dangling link cannot be hashed");
        let message = err.to_string();
        assert!(message.starts_with("dependency `model`"), "{message}");
        assert!(message.contains("config.json"), "{message}");
    }
}
