//! The UNet's configuration, read from a diffusers `unet/config.json`.
//!
//! Owns the mapping from diffusers' `UNet2DConditionModel` config keys to the architecture we
//! build, including diffusers' quirks (for SD1.x/2.x `attention_head_dim` is the *number of
//! heads*; per-block values may be a single number or a list). Keys that select architectures we
//! do not implement are rejected by name rather than silently ignored; keys that do not affect
//! the computation (`_class_name`, `sample_size`, ...) are ignored.

use std::path::Path;

use serde_json::Value;

use crate::error::UNetError;

/// A down block: with or without cross-attention transformers after each resnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// `CrossAttnDownBlock2D` / `CrossAttnUpBlock2D`.
    CrossAttn,
    /// `DownBlock2D` / `UpBlock2D`.
    Plain,
}

/// The architecture of an SD1.x/2.x-shaped `UNet2DConditionModel`.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_blocks: Vec<BlockKind>,
    pub up_blocks: Vec<BlockKind>,
    /// Resnets per down block (up blocks have one more), per block.
    pub layers_per_block: Vec<usize>,
    /// Attention heads per block (diffusers' `attention_head_dim`, or `num_attention_heads`).
    pub attention_heads: Vec<usize>,
    /// Transformer blocks per `Transformer2DModel`, per block.
    pub transformer_layers_per_block: Vec<usize>,
    /// Width of the encoder hidden states the cross-attention reads, per block.
    pub cross_attention_dim: Vec<usize>,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub use_linear_projection: bool,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub center_input_sample: bool,
    /// Recorded for completeness: it only changes f16 numerics, and we compute in f32.
    pub upcast_attention: bool,
}

impl UNetConfig {
    /// Reads and validates `config.json` of a diffusers UNet folder.
    pub fn from_file(path: &Path) -> Result<Self, UNetError> {
        Ok(Self::read(path)?.0)
    }

    /// Like [`UNetConfig::from_file`], also returning the JSON as read.
    pub fn read(path: &Path) -> Result<(Self, Value), UNetError> {
        let text = crate::limits::read_config_text(path)
            .map_err(|source| UNetError::Io { path: path.to_path_buf(), source })?;
        let json: Value = serde_json::from_str(&text).map_err(|e| UNetError::Config {
            path: path.to_path_buf(),
            message: format!("not valid JSON: {e}"),
        })?;
        let config = Self::from_json(&json)
            .map_err(|message| UNetError::Config { path: path.to_path_buf(), message })?;
        Ok((config, json))
    }

    /// Parses a config object as diffusers writes it; the error names the offending key.
    pub fn from_json(json: &Value) -> Result<Self, String> {
        let obj = json.as_object().ok_or("the config is not a JSON object")?;
        let get = |key: &str| obj.get(key).filter(|v| !v.is_null());
        let usize_of = |key: &str, default: usize| -> Result<usize, String> {
            match get(key) {
                None => Ok(default),
                Some(v) => v
                    .as_u64()
                    .map(|n| n as usize)
                    .ok_or(format!("`{key}` must be a non-negative integer, got {v}")),
            }
        };
        let f64_of = |key: &str, default: f64| -> Result<f64, String> {
            match get(key) {
                None => Ok(default),
                Some(v) => v.as_f64().ok_or(format!("`{key}` must be a number, got {v}")),
            }
        };
        let bool_of = |key: &str, default: bool| -> Result<bool, String> {
            match get(key) {
                None => Ok(default),
                Some(v) => v.as_bool().ok_or(format!("`{key}` must be true or false, got {v}")),
            }
        };
        let strings = |key: &str, default: &[&str]| -> Result<Vec<String>, String> {
            match get(key) {
                None => Ok(default.iter().map(|s| s.to_string()).collect()),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .ok_or(format!("`{key}` must list strings, got {v}"))
                    })
                    .collect(),
                Some(v) => Err(format!("`{key}` must be a list of strings, got {v}")),
            }
        };

        let block_out_channels = match get("block_out_channels") {
            None => vec![320, 640, 1280, 1280],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().map(|n| n as usize).filter(|&n| n > 0))
                .collect::<Option<Vec<_>>>()
                .ok_or(format!(
                    "`block_out_channels` must list positive integers, got {}",
                    Value::Array(items.clone())
                ))?,
            Some(v) => return Err(format!("`block_out_channels` must be a list, got {v}")),
        };
        let n = block_out_channels.len();
        if n == 0 {
            return Err("`block_out_channels` is empty".into());
        }
        // A per-block setting: one number for every block, or a list with one per block.
        let per_block = |key: &str, default: Option<usize>| -> Result<Vec<usize>, String> {
            match get(key) {
                None => default.map(|d| vec![d; n]).ok_or(format!("`{key}` is required")),
                Some(Value::Array(items)) => {
                    let values = items
                        .iter()
                        .map(|v| v.as_u64().map(|x| x as usize).filter(|&x| x > 0))
                        .collect::<Option<Vec<_>>>()
                        .ok_or(format!("`{key}` must list positive integers"))?;
                    if values.len() != n {
                        return Err(format!(
                            "`{key}` lists {} values but there are {n} blocks (`block_out_channels`)",
                            values.len()
                        ));
                    }
                    Ok(values)
                }
                Some(v) => v.as_u64().filter(|&x| x > 0).map(|x| vec![x as usize; n]).ok_or(
                    format!("`{key}` must be a positive integer or a list of them, got {v}"),
                ),
            }
        };

        let kinds = |key: &str,
                     default: &[&str],
                     cross: &str,
                     plain: &str|
         -> Result<Vec<BlockKind>, String> {
            let names = strings(key, default)?;
            if names.len() != n {
                return Err(format!(
                    "`{key}` lists {} blocks but `block_out_channels` has {n}",
                    names.len()
                ));
            }
            names
                .iter()
                .map(|name| match name.as_str() {
                    s if s == cross => Ok(BlockKind::CrossAttn),
                    s if s == plain => Ok(BlockKind::Plain),
                    other => Err(format!(
                        "`{key}`: block type `{other}` is not supported (only {cross} and {plain}, as in SD1.x/2.x)"
                    )),
                })
                .collect()
        };
        let down_blocks = kinds(
            "down_block_types",
            &[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ],
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        )?;
        let up_blocks = kinds(
            "up_block_types",
            &["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "CrossAttnUpBlock2D",
            "UpBlock2D",
        )?;

        // Architectural options we do not implement: reject anything but diffusers' defaults.
        let expect = |key: &str, ok: &dyn Fn(&Value) -> bool, what: &str| -> Result<(), String> {
            match get(key) {
                Some(v) if !ok(v) => Err(format!("`{key}` = {v} is not supported (only {what})")),
                _ => Ok(()),
            }
        };
        let is_false = |v: &Value| v.as_bool() == Some(false);
        let is_str = |s: &'static str| move |v: &Value| v.as_str() == Some(s);
        let is_num = |x: f64| move |v: &Value| v.as_f64() == Some(x);
        expect("mid_block_type", &is_str("UNetMidBlock2DCrossAttn"), "UNetMidBlock2DCrossAttn")?;
        expect("act_fn", &is_str("silu"), "silu")?;
        expect("only_cross_attention", &is_false, "false")?;
        expect("dual_cross_attention", &is_false, "false")?;
        expect("resnet_time_scale_shift", &is_str("default"), "\"default\"")?;
        expect("time_embedding_type", &is_str("positional"), "\"positional\"")?;
        expect("attention_type", &is_str("default"), "\"default\"")?;
        expect("conv_in_kernel", &is_num(3.0), "3")?;
        expect("conv_out_kernel", &is_num(3.0), "3")?;
        expect("resnet_skip_time_act", &is_false, "false")?;
        expect("resnet_out_scale_factor", &is_num(1.0), "1.0")?;
        expect("class_embeddings_concat", &is_false, "false")?;
        expect("mid_block_only_cross_attention", &is_false, "null or false")?;
        for key in [
            "class_embed_type",
            "num_class_embeds",
            "addition_embed_type",
            "encoder_hid_dim",
            "encoder_hid_dim_type",
            "time_cond_proj_dim",
            "time_embedding_dim",
            "time_embedding_act_fn",
            "timestep_post_act",
            "cross_attention_norm",
            "reverse_transformer_layers_per_block",
        ] {
            if let Some(v) = get(key) {
                return Err(format!("`{key}` = {v} is not supported (only null, as in SD1.x/2.x)"));
            }
        }
        if get("dropout").and_then(Value::as_f64).is_some_and(|p| p != 0.0) {
            return Err("`dropout` other than 0 is not supported".into());
        }
        // diffusers itself refuses `num_attention_heads` for this model; when set, it counts heads.
        let attention_heads = match get("num_attention_heads") {
            Some(_) => per_block("num_attention_heads", None)?,
            None => per_block("attention_head_dim", Some(8))?,
        };

        let config = UNetConfig {
            in_channels: usize_of("in_channels", 4)?,
            out_channels: usize_of("out_channels", 4)?,
            down_blocks,
            up_blocks,
            layers_per_block: per_block("layers_per_block", Some(2))?,
            attention_heads,
            transformer_layers_per_block: per_block("transformer_layers_per_block", Some(1))?,
            cross_attention_dim: per_block("cross_attention_dim", Some(1280))?,
            norm_num_groups: usize_of("norm_num_groups", 32)?,
            norm_eps: f64_of("norm_eps", 1e-5)?,
            flip_sin_to_cos: bool_of("flip_sin_to_cos", true)?,
            freq_shift: f64_of("freq_shift", 0.0)?,
            use_linear_projection: bool_of("use_linear_projection", false)?,
            downsample_padding: usize_of("downsample_padding", 1)?,
            mid_block_scale_factor: f64_of("mid_block_scale_factor", 1.0)?,
            center_input_sample: bool_of("center_input_sample", false)?,
            upcast_attention: bool_of("upcast_attention", false)?,
            block_out_channels,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the shape constraints diffusers would hit at construction time, and that every
    /// size is within sdpipe's caps ([`crate::limits`]): nothing is built from a number alone.
    fn validate(&self) -> Result<(), String> {
        use crate::limits::{check, check_block_widths, check_each, MAX_CHANNELS, MAX_LAYERS};
        check_block_widths(&self.block_out_channels)?;
        check("in_channels", self.in_channels, MAX_CHANNELS)?;
        check("out_channels", self.out_channels, MAX_CHANNELS)?;
        check_each("cross_attention_dim", &self.cross_attention_dim, MAX_CHANNELS)?;
        check_each("layers_per_block", &self.layers_per_block, MAX_LAYERS)?;
        check_each("transformer_layers_per_block", &self.transformer_layers_per_block, MAX_LAYERS)?;
        // Padding beyond the 3×3 kernel only adds borders of zeros, ever larger activations.
        if self.downsample_padding > 3 {
            return Err(format!(
                "`downsample_padding` = {} is more than the 3×3 kernel's 3",
                self.downsample_padding
            ));
        }
        let groups = self.norm_num_groups;
        if groups == 0 {
            return Err("`norm_num_groups` must be positive".into());
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c % groups != 0 {
                return Err(format!(
                    "`block_out_channels`[{i}] = {c} is not divisible by `norm_num_groups` = {groups}"
                ));
            }
            let heads = self.attention_heads[i];
            if c % heads != 0 {
                return Err(format!(
                    "`block_out_channels`[{i}] = {c} is not divisible by its {heads} attention heads"
                ));
            }
        }
        if self.in_channels == 0 || self.out_channels == 0 {
            return Err("`in_channels` and `out_channels` must be positive".into());
        }
        Ok(())
    }

    /// Width of the time embedding (`block_out_channels[0] * 4`).
    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels[0] * 4
    }

    /// How many times the latent is halved: latents must be divisible by `2^downsamples()`.
    pub fn downsamples(&self) -> usize {
        self.block_out_channels.len() - 1
    }

    /// A small SD1.x-shaped config (the one of the parity fixtures and diffusers' own tests):
    /// channels (32, 64), one resnet per block, 8 heads, cross-attention width 32.
    pub fn tiny() -> Self {
        UNetConfig {
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![32, 64],
            down_blocks: vec![BlockKind::CrossAttn, BlockKind::Plain],
            up_blocks: vec![BlockKind::Plain, BlockKind::CrossAttn],
            layers_per_block: vec![1, 1],
            attention_heads: vec![8, 8],
            transformer_layers_per_block: vec![1, 1],
            cross_attention_dim: vec![32, 32],
            norm_num_groups: 32,
            norm_eps: 1e-5,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            use_linear_projection: false,
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            center_input_sample: false,
            upcast_attention: false,
        }
    }

    /// The config as diffusers' `save_pretrained` would write it for this architecture.
    pub fn to_json(&self) -> Value {
        let kinds = |kinds: &[BlockKind], cross: &str, plain: &str| -> Vec<String> {
            kinds
                .iter()
                .map(|k| if *k == BlockKind::CrossAttn { cross } else { plain }.to_string())
                .collect()
        };
        // A list when the values differ, a number otherwise, as diffusers' own configs do.
        let compact = |values: &[usize]| -> Value {
            if values.windows(2).all(|w| w[0] == w[1]) {
                Value::from(values[0])
            } else {
                Value::from(values.to_vec())
            }
        };
        serde_json::json!({
            "_class_name": "UNet2DConditionModel",
            // The version these configs were checked to load with (tests/parity/unet.py).
            "_diffusers_version": "0.42.1",
            "act_fn": "silu",
            "attention_head_dim": compact(&self.attention_heads),
            "block_out_channels": self.block_out_channels,
            "center_input_sample": self.center_input_sample,
            "cross_attention_dim": compact(&self.cross_attention_dim),
            "down_block_types": kinds(&self.down_blocks, "CrossAttnDownBlock2D", "DownBlock2D"),
            "downsample_padding": self.downsample_padding,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "in_channels": self.in_channels,
            "layers_per_block": compact(&self.layers_per_block),
            "mid_block_scale_factor": self.mid_block_scale_factor,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "norm_eps": self.norm_eps,
            "norm_num_groups": self.norm_num_groups,
            "out_channels": self.out_channels,
            "transformer_layers_per_block": compact(&self.transformer_layers_per_block),
            "up_block_types": kinds(&self.up_blocks, "CrossAttnUpBlock2D", "UpBlock2D"),
            "upcast_attention": self.upcast_attention,
            "use_linear_projection": self.use_linear_projection,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixture_config(name: &str) -> UNetConfig {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/unet")
            .join(name)
            .join("unet/config.json");
        UNetConfig::from_file(&path).unwrap()
    }

    #[test]
    fn diffusers_tiny_config_parses_to_the_tiny_architecture() {
        assert_eq!(fixture_config("tiny"), UNetConfig::tiny());
    }

    #[test]
    fn per_block_lists_and_other_branches_are_read() {
        let c = fixture_config("linear");
        assert_eq!(c.attention_heads, vec![2, 4, 4]);
        assert_eq!(c.layers_per_block, vec![2, 2, 2]);
        assert_eq!(c.cross_attention_dim, vec![12, 12, 12]);
        assert_eq!(
            c.down_blocks,
            vec![BlockKind::CrossAttn, BlockKind::CrossAttn, BlockKind::Plain]
        );
        assert!(c.use_linear_projection && c.upcast_attention && !c.flip_sin_to_cos);
        assert_eq!((c.freq_shift, c.norm_eps, c.norm_num_groups), (1.0, 1e-6, 4));
    }

    #[test]
    fn to_json_round_trips() {
        let tiny = UNetConfig::tiny();
        assert_eq!(UNetConfig::from_json(&tiny.to_json()).unwrap(), tiny);
        let linear = fixture_config("linear");
        assert_eq!(UNetConfig::from_json(&linear.to_json()).unwrap(), linear);
    }

    #[test]
    fn missing_keys_take_diffusers_defaults_the_sd15_architecture() {
        let c = UNetConfig::from_json(&json!({"cross_attention_dim": 768})).unwrap();
        assert_eq!(c.block_out_channels, vec![320, 640, 1280, 1280]);
        assert_eq!(c.attention_heads, vec![8; 4]);
        assert_eq!(c.layers_per_block, vec![2; 4]);
        assert_eq!(c.time_embed_dim(), 1280);
    }

    #[test]
    fn absurd_channels_are_refused_before_anything_is_built() {
        let config = json!({"block_out_channels": [1_000_000_000u64, 1_000_000_000u64],
                            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]});
        let err = UNetConfig::from_json(&config).unwrap_err();
        assert!(err.contains("`block_out_channels`[0] = 1000000000 is outside 1..=16384"), "{err}");
    }

    #[test]
    fn more_blocks_than_the_cap_are_refused() {
        let n = crate::limits::MAX_BLOCKS + 1;
        let config = json!({"block_out_channels": vec![32; n],
                            "down_block_types": vec!["DownBlock2D"; n],
                            "up_block_types": vec!["UpBlock2D"; n]});
        let err = UNetConfig::from_json(&config).unwrap_err();
        assert!(err.contains("lists 9 blocks; sdpipe builds at most 8"), "{err}");
    }

    #[test]
    fn absurd_layer_counts_are_refused() {
        let err = UNetConfig::from_json(&json!({"layers_per_block": 1_000_000})).unwrap_err();
        assert!(err.contains("`layers_per_block`[0] = 1000000 is outside 1..=64"), "{err}");
    }

    #[test]
    fn an_absurd_cross_attention_width_is_refused() {
        let err = UNetConfig::from_json(&json!({"cross_attention_dim": 1u64 << 40})).unwrap_err();
        assert!(err.contains("`cross_attention_dim`[0]"), "{err}");
    }

    #[test]
    fn absurd_input_channels_are_refused() {
        let err = UNetConfig::from_json(&json!({"in_channels": 1u64 << 40})).unwrap_err();
        assert!(err.contains("`in_channels` = 1099511627776"), "{err}");
    }

    #[test]
    fn downsample_padding_beyond_the_kernel_is_refused() {
        let err = UNetConfig::from_json(&json!({"downsample_padding": 1_000_000})).unwrap_err();
        assert!(err.contains("`downsample_padding` = 1000000"), "{err}");
    }

    #[test]
    fn unsupported_options_are_named() {
        let cases = [
            (json!({"class_embed_type": "timestep"}), "`class_embed_type`"),
            (json!({"only_cross_attention": true}), "`only_cross_attention`"),
            (json!({"resnet_time_scale_shift": "scale_shift"}), "`resnet_time_scale_shift`"),
            (
                json!({"attention_head_dim": [8, 8]}),
                "`attention_head_dim` lists 2 values but there are 4 blocks",
            ),
            (json!({"block_out_channels": [30, 64, 64, 64]}), "not divisible by `norm_num_groups`"),
            (json!({"layers_per_block": "two"}), "`layers_per_block` must be a positive integer"),
        ];
        for (config, expected) in cases {
            let err = UNetConfig::from_json(&config).unwrap_err();
            assert!(err.contains(expected), "{config}: {err}");
        }
    }
}
