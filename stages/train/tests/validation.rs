//! Validation images during training: the `train` kind's `validation_*` parameters on a tiny
//! random Stable Diffusion and a synthetic dataset.

mod common;
mod files;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{log_lines, synthetic_dataset, tiny_pipeline, train_params};
use files::tree;
use sdpipe_diffusion::sample_stage::Sample;
use sdpipe_stages::api::StageError;
use sdpipe_stages::testing::{self, Harness};
use sdpipe_train::train_stage::Train;
use serde_json::{json, Value};

const SEED: u64 = 3;
const INFERENCE_STEPS: u64 = 4;

/// Validation every 2 of 5 steps on the first two test captions, with EMA.
fn validation_settings() -> Vec<(&'static str, Value)> {
    vec![
        ("max_train_steps", json!(5)),
        ("use_ema", json!(true)),
        ("validation_steps", json!(2)),
        ("num_validation_prompts", json!(2)),
        ("validation_seed", json!(SEED)),
        ("validation_num_inference_steps", json!(INFERENCE_STEPS)),
    ]
}

/// A tiny pipeline, a dataset (two test images) and a training run with `settings`; the
/// temporary folders live as long as the value.
struct Run {
    _dir: tempfile::TempDir,
    data: (Harness, Harness),
    run: Harness,
}

impl Run {
    fn new(settings: &[(&str, Value)]) -> Run {
        let dir = tempfile::tempdir().unwrap();
        let pipeline = tiny_pipeline(dir.path());
        let data = synthetic_dataset(6);
        let mut run = Harness::new()
            .input("dataset", data.1.out_dir().join("dataset"))
            .input("pipeline", &pipeline);
        run.threads = 2;
        run.run(&Train::default(), &train_params(settings)).unwrap();
        Run { _dir: dir, data, run }
    }

    fn dataset(&self) -> PathBuf {
        self.data.1.out_dir().join("dataset")
    }

    fn validation(&self) -> PathBuf {
        self.run.out_dir().join("validation")
    }

    fn index(&self) -> Value {
        serde_json::from_slice(&read(&self.validation().join("validation.json"))).unwrap()
    }
}

/// The run with [`validation_settings`], shared by the tests that only read its outputs.
fn validated() -> &'static Run {
    static RUN: OnceLock<Run> = OnceLock::new();
    RUN.get_or_init(|| Run::new(&validation_settings()))
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn pixels(path: &Path) -> image::RgbImage {
    image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8()
}

/// The largest difference of one channel of one pixel between two images of the same size.
fn largest_difference(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
}

/// The test split's captions in id order (file stems), as the `sample` kind takes them.
fn test_captions(dataset: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dataset.join("test/metadata.jsonl")).unwrap();
    let mut rows: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    rows.sort_by_key(|r| r["file_name"].as_str().unwrap().to_string());
    rows.iter().map(|r| r["text"].as_str().unwrap().to_string()).collect()
}

#[test]
fn images_are_drawn_every_validation_steps_and_after_the_last_step() {
    let names: Vec<String> = tree(&validated().validation()).into_keys().collect();
    let mut expected = vec!["validation.json".to_string()];
    for step in ["000002", "000004", "000005"] {
        for prompt in ["00", "01"] {
            expected.push(format!("step-{step}/prompt-{prompt}.png"));
        }
    }
    expected.sort();
    assert_eq!(names, expected);
}

#[test]
fn validation_json_lists_the_prompts_steps_settings_and_every_image_with_its_seed() {
    let run = validated();
    let index = run.index();
    assert_eq!(index["prompts"], json!(test_captions(&run.dataset())), "test captions, id order");
    assert_eq!(index["steps"], json!([2, 4, 5]));
    assert_eq!(index["seed"], json!(SEED));
    assert_eq!(index["num_inference_steps"], json!(INFERENCE_STEPS));
    assert_eq!(index["guidance_scale"], json!(7.5));
    assert_eq!(index["scheduler"], json!("pndm"));
    assert_eq!(index["resolution"], json!(common::SIZE), "the training resolution");
    let images = index["images"].as_array().unwrap();
    assert_eq!(images.len(), 6);
    assert_eq!(
        images[3],
        json!({"step": 4, "prompt": 1, "seed": SEED + 1, "file_name": "step-000004/prompt-01.png"})
    );
}

#[test]
fn each_validation_draws_the_weights_of_its_step() {
    let validation = validated().validation();
    for prompt in ["prompt-00.png", "prompt-01.png"] {
        let first = pixels(&validation.join("step-000002").join(prompt));
        let last = pixels(&validation.join("step-000005").join(prompt));
        let changed = largest_difference(&first, &last);
        assert!(changed > 0, "{prompt}: three more steps of training change the image");
    }
}

#[test]
fn the_last_images_are_what_sample_draws_from_the_saved_ema_model() {
    let run = validated();
    let mut sample = Harness::new()
        .input("prompts", run.dataset())
        .input("pipeline", run.run.out_dir().join("model"));
    sample.threads = 2;
    let kind = Sample::default();
    let params = testing::params(
        &kind,
        &[
            ("steps", json!(INFERENCE_STEPS)),
            ("seed", json!(SEED)),
            ("scheduler", json!("pndm")),
            ("guidance_scale", json!(7.5)),
            ("threads", json!(2)),
        ],
    );
    sample.run(&kind, &params).unwrap();
    let records = std::fs::read_to_string(sample.out_dir().join("samples.jsonl")).unwrap();
    let sampled: Vec<Value> = records.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(sampled.len(), 2);
    for (i, record) in sampled.iter().enumerate() {
        let ours = run.validation().join(format!("step-000005/prompt-{i:02}.png"));
        let theirs = sample.out_dir().join("images").join(record["file_name"].as_str().unwrap());
        assert_eq!(record["prompt"], run.index()["prompts"][i]);
        assert_eq!(largest_difference(&pixels(&ours), &pixels(&theirs)), 0, "prompt {i}");
    }
}

#[test]
fn validation_leaves_training_unchanged() {
    let mut without = validation_settings();
    without.retain(|(name, _)| *name != "validation_steps");
    let plain = Run::new(&without);
    let (validated, plain) = (validated().run.out_dir(), plain.run.out_dir());
    let weights = "model/unet/diffusion_pytorch_model.safetensors";
    assert_eq!(read(&validated.join(weights)), read(&plain.join(weights)));
    assert_eq!(log_lines(validated), log_lines(plain));
}

#[test]
fn validation_time_goes_to_the_log_apart_from_training_time() {
    let run = validated();
    let log = run.run.log_text();
    for step in [2, 4, 5] {
        assert!(log.contains(&format!("validation at step {step}: 2 images in ")), "{log}");
    }
    assert!(log.contains("steps 1..=5: training ") && log.contains("s, validation "), "{log}");
    let index = String::from_utf8(read(&run.validation().join("validation.json"))).unwrap();
    assert!(!index.contains("second"), "no timing in the output: {index}");
}

#[test]
fn listed_validation_prompts_are_drawn_in_their_order() {
    let prompts = ["a red circle on a blue background", "a green square"];
    let run = Run::new(&[
        ("max_train_steps", json!(1)),
        ("validation_steps", json!(1)),
        ("validation_prompts", json!(prompts)),
        ("validation_num_inference_steps", json!(2)),
        ("validation_guidance_scale", json!(1.0)),
        ("validation_resolution", json!(8)),
    ]);
    let index = run.index();
    assert_eq!(index["prompts"], json!(prompts));
    assert_eq!(index["resolution"], json!(8));
    let image = pixels(&run.validation().join("step-000001/prompt-01.png"));
    assert_eq!(image.dimensions(), (8, 8));
}

#[test]
fn with_train_text_encoder_validation_draws_with_the_trained_encoder() {
    let mut settings = validation_settings();
    settings.push(("train_text_encoder", json!(true)));
    let run = Run::new(&settings);
    // The saved pipeline's text encoder is the trained one (EMA). The `sample` kind runs it as
    // candle-transformers' CLIP, validation as the trained model itself (sdpipe-unet's): two
    // implementations, equal to the bit here, but float rounding may flip an 8-bit value
    // elsewhere, hence the tolerance of 1.
    let mut sample = Harness::new()
        .input("prompts", run.dataset())
        .input("pipeline", run.run.out_dir().join("model"));
    let kind = Sample::default();
    let params = testing::params(
        &kind,
        &[("steps", json!(INFERENCE_STEPS)), ("seed", json!(SEED)), ("threads", json!(2))],
    );
    sample.run(&kind, &params).unwrap();
    let records = std::fs::read_to_string(sample.out_dir().join("samples.jsonl")).unwrap();
    let first: Value = serde_json::from_str(records.lines().next().unwrap()).unwrap();
    let theirs =
        pixels(&sample.out_dir().join("images").join(first["file_name"].as_str().unwrap()));
    let ours = pixels(&run.validation().join("step-000005/prompt-00.png"));
    let frozen = pixels(&validated().validation().join("step-000005/prompt-00.png"));
    let from_saved = largest_difference(&ours, &theirs);
    assert!(from_saved <= 1, "as sampled from the saved model, up to {from_saved}");
    assert!(largest_difference(&ours, &frozen) > 0, "not the frozen encoder's");
}

#[test]
fn validation_settings_that_cannot_work_are_refused_naming_the_parameter() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = tiny_pipeline(dir.path());
    let (_images, dataset) = synthetic_dataset(4);
    let cases: [(&[(&str, Value)], &str); 3] = [
        (&[("validation_steps", json!(2))], "validation_steps"),
        (
            &[
                ("validation_steps", json!(2)),
                ("validation_prompts", json!(["a"])),
                ("num_validation_prompts", json!(2)),
            ],
            "num_validation_prompts",
        ),
        (
            &[
                ("validation_steps", json!(2)),
                ("num_validation_prompts", json!(1)),
                ("validation_resolution", json!(10)),
            ],
            "validation_resolution",
        ),
    ];
    for (settings, parameter) in cases {
        let mut h = Harness::new()
            .input("dataset", dataset.out_dir().join("dataset"))
            .input("pipeline", &pipeline);
        let mut all = vec![("max_train_steps", json!(2))];
        all.extend(settings.iter().cloned());
        let error = h.run(&Train::default(), &train_params(&all)).unwrap_err();
        assert!(
            matches!(&error, StageError::InvalidParam { param, .. } if param == parameter),
            "{parameter}: {error}"
        );
        assert!(!h.log_text().contains("step 1/"), "{parameter}: refused before training");
    }
}
