//! The `tiny-clip` kind: a random-weight CLIP model at toy sizes, written exactly in the layout
//! transformers writes, so that the offline demo can run the `cmmd` and `clip-score` kinds
//! without downloading `openai/clip-vit-*`. It is to those kinds what `tiny-sd` is to `train`
//! and `sample`.
//!
//! **What the numbers then mean.** Nothing semantic: a CLIP with random weights has learned no
//! correspondence between images and text, so its CLIP score does not say whether a sample
//! shows its caption, and its CMMD compares random projections of the images rather than what
//! they depict. Both still vary with the pixels and the tokens, deterministically, so the demo
//! exercises the whole metric path (loading, preprocessing, tokenizing, pooling, the
//! statistics and the report) and its figures compare the demo's models with each other under
//! one fixed random network — never with published CLIP scores or CMMD values.
//!
//! The folder (`model/`) is what `CLIPModel.save_pretrained`, `CLIPTokenizer.save_pretrained`
//! (the fast tokenizer) and `CLIPImageProcessor.save_pretrained` write with transformers
//! [`TRANSFORMERS_VERSION`] — the layout of the `openai/clip-vit-*` repositories and of the
//! parity fixture `tests/fixtures/clip/model`:
//! - `config.json`: a `CLIPConfig` (`model_type` `clip`, `text_config`, `vision_config`,
//!   `projection_dim` also in both towers, `logit_scale_init_value`), with `quick_gelu` and
//!   LayerNorm ε = 1e-5, the only variants candle's CLIP (and so [`crate::clip`]) computes;
//! - `model.safetensors`: every tensor of `CLIPModel` under transformers' names
//!   (`text_model.*`, `vision_model.*` with its `pre_layrnorm` spelling, `text_projection`,
//!   `visual_projection`, the scalar `logit_scale`), f32, sorted by name, with the
//!   `{"format": "pt"}` metadata and the space-padded header the safetensors library writes;
//! - `tokenizer.json` + `tokenizer_config.json`: a real `tokenizers` BPE tokenizer with CLIP's
//!   normalizer (NFC, whitespace runs to one space, lowercase), pre-tokenizer (CLIP's word regex,
//!   then byte-level), `</w>` word ends and `<|startoftext|>`/`<|endoftext|>` added around each
//!   text, over a small vocabulary learned here (below);
//! - `preprocessor_config.json`: `CLIPImageProcessor` (shortest edge and centre crop at the
//!   tower's `image_size`, bicubic, 1/255, OpenAI's mean and std).
//!
//! The vocabulary and the weights come from [`sdpipe_stages::tiny_models`], which `tiny-sd`
//! shares. The vocabulary has CLIP's layout — the 256 byte symbols in CLIP's order, the same
//! with `</w>`, one token per merge, then the two special tokens — with merges learned
//! deterministically (most frequent adjacent pair first, ties by text) from a built-in corpus in
//! the register of SD captions and the `synthetic` kind's scene grammar, until every corpus word
//! is one token. The demo's captions therefore tokenize one token per word, as CLIP's own 49k
//! merges split common English words.
//!
//! The tensor list is not hand-maintained: [`crate::clip::Clip::new`], the very constructor the
//! metric kinds load models with, is run against the shared recording `VarBuilder` backend, so
//! the writer emits exactly the tensors the loader asks for (plus `logit_scale`, which only
//! transformers reads); a test compares names and shapes with the state dict transformers saved
//! for the fixture. Values are initialised as PyTorch constructs transformers' CLIP modules, as
//! `tiny-sd`'s are: `nn.Linear`/`nn.Conv2d` weights and biases uniform in ±1/√fan_in
//! (kaiming-uniform with a = √5), LayerNorms at the identity, token and position embeddings
//! with transformers' std 0.02 and the class embedding with std hidden^-½ (as uniforms of that
//! std). Every value depends only on (seed, tensor name): one ChaCha stream per tensor and IEEE
//! basic arithmetic, so the bytes are identical on every platform.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sdpipe_stages::api::{
    OutputKind, OutputSpec, ParamSpec, ParamType, StageContext, StageError, StageKind,
};
use sdpipe_stages::limits;
use sdpipe_stages::params::KindParams;
use sdpipe_stages::tiny_models::{BpeVocab, Recorder, BOS, CAPTION_CORPUS, EOS};
use serde_json::{json, Value};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as Normalizers, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizers;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::clip::{self, Clip, ClipConfig, ProcessorConfig};

/// The transformers release whose `save_pretrained` output this writer reproduces (the
/// version the parity fixture `tests/fixtures/clip` was written with).
pub const TRANSFORMERS_VERSION: &str = "5.25.0";

/// transformers' `CLIPConfig.logit_scale_init_value`, ln(1 / 0.07) as CLIP's paper rounds it.
pub const LOGIT_SCALE_INIT: f32 = 2.6592;

/// CLIP's word pattern (the first step of its pre-tokenizer), as transformers writes it.
const CLIP_WORDS: &str = "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|\
                          [\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+";

/// The most values (parameters) a tiny model may have: 2^28, 1 GiB of f32. ViT-B/32 has 151M,
/// so anything larger is not what this kind is for (and would be built twice in memory).
pub const MAX_VALUES: u64 = 1 << 28;

/// The output's name and path.
const MODEL: &str = "model";

/// The tensor stream's component name (one ChaCha stream per `clip/<tensor name>`).
const COMPONENT: &str = "clip";

/// The sizes of a tiny CLIP. The defaults keep the demo's CMMD and CLIP score on a few dozen
/// 32-pixel images to milliseconds: two 32-wide layers per tower, 8×8 patches of 4 pixels.
///
/// They are the `tiny-clip` kind's parameters. Every size is at least 1, but the kind's
/// `params` states that bound rather than `min = 1` here: a 0 reaching a run directly (a job
/// file, a test) is then refused by [`TinyClipSpec::validate`] as "not a positive size", as
/// the kind has always refused it, rather than by the parameters' own bounds check.
#[derive(Debug, Clone, PartialEq, KindParams)]
pub struct TinyClipSpec {
    /// Seed of the random weights.
    #[param(default = TinyClipSpec::default().seed, min = 0)]
    pub seed: u64,
    /// Width of the text tower (text_config.hidden_size).
    #[param(default = TinyClipSpec::default().text_hidden_size)]
    pub text_hidden_size: usize,
    /// Transformer layers of the text tower (text_config.num_hidden_layers).
    #[param(default = TinyClipSpec::default().text_layers)]
    pub text_layers: usize,
    /// Attention heads of the text tower; must divide text_hidden_size.
    #[param(default = TinyClipSpec::default().text_heads)]
    pub text_heads: usize,
    /// MLP width of the text tower (text_config.intermediate_size).
    #[param(default = TinyClipSpec::default().text_intermediate_size)]
    pub text_intermediate_size: usize,
    /// Token positions of the text tower (CLIP's 77); longer captions are cut.
    #[param(default = TinyClipSpec::default().max_position_embeddings)]
    pub max_position_embeddings: usize,
    /// Width of the vision tower (vision_config.hidden_size).
    #[param(default = TinyClipSpec::default().vision_hidden_size)]
    pub vision_hidden_size: usize,
    /// Transformer layers of the vision tower (vision_config.num_hidden_layers).
    #[param(default = TinyClipSpec::default().vision_layers)]
    pub vision_layers: usize,
    /// Attention heads of the vision tower; must divide vision_hidden_size.
    #[param(default = TinyClipSpec::default().vision_heads)]
    pub vision_heads: usize,
    /// MLP width of the vision tower (vision_config.intermediate_size).
    #[param(default = TinyClipSpec::default().vision_intermediate_size)]
    pub vision_intermediate_size: usize,
    /// Input side of the vision tower in pixels; the image processor resizes the shorter side
    /// to it and crops the centre square.
    #[param(default = TinyClipSpec::default().image_size)]
    pub image_size: usize,
    /// Side of the vision tower's square patches; must divide image_size.
    #[param(default = TinyClipSpec::default().patch_size)]
    pub patch_size: usize,
    /// Width of the shared image-text embedding space (the projections' output).
    #[param(default = TinyClipSpec::default().projection_dim)]
    pub projection_dim: usize,
}

impl Default for TinyClipSpec {
    fn default() -> Self {
        TinyClipSpec {
            seed: 0,
            text_hidden_size: 32,
            text_layers: 2,
            text_heads: 4,
            text_intermediate_size: 64,
            max_position_embeddings: 77,
            vision_hidden_size: 32,
            vision_layers: 2,
            vision_heads: 4,
            vision_intermediate_size: 64,
            image_size: 32,
            patch_size: 4,
            projection_dim: 32,
        }
    }
}

impl TinyClipSpec {
    /// Every size positive and within sdpipe's caps ([`limits`], as [`crate::clip`] checks a
    /// loaded config), the heads dividing the widths, the patches tiling the image; errors name
    /// the parameter.
    pub fn validate(&self) -> Result<(), StageError> {
        let invalid = |param: &str, message: String| StageError::InvalidParam {
            param: param.into(),
            message,
        };
        let caps = [
            ("text_hidden_size", self.text_hidden_size, limits::MAX_CHANNELS),
            ("text_layers", self.text_layers, limits::MAX_LAYERS),
            ("text_heads", self.text_heads, limits::MAX_CHANNELS),
            ("text_intermediate_size", self.text_intermediate_size, 4 * limits::MAX_CHANNELS),
            ("max_position_embeddings", self.max_position_embeddings, limits::MAX_POSITIONS),
            ("vision_hidden_size", self.vision_hidden_size, limits::MAX_CHANNELS),
            ("vision_layers", self.vision_layers, limits::MAX_LAYERS),
            ("vision_heads", self.vision_heads, limits::MAX_CHANNELS),
            ("vision_intermediate_size", self.vision_intermediate_size, 4 * limits::MAX_CHANNELS),
            ("image_size", self.image_size, limits::MAX_IMAGE_SIZE),
            ("patch_size", self.patch_size, limits::MAX_IMAGE_SIZE),
            ("projection_dim", self.projection_dim, limits::MAX_CHANNELS),
        ];
        for (param, value, max) in caps {
            if value == 0 {
                return Err(invalid(param, format!("{value} is not a positive size")));
            }
            limits::check(param, value, max).map_err(|m| invalid(param, m))?;
        }
        for (tower, hidden, heads) in [
            ("text", self.text_hidden_size, self.text_heads),
            ("vision", self.vision_hidden_size, self.vision_heads),
        ] {
            if !hidden.is_multiple_of(heads) {
                return Err(invalid(
                    &format!("{tower}_heads"),
                    format!(
                        "{tower}_hidden_size {hidden} is not a multiple of {heads} heads (each \
                         head takes an equal share of the width)"
                    ),
                ));
            }
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return Err(invalid(
                "patch_size",
                format!(
                    "image_size {} is not a multiple of patch_size {} (the patches must tile \
                     the image)",
                    self.image_size, self.patch_size
                ),
            ));
        }
        let patches = (self.image_size / self.patch_size).pow(2);
        if patches + 1 > limits::MAX_POSITIONS {
            return Err(invalid(
                "patch_size",
                format!(
                    "image_size / patch_size gives {patches} patches, more than the {} \
                     positions sdpipe allows",
                    limits::MAX_POSITIONS - 1
                ),
            ));
        }
        let values = self.values(clip_vocab().len());
        if values > MAX_VALUES {
            return Err(invalid(
                "sizes",
                format!(
                    "these sizes make a model of {values} parameters; tiny-clip writes at most \
                     {MAX_VALUES} (use a published CLIP for full-size models)"
                ),
            ));
        }
        Ok(())
    }

    /// The number of parameters of the model (all tensors' elements), in u64 so that no size
    /// within the caps overflows.
    pub fn values(&self, vocab_size: usize) -> u64 {
        let n = |v: usize| v as u64;
        let layer = |h: u64, i: u64| 4 * (h * h + h) + 2 * h * i + i + h + 4 * h;
        let (th, ti) = (n(self.text_hidden_size), n(self.text_intermediate_size));
        let (vh, vi) = (n(self.vision_hidden_size), n(self.vision_intermediate_size));
        let p = n(self.patch_size);
        let positions = n(self.image_size / self.patch_size.max(1)).pow(2) + 1;
        let text = (n(vocab_size) + n(self.max_position_embeddings)) * th
            + n(self.text_layers) * layer(th, ti)
            + 2 * th
            + n(self.projection_dim) * th;
        let vision = vh * 3 * p * p
            + vh
            + positions * vh
            + n(self.vision_layers) * layer(vh, vi)
            + 4 * vh
            + n(self.projection_dim) * vh;
        text + vision + 1
    }
}

/// The `tiny-clip` kind.
pub struct TinyClip;

impl StageKind for TinyClip {
    fn name(&self) -> &'static str {
        "tiny-clip"
    }

    fn version(&self) -> u32 {
        1
    }

    fn doc(&self) -> &'static str {
        "Writes a CLIP model folder with random weights at toy sizes, exactly in the layout \
         transformers' CLIPModel, CLIPTokenizer and CLIPImageProcessor save_pretrained write \
         (config.json, model.safetensors, tokenizer.json with a small CLIP BPE vocabulary, \
         tokenizer_config.json, preprocessor_config.json), for the `cmmd` and `clip-score` \
         kinds where no CLIP can be downloaded (the offline demo). Weights are initialised as \
         PyTorch initialises the layers, from `seed`, identically on every machine. Random \
         weights have learned nothing: CLIP score and CMMD computed with them measure nothing \
         semantic and compare only runs scored with the same tiny model."
    }

    fn params(&self) -> Vec<ParamSpec> {
        let mut specs = TinyClipSpec::specs();
        // Every size is at least 1 (see [`TinyClipSpec`]).
        for spec in specs.iter_mut().filter(|s| s.name != "seed") {
            spec.ty = ParamType::Int { min: Some(1), max: None };
        }
        specs
    }

    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: MODEL,
            path: MODEL,
            kind: OutputKind::Dir,
            doc: "The CLIP model folder (transformers layout: config.json, model.safetensors, \
                  tokenizer.json, tokenizer_config.json, preprocessor_config.json); bind it as \
                  the `cmmd` / `clip-score` model.",
        }]
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let spec = TinyClipSpec::of(ctx)?;
        spec.validate()?;
        ctx.cancel.check()?;
        let written = write_tiny_clip(&ctx.output_path(MODEL), &spec)?;
        let _ = writeln!(
            ctx.log,
            "tiny-clip: {} parameters, a {}-token vocabulary, {}x{} images (random weights, \
             seed {})",
            written.values, written.vocab_size, spec.image_size, spec.image_size, spec.seed
        );
        Ok(())
    }
}

/// What [`write_tiny_clip`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrittenClip {
    /// Elements of all tensors.
    pub values: u64,
    pub vocab_size: usize,
}

/// Write a tiny CLIP into `dir` (created if needed).
pub fn write_tiny_clip(dir: &Path, spec: &TinyClipSpec) -> Result<WrittenClip, StageError> {
    spec.validate()?;
    std::fs::create_dir_all(dir)
        .map_err(|e| StageError::io(format!("creating {}", dir.display()), e))?;
    let vocab = clip_vocab();
    let tokenizer = fast_tokenizer(&vocab)?;
    let config = config_json(spec, &vocab);
    let processor = preprocessor_json(spec.image_size);

    // The loader's own types and constructor: building `Clip` against the recorder
    // enumerates exactly the tensors the metric kinds will ask for.
    let loaded_config: ClipConfig = serde_json::from_value(config.clone())
        .map_err(|e| StageError::failed(format!("tiny-clip config: {e}")))?;
    let loaded_processor: ProcessorConfig = serde_json::from_value(processor.clone())
        .map_err(|e| StageError::failed(format!("tiny-clip processor config: {e}")))?;
    let mut tensors = Recorder::new(spec.seed, COMPONENT, has_class_embedding)
        .record(|vb| {
            Clip::new(loaded_config, loaded_processor, vb, Some(tokenizer.clone())).map(|_| ())
        })
        .map_err(|e| StageError::failed(format!("building the tiny CLIP: {e}")))?;
    let scale = Tensor::new(LOGIT_SCALE_INIT, &Device::Cpu).map_err(StageError::caused)?;
    tensors.insert("logit_scale".into(), scale);

    write_json(&dir.join(clip::CONFIG), &config)?;
    let values = write_safetensors(&dir.join(clip::WEIGHTS), &tensors)?;
    let path = dir.join(clip::TOKENIZER);
    tokenizer
        .save(&path, true)
        .map_err(|e| StageError::failed(format!("writing {}: {e}", path.display())))?;
    write_json(&dir.join("tokenizer_config.json"), &tokenizer_config_json())?;
    write_json(&dir.join(clip::PREPROCESSOR), &processor)?;
    // The loader's checks accept the files as the metric kinds will read them (sdpipe's
    // caps, what candle computes, the processor's crop matching the tower).
    let config = ClipConfig::from_file(&dir.join(clip::CONFIG)).map_err(StageError::from)?;
    ProcessorConfig::from_model_dir(dir, config.vision_config.image_size)
        .map_err(StageError::from)?;
    Ok(WrittenClip { values, vocab_size: vocab.len() })
}

/// `CLIPConfig` as transformers writes it (every key `save_pretrained` writes for a config
/// built from these sizes; `projection_dim` repeated in both towers as in OpenAI's configs, so
/// `CLIPVisionModelWithProjection` and `CLIPTextModelWithProjection` read the same width).
fn config_json(spec: &TinyClipSpec, vocab: &BpeVocab) -> Value {
    json!({
        "architectures": ["CLIPModel"],
        "dtype": "float32",
        "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592,
        "model_type": "clip",
        "projection_dim": spec.projection_dim,
        "text_config": {
            "attention_dropout": 0.0,
            "bos_token_id": vocab.bos_id(),
            "eos_token_id": vocab.eos_id(),
            "hidden_act": "quick_gelu",
            "hidden_size": spec.text_hidden_size,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": spec.text_intermediate_size,
            "layer_norm_eps": 1e-5,
            "max_position_embeddings": spec.max_position_embeddings,
            "model_type": "clip_text_model",
            "num_attention_heads": spec.text_heads,
            "num_hidden_layers": spec.text_layers,
            "pad_token_id": vocab.eos_id(),
            "projection_dim": spec.projection_dim,
            "vocab_size": vocab.len(),
        },
        "transformers_version": TRANSFORMERS_VERSION,
        "vision_config": {
            "attention_dropout": 0.0,
            "hidden_act": "quick_gelu",
            "hidden_size": spec.vision_hidden_size,
            "image_size": spec.image_size,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": spec.vision_intermediate_size,
            "layer_norm_eps": 1e-5,
            "model_type": "clip_vision_model",
            "num_attention_heads": spec.vision_heads,
            "num_channels": 3,
            "num_hidden_layers": spec.vision_layers,
            "patch_size": spec.patch_size,
            "projection_dim": spec.projection_dim,
        },
    })
}

/// `CLIPImageProcessor` at `size`, as `save_pretrained` writes it (OpenAI CLIP's settings).
fn preprocessor_json(size: usize) -> Value {
    json!({
        "crop_size": {"height": size, "width": size},
        "do_center_crop": true,
        "do_convert_rgb": true,
        "do_normalize": true,
        "do_rescale": true,
        "do_resize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "rescale_factor": 1.0 / 255.0,
        "size": {"shortest_edge": size},
    })
}

/// `tokenizer_config.json` as transformers 5 writes it for a `CLIPTokenizer` (the fast,
/// `tokenizers`-backed one; no `vocab.json`/`merges.txt`/`special_tokens_map.json`).
/// `model_max_length` is CLIP's 77 whatever the model's positions, as in the parity fixture
/// (24 positions): the metric kinds cut to `max_position_embeddings` themselves.
fn tokenizer_config_json() -> Value {
    json!({
        "backend": "tokenizers",
        "bos_token": BOS,
        "eos_token": EOS,
        "model_max_length": 77,
        "pad_token": EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    })
}

/// Write `value` as transformers writes its JSON files (`json.dumps(indent=2, sort_keys=True)`
/// and a newline): serde_json's pretty layout with sorted keys is the same, but for floats,
/// which Python spells `1e-05` where Rust writes `1e-5`.
fn write_json(path: &Path, value: &Value) -> Result<(), StageError> {
    let mut text = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut text, PythonFloats::default());
    serde::Serialize::serialize(value, &mut serializer)
        .map_err(|e| StageError::failed(format!("serialising {}: {e}", path.display())))?;
    text.push(b'\n');
    std::fs::write(path, text).map_err(|e| StageError::io(format!("writing {}", path.display()), e))
}

/// serde_json's [`PrettyFormatter`](serde_json::ser::PrettyFormatter) with floats as Python's
/// `repr` writes them: the shortest round-trip digits (Rust's `{:?}`, which switches to an
/// exponent at the same magnitudes, below 1e-4 and from 1e16), the exponent signed and at least
/// two digits long.
#[derive(Default)]
struct PythonFloats(serde_json::ser::PrettyFormatter<'static>);

impl serde_json::ser::Formatter for PythonFloats {
    fn write_f64<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        value: f64,
    ) -> std::io::Result<()> {
        let text = format!("{value:?}");
        let text = match text.split_once('e') {
            Some((mantissa, exponent)) => {
                let exponent: i32 = exponent.parse().expect("Rust's float exponent");
                let sign = if exponent < 0 { '-' } else { '+' };
                format!("{mantissa}e{sign}{:02}", exponent.abs())
            }
            None => text,
        };
        w.write_all(text.as_bytes())
    }
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_array(w)
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_array(w)
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.0.begin_array_value(w, first)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_array_value(w)
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_object(w)
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_object(w)
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.0.begin_object_key(w, first)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_object_value(w)
    }
    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_object_value(w)
    }
}

/// Write `tensors` (f32) as the safetensors library does: an 8-byte little-endian header
/// length, the JSON header (`__metadata__` first, then the tensors in name order with their
/// dtype, shape and data offsets), padded with spaces to a multiple of 8, then the data.
/// Returns the number of values written.
fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<u64, StageError> {
    let failed = |e: candle_core::Error| StageError::failed(format!("{}: {e}", path.display()));
    let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut data: Vec<u8> = Vec::new();
    let mut values = 0u64;
    for (name, tensor) in tensors {
        let flat: Vec<f32> =
            tensor.to_dtype(DType::F32).and_then(|t| t.flatten_all()?.to_vec1()).map_err(failed)?;
        let start = data.len();
        data.reserve(flat.len() * 4);
        for v in &flat {
            data.extend_from_slice(&v.to_le_bytes());
        }
        values += flat.len() as u64;
        let shape = serde_json::to_string(tensor.dims()).expect("a list of sizes");
        let name = serde_json::to_string(name).expect("a string");
        header.push_str(&format!(
            ",{name}:{{\"dtype\":\"F32\",\"shape\":{shape},\"data_offsets\":[{start},{}]}}",
            data.len()
        ));
    }
    header.push('}');
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let mut bytes = Vec::with_capacity(8 + header.len() + data.len());
    bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&data);
    std::fs::write(path, bytes)
        .map_err(|e| StageError::io(format!("writing {}", path.display()), e))?;
    Ok(values)
}

// ------------------------------------------------------------------------------ tokenizer

/// The vocabulary: merges until every corpus word is a single token (about 450).
fn clip_vocab() -> BpeVocab {
    BpeVocab::learn(CAPTION_CORPUS, usize::MAX)
}

/// The tokenizer transformers' `CLIPTokenizer` (fast) is over `vocab`: a BPE model with `</w>`
/// word ends, CLIP's normalizer and pre-tokenizer, BOS/EOS added around each text.
fn fast_tokenizer(vocab: &BpeVocab) -> Result<Tokenizer, StageError> {
    let failed = |e: tokenizers::Error| StageError::failed(format!("tiny-clip tokenizer: {e}"));
    let ids: tokenizers::models::bpe::Vocab =
        vocab.tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let model = BPE::builder()
        .vocab_and_merges(ids, vocab.merges.clone())
        .unk_token(EOS.into())
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".into())
        .fuse_unk(false)
        .build()
        .map_err(failed)?;
    let mut tokenizer = Tokenizer::new(model);
    let normalizer = Normalizers::new(vec![
        NFC.into(),
        Replace::new(ReplacePattern::Regex("\\s+".into()), " ").map_err(failed)?.into(),
        Lowercase.into(),
    ]);
    tokenizer.with_normalizer(Some(normalizer)).map_err(failed)?;
    let split =
        Split::new(SplitPattern::Regex(CLIP_WORDS.into()), SplitDelimiterBehavior::Removed, true)
            .map_err(failed)?;
    tokenizer.with_pre_tokenizer(Some(PreTokenizers::new(vec![
        split.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    let (bos, eos) = (vocab.bos_id() as u32, vocab.eos_id() as u32);
    tokenizer.with_post_processor(Some(
        RobertaProcessing::new((EOS.into(), eos), (BOS.into(), bos))
            .trim_offsets(false)
            .add_prefix_space(false),
    ));
    tokenizer.with_decoder(Some(ByteLevel::new(true, true, true)));
    tokenizer
        .add_special_tokens([AddedToken::from(BOS, true), AddedToken::from(EOS, true)])
        .map_err(failed)?;
    Ok(tokenizer)
}

// -------------------------------------------------------------------------------- weights

/// The recorder's answer to candle's `contains_tensor`: the vision embeddings ask whether the
/// checkpoint has a class embedding (candle would otherwise draw one at random): CLIP's always
/// does.
fn has_class_embedding(name: &str) -> bool {
    name.ends_with("class_embedding")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_sizes_are_valid_and_tiny() {
        let spec = TinyClipSpec::default();
        spec.validate().unwrap();
        assert!(spec.values(clip_vocab().len()) < 200_000);
    }

    #[test]
    fn floats_are_written_as_pythons_repr_writes_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        let value = json!({"b": [1e-5, 2.6592, 1.0, 1e16, 1.5e-7, 1.0 / 255.0, 1e15], "a": 0.0001});
        write_json(&path, &value).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        // json.dumps(value, indent=2, sort_keys=True) + "\n"
        let python = "{\n  \"a\": 0.0001,\n  \"b\": [\n    1e-05,\n    2.6592,\n    1.0,\n    \
                      1e+16,\n    1.5e-07,\n    0.00392156862745098,\n    1000000000000000.0\n  ]\n}\n";
        assert_eq!(text, python);
    }

    #[test]
    fn every_corpus_word_is_one_token() {
        let vocab = clip_vocab();
        let tokenizer = fast_tokenizer(&vocab).unwrap();
        for word in CAPTION_CORPUS.split_whitespace() {
            let ids = tokenizer.encode(word, false).unwrap().get_ids().to_vec();
            assert_eq!(ids.len(), 1, "{word}: {ids:?}");
        }
    }
}
