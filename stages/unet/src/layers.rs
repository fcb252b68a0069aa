//! The UNet's primitive layers (linear, conv, group/layer norm) over tracked parameter tensors.
//!
//! Each holds the `Var`-backed tensors handed out by [`ParamBuilder`] under torch's parameter
//! names (`<prefix>.weight`, `<prefix>.bias`), so gradients land on the model's variables, and
//! the model's [`Autocast`] handle: under autocast the products compute in the half type and the
//! normalisations in f32 (see [`crate::autocast`]).

use candle_core::{Result, Tensor};

use crate::autocast::Autocast;
use crate::lora::LoraAdapter;
use crate::params::{Init, ParamBuilder};
use crate::{conv, ops};

/// `nn.Linear`: `y = x Wᵀ + b` over the last dimension of any-rank input, plus
/// `s·(x Aᵀ) Bᵀ` when the builder gave it a LoRA adapter (peft's `lora.Linear`).
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<LoraAdapter>,
    autocast: Autocast,
}

impl Linear {
    pub(crate) fn new(
        pb: &mut ParamBuilder,
        prefix: &str,
        inputs: usize,
        outputs: usize,
        bias: bool,
    ) -> Result<Self> {
        let init = Init::Uniform { fan_in: inputs };
        let weight = pb.get(&format!("{prefix}.weight"), &[outputs, inputs], init)?;
        let bias =
            if bias { Some(pb.get(&format!("{prefix}.bias"), &[outputs], init)?) } else { None };
        let lora = pb.adapter(prefix, inputs, outputs)?;
        Ok(Linear { weight, bias, lora, autocast: pb.autocast() })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let inputs = dims[dims.len() - 1];
        let rows = x.elem_count() / inputs;
        // One 2-D matmul (a single GEMM) rather than a batched one against a broadcast weight.
        let cast = |t: &Tensor| self.autocast.product(t);
        let x = cast(&x.reshape((rows, inputs))?)?;
        let bias = self.bias.as_ref().map(cast).transpose()?;
        let y = cast(&crate::linear::linear(&x, &cast(&self.weight)?, bias.as_ref())?)?;
        let y = match &self.lora {
            Some(lora) => (y + lora.forward(&x)?)?,
            None => y,
        };
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank >= 1") = self.weight.dim(0)?;
        y.reshape(out_dims)
    }
}

/// `nn.Conv2d` with a bias, square kernel, given stride and zero padding.
#[derive(Debug, Clone)]
pub(crate) struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
    autocast: Autocast,
}

impl Conv2d {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        pb: &mut ParamBuilder,
        prefix: &str,
        inputs: usize,
        outputs: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let init = Init::Uniform { fan_in: inputs * kernel * kernel };
        let weight =
            pb.get(&format!("{prefix}.weight"), &[outputs, inputs, kernel, kernel], init)?;
        let bias = pb.get(&format!("{prefix}.bias"), &[outputs], init)?;
        Ok(Conv2d { weight, bias, stride, padding, autocast: pb.autocast() })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let cast = |t: &Tensor| self.autocast.product(t);
        let y = conv::conv2d(
            &cast(x)?,
            &cast(&self.weight)?,
            &cast(&self.bias)?,
            self.stride,
            self.padding,
        )?;
        cast(&y)
    }
}

/// `nn.GroupNorm` with affine parameters.
#[derive(Debug, Clone)]
pub(crate) struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    autocast: Autocast,
}

impl GroupNorm {
    pub(crate) fn new(
        pb: &mut ParamBuilder,
        prefix: &str,
        groups: usize,
        channels: usize,
        eps: f64,
    ) -> Result<Self> {
        let weight = pb.get(&format!("{prefix}.weight"), &[channels], Init::Ones)?;
        let bias = pb.get(&format!("{prefix}.bias"), &[channels], Init::Zeros)?;
        Ok(GroupNorm { weight, bias, groups, eps, autocast: pb.autocast() })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let full = |t: &Tensor| self.autocast.full(t);
        ops::group_norm(&full(x)?, &full(&self.weight)?, &full(&self.bias)?, self.groups, self.eps)
    }
}

/// `nn.LayerNorm` over the last dimension, with affine parameters.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    autocast: Autocast,
}

impl LayerNorm {
    pub(crate) fn new(pb: &mut ParamBuilder, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        let weight = pb.get(&format!("{prefix}.weight"), &[dim], Init::Ones)?;
        let bias = pb.get(&format!("{prefix}.bias"), &[dim], Init::Zeros)?;
        Ok(LayerNorm { weight, bias, eps, autocast: pb.autocast() })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let full = |t: &Tensor| self.autocast.full(t);
        ops::layer_norm(&full(x)?, &full(&self.weight)?, &full(&self.bias)?, self.eps)
    }
}
