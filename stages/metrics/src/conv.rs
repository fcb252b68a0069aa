//! Convolution + bias + ReLU for the metric networks: the layer that makes up nearly all of the
//! AlexNet, VGG and Inception trunks' time. On the CPU it runs the shared convolution of
//! `sdpipe-conv` (im2col tiles + one `gemm` each, ReLU applied while the rows are in cache); on
//! other devices (or with the generic path forced, see [`crate::device_path`]) candle's
//! `conv2d`, which has kernels there.

use candle_core::{DType, Tensor};
use sdpipe_conv::{Activation, ConvShape};

use crate::device_path::use_cpu_kernels;
use sdpipe_stages::host_slice::with_slice;

/// A 2-D convolution with bias, followed by ReLU: `relu(conv(x, weight) + bias)`, on the device
/// its weights are on.
#[derive(Debug, Clone)]
pub struct ConvRelu {
    /// `[c_out, c_in, kh, kw]` f32, contiguous: the CPU path reads it as PyTorch's layout
    /// flattened, `[c_out, c_in·kh·kw]`.
    weight: Tensor,
    /// `[c_out]` f32.
    bias: Tensor,
    shape: ConvShape,
}

impl ConvRelu {
    /// `weight` `[c_out, c_in, kh, kw]` and `bias` `[c_out]` (converted to f32); the layer runs
    /// on `weight`'s device.
    pub fn new(
        weight: &Tensor,
        bias: &Tensor,
        stride: usize,
        padding: (usize, usize),
    ) -> candle_core::Result<ConvRelu> {
        let (c_out, c_in, kh, kw) = weight.dims4()?;
        if bias.dims() != [c_out] {
            candle_core::bail!("conv bias has shape {:?}, expected [{c_out}]", bias.dims())
        }
        let shape = ConvShape::new([c_out, c_in, kh, kw], stride, padding)
            .map_err(candle_core::Error::wrap)?;
        Ok(ConvRelu {
            weight: weight.to_dtype(DType::F32)?.contiguous()?,
            bias: bias.to_dtype(DType::F32)?.to_device(weight.device())?.contiguous()?,
            shape,
        })
    }

    /// `[B, c_in, H, W]` f32 → `[B, c_out, H', W']`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c_in, h, w) = x.dims4()?;
        if c_in != self.shape.c_in {
            candle_core::bail!("conv expects {} input channels, got {c_in}", self.shape.c_in)
        }
        let (out_h, out_w) = self.shape.output_size(h, w).map_err(candle_core::Error::wrap)?;
        if !use_cpu_kernels(x) {
            return self.forward_generic(x);
        }
        // The weights are borrowed in place (an error if they are not on the CPU too).
        let out = with_slice::<f32, _>(&self.weight, |weight| {
            with_slice::<f32, _>(&self.bias, |bias| {
                with_slice::<f32, _>(x, |input| {
                    self.shape.forward(b, (h, w), input, weight, Some(bias), Activation::Relu)
                })
            })
        })???
        .map_err(candle_core::Error::wrap)?;
        Tensor::from_vec(out, (b, self.shape.c_out, out_h, out_w), x.device())
    }

    /// The same layer from candle's ops, for any device.
    fn forward_generic(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (ph, pw) = self.shape.padding;
        // candle pads both spatial dimensions alike: unequal padding (Inception's 1×7 and 7×1
        // kernels) is added as zeros first.
        let y = if ph == pw {
            x.conv2d(&self.weight, ph, self.shape.stride, 1, 1)?
        } else {
            let x = x.pad_with_zeros(2, ph, ph)?.pad_with_zeros(3, pw, pw)?;
            x.conv2d(&self.weight, 0, self.shape.stride, 1, 1)?
        };
        y.broadcast_add(&self.bias.reshape((1, self.shape.c_out, 1, 1))?)?.relu()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn tensor(dims: &[usize], seed: f32) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|i| ((i as f32 + seed) * 0.71).sin()).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    /// The reference: candle's conv2d (symmetric padding) + bias + ReLU.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize, pad: (usize, usize)) -> Tensor {
        let x = x.pad_with_zeros(2, pad.0, pad.0).unwrap().pad_with_zeros(3, pad.1, pad.1).unwrap();
        let c = b.dim(0).unwrap();
        x.conv2d(w, 0, stride, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
            .relu()
            .unwrap()
    }

    fn assert_matches_candle(x: &[usize], w: &[usize], stride: usize, pad: (usize, usize)) {
        let (x, w, b) = (tensor(x, 0.0), tensor(w, 1.0), tensor(&w[..1], 2.0));
        let expected = reference(&x, &w, &b, stride, pad);
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let conv = ConvRelu::new(&w, &b, stride, pad).unwrap();
            let got = pool.install(|| conv.forward(&x)).unwrap();
            assert_eq!(got.dims(), expected.dims());
            // The same f32 sums of `depth` terms (each |x·w| ≤ 1) in another order: rounding
            // differences grow with the number of terms, a wrong tap is off by O(1).
            let depth = (w.dims()[1] * w.dims()[2] * w.dims()[3]) as f32;
            let diff = (got - &expected).unwrap().abs().unwrap().max_all().unwrap();
            let diff = diff.to_scalar::<f32>().unwrap();
            assert!(diff <= 1e-6 * depth, "{threads} threads: {diff} over {depth} terms");
        }
    }

    #[test]
    fn a_strided_padded_convolution_matches_candle() {
        assert_matches_candle(&[2, 3, 23, 19], &[5, 3, 11, 11], 4, (2, 2));
    }

    #[test]
    fn a_stride_one_convolution_matches_candle() {
        assert_matches_candle(&[4, 4, 9, 10], &[6, 4, 5, 5], 1, (2, 2));
    }

    #[test]
    fn asymmetric_padding_matches_candle() {
        assert_matches_candle(&[1, 3, 8, 7], &[2, 3, 1, 7], 1, (0, 3));
        assert_matches_candle(&[1, 3, 8, 7], &[2, 3, 7, 1], 1, (3, 0));
    }

    #[test]
    fn a_pointwise_convolution_matches_candle() {
        assert_matches_candle(&[3, 8, 5, 6], &[4, 8, 1, 1], 1, (0, 0));
        assert_matches_candle(&[3, 8, 5, 6], &[4, 8, 1, 1], 2, (0, 0));
    }

    /// The generic path (candle's conv2d, as on a GPU) against the CPU kernels on one layer.
    fn assert_generic_matches_cpu(x: &[usize], w: &[usize], stride: usize, pad: (usize, usize)) {
        let (x, w, b) = (tensor(x, 0.0), tensor(w, 1.0), tensor(&w[..1], 2.0));
        let conv = ConvRelu::new(&w, &b, stride, pad).unwrap();
        let fast = conv.forward(&x).unwrap();
        let generic = {
            let _generic = crate::device_path::force_generic_path();
            conv.forward(&x).unwrap()
        };
        assert_eq!(generic.dims(), fast.dims());
        // As above: the same sums in another order, each term |x·w| ≤ 1.
        let depth = (w.dims()[1] * w.dims()[2] * w.dims()[3]) as f32;
        let diff = (generic - &fast).unwrap().abs().unwrap().max_all().unwrap();
        let diff = diff.to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-6 * depth, "{:?} {pad:?}: {diff} over {depth} terms", w.dims());
    }

    /// On the layer shapes the networks use: strided, unequal padding, pointwise.
    #[test]
    fn the_generic_path_matches_the_cpu_kernels() {
        assert_generic_matches_cpu(&[2, 3, 23, 19], &[5, 3, 11, 11], 4, (2, 2));
        assert_generic_matches_cpu(&[2, 4, 9, 10], &[6, 4, 3, 3], 2, (0, 0));
        assert_generic_matches_cpu(&[1, 3, 8, 7], &[2, 3, 1, 7], 1, (0, 3));
        assert_generic_matches_cpu(&[1, 3, 8, 7], &[2, 3, 7, 1], 1, (3, 0));
        assert_generic_matches_cpu(&[3, 8, 5, 6], &[4, 8, 1, 1], 1, (0, 0));
    }

    #[test]
    fn a_wrong_channel_count_is_an_error() {
        let conv = ConvRelu::new(&tensor(&[2, 3, 3, 3], 0.0), &tensor(&[2], 0.0), 1, (1, 1));
        let err = conv.unwrap().forward(&tensor(&[1, 4, 5, 5], 0.0)).unwrap_err();
        assert!(err.to_string().contains("3 input channels"), "{err}");
    }
}
