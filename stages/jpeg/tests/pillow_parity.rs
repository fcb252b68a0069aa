//! Parity with Pillow on the fixtures of tests/parity/jpeg.py (tests/fixtures/jpeg/), and the
//! error behaviour Pillow has with `LOAD_TRUNCATED_IMAGES = False`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use sdpipe_jpeg::{decode_rgb, is_jpeg, open_rgb, JpegError, MAX_PIXELS};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/jpeg")
}

fn read_fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixtures().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn short_hashes(entry: &Value, key: &str) -> Vec<String> {
    entry[key].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect()
}

/// Compares a decode with Pillow's reference entry; `None` when identical, otherwise where the
/// difference starts (first differing row and first differing column, from the per-row and
/// per-column hashes that reference.json keeps instead of the pixels).
fn mismatch(image: &image::RgbImage, entry: &Value) -> Option<String> {
    let (w, h) = (entry["width"].as_u64().unwrap(), entry["height"].as_u64().unwrap());
    if (u64::from(image.width()), u64::from(image.height())) != (w, h) {
        return Some(format!("size {}x{}, Pillow {w}x{h}", image.width(), image.height()));
    }
    if sha256_hex(image.as_raw()) == entry["rgb_sha256"].as_str().unwrap() {
        return None;
    }
    let rows = short_hashes(entry, "row_sha256_6");
    let cols = short_hashes(entry, "col_sha256_6");
    let row_bytes =
        |y: u32| -> Vec<u8> { (0..image.width()).flat_map(|x| image.get_pixel(x, y).0).collect() };
    let col_bytes =
        |x: u32| -> Vec<u8> { (0..image.height()).flat_map(|y| image.get_pixel(x, y).0).collect() };
    let first_row =
        (0..image.height()).find(|&y| sha256_hex(&row_bytes(y))[..6] != rows[y as usize]);
    let first_col =
        (0..image.width()).find(|&x| sha256_hex(&col_bytes(x))[..6] != cols[x as usize]);
    let differing_rows =
        (0..image.height()).filter(|&y| sha256_hex(&row_bytes(y))[..6] != rows[y as usize]).count();
    Some(match (first_row, first_col) {
        (Some(y), Some(x)) => format!(
            "first differing row {y}, first differing column {x} (ours {:?} there); \
             {differing_rows} of {h} rows differ",
            image.get_pixel(x, y).0
        ),
        _ => "whole-image hash differs, yet no row or column hash does".to_owned(),
    })
}

#[test]
fn every_fixture_decodes_byte_identical_to_pillow() {
    let reference = reference();
    let files = reference["files"].as_object().unwrap();
    assert!(files.len() >= 20, "reference.json lists {} files", files.len());
    let mut failures = Vec::new();
    for (name, entry) in files {
        match decode_rgb(&read_fixture(name)) {
            Ok(image) => {
                if let Some(why) = mismatch(&image, entry) {
                    failures.push(format!("{name} (Pillow mode {}): {why}", entry["mode"]));
                }
            }
            Err(e) => failures.push(format!("{name}: decode failed: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixtures differ from Pillow {} / libjpeg-turbo {}:\n  {}",
        failures.len(),
        files.len(),
        reference["pillow"],
        reference["libjpeg_turbo"],
        failures.join("\n  ")
    );
}

#[test]
fn open_rgb_of_a_jpeg_file_matches_pillow() {
    let reference = reference();
    let image = open_rgb(&fixtures().join("progressive_420.jpg")).unwrap();
    assert_eq!(mismatch(&image, &reference["files"]["progressive_420.jpg"]), None);
}

#[test]
fn corrupt_header_is_an_error_with_libjpegs_message() {
    // Sample precision 8 -> 9 in the SOF: libjpeg refuses it (Pillow too, before libjpeg).
    let mut bytes = read_fixture("baseline_420_q75.jpg");
    let sof = bytes.windows(2).position(|w| w == [0xFF, 0xC0]).expect("baseline SOF0");
    assert_eq!(bytes[sof + 4], 8);
    bytes[sof + 4] = 9;
    match decode_rgb(&bytes) {
        Err(JpegError::Corrupt { message, path: None }) => {
            assert!(message.contains("precision 9"), "{message}")
        }
        other => panic!("expected a libjpeg error, got {other:?}"),
    }
}

#[test]
fn corrupt_huffman_table_is_an_error() {
    // A DHT whose code counts add up to more codes than its length allows.
    let mut bytes = read_fixture("baseline_420_q75.jpg");
    let dht = bytes.windows(2).position(|w| w == [0xFF, 0xC4]).expect("DHT");
    for count in &mut bytes[dht + 5..dht + 21] {
        *count = 0xFF;
    }
    let err = decode_rgb(&bytes).unwrap_err();
    assert!(matches!(err, JpegError::Corrupt { .. }), "{err:?}");
    assert!(!err.to_string().is_empty());
}

#[test]
fn damaged_bytes_anywhere_never_crash() {
    // Every 5th byte position inverted in turn: each decode must return, Ok or Err.
    for name in ["progressive_420.jpg", "odd_97x61_420.jpg", "cmyk_progressive.jpg"] {
        let good = read_fixture(name);
        let (mut ok, mut err) = (0, 0);
        for pos in (2..good.len()).step_by(5) {
            let mut bytes = good.clone();
            bytes[pos] ^= 0xFF;
            match decode_rgb(&bytes) {
                Ok(_) => ok += 1,
                Err(_) => err += 1,
            }
        }
        assert!(err > 0, "{name}: no damaged variant was refused ({ok} decoded)");
    }
}

#[test]
fn truncated_files_are_errors_as_in_pillow() {
    for name in ["baseline_420_q95.jpg", "progressive_420.jpg", "grayscale.jpg", "cmyk.jpg"] {
        let bytes = read_fixture(name);
        // Cut in the middle, and only the EOI missing: Pillow says "image file is truncated".
        for cut in [bytes.len() / 2, bytes.len() - 2] {
            match decode_rgb(&bytes[..cut]) {
                Err(JpegError::Truncated { message, .. }) => {
                    assert_eq!(message, "Premature end of JPEG file")
                }
                other => panic!("{name} cut at {cut}: expected Truncated, got {other:?}"),
            }
        }
    }
}

#[test]
fn truncated_file_error_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.jpg");
    let bytes = read_fixture("odd_333x250_420.jpg");
    std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
    let err = open_rgb(&path).unwrap_err();
    assert!(matches!(err, JpegError::Truncated { .. }), "{err:?}");
    assert_eq!(err.path(), Some(path.as_path()));
    assert!(err.to_string().contains("cut.jpg"), "{err}");
}

#[test]
fn header_over_the_pixel_limit_is_refused_before_decoding() {
    // The 1x1 file with its SOF claiming 20000x20000 (400 megapixels).
    let mut bytes = read_fixture("tiny_1x1.jpg");
    let sof = bytes.windows(2).position(|w| w == [0xFF, 0xC0]).expect("SOF0");
    bytes[sof + 5..sof + 9].copy_from_slice(&[0x4E, 0x20, 0x4E, 0x20]);
    match decode_rgb(&bytes) {
        Err(JpegError::TooLarge { width: 20000, height: 20000, .. }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(MAX_PIXELS, 100_000_000);
}

#[test]
fn non_jpeg_bytes_are_refused_by_decode_rgb() {
    assert!(!is_jpeg(b"GIF89a"));
    assert!(matches!(decode_rgb(b"GIF89a"), Err(JpegError::NotJpeg { .. })));
}

#[test]
fn png_passes_through_open_rgb_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let rgb = image::RgbImage::from_fn(37, 23, |x, y| {
        image::Rgb([x as u8 * 7, y as u8 * 11, (x ^ y) as u8])
    });
    let png = dir.path().join("picture.png");
    rgb.save(&png).unwrap();
    assert_eq!(open_rgb(&png).unwrap(), rgb);

    // Grayscale: the same expansion as image's own to_rgb8.
    let gray = image::GrayImage::from_fn(9, 5, |x, y| image::Luma([(x * 29 + y * 3) as u8]));
    let gray_png = dir.path().join("gray.png");
    gray.save(&gray_png).unwrap();
    assert_eq!(open_rgb(&gray_png).unwrap(), image::open(&gray_png).unwrap().to_rgb8());

    // The format comes from the content: a PNG named .jpg still opens.
    let misnamed = dir.path().join("really_a_png.jpg");
    std::fs::copy(&png, &misnamed).unwrap();
    assert_eq!(open_rgb(&misnamed).unwrap(), rgb);
}

#[test]
fn open_rgb_reports_unreadable_files() {
    let missing = Path::new("/nonexistent/sdpipe-jpeg/none.jpg");
    let err = open_rgb(missing).unwrap_err();
    assert!(matches!(err, JpegError::Io { .. }), "{err:?}");
    assert_eq!(err.path(), Some(missing));

    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, b"not an image at all").unwrap();
    let err = open_rgb(&junk).unwrap_err();
    assert!(matches!(err, JpegError::Image { .. }), "{err:?}");
    assert!(err.to_string().contains("junk.bin"), "{err}");
}

/// Informative: how far the `image` crate's own decoder (zune-jpeg) is from Pillow on the same
/// fixtures (printed; see `cargo test -- --nocapture`). Asserts only that ours is exact.
#[test]
fn image_crate_decoder_is_off_where_ours_is_exact() {
    let reference = reference();
    let files = reference["files"].as_object().unwrap();
    let (mut wrong_pixels, mut total_pixels, mut failed) = (0u64, 0u64, Vec::new());
    let mut report = String::new();
    for (name, entry) in files {
        let bytes = read_fixture(name);
        let ours = decode_rgb(&bytes).unwrap();
        assert_eq!(mismatch(&ours, entry), None, "{name}");
        total_pixels += u64::from(ours.width()) * u64::from(ours.height());
        match image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg) {
            Ok(theirs) => {
                let theirs = theirs.to_rgb8();
                let wrong = if theirs.dimensions() != ours.dimensions() {
                    u64::from(ours.width()) * u64::from(ours.height())
                } else {
                    ours.pixels().zip(theirs.pixels()).filter(|(a, b)| a != b).count() as u64
                };
                let max_diff = if theirs.dimensions() == ours.dimensions() {
                    ours.as_raw()
                        .iter()
                        .zip(theirs.as_raw())
                        .map(|(a, b)| a.abs_diff(*b))
                        .max()
                        .unwrap_or(0)
                } else {
                    255
                };
                wrong_pixels += wrong;
                let _ = writeln!(report, "  {name}: {wrong} pixels differ, max {max_diff} levels");
            }
            Err(e) => {
                failed.push(name.clone());
                let _ = writeln!(report, "  {name}: image failed: {e}");
            }
        }
    }
    println!(
        "image crate vs Pillow: {wrong_pixels} of {total_pixels} pixels differ, {} files not \
         decoded\n{report}",
        failed.len()
    );
}
