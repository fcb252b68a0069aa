//! Autocast (diffusers' `--mixed_precision fp16 | bf16` for the UNet): the products compute in
//! the half type, the weights, gradients and output stay f32, and the result stays close to the
//! f32 one, on the tiny parity model (`tests/parity/unet.py`).
//!
//! Tolerances, relative to the largest magnitude of the f32 value: fp16 keeps 11 significant
//! bits (unit roundoff 4.9e-4), bf16 8 (3.9e-3; emulated on the CPU, see `autocast.rs`), and
//! the tiny model's ~20 layers of products and sums grow that by an order of magnitude, its
//! gradients (which pass back through every layer) by another few. Measured: forward 1.6e-3
//! (fp16) and 1.0e-2 (bf16); gradients, worst tensor, 9.3e-3 and 4.6e-2; the bounds leave a
//! factor of 2.5.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sdpipe_unet::UNet;

use common::{forward, max_abs, mse_loss_and_grads};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/unet/tiny")
}

fn io() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture().join("io.safetensors"), &Device::Cpu).unwrap()
}

fn load(autocast: Option<DType>) -> UNet {
    let unet = UNet::from_pretrained(&fixture().join("unet"), &Device::Cpu).unwrap();
    unet.set_autocast(autocast).unwrap();
    unet
}

/// `max |a - b| / max |b|`.
fn relative(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    max_abs(&diff) / max_abs(b).max(1e-30)
}

/// The loss and every gradient, by parameter name.
fn gradients(
    unet: &UNet,
    io: &HashMap<String, Tensor>,
    checkpointing: bool,
) -> (f32, Vec<(String, Tensor)>) {
    let (loss, mut grads) = mse_loss_and_grads(unet, io, checkpointing);
    let named = unet
        .vars()
        .iter()
        .filter_map(|(name, var)| grads.remove(var.as_tensor()).map(|g| (name.clone(), g)))
        .collect();
    (loss.to_scalar().unwrap(), named)
}

#[test]
fn autocast_is_off_unless_set() {
    let unet = load(None);
    assert_eq!(unet.autocast(), None);
    unet.set_autocast(Some(DType::F16)).unwrap();
    assert_eq!(unet.autocast(), Some(DType::F16));
    assert!(unet.set_autocast(Some(DType::F64)).is_err());
}

#[test]
fn under_autocast_the_output_is_f32_and_close_to_the_f32_forward() {
    let io = io();
    let full = forward(&load(None), &io);
    let mut errors = Vec::new();
    for (dtype, bound) in [(DType::F16, 4e-3), (DType::BF16, 2.5e-2)] {
        let half = forward(&load(Some(dtype)), &io);
        assert_eq!(half.dtype(), DType::F32, "{dtype:?}: the prediction comes back in f32");
        let error = relative(&half, &full);
        eprintln!("{dtype:?}: output {error:e} of its size away from f32");
        assert!(error < bound, "{dtype:?}: {error:e} of the output away from f32");
        errors.push(error);
    }
    // The products really ran in the half types: each differs from f32, bf16 (8 bits) more
    // than fp16 (11 bits).
    assert!(errors[0] > 0.0 && errors[1] > errors[0], "{errors:?}");
}

#[test]
fn under_autocast_gradients_reach_the_f32_weights_close_to_the_f32_ones() {
    let io = io();
    let (full_loss, full) = gradients(&load(None), &io, false);
    for (dtype, bound) in [(DType::F16, 2.5e-2), (DType::BF16, 1.2e-1)] {
        for checkpointing in [false, true] {
            let (loss, half) = gradients(&load(Some(dtype)), &io, checkpointing);
            let what = format!("{dtype:?}, checkpointing {checkpointing}");
            assert!(
                (loss - full_loss).abs() / full_loss < bound as f32,
                "{what}: loss {loss} vs {full_loss}"
            );
            assert_eq!(half.len(), full.len(), "{what}: every parameter gets a gradient");
            let mut worst = (0.0, String::new());
            for ((name, g), (_, g32)) in half.iter().zip(&full) {
                assert_eq!(g.dtype(), DType::F32, "{what}: `{name}`'s gradient is f32");
                // Gradients that are analytically zero (see parity.rs) are noise on both sides.
                if max_abs(g32) < 1e-6 {
                    continue;
                }
                let error = relative(g, g32);
                if error > worst.0 {
                    worst = (error, name.clone());
                }
            }
            eprintln!("{what}: worst gradient `{}` {:e}", worst.1, worst.0);
            assert!(
                worst.0 < bound,
                "{what}: `{}` is {:e} of its size away from f32",
                worst.1,
                worst.0
            );
        }
    }
}

#[test]
fn an_inference_model_held_in_a_half_type_holds_its_weights_in_it_and_computes_under_autocast() {
    let io = io();
    let weights = [fixture().join("unet/diffusion_pytorch_model.safetensors")];
    let dir = fixture().join("unet");
    let full = forward(&load(None), &io);
    for (dtype, bound) in [(DType::F16, 4e-3), (DType::BF16, 2.5e-2)] {
        let unet = UNet::for_inference(&dir, &weights, dtype, &Device::Cpu).unwrap();
        assert_eq!(unet.autocast(), Some(dtype));
        for (name, var) in unet.vars() {
            assert_eq!(var.dtype(), dtype, "`{name}` is held in {dtype:?}");
        }
        let out =
            unet.predict(&io["sample"], &io["timesteps"], &io["encoder_hidden_states"]).unwrap();
        assert_eq!(out.dtype(), DType::F32);
        // The same products as autocast over f32 weights; the norms' weights are rounded too.
        let error = relative(&out, &full);
        assert!(error < bound, "{dtype:?}: {error:e} of the output away from f32");
    }
    let refused = UNet::for_inference(&dir, &weights, DType::F64, &Device::Cpu).unwrap_err();
    assert!(refused.to_string().contains("f32, f16 or bf16"), "{refused}");
}
