//! The generic path (candle's own ops, what a GPU runs) against the CPU kernels, on a whole
//! model: the tiny UNet's forward, loss and every parameter gradient. On the CPU the generic
//! path is forced ([`force_generic_path`]); built with `--features cuda` on a machine with a GPU,
//! the same comparison also runs on CUDA device 0 ([`test_devices`]).
//!
//! Tolerances: the paths sum in different orders (gemm blocking, im2col tiles, softmax), so they
//! agree to f32 rounding accumulated through the network: 1e-4 relative to each tensor's largest
//! magnitude (measured on the CPU: 1.8e-6 for the prediction, 6e-6 for the worst gradient; the
//! margin is for CUDA's reduction orders).

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use sdpipe_unet::device_path::{force_generic_path, test_devices};
use sdpipe_unet::UNet;

const TOLERANCE: f32 = 1e-4;

fn tiny(device: &Device) -> UNet {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/unet/tiny/unet");
    UNet::from_pretrained(&dir, device).unwrap()
}

/// Deterministic latents, timesteps and text embeddings for the tiny model, on `device`.
fn inputs(device: &Device) -> (Tensor, Tensor, Tensor) {
    let values = |dims: &[usize], k: u64| {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u64 + 1) * 2654435761 + k) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Tensor::from_vec(v, dims, device).unwrap()
    };
    let t = Tensor::new(&[17f32, 650.0], device).unwrap();
    (values(&[2, 4, 8, 8], 1), t, values(&[2, 7, 32], 2))
}

/// The prediction, the loss and each parameter's gradient by name, all on the CPU.
struct Run {
    prediction: Tensor,
    loss: Tensor,
    grads: BTreeMap<String, Tensor>,
}

fn run(device: &Device, checkpointing: bool) -> Run {
    let unet = tiny(device);
    let (x, t, c) = inputs(device);
    let target = (&x * 0.5).unwrap();
    let prediction = unet.forward(&x, &t, &c).unwrap().detach();
    let (loss, grads) = unet
        .loss_and_grads(&x, &t, &c, checkpointing, |p| (p - &target)?.sqr()?.mean_all())
        .unwrap();
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
    let grads = unet
        .vars()
        .iter()
        .map(|(name, var)| {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient: {name}"));
            (name.clone(), cpu(g))
        })
        .collect();
    Run { prediction: cpu(&prediction), loss: cpu(&loss), grads }
}

fn largest(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

/// Asserts `ours` within [`TOLERANCE`] of `reference`, relative to the reference's largest
/// magnitude or 1e-4, whichever is larger: the conv bias feeding a group norm of one channel
/// per group has a gradient that vanishes up to rounding (~3e-9), which neither path computes
/// to a relative precision.
fn assert_close(what: &str, ours: &Tensor, reference: &Tensor) {
    assert_eq!(ours.dims(), reference.dims(), "{what}");
    let diff = largest(&(ours - reference).unwrap());
    let scale = largest(reference).max(1e-4);
    assert!(diff <= TOLERANCE * scale, "{what}: max |Δ| {diff:e}, largest {scale:e}");
}

#[test]
fn a_tiny_unet_on_the_generic_path_matches_the_cpu_kernels_forward_and_gradients() {
    for checkpointing in [false, true] {
        let reference = run(&Device::Cpu, checkpointing);
        for device in test_devices() {
            let generic = {
                // A no-op on CUDA, which takes the generic path anyway.
                let _generic = force_generic_path();
                run(&device, checkpointing)
            };
            let on = format!("{device:?}, checkpointing {checkpointing}");
            assert_close(&format!("prediction ({on})"), &generic.prediction, &reference.prediction);
            assert_close(&format!("loss ({on})"), &generic.loss, &reference.loss);
            assert_eq!(generic.grads.len(), reference.grads.len());
            for (name, g) in &reference.grads {
                assert_close(&format!("{name} ({on})"), &generic.grads[name], g);
            }
            if device.is_cpu() {
                // Not vacuous: the forced run really took other kernels.
                assert!(largest(&(&generic.prediction - &reference.prediction).unwrap()) > 0.0);
            }
        }
    }
}
