//! diffusers' `DDIMScheduler` with η = 0 (deterministic): x̂₀ from the model output, optionally
//! clipped (`clip_sample`), then x_{t−δ} = √ᾱ_{t−δ}·x̂₀ + √(1−ᾱ_{t−δ})·ε̂.

use candle_core::{Result as CandleResult, Tensor};

use super::ladder::{timestep_at, Ladder};
use super::{lincomb, PredictionType, Sampler};
use crate::config::SchedulerConfig;

pub struct Ddim {
    ladder: Ladder,
    timesteps: Vec<f64>,
    clip_sample: Option<f64>,
}

impl Ddim {
    /// Built as `DDIMScheduler.from_config(config)` inside a `StableDiffusionPipeline`, which
    /// forces `clip_sample` off (DDIM's own default is on; SD latents are not in [-1, 1]).
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Ddim, String> {
        // DDIM's class default for set_alpha_to_one is true.
        let ladder = Ladder::new(config, steps, true)?;
        if config.extra.get("thresholding").and_then(|v| v.as_bool()) == Some(true) {
            return Err("DDIM `thresholding` is not supported".into());
        }
        let timesteps = ladder.spaced.iter().map(|&t| t as f64).collect();
        Ok(Ddim { ladder, timesteps, clip_sample: None })
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

    fn step(&mut self, output: &Tensor, index: usize, sample: &Tensor) -> CandleResult<Tensor> {
        let t = timestep_at(&self.timesteps, index)? as i64;
        let (a_t, a_prev) =
            (self.ladder.alpha(t), self.ladder.alpha(t - self.ladder.stride as i64));
        let b_t = 1.0 - a_t;
        let (x0, eps) = match self.ladder.schedule.prediction_type {
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
