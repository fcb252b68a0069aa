//! The `tiny-sd` and `sample` kinds through the stage test harness.

#[allow(dead_code)] // Each test binary uses its own part of the shared fixtures.
mod support;

use std::fs;
use std::path::Path;

use sdpipe_diffusion::sample_stage::Sample;
use sdpipe_diffusion::tiny_sd_stage::TinySd;
use sdpipe_diffusion::SdPipeline;
use sdpipe_stages::api::{StageError, StageKind};
use sdpipe_stages::testing::{params, Harness};
use serde_json::{json, Value};
use support::{prompts, quick, tiny_pipeline};

fn run_sample(
    model: &Path,
    dataset: &Path,
    settings: &[(&'static str, Value)],
) -> Result<Harness, StageError> {
    let kind = Sample::default();
    let mut h = Harness::new().input("pipeline", model).input("prompts", dataset);
    h.run(&kind, &params(&kind, settings))?;
    Ok(h)
}

/// The error a run that must fail gives.
fn sample_error(model: &Path, dataset: &Path, settings: &[(&'static str, Value)]) -> StageError {
    match run_sample(model, dataset, settings) {
        Ok(_) => panic!("the run should have failed"),
        Err(e) => e,
    }
}

fn samples(h: &Harness) -> Vec<Value> {
    fs::read_to_string(h.out_dir().join("samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn pixels(path: &Path) -> image::RgbImage {
    image::open(path).unwrap().to_rgb8()
}

#[test]
fn tiny_sd_writes_a_pipeline_every_loader_reads() {
    let (_h, model) = tiny_pipeline();
    let pipeline = SdPipeline::open(&model).unwrap();
    let device = candle_core::Device::Cpu;
    pipeline.load_unet(&device, candle_core::DType::F32).unwrap();
    pipeline.load_vae(&device, candle_core::DType::F32).unwrap();
    pipeline.load_text_encoder(&device, candle_core::DType::F32).unwrap();
    assert_eq!(pipeline.tokenizer().unwrap().encode("a cat").unwrap().len(), 77);
    assert_eq!(pipeline.unet.sample_size * pipeline.vae_scale_factor(), 64);
}

#[test]
fn tiny_sd_is_deterministic_in_its_seed() {
    let weights = |seed: i64| {
        let mut h = Harness::new();
        h.run(&TinySd, &params(&TinySd, &[("seed", json!(seed))])).unwrap();
        fs::read(h.out_dir().join("model/unet/diffusion_pytorch_model.safetensors")).unwrap()
    };
    assert_eq!(weights(3), weights(3));
    assert_ne!(weights(3), weights(4));
}

#[test]
fn tiny_sd_rejects_sizes_that_do_not_fit_together() {
    let mut h = Harness::new();
    let err = h.run(&TinySd, &params(&TinySd, &[("unet_channels", json!([24, 48]))])).unwrap_err();
    assert!(err.to_string().contains("norm_num_groups"), "{err}");
}

#[test]
fn sample_writes_one_png_per_prompt_and_an_index_in_id_order() {
    let (_t, model) = tiny_pipeline();
    let data = prompts(&[("b.jpg", "a red boat"), ("a.jpg", "a cat on a table")]);
    let h = run_sample(&model, data.path(), &quick(&[("seed", json!(10))])).unwrap();
    let lines = samples(&h);
    assert_eq!(lines.len(), 2);
    assert_eq!(
        lines[0],
        json!({"id": "a", "file_name": "a.png", "prompt": "a cat on a table",
                                "seed": 10, "k": 0})
    );
    assert_eq!(lines[1]["id"], "b");
    assert_eq!(lines[1]["seed"], 11);
    for name in ["a.png", "b.png"] {
        assert_eq!(pixels(&h.out_dir().join("images").join(name)).dimensions(), (32, 32));
    }
}

#[test]
fn a_sample_is_reproduced_alone_and_in_any_batch() {
    let (_t, model) = tiny_pipeline();
    let all = prompts(&[("a.jpg", "a cat"), ("b.jpg", "a dog"), ("c.jpg", "a boat")]);
    let batched = run_sample(&model, all.path(), &quick(&[("batch_size", json!(2))])).unwrap();
    let alone = prompts(&[("b.jpg", "a dog")]);
    let single = run_sample(&model, alone.path(), &quick(&[("seed", json!(1))])).unwrap();
    let x = pixels(&batched.out_dir().join("images/b.png"));
    let y = pixels(&single.out_dir().join("images/b.png"));
    // Batched and single UNet calls may round differently in the last bits; at most one
    // 8-bit level apart.
    let worst = x.as_raw().iter().zip(y.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(worst <= 1, "pixels differ by {worst} levels");
}

#[test]
fn several_images_per_prompt_get_their_own_names_and_seeds() {
    let (_t, model) = tiny_pipeline();
    let data = prompts(&[("a.jpg", "a cat")]);
    let h = run_sample(&model, data.path(), &quick(&[("n_per_prompt", json!(2))])).unwrap();
    let lines = samples(&h);
    assert_eq!(lines[0]["file_name"], "a_0.png");
    assert_eq!(lines[1]["file_name"], "a_1.png");
    assert_eq!((lines[0]["seed"].as_u64(), lines[1]["seed"].as_u64()), (Some(0), Some(1)));
    assert_ne!(
        pixels(&h.out_dir().join("images/a_0.png")),
        pixels(&h.out_dir().join("images/a_1.png"))
    );
}

#[test]
fn finished_images_in_the_state_directory_are_not_redone() {
    let (_t, model) = tiny_pipeline();
    let data = prompts(&[("a.jpg", "a cat"), ("b.jpg", "a dog")]);
    let kind = Sample::default();
    let mut h = Harness::new().input("pipeline", &model).input("prompts", data.path());
    // As an interrupted run leaves it: `a` finished (here a marker image), `b` not.
    let done = h.state.path().join("images");
    fs::create_dir_all(&done).unwrap();
    let marker = image::RgbImage::from_pixel(32, 32, image::Rgb([1, 2, 3]));
    marker.save(done.join("a.png")).unwrap();
    h.run(&kind, &params(&kind, &quick(&[]))).unwrap();
    assert_eq!(pixels(&h.out_dir().join("images/a.png")), marker);
    assert_ne!(pixels(&h.out_dir().join("images/b.png")), marker);
}

#[test]
fn a_cancelled_sample_stops_with_cancelled() {
    let (_t, model) = tiny_pipeline();
    let data = prompts(&[("a.jpg", "a cat")]);
    let kind = Sample::default();
    let mut h = Harness::new().input("pipeline", &model).input("prompts", data.path());
    h.cancel.cancel();
    let err = h.run(&kind, &params(&kind, &quick(&[]))).unwrap_err();
    assert!(matches!(err, StageError::Cancelled), "{err}");
}

#[test]
fn a_missing_split_names_the_file_and_the_split_param() {
    let (_t, model) = tiny_pipeline();
    let data = prompts(&[("a.jpg", "a cat")]);
    let err = sample_error(&model, data.path(), &quick(&[("split", json!("val"))]));
    let text = err.to_string();
    assert!(text.contains("val/metadata.jsonl") && text.contains("split"), "{text}");
}

#[test]
fn duplicate_ids_and_empty_splits_are_errors() {
    let (_t, model) = tiny_pipeline();
    let dup = prompts(&[("a.jpg", "x"), ("a.png", "y")]);
    let err = sample_error(&model, dup.path(), &quick(&[]));
    assert!(err.to_string().contains("`a`"), "{err}");
    let empty = prompts(&[]);
    let err = sample_error(&model, empty.path(), &quick(&[]));
    assert!(err.to_string().contains("no prompts"), "{err}");
}

#[test]
fn a_broken_pipeline_folder_names_the_missing_file() {
    let (_t, model) = tiny_pipeline();
    fs::remove_file(model.join("unet/config.json")).unwrap();
    let data = prompts(&[("a.jpg", "a cat")]);
    let err = sample_error(&model, data.path(), &quick(&[]));
    assert!(err.to_string().contains("unet/config.json"), "{err}");
}

#[test]
fn sizes_the_unet_cannot_halve_are_refused() {
    let (_t, model) = tiny_pipeline();
    let data = prompts(&[("a.jpg", "a cat")]);
    let err = sample_error(&model, data.path(), &quick(&[("height", json!(30))]));
    assert!(
        matches!(err, StageError::InvalidParam { ref param, .. } if param == "height"),
        "{err}"
    );
}

#[test]
fn a_local_model_folder_is_used_and_its_files_are_external_deps() {
    let (_t, model) = tiny_pipeline();
    let kind = Sample::default();
    let p = params(&kind, &quick(&[("model", json!(model.to_str().unwrap()))]));
    let deps = kind.external_deps(&p, sdpipe_stages::api::Fetch::allowed()).unwrap();
    assert!(deps.contains_key("model/unet/diffusion_pytorch_model.safetensors"));
    assert!(deps.contains_key("model/tokenizer/vocab.json"));
    let data = prompts(&[("a.jpg", "a cat")]);
    let mut h = Harness::new().input("prompts", data.path());
    h.run(&kind, &p).unwrap();
    assert!(h.out_dir().join("images/a.png").is_file());
}

/// Mean and largest absolute difference between two images' 8-bit values.
fn pixel_difference(x: &image::RgbImage, y: &image::RgbImage) -> (f64, u8) {
    assert_eq!(x.dimensions(), y.dimensions());
    let diffs: Vec<u8> = x.as_raw().iter().zip(y.as_raw()).map(|(a, b)| a.abs_diff(*b)).collect();
    let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len() as f64;
    (mean, diffs.into_iter().max().unwrap())
}

#[test]
fn half_precision_samples_are_close_to_f32_ones() {
    let (_t, model) = tiny_pipeline();
    let data = prompts(&[("a.jpg", "a cat on a table"), ("b.jpg", "a red boat")]);
    let run = |precision: &str| {
        let h = run_sample(&model, data.path(), &quick(&[("precision", json!(precision))]));
        let h = h.unwrap_or_else(|e| panic!("precision {precision}: {e}"));
        // `pixels` decodes the files: they are PNGs as in f32.
        ["a.png", "b.png"].map(|n| pixels(&h.out_dir().join("images").join(n)))
    };
    let full = run("f32");
    // Measured on the tiny pipeline (3 PNDM steps, 32 px; the f32 images' pixels have a
    // standard deviation of 42 levels): fp16 differs by 0.07-0.09 levels on average and at most
    // 1, bf16 by 0.44-0.48 and at most 3. The text encoder and the VAE run in the half type and
    // the UNet under autocast (the sampler's arithmetic stays f32); rounding to fp16's 11 or
    // bf16's 8 significant bits is a relative error of 2^-12 or 2^-9 per op. The bounds leave
    // about three times the measured values for other machines' kernels. That half precision
    // changes some pixels shows the parameter is applied.
    for (precision, mean_bound, max_bound) in [("fp16", 0.25, 3), ("bf16", 1.5, 8)] {
        for (name, (x, y)) in ["a", "b"].iter().zip(full.iter().zip(&run(precision))) {
            let (mean, worst) = pixel_difference(x, y);
            assert!(
                mean > 0.0 && mean < mean_bound && worst <= max_bound,
                "{precision} {name}: mean difference {mean:.4} levels, largest {worst}"
            );
        }
    }
}

#[test]
fn an_unknown_precision_is_refused_naming_the_parameter() {
    let (_t, model) = tiny_pipeline();
    let data = prompts(&[("a.jpg", "a cat")]);
    let err = sample_error(&model, data.path(), &quick(&[("precision", json!("fp8"))]));
    match &err {
        StageError::InvalidParam { param, message } => {
            assert_eq!(param, "precision");
            assert!(message.contains("fp8") && message.contains("bf16"), "{message}");
        }
        other => panic!("expected an invalid `precision`, got {other}"),
    }
}
