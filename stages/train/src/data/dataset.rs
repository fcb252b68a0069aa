//! The training split of a Hugging Face imagefolder dataset: `train/metadata.jsonl` lines of
//! `{"file_name", "text"}` next to the images, as the `imagefolder` kind writes them.
//!
//! Everything is checked up front (metadata present and parseable, captions present, every
//! image readable), so a bad dataset fails before any model is loaded, with the file and line.

use std::fs;
use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::Deserialize;

/// Why a dataset cannot be trained on; each names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error(
        "{0}: no `train/metadata.jsonl`; the `dataset` input must be an imagefolder dataset \
         (bind it to an `imagefolder` stage's `dataset` output)"
    )]
    MissingMetadata(PathBuf),
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}; expected {{\"file_name\": \"<image>\", \"text\": \"<caption>\"}}")]
    BadLine { path: PathBuf, line: usize, message: String },
    #[error("{0}: the training split is empty; there is nothing to train on")]
    Empty(PathBuf),
    #[error("{path}: cannot decode image (listed in {metadata}): {message}")]
    BadImage { path: PathBuf, metadata: PathBuf, message: String },
}

/// One training example: its image file and caption.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub image: PathBuf,
    pub caption: String,
}

#[derive(Deserialize)]
struct MetadataLine {
    file_name: String,
    text: serde_json::Value,
}

/// The examples of `<dataset>/train/`, in metadata order.
pub fn load_train_split(dataset: &Path) -> Result<Vec<Example>, DatasetError> {
    load_split(dataset, "train")
}

/// The examples of `<dataset>/<split>/`, in metadata order.
pub fn load_split(dataset: &Path, split: &str) -> Result<Vec<Example>, DatasetError> {
    let split = dataset.join(split);
    let metadata = split.join("metadata.jsonl");
    if !metadata.is_file() {
        return Err(DatasetError::MissingMetadata(dataset.to_path_buf()));
    }
    let text = fs::read_to_string(&metadata)
        .map_err(|source| DatasetError::Read { path: metadata.clone(), source })?;
    let mut examples = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let bad = |message: String| DatasetError::BadLine {
            path: metadata.clone(),
            line: index + 1,
            message,
        };
        let line: MetadataLine =
            serde_json::from_str(raw).map_err(|e| bad(format!("not a metadata record ({e})")))?;
        // The script accepts a list of captions too (and picks one at random); imagefolder
        // stages write one string, so only that is accepted here.
        let caption = match line.text {
            serde_json::Value::String(s) => s,
            other => return Err(bad(format!("`text` must be a string, found {other}"))),
        };
        if line.file_name.is_empty() || Path::new(&line.file_name).is_absolute() {
            return Err(bad("`file_name` must be a path relative to its split's folder".into()));
        }
        let image = split.join(&line.file_name);
        if !image.is_file() {
            return Err(bad(format!("image `{}` does not exist", line.file_name)));
        }
        examples.push(Example { image, caption });
    }
    if examples.is_empty() {
        return Err(DatasetError::Empty(metadata));
    }
    Ok(examples)
}

/// Decodes an example's image to RGB (PIL's `convert("RGB")`).
pub fn read_rgb(image: &Path, metadata_dir: &Path) -> Result<RgbImage, DatasetError> {
    let bad = |message: String| DatasetError::BadImage {
        path: image.to_path_buf(),
        metadata: metadata_dir.join("metadata.jsonl"),
        message,
    };
    // Pillow's decoder (libjpeg-turbo) exactly, as diffusers' dataset reads it.
    sdpipe_jpeg::open_rgb(image).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, contents: &str) {
        fs::create_dir_all(dir.join("train")).unwrap();
        fs::write(dir.join("train").join(name), contents).unwrap();
    }

    fn png(dir: &Path, name: &str) {
        fs::create_dir_all(dir.join("train")).unwrap();
        RgbImage::new(4, 4).save(dir.join("train").join(name)).unwrap();
    }

    #[test]
    fn examples_are_read_in_metadata_order() {
        let dir = tempfile::tempdir().unwrap();
        png(dir.path(), "b.png");
        png(dir.path(), "a.png");
        write(
            dir.path(),
            "metadata.jsonl",
            "{\"file_name\": \"b.png\", \"text\": \"bee\"}\n{\"file_name\": \"a.png\", \"text\": \"ay\"}\n",
        );
        let examples = load_train_split(dir.path()).unwrap();
        assert_eq!(examples.len(), 2);
        assert_eq!(examples[0].caption, "bee");
        assert!(examples[1].image.ends_with("train/a.png"));
    }

    #[test]
    fn a_folder_without_metadata_says_it_is_not_an_imagefolder() {
        let dir = tempfile::tempdir().unwrap();
        let message = load_train_split(dir.path()).unwrap_err().to_string();
        assert!(message.contains("train/metadata.jsonl"), "{message}");
        assert!(message.contains("imagefolder"), "{message}");
    }

    #[test]
    fn an_empty_training_split_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "metadata.jsonl", "\n");
        let err = load_train_split(dir.path()).unwrap_err();
        assert!(matches!(err, DatasetError::Empty(_)), "{err}");
    }

    #[test]
    fn a_bad_line_is_reported_with_its_number() {
        let dir = tempfile::tempdir().unwrap();
        png(dir.path(), "a.png");
        write(
            dir.path(),
            "metadata.jsonl",
            "{\"file_name\": \"a.png\", \"text\": \"ok\"}\n{\"file_name\": \"a.png\"}\n",
        );
        let message = load_train_split(dir.path()).unwrap_err().to_string();
        assert!(message.contains("metadata.jsonl:2"), "{message}");
    }

    #[test]
    fn a_missing_image_is_reported_by_name() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "metadata.jsonl", "{\"file_name\": \"gone.jpg\", \"text\": \"x\"}\n");
        let message = load_train_split(dir.path()).unwrap_err().to_string();
        assert!(message.contains("gone.jpg") && message.contains(":1"), "{message}");
    }

    #[test]
    fn an_undecodable_image_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "broken.jpg", "not a jpeg");
        let path = dir.path().join("train/broken.jpg");
        let message = read_rgb(&path, &dir.path().join("train")).unwrap_err().to_string();
        assert!(message.contains("broken.jpg"), "{message}");
    }
}
