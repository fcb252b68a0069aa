//! `device:`: where a stage computes. Never part of a key; shell stages see it; a device the
//! build cannot open is a clear stage failure.

use crate::common;
use common::*;

#[test]
fn changing_the_device_reruns_nothing() {
    let p = chain_project();
    p.run_ok("pipeline.yaml", &[]);
    let pipeline = p.read("pipeline.yaml");
    p.write("pipeline.yaml", &format!("device: cpu\n{pipeline}"));
    let in_file = p.run_ok("pipeline.yaml", &[]);
    assert_eq!(in_state(&in_file, "ran"), Vec::<String>::new(), "{in_file:#}");
    let on_command_line = p.run_ok("pipeline.yaml", &["--device", "cuda:3"]);
    assert_eq!(in_state(&on_command_line, "ran"), Vec::<String>::new(), "{on_command_line:#}");
}

#[test]
fn a_shell_stage_sees_its_device_and_the_stage_setting_wins() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        r#"
device: cpu
stages:
  pipeline_default:
    run: echo "$SDPIPE_DEVICE" > d.txt
    outs: {d: d.txt}
  own:
    # Not the same command: stages with the same key share one result, whatever their device.
    run: echo "$SDPIPE_DEVICE" > d.txt && true
    outs: {d: d.txt}
    device: cuda:1
"#,
    );
    p.run_ok("pipeline.yaml", &[]);
    assert_eq!(p.read("runs/pipeline/pipeline_default/d.txt"), "cpu\n");
    assert_eq!(p.read("runs/pipeline/own/d.txt"), "cuda:1\n");
}

#[test]
fn a_kind_asked_for_cuda_in_a_cpu_build_fails_saying_how_to_rebuild() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        r#"
stages:
  data:
    uses: synthetic
    with: {count: 2, resolution: 32}
  lpips:
    uses: lpips
    device: cuda
    with: {real: data.images, fake: data.images, weights: random}
"#,
    );
    let (summary, code) = p.run_json("pipeline.yaml", &[]);
    if cfg!(feature = "cuda") {
        return; // a CUDA build: this refusal cannot happen
    }
    assert_ne!(code, 0, "{summary:#}");
    assert_eq!(state_of(&summary, "lpips"), "failed");
    let error = stage_of(&summary, "lpips")["error"].as_str().unwrap().to_string();
    assert!(error.contains("built without CUDA") && error.contains("--features cuda"), "{error}");
}

#[test]
fn an_unknown_device_on_the_command_line_is_a_usage_error() {
    let p = chain_project();
    let out = p.sdpipe(&["run", "pipeline.yaml", "--device", "tpu"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`tpu` is not a device"), "{stderr}");
}
