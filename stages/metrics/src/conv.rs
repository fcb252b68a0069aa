//! Convolution + bias + ReLU for the metric networks: the layer that makes up nearly all of the
//! AlexNet, VGG and Inception trunks' time, on the shared CPU convolution of `sdpipe-conv`
//! (im2col tiles + one `gemm` each, ReLU applied while the rows are in cache).

use candle_core::{DType, Device, Storage, Tensor};
use sdpipe_conv::{Activation, ConvShape};

/// A 2-D convolution with bias, followed by ReLU: `relu(conv(x, weight) + bias)`.
#[derive(Debug, Clone)]
pub struct ConvRelu {
    /// `[c_out, c_in·kh·kw]`, PyTorch's `[c_out, c_in, kh, kw]` flattened.
    weight: Vec<f32>,
    bias: Vec<f32>,
    shape: ConvShape,
}

impl ConvRelu {
    /// `weight` `[c_out, c_in, kh, kw]` and `bias` `[c_out]`, both f32.
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
            weight: weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
            bias: bias.to_dtype(DType::F32)?.to_vec1()?,
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
        let out = with_f32_slice(x, |input| {
            self.shape.forward(b, (h, w), input, &self.weight, Some(&self.bias), Activation::Relu)
        })?
        .map_err(candle_core::Error::wrap)?;
        Tensor::from_vec(out, (b, self.shape.c_out, out_h, out_w), &Device::Cpu)
    }
}

/// Runs `f` on the elements of an f32 CPU tensor, in row-major order (copied only if the
/// tensor is not contiguous).
pub(crate) fn with_f32_slice<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    if x.dtype() != DType::F32 {
        candle_core::bail!("expected an f32 tensor, got {:?}", x.dtype())
    }
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { candle_core::bail!("expected a CPU tensor") };
    let data = cpu.as_slice::<f32>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("tensor not contiguous".into()))?;
    Ok(f(&data[start..end]))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_wrong_channel_count_is_an_error() {
        let conv = ConvRelu::new(&tensor(&[2, 3, 3, 3], 0.0), &tensor(&[2], 0.0), 1, (1, 1));
        let err = conv.unwrap().forward(&tensor(&[1, 4, 5, 5], 0.0)).unwrap_err();
        assert!(err.to_string().contains("3 input channels"), "{err}");
    }
}
