//! The other commands: dag, show, stages, gc, cache stats/verify, and built-in kinds in a run.

use crate::common;
use common::*;

#[test]
fn dag_prints_mermaid_with_labelled_edges() {
    let p = chain_project();
    let out = p.sdpipe(&["dag", "pipeline.yaml", "--format", "mermaid"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("flowchart LR\n"), "{text}");
    assert!(text.contains("s_source -->|\"text → text\"| s_upper"), "{text}");
}

#[test]
fn dag_prints_dot() {
    let p = chain_project();
    let out = p.sdpipe(&["dag", "pipeline.yaml", "--format", "dot"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("digraph pipeline {"), "{text}");
    assert!(text.contains("\"upper\" -> \"count\""), "{text}");
}

#[test]
fn show_reports_key_outputs_and_log() {
    let p = chain_project();
    let run = p.run_ok("pipeline.yaml", &[]);
    let (v, code) = p.json(&["show", "pipeline.yaml", "upper", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(v["state"], "cached");
    assert_eq!(v["key"], stage_of(&run, "upper")["key"]);
    let out = &v["record"]["outputs"]["text"];
    assert_eq!(
        std::fs::read_to_string(out["path"].as_str().unwrap()).unwrap(),
        "HELLO PIPELINE\n!\n"
    );
    assert!(std::path::Path::new(out["object"].as_str().unwrap()).is_file());
    assert!(std::path::Path::new(v["record"]["log"].as_str().unwrap()).is_file());
}

#[test]
fn stages_documents_builtin_kinds_and_their_params() {
    let p = Project::new();
    let (v, code) = p.json(&["stages", "--json"]);
    assert_eq!(code, 0);
    let synthetic =
        v.as_array().unwrap().iter().find(|k| k["name"] == "synthetic").expect("synthetic kind");
    let params: Vec<&str> = synthetic["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(params.contains(&"count") && params.contains(&"seed"), "{params:?}");
    assert!(synthetic["params"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| !p["doc"].as_str().unwrap().is_empty()));
}

#[test]
fn builtin_kind_output_feeds_a_shell_stage() {
    let p = Project::new();
    p.write(
        "p.yaml",
        r#"
stages:
  data:
    uses: synthetic
    with: {count: 3, resolution: 32}
  captions:
    run: wc -l < ${inputs.photos} > n.txt; ls ${inputs.images} | wc -l >> n.txt
    inputs: {photos: data.photos, images: data.images}
    outs: [n.txt]
"#,
    );
    let s = p.run_ok("p.yaml", &[]);
    assert_eq!(in_state(&s, "ran"), vec!["data", "captions"]);
    assert_eq!(
        p.read("runs/p/captions/n.txt").split_whitespace().collect::<Vec<_>>(),
        vec!["3", "3"]
    );
    // A larger count changes the key of `data` and, through its outputs, of `captions`.
    let s = p.run_ok("p.yaml", &["--set", "data.count=4"]);
    assert_eq!(reasons(&s, "data"), vec!["param count changed 3 → 4"]);
    assert_eq!(state_of(&s, "captions"), "ran");
}

#[test]
fn gc_keeps_the_latest_result_and_drops_the_rest() {
    let p = chain_project();
    p.run_ok("pipeline.yaml", &[]);
    p.run_ok("pipeline.yaml", &["--set", "upper.suffix=2"]);
    let (dry, _) = p.json(&["gc", "--dry-run", "--json"]);
    assert_eq!(dry["records_removed"], 2, "the old upper and count results: {dry:#}");
    let (v, code) = p.json(&["gc", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(v["records_removed"], 2);
    assert!(v["objects_removed"].as_u64().unwrap() > 0);
    // The latest configuration is still fully cached.
    let s = p.run_ok("pipeline.yaml", &["--set", "upper.suffix=2"]);
    assert_eq!(in_state(&s, "cached").len(), 4, "{s:#}");
}

#[test]
fn gc_keep_last_keeps_older_results() {
    let p = chain_project();
    p.run_ok("pipeline.yaml", &[]);
    p.run_ok("pipeline.yaml", &["--set", "upper.suffix=2"]);
    let (v, _) = p.json(&["gc", "--keep-last", "2", "--json"]);
    assert_eq!(v["records_removed"], 0);
    let s = p.run_ok("pipeline.yaml", &[]);
    assert_eq!(in_state(&s, "cached").len(), 4);
}

#[test]
fn gc_drops_results_of_deleted_pipelines() {
    let p = chain_project();
    p.run_ok("pipeline.yaml", &[]);
    std::fs::remove_file(p.path().join("pipeline.yaml")).unwrap();
    let (v, _) = p.json(&["gc", "--json"]);
    assert_eq!(v["records_kept"], 0);
    assert_eq!(v["records_removed"], 4);
}

#[test]
fn verify_evicts_a_corrupt_object_and_the_next_run_recomputes() {
    let p = chain_project();
    p.run_ok("pipeline.yaml", &[]);
    let (show, _) = p.json(&["show", "pipeline.yaml", "upper", "--json"]);
    let object = show["record"]["outputs"]["text"]["object"].as_str().unwrap().to_string();
    // Flip a byte in the stored object (it is read-only, as it should be).
    let mut perms = std::fs::metadata(&object).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&object, perms).unwrap();
    let mut bytes = std::fs::read(&object).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&object, bytes).unwrap();

    let (v, code) = p.json(&["cache", "verify", "--json"]);
    assert_eq!(code, 1, "corruption is reported with a non-zero exit");
    assert_eq!(v["corrupt_objects"].as_array().unwrap().len(), 1);
    assert!(v["records_evicted"][0].as_str().unwrap().starts_with("upper"), "{v:#}");
    let s = p.run_ok("pipeline.yaml", &[]);
    assert_eq!(state_of(&s, "upper"), "ran");
    assert_eq!(reasons(&s, "upper"), vec!["previous result is no longer in the cache"]);
    assert_eq!(p.read("runs/pipeline/upper/up.txt"), "HELLO PIPELINE\n!\n");
    let (v, code) = p.json(&["cache", "verify", "--json"]);
    assert_eq!((code, v["corrupt_objects"].as_array().unwrap().len()), (0, 0));
}

#[test]
fn a_missing_object_is_recomputed_not_served() {
    let p = chain_project();
    p.run_ok("pipeline.yaml", &[]);
    let (show, _) = p.json(&["show", "pipeline.yaml", "source", "--json"]);
    std::fs::remove_file(show["record"]["outputs"]["text"]["object"].as_str().unwrap()).unwrap();
    let s = p.run_ok("pipeline.yaml", &[]);
    assert_eq!(state_of(&s, "source"), "ran");
    assert_eq!(state_of(&s, "upper"), "cached", "same bytes again: downstream stays cached");
}

#[test]
fn cache_stats_counts_records_and_objects() {
    let p = chain_project();
    p.run_ok("pipeline.yaml", &[]);
    let (v, code) = p.json(&["cache", "stats", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(v["records"], 4);
    assert_eq!(v["stages_tracked"], 4);
    assert!(v["objects"].as_u64().unwrap() >= 8, "outputs, manifests and logs: {v:#}");
}

#[test]
fn cache_dir_can_be_set_by_environment() {
    let p = chain_project();
    let elsewhere = tempfile::tempdir().unwrap();
    let out = p
        .cmd()
        .args(["run", "pipeline.yaml"])
        .env("SDPIPE_CACHE", elsewhere.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(elsewhere.path().join("index").exists());
    assert!(!p.path().join("cache").exists());
}

#[test]
fn convert_weights_writes_the_safetensors_file_the_lpips_stage_reads() {
    let p = Project::new();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/metrics/pth/lpips_v0.1_alex.pth");
    let out = p.path().join("w/lpips.safetensors");
    let run = p.sdpipe(&[
        "convert-weights",
        "lpips-alex",
        fixture.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    assert!(std::fs::metadata(&out).unwrap().len() > 1000);
    let bad = p.sdpipe(&["convert-weights", "inception", fixture.to_str().unwrap()]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("fid-inception"), "{}", stderr(&bad));
}

#[test]
fn a_quiet_run_prints_nothing_when_it_succeeds() {
    let p = chain_project();
    let out = p.sdpipe(&["run", "pipeline.yaml", "-q"]);
    assert!(out.status.success());
    assert_eq!(stdout(&out), "");
    assert_eq!(stderr(&out), "");
}

#[test]
fn a_quiet_run_still_reports_its_failure() {
    let p = Project::new();
    p.write("p.yaml", "stages:\n  broken:\n    run: exit 3\n    outs: {o: o.txt}\n");
    let out = p.sdpipe(&["run", "p.yaml", "--quiet"]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.starts_with("\nstage `broken` failed:"), "{text}");
}

#[test]
fn completions_are_printed_for_each_shell() {
    let p = Project::new();
    for shell in ["bash", "zsh", "fish"] {
        let out = p.sdpipe(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        // Every subcommand is completed, the newest included.
        let text = stdout(&out);
        assert!(text.contains("exp") && text.contains("convert-weights"), "{shell}: {text}");
    }
    assert_eq!(p.sdpipe(&["completions", "tcsh"]).status.code(), Some(2));
}
