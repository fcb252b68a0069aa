//! The frozen parts of the pipeline: the VAE encoder (images → latent posterior) and the CLIP
//! text encoder with its tokenizer (captions → conditioning), loaded from a pipeline folder.
//!
//! Neither is trained, and both are deterministic, so their outputs are cached per example
//! (text always, the posterior when the image transform has no randomness): the reference
//! recomputes them every step and gets the same values.
//!
//! Both are loaded in the run's `weight_dtype` (f32, or f16/bf16 with `mixed_precision`, as
//! diffusers' script casts `vae` and `text_encoder` to `weight_dtype`), and both return f32:
//! their outputs are converted before they reach the UNet, whose weights, optimiser state and
//! arithmetic stay f32.

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
    /// What both are loaded in (diffusers' `weight_dtype`).
    pub dtype: DType,
    /// What the VAE computes in: `dtype`, but f32 for bf16 on the CPU, where candle has no
    /// bf16 convolution (see `sdpipe_diffusion::pipeline::vae_compute_dtype`).
    vae_dtype: DType,
}

impl Frozen {
    /// The frozen VAE encoder and text encoder in `dtype` (f32 without mixed precision).
    pub fn load(
        pipeline: &SdPipeline,
        device: &Device,
        dtype: DType,
    ) -> Result<Frozen, PipelineError> {
        let vae_files = pipeline.weight_files("vae")?;
        let weights_error = |path: &PathBuf| {
            let path = path.clone();
            move |source| PipelineError::Weights { path, source }
        };
        let (vb, vae_dtype) =
            sdpipe_diffusion::pipeline::vae_var_builder(&vae_files, dtype, device)?;
        let config = pipeline.candle_vae_config()?;
        let vae = VaeEncoder::new(vb, pipeline.vae.in_channels, &config)
            .map_err(weights_error(&vae_files[0]))?;
        let text_encoder = pipeline.load_text_encoder(device, dtype)?;
        let tokenizer = pipeline.tokenizer()?;
        Ok(Frozen {
            vae,
            text_encoder,
            tokenizer,
            scaling_factor: pipeline.vae.scaling_factor,
            device: device.clone(),
            dtype,
            vae_dtype,
        })
    }

    /// The latent posterior of a batch of images in [-1, 1] (f32 pixels), in f32 whatever the
    /// VAE's dtype: the pixels are rounded to it, as the script's
    /// `pixel_values.to(weight_dtype)`, and the mean and log-variance converted back.
    pub fn encode_images(&self, pixels: &Tensor) -> candle_core::Result<Posterior> {
        let pixels = pixels.to_dtype(self.dtype)?.to_dtype(self.vae_dtype)?;
        let Posterior { mean, logvar } = self.vae.encode(&pixels)?;
        Ok(Posterior { mean: mean.to_dtype(DType::F32)?, logvar: logvar.to_dtype(DType::F32)? })
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

    /// The text encoder's last hidden state for a batch of token ids, in f32 whatever the
    /// encoder's dtype (what the UNet is conditioned on).
    pub fn encode_ids(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.text_encoder.encode(ids)?.to_dtype(DType::F32)
    }
}
