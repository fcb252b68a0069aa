//! diffusers' `PNDMScheduler` with `skip_prk_steps` (pseudo linear multistep, PLMS), the SD1.5
//! default.
//!
//! Timesteps: the spaced schedule with its second entry repeated (51 model calls for 50
//! steps). The first call takes a plain step with ε₀ but keeps x_t; the second (same timestep
//! again) restarts from that x_t with (ε₀ + ε₁)/2; from then on the multistep combinations
//! (3, −1)/2, (23, −16, 5)/12, (55, −59, 37, −9)/24 of the latest outputs. Each step is the
//! PNDM transfer x_{t−δ} = √(ᾱ_{t−δ}/ᾱ_t)·x_t − (ᾱ_{t−δ} − ᾱ_t)·ε / (ᾱ_t·√(1−ᾱ_{t−δ}) +
//! √(ᾱ_t(1−ᾱ_t)ᾱ_{t−δ})).

use candle_core::{Result as CandleResult, Tensor};

use super::ladder::{timestep_at, Ladder};
use super::{lincomb, PredictionType, Sampler};
use crate::config::SchedulerConfig;

pub struct Pndm {
    ladder: Ladder,
    timesteps: Vec<f64>,
    /// Model outputs of the last (up to four) distinct timesteps, oldest first.
    ets: Vec<Tensor>,
    /// x_t kept from the first call for the repeated second one.
    cur_sample: Option<Tensor>,
    counter: usize,
}

impl Pndm {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Pndm, String> {
        // PNDM's class default for set_alpha_to_one is false.
        let ladder = Ladder::new(config, steps, false)?;
        if config.skip_prk_steps != Some(true) {
            // Without it PNDM runs Runge-Kutta warm-up steps; no SD release uses that.
            return Err("PNDM without `skip_prk_steps: true` is not supported".into());
        }
        if ladder.schedule.prediction_type == PredictionType::Sample {
            return Err("PNDM supports `epsilon` and `v_prediction` only".into());
        }
        // diffusers: concat(ts[:-1], ts[-2:-1], ts[-1:]) in ascending order, then reversed;
        // in descending order that repeats the second entry.
        let mut timesteps: Vec<f64> = Vec::with_capacity(steps + 1);
        for (i, &t) in ladder.spaced.iter().enumerate() {
            timesteps.push(t as f64);
            if i == 1 {
                timesteps.push(t as f64);
            }
        }
        if steps == 1 {
            // ts[:-1] is empty and ts[-2:-1] too: one call.
            timesteps.truncate(1);
        }
        Ok(Pndm { ladder, timesteps, ets: Vec::new(), cur_sample: None, counter: 0 })
    }

    fn prev_sample(
        &self,
        sample: &Tensor,
        t: i64,
        prev_t: i64,
        output: &Tensor,
    ) -> CandleResult<Tensor> {
        let (a_t, a_prev) = (self.ladder.alpha(t), self.ladder.alpha(prev_t));
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let eps = match self.ladder.schedule.prediction_type {
            // ε from v: √ᾱ·v + √(1−ᾱ)·x_t.
            PredictionType::VPrediction => lincomb(output, a_t.sqrt(), sample, b_t.sqrt())?,
            _ => output.clone(),
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        lincomb(sample, sample_coeff, &eps, -(a_prev - a_t) / denom)
    }
}

impl Sampler for Pndm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, output: &Tensor, index: usize, sample: &Tensor) -> CandleResult<Tensor> {
        let mut t = timestep_at(&self.timesteps, index)? as i64;
        let stride = self.ladder.stride as i64;
        let mut prev_t = t - stride;
        if self.counter != 1 {
            if self.ets.len() == 4 {
                self.ets.remove(0);
            }
            self.ets.push(output.clone());
        } else {
            // The repeated timestep: step from the previous x_t over the same interval.
            prev_t = t;
            t += stride;
        }
        let n = self.ets.len();
        let e = |k: usize| &self.ets[n - k];
        let (eps, from) = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            (output.clone(), sample.clone())
        } else if n == 1 && self.counter == 1 {
            let from = self.cur_sample.take().unwrap_or_else(|| sample.clone());
            (lincomb(output, 0.5, e(1), 0.5)?, from)
        } else if n == 2 {
            (lincomb(e(1), 1.5, e(2), -0.5)?, sample.clone())
        } else if n == 3 {
            let ab = lincomb(e(1), 23.0 / 12.0, e(2), -16.0 / 12.0)?;
            ((ab + (e(3) * (5.0 / 12.0))?)?, sample.clone())
        } else {
            let ab = lincomb(e(1), 55.0 / 24.0, e(2), -59.0 / 24.0)?;
            let cd = lincomb(e(3), 37.0 / 24.0, e(4), -9.0 / 24.0)?;
            ((ab + cd)?, sample.clone())
        };
        let prev = self.prev_sample(&from, t, prev_t, &eps)?;
        self.counter += 1;
        Ok(prev)
    }
}
