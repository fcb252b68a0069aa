//! What the cache promises: reruns do only what changed, and say why.

use crate::common;
use common::*;

#[test]
fn second_run_executes_nothing() {
    let p = chain_project();
    let first = p.run_ok("pipeline.yaml", &[]);
    assert_eq!(in_state(&first, "ran").len(), 4);
    let second = p.run_ok("pipeline.yaml", &[]);
    assert_eq!(in_state(&second, "cached").len(), 4, "{second:#}");
}

#[test]
fn changing_one_param_reruns_exactly_that_stage_and_its_dependents() {
    let p = chain_project();
    p.run_ok("pipeline.yaml", &[]);
    let s = p.run_ok("pipeline.yaml", &["--set", "upper.suffix=??"]);
    assert_eq!(in_state(&s, "ran"), vec!["upper", "count"]);
    assert_eq!(in_state(&s, "cached"), vec!["source", "other"]);
    assert_eq!(p.read("runs/pipeline/upper/up.txt"), "HELLO PIPELINE\n??\n");
}

#[test]
fn touching_a_dep_without_changing_content_reruns_nothing() {
    let p = chain_project();
    p.run_ok("pipeline.yaml", &[]);
    let input = p.path().join("data/input.txt");
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    std::fs::File::options().write(true).open(&input).unwrap().set_modified(later).unwrap();
    let s = p.run_ok("pipeline.yaml", &[]);
    assert_eq!(in_state(&s, "ran"), Vec::<String>::new(), "{s:#}");
}

#[test]
fn editing_a_dep_reruns_its_stage_and_names_the_dep() {
    let p = chain_project();
    p.run_ok("pipeline.yaml", &[]);
    p.write("data/input.txt", "changed\n");
    let s = p.run_ok("pipeline.yaml", &[]);
    assert_eq!(in_state(&s, "ran"), vec!["source", "upper", "count"]);
    assert_eq!(reasons(&s, "source"), vec!["dep input (data/input.txt) changed"]);
    assert_eq!(reasons(&s, "upper"), vec!["input text changed"]);
}

#[test]
fn identical_output_rerun_cuts_off_downstream() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        r#"
stages:
  gen:
    run: echo constant > c.txt   # ${params.ignored} does not affect the output
    params: {ignored: 1}
    outs: {c: c.txt}
  use:
    run: cat ${inputs.c} > u.txt
    inputs: {c: gen.c}
    outs: {u: u.txt}
"#,
    );
    p.run_ok("pipeline.yaml", &[]);
    let s = p.run_ok("pipeline.yaml", &["--set", "gen.ignored=2"]);
    assert_eq!(state_of(&s, "gen"), "ran");
    assert_eq!(state_of(&s, "use"), "cached", "{s:#}");
}

#[test]
fn status_names_the_param_and_both_values() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        "stages:\n  train:\n    run: echo ${params.lr} > lr.txt\n    params: {lr: 1e-5}\n    outs: [lr.txt]\n",
    );
    p.run_ok("pipeline.yaml", &[]);
    let (s, code) = p.status_json("pipeline.yaml", &["--set", "train.lr=3e-5"]);
    assert_eq!(code, 0);
    assert_eq!(state_of(&s, "train"), "will_run");
    assert_eq!(reasons(&s, "train"), vec!["param lr changed 1e-5 → 3e-5"]);
    assert_eq!(stage_of(&s, "train")["reasons"][0]["code"], "param_changed");
}

#[test]
fn status_of_a_fresh_pipeline_says_new_stage_and_upstream() {
    let p = chain_project();
    let (s, _) = p.status_json("pipeline.yaml", &[]);
    assert_eq!(reasons(&s, "source"), vec!["new stage"]);
    assert_eq!(reasons(&s, "upper"), vec!["upstream source will run"]);
    assert!(stage_of(&s, "upper")["key"].is_null());
}

#[test]
fn status_after_a_run_reports_everything_cached() {
    let p = chain_project();
    p.run_ok("pipeline.yaml", &[]);
    let (s, _) = p.status_json("pipeline.yaml", &[]);
    assert_eq!(in_state(&s, "cached").len(), 4, "{s:#}");
}

#[test]
fn forced_stage_reruns_with_reason_forced() {
    let p = chain_project();
    p.run_ok("pipeline.yaml", &[]);
    let s = p.run_ok("pipeline.yaml", &["--force", "source"]);
    assert_eq!(state_of(&s, "source"), "ran");
    assert_eq!(reasons(&s, "source"), vec!["forced"]);
    // Same output bytes: downstream is cut off.
    assert_eq!(state_of(&s, "upper"), "cached");
}

#[test]
fn changing_the_command_reruns_with_reason() {
    let p = chain_project();
    p.run_ok("pipeline.yaml", &[]);
    p.write("pipeline.yaml", &CHAIN.replace("echo independent", "echo independent!"));
    let s = p.run_ok("pipeline.yaml", &[]);
    assert_eq!(in_state(&s, "ran"), vec!["other"]);
    assert_eq!(reasons(&s, "other"), vec!["command changed"]);
}

#[test]
fn allowlisted_env_var_is_part_of_the_key() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        "stages:\n  e:\n    run: echo \"$MODE\" > m.txt\n    env: [MODE]\n    outs: [m.txt]\n",
    );
    let run = |mode: &str| {
        let out =
            p.cmd().args(["run", "pipeline.yaml", "--json"]).env("MODE", mode).output().unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    run("a");
    assert_eq!(state_of(&run("a"), "e"), "cached");
    let s = run("b");
    assert_eq!(reasons(&s, "e"), vec!["env MODE changed"]);
    assert_eq!(p.read("runs/pipeline/e/m.txt"), "b\n");
}

#[test]
fn moving_the_project_keeps_its_cache() {
    let p = chain_project();
    p.run_ok("pipeline.yaml", &[]);
    let moved = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("cp")
        .args(["-a", &format!("{}/.", p.path().display()), &moved.path().display().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let q = Project { dir: moved };
    let s = q.run_ok("pipeline.yaml", &[]);
    assert_eq!(in_state(&s, "cached").len(), 4, "{s:#}");
}

#[test]
fn glob_deps_rerun_when_a_matching_file_is_added() {
    let p = Project::new();
    p.write("data/a.csv", "1\n");
    p.write(
        "pipeline.yaml",
        "stages:\n  cat:\n    run: cat ${deps.csv} > all.txt\n    deps: {csv: \"data/*.csv\"}\n    outs: [all.txt]\n",
    );
    p.run_ok("pipeline.yaml", &[]);
    p.write("data/b.csv", "2\n");
    p.write("data/ignored.txt", "x\n");
    let s = p.run_ok("pipeline.yaml", &[]);
    assert_eq!(reasons(&s, "cat"), vec!["dep csv (data/*.csv) changed"]);
    assert_eq!(p.read("runs/pipeline/cat/all.txt"), "1\n2\n");
}

#[test]
fn running_one_target_runs_only_what_it_needs() {
    let p = chain_project();
    let s = p.run_ok("pipeline.yaml", &["upper"]);
    let names: Vec<String> = states(&s).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, vec!["source", "upper"]);
}

/// Tree order is by path component, so `x/1` sorts before `x.b` although `.` sorts before `/`
/// in a plain string comparison; each file must still be stored under its own digest.
#[test]
fn a_directory_output_keeps_each_files_content_whatever_its_names_sort_like() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        "stages:\n  d:\n    run: mkdir -p out/x && printf one > out/x/1 && printf dotb > out/x.b\n    \
         outs: {dir: out}\n",
    );
    p.run_ok("pipeline.yaml", &[]);
    assert_eq!(p.read("runs/pipeline/d/out/x/1"), "one");
    assert_eq!(p.read("runs/pipeline/d/out/x.b"), "dotb");
}
