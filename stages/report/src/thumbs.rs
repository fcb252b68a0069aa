//! Copies of the images a report shows, sized to be looked at: large images are downscaled so
//! the report folder stays light, small ones (a tiny model's 32-pixel samples) are enlarged by a
//! whole factor, each pixel a square block, because a viewer shows an image at its own size and
//! smoothing it up would show detail the model did not draw.
//!
//! Downscaled photos stay JPEG (quality 90); everything else becomes PNG (lossless, as generated
//! samples are; JPEG would blur an enlarged image's block edges). The image crate's codecs are
//! built without threads, so the bytes are a pure function of the source image and the size.

use std::fs;
use std::io::Cursor;
use std::path::Path;

use image::codecs::jpeg::JpegEncoder;
use image::imageops::FilterType;
use image::{DynamicImage, ImageFormat, ImageReader};

use crate::error::ReportError;

const JPEG_QUALITY: u8 = 90;

/// Writes `src` as `<report>/<rel_dir>/<stem>.<ext>` and returns that path relative to the
/// report: downscaled to fit in `size`×`size` when larger (aspect kept), enlarged by the largest
/// whole factor that fits (nearest neighbour) when at most half as large, else as it is.
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
    let longest = image.width().max(image.height()).max(1);
    let factor = size / longest;
    if longest > size {
        // Triangle (bilinear with a proper support when shrinking) is smooth enough for
        // thumbnails and much cheaper than Lanczos.
        image = image.resize(size, size, FilterType::Triangle);
    } else if factor >= 2 {
        // At a whole factor nearest neighbour copies each source pixel into one block.
        let (w, h) = (image.width() * factor, image.height() * factor);
        image = image.resize_exact(w, h, FilterType::Nearest);
    }
    let mut bytes = Vec::new();
    let ext = if is_jpeg && factor < 2 {
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
