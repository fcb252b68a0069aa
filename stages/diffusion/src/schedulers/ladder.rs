//! What DDIM and PNDM share: a descending ladder of integer training timesteps a fixed stride
//! apart, and ᾱ at any rung including the one below the ladder (t < 0), whose value each class
//! chooses with `set_alpha_to_one` (1) or not (ᾱ₀).

use candle_core::Result as CandleResult;

use super::{check_steps, discrete_timesteps, spacing, NoiseSchedule, TimestepSpacing};
use crate::config::SchedulerConfig;

pub(super) struct Ladder {
    pub schedule: NoiseSchedule,
    /// ᾱ past the last step.
    final_alpha_cumprod: f64,
    /// Training timesteps between two inference steps.
    pub stride: usize,
    /// The spaced inference timesteps, descending.
    pub spaced: Vec<usize>,
}

impl Ladder {
    /// The ladder a config gives for `steps` inference steps; `set_alpha_to_one` is the
    /// class's default for that key (DDIM: true, PNDM: false). Both classes default to
    /// "leading" spacing.
    pub fn new(
        config: &SchedulerConfig,
        steps: usize,
        set_alpha_to_one: bool,
    ) -> Result<Ladder, String> {
        let schedule = NoiseSchedule::from_config(config)?;
        let train = schedule.num_train_timesteps();
        check_steps(steps, train)?;
        let spaced = discrete_timesteps(
            spacing(config, TimestepSpacing::Leading)?,
            train,
            steps,
            config.steps_offset.unwrap_or(0),
        );
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(set_alpha_to_one) {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        Ok(Ladder { schedule, final_alpha_cumprod, stride: train / steps, spaced })
    }

    /// ᾱ_t, or the final ᾱ for t < 0.
    pub fn alpha(&self, t: i64) -> f64 {
        if t >= 0 {
            self.schedule.alphas_cumprod[t as usize]
        } else {
            self.final_alpha_cumprod
        }
    }
}

/// The timestep of step `index`, or the error a step past the end is.
pub(super) fn timestep_at(timesteps: &[f64], index: usize) -> CandleResult<f64> {
    match timesteps.get(index) {
        Some(&t) => Ok(t),
        None => candle_core::bail!("step {index} is past the {} timesteps", timesteps.len()),
    }
}
