//! Typed views of the JSON configs in a diffusers Stable Diffusion pipeline folder.
//!
//! Each struct names the fields sdpipe reads and keeps every other key in `extra`, so a config
//! read and written back keeps what diffusers (or a newer diffusers) put there. Defaults are
//! those of the diffusers/transformers class the file configures, so a config that leaves a key
//! out means what it means to diffusers.

use std::collections::BTreeMap;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::PipelineError;

/// A per-block setting that diffusers accepts either as one value for all blocks or as a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Copy> PerBlock<T> {
    /// The value for block `i`, or `None` when a list is too short.
    pub fn get(&self, i: usize) -> Option<T> {
        match self {
            PerBlock::One(v) => Some(*v),
            PerBlock::Each(list) => list.get(i).copied(),
        }
    }
}

/// `model_index.json`: the pipeline class and, per component, its `[library, class]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelIndex {
    pub class_name: String,
    pub diffusers_version: Option<String>,
    /// Component folder name → (library, class); `(None, None)` marks an absent optional part.
    pub components: BTreeMap<String, (Option<String>, Option<String>)>,
    /// Every other key (e.g. `requires_safety_checker`).
    pub extra: Map<String, Value>,
}

impl ModelIndex {
    pub fn from_value(value: Value) -> Result<ModelIndex, String> {
        let Value::Object(map) = value else {
            return Err("expected a JSON object".into());
        };
        let mut index = ModelIndex {
            class_name: String::new(),
            diffusers_version: None,
            components: BTreeMap::new(),
            extra: Map::new(),
        };
        for (key, value) in map {
            match (key.as_str(), &value) {
                ("_class_name", Value::String(s)) => index.class_name = s.clone(),
                ("_diffusers_version", Value::String(s)) => {
                    index.diffusers_version = Some(s.clone())
                }
                (k, Value::Array(pair)) if !k.starts_with('_') && pair.len() == 2 => {
                    let part = |v: &Value| v.as_str().map(str::to_string);
                    index.components.insert(key.clone(), (part(&pair[0]), part(&pair[1])));
                }
                _ => {
                    index.extra.insert(key, value);
                }
            }
        }
        if index.class_name.is_empty() {
            return Err("`_class_name` is missing".into());
        }
        Ok(index)
    }

    pub fn to_value(&self) -> Value {
        let mut map = self.extra.clone();
        map.insert("_class_name".into(), Value::String(self.class_name.clone()));
        if let Some(v) = &self.diffusers_version {
            map.insert("_diffusers_version".into(), Value::String(v.clone()));
        }
        for (name, (library, class)) in &self.components {
            map.insert(name.clone(), serde_json::json!([library, class]));
        }
        Value::Object(map)
    }

    /// Whether component `name` is present (listed with a library and a class).
    pub fn has(&self, name: &str) -> bool {
        matches!(self.components.get(name), Some((Some(_), Some(_))))
    }
}

fn default_true() -> bool {
    true
}
fn default_sample_size() -> usize {
    64
}
fn default_four() -> usize {
    4
}
fn default_three() -> usize {
    3
}
fn default_layers_per_block() -> usize {
    2
}
fn default_norm_groups() -> usize {
    32
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_cross_attention_dim() -> usize {
    1280
}
fn default_attention_head_dim() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn default_transformer_layers() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn default_one_f64() -> f64 {
    1.0
}
fn default_one() -> usize {
    1
}
fn default_silu() -> String {
    "silu".into()
}
fn default_unet_down_blocks() -> Vec<String> {
    let mut blocks = vec!["CrossAttnDownBlock2D".to_string(); 3];
    blocks.push("DownBlock2D".into());
    blocks
}
fn default_unet_up_blocks() -> Vec<String> {
    let mut blocks = vec!["UpBlock2D".to_string()];
    blocks.extend(vec!["CrossAttnUpBlock2D".to_string(); 3]);
    blocks
}
fn default_unet_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn default_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}

/// `unet/config.json` (diffusers `UNet2DConditionModel`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: String,
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    #[serde(default = "default_four")]
    pub in_channels: usize,
    #[serde(default = "default_four")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "default_unet_down_blocks")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_mid_block")]
    pub mid_block_type: Option<String>,
    #[serde(default = "default_unet_up_blocks")]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_unet_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: usize,
    #[serde(default = "default_one")]
    pub downsample_padding: usize,
    #[serde(default = "default_one_f64")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    #[serde(default = "default_norm_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_cross_attention_dim")]
    pub cross_attention_dim: usize,
    #[serde(default = "default_transformer_layers")]
    pub transformer_layers_per_block: PerBlock<usize>,
    /// For SD1.x this is (by a historical naming accident in diffusers) the number of heads.
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    /// When set, the number of heads per block (and `attention_head_dim` is then ignored).
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl UNetConfig {
    /// Heads of block `i` as diffusers computes them (`num_attention_heads or attention_head_dim`).
    pub fn heads(&self, i: usize) -> Option<usize> {
        match &self.num_attention_heads {
            Some(heads) => heads.get(i),
            None => self.attention_head_dim.get(i),
        }
    }
}

fn default_vae_channels() -> Vec<usize> {
    vec![64]
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_one_usize() -> usize {
    1
}

/// `vae/config.json` (diffusers `AutoencoderKL`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: String,
    #[serde(default = "default_three")]
    pub in_channels: usize,
    #[serde(default = "default_three")]
    pub out_channels: usize,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_vae_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_one_usize")]
    pub layers_per_block: usize,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    #[serde(default = "default_four")]
    pub latent_channels: usize,
    #[serde(default = "default_norm_groups")]
    pub norm_num_groups: usize,
    #[serde(default)]
    pub sample_size: Option<usize>,
    /// Latents are `posterior × scaling_factor`; sampling decodes `latents / scaling_factor`.
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl VaeConfig {
    /// Pixels per latent along each side, as diffusers' pipelines compute it.
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

fn default_clip_vocab() -> usize {
    49408
}
fn default_clip_hidden() -> usize {
    512
}
fn default_clip_intermediate() -> usize {
    2048
}
fn default_clip_layers() -> usize {
    12
}
fn default_clip_heads() -> usize {
    8
}
fn default_clip_positions() -> usize {
    77
}
fn default_quick_gelu() -> String {
    "quick_gelu".into()
}

/// `text_encoder/config.json` (transformers `CLIPTextConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextEncoderConfig {
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    #[serde(default = "default_clip_vocab")]
    pub vocab_size: usize,
    #[serde(default = "default_clip_hidden")]
    pub hidden_size: usize,
    #[serde(default = "default_clip_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "default_clip_hidden")]
    pub projection_dim: usize,
    #[serde(default = "default_clip_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_clip_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_clip_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "default_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `scheduler/scheduler_config.json`. Fields whose default depends on the scheduler class are
/// options, resolved by [`crate::schedulers`] for the class actually used (as diffusers'
/// `from_config` does when one scheduler is built from another's config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_train_timesteps: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_start: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_end: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_schedule: Option<String>,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_spacing: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps_offset: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_alpha_to_one: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_prk_steps: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_sample: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_sample_range: Option<f64>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl SchedulerConfig {
    /// Stable Diffusion 1.5's `scheduler_config.json` (PNDM, scaled-linear betas).
    pub fn sd15() -> SchedulerConfig {
        SchedulerConfig {
            class_name: "PNDMScheduler".into(),
            num_train_timesteps: Some(1000),
            beta_start: Some(0.00085),
            beta_end: Some(0.012),
            beta_schedule: Some("scaled_linear".into()),
            trained_betas: None,
            prediction_type: Some("epsilon".into()),
            timestep_spacing: Some("leading".into()),
            steps_offset: Some(1),
            set_alpha_to_one: Some(false),
            skip_prk_steps: Some(true),
            clip_sample: Some(false),
            clip_sample_range: None,
            extra: Map::new(),
        }
    }
}

/// The largest tokenizer file sdpipe reads (`tokenizer.json`, `vocab.json`, `merges.txt`):
/// CLIP's are 1 to 2.2 MB, the largest tokenizers in use some tens of MB.
pub const MAX_TOKENIZER_BYTES: u64 = 64 << 20;

/// Read and parse one JSON config file, naming the file in every error. Files over
/// [`sdpipe_unet::limits::MAX_CONFIG_BYTES`] are refused before they are read.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, PipelineError> {
    read_json_at_most(path, sdpipe_unet::limits::MAX_CONFIG_BYTES)
}

/// [`read_json`] for a file of at most `max` bytes.
pub fn read_json_at_most<T: DeserializeOwned>(path: &Path, max: u64) -> Result<T, PipelineError> {
    check_file_size(path, max)?;
    let text = std::fs::read_to_string(path)
        .map_err(|source| PipelineError::Read { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text)
        .map_err(|e| PipelineError::BadConfig { path: path.to_path_buf(), message: e.to_string() })
}

/// Refuses a file over `max` bytes, before anything reads it.
pub fn check_file_size(path: &Path, max: u64) -> Result<(), PipelineError> {
    let len = std::fs::metadata(path)
        .map_err(|source| PipelineError::Read { path: path.to_path_buf(), source })?
        .len();
    if len > max {
        return Err(PipelineError::BadConfig {
            path: path.to_path_buf(),
            message: format!("{len} bytes, more than the {max} a file of this kind may have"),
        });
    }
    Ok(())
}

/// The most training timesteps a scheduler config may name (SD: 1000): the noise schedule
/// allocates one entry per timestep.
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

impl UNetConfig {
    /// Every size within sdpipe's caps ([`sdpipe_unet::limits`]), so that nothing is built,
    /// allocated or shifted by a number from the file alone. (Whether the architecture is one
    /// sdpipe builds is the loaders' business.)
    pub fn check_sizes(&self) -> Result<(), String> {
        use sdpipe_unet::limits::*;
        check_blocks(&self.block_out_channels)?;
        check("in_channels", self.in_channels, MAX_CHANNELS)?;
        check("out_channels", self.out_channels, MAX_CHANNELS)?;
        check("layers_per_block", self.layers_per_block, MAX_LAYERS)?;
        check("cross_attention_dim", self.cross_attention_dim, MAX_CHANNELS)?;
        check("norm_num_groups", self.norm_num_groups, MAX_CHANNELS)?;
        check("sample_size", self.sample_size, MAX_SAMPLE_SIZE)?;
        let per_block = |key: &str, values: &PerBlock<usize>, max: usize| match values {
            PerBlock::One(v) => check(key, *v, max),
            PerBlock::Each(list) => check_each(key, list, max),
        };
        per_block("transformer_layers_per_block", &self.transformer_layers_per_block, MAX_LAYERS)?;
        per_block("attention_head_dim", &self.attention_head_dim, MAX_CHANNELS)?;
        if let Some(heads) = &self.num_attention_heads {
            per_block("num_attention_heads", heads, MAX_CHANNELS)?;
        }
        Ok(())
    }
}

/// A `block_out_channels` list: not empty, and within [`sdpipe_unet::limits`]' caps.
fn check_blocks(channels: &[usize]) -> Result<(), String> {
    if channels.is_empty() {
        return Err("`block_out_channels` lists no blocks".into());
    }
    sdpipe_unet::limits::check_block_widths(channels)
}

impl VaeConfig {
    /// Every size within sdpipe's caps, and the group norms' groups dividing every width
    /// (candle's group norm divides by the number of groups).
    pub fn check_sizes(&self) -> Result<(), String> {
        use sdpipe_unet::limits::*;
        check_blocks(&self.block_out_channels)?;
        check("in_channels", self.in_channels, MAX_CHANNELS)?;
        check("out_channels", self.out_channels, MAX_CHANNELS)?;
        check("latent_channels", self.latent_channels, MAX_CHANNELS)?;
        check("layers_per_block", self.layers_per_block, MAX_LAYERS)?;
        check("norm_num_groups", self.norm_num_groups, MAX_CHANNELS)?;
        if let Some(c) = self.block_out_channels.iter().find(|&&c| c % self.norm_num_groups != 0) {
            return Err(format!(
                "`norm_num_groups` = {} does not divide the block width {c}",
                self.norm_num_groups
            ));
        }
        Ok(())
    }
}

impl TextEncoderConfig {
    /// Every size within sdpipe's caps (the limits of sdpipe-unet's trainable CLIP).
    pub fn check_sizes(&self) -> Result<(), String> {
        use sdpipe_unet::limits::*;
        check("vocab_size", self.vocab_size, MAX_VOCAB)?;
        check("hidden_size", self.hidden_size, MAX_CHANNELS)?;
        check("intermediate_size", self.intermediate_size, 4 * MAX_CHANNELS)?;
        check("projection_dim", self.projection_dim, MAX_CHANNELS)?;
        check("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS)?;
        check("num_attention_heads", self.num_attention_heads, MAX_CHANNELS)?;
        check("max_position_embeddings", self.max_position_embeddings, MAX_POSITIONS)
    }
}

impl SchedulerConfig {
    /// `num_train_timesteps` within 1..=[`MAX_TRAIN_TIMESTEPS`].
    pub fn check_sizes(&self) -> Result<(), String> {
        match self.num_train_timesteps {
            Some(n) => sdpipe_unet::limits::check("num_train_timesteps", n, MAX_TRAIN_TIMESTEPS),
            None => Ok(()),
        }
    }
}

/// Write a config the way diffusers' `save_pretrained` does: keys sorted, two-space indent,
/// a trailing newline. (Numbers are written in Rust's shortest round-trip form, e.g. `1e-5`
/// where Python writes `1e-05`: the same value to every JSON reader.)
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), PipelineError> {
    let value = serde_json::to_value(value).map_err(|e| PipelineError::BadConfig {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let text = serde_json::to_string_pretty(&sorted(value)).expect("JSON values serialise");
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|source| PipelineError::Write { path: parent.to_path_buf(), source })?;
    }
    std::fs::write(path, text + "\n")
        .map_err(|source| PipelineError::Write { path: path.to_path_buf(), source })
}

/// The value with every object's keys in sorted order (independent of serde_json's map type).
fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let entries: BTreeMap<String, Value> =
                map.into_iter().map(|(k, v)| (k, sorted(v))).collect();
            Value::Object(entries.into_iter().collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_unet_keys_survive_a_round_trip() {
        let text = r#"{"_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64],
            "attention_head_dim": [4, 8], "some_future_key": {"a": 1}, "sample_size": 32}"#;
        let config: UNetConfig = serde_json::from_str(text).unwrap();
        assert_eq!(config.extra["some_future_key"], serde_json::json!({"a": 1}));
        assert_eq!(config.heads(1), Some(8));
        let back: UNetConfig =
            serde_json::from_value(serde_json::to_value(&config).unwrap()).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn num_attention_heads_wins_over_attention_head_dim() {
        let config: UNetConfig =
            serde_json::from_str(r#"{"attention_head_dim": 8, "num_attention_heads": [2, 4]}"#)
                .unwrap();
        assert_eq!(config.heads(0), Some(2));
    }

    #[test]
    fn model_index_keeps_components_and_flags() {
        let text = r#"{"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
            "unet": ["diffusers", "UNet2DConditionModel"], "safety_checker": [null, null],
            "requires_safety_checker": false}"#;
        let index = ModelIndex::from_value(serde_json::from_str(text).unwrap()).unwrap();
        assert!(index.has("unet"));
        assert!(!index.has("safety_checker"));
        assert_eq!(index.extra["requires_safety_checker"], Value::Bool(false));
        let again = ModelIndex::from_value(index.to_value()).unwrap();
        assert_eq!(again, index);
    }

    #[test]
    fn an_absurd_unet_width_is_refused_by_its_cap() {
        let config: UNetConfig =
            serde_json::from_str(r#"{"block_out_channels": [1000000000, 1000000000]}"#).unwrap();
        let err = config.check_sizes().unwrap_err();
        assert!(err.contains("`block_out_channels`[0] = 1000000000 is outside 1..=16384"), "{err}");
    }

    #[test]
    fn an_absurd_unet_sample_size_is_refused() {
        let config: UNetConfig = serde_json::from_str(r#"{"sample_size": 1000000000000}"#).unwrap();
        assert!(config.check_sizes().unwrap_err().contains("`sample_size`"));
    }

    #[test]
    fn per_block_head_counts_are_capped_each() {
        let config: UNetConfig =
            serde_json::from_str(r#"{"attention_head_dim": [8, 8, 8, 1000000000]}"#).unwrap();
        let err = config.check_sizes().unwrap_err();
        assert!(err.contains("`attention_head_dim`[3]"), "{err}");
    }

    #[test]
    fn more_unet_blocks_than_the_cap_are_refused() {
        let config: UNetConfig =
            serde_json::from_str(&format!(r#"{{"block_out_channels": {:?}}}"#, vec![32; 100]))
                .unwrap();
        assert!(config.check_sizes().unwrap_err().contains("lists 100 blocks"));
    }

    #[test]
    fn a_vae_with_zero_norm_groups_is_refused() {
        let config: VaeConfig = serde_json::from_str(r#"{"norm_num_groups": 0}"#).unwrap();
        assert!(config.check_sizes().unwrap_err().contains("`norm_num_groups` = 0"));
    }

    #[test]
    fn a_vae_whose_groups_do_not_divide_a_width_is_refused() {
        let config: VaeConfig =
            serde_json::from_str(r#"{"block_out_channels": [32, 48], "norm_num_groups": 32}"#)
                .unwrap();
        assert!(config.check_sizes().unwrap_err().contains("does not divide the block width 48"));
    }

    #[test]
    fn an_absurd_text_encoder_position_count_is_refused() {
        let config: TextEncoderConfig =
            serde_json::from_str(r#"{"max_position_embeddings": 4000000000}"#).unwrap();
        let err = config.check_sizes().unwrap_err();
        assert!(
            err.contains("`max_position_embeddings` = 4000000000 is outside 1..=65536"),
            "{err}"
        );
    }

    #[test]
    fn an_absurd_number_of_training_timesteps_is_refused() {
        let config: SchedulerConfig =
            serde_json::from_str(r#"{"num_train_timesteps": 1000000000000000}"#).unwrap();
        assert!(config.check_sizes().unwrap_err().contains("`num_train_timesteps`"));
    }

    #[test]
    fn a_config_file_over_the_size_cap_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::File::create(&path).unwrap().set_len(1 << 40).unwrap();
        let err = read_json::<Value>(&path).unwrap_err().to_string();
        assert!(err.contains("1099511627776 bytes, more than the 16777216"), "{err}");
    }

    #[test]
    fn vae_scale_factor_follows_the_number_of_blocks() {
        let config: VaeConfig =
            serde_json::from_str(r#"{"block_out_channels": [128, 256, 512, 512]}"#).unwrap();
        assert_eq!(config.scale_factor(), 8);
        assert_eq!(config.scaling_factor, 0.18215);
    }
}
