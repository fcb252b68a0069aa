//! Tiny random-weight Stable Diffusion 1.x pipelines, written exactly in the diffusers layout.
//!
//! No pretrained weights can be fetched in CI, so tests (here and in the training crates) run
//! on pipelines of SD1.5's *architecture* at toy sizes. The folder is what diffusers'
//! `StableDiffusionPipeline.save_pretrained` writes: configs with every key diffusers writes,
//! safetensors weights with diffusers'/transformers' tensor names and shapes (the text encoder
//! with the `text_model.` prefix of the published SD1.5 files), a small CLIP BPE tokenizer, and
//! SD1.5's PNDM scheduler config.
//!
//! The tensor list is not hand-maintained: candle's SD modules are built against the recording
//! [`VarBuilder`] backend of [`sdpipe_stages::tiny_models`] (shared with `tiny-clip`), so the
//! writer emits exactly the tensors a loader asks for; the parity script checks them against
//! diffusers' own state dicts. Values are initialised as PyTorch initialises these layers
//! (kaiming-uniform weights and uniform biases in ±1/√fan_in for conv and linear layers,
//! ones/zeros for norms, small uniform embeddings), so the model is trainable, and every value
//! depends only on (seed, component, tensor name): ChaCha streams and IEEE basic arithmetic
//! only, so the bytes are identical on every platform.

use std::collections::BTreeMap;
use std::path::Path;

use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::ClipTextTransformer;
use candle_transformers::models::stable_diffusion::unet_2d::UNet2DConditionModel;
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKL;
use sdpipe_stages::tiny_models::{BpeVocab, Recorder};
use serde_json::{json, Map, Value};

use crate::config::{
    write_json, ModelIndex, PerBlock, SchedulerConfig, TextEncoderConfig, UNetConfig, VaeConfig,
};
use crate::error::PipelineError;
use crate::pipeline::{clip_to_candle, unet_to_candle, vae_to_candle, write_weights};

/// The diffusers release whose `save_pretrained` output this writer reproduces (checked by
/// `tests/parity/diffusion.py`).
pub const DIFFUSERS_VERSION: &str = "0.42.1";

/// Sizes of a tiny pipeline. The defaults are the smallest SD1.x shape that still has every
/// kind of block: one cross-attention and one plain block each way, 64-pixel images.
#[derive(Debug, Clone, PartialEq)]
pub struct TinySpec {
    pub seed: u64,
    /// UNet channels per block; the last block is a plain Down/UpBlock2D, the others have
    /// cross-attention (SD1.5's pattern).
    pub unet_channels: Vec<usize>,
    pub layers_per_block: usize,
    /// Attention heads per block (diffusers' `attention_head_dim`, which for SD1.x counts heads).
    pub attention_heads: usize,
    pub norm_num_groups: usize,
    pub vae_channels: Vec<usize>,
    pub latent_channels: usize,
    /// Output image side in pixels; the UNet's `sample_size` is this over the VAE's factor.
    pub image_size: usize,
    /// CLIP width, which is also the UNet's `cross_attention_dim`.
    pub clip_hidden: usize,
    pub clip_layers: usize,
    pub clip_heads: usize,
    pub clip_intermediate: usize,
    /// The most BPE merges the tiny tokenizer learns; it stops once every word of its corpus
    /// is one token (about 450 merges).
    pub bpe_merges: usize,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            seed: 0,
            unet_channels: vec![32, 64],
            layers_per_block: 1,
            attention_heads: 8,
            norm_num_groups: 32,
            vae_channels: vec![32, 64],
            latent_channels: 4,
            image_size: 64,
            clip_hidden: 32,
            clip_layers: 2,
            clip_heads: 4,
            clip_intermediate: 37,
            bpe_merges: 2000,
        }
    }
}

impl TinySpec {
    fn validate(&self) -> Result<(), String> {
        if self.unet_channels.is_empty() || self.vae_channels.is_empty() {
            return Err("unet_channels and vae_channels need at least one block".into());
        }
        if self.norm_num_groups == 0 || self.attention_heads == 0 || self.layers_per_block == 0 {
            return Err("norm_num_groups, attention_heads and layers_per_block must be ≥ 1".into());
        }
        for &c in self.unet_channels.iter().chain(&self.vae_channels) {
            if c == 0 || !c.is_multiple_of(self.norm_num_groups) {
                return Err(format!(
                    "channel count {c} is not a multiple of norm_num_groups {}",
                    self.norm_num_groups
                ));
            }
            if self.unet_channels.contains(&c) && !c.is_multiple_of(self.attention_heads) {
                return Err(format!(
                    "UNet channels {c} are not a multiple of {} heads",
                    self.attention_heads
                ));
            }
        }
        let factor = 1usize << (self.vae_channels.len() - 1);
        let unet_factor = 1usize << (self.unet_channels.len() - 1);
        if self.image_size == 0 || !self.image_size.is_multiple_of(factor * unet_factor) {
            return Err(format!(
                "image_size {} must be a multiple of {} (VAE ×{factor}, UNet ×{unet_factor})",
                self.image_size,
                factor * unet_factor
            ));
        }
        if self.clip_heads == 0 || !self.clip_hidden.is_multiple_of(self.clip_heads) {
            return Err(format!(
                "clip_hidden {} is not a multiple of clip_heads {}",
                self.clip_hidden, self.clip_heads
            ));
        }
        Ok(())
    }
}

/// Write a tiny pipeline into `dir` (created if needed).
pub fn write_tiny(dir: &Path, spec: &TinySpec) -> Result<(), PipelineError> {
    spec.validate()
        .map_err(|message| PipelineError::Unsupported { path: dir.to_path_buf(), message })?;
    let vocab = crate::tiny_bpe::train(spec.bpe_merges);
    crate::tiny_bpe::write(&vocab, &dir.join("tokenizer"))?;

    let unet = unet_config(spec);
    let vae = vae_config(spec);
    let clip = clip_config(spec, &vocab);
    let weights = |component: &str, build: &dyn Fn(VarBuilder) -> candle_core::Result<()>| {
        let tensors = Recorder::new(spec.seed, component, vae_attention_naming)
            .record(build)
            .map_err(|source| PipelineError::Weights { path: dir.join(component), source })?;
        let file = if component == "text_encoder" {
            "model.safetensors"
        } else {
            "diffusion_pytorch_model.safetensors"
        };
        write_weights(&dir.join(component).join(file), &tensors)
    };

    let candle_unet = unet_to_candle(&unet).expect("the tiny UNet config maps to candle");
    weights("unet", &|vb| {
        UNet2DConditionModel::new(
            vb,
            unet.in_channels,
            unet.out_channels,
            false,
            candle_unet.clone(),
        )
        .map(|_| ())
    })?;
    let candle_vae = vae_to_candle(&vae).expect("the tiny VAE config maps to candle");
    weights("vae", &|vb| {
        AutoEncoderKL::new(vb, vae.in_channels, vae.out_channels, candle_vae.clone()).map(|_| ())
    })?;
    let candle_clip = clip_to_candle(&clip).expect("the tiny CLIP config maps to candle");
    weights("text_encoder", &|vb| {
        ClipTextTransformer::new(vb.pp("text_model"), &candle_clip).map(|_| ())
    })?;

    write_json(&dir.join("unet/config.json"), &unet)?;
    write_json(&dir.join("vae/config.json"), &vae)?;
    write_json(&dir.join("text_encoder/config.json"), &clip)?;
    let mut scheduler = SchedulerConfig::sd15();
    scheduler.extra.insert("_diffusers_version".into(), json!(DIFFUSERS_VERSION));
    write_json(&dir.join("scheduler/scheduler_config.json"), &scheduler)?;
    write_json(&dir.join("model_index.json"), &model_index().to_value())?;
    Ok(())
}

fn model_index() -> ModelIndex {
    let part = |lib: &str, class: &str| (Some(lib.to_string()), Some(class.to_string()));
    let mut components = BTreeMap::new();
    components.insert("unet".into(), part("diffusers", "UNet2DConditionModel"));
    components.insert("vae".into(), part("diffusers", "AutoencoderKL"));
    components.insert("text_encoder".into(), part("transformers", "CLIPTextModel"));
    components.insert("tokenizer".into(), part("transformers", "CLIPTokenizer"));
    components.insert("scheduler".into(), part("diffusers", "PNDMScheduler"));
    for absent in ["safety_checker", "feature_extractor", "image_encoder"] {
        components.insert(absent.into(), (None, None));
    }
    let mut extra = Map::new();
    extra.insert("requires_safety_checker".into(), Value::Bool(false));
    ModelIndex {
        class_name: "StableDiffusionPipeline".into(),
        diffusers_version: Some(DIFFUSERS_VERSION.into()),
        components,
        extra,
    }
}

fn unet_config(spec: &TinySpec) -> UNetConfig {
    let n = spec.unet_channels.len();
    let down: Vec<String> = (0..n)
        .map(|i| if i + 1 < n || n == 1 { "CrossAttnDownBlock2D" } else { "DownBlock2D" }.into())
        .collect();
    let up: Vec<String> = down
        .iter()
        .rev()
        .map(|d| if d == "DownBlock2D" { "UpBlock2D" } else { "CrossAttnUpBlock2D" }.into())
        .collect();
    // The keys diffusers writes that sdpipe does not interpret, with their defaults.
    let extra = json!({
        "_diffusers_version": DIFFUSERS_VERSION,
        "addition_embed_type": null,
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": null,
        "attention_type": "default",
        "class_embed_type": null,
        "class_embeddings_concat": false,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_norm": null,
        "dropout": 0.0,
        "dual_cross_attention": false,
        "encoder_hid_dim": null,
        "encoder_hid_dim_type": null,
        "mid_block_only_cross_attention": null,
        "num_class_embeds": null,
        "only_cross_attention": false,
        "projection_class_embeddings_input_dim": null,
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": false,
        "resnet_time_scale_shift": "default",
        "reverse_transformer_layers_per_block": null,
        "time_cond_proj_dim": null,
        "time_embedding_act_fn": null,
        "time_embedding_dim": null,
        "time_embedding_type": "positional",
        "timestep_post_act": null,
    });
    UNetConfig {
        class_name: "UNet2DConditionModel".into(),
        sample_size: spec.image_size >> (spec.vae_channels.len() - 1),
        in_channels: spec.latent_channels,
        out_channels: spec.latent_channels,
        center_input_sample: false,
        flip_sin_to_cos: true,
        freq_shift: 0.0,
        down_block_types: down,
        mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
        up_block_types: up,
        block_out_channels: spec.unet_channels.clone(),
        layers_per_block: spec.layers_per_block,
        downsample_padding: 1,
        mid_block_scale_factor: 1.0,
        act_fn: "silu".into(),
        norm_num_groups: spec.norm_num_groups,
        norm_eps: 1e-5,
        cross_attention_dim: spec.clip_hidden,
        transformer_layers_per_block: PerBlock::One(1),
        attention_head_dim: PerBlock::One(spec.attention_heads),
        num_attention_heads: None,
        use_linear_projection: false,
        upcast_attention: false,
        extra: as_map(extra),
    }
}

fn vae_config(spec: &TinySpec) -> VaeConfig {
    let n = spec.vae_channels.len();
    VaeConfig {
        class_name: "AutoencoderKL".into(),
        in_channels: 3,
        out_channels: 3,
        down_block_types: vec!["DownEncoderBlock2D".into(); n],
        up_block_types: vec!["UpDecoderBlock2D".into(); n],
        block_out_channels: spec.vae_channels.clone(),
        layers_per_block: spec.layers_per_block,
        act_fn: "silu".into(),
        latent_channels: spec.latent_channels,
        norm_num_groups: spec.norm_num_groups,
        sample_size: Some(spec.image_size),
        scaling_factor: 0.18215,
        shift_factor: None,
        use_quant_conv: true,
        use_post_quant_conv: true,
        mid_block_add_attention: true,
        extra: as_map(json!({
            "_diffusers_version": DIFFUSERS_VERSION,
            "force_upcast": true,
            "latents_mean": null,
            "latents_std": null,
        })),
    }
}

fn clip_config(spec: &TinySpec, vocab: &BpeVocab) -> TextEncoderConfig {
    TextEncoderConfig {
        architectures: Some(vec!["CLIPTextModel".into()]),
        vocab_size: vocab.len(),
        hidden_size: spec.clip_hidden,
        intermediate_size: spec.clip_intermediate,
        projection_dim: spec.clip_hidden,
        num_hidden_layers: spec.clip_layers,
        num_attention_heads: spec.clip_heads,
        max_position_embeddings: 77,
        hidden_act: "quick_gelu".into(),
        layer_norm_eps: 1e-5,
        extra: as_map(json!({
            "attention_dropout": 0.0,
            "bos_token_id": vocab.bos_id(),
            "eos_token_id": vocab.eos_id(),
            "pad_token_id": vocab.eos_id(),
            "dtype": "float32",
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "model_type": "clip_text_model",
        })),
    }
}

fn as_map(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => unreachable!("literal objects"),
    }
}

/// The recorder's answer to candle's `contains_tensor`: candle's VAE attention asks which naming
/// a file uses; answer with diffusers' current one (`to_q`/`to_k`/`to_v`/`to_out.0`, not the
/// pre-0.14 `query`/`key`/...).
fn vae_attention_naming(name: &str) -> bool {
    name.ends_with("to_q.weight")
}
