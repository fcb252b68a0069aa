//! Group normalisation on the CPU as one parallel pass forward and one backward, for f32 and
//! f64 tensors large enough to gain from it; [`crate::ops::group_norm`] chooses.
//!
//! Why: the composition of candle ops that every device runs (mean, subtract, square, mean,
//! sqrt, divide, then the affine weight and bias) reads and writes the whole feature map about
//! ten times and allocates a full-size temporary each time; its backward twice that. A UNet has
//! dozens of group norms per step (every resnet block has two, every transformer one), which
//! made them the slowest op against torch (3.8× at the mid model's shapes, `bench_sample ops`).
//!
//! How: a `(B, C, spatial)` map with `G` groups is `B·G` contiguous slabs of `C/G·spatial`
//! elements, one rayon task each. Forward: the slab's mean and variance in f64 (one pass of Σx,
//! Σx² in 8 lanes: exact enough in f64 for any mean/deviation ratio a network produces), then
//! per channel `y = (x − mean)·(rstd·w) + b` in the element type. Backward, with
//! `x̂ = (x − mean)·rstd`: per channel `Σg` and `Σg·x` (f64), which give the bias and weight
//! gradients (`Σg`, `rstd·(Σg·x − mean·Σg)`) and the slab's `mean(g·w)` and `mean(g·w·x̂)`; then
//! `dx = rstd·w·g − rstd²·mean(g·w·x̂)·(x − mean) − rstd·mean(g·w)`, one more pass, only when
//! `x` needs a gradient. Statistics are recomputed from `x` (the graph keeps only the inputs).
//!
//! Below [`MIN_ELEMENTS`] the tasks are too small to pay for themselves and the composition
//! stays (measured: 0.16 vs 0.13 ms forward and backward at 32 channels × 32×32).

use candle_core::{DType, Result, Tensor, WithDType};
use rayon::iter::{IndexedParallelIterator, IntoParallelIterator, ParallelIterator};
use rayon::slice::{ParallelSlice, ParallelSliceMut};

use crate::device_path::use_cpu_kernels;
use crate::ops::attach3;
use crate::vectorised::{apply, sums};
use sdpipe_stages::host_slice::with_slice;

/// The smallest feature map (elements) the kernel takes.
const MIN_ELEMENTS: usize = 1 << 16;

/// Whether [`fused`] serves `x`: f32 or f64 on the CPU (see
/// [`crate::device_path`]), at least [`MIN_ELEMENTS`] elements.
pub(crate) fn applies(x: &Tensor) -> bool {
    use_cpu_kernels(x)
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.elem_count() >= MIN_ELEMENTS
}

/// [`crate::ops::group_norm`] by the kernels, with their backward attached.
pub(crate) fn fused(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    let value = forward(&x.detach(), &weight.detach(), &bias.detach(), groups, eps)?;
    attach3(
        x,
        weight,
        bias,
        value,
        "sdpipe-group-norm",
        Box::new(move |args, _, g, wanted| backward(args[0], args[1], g, groups, eps, wanted)),
    )
}

/// The map's shape as the kernels see it: `batch` × `groups` slabs of `channels / groups`
/// channels of `spatial` elements.
#[derive(Clone, Copy)]
struct Shape {
    groups: usize,
    channels: usize,
    spatial: usize,
}

impl Shape {
    fn of(x: &Tensor, groups: usize) -> Result<Self> {
        let (batch, channels) = (x.dim(0)?, x.dim(1)?);
        Ok(Shape { groups, channels, spatial: x.elem_count() / (batch * channels) })
    }

    fn per_group(self) -> usize {
        self.channels / self.groups
    }

    fn slab(self) -> usize {
        self.per_group() * self.spatial
    }
}

/// Mean and reciprocal standard deviation (biased variance, `eps` inside the root: torch's) of
/// one slab.
fn moments<T: WithDType>(x: &[T], eps: f64) -> (f64, f64) {
    let n = x.len() as f64;
    let (sum, squares) = sums(x, x, |v, _| {
        let v = v.to_f64();
        (v, v * v)
    });
    let mean = sum / n;
    let var = (squares / n - mean * mean).max(0.0);
    (mean, 1.0 / (var + eps).sqrt())
}

/// `(x − mean)·rstd·weight + bias` per group, for `x` shaped `(B, C, ...)`.
fn forward(x: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize, eps: f64) -> Result<Tensor> {
    let shape = Shape::of(x, groups)?;
    match x.dtype() {
        DType::F32 => forward_typed::<f32>(x, weight, bias, shape, eps),
        _ => forward_typed::<f64>(x, weight, bias, shape, eps),
    }
}

fn forward_typed<T: WithDType>(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    shape: Shape,
    eps: f64,
) -> Result<Tensor> {
    let out = with_slice::<T, _>(x, |x| {
        with_slice::<T, _>(weight, |w| {
            with_slice::<T, _>(bias, |bias| forward_slices(x, w, bias, shape, eps))
        })
    })???;
    Tensor::from_vec(out, x.dims(), x.device())
}

fn forward_slices<T: WithDType>(x: &[T], w: &[T], bias: &[T], shape: Shape, eps: f64) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(shape.slab()).zip(x.par_chunks(shape.slab())).enumerate().for_each(
        |(slab, (out, x))| {
            let first = (slab % shape.groups) * shape.per_group();
            let (mean, rstd) = moments(x, eps);
            let channels = out.chunks_mut(shape.spatial).zip(x.chunks(shape.spatial));
            for (ch, (out, x)) in (first..).zip(channels) {
                let scale = T::from_f64(rstd * w[ch].to_f64());
                let (mean, shift) = (T::from_f64(mean), bias[ch]);
                apply(out, x, x, |v, _| (v - mean) * scale + shift);
            }
        },
    );
    out
}

/// The gradients of [`forward`] with respect to `x`, `weight` and `bias` given the output's
/// gradient `g`, each only where `wanted`.
fn backward(
    x: &Tensor,
    weight: &Tensor,
    g: &Tensor,
    groups: usize,
    eps: f64,
    wanted: &[bool],
) -> Result<Vec<Option<Tensor>>> {
    let shape = Shape::of(x, groups)?;
    match x.dtype() {
        DType::F32 => backward_typed::<f32>(x, weight, g, shape, eps, wanted),
        _ => backward_typed::<f64>(x, weight, g, shape, eps, wanted),
    }
}

fn backward_typed<T: WithDType>(
    x: &Tensor,
    weight: &Tensor,
    g: &Tensor,
    shape: Shape,
    eps: f64,
    wanted: &[bool],
) -> Result<Vec<Option<Tensor>>> {
    let want_x = wanted.first().copied().unwrap_or(true);
    let (gx, gw, gb) = with_slice::<T, _>(x, |x| {
        with_slice::<T, _>(weight, |w| {
            with_slice::<T, _>(g, |g| backward_slices(x, w, g, shape, eps, want_x))
        })
    })???;
    let device = x.device();
    let affine = |grad: Vec<f64>| -> Result<Tensor> {
        let grad: Vec<T> = grad.into_iter().map(T::from_f64).collect();
        Tensor::from_vec(grad, weight.dims(), device)
    };
    let wants = |i: usize| wanted.get(i).copied().unwrap_or(true);
    Ok(vec![
        gx.map(|gx| Tensor::from_vec(gx, x.dims(), device)).transpose()?,
        if wants(1) { Some(affine(gw)?) } else { None },
        if wants(2) { Some(affine(gb)?) } else { None },
    ])
}

/// `(dx if want_x, dweight, dbias)`, the affine gradients in f64.
#[allow(clippy::type_complexity)]
fn backward_slices<T: WithDType>(
    x: &[T],
    w: &[T],
    g: &[T],
    shape: Shape,
    eps: f64,
    want_x: bool,
) -> (Option<Vec<T>>, Vec<f64>, Vec<f64>) {
    let slab = shape.slab();
    let mut gx = if want_x { vec![T::zero(); x.len()] } else { Vec::new() };
    let outs: Vec<Option<&mut [T]>> = if want_x {
        gx.chunks_mut(slab).map(Some).collect()
    } else {
        (0..x.len() / slab).map(|_| None).collect()
    };
    // Per slab: each of its channels' (Σ g·x̂, Σ g).
    let partials: Vec<Vec<(f64, f64)>> = outs
        .into_par_iter()
        .zip(x.par_chunks(slab).zip(g.par_chunks(slab)))
        .enumerate()
        .map(|(index, (out, (x, g)))| {
            let first = (index % shape.groups) * shape.per_group();
            backward_slab(out, x, g, &w[first..first + shape.per_group()], shape.spatial, eps)
        })
        .collect();
    let (mut gw, mut gb) = (vec![0f64; shape.channels], vec![0f64; shape.channels]);
    for (index, partial) in partials.iter().enumerate() {
        let first = (index % shape.groups) * shape.per_group();
        for (ch, &(sgx, sg)) in (first..).zip(partial) {
            gw[ch] += sgx;
            gb[ch] += sg;
        }
    }
    (want_x.then_some(gx), gw, gb)
}

/// One slab's backward: writes `dx` into `out` (if given) and returns each channel's
/// `(Σ g·x̂, Σ g)`; `w` holds the slab's channels' weights.
fn backward_slab<T: WithDType>(
    out: Option<&mut [T]>,
    x: &[T],
    g: &[T],
    w: &[T],
    spatial: usize,
    eps: f64,
) -> Vec<(f64, f64)> {
    let (mean, rstd) = moments(x, eps);
    let per_channel: Vec<(f64, f64)> = x
        .chunks(spatial)
        .zip(g.chunks(spatial))
        .map(|(x, g)| {
            let (sg, sgx) = sums(x, g, |v, d| {
                let d = d.to_f64();
                (d, d * v.to_f64())
            });
            (rstd * (sgx - mean * sg), sg)
        })
        .collect();
    if let Some(out) = out {
        let n = x.len() as f64;
        let (mut mean_gw, mut mean_gwx) = (0.0, 0.0);
        for (&(sgxhat, sg), w) in per_channel.iter().zip(w) {
            mean_gw += w.to_f64() * sg / n;
            mean_gwx += w.to_f64() * sgxhat / n;
        }
        let centred_scale = T::from_f64(-rstd * rstd * mean_gwx);
        let (offset, mean_t) = (T::from_f64(-rstd * mean_gw), T::from_f64(mean));
        let channels = out.chunks_mut(spatial).zip(x.chunks(spatial).zip(g.chunks(spatial)));
        for ((out, (x, g)), w) in channels.zip(w) {
            let scale = T::from_f64(rstd * w.to_f64());
            apply(out, x, g, |v, d| scale * d + centred_scale * (v - mean_t) + offset);
        }
    }
    per_channel
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::{assert_paths_agree, check_gradients, max_abs_diff, sample};

    /// A map of `(batch, channels, h, w)` with its weight and bias, in f32 or f64.
    fn inputs(shape: [usize; 4], dtype: DType, seed: u64) -> [Tensor; 3] {
        let as_dtype = |t: Tensor| t.to_dtype(dtype).unwrap();
        [
            as_dtype(sample(&shape, seed)),
            as_dtype(sample(&[shape[1]], seed + 1)),
            as_dtype(sample(&[shape[1]], seed + 2)),
        ]
    }

    #[test]
    fn gradients_match_finite_differences() {
        let [x, w, b] = inputs([2, 4, 3, 2], DType::F64, 40);
        check_gradients(&[x, w, b], |t| fused(&t[0], &t[1], &t[2], 2, 1e-6));
    }

    #[test]
    fn forward_equals_the_composition_in_f64() {
        let [x, w, b] = inputs([2, 6, 5, 7], DType::F64, 43);
        let composed = {
            let _generic = crate::device_path::force_generic_path();
            crate::ops::group_norm(&x, &w, &b, 3, 1e-5).unwrap()
        };
        assert!(max_abs_diff(&fused(&x, &w, &b, 3, 1e-5).unwrap(), &composed) < 1e-12);
    }

    #[test]
    fn serves_large_f32_maps_and_leaves_small_ones_to_the_composition() {
        assert!(applies(&inputs([1, 64, 32, 32], DType::F32, 1)[0]));
        assert!(!applies(&inputs([1, 32, 32, 32], DType::F32, 1)[0]));
        assert!(!applies(&inputs([1, 64, 32, 32], DType::F16, 1)[0]));
    }

    #[test]
    fn the_kernel_and_the_generic_path_agree_at_unet_sizes() {
        // Through ops::group_norm, so the CPU side takes the kernel (64·32·32 elements).
        let [x, w, b] = inputs([2, 64, 32, 32], DType::F32, 46);
        assert_paths_agree(&[x, w, b], 1e-5, |t| {
            crate::ops::group_norm(&t[0], &t[1], &t[2], 32, 1e-6)
        });
    }

    #[test]
    fn a_frozen_affine_gets_no_gradient_and_an_untracked_map_none() {
        let [x, w, _] = inputs([1, 4, 3, 3], DType::F32, 49);
        let g = sample(&[1, 4, 3, 3], 52).to_dtype(DType::F32).unwrap();
        let grads = backward(&x, &w, &g, 2, 1e-5, &[true, false, false]).unwrap();
        assert!(grads[0].is_some() && grads[1].is_none() && grads[2].is_none());
        let grads = backward(&x, &w, &g, 2, 1e-5, &[false, true, true]).unwrap();
        assert!(grads[0].is_none() && grads[1].is_some() && grads[2].is_some());
    }
}
