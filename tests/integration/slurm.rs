//! The Slurm executor against a real single-node Slurm cluster.
//!
//! Gated: these tests run only with `SDPIPE_SLURM_TESTS=1` (start the cluster first with
//! `scripts/slurm-up.sh`, as root); otherwise each prints that it was skipped and why, so the
//! default `cargo test` stays fast. With the variable set, an unreachable cluster is a failure.
//!
//! Every `sbatch` and `scancel` call goes through a wrapper on `PATH` that records it, so the
//! tests can count submissions and see cancellations.

use crate::common;
use crate::s3_server;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use s3_server::{credentials, S3Server, BUCKET};
use serde_json::Value;

/// One test at a time: the cluster is one small node, and the node-state test takes it down.
static CLUSTER: Mutex<()> = Mutex::new(());

/// `None` (with a note on stderr) when the Slurm tests are not enabled.
fn cluster() -> Option<std::sync::MutexGuard<'static, ()>> {
    if std::env::var("SDPIPE_SLURM_TESTS").ok().as_deref() != Some("1") {
        eprintln!(
            "skipped: Slurm tests run only with SDPIPE_SLURM_TESTS=1 and a running cluster \
             (start one with scripts/slurm-up.sh)"
        );
        return None;
    }
    let guard = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let sinfo = Command::new("sinfo").args(["-h", "-o", "%t"]).output();
    match sinfo {
        Ok(out) if out.status.success() && !out.stdout.is_empty() => {}
        Ok(out) => panic!(
            "SDPIPE_SLURM_TESTS=1 but Slurm does not answer (sinfo: {}): run scripts/slurm-up.sh",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => {
            panic!("SDPIPE_SLURM_TESTS=1 but `sinfo` cannot run ({e}): run scripts/slurm-up.sh")
        }
    }
    Some(guard)
}

/// A project whose `sdpipe` finds recording `sbatch`/`scancel` wrappers first on `PATH`.
struct SlurmProject {
    p: Project,
    bin: tempfile::TempDir,
}

impl SlurmProject {
    fn new() -> SlurmProject {
        let bin = tempfile::tempdir().unwrap();
        for tool in ["sbatch", "scancel"] {
            let real = which(tool);
            let record = bin.path().join(format!("{tool}.calls"));
            let script = format!(
                "#!/bin/sh\necho \"$*\" >> '{}'\nexec '{}' \"$@\"\n",
                record.display(),
                real.display()
            );
            let path = bin.path().join(tool);
            std::fs::write(&path, script).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        SlurmProject { p: Project::new(), bin }
    }

    fn cmd(&self) -> Command {
        let mut c = self.p.cmd();
        let path = std::env::var("PATH").unwrap_or_default();
        c.env("PATH", format!("{}:{path}", self.bin.path().display()))
            .env("SDPIPE_SLURM_POLL_MS", "200");
        c
    }

    fn run_json(&self, pipeline: &str, extra: &[&str]) -> (Value, i32) {
        json_of(self.cmd().args(["run", pipeline, "--json"]).args(extra))
    }

    /// The recorded calls of `tool`.
    fn calls(&self, tool: &str) -> Vec<String> {
        std::fs::read_to_string(self.bin.path().join(format!("{tool}.calls")))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

fn which(tool: &str) -> PathBuf {
    let out = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().unwrap();
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!path.is_empty(), "`{tool}` is not installed: run scripts/slurm-up.sh");
    PathBuf::from(path)
}

/// A built-in kind (`synthetic`) feeding a shell stage, plus a shell stage on its own.
fn pipeline(executor: &str) -> String {
    format!(
        "executor: {executor}\n\
         resources: {{cpus: 1, mem: 200M, time: 10}}\n\
         stages:\n  \
           images:\n    uses: synthetic\n    with: {{count: 3, resolution: 32, seed: 7}}\n  \
           listing:\n    run: |\n      ls ${{inputs.images}} > files.txt\n      \
             wc -c ${{inputs.images}}/*.jpg | tail -n 1 > size.txt\n      \
             echo \"threads=$SDPIPE_THREADS\" >> size.txt\n    \
             inputs: {{images: images.images}}\n    outs: {{files: files.txt, size: size.txt}}\n  \
           hello:\n    run: echo hello from $SDPIPE_STAGE > out/hello.txt\n    \
             outs: {{hello: out/hello.txt}}\n"
    )
}

/// Every file under `dir`, relative path → bytes.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = walk(dir)
        .into_iter()
        .map(|f| (f.strip_prefix(dir).unwrap().display().to_string(), std::fs::read(&f).unwrap()))
        .collect();
    files.sort();
    files
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn keys(summary: &Value) -> Vec<(String, String)> {
    summary["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap().to_string(), s["key"].as_str().unwrap().to_string()))
        .collect()
}

/// Ids of this user's jobs named `name` that Slurm still runs or queues.
fn active_jobs(name: &str) -> Vec<String> {
    let out = Command::new("squeue").args(["-h", "-n", name, "-o", "%i"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

fn wait_until_no_job(name: &str, limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if active_jobs(name).is_empty() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

#[test]
fn shell_and_builtin_stages_run_through_slurm_with_the_outputs_of_a_local_run() {
    let Some(_cluster) = cluster() else { return };
    let slurm = SlurmProject::new();
    slurm.p.write("pipeline.yaml", &pipeline("slurm"));
    let (on_slurm, code) = slurm.run_json("pipeline.yaml", &[]);
    assert_eq!(code, 0, "slurm run failed: {on_slurm:#}");
    assert_eq!(slurm.calls("sbatch").len(), 3, "one submission per stage");
    let log =
        std::fs::read_to_string(stage_of(&on_slurm, "images")["log"].as_str().unwrap()).unwrap();
    assert!(log.contains("submitted Slurm job"), "the log shows the job: {log}");
    assert!(log.contains("sdpipe exec-stage: stage `images` on"), "ran on a node: {log}");

    let local = Project::new();
    local.write("pipeline.yaml", &pipeline("local"));
    let on_local = local.run_ok("pipeline.yaml", &[]);

    assert_eq!(keys(&on_slurm), keys(&on_local), "the executor is not part of any key");
    let runs = |p: &Project| p.path().join("runs/pipeline");
    assert_eq!(tree(&runs(&slurm.p)), tree(&runs(&local)), "outputs differ");
    // The node granted `resources.cpus` threads, as the stage was told.
    assert!(slurm.p.read("runs/pipeline/listing/size.txt").contains("threads=1"));
}

#[test]
fn a_second_run_submits_nothing() {
    let Some(_cluster) = cluster() else { return };
    let slurm = SlurmProject::new();
    slurm.p.write("pipeline.yaml", &pipeline("slurm"));
    let (first, code) = slurm.run_json("pipeline.yaml", &[]);
    assert_eq!(code, 0, "{first:#}");
    let submitted = slurm.calls("sbatch").len();
    let (second, code) = slurm.run_json("pipeline.yaml", &[]);
    assert_eq!(code, 0, "{second:#}");
    assert_eq!(in_state(&second, "cached").len(), 3, "{second:#}");
    assert_eq!(slurm.calls("sbatch").len(), submitted, "the second run submitted a job");
}

#[test]
fn a_failing_job_is_a_failed_stage_with_its_log_and_is_not_retried() {
    let Some(_cluster) = cluster() else { return };
    let slurm = SlurmProject::new();
    slurm.p.write(
        "pipeline.yaml",
        "executor: slurm\nstages:\n  broken:\n    run: echo about to fail; exit 3\n    outs: [o]\n",
    );
    let (summary, code) = slurm.run_json("pipeline.yaml", &[]);
    assert_eq!(code, 1, "{summary:#}");
    let stage = stage_of(&summary, "broken");
    assert_eq!(stage["state"], "failed");
    let error = stage["error"].as_str().unwrap();
    assert!(error.contains("command exited with status 3"), "{error}");
    assert!(error.contains("about to fail"), "the error shows the log's tail: {error}");
    let log = std::fs::read_to_string(stage["log"].as_str().unwrap()).unwrap();
    assert!(log.contains("about to fail"), "{log}");
    assert_eq!(slurm.calls("sbatch").len(), 1, "a failed command is not resubmitted");
    // Nothing was recorded: the next run tries again.
    let (status, _) = slurm.p.status_json("pipeline.yaml", &[]);
    assert_eq!(state_of(&status, "broken"), "will_run");
}

#[test]
fn interrupting_the_run_cancels_the_job_with_scancel() {
    let Some(_cluster) = cluster() else { return };
    let slurm = SlurmProject::new();
    slurm.p.write(
        "pipeline.yaml",
        "executor: slurm\nstages:\n  slow-interrupt:\n    run: touch $SDPIPE_PROJECT/started; sleep 120; echo x > o\n    outs: [o]\n",
    );
    let mut child = start_until_started(slurm.cmd().args(["run", "pipeline.yaml"]), slurm.p.path());
    assert_eq!(active_jobs("sdpipe-slow-interrupt").len(), 1);
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert_eq!(slurm.calls("scancel").len(), 1, "scancel was called once");
    assert!(
        wait_until_no_job("sdpipe-slow-interrupt", Duration::from_secs(30)),
        "the job is still there"
    );
    let (status, _) = slurm.p.status_json("pipeline.yaml", &[]);
    assert_eq!(state_of(&status, "slow-interrupt"), "will_run", "nothing recorded");
}

#[test]
fn a_sigkilled_sdpipe_leaves_no_job_running() {
    let Some(_cluster) = cluster() else { return };
    let slurm = SlurmProject::new();
    slurm.p.write(
        "pipeline.yaml",
        "executor: slurm\nstages:\n  slow-killed:\n    run: touch $SDPIPE_PROJECT/started; sleep 120; echo x > o\n    outs: [o]\n",
    );
    let mut child = start_until_started(slurm.cmd().args(["run", "pipeline.yaml"]), slurm.p.path());
    child.kill().unwrap(); // SIGKILL: no cleanup code in sdpipe runs
    child.wait().unwrap();
    assert!(
        wait_until_no_job("sdpipe-slow-killed", Duration::from_secs(30)),
        "the job outlived sdpipe"
    );
    assert_eq!(slurm.calls("scancel").len(), 1, "the watchdog cancelled the job");
}

#[test]
fn a_job_lost_with_its_node_is_submitted_again() {
    let Some(_cluster) = cluster() else { return };
    let node = String::from_utf8(
        Command::new("sinfo").args(["-h", "-N", "-o", "%N"]).output().unwrap().stdout,
    )
    .unwrap()
    .lines()
    .next()
    .unwrap()
    .to_string();
    let slurm = SlurmProject::new();
    // The first attempt waits to be killed with its node; the second finds the marker and ends.
    slurm.p.write(
        "pipeline.yaml",
        "executor: slurm\nstages:\n  flaky-node:\n    run: |\n      \
         if [ -e $SDPIPE_PROJECT/started ]; then echo second > o; exit 0; fi\n      \
         touch $SDPIPE_PROJECT/started\n      sleep 120\n    outs: [o]\n",
    );
    let child = slurm
        .cmd()
        .args(["run", "pipeline.yaml", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&slurm.p.path().join("started"), Duration::from_secs(60));
    let scontrol = |state: &str| {
        let mut args =
            vec!["update".to_string(), format!("nodename={node}"), format!("state={state}")];
        if state == "down" {
            args.push("reason=sdpipe-test".into());
        }
        let out = Command::new("scontrol").args(&args).output().unwrap();
        // Resuming a node that came back by itself is refused; only taking it down must work.
        if state == "down" {
            assert!(
                out.status.success(),
                "scontrol {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    scontrol("down");
    // The job is lost with the node; once sdpipe has resubmitted, bring the node back.
    let t = Instant::now();
    while slurm.calls("sbatch").len() < 2 && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(200));
    }
    scontrol("resume");
    let out = child.wait_with_output().unwrap();
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{summary:#}");
    assert_eq!(slurm.calls("sbatch").len(), 2, "resubmitted once after the node failure");
    assert_eq!(slurm.p.read("runs/pipeline/flaky-node/o"), "second\n");
    let log =
        std::fs::read_to_string(stage_of(&summary, "flaky-node")["log"].as_str().unwrap()).unwrap();
    assert!(log.contains("NODE_FAIL") && log.contains("submitting again"), "{log}");
}

// Pipeline checks of `executor` and `resources`: no cluster needed, always run.

/// Validation errors from `status --json`, asserting exit code 2.
#[test]
fn an_unknown_executor_is_located_with_a_suggestion() {
    let p = Project::new();
    p.write("p.yaml", "stages:\n  a:\n    run: echo > o\n    outs: [o]\n    executor: slrum\n");
    let e = spec_errors(&p, "p.yaml");
    assert_eq!(e.len(), 1, "{e:#?}");
    assert_eq!(e[0]["message"], "unknown executor `slrum`");
    assert_eq!(located(&e[0]), (5, 15));
    assert_eq!(e[0]["help"], "did you mean `slurm`?");
}

#[test]
fn bad_resources_are_each_located() {
    let p = Project::new();
    p.write(
        "p.yaml",
        "resources: {cpus: 0}\nstages:\n  a:\n    run: echo > o\n    outs: [o]\n    executor: slurm\n    \
         resources:\n      mem: 16GB\n      time: 1h\n      partition: gpu a100\n      gpus: -1\n      disk: 5G\n",
    );
    let e = spec_errors(&p, "p.yaml");
    let messages: Vec<&str> = e.iter().map(|e| e["message"].as_str().unwrap()).collect();
    assert_eq!(e.len(), 6, "{messages:#?}");
    let find = |needle: &str| {
        e.iter()
            .find(|e| e["message"].as_str().unwrap().contains(needle))
            .unwrap_or_else(|| panic!("no error about {needle}: {messages:#?}"))
    };
    assert_eq!(located(find("`resources.cpus` must be an integer between 1 and 1024")), (1, 19));
    assert_eq!(located(find("`resources.mem`: `16GB` is not a memory amount")), (8, 12));
    assert_eq!(located(find("`resources.time`: `1h` is not a Slurm time limit")), (9, 13));
    assert_eq!(located(find("`resources.partition`: `gpu a100`")), (10, 18));
    assert_eq!(located(find("`resources.gpus` must be an integer between 0 and 64")), (11, 13));
    assert_eq!(located(find("unknown key `disk` in `resources`")), (12, 7));
}

#[test]
fn executor_and_resources_are_not_part_of_the_key() {
    let p = Project::new();
    p.write("p.yaml", "stages:\n  a:\n    run: echo hi > o\n    outs: [o]\n");
    p.run_ok("p.yaml", &[]);
    // Moving the stage to a cluster with other resources finds the same result.
    p.write(
        "p.yaml",
        "executor: slurm\nresources: {cpus: 4, mem: 8G}\nstages:\n  a:\n    run: echo hi > o\n    \
         outs: [o]\n    resources: {time: '1:00:00', partition: gpu}\n",
    );
    let (status, code) = p.status_json("p.yaml", &[]);
    assert_eq!(code, 0, "{status:#}");
    assert_eq!(state_of(&status, "a"), "cached");
}

#[test]
fn a_request_the_cluster_can_never_satisfy_fails_the_stage_instead_of_waiting() {
    let Some(_cluster) = cluster() else { return };
    let slurm = SlurmProject::new();
    slurm.p.write(
        "pipeline.yaml",
        "executor: slurm\nstages:\n  too-big:\n    run: echo > o\n    outs: [o]\n    resources: {cpus: 1024}\n",
    );
    let t = Instant::now();
    let (summary, code) = slurm.run_json("pipeline.yaml", &[]);
    assert_eq!(code, 1, "{summary:#}");
    let error = stage_of(&summary, "too-big")["error"].as_str().unwrap().to_string();
    // sbatch may refuse it outright, or queue it with a reason that never clears.
    assert!(error.contains("--cpus-per-task=1024") || error.contains("cannot submit"), "{error}");
    assert!(t.elapsed() < Duration::from_secs(60), "it waited");
    assert!(
        wait_until_no_job("sdpipe-too-big", Duration::from_secs(30)),
        "the job was left queued"
    );
}

#[test]
fn a_stage_wanting_more_threads_than_any_node_has_gets_the_largest_node() {
    let Some(_cluster) = cluster() else { return };
    let out = Command::new("sinfo").args(["-h", "-N", "-o", "%c"]).output().unwrap();
    let largest: usize = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().trim_end_matches('+').parse().ok())
        .max()
        .expect("sinfo names a node");
    let slurm = SlurmProject::new();
    slurm.p.write(
        "pipeline.yaml",
        "executor: slurm\nstages:\n  greedy:\n    run: echo $SDPIPE_THREADS > n\n    \
         threads: 1000\n    outs: [n]\n",
    );
    let (summary, code) = slurm.run_json("pipeline.yaml", &[]);
    assert_eq!(code, 0, "{summary:#}");
    assert_eq!(slurm.p.read("runs/pipeline/greedy/n").trim(), largest.to_string());
    let log = std::fs::read_to_string(stage_of(&summary, "greedy")["log"].as_str().unwrap());
    assert!(log.unwrap().contains(&format!("asking for {largest}")));
}

/// The demo pipeline, plus one CPU per job: two jobs share the test node, and the outputs are
/// then compared with a local run's on two threads. Resources are not part of any key, so every
/// run below shares keys whatever it declares.
fn with_demo(p: &Project) {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/demo.yaml");
    let demo = std::fs::read_to_string(demo).unwrap();
    p.write("pipelines/demo.yaml", &format!("resources: {{cpus: 1, mem: 2G, time: 30}}\n{demo}"));
}

fn remote_states(summary: &Value) -> Vec<String> {
    let stages = summary["stages"].as_array().unwrap();
    stages.iter().map(|s| s["remote"].as_str().unwrap_or("").to_string()).collect()
}

/// `value` without any member named `key`, at any depth.
fn drop_key(value: &mut Value, key: &str) {
    match value {
        Value::Object(map) => {
            map.remove(key);
            map.values_mut().for_each(|v| drop_key(v, key));
        }
        Value::Array(items) => items.iter_mut().for_each(|v| drop_key(v, key)),
        _ => {}
    }
}

/// Stages of `pipelines/demo.yaml` with its two-point sweep.
const DEMO_STAGES: usize = 30;

/// What a team gets: the cluster computes, the bucket shares, a teammate's machine reuses.
#[test]
fn the_demo_through_slurm_matches_a_local_run_and_a_second_machine_on_its_remote_reruns_nothing() {
    let Some(_cluster) = cluster() else { return };
    let server = S3Server::start();
    let with_remote = |c: &mut Command| {
        credentials(c)
            .env("SDPIPE_REMOTE", format!("s3://{BUCKET}/demo"))
            .env("SDPIPE_REMOTE_ENDPOINT", server.endpoint())
            .env("SDPIPE_REMOTE_ALLOW_HTTP", "true");
    };
    let run = |c: &mut Command, executor: &str| {
        c.args(["run", "pipelines/demo.yaml", "--json", "--executor", executor]);
        let (summary, code) = json_of(c.args(DEMO_AT_TEST_SIZE));
        assert_eq!(code, 0, "run failed: {summary:#}");
        summary
    };
    let outputs = |p: &Project| tree(&p.path().join("runs/demo"));
    let differing = |a: &Project, b: &Project| -> Vec<String> {
        let (a, b) = (outputs(a), outputs(b));
        let names = |t: &[(String, Vec<u8>)]| t.iter().map(|f| f.0.clone()).collect::<Vec<_>>();
        assert_eq!(names(&a), names(&b), "different files");
        a.into_iter().zip(b).filter(|(x, y)| x.1 != y.1).map(|(x, _)| x.0).collect()
    };

    // One machine: every stage a Slurm job, every result pushed to the bucket.
    let machine = SlurmProject::new();
    with_demo(&machine.p);
    let mut c = machine.cmd();
    with_remote(&mut c);
    let on_slurm = run(&mut c, "slurm");
    assert_eq!(in_state(&on_slurm, "ran").len(), DEMO_STAGES, "{on_slurm:#}");
    assert_eq!(machine.calls("sbatch").len(), DEMO_STAGES, "one job per stage");
    // Every result pushed: the parallel sweep points upload the same model files at once, and
    // a conditional PUT that loses that race may see its connection reset (remote/s3.rs).
    let states = remote_states(&on_slurm);
    assert!(states.iter().all(|s| s == "pushed"), "{on_slurm:#}");

    // The same pipeline run locally, without the bucket: the same keys and the same bytes.
    let local = Project::new();
    with_demo(&local);
    let on_local = run(&mut local.cmd(), "local");
    assert_eq!(keys(&on_slurm), keys(&on_local), "the executor is not part of any key");
    // Every output is byte-identical but the report, which also shows how long each stage
    // took to compute: equal but for those times.
    let report = "report/report/report.json";
    assert_eq!(differing(&machine.p, &local), ["report/report/README.md", report]);
    let without_times = |p: &Project| {
        let mut json: Value =
            serde_json::from_str(&p.read(&format!("runs/demo/{report}"))).unwrap();
        drop_key(&mut json, "seconds");
        json
    };
    assert_eq!(without_times(&machine.p), without_times(&local));

    // A teammate's machine: a fresh checkout and cache, the same bucket. Nothing runs.
    let teammate = Project::new();
    with_demo(&teammate);
    let mut c = teammate.cmd();
    with_remote(&mut c);
    let pulled = run(&mut c, "local");
    assert_eq!(in_state(&pulled, "cached").len(), DEMO_STAGES, "{pulled:#}");
    assert!(remote_states(&pulled).iter().all(|s| s == "pulled"), "{pulled:#}");
    assert_eq!(differing(&teammate, &machine.p), Vec::<String>::new(), "pulled outputs differ");
}
