//! Text-to-image generation as diffusers' `StableDiffusionPipeline.__call__` does it: CLIP text
//! embeddings, the denoising loop with classifier-free guidance, the VAE decode and the
//! conversion to 8-bit RGB.
//!
//! The initial latents are drawn per image from its seed by sdpipe's own generator
//! ([`StableDiffusion::initial_latents`]), not torch's; given the same latents, this loop and
//! diffusers' agree to the tolerance the parity tests state. [`StableDiffusion::draw`] is the
//! whole recipe for one batch, shared by the `sample` stage and by validation during training
//! (which passes the UNet it trains, see [`NoisePredictor`]), so both draw the same image for
//! the same weights, prompt, seed and settings.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKL;
use image::RgbImage;
use sdpipe_stages::api::StageError;

use crate::clip_tokenizer::ClipTokenizer;
use crate::error::PipelineError;
use crate::noise::standard_normal;
use crate::pipeline::{SdPipeline, TextEncoder};
use crate::schedulers::Sampler;

/// What the denoising loop evaluates: the UNet's prediction (noise, or v, as the scheduler
/// config says) for a batch of latents at one timestep, given text embeddings. sdpipe-unet's
/// UNet is one; a model in training is passed by reference between optimiser steps (see
/// [`StableDiffusion::load_without_unet`]).
pub trait NoisePredictor {
    fn predict(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
    ) -> candle_core::Result<Tensor>;
}

impl NoisePredictor for sdpipe_unet::UNet {
    fn predict(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
    ) -> candle_core::Result<Tensor> {
        // Without a graph: training's UNet, whose parameters are variables, records none either.
        sdpipe_unet::UNet::predict(self, sample, timestep, context)
            .map_err(candle_core::Error::wrap)
    }
}

/// A loaded pipeline, ready to sample. `U` is the UNet it owns: sdpipe-unet's, or `()` for one
/// that samples with a UNet its caller holds ([`StableDiffusion::load_without_unet`]).
pub struct StableDiffusion<U = sdpipe_unet::UNet> {
    /// sdpipe-unet's model, loaded for inference: the same UNet training runs.
    pub unet: U,
    pub vae: AutoEncoderKL,
    pub text_encoder: TextEncoder,
    pub tokenizer: ClipTokenizer,
    /// Latents = VAE posterior × this (0.18215 for SD1.x).
    pub scaling_factor: f64,
    pub latent_channels: usize,
    /// Pixels per latent along each side.
    pub vae_scale_factor: usize,
    pub device: Device,
    /// What the text encoder and the VAE are loaded and computed in (f32, f16 or bf16:
    /// diffusers' `torch_dtype`). The UNet computes in f32 whatever this is (sdpipe-unet has no
    /// half-precision path: it converts its inputs), and the latents and the sampler's
    /// arithmetic stay f32 throughout: the text embeddings are converted by the UNet, and only
    /// the VAE decode's input and output cross to and from this dtype (see
    /// [`StableDiffusion::denoise`], [`StableDiffusion::decode`]).
    pub dtype: DType,
    /// What the VAE computes in: `dtype`, except bf16 on the CPU, where candle has no bf16
    /// convolution and the VAE computes in f32 on bf16-rounded weights and inputs
    /// ([`crate::pipeline::vae_compute_dtype`]).
    pub vae_dtype: DType,
}

/// The text conditioning of one batch: the prompts' embeddings and, for classifier-free
/// guidance, the negative prompt's (the same batch size).
pub struct Conditioning<'a> {
    pub cond: &'a Tensor,
    pub uncond: Option<&'a Tensor>,
    /// ≤ 1 disables guidance (as in diffusers): only the conditional branch runs.
    pub guidance_scale: f64,
}

/// Map a candle error to a stage failure with what was being done.
fn failed(what: &str) -> impl Fn(candle_core::Error) -> StageError + '_ {
    move |e| StageError::failed(format!("{what}: {e}"))
}

/// The latent side for images `side` pixels across: the VAE divides it by its scale factor and
/// the UNet halves it once per down block after the first, and each halving must be exact.
pub fn latent_side(pipeline: &SdPipeline, side: usize) -> Result<usize, String> {
    let factor = pipeline.vae_scale_factor();
    let multiple = factor << (pipeline.unet.block_out_channels.len() - 1);
    if !side.is_multiple_of(multiple) {
        return Err(format!("{side} is not a multiple of {multiple}"));
    }
    Ok(side / factor)
}

impl StableDiffusion {
    /// Loads the pipeline's models: the tokenizer first (small files, checked against the text
    /// encoder's config), then each model's weights, each checked against its config from the
    /// weight files' headers before any tensor is read.
    pub fn load(
        pipeline: &SdPipeline,
        device: &Device,
        dtype: DType,
    ) -> Result<StableDiffusion, PipelineError> {
        StableDiffusion::load_with(pipeline, device, dtype, || pipeline.load_unet(device, dtype))
    }

    /// [`StableDiffusion::load`] with LoRA files merged into the UNet at their scales
    /// ([`SdPipeline::load_unet_with_lora`]). The UNet is the first model loaded, and a LoRA
    /// that does not fit it is refused from the headers, so nothing large is allocated first.
    pub fn load_with_lora(
        pipeline: &SdPipeline,
        device: &Device,
        dtype: DType,
        loras: &[(&sdpipe_unet::LoraFile, f64)],
    ) -> Result<StableDiffusion, PipelineError> {
        StableDiffusion::load_with(pipeline, device, dtype, || {
            pipeline.load_unet_with_lora(device, dtype, loras)
        })
    }
}

impl StableDiffusion<()> {
    /// [`StableDiffusion::load`] without the UNet: for sampling with one the caller holds (a
    /// model in training, whose weights change between calls), passed to
    /// [`StableDiffusion::draw`].
    pub fn load_without_unet(
        pipeline: &SdPipeline,
        device: &Device,
        dtype: DType,
    ) -> Result<StableDiffusion<()>, PipelineError> {
        StableDiffusion::load_with(pipeline, device, dtype, || Ok(()))
    }
}

impl<U: NoisePredictor> StableDiffusion<U> {
    /// [`StableDiffusion::denoise_with`] this pipeline's own UNet.
    pub fn denoise(
        &self,
        latents: &Tensor,
        cond: &Tensor,
        uncond: Option<&Tensor>,
        guidance_scale: f64,
        sampler: &mut dyn Sampler,
        on_step: &mut dyn FnMut(usize, usize) -> Result<(), StageError>,
    ) -> Result<Tensor, StageError> {
        let conditioning = Conditioning { cond, uncond, guidance_scale };
        self.denoise_with(&self.unet, latents, &conditioning, sampler, on_step)
    }
}

impl<U> StableDiffusion<U> {
    fn load_with(
        pipeline: &SdPipeline,
        device: &Device,
        dtype: DType,
        unet: impl FnOnce() -> Result<U, PipelineError>,
    ) -> Result<StableDiffusion<U>, PipelineError> {
        let tokenizer = pipeline.tokenizer()?;
        pipeline.check_tokenizer_fits(&tokenizer)?;
        Ok(StableDiffusion {
            unet: unet()?,
            vae: pipeline.load_vae(device, dtype)?,
            text_encoder: pipeline.load_text_encoder(device, dtype)?,
            tokenizer,
            scaling_factor: pipeline.vae.scaling_factor,
            latent_channels: pipeline.unet.in_channels,
            vae_scale_factor: pipeline.vae_scale_factor(),
            device: device.clone(),
            dtype,
            vae_dtype: crate::pipeline::vae_compute_dtype(dtype, device),
        })
    }

    /// The prompts' token ids, padded and truncated to the tokenizer's length: (batch, 77).
    pub fn token_ids(&self, prompts: &[&str]) -> Result<Tensor, StageError> {
        let mut ids = Vec::with_capacity(prompts.len() * self.tokenizer.max_length());
        for prompt in prompts {
            ids.extend(self.tokenizer.encode(prompt)?);
        }
        Tensor::from_vec(ids, (prompts.len(), self.tokenizer.max_length()), &self.device)
            .map_err(failed("tokens"))
    }

    /// CLIP's last hidden state for each prompt: (batch, 77, hidden).
    pub fn embed(&self, prompts: &[&str]) -> Result<Tensor, StageError> {
        let ids = self.token_ids(prompts)?;
        self.text_encoder.encode(&ids).map_err(failed("the text encoder"))
    }

    /// The initial latents of a batch, one image per seed: each image's are
    /// [`crate::noise::standard_normal`] of its seed, so an image does not depend on the batch
    /// it is drawn in. `latent_size` is (height, width) in latents.
    pub fn initial_latents(
        &self,
        seeds: &[u64],
        latent_size: (usize, usize),
    ) -> Result<Tensor, StageError> {
        let (lh, lw) = latent_size;
        let per_image = self.latent_channels * lh * lw;
        let mut noise = Vec::with_capacity(seeds.len() * per_image);
        for &seed in seeds {
            noise.extend(standard_normal(seed, per_image));
        }
        Tensor::from_vec(noise, (seeds.len(), self.latent_channels, lh, lw), &self.device)
            .map_err(failed("latents"))
    }

    /// One batch of images as the `sample` stage makes them: initial latents from `seeds`
    /// ([`StableDiffusion::initial_latents`]), denoised by `unet` under `conditioning`, decoded,
    /// converted to 8-bit RGB. `on_step` as in [`StableDiffusion::denoise_with`].
    pub fn draw(
        &self,
        unet: &dyn NoisePredictor,
        seeds: &[u64],
        latent_size: (usize, usize),
        conditioning: &Conditioning<'_>,
        sampler: &mut dyn Sampler,
        on_step: &mut dyn FnMut(usize, usize) -> Result<(), StageError>,
    ) -> Result<Vec<RgbImage>, StageError> {
        let latents = self.initial_latents(seeds, latent_size)?;
        let latents = self.denoise_with(unet, &latents, conditioning, sampler, on_step)?;
        to_rgb8(&self.decode(&latents)?)
    }

    /// Run the sampler from `latents` (already drawn; scaled here by `init_noise_sigma`) with
    /// `unet`. With an unconditional embedding and `guidance_scale > 1`, each step evaluates
    /// both branches in one batch and mixes them as ε = ε_uncond + g·(ε_cond − ε_uncond);
    /// otherwise only the conditional branch runs, as in diffusers. `on_step(i, n)` runs after
    /// each of the `n` model calls (progress, cancellation); an error from it stops the loop.
    ///
    /// Precision: the latents are f32 from start to end, whatever [`StableDiffusion::dtype`]
    /// is. diffusers keeps the latents and the scheduler's step in the pipeline's dtype; here
    /// the UNet computes in f32 (and returns f32) anyway, so the step is done in f32 and
    /// nothing is rounded to half between steps: with a half `dtype` only the text
    /// embeddings (`cond`, `uncond`, which the UNet converts to f32) and the VAE decode are
    /// half. That is more precise than diffusers' fp16 loop, never less.
    pub fn denoise_with(
        &self,
        unet: &dyn NoisePredictor,
        latents: &Tensor,
        conditioning: &Conditioning<'_>,
        sampler: &mut dyn Sampler,
        on_step: &mut dyn FnMut(usize, usize) -> Result<(), StageError>,
    ) -> Result<Tensor, StageError> {
        let &Conditioning { cond, uncond, guidance_scale } = conditioning;
        let batch = latents.dim(0).map_err(failed("latents"))?;
        let guided = match uncond {
            Some(uncond) if guidance_scale > 1.0 => Some(uncond),
            _ => None,
        };
        let context = match guided {
            Some(uncond) => Tensor::cat(&[uncond, cond], 0).map_err(failed("embeddings"))?,
            None => cond.clone(),
        };
        let mut latents = (latents.to_dtype(DType::F32).map_err(failed("latents"))?
            * sampler.init_noise_sigma())
        .map_err(failed("latents"))?;
        let timesteps = sampler.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            let input = match guided {
                Some(_) => Tensor::cat(&[&latents, &latents], 0),
                None => Ok(latents.clone()),
            }
            .and_then(|x| sampler.scale_model_input(&x, i))
            .map_err(failed("the UNet input"))?;
            // diffusers passes the scheduler's timestep tensor; the UNet's sinusoidal
            // projection reads it as float32.
            let timestep = Tensor::new(&[t as f32], &self.device).map_err(failed("timestep"))?;
            let output = unet.predict(&input, &timestep, &context).map_err(failed("the UNet"))?;
            let eps = match guided {
                Some(_) => {
                    let (u, c) = (output.i(..batch), output.i(batch..));
                    u.and_then(|u| {
                        let c = c?;
                        let diff = (&c - &u)?;
                        &u + (diff * guidance_scale)?
                    })
                    .map_err(failed("guidance"))?
                }
                None => output,
            };
            latents = sampler.step(&eps, i, &latents).map_err(failed("the scheduler step"))?;
            on_step(i, timesteps.len())?;
        }
        Ok(latents)
    }

    /// Decode latents to images in [0, 1], (batch, 3, H, W) f32: `vae.decode(z / scaling)`,
    /// then x/2 + 0.5 clamped, as diffusers' image processor denormalises. `z` is rounded to
    /// [`StableDiffusion::dtype`] and the VAE computes in [`StableDiffusion::vae_dtype`] (the
    /// same but for bf16 on the CPU); its output is converted to f32 before the
    /// denormalisation, so the result is f32 whatever the dtype.
    ///
    /// One latent at a time: candle 0.11.1's VAE attention block (`AttentionBlock`, in the
    /// decoder's mid block) computes wrong values for batches larger than one (tested against
    /// diffusers in `tests/parity.rs`), and is exact for a batch of one.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, StageError> {
        let z = (latents / self.scaling_factor)
            .and_then(|z| z.to_dtype(self.dtype))
            .and_then(|z| z.to_dtype(self.vae_dtype))
            .map_err(failed("latents"))?;
        let batch = z.dim(0).map_err(failed("latents"))?;
        let decoded = (0..batch)
            .map(|b| z.i(b..b + 1).and_then(|one| self.vae.decode(&one)))
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(failed("the VAE decoder"))?;
        let x = Tensor::cat(&decoded, 0).map_err(failed("the VAE decoder"))?;
        x.to_dtype(DType::F32)
            .and_then(|x| (x * 0.5)? + 0.5)
            .and_then(|x| x.clamp(0f32, 1f32))
            .map_err(failed("the decoded image"))
    }
}

/// Writes `image` as a PNG at `path`, under a temporary name first and then renamed, so a kill
/// never leaves a torn file that a resumed run would take as done.
pub fn save_png(image: &RgbImage, path: &Path) -> Result<(), StageError> {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    image
        .save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| StageError::failed(format!("writing {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| StageError::io(format!("finishing {}", path.display()), e))
}

/// Images in [0, 1] (batch, 3, H, W) → 8-bit RGB, rounding as numpy (ties to even), which is
/// what diffusers' `numpy_to_pil` does with `(x * 255).round()`. Images of any float dtype are
/// read (f16 and bf16 are converted to f32 first, exactly: both are subsets of f32).
pub fn to_rgb8(images: &Tensor) -> Result<Vec<RgbImage>, StageError> {
    let (batch, channels, height, width) = images.dims4().map_err(failed("images"))?;
    if channels != 3 {
        return Err(StageError::failed(format!("expected 3 image channels, got {channels}")));
    }
    let hwc = images
        .to_dtype(DType::F32)
        .and_then(|x| x.permute((0, 2, 3, 1)))
        .and_then(|x| x.contiguous())
        .and_then(|x| x.flatten_all())
        .and_then(|x| x.to_vec1::<f32>())
        .map_err(failed("images"))?;
    let per_image = height * width * 3;
    Ok((0..batch)
        .map(|b| {
            let bytes: Vec<u8> = hwc[b * per_image..(b + 1) * per_image]
                .iter()
                .map(|&v| (v * 255.0).round_ties_even().clamp(0.0, 255.0) as u8)
                .collect();
            RgbImage::from_raw(width as u32, height as u32, bytes).expect("sized buffer")
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_images_convert_to_the_same_bytes_as_f32_ones() {
        // Values exact in f16 and bf16 (multiples of 1/64 in [0, 1]), so all three agree.
        let values: Vec<f32> = (0..3 * 4 * 5).map(|i| (i % 65) as f32 / 64.0).collect();
        let images = Tensor::from_vec(values, (1, 3, 4, 5), &Device::Cpu).unwrap();
        let full = to_rgb8(&images).unwrap();
        for dtype in [DType::F16, DType::BF16] {
            assert_eq!(to_rgb8(&images.to_dtype(dtype).unwrap()).unwrap(), full, "{dtype:?}");
        }
    }
}
