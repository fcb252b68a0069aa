//! The `train-lora` kind end to end on a tiny random Stable Diffusion and a synthetic dataset:
//! what it writes is a diffusers LoRA file for its base, it trains only the adapters, and it
//! resumes like `train`. (Parity of the adapters' arithmetic and of two training steps with
//! diffusers + peft: stages/unet/tests/lora.rs, stages/train/tests/lora_parity.rs.)

#[allow(dead_code)] // Each test binary uses its own part of the shared fixtures.
mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{synthetic_dataset, tiny_pipeline, SIZE};
use sdpipe_diffusion::lora_base::{unet_digest, MODEL_KEY, UNET_DIGEST_KEY};
use sdpipe_diffusion::SdPipeline;
use sdpipe_stages::api::{Params, StageError};
use sdpipe_stages::testing::{params, Harness};
use sdpipe_train::train_lora_stage::TrainLora;
use sdpipe_unet::{LoraFile, UNet};
use serde_json::{json, Value};

const LORA_FILE: &str = "lora/pytorch_lora_weights.safetensors";

/// Settings for fast tiny runs; `overrides` win.
fn lora_params(overrides: &[(&str, Value)]) -> Params {
    let mut all: Vec<(&str, Value)> = vec![
        ("resolution", json!(SIZE)),
        ("center_crop", json!(true)),
        ("train_batch_size", json!(2)),
        ("gradient_accumulation_steps", json!(1)),
        ("learning_rate", json!(1e-2)),
        ("max_train_steps", json!(4)),
        ("threads", json!(2)),
    ];
    all.extend(overrides.iter().cloned());
    params(&TrainLora::default(), &all)
}

/// A tiny pipeline and dataset, alive as long as the value.
struct World {
    dir: tempfile::TempDir,
    pipeline: PathBuf,
    data: (Harness, Harness),
}

impl World {
    fn new(images: u32) -> World {
        let dir = tempfile::tempdir().unwrap();
        let pipeline = tiny_pipeline(dir.path());
        World { pipeline, data: synthetic_dataset(images), dir }
    }

    fn harness(&self) -> Harness {
        let mut h = Harness::new()
            .input("dataset", self.data.1.out_dir().join("dataset"))
            .input("pipeline", &self.pipeline);
        h.threads = 2;
        h
    }

    fn train(&self, overrides: &[(&str, Value)]) -> Harness {
        let mut h = self.harness();
        h.run(&TrainLora::default(), &lora_params(overrides)).unwrap_or_else(|e| panic!("{e}"));
        h
    }

    /// The base UNet's prediction on fixed inputs, with `lora` merged at `scale` if given.
    fn predict(&self, lora: Option<(&Path, f64)>) -> Tensor {
        let dir = self.pipeline.join("unet");
        let weights = [dir.join("diffusion_pytorch_model.safetensors")];
        let file = lora.map(|(path, _)| LoraFile::open(path).unwrap());
        let loras: Vec<(&LoraFile, f64)> =
            file.iter().map(|f| (f, lora.expect("given").1)).collect();
        let unet = UNet::for_inference_with_lora(&dir, &weights, &loras, DType::F32, &Device::Cpu)
            .unwrap();
        let side = SIZE as usize / 2;
        let context_dim = unet.config().cross_attention_dim[0];
        let sample = Tensor::ones((1, 4, side, side), candle_core::DType::F32, &Device::Cpu);
        let context = Tensor::ones((1, 77, context_dim), candle_core::DType::F32, &Device::Cpu);
        let t = Tensor::new(&[500f32], &Device::Cpu).unwrap();
        unet.predict(&sample.unwrap(), &t, &context.unwrap()).unwrap()
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

#[test]
fn the_output_is_a_diffusers_lora_file_naming_its_base() {
    let world = World::new(6);
    let run = world.train(&[]);
    let file = LoraFile::open(&run.out_dir().join("lora")).unwrap();
    // The default targets: every attention projection of the tiny UNet's transformer blocks.
    let modules: Vec<&str> = file.modules().collect();
    assert!(!modules.is_empty());
    assert!(modules.iter().all(|m| ["to_q", "to_k", "to_v", "to_out.0"]
        .iter()
        .any(|t| m.ends_with(&format!(".{t}")))));
    let metadata = file.metadata();
    assert_eq!(metadata["format"], "pt");
    let base = SdPipeline::open(&world.pipeline).unwrap();
    assert_eq!(metadata[UNET_DIGEST_KEY], unet_digest(&base).unwrap());
    assert_eq!(metadata[MODEL_KEY], "tiny-sd", "the bound pipeline's folder name");
    // A few kB of adapters instead of the UNet.
    let lora_bytes = std::fs::metadata(run.out_dir().join(LORA_FILE)).unwrap().len();
    let unet_bytes =
        std::fs::metadata(world.pipeline.join("unet/diffusion_pytorch_model.safetensors"))
            .unwrap()
            .len();
    assert!(lora_bytes * 20 < unet_bytes, "{lora_bytes} vs {unet_bytes}");
    assert!(!run.out_dir().join("model").exists());
    assert_eq!(common::log_lines(run.out_dir()).len(), 4);
}

#[test]
fn training_moves_the_merged_model_away_from_its_base_and_scale_zero_is_the_base() {
    let world = World::new(6);
    let run = world.train(&[]);
    let lora = run.out_dir().join("lora");
    let base = world.predict(None);
    let merged = world.predict(Some((&lora, 1.0)));
    assert!(max_abs_diff(&base, &merged) > 1e-4, "the adapters learned something");
    assert_eq!(max_abs_diff(&base, &world.predict(Some((&lora, 0.0)))), 0.0);
}

#[test]
fn the_same_inputs_give_the_same_lora_file_bytes() {
    let world = World::new(4);
    let (a, b) = (world.train(&[]), world.train(&[]));
    let read = |h: &Harness| std::fs::read(h.out_dir().join(LORA_FILE)).unwrap();
    assert_eq!(read(&a), read(&b));
}

#[test]
fn a_resumed_run_ends_with_the_same_adapters_as_an_uninterrupted_one() {
    let world = World::new(6);
    let settings = [("checkpointing_steps", json!(2)), ("max_train_steps", json!(5))];
    let whole = world.train(&settings);
    let mut resumed = world.harness();
    let killed = TrainLora { interrupt_after: Some(3), ..TrainLora::default() };
    assert!(matches!(resumed.run(&killed, &lora_params(&settings)), Err(StageError::Cancelled)));
    assert!(!resumed.out_dir().join("lora").exists(), "no output from an interrupted run");
    resumed.run(&TrainLora::default(), &lora_params(&settings)).unwrap();
    assert!(resumed.log_text().contains("resuming from the checkpoint at step 2"));
    for file in [LORA_FILE, "train_log.jsonl"] {
        let read = |h: &Harness| std::fs::read(h.out_dir().join(file)).unwrap();
        assert_eq!(read(&whole), read(&resumed), "{file}");
    }
}

#[test]
fn rank_alpha_and_targets_shape_the_adapters() {
    let world = World::new(4);
    let run = world.train(&[
        ("lora_rank", json!(2)),
        ("lora_alpha", json!(3.0)),
        ("lora_target_modules", json!(["to_q", "ff.net.2"])),
        ("max_train_steps", json!(1)),
    ]);
    let file = LoraFile::open(&run.out_dir().join("lora")).unwrap();
    let modules: Vec<&str> = file.modules().collect();
    assert!(modules.iter().any(|m| m.ends_with(".ff.net.2")), "{modules:?}");
    assert!(modules.iter().all(|m| m.ends_with(".to_q") || m.ends_with(".ff.net.2")));
    let adapter = &file.metadata()["lora_adapter_metadata"];
    let adapter: Value = serde_json::from_str(adapter).unwrap();
    assert_eq!(adapter["unet.r"], 2);
    assert_eq!(adapter["unet.lora_alpha"], 3.0);
}

#[test]
fn with_validation_steps_the_lora_run_draws_validation_images() {
    let world = World::new(4);
    let run = world.train(&[
        ("validation_steps", json!(2)),
        ("num_validation_prompts", json!(1)),
        ("validation_num_inference_steps", json!(2)),
    ]);
    let validation = run.out_dir().join("validation");
    assert!(validation.join("step-000002/prompt-00.png").is_file());
    assert!(validation.join("step-000004/prompt-00.png").is_file());
}

#[test]
fn a_target_that_matches_no_layer_is_refused_naming_it() {
    let world = World::new(4);
    let mut h = world.harness();
    let message = h
        .run(&TrainLora::default(), &lora_params(&[("lora_target_modules", json!(["to_qq"]))]))
        .unwrap_err()
        .to_string();
    assert!(message.contains("to_qq"), "{message}");
    let _ = &world.dir;
}

#[test]
fn bad_lora_settings_name_the_parameter() {
    let dataset = tempfile::tempdir().unwrap();
    let mut h = Harness::new().input("dataset", dataset.path());
    let bad = [
        ("lora_alpha", json!(-1.0)),
        ("lora_target_modules", json!([""])),
        ("lora_target_modules", json!([])),
    ];
    for (name, value) in bad {
        let message =
            h.run(&TrainLora::default(), &lora_params(&[(name, value)])).unwrap_err().to_string();
        assert!(message.contains(name), "{name}: {message}");
    }
}
