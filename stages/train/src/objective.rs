//! The training objective: DDPM forward noising with the model's own scheduler config, the
//! ε or v target, and the (optionally min-SNR weighted) mean squared error.
//!
//! diffusers builds a `DDPMScheduler` from the pipeline's `scheduler_config.json` and computes
//! everything in float32: `betas` (`scaled_linear`: `linspace(√β₀, √β₁, T)²`; `linear`:
//! `linspace(β₀, β₁, T)`; `squaredcos_cap_v2`: the cosine schedule), `ᾱ = cumprod(1 − β)`,
//! `x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε`, `v = √ᾱ_t·ε − √(1 − ᾱ_t)·x₀`, `SNR = (√ᾱ / √(1 − ᾱ))²`.
//! Those are reproduced here with torch's arithmetic: its two-sided fused `linspace` and its
//! double-accumulated `cumprod`, so ᾱ matches diffusers' float32 values exactly.

use candle_core::{Result, Tensor, D};

/// What the UNet is trained to predict (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    Epsilon,
    VPrediction,
}

impl Prediction {
    pub const NAMES: &'static [&'static str] = &["epsilon", "v_prediction"];

    pub fn parse(name: &str) -> Option<Prediction> {
        match name {
            "epsilon" => Some(Prediction::Epsilon),
            "v_prediction" => Some(Prediction::VPrediction),
            _ => None,
        }
    }

    /// The name `scheduler_config.json` gives it.
    pub fn name(self) -> &'static str {
        match self {
            Prediction::Epsilon => "epsilon",
            Prediction::VPrediction => "v_prediction",
        }
    }
}

/// The scheduler config values the objective needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    pub trained_betas: Option<Vec<f64>>,
}

impl ScheduleConfig {
    /// Stable Diffusion 1.x's training schedule (its `scheduler_config.json`: 1000 steps,
    /// `scaled_linear` from 0.00085 to 0.012), for tests and benchmarks.
    pub fn sd15() -> ScheduleConfig {
        ScheduleConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            trained_betas: None,
        }
    }
}

/// The forward process's cumulative products, one per training timestep.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    pub alphas_cumprod: Vec<f32>,
}

/// torch.linspace in float32: the step is an f32, the first half counts up from `start` and the
/// second half down from `end` (so both ends are exact), each value `start + step·i` rounded
/// once, as torch's fused multiply-add kernel does.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

impl NoiseSchedule {
    pub fn new(config: &ScheduleConfig) -> std::result::Result<NoiseSchedule, String> {
        let n = config.num_train_timesteps;
        if n == 0 {
            return Err("num_train_timesteps must be positive".into());
        }
        let betas: Vec<f32> = if let Some(trained) = &config.trained_betas {
            if trained.len() != n {
                return Err(format!("trained_betas has {} values, expected {n}", trained.len()));
            }
            trained.iter().map(|&b| b as f32).collect()
        } else {
            match config.beta_schedule.as_str() {
                "linear" => linspace_f32(config.beta_start as f32, config.beta_end as f32, n),
                "scaled_linear" => {
                    linspace_f32(config.beta_start.sqrt() as f32, config.beta_end.sqrt() as f32, n)
                        .into_iter()
                        .map(|b| b * b)
                        .collect()
                }
                "squaredcos_cap_v2" => {
                    let alpha_bar =
                        |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
                    (0..n)
                        .map(|i| {
                            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                        })
                        .collect()
                }
                other => {
                    return Err(format!(
                        "beta_schedule `{other}` is not supported (linear, scaled_linear, \
                         squaredcos_cap_v2)"
                    ))
                }
            }
        };
        // torch's CPU cumprod accumulates float32 inputs in double and rounds each output.
        let mut product = 1f64;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                product *= (1.0 - b) as f64;
                product as f32
            })
            .collect();
        Ok(NoiseSchedule { alphas_cumprod })
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// Per-sample `(√ᾱ_t, √(1 − ᾱ_t))` as `(B, 1, 1, 1)` tensors on `like`'s device.
    fn coefficients(&self, timesteps: &[u32], like: &Tensor) -> Result<(Tensor, Tensor)> {
        let (signal, noise): (Vec<f32>, Vec<f32>) = timesteps
            .iter()
            .map(|&t| {
                let a = self.alphas_cumprod[t as usize];
                (a.sqrt(), (1.0 - a).sqrt())
            })
            .unzip();
        let shape = (timesteps.len(), 1, 1, 1);
        let device = like.device();
        Ok((Tensor::from_vec(signal, shape, device)?, Tensor::from_vec(noise, shape, device)?))
    }

    /// `x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε`.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[u32]) -> Result<Tensor> {
        let (a, s) = self.coefficients(timesteps, x0)?;
        a.broadcast_mul(x0)? + s.broadcast_mul(noise)?
    }

    /// `v = √ᾱ_t·ε − √(1 − ᾱ_t)·x₀`.
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &[u32]) -> Result<Tensor> {
        let (a, s) = self.coefficients(timesteps, x0)?;
        a.broadcast_mul(noise)? - s.broadcast_mul(x0)?
    }

    /// diffusers' `compute_snr`: `(√ᾱ_t / √(1 − ᾱ_t))²`.
    pub fn snr(&self, timesteps: &[u32]) -> Vec<f32> {
        timesteps
            .iter()
            .map(|&t| {
                let a = self.alphas_cumprod[t as usize];
                let ratio = a.sqrt() / (1.0 - a).sqrt();
                ratio * ratio
            })
            .collect()
    }

    /// The min-SNR-γ loss weights: `min(SNR', γ) / SNR'`, with `SNR' = SNR + 1` for v.
    pub fn min_snr_weights(
        &self,
        timesteps: &[u32],
        gamma: f64,
        prediction: Prediction,
    ) -> Vec<f32> {
        self.snr(timesteps)
            .into_iter()
            .map(|snr| {
                let snr = if prediction == Prediction::VPrediction { snr + 1.0 } else { snr };
                snr.min(gamma as f32) / snr
            })
            .collect()
    }
}

/// The loss: `mse(pred, target)` averaged over everything, or, with per-sample weights, each
/// sample's mean squared error times its weight, averaged over the batch.
pub fn mse_loss(pred: &Tensor, target: &Tensor, weights: Option<&[f32]>) -> Result<Tensor> {
    let squared = (pred - target)?.sqr()?;
    match weights {
        None => squared.mean_all(),
        Some(weights) => {
            let per_sample = squared.flatten_from(1)?.mean(D::Minus1)?;
            let weights = Tensor::from_slice(weights, weights.len(), pred.device())?;
            (per_sample * weights)?.mean_all()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn sd15() -> NoiseSchedule {
        NoiseSchedule::new(&ScheduleConfig::sd15()).unwrap()
    }

    #[test]
    fn sd15_schedule_matches_diffusers_values() {
        // From diffusers' DDPMScheduler(beta_schedule="scaled_linear", 0.00085, 0.012):
        // alphas_cumprod[0], [499], [999] as float32 (diffusers 0.42.1, torch 2.15).
        let s = sd15();
        assert_eq!(s.num_train_timesteps(), 1000);
        // f32 products over up to 1000 factors: agreement to a few ulps of the value.
        assert!((s.alphas_cumprod[0] - 0.999_15).abs() < 1e-7);
        assert!((s.alphas_cumprod[499] - 0.277_669_43).abs() < 1e-6);
        assert!((s.alphas_cumprod[999] - 0.004_660_095).abs() < 1e-8);
    }

    #[test]
    fn linspace_ends_exactly_at_both_ends() {
        let v = linspace_f32(0.1, 0.7, 7);
        assert_eq!((v[0], v[6]), (0.1, 0.7));
        assert!((v[3] - 0.4).abs() < 1e-7);
    }

    #[test]
    fn noising_mixes_signal_and_noise_by_the_schedule() {
        let s = sd15();
        let x0 = Tensor::ones((2, 1, 1, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let noise = x0.zeros_like().unwrap();
        let xt = s.add_noise(&x0, &noise, &[0, 999]).unwrap().flatten_all().unwrap();
        let xt = xt.to_vec1::<f32>().unwrap();
        assert_eq!(xt[0], s.alphas_cumprod[0].sqrt());
        assert_eq!(xt[3], s.alphas_cumprod[999].sqrt());
    }

    #[test]
    fn velocity_is_signal_weighted_noise_minus_noise_weighted_signal() {
        let s = sd15();
        let x0 = Tensor::new(&[[[[2f32]]]], &Device::Cpu).unwrap();
        let noise = Tensor::new(&[[[[3f32]]]], &Device::Cpu).unwrap();
        let v = s
            .velocity(&x0, &noise, &[500])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let a = s.alphas_cumprod[500];
        assert!((v[0] - (a.sqrt() * 3.0 - (1.0 - a).sqrt() * 2.0)).abs() < 1e-6);
    }

    #[test]
    fn min_snr_weights_cap_low_noise_timesteps_only() {
        let s = sd15();
        let w = s.min_snr_weights(&[0, 999], 5.0, Prediction::Epsilon);
        assert!((w[0] - 5.0 / s.snr(&[0])[0]).abs() < 1e-9, "low noise: SNR above γ is capped");
        assert_eq!(w[1], 1.0, "high noise: SNR below γ keeps weight 1");
        let v = s.min_snr_weights(&[999], 5.0, Prediction::VPrediction);
        assert_eq!(v[0], 1.0, "v: (SNR + 1) below γ keeps weight 1");
    }

    #[test]
    fn weighted_loss_weights_each_samples_mean() {
        let pred = Tensor::new(&[[1f32, 1.0], [2.0, 2.0]], &Device::Cpu).unwrap();
        let target = pred.zeros_like().unwrap();
        let plain = mse_loss(&pred, &target, None).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(plain, 2.5);
        let weighted =
            mse_loss(&pred, &target, Some(&[1.0, 0.5])).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(weighted, (1.0 + 4.0 * 0.5) / 2.0);
    }

    #[test]
    fn unknown_beta_schedules_are_rejected_by_name() {
        let err = NoiseSchedule::new(&ScheduleConfig {
            num_train_timesteps: 10,
            beta_start: 0.1,
            beta_end: 0.2,
            beta_schedule: "sigmoid".into(),
            trained_betas: None,
        })
        .unwrap_err();
        assert!(err.contains("sigmoid"), "{err}");
    }
}
