//! Differentiable versions of the tensor ops the UNet needs where candle 0.11 has no usable
//! backward.
//!
//! What candle lacks (checked in candle-core 0.11.1 `backprop.rs` and candle-nn 0.11.1 `ops.rs`):
//! - `candle_nn::ops::softmax_last_dim` and `layer_norm` are fused custom ops applied with
//!   `apply_op*_no_bwd`: the graph stops there.
//! - `gelu_erf` has a backward, but with the constant 1/√(2π) rounded to 0.398942, which is off by
//!   7e-7 relative; ours uses the exact constant, as torch's `F.gelu` derivative does (in
//!   [`crate::pointwise`], with SiLU: candle's CPU unary ops run on one thread).
//! - `upsample_nearest2d`'s backward *overwrites* the input's accumulated gradient (a bug whenever
//!   the input has another consumer) and runs a grouped convolution with one group per channel,
//!   which candle's CPU backend executes as C separate convolutions.
//! - `candle_nn::GroupNorm` is a differentiable composition, but it keeps five full-size
//!   intermediates alive per call for the backward; a UNet has dozens of group norms.
//! - Attention composed of matmul + softmax would keep the `N×M` scores and probabilities of every
//!   layer for the backward; [`attention`] keeps neither and recomputes them (flash-attention
//!   style), which is what makes SD-sized training fit.
//! - `conv2d` has a backward, but a slow one on the CPU: the UNet's and VAE's convolutions are
//!   in [`crate::conv`].
//!
//! Everything else the UNet uses (matmul, broadcasting binary ops, narrow, cat,
//! reshape/transpose, sums) has a correct backward in candle 0.11.1.
//!
//! Each op here computes its forward with candle's (fused where available) kernels on *detached*
//! inputs, so no graph and no intermediates are kept, then attaches an analytic backward with a
//! custom op (`Precomputed`) whose only saved state is the inputs and the output. That is both
//! what makes them differentiable and what keeps training memory low. `Precomputed` hands over a
//! value already on the inputs' device, so these ops run on every device candle does; only
//! [`attention`] and [`group_norm`] have CPU-only kernels, chosen by
//! [`crate::device_path::use_cpu_kernels`].

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, MetalStorage, Result,
    Shape, Storage, Tensor, D,
};

use crate::{fused_attention, group_norm};

/// The backward of a [`Precomputed`] op: `(inputs, output, grad_output, wanted) -> grad per
/// input`. `wanted[i]` says whether input `i` is tracked (a variable, or computed from one): an
/// input that is not — a frozen weight, the data — needs no gradient, and a backward may skip
/// computing it (a LoRA step's frozen convolutions skip their kernel gradients).
type Backward =
    dyn Fn(&[&Tensor], &Tensor, &Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync;

/// A custom op whose forward result was computed beforehand and whose backward is a closure.
///
/// candle runs a custom op's forward on raw storages; ours hands over the precomputed result
/// (taken out of the op, so the op itself keeps nothing alive) and the graph records the inputs,
/// so [`Backward`] later sees the inputs, the output and the incoming gradient — all detached:
/// candle tracks ops on variables even inside a backward pass, and a gradient computed from
/// tracked inputs would drag a graph (and its memory) along.
struct Precomputed {
    name: &'static str,
    value: Mutex<Option<Tensor>>,
    backward: Box<Backward>,
}

impl Precomputed {
    fn take(&self) -> Result<Tensor> {
        let mut slot = self.value.lock().map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
        slot.take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: forward ran twice", self.name)))
    }

    /// The precomputed value's storage, cloned: candle wants an owned storage back.
    fn storage(&self) -> Result<(Storage, Shape)> {
        let value = self.take()?;
        let (storage, layout) = value.storage_and_layout();
        let storage = match &*storage {
            Storage::Cpu(s) => Storage::Cpu(s.try_clone(layout)?),
            Storage::Cuda(s) => Storage::Cuda(s.try_clone(layout)?),
            Storage::Metal(s) => Storage::Metal(s.try_clone(layout)?),
        };
        Ok((storage, value.shape().clone()))
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        match self.storage()? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("{}: result computed on another device", self.name),
        }
    }

    fn cuda(&self) -> Result<(CudaStorage, Shape)> {
        match self.storage()? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("{}: result computed on another device", self.name),
        }
    }

    fn metal(&self) -> Result<(MetalStorage, Shape)> {
        match self.storage()? {
            (Storage::Metal(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("{}: result computed on another device", self.name),
        }
    }
}

impl CustomOp1 for Precomputed {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.cuda()
    }
    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.metal()
    }
    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let wanted = [arg.track_op()];
        let arg = arg.detach();
        Ok((self.backward)(&[&arg], &res.detach(), grad, &wanted)?.into_iter().next().flatten())
    }
}

impl CustomOp2 for Precomputed {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.cuda()
    }
    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.metal()
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let wanted = [a.track_op(), b.track_op()];
        let (a, b) = (a.detach(), b.detach());
        let mut grads = (self.backward)(&[&a, &b], &res.detach(), grad, &wanted)?.into_iter();
        Ok((grads.next().flatten(), grads.next().flatten()))
    }
}

impl CustomOp3 for Precomputed {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.cuda()
    }
    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.metal()
    }
    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let wanted = [a.track_op(), b.track_op(), c.track_op()];
        let (a, b, c) = (a.detach(), b.detach(), c.detach());
        let mut grads = (self.backward)(&[&a, &b, &c], &res.detach(), grad, &wanted)?.into_iter();
        Ok((grads.next().flatten(), grads.next().flatten(), grads.next().flatten()))
    }
}

/// A tensor that owns a contiguous, offset-0 storage, as [`Precomputed`] hands storages over
/// whole.
fn standalone(value: Tensor) -> Result<Tensor> {
    if value.is_contiguous() && value.layout().start_offset() == 0 {
        Ok(value)
    } else {
        value.copy()
    }
}

/// `value` (computed from `x` without a graph) with `backward` attached to `x`.
pub(crate) fn attach1(
    x: &Tensor,
    value: Tensor,
    name: &'static str,
    backward: Box<Backward>,
) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(value);
    }
    let op = Precomputed { name, value: Mutex::new(Some(standalone(value)?)), backward };
    x.apply_op1_arc(Arc::new(Box::new(op)))
}

/// `value` (computed from `x`, `a`, `b` without a graph) with `backward` attached to all three.
pub(crate) fn attach3(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    value: Tensor,
    name: &'static str,
    backward: Box<Backward>,
) -> Result<Tensor> {
    if !(x.track_op() || a.track_op() || b.track_op()) {
        return Ok(value);
    }
    let op = Precomputed { name, value: Mutex::new(Some(standalone(value)?)), backward };
    x.apply_op3_arc(a, b, Arc::new(Box::new(op)))
}

/// `x Wᵀ` for a 2-D `x` and a weight that is not tracked (a frozen base weight under LoRA):
/// the product carries only the input's gradient, `g W`. candle's own matmul backward would
/// also compute the weight's, `xᵀ g`, a second product as large as the first, that nobody
/// reads.
pub(crate) fn matmul_frozen_weight(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let value = x.detach().matmul(&weight.t()?)?;
    let weight = weight.clone();
    attach1(
        x,
        value,
        "sdpipe-frozen-linear",
        Box::new(move |_, _, g, _| Ok(vec![Some(g.matmul(&weight)?)])),
    )
}

/// Softmax over the last dimension.
///
/// Backward: `dx = y ⊙ (g − Σ_j g_j y_j)`, from the saved output `y` alone.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let xd = x.detach().contiguous()?;
    let value = candle_nn::ops::softmax_last_dim(&xd)?;
    attach1(
        x,
        value,
        "sdpipe-softmax-last-dim",
        Box::new(|_, y, g, _| {
            let dot = (g * y)?.sum_keepdim(D::Minus1)?;
            Ok(vec![Some(y.mul(&g.broadcast_sub(&dot)?)?)])
        }),
    )
}

/// Attention scores materialised at once, at most (elements): 1 Mi f32 = 4 MiB. Larger score
/// tensors are processed a slice of heads at a time, in the forward and in the backward.
const ATTENTION_CHUNK_ELEMENTS: usize = 1 << 20;

/// Scaled dot-product attention `softmax(q·kᵀ·scale)·v` for `q` `(..., N, d)`, `k` `(..., M, d)`
/// and `v` `(..., M, e)` (leading dimensions: batch and heads), as `F.scaled_dot_product_attention`
/// without mask or dropout.
///
/// Memory-efficient in the way flash attention is: the `N×M` scores and probabilities are never
/// kept for the backward (the graph holds only `q`, `k`, `v` and the output); the backward
/// recomputes them (f32 on the CPU: block by block in [`crate::fused_attention`]; otherwise a
/// slice of heads at a time with candle's ops) and applies
/// `dS = P ⊙ (dP − rowsum(dP ⊙ P))` with `dP = dO·vᵀ`, `dv = Pᵀ·dO`, `dq = dS·k·scale`,
/// `dk = dSᵀ·q·scale`. Without this a training step would keep two score-sized tensors per
/// attention layer, which at SD resolutions dominate all other activations.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let dims = q.dims().to_vec();
    let rank = dims.len();
    if rank < 2 || k.rank() != rank || v.rank() != rank {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} must have the same rank >= 2",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let (n, m, e) = (dims[rank - 2], k.dim(rank - 2)?, v.dim(rank - 1)?);
    let groups: usize = dims[..rank - 2].iter().product();
    let flat = move |t: &Tensor| -> Result<Tensor> {
        let (a, b) = (t.dim(rank - 2)?, t.dim(rank - 1)?);
        t.reshape((groups, a, b))
    };
    let mut out_dims = dims.clone();
    out_dims[rank - 1] = e;
    if fused_attention::applies(q, k, v) {
        // f32 on the CPU: the blocked kernels, which never write a score tensor out.
        let value = fused_attention::attention(
            &flat(&q.detach())?,
            &flat(&k.detach())?,
            &flat(&v.detach())?,
            scale,
        )?
        .reshape(out_dims.as_slice())?;
        return attach3(
            q,
            k,
            v,
            value,
            "sdpipe-attention",
            Box::new(move |args, _, g, _| {
                let (gq, gk, gv) = fused_attention::attention_backward(
                    &flat(args[0])?,
                    &flat(args[1])?,
                    &flat(args[2])?,
                    &g.reshape((groups, n, e))?,
                    scale,
                )?;
                let back = |grad: Tensor, like: &Tensor| grad.reshape(like.dims());
                Ok(vec![
                    Some(back(gq, args[0])?),
                    Some(back(gk, args[1])?),
                    Some(back(gv, args[2])?),
                ])
            }),
        );
    }
    // Other dtypes and devices: candle's ops, a slice of heads at a time.
    let (qf, kf, vf) = (flat(&q.detach())?, flat(&k.detach())?, flat(&v.detach())?);
    let chunk = (ATTENTION_CHUNK_ELEMENTS / (n * m).max(1)).clamp(1, groups.max(1));
    let probs = move |q: &Tensor, k: &Tensor| -> Result<Tensor> {
        let scores = (q * scale)?.matmul(&k.t()?)?;
        match scores.dtype() {
            // Half precision (autocast): the softmax in f32, as fused half-precision attention
            // kernels accumulate, so a row of hundreds of probabilities still sums to one.
            DType::F16 | DType::BF16 => {
                candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
                    .to_dtype(scores.dtype())
            }
            _ => candle_nn::ops::softmax_last_dim(&scores),
        }
    };
    let mut outs = Vec::new();
    for start in (0..groups).step_by(chunk) {
        let len = chunk.min(groups - start);
        let (qc, kc, vc) =
            (qf.narrow(0, start, len)?, kf.narrow(0, start, len)?, vf.narrow(0, start, len)?);
        outs.push(probs(&qc, &kc)?.matmul(&vc)?);
    }
    let value = Tensor::cat(&outs, 0)?.reshape(out_dims.as_slice())?;
    attach3(
        q,
        k,
        v,
        value,
        "sdpipe-attention",
        Box::new(move |args, _, g, _| {
            let (q, k, v) = (flat(args[0])?, flat(args[1])?, flat(args[2])?);
            let g = g.reshape((groups, n, e))?;
            let (mut gq, mut gk, mut gv) = (Vec::new(), Vec::new(), Vec::new());
            for start in (0..groups).step_by(chunk) {
                let len = chunk.min(groups - start);
                let (qc, kc, vc) =
                    (q.narrow(0, start, len)?, k.narrow(0, start, len)?, v.narrow(0, start, len)?);
                let gc = g.narrow(0, start, len)?;
                let p = probs(&qc, &kc)?;
                gv.push(p.t()?.matmul(&gc)?);
                let gp = gc.matmul(&vc.t()?)?;
                let row = (&gp * &p)?.sum_keepdim(D::Minus1)?;
                // Drop each score-sized temporary as soon as it is used: at most three alive.
                let centred = gp.broadcast_sub(&row)?;
                drop(gp);
                let gs = (centred * p)?;
                gq.push((gs.matmul(&kc)? * scale)?);
                gk.push((gs.t()?.matmul(&qc)? * scale)?);
            }
            let back =
                |parts: Vec<Tensor>, like: &Tensor| Tensor::cat(&parts, 0)?.reshape(like.dims());
            Ok(vec![Some(back(gq, args[0])?), Some(back(gk, args[1])?), Some(back(gv, args[2])?)])
        }),
    )
}

/// Mean, reciprocal standard deviation (biased variance, as torch) and the normalised values of
/// `x` over its last dimension.
fn normalise_last(x: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    let xhat = centred.broadcast_mul(&rstd)?;
    Ok((xhat, rstd))
}

/// The input gradient of a normalisation over the last dimension, given the gradient with respect
/// to the normalised values `gxhat`: `rstd · (gx̂ − mean(gx̂) − x̂ · mean(gx̂ ⊙ x̂))`.
fn normalise_last_backward(xhat: &Tensor, rstd: &Tensor, gxhat: &Tensor) -> Result<Tensor> {
    let mean_g = gxhat.mean_keepdim(D::Minus1)?;
    let mean_gx = (gxhat * xhat)?.mean_keepdim(D::Minus1)?;
    gxhat.broadcast_sub(&mean_g)?.sub(&xhat.broadcast_mul(&mean_gx)?)?.broadcast_mul(rstd)
}

/// Layer normalisation over the last dimension with an affine `weight` and `bias` (torch's
/// `nn.LayerNorm`: biased variance, `eps` inside the square root).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let xd = x.detach().contiguous()?;
    let (wd, bd) = (weight.detach(), bias.detach());
    // candle's fused kernel covers the float types a model runs in; f64 (used by the
    // finite-difference tests) takes the equivalent composition.
    let value = if x.dtype() == DType::F64 {
        candle_nn::ops::layer_norm_slow(&xd, &wd, &bd, eps as f32)?
    } else {
        candle_nn::ops::layer_norm(&xd, &wd, &bd, eps as f32)?
    };
    attach3(
        x,
        weight,
        bias,
        value,
        "sdpipe-layer-norm",
        Box::new(move |args, _, g, _| {
            let (x, w) = (args[0], args[1]);
            let c = w.dim(0)?;
            let (xhat, rstd) = normalise_last(x, eps)?;
            let rows = g.elem_count() / c;
            let g2 = g.reshape((rows, c))?;
            let gw = (&g2 * xhat.reshape((rows, c))?)?.sum(0)?;
            let gb = g2.sum(0)?;
            let gx = normalise_last_backward(&xhat, &rstd, &g.broadcast_mul(w)?)?;
            Ok(vec![Some(gx), Some(gw), Some(gb)])
        }),
    )
}

/// Group normalisation of `x` shaped `(B, C, ...)` over `groups` channel groups, with per-channel
/// affine `weight` and `bias` (torch's `nn.GroupNorm`). Large f32/f64 maps on the CPU take the
/// fused kernel of [`crate::group_norm`]; the rest a composition of candle ops.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.len() < 3 {
        candle_core::bail!("group_norm: expected (B, C, ...), got {:?}", dims)
    }
    let (b, c) = (dims[0], dims[1]);
    if groups == 0 || c % groups != 0 {
        candle_core::bail!("group_norm: {groups} groups do not divide {c} channels")
    }
    if group_norm::applies(x) {
        return group_norm::fused(x, weight, bias, groups, eps);
    }
    // Other devices, dtypes and small maps: the composition.
    let spatial = x.elem_count() / (b * c);
    let affine_shape = (1, c, 1);
    let value = {
        let xd = x.detach().reshape((b, groups, c / groups * spatial))?;
        let (xhat, _) = normalise_last(&xd, eps)?;
        xhat.reshape((b, c, spatial))?
            .broadcast_mul(&weight.detach().reshape(affine_shape)?)?
            .broadcast_add(&bias.detach().reshape(affine_shape)?)?
            .reshape(dims.as_slice())?
    };
    attach3(
        x,
        weight,
        bias,
        value,
        "sdpipe-group-norm",
        Box::new(move |args, _, g, _| {
            let (x, w) = (args[0], args[1]);
            let grouped = (b, groups, c / groups * spatial);
            let (xhat, rstd) = normalise_last(&x.reshape(grouped)?, eps)?;
            let g3 = g.reshape((b, c, spatial))?;
            let xhat3 = xhat.reshape((b, c, spatial))?;
            let gw = (&g3 * &xhat3)?.sum(2)?.sum(0)?;
            let gb = g3.sum(2)?.sum(0)?;
            let gxhat = g3.broadcast_mul(&w.reshape(affine_shape)?)?.reshape(grouped)?;
            let gx = normalise_last_backward(&xhat, &rstd, &gxhat)?.reshape(dims.as_slice())?;
            Ok(vec![Some(gx), Some(gw), Some(gb)])
        }),
    )
}

/// Nearest-neighbour ×2 upsampling of `(B, C, H, W)`, as `F.interpolate(scale_factor=2.0,
/// mode="nearest")`.
///
/// Backward: each input pixel receives the sum of the gradients of its 2×2 copies.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let value = x.detach().upsample_nearest2d(2 * h, 2 * w)?;
    attach1(
        x,
        value,
        "sdpipe-upsample-nearest2x",
        Box::new(move |_, _, g, _| {
            let gx = g.reshape((b, c, h, 2, w, 2))?.sum(5)?.sum(3)?;
            Ok(vec![Some(gx)])
        }),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// A deterministic f64 tensor of the given shape with values spread over about [-2, 2].
    pub(crate) fn sample(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
        let values: Vec<f64> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// Checks the gradients of `f(inputs) · r` (r a fixed random projection) against central
    /// finite differences for every element of every input.
    pub(crate) fn check_gradients(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let tracked: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&tracked).unwrap();
        let r = sample(out.dims(), 99);
        let objective = |ts: &[Tensor]| -> f64 {
            (f(ts).unwrap() * &r).unwrap().sum_all().unwrap().to_scalar().unwrap()
        };
        let grads = (out * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let h = 1e-6;
        for (i, var) in vars.iter().enumerate() {
            let analytic: Vec<f64> =
                grads.get(var).expect("gradient").flatten_all().unwrap().to_vec1().unwrap();
            let base: Vec<f64> = inputs[i].flatten_all().unwrap().to_vec1().unwrap();
            for (j, &a) in analytic.iter().enumerate() {
                let shifted = |delta: f64| {
                    let mut v = base.clone();
                    v[j] += delta;
                    let mut ts = inputs.to_vec();
                    ts[i] = Tensor::from_vec(v, inputs[i].dims(), &Device::Cpu).unwrap();
                    objective(&ts)
                };
                let numeric = (shifted(h) - shifted(-h)) / (2.0 * h);
                assert!(
                    (a - numeric).abs() <= 1e-7 + 1e-6 * numeric.abs(),
                    "input {i} element {j}: analytic {a} vs finite difference {numeric}"
                );
            }
        }
    }

    pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
        d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// The output of `f` on `inputs` (tracked, moved to `device`) and the gradients of
    /// `Σ f(inputs) ⊙ r` (r a fixed projection) with respect to each input, all on the CPU.
    fn value_and_gradients(
        inputs: &[Tensor],
        device: &Device,
        f: &impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> (Tensor, Vec<Tensor>) {
        let on = |t: &Tensor, d: &Device| t.to_device(d).unwrap();
        let vars: Vec<Var> =
            inputs.iter().map(|t| Var::from_tensor(&on(t, device)).unwrap()).collect();
        let tracked: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&tracked).unwrap();
        let r = on(&sample(out.dims(), 99).to_dtype(out.dtype()).unwrap(), device);
        let grads = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let grads = vars.iter().map(|v| on(grads.get(v).expect("gradient"), &Device::Cpu));
        (on(&out.detach(), &Device::Cpu), grads.collect())
    }

    /// Asserts that `f` gives the same output and input gradients through the CPU kernels and
    /// through the generic path (forced on the CPU; on every other device of
    /// [`crate::device_path::test_devices`]): within `tolerance` relative to the largest
    /// magnitude of each of the CPU kernels' tensors.
    pub(crate) fn assert_paths_agree(
        inputs: &[Tensor],
        tolerance: f64,
        f: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) {
        let (fast, fast_grads) = value_and_gradients(inputs, &Device::Cpu, &f);
        for device in crate::device_path::test_devices() {
            let (generic, generic_grads) = {
                let _generic = crate::device_path::force_generic_path();
                value_and_gradients(inputs, &device, &f)
            };
            assert_eq!(fast.dims(), generic.dims());
            let pairs =
                std::iter::once((&fast, &generic)).chain(fast_grads.iter().zip(&generic_grads));
            for (i, (fast, generic)) in pairs.enumerate() {
                let what = if i == 0 { "output".into() } else { format!("gradient {}", i - 1) };
                let largest = max_abs_diff(fast, &fast.zeros_like().unwrap());
                let diff = max_abs_diff(fast, generic);
                assert!(
                    diff <= tolerance * largest,
                    "{what} on {device:?}: max |Δ| {diff:e}, largest {largest:e}, \
                     tolerance {tolerance:e} relative"
                );
            }
        }
    }

    #[test]
    fn a_frozen_weights_product_has_the_inputs_gradient_and_none_for_the_weight() {
        let (x, w) = (sample(&[5, 3], 1), sample(&[4, 3], 2));
        let x_var = Var::from_tensor(&x).unwrap();
        let loss = |y: Tensor| y.sqr().unwrap().sum_all().unwrap();
        let frozen = loss(matmul_frozen_weight(x_var.as_tensor(), &w).unwrap());
        let plain = loss(x_var.as_tensor().matmul(&w.t().unwrap()).unwrap());
        assert_eq!(max_abs_diff(&frozen, &plain), 0.0);
        let frozen = frozen.backward().unwrap();
        let plain = plain.backward().unwrap();
        assert!(max_abs_diff(frozen.get(&x_var).unwrap(), plain.get(&x_var).unwrap()) < 1e-6);
        assert!(frozen.get(&w).is_none());
    }

    #[test]
    fn softmax_gradient_matches_finite_differences() {
        check_gradients(&[sample(&[2, 3, 5], 1)], |t| softmax_last_dim(&t[0]));
    }

    #[test]
    fn softmax_forward_equals_candles_fused_kernel() {
        let x = sample(&[3, 4, 7], 2).to_dtype(DType::F32).unwrap();
        let tracked = Var::from_tensor(&x).unwrap();
        let ours = softmax_last_dim(tracked.as_tensor()).unwrap();
        let fused = candle_nn::ops::softmax_last_dim(&x).unwrap();
        assert_eq!(max_abs_diff(&ours, &fused), 0.0);
    }

    #[test]
    fn attention_gradient_matches_finite_differences() {
        let (q, k, v) = (sample(&[2, 3, 4], 21), sample(&[2, 5, 4], 22), sample(&[2, 5, 3], 23));
        check_gradients(&[q, k, v], |t| attention(&t[0], &t[1], &t[2], 0.5));
    }

    #[test]
    fn attention_forward_equals_the_plain_formula() {
        let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let (q, k, v) = (
            f32(sample(&[2, 3, 6, 4], 24)),
            f32(sample(&[2, 3, 7, 4], 25)),
            f32(sample(&[2, 3, 7, 5], 26)),
        );
        let tracked = Var::from_tensor(&q).unwrap();
        let ours = attention(tracked.as_tensor(), &k, &v, 0.5).unwrap();
        let scores = (&q * 0.5).unwrap().matmul(&k.t().unwrap()).unwrap();
        let plain = candle_nn::ops::softmax_last_dim(&scores).unwrap().matmul(&v).unwrap();
        assert_eq!(ours.dims(), &[2, 3, 6, 5]);
        // The blocked kernel sums in gemm's order and exponentiates within 2 ulp of libm.
        assert!(max_abs_diff(&ours, &plain) < 1e-5);
    }

    #[test]
    fn attention_processes_large_score_tensors_in_slices_with_the_same_result() {
        // 9 groups of 256×512 scores: 8 per slice, so two slices, the second partial. In f64,
        // which takes candle's ops (f32 takes the blocked kernels, tested in fused_attention).
        let (q, k, v) =
            (sample(&[9, 256, 2], 27), sample(&[9, 512, 2], 28), sample(&[9, 512, 2], 29));
        let (qv, kv, vv) = (
            Var::from_tensor(&q).unwrap(),
            Var::from_tensor(&k).unwrap(),
            Var::from_tensor(&v).unwrap(),
        );
        let out = attention(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), 0.7).unwrap();
        let g = sample(&[9, 256, 2], 30);
        let grads = (&out * &g).unwrap().sum_all().unwrap().backward().unwrap();
        for i in [0usize, 8] {
            let one = |t: &Tensor| Var::from_tensor(&t.narrow(0, i, 1).unwrap()).unwrap();
            let (q1, k1, v1) = (one(&q), one(&k), one(&v));
            let o1 = attention(q1.as_tensor(), k1.as_tensor(), v1.as_tensor(), 0.7).unwrap();
            assert_eq!(max_abs_diff(&o1, &out.narrow(0, i, 1).unwrap()), 0.0);
            let g1 =
                (&o1 * &g.narrow(0, i, 1).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
            for (whole, single) in [(&qv, &q1), (&kv, &k1), (&vv, &v1)] {
                let a = grads.get(whole).unwrap().narrow(0, i, 1).unwrap();
                assert!(max_abs_diff(&a, g1.get(single).unwrap()) < 1e-6);
            }
        }
    }

    #[test]
    fn attention_on_the_generic_path_matches_the_cpu_kernels_forward_and_gradients() {
        let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        // Self-attention (four heads) and cross-attention shapes, one spanning several blocks.
        for (q, k, v) in [
            ([2, 4, 16, 8], [2, 4, 16, 8], [2, 4, 16, 8]),
            ([1, 2, 100, 4], [1, 2, 2048, 4], [1, 2, 2048, 6]),
            ([2, 3, 9, 5], [2, 3, 7, 5], [2, 3, 7, 3]),
        ] {
            let inputs = [f32(sample(&q, 41)), f32(sample(&k, 42)), f32(sample(&v, 43))];
            assert_paths_agree(&inputs, 1e-5, |t| attention(&t[0], &t[1], &t[2], 0.4));
        }
    }

    #[test]
    fn layer_norm_gradient_matches_finite_differences() {
        let (x, w, b) = (sample(&[2, 3, 6], 3), sample(&[6], 4), sample(&[6], 5));
        check_gradients(&[x, w, b], |t| layer_norm(&t[0], &t[1], &t[2], 1e-5));
    }

    #[test]
    fn layer_norm_forward_equals_candles_fused_kernel() {
        let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let (x, w, b) = (f32(sample(&[2, 5, 16], 6)), f32(sample(&[16], 7)), f32(sample(&[16], 8)));
        let tracked = Var::from_tensor(&x).unwrap();
        let ours = layer_norm(tracked.as_tensor(), &w, &b, 1e-5).unwrap();
        let fused = candle_nn::ops::layer_norm(&x, &w, &b, 1e-5).unwrap();
        assert_eq!(max_abs_diff(&ours, &fused), 0.0);
    }

    #[test]
    fn group_norm_gradient_matches_finite_differences() {
        let (x, w, b) = (sample(&[2, 4, 3, 2], 9), sample(&[4], 10), sample(&[4], 11));
        check_gradients(&[x, w, b], |t| group_norm(&t[0], &t[1], &t[2], 2, 1e-6));
    }

    #[test]
    fn group_norm_forward_equals_candle_nn_group_norm() {
        use candle_core::Module;
        let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let (x, w, b) =
            (f32(sample(&[2, 8, 3, 5], 12)), f32(sample(&[8], 13)), f32(sample(&[8], 14)));
        let reference = candle_nn::GroupNorm::new(w.clone(), b.clone(), 8, 4, 1e-5).unwrap();
        let tracked = Var::from_tensor(&x).unwrap();
        let ours = group_norm(tracked.as_tensor(), &w, &b, 4, 1e-5).unwrap();
        assert!(max_abs_diff(&ours, &reference.forward(&x).unwrap()) < 1e-6);
    }

    #[test]
    fn upsample_gradient_matches_finite_differences() {
        check_gradients(&[sample(&[1, 2, 2, 3], 17)], |t| upsample_nearest2x(&t[0]));
    }

    #[test]
    fn upsample_forward_equals_candles_nearest_upsampling() {
        let x = sample(&[2, 3, 4, 5], 18);
        let tracked = Var::from_tensor(&x).unwrap();
        let ours = upsample_nearest2x(tracked.as_tensor()).unwrap();
        assert_eq!(max_abs_diff(&ours, &x.upsample_nearest2d(8, 10).unwrap()), 0.0);
    }

    #[test]
    fn gradients_accumulate_when_an_input_has_several_consumers() {
        // y = up(x) + softmax(x)-shaped terms: x feeds two custom ops and a plain one.
        let x = sample(&[1, 2, 2, 2], 19);
        check_gradients(&[x], |t| {
            let up = upsample_nearest2x(&t[0])?.sum_keepdim(3)?.sum_keepdim(2)?;
            let soft = softmax_last_dim(&t[0])?.sum_keepdim(3)?.sum_keepdim(2)?;
            (up + soft)? + t[0].sqr()?.sum_keepdim(3)?.sum_keepdim(2)?
        });
    }

    #[test]
    fn untracked_inputs_build_no_graph() {
        let x = sample(&[2, 4], 20);
        assert!(!softmax_last_dim(&x).unwrap().track_op());
    }
}
