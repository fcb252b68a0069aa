//! The `tiny-sd` kind: a random-weight Stable Diffusion 1.x pipeline at toy sizes (see
//! [`crate::tiny`]), for trying pipelines end to end and for tests, where no pretrained weights
//! can be downloaded.

use sdpipe_stages::api::{
    OutputKind, OutputSpec, ParamSpec, ParamType, StageContext, StageError, StageKind,
};
use sdpipe_stages::params::KindParams;

use crate::tiny::{write_tiny, TinySpec};

pub struct TinySd;

const MODEL: &str = "model";

/// The parameters, defaulting to [`TinySpec::default`]'s sizes.
#[derive(KindParams)]
struct Settings {
    /// Seed of the random weights.
    #[param(default = TinySpec::default().seed, min = 0)]
    seed: u64,
    /// Image side in pixels the pipeline makes by default.
    #[param(default = TinySpec::default().image_size, min = 1)]
    image_size: usize,
    /// UNet channels per block (all blocks but the last have cross-attention).
    #[param(default = TinySpec::default().unet_channels, ty = channels())]
    unet_channels: Vec<usize>,
    /// Resnet layers per UNet and VAE block.
    #[param(default = TinySpec::default().layers_per_block, min = 1)]
    layers_per_block: usize,
    /// Attention heads per UNet block.
    #[param(default = TinySpec::default().attention_heads, min = 1)]
    attention_heads: usize,
    /// VAE channels per block (the VAE downsamples once per extra block).
    #[param(default = TinySpec::default().vae_channels, ty = channels())]
    vae_channels: Vec<usize>,
    /// GroupNorm groups (every channel count must be a multiple).
    #[param(default = TinySpec::default().norm_num_groups, min = 1)]
    norm_num_groups: usize,
    /// CLIP width.
    #[param(default = TinySpec::default().clip_hidden, min = 1)]
    clip_hidden: usize,
    /// CLIP layers.
    #[param(default = TinySpec::default().clip_layers, min = 1)]
    clip_layers: usize,
    /// CLIP heads.
    #[param(default = TinySpec::default().clip_heads, min = 1)]
    clip_heads: usize,
}

/// Channels per block: positive sizes.
fn channels() -> ParamType {
    ParamType::List(Box::new(ParamType::Int { min: Some(1), max: None }))
}

/// A list of channels, which the bounds cannot require to be non-empty.
fn non_empty(name: &str, channels: Vec<usize>) -> Result<Vec<usize>, StageError> {
    if channels.is_empty() {
        return Err(StageError::InvalidParam { param: name.into(), message: "is empty".into() });
    }
    Ok(channels)
}

impl StageKind for TinySd {
    fn name(&self) -> &'static str {
        "tiny-sd"
    }

    fn version(&self) -> u32 {
        2
    }

    fn doc(&self) -> &'static str {
        "Writes a Stable Diffusion 1.x pipeline folder with random weights at toy sizes, exactly \
         in the layout diffusers' save_pretrained writes (model_index.json, unet/, vae/, \
         text_encoder/, tokenizer/ with a small CLIP BPE vocabulary, scheduler/ with SD1.5's \
         PNDM config). Weights are initialised as PyTorch initialises the layers, from `seed`, \
         identically on every machine. For running pipelines without downloading a model."
    }

    fn params(&self) -> Vec<ParamSpec> {
        Settings::specs()
    }

    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "model",
            path: MODEL,
            kind: OutputKind::Dir,
            doc: "The pipeline folder (diffusers layout).",
        }]
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let s = Settings::of(ctx)?;
        let spec = TinySpec {
            seed: s.seed,
            image_size: s.image_size,
            unet_channels: non_empty("unet_channels", s.unet_channels)?,
            layers_per_block: s.layers_per_block,
            attention_heads: s.attention_heads,
            vae_channels: non_empty("vae_channels", s.vae_channels)?,
            norm_num_groups: s.norm_num_groups,
            clip_hidden: s.clip_hidden,
            clip_layers: s.clip_layers,
            clip_heads: s.clip_heads,
            ..TinySpec::default()
        };
        ctx.cancel.check()?;
        write_tiny(&ctx.output_path(MODEL), &spec).map_err(|e| match e {
            crate::PipelineError::Unsupported { message, .. } => {
                StageError::InvalidParam { param: "sizes".into(), message }
            }
            other => other.into(),
        })
    }
}
