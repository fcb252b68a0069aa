//! The frozen VAE's encoder, returning the latent posterior's parameters, and the script's
//! posterior sample.
//!
//! candle-transformers' `AutoEncoderKL::encode` hides the posterior's mean and log-variance and
//! samples with an unseeded generator and without diffusers' clamp of the log-variance to
//! [-30, 20], so training assembles the same encoder from candle-transformers' public blocks
//! (same weight names: `encoder.*`, `quant_conv.*`) and samples itself:
//! `latents = (mean + exp(½·clamp(logvar, −30, 20))·ε) · scaling_factor`, `ε` from the
//! micro-batch's stream.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    DownEncoderBlock2D, DownEncoderBlock2DConfig, UNetMidBlock2D, UNetMidBlock2DConfig,
};
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKLConfig;

/// `AutoencoderKL`'s encoder half, inference only.
pub struct VaeEncoder {
    conv_in: candle_nn::Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: candle_nn::GroupNorm,
    conv_out: candle_nn::Conv2d,
    quant_conv: Option<candle_nn::Conv2d>,
}

/// The posterior's parameters, each `(B, latent_channels, H/f, W/f)`.
pub struct Posterior {
    pub mean: Tensor,
    pub logvar: Tensor,
}

impl VaeEncoder {
    /// Loads the encoder from `vb` rooted at the VAE's weights (diffusers names).
    pub fn new(vb: VarBuilder, in_channels: usize, config: &AutoEncoderKLConfig) -> Result<Self> {
        let channels = &config.block_out_channels;
        let padded = candle_nn::Conv2dConfig { padding: 1, ..Default::default() };
        let conv_in =
            candle_nn::conv2d(in_channels, channels[0], 3, padded, vb.pp("encoder.conv_in"))?;
        let mut down_blocks = Vec::with_capacity(channels.len());
        for (index, &out) in channels.iter().enumerate() {
            let input = if index == 0 { channels[0] } else { channels[index - 1] };
            let block_config = DownEncoderBlock2DConfig {
                num_layers: config.layers_per_block,
                resnet_eps: 1e-6,
                resnet_groups: config.norm_num_groups,
                add_downsample: index + 1 < channels.len(),
                // diffusers' encoder pads (0, 1, 0, 1) itself before a stride-2 convolution.
                downsample_padding: 0,
                ..Default::default()
            };
            let block_vb = vb.pp(format!("encoder.down_blocks.{index}"));
            down_blocks.push(DownEncoderBlock2D::new(block_vb, input, out, block_config)?);
        }
        let last = *channels.last().expect("at least one VAE block");
        let mid_config = UNetMidBlock2DConfig {
            resnet_eps: 1e-6,
            output_scale_factor: 1.0,
            attn_num_head_channels: None,
            resnet_groups: Some(config.norm_num_groups),
            ..Default::default()
        };
        let mid_block = UNetMidBlock2D::new(vb.pp("encoder.mid_block"), last, None, mid_config)?;
        let conv_norm_out = candle_nn::group_norm(
            config.norm_num_groups,
            last,
            1e-6,
            vb.pp("encoder.conv_norm_out"),
        )?;
        let latent = config.latent_channels;
        let conv_out = candle_nn::conv2d(last, 2 * latent, 3, padded, vb.pp("encoder.conv_out"))?;
        let quant_conv = if config.use_quant_conv {
            let plain = candle_nn::Conv2dConfig::default();
            Some(candle_nn::conv2d(2 * latent, 2 * latent, 1, plain, vb.pp("quant_conv"))?)
        } else {
            None
        };
        Ok(VaeEncoder { conv_in, down_blocks, mid_block, conv_norm_out, conv_out, quant_conv })
    }

    /// The posterior of images in [-1, 1], `(B, 3, H, W)`.
    pub fn encode(&self, pixels: &Tensor) -> Result<Posterior> {
        let mut xs = pixels.apply(&self.conv_in)?;
        for block in &self.down_blocks {
            xs = xs.apply(block)?;
        }
        let xs = self.mid_block.forward(&xs, None)?.apply(&self.conv_norm_out)?;
        let mut moments = candle_nn::ops::silu(&xs)?.apply(&self.conv_out)?;
        if let Some(quant_conv) = &self.quant_conv {
            moments = quant_conv.forward(&moments)?;
        }
        let halves = moments.chunk(2, 1)?;
        Ok(Posterior { mean: halves[0].clone(), logvar: halves[1].clone() })
    }
}

impl Posterior {
    /// `(mean + exp(½·clamp(logvar, −30, 20))·noise) · scaling_factor`.
    pub fn scaled_sample(&self, noise: &Tensor, scaling_factor: f64) -> Result<Tensor> {
        let std = (self.logvar.clamp(-30f32, 20f32)? * 0.5)?.exp()?;
        (&self.mean + (std * noise)?)? * scaling_factor
    }
}
