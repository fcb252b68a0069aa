//! `nn.Conv2d` as a differentiable op on the shared CPU convolution (`sdpipe-conv`): forward
//! with the bias added in place, input and kernel gradients from the same im2col + `gemm`
//! tiles, the bias gradient the output gradient summed per channel.
//!
//! Why not candle's `conv2d`: its CPU forward gathers and scatters tiles element by element on
//! top of a one-thread NHWC transpose, and its backward takes the input gradient with
//! `conv_transpose2d` (a direct loop parallel over output channels only) and the kernel
//! gradient as a convolution whose kernel is the whole output gradient; at the UNet's and VAE's
//! shapes convolutions were 3–6× slower than PyTorch's. Other devices (and the CPU under
//! [`crate::device_path::force_generic_path`]) and dtypes keep candle's op and its backward.

use candle_core::{DType, Result, Tensor, WithDType};
use sdpipe_conv::{Activation, ConvShape};

use crate::device_path::use_cpu_kernels;
use crate::ops::attach3;
use sdpipe_stages::host_slice::with_slice;

/// `conv(x, weight) + bias`: `x` `[B, c_in, H, W]`, `weight` `[c_out, c_in, kh, kw]`, `bias`
/// `[c_out]`, the same zero `padding` on every side.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let fast = use_cpu_kernels(x)
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && weight.dtype() == x.dtype()
        && bias.dtype() == x.dtype();
    if !fast {
        let y = x.conv2d(weight, padding, stride, 1, 1)?;
        return y.broadcast_add(&bias.reshape((1, bias.dim(0)?, 1, 1))?);
    }
    let (c_out, c_in, kh, kw) = weight.dims4()?;
    let shape = ConvShape::new([c_out, c_in, kh, kw], stride, (padding, padding))
        .map_err(candle_core::Error::wrap)?;
    let value = match x.dtype() {
        DType::F32 => forward::<f32>(&shape, x, weight, bias)?,
        _ => forward::<f64>(&shape, x, weight, bias)?,
    };
    attach3(
        x,
        weight,
        bias,
        value,
        "sdpipe-conv2d",
        Box::new(move |inputs, _, grad, wanted| {
            let (x, weight) = (inputs[0], inputs[1]);
            let want = Wanted { x: wanted[0], weight: wanted[1], bias: wanted[2] };
            match x.dtype() {
                DType::F32 => backward::<f32>(&shape, x, weight, grad, want),
                _ => backward::<f64>(&shape, x, weight, grad, want),
            }
        }),
    )
}

fn forward<T: WithDType + sdpipe_conv::Element>(
    shape: &ConvShape,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
) -> Result<Tensor> {
    let (b, c_in, h, w) = x.dims4()?;
    if c_in != shape.c_in {
        candle_core::bail!("conv expects {} input channels, got {c_in}", shape.c_in)
    }
    let (out_h, out_w) = shape.output_size(h, w).map_err(candle_core::Error::wrap)?;
    let out = with_slice::<T, _>(x, |x| {
        with_slice::<T, _>(weight, |weight| {
            with_slice::<T, _>(bias, |bias| {
                shape.forward(b, (h, w), x, weight, Some(bias), Activation::Identity)
            })
        })
    })???
    .map_err(candle_core::Error::wrap)?;
    Tensor::from_vec(out, (b, shape.c_out, out_h, out_w), x.device())
}

/// Which of a convolution's inputs need a gradient (see `ops::Backward`).
#[derive(Clone, Copy)]
struct Wanted {
    x: bool,
    weight: bool,
    bias: bool,
}

/// The gradients of the input, the kernel and the bias, each only where `want` asks for it.
fn backward<T: WithDType + sdpipe_conv::Element>(
    shape: &ConvShape,
    x: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
    want: Wanted,
) -> Result<Vec<Option<Tensor>>> {
    let (b, _, h, w) = x.dims4()?;
    let grad_x = if want.x {
        let grad_x = with_slice::<T, _>(grad, |grad| {
            with_slice::<T, _>(weight, |weight| shape.backward_input(b, (h, w), grad, weight))
        })??
        .map_err(candle_core::Error::wrap)?;
        Some(Tensor::from_vec(grad_x, x.dims(), x.device())?)
    } else {
        None
    };
    let grad_w = if want.weight {
        let grad_w = with_slice::<T, _>(x, |x| {
            with_slice::<T, _>(grad, |grad| shape.backward_weight(b, (h, w), x, grad))
        })??
        .map_err(candle_core::Error::wrap)?;
        Some(Tensor::from_vec(grad_w, weight.dims(), x.device())?)
    } else {
        None
    };
    let grad_b = if want.bias {
        let grad_b = with_slice::<T, _>(grad, |grad| shape.backward_bias(b, (h, w), grad))?
            .map_err(candle_core::Error::wrap)?;
        Some(Tensor::from_vec(grad_b, shape.c_out, x.device())?)
    } else {
        None
    };
    Ok(vec![grad_x, grad_w, grad_b])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::{assert_paths_agree, check_gradients, max_abs_diff, sample};
    use candle_core::Var;

    #[test]
    fn a_frozen_kernel_and_bias_get_no_gradient_and_the_input_the_same_one() {
        let (x, w, b) = (sample(&[1, 2, 5, 4], 1), sample(&[3, 2, 3, 3], 2), sample(&[3], 3));
        let loss = |w: &Tensor, b: &Tensor, x: &Var| {
            conv2d(x.as_tensor(), w, b, 1, 1).unwrap().sqr().unwrap().sum_all().unwrap()
        };
        let x_var = Var::from_tensor(&x).unwrap();
        let (w_var, b_var) = (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap());
        let all = loss(w_var.as_tensor(), b_var.as_tensor(), &x_var).backward().unwrap();
        let frozen = loss(&w, &b, &x_var).backward().unwrap();
        assert!(frozen.get(&w).is_none() && frozen.get(&b).is_none());
        let (gx_all, gx_frozen) = (all.get(&x_var).unwrap(), frozen.get(&x_var).unwrap());
        assert_eq!(max_abs_diff(gx_all, gx_frozen), 0.0);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (x, w, b) = (sample(&[2, 3, 5, 4], 1), sample(&[2, 3, 3, 3], 2), sample(&[2], 3));
        check_gradients(&[x, w, b], |t| conv2d(&t[0], &t[1], &t[2], 1, 1));
        let (x, w, b) = (sample(&[1, 2, 3, 3], 4), sample(&[3, 2, 1, 1], 5), sample(&[3], 6));
        check_gradients(&[x, w, b], |t| conv2d(&t[0], &t[1], &t[2], 1, 0));
        let (x, w, b) = (sample(&[1, 2, 7, 6], 7), sample(&[2, 2, 3, 3], 8), sample(&[2], 9));
        check_gradients(&[x, w, b], |t| conv2d(&t[0], &t[1], &t[2], 2, 1));
    }

    #[test]
    fn forward_equals_candles_conv2d_plus_bias() {
        let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let (x, w, b) =
            (f32(sample(&[2, 3, 6, 6], 10)), f32(sample(&[4, 3, 3, 3], 11)), f32(sample(&[4], 12)));
        for stride in [1, 2] {
            let tracked = Var::from_tensor(&x).unwrap();
            let ours = conv2d(tracked.as_tensor(), &w, &b, stride, 1).unwrap();
            let want = x
                .conv2d(&w, 1, stride, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap())
                .unwrap();
            assert!(max_abs_diff(&ours, &want) < 1e-5, "stride {stride}");
        }
    }

    #[test]
    fn the_generic_path_matches_the_cpu_kernels_forward_and_gradients() {
        let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        // 3×3 padded, 1×1, and strided on odd sides (the downsamplers' case).
        for (x, w, stride, padding) in [
            ([2, 3, 6, 5], [4, 3, 3, 3], 1, 1),
            ([1, 5, 4, 4], [3, 5, 1, 1], 1, 0),
            ([2, 4, 7, 9], [4, 4, 3, 3], 2, 1),
            ([1, 2, 8, 8], [3, 2, 3, 3], 2, 0),
        ] {
            let inputs = [f32(sample(&x, 51)), f32(sample(&w, 52)), f32(sample(&[w[0]], 53))];
            assert_paths_agree(&inputs, 1e-5, |t| conv2d(&t[0], &t[1], &t[2], stride, padding));
        }
    }
}
