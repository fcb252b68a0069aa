//! Fixtures the `sample` tests share: tiny pipelines made by the `tiny-sd` kind and imagefolder
//! prompt files, and fast settings.

use std::fs;
use std::path::PathBuf;

use sdpipe_diffusion::tiny_sd_stage::TinySd;
use sdpipe_stages::testing::{params, Harness};
use serde_json::{json, Value};

/// A tiny pipeline made by the `tiny-sd` kind with `overrides` (kept alive with its harness).
fn tiny_pipeline_with(overrides: &[(&str, Value)]) -> (Harness, PathBuf) {
    let mut h = Harness::new();
    h.run(&TinySd, &params(&TinySd, overrides)).unwrap();
    let model = h.out_dir().join("model");
    (h, model)
}

/// A tiny pipeline with the kind's default settings.
pub fn tiny_pipeline() -> (Harness, PathBuf) {
    tiny_pipeline_with(&[])
}

/// A tiny pipeline whose random weights come from `seed`.
pub fn tiny_pipeline_seeded(seed: i64) -> (Harness, PathBuf) {
    tiny_pipeline_with(&[("seed", json!(seed))])
}

/// Fast `sample` settings, 32-pixel images and 3 steps, then `extra`.
pub fn quick(extra: &[(&'static str, Value)]) -> Vec<(&'static str, Value)> {
    let mut p = vec![("steps", json!(3)), ("height", json!(32)), ("width", json!(32))];
    p.extend(extra.iter().cloned());
    p
}

/// An imagefolder with a `test/metadata.jsonl` of the given (file_name, text) lines.
pub fn prompts(lines: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let split = dir.path().join("test");
    fs::create_dir_all(&split).unwrap();
    let text: String =
        lines.iter().map(|(f, t)| json!({"file_name": f, "text": t}).to_string() + "\n").collect();
    fs::write(split.join("metadata.jsonl"), text).unwrap();
    dir
}
