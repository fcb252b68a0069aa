//! CLIP for the `clip-score` and `cmmd` kinds: a model folder in the transformers layout
//! (`config.json`, `model.safetensors`, `tokenizer.json`, `preprocessor_config.json`) resolved
//! through the hub as the `caption` kind resolves BLIP, loaded into candle-transformers' CLIP
//! towers, and the two image preprocessings the reference tools use.
//!
//! What this module owns, and why it is here rather than in candle:
//! - reading `config.json` (a `CLIPConfig`, transformers' defaults for what it leaves out) into
//!   candle's configs, with every size checked against [`sdpipe_stages::limits`] and what
//!   candle's CLIP cannot compute refused by name: candle implements QuickGELU only (the
//!   activation of every OpenAI CLIP; some LAION conversions use `gelu`) and LayerNorm with
//!   ε = 1e-5 only;
//! - the text pooling: candle pools at the largest token id, which is transformers' rule only
//!   for configs with the legacy `eos_token_id: 2` (the OpenAI checkpoints); for any other
//!   `eos_token_id` transformers pools at the first end token (index 0 if there is none, e.g.
//!   after truncation), so sdpipe runs candle's unpooled transformer and pools itself;
//! - the projections (`visual_projection`, `text_projection`, `projection_dim` from the top
//!   level of the config, as `CLIPModel` reads it);
//! - preprocessing ([`ProcessorConfig::clip_pixels`] as `CLIPImageProcessor` with its PIL
//!   backend, [`ProcessorConfig::cmmd_pixels`] as the CMMD reader), with Pillow's bicubic
//!   resampling reproduced byte for byte by [`sdpipe_stages::pillow`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use candle_transformers::models::clip::text_model::{
    Activation, ClipTextConfig, ClipTextTransformer,
};
use candle_transformers::models::clip::vision_model::{ClipVisionConfig, ClipVisionTransformer};
use image::RgbImage;
use sdpipe_hub::{HubConfig, ResolvedModel, Want};
use sdpipe_stages::api::{Fetch, ParamSpec, StageError};
use sdpipe_stages::params::{with_default, Input, KindParams};
use sdpipe_stages::pillow::{resize_rgb, Filter};
use serde::Deserialize;
use serde_json::json;

use crate::stage_common::BatchSize;

pub const CONFIG: &str = "config.json";
pub const WEIGHTS: &str = "model.safetensors";
pub const TOKENIZER: &str = "tokenizer.json";
pub const PREPROCESSOR: &str = "preprocessor_config.json";
/// transformers 5 may bundle the image processor's settings here instead.
pub const PROCESSOR: &str = "processor_config.json";

/// The files the image tower needs (`cmmd`); the processor configs are optional (defaults).
pub const WANTS_IMAGE: &[Want<'static>] = &[
    Want::File(CONFIG),
    Want::File(WEIGHTS),
    Want::Optional(PREPROCESSOR),
    Want::Optional(PROCESSOR),
];
/// The files both towers need (`clip-score`).
pub const WANTS_TEXT_AND_IMAGE: &[Want<'static>] = &[
    Want::File(CONFIG),
    Want::File(WEIGHTS),
    Want::File(TOKENIZER),
    Want::Optional(PREPROCESSOR),
    Want::Optional(PROCESSOR),
];

#[derive(Debug, thiserror::Error)]
pub enum ClipError {
    #[error("{0}")]
    Model(String),
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
}

impl From<ClipError> for StageError {
    fn from(e: ClipError) -> Self {
        StageError::caused(e)
    }
}

/// Resolve a model spec (local folder or hub repository id) to `wants`, as the `caption` kind
/// does: downloads observed and cancellable when `fetch` allows them, `NotLocal` otherwise.
pub fn resolve(
    hub: Option<&HubConfig>,
    model: &str,
    revision: &str,
    wants: &[Want<'_>],
    fetch: Fetch,
) -> Result<ResolvedModel, StageError> {
    let config = hub.cloned().unwrap_or_else(HubConfig::from_env);
    sdpipe_stages::model_fetch::resolve(&config, model, revision, wants, fetch)
        .map_err(|e| sdpipe_stages::model_fetch::stage_error(e, WEIGHTS))
}

/// The parameters every CLIP kind takes: the model (each kind gives its default and says
/// which kind of CLIP it needs: [`with_model`]), its revision and the batch size. A kind's
/// `external_deps` reads these alone, needing none of its other inputs.
#[derive(KindParams)]
pub struct ClipModel {
    /// An upstream CLIP model folder (e.g. a `tiny-clip` stage's `model`); when bound it is used
    /// instead of `model`.
    #[param(input, default = null)]
    pub clip: Option<Input>,
    /// Hub repository id or local folder of a CLIP model; each kind gives its default and says
    /// which CLIP it needs ([`with_model`]).
    pub model: String,
    /// Branch, tag or commit of a hub model.
    #[param(default = "main")]
    pub revision: String,
    #[param(flatten)]
    pub batch: BatchSize,
}

/// `specs` (a CLIP kind's, [`ClipModel`]'s among them) with the kind's default `model` and
/// its documentation, which says which kind of CLIP the kind needs.
pub fn with_model(
    specs: Vec<ParamSpec>,
    default_model: &'static str,
    doc: &'static str,
) -> Vec<ParamSpec> {
    let mut specs = with_default(specs, "model", json!(default_model));
    if let Some(spec) = specs.iter_mut().find(|s| s.name == "model") {
        spec.doc = doc;
    }
    specs
}

/// A CLIP kind's external dependencies: the files of the `model` it names, or none when the
/// `clip` input is bound (then its files are in the key as the input's content).
pub fn external_deps(
    hub: Option<&HubConfig>,
    model: &ClipModel,
    wants: &[Want<'_>],
    fetch: Fetch,
) -> Result<std::collections::BTreeMap<String, PathBuf>, StageError> {
    if model.clip.is_some() {
        return Ok(Default::default());
    }
    Ok(deps(resolve(hub, &model.model, &model.revision, wants, fetch)?))
}

/// The model a running CLIP kind uses: the bound `clip` input's folder, else `model` resolved.
pub fn resolve_for_run(
    hub: Option<&HubConfig>,
    model: &ClipModel,
    wants: &[Want<'_>],
) -> Result<ResolvedModel, StageError> {
    match &model.clip {
        Some(input) => {
            resolve(hub, &input.path().to_string_lossy(), "main", wants, Fetch::LocalOnly)
        }
        None => resolve(hub, &model.model, &model.revision, wants, Fetch::allowed()),
    }
}

/// How a resolved model is named in `metrics.json`: the repository at its commit, or the
/// local folder's name (never a machine-specific path; the key holds the files' content).
pub fn describe_model(resolved: &ResolvedModel) -> String {
    match (&resolved.repo, &resolved.commit) {
        (Some(repo), Some(commit)) => format!("{repo}@{commit}"),
        (Some(repo), None) => repo.clone(),
        _ => crate::stage_common::file_name(&resolved.root),
    }
}

/// A resolved model's files as the stage key's external dependencies (`model/<name>`).
pub fn deps(resolved: ResolvedModel) -> std::collections::BTreeMap<String, PathBuf> {
    resolved.files.into_iter().map(|(name, path)| (format!("model/{name}"), path)).collect()
}

// ------------------------------------------------------------------------------ config.json

/// `CLIPTextConfig`, with transformers' defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    /// Picks the pooling rule (see the module docs); `2` is the legacy value.
    pub eos_token_id: Option<i64>,
}

impl Default for TextConfig {
    fn default() -> Self {
        TextConfig {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: Some(49407),
        }
    }
}

/// `CLIPVisionConfig`, with transformers' defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for VisionConfig {
    fn default() -> Self {
        VisionConfig {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

/// `CLIPConfig`: both towers and the shared projection width.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipConfig {
    pub model_type: Option<String>,
    pub text_config: TextConfig,
    pub vision_config: VisionConfig,
    pub projection_dim: usize,
}

impl Default for ClipConfig {
    fn default() -> Self {
        ClipConfig {
            model_type: None,
            text_config: TextConfig::default(),
            vision_config: VisionConfig::default(),
            projection_dim: 512,
        }
    }
}

impl ClipConfig {
    pub fn from_file(path: &Path) -> Result<ClipConfig, ClipError> {
        let text = sdpipe_stages::limits::read_config_text(path)
            .map_err(|e| ClipError::Model(format!("reading {}: {e}", path.display())))?;
        let config: ClipConfig = serde_json::from_str(&text)
            .map_err(|e| ClipError::Model(format!("{}: {e}", path.display())))?;
        config.check().map_err(|e| ClipError::Model(format!("{}: {e}", path.display())))?;
        Ok(config)
    }

    /// Everything candle would build from this config is within sdpipe's caps, and is what
    /// candle's CLIP computes.
    fn check(&self) -> Result<(), String> {
        use sdpipe_stages::limits::*;
        if let Some(t) = self.model_type.as_deref().filter(|t| *t != "clip") {
            return Err(format!(
                "describes a `{t}` model; the CLIP metrics need a full CLIP model \
                 (CLIPModel, model_type `clip`, e.g. openai/clip-vit-large-patch14)"
            ));
        }
        let (t, v) = (&self.text_config, &self.vision_config);
        sdpipe_stages::check_config_towers!(t, v)?;
        check("projection_dim", self.projection_dim, MAX_CHANNELS)?;
        if v.num_channels != 3 {
            return Err(format!(
                "vision_config.num_channels is {}; sdpipe feeds RGB images (3)",
                v.num_channels
            ));
        }
        for (tower, act, eps) in
            [("text", &t.hidden_act, t.layer_norm_eps), ("vision", &v.hidden_act, v.layer_norm_eps)]
        {
            if act != "quick_gelu" {
                return Err(format!(
                    "{tower}_config.hidden_act is `{act}`; candle's CLIP implements only \
                     `quick_gelu` (OpenAI CLIP's activation), so this model cannot be computed \
                     faithfully"
                ));
            }
            if eps != 1e-5 {
                return Err(format!(
                    "{tower}_config.layer_norm_eps is {eps}; candle's CLIP uses 1e-5 only"
                ));
            }
        }
        if t.eos_token_id.is_none() {
            return Err("text_config.eos_token_id is null; the text pooling needs it".into());
        }
        Ok(())
    }

    fn candle_text(&self) -> ClipTextConfig {
        let t = &self.text_config;
        ClipTextConfig {
            vocab_size: t.vocab_size,
            embed_dim: t.hidden_size,
            activation: Activation::QuickGelu,
            intermediate_size: t.intermediate_size,
            max_position_embeddings: t.max_position_embeddings,
            pad_with: None,
            num_hidden_layers: t.num_hidden_layers,
            num_attention_heads: t.num_attention_heads,
            projection_dim: self.projection_dim,
        }
    }

    fn candle_vision(&self) -> ClipVisionConfig {
        let v = &self.vision_config;
        ClipVisionConfig {
            embed_dim: v.hidden_size,
            activation: Activation::QuickGelu,
            intermediate_size: v.intermediate_size,
            num_hidden_layers: v.num_hidden_layers,
            num_attention_heads: v.num_attention_heads,
            projection_dim: self.projection_dim,
            num_channels: v.num_channels,
            image_size: v.image_size,
            patch_size: v.patch_size,
        }
    }
}

/// The position transformers pools a text at: the largest id for the legacy
/// `eos_token_id == 2`, else the first `eos_token_id` (0 when there is none, as torch's argmax
/// of an all-false mask). Ties resolve to the first, as torch's argmax does.
pub fn pooled_index(ids: &[u32], eos_token_id: i64) -> usize {
    if eos_token_id == 2 {
        let mut best = 0;
        for (i, &id) in ids.iter().enumerate() {
            if id > ids[best] {
                best = i;
            }
        }
        best
    } else {
        ids.iter().position(|&id| id as i64 == eos_token_id).unwrap_or(0)
    }
}

// ------------------------------------------------------------------ preprocessor_config.json

/// A size as processor configs spell it: `224` or `{"shortest_edge": 224}` (or explicit
/// `{"height", "width"}`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum SizeSpec {
    Int(usize),
    Map { shortest_edge: Option<usize>, height: Option<usize>, width: Option<usize> },
}

/// How the image is first resized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTo {
    /// The shorter side to this, the longer one in proportion (truncated, as transformers).
    ShortestEdge(usize),
    /// Exactly (height, width).
    Exact(usize, usize),
}

/// `CLIPImageProcessor`'s settings sdpipe honours, with its defaults; anything else must be at
/// its default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ProcessorConfig {
    pub size: SizeSpec,
    pub crop_size: SizeSpec,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub rescale_factor: f64,
    /// Pillow's filter number; only 3 (bicubic) is implemented.
    pub resample: u32,
    pub do_resize: bool,
    pub do_center_crop: bool,
    pub do_rescale: bool,
    pub do_normalize: bool,
    pub do_convert_rgb: bool,
}

impl Default for ProcessorConfig {
    // The constants as transformers spells them (OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
    #[allow(clippy::excessive_precision)]
    fn default() -> Self {
        ProcessorConfig {
            size: SizeSpec::Map { shortest_edge: Some(224), height: None, width: None },
            crop_size: SizeSpec::Map { shortest_edge: None, height: Some(224), width: Some(224) },
            image_mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            image_std: [0.268_629_54, 0.261_302_58, 0.275_777_11],
            rescale_factor: 1.0 / 255.0,
            resample: 3,
            do_resize: true,
            do_center_crop: true,
            do_rescale: true,
            do_normalize: true,
            do_convert_rgb: true,
        }
    }
}

impl ProcessorConfig {
    /// The settings of the model folder `root` (`preprocessor_config.json`, else the
    /// `image_processor` entry of `processor_config.json`), or the defaults; checked against
    /// the vision tower's input size.
    pub fn from_model_dir(root: &Path, image_size: usize) -> Result<ProcessorConfig, ClipError> {
        let legacy = root.join(PREPROCESSOR);
        let bundled = root.join(PROCESSOR);
        let (config, path) = if legacy.is_file() {
            (read_json::<ProcessorConfig>(&legacy)?, Some(legacy))
        } else if bundled.is_file() {
            #[derive(Deserialize)]
            struct Bundle {
                #[serde(default)]
                image_processor: ProcessorConfig,
            }
            (read_json::<Bundle>(&bundled)?.image_processor, Some(bundled))
        } else {
            (ProcessorConfig::default(), None)
        };
        config.check(image_size).map_err(|e| {
            let place = path.map(|p| p.display().to_string()).unwrap_or_else(|| {
                format!("the default CLIPImageProcessor settings (no {PREPROCESSOR})")
            });
            ClipError::Model(format!("{place}: {e}"))
        })?;
        Ok(config)
    }

    /// The first resize.
    pub fn resize_to(&self) -> Result<ResizeTo, String> {
        match self.size {
            SizeSpec::Int(s) | SizeSpec::Map { shortest_edge: Some(s), .. } => {
                Ok(ResizeTo::ShortestEdge(s))
            }
            SizeSpec::Map { height: Some(h), width: Some(w), .. } => Ok(ResizeTo::Exact(h, w)),
            other => Err(format!("`size` {other:?} names neither shortest_edge nor height/width")),
        }
    }

    /// The centre crop's (height, width).
    pub fn crop(&self) -> Result<(usize, usize), String> {
        match self.crop_size {
            SizeSpec::Int(s) => Ok((s, s)),
            SizeSpec::Map { height: Some(h), width: Some(w), .. } => Ok((h, w)),
            other => Err(format!("`crop_size` {other:?} has no height and width")),
        }
    }

    fn check(&self, image_size: usize) -> Result<(), String> {
        let unsupported = |what: &str| {
            format!(
                "asks for {what}, which sdpipe's CLIP preprocessing does not implement (it \
                 follows CLIPImageProcessor: bicubic resize, centre crop, rescale, normalise)"
            )
        };
        if self.resample != 3 {
            return Err(unsupported(&format!(
                "resample filter {} (only 3, bicubic)",
                self.resample
            )));
        }
        if !(self.do_resize
            && self.do_center_crop
            && self.do_rescale
            && self.do_normalize
            && self.do_convert_rgb)
        {
            return Err(unsupported("skipping resize, crop, rescale, normalise or RGB conversion"));
        }
        let max = sdpipe_stages::limits::MAX_IMAGE_SIZE;
        let (crop_h, crop_w) = self.crop()?;
        let resize = self.resize_to()?;
        let (min_h, min_w) = match resize {
            ResizeTo::ShortestEdge(s) => (s, s),
            ResizeTo::Exact(h, w) => (h, w),
        };
        for (what, value) in [("size", min_h), ("size", min_w), ("crop_size", crop_h)] {
            if value == 0 || value > max {
                return Err(format!("`{what}` {value} is outside 1..={max} (sdpipe's cap)"));
            }
        }
        if crop_h != image_size || crop_w != image_size {
            return Err(format!(
                "the processor crops to {crop_w}x{crop_h} but the vision model takes \
                 {image_size}x{image_size} (vision_config.image_size)"
            ));
        }
        if crop_h > min_h || crop_w > min_w {
            return Err(unsupported("a crop larger than the resized image (zero padding)"));
        }
        if !(self.rescale_factor.is_finite() && self.image_std.iter().all(|s| *s != 0.0)) {
            return Err("rescale_factor must be finite and image_std non-zero".into());
        }
        Ok(())
    }

    /// `CLIPImageProcessor` (PIL backend) up to the rescale, for `clip-score`: the shorter side
    /// resized to `size` with Pillow's bicubic filter (the longer one to
    /// `int(size * long / short)`), then the centre crop at `((h - ch) // 2, (w - cw) // 2)`.
    /// Returns the crop, RGB8, row-major.
    pub fn clip_pixels(&self, image: &RgbImage) -> Result<Vec<u8>, String> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let (new_h, new_w) = match self.resize_to()? {
            ResizeTo::Exact(h, w) => (h, w),
            ResizeTo::ShortestEdge(s) => {
                let (short, long) = if w <= h { (w, h) } else { (h, w) };
                let new_long = (s * long) as f64 / short as f64;
                let new_long = new_long as usize;
                if new_long > sdpipe_stages::limits::MAX_IMAGE_SIZE * 16 {
                    return Err(format!(
                        "a {w}x{h} image resized to a shorter side of {s} would be {new_long} \
                         long; sdpipe refuses such aspect ratios"
                    ));
                }
                if w <= h {
                    (new_long, s)
                } else {
                    (s, new_long)
                }
            }
        };
        let resized = resize_rgb(image.as_raw(), w, h, new_w, new_h, Filter::Bicubic);
        let (ch, cw) = self.crop()?;
        let (top, left) = ((new_h - ch) / 2, (new_w - cw) / 2);
        let mut out = Vec::with_capacity(ch * cw * 3);
        for y in top..top + ch {
            out.extend_from_slice(&resized[(y * new_w + left) * 3..(y * new_w + left + cw) * 3]);
        }
        Ok(out)
    }

    /// Rescale and normalise `clip_pixels`' output to `3 × h × w` floats, channels first:
    /// `(v as f64 * rescale_factor) as f32` (transformers rescales in float64 and casts), then
    /// `(x − mean) / std` in f32.
    pub fn normalise_rescaled(&self, rgb: &[u8]) -> Vec<f32> {
        self.normalise(rgb, |v| (v as f64 * self.rescale_factor) as f32)
    }

    /// The CMMD reader (cmmd/io_util.py `_center_crop_and_resize`): the largest centred square
    /// (offsets `(h - l) // 2`, `(w - l) // 2`), resized to `size` with Pillow's bicubic filter.
    /// RGB8, row-major.
    pub fn cmmd_pixels(image: &RgbImage, size: usize) -> Vec<u8> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let side = w.min(h);
        let (top, left) = ((h - side) / 2, (w - side) / 2);
        let mut square = Vec::with_capacity(side * side * 3);
        let raw = image.as_raw();
        for y in top..top + side {
            square.extend_from_slice(&raw[(y * w + left) * 3..(y * w + left + side) * 3]);
        }
        resize_rgb(&square, side, side, size, size, Filter::Bicubic)
    }

    /// CMMD's scaling of `cmmd_pixels`' output: float32 `v / 255` (numpy on the float32
    /// array), the bicubic resize to the same size (the identity), then the processor's
    /// normalisation alone, in f32.
    pub fn normalise_unit(&self, rgb: &[u8]) -> Vec<f32> {
        self.normalise(rgb, |v| v as f32 / 255.0)
    }

    fn normalise(&self, rgb: &[u8], scale: impl Fn(u8) -> f32) -> Vec<f32> {
        let plane = rgb.len() / 3;
        let mut out = vec![0f32; rgb.len()];
        for (i, px) in rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + i] = (scale(px[c]) - self.image_mean[c]) / self.image_std[c];
            }
        }
        out
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ClipError> {
    let text = sdpipe_stages::limits::read_config_text(path)
        .map_err(|e| ClipError::Model(format!("reading {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| ClipError::Model(format!("{} is not a valid config: {e}", path.display())))
}

// ----------------------------------------------------------------------------------- model

/// The text tower with its projection and tokenizer.
struct TextTower {
    transformer: ClipTextTransformer,
    projection: Linear,
    tokenizer: tokenizers::Tokenizer,
}

/// A CLIP model: the vision tower and its projection, and the text tower when asked for.
pub struct Clip {
    vision: ClipVisionTransformer,
    visual_projection: Linear,
    text: Option<TextTower>,
    pub config: ClipConfig,
    pub processor: ProcessorConfig,
    device: Device,
}

/// Where a model's files are.
pub struct ModelFiles<'a> {
    pub config: &'a Path,
    pub weights: &'a Path,
    /// Needed for the text tower only.
    pub tokenizer: Option<&'a Path>,
    /// The folder holding the processor config, if any.
    pub root: &'a Path,
}

impl<'a> ModelFiles<'a> {
    /// The files of a resolved model (the tokenizer when it was wanted).
    pub fn of(resolved: &'a ResolvedModel) -> Result<ModelFiles<'a>, ClipError> {
        let need = |name: &str| {
            resolved.file(name).ok_or_else(|| ClipError::Model(format!("the model has no {name}")))
        };
        Ok(ModelFiles {
            config: need(CONFIG)?,
            weights: need(WEIGHTS)?,
            tokenizer: resolved.file(TOKENIZER),
            root: &resolved.root,
        })
    }
}

impl Clip {
    /// Load the model onto `device`; with `text`, the text tower and tokenizer too.
    pub fn load(files: &ModelFiles<'_>, device: &Device, text: bool) -> Result<Clip, ClipError> {
        let config = ClipConfig::from_file(files.config)?;
        let processor =
            ProcessorConfig::from_model_dir(files.root, config.vision_config.image_size)?;
        let tensors = candle_core::safetensors::load(files.weights, device).map_err(|e| {
            ClipError::Model(format!("reading weights {}: {e}", files.weights.display()))
        })?;
        let wanted = |name: &str| {
            name.starts_with("vision_model.")
                || name.starts_with("visual_projection.")
                || (text
                    && (name.starts_with("text_model.") || name.starts_with("text_projection.")))
        };
        let tensors: HashMap<String, Tensor> = tensors
            .into_iter()
            .filter(|(k, _)| wanted(k))
            .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
            .collect::<candle_core::Result<_>>()?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let mismatch = |e: ClipError| match e {
            ClipError::Candle(e) => ClipError::Model(format!(
                "{} does not match {}: {e}",
                files.weights.display(),
                files.config.display()
            )),
            other => other,
        };
        let tokenizer = match (text, files.tokenizer) {
            (false, _) => None,
            (true, None) => return Err(ClipError::Model("the model has no tokenizer.json".into())),
            (true, Some(path)) => Some(load_tokenizer(path, config.text_config.vocab_size)?),
        };
        Clip::new(config, processor, vb, tokenizer).map_err(mismatch)
    }

    /// A model from weights in `vb` (`vision_model.*`, `visual_projection.*`, and the text
    /// tower's when a tokenizer is given).
    pub fn new(
        config: ClipConfig,
        processor: ProcessorConfig,
        vb: VarBuilder,
        tokenizer: Option<tokenizers::Tokenizer>,
    ) -> Result<Clip, ClipError> {
        let device = vb.device().clone();
        let v = config.candle_vision();
        // candle would draw a random class embedding when the checkpoint lacks one.
        let class = "vision_model.embeddings.class_embedding";
        if !vb.contains_tensor(class) {
            return Err(ClipError::Candle(candle_core::Error::Msg(format!(
                "cannot find tensor {class}"
            ))));
        }
        let vision = ClipVisionTransformer::new(vb.pp("vision_model"), &v)?;
        let visual_projection = candle_nn::linear_no_bias(
            v.embed_dim,
            config.projection_dim,
            vb.pp("visual_projection"),
        )?;
        let text = match tokenizer {
            None => None,
            Some(tokenizer) => {
                let t = config.candle_text();
                Some(TextTower {
                    transformer: ClipTextTransformer::new(vb.pp("text_model"), &t)?,
                    projection: candle_nn::linear_no_bias(
                        t.embed_dim,
                        config.projection_dim,
                        vb.pp("text_projection"),
                    )?,
                    tokenizer,
                })
            }
        };
        Ok(Clip { vision, visual_projection, text, config, processor, device })
    }

    /// Projected image embeddings (not normalised), one row per pixel tensor
    /// (`3 × size × size` floats each).
    pub fn image_embeds(&self, pixels: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, ClipError> {
        if pixels.is_empty() {
            return Ok(vec![]);
        }
        let s = self.config.vision_config.image_size;
        let flat: Vec<f32> = pixels.iter().flatten().copied().collect();
        let batch = Tensor::from_vec(flat, (pixels.len(), 3, s, s), &self.device)?;
        let pooled = self.vision.forward(&batch)?;
        Ok(self.visual_projection.forward(&pooled)?.to_vec2::<f32>()?)
    }

    /// Token ids of `text` as the processor makes them (special tokens added, no truncation
    /// by the tokenizer), cut to the text model's positions as torchmetrics cuts them; and
    /// whether it was cut.
    pub fn text_ids(&self, text: &str) -> Result<(Vec<u32>, bool), ClipError> {
        let tower = self.text_tower()?;
        let encoding = tower
            .tokenizer
            .encode(text, true)
            .map_err(|e| ClipError::Model(format!("tokenizing {text:?}: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        let max = self.config.text_config.max_position_embeddings;
        let cut = ids.len() > max;
        ids.truncate(max);
        Ok((ids, cut))
    }

    /// Projected text embeddings (not normalised) of token-id rows (from [`Clip::text_ids`]),
    /// pooled by transformers' rule. Rows are right-padded to a common length: the causal
    /// mask keeps padding from reaching the pooled position.
    pub fn text_embeds(&self, rows: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, ClipError> {
        let tower = self.text_tower()?;
        let len = rows.iter().map(Vec::len).max().unwrap_or(0);
        if rows.is_empty() || len == 0 {
            return Err(ClipError::Model("no tokens to encode".into()));
        }
        let vocab = self.config.text_config.vocab_size;
        if let Some(bad) = rows.iter().flatten().find(|&&id| id as usize >= vocab) {
            return Err(ClipError::Model(format!(
                "token id {bad} is outside the model's vocabulary of {vocab}"
            )));
        }
        let flat: Vec<u32> = rows
            .iter()
            .flat_map(|r| r.iter().copied().chain(std::iter::repeat_n(0, len - r.len())))
            .collect();
        let ids = Tensor::from_vec(flat, (rows.len(), len), &self.device)?;
        let hidden = tower.transformer.forward_with_mask(&ids, usize::MAX)?;
        let eos = self.config.text_config.eos_token_id.unwrap_or(2);
        let pooled: Vec<Tensor> = rows
            .iter()
            .enumerate()
            .map(|(b, r)| hidden.i((b, pooled_index(r, eos))))
            .collect::<candle_core::Result<_>>()?;
        let pooled = Tensor::stack(&pooled, 0)?;
        Ok(tower.projection.forward(&pooled)?.to_vec2::<f32>()?)
    }

    fn text_tower(&self) -> Result<&TextTower, ClipError> {
        self.text.as_ref().ok_or_else(|| ClipError::Model("the text tower was not loaded".into()))
    }

    /// The text pooling's `eos_token_id` (tests switch to the legacy rule with 2).
    pub fn set_eos_token_id(&mut self, eos: i64) {
        self.config.text_config.eos_token_id = Some(eos);
    }
}

/// The tokenizer with the file's own truncation and padding switched off, as transformers
/// switches them off for a call without `truncation`/`padding="max_length"`.
fn load_tokenizer(path: &Path, vocab_size: usize) -> Result<tokenizers::Tokenizer, ClipError> {
    let mut tokenizer = tokenizers::Tokenizer::from_file(path)
        .map_err(|e| ClipError::Model(format!("{}: {e}", path.display())))?;
    tokenizer
        .with_truncation(None)
        .map_err(|e| ClipError::Model(format!("{}: {e}", path.display())))?;
    tokenizer.with_padding(None);
    let size = tokenizer.get_vocab_size(true);
    if size > vocab_size {
        return Err(ClipError::Model(format!(
            "{}: the tokenizer has {size} tokens but the model's text_config.vocab_size is \
             {vocab_size}",
            path.display()
        )));
    }
    Ok(tokenizer)
}

/// `v / ‖v‖₂` in f32, as torch divides by `norm(p=2)`.
pub fn normalized(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / norm).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_follows_transformers_for_both_eos_conventions() {
        // New convention: the first end token; none (truncated) pools at 0.
        assert_eq!(pooled_index(&[49406, 5, 49407, 49407], 49407), 2);
        assert_eq!(pooled_index(&[49406, 5, 6], 49407), 0);
        // Legacy `eos_token_id: 2`: the largest id, the first of equals.
        assert_eq!(pooled_index(&[49406, 5, 49407, 49407], 2), 2);
        assert_eq!(pooled_index(&[49406, 5, 6], 2), 0);
        assert_eq!(pooled_index(&[3, 9, 1], 2), 1);
    }

    fn refusal(config: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, config).unwrap();
        let err = ClipConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "names the file: {err}");
        err
    }

    #[test]
    fn hostile_and_unsupported_configs_are_refused_by_name() {
        let e = refusal(r#"{"text_config": {"hidden_size": 1000000000}}"#);
        assert!(e.contains("`text_config.hidden_size` = 1000000000 is outside"), "{e}");
        let e = refusal(r#"{"vision_config": {"num_attention_heads": 0}}"#);
        assert!(e.contains("`vision_config.num_attention_heads` = 0"), "{e}");
        let e = refusal(r#"{"vision_config": {"image_size": 4096, "patch_size": 1}}"#);
        assert!(e.contains("16777216 patches"), "{e}");
        let e = refusal(r#"{"vision_config": {"hidden_act": "gelu"}}"#);
        assert!(e.contains("`gelu`") && e.contains("quick_gelu"), "{e}");
        let e = refusal(r#"{"model_type": "siglip"}"#);
        assert!(e.contains("`siglip`"), "{e}");
        let e = refusal(r#"{"projection_dim": 0}"#);
        assert!(e.contains("`projection_dim` = 0"), "{e}");
    }

    #[test]
    fn missing_values_take_transformers_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"model_type": "clip", "vision_config": {"image_size": 336, "patch_size": 14}}"#,
        )
        .unwrap();
        let c = ClipConfig::from_file(&path).unwrap();
        assert_eq!((c.projection_dim, c.text_config.max_position_embeddings), (512, 77));
        assert_eq!(c.text_config.eos_token_id, Some(49407));
        assert_eq!(c.vision_config.hidden_size, 768);
    }

    #[test]
    fn old_style_integer_sizes_are_read() {
        let p: ProcessorConfig =
            serde_json::from_str(r#"{"size": 224, "crop_size": 224, "resample": 3}"#).unwrap();
        assert_eq!(p.resize_to(), Ok(ResizeTo::ShortestEdge(224)));
        assert_eq!(p.crop(), Ok((224, 224)));
        assert!(p.check(224).is_ok());
        let e = p.check(336).unwrap_err();
        assert!(e.contains("takes 336x336"), "{e}");
    }

    #[test]
    fn the_shortest_edge_resize_keeps_the_aspect_ratio_and_crops_the_centre() {
        let p: ProcessorConfig =
            serde_json::from_str(r#"{"size": {"shortest_edge": 4}, "crop_size": 4}"#).unwrap();
        // 8x4: resized to 8x4 (no change), then the centre 4x4 (columns 2..6).
        let image = RgbImage::from_fn(8, 4, |x, _| image::Rgb([x as u8 * 10, 0, 0]));
        let px = p.clip_pixels(&image).unwrap();
        assert_eq!(px.len(), 4 * 4 * 3);
        assert_eq!(&px[..12], &[20, 0, 0, 30, 0, 0, 40, 0, 0, 50, 0, 0]);
        // CMMD crops the square first: the same columns here.
        assert_eq!(ProcessorConfig::cmmd_pixels(&image, 4), px);
    }
}
