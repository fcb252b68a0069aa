//! Hard caps on every size a model config can name (Stable Diffusion's components, BLIP), so
//! that nothing is ever allocated, looped over or shifted by a number read from a file alone. A
//! model folder is untrusted input: a `config.json` claiming `block_out_channels: [1000000000,
//! ...]` must be refused with the key and the cap, not reach an allocator (or a `capacity
//! overflow` panic). The model crates check their configs against these.
//!
//! The caps are generous: each is many times what any published model of these families uses,
//! and beyond each the model could not be loaded anyway.
//!
//! - [`MAX_CHANNELS`] 16384: SD 1.x/2.x/XL blocks are at most 1280 wide, CLIP ViT-bigG's hidden
//!   size is 1280, T5-XXL's widest layer 10240. One 3×3 convolution 16384 channels wide in and
//!   out is 9.7 GB of f32.
//! - [`MAX_BLOCKS`] 8: SD has 4 resolution levels (SDXL 3); each halves the latents, and 8
//!   halvings take a 4096-pixel image's 512-wide latent to 4.
//! - [`MAX_LAYERS`] 64: resnets or transformer blocks per block (SD: 2; SDXL's deepest
//!   transformer: 10) and text encoder layers (CLIP ViT-bigG: 32).
//! - [`MAX_VOCAB`] 1,000,000: CLIP's vocabulary is 49,408; the largest tokenizers in use have
//!   about 256,000 entries.
//! - [`MAX_POSITIONS`] 65,536: CLIP reads 77 tokens.
//! - [`MAX_SAMPLE_SIZE`] 1024: the latent side of the default image (SD1.5: 64, SDXL: 128).
//! - [`MAX_IMAGE_SIZE`] 4096: the side of an image encoder's input (BLIP: 384); one such image
//!   is 200 MB of f32 pixels.
//! - [`MAX_CONFIG_BYTES`] 16 MiB: diffusers' configs are a few kilobytes (a scheduler's
//!   `trained_betas` some tens).

use std::path::Path;

pub const MAX_CHANNELS: usize = 16_384;
pub const MAX_BLOCKS: usize = 8;
pub const MAX_LAYERS: usize = 64;
pub const MAX_VOCAB: usize = 1_000_000;
pub const MAX_POSITIONS: usize = 65_536;
pub const MAX_SAMPLE_SIZE: usize = 1024;
pub const MAX_IMAGE_SIZE: usize = 4096;
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// `value` of config key `key` is within `1..=max`; the error names both.
pub fn check(key: &str, value: usize, max: usize) -> Result<(), String> {
    within(&format!("`{key}`"), value, max)
}

/// [`check`] for each value of a per-block list, naming the index.
pub fn check_each(key: &str, values: &[usize], max: usize) -> Result<(), String> {
    for (i, &value) in values.iter().enumerate() {
        within(&format!("`{key}`[{i}]"), value, max)?;
    }
    Ok(())
}

/// The sizes of a transformer text tower (`text_config` of a BLIP or CLIP `config.json`).
pub struct TextTower {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
}

/// The sizes of a vision transformer (`vision_config` of a BLIP or CLIP `config.json`).
pub struct VisionTower {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
}

/// [`check_towers`] on a BLIP or CLIP config's `text_config` and `vision_config`: any two
/// values with transformers' field names (the configs are different types with the same keys).
#[macro_export]
macro_rules! check_config_towers {
    ($text:expr, $vision:expr) => {{
        let (t, v) = (&$text, &$vision);
        $crate::limits::check_towers(
            &$crate::limits::TextTower {
                vocab_size: t.vocab_size,
                hidden_size: t.hidden_size,
                intermediate_size: t.intermediate_size,
                num_hidden_layers: t.num_hidden_layers,
                num_attention_heads: t.num_attention_heads,
                max_position_embeddings: t.max_position_embeddings,
            },
            &$crate::limits::VisionTower {
                hidden_size: v.hidden_size,
                intermediate_size: v.intermediate_size,
                num_hidden_layers: v.num_hidden_layers,
                num_attention_heads: v.num_attention_heads,
                image_size: v.image_size,
                patch_size: v.patch_size,
            },
        )
    }};
}

/// Every size of both towers within the caps, named by its `text_config.` / `vision_config.`
/// key, checked in that order; then what a transformer divides by: each tower's heads divide
/// its width, the patch size divides the image size, and the patches fit [`MAX_POSITIONS`].
pub fn check_towers(t: &TextTower, v: &VisionTower) -> Result<(), String> {
    for (key, value, max) in [
        ("text_config.vocab_size", t.vocab_size, MAX_VOCAB),
        ("text_config.hidden_size", t.hidden_size, MAX_CHANNELS),
        ("text_config.intermediate_size", t.intermediate_size, 4 * MAX_CHANNELS),
        ("text_config.num_hidden_layers", t.num_hidden_layers, MAX_LAYERS),
        ("text_config.num_attention_heads", t.num_attention_heads, MAX_CHANNELS),
        ("text_config.max_position_embeddings", t.max_position_embeddings, MAX_POSITIONS),
        ("vision_config.hidden_size", v.hidden_size, MAX_CHANNELS),
        ("vision_config.intermediate_size", v.intermediate_size, 4 * MAX_CHANNELS),
        ("vision_config.num_hidden_layers", v.num_hidden_layers, MAX_LAYERS),
        ("vision_config.num_attention_heads", v.num_attention_heads, MAX_CHANNELS),
        ("vision_config.image_size", v.image_size, MAX_IMAGE_SIZE),
        ("vision_config.patch_size", v.patch_size, MAX_IMAGE_SIZE),
    ] {
        check(key, value, max)?;
    }
    for (tower, hidden, heads) in [
        ("text_config", t.hidden_size, t.num_attention_heads),
        ("vision_config", v.hidden_size, v.num_attention_heads),
    ] {
        if !hidden.is_multiple_of(heads) {
            return Err(format!(
                "`{tower}.hidden_size` = {hidden} is not a multiple of \
                 `{tower}.num_attention_heads` = {heads}"
            ));
        }
    }
    if !v.image_size.is_multiple_of(v.patch_size) {
        return Err(format!(
            "`vision_config.image_size` = {} is not a multiple of `vision_config.patch_size` = {}",
            v.image_size, v.patch_size
        ));
    }
    let patches = (v.image_size / v.patch_size).pow(2);
    if patches > MAX_POSITIONS {
        return Err(format!(
            "`vision_config.image_size` / `patch_size` gives {patches} patches, more than \
             {MAX_POSITIONS}"
        ));
    }
    Ok(())
}

fn within(label: &str, value: usize, max: usize) -> Result<(), String> {
    if value == 0 || value > max {
        return Err(format!(
            "{label} = {value} is outside 1..={max} (sdpipe's cap on what a config may ask for)"
        ));
    }
    Ok(())
}

/// A `block_out_channels` list: at most [`MAX_BLOCKS`] blocks, each width within
/// [`MAX_CHANNELS`]. (Whether an empty list is an error is the caller's: each says it its way.)
pub fn check_block_widths(channels: &[usize]) -> Result<(), String> {
    let n = channels.len();
    if n > MAX_BLOCKS {
        return Err(format!(
            "`block_out_channels` lists {n} blocks; sdpipe builds at most {MAX_BLOCKS}"
        ));
    }
    check_each("block_out_channels", channels, MAX_CHANNELS)
}

/// A config file's text, refusing files over [`MAX_CONFIG_BYTES`] before reading them.
pub fn read_config_text(path: &Path) -> std::io::Result<String> {
    let len = std::fs::metadata(path)?.len();
    if len > MAX_CONFIG_BYTES {
        return Err(std::io::Error::other(format!(
            "{len} bytes, too large for a model config (at most {MAX_CONFIG_BYTES})"
        )));
    }
    std::fs::read_to_string(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_over_its_cap_is_named_with_the_cap() {
        let error = check("hidden_size", 1_000_000_000, MAX_CHANNELS).unwrap_err();
        assert!(error.contains("`hidden_size` = 1000000000 is outside 1..=16384"), "{error}");
    }

    #[test]
    fn zero_is_outside_every_range() {
        assert!(check("x", 0, 10).is_err());
        assert!(check("x", 10, 10).is_ok());
    }

    #[test]
    fn a_list_entry_over_its_cap_is_named_by_index() {
        let error = check_each("block_out_channels", &[32, 1 << 30], MAX_CHANNELS).unwrap_err();
        assert!(error.contains("`block_out_channels`[1] = 1073741824"), "{error}");
    }

    #[test]
    fn more_blocks_than_the_cap_are_counted_in_the_refusal() {
        let error = check_block_widths(&[32; MAX_BLOCKS + 1]).unwrap_err();
        assert!(error.contains("lists 9 blocks; sdpipe builds at most 8"), "{error}");
        assert!(check_block_widths(&[32; MAX_BLOCKS]).is_ok());
    }

    fn towers(text_heads: usize, patch_size: usize, image_size: usize) -> Result<(), String> {
        let text = TextTower {
            vocab_size: 100,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: text_heads,
            max_position_embeddings: 77,
        };
        let vision = VisionTower {
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            image_size,
            patch_size,
        };
        check_towers(&text, &vision)
    }

    #[test]
    fn towers_must_divide_their_widths_by_their_heads_and_images_by_their_patches() {
        assert!(towers(4, 4, 32).is_ok());
        let error = towers(3, 4, 32).unwrap_err();
        assert!(error.contains("`text_config.hidden_size` = 32 is not a multiple"), "{error}");
        let error = towers(4, 5, 32).unwrap_err();
        assert!(error.contains("`vision_config.image_size` = 32 is not a multiple"), "{error}");
        let error = towers(4, 1, 4096).unwrap_err();
        assert!(error.contains("16777216 patches"), "{error}");
    }

    #[test]
    fn an_oversized_config_file_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::File::create(&path).unwrap().set_len(MAX_CONFIG_BYTES + 1).unwrap();
        let error = read_config_text(&path).unwrap_err().to_string();
        assert!(error.contains("too large for a model config"), "{error}");
    }
}
