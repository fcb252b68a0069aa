//! The `imagefolder` kind: a Hugging Face `imagefolder` dataset (`train/` and `test/`, each with
//! its images and a `metadata.jsonl` of `{"file_name", "text"}`) from a dataset stage's images
//! and records, with captions from the records themselves or from a captioning stage.
//!
//! File names in the metadata are relative to the split folder, as the `datasets` loader expects;
//! the tutorial wrote absolute paths, which break as soon as the folder moves.
//!
//! Bad rows, decided per case: a record whose image is missing and a record whose caption is
//! empty are skipped and listed in `imagefolder.json` (a dataset with a few dead photos is
//! still a dataset); two records with the same id fail the stage (which one is meant is
//! unknowable, and silently picking one would make the split depend on file order).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use sdpipe_stages::api::{OutputKind, OutputSpec, ParamSpec, StageContext, StageError, StageKind};
use sdpipe_stages::params::{Input, KindParams};

pub struct ImageFolder;

/// The parameters.
#[derive(KindParams)]
struct Settings {
    /// The dataset's images (`<id>.jpg`).
    #[param(input)]
    images: Input,
    /// The dataset's records (`photos.jsonl`: id, file_name, ai_description, ...).
    #[param(input)]
    photos: Input,
    /// Optional `captions.jsonl` ({"id", "text"} lines) from a captioning stage.
    #[param(input, default = null)]
    captions: Option<Input>,
    /// Where each caption comes from; `auto` uses the `captions` input when bound, else the
    /// records' `ai_description`.
    #[param(default = "auto", one_of = &["auto", "captions", "ai_description", "description"])]
    text_from: String,
    /// Ids that go to the test split (besides records marked `split: test`).
    #[param(default = [])]
    test_ids: Vec<String>,
    /// How many more test images to draw at random (with `seed`) from the rest.
    #[param(default = 0, min = 0)]
    test_count: usize,
    /// Seed of the `test_count` draw.
    #[param(default = 0)]
    seed: i64,
}

/// One line of a dataset stage's `photos.jsonl` (only what this kind reads).
#[derive(Debug, Deserialize)]
struct PhotoRecord {
    id: String,
    file_name: String,
    #[serde(default)]
    ai_description: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    split: Option<String>,
}

/// One line of a captioning stage's `captions.jsonl`.
#[derive(Debug, Deserialize)]
struct CaptionRecord {
    id: String,
    text: String,
}

#[derive(Debug, Serialize)]
struct Skipped {
    id: String,
    reason: &'static str,
}

/// What the stage did, for people and for the report stage.
#[derive(Debug, Serialize)]
struct Summary {
    train: usize,
    test: usize,
    text_from: String,
    test_ids: Vec<String>,
    skipped: Vec<Skipped>,
}

const DATASET: &str = "dataset";
const SUMMARY: &str = "imagefolder.json";

impl StageKind for ImageFolder {
    fn name(&self) -> &'static str {
        "imagefolder"
    }

    fn version(&self) -> u32 {
        1
    }

    fn doc(&self) -> &'static str {
        "Writes a Hugging Face imagefolder dataset: `dataset/train/` and `dataset/test/`, each \
         with its images and a `metadata.jsonl` of {\"file_name\", \"text\"} lines (file names \
         relative to the split folder). Captions come from a captioning stage's `captions` \
         input or from the dataset's own records (`ai_description`, `description`). The test \
         split is the records marked `split: test` by the dataset stage, plus `test_ids`, plus \
         `test_count` more drawn with `seed`. Records whose image is missing or whose caption \
         is empty are skipped and listed in `imagefolder.json`; duplicate ids fail the stage."
    }

    fn params(&self) -> Vec<ParamSpec> {
        Settings::specs()
    }

    fn outputs(&self) -> Vec<OutputSpec> {
        vec![
            OutputSpec {
                name: "dataset",
                path: DATASET,
                kind: OutputKind::Dir,
                doc: "`train/` and `test/`, each with images and `metadata.jsonl`.",
            },
            OutputSpec {
                name: "summary",
                path: SUMMARY,
                kind: OutputKind::File,
                doc: "Split sizes, the test ids, where captions came from, and skipped records.",
            },
        ]
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let settings = Settings::of(ctx)?;
        let images = settings.images.path();
        let photos = read_jsonl::<PhotoRecord>(settings.photos.path())?;
        let captions = match &settings.captions {
            Some(input) => Some(read_jsonl::<CaptionRecord>(input.path())?),
            None => None,
        };
        let text_from = match (settings.text_from.as_str(), &captions) {
            ("auto", Some(_)) | ("captions", _) => "captions".to_string(),
            ("auto", None) => "ai_description".to_string(),
            (other, _) => other.to_string(),
        };
        if text_from == "captions" && captions.is_none() {
            return Err(StageError::InvalidParam {
                param: "text_from".into(),
                message: "`captions` was chosen but no `captions` input is bound".into(),
            });
        }

        let mut seen = BTreeSet::new();
        for p in &photos {
            if !seen.insert(p.id.as_str()) {
                return Err(StageError::failed(format!(
                    "photos.jsonl lists id `{}` twice; ids must be unique",
                    p.id
                )));
            }
        }
        let caption_of: BTreeMap<&str, &str> =
            captions.iter().flatten().map(|c| (c.id.as_str(), c.text.as_str())).collect();

        // Keep the records that have an image and a caption, in id order.
        let mut skipped = Vec::new();
        let mut rows: Vec<(&PhotoRecord, String)> = Vec::new();
        let mut sorted: Vec<&PhotoRecord> = photos.iter().collect();
        sorted.sort_by(|a, b| a.id.cmp(&b.id));
        for p in sorted {
            ctx.cancel.check()?;
            let text = match text_from.as_str() {
                "captions" => caption_of.get(p.id.as_str()).map(|s| s.to_string()),
                "description" => p.description.clone(),
                _ => p.ai_description.clone(),
            };
            let text = text.map(|t| t.trim().to_string()).unwrap_or_default();
            if text.is_empty() {
                skipped.push(Skipped { id: p.id.clone(), reason: "empty caption" });
                continue;
            }
            if !image_path(images, p).is_some_and(|path| path.is_file()) {
                skipped.push(Skipped { id: p.id.clone(), reason: "image missing" });
                continue;
            }
            rows.push((p, text));
        }
        for s in &skipped {
            writeln!(ctx.log, "skipped {}: {}", s.id, s.reason)
                .map_err(|e| StageError::io("writing the log", e))?;
        }

        let test_ids = choose_test(&settings, &rows)?;
        let out = ctx.output_path(DATASET);
        let mut counts = (0, 0);
        for (split, is_test) in [("train", false), ("test", true)] {
            let in_split: Vec<_> =
                rows.iter().filter(|(p, _)| test_ids.contains(&p.id) == is_test).collect();
            // No folder for an empty split: `datasets` would fail on an empty one
            // ("no data files"), while a missing split is simply not there.
            if in_split.is_empty() {
                continue;
            }
            let dir = out.join(split);
            fs::create_dir_all(&dir)
                .map_err(|e| StageError::io(format!("creating {split}/"), e))?;
            let mut metadata = String::new();
            for (p, text) in in_split {
                let src = image_path(images, p).expect("checked above");
                let file_name = format!("{}.jpg", p.id);
                link_or_copy(&src, &dir.join(&file_name))?;
                metadata.push_str(&json!({"file_name": file_name, "text": text}).to_string());
                metadata.push('\n');
                if is_test {
                    counts.1 += 1;
                } else {
                    counts.0 += 1;
                }
            }
            fs::write(dir.join("metadata.jsonl"), metadata)
                .map_err(|e| StageError::io(format!("writing {split}/metadata.jsonl"), e))?;
        }
        if counts.0 == 0 {
            return Err(StageError::failed(format!(
                "the train split is empty ({} records, {} skipped, {} test)",
                photos.len(),
                skipped.len(),
                counts.1
            )));
        }
        let summary = Summary {
            train: counts.0,
            test: counts.1,
            text_from,
            test_ids: test_ids.into_iter().collect(),
            skipped,
        };
        let text = serde_json::to_string_pretty(&summary).expect("summaries serialise");
        fs::write(ctx.output_path(SUMMARY), text + "\n")
            .map_err(|e| StageError::io("writing imagefolder.json", e))?;
        Ok(())
    }
}

/// The record's image inside the `images` input, never outside it: `file_name` is
/// `images/<name>` as the dataset stages write it, and only its last component is used.
fn image_path(images: &Path, p: &PhotoRecord) -> Option<PathBuf> {
    let name = Path::new(&p.file_name).file_name()?;
    let safe = name.to_str().is_some_and(|n| !n.starts_with('.') && !n.contains(['/', '\\']));
    safe.then(|| images.join(name))
}

/// Records marked `test`, the explicit ids, then `test_count` more drawn with a seeded,
/// version-stable shuffle of the remaining ids (sorted first, so file order never matters).
fn choose_test(
    settings: &Settings,
    rows: &[(&PhotoRecord, String)],
) -> Result<BTreeSet<String>, StageError> {
    let (explicit, count) = (&settings.test_ids, settings.test_count);
    let present: BTreeSet<&str> = rows.iter().map(|(p, _)| p.id.as_str()).collect();
    if let Some(missing) = explicit.iter().find(|id| !present.contains(id.as_str())) {
        return Err(StageError::InvalidParam {
            param: "test_ids".into(),
            message: format!("`{missing}` is not in the dataset (or was skipped)"),
        });
    }
    let mut test: BTreeSet<String> = explicit.iter().cloned().collect();
    test.extend(
        rows.iter().filter(|(p, _)| p.split.as_deref() == Some("test")).map(|(p, _)| p.id.clone()),
    );
    let mut rest: Vec<&str> = present.iter().copied().filter(|id| !test.contains(*id)).collect();
    if count > rest.len() {
        return Err(StageError::InvalidParam {
            param: "test_count".into(),
            message: format!("{count} requested but only {} images are left", rest.len()),
        });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(settings.seed as u64);
    // Fisher-Yates with plain modulo: the bias is negligible for dataset sizes and, unlike
    // `rand`'s range sampling, the sequence is fixed forever.
    for i in (1..rest.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        rest.swap(i, j);
    }
    test.extend(rest.into_iter().take(count).map(str::to_string));
    Ok(test)
}

fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>, StageError> {
    let text = fs::read_to_string(path)
        .map_err(|e| StageError::io(format!("reading {}", path.display()), e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line)
                .map_err(|e| StageError::failed(format!("{name} line {}: {e}", i + 1)))
        })
        .collect()
}

/// Inputs are read-only views of stored objects; a hardlink shares the bytes without copying.
fn link_or_copy(src: &Path, dest: &Path) -> Result<(), StageError> {
    if fs::hard_link(src, dest).is_ok() {
        return Ok(());
    }
    fs::copy(src, dest)
        .map(|_| ())
        .map_err(|e| StageError::io(format!("copying {}", src.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::Synthetic;
    use sdpipe_stages::testing::{self, Harness};
    use serde_json::Value;

    /// A synthetic dataset of `n` images, as the engine would hand it over.
    fn dataset(n: i64) -> Harness {
        let mut h = Harness::new();
        h.run(
            &Synthetic,
            &testing::params(&Synthetic, &[("count", json!(n)), ("resolution", json!(16))]),
        )
        .unwrap();
        h
    }

    fn run(data: &Harness, overrides: &[(&str, Value)]) -> (Harness, Result<(), StageError>) {
        let mut h = Harness::new()
            .input("images", data.out_dir().join("images"))
            .input("photos", data.out_dir().join("photos.jsonl"));
        let result = h.run(&ImageFolder, &testing::params(&ImageFolder, overrides));
        (h, result)
    }

    fn metadata(h: &Harness, split: &str) -> Vec<Value> {
        fs::read_to_string(h.out_dir().join(DATASET).join(split).join("metadata.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn summary(h: &Harness) -> Value {
        serde_json::from_slice(&fs::read(h.out_dir().join(SUMMARY)).unwrap()).unwrap()
    }

    #[test]
    fn writes_metadata_with_file_names_relative_to_the_split() {
        let data = dataset(4);
        let (h, result) = run(&data, &[]);
        result.unwrap();
        let train = metadata(&h, "train");
        assert_eq!(train.len(), 4);
        for row in &train {
            let name = row["file_name"].as_str().unwrap();
            assert!(!name.contains('/'), "{name}");
            assert!(h.out_dir().join(DATASET).join("train").join(name).is_file());
            assert!(!row["text"].as_str().unwrap().is_empty());
        }
    }

    #[test]
    fn an_empty_split_gets_no_folder() {
        let data = dataset(3);
        let (h, result) = run(&data, &[("test_count", json!(0))]);
        result.unwrap();
        assert!(h.out_dir().join(DATASET).join("train/metadata.jsonl").is_file());
        assert!(!h.out_dir().join(DATASET).join("test").exists());
    }

    #[test]
    fn explicit_test_ids_go_to_the_test_split() {
        let data = dataset(4);
        let (h, result) = run(&data, &[("test_ids", json!(["syn-flat-s0-00002"]))]);
        result.unwrap();
        let test = metadata(&h, "test");
        assert_eq!(test.len(), 1);
        assert_eq!(test[0]["file_name"], "syn-flat-s0-00002.jpg");
        assert_eq!(metadata(&h, "train").len(), 3);
    }

    #[test]
    fn records_marked_test_by_the_dataset_stage_go_to_the_test_split() {
        let data = dataset(3);
        let photos = data.out_dir().join("photos.jsonl");
        let text = fs::read_to_string(&photos).unwrap();
        let marked: Vec<String> = text
            .lines()
            .enumerate()
            .map(|(i, l)| {
                let mut v: Value = serde_json::from_str(l).unwrap();
                v["split"] = json!(if i == 0 { "test" } else { "train" });
                v.to_string()
            })
            .collect();
        fs::write(&photos, marked.join("\n")).unwrap();
        let (h, result) = run(&data, &[]);
        result.unwrap();
        assert_eq!(summary(&h)["test_ids"], json!(["syn-flat-s0-00000"]));
    }

    #[test]
    fn test_count_draw_is_deterministic_and_depends_on_the_seed() {
        let data = dataset(12);
        let ids = |seed: i64| {
            let (h, result) = run(&data, &[("test_count", json!(3)), ("seed", json!(seed))]);
            result.unwrap();
            summary(&h)["test_ids"].clone()
        };
        assert_eq!(ids(1), ids(1));
        assert_ne!(ids(1), ids(2));
        assert_eq!(ids(1).as_array().unwrap().len(), 3);
    }

    #[test]
    fn captions_input_replaces_the_records_text() {
        let data = dataset(2);
        let captions = data.out_dir().join("captions.jsonl");
        fs::write(
            &captions,
            "{\"id\":\"syn-flat-s0-00000\",\"text\":\"first\"}\n{\"id\":\"syn-flat-s0-00001\",\"text\":\"second\"}\n",
        )
        .unwrap();
        let mut h = Harness::new()
            .input("images", data.out_dir().join("images"))
            .input("photos", data.out_dir().join("photos.jsonl"))
            .input("captions", &captions);
        h.run(&ImageFolder, &testing::params(&ImageFolder, &[])).unwrap();
        let texts: Vec<Value> = metadata(&h, "train").iter().map(|r| r["text"].clone()).collect();
        assert_eq!(texts, vec![json!("first"), json!("second")]);
        assert_eq!(summary(&h)["text_from"], "captions");
    }

    #[test]
    fn missing_images_and_empty_captions_are_skipped_and_listed() {
        let data = dataset(4);
        fs::remove_file(data.out_dir().join("images/syn-flat-s0-00001.jpg")).unwrap();
        let photos = data.out_dir().join("photos.jsonl");
        let text = fs::read_to_string(&photos).unwrap();
        let edited: Vec<String> = text
            .lines()
            .enumerate()
            .map(|(i, l)| {
                let mut v: Value = serde_json::from_str(l).unwrap();
                if i == 2 {
                    v["ai_description"] = json!("  ");
                }
                v.to_string()
            })
            .collect();
        fs::write(&photos, edited.join("\n")).unwrap();
        let (h, result) = run(&data, &[]);
        result.unwrap();
        assert_eq!(metadata(&h, "train").len(), 2);
        assert_eq!(
            summary(&h)["skipped"],
            json!([
                {"id": "syn-flat-s0-00001", "reason": "image missing"},
                {"id": "syn-flat-s0-00002", "reason": "empty caption"}
            ])
        );
    }

    #[test]
    fn duplicate_ids_fail_the_stage() {
        let data = dataset(2);
        let photos = data.out_dir().join("photos.jsonl");
        let first = fs::read_to_string(&photos).unwrap().lines().next().unwrap().to_string();
        fs::write(&photos, format!("{first}\n{first}\n")).unwrap();
        let (_, result) = run(&data, &[]);
        let err = result.unwrap_err().to_string();
        assert!(err.contains("twice"), "{err}");
    }

    #[test]
    fn unknown_test_id_is_an_error() {
        let data = dataset(2);
        let (_, result) = run(&data, &[("test_ids", json!(["nope"]))]);
        assert!(result.unwrap_err().to_string().contains("`nope` is not in the dataset"));
    }

    #[test]
    fn file_names_cannot_point_outside_the_images_input() {
        let data = dataset(1);
        let photos = data.out_dir().join("photos.jsonl");
        let mut v: Value =
            serde_json::from_str(fs::read_to_string(&photos).unwrap().trim()).unwrap();
        v["file_name"] = json!("../../../etc/passwd");
        fs::write(&photos, v.to_string()).unwrap();
        let (h, result) = run(&data, &[]);
        // `passwd` is looked up inside `images/` only, where it does not exist.
        assert!(result.is_err());
        assert_eq!(summary_or_none(&h), None);
    }

    fn summary_or_none(h: &Harness) -> Option<Value> {
        fs::read(h.out_dir().join(SUMMARY)).ok().and_then(|b| serde_json::from_slice(&b).ok())
    }

    #[test]
    fn loads_with_the_datasets_library_when_python_has_it() {
        let has_datasets = std::process::Command::new("python3")
            .args(["-c", "import datasets"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !has_datasets {
            eprintln!("skipping: Python `datasets` is not installed");
            return;
        }
        let data = dataset(5);
        let (h, result) = run(&data, &[("test_count", json!(2))]);
        result.unwrap();
        let script = "import sys, datasets\n\
            d = datasets.load_dataset('imagefolder', data_dir=sys.argv[1])\n\
            print(len(d['train']), len(d['test']), d['train'][0]['image'].size, bool(d['train'][0]['text']))";
        let out = std::process::Command::new("python3")
            .args(["-c", script, &h.out_dir().join(DATASET).display().to_string()])
            .env("HF_DATASETS_OFFLINE", "1")
            .env("HF_HOME", h.state.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3 2 (16, 16) True");
    }
}
