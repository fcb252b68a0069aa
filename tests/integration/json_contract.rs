//! `run --json` and `status --json` are a public contract: these snapshots change only when the
//! contract does (add fields, never rename or remove them).

use crate::common;
use common::*;
use serde_json::Value;

/// Replace what varies between runs (keys, timings, temp paths) with placeholders.
fn redact(mut v: Value, project: &std::path::Path) -> Value {
    let root = project.display().to_string();
    v["duration_ms"] = "[ms]".into();
    for s in v["stages"].as_array_mut().unwrap() {
        if s["key"].is_string() {
            s["key"] = "[key]".into();
        }
        if let Some(log) = s["log"].as_str() {
            assert!(std::path::Path::new(log).is_file(), "{log}");
            s["log"] = "[log]".into();
        }
        if s["duration_ms"].is_number() {
            s["duration_ms"] = "[ms]".into();
        }
        if let Some(outs) = s["outputs"].as_object_mut() {
            for path in outs.values_mut() {
                *path = path.as_str().unwrap().replace(&root, "[project]").into();
            }
        }
    }
    v
}

#[test]
fn run_summary_shape() {
    let p = chain_project();
    p.run_ok("pipeline.yaml", &[]);
    let (s, _) = p.run_json("pipeline.yaml", &["--set", "upper.suffix=?"]);
    insta::assert_json_snapshot!("run_summary", redact(s, p.path()));
}

#[test]
fn status_summary_shape() {
    let p = chain_project();
    p.run_ok("pipeline.yaml", &[]);
    p.write("data/input.txt", "new\n");
    let (s, _) = p.status_json("pipeline.yaml", &[]);
    insta::assert_json_snapshot!("status_summary", redact(s, p.path()));
}

#[test]
fn failed_run_summary_shape() {
    let p = Project::new();
    p.write("p.yaml", "stages:\n  bad:\n    run: exit 4\n    outs: [x]\n  after:\n    run: cat ${inputs.x}\n    inputs: {x: bad.x}\n");
    let (s, code) = p.run_json("p.yaml", &[]);
    assert_eq!(code, 1);
    assert!(s["stages"][0]["log"].as_str().unwrap().ends_with(".log"));
    insta::assert_json_snapshot!("failed_run_summary", redact(s, p.path()));
}

/// Every built-in kind's parameters and outputs as `sdpipe stages --json` documents them: what
/// a pipeline may write. Kinds declare their parameters as typed structs; this is what those
/// declarations must keep saying.
#[test]
fn stages_document_every_kind() {
    let p = Project::new();
    let (v, code) = p.json(&["stages", "--json"]);
    assert_eq!(code, 0);
    insta::assert_json_snapshot!("stages", v);
}
