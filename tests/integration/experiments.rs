//! Comparing runs: every `sdpipe run` is recorded, and `exp show`, `metrics show|diff` and
//! `params diff` compare recorded runs as DVC's commands do.

use crate::common;
use common::*;

use serde_json::Value;

/// `train` writes a model from `lr`; `score` writes a `metrics` output computed from it.
const PIPELINE: &str = r#"
stages:
  prepare:
    run: echo 3 > data.txt
    outs: {data: data.txt}
  train:
    run: echo "$(cat ${inputs.data}) ${params.lr}" > model.txt
    inputs: {data: prepare.data}
    params: {lr: 1}
    outs: {model: model.txt}
  score:
    run: |
      set -- $(cat ${inputs.model})
      echo "{\"loss\": $(($1 * $2)), \"name\": \"x\", \"parts\": {\"a\": $2}}" > metrics.json
    inputs: {model: train.model}
    outs: {metrics: metrics.json}
"#;

fn project() -> Project {
    let p = Project::new();
    p.write("p.yaml", PIPELINE);
    p
}

fn json_out(p: &Project, args: &[&str]) -> Value {
    let out = p.sdpipe(args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn text_out(p: &Project, args: &[&str]) -> String {
    let out = p.sdpipe(args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_run_that_computes_something_new_is_a_row_with_its_params_and_metrics() {
    let p = project();
    p.run_ok("p.yaml", &[]);
    p.run_ok("p.yaml", &["--set", "train.lr=2"]);
    let rows = json_out(&p, &["exp", "show", "p.yaml", "--json"]);
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{rows:#?}");
    assert_eq!(rows[0]["params"]["train.lr"], 1);
    assert_eq!(rows[1]["params"]["train.lr"], 2);
    assert_eq!(rows[0]["metrics"]["score.loss"], 3.0);
    assert_eq!(rows[1]["metrics"]["score.loss"], 6.0);
    // Nested numbers by dotted path; strings are not metrics.
    assert_eq!(rows[1]["metrics"]["score.parts.a"], 2.0);
    assert!(rows[1]["metrics"].get("score.name").is_none());
}

#[test]
fn a_no_op_rerun_adds_no_row() {
    let p = project();
    p.run_ok("p.yaml", &[]);
    p.run_ok("p.yaml", &[]);
    let rows = json_out(&p, &["exp", "show", "p.yaml", "--json"]);
    assert_eq!(rows.as_array().unwrap().len(), 1);
}

#[test]
fn a_sweep_is_one_row_per_point() {
    let p = project();
    p.run_ok("p.yaml", &["--set", "train.lr=1,2,4"]);
    let rows = json_out(&p, &["exp", "show", "p.yaml", "--json"]);
    let points: Vec<(&str, f64)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["point"].as_str().unwrap(), r["metrics"]["score.loss"].as_f64().unwrap()))
        .collect();
    assert_eq!(points, [("train.lr=1", 3.0), ("train.lr=2", 6.0), ("train.lr=4", 12.0)]);
}

#[test]
fn only_changed_columns_and_sorting_make_a_markdown_table() {
    let p = project();
    p.run_ok("p.yaml", &["--set", "train.lr=1,2"]);
    let md = text_out(
        &p,
        &[
            "exp",
            "show",
            "p.yaml",
            "--md",
            "--only-changed",
            "--sort-by",
            "loss",
            "--sort-order",
            "desc",
        ],
    );
    let lines: Vec<&str> = md.lines().collect();
    assert_eq!(
        lines[0], "| run | created | point | score.loss | score.parts.a | train.lr |",
        "{md}"
    );
    assert_eq!(lines[1], "|---|---|---|---|---|---|");
    assert!(lines[2].ends_with("| train.lr=2 | 6 | 2 | 2 |"), "{md}");
    assert!(lines[3].ends_with("| train.lr=1 | 3 | 1 | 1 |"), "{md}");
}

#[test]
fn metrics_diff_compares_the_latest_run_with_the_one_before() {
    let p = project();
    p.run_ok("p.yaml", &[]);
    p.run_ok("p.yaml", &["--set", "train.lr=5"]);
    let diff = json_out(&p, &["metrics", "diff", "p.yaml", "--json"]);
    let changes = diff["changes"].as_array().unwrap();
    let loss = changes.iter().find(|c| c["name"] == "score.loss").unwrap();
    assert_eq!((loss["old"].as_f64(), loss["new"].as_f64()), (Some(3.0), Some(15.0)));
    assert_eq!(loss["change"], 12.0);
    let text = text_out(&p, &["metrics", "diff", "p.yaml"]);
    assert!(text.lines().any(|l| l.starts_with("score.loss") && l.ends_with("+12")), "{text}");
}

#[test]
fn params_diff_lists_only_what_changed_between_two_named_runs() {
    let p = project();
    p.run_ok("p.yaml", &[]);
    p.run_ok("p.yaml", &["--set", "train.lr=5"]);
    let rows = json_out(&p, &["exp", "show", "p.yaml", "--json"]);
    let first = rows[0]["run"].as_str().unwrap();
    let diff = json_out(&p, &["params", "diff", "p.yaml", first, "latest", "--json"]);
    let changes = diff["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{diff:#}");
    assert_eq!(changes[0]["name"], "train.lr");
    assert_eq!((&changes[0]["old"], &changes[0]["new"]), (&Value::from(1), &Value::from(5)));
}

#[test]
fn metrics_show_lists_a_runs_metrics() {
    let p = project();
    p.run_ok("p.yaml", &[]);
    let text = text_out(&p, &["metrics", "show", "p.yaml"]);
    assert_eq!(text, "metric         value\nscore.loss     3\nscore.parts.a  1\n");
}

#[test]
fn an_unknown_run_is_a_usage_error_naming_the_references_that_work() {
    let p = project();
    p.run_ok("p.yaml", &[]);
    let out = p.sdpipe(&["metrics", "diff", "p.yaml", "nosuchrun"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no recorded run is `nosuchrun`") && err.contains("latest~N"), "{err}");
    let out = p.sdpipe(&["metrics", "diff", "p.yaml"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("only 1 runs are recorded"));
}
