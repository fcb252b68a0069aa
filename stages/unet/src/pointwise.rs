//! The UNet's and VAE's activations, SiLU and exact GELU, as single-pass parallel kernels with
//! analytic backward.
//!
//! Why: candle's CPU unary ops run on one thread, and its SiLU backward is a chain of five
//! element-wise ops, each allocating a full-size temporary (the page faults of those fresh
//! allocations were a tenth of a training step's time). Here the forward is one parallel pass
//! and the backward another, reading the saved input and the incoming gradient. SiLU is
//! candle's formula, `x / (1 + e^−x)`, GELU `x·(1 + erf(x/√2))/2`; in f32 with vectorisable
//! functions instead of libm's scalar calls: the exponential [`crate::fastmath::exp`] (within 2
//! ulp of libm's, so SiLU stays within a few ulp of candle's) and the erf PyTorch's own CPU GELU
//! uses ([`crate::fastmath::erf`], within 6e-7 of libm's); in f64 (gradient checks) libm's.
//! The loops ([`crate::vectorised`]) are compiled for the baseline x86-64, AVX2 with FMA and
//! AVX-512, chosen at run time; all give the same bits (the same operations per element, each
//! fused multiply-add explicit).
//! Other devices (and the CPU under [`crate::device_path::force_generic_path`]) and dtypes keep
//! candle's ops.

use std::f64::consts::{FRAC_1_SQRT_2, FRAC_2_SQRT_PI};

use candle_core::{DType, Result, Tensor, WithDType};
use rayon::iter::{IndexedParallelIterator, ParallelIterator};
use rayon::slice::{ParallelSlice, ParallelSliceMut};

use crate::device_path::use_cpu_kernels;
use crate::ops::attach1;
use crate::vectorised::{apply_kernel, Kernel};
use sdpipe_stages::host_slice::with_slice;

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
    ($t:ty, $exp:path, $erf:path, $sqrt1_2:expr, $pdf_scale:expr) => {
        impl Activations for $t {
            #[inline(always)]
            fn silu(x: $t) -> $t {
                x / (1.0 + $exp(-x))
            }
            #[inline(always)]
            fn silu_backward(x: $t, g: $t) -> $t {
                let s = 1.0 / (1.0 + $exp(-x));
                g * (s + x * s * (1.0 - s))
            }
            #[inline(always)]
            fn gelu(x: $t) -> $t {
                ($erf(x * $sqrt1_2) + 1.0) * 0.5 * x
            }
            #[inline(always)]
            fn gelu_backward(x: $t, g: $t) -> $t {
                let cdf = ($erf(x * $sqrt1_2) + 1.0) * 0.5;
                let pdf = $exp(x * x * -0.5) * $pdf_scale;
                g * (cdf + x * pdf)
            }
        }
    };
}

activations!(
    f32,
    crate::fastmath::exp,
    crate::fastmath::erf,
    FRAC_1_SQRT_2 as f32,
    (FRAC_2_SQRT_PI * FRAC_1_SQRT_2 * 0.5) as f32
);
activations!(f64, f64::exp, libm::erf, FRAC_1_SQRT_2, FRAC_2_SQRT_PI * FRAC_1_SQRT_2 * 0.5);

/// The activations and their backward as [`Kernel`]s, `(x, g) → out`: zero-sized, so each
/// build of the element loop inlines them (see [`Kernel`] for why not closures).
macro_rules! kernels {
    ($($name:ident: |$x:ident, $g:ident| $body:expr;)*) => {$(
        #[derive(Clone, Copy)]
        struct $name;
        impl<T: Activations> Kernel<T> for $name {
            #[inline(always)]
            fn call(self, $x: T, $g: T) -> T {
                $body
            }
        }
    )*};
}

kernels! {
    Silu: |x, _g| T::silu(x);
    SiluBackward: |x, g| T::silu_backward(x, g);
    Gelu: |x, _g| T::gelu(x);
    GeluBackward: |x, g| T::gelu_backward(x, g);
}

/// `kernel(x, x)` for every element of `x` (a unary kernel), in parallel.
fn map<T: Activations>(x: &Tensor, kernel: impl Kernel<T> + Sync) -> Result<Tensor> {
    map2(x, x, kernel)
}

/// `kernel(x, g)` for every pair of elements, in parallel.
fn map2<T: Activations>(x: &Tensor, g: &Tensor, kernel: impl Kernel<T> + Sync) -> Result<Tensor> {
    let out = with_slice::<T, _>(x, |x| {
        with_slice::<T, _>(g, |g| {
            let mut out = vec![T::zero(); x.len()];
            out.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
                .for_each(|(out, (x, g))| apply_kernel(out, x, g, kernel));
            out
        })
    })??;
    Tensor::from_vec(out, x.dims(), x.device())
}

/// Whether the parallel kernels apply: f32 or f64 on the CPU (see [`crate::device_path`]).
fn fast(x: &Tensor) -> bool {
    use_cpu_kernels(x) && matches!(x.dtype(), DType::F32 | DType::F64)
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
    let value = by_dtype!(x, map(x, Silu))?;
    attach1(
        x,
        value,
        "sdpipe-silu",
        Box::new(|args, _, g, _| {
            let x = args[0];
            Ok(vec![Some(by_dtype!(x, map2(x, &g.contiguous()?, SiluBackward))?)])
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
    let value = by_dtype!(x, map(x, Gelu))?;
    attach1(
        x,
        value,
        "sdpipe-gelu-erf",
        Box::new(|args, _, g, _| {
            let x = args[0];
            Ok(vec![Some(by_dtype!(x, map2(x, &g.contiguous()?, GeluBackward))?)])
        }),
    )
}

/// Exact GELU and its backward from candle's tensor ops (which every device has), for other
/// devices and dtypes.
fn gelu_composed(x: &Tensor) -> Result<Tensor> {
    let value = x.detach().gelu_erf()?;
    attach1(
        x,
        value,
        "sdpipe-gelu-erf",
        Box::new(|args, _, g, _| {
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
    use crate::ops::tests::{assert_paths_agree, check_gradients, max_abs_diff, sample};
    use crate::vectorised::{apply_kernel_avx2, apply_kernel_avx512, apply_kernel_portable};
    use candle_core::Var;

    #[test]
    fn silu_gradient_matches_finite_differences() {
        check_gradients(&[sample(&[3, 7], 31)], |t| silu(&t[0]));
    }

    #[test]
    fn silu_forward_is_within_rounding_of_candles_silu() {
        // The exponential is within 2 ulp of libm's; |silu(x)| ≤ 2 for the |x| ≤ 2 here.
        let x = sample(&[5, 9000], 32).to_dtype(DType::F32).unwrap();
        let tracked = Var::from_tensor(&x).unwrap();
        assert!(max_abs_diff(&silu(tracked.as_tensor()).unwrap(), &x.silu().unwrap()) < 1e-6);
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
    fn gelu_forward_is_within_rounding_of_candles_erf_gelu() {
        // The erf is PyTorch's vectorised one (6e-7 of libm's), times x/2 with |x| ≤ 2 here.
        let x = sample(&[4, 9000], 16).to_dtype(DType::F32).unwrap();
        let tracked = Var::from_tensor(&x).unwrap();
        assert!(max_abs_diff(&gelu(tracked.as_tensor()).unwrap(), &x.gelu_erf().unwrap()) < 1e-6);
    }

    #[test]
    fn gelu_f32_gradient_is_within_rounding_of_the_f64_one() {
        let x = sample(&[4, 9000], 34);
        let gradient = |x: &Tensor| {
            let var = Var::from_tensor(x).unwrap();
            let grads = gelu(var.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
            grads.get(&var).unwrap().to_dtype(DType::F64).unwrap()
        };
        assert!(max_abs_diff(&gradient(&x.to_dtype(DType::F32).unwrap()), &gradient(&x)) < 1e-6);
    }

    /// Every build of the element loop gives `kernel` the portable build's bits.
    fn assert_builds_agree(kernel: impl Kernel<f32>) {
        let x: Vec<f32> = (0..1003).map(|i| (i as f32 - 500.0) / 97.0).collect();
        let g: Vec<f32> = x.iter().map(|v| v.sin()).collect();
        let mut portable = vec![0f32; x.len()];
        apply_kernel_portable(&mut portable, &x, &g, kernel);
        #[cfg(target_arch = "x86_64")]
        {
            let mut builds: Vec<(&str, Vec<f32>)> = Vec::new();
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                let mut out = vec![0f32; x.len()];
                // SAFETY: the CPU has AVX2 and FMA (checked just above).
                unsafe { apply_kernel_avx2(&mut out, &x, &g, kernel) };
                builds.push(("avx2", out));
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                let mut out = vec![0f32; x.len()];
                // SAFETY: the CPU has AVX-512F (checked just above).
                unsafe { apply_kernel_avx512(&mut out, &x, &g, kernel) };
                builds.push(("avx512", out));
            }
            for (name, out) in builds {
                assert!(
                    portable.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{name}"
                );
            }
        }
    }

    #[test]
    fn the_avx2_and_avx512_loops_give_the_portable_loops_bits() {
        assert_builds_agree(Silu);
        assert_builds_agree(SiluBackward);
        assert_builds_agree(Gelu);
        assert_builds_agree(GeluBackward);
    }

    #[test]
    fn silu_on_the_generic_path_matches_the_cpu_kernels_forward_and_gradient() {
        let x = sample(&[3, 40000], 35).to_dtype(DType::F32).unwrap();
        assert_paths_agree(&[x], 1e-5, |t| silu(&t[0]));
    }

    #[test]
    fn gelu_on_the_generic_path_matches_the_cpu_kernels_forward_and_gradient() {
        let x = sample(&[3, 40000], 36).to_dtype(DType::F32).unwrap();
        assert_paths_agree(&[x], 1e-5, |t| gelu(&t[0]));
    }

    #[test]
    fn untracked_inputs_build_no_graph() {
        let x = sample(&[2, 4], 20);
        assert!(!silu(&x).unwrap().track_op());
        assert!(!gelu(&x).unwrap().track_op());
    }
}
