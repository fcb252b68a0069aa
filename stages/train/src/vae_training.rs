//! Training a Stable Diffusion VAE as an autoencoder, in the simplest honest form of diffusers'
//! `train_autoencoderkl.py` (and LDM's first stage): no discriminator and no perceptual loss.
//!
//! Each optimiser step takes one micro-batch (see [`crate::data::plan`]), preprocesses its images
//! with the `train` stage's transform (resize, centre or random crop, optional flip, [−1, 1]),
//! encodes them to the posterior, draws the reparameterised sample `z = μ + σ·ε`, decodes it and
//! minimises `reconstruction + kl_weight · KL`, where the reconstruction loss is the mean L1 (or
//! squared) error over pixels and `KL` is the per-example KL divergence to N(0, I) summed over
//! latent elements and averaged over the batch — the reductions diffusers' script uses. Then
//! global-norm clipping and AdamW at the scheduled learning rate.
//!
//! Randomness comes from the same addressed streams as UNet training ([`crate::rng`]): the data
//! order per epoch and, per micro-batch, the crops/flips then the posterior noise. A run is a pure
//! function of its settings and data, so a rerun reproduces it exactly.
//!
//! After training, [`VaeTrainer::latent_scaling_factor`] measures `1 / std` of the training
//! images' latents, the LDM practice for choosing the `scaling_factor` that makes the diffusion
//! model's latents unit-variance (SD1.x's 0.18215 was measured this way).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Tensor, Var};
use image::RgbImage;
use sdpipe_unet::vae::Vae;
use serde::{Deserialize, Serialize};

use crate::data::{read_rgb, DatasetError, Example, Plan, Transform};
use crate::lr::LrSchedule;
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::rng::{Purpose, Seeds};

/// The pixel reconstruction loss (the `reconstruction_loss` parameter's value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReconLoss {
    /// Mean absolute error (LDM's choice; diffusers' script's default).
    L1,
    /// Mean squared error.
    Mse,
}

impl ReconLoss {
    pub const NAMES: &'static [&'static str] = &["l1", "mse"];

    fn apply(self, reconstruction: &Tensor, target: &Tensor) -> candle_core::Result<Tensor> {
        let diff = (reconstruction - target)?;
        match self {
            ReconLoss::L1 => diff.abs()?.mean_all(),
            ReconLoss::Mse => diff.sqr()?.mean_all(),
        }
    }
}

/// Everything that determines a VAE run besides the model and the data.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeTrainConfig {
    pub transform: Transform,
    pub batch_size: usize,
    pub max_train_steps: u64,
    pub lr: LrSchedule,
    pub max_grad_norm: f64,
    pub adam: AdamWConfig,
    pub seed: u64,
    pub kl_weight: f64,
    pub recon: ReconLoss,
}

/// One line of the VAE training log: one optimiser step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeLogLine {
    pub step: u64,
    /// `recon + kl_weight · kl`, the minimised loss.
    pub loss: f64,
    /// The reconstruction loss (mean over pixels).
    pub recon: f64,
    /// The KL divergence per example (summed over latent elements, averaged over the batch).
    pub kl: f64,
    pub lr: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Wall-clock seconds the step took: in the stage's log only, as for `train` (see
    /// [`crate::trainer::LogLine::seconds`]).
    #[serde(skip)]
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum VaeTrainError {
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("VAE training step {step}: {source}")]
    Compute {
        step: u64,
        #[source]
        source: candle_core::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// The stream used to measure the latent scale: a micro-batch number no run reaches.
const SCALE_STREAM: u64 = (1 << 56) - 1;

/// A VAE run in progress.
pub struct VaeTrainer<'m> {
    pub config: VaeTrainConfig,
    vae: &'m Vae,
    vars: Vec<Var>,
    /// The decoded training images, by example index (tiny datasets: decoding once is cheaper).
    images: Vec<RgbImage>,
    plan: Plan,
    seeds: Seeds,
    adam: AdamW,
    step: u64,
    log: Vec<VaeLogLine>,
}

impl<'m> VaeTrainer<'m> {
    /// A run over `examples`, each listed in the metadata of its `split_dir` (for error messages).
    pub fn new(
        config: VaeTrainConfig,
        vae: &'m Vae,
        examples: &[(Example, PathBuf)],
    ) -> Result<Self, VaeTrainError> {
        if examples.is_empty() {
            return Err(VaeTrainError::Invalid("no training examples".into()));
        }
        if config.batch_size == 0 {
            return Err(VaeTrainError::Invalid("train_batch_size must be positive".into()));
        }
        let factor = vae.config().downscale() as u32;
        if !config.transform.resolution.is_multiple_of(factor) {
            return Err(VaeTrainError::Invalid(format!(
                "resolution {} must be a multiple of {factor}, the VAE's downscaling factor",
                config.transform.resolution
            )));
        }
        let images = examples
            .iter()
            .map(|(example, split)| read_rgb(&example.image, split))
            .collect::<Result<Vec<_>, _>>()?;
        let vars: Vec<Var> = vae.vars().values().cloned().collect();
        let seeds = Seeds::new(config.seed);
        let plan =
            Plan { examples: images.len(), batch_size: config.batch_size, accumulation: 1, seeds };
        let adam = AdamW::new(vars.len(), config.adam);
        Ok(VaeTrainer { config, vae, vars, images, plan, seeds, adam, step: 0, log: Vec::new() })
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn finished(&self) -> bool {
        self.step >= self.config.max_train_steps
    }

    pub fn log(&self) -> &[VaeLogLine] {
        &self.log
    }

    /// The images of `indices` after `transform`, `(B, 3, R, R)` in [−1, 1], with their random
    /// choices drawn from `draws` in order.
    fn pixels(
        &self,
        indices: &[usize],
        transform: &Transform,
        draws: &mut crate::rng::Draws,
    ) -> candle_core::Result<Tensor> {
        let size = transform.resolution as usize;
        let mut data = Vec::with_capacity(indices.len() * 3 * size * size);
        for &i in indices {
            data.extend(transform.apply(&self.images[i], draws).0);
        }
        Tensor::from_vec(data, (indices.len(), 3, size, size), self.vae.device())
    }

    /// One optimiser step; returns its log line.
    pub fn step(&mut self) -> Result<VaeLogLine, VaeTrainError> {
        let step = self.step + 1;
        let compute = |source| VaeTrainError::Compute { step, source };
        let started = Instant::now();
        let plan = self.plan.step(self.step);
        let batch = &plan.micro_batches[0];
        let mut draws = self.seeds.stream(Purpose::MicroBatch, batch.index);
        let x =
            self.pixels(&batch.examples, &self.config.transform, &mut draws).map_err(compute)?;
        let (loss, recon, kl, grads) = self.loss_and_grads(&x, &mut draws).map_err(compute)?;
        let mut grads = grads;
        let lr = self.config.lr.lr_at_optimizer_step(step);
        let grad_norm = clip_grad_norm(&mut grads, self.config.max_grad_norm).map_err(compute)?;
        self.adam.step(&self.vars, &grads, lr).map_err(compute)?;
        self.step = step;
        let line = VaeLogLine {
            step,
            loss,
            recon,
            kl,
            lr,
            grad_norm,
            seconds: started.elapsed().as_secs_f64(),
        };
        self.log.push(line.clone());
        Ok(line)
    }

    /// Forward and backward of one batch: (loss, recon, kl, gradient per parameter).
    #[allow(clippy::type_complexity)]
    fn loss_and_grads(
        &self,
        x: &Tensor,
        draws: &mut crate::rng::Draws,
    ) -> candle_core::Result<(f64, f64, f64, Vec<Option<Tensor>>)> {
        let posterior = self.vae.encode(x)?;
        let mean = &posterior.mean;
        let noise = Tensor::from_vec(draws.normals(mean.elem_count()), mean.shape(), x.device())?;
        let reconstruction = self.vae.decode(&posterior.sample(&noise)?)?;
        let recon = self.config.recon.apply(&reconstruction, x)?;
        let kl = posterior.kl()?.mean_all()?;
        let loss = (&recon + (&kl * self.config.kl_weight)?)?;
        let scalar = |t: &Tensor| -> candle_core::Result<f64> { Ok(t.to_scalar::<f32>()? as f64) };
        let (loss_value, recon_value, kl_value) = (scalar(&loss)?, scalar(&recon)?, scalar(&kl)?);
        if !loss_value.is_finite() {
            candle_core::bail!("the loss is {loss_value}; lower the learning rate")
        }
        let mut store = loss.backward()?;
        let grads = self.vars.iter().map(|v| store.remove(v.as_tensor())).collect();
        Ok((loss_value, recon_value, kl_value, grads))
    }

    /// `1 / std` of the latents `z = μ + σ·ε` of every training image (centre-cropped, not
    /// flipped), with the unbiased standard deviation over all latent elements: the LDM practice
    /// for the `scaling_factor` that makes the diffusion model's inputs unit-variance.
    pub fn latent_scaling_factor(&self) -> Result<f64, VaeTrainError> {
        let compute = |source| VaeTrainError::Compute { step: self.step, source };
        let transform =
            Transform { center_crop: true, random_flip: false, ..self.config.transform };
        let mut draws = self.seeds.stream(Purpose::MicroBatch, SCALE_STREAM);
        let (mut sum, mut sum_sq, mut count) = (0f64, 0f64, 0usize);
        let indices: Vec<usize> = (0..self.images.len()).collect();
        for chunk in indices.chunks(self.config.batch_size.max(1)) {
            let latents = self
                .pixels(chunk, &transform, &mut draws)
                .and_then(|x| self.vae.encode(&x.detach()))
                .and_then(|p| {
                    let noise = draws.normals(p.mean.elem_count());
                    let noise = Tensor::from_vec(noise, p.mean.shape(), p.mean.device())?;
                    p.sample(&noise)?.detach().flatten_all()?.to_vec1::<f32>()
                })
                .map_err(compute)?;
            count += latents.len();
            for v in latents {
                let v = v as f64;
                sum += v;
                sum_sq += v * v;
            }
        }
        let n = count as f64;
        let mean = sum / n;
        let variance = (sum_sq - n * mean * mean) / (n - 1.0).max(1.0);
        let std = variance.max(0.0).sqrt();
        if !(std.is_finite() && std > 0.0) {
            return Err(VaeTrainError::Invalid(format!(
                "the latents have standard deviation {std}; cannot derive a scaling factor"
            )));
        }
        Ok(1.0 / std)
    }
}
