//! The `sample` kind with a LoRA (`lora`, `lora_scale`), through the stage test harness.
//!
//! The LoRA most tests merge is the committed diffusers-written one
//! (`tests/fixtures/lora/pytorch_lora_weights.safetensors`: rank 4, alpha 8 on the attention
//! projections of `tests/fixtures/unet/tiny`), which fits the UNet of a default `tiny-sd`
//! pipeline: the same architecture, other weights. It records no base model, as no file
//! written outside sdpipe does. LoRAs that record one are made here as `train-lora` makes
//! them: `UNet::for_lora_training` + `save_lora` with the base's [`BaseIdentity`].

#[allow(dead_code)] // Each test binary uses its own part of the shared fixtures.
mod support;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdpipe_diffusion::lora_base::{BaseIdentity, UNET_DIGEST_KEY};
use sdpipe_diffusion::sample_stage::Sample;
use sdpipe_diffusion::SdPipeline;
use sdpipe_stages::api::StageError;
use sdpipe_stages::testing::{params, Harness};
use sdpipe_unet::lora::LORA_WEIGHTS_NAME;
use sdpipe_unet::{LoraConfig, LoraFile, UNet};
use serde_json::{json, Value};
use support::{prompts, quick, tiny_pipeline_seeded};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The folder holding the diffusers-written LoRA (as a train-lora stage's `lora/` holds its).
fn fixture_lora() -> PathBuf {
    fixtures().join("lora")
}

fn one_prompt() -> tempfile::TempDir {
    prompts(&[("a.jpg", "a red circle on a blue square")])
}

fn run_sample(
    model: &Path,
    dataset: &Path,
    lora: Option<&Path>,
    settings: &[(&'static str, Value)],
) -> Result<Harness, StageError> {
    let kind = Sample::default();
    let mut h = Harness::new().input("pipeline", model).input("prompts", dataset);
    if let Some(lora) = lora {
        h = h.input("lora", lora);
    }
    h.run(&kind, &params(&kind, settings))?;
    Ok(h)
}

fn sample_error(model: &Path, lora: &Path, settings: &[(&'static str, Value)]) -> String {
    match run_sample(model, one_prompt().path(), Some(lora), settings) {
        Ok(_) => panic!("the run should have failed"),
        Err(e) => e.to_string(),
    }
}

fn png_bytes(h: &Harness, name: &str) -> Vec<u8> {
    fs::read(h.out_dir().join("images").join(name)).unwrap()
}

fn samples_jsonl(h: &Harness) -> String {
    fs::read_to_string(h.out_dir().join("samples.jsonl")).unwrap()
}

/// A LoRA of `model`'s UNet as train-lora writes it: rank 2, alpha 2 on the default targets,
/// its `B` matrices zero (untrained), with `metadata` beside diffusers' own.
fn lora_of(model: &Path, metadata: &[(&str, &str)]) -> tempfile::TempDir {
    let pipeline = SdPipeline::open(model).unwrap();
    let files = pipeline.weight_files("unet").unwrap();
    let config = LoraConfig::new(2, 2.0);
    let unet =
        UNet::for_lora_training(&model.join("unet"), &files, &config, 0, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    unet.save_lora(dir.path(), metadata).unwrap();
    dir
}

/// [`lora_of`] recording `model` as its base, named `name`.
fn recorded_lora_of(model: &Path, name: &str) -> tempfile::TempDir {
    let identity = BaseIdentity::of(&SdPipeline::open(model).unwrap(), name).unwrap();
    lora_of(model, &identity.metadata())
}

#[test]
fn a_lora_at_scale_0_samples_the_same_images_as_no_lora() {
    let (_t, model) = tiny_pipeline_seeded(0);
    let data = one_prompt();
    let plain = run_sample(&model, data.path(), None, &quick(&[])).unwrap();
    let scale0 = quick(&[("lora_scale", json!(0.0))]);
    let merged = run_sample(&model, data.path(), Some(&fixture_lora()), &scale0).unwrap();
    assert_eq!(png_bytes(&merged, "a.png"), png_bytes(&plain, "a.png"));
}

#[test]
fn a_lora_at_scale_1_changes_the_images() {
    let (_t, model) = tiny_pipeline_seeded(0);
    let data = one_prompt();
    let plain = run_sample(&model, data.path(), None, &quick(&[])).unwrap();
    let merged = run_sample(&model, data.path(), Some(&fixture_lora()), &quick(&[])).unwrap();
    assert_ne!(png_bytes(&merged, "a.png"), png_bytes(&plain, "a.png"));
}

/// The max |a − b| over two tensors.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

#[test]
fn the_merged_unet_of_a_pipeline_matches_diffusers_for_the_fixture_lora() {
    // A pipeline whose UNet is the fixture's (tests/fixtures/unet/tiny), so that diffusers'
    // outputs for it with the fixture LoRA (tests/fixtures/lora/io.safetensors, written by
    // tests/parity/lora.py) apply; merged by the loader the `sample` kind uses. Tolerance as
    // sdpipe-unet's tests/lora.rs (measured 2.1e-6 there).
    let (_t, model) = tiny_pipeline_seeded(0);
    let unet = model.join("unet");
    for file in ["config.json", "diffusion_pytorch_model.safetensors"] {
        fs::copy(fixtures().join("unet/tiny/unet").join(file), unet.join(file)).unwrap();
    }
    let pipeline = SdPipeline::open(&model).unwrap();
    let lora = LoraFile::open(&fixture_lora()).unwrap();
    let io: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixtures().join("lora/io.safetensors"), &Device::Cpu)
            .unwrap();
    for (scale, key) in [(1.0, "out.1.0"), (0.5, "out.0.5")] {
        let merged = pipeline.load_unet_with_lora(&Device::Cpu, DType::F32, &[(&lora, scale)]);
        let out = merged
            .unwrap()
            .forward(&io["sample"], &io["timesteps"], &io["encoder_hidden_states"])
            .unwrap();
        let diff = max_abs_diff(&out, &io[key]);
        assert!(diff < 1e-4, "scale {scale}: max |ours - diffusers| = {diff:e}");
    }
}

#[test]
fn a_lora_recorded_for_another_base_is_refused_naming_both() {
    let (_a, base) = tiny_pipeline_seeded(1);
    let (_b, other) = tiny_pipeline_seeded(2);
    let lora = recorded_lora_of(&base, "tiny-base-seed-1");
    let err = sample_error(&other, lora.path(), &quick(&[]));
    assert!(err.contains("the `lora` input"), "{err}");
    assert!(err.contains("trained on tiny-base-seed-1"), "{err}");
    let other = other.display().to_string();
    assert!(err.contains(&format!("this model (the `pipeline` input, {other})")), "{err}");
}

#[test]
fn a_lora_recorded_for_this_base_is_merged_and_logged() {
    let (_t, model) = tiny_pipeline_seeded(1);
    let lora = recorded_lora_of(&model, "tiny-base-seed-1");
    let h = run_sample(&model, one_prompt().path(), Some(lora.path()), &quick(&[])).unwrap();
    let log = h.log_text();
    assert!(log.contains("trained on tiny-base-seed-1"), "{log}");
    assert!(!log.contains("merged on trust"), "{log}");
}

#[test]
fn an_unrecorded_lora_is_merged_with_a_note_in_the_log() {
    let (_t, model) = tiny_pipeline_seeded(0);
    let h = run_sample(&model, one_prompt().path(), Some(&fixture_lora()), &quick(&[])).unwrap();
    let log = h.log_text();
    assert!(log.contains("records no base model"), "{log}");
    assert!(log.contains("merged on trust"), "{log}");
    assert!(h.out_dir().join("images/a.png").is_file());
}

#[test]
fn each_samples_jsonl_line_records_the_lora_it_was_sampled_with() {
    let (_t, model) = tiny_pipeline_seeded(0);
    let data = prompts(&[("a.jpg", "a cat"), ("b.jpg", "a dog")]);
    let settings = quick(&[("lora_scale", json!(0.5))]);
    // A file path works as well as its folder.
    let file = fixture_lora().join(LORA_WEIGHTS_NAME);
    let h = run_sample(&model, data.path(), Some(&file), &settings).unwrap();
    let lora = json!({"rank": 4, "alpha": 8.0, "scale": 0.5, "layers": 32,
                      "targets": ["to_k", "to_out.0", "to_q", "to_v"]});
    let lines: Vec<Value> =
        samples_jsonl(&h).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    for line in lines {
        assert_eq!(line["lora"], lora, "{line}");
    }
}

#[test]
fn a_lora_that_does_not_fit_the_unet_is_refused_naming_its_layers() {
    // tests/fixtures/seed/sd is a diffusers-written pipeline whose UNet is narrower (8, 16
    // channels) than the one the fixture LoRA was trained on (32, 64).
    let model = fixtures().join("seed/sd");
    let err = sample_error(&model, &fixture_lora(), &quick(&[]));
    assert!(err.contains(LORA_WEIGHTS_NAME), "names the file: {err}");
    assert!(err.contains("the LoRA does not fit this UNet"), "{err}");
    assert!(err.contains("attn1.to_k"), "names a layer: {err}");
}

#[test]
fn a_folder_without_a_lora_file_is_refused_saying_what_to_bind() {
    let (_t, model) = tiny_pipeline_seeded(0);
    let empty = tempfile::tempdir().unwrap();
    let err = sample_error(&model, empty.path(), &quick(&[]));
    assert!(err.contains(LORA_WEIGHTS_NAME) && err.contains("train-lora"), "{err}");
}

#[test]
fn hostile_lora_files_are_refused_without_panicking() {
    let (_t, model) = tiny_pipeline_seeded(0);
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        fs::write(&path, bytes).unwrap();
        path
    };
    let mut lying = (u64::MAX / 2).to_le_bytes().to_vec();
    lying.extend_from_slice(b"{}");
    let not_json = [&8u64.to_le_bytes()[..], b"not json"].concat();
    let header = br#"{"unet.x.lora.down.weight":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,16]}}"#;
    let huge_shape = [&(header.len() as u64).to_le_bytes()[..], header, &[0u8; 16]].concat();
    for (name, bytes) in [
        ("empty.safetensors", &b""[..]),
        ("lying_length.safetensors", &lying[..]),
        ("not_json.safetensors", &not_json[..]),
        ("huge_shape.safetensors", &huge_shape[..]),
    ] {
        let err = sample_error(&model, &write(name, bytes), &quick(&[]));
        assert!(err.contains("the `lora` input") && err.contains(name), "{name}: {err}");
    }
}

#[test]
fn a_lora_with_a_damaged_base_digest_is_refused_without_panicking() {
    let (_t, model) = tiny_pipeline_seeded(0);
    // Multi-byte characters where a hex digest belongs, so that byte 16 falls inside one:
    // cutting it there for a message would panic.
    let digest = format!("a{}", "é".repeat(40));
    let lora = lora_of(&model, &[(UNET_DIGEST_KEY, &digest)]);
    let err = sample_error(&model, lora.path(), &quick(&[]));
    assert!(err.contains("not a blake3 digest"), "{err}");
}

#[test]
fn without_a_lora_samples_jsonl_is_byte_identical_to_before() {
    // The lines sample wrote before `lora` existed (keys sorted, no `lora`).
    let (_t, model) = tiny_pipeline_seeded(0);
    let data = prompts(&[("b.jpg", "a red boat"), ("a.jpg", "a cat")]);
    let h = run_sample(&model, data.path(), None, &quick(&[("n_per_prompt", json!(2))])).unwrap();
    assert_eq!(
        samples_jsonl(&h),
        "{\"file_name\":\"a_0.png\",\"id\":\"a\",\"k\":0,\"prompt\":\"a cat\",\"seed\":0}\n\
         {\"file_name\":\"a_1.png\",\"id\":\"a\",\"k\":1,\"prompt\":\"a cat\",\"seed\":1}\n\
         {\"file_name\":\"b_0.png\",\"id\":\"b\",\"k\":0,\"prompt\":\"a red boat\",\"seed\":2}\n\
         {\"file_name\":\"b_1.png\",\"id\":\"b\",\"k\":1,\"prompt\":\"a red boat\",\"seed\":3}\n"
    );
}

#[test]
fn a_lora_scale_without_a_lora_is_refused() {
    let (_t, model) = tiny_pipeline_seeded(0);
    let settings = quick(&[("lora_scale", json!(0.5))]);
    let Err(err) = run_sample(&model, one_prompt().path(), None, &settings) else {
        panic!("the run should have failed");
    };
    assert!(
        matches!(err, StageError::InvalidParam { ref param, .. } if param == "lora_scale"),
        "{err}"
    );
}
