//! The `clip-score` kind: how well each sampled image matches the caption it was sampled from,
//! as torchmetrics' `CLIPScore` computes it (`functional/multimodal/clip_score.py`).
//!
//! Per image: `100 · cos(E_I, E_C)` with E_I, E_C CLIP's *projected* image and text features,
//! each divided by its L2 norm; the caption's tokens cut to the text model's positions (77 for
//! OpenAI CLIP; torchmetrics warns and cuts). The metric is `max(mean(100 · cos), 0)`:
//! torchmetrics clamps the mean, not each image. `per_image.jsonl` gives each image's raw
//! `100 · cos` and its clamped form `max(100 · cos, 0)` (the formula's per-image reading), so a
//! bootstrap over images can use either.
//!
//! Images are preprocessed as `CLIPImageProcessor` does with its PIL backend (the processor of
//! transformers 4, which published CLIP scores used): shorter side to the model's size with
//! Pillow's bicubic filter, centre crop, rescale, normalise. transformers 5's default
//! torchvision backend resizes differently by up to a level (tests/parity/clip.py records it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sdpipe_hub::HubConfig;
use sdpipe_stages::api::{
    Fetch, OutputKind, OutputSpec, ParamSpec, Params, StageContext, StageError, StageKind,
};
use sdpipe_stages::params::{Input, KindParams};
use serde::Deserialize;
use serde_json::json;

use crate::clip::{self, Clip, ClipModel, ModelFiles};
use crate::images;
use crate::stage_common as common;

const METRICS: &str = "metrics.json";
const PER_IMAGE: &str = "per_image.jsonl";
pub const DEFAULT_MODEL: &str = "openai/clip-vit-large-patch14";

/// The parameters; `params` gives `model` its default, [`DEFAULT_MODEL`], and `MODEL_DOC`.
#[derive(KindParams)]
struct Settings {
    /// The images: a folder, e.g. a `sample` stage's `images`.
    #[param(input)]
    samples: Input,
    /// Their captions: the same `sample` stage's `samples` ({id, file_name, prompt} lines), or
    /// {file_name, text} lines; file names are relative to `samples`.
    #[param(input)]
    samples_jsonl: Input,
    #[param(flatten)]
    clip: ClipModel,
}

const MODEL_DOC: &str = "Hub repository id or local folder of a CLIP model (CLIPModel, \
                         transformers layout: config.json, model.safetensors, tokenizer.json, \
                         preprocessor_config.json).";

/// The `clip-score` kind. `hub` overrides the environment's hub settings (tests).
#[derive(Default)]
pub struct ClipScore {
    pub hub: Option<HubConfig>,
}

/// One line of the captions listing: a `sample` stage's `samples.jsonl` ({id, file_name,
/// prompt, ...}) or an imagefolder's `metadata.jsonl` ({file_name, text}).
#[derive(Deserialize)]
struct Line {
    #[serde(default)]
    id: Option<String>,
    file_name: String,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    text: Option<String>,
}

/// An image and the caption it is scored against.
pub struct Pair {
    pub id: String,
    pub file_name: String,
    pub path: PathBuf,
    pub caption: String,
}

/// The pairs of a listing, in its order; every listed image must exist.
pub fn read_pairs(images: &Path, listing: &Path) -> Result<Vec<Pair>, StageError> {
    let text = std::fs::read_to_string(listing)
        .map_err(|e| StageError::io(format!("reading {}", listing.display()), e))?;
    let mut pairs = Vec::new();
    for (n, raw) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let line: Line = serde_json::from_str(raw).map_err(|e| {
            StageError::failed(format!(
                "{} line {}: {e} (expected {{\"file_name\", \"prompt\"}} as `sample` writes, or \
                 {{\"file_name\", \"text\"}})",
                listing.display(),
                n + 1
            ))
        })?;
        let caption = line.prompt.or(line.text).ok_or_else(|| {
            StageError::failed(format!(
                "{} line {}: no `prompt` or `text` to score the image against",
                listing.display(),
                n + 1
            ))
        })?;
        let path = images.join(&line.file_name);
        if !path.is_file() {
            return Err(StageError::failed(format!(
                "{} line {} lists {}, which is not in {}",
                listing.display(),
                n + 1,
                line.file_name,
                images.display()
            )));
        }
        let id = line.id.unwrap_or_else(|| {
            Path::new(&line.file_name)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        pairs.push(Pair { id, file_name: line.file_name, path, caption });
    }
    if pairs.is_empty() {
        return Err(StageError::failed(format!(
            "{} lists no images: there is nothing to score (is the `sample` stage's output \
             empty?)",
            listing.display()
        )));
    }
    Ok(pairs)
}

impl StageKind for ClipScore {
    fn name(&self) -> &'static str {
        "clip-score"
    }

    fn version(&self) -> u32 {
        1
    }

    fn doc(&self) -> &'static str {
        "CLIP score (prompt alignment) of each image against the caption it was sampled from, \
         as torchmetrics' CLIPScore computes it: 100 * cos(image, text) of CLIP's projected, \
         L2-normalised features, the caption cut to the text model's positions; the metric is \
         max(mean, 0). Reads a `sample` stage's `images` and `samples` outputs (or any folder \
         with a {file_name, text} listing). Images are preprocessed as CLIPImageProcessor's PIL \
         backend does (bicubic shortest-edge resize, centre crop, rescale, normalise). The \
         model is a local folder or a hub repository id (transformers layout, safetensors), \
         resolved through the HF cache; its files are part of the stage key. Writes \
         `metrics.json` and `per_image.jsonl`."
    }

    fn params(&self) -> Vec<ParamSpec> {
        clip::with_model(Settings::specs(), DEFAULT_MODEL, MODEL_DOC)
    }

    fn outputs(&self) -> Vec<OutputSpec> {
        vec![
            OutputSpec {
                name: "metrics",
                path: METRICS,
                kind: OutputKind::File,
                doc: "{\"metric\": \"clip-score\", \"clip_score\": max(mean of 100*cos, 0) as \
                      torchmetrics, \"mean_raw\": mean of 100*cos, \"mean_clamped\": mean of \
                      the per-image clamped scores, \
                      \"n\", \"truncated\": captions cut to the text positions, \"model\", \
                      \"image_size\", \"max_positions\", \"preprocessing\"}",
            },
            OutputSpec {
                name: "per_image",
                path: PER_IMAGE,
                kind: OutputKind::File,
                doc: "{\"id\", \"file_name\", \"caption\", \"clip_score\": max(100*cos, 0), \
                      \"score_raw\": 100*cos, \"tokens\", \"truncated\"} per image, in the \
                      listing's order.",
            },
        ]
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
        clip::external_deps(self.hub.as_ref(), &model, clip::WANTS_TEXT_AND_IMAGE, fetch)
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        common::with_granted_threads(ctx, |ctx| self.score(ctx))
    }
}

impl ClipScore {
    fn score(&self, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let settings = Settings::of(ctx)?;
        let batch_size = settings.clip.batch.batch_size;
        let pairs = read_pairs(settings.samples.path(), settings.samples_jsonl.path())?;
        let resolved =
            clip::resolve_for_run(self.hub.as_ref(), &settings.clip, clip::WANTS_TEXT_AND_IMAGE)?;
        let _ =
            writeln!(ctx.log, "clip-score: {} images; model {}", pairs.len(), resolved.describe());
        let device = ctx.candle_device()?;
        let clip = Clip::load(&ModelFiles::of(&resolved)?, &device, true)?;
        ctx.progress.set_total(pairs.len() as u64);

        let mut scores = Vec::with_capacity(pairs.len());
        let mut lines = String::new();
        let mut truncated = 0;
        for chunk in pairs.chunks(batch_size.max(1)) {
            ctx.cancel.check()?;
            let mut pixels = Vec::with_capacity(chunk.len());
            let mut ids = Vec::with_capacity(chunk.len());
            let mut cuts = Vec::with_capacity(chunk.len());
            for pair in chunk {
                let image = images::load_rgb(&pair.path)?;
                let rgb = clip.processor.clip_pixels(&image).map_err(|e| {
                    StageError::failed(format!("preprocessing {}: {e}", pair.path.display()))
                })?;
                pixels.push(clip.processor.normalise_rescaled(&rgb));
                let (row, cut) = clip.text_ids(&pair.caption)?;
                ids.push(row);
                cuts.push(cut);
            }
            let images = clip.image_embeds(&pixels)?;
            let texts = clip.text_embeds(&ids)?;
            for (i, pair) in chunk.iter().enumerate() {
                let (a, b) = (clip::normalized(&images[i]), clip::normalized(&texts[i]));
                let cos: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
                let raw = 100.0 * cos;
                scores.push(raw);
                truncated += cuts[i] as usize;
                let line = json!({
                    "id": pair.id,
                    "file_name": pair.file_name,
                    "caption": pair.caption,
                    "clip_score": raw.max(0.0),
                    "score_raw": raw,
                    "tokens": ids[i].len(),
                    "truncated": cuts[i],
                });
                lines.push_str(&line.to_string());
                lines.push('\n');
            }
            ctx.progress.advance(chunk.len() as u64, "");
        }
        let path = ctx.output_path(PER_IMAGE);
        std::fs::write(&path, lines)
            .map_err(|e| StageError::io(format!("writing {}", path.display()), e))?;

        let n = scores.len() as f64;
        let mean = scores.iter().map(|&s| s as f64).sum::<f64>() / n;
        let mean_clamped = scores.iter().map(|&s| s.max(0.0) as f64).sum::<f64>() / n;
        let max_positions = clip.config.text_config.max_position_embeddings;
        let _ = writeln!(
            ctx.log,
            "clip score {:.4} (mean of 100*cos {mean:.4}) over {} images; {truncated} captions \
             cut to {max_positions} tokens",
            mean.max(0.0),
            scores.len()
        );
        let size = clip.config.vision_config.image_size;
        let metrics = json!({
            "metric": "clip-score",
            "clip_score": mean.max(0.0),
            "mean_raw": mean,
            "mean_clamped": mean_clamped,
            "n": scores.len(),
            "truncated": truncated,
            "model": clip::describe_model(&resolved),
            "revision": settings.clip.revision,
            "image_size": size,
            "max_positions": max_positions,
            "preprocessing": format!(
                "RGB; CLIPImageProcessor (PIL backend): shorter side to {size} (Pillow bicubic), \
                 centre crop {size}x{size}, x/255, normalised with the processor's mean/std"
            ),
            "formula": "torchmetrics CLIPScore: max(mean(100 * cos(image_embeds, text_embeds)), \
                        0), projected L2-normalised features; text cut to max_positions tokens",
        });
        common::write_json(&ctx.output_path(METRICS), &metrics)
    }
}
