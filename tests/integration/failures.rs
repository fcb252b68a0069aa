//! Failures, crashes and concurrency: the cache never records a failed or half-written result.

use crate::common;
use common::*;

use std::time::{Duration, Instant};

#[test]
fn failing_stage_skips_dependents_finishes_independent_branches_and_exits_nonzero() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        r#"
stages:
  bad:
    run: echo "about to fail"; exit 3
    outs: [x]
  after:
    run: cat ${inputs.x} > y
    inputs: {x: bad.x}
    outs: [y]
  fine:
    run: echo ok > z
    outs: [z]
"#,
    );
    let (s, code) = p.run_json("pipeline.yaml", &[]);
    assert_eq!(code, 1);
    assert_eq!(s["ok"], false);
    assert_eq!(state_of(&s, "bad"), "failed");
    assert_eq!(state_of(&s, "after"), "skipped");
    assert_eq!(state_of(&s, "fine"), "ran");
    let bad = stage_of(&s, "bad");
    let error = bad["error"].as_str().unwrap();
    assert!(error.contains("exited with status 3"), "{error}");
    assert!(error.contains("about to fail"), "the log tail is shown: {error}");
    let log = bad["log"].as_str().unwrap();
    assert!(std::fs::read_to_string(log).unwrap().contains("about to fail"));
}

#[test]
fn failed_stage_is_not_recorded_and_reruns() {
    let p = Project::new();
    p.write("flag", "fail");
    p.write(
        "pipeline.yaml",
        "stages:\n  s:\n    run: test \"$(cat $SDPIPE_PROJECT/flag)\" = ok && echo done > out\n    outs: [out]\n",
    );
    let (_, code) = p.run_json("pipeline.yaml", &[]);
    assert_eq!(code, 1);
    p.write("flag", "ok");
    // The flag is not a declared dep, so only a missing record can explain a rerun.
    let s = p.run_ok("pipeline.yaml", &[]);
    assert_eq!(state_of(&s, "s"), "ran");
}

#[test]
fn missing_declared_output_fails_the_stage() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        "stages:\n  s:\n    run: echo hi > other.txt\n    outs: [wanted.txt]\n",
    );
    let (s, code) = p.run_json("pipeline.yaml", &[]);
    assert_eq!(code, 1);
    assert!(stage_of(&s, "s")["error"].as_str().unwrap().contains("was not produced"));
}

#[test]
fn stage_killed_mid_run_leaves_no_record_and_reruns() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        "stages:\n  slow:\n    run: |\n      echo partial > out.txt\n      touch $SDPIPE_PROJECT/started\n      sleep 30\n      echo done >> out.txt\n    outs: [out.txt]\n",
    );
    let mut child = p.cmd().args(["run", "pipeline.yaml"]).spawn().unwrap();
    wait_for(&p.path().join("started"), Duration::from_secs(20));
    child.kill().unwrap(); // SIGKILL: no cleanup code runs
    child.wait().unwrap();
    std::fs::remove_file(p.path().join("started")).unwrap();
    let (s, _) = p.status_json("pipeline.yaml", &[]);
    assert_eq!(state_of(&s, "slow"), "will_run", "a killed stage must not be recorded: {s:#}");
    // The orphaned command died with sdpipe (it would otherwise still be sleeping).
    p.write("pipeline.yaml", &p.read("pipeline.yaml").replace("sleep 30", "true"));
    let s = p.run_ok("pipeline.yaml", &[]);
    assert_eq!(state_of(&s, "slow"), "ran");
    assert_eq!(p.read("runs/pipeline/slow/out.txt"), "partial\ndone\n");
    // Abandoned scratch from the killed run was swept.
    let leftovers: Vec<_> = std::fs::read_dir(p.path().join("cache/tmp")).unwrap().collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn interrupt_stops_the_stage_records_nothing_and_exits_130() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        "stages:\n  slow:\n    run: touch $SDPIPE_PROJECT/started; sleep 30; echo x > o\n    outs: [o]\n",
    );
    let child = p
        .cmd()
        .args(["run", "pipeline.yaml", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&p.path().join("started"), Duration::from_secs(20));
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let t0 = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10), "Ctrl-C must stop the child promptly");
    assert_eq!(out.status.code(), Some(130));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["interrupted"], true);
    let (s, _) = p.status_json("pipeline.yaml", &[]);
    assert_eq!(state_of(&s, "slow"), "will_run");
}

#[test]
fn dep_edited_during_the_run_is_not_recorded() {
    let p = Project::new();
    p.write("data.txt", "v1\n");
    p.write(
        "pipeline.yaml",
        "stages:\n  s:\n    run: cat ${deps.d} > o; echo v2 > ${deps.d}\n    deps: {d: data.txt}\n    outs: [o]\n",
    );
    let (s, code) = p.run_json("pipeline.yaml", &[]);
    assert_eq!(code, 1);
    assert!(
        stage_of(&s, "s")["error"].as_str().unwrap().contains("changed while the stage ran"),
        "{s:#}"
    );
}

#[test]
fn two_concurrent_runs_share_one_cache_and_compute_each_stage_once() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        r#"
stages:
  slow:
    run: echo run >> $SDPIPE_PROJECT/executions; sleep 1; echo result > r
    outs: [r]
  next:
    run: cat ${inputs.r} ${inputs.r} > n
    inputs: {r: slow.r}
    outs: [n]
"#,
    );
    let spawn = || {
        p.cmd()
            .args(["run", "pipeline.yaml", "--json"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success() && b.status.success(), "{}\n{}", stderr(&a), stderr(&b));
    assert_eq!(p.read("executions"), "run\n", "the slow stage ran exactly once");
    let sa: serde_json::Value = serde_json::from_slice(&a.stdout).unwrap();
    let sb: serde_json::Value = serde_json::from_slice(&b.stdout).unwrap();
    let states = [state_of(&sa, "slow"), state_of(&sb, "slow")];
    assert!(
        states.contains(&"ran".to_string()) && states.contains(&"cached".to_string()),
        "{states:?}"
    );
    // The one that waited says so.
    let waiter = if state_of(&sa, "slow") == "cached" { &sa } else { &sb };
    assert_eq!(stage_of(waiter, "slow")["waited"], true);
    assert_eq!(p.read("runs/pipeline/next/n"), "result\nresult\n");
}

#[test]
fn params_cannot_inject_shell_commands() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        "stages:\n  s:\n    run: echo ${params.msg} > o\n    params: {msg: \"x; touch pwned; $(touch pwned2) `touch pwned3`\"}\n    outs: [o]\n",
    );
    p.run_ok("pipeline.yaml", &[]);
    assert_eq!(p.read("runs/pipeline/s/o"), "x; touch pwned; $(touch pwned2) `touch pwned3`\n");
    for f in ["pwned", "pwned2", "pwned3"] {
        assert!(!p.path().join("cache/tmp").join(f).exists() && !p.path().join(f).exists());
    }
}

#[test]
fn materialised_outputs_are_read_only() {
    let p = chain_project();
    p.run_ok("pipeline.yaml", &[]);
    let meta = std::fs::metadata(p.path().join("runs/pipeline/source/out.txt")).unwrap();
    assert!(meta.permissions().readonly());
}

/// Two independent stages that each note whether the other was running at the same time.
fn overlap_pipeline(threads: usize) -> String {
    let stage = |me: &str, other: &str| {
        format!(
            "  {me}:\n    run: touch $SDPIPE_PROJECT/{me}.running; sleep 1; if [ -e $SDPIPE_PROJECT/{other}.running ]; then touch $SDPIPE_PROJECT/overlap; fi; sleep 0.2; rm $SDPIPE_PROJECT/{me}.running; echo > o\n    outs: [o]\n    threads: {threads}\n"
        )
    };
    format!("stages:\n{}{}", stage("a", "b"), stage("b", "a"))
}

#[test]
fn independent_stages_run_in_parallel() {
    let p = Project::new();
    p.write("p.yaml", &overlap_pipeline(1));
    p.run_ok("p.yaml", &["--jobs", "2"]);
    assert!(p.path().join("overlap").exists());
}

#[test]
fn declared_threads_keep_stages_from_oversubscribing_the_budget() {
    let p = Project::new();
    p.write("p.yaml", &overlap_pipeline(2));
    p.run_ok("p.yaml", &["--jobs", "2"]);
    assert!(!p.path().join("overlap").exists());
}
