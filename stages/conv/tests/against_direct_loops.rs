//! The convolution and both its gradients against their definitions written as direct loops,
//! in f64, on the shapes SD's UNet and VAE and the metric trunks use, at several thread counts.

use sdpipe_conv::{Activation, ConvShape};

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

    fn check(&self) {
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

        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let got = shape
                    .forward(self.batch, self.hw, &x, &k, Some(&bias), Activation::Identity)
                    .unwrap();
                assert_close("forward", &got, &out);
                let relu = shape
                    .forward(self.batch, self.hw, &x, &k, Some(&bias), Activation::Relu)
                    .unwrap();
                let want: Vec<f64> = out.iter().map(|v| v.max(0.0)).collect();
                assert_close("forward + relu", &relu, &want);
                let got = shape.backward_input(self.batch, self.hw, &grad, &k).unwrap();
                assert_close("input gradient", &got, &grad_x);
                let got = shape.backward_weight(self.batch, self.hw, &x, &grad).unwrap();
                assert_close("kernel gradient", &got, &grad_w);
                let got = shape.backward_bias(self.batch, self.hw, &grad).unwrap();
                assert_close("bias gradient", &got, &grad_b);
            });
        }
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
