//! Fixtures shared by the stage tests: a tiny random SD pipeline and a synthetic imagefolder.

use std::path::{Path, PathBuf};

use sdpipe_data::imagefolder::ImageFolder;
use sdpipe_data::synthetic::Synthetic;
use sdpipe_diffusion::{write_tiny, TinySpec};
use sdpipe_stages::testing::{params, Harness};
use serde_json::{json, Value};

/// Image side of the tiny pipeline and of the training images.
pub const SIZE: u32 = 16;

/// A tiny SD1.x-shaped pipeline (UNet channels (32, 64), one cross-attention block; VAE
/// channels (32, 64), so 16-pixel images have 8×8 latents) in `dir`.
pub fn tiny_pipeline(dir: &Path) -> PathBuf {
    let root = dir.join("tiny-sd");
    let spec = TinySpec { image_size: SIZE as usize, ..TinySpec::default() };
    write_tiny(&root, &spec).expect("tiny pipeline");
    root
}

/// A synthetic imagefolder with `count` images, two held out for `test/`; kept alive by the
/// returned harnesses.
pub fn synthetic_dataset(count: u32) -> (Harness, Harness) {
    let mut images = Harness::new();
    let synthetic = Synthetic;
    images
        .run(&synthetic, &params(&synthetic, &[("count", json!(count)), ("resolution", json!(24))]))
        .expect("synthetic images");
    let folder = ImageFolder;
    let mut dataset = Harness::new()
        .input("images", images.out_dir().join("images"))
        .input("photos", images.out_dir().join("photos.jsonl"));
    dataset
        .run(&folder, &params(&folder, &[("test_count", json!(2)), ("seed", json!(0))]))
        .expect("imagefolder");
    (images, dataset)
}

/// Settings for fast tiny runs; `overrides` win.
pub fn train_params(overrides: &[(&str, Value)]) -> sdpipe_stages::api::Params {
    let kind = sdpipe_train::train_stage::Train::default();
    let mut all: Vec<(&str, Value)> = vec![
        ("resolution", json!(SIZE)),
        ("center_crop", json!(true)),
        ("train_batch_size", json!(2)),
        ("gradient_accumulation_steps", json!(1)),
        ("learning_rate", json!(1e-3)),
        ("threads", json!(2)),
    ];
    all.extend(overrides.iter().cloned());
    params(&kind, &all)
}

/// The `train_log.jsonl` lines of a finished run.
pub fn log_lines(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("train_log.jsonl"))
        .expect("train log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}
