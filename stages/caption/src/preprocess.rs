//! Images to BLIP's pixel tensor, as transformers' `BlipImageProcessor` (PIL backend) makes it:
//! convert to RGB, resize to the model's square size with Pillow's bicubic filter (a squash, no
//! crop), rescale by 1/255, normalise with the CLIP mean and std, channels first.
//!
//! The settings come from the model folder's processor config when it has one
//! (`preprocessor_config.json`, or the `image_processor` entry of `processor_config.json` as
//! transformers 5 writes it), else from `BlipImageProcessor`'s defaults.

use std::path::Path;

use serde::Deserialize;

use crate::error::CaptionError;
use sdpipe_stages::pillow::{resize_rgb, Filter};

/// The processor settings sdpipe honours; anything else in the file must be at its default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ImageProcessorConfig {
    pub size: Size,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub rescale_factor: f64,
    /// Pillow's resampling filter number; only 3 (bicubic) is implemented.
    pub resample: u32,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub do_normalize: bool,
    pub do_convert_rgb: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Size {
    pub height: usize,
    pub width: usize,
}

impl Default for ImageProcessorConfig {
    // The constants as transformers spells them, so they can be compared by eye.
    #[allow(clippy::excessive_precision)]
    fn default() -> Self {
        ImageProcessorConfig {
            size: Size { height: 384, width: 384 },
            // OPENAI_CLIP_MEAN / OPENAI_CLIP_STD.
            image_mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            image_std: [0.268_629_54, 0.261_302_58, 0.275_777_11],
            rescale_factor: 1.0 / 255.0,
            resample: 3,
            do_resize: true,
            do_rescale: true,
            do_normalize: true,
            do_convert_rgb: true,
        }
    }
}

impl ImageProcessorConfig {
    /// The settings in `model_dir`, or the defaults when it has no processor config.
    pub fn from_model_dir(model_dir: &Path) -> Result<Self, CaptionError> {
        let legacy = model_dir.join("preprocessor_config.json");
        let bundled = model_dir.join("processor_config.json");
        let (config, path): (ImageProcessorConfig, _) = if legacy.is_file() {
            (read_json(&legacy)?, Some(legacy))
        } else if bundled.is_file() {
            #[derive(Deserialize)]
            struct Bundle {
                #[serde(default)]
                image_processor: ImageProcessorConfig,
            }
            (read_json::<Bundle>(&bundled)?.image_processor, Some(bundled))
        } else {
            (ImageProcessorConfig::default(), None)
        };
        config.check().map_err(|e| match (e, path) {
            (CaptionError::Model(message), Some(path)) => {
                CaptionError::Model(format!("{}: {message}", path.display()))
            }
            (e, _) => e,
        })?;
        Ok(config)
    }

    fn check(&self) -> Result<(), CaptionError> {
        let unsupported = |what: String| {
            CaptionError::Model(format!(
            "the image processor config asks for {what}, which sdpipe's BLIP preprocessing does \
             not implement (it follows BlipImageProcessor's defaults)"
        ))
        };
        if self.resample != 3 {
            return Err(unsupported(format!(
                "resample filter {} (only 3, bicubic)",
                self.resample
            )));
        }
        if !(self.do_resize && self.do_rescale && self.do_normalize && self.do_convert_rgb) {
            return Err(unsupported(
                "skipping resize, rescale, normalise or RGB conversion".into(),
            ));
        }
        if self.size.height == 0 || self.size.width == 0 {
            return Err(unsupported("an empty image size".into()));
        }
        let max = sdpipe_stages::limits::MAX_IMAGE_SIZE;
        if self.size.height > max || self.size.width > max {
            return Err(CaptionError::Model(format!(
                "the image processor config resizes to {}x{}, more than sdpipe's cap of {max} a \
                 side",
                self.size.width, self.size.height
            )));
        }
        Ok(())
    }

    /// Resize an RGB8 image and normalise it: `3 * height * width` floats, channels first.
    pub fn pixels(&self, rgb: &[u8], width: usize, height: usize) -> Vec<f32> {
        let Size { height: out_h, width: out_w } = self.size;
        let resized = resize_rgb(rgb, width, height, out_w, out_h, Filter::Bicubic);
        self.normalise(&resized)
    }

    /// Rescale and normalise an already resized RGB8 image (`height * width * 3` bytes).
    pub fn normalise(&self, resized: &[u8]) -> Vec<f32> {
        let plane = self.size.height * self.size.width;
        let mut out = vec![0f32; 3 * plane];
        for (i, px) in resized.chunks_exact(3).enumerate() {
            for c in 0..3 {
                // In f32, as numpy does it on the float32 array transformers builds.
                let v = px[c] as f32 * self.rescale_factor as f32;
                out[c * plane + i] = (v - self.image_mean[c]) / self.image_std[c];
            }
        }
        out
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, CaptionError> {
    let text = sdpipe_stages::limits::read_config_text(path)
        .map_err(|e| CaptionError::Model(format!("reading {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| CaptionError::Model(format!("{} is not a valid config: {e}", path.display())))
}

/// Decode an image file into RGB8 as `image.convert("RGB")` does in Pillow for 8-bit images:
/// JPEG with libjpeg-turbo set up as Pillow sets it up (byte-identical), alpha dropped (not
/// composited), grey replicated. EXIF orientation is not applied, as
/// transformers does not apply it to an opened image either.
pub fn load_rgb(path: &Path) -> Result<(Vec<u8>, usize, usize), CaptionError> {
    let rgb = sdpipe_jpeg::open_rgb(path)
        .map_err(|e| CaptionError::Image { path: path.to_path_buf(), message: e.to_string() })?;
    let (w, h) = rgb.dimensions();
    Ok((rgb.into_raw(), w as usize, h as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absurd_resize_target_is_refused_before_any_image_is_resized() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("preprocessor_config.json"),
            r#"{"size": {"height": 1000000000, "width": 1000000000}}"#,
        )
        .unwrap();
        let err = ImageProcessorConfig::from_model_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("resizes to 1000000000x1000000000, more than sdpipe's cap"), "{err}");
    }
}
