//! sdpipe-train: finetuning a Stable Diffusion UNet exactly as diffusers' text-to-image script
//! does, and the `train` stage kind that runs it.
//!
//! The pieces are small and separately tested: [`lr`] (learning-rate schedules), [`optim`]
//! (AdamW and gradient clipping with torch's formulas), [`ema`] (diffusers' EMA of the weights),
//! [`rng`] (seeded, resumable randomness), [`data`] (dataset, transform, batching),
//! [`objective`] (noising, targets, loss), [`posterior`] and [`frozen`] (the frozen VAE encoder
//! and text encoder), [`denoiser`] (what is trained), [`trainer`] (the loop), [`checkpoint`]
//! (resumable state), [`validation`] (images drawn during training, for any training kind) and
//! [`finetune`] (what the UNet finetuning kinds share), [`train_stage`] (the `train` kind),
//! [`train_lora_stage`] (the `train-lora` kind); [`vae_training`] and
//! [`train_vae_stage`] train the pipeline's VAE as an autoencoder (the `train-vae` stage kind).

pub mod checkpoint;
pub mod data;
pub mod denoiser;
pub mod ema;
pub mod finetune;
pub mod frozen;
pub mod grad_scaler;
pub mod lr;
pub mod objective;
pub mod optim;
pub mod posterior;
pub mod recipe;
pub mod rng;
pub mod train_lora_stage;
pub mod train_stage;
pub mod train_vae_stage;
pub mod trainer;
pub mod vae_training;
pub mod validation;

use std::sync::Arc;

use sdpipe_stages::StageKind;

/// The stage kinds this crate provides: `train`, `train-lora` and `train-vae`.
pub fn kinds() -> Vec<Arc<dyn StageKind>> {
    vec![
        Arc::new(train_stage::Train::default()),
        Arc::new(train_lora_stage::TrainLora::default()),
        Arc::new(train_vae_stage::TrainVae),
    ]
}
