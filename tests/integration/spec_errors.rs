//! Bad pipelines fail before anything runs, with file:line:column and a suggestion.

use crate::common;
use common::*;

fn one_error(p: &Project, pipeline: &str) -> serde_json::Value {
    let e = spec_errors(p, pipeline);
    assert_eq!(e.len(), 1, "{e:#?}");
    e[0].clone()
}

#[test]
fn unknown_stage_key_is_located_with_a_suggestion() {
    let p = Project::new();
    p.write("p.yaml", "stages:\n  a:\n    run: echo\n    outz: [x]\n");
    let e = one_error(&p, "p.yaml");
    assert_eq!(
        (e["file"].as_str(), e["line"].as_u64(), e["column"].as_u64()),
        (Some("p.yaml"), Some(4), Some(5))
    );
    assert_eq!(e["help"], "did you mean `outs`?");
}

#[test]
fn unknown_upstream_stage_suggests_the_near_name() {
    let p = Project::new();
    p.write(
        "p.yaml",
        "stages:\n  train:\n    run: echo > m\n    outs: [m]\n  sample:\n    run: cat ${inputs.m}\n    inputs: {m: trian.m}\n",
    );
    let e = one_error(&p, "p.yaml");
    assert_eq!(e["message"], "no stage named `trian` (in `trian.m`)");
    assert_eq!((e["line"].as_u64(), e["column"].as_u64()), (Some(7), Some(17)));
    assert_eq!(e["help"], "did you mean `train`?");
}

#[test]
fn unknown_output_lists_the_real_ones() {
    let p = Project::new();
    p.write(
        "p.yaml",
        "stages:\n  a:\n    run: echo > m\n    outs: {model: m}\n  b:\n    run: cat ${inputs.x}\n    inputs: {x: a.weights}\n",
    );
    let e = one_error(&p, "p.yaml");
    assert_eq!(e["message"], "stage `a` has no output `weights`");
    assert_eq!(e["help"], "outputs of `a`: model");
}

#[test]
fn cycle_names_every_stage_on_it() {
    let p = Project::new();
    p.write(
        "p.yaml",
        "stages:\n  a:\n    run: echo\n    inputs: {x: c.o}\n    outs: [o]\n  b:\n    run: echo\n    inputs: {x: a.o}\n    outs: [o]\n  c:\n    run: echo\n    inputs: {x: b.o}\n    outs: [o]\n",
    );
    let e = one_error(&p, "p.yaml");
    assert_eq!(e["message"], "dependency cycle: a → b → c → a");
    assert_eq!(e["line"], 2);
}

#[test]
fn self_reference_is_rejected() {
    let p = Project::new();
    p.write("p.yaml", "stages:\n  a:\n    run: echo\n    inputs: {x: a.o}\n    outs: [o]\n");
    let e = one_error(&p, "p.yaml");
    assert!(e["message"].as_str().unwrap().contains("cannot take its own output"), "{e}");
}

#[test]
fn wrong_param_type_for_a_builtin_kind_is_located() {
    let p = Project::new();
    p.write("p.yaml", "stages:\n  data:\n    uses: synthetic\n    with:\n      count: many\n");
    let e = one_error(&p, "p.yaml");
    assert_eq!(e["message"], "parameter `count`: expected an integer, found string \"many\"");
    assert_eq!((e["line"].as_u64(), e["column"].as_u64()), (Some(5), Some(14)));
}

#[test]
fn enum_param_typo_gets_a_suggestion() {
    let p = Project::new();
    p.write("p.yaml", "stages:\n  data:\n    uses: synthetic\n    with: {style: textued}\n");
    let e = one_error(&p, "p.yaml");
    assert_eq!(e["help"], "did you mean `textured`?");
}

#[test]
fn unknown_kind_suggests_a_builtin() {
    let p = Project::new();
    p.write("p.yaml", "stages:\n  data:\n    uses: synthetik\n");
    let e = one_error(&p, "p.yaml");
    assert_eq!(e["message"], "unknown stage kind `synthetik`");
    assert_eq!(e["help"], "did you mean `synthetic`?");
}

#[test]
fn unknown_param_of_a_builtin_kind_suggests_one() {
    let p = Project::new();
    p.write("p.yaml", "stages:\n  data:\n    uses: synthetic\n    with: {cont: 3}\n");
    let e = one_error(&p, "p.yaml");
    assert_eq!(e["message"], "kind `synthetic` has no parameter `cont`");
    assert_eq!(e["help"], "did you mean `count`?");
}

#[test]
fn missing_dependency_file_fails_before_anything_runs() {
    let p = Project::new();
    p.write(
        "p.yaml",
        "stages:\n  first:\n    run: touch $SDPIPE_PROJECT/ran; echo > o\n    outs: [o]\n  second:\n    run: cat ${deps.d}\n    deps: {d: data/missing.csv}\n",
    );
    let (v, code) = p.run_json("p.yaml", &[]);
    assert_eq!(code, 2);
    assert_eq!(v["errors"][0]["message"], "dependency `data/missing.csv` does not exist");
    assert!(!p.path().join("ran").exists(), "nothing may run when the pipeline is invalid");
}

#[test]
fn all_errors_are_reported_in_one_pass() {
    let p = Project::new();
    p.write(
        "p.yaml",
        "stages:\n  a:\n    run: echo ${params.x}\n    bogus: 1\n  b:\n    uses: nope\n  c:\n    run: echo\n    threads: 0\n",
    );
    assert_eq!(spec_errors(&p, "p.yaml").len(), 4);
}

#[test]
fn syntax_error_is_located() {
    let p = Project::new();
    p.write("p.yaml", "stages:\n  a: {run: [echo\n");
    let e = one_error(&p, "p.yaml");
    assert!(e["line"].as_u64().is_some(), "{e}");
}

#[test]
fn unknown_variable_is_reported_with_a_suggestion() {
    let p = Project::new();
    p.write("p.yaml", "vars: {size: 3}\nstages:\n  a:\n    run: echo ${params.n}\n    params: {n: \"${vars.sise}\"}\n");
    let e = one_error(&p, "p.yaml");
    assert_eq!(e["message"], "unknown variable `${vars.sise}`");
    assert_eq!(e["help"], "did you mean `size`?");
}

#[test]
fn override_of_a_missing_stage_is_an_error() {
    let p = chain_project();
    let out = p.sdpipe(&["run", "pipeline.yaml", "--set", "uper.suffix=x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("did you mean `upper`?"), "{}", stderr(&out));
}

#[test]
fn human_errors_show_the_source_line() {
    let p = Project::new();
    p.write("p.yaml", "stages:\n  a:\n    run: echo\n    outz: [x]\n");
    let out = p.sdpipe(&["run", "p.yaml"]);
    let err = stderr(&out);
    assert!(err.contains("p.yaml:4:5"), "{err}");
    assert!(err.contains("outz: [x]"), "{err}");
    assert!(err.contains("did you mean `outs`?"), "{err}");
}

#[test]
fn output_paths_may_not_escape_the_stage_directory() {
    let p = Project::new();
    p.write("p.yaml", "stages:\n  a:\n    run: echo\n    outs: [../evil, /etc/passwd]\n");
    assert_eq!(spec_errors(&p, "p.yaml").len(), 2);
}
