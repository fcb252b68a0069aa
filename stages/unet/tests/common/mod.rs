//! What the UNet's test binaries share: comparing tensors, and the fixtures' forward and MSE
//! loss (`io.safetensors` holds `sample`, `timesteps`, `encoder_hidden_states`, `target`).

#![allow(dead_code)] // each test binary uses its own part

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use sdpipe_unet::UNet;

/// `max |t|`, in f64.
pub fn max_abs(t: &Tensor) -> f64 {
    let t = t.to_dtype(DType::F64).unwrap().abs().unwrap();
    t.flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

/// `max |a - b|`, in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    max_abs(&(a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap())
}

/// The MSE against `target`, as a loss function.
pub fn mse(target: &Tensor) -> impl Fn(&Tensor) -> candle_core::Result<Tensor> + '_ {
    move |pred: &Tensor| (pred - target)?.sqr()?.mean_all()
}

/// `unet`'s prediction on the fixture's inputs.
pub fn forward(unet: &UNet, io: &HashMap<String, Tensor>) -> Tensor {
    unet.forward(&io["sample"], &io["timesteps"], &io["encoder_hidden_states"]).unwrap()
}

/// The MSE of `unet`'s prediction against the fixture's target, and its gradients.
pub fn mse_loss_and_grads(
    unet: &UNet,
    io: &HashMap<String, Tensor>,
    checkpointing: bool,
) -> (Tensor, GradStore) {
    let inputs = (&io["sample"], &io["timesteps"], &io["encoder_hidden_states"]);
    unet.loss_and_grads(inputs.0, inputs.1, inputs.2, checkpointing, mse(&io["target"])).unwrap()
}
