//! The UNet's building blocks, each a faithful port of its diffusers module (same parameter
//! names, same arithmetic): timestep embedding, `ResnetBlock2D`, `Transformer2DModel` with its
//! `BasicTransformerBlock`s (self-attention, cross-attention, GEGLU feed-forward), and the
//! `Downsample2D`/`Upsample2D` convolutions.

use candle_core::{DType, Result, Tensor, D};

use crate::layers::{Conv2d, GroupNorm, LayerNorm, Linear};
use crate::ops;
use crate::params::ParamBuilder;
use crate::pointwise;

/// diffusers' `get_timestep_embedding` with `scale` 1 and `max_period` 10000: for timesteps `t`
/// (shape `(B,)`), `[sin(t·f), cos(t·f)]` (or cos first when `flip_sin_to_cos`) with
/// `f_i = exp(−ln(10000)·i / (dim/2 − shift))`, zero-padded when `dim` is odd.
///
/// Computed in f32 in diffusers' order of operations (multiply, then a true division, then exp)
/// so the frequencies round as torch's do: at t ≈ 1000 one ulp of a frequency moves the
/// sine's argument by ~1e-4.
pub(crate) fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    shift: f64,
) -> Result<Tensor> {
    let device = timesteps.device();
    let half = dim / 2;
    let exponent =
        (Tensor::arange(0u32, half as u32, device)?.to_dtype(DType::F32)? * -(10000f64.ln()))?;
    let divisor = Tensor::new(&[(half as f64 - shift) as f32], device)?;
    let freqs = exponent.broadcast_div(&divisor)?.exp()?;
    let args = timesteps.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs.unsqueeze(0)?)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb =
        if flip_sin_to_cos { Tensor::cat(&[cos, sin], 1)? } else { Tensor::cat(&[sin, cos], 1)? };
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`.
#[derive(Debug, Clone)]
pub(crate) struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub(crate) fn new(
        pb: &mut ParamBuilder,
        prefix: &str,
        inputs: usize,
        dim: usize,
    ) -> Result<Self> {
        Ok(TimestepEmbedding {
            linear_1: Linear::new(pb, &format!("{prefix}.linear_1"), inputs, dim, true)?,
            linear_2: Linear::new(pb, &format!("{prefix}.linear_2"), dim, dim, true)?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&pointwise::silu(&self.linear_1.forward(x)?)?)
    }
}

/// `ResnetBlock2D` (pre-norm, "default" time embedding, SiLU, no dropout at p = 0).
#[derive(Debug, Clone)]
pub(crate) struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

/// Shape settings shared by the resnets of one UNet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResnetSettings {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub(crate) fn new(
        pb: &mut ParamBuilder,
        prefix: &str,
        inputs: usize,
        outputs: usize,
        s: ResnetSettings,
    ) -> Result<Self> {
        let p = |name: &str| format!("{prefix}.{name}");
        Ok(ResnetBlock2D {
            norm1: GroupNorm::new(pb, &p("norm1"), s.groups, inputs, s.eps)?,
            conv1: Conv2d::new(pb, &p("conv1"), inputs, outputs, 3, 1, 1)?,
            time_emb_proj: Linear::new(pb, &p("time_emb_proj"), s.temb_channels, outputs, true)?,
            norm2: GroupNorm::new(pb, &p("norm2"), s.groups, outputs, s.eps)?,
            conv2: Conv2d::new(pb, &p("conv2"), outputs, outputs, 3, 1, 1)?,
            conv_shortcut: if inputs != outputs {
                Some(Conv2d::new(pb, &p("conv_shortcut"), inputs, outputs, 1, 1, 0)?)
            } else {
                None
            },
            output_scale_factor: s.output_scale_factor,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&pointwise::silu(&self.norm1.forward(x)?)?)?;
        let t = self.time_emb_proj.forward(&pointwise::silu(temb)?)?.unsqueeze(2)?.unsqueeze(3)?;
        let h = h.broadcast_add(&t)?;
        let h = self.conv2.forward(&pointwise::silu(&self.norm2.forward(&h)?)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let out = (shortcut + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// `Attention` as used in SD's transformer blocks: bias-free q/k/v projections, scaled
/// dot-product attention over `heads` heads, output projection `to_out.0` with bias.
#[derive(Debug, Clone)]
pub(crate) struct Attention {
    heads: usize,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl Attention {
    pub(crate) fn new(
        pb: &mut ParamBuilder,
        prefix: &str,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let p = |name: &str| format!("{prefix}.{name}");
        Ok(Attention {
            heads,
            to_q: Linear::new(pb, &p("to_q"), query_dim, inner, false)?,
            to_k: Linear::new(pb, &p("to_k"), context_dim, inner, false)?,
            to_v: Linear::new(pb, &p("to_v"), context_dim, inner, false)?,
            to_out: Linear::new(pb, &p("to_out.0"), inner, query_dim, true)?,
        })
    }

    /// `(B, N, C)` → `(B, N, C)`; attends over `context` (`(B, M, C')`) or, without one, `x`.
    pub(crate) fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let (b, n, _) = x.dims3()?;
        let m = context.dim(1)?;
        let heads = self.heads;
        let split = |t: Tensor, len: usize| -> Result<Tensor> {
            let head_dim = t.dim(D::Minus1)? / heads;
            t.reshape((b, len, heads, head_dim))?.transpose(1, 2)?.contiguous()
        };
        let q = split(self.to_q.forward(x)?, n)?;
        let k = split(self.to_k.forward(context)?, m)?;
        let v = split(self.to_v.forward(context)?, m)?;
        let head_dim = q.dim(D::Minus1)?;
        let out = ops::attention(&q, &k, &v, 1.0 / (head_dim as f64).sqrt())?;
        let out = out.transpose(1, 2)?.reshape((b, n, heads * head_dim))?;
        self.to_out.forward(&out)
    }
}

/// `FeedForward` with GEGLU: `net.2(h ⊙ gelu(g))` where `[h, g] = net.0.proj(x)`.
#[derive(Debug, Clone)]
pub(crate) struct FeedForward {
    proj: Linear,
    out: Linear,
    inner: usize,
}

impl FeedForward {
    pub(crate) fn new(pb: &mut ParamBuilder, prefix: &str, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(FeedForward {
            proj: Linear::new(pb, &format!("{prefix}.net.0.proj"), dim, inner * 2, true)?,
            out: Linear::new(pb, &format!("{prefix}.net.2"), inner, dim, true)?,
            inner,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let projected = self.proj.forward(x)?;
        let hidden = projected.narrow(D::Minus1, 0, self.inner)?;
        let gate = projected.narrow(D::Minus1, self.inner, self.inner)?;
        self.out.forward(&(hidden * pointwise::gelu(&gate)?)?)
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention and feed-forward, each pre-norm
/// (LayerNorm, eps 1e-5) with a residual connection.
#[derive(Debug, Clone)]
pub(crate) struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(
        pb: &mut ParamBuilder,
        prefix: &str,
        dim: usize,
        context_dim: usize,
        heads: usize,
    ) -> Result<Self> {
        let p = |name: &str| format!("{prefix}.{name}");
        let head_dim = dim / heads;
        Ok(BasicTransformerBlock {
            norm1: LayerNorm::new(pb, &p("norm1"), dim, 1e-5)?,
            attn1: Attention::new(pb, &p("attn1"), dim, dim, heads, head_dim)?,
            norm2: LayerNorm::new(pb, &p("norm2"), dim, 1e-5)?,
            attn2: Attention::new(pb, &p("attn2"), dim, context_dim, heads, head_dim)?,
            norm3: LayerNorm::new(pb, &p("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(pb, &p("ff"), dim)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, Some(context))? + &x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + &x
    }
}

/// `proj_in`/`proj_out` of a `Transformer2DModel`: a 1×1 convolution on `(B, C, H, W)`, or a
/// linear layer on `(B, HW, C)` when `use_linear_projection`.
#[derive(Debug, Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn new(
        pb: &mut ParamBuilder,
        prefix: &str,
        inputs: usize,
        outputs: usize,
        linear: bool,
    ) -> Result<Self> {
        Ok(if linear {
            Projection::Linear(Linear::new(pb, prefix, inputs, outputs, true)?)
        } else {
            Projection::Conv(Conv2d::new(pb, prefix, inputs, outputs, 1, 1, 0)?)
        })
    }
}

/// `Transformer2DModel` on continuous inputs: GroupNorm (eps 1e-6), `proj_in`, transformer
/// blocks over the `H·W` tokens, `proj_out`, plus the input as a residual.
#[derive(Debug, Clone)]
pub(crate) struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

/// Shape settings of one `Transformer2DModel`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TransformerSettings {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
}

impl Transformer2D {
    pub(crate) fn new(pb: &mut ParamBuilder, prefix: &str, s: TransformerSettings) -> Result<Self> {
        let p = |name: &str| format!("{prefix}.{name}");
        // inner_dim = heads · (channels / heads) = channels for every SD config.
        let inner = s.heads * (s.channels / s.heads);
        let norm = GroupNorm::new(pb, &p("norm"), s.groups, s.channels, 1e-6)?;
        let proj_in = Projection::new(pb, &p("proj_in"), s.channels, inner, s.linear_projection)?;
        let blocks = (0..s.layers)
            .map(|i| {
                let prefix = format!("{prefix}.transformer_blocks.{i}");
                BasicTransformerBlock::new(pb, &prefix, inner, s.context_dim, s.heads)
            })
            .collect::<Result<_>>()?;
        let proj_out = Projection::new(pb, &p("proj_out"), inner, s.channels, s.linear_projection)?;
        Ok(Transformer2D { norm, proj_in, blocks, proj_out })
    }

    pub(crate) fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        let to_tokens = |t: Tensor| -> Result<Tensor> {
            let c = t.dim(1)?;
            t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))
        };
        let from_tokens = |t: Tensor| -> Result<Tensor> {
            let c = t.dim(2)?;
            t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(&normed)?)?,
            Projection::Linear(linear) => linear.forward(&to_tokens(normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&from_tokens(tokens)?)?,
            Projection::Linear(linear) => from_tokens(linear.forward(&tokens)?)?,
        };
        out + x
    }
}

/// `Downsample2D` with a convolution: 3×3, stride 2; with `padding` 0 diffusers pads one
/// column/row of zeros on the right/bottom first.
#[derive(Debug, Clone)]
pub(crate) struct Downsample2D {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample2D {
    pub(crate) fn new(
        pb: &mut ParamBuilder,
        prefix: &str,
        channels: usize,
        padding: usize,
    ) -> Result<Self> {
        let conv = Conv2d::new(pb, &format!("{prefix}.conv"), channels, channels, 3, 2, padding)?;
        Ok(Downsample2D { conv, pad_right_bottom: padding == 0 })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_right_bottom {
            self.conv.forward(&x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)
        } else {
            self.conv.forward(x)
        }
    }
}

/// `Upsample2D` with a convolution: nearest ×2, then 3×3 conv.
#[derive(Debug, Clone)]
pub(crate) struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub(crate) fn new(pb: &mut ParamBuilder, prefix: &str, channels: usize) -> Result<Self> {
        Ok(Upsample2D {
            conv: Conv2d::new(pb, &format!("{prefix}.conv"), channels, channels, 3, 1, 1)?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(&ops::upsample_nearest2x(x)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn timestep_embedding_puts_cos_first_when_flipped() {
        let t = Tensor::new(&[0f32], &Device::Cpu).unwrap();
        let emb: Vec<f32> =
            timestep_embedding(&t, 6, true, 0.0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(emb, vec![1.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
        let emb: Vec<f32> = timestep_embedding(&t, 6, false, 0.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(emb, vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn timestep_embedding_pads_odd_widths_with_a_zero() {
        let t = Tensor::new(&[5f32, 7.0], &Device::Cpu).unwrap();
        let emb = timestep_embedding(&t, 5, true, 1.0).unwrap();
        assert_eq!(emb.dims(), &[2, 5]);
        let last: Vec<f32> = emb.narrow(1, 4, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(last, vec![0.0, 0.0]);
    }
}
