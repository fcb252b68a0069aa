//! A temporary sdpipe project and helpers to run the real binary against it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    /// An empty project (a `sdpipe.toml` marks its root).
    pub fn new() -> Project {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("sdpipe.toml"), "").unwrap();
        Project { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, rel: &str, content: &str) -> PathBuf {
        let p = self.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
        p
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path().join(rel))
            .unwrap_or_else(|e| panic!("reading {rel}: {e}"))
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(assert_cmd::cargo::cargo_bin!("sdpipe"));
        c.current_dir(self.path()).env_remove("SDPIPE_CACHE").env("NO_COLOR", "1");
        c
    }

    /// Run `sdpipe <args>` and return its output.
    pub fn sdpipe(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run sdpipe")
    }

    /// `sdpipe run <pipeline> --json <extra>`: the parsed summary and the exit code.
    pub fn run_json(&self, pipeline: &str, extra: &[&str]) -> (Value, i32) {
        let mut args = vec!["run", pipeline, "--json"];
        args.extend_from_slice(extra);
        self.json(&args)
    }

    pub fn status_json(&self, pipeline: &str, extra: &[&str]) -> (Value, i32) {
        let mut args = vec!["status", pipeline, "--json"];
        args.extend_from_slice(extra);
        self.json(&args)
    }

    pub fn json(&self, args: &[&str]) -> (Value, i32) {
        json_of(self.cmd().args(args))
    }

    /// Run and insist it succeeded; returns the summary.
    pub fn run_ok(&self, pipeline: &str, extra: &[&str]) -> Value {
        let (summary, code) = self.run_json(pipeline, extra);
        assert_eq!(code, 0, "run failed: {summary:#}");
        summary
    }
}

/// Stage name → state, from a summary.
/// Poll until `path` exists; fail the test after `limit`.
pub fn wait_for(path: &Path, limit: Duration) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(t0.elapsed() < limit, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Start `c` (an `sdpipe run` whose stage touches `$SDPIPE_PROJECT/started` once it is
/// running) with its output discarded, and return once the stage runs.
pub fn start_until_started(c: &mut Command, project: &Path) -> Child {
    let child = c.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn sdpipe");
    wait_for(&project.join("started"), Duration::from_secs(60));
    child
}

/// Run `c` (an `sdpipe ... --json` command): its parsed stdout and exit code.
pub fn json_of(c: &mut Command) -> (Value, i32) {
    let out = c.output().expect("run sdpipe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "{:?}: invalid JSON ({e}); {}\nstdout:\n{stdout}\nstderr:\n{}",
            c.get_args().collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (value, out.status.code().unwrap_or(-1))
}

/// Validation errors from `status --json` of `pipeline`, asserting it failed with exit code 2.
pub fn spec_errors(p: &Project, pipeline: &str) -> Vec<Value> {
    let (v, code) = p.status_json(pipeline, &[]);
    assert_eq!(code, 2, "{v:#}");
    assert_eq!(v["ok"], false);
    v["errors"].as_array().unwrap().clone()
}

/// An error's (line, column).
pub fn located(e: &Value) -> (u64, u64) {
    (e["line"].as_u64().unwrap(), e["column"].as_u64().unwrap())
}

pub fn states(summary: &Value) -> Vec<(String, String)> {
    summary["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| {
            (s["name"].as_str().unwrap().to_string(), s["state"].as_str().unwrap().to_string())
        })
        .collect()
}

pub fn state_of(summary: &Value, stage: &str) -> String {
    stage_of(summary, stage)["state"].as_str().unwrap().to_string()
}

pub fn stage_of<'a>(summary: &'a Value, stage: &str) -> &'a Value {
    summary["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == stage)
        .unwrap_or_else(|| panic!("no stage {stage} in {summary:#}"))
}

/// The names of stages in `state`.
pub fn in_state(summary: &Value, state: &str) -> Vec<String> {
    states(summary).into_iter().filter(|(_, s)| s == state).map(|(n, _)| n).collect()
}

pub fn reasons(summary: &Value, stage: &str) -> Vec<String> {
    stage_of(summary, stage)["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["message"].as_str().unwrap().to_string())
        .collect()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A three-stage chain plus an independent branch:
/// `source` (reads data/input.txt) → `upper` (param `suffix`) → `count`; `other` alone.
pub const CHAIN: &str = r#"
stages:
  source:
    run: cat ${deps.input} > out.txt
    deps: {input: data/input.txt}
    outs: {text: out.txt}
  upper:
    run: |
      tr a-z A-Z < ${inputs.text} > up.txt
      echo ${params.suffix} >> up.txt
    inputs: {text: source.text}
    params: {suffix: "!"}
    outs: {text: up.txt}
  count:
    run: wc -c < ${inputs.text} > n.txt
    inputs: {text: upper.text}
    outs: {n: n.txt}
  other:
    run: echo independent > o.txt
    outs: {o: o.txt}
"#;

pub fn chain_project() -> Project {
    let p = Project::new();
    p.write("data/input.txt", "hello pipeline\n");
    p.write("pipeline.yaml", CHAIN);
    p
}

/// `pipelines/demo.yaml` at a size CI affords: fewer images and steps, the same stages and
/// wiring (the `demo` and `slurm` tests).
pub const DEMO_AT_TEST_SIZE: &[&str] = &[
    "--set=base_data.count=8",
    "--set=target_data.count=10",
    "--set=target_set.test_count=4",
    "--set=vae.max_train_steps=3",
    "--set=pretrain.max_train_steps=3",
    "--set=finetune.max_train_steps=2",
    "--set=sample_base.steps=3",
    "--set=sample_finetuned.steps=3",
];
