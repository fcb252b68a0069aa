//! Dynamic loss scaling for fp16 training: torch's `GradScaler` with its defaults, as accelerate
//! uses it under `--mixed_precision fp16`.
//!
//! Under fp16 autocast the activations' gradients are f16, whose smallest normal value is
//! 6.1e-5: the small gradients of a diffusion loss would flush to zero. So the loss is multiplied
//! by `scale` before the backward pass, and the summed gradients divided by it before clipping.
//! If any gradient is then not finite, the scale was too large: the optimiser step is skipped
//! (the weights, AdamW's state and the learning-rate schedule stay where they were) and the
//! scale halves. After 2000 steps in a row without overflow it doubles. The scale is a power of
//! two, so scaling and unscaling are exact.
//!
//! bf16 has f32's exponent range and needs none of this (torch uses no scaler there).

use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

/// torch's defaults: `init_scale`, `growth_factor`, `backoff_factor`, `growth_interval`.
const INIT_SCALE: f64 = 65536.0;
const GROWTH_FACTOR: f64 = 2.0;
const BACKOFF_FACTOR: f64 = 0.5;
const GROWTH_INTERVAL: u64 = 2000;

/// The scaler's state: part of a checkpoint, so a resumed run scales as the uninterrupted one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GradScaler {
    /// What the loss is multiplied by.
    pub scale: f64,
    /// Steps in a row without overflow since the scale last changed.
    pub growth_tracker: u64,
    /// Optimiser steps skipped for overflow so far: the learning-rate schedule advances only on
    /// steps taken (accelerate's scheduler does not step when the optimiser step was skipped).
    pub skipped: u64,
}

impl Default for GradScaler {
    fn default() -> Self {
        GradScaler { scale: INIT_SCALE, growth_tracker: 0, skipped: 0 }
    }
}

impl GradScaler {
    /// Divides the summed gradients by the scale in place; returns whether every one is finite
    /// (torch's `unscale_` and its `found_inf`).
    pub fn unscale(&self, grads: &mut [Option<Tensor>]) -> Result<bool> {
        let mut finite = true;
        for grad in grads.iter_mut().flatten() {
            *grad = grad.affine(1.0 / self.scale, 0.0)?;
            // Any inf or NaN makes the sum inf or NaN; in f64 no finite f32 values overflow it.
            let sum = grad.to_dtype(DType::F64)?.abs()?.sum_all()?.to_scalar::<f64>()?;
            finite &= sum.is_finite();
        }
        Ok(finite)
    }

    /// After a step: backs off (and counts a skipped step) if it overflowed, else grows the
    /// scale once the growth interval has passed without overflow (torch's `update`).
    pub fn update(&mut self, overflowed: bool) {
        if overflowed {
            self.scale *= BACKOFF_FACTOR;
            self.growth_tracker = 0;
            self.skipped += 1;
        } else {
            self.growth_tracker += 1;
            if self.growth_tracker == GROWTH_INTERVAL {
                self.scale *= GROWTH_FACTOR;
                self.growth_tracker = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn grads(values: &[f32]) -> Vec<Option<Tensor>> {
        vec![Some(Tensor::new(values, &Device::Cpu).unwrap()), None]
    }

    #[test]
    fn starts_at_torchs_initial_scale() {
        assert_eq!(GradScaler::default().scale, 65536.0);
    }

    #[test]
    fn unscaling_divides_exactly_and_finds_finite_gradients() {
        let scaler = GradScaler::default();
        let mut g = grads(&[65536.0, -3.0 * 65536.0]);
        assert!(scaler.unscale(&mut g).unwrap());
        assert_eq!(g[0].as_ref().unwrap().to_vec1::<f32>().unwrap(), [1.0, -3.0]);
    }

    #[test]
    fn an_infinite_or_nan_gradient_is_found() {
        for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
            let mut g = grads(&[1.0, bad]);
            assert!(!GradScaler::default().unscale(&mut g).unwrap(), "{bad}");
        }
    }

    #[test]
    fn an_overflow_halves_the_scale_and_counts_a_skipped_step() {
        let mut scaler = GradScaler { growth_tracker: 7, ..GradScaler::default() };
        scaler.update(true);
        assert_eq!(scaler, GradScaler { scale: 32768.0, growth_tracker: 0, skipped: 1 });
    }

    #[test]
    fn the_scale_doubles_after_2000_steps_without_overflow() {
        let mut scaler = GradScaler::default();
        for _ in 0..1999 {
            scaler.update(false);
        }
        assert_eq!(scaler.scale, 65536.0);
        scaler.update(false);
        assert_eq!(scaler, GradScaler { scale: 131072.0, growth_tracker: 0, skipped: 0 });
    }
}
