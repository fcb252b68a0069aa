//! diffusers' `DDIMScheduler` with η = 0 (deterministic): x̂₀ from the model output, optionally
//! clipped (`clip_sample`), then x_{t−δ} = √ᾱ_{t−δ}·x̂₀ + √(1−ᾱ_{t−δ})·ε̂.

use candle_core::{Result as CandleResult, Tensor};

use super::{
    check_steps, discrete_timesteps, lincomb, spacing, NoiseSchedule, PredictionType, Sampler,
    TimestepSpacing,
};
use crate::config::SchedulerConfig;

pub struct Ddim {
    schedule: NoiseSchedule,
    final_alpha_cumprod: f64,
    stride: usize,
    timesteps: Vec<f64>,
    clip_sample: Option<f64>,
}

impl Ddim {
    /// Built as `DDIMScheduler.from_config(config)` inside a `StableDiffusionPipeline`, which
    /// forces `clip_sample` off (DDIM's own default is on; SD latents are not in [-1, 1]).
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Ddim, String> {
        let schedule = NoiseSchedule::from_config(config)?;
        let train = schedule.num_train_timesteps();
        check_steps(steps, train)?;
        if config.extra.get("thresholding").and_then(|v| v.as_bool()) == Some(true) {
            return Err("DDIM `thresholding` is not supported".into());
        }
        let timesteps = discrete_timesteps(
            spacing(config, TimestepSpacing::Leading)?,
            train,
            steps,
            config.steps_offset.unwrap_or(0),
        )
        .into_iter()
        .map(|t| t as f64)
        .collect();
        // DDIM's class default for set_alpha_to_one is true.
        let final_alpha_cumprod =
            if config.set_alpha_to_one.unwrap_or(true) { 1.0 } else { schedule.alphas_cumprod[0] };
        Ok(Ddim {
            schedule,
            final_alpha_cumprod,
            stride: train / steps,
            timesteps,
            clip_sample: None,
        })
    }

    /// Clip x̂₀ to ±`range` as DDIM's `clip_sample` does (off in SD pipelines).
    pub fn with_clip_sample(mut self, range: Option<f64>) -> Ddim {
        self.clip_sample = range;
        self
    }
}

impl Sampler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _index: usize) -> CandleResult<Tensor> {
        Ok(sample.clone())
    }

    fn step(&mut self, output: &Tensor, index: usize, sample: &Tensor) -> CandleResult<Tensor> {
        let Some(&t) = self.timesteps.get(index) else {
            candle_core::bail!("step {index} is past the {} timesteps", self.timesteps.len());
        };
        let t = t as usize;
        let prev_t = t as i64 - self.stride as i64;
        let a_t = self.schedule.alphas_cumprod[t];
        let a_prev = if prev_t >= 0 {
            self.schedule.alphas_cumprod[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        };
        let b_t = 1.0 - a_t;
        let (x0, eps) = match self.schedule.prediction_type {
            PredictionType::Epsilon => {
                let x0 = ((sample - (output * b_t.sqrt())?)? / a_t.sqrt())?;
                (x0, output.clone())
            }
            PredictionType::Sample => {
                let eps = ((sample - (output * a_t.sqrt())?)? / b_t.sqrt())?;
                (output.clone(), eps)
            }
            PredictionType::VPrediction => (
                lincomb(sample, a_t.sqrt(), output, -b_t.sqrt())?,
                lincomb(output, a_t.sqrt(), sample, b_t.sqrt())?,
            ),
        };
        let x0 = match self.clip_sample {
            Some(range) => x0.clamp(-range, range)?,
            None => x0,
        };
        lincomb(&x0, a_prev.sqrt(), &eps, (1.0 - a_prev).sqrt())
    }
}
