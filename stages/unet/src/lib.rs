//! A differentiable Stable Diffusion `UNet2DConditionModel` for training.
//!
//! candle-transformers ships an SD UNet for inference only: its attention and norms use fused
//! kernels without a backward. This crate rebuilds the same architecture (diffusers' module
//! structure and state-dict names, read from `unet/config.json`) from ops that all have a
//! backward ([`ops`]), keeps its weights in trainable `Var`s loaded from and saved to
//! `diffusion_pytorch_model.safetensors`, and computes a loss with the parameter gradients,
//! optionally with gradient checkpointing ([`UNet::loss_and_grads`]). [`lora`] trains LoRA
//! adapters over frozen weights and reads, writes and merges LoRA files as diffusers does.
//!
//! ```no_run
//! # fn main() -> Result<(), sdpipe_unet::UNetError> {
//! use candle_core::{Device, Tensor};
//! let device = Device::Cpu;
//! let unet = sdpipe_unet::UNet::from_pretrained("model/unet".as_ref(), &device)?;
//! let latents = Tensor::randn(0f32, 1.0, (1, 4, 64, 64), &device)?;
//! let noise = Tensor::randn(0f32, 1.0, (1, 4, 64, 64), &device)?;
//! let t = Tensor::new(&[500u32], &device)?;
//! let text = Tensor::zeros((1, 77, 768), candle_core::DType::F32, &device)?;
//! let (loss, grads) = unet.loss_and_grads(&latents, &t, &text, true, |pred| {
//!     (pred - &noise)?.sqr()?.mean_all()
//! })?;
//! # Ok(()) }
//! ```

mod autocast;
mod blocks;
mod checkpoint;
pub mod clip_text;
pub mod config;
pub mod conv;
/// The CPU-kernel-or-generic-path rule, shared with the other computing crates.
pub use sdpipe_stages::device_path;
pub mod error;
mod fastmath;
mod fused_attention;
mod group_norm;
mod layers;
pub mod linear;
/// The caps on what a model config may ask for, shared by every model loader.
pub use sdpipe_stages::limits;
pub mod lora;
pub mod memory;
pub mod ops;
mod params;
pub mod pointwise;
mod unet;
pub mod vae;
mod vectorised;
pub mod weights;

use std::sync::Arc;

use sdpipe_stages::api::StageKind;

pub use clip_text::ClipText;
pub use config::{BlockKind, UNetConfig};
pub use error::UNetError;
pub use lora::{LoraConfig, LoraFile};
pub use params::is_pickle;
pub use unet::UNet;

/// This crate is a model library for the `train` stage; it defines no stage kind of its own.
pub fn kinds() -> Vec<Arc<dyn StageKind>> {
    Vec::new()
}
