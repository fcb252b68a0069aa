//! Stable Diffusion for sdpipe: pipeline folders in the diffusers layout ([`pipeline`],
//! [`config`]), CLIP's tokenizer ([`clip_tokenizer`]), tiny random-weight SD1.x pipelines
//! ([`tiny`], the `tiny-sd` kind), noise schedules and samplers ([`schedulers`]), generation
//! ([`generate`]), the base-model identity LoRA files carry ([`lora_base`]) and the `sample`
//! kind.

pub mod clip_tokenizer;
pub mod config;
pub mod error;
pub mod generate;
pub mod lora_base;
pub mod noise;
pub mod pipeline;
pub mod sample_stage;
pub mod schedulers;
pub mod tiny;
mod tiny_bpe;
pub mod tiny_sd_stage;

use std::sync::Arc;

use sdpipe_stages::api::StageKind;

pub use clip_tokenizer::ClipTokenizer;
pub use error::PipelineError;
pub use generate::{to_rgb8, StableDiffusion};
pub use pipeline::{copy_components, write_weights, SdPipeline, TextEncoder};
pub use tiny::{write_tiny, TinySpec};

/// The stage kinds this crate provides: `tiny-sd` and `sample`.
pub fn kinds() -> Vec<Arc<dyn StageKind>> {
    vec![Arc::new(tiny_sd_stage::TinySd), Arc::new(sample_stage::Sample::default())]
}
