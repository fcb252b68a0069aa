//! AdamW and global-norm gradient clipping, with PyTorch's formulas and order of operations.
//!
//! `torch.optim.AdamW` (single-tensor path, as used on CPU) per parameter that has a gradient:
//! `p ← p·(1 − lr·wd)`; `m ← lerp(m, g, 1 − β₁)`; `v ← β₂·v + (1 − β₂)·g²`;
//! `p ← p − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)`, with `t` counted per parameter.
//! candle-nn's `AdamW` is the same update algebraically, but it keeps its moments private, so its
//! state could not be checkpointed; hence this implementation. A parameter without a gradient is
//! left alone (no decay, no state), as in torch.
//!
//! `clip_grad_norm` is `torch.nn.utils.clip_grad_norm_`: the 2-norm of the per-tensor 2-norms,
//! and every gradient scaled by `min(1, max_norm / (total + 1e-6))`.

use candle_core::{DType, Result, Tensor, Var};

/// AdamW's hyper-parameters (the script's `--adam_*` flags); the learning rate is per step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// The optimiser state of one parameter, created at its first gradient.
#[derive(Debug, Clone)]
pub struct Moments {
    pub step: u64,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

/// AdamW over a fixed list of parameters (state indexed like the list).
#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    pub state: Vec<Option<Moments>>,
}

impl AdamW {
    pub fn new(parameters: usize, config: AdamWConfig) -> AdamW {
        AdamW { config, state: vec![None; parameters] }
    }

    /// One update of every parameter that has a gradient, at learning rate `lr`.
    pub fn step(&mut self, params: &[Var], grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        assert_eq!(params.len(), self.state.len(), "one state slot per parameter");
        assert_eq!(params.len(), grads.len(), "one gradient slot per parameter");
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.config;
        for ((param, grad), slot) in params.iter().zip(grads).zip(self.state.iter_mut()) {
            let Some(grad) = grad else { continue };
            let grad = grad.to_dtype(DType::F32)?;
            let moments = match slot {
                Some(m) => m,
                None => slot.insert(Moments {
                    step: 0,
                    exp_avg: grad.zeros_like()?,
                    exp_avg_sq: grad.zeros_like()?,
                }),
            };
            moments.step += 1;
            let t = moments.step as i32;
            let decayed = param.as_tensor().affine(1.0 - lr * weight_decay, 0.0)?;
            // lerp(m, g, w) = m + w·(g − m), torch's form for weights below one half.
            let exp_avg =
                (&moments.exp_avg + (&grad - &moments.exp_avg)?.affine(1.0 - beta1, 0.0)?)?;
            let exp_avg_sq =
                (moments.exp_avg_sq.affine(beta2, 0.0)? + grad.sqr()?.affine(1.0 - beta2, 0.0)?)?;
            let bias_correction1 = 1.0 - beta1.powi(t);
            let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
            let step_size = lr / bias_correction1;
            let denom = exp_avg_sq.sqrt()?.affine(1.0 / bias_correction2_sqrt, 0.0)?;
            let denom = (denom + eps)?;
            let updated = (decayed - (&exp_avg / denom)?.affine(step_size, 0.0)?)?;
            param.set(&updated)?;
            moments.exp_avg = exp_avg;
            moments.exp_avg_sq = exp_avg_sq;
        }
        Ok(())
    }
}

/// Scales the gradients so their global 2-norm is at most `max_norm`; returns the norm before
/// clipping (what the script's accelerator returns and what the log records).
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let mut squares = 0f32;
    for grad in grads.iter().flatten() {
        let norm = grad.to_dtype(DType::F32)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        squares += norm * norm;
    }
    let total = squares.sqrt();
    let coef = (max_norm as f32 / (total + 1e-6)).min(1.0);
    if coef < 1.0 {
        for grad in grads.iter_mut().flatten() {
            *grad = grad.affine(coef as f64, 0.0)?;
        }
    }
    Ok(total as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(values: &[f32]) -> Var {
        Var::from_tensor(&Tensor::new(values, &Device::Cpu).unwrap()).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_vec1::<f32>().unwrap()
    }

    const CONFIG: AdamWConfig =
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 };

    /// The same update written out with f64 scalars, for one parameter over several steps.
    fn reference(p0: f64, grads: &[f64], lr: f64) -> f64 {
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for (i, &g) in grads.iter().enumerate() {
            let t = (i + 1) as i32;
            p *= 1.0 - lr * CONFIG.weight_decay;
            m = m + (g - m) * (1.0 - CONFIG.beta1);
            v = v * CONFIG.beta2 + g * g * (1.0 - CONFIG.beta2);
            let denom = v.sqrt() / (1.0 - CONFIG.beta2.powi(t)).sqrt() + CONFIG.eps;
            p -= lr / (1.0 - CONFIG.beta1.powi(t)) * m / denom;
        }
        p
    }

    #[test]
    fn updates_follow_torch_adamw_over_several_steps() {
        let params = [var(&[0.5, -1.0, 2.0])];
        let mut adam = AdamW::new(1, CONFIG);
        let grads = [[0.1f32, -0.3, 0.0], [0.2, 0.1, 1e-3], [-0.4, 0.05, 2.0]];
        for g in &grads {
            let g = Tensor::new(g, &Device::Cpu).unwrap();
            adam.step(&params, &[Some(g)], 1e-2).unwrap();
        }
        let got = values(params[0].as_tensor());
        for (i, (&p0, got)) in [0.5, -1.0, 2.0].iter().zip(got).enumerate() {
            let want = reference(p0, &grads.map(|g| g[i] as f64), 1e-2);
            // f32 arithmetic on values of order 1: a few ulps.
            assert!((got as f64 - want).abs() < 1e-6, "element {i}: {got} vs {want}");
        }
    }

    #[test]
    fn the_first_step_moves_each_weight_by_about_the_learning_rate() {
        let params = [var(&[1.0, 1.0])];
        let mut adam = AdamW::new(1, AdamWConfig { weight_decay: 0.0, ..CONFIG });
        let g = Tensor::new(&[3.0f32, -0.01], &Device::Cpu).unwrap();
        adam.step(&params, &[Some(g)], 0.1).unwrap();
        let got = values(params[0].as_tensor());
        assert!((got[0] - 0.9).abs() < 1e-6 && (got[1] - 1.1).abs() < 1e-6, "{got:?}");
    }

    #[test]
    fn a_parameter_without_gradient_is_not_decayed_and_gets_no_state() {
        let params = [var(&[1.0]), var(&[1.0])];
        let mut adam = AdamW::new(2, CONFIG);
        let g = Tensor::new(&[1.0f32], &Device::Cpu).unwrap();
        adam.step(&params, &[Some(g), None], 0.1).unwrap();
        assert_eq!(values(params[1].as_tensor()), vec![1.0]);
        assert!(adam.state[1].is_none());
        assert_eq!(adam.state[0].as_ref().unwrap().step, 1);
    }

    #[test]
    fn clipping_scales_to_the_max_norm_and_reports_the_norm_before() {
        let mut grads = [
            Some(Tensor::new(&[3.0f32], &Device::Cpu).unwrap()),
            None,
            Some(Tensor::new(&[4.0f32], &Device::Cpu).unwrap()),
        ];
        let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
        assert_eq!(norm, 5.0);
        let clipped: Vec<f32> = grads.iter().flatten().map(|g| values(g)[0]).collect();
        let scale = 1.0 / (5.0 + 1e-6);
        assert!((clipped[0] - 3.0 * scale).abs() < 1e-6 && (clipped[1] - 4.0 * scale).abs() < 1e-6);
    }

    #[test]
    fn gradients_under_the_max_norm_are_untouched() {
        let mut grads = [Some(Tensor::new(&[0.3f32, 0.4], &Device::Cpu).unwrap())];
        let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
        assert!((norm - 0.5).abs() < 1e-7);
        assert_eq!(values(grads[0].as_ref().unwrap()), vec![0.3, 0.4]);
    }
}
