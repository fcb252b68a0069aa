//! `nn.Linear` on 2-D inputs as a differentiable op: `x Wᵀ + b`, with a CPU forward that makes
//! the same `gemm` call as candle's matmul but into an output buffer that is not zeroed first,
//! and adds the bias in place.
//!
//! Why: candle's CPU matmul allocates its output with `vec![0; m·n]` and the bias then goes
//! through `broadcast_add`, a second full-size buffer. At the UNet's feed-forward shape (2048
//! tokens, 128 → 1024 features, no bias; 2 threads, Intel Xeon) candle's matmul took 2.51 ms
//! and this op 1.97 ms (`bench_sample ops`): the zeroing and its page faults were a quarter of
//! the product. The product here is candle's call
//! exactly (strides, `alpha`/`beta`, thread count), and the bias is added to each element as
//! `broadcast_add` adds it, so values and gradients are the same bits as the composition's.
//!
//! The backward is candle's matmul and broadcast backward, written out so that only the wanted
//! gradients are computed (a frozen LoRA base weight skips `xᵀ g`, the product as large as the
//! forward). Other devices and dtypes (and the CPU under
//! [`crate::device_path::force_generic_path`]) keep candle's matmul and `broadcast_add`.

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use crate::device_path::use_cpu_kernels;
use crate::ops::{self, attach3};
use sdpipe_stages::host_slice::with_slice;

/// `x Wᵀ (+ bias)`: `x` `[rows, inputs]`, `weight` `[outputs, inputs]`, `bias` `[outputs]`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let fast = use_cpu_kernels(x)
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && bias.is_none_or(|b| b.dtype() == DType::F32);
    if !fast {
        let y = if weight.track_op() {
            x.matmul(&weight.t()?)?
        } else {
            ops::matmul_frozen_weight(x, weight)?
        };
        return match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    let value = forward(&x, &weight, bias)?;
    // attach3 takes three inputs; without a bias the weight stands in for the third, and its
    // slot's gradient is never asked for.
    let third = bias.unwrap_or(&weight).clone();
    let has_bias = bias.is_some();
    attach3(
        &x,
        &weight,
        &third,
        value,
        "sdpipe-linear",
        Box::new(move |inputs, _, grad, wanted| {
            let (x, weight) = (inputs[0], inputs[1]);
            // What candle's backward computes for `x.matmul(w.t())` and `broadcast_add`.
            let dx = if wanted[0] { Some(grad.matmul(weight)?) } else { None };
            let dw = if wanted[1] { Some(x.t()?.matmul(grad)?.t()?) } else { None };
            let db =
                if has_bias && wanted[2] { Some(grad.sum_keepdim(0)?.squeeze(0)?) } else { None };
            Ok(vec![dx, dw, db])
        }),
    )
}

/// The CPU forward: candle's gemm call into an uninitialised buffer, then the bias in place.
fn forward(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (rows, inputs) = x.dims2()?;
    let (outputs, weight_inputs) = weight.dims2()?;
    if inputs != weight_inputs {
        candle_core::bail!(
            "linear: {inputs} input features for a [{outputs}, {weight_inputs}] weight"
        )
    }
    if let Some(b) = bias {
        if b.dims1()? != outputs {
            candle_core::bail!("linear: a bias of {} for {outputs} outputs", b.dims1()?)
        }
    }
    let len = rows * outputs;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    with_slice::<f32, _>(x, |x| {
        with_slice::<f32, _>(weight, |w| {
            let threads = candle_core::utils::get_num_threads();
            let parallelism = if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            };
            // SAFETY: `out` has capacity for rows × outputs; with `read_dst` false gemm only
            // writes the destination, every element once (alpha = 0, beta = 1: dst = x·wᵀ).
            // The strides are candle's for a contiguous `x` and the transposed view of a
            // contiguous `w` (rhs element (k, n) at n·inputs + k).
            unsafe {
                gemm::gemm(
                    rows,
                    outputs,
                    inputs,
                    out.as_mut_ptr(),
                    1,
                    outputs as isize,
                    false,
                    x.as_ptr(),
                    1,
                    inputs as isize,
                    w.as_ptr(),
                    inputs as isize,
                    1,
                    0f32,
                    1f32,
                    false,
                    false,
                    false,
                    parallelism,
                );
                out.set_len(len);
            }
        })
    })??;
    if let Some(bias) = bias {
        with_slice::<f32, _>(bias, |bias| {
            out.par_chunks_mut(outputs).for_each(|row| {
                for (y, b) in row.iter_mut().zip(bias) {
                    *y += b;
                }
            })
        })?;
    }
    Tensor::from_vec(out, (rows, outputs), x.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device_path::force_generic_path;
    use candle_core::{Device, Var};

    fn sample(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n as u64)
            .map(|i| (((i * 2654435761 + seed * 40503) % 1000) as f32 / 500.0) - 1.0)
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    /// `linear` (or, `generic`, the composition) and the gradients of `Σ y ⊙ r` with respect
    /// to x, and to w and b where they are variables (`trained`).
    fn run(generic: bool, bias: bool, trained: bool) -> (Tensor, Vec<Tensor>) {
        let x = Var::from_tensor(&sample(&[67, 300], 1)).unwrap();
        let (w, b) = (sample(&[90, 300], 2), sample(&[90], 3));
        let (wv, bv) = (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap());
        let (w, b) = if trained { (wv.as_tensor(), bv.as_tensor()) } else { (&w, &b) };
        let _generic = generic.then(force_generic_path);
        let y = linear(&x, w, bias.then_some(b)).unwrap();
        let r = sample(&[67, 90], 4);
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let mut gradients = vec![grads.get(&x).unwrap().clone()];
        if trained {
            gradients.push(grads.get(&wv).unwrap().clone());
            if bias {
                gradients.push(grads.get(&bv).unwrap().clone());
            }
        }
        (y, gradients)
    }

    #[test]
    fn the_cpu_kernel_gives_the_compositions_bits_forward_and_backward() {
        for (bias, trained) in [(true, true), (false, true), (true, false)] {
            let (fast, fast_grads) = run(false, bias, trained);
            let (plain, plain_grads) = run(true, bias, trained);
            let case = format!("bias {bias}, trained weight {trained}");
            assert_eq!(bits(&fast), bits(&plain), "value, {case}");
            assert_eq!(fast_grads.len(), plain_grads.len(), "{case}");
            for (i, (a, b)) in fast_grads.iter().zip(&plain_grads).enumerate() {
                assert_eq!(a.dims(), b.dims(), "gradient {i}, {case}");
                assert_eq!(bits(a), bits(b), "gradient {i}, {case}");
            }
        }
    }

    #[test]
    fn no_rows_give_an_empty_output() {
        let x = Tensor::zeros((0, 8), DType::F32, &Device::Cpu).unwrap();
        let y = linear(&x, &sample(&[6, 8], 11), Some(&sample(&[6], 12))).unwrap();
        assert_eq!(y.dims(), [0, 6]);
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let x = sample(&[5, 8], 8);
        assert!(linear(&x, &sample(&[6, 7], 9), None).is_err());
        assert!(linear(&x, &sample(&[6, 8], 9), Some(&sample(&[5], 10))).is_err());
    }
}
