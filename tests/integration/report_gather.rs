//! A gathering stage (the report) downstream of a sweep: one stage, every point's results, and
//! the provenance of each.

use crate::common;
use common::*;

/// Shell stages stand in for train and fid, writing files in those kinds' formats.
const PIPELINE: &str = r#"
sweep:
  grid:
    train.lr: [1, 3]
stages:
  train:
    run: |
      sleep ${SLOW:-0}
      printf '{"step":1,"loss":0.%s,"lr":0.1,"grad_norm":1}\n' ${params.lr} > log.jsonl
    params: {lr: 1}
    outs: {log: log.jsonl}
  fid:
    run: |
      loss=$(sed 's/.*"loss":\([0-9.]*\).*/\1/' ${inputs.log})
      printf '{"metric":"fid","fid":%s,"n_real":4,"n_fake":4,"weights":"random(seed=0)"}' $loss > metrics.json
    inputs: {log: train.log}
    outs: {metrics: metrics.json}
  report:
    uses: report
    gather: true
    with: {fid: fid.metrics, train_log: train.log, title: gathered}
"#;

#[test]
fn a_gathering_stage_runs_once_with_every_points_results() {
    let p = Project::new();
    p.write("sweep.yaml", PIPELINE);
    let s = p.run_ok("sweep.yaml", &[]);
    let names: Vec<String> = states(&s).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.iter().filter(|n| n.starts_with("report")).count(), 1, "{s:#}");
    let report = p.read("runs/sweep/report/report/README.md");
    assert!(report.contains("lr=1") && report.contains("lr=3"), "{report}");
    assert!(report.contains("0.3"), "the second point's FID is in the table:\n{report}");
    let headline = stage_of(&s, "report")["headline"].as_str().unwrap().to_string();
    assert!(headline.ends_with("runs/sweep/report/report/README.md"), "{headline}");
}

#[test]
fn the_report_shows_the_keys_of_the_stages_it_derives_from() {
    let p = Project::new();
    p.write("sweep.yaml", PIPELINE);
    let s = p.run_ok("sweep.yaml", &[]);
    let report = p.read("runs/sweep/report/report/README.md");
    for stage in ["train@lr=1", "fid@lr=3"] {
        let key = stage_of(&s, stage)["key"].as_str().unwrap();
        assert!(report.contains(&key[..12]), "{stage}'s key {key} is not in:\n{report}");
    }
}

#[test]
fn adding_a_point_reruns_the_gathering_stage_with_it() {
    let p = Project::new();
    p.write("sweep.yaml", PIPELINE);
    p.run_ok("sweep.yaml", &[]);
    let s = p.run_ok("sweep.yaml", &["--set", "train.lr=1,3,5"]);
    assert_eq!(in_state(&s, "ran"), ["train@lr=5", "fid@lr=5", "report"], "{s:#}");
    assert!(p.read("runs/sweep/report/report/README.md").contains("lr=5"));
}

#[test]
fn an_upstream_stage_recomputed_with_the_same_result_leaves_the_report_cached() {
    let p = Project::new();
    p.write("sweep.yaml", PIPELINE);
    p.run_ok("sweep.yaml", &[]);
    // The same result, computed again and more slowly: the report shows compute times, but a
    // different one is no reason to redo it.
    let (s, code) = json_of(p.cmd().env("SLOW", "0.3").args([
        "run",
        "sweep.yaml",
        "--json",
        "--force",
        "train@lr=1",
    ]));
    assert_eq!(code, 0, "{s:#}");
    assert_eq!(in_state(&s, "ran"), ["train@lr=1"], "{s:#}");
    assert_eq!(state_of(&s, "report"), "cached", "{s:#}");
}
