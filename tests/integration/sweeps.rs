//! Sweeps: every point is a full pipeline variant, and the cache shares what the points share.

use crate::common;
use common::*;

/// `prepare` is shared by every point; `train` varies with `lr`; `eval` follows `train` and
/// varies with its own `scale` too.
const SWEPT: &str = r#"
sweep:
  grid:
    train.lr: [1, 2]
stages:
  prepare:
    run: echo data > data.txt
    outs: {data: data.txt}
  train:
    run: echo "$(cat ${inputs.data}) lr=${params.lr}" > model.txt
    inputs: {data: prepare.data}
    params: {lr: 1}
    outs: {model: model.txt}
  eval:
    run: echo "$(cat ${inputs.model}) scale=${params.scale}" > score.txt
    inputs: {model: train.model}
    params: {scale: 10}
    outs: {score: score.txt}
"#;

fn swept_project() -> Project {
    let p = Project::new();
    p.write("sweep.yaml", SWEPT);
    p
}

fn names(summary: &serde_json::Value) -> Vec<String> {
    states(summary).into_iter().map(|(name, _)| name).collect()
}

#[test]
fn a_grid_runs_one_instance_per_point_and_shares_unswept_upstream_stages() {
    let p = swept_project();
    let s = p.run_ok("sweep.yaml", &[]);
    assert_eq!(
        names(&s),
        ["prepare", "train@lr=1", "train@lr=2", "eval@lr=1", "eval@lr=2"],
        "{s:#}"
    );
    assert_eq!(in_state(&s, "ran").len(), 5);
    assert_eq!(p.read("runs/sweep/eval@lr=2/score.txt"), "data lr=2 scale=10\n");
    assert_eq!(p.read("runs/sweep/eval@lr=1/score.txt"), "data lr=1 scale=10\n");
}

#[test]
fn adding_a_value_runs_only_the_new_point() {
    let p = swept_project();
    p.run_ok("sweep.yaml", &[]);
    p.write("sweep.yaml", &SWEPT.replace("[1, 2]", "[1, 2, 3]"));
    let s = p.run_ok("sweep.yaml", &[]);
    assert_eq!(in_state(&s, "ran"), ["train@lr=3", "eval@lr=3"], "{s:#}");
    assert_eq!(in_state(&s, "cached").len(), 5);
}

#[test]
fn status_shows_per_point_what_is_cached() {
    let p = swept_project();
    p.run_ok("sweep.yaml", &[]);
    p.write("sweep.yaml", &SWEPT.replace("[1, 2]", "[2, 5]"));
    let (s, code) = p.status_json("sweep.yaml", &[]);
    assert_eq!(code, 0);
    assert_eq!(state_of(&s, "train@lr=2"), "cached");
    assert_eq!(state_of(&s, "train@lr=5"), "will_run", "{s:#}");
    assert_eq!(state_of(&s, "prepare"), "cached");
}

#[test]
fn command_line_values_sweep_a_parameter() {
    let p = swept_project();
    let s = p.run_ok("sweep.yaml", &["--set", "eval.scale=10,20"]);
    assert_eq!(
        names(&s),
        [
            "prepare",
            "train@lr=1",
            "train@lr=2",
            "eval@lr=1,scale=10",
            "eval@lr=1,scale=20",
            "eval@lr=2,scale=10",
            "eval@lr=2,scale=20"
        ],
        "{s:#}"
    );
    assert_eq!(p.read("runs/sweep/eval@lr=2,scale=20/score.txt"), "data lr=2 scale=20\n");
}

#[test]
fn a_failing_point_does_not_stop_the_others() {
    let p = Project::new();
    p.write(
        "sweep.yaml",
        &SWEPT.replace(
            r#"run: echo "$(cat ${inputs.data}) lr=${params.lr}" > model.txt"#,
            r#"run: test ${params.lr} != 2 && echo "lr=${params.lr}" > model.txt"#,
        ),
    );
    let (s, code) = p.run_json("sweep.yaml", &[]);
    assert_eq!(code, 1);
    assert_eq!(state_of(&s, "train@lr=2"), "failed");
    assert_eq!(state_of(&s, "eval@lr=2"), "skipped");
    assert_eq!(state_of(&s, "eval@lr=1"), "ran", "{s:#}");
}

#[test]
fn explicit_points_and_seeded_random_points_are_supported() {
    let p = Project::new();
    let points = SWEPT.replace(
        "  grid:\n    train.lr: [1, 2]",
        "  points:\n    - {train.lr: 7, eval.scale: 1}\n    - {train.lr: 8, eval.scale: 1}",
    );
    p.write("points.yaml", &points);
    let s = p.run_ok("points.yaml", &[]);
    assert_eq!(in_state(&s, "ran").len(), 5, "{s:#}");
    assert!(names(&s).contains(&"eval@lr=8".to_string()), "{s:#}");

    let random = SWEPT.replace(
        "  grid:\n    train.lr: [1, 2]",
        "  random:\n    count: 2\n    seed: 3\n    grid:\n      train.lr: [1, 2, 3, 4, 5]",
    );
    p.write("random.yaml", &random);
    let a = names(&p.run_ok("random.yaml", &[]));
    let b = names(&p.run_ok("random.yaml", &[]));
    assert_eq!(a, b, "the same seed draws the same points");
    assert_eq!(a.iter().filter(|n| n.starts_with("train@")).count(), 2);
}

#[test]
fn a_sweep_over_an_unknown_stage_is_located_with_a_suggestion() {
    let p = Project::new();
    p.write("bad.yaml", &SWEPT.replace("train.lr: [1, 2]", "trian.lr: [1, 2]"));
    let out = p.sdpipe(&["run", "bad.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("bad.yaml:4"), "{err}");
    assert!(err.contains("did you mean `train`"), "{err}");
}

#[test]
fn a_point_with_a_value_of_the_wrong_type_names_the_point() {
    let p = Project::new();
    p.write(
        "typed.yaml",
        r#"
sweep:
  grid:
    data.count: [2, many]
stages:
  data:
    uses: synthetic
    with: {count: 2, resolution: 32}
"#,
    );
    let out = p.sdpipe(&["run", "typed.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("sweep point data.count=many"), "{err}");
    assert!(err.contains("count"), "{err}");
}

#[test]
fn points_with_very_long_values_get_short_distinct_run_directories() {
    let p = Project::new();
    let long = |c: char| c.to_string().repeat(300);
    p.write(
        "sweep.yaml",
        &format!(
            "sweep:\n  grid:\n    say.text: [{a}, {b}]\nstages:\n  say:\n    run: echo ${{params.text}} > said.txt\n    params: {{text: x}}\n    outs: [said.txt]\n",
            a = long('a'),
            b = long('b'),
        ),
    );
    let s = p.run_ok("sweep.yaml", &[]);
    let instances = names(&s);
    assert_eq!(instances.len(), 2, "{s:#}");
    for (name, c) in instances.iter().zip(['a', 'b']) {
        assert!(name.len() < 120, "{name}");
        assert_eq!(p.read(&format!("runs/sweep/{name}/said.txt")), format!("{}\n", long(c)));
    }
}

#[test]
fn a_grid_too_large_to_expand_is_a_located_error() {
    let p = Project::new();
    let axes: String = (0..10).map(|i| format!("    s.p{i}: [0,1,2,3,4,5,6,7,8,9]\n")).collect();
    let params: String = (0..10).map(|i| format!("p{i}: 0, ")).collect();
    p.write(
        "sweep.yaml",
        &format!("sweep:\n  grid:\n{axes}stages:\n  s:\n    run: echo\n    params: {{{params}}}\n"),
    );
    let out = p.sdpipe(&["status", "sweep.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("more than the 100000 sdpipe expands"), "{err}");
    assert!(err.contains("sweep.yaml:3"), "{err}");
}
