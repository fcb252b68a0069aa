//! The convolution and both its gradients against their definitions written as direct loops,
//! in f64, on the shapes SD's UNet and VAE and the metric trunks use, at several thread counts.

use sdpipe_conv::{Activation, Algorithm, ConvShape};

/// Deterministic values spread over about [-1, 1].
fn values(n: usize, seed: f64) -> Vec<f64> {
    (0..n).map(|i| ((i as f64 + seed) * 0.731).sin()).collect()
}

struct Case {
    batch: usize,
    c_in: usize,
    c_out: usize,
    hw: (usize, usize),
    kernel: (usize, usize),
    stride: usize,
    padding: (usize, usize),
}

impl Case {
    fn shape(&self) -> ConvShape {
        let (kh, kw) = self.kernel;
        ConvShape::new([self.c_out, self.c_in, kh, kw], self.stride, self.padding).unwrap()
    }

    /// Calls `f(input pixel index, output pixel index, weight index)` for every tap that reads
    /// an input pixel (taps in the padding read zeros and contribute nothing).
    fn for_each_tap(&self, mut f: impl FnMut(usize, usize, usize)) {
        let (h, w) = self.hw;
        let (oh, ow) = self.shape().output_size(h, w).unwrap();
        let (kh, kw) = self.kernel;
        for b in 0..self.batch {
            for co in 0..self.c_out {
                for oy in 0..oh {
                    for ox in 0..ow {
                        for ci in 0..self.c_in {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy =
                                        (oy * self.stride + ky) as isize - self.padding.0 as isize;
                                    let ix =
                                        (ox * self.stride + kx) as isize - self.padding.1 as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let input =
                                        ((b * self.c_in + ci) * h + iy as usize) * w + ix as usize;
                                    let output = ((b * self.c_out + co) * oh + oy) * ow + ox;
                                    let weight = ((co * self.c_in + ci) * kh + ky) * kw + kx;
                                    f(input, output, weight);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The inputs (image, kernel, bias, output gradient) and, from the direct loops, the
    /// output and the three gradients.
    #[allow(clippy::type_complexity)]
    fn expected(&self) -> ([Vec<f64>; 4], [Vec<f64>; 4]) {
        let shape = self.shape();
        let (h, w) = self.hw;
        let (oh, ow) = shape.output_size(h, w).unwrap();
        let x = values(self.batch * self.c_in * h * w, 0.0);
        let k = values(self.c_out * self.c_in * self.kernel.0 * self.kernel.1, 1.0);
        let bias = values(self.c_out, 2.0);
        let grad = values(self.batch * self.c_out * oh * ow, 3.0);

        let mut out = vec![0.0; grad.len()];
        for (i, o) in out.iter_mut().enumerate() {
            *o = bias[(i / (oh * ow)) % self.c_out];
        }
        let (mut grad_x, mut grad_w) = (vec![0.0; x.len()], vec![0.0; k.len()]);
        let mut grad_b = vec![0.0; self.c_out];
        for (o, g) in grad.iter().enumerate() {
            grad_b[(o / (oh * ow)) % self.c_out] += g;
        }
        self.for_each_tap(|i, o, wi| {
            out[o] += x[i] * k[wi];
            grad_x[i] += grad[o] * k[wi];
            grad_w[wi] += grad[o] * x[i];
        });
        ([x, k, bias, grad], [out, grad_x, grad_w, grad_b])
    }

    /// The forward by `algorithm` (plain and through ReLU) and, by what `forward` picks, the
    /// three gradients, against the direct loops, at 1 and 3 threads.
    fn check_with(&self, algorithm: Algorithm) {
        let shape = self.shape();
        let ([x, k, bias, grad], [out, grad_x, grad_w, grad_b]) = self.expected();
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let forward = |activation| {
                    shape
                        .forward_with(
                            algorithm,
                            self.batch,
                            self.hw,
                            &x,
                            &k,
                            Some(&bias),
                            activation,
                        )
                        .unwrap()
                };
                assert_close("forward", &forward(Activation::Identity), &out);
                let want: Vec<f64> = out.iter().map(|v| v.max(0.0)).collect();
                assert_close("forward + relu", &forward(Activation::Relu), &want);
                let got = shape.backward_input(self.batch, self.hw, &grad, &k).unwrap();
                assert_close("input gradient", &got, &grad_x);
                let got = shape.backward_weight(self.batch, self.hw, &x, &grad).unwrap();
                assert_close("kernel gradient", &got, &grad_w);
                let got = shape.backward_bias(self.batch, self.hw, &grad).unwrap();
                assert_close("bias gradient", &got, &grad_b);
            });
        }
    }

    fn check(&self) {
        let (h, w) = self.hw;
        self.check_with(self.shape().algorithm(h, w).unwrap());
    }
}

fn assert_close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-12 * (1.0 + w.abs()) * 100.0, "{what}[{i}]: {g} vs {w}");
    }
}

#[test]
fn a_padded_3x3_convolution_and_its_gradients_match_their_definitions() {
    Case { batch: 2, c_in: 3, c_out: 4, hw: (6, 5), kernel: (3, 3), stride: 1, padding: (1, 1) }
        .check();
}

#[test]
fn a_strided_downsampling_convolution_and_its_gradients_match() {
    // The UNet's Downsample2D (3×3, stride 2, padding 1) and the VAE's (padding 0 after one
    // extra zero row and column: an odd input here).
    Case { batch: 2, c_in: 3, c_out: 2, hw: (8, 8), kernel: (3, 3), stride: 2, padding: (1, 1) }
        .check();
    Case { batch: 1, c_in: 2, c_out: 3, hw: (9, 9), kernel: (3, 3), stride: 2, padding: (0, 0) }
        .check();
}

#[test]
fn a_pointwise_convolution_and_its_gradients_match() {
    Case { batch: 3, c_in: 5, c_out: 2, hw: (4, 3), kernel: (1, 1), stride: 1, padding: (0, 0) }
        .check();
}

#[test]
fn asymmetric_kernels_and_large_strides_match() {
    Case { batch: 1, c_in: 2, c_out: 2, hw: (7, 6), kernel: (1, 5), stride: 1, padding: (0, 2) }
        .check();
    Case {
        batch: 2,
        c_in: 3,
        c_out: 2,
        hw: (23, 19),
        kernel: (11, 11),
        stride: 4,
        padding: (2, 2),
    }
    .check();
}

#[test]
fn images_larger_than_one_tile_match() {
    // Depth 3·3·3 = 27 and 400 output columns: 10 800 unfolded elements a row, so the budget
    // splits each image into several tiles (and the kernel gradient into groups of them).
    Case { batch: 2, c_in: 3, c_out: 2, hw: (30, 400), kernel: (3, 3), stride: 1, padding: (1, 1) }
        .check();
    Case { batch: 1, c_in: 3, c_out: 2, hw: (60, 200), kernel: (3, 3), stride: 2, padding: (1, 1) }
        .check();
}

#[test]
fn f32_results_equal_f64_results_within_rounding() {
    let shape = ConvShape::new([4, 3, 3, 3], 1, (1, 1)).unwrap();
    let x = values(2 * 3 * 5 * 5, 0.0);
    let k = values(4 * 3 * 9, 1.0);
    let want = shape.forward(2, (5, 5), &x, &k, None, Activation::Identity).unwrap();
    let f32s = |v: &[f64]| v.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    let got = shape.forward(2, (5, 5), &f32s(&x), &f32s(&k), None, Activation::Identity).unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
    }
}

#[test]
fn wrong_lengths_and_kernels_larger_than_the_padded_input_are_errors() {
    let shape = ConvShape::new([2, 3, 3, 3], 1, (0, 0)).unwrap();
    let err = shape.forward(1, (2, 2), &[0.0f32; 12], &[0.0; 54], None, Activation::Identity);
    assert!(err.unwrap_err().to_string().contains("smaller than its 3×3 kernel"));
    let err = shape.forward(1, (4, 4), &[0.0f32; 10], &[0.0; 54], None, Activation::Identity);
    assert!(err.unwrap_err().to_string().contains("input has 10 elements, expected 48"));
    assert!(ConvShape::new([2, 3, 3, 3], 0, (0, 0)).is_err());
}

#[test]
fn winograd_computes_padded_3x3_convolutions_with_partial_tiles() {
    // Odd output sides leave partial tiles on the bottom and right; padding 0 and 1 both occur
    // (the VAE's and the UNet's convolutions).
    Case { batch: 2, c_in: 5, c_out: 7, hw: (7, 9), kernel: (3, 3), stride: 1, padding: (1, 1) }
        .check_with(Algorithm::Winograd);
    Case { batch: 1, c_in: 3, c_out: 2, hw: (6, 5), kernel: (3, 3), stride: 1, padding: (0, 0) }
        .check_with(Algorithm::Winograd);
}

#[test]
fn winograd_computes_images_larger_than_one_block() {
    // 16 · 256 channels · 128 tiles a tile row: the block budget (2^20 values) holds two tile
    // rows, so the three of a 5-row image make a full block and a partial one.
    Case {
        batch: 1,
        c_in: 256,
        c_out: 4,
        hw: (5, 256),
        kernel: (3, 3),
        stride: 1,
        padding: (1, 1),
    }
    .check_with(Algorithm::Winograd);
}

#[test]
fn winograd_f32_results_equal_f64_results_within_rounding() {
    let shape = ConvShape::new([32, 32, 3, 3], 1, (1, 1)).unwrap();
    let x = values(2 * 32 * 8 * 8, 0.0);
    let k = values(32 * 32 * 9, 1.0);
    let forward = |x: &[f64], k: &[f64]| {
        shape
            .forward_with(Algorithm::Winograd, 2, (8, 8), x, k, None, Activation::Identity)
            .unwrap()
    };
    let want = forward(&x, &k);
    let f32s = |v: &[f64]| v.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    let got = shape
        .forward_with(
            Algorithm::Winograd,
            2,
            (8, 8),
            &f32s(&x),
            &f32s(&k),
            None,
            Activation::Identity,
        )
        .unwrap();
    // Each output sums 288 products of values in [−1, 1]: f32's rounding of such a sum is a
    // few 1e-6.
    for (g, w) in got.iter().zip(&want) {
        assert!((*g as f64 - w).abs() < 2e-5, "{g} vs {w}");
    }
}

#[test]
fn forward_picks_winograd_for_wide_3x3_convolutions_on_large_maps_only() {
    let conv = |c_in, c_out, kernel, stride| {
        ConvShape::new([c_out, c_in, kernel, kernel], stride, (kernel / 2, kernel / 2)).unwrap()
    };
    assert_eq!(conv(128, 128, 3, 1).algorithm(32, 32), Ok(Algorithm::Winograd));
    assert_eq!(conv(256, 128, 3, 1).algorithm(16, 16), Ok(Algorithm::Winograd));
    assert_eq!(conv(64, 64, 3, 1).algorithm(64, 64), Ok(Algorithm::Winograd));
    // Too few tiles, too few channels, or not a 3×3 kernel at stride 1.
    assert_eq!(conv(256, 256, 3, 1).algorithm(8, 8), Ok(Algorithm::Unfolded));
    assert_eq!(conv(64, 64, 3, 1).algorithm(32, 32), Ok(Algorithm::Unfolded));
    assert_eq!(conv(32, 128, 3, 1).algorithm(64, 64), Ok(Algorithm::Unfolded));
    assert_eq!(conv(128, 128, 3, 2).algorithm(64, 64), Ok(Algorithm::Unfolded));
    assert_eq!(conv(128, 128, 1, 1).algorithm(64, 64), Ok(Algorithm::Unfolded));
}

#[test]
fn winograd_refuses_kernels_it_cannot_compute() {
    let shape = ConvShape::new([2, 2, 3, 3], 2, (1, 1)).unwrap();
    let err = shape
        .forward_with(
            Algorithm::Winograd,
            1,
            (4, 4),
            &[0.0f32; 32],
            &[0.0; 36],
            None,
            Activation::Identity,
        )
        .unwrap_err();
    assert_eq!(err.to_string(), "the Winograd algorithm cannot compute a 3×3 conv at stride 2");
}
