//! JPEG decoding that gives the same RGB bytes as Pillow.
//!
//! Every tool sdpipe's stages are compared with (transformers' BLIP processor, diffusers'
//! training transform, pytorch-fid, lpips) reads images with `PIL.Image.open(f).convert("RGB")`,
//! and Pillow decodes JPEG with libjpeg-turbo: the accurate integer IDCT ("islow"), fancy
//! (triangular) chroma upsampling, and block smoothing for progressive files. The `image`
//! crate's decoder (zune-jpeg) rounds differently and is off by one level on some pixels,
//! which is enough to move a caption's beam search or a metric's last digits. This crate
//! decodes with libjpeg-turbo's own decoder (as vendored by `mozjpeg-sys`, built from C source)
//! set up the way Pillow sets it up, and converts the result to RGB the way Pillow's
//! `convert("RGB")` does:
//!
//! * 3 components: libjpeg's YCbCr (or Adobe RGB) to RGB conversion, libjpeg defaults
//!   otherwise (Pillow changes none of them).
//! * 1 component (grayscale): the gray value copied to R, G and B.
//! * 4 components (CMYK, or YCCK which libjpeg turns into CMYK): Pillow assumes Adobe's
//!   inverted CMYK, so each channel is inverted, then converted with Pillow's
//!   `R = (255 - K) - C * (255 - K) / 255` (its own rounding).
//!
//! Errors follow Pillow with `LOAD_TRUNCATED_IMAGES = False`: libjpeg's errors are errors, a
//! file whose data runs out before the image is complete is an error, and libjpeg's other
//! warnings (corrupt entropy data, extraneous bytes, a marker inside the entropy-coded data)
//! are not, since Pillow decodes such files. EXIF orientation is not applied, as
//! `Image.open` does not apply it.

use std::ffi::CStr;
use std::io::Cursor;
use std::mem;
use std::os::raw::{c_int, c_ulong};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use image::{ImageReader, RgbImage};
use mozjpeg_sys as ffi;

// libjpeg reports errors by calling `error_exit`, which must not return. We unwind out of it
// with a Rust panic (mozjpeg-sys' `unwinding` feature compiles libjpeg with -fexceptions and
// declares its callbacks "C-unwind"). With panic=abort that would abort the process instead.
#[cfg(panic = "abort")]
compile_error!("sdpipe-jpeg needs panic=unwind: libjpeg's errors are unwound out of C frames");

/// Images whose header claims more pixels than this are refused before anything is allocated.
pub const MAX_PIXELS: u64 = 100_000_000;

/// Why an image could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum JpegError {
    #[error("{}: cannot read: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}not a JPEG file (no SOI marker)", at(.path))]
    NotJpeg { path: Option<PathBuf> },
    /// libjpeg's own message for corrupt or unsupported data.
    #[error("{}corrupt JPEG data: {message}", at(.path))]
    Corrupt { path: Option<PathBuf>, message: String },
    /// The data ends before the image does (what Pillow calls "image file is truncated").
    #[error("{}truncated JPEG file: {message}", at(.path))]
    Truncated { path: Option<PathBuf>, message: String },
    #[error("{}JPEG is {width}x{height}, more than the {MAX_PIXELS}-pixel limit", at(.path))]
    TooLarge { path: Option<PathBuf>, width: u32, height: u32 },
    /// Pillow opens only 1-, 3- and 4-component JPEGs.
    #[error("{}unsupported JPEG with {components} colour components", at(.path))]
    UnsupportedComponents { path: Option<PathBuf>, components: i32 },
    /// A non-JPEG file that the `image` crate could not decode either.
    #[error("{}{source}", at(.path))]
    Image { path: Option<PathBuf>, source: image::ImageError },
}

fn at(path: &Option<PathBuf>) -> String {
    path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default()
}

impl JpegError {
    /// The same error, naming the file it came from.
    fn with_path(mut self, file: &Path) -> Self {
        match &mut self {
            JpegError::Io { .. } => {}
            JpegError::NotJpeg { path }
            | JpegError::Corrupt { path, .. }
            | JpegError::Truncated { path, .. }
            | JpegError::TooLarge { path, .. }
            | JpegError::UnsupportedComponents { path, .. }
            | JpegError::Image { path, .. } => *path = Some(file.to_path_buf()),
        }
        self
    }

    /// The file the error is about, where known.
    pub fn path(&self) -> Option<&Path> {
        match self {
            JpegError::Io { path, .. } => Some(path),
            JpegError::NotJpeg { path }
            | JpegError::Corrupt { path, .. }
            | JpegError::Truncated { path, .. }
            | JpegError::TooLarge { path, .. }
            | JpegError::UnsupportedComponents { path, .. }
            | JpegError::Image { path, .. } => path.as_deref(),
        }
    }
}

/// Whether `bytes` start like a JPEG file: the SOI marker and the start of the next marker
/// (`FF D8 FF`), the same test Pillow uses to pick its JPEG plugin.
pub fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// Decodes a JPEG file in memory to 8-bit RGB, byte-identical to Pillow's
/// `Image.open(f).convert("RGB")`.
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage, JpegError> {
    if !is_jpeg(bytes) {
        return Err(JpegError::NotJpeg { path: None });
    }
    let mut dec = Decompressor::new();
    match panic::catch_unwind(AssertUnwindSafe(|| dec.decode(bytes))) {
        Ok(result) => result,
        Err(payload) => match payload.downcast::<Failure>() {
            Ok(failure) => Err(match *failure {
                Failure::Error(message) => JpegError::Corrupt { path: None, message },
                Failure::Truncated(message) => JpegError::Truncated { path: None, message },
            }),
            // A panic of our own, not libjpeg's: not ours to swallow.
            Err(other) => panic::resume_unwind(other),
        },
    }
    // `dec` drops here, after the unwind: jpeg_destroy_decompress frees libjpeg's pools,
    // which is valid after error_exit (it is what libjpeg's setjmp recipe does too).
}

/// Reads an image file to 8-bit RGB: JPEG through libjpeg (see [`decode_rgb`]), any other format
/// through the `image` crate. A drop-in for `image::open(path)?.to_rgb8()`, except that the
/// format is told from the content first (as Pillow does) and from the extension only if the
/// content does not say.
pub fn open_rgb(path: &Path) -> Result<RgbImage, JpegError> {
    let bytes =
        std::fs::read(path).map_err(|source| JpegError::Io { path: path.to_path_buf(), source })?;
    if is_jpeg(&bytes) {
        return decode_rgb(&bytes).map_err(|e| e.with_path(path));
    }
    let image_err = |source| JpegError::Image { path: Some(path.to_path_buf()), source };
    let mut reader = ImageReader::new(Cursor::new(&bytes))
        .with_guessed_format()
        .expect("reading from memory cannot fail");
    if reader.format().is_none() {
        if let Ok(format) = image::ImageFormat::from_path(path) {
            reader.set_format(format);
        }
    }
    Ok(reader.decode().map_err(image_err)?.to_rgb8())
}

/// What our error manager carries out of libjpeg.
enum Failure {
    Error(String),
    Truncated(String),
}

/// libjpeg's decompression object and its error manager, boxed so that the pointer from one to
/// the other stays valid.
struct Decompressor {
    cinfo: ffi::jpeg_decompress_struct,
    err: ffi::jpeg_error_mgr,
}

impl Decompressor {
    fn new() -> Box<Self> {
        // SAFETY: both are plain C structs for which all-zero is the "not yet created" state
        // (null pointers, `None` callbacks); jpeg_destroy_decompress accepts that state.
        let mut dec: Box<Self> = Box::new(unsafe { mem::zeroed() });
        unsafe {
            ffi::jpeg_std_error(&mut dec.err);
        }
        dec.err.error_exit = Some(error_exit);
        dec.err.emit_message = Some(emit_message);
        dec.err.output_message = Some(output_message);
        dec.cinfo.common.err = &mut dec.err;
        dec
    }

    /// Runs libjpeg; its errors leave this function by unwinding (see [`error_exit`]).
    fn decode(&mut self, bytes: &[u8]) -> Result<RgbImage, JpegError> {
        let len = c_ulong::try_from(bytes.len()).map_err(|_| JpegError::Corrupt {
            path: None,
            message: "file too large for libjpeg".into(),
        })?;
        let cinfo = &mut self.cinfo;
        unsafe {
            ffi::jpeg_create_decompress(cinfo);
            // libjpeg's memory source: at the end of the data it warns JWRN_JPEG_EOF (made an
            // error by emit_message) rather than suspending as Pillow's source does.
            ffi::jpeg_mem_src(cinfo, bytes.as_ptr(), len);
            ffi::jpeg_read_header(cinfo, 1);
        }
        let (width, height) = (cinfo.image_width, cinfo.image_height);
        if u64::from(width) * u64::from(height) > MAX_PIXELS {
            return Err(JpegError::TooLarge { path: None, width, height });
        }
        // Pillow picks its mode from the component count and asks libjpeg for that colour
        // space; it leaves jpeg_color_space to libjpeg's guess (JFIF/Adobe markers) and keeps
        // every other default: JDCT_ISLOW, fancy upsampling, block smoothing, no scaling.
        let components = cinfo.num_components;
        cinfo.out_color_space = match components {
            1 => ffi::J_COLOR_SPACE::JCS_GRAYSCALE,
            3 => ffi::J_COLOR_SPACE::JCS_RGB,
            4 => ffi::J_COLOR_SPACE::JCS_CMYK,
            _ => return Err(JpegError::UnsupportedComponents { path: None, components }),
        };
        cinfo.dct_method = ffi::J_DCT_METHOD::JDCT_ISLOW;
        cinfo.do_fancy_upsampling = 1;
        cinfo.do_block_smoothing = 1;
        unsafe {
            ffi::jpeg_start_decompress(cinfo);
        }
        let (w, h) = (cinfo.output_width as usize, cinfo.output_height as usize);
        let stride = w * cinfo.output_components as usize;
        let mut raw = vec![0u8; stride * h];
        while (cinfo.output_scanline as usize) < h {
            let first = cinfo.output_scanline as usize;
            let rows = (cinfo.rec_outbuf_height.max(1) as usize).min(h - first);
            let mut ptrs: Vec<ffi::JSAMPROW_MUT> = raw[first * stride..(first + rows) * stride]
                .chunks_exact_mut(stride)
                .map(|row| row.as_mut_ptr())
                .collect();
            let read = unsafe { ffi::jpeg_read_scanlines(cinfo, ptrs.as_mut_ptr(), rows as u32) };
            if read == 0 {
                // Only a suspending source returns 0 rows; ours never suspends.
                return Err(JpegError::Corrupt {
                    path: None,
                    message: "libjpeg returned no scanlines".into(),
                });
            }
        }
        // Reads up to EOI: a file that stops before it is truncated for Pillow too.
        unsafe {
            ffi::jpeg_finish_decompress(cinfo);
        }
        let rgb = match components {
            1 => raw.iter().flat_map(|&v| [v, v, v]).collect(),
            3 => raw,
            _ => raw.chunks_exact(4).flat_map(cmyk_to_rgb).collect(),
        };
        Ok(RgbImage::from_raw(w as u32, h as u32, rgb).expect("buffer sized for the image"))
    }
}

impl Drop for Decompressor {
    fn drop(&mut self) {
        unsafe { ffi::jpeg_destroy_decompress(&mut self.cinfo) }
    }
}

/// One pixel as libjpeg returns it for a 4-component file, to RGB as Pillow gives it: Pillow
/// reads the samples as Adobe's inverted CMYK (rawmode "CMYK;I"), then converts CMYK to RGB
/// without colour management, rounding `x * y / 255` its own way.
fn cmyk_to_rgb(px: &[u8]) -> [u8; 3] {
    // After Pillow's inversion K' = 255 - px[3], so 255 - K' is the raw sample.
    let not_k = u32::from(px[3]);
    let channel = |raw: u8| {
        let c = 255 - u32::from(raw);
        let t = c * not_k + 128;
        (not_k - (((t >> 8) + t) >> 8)) as u8
    };
    [channel(px[0]), channel(px[1]), channel(px[2])]
}

/// The text of libjpeg's current message (its own formatting of code and parameters).
unsafe fn message(cinfo: &mut ffi::jpeg_common_struct) -> String {
    let err = &*cinfo.err;
    let mut buf = [0u8; 80]; // JMSG_LENGTH_MAX
    if let Some(format) = err.format_message {
        // mozjpeg-sys types the buffer as `&[u8; 80]`, yet libjpeg writes into it: call through
        // a pointer-typed signature so Rust does not assume the buffer unchanged.
        let format: unsafe extern "C-unwind" fn(&mut ffi::jpeg_common_struct, *mut u8) =
            mem::transmute(format);
        format(cinfo, buf.as_mut_ptr());
    }
    CStr::from_bytes_until_nul(&buf).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// libjpeg's fatal-error callback: must not return, so it unwinds to `decode_rgb`.
/// `resume_unwind` skips the panic hook, so nothing is printed.
unsafe extern "C-unwind" fn error_exit(cinfo: &mut ffi::jpeg_common_struct) {
    let msg = message(cinfo);
    panic::resume_unwind(Box::new(Failure::Error(msg)));
}

/// libjpeg's warning and trace callback. Running out of data is fatal for Pillow (its source
/// suspends and the file is "truncated"), so that one warning becomes an error; the others are
/// counted and ignored, as Pillow ignores them.
unsafe extern "C-unwind" fn emit_message(cinfo: &mut ffi::jpeg_common_struct, level: c_int) {
    if level < 0 {
        if (*cinfo.err).msg_code == ffi::JWRN_JPEG_EOF {
            let msg = message(cinfo);
            panic::resume_unwind(Box::new(Failure::Truncated(msg)));
        }
        (*cinfo.err).num_warnings += 1;
    }
}

/// libjpeg would print messages to stderr; a library has no business doing that.
unsafe extern "C-unwind" fn output_message(_cinfo: &mut ffi::jpeg_common_struct) {}

#[cfg(test)]
mod tests {
    use super::*;

    /// mozjpeg-sys numbers libjpeg's messages for one ABI; a mismatch would make the truncation
    /// check look at the wrong warning.
    #[test]
    fn eof_warning_code_names_the_eof_message() {
        let mut dec = Decompressor::new();
        dec.err.msg_code = ffi::JWRN_JPEG_EOF;
        let text = unsafe { message(&mut dec.cinfo.common) };
        assert_eq!(text, "Premature end of JPEG file");
    }

    #[test]
    fn cmyk_conversion_matches_pillow_corners() {
        // Raw (inverted) samples: all 255 is no ink (white), raw K = 0 is full black.
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 255]), [255, 255, 255]);
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 0]), [0, 0, 0]);
        assert_eq!(cmyk_to_rgb(&[0, 255, 255, 255]), [0, 255, 255]);
        // C = 128, K = 64: 191 - round(128 * 191 / 255) = 191 - 96.
        assert_eq!(cmyk_to_rgb(&[127, 255, 255, 191])[0], 95);
    }

    #[test]
    fn is_jpeg_wants_soi_and_a_marker() {
        assert!(is_jpeg(&[0xFF, 0xD8, 0xFF, 0xE0]));
        assert!(!is_jpeg(&[0xFF, 0xD8]));
        assert!(!is_jpeg(b"\x89PNG\r\n\x1a\n"));
    }

    #[test]
    fn empty_and_garbage_input_are_errors() {
        assert!(matches!(decode_rgb(&[]), Err(JpegError::NotJpeg { .. })));
        let err = decode_rgb(&[0xFF, 0xD8, 0xFF, 0xFF, 0x00, 0x01]).unwrap_err();
        assert!(matches!(err, JpegError::Corrupt { .. } | JpegError::Truncated { .. }));
    }
}
