//! `sdpipe show`: where a stage's outputs are, its key, timings and log.

use super::*;

pub(super) fn show(l: &Loaded, stage: &str, json: bool) -> Result<i32, CliError> {
    let engine = Engine {
        pipeline: &l.pipeline,
        project: &l.project,
        cache: &l.cache,
        executor: &LocalExecutor,
        cancel: CancelToken::new(),
        remote: None,
    };
    let summary = engine.status(&[stage.to_string()]);
    let s =
        summary.stages.into_iter().find(|s| s.name == stage).expect("selected stage is reported");
    let record = match s.key.as_deref().and_then(crate::hash::Digest::from_hex) {
        Some(key) => l.cache.with_index(|i| i.record(&key)).map_err(io_err("cache index"))?,
        None => None,
    };
    let store = l.cache.store();
    let value = serde_json::json!({
        "stage": s.name,
        "kind": s.kind,
        "state": s.state,
        "key": s.key,
        "reasons": s.reasons,
        "run_dir": l.project.runs_dir.join(stage).display().to_string(),
        "record": record.as_ref().map(|r| serde_json::json!({
            "started_at": r.started_at,
            "duration_ms": r.duration_ms,
            "threads": r.threads,
            "outputs": r.outputs.iter().map(|(n, o)| (n.clone(), serde_json::json!({
                "path": l.project.runs_dir.join(stage).join(&o.path).display().to_string(),
                "object": store.path(&o.digest).display().to_string(),
                "kind": o.kind,
                "digest": o.digest,
                "size": o.size,
                "files": o.files,
            }))).collect::<serde_json::Map<_, _>>(),
            "log": r.log.map(|d| store.path(&d).display().to_string()),
            "manifest": store.path(&r.manifest).display().to_string(),
        })),
    });
    if json {
        print_json(&value);
        return Ok(exit::OK);
    }
    outln!("stage:    {} ({})", s.name, s.kind);
    outln!("state:    {}", state_word(s.state));
    outln!(
        "key:      {}",
        s.key.as_deref().unwrap_or("(not computable yet: an upstream stage will run)")
    );
    for r in &s.reasons {
        outln!("why:      {}", r.message);
    }
    match record {
        Some(r) => {
            outln!("ran:      {} for {}", r.started_at, seconds(Some(r.duration_ms)));
            for (name, o) in &r.outputs {
                outln!(
                    "output:   {name} → {}",
                    l.project.runs_dir.join(stage).join(&o.path).display()
                );
                outln!(
                    "          {:?}, {} files, {}, object {}",
                    o.kind,
                    o.files,
                    human_bytes(o.size),
                    store.path(&o.digest).display()
                );
            }
            if let Some(d) = r.log {
                outln!("log:      {}", store.path(&d).display());
            }
            outln!("manifest: {}", store.path(&r.manifest).display());
        }
        None => outln!("no cached result for the current inputs"),
    }
    Ok(exit::OK)
}
