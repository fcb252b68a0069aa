//! Noise schedules and samplers, as diffusers defines them.
//!
//! [`NoiseSchedule`] is the training side (the DDPM forward process: betas, ᾱ, `add_noise`, the
//! v-prediction target, SNR). [`Sampler`] is the inference side: PNDM (SD1.5's default, PLMS
//! with `skip_prk_steps`), DDIM (η = 0) and Euler (discrete, no churn), each built from a
//! pipeline's `scheduler_config.json` the way diffusers' `XScheduler.from_config` builds it —
//! keys the file lacks take *that class's* defaults.
//!
//! Schedule arithmetic is done in f64 (diffusers keeps ᾱ in f32); per-step coefficients are
//! applied to f32 tensors. The difference is ≤ 1e-7 relative per coefficient, well inside the
//! 1e-5 the parity fixtures hold the samplers to.

mod ddim;
mod euler;
mod ladder;
mod pndm;

use candle_core::{Result as CandleResult, Tensor};

use crate::config::SchedulerConfig;

pub use ddim::Ddim;
pub use euler::EulerDiscrete;
pub use pndm::Pndm;

/// Which sampler the `sample` stage runs (its `scheduler` parameter, by the names
/// [`SamplerKind::parse`] reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplerKind {
    Pndm,
    Ddim,
    Euler,
}

impl SamplerKind {
    pub fn parse(name: &str) -> Option<SamplerKind> {
        match name {
            "pndm" => Some(SamplerKind::Pndm),
            "ddim" => Some(SamplerKind::Ddim),
            "euler" => Some(SamplerKind::Euler),
            _ => None,
        }
    }

    /// The diffusers class this sampler reproduces.
    pub fn class_name(self) -> &'static str {
        match self {
            SamplerKind::Pndm => "PNDMScheduler",
            SamplerKind::Ddim => "DDIMScheduler",
            SamplerKind::Euler => "EulerDiscreteScheduler",
        }
    }

    /// Build the sampler for `steps` inference steps from a scheduler config.
    pub fn build(self, config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Sampler>, String> {
        Ok(match self {
            SamplerKind::Pndm => Box::new(Pndm::new(config, steps)?),
            SamplerKind::Ddim => Box::new(Ddim::new(config, steps)?),
            SamplerKind::Euler => Box::new(EulerDiscrete::new(config, steps)?),
        })
    }
}

/// One denoising run. The caller draws the initial latents, multiplies them by
/// [`Sampler::init_noise_sigma`], and for each index `i` of [`Sampler::timesteps`] calls the
/// model on `scale_model_input(latents, i)` at timestep `timesteps()[i]` and then
/// `latents = step(model_output, i, latents)` — diffusers' pipeline loop.
pub trait Sampler: Send {
    /// The timesteps the model is evaluated at, in order (PNDM repeats one: 51 for 50 steps).
    fn timesteps(&self) -> &[f64];
    /// The initial latents' scale: 1 unless the sampler works in σ-space (Euler).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// What the model sees at step `index`: the sample itself unless the sampler rescales it
    /// (Euler).
    fn scale_model_input(&self, sample: &Tensor, _index: usize) -> CandleResult<Tensor> {
        Ok(sample.clone())
    }
    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
    ) -> CandleResult<Tensor>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

impl PredictionType {
    pub fn parse(name: &str) -> Option<PredictionType> {
        match name {
            "epsilon" => Some(PredictionType::Epsilon),
            "v_prediction" => Some(PredictionType::VPrediction),
            "sample" => Some(PredictionType::Sample),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Linspace,
    Trailing,
}

/// The DDPM forward process of a scheduler config: what training needs, and what every
/// sampler starts from.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    pub betas: Vec<f64>,
    /// ᾱ_t = Π_{s≤t} (1 − β_s).
    pub alphas_cumprod: Vec<f64>,
    pub prediction_type: PredictionType,
}

impl NoiseSchedule {
    /// Betas and prediction type from a scheduler config (defaults: DDPM's, as diffusers'
    /// schedulers share them: 1000 steps, linear 1e-4..0.02, epsilon).
    pub fn from_config(config: &SchedulerConfig) -> Result<NoiseSchedule, String> {
        let steps = config.num_train_timesteps.unwrap_or(1000);
        if steps == 0 {
            return Err("`num_train_timesteps` is 0".into());
        }
        // One entry per timestep is allocated below: never from an absurd number.
        config.check_sizes()?;
        if config.extra.get("rescale_betas_zero_snr").and_then(|v| v.as_bool()) == Some(true) {
            return Err("`rescale_betas_zero_snr` is not supported".into());
        }
        let start = config.beta_start.unwrap_or(0.0001);
        let end = config.beta_end.unwrap_or(0.02);
        let betas = match (&config.trained_betas, config.beta_schedule.as_deref()) {
            (Some(betas), _) => {
                if betas.len() != steps {
                    return Err(format!(
                        "{} `trained_betas` for {steps} `num_train_timesteps`",
                        betas.len()
                    ));
                }
                betas.clone()
            }
            (None, None | Some("linear")) => linspace(start, end, steps),
            (None, Some("scaled_linear")) => {
                linspace(start.sqrt(), end.sqrt(), steps).into_iter().map(|b| b * b).collect()
            }
            (None, Some("squaredcos_cap_v2")) => cosine_betas(steps),
            (None, Some(other)) => {
                return Err(format!("`beta_schedule` {other:?} is not supported"))
            }
        };
        let prediction = config.prediction_type.as_deref().unwrap_or("epsilon");
        let prediction_type = PredictionType::parse(prediction)
            .ok_or_else(|| format!("`prediction_type` {prediction:?} is not supported"))?;
        let mut alphas_cumprod = Vec::with_capacity(steps);
        let mut product = 1.0;
        for beta in &betas {
            product *= 1.0 - beta;
            alphas_cumprod.push(product);
        }
        Ok(NoiseSchedule { betas, alphas_cumprod, prediction_type })
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t), as the min-SNR loss weighting uses it.
    pub fn snr(&self, t: usize) -> f64 {
        let a = self.alphas_cumprod[t];
        a / (1.0 - a)
    }

    /// x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · ε, with one timestep per batch element (dim 0).
    pub fn add_noise(
        &self,
        x0: &Tensor,
        noise: &Tensor,
        timesteps: &[usize],
    ) -> CandleResult<Tensor> {
        let (a, b) = self.per_sample(x0, timesteps, |ac| (ac.sqrt(), (1.0 - ac).sqrt()))?;
        x0.broadcast_mul(&a)?.add(&noise.broadcast_mul(&b)?)
    }

    /// The v-prediction target v = √ᾱ_t · ε − √(1 − ᾱ_t) · x0 (diffusers' `get_velocity`).
    pub fn velocity(
        &self,
        x0: &Tensor,
        noise: &Tensor,
        timesteps: &[usize],
    ) -> CandleResult<Tensor> {
        let (a, b) = self.per_sample(x0, timesteps, |ac| (ac.sqrt(), (1.0 - ac).sqrt()))?;
        noise.broadcast_mul(&a)?.sub(&x0.broadcast_mul(&b)?)
    }

    /// Per-batch-element coefficients shaped (B, 1, 1, …) in `like`'s dtype and device.
    fn per_sample(
        &self,
        like: &Tensor,
        timesteps: &[usize],
        f: impl Fn(f64) -> (f64, f64),
    ) -> CandleResult<(Tensor, Tensor)> {
        let batch = like.dim(0)?;
        if timesteps.len() != batch {
            candle_core::bail!("{} timesteps for a batch of {batch}", timesteps.len());
        }
        let mut a = Vec::with_capacity(batch);
        let mut b = Vec::with_capacity(batch);
        for &t in timesteps {
            let Some(&ac) = self.alphas_cumprod.get(t) else {
                candle_core::bail!("timestep {t} is outside 0..{}", self.alphas_cumprod.len());
            };
            let (x, y) = f(ac);
            a.push(x as f32);
            b.push(y as f32);
        }
        let mut shape = vec![batch];
        shape.extend(std::iter::repeat_n(1, like.rank() - 1));
        let a = Tensor::from_vec(a, shape.as_slice(), like.device())?.to_dtype(like.dtype())?;
        let b = Tensor::from_vec(b, shape.as_slice(), like.device())?.to_dtype(like.dtype())?;
        Ok((a, b))
    }
}

/// `n` evenly spaced values from `start` to `end` inclusive (numpy/torch `linspace`).
fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    (0..n).map(|i| start + step * i as f64).collect()
}

/// The "squaredcos_cap_v2" (Nichol & Dhariwal cosine) betas, capped at 0.999.
fn cosine_betas(n: usize) -> Vec<f64> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
        })
        .collect()
}

/// The inference timesteps diffusers' PNDM and DDIM use (integers, descending).
fn discrete_timesteps(
    spacing: TimestepSpacing,
    train_steps: usize,
    steps: usize,
    offset: usize,
) -> Vec<usize> {
    match spacing {
        TimestepSpacing::Leading => {
            let ratio = train_steps / steps;
            (0..steps).rev().map(|i| i * ratio + offset).collect()
        }
        TimestepSpacing::Linspace => linspace(0.0, (train_steps - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(|t| round_half_even(t) as usize)
            .collect(),
        TimestepSpacing::Trailing => {
            let ratio = train_steps as f64 / steps as f64;
            (0..steps)
                .map(|i| round_half_even(train_steps as f64 - i as f64 * ratio) as usize - 1)
                .collect()
        }
    }
}

/// numpy's `round` (ties to even).
fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// The timestep spacing a config asks for, or the given class default.
fn spacing(config: &SchedulerConfig, default: TimestepSpacing) -> Result<TimestepSpacing, String> {
    match config.timestep_spacing.as_deref() {
        None => Ok(default),
        Some("leading") => Ok(TimestepSpacing::Leading),
        Some("linspace") => Ok(TimestepSpacing::Linspace),
        Some("trailing") => Ok(TimestepSpacing::Trailing),
        Some(other) => Err(format!("`timestep_spacing` {other:?} is not supported")),
    }
}

/// Check the step count against the schedule, as diffusers does.
fn check_steps(steps: usize, train_steps: usize) -> Result<(), String> {
    if steps == 0 {
        return Err("the number of inference steps must be at least 1".into());
    }
    if steps > train_steps {
        return Err(format!("{steps} inference steps exceed the {train_steps} training timesteps"));
    }
    Ok(())
}

/// `a·x + b·y` on tensors of one shape (the schedulers' only tensor arithmetic).
fn lincomb(x: &Tensor, a: f64, y: &Tensor, b: f64) -> CandleResult<Tensor> {
    (x * a)? + (y * b)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sd15_betas_are_scaled_linear_from_0_00085_to_0_012() {
        let schedule = NoiseSchedule::from_config(&SchedulerConfig::sd15()).unwrap();
        assert_eq!(schedule.num_train_timesteps(), 1000);
        assert!((schedule.betas[0] - 0.00085).abs() < 1e-12);
        assert!((schedule.betas[999] - 0.012).abs() < 1e-12);
        // ᾱ at the last step: numpy in f64 gives 0.00466010, diffusers in f32 0.00466010 too.
        assert!((schedule.alphas_cumprod[999] - 0.004_660_10).abs() < 1e-8);
    }

    #[test]
    fn an_absurd_number_of_training_timesteps_is_refused_before_allocating() {
        let config =
            SchedulerConfig { num_train_timesteps: Some(1 << 50), ..SchedulerConfig::sd15() };
        let err = NoiseSchedule::from_config(&config).unwrap_err();
        assert!(err.contains("`num_train_timesteps` = 1125899906842624 is outside"), "{err}");
    }

    #[test]
    fn add_noise_mixes_signal_and_noise_per_sample_timestep() {
        let schedule = NoiseSchedule::from_config(&SchedulerConfig::sd15()).unwrap();
        let x0 = Tensor::ones((2, 1, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let noise = Tensor::zeros((2, 1, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let xt = schedule.add_noise(&x0, &noise, &[0, 999]).unwrap();
        let values = xt.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((values[0] as f64 - schedule.alphas_cumprod[0].sqrt()).abs() < 1e-6);
        assert!((values[4] as f64 - schedule.alphas_cumprod[999].sqrt()).abs() < 1e-6);
    }

    #[test]
    fn velocity_is_sqrt_alpha_noise_minus_sqrt_one_minus_alpha_sample() {
        let schedule = NoiseSchedule::from_config(&SchedulerConfig::sd15()).unwrap();
        let x0 = Tensor::new(&[[1.0f32]], &Device::Cpu).unwrap();
        let noise = Tensor::new(&[[2.0f32]], &Device::Cpu).unwrap();
        let v = schedule.velocity(&x0, &noise, &[500]).unwrap().to_vec2::<f32>().unwrap();
        let ac = schedule.alphas_cumprod[500];
        assert!((v[0][0] as f64 - (2.0 * ac.sqrt() - (1.0 - ac).sqrt())).abs() < 1e-6);
    }

    #[test]
    fn leading_spacing_with_offset_gives_sd15s_timesteps() {
        let t = discrete_timesteps(TimestepSpacing::Leading, 1000, 50, 1);
        assert_eq!(t.first(), Some(&981));
        assert_eq!(t.last(), Some(&1));
        assert_eq!(t.len(), 50);
    }

    #[test]
    fn unknown_beta_schedules_are_refused_by_name() {
        let mut config = SchedulerConfig::sd15();
        config.beta_schedule = Some("sigmoid".into());
        let err = NoiseSchedule::from_config(&config).unwrap_err();
        assert!(err.contains("sigmoid"), "{err}");
    }
}
