//! What the fuzz targets assert, shared with the corpus replay in `tests/integration/hostile_input.rs`
//! (included there with `#[path]`), so a corpus file is checked the same way in both places.
//!
//! Beyond "never panics", each check states the invariants a caller relies on: a rejected
//! pipeline says why (a message, and a location inside the file when it has one); an accepted
//! one is a DAG whose bindings all resolve and whose outputs stay inside their directories.

use std::path::{Component, Path};

use sdpipe::spec::Pipeline;

/// Parse and validate `data` as a pipeline file. The first line, when it starts with `--set `,
/// holds space-separated overrides, so the fuzzer also reaches command-line sweep axes.
pub fn pipeline(data: &[u8]) {
    let text = String::from_utf8_lossy(data).into_owned();
    let (overrides, body) = match text.strip_prefix("--set ") {
        Some(rest) => {
            let (line, body) = rest.split_once('\n').unwrap_or((rest, ""));
            let overrides: Vec<_> = line.split(' ').filter_map(|o| o.parse().ok()).collect();
            (overrides, body.to_string())
        }
        None => (Vec::new(), text),
    };
    // Built once: constructing every kind per input would dominate the fuzzer's time.
    static REGISTRY: std::sync::OnceLock<sdpipe_stages::api::Registry> = std::sync::OnceLock::new();
    let registry = REGISTRY.get_or_init(sdpipe::kinds::builtin);
    let file = Path::new("/nonexistent-fuzz-project/fuzz.yaml");
    let lines = body.lines().count() + 1;
    match Pipeline::from_source(file, "fuzz.yaml".into(), body, registry, &overrides) {
        Err(errors) => {
            assert!(!errors.0.is_empty(), "rejected without an error");
            for e in &errors.0 {
                assert!(!e.message.trim().is_empty(), "an error without a message");
                if let Some((_, line, column)) = e.location() {
                    assert!(line >= 1 && line <= lines + 1, "line {line} outside the file");
                    assert!(column >= 1, "column {column}");
                }
            }
        }
        Ok(p) => {
            let dag = sdpipe::dag::Dag::build(&p);
            assert_eq!(dag.topo_order().len(), p.stages.len(), "an accepted pipeline has a cycle");
            for stage in p.stages.values() {
                for binding in stage.inputs.values() {
                    let up = p.stages.get(&binding.stage).expect("binding to a missing stage");
                    assert!(up.output(&binding.output).is_some(), "binding to a missing output");
                }
                for out in &stage.outputs {
                    let path = Path::new(&out.path);
                    assert!(
                        path.components()
                            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir)),
                        "output path {:?} escapes its directory",
                        out.path
                    );
                }
            }
        }
    }
}

/// Read `data` as an Unsplash Lite `photos` shard.
pub fn tsv(data: &[u8]) {
    if let Err(message) = sdpipe_data::unsplash::fuzz_read_shard(data) {
        assert!(message.contains("photos.tsv000"), "the error names the shard: {message}");
    }
}
