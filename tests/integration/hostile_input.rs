//! Hostile input: malformed pipelines (the corpus in `tests/hostile/pipelines/`), shell
//! metacharacters everywhere a value reaches a command, outputs and dependencies that try to
//! reach outside, and the fuzzers' corpora replayed. Every case ends in a clear error or a
//! literal, harmless result; nothing is ever written outside the project and its cache (a
//! sibling directory is snapshotted around each case).

use crate::common;
use common::*;

#[path = "../../fuzz/checks.rs"]
mod fuzz_checks;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Corpus file → (exit code, part of the message, line of that error; `None`: unlocated).
const CORPUS: &[(&str, i32, &str, Option<u64>)] = &[
    ("alias_bomb.yaml", 2, "repetition limit exceeded", Some(1)),
    ("cycle_three.yaml", 2, "dependency cycle: a → b → c → a", Some(2)),
    ("deep_nesting.yaml", 2, "recursion limit exceeded", Some(5)),
    ("duplicate_stage.yaml", 2, "duplicate entry with key \"a\"", Some(2)),
    ("empty.yaml", 2, "the pipeline has no `stages`", Some(1)),
    ("huge_integer_param.yaml", 2, "184467440737095516160000", Some(4)),
    ("huge_threads.yaml", 2, "`threads` must be an integer between 1 and 1024", Some(5)),
    ("long_stage_name.yaml", 2, "at most 64", Some(2)),
    ("missing_dependency.yaml", 2, "`data/does-not-exist.csv` does not exist", Some(4)),
    ("negative_count.yaml", 2, "-5 is out of range", Some(4)),
    ("not_a_mapping.yaml", 2, "must be a mapping, found string", Some(1)),
    ("not_utf8.yaml", 2, "hostile.yaml:3:15: the pipeline is not UTF-8 text", None),
    ("output_absolute.yaml", 2, "must be relative to the stage's output directory", Some(4)),
    ("output_escapes_with_dotdot.yaml", 2, "must not contain `..`", Some(4)),
    ("self_reference.yaml", 2, "cannot take its own output `loop.o`", Some(4)),
    ("stage_name_with_metacharacters.yaml", 2, "stage name `a;touch pwned`", Some(2)),
    ("syntax_tab_indent.yaml", 2, "cannot start any token", Some(2)),
    ("syntax_unclosed_flow.yaml", 2, "did not find expected ',' or ']'", Some(5)),
    ("unknown_kind.yaml", 2, "unknown stage kind `rm-rf`", Some(3)),
    ("unknown_template_namespace_reference.yaml", 2, "no params entry `missing`", Some(3)),
    ("wrong_type_stages_is_a_list.yaml", 2, "`stages` must be a mapping, found list", Some(2)),
    ("wrong_type_threads.yaml", 2, "`threads` must be an integer", Some(5)),
];

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A project and a sibling directory beside it, under one parent: what the project's pipelines
/// do must never show up in the sibling.
struct Arena {
    parent: tempfile::TempDir,
}

impl Arena {
    fn new() -> Arena {
        let parent = tempfile::tempdir().unwrap();
        std::fs::create_dir(parent.path().join("project")).unwrap();
        std::fs::write(parent.path().join("project/sdpipe.toml"), "").unwrap();
        std::fs::create_dir(parent.path().join("sibling")).unwrap();
        std::fs::write(parent.path().join("sibling/target.txt"), "sibling's own bytes\n").unwrap();
        Arena { parent }
    }
    fn project(&self) -> PathBuf {
        self.parent.path().join("project")
    }
    fn sibling(&self) -> PathBuf {
        self.parent.path().join("sibling")
    }
    fn write(&self, rel: &str, content: &[u8]) {
        let p = self.project().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    fn sdpipe(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(assert_cmd::cargo::cargo_bin!("sdpipe"))
            .current_dir(self.project())
            .env_remove("SDPIPE_CACHE")
            .env("NO_COLOR", "1")
            .args(args)
            .output()
            .unwrap()
    }
    fn run_json(&self, args: &[&str]) -> (serde_json::Value, i32, String) {
        let out = self.sdpipe(args);
        let stderr = stderr(&out);
        let value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?}: no JSON on stdout ({e}): {}\n{stderr}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        (value, out.status.code().unwrap_or(-1), stderr)
    }
}

/// Path → (mode, bytes) of everything under `dir`, symlinks as their targets.
fn snapshot(dir: &Path) -> BTreeMap<String, (u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for entry in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let entry = entry.unwrap();
        let rel = entry.path().strip_prefix(dir).unwrap().to_string_lossy().into_owned();
        let meta = entry.path().symlink_metadata().unwrap();
        let content = if meta.is_file() {
            std::fs::read(entry.path()).unwrap()
        } else if meta.file_type().is_symlink() {
            std::fs::read_link(entry.path()).unwrap().to_string_lossy().as_bytes().to_vec()
        } else {
            Vec::new()
        };
        out.insert(rel, (meta.permissions().mode(), content));
    }
    out
}

/// Top-level names in the project other than the cache and the run directories.
fn project_files(arena: &Arena) -> BTreeSet<String> {
    std::fs::read_dir(arena.project())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "cache" && n != "runs")
        .collect()
}

fn assert_no_panic(stderr: &str, context: &str) {
    assert!(!stderr.contains("panicked"), "{context}: sdpipe panicked:\n{stderr}");
}

#[test]
fn a_200_kb_pipeline_of_nested_brackets_is_refused_at_its_129th_bracket_without_delay() {
    // 100,000 levels: the YAML scanner's cost grows with the depth at every token, so before the
    // nesting guard this took over 30 s to be refused (1.1 s at 20,000 levels).
    let depth = 100_000;
    let arena = Arena::new();
    let text = format!(
        "stages:\n  a:\n    run: echo\n    params: {{x: {}{}}}\n",
        "[".repeat(depth),
        "]".repeat(depth)
    );
    arena.write("hostile.yaml", text.as_bytes());
    let started = std::time::Instant::now();
    let (summary, code, err) = arena.run_json(&["run", "hostile.yaml", "--json"]);
    let elapsed = started.elapsed();
    assert_no_panic(&err, "nested brackets");
    assert_eq!(code, 2, "{summary:#}");
    let error = &summary["errors"][0];
    assert!(error["message"].as_str().unwrap().contains("recursion limit exceeded"), "{error:#}");
    assert_eq!(error["line"], 4, "{error:#}");
    // `params: {x: ` is 16 characters, then 127 brackets; the 128th `[` is the 129th level.
    assert_eq!(error["column"], 17 + 127, "{error:#}");
    // A bound on the class of bug, not a benchmark: one linear pass takes milliseconds.
    assert!(elapsed < std::time::Duration::from_secs(5), "refused after {elapsed:?}");
}

#[test]
fn every_corpus_pipeline_is_refused_with_a_located_error_and_nothing_written() {
    let dir = repo_path("tests/hostile/pipelines");
    let files: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let listed: BTreeSet<String> = CORPUS.iter().map(|c| c.0.to_string()).collect();
    assert_eq!(files, listed, "every corpus file needs an expectation in CORPUS");

    for (file, exit, message, line) in CORPUS {
        let arena = Arena::new();
        arena.write("hostile.yaml", &std::fs::read(dir.join(file)).unwrap());
        let sibling = snapshot(&arena.sibling());
        let (summary, code, err) = arena.run_json(&["run", "hostile.yaml", "--json"]);
        assert_no_panic(&err, file);
        assert_eq!(code, *exit, "{file}: exit code; {summary:#}\n{err}");
        assert_eq!(summary["ok"], false, "{file}");
        let errors = summary["errors"].as_array().unwrap_or_else(|| panic!("{file}: {summary:#}"));
        let hit = errors
            .iter()
            .find(|e| e["message"].as_str().unwrap_or_default().contains(message))
            .unwrap_or_else(|| panic!("{file}: no error says `{message}`: {summary:#}"));
        match line {
            Some(line) => {
                assert_eq!(hit["file"], "hostile.yaml", "{file}: {hit:#}");
                assert_eq!(hit["line"].as_u64(), Some(*line), "{file}: {hit:#}");
                assert!(hit["column"].as_u64().is_some_and(|c| c >= 1), "{file}: {hit:#}");
            }
            None => assert!(hit["line"].is_null(), "{file}: {hit:#}"),
        }
        // The same error reaches a person on stderr without `--json`.
        let human = arena.sdpipe(&["run", "hostile.yaml"]);
        assert_eq!(human.status.code(), Some(*exit), "{file}");
        let human_err = stderr(&human);
        assert_no_panic(&human_err, file);
        let first_words: String = message.chars().take(20).collect();
        assert!(
            human_err.contains(&first_words),
            "{file}: stderr lacks `{first_words}`:\n{human_err}"
        );
        // Refused before anything ran: no cache, no run directory, nothing outside.
        assert_eq!(
            project_files(&arena),
            BTreeSet::from(["hostile.yaml".to_string(), "sdpipe.toml".to_string()]),
            "{file}"
        );
        assert!(!arena.project().join("runs").exists(), "{file}: a run directory was made");
        assert_eq!(snapshot(&arena.sibling()), sibling, "{file}: wrote outside the project");
    }
}

/// The hostile strings every substitution must pass through literally.
const NASTY: &[&str] = &[
    "x; touch pwned1",
    "$(touch pwned2)",
    "`touch pwned3`",
    "a && touch pwned4 || touch pwned4b",
    "| tee pwned5",
    "> pwned6",
    "'single' \"double\" \\backslash",
    "line one\nline two; touch pwned7",
    "*",
    "~",
    "-n",
    "$HOME ${HOME} $$ $? !! #comment",
    "${params.x}",
];

fn pwned_files(root: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("pwned"))
        .map(|e| e.path().to_path_buf())
        .collect()
}

#[test]
fn shell_metacharacters_in_params_vars_lists_and_overrides_stay_literal() {
    let arena = Arena::new();
    let yaml_list =
        NASTY.iter().map(|s| serde_json::to_string(s).unwrap()).collect::<Vec<_>>().join(", ");
    let pipeline = format!(
        "vars:\n  v: {v}\nstages:\n  s:\n    run: |\n      printf '%s\\n' ${{params.one}} > params.txt\n      printf '%s\\n' ${{params.all}} >> params.txt\n      printf '%s\\n' ${{vars.v}} > vars.txt\n      printf '%s\\n' \"$SDPIPE_PARAM_ONE\" > env.txt\n    params: {{one: {one}, all: [{yaml_list}]}}\n    outs: [params.txt, vars.txt, env.txt]\n",
        v = serde_json::to_string(NASTY[1]).unwrap(),
        one = serde_json::to_string(NASTY[0]).unwrap(),
    );
    arena.write("p.yaml", pipeline.as_bytes());
    let sibling = snapshot(&arena.sibling());
    let (s, code, stderr) = arena.run_json(&["run", "p.yaml", "--json"]);
    assert_eq!(code, 0, "{s:#}\n{stderr}");
    let read = |f: &str| std::fs::read_to_string(arena.project().join("runs/p/s").join(f)).unwrap();
    let mut want = format!("{}\n", NASTY[0]);
    for n in NASTY {
        want.push_str(n);
        want.push('\n');
    }
    assert_eq!(read("params.txt"), want);
    assert_eq!(read("vars.txt"), format!("{}\n", NASTY[1]));
    assert_eq!(read("env.txt"), format!("{}\n", NASTY[0]));

    // The same through `--set`, for every hostile string.
    for (i, nasty) in NASTY.iter().enumerate() {
        let set = format!("s.one={}", serde_json::to_string(nasty).unwrap());
        let (s, code, stderr) = arena.run_json(&["run", "p.yaml", "--json", "--set", &set]);
        assert_eq!(code, 0, "override {i}: {s:#}\n{stderr}");
        assert!(read("params.txt").starts_with(&format!("{nasty}\n")), "override {i}");
    }
    assert_eq!(pwned_files(arena.parent.path()), Vec::<PathBuf>::new());
    assert_eq!(snapshot(&arena.sibling()), sibling);
}

#[test]
fn dependency_and_output_file_names_with_metacharacters_are_quoted() {
    let arena = Arena::new();
    let name = "we ird;$(touch pwned1) `touch pwned2` 'q\".txt";
    arena.write(&format!("data/{name}"), b"dep bytes\n");
    let pipeline = format!(
        "stages:\n  s:\n    run: cat ${{deps.d}} > ${{outs.o}}\n    deps: {{d: {dep}}}\n    outs: {{o: {out}}}\n",
        dep = serde_json::to_string(&format!("data/{name}")).unwrap(),
        out = serde_json::to_string("out $(touch pwned3);.txt").unwrap(),
    );
    arena.write("p.yaml", pipeline.as_bytes());
    let (s, code, stderr) = arena.run_json(&["run", "p.yaml", "--json"]);
    assert_eq!(code, 0, "{s:#}\n{stderr}");
    let out = arena.project().join("runs/p/s/out $(touch pwned3);.txt");
    assert_eq!(std::fs::read_to_string(out).unwrap(), "dep bytes\n");
    assert_eq!(pwned_files(arena.parent.path()), Vec::<PathBuf>::new());
}

#[test]
fn an_output_that_is_a_symlink_out_of_scratch_is_refused_and_nothing_is_stored() {
    let arena = Arena::new();
    let target = arena.sibling().join("target.txt");
    let pipeline = format!(
        "stages:\n  file_link:\n    run: ln -s {t} out.txt\n    outs: [out.txt]\n  dir_link:\n    run: mkdir d; echo ok > d/fine.txt; ln -s {t} d/escape.txt\n    outs: [d]\n  dir_is_link:\n    run: ln -s {s} d\n    outs: [d]\n",
        t = target.display(),
        s = arena.sibling().display(),
    );
    arena.write("p.yaml", pipeline.as_bytes());
    let sibling = snapshot(&arena.sibling());
    let (s, code, stderr) = arena.run_json(&["run", "p.yaml", "--json"]);
    assert_eq!(code, 1, "{s:#}\n{stderr}");
    assert_no_panic(&stderr, "symlink outputs");
    for stage in ["file_link", "dir_link", "dir_is_link"] {
        assert_eq!(state_of(&s, stage), "failed", "{s:#}");
        let error = stage_of(&s, stage)["error"].as_str().unwrap();
        assert!(
            error.contains("symbolic link") || error.contains("neither a file nor a directory"),
            "{stage}: {error}"
        );
    }
    // The sibling's bytes never entered the store, and the sibling is untouched.
    let stored = snapshot(&arena.project().join("cache/objects"));
    assert!(
        stored.values().all(|(_, bytes)| bytes != b"sibling's own bytes\n"),
        "stored a file from outside"
    );
    assert_eq!(snapshot(&arena.sibling()), sibling);
    let (status, _) = {
        let (v, c, _) = arena.run_json(&["status", "p.yaml", "--json"]);
        (v, c)
    };
    assert_eq!(in_state(&status, "cached"), Vec::<String>::new(), "nothing was recorded");
}

#[test]
fn a_pipeline_named_dotdot_keeps_its_run_directories_under_runs() {
    // `...yaml` has the stem `..`: its run directory must not become the project root, where
    // materialising stage `data` would replace the project's own `data/`.
    let arena = Arena::new();
    arena.write("data/precious.txt", b"keep me\n");
    arena.write("...yaml", b"stages:\n  data:\n    run: echo out > o\n    outs: [o]\n");
    let (s, code, stderr) = arena.run_json(&["run", "...yaml", "--json"]);
    assert_eq!(code, 0, "{s:#}\n{stderr}");
    assert_eq!(
        std::fs::read_to_string(arena.project().join("data/precious.txt")).unwrap(),
        "keep me\n"
    );
    let out = PathBuf::from(stage_of(&s, "data")["outputs"]["o"].as_str().unwrap());
    assert!(out.starts_with(arena.project().join("runs")), "{}", out.display());
    assert_eq!(std::fs::read_to_string(out).unwrap(), "out\n");
}

#[test]
fn a_symlinked_file_dependency_outside_the_project_is_read_and_keyed_by_its_content() {
    // Deps are read, never written: one outside the project (data on another disk) is allowed,
    // and its content, not its name, is in the key.
    let arena = Arena::new();
    std::os::unix::fs::symlink(
        arena.sibling().join("target.txt"),
        arena.project().join("link.txt"),
    )
    .unwrap();
    arena.write(
        "p.yaml",
        b"stages:\n  s:\n    run: cat ${deps.d} > o\n    deps: {d: link.txt}\n    outs: [o]\n",
    );
    let (s, code, _) = arena.run_json(&["run", "p.yaml", "--json"]);
    assert_eq!(code, 0, "{s:#}");
    std::fs::write(arena.sibling().join("target.txt"), "changed outside\n").unwrap();
    let (s, code, _) = arena.run_json(&["run", "p.yaml", "--json"]);
    assert_eq!(code, 0, "{s:#}");
    assert_eq!(state_of(&s, "s"), "ran", "a changed link target must rerun the stage");
    let out = stage_of(&s, "s")["outputs"]["o"].as_str().unwrap().to_string();
    assert_eq!(std::fs::read_to_string(out).unwrap(), "changed outside\n");
}

#[test]
fn a_symlinked_directory_dependency_is_a_runtime_error_naming_the_link() {
    let arena = Arena::new();
    std::os::unix::fs::symlink(arena.sibling(), arena.project().join("linkdir")).unwrap();
    arena.write(
        "p.yaml",
        b"stages:\n  s:\n    run: ls ${deps.d} > o\n    deps: {d: linkdir}\n    outs: [o]\n",
    );
    let sibling = snapshot(&arena.sibling());
    let (s, code, stderr) = arena.run_json(&["run", "p.yaml", "--json"]);
    assert_eq!(code, 1, "{s:#}\n{stderr}");
    let error = stage_of(&s, "s")["error"].as_str().unwrap();
    assert!(error.contains("linkdir") && error.contains("symbolic link"), "{error}");
    assert_eq!(snapshot(&arena.sibling()), sibling);
}

#[test]
fn variables_are_substituted_once_never_recursively() {
    // Two variables naming each other must not loop: a variable's value is text, and a
    // `${vars...}` inside it reaches the command as written.
    let arena = Arena::new();
    arena.write(
        "p.yaml",
        b"vars:\n  a: \"${vars.b}\"\n  b: \"${vars.a}\"\nstages:\n  s:\n    run: echo ${params.x} > o\n    params: {x: \"${vars.a}\"}\n    outs: [o]\n",
    );
    let (s, code, stderr) = arena.run_json(&["run", "p.yaml", "--json"]);
    assert_eq!(code, 0, "{s:#}\n{stderr}");
    let out = stage_of(&s, "s")["outputs"]["o"].as_str().unwrap().to_string();
    assert_eq!(std::fs::read_to_string(out).unwrap(), "${vars.b}\n");
}

#[test]
fn a_nul_byte_in_a_param_is_a_clear_stage_error() {
    let arena = Arena::new();
    arena.write("p.yaml", b"stages:\n  s:\n    run: echo ${params.m} > o\n    params: {m: \"a\\0b\"}\n    outs: [o]\n");
    let (s, code, stderr) = arena.run_json(&["run", "p.yaml", "--json"]);
    assert_eq!(code, 1, "{s:#}\n{stderr}");
    assert!(stage_of(&s, "s")["error"].as_str().unwrap().contains("NUL byte"), "{s:#}");
}

#[test]
fn hostile_override_paths_are_usage_errors() {
    let arena = Arena::new();
    arena.write("p.yaml", b"stages:\n  s:\n    run: echo hi > o\n    outs: [o]\n");
    for set in ["../../etc.x=1", "s=1", "=1", "s.", "vars..x=1", "nope.x=1"] {
        let out = arena.sdpipe(&["run", "p.yaml", "--set", set]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "--set {set}: {err}");
        assert_no_panic(&err, set);
        assert!(err.contains("error") || err.contains('×'), "--set {set}: {err}");
    }
    // `--set` reaches declared parameters only: `s.run` names no parameter of `s` (and never
    // the stage's command), so it is refused before anything runs.
    let out = arena.sdpipe(&["run", "p.yaml", "--set", "s.run=touch pwned"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("has no `run`"), "{}", stderr(&out));
    assert!(!arena.project().join("runs/p/s/o").exists());
    assert_eq!(pwned_files(arena.parent.path()), Vec::<PathBuf>::new());
}

/// Every file of a fuzz corpus, for replay.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = repo_path("fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    files.sort();
    files
}

fn replay(target: &str, check: fn(&[u8])) {
    let files = corpus(target);
    assert!(files.len() >= 10, "the {target} corpus is missing ({} files)", files.len());
    for (path, bytes) in files {
        let result = std::panic::catch_unwind(|| check(&bytes));
        assert!(result.is_ok(), "fuzz corpus file {} fails its check", path.display());
    }
}

#[test]
fn the_pipeline_fuzz_corpus_replays_cleanly() {
    replay("pipeline", fuzz_checks::pipeline);
}

#[test]
fn the_tsv_fuzz_corpus_replays_cleanly() {
    replay("tsv", fuzz_checks::tsv);
}

#[test]
fn a_command_that_writes_into_its_input_fails_and_never_leaves_a_damaged_result() {
    // As root the read-only bits of an input view do not stop the write, which would reach
    // the stored object behind the hardlink; sdpipe notices, evicts it and fails the stage.
    let arena = Arena::new();
    let pipeline = |command: &str| {
        format!("stages:\n  source:\n    run: echo clean > out.txt\n    outs: {{text: out.txt}}\n  reader:\n    run: {command}\n    inputs: {{text: source.text}}\n    outs: [o]\n")
    };
    arena.write(
        "p.yaml",
        pipeline("echo vandalised >> ${inputs.text}; cat ${inputs.text} > o").as_bytes(),
    );
    let (s, code, stderr) = arena.run_json(&["run", "p.yaml", "--json"]);
    assert_eq!(code, 1, "{s:#}\n{stderr}");
    assert_eq!(state_of(&s, "reader"), "failed", "{s:#}");
    let error = stage_of(&s, "reader")["error"].as_str().unwrap();
    assert!(
        error.contains("wrote into its input `text`") || error.contains("Permission denied"),
        "{error}"
    );
    arena.write("p.yaml", pipeline("cat ${inputs.text} > o").as_bytes());
    let (s, code, stderr) = arena.run_json(&["run", "p.yaml", "--json"]);
    assert_eq!(code, 0, "{s:#}\n{stderr}");
    let out = stage_of(&s, "reader")["outputs"]["o"].as_str().unwrap().to_string();
    assert_eq!(std::fs::read_to_string(out).unwrap(), "clean\n", "the reader got clean bytes");
    let (report, code, _) = arena.run_json(&["cache", "verify", "--json"]);
    assert_eq!(code, 0, "{report:#}");
}
