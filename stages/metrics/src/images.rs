//! The images a metric stage compares: finding them (a plain folder of images, or one split of
//! an imagefolder dataset), decoding them, and making ground truth and samples the same size
//! deterministically.
//!
//! Ids are file stems: `<id>.png` from the `sample` stage pairs with `<id>.jpg` in the dataset.
//!
//! Images become tensors on the CPU, where they are decoded; the networks move each batch to
//! the device they run on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::RgbImage;
use sdpipe_stages::api::StageError;

/// Extensions read as images (case-insensitive).
pub const EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// One image and its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub path: PathBuf,
}

#[derive(serde::Deserialize)]
struct MetadataLine {
    file_name: String,
}

fn io_err(context: String) -> impl FnOnce(std::io::Error) -> StageError {
    move |e| StageError::io(context, e)
}

fn stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The images of `input`: the `split` of an imagefolder dataset when `input/<split>/metadata.jsonl`
/// exists, else every image file directly in `input`; sorted by id. `what` names the input in
/// errors ("real", "fake").
pub fn list(input: &Path, split: &str, what: &str) -> Result<Vec<Entry>, StageError> {
    if !input.is_dir() {
        return Err(StageError::failed(format!(
            "{what} input {} is not a directory of images",
            input.display()
        )));
    }
    let metadata = input.join(split).join("metadata.jsonl");
    let entries = if metadata.is_file() {
        from_metadata(&metadata, what)?
    } else {
        let is_imagefolder =
            ["train", "test"].iter().any(|s| input.join(s).join("metadata.jsonl").is_file());
        if is_imagefolder {
            return Err(StageError::failed(format!(
                "{what} input {} is an imagefolder dataset without a `{split}` split \
                 ({}/metadata.jsonl is missing); set the split parameter to one it has",
                input.display(),
                input.join(split).display()
            )));
        }
        from_dir(input)?
    };
    if entries.is_empty() {
        return Err(StageError::failed(format!(
            "{what} input {} holds no images (looked for *.{} files, or an imagefolder \
             `{split}/metadata.jsonl`)",
            input.display(),
            EXTENSIONS.join(", *.")
        )));
    }
    // Ids must be unique: `a.jpg` and `a.png` would be the same id.
    let mut seen: BTreeMap<&str, &Path> = BTreeMap::new();
    for e in &entries {
        if let Some(first) = seen.insert(&e.id, &e.path) {
            return Err(StageError::failed(format!(
                "{what} input has two images with id `{}`: {} and {}",
                e.id,
                first.display(),
                e.path.display()
            )));
        }
    }
    Ok(entries)
}

fn from_metadata(metadata: &Path, what: &str) -> Result<Vec<Entry>, StageError> {
    let text = std::fs::read_to_string(metadata)
        .map_err(io_err(format!("reading {}", metadata.display())))?;
    let dir = metadata.parent().unwrap_or(Path::new("."));
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let record: MetadataLine = serde_json::from_str(line).map_err(|e| {
            StageError::failed(format!(
                "{what} input: {} line {}: {e} (expected {{\"file_name\": ..., \"text\": ...}})",
                metadata.display(),
                i + 1
            ))
        })?;
        let path = dir.join(&record.file_name);
        entries.push(Entry { id: stem(&path), path });
    }
    entries.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(entries)
}

fn from_dir(dir: &Path) -> Result<Vec<Entry>, StageError> {
    let mut entries = Vec::new();
    for item in std::fs::read_dir(dir).map_err(io_err(format!("listing {}", dir.display())))? {
        let path = item.map_err(io_err(format!("listing {}", dir.display())))?.path();
        let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
        if path.is_file() && EXTENSIONS.contains(&ext.as_str()) {
            entries.push(Entry { id: stem(&path), path });
        }
    }
    entries.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(entries)
}

/// Decode an image as 8-bit RGB, as pytorch-fid and lpips read it (PIL's `convert('RGB')`:
/// JPEG through libjpeg-turbo with Pillow's settings, alpha dropped, grey replicated).
pub fn load_rgb(path: &Path) -> Result<RgbImage, StageError> {
    sdpipe_jpeg::open_rgb(path).map_err(|e| StageError::failed(format!("cannot decode image: {e}")))
}

/// How ground-truth images are brought to the samples' size before the metric's own
/// preprocessing (the `resize` parameter, by the names in [`Resize::NAMES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum Resize {
    /// Resize to the sample's size (aspect ratio not kept).
    #[serde(rename = "resize")]
    Stretch,
    /// Crop the largest centred region of the sample's aspect ratio, then resize.
    #[serde(rename = "center-crop")]
    CenterCrop,
    /// Leave sizes alone (LPIPS then requires equal sizes).
    #[serde(rename = "none")]
    None,
}

impl Resize {
    pub const NAMES: [&'static str; 3] = ["resize", "center-crop", "none"];

    /// How the ground truth was treated, for `metrics.json`.
    pub fn describe(self, target: Option<(u32, u32)>) -> String {
        match (self, target) {
            (Resize::None, _) | (_, None) => "none: images used at their own sizes".into(),
            (Resize::Stretch, Some((w, h))) => format!(
                "real images resized to the samples' {w}x{h} (Catmull-Rom bicubic, antialiased \
                 when shrinking) before the metric's own preprocessing"
            ),
            (Resize::CenterCrop, Some((w, h))) => format!(
                "real images centre-cropped to the samples' aspect ratio and resized to {w}x{h} \
                 (Catmull-Rom bicubic, antialiased when shrinking) before the metric's own \
                 preprocessing"
            ),
        }
    }

    /// Bring `image` to `target` = (width, height) under this policy; unchanged if already there.
    pub fn apply(self, image: RgbImage, target: (u32, u32)) -> RgbImage {
        let (w, h) = target;
        if self == Resize::None || image.dimensions() == target {
            return image;
        }
        let image = match self {
            Resize::CenterCrop => {
                let (iw, ih) = image.dimensions();
                // Largest crop with aspect w:h, compared in integers to stay exact.
                let (cw, ch) = if (iw as u64) * (h as u64) > (ih as u64) * (w as u64) {
                    (((ih as u64 * w as u64) / h as u64).max(1) as u32, ih)
                } else {
                    (iw, ((iw as u64 * h as u64) / w as u64).max(1) as u32)
                };
                image::imageops::crop_imm(&image, (iw - cw) / 2, (ih - ch) / 2, cw, ch).to_image()
            }
            _ => image,
        };
        image::imageops::resize(&image, w, h, FilterType::CatmullRom)
    }
}

/// `[3, H, W]` f32 in [0, 1]: torchvision's `ToTensor` (x / 255 in f32).
pub fn to_unit_tensor(image: &RgbImage) -> candle_core::Result<Tensor> {
    let (w, h) = image.dimensions();
    let data: Vec<f32> = image.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    Tensor::from_vec(data, (h as usize, w as usize, 3), &Device::Cpu)?
        .permute((2, 0, 1))?
        .contiguous()
}

/// `[3, H, W]` f32 in [-1, 1]: lpips' `im2tensor` (x / 127.5 − 1, computed in f64, stored f32).
pub fn to_signed_tensor(image: &RgbImage) -> candle_core::Result<Tensor> {
    let (w, h) = image.dimensions();
    let data: Vec<f32> =
        image.as_raw().iter().map(|&v| (v as f64 / (255.0 / 2.0) - 1.0) as f32).collect();
    Tensor::from_vec(data, (h as usize, w as usize, 3), &Device::Cpu)?
        .permute((2, 0, 1))?
        .contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_resize_name_is_read() {
        for name in Resize::NAMES {
            serde_json::from_value::<Resize>(serde_json::json!(name)).unwrap();
        }
    }

    fn write_png(path: &Path, w: u32, h: u32) {
        RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7])).save(path).unwrap();
    }

    #[test]
    fn a_plain_folder_lists_its_images_by_stem_and_ignores_other_files() {
        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("b.png"), 4, 4);
        write_png(&dir.path().join("a.PNG"), 4, 4);
        std::fs::write(dir.path().join("samples.jsonl"), "{}").unwrap();
        let ids: Vec<String> =
            list(dir.path(), "test", "fake").unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["a", "b"]);
    }

    #[test]
    fn an_imagefolder_lists_the_split_from_its_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let test = dir.path().join("test");
        std::fs::create_dir_all(&test).unwrap();
        write_png(&test.join("x1.png"), 4, 4);
        std::fs::write(
            test.join("metadata.jsonl"),
            "{\"file_name\": \"x1.png\", \"text\": \"t\"}\n",
        )
        .unwrap();
        let entries = list(dir.path(), "test", "real").unwrap();
        assert_eq!(entries, [Entry { id: "x1".into(), path: test.join("x1.png") }]);
    }

    #[test]
    fn an_imagefolder_without_the_split_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("train")).unwrap();
        std::fs::write(dir.path().join("train/metadata.jsonl"), "").unwrap();
        let e = list(dir.path(), "valid", "real").unwrap_err().to_string();
        assert!(e.contains("`valid` split"), "{e}");
    }

    #[test]
    fn an_empty_folder_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let e = list(dir.path(), "test", "fake").unwrap_err().to_string();
        assert!(e.contains("holds no images") && e.contains(&dir.path().display().to_string()));
    }

    #[test]
    fn two_files_with_one_stem_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("a.png"), 4, 4);
        write_png(&dir.path().join("a.jpg"), 4, 4);
        let e = list(dir.path(), "test", "real").unwrap_err().to_string();
        assert!(e.contains("id `a`"), "{e}");
    }

    #[test]
    fn an_undecodable_image_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.png");
        std::fs::write(&path, b"not a png").unwrap();
        let e = load_rgb(&path).unwrap_err().to_string();
        assert!(e.contains("broken.png"), "{e}");
    }

    #[test]
    fn center_crop_keeps_the_middle_and_reaches_the_target_size() {
        // 8x4 image whose columns 2..6 are white: the centred 4x4 crop is all white.
        let image = RgbImage::from_fn(8, 4, |x, _| {
            if (2..6).contains(&x) {
                image::Rgb([255; 3])
            } else {
                image::Rgb([0; 3])
            }
        });
        let out = Resize::CenterCrop.apply(image, (2, 2));
        assert_eq!(out.dimensions(), (2, 2));
        assert!(out.pixels().all(|p| p.0 == [255; 3]));
    }

    #[test]
    fn images_already_at_the_target_size_are_untouched() {
        let image = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8, y as u8, 1]));
        assert_eq!(Resize::Stretch.apply(image.clone(), (5, 3)), image);
    }

    #[test]
    fn unit_tensors_are_channel_first_in_zero_one() {
        let image = RgbImage::from_fn(2, 1, |x, _| image::Rgb([255 * x as u8, 0, 51]));
        let t = to_unit_tensor(&image).unwrap();
        assert_eq!(t.dims(), &[3, 1, 2]);
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, [0.0, 1.0, 0.0, 0.0, 0.2, 0.2]);
    }
}
