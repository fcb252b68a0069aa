//! Accepting a downloaded image: it must decode completely, and what is saved is a JPEG.
//!
//! JPEGs are decoded with the decoder every later stage reads them with (`sdpipe-jpeg`,
//! libjpeg-turbo set up as Pillow sets it up), so a photo is kept exactly when the captioner,
//! the trainer and the metrics can read it. It refuses a file whose data ends before the image
//! does, where the `image` crate's decoder paints the missing part grey and reports success,
//! which cannot tell a cut-off download from a whole one. A JPEG that decodes is kept byte for
//! byte; any other format the server may send (PNG, WebP) is decoded by the `image`
//! crate, whose decoders fail on truncation, and re-encoded as JPEG.

use image::codecs::jpeg::JpegEncoder;
use image::ImageFormat;

/// An image that decoded completely, as the JPEG bytes to save.
#[derive(Debug)]
pub struct Verified {
    pub jpeg: Vec<u8>,
    pub width: u32,
    pub height: u32,
    /// The format the server sent, when it was not JPEG and was re-encoded.
    pub reencoded_from: Option<&'static str>,
}

/// Decode `bytes` fully; JPEG bytes are returned as they are, others re-encoded at `quality`.
pub fn to_jpeg(bytes: Vec<u8>, quality: u8) -> Result<Verified, String> {
    let format = image::guess_format(&bytes).map_err(|_| describe_unknown(&bytes))?;
    if format == ImageFormat::Jpeg {
        let (width, height) = decode_jpeg_strictly(&bytes)?;
        return Ok(Verified { jpeg: bytes, width, height, reencoded_from: None });
    }
    let image = image::load_from_memory_with_format(&bytes, format)
        .map_err(|e| format!("undecodable {format:?} image: {e}"))?;
    let rgb = image.to_rgb8();
    let mut jpeg = Vec::new();
    JpegEncoder::new_with_quality(&mut jpeg, quality)
        .encode_image(&rgb)
        .map_err(|e| format!("re-encoding a {format:?} image as JPEG: {e}"))?;
    Ok(Verified {
        jpeg,
        width: rgb.width(),
        height: rgb.height(),
        reencoded_from: Some(format.extensions_str().first().copied().unwrap_or("unknown")),
    })
}

fn decode_jpeg_strictly(bytes: &[u8]) -> Result<(u32, u32), String> {
    let rgb = sdpipe_jpeg::decode_rgb(bytes).map_err(|e| format!("undecodable JPEG: {e}"))?;
    Ok(rgb.dimensions())
}

/// What a non-image body looks like, for the failure record (an HTML error page, say).
fn describe_unknown(bytes: &[u8]) -> String {
    let head: String = String::from_utf8_lossy(&bytes[..bytes.len().min(24)])
        .chars()
        .map(|c| if c.is_control() { '.' } else { c })
        .collect();
    format!("not an image ({} bytes, starting {head:?})", bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(width: u32, height: u32) -> image::RgbImage {
        image::RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([(x * 7) as u8, (y * 5) as u8, 90])
        })
    }

    fn jpeg(width: u32, height: u32) -> Vec<u8> {
        let mut bytes = Vec::new();
        JpegEncoder::new_with_quality(&mut bytes, 90)
            .encode_image(&gradient(width, height))
            .unwrap();
        bytes
    }

    #[test]
    fn a_whole_jpeg_is_kept_byte_for_byte() {
        let bytes = jpeg(40, 24);
        let verified = to_jpeg(bytes.clone(), 80).unwrap();
        assert_eq!(verified.jpeg, bytes);
        assert_eq!((verified.width, verified.height, verified.reencoded_from), (40, 24, None));
    }

    #[test]
    fn a_truncated_jpeg_is_rejected() {
        let bytes = jpeg(64, 64);
        // The lenient decoder the `image` crate uses accepts it: this is why we decode strictly.
        let cut = bytes[..bytes.len() * 2 / 3].to_vec();
        assert!(image::load_from_memory(&cut).is_ok());
        let err = to_jpeg(cut, 80).unwrap_err();
        assert!(err.starts_with("undecodable JPEG"), "{err}");
    }

    #[test]
    fn other_formats_are_reencoded_as_jpeg() {
        let mut png = Vec::new();
        gradient(20, 10).write_to(&mut std::io::Cursor::new(&mut png), ImageFormat::Png).unwrap();
        let verified = to_jpeg(png, 80).unwrap();
        assert_eq!(verified.reencoded_from, Some("png"));
        assert_eq!(image::guess_format(&verified.jpeg).unwrap(), ImageFormat::Jpeg);
        assert_eq!((verified.width, verified.height), (20, 10));
    }

    #[test]
    fn a_truncated_png_is_rejected() {
        let mut png = Vec::new();
        gradient(64, 64).write_to(&mut std::io::Cursor::new(&mut png), ImageFormat::Png).unwrap();
        png.truncate(png.len() / 2);
        assert!(to_jpeg(png, 80).unwrap_err().starts_with("undecodable Png"));
    }

    #[test]
    fn a_non_image_body_is_described() {
        let err = to_jpeg(b"<html><body>rate limited</body></html>".to_vec(), 80).unwrap_err();
        assert_eq!(err, "not an image (38 bytes, starting \"<html><body>rate limited\")");
    }
}
