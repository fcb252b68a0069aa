//! Parity with the reference implementation (torchvision/Pillow, diffusers, torch) on the
//! fixtures written by `tests/parity/train.py` (versions in `tests/fixtures/train/versions.txt`).
//!
//! Tolerances, and why:
//! - image transform: exact. Pillow's resize is integer arithmetic, reproduced step by step, and
//!   `ToTensor`/`Normalize` are the same two f32 operations.
//! - schedules: 1e-12 for learning-rate multipliers (the same f64 formulas), 1e-7 for ᾱ (f32
//!   products in the same order), 1e-5 relative for SNR.
//! - model outputs, losses: 2e-5 relative (or 1e-6 absolute). Both sides compute in f32 with
//!   different kernels (convolution and matmul summation orders), which moves the last few bits
//!   of every activation; through a dozen layers that accumulates to ~1e-6.
//! - gradients: 1e-4 of the tensor's largest gradient, element-wise. Same reason; gradients that
//!   are sums of cancelling terms keep an absolute error of the terms' rounding, so the bound is
//!   relative to the tensor's scale, not to each (possibly near-zero) element.
//! - clipping, AdamW and EMA, fed torch's own gradients: 3e-7 absolute on weights of magnitude
//!   up to ~1, i.e. two f32 ulps: the same formulas with intermediate roundings in slightly
//!   different places (torch's `lerp` and `addcdiv` kernels). The optimiser is checked on the
//!   reference gradients rather than ours because AdamW's first steps normalise each gradient
//!   (`m̂ / (√v̂ + ε)` ≈ ±1): for a gradient within a few ε (1e-8) of zero, float noise in the
//!   gradient decides the sign of a whole `lr`-sized update, which says nothing about either
//!   implementation.

mod compare;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use sdpipe_stages::pillow::{self, Filter};
use sdpipe_train::data::{Augmentation, Transform};
use sdpipe_train::denoiser::Denoiser;
use sdpipe_train::ema::Ema;
use sdpipe_train::lr::{LrKind, LrSchedule};
use sdpipe_train::objective::Prediction;
use sdpipe_train::optim::{AdamW, AdamWConfig};
use sdpipe_train::posterior::VaeEncoder;
use sdpipe_train::trainer::{accumulate, apply_update, Objective};
use serde_json::Value;

use compare::{assert_close, max_abs_diff, scalar, sd15_schedule, timesteps, values};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/train")
}

fn io() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("io.safetensors"), &Device::Cpu).unwrap()
}

fn image() -> image::RgbImage {
    image::open(fixtures().join("image.png")).unwrap().to_rgb8()
}

#[test]
fn pillow_bilinear_resizing_is_reproduced_bit_for_bit() {
    let io = io();
    for size in [16u32, 40] {
        let transform = Transform { resolution: size, center_crop: true, random_flip: false };
        let (w, h) = transform.resized_size(23, 17);
        let ours = pillow::resize(&image(), w, h, Filter::Bilinear);
        let reference = &io[&format!("resized_{size}")];
        assert_eq!(reference.dims(), &[h as usize, w as usize, 3], "size {size}");
        let reference: Vec<u8> = reference.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(ours.as_raw(), &reference, "Resize({size}) (down- and upscaling)");
    }
}

#[test]
fn the_train_transform_matches_torchvision_exactly() {
    let io = io();
    let transform = Transform { resolution: 16, center_crop: true, random_flip: true };
    let (w, h) = transform.resized_size(23, 17);
    let resized = pillow::resize(&image(), w, h, Filter::Bilinear);
    // Resize(16) gives 21x16: the centre crop starts at column round(2.5) = 2 (half to even).
    for (flipped, key) in [(false, "pixels"), (true, "pixels_flipped")] {
        let ours = transform.render(&resized, Augmentation { crop_top: 0, crop_left: 2, flipped });
        assert_eq!(ours, values(&io[key]), "{key}");
    }
}

#[test]
fn the_vae_posterior_and_its_sample_match_diffusers() {
    let io = io();
    let dir = fixtures().join("vae");
    let config: sdpipe_diffusion::config::VaeConfig =
        sdpipe_diffusion::config::read_json(&dir.join("config.json")).unwrap();
    let candle_config = sdpipe_diffusion::pipeline::vae_to_candle(&config).unwrap();
    let weights = [dir.join("diffusion_pytorch_model.safetensors")];
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&weights, DType::F32, &Device::Cpu) }.unwrap();
    let encoder = VaeEncoder::new(vb, 3, &candle_config).unwrap();
    let posterior = encoder.encode(&io["pixels"]).unwrap();
    assert!(max_abs_diff(&posterior.mean, &io["vae_mean"]) < 1e-5);
    assert!(max_abs_diff(&posterior.logvar, &io["vae_logvar"]) < 1e-5);
    let latents = posterior.scaled_sample(&io["posterior_noise"], config.scaling_factor).unwrap();
    assert!(max_abs_diff(&latents, &io["latents"]) < 1e-5);
}

/// The tiny UNet of the fixtures with its parameters, AdamW and EMA set up as the script does.
struct Setup {
    unet: sdpipe_unet::UNet,
    params: Vec<(String, Var)>,
    vars: Vec<Var>,
    adam: AdamW,
    ema: Ema,
}

fn setup() -> Setup {
    let unet = sdpipe_unet::UNet::from_pretrained(&fixtures().join("unet"), &Device::Cpu).unwrap();
    let params = Denoiser::parameters(&unet);
    let vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
    let config = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 };
    let adam = AdamW::new(vars.len(), config);
    let ema = Ema::new(&vars).unwrap();
    Setup { unet, params, vars, adam, ema }
}

/// The reference gradients of step `step`, in parameter order.
fn reference_grads(
    io: &HashMap<String, Tensor>,
    params: &[(String, Var)],
    step: u32,
) -> Vec<Option<Tensor>> {
    params.iter().map(|(name, _)| Some(io[&format!("grad_{step}.{name}")].clone())).collect()
}

/// Every gradient within 1e-4 of its tensor's largest reference gradient.
fn assert_grads_match(
    io: &HashMap<String, Tensor>,
    params: &[(String, Var)],
    grads: &[Option<Tensor>],
    step: u32,
) {
    for ((name, _), grad) in params.iter().zip(grads) {
        let reference = &io[&format!("grad_{step}.{name}")];
        let grad = grad.as_ref().unwrap_or_else(|| panic!("{name} has no gradient"));
        let scale = values(reference).iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let diff = max_abs_diff(grad, reference);
        assert!(
            diff <= 1e-4 * scale + 1e-12,
            "step {step} gradient of {name}: {diff} (scale {scale})"
        );
    }
}

#[test]
fn predictions_losses_and_gradients_of_two_steps_match_diffusers() {
    let io = io();
    let Setup { unet, params, vars, mut adam, mut ema } = setup();
    let schedule = sd15_schedule();
    let (x0, ehs) = (&io["x0"], &io["ehs"]);

    // The prediction itself, on step 1's noisy latents.
    let t1 = timesteps(&io["t_1"]);
    let noisy = schedule.add_noise(x0, &io["noise_1"], &t1).unwrap();
    let t1_tensor = Tensor::new(t1.as_slice(), &Device::Cpu).unwrap();
    let pred = unet.forward(&noisy, &t1_tensor, ehs).unwrap();
    let scale = values(&io["pred_1"]).iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    assert!(max_abs_diff(&pred, &io["pred_1"]) < 2e-5 * scale, "UNet prediction");

    // Step 1: epsilon, plain MSE, one micro-batch.
    let plain = Objective {
        schedule: &schedule,
        prediction: Prediction::Epsilon,
        snr_gamma: None,
        accumulation: 1,
        loss_scale: 1.0,
        checkpointing: false,
    };
    let (loss, grads) = plain.loss_and_grads(&unet, x0, &io["noise_1"], &t1, ehs).unwrap();
    assert_close("loss_1", loss as f64, scalar(&io["loss_1"]), 2e-5);
    assert_grads_match(&io, &params, &grads, 1);

    // Update with torch's own gradients, so step 2 starts from torch's weights (the update
    // itself is checked on its own below).
    apply_update(&vars, reference_grads(&io, &params, 1), 1.0, &mut adam, 1e-3, Some(&mut ema))
        .unwrap();

    // Step 2: two accumulated micro-batches, min-SNR-5 weighting; with gradient checkpointing,
    // which must not change the gradients.
    let weighted =
        Objective { snr_gamma: Some(5.0), accumulation: 2, checkpointing: true, ..plain };
    let mut totals = vec![None; vars.len()];
    for part in ["2a", "2b"] {
        let t = timesteps(&io[&format!("t_{part}")]);
        let noise = &io[&format!("noise_{part}")];
        let (loss, grads) = weighted.loss_and_grads(&unet, x0, noise, &t, ehs).unwrap();
        let want = scalar(&io[&format!("loss_{part}")]);
        assert_close(&format!("loss_{part}"), loss as f64, want, 2e-5);
        accumulate(&mut totals, grads).unwrap();
    }
    assert_grads_match(&io, &params, &totals, 2);
}

#[test]
fn clipping_adamw_and_ema_match_torch_given_the_same_gradients() {
    let io = io();
    let Setup { params, vars, mut adam, mut ema, .. } = setup();
    for step in [1, 2] {
        let grads = reference_grads(&io, &params, step);
        let norm = apply_update(&vars, grads, 1.0, &mut adam, 1e-3, Some(&mut ema)).unwrap();
        assert_close(
            &format!("grad_norm_{step}"),
            norm,
            scalar(&io[&format!("grad_norm_{step}")]),
            1e-5,
        );
    }
    for (i, (name, var)) in params.iter().enumerate() {
        let diff = max_abs_diff(var.as_tensor(), &io[&format!("after_2.{name}")]);
        assert!(diff < 3e-7, "after step 2, {name}: {diff}");
        let diff = max_abs_diff(&ema.shadow[i], &io[&format!("ema_2.{name}")]);
        assert!(diff < 3e-7, "EMA after step 2, {name}: {diff}");
    }
}

#[test]
fn the_v_prediction_loss_matches_diffusers() {
    let io = io();
    let unet = sdpipe_unet::UNet::from_pretrained(&fixtures().join("unet"), &Device::Cpu).unwrap();
    let schedule = sd15_schedule();
    let objective = Objective {
        schedule: &schedule,
        prediction: Prediction::VPrediction,
        snr_gamma: None,
        accumulation: 1,
        loss_scale: 1.0,
        checkpointing: false,
    };
    let t = timesteps(&io["t_1"]);
    let (loss, _) =
        objective.loss_and_grads(&unet, &io["x0"], &io["noise_1"], &t, &io["ehs"]).unwrap();
    assert_close("loss_v", loss as f64, scalar(&io["loss_v"]), 2e-5);
}

#[test]
fn schedules_match_diffusers() {
    let text = std::fs::read_to_string(fixtures().join("schedules.json")).unwrap();
    let reference: Value = serde_json::from_str(&text).unwrap();
    for (name, factors) in reference["lr_factors"].as_object().unwrap() {
        let schedule = LrSchedule {
            kind: LrKind::parse(name).unwrap(),
            base_lr: 1.0,
            warmup_steps: 3,
            training_steps: 10,
        };
        for (step, want) in factors.as_array().unwrap().iter().enumerate() {
            let got = schedule.factor(step as u64);
            assert!(
                (got - want.as_f64().unwrap()).abs() < 1e-12,
                "{name} at {step}: {got} vs {want}"
            );
        }
    }
    let schedule = sd15_schedule();
    let steps: Vec<u32> = reference["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let snr = schedule.snr(&steps);
    for (i, &t) in steps.iter().enumerate() {
        let want = reference["alphas_cumprod"][i].as_f64().unwrap();
        assert!((schedule.alphas_cumprod[t as usize] as f64 - want).abs() < 1e-7, "ᾱ[{t}]");
        assert_close(
            &format!("snr[{t}]"),
            snr[i] as f64,
            reference["snr"][i].as_f64().unwrap(),
            1e-5,
        );
    }
}
