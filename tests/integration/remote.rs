//! The shared remote cache against a real S3 server on loopback (`s3_server`): pushes,
//! verified pulls, read-only mode, interrupted uploads, a server answering 500s, concurrent
//! writers and multipart uploads, through the real `sdpipe` binary.

use crate::common;
use crate::s3_server;
use common::*;
use s3_server::*;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A project whose pipeline uses `server` as its remote under prefix `exp`. Every stage appends
/// its name to `executions.log` outside the project, so a test can tell what really ran.
struct Team {
    server: S3Server,
    project: Project,
    log: tempfile::TempDir,
}

const PIPELINE: &str = r#"
remote:
  url: s3://team-cache/exp
  endpoint: ENDPOINT
  allow_http: true
stages:
  source:
    run: |
      echo source >> LOG/executions.log
      cat ${deps.input} > out.txt
    deps: {input: data/input.txt}
    outs: {text: out.txt}
  shards:
    run: |
      echo shards >> LOG/executions.log
      mkdir -p shards/nested
      for i in 1 2 3; do echo "shard $i: $(cat ${inputs.text})" > shards/s$i.txt; done
      head -c 300000 /dev/urandom > shards/nested/blob.bin
    inputs: {text: source.text}
    outs: {dir: shards}
  count:
    run: |
      echo count >> LOG/executions.log
      cat ${inputs.dir}/s*.txt | wc -l > n.txt
    inputs: {dir: shards.dir}
    outs: {n: n.txt}
"#;

impl Team {
    fn new() -> Team {
        let server = S3Server::start();
        let log = tempfile::tempdir().unwrap();
        let project = Project::new();
        project.write("data/input.txt", "weights and captions\n");
        project.write(
            "pipeline.yaml",
            &PIPELINE
                .replace("ENDPOINT", &server.endpoint())
                .replace("LOG", &log.path().display().to_string()),
        );
        Team { server, project, log }
    }

    /// `sdpipe` in the project with the given cache directory and the test's AWS credentials
    /// (and no other AWS setting from the machine running the tests).
    fn cmd(&self, cache: &Path) -> Command {
        let mut c = self.project.cmd();
        credentials(&mut c).env("SDPIPE_CACHE", cache);
        c
    }

    fn output(&self, cache: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
        let mut c = self.cmd(cache);
        c.args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("run sdpipe")
    }

    /// `sdpipe <args> --json` → (summary, exit code, stderr).
    fn json(&self, cache: &Path, env: &[(&str, &str)], args: &[&str]) -> (Value, i32, String) {
        let mut args = args.to_vec();
        args.push("--json");
        let out = self.output(cache, env, &args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!("{args:?}: invalid JSON ({e})\n{stdout}\nstderr:\n{}", stderr(&out))
        });
        (value, out.status.code().unwrap_or(-1), stderr(&out))
    }

    fn run(&self, cache: &Path, env: &[(&str, &str)]) -> (Value, String) {
        let (summary, code, err) = self.json(cache, env, &["run", "pipeline.yaml"]);
        assert_eq!(code, 0, "run failed: {summary:#}\nstderr:\n{err}");
        (summary, err)
    }

    fn executions(&self) -> Vec<String> {
        std::fs::read_to_string(self.log.path().join("executions.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn records(&self) -> Vec<String> {
        self.server.keys("exp/sdpipe-v1/records")
    }

    /// A materialised output file of the last run, by path under `runs/pipeline/`.
    fn output_bytes(&self, rel: &str) -> Vec<u8> {
        std::fs::read(self.project.path().join("runs/pipeline").join(rel)).unwrap()
    }
}

fn remote_states(summary: &Value) -> Vec<(String, String)> {
    summary["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (s["name"].as_str().unwrap().to_string(), s["remote"].as_str().unwrap_or("").into())
        })
        .collect()
}

fn all(state: &str) -> Vec<(String, String)> {
    ["source", "shards", "count"].iter().map(|s| (s.to_string(), state.to_string())).collect()
}

#[test]
fn a_fresh_cache_with_the_same_remote_reruns_nothing() {
    let team = Team::new();
    let first = tempfile::tempdir().unwrap();
    let (summary, _) = team.run(first.path(), &[]);
    assert_eq!(in_state(&summary, "ran").len(), 3, "{summary:#}");
    assert_eq!(remote_states(&summary), all("pushed"));
    assert_eq!(team.records().len(), 3);
    let blob = team.output_bytes("shards/shards/nested/blob.bin");

    // A second machine: nothing local, same bucket.
    let second = tempfile::tempdir().unwrap();
    let (status, code, _) = team.json(second.path(), &[], &["status", "pipeline.yaml"]);
    assert_eq!(code, 0);
    assert_eq!(in_state(&status, "cached").len(), 3, "{status:#}");
    assert_eq!(remote_states(&status), all("available"));

    let (summary, _) = team.run(second.path(), &[]);
    assert_eq!(in_state(&summary, "cached").len(), 3, "{summary:#}");
    assert_eq!(remote_states(&summary), all("pulled"));
    assert_eq!(team.executions(), ["source", "shards", "count"], "nothing ran twice");
    assert_eq!(team.output_bytes("shards/shards/nested/blob.bin"), blob);
    assert_eq!(String::from_utf8(team.output_bytes("count/n.txt")).unwrap().trim(), "3");

    // Pulled results are local now: the next run needs the remote for nothing.
    let (summary, _) = team.run(second.path(), &[("SDPIPE_REMOTE", "off")]);
    assert_eq!(in_state(&summary, "cached").len(), 3, "{summary:#}");
}

#[test]
fn read_only_mode_pulls_but_never_writes() {
    let team = Team::new();
    let ci = tempfile::tempdir().unwrap();
    let (summary, _) = team.run(ci.path(), &[("SDPIPE_REMOTE_READ_ONLY", "1")]);
    assert_eq!(in_state(&summary, "ran").len(), 3);
    assert_eq!(team.server.writes(), 0, "a read-only run wrote to the bucket");
    assert!(team.records().is_empty());
    let out =
        team.output(ci.path(), &[("SDPIPE_REMOTE_READ_ONLY", "true")], &["push", "pipeline.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("read-only"), "{}", stderr(&out));
    assert_eq!(team.server.writes(), 0);

    // A writer fills the bucket; a read-only cache then pulls everything.
    let dev = tempfile::tempdir().unwrap();
    team.run(dev.path(), &[]);
    let writes = team.server.writes();
    let ci2 = tempfile::tempdir().unwrap();
    let (summary, _) = team.run(ci2.path(), &[("SDPIPE_REMOTE_READ_ONLY", "1")]);
    assert_eq!(remote_states(&summary), all("pulled"));
    assert_eq!(team.server.writes(), writes);
}

#[test]
fn an_interrupted_push_leaves_no_record_and_the_next_push_completes() {
    let team = Team::new();
    let cache = tempfile::tempdir().unwrap();
    // The run computes locally; its pushes hang after a few uploads and the process is killed.
    team.server.faults.stall_after_puts.store(2, Ordering::SeqCst);
    team.server.faults.stall.store(true, Ordering::SeqCst);
    let mut child = team
        .cmd(cache.path())
        .args(["run", "pipeline.yaml", "--json"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while team.server.faults.stalled.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the push never reached the stalled upload");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The uploads let through may still be writing when a later one stalls (they run
    // concurrently); killing the client then would cancel them too. Wait for one to land.
    while team.server.keys("exp/sdpipe-v1/objects").is_empty() {
        assert!(Instant::now() < deadline, "some objects were uploaded before the kill");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    team.server.faults.stall.store(false, Ordering::SeqCst);

    let objects = team.server.keys("exp/sdpipe-v1/objects");
    assert!(!objects.is_empty(), "some objects were uploaded before the kill");
    assert!(
        team.records().is_empty(),
        "a record appeared before its objects: {:?}",
        team.records()
    );
    // Nobody can pull a half-pushed result: a fresh cache computes it.
    let fresh = tempfile::tempdir().unwrap();
    let (status, _, _) =
        team.json(fresh.path(), &[("SDPIPE_REMOTE_READ_ONLY", "1")], &["status", "pipeline.yaml"]);
    assert!(in_state(&status, "cached").is_empty(), "{status:#}");

    // The interrupted run's stage results were committed locally; `push` finishes the job.
    let (report, code, err) = team.json(cache.path(), &[], &["push", "pipeline.yaml"]);
    assert_eq!(code, 0, "{report:#}\n{err}");
    let pushed: Vec<&str> = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(pushed[0], "pushed", "{report:#}");
    // The kill came before later stages ran: nothing of theirs to push yet.
    assert_eq!(pushed[1..], ["not_computed", "upstream_missing"], "{report:#}");
    let (report, _, _) = team.json(cache.path(), &[], &["run", "pipeline.yaml"]);
    assert!(in_state(&report, "failed").is_empty());
    team.json(cache.path(), &[], &["push", "pipeline.yaml"]);
    assert_eq!(team.records().len(), 3);
    let second = tempfile::tempdir().unwrap();
    let (summary, _) = team.run(second.path(), &[]);
    assert_eq!(remote_states(&summary), all("pulled"), "{summary:#}");
}

#[test]
fn a_server_answering_500s_does_not_fail_the_run() {
    let team = Team::new();
    team.server.faults.fail_all.store(true, Ordering::SeqCst);
    let cache = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let (summary, err) = team.run(cache.path(), &[]);
    assert!(started.elapsed() < Duration::from_secs(30), "a dead remote stalled the run");
    assert_eq!(in_state(&summary, "ran").len(), 3, "{summary:#}");
    assert_eq!(remote_states(&summary), all("pull_failed"));
    assert!(err.contains("WARN") && err.contains("s3://team-cache/exp"), "no warning:\n{err}");
    assert_eq!(err.matches("WARN").count(), 1, "one warning per outage:\n{err}");
    assert!(err.contains("not used again in this run"), "{err}");
    assert!(!err.contains(SECRET_KEY));
    assert_eq!(String::from_utf8(team.output_bytes("count/n.txt")).unwrap().trim(), "3");

    // Explicit push reports the failure (and still never prints the secret, even verbosely).
    let out = team.output(cache.path(), &[], &["-vv", "push", "pipeline.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(text.contains("FAILED"), "{text}");
    assert!(!text.contains(SECRET_KEY), "the secret key was printed:\n{text}");

    // The server recovers: the local results push as they are.
    team.server.faults.fail_all.store(false, Ordering::SeqCst);
    let (report, code, _) = team.json(cache.path(), &[], &["push", "pipeline.yaml"]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(team.records().len(), 3);
}

#[test]
fn a_corrupted_remote_object_is_refused_and_the_stage_recomputed() {
    let team = Team::new();
    let first = tempfile::tempdir().unwrap();
    team.run(first.path(), &[]);
    let blob = team.output_bytes("shards/shards/nested/blob.bin");
    // Flip bytes of the big random file's object in the bucket.
    let objects = team.server.bucket_dir().join("exp/sdpipe-v1/objects");
    let target = walkdir::WalkDir::new(&objects)
        .into_iter()
        .flatten()
        .find(|e| e.file_type().is_file() && e.metadata().unwrap().len() == blob.len() as u64)
        .expect("the blob's object")
        .into_path();
    let mut bytes = std::fs::read(&target).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&target, &bytes).unwrap();

    let second = tempfile::tempdir().unwrap();
    let (summary, err) = team.run(second.path(), &[]);
    assert_eq!(state_of(&summary, "source"), "cached");
    assert_eq!(state_of(&summary, "shards"), "ran", "{summary:#}");
    assert_eq!(stage_of(&summary, "shards")["remote"], "pull_failed");
    assert!(err.contains("does not match its name"), "{err}");
    // `count` runs again too: the recomputed shards hold a new random blob, so its key is new.
    assert_eq!(team.executions(), ["source", "shards", "count", "shards", "count"]);
    // What the stage produced locally is intact (its own fresh random blob, 300000 bytes).
    assert_eq!(team.output_bytes("shards/shards/nested/blob.bin").len(), 300000);
    let (verify, code, _) = team.json(second.path(), &[], &["cache", "verify"]);
    assert_eq!(code, 0, "the corrupt object entered the local cache: {verify:#}");
}

#[test]
fn concurrent_pushers_of_the_same_key_never_leave_a_record_without_its_objects() {
    let team = Team::new();
    // Two machines compute the same stages (the shard blob differs: it is random) offline.
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    team.run(a.path(), &[("SDPIPE_REMOTE", "off")]);
    team.run(b.path(), &[("SDPIPE_REMOTE", "off")]);
    let push = |cache: &Path| {
        team.cmd(cache)
            .args(["push", "pipeline.yaml", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (pa, pb) = (push(a.path()), push(b.path()));
    for child in [pa, pb] {
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    // source and shards have one key each; count's key follows each machine's random shards.
    assert_eq!(team.records().len(), 4, "{:?}", team.records());
    // Whichever record won for each key, its objects are all there and verify.
    let fresh = tempfile::tempdir().unwrap();
    let (report, code, err) = team.json(fresh.path(), &[], &["pull", "pipeline.yaml"]);
    assert_eq!(code, 0, "{report:#}\n{err}");
    let outcomes: Vec<&str> = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["pulled", "pulled", "pulled"], "{report:#}");
    let (summary, _) = team.run(fresh.path(), &[("SDPIPE_REMOTE", "off")]);
    assert_eq!(in_state(&summary, "cached").len(), 3);
    assert_eq!(team.executions().len(), 6, "pulling ran nothing");
}

#[test]
fn push_and_pull_commands_sync_explicitly() {
    let team = Team::new();
    let offline = tempfile::tempdir().unwrap();
    team.run(offline.path(), &[("SDPIPE_REMOTE", "off")]);
    assert_eq!(team.server.writes(), 0);
    let out = team.output(offline.path(), &[], &["push", "pipeline.yaml", "shards"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("source") && text.contains("pushed"), "{text}");
    assert!(!text.contains("count"), "only the target and what it needs: {text}");
    assert_eq!(team.records().len(), 2);
    let (report, _, _) = team.json(offline.path(), &[], &["push", "pipeline.yaml"]);
    let outcomes: Vec<&str> = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["already_on_remote", "already_on_remote", "pushed"]);

    let other = tempfile::tempdir().unwrap();
    let (report, code, _) = team.json(other.path(), &[], &["pull", "pipeline.yaml"]);
    assert_eq!(code, 0, "{report:#}");
    let (summary, _) = team.run(other.path(), &[("SDPIPE_REMOTE", "off")]);
    assert_eq!(in_state(&summary, "cached").len(), 3, "{summary:#}");
}

#[test]
fn pushing_without_a_remote_says_how_to_configure_one() {
    let p = chain_project();
    let out = p.sdpipe(&["push", "pipeline.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("SDPIPE_REMOTE"), "{}", stderr(&out));
}

#[test]
fn a_bad_remote_setting_is_a_located_error() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        "remote:\n  url: https://bucket/x\nstages:\n  a:\n    run: echo > a\n    outs: {a: a}\n",
    );
    let e = &spec_errors(&p, "pipeline.yaml")[0];
    assert_eq!(located(e), (2, 8), "{e:#}");
    assert!(e["message"].as_str().unwrap().contains("s3://bucket"), "{e:#}");
}

#[test]
fn a_large_output_goes_up_in_parts_and_comes_back_intact() {
    let server = S3Server::start();
    let project = Project::new();
    project.write(
        "pipeline.yaml",
        &format!(
            "remote: {{url: s3://{BUCKET}/big, endpoint: {}, allow_http: true}}\n\
             stages:\n  big:\n    run: head -c 70000000 /dev/urandom > big.bin\n    \
             outs: {{big: big.bin}}\n",
            server.endpoint()
        ),
    );
    let team = Team { server, project, log: tempfile::tempdir().unwrap() };
    let first = tempfile::tempdir().unwrap();
    let (summary, _) = team.run(first.path(), &[]);
    assert_eq!(stage_of(&summary, "big")["remote"], "pushed", "{summary:#}");
    let original = team.output_bytes("big/big.bin");
    assert_eq!(original.len(), 70_000_000);
    assert_eq!(team.server.faults.multipart_uploads.load(Ordering::SeqCst), 1);
    let second = tempfile::tempdir().unwrap();
    let (summary, _) = team.run(second.path(), &[]);
    assert_eq!(stage_of(&summary, "big")["remote"], "pulled", "{summary:#}");
    assert!(team.output_bytes("big/big.bin") == original, "the pulled file differs");
}

#[test]
fn an_unknown_remote_option_is_located_with_a_suggestion() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        "remote:\n  url: s3://bucket/x\n  readonly: true\nstages:\n  a:\n    run: echo > a\n    outs: {a: a}\n",
    );
    let e = &spec_errors(&p, "pipeline.yaml")[0];
    assert_eq!(located(e), (3, 3), "{e:#}");
    assert_eq!(e["help"], "did you mean `read_only`?", "{e:#}");
}

/// `sdpipe` for `team` with no AWS keys in the environment and `home` as the home directory.
fn without_env_keys(team: &Team, cache: &Path, home: &Path) -> Command {
    let mut c = team.cmd(cache);
    c.env_remove("AWS_ACCESS_KEY_ID").env_remove("AWS_SECRET_ACCESS_KEY").env("HOME", home);
    c
}

#[test]
fn credentials_come_from_the_aws_profile_when_the_environment_has_none() {
    let team = Team::new();
    let home = tempfile::tempdir().unwrap();
    let aws = home.path().join(".aws");
    std::fs::create_dir(&aws).unwrap();
    std::fs::write(
        aws.join("credentials"),
        format!(
            "[default]\naws_access_key_id = wrong\naws_secret_access_key = wrong\n\n\
                 [team]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
        ),
    )
    .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let mut c = without_env_keys(&team, cache.path(), home.path());
    let (summary, code) =
        json_of(c.env("AWS_PROFILE", "team").args(["run", "pipeline.yaml", "--json"]));
    assert_eq!(code, 0, "{summary:#}");
    assert_eq!(remote_states(&summary), all("pushed"), "{summary:#}");
}

#[test]
fn a_named_aws_profile_that_does_not_exist_is_reported_and_the_run_goes_on_locally() {
    let team = Team::new();
    let home = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let mut c = without_env_keys(&team, cache.path(), home.path());
    let out = c.env("AWS_PROFILE", "nobody").args(["run", "pipeline.yaml"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("profile `nobody`") && err.contains("continuing without"), "{err}");
    assert!(team.records().is_empty(), "nothing was pushed");
}

#[test]
fn a_remote_in_sdpipe_toml_serves_every_pipeline_of_the_project() {
    let team = Team::new();
    // The same stages, without the pipeline's own `remote:`; the project file names the bucket.
    let pipeline = team.project.read("pipeline.yaml");
    let stages = &pipeline[pipeline.find("stages:").unwrap()..];
    team.project.write("pipeline.yaml", stages);
    team.project.write(
        "sdpipe.toml",
        &format!(
            "[remote]\nurl = \"s3://{BUCKET}/exp\"\nendpoint = \"{}\"\nallow_http = true\n",
            team.server.endpoint()
        ),
    );
    let first = tempfile::tempdir().unwrap();
    let (summary, _) = team.run(first.path(), &[]);
    assert_eq!(remote_states(&summary), all("pushed"), "{summary:#}");
    let second = tempfile::tempdir().unwrap();
    let (summary, _) = team.run(second.path(), &[]);
    assert_eq!(remote_states(&summary), all("pulled"), "{summary:#}");
}

#[test]
fn a_mistake_in_sdpipe_toml_is_located_before_anything_runs() {
    let p = chain_project();
    p.write("sdpipe.toml", "[remote]\nurl = \"s3://bucket/x\"\nreadonly = true\n");
    let (v, code) = p.run_json("pipeline.yaml", &[]);
    assert_eq!(code, 2, "{v:#}");
    let e = &v["errors"][0];
    assert_eq!(located(e), (3, 1), "{v:#}");
    assert!(e["message"].as_str().unwrap().contains("readonly"), "{v:#}");
    assert!(!p.path().join("cache").exists(), "nothing was created");
}
