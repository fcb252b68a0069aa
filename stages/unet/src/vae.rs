//! A differentiable Stable Diffusion VAE (diffusers' `AutoencoderKL`) for training it.
//!
//! candle-transformers' `AutoEncoderKL` is inference-only: its group norms and mid-block
//! attention use fused kernels without a backward, and its `encode` hides the posterior's
//! parameters. This module builds the same architecture (diffusers' module structure and
//! state-dict names: `encoder.*`, `decoder.*`, `quant_conv`, `post_quant_conv`, the mid blocks'
//! single-head attention under `to_q`/`to_k`/`to_v`/`to_out.0`) from this crate's differentiable
//! layers and ops, keeps the weights in trainable `Var`s, and loads and saves a diffusers `vae/`
//! folder. It owns the VAE's config (read from `vae/config.json`, written back as read except
//! for what a trainer updates, such as `scaling_factor`).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Result, Tensor, Var};
use serde_json::{json, Value};

use crate::blocks::Downsample2D;
use crate::error::UNetError;
use crate::layers::{Conv2d, GroupNorm, Linear};
use crate::ops;
use crate::params::{self, ParamBuilder};
use crate::pointwise;

/// diffusers' `AutoencoderKL` hard-codes eps 1e-6 in every norm of the encoder and decoder.
const NORM_EPS: f64 = 1e-6;

/// `Upsample2D`: nearest ×2, then a 3×3 convolution.
#[derive(Debug, Clone)]
struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    fn new(pb: &mut ParamBuilder, prefix: &str, channels: usize) -> Result<Self> {
        Ok(Upsample2D {
            conv: Conv2d::new(pb, &format!("{prefix}.conv"), channels, channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(&ops::upsample_nearest2x(x)?)
    }
}

/// The architecture of an SD-style `AutoencoderKL`.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (decoder blocks have one more).
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    /// Latents are `posterior sample × scaling_factor` (SD1.x: 0.18215).
    pub scaling_factor: f64,
}

impl VaeConfig {
    /// Reads a diffusers `AutoencoderKL` config, applying diffusers' defaults for absent keys and
    /// rejecting by name the keys that select architectures this module does not build.
    pub fn from_json(json: &Value) -> std::result::Result<Self, String> {
        let usize_of = |key: &str, default: usize| -> std::result::Result<usize, String> {
            match json.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| format!("`{key}` must be a non-negative integer, found {v}")),
            }
        };
        let bool_of = |key: &str| -> std::result::Result<bool, String> {
            match json.get(key) {
                None | Some(Value::Null) => Ok(true),
                Some(v) => {
                    v.as_bool().ok_or_else(|| format!("`{key}` must be a boolean, found {v}"))
                }
            }
        };
        let block_out_channels: Vec<usize> = match json.get("block_out_channels") {
            None => vec![64],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().map(|n| n as usize))
                .collect::<Option<_>>()
                .ok_or("`block_out_channels` must be a list of integers")?,
            Some(v) => return Err(format!("`block_out_channels` must be a list, found {v}")),
        };
        if block_out_channels.is_empty() || block_out_channels.contains(&0) {
            return Err("`block_out_channels` must list at least one positive width".into());
        }
        let n = block_out_channels.len();
        for (key, want) in
            [("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")]
        {
            if let Some(types) = json.get(key).and_then(Value::as_array) {
                if types.len() != n || types.iter().any(|t| t.as_str() != Some(want)) {
                    return Err(format!(
                        "`{key}` must be {n} × \"{want}\" (one per block_out_channels entry); \
                         found {types:?}"
                    ));
                }
            }
        }
        if let Some(act) = json.get("act_fn").and_then(Value::as_str) {
            if act != "silu" {
                return Err(format!("`act_fn` is \"{act}\"; only \"silu\" is supported"));
            }
        }
        if !bool_of("mid_block_add_attention")? {
            return Err("`mid_block_add_attention: false` is not supported".into());
        }
        let norm_num_groups = usize_of("norm_num_groups", 32)?;
        if norm_num_groups == 0 || block_out_channels.iter().any(|c| c % norm_num_groups != 0) {
            return Err(format!(
                "`norm_num_groups` {norm_num_groups} must divide every block_out_channels entry \
                 {block_out_channels:?}"
            ));
        }
        let scaling_factor = match json.get("scaling_factor") {
            None | Some(Value::Null) => 0.18215,
            Some(v) => v
                .as_f64()
                .filter(|f| f.is_finite() && *f > 0.0)
                .ok_or_else(|| format!("`scaling_factor` must be a positive number, found {v}"))?,
        };
        let config = VaeConfig {
            in_channels: usize_of("in_channels", 3)?,
            out_channels: usize_of("out_channels", 3)?,
            block_out_channels,
            layers_per_block: usize_of("layers_per_block", 1)?,
            latent_channels: usize_of("latent_channels", 4)?,
            norm_num_groups,
            use_quant_conv: bool_of("use_quant_conv")?,
            use_post_quant_conv: bool_of("use_post_quant_conv")?,
            scaling_factor,
        };
        if config.in_channels == 0 || config.out_channels == 0 || config.latent_channels == 0 {
            return Err(
                "`in_channels`, `out_channels` and `latent_channels` must be positive".into()
            );
        }
        config.check_sizes()?;
        Ok(config)
    }

    /// Every size within sdpipe's caps ([`crate::limits`]): nothing is built from a number
    /// alone.
    fn check_sizes(&self) -> std::result::Result<(), String> {
        use crate::limits::{check, check_block_widths, MAX_CHANNELS, MAX_LAYERS};
        check_block_widths(&self.block_out_channels)?;
        check("in_channels", self.in_channels, MAX_CHANNELS)?;
        check("out_channels", self.out_channels, MAX_CHANNELS)?;
        check("latent_channels", self.latent_channels, MAX_CHANNELS)?;
        if self.layers_per_block > MAX_LAYERS {
            return Err(format!(
                "`layers_per_block` = {} is more than {MAX_LAYERS} (sdpipe's cap on what a \
                 config may ask for)",
                self.layers_per_block
            ));
        }
        Ok(())
    }

    /// The config as diffusers writes it.
    pub fn to_json(&self) -> Value {
        let n = self.block_out_channels.len();
        json!({
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": vec!["DownEncoderBlock2D"; n],
            "up_block_types": vec!["UpDecoderBlock2D"; n],
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "scaling_factor": self.scaling_factor,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "mid_block_add_attention": true,
        })
    }

    /// Pixels per latent along each side: the encoder halves the image once per extra block.
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// `ResnetBlock2D` as the VAE uses it: no time embedding, eps 1e-6, output scale 1.
#[derive(Debug, Clone)]
struct Resnet {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl Resnet {
    fn new(
        pb: &mut ParamBuilder,
        prefix: &str,
        inputs: usize,
        outputs: usize,
        groups: usize,
    ) -> Result<Self> {
        let p = |name: &str| format!("{prefix}.{name}");
        Ok(Resnet {
            norm1: GroupNorm::new(pb, &p("norm1"), groups, inputs, NORM_EPS)?,
            conv1: Conv2d::new(pb, &p("conv1"), inputs, outputs, 3, 1, 1)?,
            norm2: GroupNorm::new(pb, &p("norm2"), groups, outputs, NORM_EPS)?,
            conv2: Conv2d::new(pb, &p("conv2"), outputs, outputs, 3, 1, 1)?,
            conv_shortcut: if inputs != outputs {
                Some(Conv2d::new(pb, &p("conv_shortcut"), inputs, outputs, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&pointwise::silu(&self.norm1.forward(x)?)?)?;
        let h = self.conv2.forward(&pointwise::silu(&self.norm2.forward(&h)?)?)?;
        match &self.conv_shortcut {
            Some(conv) => conv.forward(x)? + h,
            None => x + h,
        }
    }
}

/// The mid block's `Attention`: group norm, one head as wide as the channels (diffusers sets
/// `attention_head_dim` to the last block width), q/k/v/out projections with biases, residual.
#[derive(Debug, Clone)]
struct MidAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl MidAttention {
    fn new(pb: &mut ParamBuilder, prefix: &str, channels: usize, groups: usize) -> Result<Self> {
        let p = |name: &str| format!("{prefix}.{name}");
        Ok(MidAttention {
            group_norm: GroupNorm::new(pb, &p("group_norm"), groups, channels, NORM_EPS)?,
            to_q: Linear::new(pb, &p("to_q"), channels, channels, true)?,
            to_k: Linear::new(pb, &p("to_k"), channels, channels, true)?,
            to_v: Linear::new(pb, &p("to_v"), channels, channels, true)?,
            to_out: Linear::new(pb, &p("to_out.0"), channels, channels, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self.group_norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?;
        let tokens = tokens.contiguous()?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        let out = ops::attention(&q, &k, &v, 1.0 / (c as f64).sqrt())?;
        let out = self.to_out.forward(&out)?.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + x
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, attention, resnet.
#[derive(Debug, Clone)]
struct MidBlock {
    first: Resnet,
    attention: MidAttention,
    second: Resnet,
}

impl MidBlock {
    fn new(pb: &mut ParamBuilder, prefix: &str, channels: usize, groups: usize) -> Result<Self> {
        Ok(MidBlock {
            first: Resnet::new(pb, &format!("{prefix}.resnets.0"), channels, channels, groups)?,
            attention: MidAttention::new(pb, &format!("{prefix}.attentions.0"), channels, groups)?,
            second: Resnet::new(pb, &format!("{prefix}.resnets.1"), channels, channels, groups)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.second.forward(&self.attention.forward(&self.first.forward(x)?)?)
    }
}

/// `DownEncoderBlock2D` / `UpDecoderBlock2D`: resnets, then an optional resampling conv.
#[derive(Debug, Clone)]
struct Block {
    resnets: Vec<Resnet>,
    downsample: Option<Downsample2D>,
    upsample: Option<Upsample2D>,
}

impl Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for resnet in &self.resnets {
            x = resnet.forward(&x)?;
        }
        if let Some(down) = &self.downsample {
            x = down.forward(&x)?;
        }
        if let Some(up) = &self.upsample {
            x = up.forward(&x)?;
        }
        Ok(x)
    }
}

/// The encoder or the decoder: conv_in, blocks and mid block (in the half's order), norm, SiLU,
/// conv_out.
#[derive(Debug, Clone)]
struct Half {
    conv_in: Conv2d,
    blocks: Vec<Block>,
    mid: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    /// The decoder runs its mid block before the up blocks, the encoder after the down blocks.
    mid_first: bool,
}

impl Half {
    fn encoder(pb: &mut ParamBuilder, c: &VaeConfig) -> Result<Self> {
        let widths = &c.block_out_channels;
        let g = c.norm_num_groups;
        let conv_in = Conv2d::new(pb, "encoder.conv_in", c.in_channels, widths[0], 3, 1, 1)?;
        let mut blocks = Vec::with_capacity(widths.len());
        for (i, &out) in widths.iter().enumerate() {
            let mut input = if i == 0 { widths[0] } else { widths[i - 1] };
            let prefix = format!("encoder.down_blocks.{i}");
            let mut resnets = Vec::with_capacity(c.layers_per_block);
            for j in 0..c.layers_per_block {
                resnets.push(Resnet::new(pb, &format!("{prefix}.resnets.{j}"), input, out, g)?);
                input = out;
            }
            let downsample = if i + 1 < widths.len() {
                // Padding 0: diffusers pads one zero row/column on the bottom/right itself.
                Some(Downsample2D::new(pb, &format!("{prefix}.downsamplers.0"), out, 0)?)
            } else {
                None
            };
            blocks.push(Block { resnets, downsample, upsample: None });
        }
        let last = *widths.last().expect("validated non-empty");
        Ok(Half {
            conv_in,
            blocks,
            mid: MidBlock::new(pb, "encoder.mid_block", last, g)?,
            conv_norm_out: GroupNorm::new(pb, "encoder.conv_norm_out", g, last, NORM_EPS)?,
            conv_out: Conv2d::new(pb, "encoder.conv_out", last, 2 * c.latent_channels, 3, 1, 1)?,
            mid_first: false,
        })
    }

    fn decoder(pb: &mut ParamBuilder, c: &VaeConfig) -> Result<Self> {
        let reversed: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let g = c.norm_num_groups;
        let last = reversed[0];
        let conv_in = Conv2d::new(pb, "decoder.conv_in", c.latent_channels, last, 3, 1, 1)?;
        let mid = MidBlock::new(pb, "decoder.mid_block", last, g)?;
        let mut blocks = Vec::with_capacity(reversed.len());
        for (i, &out) in reversed.iter().enumerate() {
            let mut input = if i == 0 { reversed[0] } else { reversed[i - 1] };
            let prefix = format!("decoder.up_blocks.{i}");
            let mut resnets = Vec::with_capacity(c.layers_per_block + 1);
            for j in 0..c.layers_per_block + 1 {
                resnets.push(Resnet::new(pb, &format!("{prefix}.resnets.{j}"), input, out, g)?);
                input = out;
            }
            let upsample = if i + 1 < reversed.len() {
                Some(Upsample2D::new(pb, &format!("{prefix}.upsamplers.0"), out)?)
            } else {
                None
            };
            blocks.push(Block { resnets, downsample: None, upsample });
        }
        let first = c.block_out_channels[0];
        Ok(Half {
            conv_in,
            blocks,
            mid,
            conv_norm_out: GroupNorm::new(pb, "decoder.conv_norm_out", g, first, NORM_EPS)?,
            conv_out: Conv2d::new(pb, "decoder.conv_out", first, c.out_channels, 3, 1, 1)?,
            mid_first: true,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        if self.mid_first {
            x = self.mid.forward(&x)?;
        }
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        if !self.mid_first {
            x = self.mid.forward(&x)?;
        }
        self.conv_out.forward(&pointwise::silu(&self.conv_norm_out.forward(&x)?)?)
    }
}

/// The encoder's diagonal Gaussian over latents, each `(B, latent_channels, H/f, W/f)`.
#[derive(Debug, Clone)]
pub struct Posterior {
    pub mean: Tensor,
    /// The log-variance clamped to [−30, 20], as diffusers' `DiagonalGaussianDistribution`.
    pub logvar: Tensor,
}

impl Posterior {
    /// `mean + exp(½·logvar) · noise` (the reparameterised sample; differentiable).
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        &self.mean + (self.logvar.affine(0.5, 0.0)?.exp()? * noise)?
    }

    /// KL divergence to N(0, I) per example, summed over the latent elements (diffusers'
    /// `kl()`): `½ · Σ (mean² + var − 1 − logvar)`, shape `(B,)`.
    pub fn kl(&self) -> Result<Tensor> {
        let terms = ((self.mean.sqr()? + self.logvar.exp()?)? - 1.0)?.sub(&self.logvar)?;
        terms.flatten_from(1)?.sum(1)? * 0.5
    }
}

/// A diffusers `AutoencoderKL` whose parameters are trainable `Var`s named as in its state dict.
pub struct Vae {
    config: VaeConfig,
    /// The config JSON as read; written back with the current `scaling_factor`.
    config_json: Value,
    vars: BTreeMap<String, Var>,
    encoder: Half,
    decoder: Half,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    device: Device,
}

impl std::fmt::Debug for Vae {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vae")
            .field("config", &self.config)
            .field("parameters", &self.parameter_count())
            .finish()
    }
}

const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

impl Vae {
    /// Loads a diffusers VAE folder: `config.json` + `diffusion_pytorch_model.safetensors`.
    pub fn from_pretrained(dir: &Path, device: &Device) -> std::result::Result<Self, UNetError> {
        let config_path = dir.join("config.json");
        let text = crate::limits::read_config_text(&config_path)
            .map_err(|source| UNetError::Io { path: config_path.clone(), source })?;
        let config_error =
            |message: String| UNetError::Config { path: config_path.clone(), message };
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| config_error(format!("not valid JSON: {e}")))?;
        let config = VaeConfig::from_json(&json).map_err(config_error)?;
        let pb = ParamBuilder::from_file(&dir.join(WEIGHTS), device)?.for_model("VAE");
        pb.build_checked(|pb| Self::build(config.clone(), json.clone(), pb, device))
    }

    /// A randomly initialised VAE (torch's default initialisation), reproducible from `seed`.
    pub fn random(
        config: VaeConfig,
        seed: u64,
        device: &Device,
    ) -> std::result::Result<Self, UNetError> {
        let json = config.to_json();
        Self::build(config, json, ParamBuilder::random(seed, device), device)
    }

    fn build(
        config: VaeConfig,
        config_json: Value,
        mut pb: ParamBuilder,
        device: &Device,
    ) -> std::result::Result<Self, UNetError> {
        let encoder = Half::encoder(&mut pb, &config)?;
        let decoder = Half::decoder(&mut pb, &config)?;
        let l2 = 2 * config.latent_channels;
        let quant_conv = if config.use_quant_conv {
            Some(Conv2d::new(&mut pb, "quant_conv", l2, l2, 1, 1, 0)?)
        } else {
            None
        };
        let l = config.latent_channels;
        let post_quant_conv = if config.use_post_quant_conv {
            Some(Conv2d::new(&mut pb, "post_quant_conv", l, l, 1, 1, 0)?)
        } else {
            None
        };
        let vars = pb.finish()?;
        Ok(Vae {
            config,
            config_json,
            vars,
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The trainable parameters by diffusers state-dict name.
    pub fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    /// The total number of scalar parameters.
    pub fn parameter_count(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// Sets the latent scaling factor written to `config.json` by [`Vae::save_pretrained`].
    pub fn set_scaling_factor(&mut self, scaling_factor: f64) {
        self.config.scaling_factor = scaling_factor;
        if let Value::Object(map) = &mut self.config_json {
            map.insert("scaling_factor".into(), json!(scaling_factor));
        }
    }

    fn check_input(&self, x: &Tensor, channels: usize, what: &str) -> Result<()> {
        let (_, c, h, w) = x.dims4()?;
        if c != channels {
            candle_core::bail!("the VAE {what} takes {channels} channels, got {c}")
        }
        let f = if what == "encoder" { self.config.downscale() } else { 1 };
        if h % f != 0 || w % f != 0 {
            candle_core::bail!("the VAE encoder needs sides that are multiples of {f}, got {h}×{w}")
        }
        Ok(())
    }

    /// The posterior of images in [−1, 1], `(B, in_channels, H, W)`; differentiable.
    pub fn encode(&self, pixels: &Tensor) -> Result<Posterior> {
        self.check_input(pixels, self.config.in_channels, "encoder")?;
        let mut moments = self.encoder.forward(pixels)?;
        if let Some(conv) = &self.quant_conv {
            moments = conv.forward(&moments)?;
        }
        let l = self.config.latent_channels;
        Ok(Posterior {
            mean: moments.narrow(1, 0, l)?,
            logvar: moments.narrow(1, l, l)?.clamp(-30f32, 20f32)?,
        })
    }

    /// Images (about [−1, 1]) from unscaled latents `(B, latent_channels, h, w)`; differentiable.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.check_input(latents, self.config.latent_channels, "decoder")?;
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents)?,
            None => latents.clone(),
        };
        self.decoder.forward(&z)
    }

    /// Writes `diffusion_pytorch_model.safetensors` (f32, diffusers names) to `path`.
    pub fn save(&self, path: &Path) -> std::result::Result<(), UNetError> {
        params::save(&self.vars, path)
    }

    /// Writes a diffusers VAE folder: `config.json` (as loaded, with the current scaling factor)
    /// and the weights.
    pub fn save_pretrained(&self, dir: &Path) -> std::result::Result<(), UNetError> {
        std::fs::create_dir_all(dir)
            .map_err(|source| UNetError::Io { path: dir.to_path_buf(), source })?;
        let config_path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&self.config_json).expect("JSON values serialise");
        std::fs::write(&config_path, text + "\n")
            .map_err(|source| UNetError::Io { path: config_path, source })?;
        self.save(&dir.join(WEIGHTS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    /// Two blocks (one downsampling), 8 groups: every kind of module, kept tiny.
    fn small_config() -> VaeConfig {
        VaeConfig::from_json(&json!({
            "block_out_channels": [8, 16],
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "latent_channels": 4,
        }))
        .unwrap()
    }

    fn pixels(b: usize, side: usize, seed: u64) -> Tensor {
        let n = b * 3 * side * side;
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
        let values: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(values, (b, 3, side, side), &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    fn max_abs(a: &Tensor) -> f32 {
        a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    #[test]
    fn absent_config_keys_take_diffusers_defaults() {
        let c = VaeConfig::from_json(&json!({"block_out_channels": [32]})).unwrap();
        assert_eq!((c.in_channels, c.out_channels, c.latent_channels), (3, 3, 4));
        assert_eq!((c.layers_per_block, c.norm_num_groups), (1, 32));
        assert!(c.use_quant_conv && c.use_post_quant_conv);
        assert_eq!(c.scaling_factor, 0.18215);
    }

    #[test]
    fn unsupported_architectures_are_rejected_by_name() {
        let cases = [
            (json!({"act_fn": "gelu"}), "act_fn"),
            (json!({"mid_block_add_attention": false}), "mid_block_add_attention"),
            (json!({"block_out_channels": [32, 64], "norm_num_groups": 24}), "norm_num_groups"),
            (
                json!({"block_out_channels": [32], "down_block_types": ["AttnDownEncoderBlock2D"]}),
                "down_block_types",
            ),
            (json!({"scaling_factor": -1.0}), "scaling_factor"),
        ];
        for (config, key) in cases {
            let message = VaeConfig::from_json(&config).unwrap_err();
            assert!(message.contains(key), "{config}: {message}");
        }
    }

    #[test]
    fn the_latents_are_downscaled_once_per_extra_block() {
        let vae = Vae::random(small_config(), 0, &Device::Cpu).unwrap();
        let posterior = vae.encode(&pixels(2, 8, 1)).unwrap();
        assert_eq!(posterior.mean.dims(), &[2, 4, 4, 4]);
        assert_eq!(posterior.logvar.dims(), &[2, 4, 4, 4]);
        assert_eq!(vae.decode(&posterior.mean).unwrap().dims(), &[2, 3, 8, 8]);
    }

    #[test]
    fn gradients_of_a_reconstruction_and_kl_loss_reach_every_parameter() {
        let vae = Vae::random(small_config(), 1, &Device::Cpu).unwrap();
        let x = pixels(2, 8, 2);
        let posterior = vae.encode(&x).unwrap();
        let noise = Tensor::randn(0f32, 1.0, posterior.mean.shape(), &Device::Cpu).unwrap();
        let recon = vae.decode(&posterior.sample(&noise).unwrap()).unwrap();
        let loss = ((recon - &x).unwrap().abs().unwrap().mean_all().unwrap()
            + (posterior.kl().unwrap().mean_all().unwrap() * 1e-3).unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in vae.vars() {
            let grad = grads.get(var).unwrap_or_else(|| panic!("no gradient for `{name}`"));
            let norm: f32 = grad.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(norm.is_finite() && norm > 0.0, "`{name}`: gradient norm² {norm}");
        }
    }

    #[test]
    fn the_kl_is_zero_for_the_standard_normal_and_positive_otherwise() {
        let zeros = Tensor::zeros((2, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let standard = Posterior { mean: zeros.clone(), logvar: zeros.clone() };
        assert_eq!(standard.kl().unwrap().to_vec1::<f32>().unwrap(), vec![0.0, 0.0]);
        // mean 1, var e: ½·(1 + e − 1 − 1) per element, 16 elements per example.
        let shifted = Posterior { mean: (&zeros + 1.0).unwrap(), logvar: (&zeros + 1.0).unwrap() };
        let want = 0.5 * (1.0 + std::f32::consts::E - 2.0) * 16.0;
        for kl in shifted.kl().unwrap().to_vec1::<f32>().unwrap() {
            assert!((kl - want).abs() < 1e-4, "{kl} vs {want}");
        }
    }

    /// The reconstruction of `pixels(2, 8, 7)` through the posterior mean and every parameter's
    /// gradient of its loss (by name), computed on `device`, returned on the CPU.
    fn reconstruction_and_gradients(device: &Device) -> (Tensor, BTreeMap<String, Tensor>) {
        let vae = Vae::random(small_config(), 7, device).unwrap();
        let x = pixels(2, 8, 7).to_device(device).unwrap();
        let posterior = vae.encode(&x).unwrap();
        let recon = vae.decode(&posterior.mean).unwrap();
        let loss = ((&recon - &x).unwrap().sqr().unwrap().mean_all().unwrap()
            + (posterior.kl().unwrap().mean_all().unwrap() * 1e-3).unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
        let grads = vae.vars().iter().map(|(n, v)| (n.clone(), cpu(grads.get(v).unwrap())));
        (cpu(&recon), grads.collect())
    }

    /// Tolerance: 1e-4 of each tensor's scale (its largest magnitude, at least 1e-4), for f32
    /// sums in other orders through the network (measured on the CPU: at most 7e-6). The floor
    /// is for gradients that vanish up to rounding, as the key projection's bias (softmax is
    /// invariant to it).
    #[test]
    fn on_the_generic_path_the_vae_matches_the_cpu_kernels_forward_and_gradients() {
        let (recon, grads) = reconstruction_and_gradients(&Device::Cpu);
        for device in crate::device_path::test_devices() {
            let (generic_recon, generic_grads) = {
                let _generic = crate::device_path::force_generic_path();
                reconstruction_and_gradients(&device)
            };
            let close = |what: &str, ours: &Tensor, reference: &Tensor| {
                let (diff, scale) = (max_abs_diff(ours, reference), max_abs(reference).max(1e-4));
                assert!(diff <= 1e-4 * scale, "{what} on {device:?}: max |Δ| {diff:e}, {scale:e}");
            };
            close("reconstruction", &generic_recon, &recon);
            for (name, g) in &grads {
                close(name, &generic_grads[name], g);
            }
        }
    }

    #[test]
    fn saved_weights_and_config_load_back_to_the_same_model() {
        let dir = tempfile::tempdir().unwrap();
        let mut vae = Vae::random(small_config(), 3, &Device::Cpu).unwrap();
        vae.set_scaling_factor(0.5);
        vae.save_pretrained(dir.path()).unwrap();
        let loaded = Vae::from_pretrained(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(loaded.config().scaling_factor, 0.5);
        let x = pixels(1, 8, 4);
        let (a, b) = (vae.encode(&x).unwrap().mean, loaded.encode(&x).unwrap().mean);
        assert_eq!(max_abs_diff(&a, &b), 0.0);
    }

    #[test]
    fn weights_that_do_not_fit_the_config_are_reported_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        Vae::random(small_config(), 3, &Device::Cpu).unwrap().save_pretrained(dir.path()).unwrap();
        let wider = json!({"block_out_channels": [8, 32], "norm_num_groups": 4});
        std::fs::write(dir.path().join("config.json"), wider.to_string()).unwrap();
        let message = Vae::from_pretrained(dir.path(), &Device::Cpu).unwrap_err().to_string();
        assert!(message.contains(WEIGHTS) && message.contains("shape"), "{message}");
    }

    /// Our forward against candle-transformers' inference `AutoEncoderKL` on the same weights
    /// (SD's VAE layout at tiny widths: three blocks, 32 groups, so 32 px → 8×8 latents).
    ///
    /// candle's `encode` only exposes a *random* posterior sample, so the test pins the
    /// log-variance half of `quant_conv` to −60 (clamped to −30 by both): the sample is then
    /// the mean to within exp(−15)·|ε| ≈ 3e-7·|ε|. Tolerance: 1e-4 of the output's scale —
    /// both sides compute in f32 but normalise and attend in different orders of operation
    /// (measured: max |Δ| 1e-6 to 4e-6 at output scales 1.2 to 1.6).
    #[test]
    fn forward_matches_candle_transformers_autoencoder_kl() {
        use candle_transformers::models::stable_diffusion::vae::{
            AutoEncoderKL, AutoEncoderKLConfig,
        };
        let config = VaeConfig::from_json(&json!({
            "block_out_channels": [32, 32, 64],
            "layers_per_block": 1,
            "norm_num_groups": 32,
        }))
        .unwrap();
        let vae = Vae::random(config.clone(), 5, &Device::Cpu).unwrap();
        let quant = &vae.vars()["quant_conv.weight"];
        let w = quant.as_tensor().clone();
        let pinned = Tensor::cat(
            &[w.narrow(0, 0, 4).unwrap(), w.narrow(0, 4, 4).unwrap().zeros_like().unwrap()],
            0,
        )
        .unwrap();
        quant.set(&pinned).unwrap();
        let bias = &vae.vars()["quant_conv.bias"];
        let b = bias.as_tensor().clone();
        let minus = (b.narrow(0, 4, 4).unwrap().zeros_like().unwrap() - 60.0).unwrap();
        bias.set(&Tensor::cat(&[b.narrow(0, 0, 4).unwrap(), minus], 0).unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        vae.save_pretrained(dir.path()).unwrap();

        let weights = dir.path().join(WEIGHTS);
        // SAFETY: a file this test wrote and nothing else touches.
        let vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu)
        }
        .unwrap();
        let candle_config = AutoEncoderKLConfig {
            block_out_channels: config.block_out_channels.clone(),
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 32,
            use_quant_conv: true,
            use_post_quant_conv: true,
        };
        let reference = AutoEncoderKL::new(vb, 3, 3, candle_config).unwrap();

        let x = pixels(2, 32, 6);
        let ours = vae.encode(&x).unwrap();
        assert_eq!(ours.mean.dims(), &[2, 4, 8, 8]);
        let decoded = vae.decode(&ours.mean).unwrap();
        // candle's VAE attention mixes the images of a batch (a known candle 0.11.1 bug; the
        // sampler also decodes one image at a time), so the reference runs per image.
        let per_image = |f: &dyn Fn(&Tensor) -> Tensor, batch: &Tensor| {
            let parts: Vec<Tensor> = (0..2).map(|i| f(&batch.narrow(0, i, 1).unwrap())).collect();
            Tensor::cat(&parts, 0).unwrap()
        };
        let theirs = per_image(&|x| reference.encode(x).unwrap().sample().unwrap(), &x);
        let scale = max_abs(&ours.mean);
        let diff = max_abs_diff(&ours.mean, &theirs);
        eprintln!("encoder: max |Δ| {diff:e} at scale {scale}");
        assert!(diff <= 1e-4 * scale, "encoder: max |Δ| {diff} at scale {scale}");

        let reference_decoded = per_image(&|z| reference.decode(z).unwrap(), &ours.mean);
        let scale = max_abs(&reference_decoded);
        let diff = max_abs_diff(&decoded, &reference_decoded);
        eprintln!("decoder: max |Δ| {diff:e} at scale {scale}");
        assert!(diff <= 1e-4 * scale, "decoder: max |Δ| {diff} at scale {scale}");
    }

    #[test]
    fn absurd_channels_are_refused_by_the_config() {
        let err = VaeConfig::from_json(&json!({"block_out_channels": [32, 1_000_000_000u64]}))
            .unwrap_err();
        assert!(err.contains("`block_out_channels`[1] = 1000000000 is outside"), "{err}");
    }

    #[test]
    fn more_blocks_than_the_cap_are_refused() {
        let err = VaeConfig::from_json(&json!({"block_out_channels": vec![32; 65]})).unwrap_err();
        assert!(err.contains("lists 65 blocks"), "{err}");
    }

    #[test]
    fn absurd_latent_channels_are_refused() {
        let err = VaeConfig::from_json(&json!({"latent_channels": 1u64 << 40})).unwrap_err();
        assert!(err.contains("`latent_channels`"), "{err}");
    }

    #[test]
    fn weights_that_disagree_with_the_config_are_named_from_their_header() {
        let dir = tempfile::tempdir().unwrap();
        Vae::random(small_config(), 3, &Device::Cpu).unwrap().save_pretrained(dir.path()).unwrap();
        let config = dir.path().join("config.json");
        let mut json: Value =
            serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
        json["block_out_channels"] = json!([16, 16]);
        std::fs::write(&config, json.to_string()).unwrap();
        let err = Vae::from_pretrained(dir.path(), &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("do not match the VAE described by config.json"), "{err}");
        assert!(err.contains("encoder.conv_in.weight` has shape [8, 3, 3, 3]"), "{err}");
    }
}
