//! Storage faults: bytes flipped in stored objects and in the index, a full disk and a
//! read-only object store during a commit. In every case sdpipe says what is wrong, records
//! nothing it cannot stand behind, never serves bad bytes, and recovers once the fault is gone.

use crate::common;
use common::*;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The object file holding `stage`'s output `output`.
fn object_of(p: &Project, stage: &str, output: &str) -> PathBuf {
    let (shown, code) = p.json(&["show", "pipeline.yaml", stage, "--json"]);
    assert_eq!(code, 0, "{shown:#}");
    PathBuf::from(shown["record"]["outputs"][output]["object"].as_str().unwrap())
}

/// Flip one bit of a read-only file in place (as a failing disk or a careless root would).
fn flip_bit(path: &Path, offset: usize) {
    let mode = std::fs::metadata(path).unwrap().permissions();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    let at = offset % bytes.len();
    bytes[at] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, mode).unwrap();
}

fn verify(p: &Project) -> (Value, i32) {
    p.json(&["cache", "verify", "--json"])
}

fn digest_of(object: &Path) -> String {
    let shard = object.parent().unwrap().file_name().unwrap().to_string_lossy();
    format!("{shard}{}", object.file_name().unwrap().to_string_lossy())
}

#[test]
fn a_flipped_bit_in_an_object_is_detected_evicted_and_recomputed() {
    let p = chain_project();
    p.run_ok("pipeline.yaml", &[]);
    let object = object_of(&p, "upper", "text");
    flip_bit(&object, 3);

    let (report, code) = verify(&p);
    assert_eq!(code, 1, "verify must fail on corruption: {report:#}");
    assert_eq!(report["corrupt_objects"], serde_json::json!([digest_of(&object)]));
    let evicted = report["records_evicted"].as_array().unwrap();
    assert!(evicted.iter().any(|r| r.as_str().unwrap().starts_with("upper ")), "{report:#}");
    assert!(!object.exists(), "the corrupt object is removed");

    let s = p.run_ok("pipeline.yaml", &[]);
    assert_eq!(state_of(&s, "upper"), "ran", "the evicted stage recomputes: {s:#}");
    assert_eq!(state_of(&s, "source"), "cached");
    // Early cutoff: the recomputed bytes are the same, so `count` stays cached.
    assert_eq!(state_of(&s, "count"), "cached");
    assert_eq!(p.read("runs/pipeline/upper/up.txt"), "HELLO PIPELINE\n!\n");
    assert_eq!(verify(&p).1, 0, "the store is whole again");
}

#[test]
fn a_flipped_bit_in_one_file_of_a_directory_output_evicts_the_record() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        "stages:\n  tree:\n    run: mkdir -p d/sub; echo one > d/a.txt; echo two > d/sub/b.txt\n    outs: {d: d}\n  use:\n    run: cat ${inputs.d}/sub/b.txt > o\n    inputs: {d: tree.d}\n    outs: [o]\n",
    );
    p.run_ok("pipeline.yaml", &[]);
    let file = std::fs::canonicalize(p.path().join("runs/pipeline/tree/d/sub/b.txt")).unwrap();
    // The run directory holds hardlinks of the objects: damaging one damages the object.
    flip_bit(&file, 0);
    let (report, code) = verify(&p);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["corrupt_objects"].as_array().unwrap().len(), 1, "{report:#}");
    assert!(report["records_evicted"].to_string().contains("tree "), "{report:#}");
    let s = p.run_ok("pipeline.yaml", &[]);
    assert_eq!(state_of(&s, "tree"), "ran");
    assert_eq!(p.read("runs/pipeline/tree/d/sub/b.txt"), "two\n");
    assert_eq!(p.read("runs/pipeline/use/o"), "two\n");
}

#[test]
fn a_damaged_tree_manifest_evicts_the_record_and_the_stage_recomputes() {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        "stages:\n  tree:\n    run: mkdir d; echo x > d/x\n    outs: {d: d}\n",
    );
    p.run_ok("pipeline.yaml", &[]);
    let manifest = object_of(&p, "tree", "d");
    flip_bit(&manifest, 1);
    let (report, code) = verify(&p);
    assert_eq!(code, 1, "{report:#}");
    assert!(report["corrupt_objects"].to_string().contains(&digest_of(&manifest)), "{report:#}");
    assert!(report["records_evicted"].to_string().contains("tree "), "{report:#}");
    let s = p.run_ok("pipeline.yaml", &[]);
    assert_eq!(state_of(&s, "tree"), "ran");
    assert_eq!(p.read("runs/pipeline/tree/d/x"), "x\n");
}

#[test]
fn a_truncated_object_is_found_by_verify_and_never_served_after() {
    let p = chain_project();
    p.run_ok("pipeline.yaml", &[]);
    let object = object_of(&p, "source", "text");
    std::fs::set_permissions(&object, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::OpenOptions::new().write(true).open(&object).unwrap().set_len(3).unwrap();
    let (report, code) = verify(&p);
    assert_eq!(code, 1, "{report:#}");
    let s = p.run_ok("pipeline.yaml", &[]);
    assert_eq!(state_of(&s, "source"), "ran");
    assert_eq!(p.read("runs/pipeline/source/out.txt"), "hello pipeline\n");
    assert_eq!(p.read("runs/pipeline/count/n.txt").trim(), "17");
}

/// Single-bit flips anywhere in the index's files (seeded): the next run either reads the index
/// or moves it aside and recomputes; it never panics and never serves wrong bytes.
#[test]
fn bit_flips_in_the_index_never_panic_and_never_give_wrong_outputs() {
    let p = chain_project();
    p.run_ok("pipeline.yaml", &[]);
    let pristine = tempfile::tempdir().unwrap();
    copy_tree(&p.path().join("cache"), pristine.path());
    let files: Vec<PathBuf> = walkdir::WalkDir::new(pristine.path().join("index"))
        .into_iter()
        .map(Result::unwrap)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.path().strip_prefix(pristine.path()).unwrap().to_path_buf())
        .collect();
    let mut seed = 0x1dea_u64;
    let (mut recovered, mut read_fine) = (0, 0);
    for round in 0..24 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let file = &files[(seed >> 33) as usize % files.len()];
        let cache = p.path().join("cache");
        make_writable(&cache);
        std::fs::remove_dir_all(&cache).unwrap();
        copy_tree(pristine.path(), &cache);
        let target = cache.join(file);
        let len = std::fs::metadata(&target).unwrap().len() as usize;
        // sled preallocates: flip inside the written part of the log, where damage matters.
        let written =
            std::fs::read(&target).unwrap().iter().rposition(|b| *b != 0).unwrap_or(0) + 1;
        let offset = (seed >> 7) as usize % written.min(len).max(1);
        flip_bit(&target, offset);

        let out = p.cmd().args(["run", "pipeline.yaml", "--json"]).output().unwrap();
        let err = stderr(&out);
        let context = format!("round {round}: bit flipped in {} at {offset}", file.display());
        assert!(!err.contains("panicked"), "{context}: {err}");
        assert_eq!(out.status.code(), Some(0), "{context}: {err}");
        assert_eq!(p.read("runs/pipeline/upper/up.txt"), "HELLO PIPELINE\n!\n", "{context}");
        assert_eq!(p.read("runs/pipeline/count/n.txt").trim(), "17", "{context}");
        if err.contains("damaged") {
            recovered += 1;
        } else {
            read_fine += 1;
        }
    }
    eprintln!("index bit flips: {read_fine} read fine, {recovered} moved aside and recomputed");
}

#[test]
fn a_garbage_index_is_moved_aside_reported_and_the_pipeline_recomputes() {
    let p = chain_project();
    p.run_ok("pipeline.yaml", &[]);
    std::fs::write(p.path().join("cache/index/conf"), "not a sled config\n").unwrap();
    std::fs::write(p.path().join("cache/index/db"), vec![0xa5; 4096]).unwrap();

    let (report, code) = verify(&p);
    assert_eq!(code, 1, "verify reports the damaged index: {report:#}");
    let aside = PathBuf::from(report["damaged_index_moved_to"].as_str().unwrap());
    assert!(aside.join("db").exists(), "the damaged index is kept for inspection");
    assert_eq!(report["corrupt_objects"], serde_json::json!([]), "the objects are intact");

    // Every stage recomputes into the fresh index, with the same bytes as before.
    let s = p.run_ok("pipeline.yaml", &[]);
    assert_eq!(in_state(&s, "ran").len(), 4, "{s:#}");
    assert_eq!(p.read("runs/pipeline/upper/up.txt"), "HELLO PIPELINE\n!\n");
    let s = p.run_ok("pipeline.yaml", &[]);
    assert_eq!(in_state(&s, "cached").len(), 4, "the fresh index holds: {s:#}");
}

#[test]
fn gc_removes_partial_objects_left_by_a_killed_writer() {
    let p = chain_project();
    p.run_ok("pipeline.yaml", &[]);
    let stray = p.path().join("cache/objects/.tmp-4194000-0");
    std::fs::write(&stray, b"half an object").unwrap();
    let (report, code) = p.json(&["gc", "--json"]);
    assert_eq!(code, 0, "{report:#}");
    assert!(!stray.exists(), "{report:#}");
    let s = p.run_ok("pipeline.yaml", &[]);
    assert_eq!(in_state(&s, "cached").len(), 4, "gc kept every live result: {s:#}");
}

// --- A full disk and a read-only store during the commit -------------------------------------

/// A mount over the cache's object directory, unmounted on drop (also when a test fails).
struct Mount(PathBuf);

impl Mount {
    /// `mount args... <dir>`; `None` (with the reason printed) where mounting is not allowed.
    fn new(dir: &Path, args: &[&str]) -> Option<Mount> {
        let out = Command::new("mount").args(args).arg(dir).output();
        match out {
            Ok(o) if o.status.success() => Some(Mount(dir.to_path_buf())),
            Ok(o) => {
                eprintln!("skipped: cannot mount ({})", String::from_utf8_lossy(&o.stderr).trim());
                None
            }
            Err(e) => {
                eprintln!("skipped: no mount command ({e})");
                None
            }
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A stage whose 256 KiB output must be copied into the object store.
fn commit_project() -> Project {
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        "stages:\n  big:\n    run: head -c 262144 /dev/urandom > blob.bin; cksum < blob.bin > sum.txt\n    outs: {blob: blob.bin, sum: sum.txt}\n  after:\n    run: cksum < ${inputs.blob} > check.txt\n    inputs: {blob: big.blob}\n    outs: [check.txt]\n",
    );
    // Create the cache so its object directory can be mounted over.
    let (_, code) = p.status_json("pipeline.yaml", &[]);
    assert_eq!(code, 0);
    p
}

/// After a failed commit: the error names the cause, nothing is recorded, no partial object.
fn assert_failed_commit_left_nothing(p: &Project, s: &Value, cause: &str) {
    assert_eq!(state_of(s, "big"), "failed", "{s:#}");
    assert_eq!(state_of(s, "after"), "skipped", "{s:#}");
    let error = stage_of(s, "big")["error"].as_str().unwrap();
    assert!(error.contains("storing output") && error.contains(cause), "{error}");
    let (status, _) = p.status_json("pipeline.yaml", &[]);
    assert_eq!(in_state(&status, "cached"), Vec::<String>::new(), "nothing recorded: {status:#}");
    let partial: Vec<_> = std::fs::read_dir(p.path().join("cache/objects"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".tmp-"))
        .collect();
    assert!(partial.is_empty(), "partial objects left behind: {partial:?}");
}

/// Once the fault is gone the same run succeeds, and the stored blob checks out downstream.
fn assert_recovers(p: &Project) {
    let s = p.run_ok("pipeline.yaml", &[]);
    assert_eq!(in_state(&s, "ran").len(), 2, "{s:#}");
    let sum = p.read("runs/pipeline/big/sum.txt");
    assert_eq!(p.read("runs/pipeline/after/check.txt"), sum);
    assert_eq!(verify(p).1, 0);
}

#[test]
fn a_full_object_store_fails_the_commit_cleanly_and_the_next_run_succeeds() {
    let p = commit_project();
    let objects = p.path().join("cache/objects");
    let Some(mount) = Mount::new(&objects, &["-t", "tmpfs", "-o", "size=64k", "tmpfs"]) else {
        return;
    };
    let (s, code) = p.run_json("pipeline.yaml", &[]);
    assert_eq!(code, 1, "{s:#}");
    assert_failed_commit_left_nothing(&p, &s, "No space left on device");
    drop(mount); // space is back
    assert_recovers(&p);
}

#[test]
fn a_read_only_object_store_fails_the_commit_cleanly_and_the_next_run_succeeds() {
    let p = commit_project();
    let objects = p.path().join("cache/objects");
    // Root ignores permission bits, so as root the store is made read-only by a mount.
    let root = unsafe { libc::geteuid() } == 0;
    let mount = if root {
        let Some(bind) = Mount::new(&objects, &["--bind", objects.to_str().unwrap()]) else {
            return;
        };
        let ro = Command::new("mount").args(["-o", "remount,ro,bind"]).arg(&objects).status();
        if !ro.is_ok_and(|s| s.success()) {
            eprintln!("skipped: cannot remount the object store read-only");
            return;
        }
        Some(bind)
    } else {
        std::fs::set_permissions(&objects, std::fs::Permissions::from_mode(0o555)).unwrap();
        None
    };
    let (s, code) = p.run_json("pipeline.yaml", &[]);
    assert_eq!(code, 1, "{s:#}");
    let cause = if root { "Read-only file system" } else { "Permission denied" };
    assert_failed_commit_left_nothing(&p, &s, cause);
    drop(mount);
    std::fs::set_permissions(&objects, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_recovers(&p);
}

#[test]
fn a_file_size_limit_hit_by_the_commit_fails_cleanly_and_the_next_run_succeeds() {
    // Works without root: RLIMIT_FSIZE (with SIGXFSZ ignored, so writes fail with EFBIG). The
    // stage's files are empty, but the tree manifest naming 3,000 long names is ~900 KiB.
    let p = Project::new();
    p.write(
        "pipeline.yaml",
        "stages:\n  wide:\n    run: |\n      mkdir d; cd d\n      for i in $(seq 1 3000); do printf -v name 'f%0200d' $i; : > \"$name\"; done\n    outs: {d: d}\n",
    );
    // The index exists before the limit (sled preallocates 512 KiB), so only the commit hits it.
    let (_, code) = p.status_json("pipeline.yaml", &[]);
    assert_eq!(code, 0);
    let limited = Command::new("bash")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 600; exec \"$0\" run pipeline.yaml --json")
        .arg(assert_cmd::cargo::cargo_bin!("sdpipe"))
        .current_dir(p.path())
        .env_remove("SDPIPE_CACHE")
        .output()
        .unwrap();
    let s: Value = serde_json::from_slice(&limited.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", stderr(&limited)));
    assert_eq!(limited.status.code(), Some(1), "{s:#}");
    let error = stage_of(&s, "wide")["error"].as_str().unwrap();
    assert!(error.contains("storing output `d`") && error.contains("File too large"), "{error}");
    let (status, _) = p.status_json("pipeline.yaml", &[]);
    assert_eq!(state_of(&status, "wide"), "will_run", "nothing recorded: {status:#}");

    let s = p.run_ok("pipeline.yaml", &[]);
    assert_eq!(state_of(&s, "wide"), "ran");
    let files = std::fs::read_dir(p.path().join("runs/pipeline/wide/d")).unwrap().count();
    assert_eq!(files, 3000);
    assert_eq!(verify(&p).1, 0);
}

fn copy_tree(from: &Path, to: &Path) {
    for entry in walkdir::WalkDir::new(from) {
        let entry = entry.unwrap();
        let dest = to.join(entry.path().strip_prefix(from).unwrap());
        if entry.file_type().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
        } else if entry.file_type().is_file() {
            std::fs::copy(entry.path(), &dest).unwrap();
        }
    }
}

fn make_writable(dir: &Path) {
    for entry in walkdir::WalkDir::new(dir).into_iter().flatten() {
        let mode = if entry.file_type().is_dir() { 0o755 } else { 0o644 };
        let _ = std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode));
    }
}
