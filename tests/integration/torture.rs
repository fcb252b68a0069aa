//! Crash torture: `sdpipe run` is killed with SIGKILL at seeded pseudo-random moments spread over
//! a whole run (dependency hashing, running commands, storing objects, committing records,
//! materialising run directories), then run again. After every kill:
//!
//! - `cache verify` finds no corrupt object and no record missing its objects;
//! - no stage whose record was committed before the kill (`status` says cached) is executed
//!   again by the next run;
//! - once a run completes, the run directory is byte-for-byte a clean run's.
//!
//! The campaign goes on until a set number of kills have landed mid-run: how many of the drawn
//! moments fall after a run has already finished depends on the machine's load, so counting
//! tries would let a busy CI machine test almost nothing (one did: 8 of 30 kills landed).
//! `SDPIPE_TORTURE_KILLS=500 cargo test --test integration torture:: -- --nocapture` runs a
//! longer campaign (default 20 landed kills, well under a minute); `SDPIPE_TORTURE_SEED` picks
//! another seed.

use crate::common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// Fan-out from `seed` to a large file and a directory of many files, two consumers, and a
/// fan-in. Each command notes its stage in `exec.log` so the test sees every execution, also
/// of runs it kills.
const PIPELINE: &str = r#"
stages:
  seed:
    run: |
      echo "$SDPIPE_STAGE" >> $SDPIPE_PROJECT/exec.log
      head -c 128 ${deps.blob} | od -An -tx1 > seed.txt
    deps: {blob: data/blob.bin}
    outs: {s: seed.txt}
  big:
    run: |
      echo "$SDPIPE_STAGE" >> $SDPIPE_PROJECT/exec.log
      head -c 16000000 < <(yes "$(head -n 1 ${inputs.s})") > big.bin
    inputs: {s: seed.s}
    outs: {big: big.bin}
  many:
    run: |
      echo "$SDPIPE_STAGE" >> $SDPIPE_PROJECT/exec.log
      mkdir -p files/sub
      for i in $(seq 1 200); do echo "file $i $(head -n 1 ${inputs.s})" > files/f$i.txt; done
      for i in $(seq 1 50); do echo "nested $i" > files/sub/n$i.txt; done
    inputs: {s: seed.s}
    outs: {files: files}
  sum_big:
    run: |
      echo "$SDPIPE_STAGE" >> $SDPIPE_PROJECT/exec.log
      cksum < ${inputs.big} > sum.txt
      sleep 0.1
    inputs: {big: big.big}
    outs: {sum: sum.txt}
  count_many:
    run: |
      echo "$SDPIPE_STAGE" >> $SDPIPE_PROJECT/exec.log
      ls ${inputs.files} | wc -l > n.txt
      cat ${inputs.files}/f7.txt ${inputs.files}/sub/n3.txt >> n.txt
    inputs: {files: many.files}
    outs: {n: n.txt}
  join:
    run: |
      echo "$SDPIPE_STAGE" >> $SDPIPE_PROJECT/exec.log
      cat ${inputs.sum} ${inputs.n} > report.txt
      cp ${inputs.big} copy.bin
    inputs: {sum: sum_big.sum, n: count_many.n, big: big.big}
    outs: {report: report.txt, copy: copy.bin}
"#;

/// A deterministic 4 MB dependency: hashing it is a measurable part of every cold start.
fn blob() -> Vec<u8> {
    let mut rng = Rng(7);
    (0..4 << 20).map(|_| rng.next() as u8).collect()
}

fn torture_project(blob: &[u8]) -> Project {
    let p = Project::new();
    p.write("pipeline.yaml", PIPELINE);
    std::fs::create_dir_all(p.path().join("data")).unwrap();
    std::fs::write(p.path().join("data/blob.bin"), blob).unwrap();
    p
}

/// splitmix64: a seeded, dependency-free generator, so every campaign is reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Every file under `dir` (hidden ones included) with its bytes, by relative path.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for entry in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let entry = entry.unwrap();
        let rel = entry.path().strip_prefix(dir).unwrap().to_string_lossy().into_owned();
        if entry.file_type().is_file() {
            out.insert(rel, std::fs::read(entry.path()).unwrap());
        } else if entry.file_type().is_dir() && !rel.is_empty() {
            out.insert(format!("{rel}/"), Vec::new());
        } else if !rel.is_empty() {
            out.insert(format!("{rel} (not a file)"), Vec::new());
        }
    }
    out
}

fn describe_difference(
    want: &BTreeMap<String, Vec<u8>>,
    got: &BTreeMap<String, Vec<u8>>,
) -> String {
    let w: BTreeSet<&String> = want.keys().collect();
    let g: BTreeSet<&String> = got.keys().collect();
    let differing: Vec<&String> =
        w.intersection(&g).filter(|k| want[**k] != got[**k]).copied().collect();
    let first = |v: Vec<&String>| v.into_iter().take(10).cloned().collect::<Vec<_>>();
    format!(
        "missing: {:?}\nunexpected: {:?}\ndifferent bytes: {:?} (first 10 of each)",
        first(w.difference(&g).copied().collect()),
        first(g.difference(&w).copied().collect()),
        first(differing)
    )
}

fn exec_log(p: &Project) -> Vec<String> {
    std::fs::read_to_string(p.path().join("exec.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn spawn_run(p: &Project, force_all: bool) -> Child {
    let mut cmd = p.cmd();
    cmd.args(["run", "pipeline.yaml", "--json"]);
    if force_all {
        cmd.arg("--force-all");
    }
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn sdpipe")
}

/// Stages `status` reports cached: their records are committed.
fn committed(p: &Project) -> BTreeSet<String> {
    let (s, code) = p.status_json("pipeline.yaml", &[]);
    assert_eq!(code, 0, "status after a kill must work: {s:#}");
    in_state(&s, "cached").into_iter().collect()
}

/// `cache verify` after a kill: nothing corrupt, no record without its objects.
fn assert_cache_intact(p: &Project, context: &str) {
    // A kill that lands before the run has created its cache's index has recorded nothing;
    // `cache verify` rightly refuses a folder without an index ("no sdpipe cache"), seen when a
    // kill landed within the first milliseconds, before or just after `cache/` was made.
    if !p.path().join("cache/index").exists() {
        return;
    }
    let (report, code) = p.json(&["cache", "verify", "--json"]);
    assert_eq!(code, 0, "{context}: cache verify failed: {report:#}");
    assert_eq!(report["corrupt_objects"], serde_json::json!([]), "{context}: {report:#}");
    assert_eq!(report["records_evicted"], serde_json::json!([]), "{context}: {report:#}");
}

/// Run to completion; return the summary.
fn run_to_completion(p: &Project, context: &str) -> serde_json::Value {
    let (s, code) = p.run_json("pipeline.yaml", &[]);
    assert_eq!(code, 0, "{context}: the run after the kill failed: {s:#}");
    s
}

/// Kill a run after `delay`; returns whether the kill landed before the run finished.
fn kill_after(mut child: Child, delay: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < delay {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1).min(delay.saturating_sub(t0.elapsed())));
    }
    let landed = child.try_wait().unwrap().is_none();
    let _ = child.kill(); // SIGKILL: no destructor, no signal handler runs
    child.wait().unwrap();
    landed
}

fn stray_temps(p: &Project) -> usize {
    std::fs::read_dir(p.path().join("cache/objects"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(".tmp-"))
        .count()
}

/// Run `p` to completion after a kill: what was committed stays cached, and the run directory
/// equals a clean run's.
fn finish_and_compare(
    p: &Project,
    committed: &BTreeSet<String>,
    want: &BTreeMap<String, Vec<u8>>,
    context: &str,
) {
    let log_before = exec_log(p).len();
    let s = run_to_completion(p, context);
    for name in committed {
        assert_eq!(state_of(&s, name), "cached", "{context}: `{name}` was committed: {s:#}");
    }
    let redone: Vec<String> =
        exec_log(p)[log_before..].iter().filter(|s| committed.contains(*s)).cloned().collect();
    assert!(redone.is_empty(), "{context}: committed stages ran again: {redone:?}");
    let got = tree(&p.path().join("runs"));
    assert!(
        got == *want,
        "{context}: outputs differ from a clean run's\n{}",
        describe_difference(want, &got)
    );
    assert_cache_intact(p, context);
}

#[derive(Default, Debug)]
struct Tally {
    tried: u64,
    landed: u64,
    survived: u64,
    /// Partial objects (`objects/.tmp-*`) killed runs left; garbage that `gc` removes.
    stray_temps: usize,
}

#[test]
fn sigkill_at_random_moments_never_corrupts_loses_or_redoes_work() {
    // Kills that must land mid-run; tries are bounded so that a run too fast to hit fails.
    let kills = env_number("SDPIPE_TORTURE_KILLS", 20);
    let max_tries = kills * 10;
    let seed = env_number("SDPIPE_TORTURE_SEED", 0x005d_919e);
    let blob = blob();

    // The reference: one clean cold run, and a clean forced rerun, timed.
    let reference = torture_project(&blob);
    let t0 = Instant::now();
    run_to_completion(&reference, "reference");
    let cold = t0.elapsed();
    let t0 = Instant::now();
    let forced = reference.run_json("pipeline.yaml", &["--force-all"]);
    assert_eq!(forced.1, 0, "{:#}", forced.0);
    let warm = t0.elapsed();
    let want = tree(&reference.path().join("runs"));
    eprintln!("clean run {cold:?}, forced rerun {warm:?}; {kills} landed kills, seed {seed:#x}");

    let mut rng = Rng(seed);
    let mut tally = Tally::default();
    let mut project = torture_project(&blob);
    while tally.landed < kills {
        assert!(tally.tried < max_tries, "too few kills landed mid-run: {tally:?}");
        // A fresh project now and then; otherwise keep killing the same one, so kills also land
        // in runs that start from a partly cached state.
        if rng.below(3) == 0 {
            project = torture_project(&blob);
        }
        let p = &project;
        let before = committed(p);
        // Forced reruns re-store and re-materialise everything: kills then land in commits and
        // run-directory swaps of results that already exist.
        let force = !before.is_empty() && rng.below(3) == 0;
        let span = if force { warm } else { cold };
        let delay = Duration::from_micros(rng.below(span.as_micros() as u64 + 1));
        let log_before = exec_log(p).len();
        tally.tried += 1;
        let landed = kill_after(spawn_run(p, force), delay);
        let context = format!("kill {} at {delay:?} (force: {force}, seed {seed:#x})", tally.tried);
        if landed {
            tally.landed += 1;
        }

        if !force {
            let redone: Vec<String> =
                exec_log(p)[log_before..].iter().filter(|s| before.contains(*s)).cloned().collect();
            assert!(redone.is_empty(), "{context}: committed stages ran again: {redone:?}");
        }
        assert_cache_intact(p, &context);
        let after = committed(p);

        // Half the time go on killing this project (the last kill is always followed through).
        if rng.below(2) == 0 && tally.landed < kills {
            tally.survived += 1;
            continue;
        }
        finish_and_compare(p, &after, &want, &context);
        tally.stray_temps += stray_temps(p);
        tally.survived += 1;
    }
    eprintln!(
        "kills tried {}, landed mid-run {}, survived {}; partial objects left for gc: {}",
        tally.tried, tally.landed, tally.survived, tally.stray_temps
    );
    assert_eq!(tally.survived, tally.tried);
}
