//! The metric networks' pooling: max pooling without padding (PyTorch's `MaxPool2d(k,
//! stride)`, floor mode), and Inception's 3×3 same-size average (padding not counted) and max
//! pools. On the CPU in f32, with the `B·C` planes split across the current rayon pool:
//! candle's pooling runs on one thread, which left the other threads idle between the
//! convolutions. Elsewhere (or with the generic path forced, see [`crate::device_path`])
//! compositions of candle's ops, which compute the same functions.

use candle_core::Tensor;
use rayon::iter::{IndexedParallelIterator, ParallelIterator};
use rayon::slice::{ParallelSlice, ParallelSliceMut};

use crate::device_path::use_cpu_kernels;
use sdpipe_stages::host_slice::with_slice;

/// `[B, C, H, W]` → `[B, C, (H − k)/stride + 1, (W − k)/stride + 1]`, each output the largest
/// input in its `k × k` window.
pub fn max_pool2d(x: &Tensor, k: usize, stride: usize) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if k == 0 || stride == 0 || h < k || w < k {
        candle_core::bail!("max pool {k}/{stride} does not fit a {h}×{w} input")
    }
    if !use_cpu_kernels(x) {
        return x.max_pool2d_with_stride(k, stride);
    }
    let (out_h, out_w) = ((h - k) / stride + 1, (w - k) / stride + 1);
    let mut out = vec![0f32; b * c * out_h * out_w];
    with_slice::<f32, _>(x, |input| {
        let planes = out.par_chunks_mut(out_h * out_w).zip(input.par_chunks(h * w));
        // Separably: the largest of the window's rows per column, then of that row's windows.
        planes.for_each_init(Vec::new, |column_max: &mut Vec<f32>, (out, plane)| {
            for (oy, out_row) in out.chunks_exact_mut(out_w).enumerate() {
                let mut rows = plane[oy * stride * w..][..k * w].chunks_exact(w);
                column_max.clear();
                column_max.extend_from_slice(rows.next().expect("k ≥ 1 rows"));
                for row in rows {
                    for (m, &v) in column_max.iter_mut().zip(row) {
                        *m = m.max(v);
                    }
                }
                for (ox, o) in out_row.iter_mut().enumerate() {
                    let window = &column_max[ox * stride..ox * stride + k];
                    *o = window.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                }
            }
        })
    })?;
    Tensor::from_vec(out, (b, c, out_h, out_w), x.device())
}

/// Inception's 3×3, stride 1, padding 1 average pool with `count_include_pad=False`: each
/// output is the mean of the real (unpadded) pixels in its window.
pub fn avg_pool_3x3_exclude_pad(x: &Tensor) -> candle_core::Result<Tensor> {
    if !use_cpu_kernels(x) {
        return avg_pool_3x3_exclude_pad_composed(x);
    }
    same_3x3(x, 0.0, |sum, v| sum + v, |sum, count| sum / count as f32)
}

/// Inception's 3×3, stride 1, padding 1 max pool: the largest real pixel of each window
/// (PyTorch pads with −∞, so the padding never wins).
pub fn max_pool_3x3_same(x: &Tensor) -> candle_core::Result<Tensor> {
    if !use_cpu_kernels(x) {
        return max_pool_3x3_same_composed(x);
    }
    same_3x3(x, f32::NEG_INFINITY, f32::max, |max, _| max)
}

/// `step` folded from `init` over the real pixels of each output's 3×3 window (rows, then
/// columns, in order), then `finish(acc, pixels)`; the `B·C` planes split across the current
/// rayon pool. Why a kernel: composed of candle ops (pads or concatenations, a pool, a
/// rescale), both pools ran on one thread between the parallel convolutions of Inception's
/// mixed blocks.
fn same_3x3(
    x: &Tensor,
    init: f32,
    step: impl Fn(f32, f32) -> f32 + Sync,
    finish: impl Fn(f32, usize) -> f32 + Sync,
) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let mut out = vec![0f32; b * c * h * w];
    if h * w == 0 {
        return Tensor::from_vec(out, (b, c, h, w), x.device());
    }
    with_slice::<f32, _>(x, |input| {
        out.par_chunks_mut(h * w).zip(input.par_chunks(h * w)).for_each(|(out, plane)| {
            for oy in 0..h {
                let rows = oy.saturating_sub(1)..(oy + 2).min(h);
                for ox in 0..w {
                    let cols = ox.saturating_sub(1)..(ox + 2).min(w);
                    let mut acc = init;
                    for y in rows.clone() {
                        for &v in &plane[y * w..][cols.clone()] {
                            acc = step(acc, v);
                        }
                    }
                    out[oy * w + ox] = finish(acc, rows.len() * cols.len());
                }
            }
        })
    })?;
    Tensor::from_vec(out, (b, c, h, w), x.device())
}

/// 3×3, stride 1, padding 1 average pool with `count_include_pad=False`: each output is the
/// mean of the real (unpadded) pixels in its window, from candle's ops (the generic path).
fn avg_pool_3x3_exclude_pad_composed(x: &Tensor) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let summed_over_9 =
        x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?.avg_pool2d_with_stride(3, 1)?;
    // Rescale windows by 9 / (number of real pixels): 4 at corners, 6 on edges, 9 inside.
    let count = |i: usize, n: usize| {
        if n == 1 {
            1.0
        } else if i == 0 || i == n - 1 {
            2.0
        } else {
            3.0
        }
    };
    let mut rescale = Vec::with_capacity(h * w);
    for i in 0..h {
        for j in 0..w {
            rescale.push(9.0f32 / (count(i, h) * count(j, w)) as f32);
        }
    }
    let rescale = Tensor::from_vec(rescale, (1, 1, h, w), x.device())?;
    summed_over_9.broadcast_mul(&rescale)
}

/// 3×3, stride 1, padding 1 max pool (padding never wins: it is −∞, as in PyTorch), from
/// candle's ops (the generic path).
fn max_pool_3x3_same_composed(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let col = Tensor::full(f32::NEG_INFINITY, (b, c, h, 1), x.device())?;
    let x = Tensor::cat(&[&col, x, &col], 3)?;
    let row = Tensor::full(f32::NEG_INFINITY, (b, c, 1, w + 2), x.device())?;
    let x = Tensor::cat(&[&row, &x, &row], 2)?;
    max_pool2d(&x, 3, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candles_max_pool_on_odd_and_even_sizes() {
        for (h, w, k, stride) in [(9, 7, 3, 2), (8, 8, 2, 2), (5, 6, 3, 1)] {
            let n = 2 * 3 * h * w;
            let v: Vec<f32> = (0..n).map(|i| (i as f32 * 1.7).sin()).collect();
            let x = Tensor::from_vec(v, (2, 3, h, w), &Device::Cpu).unwrap();
            let expected = x.max_pool2d_with_stride(k, stride).unwrap();
            let got = max_pool2d(&x, k, stride).unwrap();
            assert_eq!(got.dims(), expected.dims());
            let diff = (got - expected).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{h}×{w} k {k} stride {stride}");
        }
    }

    /// Through `max_pool2d` both ways: the generic path must be a drop-in replacement, to the
    /// bit (a maximum has no rounding), with the −∞ padding Inception adds.
    #[test]
    fn the_generic_path_matches_the_cpu_kernels_exactly() {
        for (h, w, k, stride) in [(9, 7, 3, 2), (8, 8, 2, 2), (5, 6, 3, 1)] {
            let n = 2 * 3 * h * w;
            let v: Vec<f32> = (0..n)
                .map(|i| if i % 11 == 0 { f32::NEG_INFINITY } else { (i as f32 * 1.3).cos() })
                .collect();
            let x = Tensor::from_vec(v, (2, 3, h, w), &Device::Cpu).unwrap();
            let fast = max_pool2d(&x, k, stride).unwrap();
            let generic = {
                let _generic = crate::device_path::force_generic_path();
                max_pool2d(&x, k, stride).unwrap()
            };
            assert_eq!(generic.dims(), fast.dims());
            let (fast, generic) = (fast.flatten_all().unwrap(), generic.flatten_all().unwrap());
            let (fast, generic) =
                (fast.to_vec1::<f32>().unwrap(), generic.to_vec1::<f32>().unwrap());
            assert_eq!(generic, fast, "{h}×{w} k {k} stride {stride}");
        }
    }

    #[test]
    fn the_same_size_pools_match_their_generic_paths() {
        for (h, w) in [(1, 1), (2, 3), (7, 5)] {
            let v: Vec<f32> = (0..2 * 3 * h * w).map(|i| (i as f32 * 0.7).sin() - 0.5).collect();
            let x = Tensor::from_vec(v, (2, 3, h, w), &Device::Cpu).unwrap();
            for pool in [avg_pool_3x3_exclude_pad, max_pool_3x3_same] {
                let fast = pool(&x).unwrap();
                let generic = {
                    let _generic = crate::device_path::force_generic_path();
                    pool(&x).unwrap()
                };
                assert_eq!(generic.dims(), fast.dims());
                let diff = (fast - generic).unwrap().abs().unwrap().max_all().unwrap();
                // The average divides once instead of scaling twice: float rounding only.
                assert!(diff.to_scalar::<f32>().unwrap() < 1e-6, "{h}×{w}");
            }
        }
    }

    #[test]
    fn an_input_smaller_than_the_window_is_an_error() {
        let x = Tensor::zeros((1, 1, 2, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(max_pool2d(&x, 3, 2).unwrap_err().to_string().contains("does not fit"));
    }
}
