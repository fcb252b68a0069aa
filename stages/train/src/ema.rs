//! The exponential moving average of the trained weights, as diffusers' `EMAModel` keeps it
//! with the script's settings (`decay` 0.9999, `update_after_step` 0, no warmup, `min_decay` 0).
//!
//! The EMA counts its own optimisation steps: at its `k`-th update (`k` from 1) the decay is
//! `0` when `s = k − 1` is 0 (the shadow becomes a copy of the weights) and otherwise
//! `min(0.9999, (1 + s) / (10 + s))`; the shadow moves by `shadow −= (1 − decay)(shadow − w)`
//! (one parallel pass for f32 on the CPU, the same bits as the tensor ops elsewhere).

use candle_core::{DType, Result, Tensor, Var};
use rayon::iter::{IndexedParallelIterator, ParallelIterator};
use rayon::slice::{ParallelSlice, ParallelSliceMut};
use sdpipe_stages::device_path::use_cpu_kernels;
use sdpipe_stages::host_slice::with_slice;

/// diffusers' default (and the script's) upper bound on the decay.
pub const MAX_DECAY: f64 = 0.9999;

#[derive(Debug)]
pub struct Ema {
    pub max_decay: f64,
    /// Updates so far (diffusers' `optimization_step`).
    pub optimization_step: u64,
    pub shadow: Vec<Tensor>,
}

impl Ema {
    /// A shadow initialised to a copy of the current weights.
    pub fn new(params: &[Var]) -> Result<Ema> {
        let shadow = params.iter().map(|p| p.as_tensor().copy()).collect::<Result<Vec<_>>>()?;
        Ok(Ema { max_decay: MAX_DECAY, optimization_step: 0, shadow })
    }

    /// The decay used by the update numbered `optimization_step` (from 1).
    pub fn decay(&self, optimization_step: u64) -> f64 {
        let s = optimization_step.saturating_sub(1);
        if s == 0 {
            return 0.0;
        }
        let s = s as f64;
        ((1.0 + s) / (10.0 + s)).min(self.max_decay).max(0.0)
    }

    /// One update towards the current weights (after each optimiser step).
    pub fn step(&mut self, params: &[Var]) -> Result<()> {
        assert_eq!(params.len(), self.shadow.len(), "one shadow per parameter");
        self.optimization_step += 1;
        let one_minus_decay = 1.0 - self.decay(self.optimization_step);
        for (shadow, param) in self.shadow.iter_mut().zip(params) {
            let param = param.as_tensor();
            *shadow = if use_cpu_kernels(param) && param.dtype() == DType::F32 {
                moved_fused(shadow, param, one_minus_decay)?
            } else {
                (&*shadow - (&*shadow - param)?.affine(one_minus_decay, 0.0)?)?
            };
        }
        Ok(())
    }
}

/// `shadow − (shadow − param)·(1 − decay)` in one parallel pass over f32 CPU tensors, with the
/// tensor ops' per-element operations (candle's `affine` is `x·a + 0` with `a` rounded to f32),
/// so the same bits without the two intermediate tensors.
fn moved_fused(shadow: &Tensor, param: &Tensor, one_minus_decay: f64) -> Result<Tensor> {
    const CHUNK: usize = 1 << 14;
    let weight = one_minus_decay as f32;
    let mut out = vec![0f32; param.elem_count()];
    with_slice::<f32, _>(shadow, |s| {
        with_slice::<f32, _>(param, |p| {
            out.par_chunks_mut(CHUNK).zip(s.par_chunks(CHUNK).zip(p.par_chunks(CHUNK))).for_each(
                |(out, (s, p))| {
                    for ((o, &s), &p) in out.iter_mut().zip(s).zip(p) {
                        *o = s - ((s - p) * weight + 0.0);
                    }
                },
            )
        })
    })??;
    Tensor::from_vec(out, param.shape(), param.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(v: f32) -> Var {
        Var::from_tensor(&Tensor::new(&[v], &Device::Cpu).unwrap()).unwrap()
    }

    fn first(t: &Tensor) -> f32 {
        t.to_vec1::<f32>().unwrap()[0]
    }

    #[test]
    fn decay_is_zero_first_then_follows_one_plus_s_over_ten_plus_s_capped() {
        let ema = Ema::new(&[]).unwrap();
        assert_eq!(ema.decay(1), 0.0);
        assert_eq!(ema.decay(2), 2.0 / 11.0);
        assert_eq!(ema.decay(11), 11.0 / 20.0);
        assert_eq!(ema.decay(1_000_000), MAX_DECAY);
    }

    #[test]
    fn the_first_update_copies_the_weights() {
        let w = var(1.0);
        let mut ema = Ema::new(std::slice::from_ref(&w)).unwrap();
        w.set(&Tensor::new(&[5.0f32], &Device::Cpu).unwrap()).unwrap();
        ema.step(std::slice::from_ref(&w)).unwrap();
        assert_eq!(first(&ema.shadow[0]), 5.0);
    }

    #[test]
    fn later_updates_move_the_shadow_part_way() {
        let w = var(0.0);
        let mut ema = Ema::new(std::slice::from_ref(&w)).unwrap();
        ema.step(std::slice::from_ref(&w)).unwrap(); // shadow = 0
        w.set(&Tensor::new(&[11.0f32], &Device::Cpu).unwrap()).unwrap();
        ema.step(std::slice::from_ref(&w)).unwrap(); // decay 2/11: moves 9/11 of the way
        assert!((first(&ema.shadow[0]) - 9.0).abs() < 1e-5);
    }

    #[test]
    fn the_cpu_kernel_gives_the_tensor_ops_bits() {
        let values = |seed: usize| -> Vec<f32> {
            (0..40_000).map(|i| (((i + seed) * 7919) % 1000) as f32 / 250.0 - 2.0).collect()
        };
        let run = |generic: bool| -> Vec<f32> {
            let _path = generic.then(sdpipe_stages::device_path::force_generic_path);
            let w = Var::from_tensor(&Tensor::new(values(0), &Device::Cpu).unwrap()).unwrap();
            let mut ema = Ema::new(std::slice::from_ref(&w)).unwrap();
            for step in 1..4 {
                w.set(&Tensor::new(values(step), &Device::Cpu).unwrap()).unwrap();
                ema.step(std::slice::from_ref(&w)).unwrap();
            }
            ema.shadow[0].to_vec1::<f32>().unwrap()
        };
        let (kernel, ops) = (run(false), run(true));
        assert!(kernel.iter().zip(&ops).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn the_shadow_does_not_alias_the_weights() {
        let w = var(1.0);
        let ema = Ema::new(std::slice::from_ref(&w)).unwrap();
        w.set(&Tensor::new(&[2.0f32], &Device::Cpu).unwrap()).unwrap();
        assert_eq!(first(&ema.shadow[0]), 1.0);
    }
}
