//! The training loop: one optimiser step at a time, exactly as the reference script's loop body.
//!
//! For each micro-batch of the step (see [`crate::data::plan`]), in this order of random draws
//! from the micro-batch's stream: the image transforms (crop, flip per image), the posterior's
//! noise, the diffusion noise, the noise offset (if any), the timesteps. Then
//! `latents = posterior sample × scaling_factor`; `x_t` by the model's noise schedule; target ε or
//! v; MSE (min-SNR weighted if `snr_gamma`) divided by the accumulation count; gradients summed
//! over the micro-batches. Then global-norm clipping, AdamW at the scheduled learning rate, and
//! the EMA update. With fp16 loss scaling ([`GradScaler`]) the loss is multiplied by the scale
//! before the backward and the summed gradients divided by it before clipping; a step whose
//! gradients overflowed is skipped (only the EMA update runs, as in the script). Every step is
//! a pure function of the state before it (the scaler's included) and the step number, so
//! [`Trainer::snapshot`] / [`Trainer::restore`] resume a run exactly.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use sdpipe_unet::ClipText;

use crate::data::{read_rgb, Example, MicroBatch, Plan, Transform};
use crate::denoiser::Denoiser;
use crate::ema::Ema;
use crate::frozen::Frozen;
use crate::grad_scaler::GradScaler;
use crate::lr::LrSchedule;
use crate::objective::{mse_loss, NoiseSchedule, Prediction};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, Moments};
use crate::rng::{Draws, Purpose, Seeds};

/// The prefix of the text encoder's parameter names among the trainer's (and in checkpoints).
pub const TEXT_ENCODER_PREFIX: &str = "text_encoder.";

/// Everything that determines a run besides the model and the data (the script's flags).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub transform: Transform,
    pub batch_size: usize,
    pub accumulation: usize,
    pub gradient_checkpointing: bool,
    pub max_train_steps: u64,
    pub lr: LrSchedule,
    pub max_grad_norm: f64,
    pub adam: AdamWConfig,
    pub use_ema: bool,
    pub seed: u64,
    pub noise_offset: f64,
    /// The share of captions replaced by the empty prompt (diffusers'
    /// `--proportion_empty_prompts`): what teaches the UNet the unconditional prediction that
    /// classifier-free guidance subtracts.
    pub proportion_empty_prompts: f64,
    pub snr_gamma: Option<f64>,
    pub prediction: Prediction,
    /// Dynamic loss scaling ([`GradScaler`]): on for `mixed_precision: fp16`.
    pub loss_scaling: bool,
}

/// One line of `train_log.jsonl`: one optimiser step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    pub step: u64,
    /// The mean loss of the step's micro-batches (before the division by the accumulation
    /// count); with a full accumulation group, the script's logged `train_loss`.
    pub loss: f64,
    /// The learning rate this step's update used.
    pub lr: f64,
    /// The global gradient norm before clipping; not finite (written `null`) on a step skipped
    /// for overflow.
    #[serde(deserialize_with = "finite_or_null")]
    pub grad_norm: f64,
    /// The optimiser step was skipped: the fp16 gradients overflowed (see [`GradScaler`]).
    /// Written only when true, so runs without loss scaling log what they always did.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    /// Wall-clock seconds the step took: in the stage's log, not in `train_log.jsonl`, whose
    /// bytes must depend on the inputs alone (a rerun, or another machine, gives the same file,
    /// so nothing downstream reruns for a different timing).
    #[serde(skip)]
    pub seconds: f64,
}

/// serde_json writes a non-finite number as `null`: read it back as infinity.
fn finite_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::INFINITY))
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Dataset(#[from] crate::data::DatasetError),
    #[error(transparent)]
    Pipeline(#[from] sdpipe_diffusion::PipelineError),
    #[error("training step {step}: {source}")]
    Compute {
        step: u64,
        #[source]
        source: candle_core::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// The complete mutable state of a run at a step boundary: what a checkpoint holds.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub step: u64,
    pub weights: Vec<Tensor>,
    pub adam: Vec<Option<Moments>>,
    pub ema: Option<(u64, Vec<Tensor>)>,
    pub scaler: Option<GradScaler>,
    pub log: Vec<LogLine>,
}

/// The loss of one micro-batch whose randomness has been drawn: what the script computes
/// between `vae.encode` and `accelerator.backward`.
pub struct Objective<'a> {
    pub schedule: &'a NoiseSchedule,
    pub prediction: Prediction,
    pub snr_gamma: Option<f64>,
    /// The loss is divided by this before the backward pass (accelerate's accumulation).
    pub accumulation: usize,
    /// And multiplied by this (fp16 loss scaling; 1 without): the gradients come back scaled,
    /// the loss value does not.
    pub loss_scale: f64,
    pub checkpointing: bool,
}

impl Objective<'_> {
    /// Noises `latents` with `noise` at `timesteps`, predicts with `model` given `context`, and
    /// returns the (undivided) loss with the gradients of the loss divided by the accumulation
    /// count.
    pub fn loss_and_grads<D: Denoiser>(
        &self,
        model: &D,
        latents: &Tensor,
        noise: &Tensor,
        timesteps: &[u32],
        context: &Tensor,
    ) -> candle_core::Result<(f32, Vec<Option<Tensor>>)> {
        let (loss, grads, _) = self.run(model, latents, noise, timesteps, context, false)?;
        Ok((loss, grads))
    }

    /// [`Objective::loss_and_grads`], and the gradient (divided by the accumulation count, as
    /// the others) with respect to `context`.
    pub fn loss_and_grads_with_context<D: Denoiser>(
        &self,
        model: &D,
        latents: &Tensor,
        noise: &Tensor,
        timesteps: &[u32],
        context: &Tensor,
    ) -> candle_core::Result<(f32, Vec<Option<Tensor>>, Tensor)> {
        let (loss, grads, context_grad) =
            self.run(model, latents, noise, timesteps, context, true)?;
        Ok((loss, grads, context_grad.expect("asked for")))
    }

    fn run<D: Denoiser>(
        &self,
        model: &D,
        latents: &Tensor,
        noise: &Tensor,
        timesteps: &[u32],
        context: &Tensor,
        context_grad: bool,
    ) -> candle_core::Result<(f32, Vec<Option<Tensor>>, Option<Tensor>)> {
        let noisy = self.schedule.add_noise(latents, noise, timesteps)?;
        let target = match self.prediction {
            Prediction::Epsilon => noise.clone(),
            Prediction::VPrediction => self.schedule.velocity(latents, noise, timesteps)?,
        };
        let weights = self
            .snr_gamma
            .map(|gamma| self.schedule.min_snr_weights(timesteps, gamma, self.prediction));
        let t = Tensor::new(timesteps, latents.device())?;
        let accumulation = self.accumulation as f64;
        let loss_scale = self.loss_scale;
        let loss_fn = |pred: &Tensor| -> candle_core::Result<Tensor> {
            let loss =
                mse_loss(pred, &target, weights.as_deref())?.affine(1.0 / accumulation, 0.0)?;
            if loss_scale == 1.0 {
                Ok(loss)
            } else {
                loss * loss_scale
            }
        };
        let (scaled, grads, context_grad) = model.loss_and_grads(
            &noisy,
            &t,
            context,
            self.checkpointing,
            context_grad,
            &loss_fn,
        )?;
        Ok(((scaled as f64 / loss_scale * accumulation) as f32, grads, context_grad))
    }
}

/// Adds a micro-batch's gradients to the running sums (torch's `.grad` accumulation).
pub fn accumulate(
    totals: &mut [Option<Tensor>],
    grads: Vec<Option<Tensor>>,
) -> candle_core::Result<()> {
    for (total, grad) in totals.iter_mut().zip(grads) {
        *total = match (total.take(), grad) {
            (Some(a), Some(b)) => Some((a + b)?),
            (a, b) => a.or(b),
        };
    }
    Ok(())
}

/// The optimiser step on summed gradients: global-norm clipping, AdamW at `lr`, then the EMA
/// update. Returns the gradient norm before clipping.
pub fn apply_update(
    vars: &[Var],
    mut grads: Vec<Option<Tensor>>,
    max_grad_norm: f64,
    adam: &mut AdamW,
    lr: f64,
    ema: Option<&mut Ema>,
) -> candle_core::Result<f64> {
    let grad_norm = clip_grad_norm(&mut grads, max_grad_norm)?;
    adam.step(vars, &grads, lr)?;
    if let Some(ema) = ema {
        ema.step(vars)?;
    }
    Ok(grad_norm)
}

/// [`apply_update`] on gradients of a loss multiplied by `scaler`'s scale (fp16): unscales
/// them; if any overflowed, skips the optimiser step (the weights and AdamW's state stay) but
/// not the EMA update, as the script does, and returns `None`; else returns the norm. Then
/// updates the scale.
pub fn apply_scaled_update(
    vars: &[Var],
    mut grads: Vec<Option<Tensor>>,
    scaler: &mut GradScaler,
    max_grad_norm: f64,
    adam: &mut AdamW,
    lr: f64,
    ema: Option<&mut Ema>,
) -> candle_core::Result<Option<f64>> {
    let finite = scaler.unscale(&mut grads)?;
    let norm = if finite {
        Some(apply_update(vars, grads, max_grad_norm, adam, lr, ema)?)
    } else {
        if let Some(ema) = ema {
            ema.step(vars)?;
        }
        None
    };
    scaler.update(!finite);
    Ok(norm)
}

/// A run in progress over a model `D`.
pub struct Trainer<'m, D: Denoiser> {
    pub config: TrainConfig,
    model: &'m D,
    names: Vec<String>,
    vars: Vec<Var>,
    frozen: &'m Frozen,
    /// The text encoder trained with the UNet (`train_text_encoder`); its parameters follow
    /// the model's in `names`/`vars`, and the frozen encoder is not used.
    text_encoder: Option<&'m ClipText>,
    examples: Vec<Example>,
    split_dir: PathBuf,
    schedule: NoiseSchedule,
    plan: Plan,
    seeds: Seeds,
    adam: AdamW,
    ema: Option<Ema>,
    /// fp16 loss scaling, when on.
    scaler: Option<GradScaler>,
    step: u64,
    log: Vec<LogLine>,
    /// Text-encoder output per example, `(1, 77, D)`.
    text_cache: Vec<Option<Tensor>>,
    /// The empty prompt's, for dropped captions.
    empty_text: Option<Tensor>,
    /// Posterior (mean, logvar) per example, kept only when the transform is deterministic.
    posterior_cache: HashMap<usize, (Tensor, Tensor)>,
}

impl<'m, D: Denoiser> Trainer<'m, D> {
    pub fn new(
        config: TrainConfig,
        model: &'m D,
        frozen: &'m Frozen,
        text_encoder: Option<&'m ClipText>,
        examples: Vec<Example>,
        split_dir: PathBuf,
        schedule: NoiseSchedule,
    ) -> Result<Self, TrainError> {
        if examples.is_empty() {
            return Err(TrainError::Invalid("no training examples".into()));
        }
        if config.batch_size == 0 || config.accumulation == 0 {
            return Err(TrainError::Invalid(
                "train_batch_size and gradient_accumulation_steps must be positive".into(),
            ));
        }
        let (mut names, mut vars): (Vec<String>, Vec<Var>) = model.parameters().into_iter().unzip();
        if let Some(text) = text_encoder {
            for (name, var) in text.vars() {
                names.push(format!("{TEXT_ENCODER_PREFIX}{name}"));
                vars.push(var.clone());
            }
        }
        let seeds = Seeds::new(config.seed);
        let plan = Plan {
            examples: examples.len(),
            batch_size: config.batch_size,
            accumulation: config.accumulation,
            seeds,
        };
        let ema = if config.use_ema {
            Some(Ema::new(&vars).map_err(|source| TrainError::Compute { step: 0, source })?)
        } else {
            None
        };
        let adam = AdamW::new(vars.len(), config.adam);
        let scaler = config.loss_scaling.then(GradScaler::default);
        let text_cache = vec![None; examples.len()];
        Ok(Trainer {
            config,
            model,
            names,
            vars,
            frozen,
            text_encoder,
            examples,
            split_dir,
            schedule,
            plan,
            seeds,
            adam,
            ema,
            scaler,
            step: 0,
            log: Vec::new(),
            text_cache,
            empty_text: None,
            posterior_cache: HashMap::new(),
        })
    }

    /// Optimiser steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn finished(&self) -> bool {
        self.step >= self.config.max_train_steps
    }

    pub fn log(&self) -> &[LogLine] {
        &self.log
    }

    pub fn parameter_names(&self) -> &[String] {
        &self.names
    }

    /// The trained variables, in the order of [`Trainer::parameter_names`].
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The EMA shadow of the weights (with `use_ema`): what gets saved instead of the weights.
    pub fn ema_weights(&self) -> Option<&[Tensor]> {
        self.ema.as_ref().map(|e| e.shadow.as_slice())
    }

    /// Runs `f` with the EMA weights in the trained variables when use_ema, and then puts the
    /// trained weights back (diffusers' `ema.store`, `ema.copy_to`, validation, `ema.restore`):
    /// `f` sees the weights that would be saved now, and training goes on exactly as if it had
    /// not run (the weights are restored from copies, bit for bit). Without use_ema it just runs
    /// `f`. The copies hold a second set of weights while `f` runs.
    pub fn with_ema_weights<R>(&self, f: impl FnOnce() -> R) -> candle_core::Result<R> {
        let Some(ema) = &self.ema else { return Ok(f()) };
        let stored = self
            .vars
            .iter()
            .map(|v| v.as_tensor().copy())
            .collect::<candle_core::Result<Vec<_>>>()?;
        for (var, shadow) in self.vars.iter().zip(&ema.shadow) {
            var.set(shadow)?;
        }
        let result = f();
        for (var, weights) in self.vars.iter().zip(&stored) {
            var.set(weights)?;
        }
        Ok(result)
    }

    /// Optimiser steps in one pass over the data.
    pub fn steps_per_epoch(&self) -> u64 {
        self.plan.steps_per_epoch() as u64
    }

    /// One optimiser step; returns its log line.
    pub fn step(&mut self) -> Result<LogLine, TrainError> {
        let step = self.step;
        let compute = |source| TrainError::Compute { step: step + 1, source };
        let started = Instant::now();
        let plan = self.plan.step(step);
        let mut grads: Vec<Option<Tensor>> = vec![None; self.vars.len()];
        let mut losses = Vec::with_capacity(plan.micro_batches.len());
        for micro_batch in &plan.micro_batches {
            let (loss, micro_grads) = self.micro_batch(micro_batch)?;
            losses.push(loss as f64);
            accumulate(&mut grads, micro_grads).map_err(compute)?;
        }
        // The schedule advances on the steps taken, not on those skipped for overflow.
        let taken = step - self.scaler.map_or(0, |s| s.skipped);
        let lr = self.config.lr.lr_at_optimizer_step(taken + 1);
        let (max_norm, adam, ema) = (self.config.max_grad_norm, &mut self.adam, self.ema.as_mut());
        let (grad_norm, overflowed) = match &mut self.scaler {
            Some(scaler) => {
                match apply_scaled_update(&self.vars, grads, scaler, max_norm, adam, lr, ema) {
                    Ok(Some(norm)) => (norm, false),
                    Ok(None) => (f64::INFINITY, true),
                    Err(e) => return Err(compute(e)),
                }
            }
            None => {
                (apply_update(&self.vars, grads, max_norm, adam, lr, ema).map_err(compute)?, false)
            }
        };
        self.step += 1;
        let line = LogLine {
            step: self.step,
            loss: losses.iter().sum::<f64>() / losses.len() as f64,
            lr,
            grad_norm,
            skipped: overflowed,
            seconds: started.elapsed().as_secs_f64(),
        };
        self.log.push(line.clone());
        Ok(line)
    }

    /// Forward and backward of one micro-batch: its (undivided) loss and its gradients.
    fn micro_batch(
        &mut self,
        batch: &MicroBatch,
    ) -> Result<(f32, Vec<Option<Tensor>>), TrainError> {
        let step = self.step + 1;
        let compute = |source| TrainError::Compute { step, source };
        let mut draws = self.seeds.stream(Purpose::MicroBatch, batch.index);
        let mut means = Vec::with_capacity(batch.examples.len());
        let mut logvars = Vec::with_capacity(batch.examples.len());
        let mut contexts = Vec::with_capacity(batch.examples.len());
        let dropped = self.dropped_captions(batch);
        for (&index, &dropped) in batch.examples.iter().zip(&dropped) {
            let (mean, logvar) = self.posterior(index, &mut draws)?;
            means.push(mean);
            logvars.push(logvar);
            if self.text_encoder.is_none() {
                contexts.push(if dropped { self.empty_text()? } else { self.text(index)? });
            }
        }
        let posterior = crate::posterior::Posterior {
            mean: Tensor::cat(&means, 0).map_err(compute)?,
            logvar: Tensor::cat(&logvars, 0).map_err(compute)?,
        };
        let context = match self.text_encoder {
            // Encoded with the graph kept, so the context's gradient reaches the encoder.
            Some(text) => {
                let captions: Vec<&str> = batch
                    .examples
                    .iter()
                    .zip(&dropped)
                    .map(|(&i, &d)| if d { "" } else { self.examples[i].caption.as_str() })
                    .collect();
                let ids = self.frozen.tokenize(&captions)?;
                text.forward(&ids).map_err(compute)?
            }
            None => Tensor::cat(&contexts, 0).map_err(compute)?,
        };
        let noise_like = |draws: &mut Draws| -> candle_core::Result<Tensor> {
            let mean = &posterior.mean;
            Tensor::from_vec(draws.normals(mean.elem_count()), mean.shape(), mean.device())
        };
        let posterior_noise = noise_like(&mut draws).map_err(compute)?;
        let latents = posterior
            .scaled_sample(&posterior_noise, self.frozen.scaling_factor)
            .map_err(compute)?;
        let mut noise = noise_like(&mut draws).map_err(compute)?;
        if self.config.noise_offset != 0.0 {
            let (b, c, _, _) = latents.dims4().map_err(compute)?;
            let offset = Tensor::from_vec(draws.normals(b * c), (b, c, 1, 1), latents.device())
                .and_then(|o| o.affine(self.config.noise_offset, 0.0))
                .and_then(|o| noise.broadcast_add(&o))
                .map_err(compute)?;
            noise = offset;
        }
        let timesteps: Vec<u32> = (0..batch.examples.len())
            .map(|_| draws.below(self.schedule.num_train_timesteps() as u64) as u32)
            .collect();
        let objective = Objective {
            schedule: &self.schedule,
            prediction: self.config.prediction,
            snr_gamma: self.config.snr_gamma,
            accumulation: self.config.accumulation,
            loss_scale: self.scaler.map_or(1.0, |s| s.scale),
            checkpointing: self.config.gradient_checkpointing,
        };
        let Some(text) = self.text_encoder else {
            return objective
                .loss_and_grads(self.model, &latents, &noise, &timesteps, &context)
                .map_err(compute);
        };
        let (loss, mut grads, context_grad) = objective
            .loss_and_grads_with_context(self.model, &latents, &noise, &timesteps, &context)
            .map_err(compute)?;
        // The encoder's gradients: back-propagate the context's through it (the
        // vector-Jacobian product `∂/∂θ Σ(context ⊙ g)` with g held constant).
        let mut store = (context * context_grad.detach())
            .and_then(|s| s.sum_all())
            .and_then(|s| s.backward())
            .map_err(compute)?;
        grads.extend(text.vars().values().map(|v| store.remove(v.as_tensor()).map(|g| g.detach())));
        Ok((loss, grads))
    }

    /// The posterior of example `index` after its transform. Only a deterministic transform
    /// (centre crop, no flip) is cached, and it draws nothing from `draws`, so the cache never
    /// shifts the stream's later draws.
    fn posterior(
        &mut self,
        index: usize,
        draws: &mut Draws,
    ) -> Result<(Tensor, Tensor), TrainError> {
        let transform = self.config.transform;
        let deterministic = transform.center_crop && !transform.random_flip;
        if deterministic {
            if let Some(cached) = self.posterior_cache.get(&index) {
                return Ok(cached.clone());
            }
        }
        let step = self.step + 1;
        let compute = |source| TrainError::Compute { step, source };
        let image = read_rgb(&self.examples[index].image, &self.split_dir)?;
        let (pixels, _) = transform.apply(&image, draws);
        let size = transform.resolution as usize;
        let pixels =
            Tensor::from_vec(pixels, (1, 3, size, size), &self.frozen.device).map_err(compute)?;
        let posterior = self.frozen.encode_images(&pixels).map_err(compute)?;
        let moments = (posterior.mean, posterior.logvar);
        if deterministic {
            self.posterior_cache.insert(index, moments.clone());
        }
        Ok(moments)
    }

    /// Per example of `batch`, whether its caption is replaced by the empty prompt.
    fn dropped_captions(&self, batch: &MicroBatch) -> Vec<bool> {
        let p = self.config.proportion_empty_prompts;
        if p <= 0.0 {
            return vec![false; batch.examples.len()];
        }
        let mut draws = self.seeds.stream(Purpose::CaptionDropout, batch.index);
        batch.examples.iter().map(|_| draws.uniform() < p).collect()
    }

    /// The frozen encoder's embedding of the empty prompt, `(1, 77, D)`.
    fn empty_text(&mut self) -> Result<Tensor, TrainError> {
        if let Some(cached) = &self.empty_text {
            return Ok(cached.clone());
        }
        let hidden = self.encode_frozen("")?;
        self.empty_text = Some(hidden.clone());
        Ok(hidden)
    }

    /// The text conditioning of example `index`, `(1, 77, D)`.
    fn text(&mut self, index: usize) -> Result<Tensor, TrainError> {
        if let Some(cached) = &self.text_cache[index] {
            return Ok(cached.clone());
        }
        let hidden = self.encode_frozen(&self.examples[index].caption)?;
        self.text_cache[index] = Some(hidden.clone());
        Ok(hidden)
    }

    /// The frozen encoder's last hidden state for one caption, `(1, 77, D)`.
    fn encode_frozen(&self, caption: &str) -> Result<Tensor, TrainError> {
        let ids = self.frozen.tokenize(&[caption])?;
        let step = self.step + 1;
        self.frozen.encode_ids(&ids).map_err(|source| TrainError::Compute { step, source })
    }

    /// The run's state, for a checkpoint.
    pub fn snapshot(&self) -> candle_core::Result<Snapshot> {
        Ok(Snapshot {
            step: self.step,
            // Deep copies: the optimiser updates the variables' storage in place.
            weights: self
                .vars
                .iter()
                .map(|v| v.as_tensor().copy())
                .collect::<candle_core::Result<_>>()?,
            adam: self.adam.state.clone(),
            ema: self.ema.as_ref().map(|e| (e.optimization_step, e.shadow.clone())),
            scaler: self.scaler,
            log: self.log.clone(),
        })
    }

    /// Continues from `snapshot` (taken from a run with the same config, model and data).
    pub fn restore(&mut self, snapshot: Snapshot) -> Result<(), TrainError> {
        let invalid =
            |m: &str| TrainError::Invalid(format!("checkpoint does not fit this run: {m}"));
        if snapshot.weights.len() != self.vars.len() || snapshot.adam.len() != self.vars.len() {
            return Err(invalid("different number of parameters"));
        }
        if snapshot.ema.is_some() != self.ema.is_some() {
            return Err(invalid("use_ema differs"));
        }
        if snapshot.scaler.is_some() != self.scaler.is_some() {
            return Err(invalid("loss scaling (mixed_precision fp16) differs"));
        }
        if snapshot.log.len() as u64 != snapshot.step {
            return Err(invalid("the log does not have one line per step"));
        }
        for ((var, weight), name) in self.vars.iter().zip(&snapshot.weights).zip(&self.names) {
            if var.shape() != weight.shape() {
                return Err(invalid(&format!("`{name}` has shape {:?}", weight.shape())));
            }
            var.set(weight)
                .map_err(|source| TrainError::Compute { step: snapshot.step, source })?;
        }
        self.adam.state = snapshot.adam;
        if let (Some(ema), Some((count, shadow))) = (&mut self.ema, snapshot.ema) {
            ema.optimization_step = count;
            ema.shadow = shadow;
        }
        self.scaler = snapshot.scaler;
        self.step = snapshot.step;
        self.log = snapshot.log;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    const ADAM: AdamWConfig =
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 };

    fn setup() -> (Vec<Var>, AdamW, Ema) {
        let vars = vec![Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap()];
        let ema = Ema::new(&vars).unwrap();
        (vars, AdamW::new(1, ADAM), ema)
    }

    fn grads(values: &[f32]) -> Vec<Option<Tensor>> {
        vec![Some(Tensor::new(values, &Device::Cpu).unwrap())]
    }

    fn weights(vars: &[Var]) -> Vec<f32> {
        vars[0].as_tensor().to_vec1().unwrap()
    }

    #[test]
    fn a_scaled_update_equals_the_update_on_unscaled_gradients() {
        let (vars, mut adam, mut ema) = setup();
        let mut scaler = GradScaler::default();
        let scaled = grads(&[0.5 * 65536.0, -0.25 * 65536.0]);
        let norm =
            apply_scaled_update(&vars, scaled, &mut scaler, 1.0, &mut adam, 1e-3, Some(&mut ema));
        let (plain_vars, mut plain_adam, mut plain_ema) = setup();
        let plain = apply_update(
            &plain_vars,
            grads(&[0.5, -0.25]),
            1.0,
            &mut plain_adam,
            1e-3,
            Some(&mut plain_ema),
        );
        assert_eq!(norm.unwrap(), Some(plain.unwrap()));
        assert_eq!(weights(&vars), weights(&plain_vars));
        assert_eq!(scaler, GradScaler { growth_tracker: 1, ..GradScaler::default() });
    }

    #[test]
    fn an_overflowed_step_leaves_weights_and_adam_and_steps_the_ema_and_backs_off() {
        let (vars, mut adam, mut ema) = setup();
        let mut scaler = GradScaler::default();
        let overflowed = grads(&[f32::INFINITY, 1.0]);
        let norm = apply_scaled_update(
            &vars,
            overflowed,
            &mut scaler,
            1.0,
            &mut adam,
            1e-3,
            Some(&mut ema),
        );
        assert_eq!(norm.unwrap(), None);
        assert_eq!(weights(&vars), [1.0, 2.0]);
        assert!(adam.state[0].is_none(), "AdamW took no step");
        assert_eq!(ema.optimization_step, 1, "the EMA update runs, as in the script");
        assert_eq!(scaler, GradScaler { scale: 32768.0, growth_tracker: 0, skipped: 1 });
    }
}
