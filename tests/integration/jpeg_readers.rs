//! Every stage that reads photos sees the pixels Pillow gives (`Image.open(f).convert("RGB")`),
//! JPEG included: BLIP's processor, diffusers' training transform, pytorch-fid and lpips all
//! decode with Pillow, so the parity tests that start from decoded pixels hold for JPEG inputs
//! only if each stage's reader is byte-identical to Pillow. The references are the SHA-256s
//! `tests/parity/jpeg.py` recorded from Pillow (libjpeg-turbo) for every fixture under
//! `tests/fixtures/jpeg/` (baseline and progressive, 4:2:0, 4:2:2 and 4:4:4, restart markers,
//! grayscale, CMYK, odd sizes).

use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jpeg")
}

/// (file, Pillow's RGB SHA-256) for every fixture.
fn references() -> Vec<(PathBuf, String)> {
    let text = std::fs::read_to_string(fixtures().join("reference.json")).unwrap();
    let reference: Value = serde_json::from_str(&text).unwrap();
    let files = reference["files"].as_object().unwrap();
    assert!(files.len() >= 20, "reference.json lists {} files", files.len());
    files
        .iter()
        .map(|(name, r)| (fixtures().join(name), r["rgb_sha256"].as_str().unwrap().to_string()))
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks `read` (a stage's reader, returning RGB bytes) against every fixture.
fn reads_as_pillow(reader: &str, read: impl Fn(&Path) -> Vec<u8>) {
    let wrong: Vec<String> = references()
        .into_iter()
        .filter(|(path, want)| sha256_hex(&read(path)) != *want)
        .map(|(path, _)| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(wrong.is_empty(), "{reader} decodes these differently from Pillow: {wrong:?}");
}

#[test]
fn the_captioner_reads_jpeg_as_blips_processor_does() {
    reads_as_pillow("caption", |path| sdpipe_caption::preprocess::load_rgb(path).unwrap().0);
}

#[test]
fn the_trainer_reads_jpeg_as_diffusers_dataset_does() {
    reads_as_pillow("train", |path| {
        sdpipe_train::data::read_rgb(path, path.parent().unwrap()).unwrap().into_raw()
    });
}

#[test]
fn the_metrics_read_jpeg_as_pytorch_fid_and_lpips_do() {
    reads_as_pillow("fid/lpips", |path| sdpipe_metrics::images::load_rgb(path).unwrap().into_raw());
}

/// Pillow (with `LOAD_TRUNCATED_IMAGES` off, its default) refuses a file whose data stops
/// before the image does; so does every stage, rather than training on a grey half-photo.
#[test]
fn a_cut_off_jpeg_is_refused_by_every_reader() {
    let whole = std::fs::read(fixtures().join("baseline_420_q95.jpg")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.jpg");
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    assert!(sdpipe_caption::preprocess::load_rgb(&cut).is_err());
    assert!(sdpipe_train::data::read_rgb(&cut, dir.path()).is_err());
    assert!(sdpipe_metrics::images::load_rgb(&cut).is_err());
}
