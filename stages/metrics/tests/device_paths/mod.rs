//! The whole networks on the generic path (candle's ops, what runs on a GPU) against the CPU
//! kernels, on every device of `test_devices()`: the CPU with the generic path forced, and CUDA
//! device 0 where candle was built with CUDA and a GPU opens.
//!
//! Tolerances, and why: both paths compute the same f32 products and differ only in the order
//! of the sums (candle's im2col + gemm against `sdpipe-conv`'s tiles), ~1e-7 relative per layer.
//! - Inception features: |Δ| ≤ 1e-4·max|f|, as for parity with pytorch-fid (48 layers).
//! - LPIPS: |Δ| ≤ 1e-4·d per pair (5–13 layers; the heads sum in f64 on both paths).

use candle_core::{Device, Tensor};
use sdpipe_metrics::device_path::{force_generic_path, test_devices};
use sdpipe_metrics::inception::{self, FidInception};
use sdpipe_metrics::lpips::{lin_specs, trunk_specs, Lpips, Net};
use sdpipe_metrics::weights::Weights;

/// `[n, 3, side, side]` deterministic pseudo-random values in [lo, hi].
fn images(n: usize, side: usize, seed: f32, (lo, hi): (f32, f32)) -> Tensor {
    let v: Vec<f32> = (0..n * 3 * side * side)
        .map(|i| {
            let u = ((i as f32 * 12.9898 + seed * 78.233).sin() * 43_758.547).fract().abs();
            lo + (hi - lo) * u
        })
        .collect();
    Tensor::from_vec(v, (n, 3, side, side), &Device::Cpu).unwrap()
}

/// Runs `f` with the generic path forced on this thread (on a GPU it is the only path anyway).
fn on_generic_path<T>(f: impl FnOnce() -> T) -> T {
    let _generic = force_generic_path();
    f()
}

#[test]
fn inception_features_on_the_generic_path_match_the_cpu_kernels() {
    let weights = Weights::random(&inception::tensor_specs(), 0);
    // 87×87: small, above the 75×75 the stride-2 layers need, and odd-sized on every layer.
    let x = images(2, 87, 1.0, (0.0, 1.0));
    let fast = FidInception::new(&weights).unwrap().features(&x).unwrap();
    let fast: Vec<Vec<f32>> = fast.to_vec2().unwrap();
    let scale = fast.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "features all zero: the comparison would prove nothing");
    for device in test_devices() {
        let model = FidInception::on_device(&weights, &device).unwrap();
        let generic = on_generic_path(|| model.features(&x).unwrap());
        assert!(generic.device().same_device(&device), "{device:?}");
        let generic: Vec<Vec<f32>> = generic.to_vec2().unwrap();
        assert_eq!(generic.len(), fast.len());
        for (i, (g, f)) in generic.iter().zip(&fast).enumerate() {
            let diff = g.iter().zip(f).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            eprintln!("inception {device:?} image {i}: |Δ| {diff:e}, max|f| {scale}");
            assert!(diff <= 1e-4 * scale, "{device:?} image {i}: |Δ| {diff} vs max|f| {scale}");
        }
    }
}

#[test]
fn lpips_distances_on_the_generic_path_match_the_cpu_kernels() {
    let (x0, x1) = (images(3, 64, 1.0, (-1.0, 1.0)), images(3, 64, 2.0, (-1.0, 1.0)));
    for net in [Net::Alex, Net::Vgg16] {
        let weights =
            Weights::random(&trunk_specs(net), 0).merged(Weights::random(&lin_specs(net), 0));
        let fast: Vec<f32> =
            Lpips::new(net, &weights).unwrap().distance(&x0, &x1).unwrap().to_vec1().unwrap();
        for device in test_devices() {
            let model = Lpips::on_device(net, &weights, &device).unwrap();
            let generic = on_generic_path(|| model.distance(&x0, &x1).unwrap());
            assert!(generic.device().same_device(&device), "{device:?}");
            let generic: Vec<f32> = generic.to_vec1().unwrap();
            assert_eq!(generic.len(), fast.len());
            for (i, (g, f)) in generic.iter().zip(&fast).enumerate() {
                assert!(*f > 0.0, "{net:?} pair {i}: distance {f}");
                let rel = (g - f).abs() / f;
                eprintln!("lpips {net:?} {device:?} pair {i}: {g} vs {f} (rel {rel:e})");
                assert!(rel <= 1e-4, "{net:?} {device:?} pair {i}: {g} vs {f} (rel {rel:e})");
            }
        }
    }
}
