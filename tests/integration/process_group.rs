//! A shell stage's processes never outlive it: not when the command ends normally, not when the
//! run is interrupted, and not when sdpipe itself is killed with SIGKILL (issue 8). And sdpipe's
//! own process is never killed by a closed pipe.

use crate::common;

use std::time::{Duration, Instant};

use common::*;

/// A `sleep` duration no other process on the machine uses, so the test can tell its own
/// background process from everything else.
fn unique_seconds(salt: u32) -> u32 {
    800_000 + (std::process::id() % 50_000) * 3 + salt
}

/// A stage that leaves `sleep <secs>` running in the background, records its pid, then either
/// finishes or waits.
fn background_pipeline(secs: u32, then: &str) -> String {
    format!(
        "stages:\n  bg:\n    run: |\n      sleep {secs} &\n      echo $! > $SDPIPE_PROJECT/bg.pid\n      \
         touch $SDPIPE_PROJECT/started\n      {then}\n    outs: [o]\n"
    )
}

/// Whether `pid` is a live (not zombie) `sleep <secs>`.
fn sleeping(pid: u32, secs: u32) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z'));
    let ours = String::from_utf8_lossy(&cmdline).contains(&secs.to_string());
    ours && !zombie
}

/// Wait up to `limit` for the background process to be running `sleep`: the stage records
/// its pid right after forking it, possibly before the child has exec'd.
fn running_within(pid: u32, secs: u32, limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if sleeping(pid, secs) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Wait up to `limit` for the background process to be gone.
fn gone_within(pid: u32, secs: u32, limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if !sleeping(pid, secs) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn background_pid(p: &Project) -> u32 {
    p.read("bg.pid").trim().parse().expect("pid")
}

#[test]
fn sigkill_of_sdpipe_leaves_no_background_process_of_a_stage_behind() {
    let secs = unique_seconds(0);
    let p = Project::new();
    p.write("pipeline.yaml", &background_pipeline(secs, "sleep 60; echo > o"));
    let mut child = start_until_started(p.cmd().args(["run", "pipeline.yaml"]), p.path());
    let pid = background_pid(&p);
    assert!(
        running_within(pid, secs, Duration::from_secs(10)),
        "the background process should be running"
    );
    child.kill().unwrap(); // SIGKILL: sdpipe runs no cleanup code
    child.wait().unwrap();
    let survived = !gone_within(pid, secs, Duration::from_secs(10));
    if survived {
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    assert!(!survived, "`sleep {secs} &` (pid {pid}) outlived the SIGKILLed sdpipe");
}

#[test]
fn background_processes_end_with_their_stage() {
    let secs = unique_seconds(1);
    let p = Project::new();
    p.write("pipeline.yaml", &background_pipeline(secs, "echo > o"));
    p.run_ok("pipeline.yaml", &[]);
    let pid = background_pid(&p);
    let survived = !gone_within(pid, secs, Duration::from_secs(5));
    if survived {
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    assert!(!survived, "`sleep {secs} &` (pid {pid}) outlived its finished stage");
}

#[test]
fn interrupting_the_run_kills_the_stages_background_processes() {
    let secs = unique_seconds(2);
    let p = Project::new();
    p.write("pipeline.yaml", &background_pipeline(secs, "sleep 60; echo > o"));
    let mut child = start_until_started(p.cmd().args(["run", "pipeline.yaml"]), p.path());
    let pid = background_pid(&p);
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let survived = !gone_within(pid, secs, Duration::from_secs(5));
    if survived {
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    assert!(!survived, "`sleep {secs} &` (pid {pid}) outlived the interrupted run");
}

/// A write to a pipe whose reader is gone (a watchdog's, a child's) must be an error sdpipe
/// handles, not a SIGPIPE that kills the whole run without a word: the signal stays ignored
/// while a run is under way.
#[test]
fn sigpipe_is_ignored_during_a_run() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        "stages:\n  slow:\n    run: touch $SDPIPE_PROJECT/started; sleep 30; echo > o\n    outs: [o]\n",
    );
    let mut child = start_until_started(p.cmd().args(["run", "pipeline.yaml"]), p.path());
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let ignored = status.lines().find_map(|l| l.strip_prefix("SigIgn:")).unwrap().trim();
    let mask = u64::from_str_radix(ignored, 16).unwrap();
    assert_ne!(mask & (1 << (libc::SIGPIPE - 1)), 0, "SIGPIPE is not ignored: SigIgn {ignored}");
}
