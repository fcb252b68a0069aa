//! The UNet's and VAE's activations, SiLU and exact GELU, as single-pass parallel kernels with
//! analytic backward.
//!
//! Why: candle's CPU unary ops run on one thread, and its SiLU backward is a chain of five
//! element-wise ops, each allocating a full-size temporary (the page faults of those fresh
//! allocations were a tenth of a training step's time). Here the forward is one parallel pass
//! and the backward another, reading the saved input and the incoming gradient. The formulas
//! are candle's own (so outputs are unchanged): `x / (1 + e^−x)` and `x·(1 + erf(x/√2))/2`
//! with libm's `erf`. Other devices and dtypes keep candle's ops.

use std::f64::consts::{FRAC_1_SQRT_2, FRAC_2_SQRT_PI};

use candle_core::{DType, Device, Result, Tensor, WithDType};
use rayon::iter::{IndexedParallelIterator, ParallelIterator};
use rayon::slice::{ParallelSlice, ParallelSliceMut};

use crate::ops::attach1;
use crate::slices::with_slice;

/// Elements per parallel task: large enough to amortise the task, small enough to spread a
/// 64×64×320 feature map over every core.
const CHUNK: usize = 1 << 14;

/// An element type with the activations' scalar formulas.
trait Activations: WithDType + Send + Sync {
    fn silu(x: Self) -> Self;
    /// `g · d silu(x)/dx`.
    fn silu_backward(x: Self, g: Self) -> Self;
    fn gelu(x: Self) -> Self;
    /// `g · d gelu(x)/dx`.
    fn gelu_backward(x: Self, g: Self) -> Self;
}

macro_rules! activations {
    ($t:ty, $erf:path, $sqrt1_2:expr, $pdf_scale:expr) => {
        impl Activations for $t {
            fn silu(x: $t) -> $t {
                x / (1.0 + (-x).exp())
            }
            fn silu_backward(x: $t, g: $t) -> $t {
                let s = 1.0 / (1.0 + (-x).exp());
                g * (s + x * s * (1.0 - s))
            }
            fn gelu(x: $t) -> $t {
                ($erf(x * $sqrt1_2) + 1.0) * 0.5 * x
            }
            fn gelu_backward(x: $t, g: $t) -> $t {
                let cdf = ($erf(x * $sqrt1_2) + 1.0) * 0.5;
                let pdf = (x * x * -0.5).exp() * $pdf_scale;
                g * (cdf + x * pdf)
            }
        }
    };
}

activations!(f32, libm::erff, FRAC_1_SQRT_2 as f32, (FRAC_2_SQRT_PI * FRAC_1_SQRT_2 * 0.5) as f32);
activations!(f64, libm::erf, FRAC_1_SQRT_2, FRAC_2_SQRT_PI * FRAC_1_SQRT_2 * 0.5);

/// `f` applied to every element of `x`, in parallel.
fn map<T: Activations>(x: &Tensor, f: fn(T) -> T) -> Result<Tensor> {
    let out = with_slice::<T, _>(x, |x| {
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(out, x)| {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = f(v);
            }
        });
        out
    })?;
    Tensor::from_vec(out, x.dims(), &Device::Cpu)
}

/// `f(x, g)` for every pair of elements, in parallel.
fn map2<T: Activations>(x: &Tensor, g: &Tensor, f: fn(T, T) -> T) -> Result<Tensor> {
    let out = with_slice::<T, _>(x, |x| {
        with_slice::<T, _>(g, |g| {
            let mut out = vec![T::zero(); x.len()];
            out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK))).for_each(
                |(out, (x, g))| {
                    for ((o, &v), &d) in out.iter_mut().zip(x).zip(g) {
                        *o = f(v, d);
                    }
                },
            );
            out
        })
    })??;
    Tensor::from_vec(out, x.dims(), &Device::Cpu)
}

/// Whether the parallel kernels apply: f32 or f64 on the CPU.
fn fast(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Runs the kernel of `x`'s dtype (f32 or f64).
macro_rules! by_dtype {
    ($x:expr, $f:ident ( $($arg:expr),* )) => {
        if $x.dtype() == DType::F32 { $f::<f32>($($arg),*) } else { $f::<f64>($($arg),*) }
    };
}

/// SiLU, `x·sigmoid(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if !fast(x) {
        return x.silu();
    }
    let value = by_dtype!(x, map(x, Activations::silu))?;
    attach1(
        x,
        value,
        "sdpipe-silu",
        Box::new(|args, _, g| {
            let x = args[0];
            Ok(vec![Some(by_dtype!(x, map2(x, &g.contiguous()?, Activations::silu_backward))?)])
        }),
    )
}

/// GELU with the exact erf (`F.gelu`, approximate="none").
///
/// Backward: `dx = g·(Φ(x) + x·φ(x))`, exact (candle's own `gelu_erf` backward rounds
/// 1/√(2π) to 0.398942, 7e-7 relative off).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if !fast(x) {
        return gelu_composed(x);
    }
    let value = by_dtype!(x, map(x, Activations::gelu))?;
    attach1(
        x,
        value,
        "sdpipe-gelu-erf",
        Box::new(|args, _, g| {
            let x = args[0];
            Ok(vec![Some(by_dtype!(x, map2(x, &g.contiguous()?, Activations::gelu_backward))?)])
        }),
    )
}

/// Exact GELU and its backward from candle's tensor ops, for other devices and dtypes.
fn gelu_composed(x: &Tensor) -> Result<Tensor> {
    let value = x.detach().gelu_erf()?;
    attach1(
        x,
        value,
        "sdpipe-gelu-erf",
        Box::new(|args, _, g| {
            let x = args[0];
            let cdf = (((x * FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5)?;
            let pdf = ((x.sqr()? * -0.5)?.exp()? * (FRAC_2_SQRT_PI * FRAC_1_SQRT_2 * 0.5))?;
            let dx = (cdf + (x * pdf)?)?;
            Ok(vec![Some((g * dx)?)])
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::{check_gradients, max_abs_diff, sample};
    use candle_core::Var;

    #[test]
    fn silu_gradient_matches_finite_differences() {
        check_gradients(&[sample(&[3, 7], 31)], |t| silu(&t[0]));
    }

    #[test]
    fn silu_forward_equals_candles_silu() {
        let x = sample(&[5, 9000], 32).to_dtype(DType::F32).unwrap();
        let tracked = Var::from_tensor(&x).unwrap();
        assert_eq!(max_abs_diff(&silu(tracked.as_tensor()).unwrap(), &x.silu().unwrap()), 0.0);
    }

    #[test]
    fn silu_gradient_equals_candles_silu_gradient() {
        let x = Var::from_tensor(&sample(&[4, 5000], 33).to_dtype(DType::F32).unwrap()).unwrap();
        let ours = silu(x.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        let theirs = x.as_tensor().silu().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_abs_diff(ours.get(&x).unwrap(), theirs.get(&x).unwrap()) < 1e-6);
    }

    #[test]
    fn gelu_gradient_matches_finite_differences() {
        check_gradients(&[sample(&[3, 7], 15)], |t| gelu(&t[0]));
    }

    #[test]
    fn gelu_forward_equals_candles_erf_gelu() {
        let x = sample(&[4, 9000], 16).to_dtype(DType::F32).unwrap();
        let tracked = Var::from_tensor(&x).unwrap();
        assert_eq!(max_abs_diff(&gelu(tracked.as_tensor()).unwrap(), &x.gelu_erf().unwrap()), 0.0);
    }

    #[test]
    fn untracked_inputs_build_no_graph() {
        let x = sample(&[2, 4], 20);
        assert!(!silu(&x).unwrap().track_op());
        assert!(!gelu(&x).unwrap().track_op());
    }
}
