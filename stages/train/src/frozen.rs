//! The frozen parts of the pipeline: the VAE encoder (images → latent posterior) and the CLIP
//! text encoder with its tokenizer (captions → conditioning), loaded from a pipeline folder.
//!
//! Neither is trained, and both are deterministic, so their outputs are cached per example
//! (text always, the posterior when the image transform has no randomness): the reference
//! recomputes them every step and gets the same values.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sdpipe_diffusion::{ClipTokenizer, PipelineError, SdPipeline, TextEncoder};

use crate::posterior::{Posterior, VaeEncoder};

pub struct Frozen {
    vae: VaeEncoder,
    text_encoder: TextEncoder,
    tokenizer: ClipTokenizer,
    pub scaling_factor: f64,
    pub device: Device,
}

impl Frozen {
    pub fn load(pipeline: &SdPipeline, device: &Device) -> Result<Frozen, PipelineError> {
        let vae_files = pipeline.weight_files("vae")?;
        let weights_error = |path: &PathBuf| {
            let path = path.clone();
            move |source| PipelineError::Weights { path, source }
        };
        let vb = sdpipe_diffusion::pipeline::var_builder(&vae_files, DType::F32, device)?;
        let config = pipeline.candle_vae_config()?;
        let vae = VaeEncoder::new(vb, pipeline.vae.in_channels, &config)
            .map_err(weights_error(&vae_files[0]))?;
        let text_encoder = pipeline.load_text_encoder(device, DType::F32)?;
        let tokenizer = pipeline.tokenizer()?;
        Ok(Frozen {
            vae,
            text_encoder,
            tokenizer,
            scaling_factor: pipeline.vae.scaling_factor,
            device: device.clone(),
        })
    }

    /// The latent posterior of a batch of images in [-1, 1].
    pub fn encode_images(&self, pixels: &Tensor) -> candle_core::Result<Posterior> {
        self.vae.encode(pixels)
    }

    /// Token ids padded and truncated to the tokenizer's length (77), as `(B, 77)`.
    pub fn tokenize(&self, captions: &[&str]) -> Result<Tensor, PipelineError> {
        let mut ids = Vec::with_capacity(captions.len() * self.tokenizer.max_length());
        for caption in captions {
            ids.extend(self.tokenizer.encode(caption)?);
        }
        let shape = (captions.len(), self.tokenizer.max_length());
        Tensor::from_vec(ids, shape, &self.device)
            .map_err(|source| PipelineError::Weights { path: PathBuf::from("tokenizer"), source })
    }

    /// The text encoder's last hidden state for a batch of token ids.
    pub fn encode_ids(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.text_encoder.encode(ids)
    }
}
