//! diffusers' `EulerDiscreteScheduler` (Karras et al.'s Algorithm 2 without churn): the model
//! sees x / √(σ²+1), and x ← x + (x − x̂₀)/σ · (σ_next − σ).
//!
//! σ_t = √((1−ᾱ_t)/ᾱ_t), interpolated linearly at the (possibly fractional) inference
//! timesteps; the last σ is 0. The initial latents are scaled by σ_max (or √(σ_max²+1) with
//! "leading" spacing, as diffusers does).

use candle_core::{Result as CandleResult, Tensor};

use super::{
    check_steps, lincomb, linspace, spacing, NoiseSchedule, PredictionType, Sampler,
    TimestepSpacing,
};
use crate::config::SchedulerConfig;

pub struct EulerDiscrete {
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
    /// One per timestep, then the final 0.
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
}

impl EulerDiscrete {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<EulerDiscrete, String> {
        let schedule = NoiseSchedule::from_config(config)?;
        let train = schedule.num_train_timesteps();
        check_steps(steps, train)?;
        for key in ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"] {
            if config.extra.get(key).and_then(|v| v.as_bool()) == Some(true) {
                return Err(format!("Euler `{key}` is not supported"));
            }
        }
        if let Some(kind) = config.extra.get("interpolation_type").and_then(|v| v.as_str()) {
            if kind != "linear" {
                return Err(format!("Euler `interpolation_type` {kind:?} is not supported"));
            }
        }
        if let Some(kind) = config.extra.get("final_sigmas_type").and_then(|v| v.as_str()) {
            if kind != "zero" {
                return Err(format!("Euler `final_sigmas_type` {kind:?} is not supported"));
            }
        }
        // Euler's class default spacing is "linspace" (PNDM's and DDIM's is "leading").
        let spacing = spacing(config, TimestepSpacing::Linspace)?;
        let offset = config.steps_offset.unwrap_or(0) as f64;
        // diffusers computes these in float32; rounding them there keeps fractional linspace
        // timesteps identical to what its UNet sees.
        let timesteps: Vec<f64> = match spacing {
            TimestepSpacing::Linspace => linspace(0.0, (train - 1) as f64, steps)
                .into_iter()
                .rev()
                .map(|t| t as f32 as f64)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = train / steps;
                (0..steps).rev().map(|i| (i * ratio) as f64 + offset).collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = train as f64 / steps as f64;
                (0..steps)
                    .map(|i| (train as f64 - i as f64 * ratio).round_ties_even() - 1.0)
                    .collect()
            }
        };
        let table: Vec<f64> =
            schedule.alphas_cumprod.iter().map(|a| ((1.0 - a) / a).sqrt()).collect();
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &table)).collect();
        sigmas.push(0.0);
        let max = sigmas.iter().cloned().fold(0.0, f64::max);
        let init_noise_sigma = match spacing {
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
            _ => max,
        };
        Ok(EulerDiscrete { schedule, timesteps, sigmas, init_noise_sigma })
    }
}

/// numpy's `interp(x, arange(len), table)`: linear between integer knots, clamped at the ends.
fn interp(x: f64, table: &[f64]) -> f64 {
    if x <= 0.0 {
        return table[0];
    }
    let last = table.len() - 1;
    if x >= last as f64 {
        return table[last];
    }
    let i = x.floor() as usize;
    let w = x - i as f64;
    table[i] + (table[i + 1] - table[i]) * w
}

impl Sampler for EulerDiscrete {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> CandleResult<Tensor> {
        let sigma = self.sigmas[index];
        sample / (sigma * sigma + 1.0).sqrt()
    }

    fn step(&mut self, output: &Tensor, index: usize, sample: &Tensor) -> CandleResult<Tensor> {
        if index + 1 >= self.sigmas.len() {
            candle_core::bail!("step {index} is past the {} timesteps", self.timesteps.len());
        }
        let (sigma, next) = (self.sigmas[index], self.sigmas[index + 1]);
        let x0 = match self.schedule.prediction_type {
            PredictionType::Epsilon => lincomb(sample, 1.0, output, -sigma)?,
            PredictionType::Sample => output.clone(),
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                lincomb(output, -sigma / s2.sqrt(), sample, 1.0 / s2)?
            }
        };
        let derivative = ((sample - x0)? / sigma)?;
        sample + (derivative * (next - sigma))?
    }
}
