//! The `tiny-sd` kind: a random-weight Stable Diffusion 1.x pipeline at toy sizes (see
//! [`crate::tiny`]), for trying pipelines end to end and for tests, where no pretrained weights
//! can be downloaded.

use serde_json::json;

use sdpipe_stages::api::{
    OutputKind, OutputSpec, ParamSpec, ParamType, StageContext, StageError, StageKind,
};

use crate::tiny::{write_tiny, TinySpec};

pub struct TinySd;

const MODEL: &str = "model";

fn sizes(ctx: &StageContext<'_>, name: &str) -> Result<Vec<usize>, StageError> {
    let values: Vec<i64> = ctx.param(name)?;
    if values.is_empty() {
        return Err(StageError::InvalidParam { param: name.into(), message: "is empty".into() });
    }
    values
        .into_iter()
        .map(|v| {
            usize::try_from(v).ok().filter(|&v| v > 0).ok_or_else(|| StageError::InvalidParam {
                param: name.into(),
                message: format!("{v} is not a positive size"),
            })
        })
        .collect()
}

fn size(ctx: &StageContext<'_>, name: &str) -> Result<usize, StageError> {
    let v: i64 = ctx.param(name)?;
    usize::try_from(v).map_err(|_| StageError::InvalidParam {
        param: name.into(),
        message: format!("{v} is negative"),
    })
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
        let d = TinySpec::default();
        let int = |min: i64| ParamType::Int { min: Some(min), max: None };
        let list = || ParamType::List(Box::new(ParamType::Int { min: Some(1), max: None }));
        vec![
            ParamSpec::optional("seed", int(0), json!(d.seed), "Seed of the random weights."),
            ParamSpec::optional(
                "image_size",
                int(1),
                json!(d.image_size),
                "Image side in pixels the pipeline makes by default.",
            ),
            ParamSpec::optional(
                "unet_channels",
                list(),
                json!(d.unet_channels),
                "UNet channels per block (all blocks but the last have cross-attention).",
            ),
            ParamSpec::optional(
                "layers_per_block",
                int(1),
                json!(d.layers_per_block),
                "Resnet layers per UNet and VAE block.",
            ),
            ParamSpec::optional(
                "attention_heads",
                int(1),
                json!(d.attention_heads),
                "Attention heads per UNet block.",
            ),
            ParamSpec::optional(
                "vae_channels",
                list(),
                json!(d.vae_channels),
                "VAE channels per block (the VAE downsamples once per extra block).",
            ),
            ParamSpec::optional(
                "norm_num_groups",
                int(1),
                json!(d.norm_num_groups),
                "GroupNorm groups (every channel count must be a multiple).",
            ),
            ParamSpec::optional("clip_hidden", int(1), json!(d.clip_hidden), "CLIP width."),
            ParamSpec::optional("clip_layers", int(1), json!(d.clip_layers), "CLIP layers."),
            ParamSpec::optional("clip_heads", int(1), json!(d.clip_heads), "CLIP heads."),
        ]
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
        let seed: i64 = ctx.param("seed")?;
        let spec = TinySpec {
            seed: seed as u64,
            image_size: size(ctx, "image_size")?,
            unet_channels: sizes(ctx, "unet_channels")?,
            layers_per_block: size(ctx, "layers_per_block")?,
            attention_heads: size(ctx, "attention_heads")?,
            vae_channels: sizes(ctx, "vae_channels")?,
            norm_num_groups: size(ctx, "norm_num_groups")?,
            clip_hidden: size(ctx, "clip_hidden")?,
            clip_layers: size(ctx, "clip_layers")?,
            clip_heads: size(ctx, "clip_heads")?,
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
