//! Text-to-image generation as diffusers' `StableDiffusionPipeline.__call__` does it, given the
//! initial latents: CLIP text embeddings, the denoising loop with classifier-free guidance,
//! the VAE decode and the conversion to 8-bit RGB.
//!
//! Drawing the initial latents is the caller's business (the `sample` stage draws them from
//! its own seeded generator): with the same latents, this loop and diffusers' agree to the
//! tolerance the parity tests state.

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKL;
use image::RgbImage;
use sdpipe_stages::api::StageError;

use crate::clip_tokenizer::ClipTokenizer;
use crate::error::PipelineError;
use crate::pipeline::{SdPipeline, TextEncoder};
use crate::schedulers::Sampler;

/// A loaded pipeline, ready to sample.
pub struct StableDiffusion {
    /// sdpipe-unet's model, loaded for inference: the same UNet training runs.
    pub unet: sdpipe_unet::UNet,
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

/// Map a candle error to a stage failure with what was being done.
fn failed(what: &str) -> impl Fn(candle_core::Error) -> StageError + '_ {
    move |e| StageError::failed(format!("{what}: {e}"))
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
        let tokenizer = pipeline.tokenizer()?;
        pipeline.check_tokenizer_fits(&tokenizer)?;
        Ok(StableDiffusion {
            unet: pipeline.load_unet(device, dtype)?,
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

    /// CLIP's last hidden state for each prompt: (batch, 77, hidden).
    pub fn embed(&self, prompts: &[&str]) -> Result<Tensor, StageError> {
        let mut ids = Vec::with_capacity(prompts.len() * self.tokenizer.max_length());
        for prompt in prompts {
            ids.extend(self.tokenizer.encode(prompt)?);
        }
        let ids = Tensor::from_vec(ids, (prompts.len(), self.tokenizer.max_length()), &self.device)
            .map_err(failed("tokens"))?;
        self.text_encoder.encode(&ids).map_err(failed("the text encoder"))
    }

    /// Run the sampler from `latents` (already drawn; scaled here by `init_noise_sigma`).
    /// With `uncond` (the negative or empty prompt's embeddings) and `guidance_scale > 1`, each
    /// step evaluates both branches in one batch and mixes them as
    /// ε = ε_uncond + g·(ε_cond − ε_uncond); otherwise only the conditional branch runs, as in
    /// diffusers. `on_step(i, n)` runs after each of the `n` model calls (progress,
    /// cancellation); an error from it stops the loop.
    ///
    /// Precision: the latents are f32 from start to end, whatever [`StableDiffusion::dtype`]
    /// is. diffusers keeps the latents and the scheduler's step in the pipeline's dtype; here
    /// the UNet computes in f32 (and returns f32) anyway, so the step is done in f32 and
    /// nothing is rounded to half between steps: with a half `dtype` only the text
    /// embeddings (`cond`, `uncond`, which the UNet converts to f32) and the VAE decode are
    /// half. That is more precise than diffusers' fp16 loop, never less.
    pub fn denoise(
        &self,
        latents: &Tensor,
        cond: &Tensor,
        uncond: Option<&Tensor>,
        guidance_scale: f64,
        sampler: &mut dyn Sampler,
        on_step: &mut dyn FnMut(usize, usize) -> Result<(), StageError>,
    ) -> Result<Tensor, StageError> {
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
            let output = self
                .unet
                .predict(&input, &timestep, &context)
                .map_err(|e| StageError::failed(format!("the UNet: {e}")))?;
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
