//! Copies of the images a report shows, downscaled so the report folder stays light.
//!
//! Photos stay JPEG (quality 90) and everything else becomes PNG (lossless, as generated
//! samples are). The image crate's codecs are built without threads, so the bytes are a pure
//! function of the source image and the size.

use std::fs;
use std::io::Cursor;
use std::path::Path;

use image::codecs::jpeg::JpegEncoder;
use image::imageops::FilterType;
use image::{DynamicImage, ImageFormat, ImageReader};

use crate::error::ReportError;

const JPEG_QUALITY: u8 = 90;

/// Writes `src` downscaled to fit in `size`×`size` (aspect kept; never upscaled) as
/// `<report>/<rel_dir>/<stem>.<ext>` and returns that path relative to the report.
pub fn thumbnail(
    src: &Path,
    report: &Path,
    rel_dir: &str,
    stem: &str,
    size: u32,
) -> Result<String, ReportError> {
    let image_error = |message: String| ReportError::Image { path: src.to_path_buf(), message };
    let reader = ImageReader::open(src)
        .map_err(|source| ReportError::Read { path: src.to_path_buf(), source })?
        .with_guessed_format()
        .map_err(|source| ReportError::Read { path: src.to_path_buf(), source })?;
    let is_jpeg = reader.format() == Some(ImageFormat::Jpeg);
    let mut image = reader.decode().map_err(|e| image_error(format!("cannot decode: {e}")))?;
    if image.width() > size || image.height() > size {
        // Triangle (bilinear with a proper support when shrinking) is smooth enough for
        // thumbnails and much cheaper than Lanczos.
        image = image.resize(size, size, FilterType::Triangle);
    }
    let mut bytes = Vec::new();
    let ext = if is_jpeg {
        let rgb = DynamicImage::ImageRgb8(image.to_rgb8());
        JpegEncoder::new_with_quality(&mut bytes, JPEG_QUALITY)
            .encode_image(&rgb)
            .map_err(|e| image_error(format!("cannot encode a JPEG thumbnail: {e}")))?;
        "jpg"
    } else {
        image
            .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
            .map_err(|e| image_error(format!("cannot encode a PNG thumbnail: {e}")))?;
        "png"
    };
    let rel = format!("{rel_dir}/{stem}.{ext}");
    let dest = report.join(&rel);
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)
            .map_err(|source| ReportError::Write { path: parent.to_path_buf(), source })?;
    }
    fs::write(&dest, bytes).map_err(|source| ReportError::Write { path: dest, source })?;
    Ok(rel)
}
