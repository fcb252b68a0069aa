//! The `cmmd` kind: CMMD (Jayasumana et al., "Rethinking FID", CVPR 2024) between reference
//! and generated images, as google-research's `cmmd/` computes it.
//!
//! Where sdpipe follows the reference, and where it cannot:
//! - Reading (`io_util.py`): each image centre-cropped to the square of its shorter side at
//!   offsets `((h - l) // 2, (w - l) // 2)` and resized to the model's input size with Pillow's
//!   bicubic filter (antialiased; byte for byte, see [`crate::clip`]), then float32 `/ 255`.
//! - Embedding (`embedding.py`, and its transformers port that the HF-layout model here
//!   follows): a bicubic resize to the input size (the identity after the reader's resize),
//!   the CLIP normalisation alone (the processor's own resize, crop and rescale off), the
//!   projected image embedding, divided by its L2 norm.
//! - Distance (`distance.py`, [`crate::mmd`]): Gaussian RBF, σ = 10, ×1000, the biased
//!   estimator the code implements (not the unbiased one the paper names), in f64 where the
//!   reference uses float32.
//! - Not followed: the reference drops the images that do not fill a last batch (its batches
//!   are for TPUs; with 10 images and its default batch of 32 it would embed none). sdpipe
//!   embeds every image. Its model is `vit_l14_336px` in scenic/JAX; sdpipe loads the same
//!   OpenAI weights in the transformers layout (`openai/clip-vit-large-patch14-336`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use sdpipe_hub::HubConfig;
use sdpipe_stages::api::{
    Fetch, OutputKind, OutputSpec, ParamSpec, Params, StageContext, StageError, StageKind,
};
use sdpipe_stages::params::KindParams;
use serde_json::json;

use crate::clip::{self, Clip, ClipModel, ModelFiles, ProcessorConfig};
use crate::images::{self, Entry};
use crate::mmd;
use crate::stage_common::{self as common, ImageSets};

const METRICS: &str = "metrics.json";
pub const DEFAULT_MODEL: &str = "openai/clip-vit-large-patch14-336";

/// The parameters; `params` gives `model` its default, [`DEFAULT_MODEL`], and `MODEL_DOC`.
#[derive(KindParams)]
struct Settings {
    #[param(flatten)]
    sets: ImageSets,
    #[param(flatten)]
    clip: ClipModel,
}

const MODEL_DOC: &str = "Hub repository id or local folder of a CLIP model (transformers \
                         layout: config.json, model.safetensors, preprocessor_config.json); \
                         only its image tower is used.";

/// The `cmmd` kind. `hub` overrides the environment's hub settings (tests).
#[derive(Default)]
pub struct Cmmd {
    pub hub: Option<HubConfig>,
}

impl StageKind for Cmmd {
    fn name(&self) -> &'static str {
        "cmmd"
    }

    fn version(&self) -> u32 {
        1
    }

    fn doc(&self) -> &'static str {
        "CMMD (Jayasumana et al. 2024) between ground-truth (`real`) and generated (`fake`) \
         images as google-research/cmmd computes it: CLIP image embeddings (projected, \
         L2-normalised; images centre-cropped square and resized bicubic to the model's size, \
         then CLIP-normalised), MMD with a Gaussian RBF kernel (sigma 10) in its biased form, \
         x1000, computed in float64. Unlike FID it makes no normality assumption and is \
         meaningful at small N. Default model openai/clip-vit-large-patch14-336 (a local \
         folder or hub id, transformers layout; its files are part of the stage key). Writes \
         `metrics.json`."
    }

    fn params(&self) -> Vec<ParamSpec> {
        clip::with_model(Settings::specs(), DEFAULT_MODEL, MODEL_DOC)
    }

    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "metrics",
            path: METRICS,
            kind: OutputKind::File,
            doc: "{\"metric\": \"cmmd\", \"cmmd\", \"n_real\", \"n_fake\", \"model\", \
                  \"image_size\", \"sigma\", \"scale\", \"estimator\", \"preprocessing\", \
                  \"real_split\", \"fake_split\"}",
        }]
    }

    fn threads(&self, _params: &Params) -> usize {
        common::wanted_threads()
    }

    fn external_deps(
        &self,
        params: &Params,
        fetch: Fetch,
    ) -> Result<BTreeMap<String, PathBuf>, StageError> {
        let model = ClipModel::of_params(params)?;
        clip::external_deps(self.hub.as_ref(), &model, clip::WANTS_IMAGE, fetch)
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        common::with_granted_threads(ctx, |ctx| self.distance(ctx))
    }
}

impl Cmmd {
    fn distance(&self, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let settings = Settings::of(ctx)?;
        let (real, fake) = settings.sets.list()?;
        let batch_size = settings.clip.batch.batch_size;
        let resolved = clip::resolve_for_run(self.hub.as_ref(), &settings.clip, clip::WANTS_IMAGE)?;
        let _ = writeln!(
            ctx.log,
            "cmmd: {} real, {} fake images; model {}",
            real.len(),
            fake.len(),
            resolved.describe()
        );
        let device = ctx.candle_device()?;
        let clip = Clip::load(&ModelFiles::of(&resolved)?, &device, false)?;
        ctx.progress.set_total((real.len() + fake.len()) as u64);
        let real_embeds = embed(ctx, &clip, &real, batch_size)?;
        let fake_embeds = embed(ctx, &clip, &fake, batch_size)?;
        let value = mmd::cmmd(&real_embeds, &fake_embeds).map_err(StageError::caused)?;
        let _ = writeln!(ctx.log, "cmmd {value:.6}");
        let size = clip.config.vision_config.image_size;
        let metrics = json!({
            "metric": "cmmd",
            "cmmd": value,
            "n_real": real.len(),
            "n_fake": fake.len(),
            "model": clip::describe_model(&resolved),
            "revision": settings.clip.revision,
            "image_size": size,
            "sigma": mmd::SIGMA,
            "scale": mmd::SCALE,
            "estimator": "biased MMD^2 (V-statistic over all pairs, i = j included), as \
                          google-research/cmmd distance.py; float64",
            "preprocessing": format!(
                "RGB; centre crop to a square, Pillow bicubic resize to {size}x{size}, x/255, \
                 CLIP normalisation (google-research/cmmd io_util.py + embedding.py); \
                 projected image embeddings, L2-normalised"
            ),
            "real_split": settings.sets.real_split,
            "fake_split": settings.sets.fake_split,
        });
        common::write_json(&ctx.output_path(METRICS), &metrics)
    }
}

/// L2-normalised CMMD embeddings of `entries`, in order.
pub(crate) fn embed(
    ctx: &mut StageContext<'_>,
    clip: &Clip,
    entries: &[Entry],
    batch_size: usize,
) -> Result<Vec<Vec<f32>>, StageError> {
    let size = clip.config.vision_config.image_size;
    let mut out = Vec::with_capacity(entries.len());
    for chunk in entries.chunks(batch_size.max(1)) {
        ctx.cancel.check()?;
        let mut pixels = Vec::with_capacity(chunk.len());
        for e in chunk {
            let image = images::load_rgb(&e.path)?;
            let rgb = ProcessorConfig::cmmd_pixels(&image, size);
            pixels.push(clip.processor.normalise_unit(&rgb));
        }
        out.extend(clip.image_embeds(&pixels)?.iter().map(|e| clip::normalized(e)));
        ctx.progress.advance(chunk.len() as u64, "");
    }
    Ok(out)
}
