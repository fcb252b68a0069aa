//! AdamW and global-norm gradient clipping, with PyTorch's formulas and order of operations.
//!
//! `torch.optim.AdamW` (single-tensor path, as used on CPU) per parameter that has a gradient:
//! `p ← p·(1 − lr·wd)`; `m ← lerp(m, g, 1 − β₁)`; `v ← β₂·v + (1 − β₂)·g²`;
//! `p ← p − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)`, with `t` counted per parameter.
//! candle-nn's `AdamW` is the same update algebraically, but it keeps its moments private, so its
//! state could not be checkpointed; hence this implementation. A parameter without a gradient is
//! left alone (no decay, no state), as in torch.
//!
//! On the CPU an f32 parameter's update runs as one parallel pass with the same per-element
//! operations as the tensor-op version every other device runs, so the same bits.
//!
//! `clip_grad_norm` is `torch.nn.utils.clip_grad_norm_`: the 2-norm of the per-tensor 2-norms,
//! and every gradient scaled by `min(1, max_norm / (total + 1e-6))`.

use candle_core::{DType, Result, Tensor, Var};
use rayon::iter::{IndexedParallelIterator, ParallelIterator};
use rayon::slice::{ParallelSlice, ParallelSliceMut};
use sdpipe_stages::device_path::use_cpu_kernels;
use sdpipe_stages::host_slice::with_slice;

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
            let scalars = Scalars::new(self.config, lr, moments.step);
            if use_cpu_kernels(&grad) && param.dtype() == DType::F32 {
                fused(param, &grad, moments, &scalars)?;
            } else {
                composed(param, &grad, moments, &scalars)?;
            }
        }
        Ok(())
    }
}

/// The scalars of one parameter's update at its step `t`.
struct Scalars {
    /// `1 − lr·wd`.
    decay: f64,
    /// `1 − β₁`, the lerp weight.
    one_minus_beta1: f64,
    beta2: f64,
    one_minus_beta2: f64,
    /// `1 / √(1 − β₂ᵗ)`.
    inv_bias_correction2_sqrt: f64,
    eps: f64,
    /// `lr / (1 − β₁ᵗ)`.
    step_size: f64,
}

impl Scalars {
    fn new(config: AdamWConfig, lr: f64, step: u64) -> Scalars {
        let AdamWConfig { beta1, beta2, eps, weight_decay } = config;
        let t = step as i32;
        Scalars {
            decay: 1.0 - lr * weight_decay,
            one_minus_beta1: 1.0 - beta1,
            beta2,
            one_minus_beta2: 1.0 - beta2,
            inv_bias_correction2_sqrt: 1.0 / (1.0 - beta2.powi(t)).sqrt(),
            eps,
            step_size: lr / (1.0 - beta1.powi(t)),
        }
    }
}

/// The update as candle tensor ops (every device and dtype): fourteen element-wise passes, each
/// allocating its result.
fn composed(param: &Var, grad: &Tensor, moments: &mut Moments, s: &Scalars) -> Result<()> {
    let decayed = param.as_tensor().affine(s.decay, 0.0)?;
    // lerp(m, g, w) = m + w·(g − m), torch's form for weights below one half.
    let exp_avg =
        (&moments.exp_avg + (grad - &moments.exp_avg)?.affine(s.one_minus_beta1, 0.0)?)?;
    let exp_avg_sq =
        (moments.exp_avg_sq.affine(s.beta2, 0.0)? + grad.sqr()?.affine(s.one_minus_beta2, 0.0)?)?;
    let denom = exp_avg_sq.sqrt()?.affine(s.inv_bias_correction2_sqrt, 0.0)?;
    let denom = (denom + s.eps)?;
    let updated = (decayed - (&exp_avg / denom)?.affine(s.step_size, 0.0)?)?;
    param.set(&updated)?;
    moments.exp_avg = exp_avg;
    moments.exp_avg_sq = exp_avg_sq;
    Ok(())
}

/// Elements per parallel task of [`fused`].
const CHUNK: usize = 1 << 14;

/// [`composed`] for an f32 parameter on the CPU in one parallel pass: the same f32 operations
/// in the same order per element (candle's `affine(a, b)` is `x·a + b` with `a`, `b` rounded to
/// f32, kept here down to the `+ 0`), so the same bits, without the thirteen intermediate
/// tensors. It was about a tenth of a training step at the mid benchmark's size.
fn fused(param: &Var, grad: &Tensor, moments: &mut Moments, s: &Scalars) -> Result<()> {
    let f = |x: f64| x as f32;
    let (decay, b1, beta2, b2) =
        (f(s.decay), f(s.one_minus_beta1), f(s.beta2), f(s.one_minus_beta2));
    let (inv_bc2, eps, step_size) = (f(s.inv_bias_correction2_sqrt), f(s.eps), f(s.step_size));
    let n = grad.elem_count();
    let (mut p_new, mut m_new, mut v_new) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    with_slice::<f32, _>(param.as_tensor(), |p| {
        with_slice::<f32, _>(grad, |g| {
            with_slice::<f32, _>(&moments.exp_avg, |m| {
                with_slice::<f32, _>(&moments.exp_avg_sq, |v| {
                    let outputs = p_new
                        .par_chunks_mut(CHUNK)
                        .zip(m_new.par_chunks_mut(CHUNK))
                        .zip(v_new.par_chunks_mut(CHUNK));
                    let inputs = p
                        .par_chunks(CHUNK)
                        .zip(g.par_chunks(CHUNK))
                        .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)));
                    outputs.zip(inputs).for_each(|(((po, mo), vo), ((p, g), (m, v)))| {
                        let outs = po.iter_mut().zip(mo.iter_mut()).zip(vo.iter_mut());
                        let ins = p.iter().zip(g).zip(m.iter().zip(v));
                        for (((po, mo), vo), ((&p, &g), (&m, &v))) in outs.zip(ins) {
                            let decayed = p * decay + 0.0;
                            let m1 = m + ((g - m) * b1 + 0.0);
                            let v1 = (v * beta2 + 0.0) + ((g * g) * b2 + 0.0);
                            let denom = (v1.sqrt() * inv_bc2 + 0.0) * 1.0 + eps;
                            *po = decayed - ((m1 / denom) * step_size + 0.0);
                            *mo = m1;
                            *vo = v1;
                        }
                    });
                })
            })
        })
    })????;
    let (shape, device) = (grad.shape(), grad.device());
    param.set(&Tensor::from_vec(p_new, shape, device)?)?;
    moments.exp_avg = Tensor::from_vec(m_new, shape, device)?;
    moments.exp_avg_sq = Tensor::from_vec(v_new, shape, device)?;
    Ok(())
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
    fn the_cpu_kernel_gives_the_tensor_ops_bits_over_several_steps() {
        let start: Vec<f32> =
            (0..40_000).map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0).collect();
        let grad = |step: usize| -> Tensor {
            let g: Vec<f32> = (0..start.len())
                .map(|i| (((i + step) * 104_729) % 997) as f32 / 500.0 - 1.0)
                .collect();
            Tensor::new(g, &Device::Cpu).unwrap()
        };
        let run = |generic: bool| -> Vec<f32> {
            let _path = generic.then(sdpipe_stages::device_path::force_generic_path);
            let params = [var(&start)];
            let mut adam = AdamW::new(1, CONFIG);
            for step in 0..3 {
                adam.step(&params, &[Some(grad(step))], 1e-2).unwrap();
            }
            let mut all = values(params[0].as_tensor());
            let moments = adam.state[0].as_ref().unwrap();
            all.extend(values(&moments.exp_avg));
            all.extend(values(&moments.exp_avg_sq));
            all
        };
        let (kernel, ops) = (run(false), run(true));
        assert!(kernel.iter().zip(&ops).all(|(a, b)| a.to_bits() == b.to_bits()));
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
