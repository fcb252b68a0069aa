//! A BLIP captioning model loaded from a Hugging Face model folder (`config.json`,
//! `model.safetensors`, `tokenizer.json`, the processor config): the vision transformer from
//! candle-transformers, our cached text decoder ([`crate::decoder`]), the tokenizer, and the
//! image preprocessing.
//!
//! Config values missing from `config.json` take transformers' `BlipTextConfig` /
//! `BlipVisionConfig` defaults, as transformers itself fills them in (its files only hold what
//! differs from the defaults).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Activation, VarBuilder};
use candle_transformers::models::{blip, blip_text};
use serde::Deserialize;

use crate::decoder::{DecoderCache, TextDecoder};
use crate::error::CaptionError;
use crate::generate::{self, GenerationConfig, NextToken};
use crate::preprocess::ImageProcessorConfig;

/// `BlipTextConfig`, with transformers' defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub encoder_hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    /// `[DEC]`: the first token of every caption.
    pub bos_token_id: u32,
    /// `[SEP]`: BLIP's generate() ends captions with it.
    pub sep_token_id: u32,
    pub pad_token_id: u32,
}

impl Default for TextConfig {
    fn default() -> Self {
        TextConfig {
            vocab_size: 30524,
            hidden_size: 768,
            encoder_hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 512,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-12,
            bos_token_id: 30522,
            sep_token_id: 102,
            pad_token_id: 0,
        }
    }
}

/// `BlipVisionConfig`, with transformers' defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl Default for VisionConfig {
    fn default() -> Self {
        VisionConfig {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            image_size: 384,
            patch_size: 16,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-5,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct BlipConfig {
    pub text_config: TextConfig,
    pub vision_config: VisionConfig,
    #[serde(default)]
    pub model_type: Option<String>,
}

impl BlipConfig {
    pub fn from_file(path: &Path) -> Result<BlipConfig, CaptionError> {
        let text = sdpipe_stages::limits::read_config_text(path)
            .map_err(|e| CaptionError::Model(format!("reading {}: {e}", path.display())))?;
        BlipConfig::from_json(&text, path)
    }

    /// The config in `text` (the contents of `path`, named in errors).
    pub fn from_json(text: &str, path: &Path) -> Result<BlipConfig, CaptionError> {
        let mut config: BlipConfig = serde_json::from_str(text)
            .map_err(|e| CaptionError::Model(format!("{}: {e}", path.display())))?;
        if let Some(t) = config.model_type.as_deref().filter(|t| *t != "blip") {
            return Err(CaptionError::Model(format!(
                "{} describes a `{t}` model; the caption stage needs BLIP \
                 (BlipForConditionalGeneration, e.g. Salesforce/blip-image-captioning-large)",
                path.display()
            )));
        }
        // As BlipConfig.__init__ does: the decoder attends to the vision encoder's width.
        config.text_config.encoder_hidden_size = config.vision_config.hidden_size;
        config
            .check_sizes()
            .map_err(|e| CaptionError::Model(format!("{}: {e}", path.display())))?;
        Ok(config)
    }

    /// Every size within sdpipe's caps ([`sdpipe_stages::limits`]), so that nothing is built,
    /// allocated or divided by from a number of the file alone.
    fn check_sizes(&self) -> Result<(), String> {
        sdpipe_stages::check_config_towers!(self.text_config, self.vision_config)
    }

    fn candle(&self) -> blip::Config {
        let t = &self.text_config;
        let v = &self.vision_config;
        blip::Config {
            text_config: blip_text::Config {
                vocab_size: t.vocab_size,
                hidden_size: t.hidden_size,
                encoder_hidden_size: t.encoder_hidden_size,
                intermediate_size: t.intermediate_size,
                projection_dim: t.hidden_size,
                num_hidden_layers: t.num_hidden_layers,
                num_attention_heads: t.num_attention_heads,
                max_position_embeddings: t.max_position_embeddings,
                hidden_act: t.hidden_act,
                layer_norm_eps: t.layer_norm_eps,
                is_decoder: true,
            },
            vision_config: blip::VisionConfig {
                hidden_size: v.hidden_size,
                intermediate_size: v.intermediate_size,
                projection_dim: v.hidden_size,
                num_hidden_layers: v.num_hidden_layers,
                num_attention_heads: v.num_attention_heads,
                image_size: v.image_size,
                patch_size: v.patch_size,
                hidden_act: v.hidden_act,
                layer_norm_eps: v.layer_norm_eps,
            },
            projection_dim: v.hidden_size,
            image_text_hidden_size: v.hidden_size,
        }
    }
}

/// Where the model's files are.
pub struct ModelFiles<'a> {
    pub config: &'a Path,
    pub weights: &'a Path,
    pub tokenizer: &'a Path,
    /// The folder holding the processor config, if any.
    pub root: &'a Path,
}

/// How to decode.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoding {
    /// 1 means greedy search.
    pub num_beams: usize,
    pub max_length: usize,
    pub min_length: usize,
}

pub struct Blip {
    /// candle's BLIP; only its vision model is used (see [`crate::decoder`] for why).
    candle: blip::BlipForConditionalGeneration,
    decoder: TextDecoder,
    tokenizer: tokenizers::Tokenizer,
    pub processor: ImageProcessorConfig,
    pub config: BlipConfig,
    device: Device,
}

/// The name transformers gives the vocabulary projection; BLIP ties it to the word embeddings,
/// and checkpoints saved with tied weights removed (transformers 5) lack it.
const TIED: (&str, &str) = (
    "text_decoder.cls.predictions.decoder.weight",
    "text_decoder.bert.embeddings.word_embeddings.weight",
);

impl Blip {
    /// Load the model folder's files onto `device`.
    pub fn load(files: &ModelFiles<'_>, device: &Device) -> Result<Blip, CaptionError> {
        let device = device.clone();
        let config = BlipConfig::from_file(files.config)?;
        let processor = ImageProcessorConfig::from_model_dir(files.root)?;
        let mut tensors = candle_core::safetensors::load(files.weights, &device).map_err(|e| {
            CaptionError::Model(format!("reading weights {}: {e}", files.weights.display()))
        })?;
        if !tensors.contains_key(TIED.0) {
            if let Some(embeddings) = tensors.get(TIED.1).cloned() {
                tensors.insert(TIED.0.to_string(), embeddings);
            }
        }
        let tensors: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
            .collect::<candle_core::Result<_>>()?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let tokenizer = tokenizers::Tokenizer::from_file(files.tokenizer)
            .map_err(|e| CaptionError::Tokenizer(format!("{}: {e}", files.tokenizer.display())))?;
        Blip::new(config, processor, vb, tokenizer).map_err(|e| match e {
            CaptionError::Candle(e) => CaptionError::Model(format!(
                "{} does not match {}: {e}",
                files.weights.display(),
                files.config.display()
            )),
            other => other,
        })
    }

    /// A model from weights in `vb` (`vision_model.*`, `text_decoder.*`, with the vocabulary
    /// projection present), e.g. random ones for a benchmark.
    pub fn new(
        config: BlipConfig,
        processor: ImageProcessorConfig,
        vb: VarBuilder,
        tokenizer: tokenizers::Tokenizer,
    ) -> Result<Blip, CaptionError> {
        let vision = &config.vision_config;
        if processor.size.height != vision.image_size || processor.size.width != vision.image_size {
            return Err(CaptionError::Model(format!(
                "the processor resizes to {}x{} but the vision model takes {}x{}",
                processor.size.width, processor.size.height, vision.image_size, vision.image_size
            )));
        }
        let t = &config.text_config;
        let tokenizer_size = tokenizer.get_vocab_size(true);
        if tokenizer_size > t.vocab_size {
            return Err(CaptionError::Tokenizer(format!(
                "the tokenizer has {tokenizer_size} tokens but the model only {}",
                t.vocab_size
            )));
        }
        let device = vb.device().clone();
        let candle = blip::BlipForConditionalGeneration::new(&config.candle(), vb.clone())?;
        let decoder = TextDecoder::load(&config.text_config, vb.pp("text_decoder"))?;
        Ok(Blip { candle, decoder, tokenizer, processor, config, device })
    }

    /// Pixel tensors (`3 * size * size` each, from [`ImageProcessorConfig::pixels`]) → image
    /// token embeddings `(images, tokens, width)`.
    pub fn encode(&self, pixels: &[Vec<f32>]) -> Result<Tensor, CaptionError> {
        let s = self.config.vision_config.image_size;
        let flat: Vec<f32> = pixels.iter().flatten().copied().collect();
        let batch = Tensor::from_vec(flat, (pixels.len(), 3, s, s), &self.device)?;
        Ok(self.candle.vision_model().forward(&batch)?)
    }

    /// The decoder's start: `[DEC]`, then the prompt's word pieces (as BLIP's generate() turns
    /// the processor's `[CLS] prompt [SEP]` into `[DEC] prompt`).
    pub fn prompt_ids(&self, prompt: &str) -> Result<Vec<u32>, CaptionError> {
        let mut ids = vec![self.config.text_config.bos_token_id];
        if !prompt.trim().is_empty() {
            let encoding = self
                .tokenizer
                .encode(prompt, false)
                .map_err(|e| CaptionError::Tokenizer(format!("encoding the prompt: {e}")))?;
            ids.extend_from_slice(encoding.get_ids());
        }
        Ok(ids)
    }

    /// Generated token ids (after the prompt; the end token included when produced) for each
    /// image's embeddings.
    pub fn generate(
        &self,
        image_embeds: &Tensor,
        prompt: &[u32],
        decoding: &Decoding,
    ) -> Result<Vec<Vec<u32>>, CaptionError> {
        let images = image_embeds.dim(0)?;
        if prompt.len() >= decoding.max_length {
            return Err(CaptionError::Model(format!(
                "the prompt is {} tokens with [DEC]; max_length ({}) must be larger",
                prompt.len(),
                decoding.max_length
            )));
        }
        let cfg = GenerationConfig {
            max_length: decoding.max_length,
            min_length: decoding.min_length,
            eos: self.config.text_config.sep_token_id,
            num_beams: decoding.num_beams,
            length_penalty: 1.0,
        };
        let beams = decoding.num_beams.max(1);
        let rows: Vec<usize> = (0..images).flat_map(|i| std::iter::repeat_n(i, beams)).collect();
        let cache = self.decoder.start(image_embeds)?.select(&rows)?;
        let mut run = DecoderRun { blip: self, cache, prompt, rows: rows.len() };
        if beams == 1 {
            generate::greedy(&mut run, images, prompt.len(), &cfg)
        } else {
            generate::beam_search(&mut run, images, prompt.len(), &cfg)
        }
    }

    /// Text of token ids, special tokens skipped, with the tokenizer's own clean-up (BERT's
    /// WordPiece decoder joins `##` pieces and tidies spaces before punctuation).
    pub fn decode(&self, ids: &[u32]) -> Result<String, CaptionError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| CaptionError::Tokenizer(format!("decoding {ids:?}: {e}")))
    }
}

/// The decoder's state during one generate() call, for the search.
struct DecoderRun<'a> {
    blip: &'a Blip,
    cache: DecoderCache,
    prompt: &'a [u32],
    rows: usize,
}

impl NextToken for DecoderRun<'_> {
    fn next_logits(
        &mut self,
        extend: Option<(&[usize], &[u32])>,
    ) -> Result<Vec<f32>, CaptionError> {
        let device = &self.blip.device;
        let ids = match extend {
            None => {
                let ids: Vec<u32> =
                    (0..self.rows).flat_map(|_| self.prompt.iter().copied()).collect();
                Tensor::from_vec(ids, (self.rows, self.prompt.len()), device)?
            }
            Some((parents, tokens)) => {
                self.cache = self.cache.select(parents)?;
                self.rows = parents.len();
                Tensor::from_vec(tokens.to_vec(), (tokens.len(), 1), device)?
            }
        };
        let logits = self.blip.decoder.forward_last(&ids, &mut self.cache)?;
        Ok(logits.flatten_all()?.to_vec1::<f32>()?)
    }

    fn vocab_size(&self) -> usize {
        self.blip.config.text_config.vocab_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_model() -> Blip {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/blip/model");
        Blip::load(
            &ModelFiles {
                config: &dir.join("config.json"),
                weights: &dir.join("model.safetensors"),
                tokenizer: &dir.join("tokenizer.json"),
                root: &dir,
            },
            &Device::Cpu,
        )
        .unwrap()
    }

    /// Our decoder, fed a prompt and then one token at a time through its caches, computes what
    /// candle's uncached `TextLMHeadModel` computes on the whole sequence at once (to f32
    /// rounding: the sums run in a different order).
    #[test]
    fn the_cached_decoder_matches_candles_text_decoder() {
        let mut blip = fixture_model();
        let pixels: Vec<f32> = (0..3 * 384 * 384).map(|i| ((i % 97) as f32 / 48.0) - 1.0).collect();
        let embeds = blip.encode(&[pixels]).unwrap();
        let ids = Tensor::new(&[[101u32, 20, 30, 40, 50, 3]], &Device::Cpu).unwrap();
        blip.candle.reset_kv_cache();
        let reference = blip.candle.text_decoder().forward(&ids, &embeds).unwrap();

        let mut cache = blip.decoder.start(&embeds).unwrap();
        let mut pieces =
            vec![blip.decoder.forward(&ids.narrow(1, 0, 2).unwrap(), &mut cache).unwrap()];
        for t in 2..6 {
            pieces.push(blip.decoder.forward(&ids.narrow(1, t, 1).unwrap(), &mut cache).unwrap());
        }
        let ours = Tensor::cat(&pieces, 1).unwrap();
        let diff = (ours - reference).unwrap().abs().unwrap().max_all().unwrap();
        let diff: f32 = diff.to_scalar().unwrap();
        assert!(diff < 1e-4, "max logit difference {diff}");
    }

    #[test]
    fn missing_config_values_take_transformers_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"model_type": "blip", "vision_config": {"hidden_size": 1024, "num_attention_heads": 16}}"#)
            .unwrap();
        let c = BlipConfig::from_file(&path).unwrap();
        assert_eq!(c.text_config.encoder_hidden_size, 1024);
        assert_eq!(c.text_config.bos_token_id, 30522);
        assert_eq!(c.text_config.sep_token_id, 102);
        assert_eq!(c.vision_config.image_size, 384);
    }

    #[test]
    fn a_config_of_another_model_type_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"model_type": "clip"}"#).unwrap();
        let err = BlipConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("`clip`"), "{err}");
    }

    fn refusal(config: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, config).unwrap();
        let err = BlipConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "names the file: {err}");
        err
    }

    #[test]
    fn an_absurd_text_width_is_refused_by_its_cap() {
        let err =
            refusal(r#"{"text_config": {"hidden_size": 1000000000, "num_attention_heads": 8}}"#);
        assert!(
            err.contains("`text_config.hidden_size` = 1000000000 is outside 1..=16384"),
            "{err}"
        );
    }

    #[test]
    fn zero_attention_heads_are_refused_before_anything_divides_by_them() {
        let err = refusal(r#"{"vision_config": {"num_attention_heads": 0}}"#);
        assert!(err.contains("`vision_config.num_attention_heads` = 0"), "{err}");
    }

    #[test]
    fn an_absurd_image_size_is_refused() {
        let err = refusal(r#"{"vision_config": {"image_size": 1000000000, "patch_size": 1}}"#);
        assert!(err.contains("`vision_config.image_size` = 1000000000"), "{err}");
    }

    #[test]
    fn more_image_patches_than_positions_are_refused() {
        let err = refusal(r#"{"vision_config": {"image_size": 4096, "patch_size": 1}}"#);
        assert!(err.contains("16777216 patches"), "{err}");
    }

    #[test]
    fn an_oversized_config_file_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::File::create(&path).unwrap().set_len(1 << 40).unwrap();
        let err = BlipConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("too large for a model config"), "{err}");
    }
}
