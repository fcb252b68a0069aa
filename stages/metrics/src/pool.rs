//! Max pooling without padding (PyTorch's `MaxPool2d(k, stride)`, floor mode). On the CPU in
//! f32, with the `B·C` planes split across the current rayon pool: candle's pooling runs on one
//! thread, which left the other threads idle between the convolutions. Elsewhere (or with the
//! generic path forced, see [`crate::device_path`]) candle's own max pool, which is the same
//! function.

use candle_core::Tensor;
use rayon::iter::{IndexedParallelIterator, ParallelIterator};
use rayon::slice::{ParallelSlice, ParallelSliceMut};

use crate::conv::with_f32_slice;
use crate::device_path::use_cpu_kernels;

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
    with_f32_slice(x, |input| {
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
    fn an_input_smaller_than_the_window_is_an_error() {
        let x = Tensor::zeros((1, 1, 2, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(max_pool2d(&x, 3, 2).unwrap_err().to_string().contains("does not fit"));
    }
}
