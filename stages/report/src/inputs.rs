//! Reading the upstream outputs a report is made from, checked against their data contracts
//! (see the sdpipe docs on formats): imagefolder metadata, sample images and `samples.jsonl`,
//! `metrics.json` of `fid`, `lpips`, `cmmd`, `clip-score` and `scene-accuracy`, their
//! `per_image.jsonl`, `train_log.jsonl` and a train stage's `validation/` images.
//!
//! Each reader takes the input's name so that an error says which binding and which file is
//! wrong. Inputs are accepted either as the file itself (how the engine hands over a file
//! output) or as a directory holding it under its contract name.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::bootstrap::PerItem;
use crate::error::ReportError;

/// One test image with its caption, from the imagefolder's `<split>/metadata.jsonl`.
#[derive(Debug, Clone)]
pub struct TestItem {
    pub id: String,
    pub caption: String,
    pub image: PathBuf,
}

/// One line of a `sample` stage's `samples.jsonl`.
#[derive(Debug, Clone, Deserialize)]
pub struct SampleRecord {
    pub id: String,
    pub file_name: String,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub k: Option<u64>,
    /// The LoRA merged into the UNet that drew it, when the sample stage had one bound.
    #[serde(default)]
    pub lora: Option<LoraRecord>,
}

/// A `samples.jsonl` line's `lora`: the LoRA merged into the UNet at `scale` (the sample
/// stage's `lora_scale`). `rank` and `alpha` are a number, or a list of the distinct values
/// when its layers differ.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraRecord {
    pub rank: Value,
    pub alpha: Value,
    pub scale: f64,
    /// The adapted layers by the last part of their names (`to_q`, `to_out.0`).
    #[serde(default)]
    pub targets: Vec<String>,
    /// How many layers it adapts.
    #[serde(default)]
    pub layers: Option<u64>,
}

impl LoraRecord {
    /// `LoRA r=4, α=8, scale 1`: how tables label a model sampled with it.
    pub fn label(&self) -> String {
        fn values(v: &Value) -> String {
            match v {
                Value::Array(items) => items.iter().map(values).collect::<Vec<_>>().join("/"),
                Value::Number(n) => match n.as_f64() {
                    Some(x) if n.is_f64() => format!("{x}"),
                    _ => n.to_string(),
                },
                other => other.to_string(),
            }
        }
        format!("LoRA r={}, α={}, scale {}", values(&self.rank), values(&self.alpha), self.scale)
    }
}

/// A model's generated images: one image per id (the first draw, `k = 0`, when there are more).
#[derive(Debug, Clone, Default)]
pub struct Samples {
    /// id → image file.
    pub images: BTreeMap<String, PathBuf>,
    /// Every record of `samples.jsonl`, when it was available, sorted by (id, k).
    pub records: Option<Vec<SampleRecord>>,
}

impl Samples {
    /// The image shown for `id`: its first draw. Without `samples.jsonl`, an image named
    /// `<id>.png`, else `<id>_0.png` (how the sample stage names draws when there are several).
    pub fn image(&self, id: &str) -> Option<&PathBuf> {
        self.images.get(id).or_else(|| match self.records {
            Some(_) => None,
            None => self.images.get(&format!("{id}_0")),
        })
    }

    /// The record of the image shown for `id`.
    pub fn record(&self, id: &str) -> Option<&SampleRecord> {
        self.records.as_ref()?.iter().find(|r| r.id == id)
    }

    /// The LoRA these samples were drawn with: that of the first record (the sample stage
    /// writes the same on every line). `None` without `samples.jsonl` or a LoRA.
    pub fn lora(&self) -> Option<&LoraRecord> {
        self.records.as_ref()?.first()?.lora.as_ref()
    }
}

/// An `fid` stage's `metrics.json`.
#[derive(Debug, Clone)]
pub struct FidMetrics {
    pub fid: f64,
    pub kid_mean: Option<f64>,
    pub kid_std: Option<f64>,
    pub n_real: u64,
    pub n_fake: u64,
    pub weights: Option<String>,
    /// The whole file, for `report.json`.
    pub raw: Map<String, Value>,
}

/// An `lpips` stage's `metrics.json`, with its `per_image.jsonl` when available.
#[derive(Debug, Clone)]
pub struct LpipsMetrics {
    pub lpips: f64,
    pub n: u64,
    pub weights: Option<String>,
    pub raw: Map<String, Value>,
    /// Fake image stem (= id) → LPIPS to its ground truth.
    pub per_image: Option<BTreeMap<String, f64>>,
    /// One value per line of `per_image.jsonl`, keyed by the item (see [`item_key`]): the
    /// per-image values whose mean is `lpips`, for its bootstrap interval.
    pub per_pair: Option<PerItem>,
}

/// A `cmmd` stage's `metrics.json` (a set-level distance: lower is better).
#[derive(Debug, Clone)]
pub struct CmmdMetrics {
    pub cmmd: f64,
    pub n_real: u64,
    pub n_fake: u64,
    /// The CLIP model that embedded the images (`repo@commit` or a folder name).
    pub model: Option<String>,
    pub raw: Map<String, Value>,
}

/// A `clip-score` stage's `metrics.json`, with its `per_image.jsonl` when available (higher is
/// better).
#[derive(Debug, Clone)]
pub struct ClipScoreMetrics {
    /// torchmetrics' CLIPScore: `max(mean of 100·cos, 0)`.
    pub clip_score: f64,
    /// The mean of the per-image clamped scores `max(100·cos, 0)`: the value the report shows,
    /// so that it is the mean its bootstrap interval is of.
    pub mean_clamped: f64,
    pub n: u64,
    pub model: Option<String>,
    pub raw: Map<String, Value>,
    /// One clamped per-image score (`clip_score`) per line of `per_image.jsonl`, keyed by the
    /// item (see [`item_key`]), for its bootstrap interval.
    pub per_image: Option<PerItem>,
}

/// A `scene-accuracy` stage's `metrics.json`: shares of the judged images (higher is better).
#[derive(Debug, Clone)]
pub struct SceneMetrics {
    pub background: f64,
    /// Absent in metrics written before the style was judged.
    pub style: Option<f64>,
    pub colours: f64,
    /// `None` when no caption states a relation (one-shape scenes).
    pub relations: Option<f64>,
    pub all: f64,
    pub images: u64,
    pub raw: Map<String, Value>,
    /// From its `per_image.jsonl`, when available: column (`background`, `style`, `colours`,
    /// `relations`, `all`) → per-item 1 (shown) or 0 (not). A column no line judges (the style
    /// in files written before it was judged, relations in one-shape scenes) is absent.
    pub per_image: Option<BTreeMap<&'static str, PerItem>>,
}

/// One line of `train_log.jsonl`. A diverged step's loss is serialised as `null`.
#[derive(Debug, Clone, Deserialize)]
pub struct TrainStep {
    pub step: u64,
    #[serde(default)]
    pub loss: Option<f64>,
    #[serde(default)]
    pub lr: Option<f64>,
    #[serde(default)]
    pub grad_norm: Option<f64>,
}

/// A train stage's `validation/` output: the images drawn with its validation prompts after
/// some of its steps.
#[derive(Debug, Clone)]
pub struct Validation {
    pub prompts: Vec<String>,
    /// The steps validated, in order.
    pub steps: Vec<u64>,
    /// (step, prompt index) → image file.
    pub images: BTreeMap<(u64, usize), PathBuf>,
    /// `validation.json` without its lists: how the images were drawn.
    pub settings: Map<String, Value>,
}

/// `path` itself when it is a file, else `path/name`.
fn file_in(path: &Path, name: &str) -> PathBuf {
    if path.is_dir() {
        path.join(name)
    } else {
        path.to_path_buf()
    }
}

fn read_text(input: &str, path: &Path, hint: &str) -> Result<String, ReportError> {
    if !path.exists() {
        return Err(ReportError::Missing {
            input: input.into(),
            path: path.to_path_buf(),
            hint: hint.into(),
        });
    }
    fs::read_to_string(path)
        .map_err(|source| ReportError::Read { path: path.to_path_buf(), source })
}

fn read_jsonl<T: serde::de::DeserializeOwned>(
    input: &str,
    path: &Path,
    expected: &'static str,
) -> Result<Vec<T>, ReportError> {
    let text = read_text(input, path, &format!("expected {expected}"))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| ReportError::Malformed {
                input: input.into(),
                path: path.to_path_buf(),
                expected,
                message: format!("line {}: {e}", i + 1),
            })
        })
        .collect()
}

/// The last path component only, so a metadata line cannot point outside its folder.
fn safe_name(name: &str) -> Option<&str> {
    let base = Path::new(name).file_name()?.to_str()?;
    (!base.starts_with('.')).then_some(base)
}

fn stem(name: &str) -> String {
    Path::new(name).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The test split of an imagefolder dataset (`<dataset>/<split>/metadata.jsonl`), sorted by id.
pub fn read_test_items(dataset: &Path, split: &str) -> Result<Vec<TestItem>, ReportError> {
    #[derive(Deserialize)]
    struct Line {
        file_name: String,
        text: String,
    }
    const EXPECTED: &str = "imagefolder metadata.jsonl ({\"file_name\", \"text\"} lines)";
    let dir = dataset.join(split);
    let path = dir.join("metadata.jsonl");
    if !path.exists() {
        return Err(ReportError::Missing {
            input: "dataset".into(),
            path,
            hint: format!(
                "bind an imagefolder stage's `dataset` output, and check that the `split` \
                 parameter (`{split}`) names one of its splits"
            ),
        });
    }
    let lines: Vec<Line> = read_jsonl("dataset", &path, EXPECTED)?;
    let mut items = Vec::with_capacity(lines.len());
    for line in lines {
        let Some(name) = safe_name(&line.file_name) else {
            return Err(ReportError::Malformed {
                input: "dataset".into(),
                path,
                expected: EXPECTED,
                message: format!("`file_name` {:?} is not a file name", line.file_name),
            });
        };
        items.push(TestItem { id: stem(name), caption: line.text, image: dir.join(name) });
    }
    items.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(items)
}

fn is_image(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg" | "webp"))
}

/// A sample stage's images. `path` is its `images/` output (or a folder holding `images/` and
/// `samples.jsonl`); `records` is its `samples.jsonl` output, when bound.
pub fn read_samples(
    input: &str,
    path: &Path,
    records: Option<(&str, &Path)>,
) -> Result<Samples, ReportError> {
    const EXPECTED: &str =
        "samples.jsonl ({\"id\", \"file_name\", \"prompt\", \"seed\", \"k\"} lines)";
    let (images_dir, records) = if path.join("images").is_dir() {
        let beside = path.join("samples.jsonl");
        let records = records.map(|(i, p)| (i.to_string(), p.to_path_buf()));
        (path.join("images"), records.or_else(|| beside.exists().then(|| (input.into(), beside))))
    } else {
        (path.to_path_buf(), records.map(|(i, p)| (i.to_string(), p.to_path_buf())))
    };
    if !images_dir.is_dir() {
        return Err(ReportError::Missing {
            input: input.into(),
            path: images_dir,
            hint: "expected a sample stage's `images` folder".into(),
        });
    }
    let mut files: Vec<PathBuf> = fs::read_dir(&images_dir)
        .map_err(|source| ReportError::Read { path: images_dir.clone(), source })?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_image(p))
        .collect();
    files.sort();

    let Some((records_input, records_path)) = records else {
        // Without the records, an image's id is its file stem; with several draws per prompt
        // (`<id>_<k>.png`) the ids cannot be told apart from stems, so the exact stem wins.
        let images = files.into_iter().map(|p| (stem(&p.to_string_lossy()), p)).collect();
        return Ok(Samples { images, records: None });
    };
    let records_file = file_in(&records_path, "samples.jsonl");
    let mut records: Vec<SampleRecord> = read_jsonl(&records_input, &records_file, EXPECTED)?;
    records.sort_by(|a, b| (&a.id, a.k).cmp(&(&b.id, b.k)));
    let mut images = BTreeMap::new();
    for r in &records {
        let image = safe_name(&r.file_name).map(|n| images_dir.join(n));
        match image {
            Some(image) if image.is_file() => {
                images.entry(r.id.clone()).or_insert(image);
            }
            _ => {
                return Err(ReportError::Malformed {
                    input: records_input,
                    path: records_file,
                    expected: EXPECTED,
                    message: format!(
                        "it lists `{}` for id `{}`, which is not in {}",
                        r.file_name,
                        r.id,
                        images_dir.display()
                    ),
                })
            }
        }
    }
    Ok(Samples { images, records: Some(records) })
}

/// Parses a `metrics.json` object and checks its `metric` field.
fn read_metrics_object(
    input: &str,
    path: &Path,
    metric: &str,
    expected: &'static str,
) -> Result<Map<String, Value>, ReportError> {
    let file = file_in(path, "metrics.json");
    let text =
        read_text(input, &file, &format!("expected the `metrics.json` of a `{metric}` stage"))?;
    let malformed = |message: String| ReportError::Malformed {
        input: input.into(),
        path: file.clone(),
        expected,
        message,
    };
    let value: Value =
        serde_json::from_str(&text).map_err(|e| malformed(format!("not JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(malformed("not a JSON object".into()));
    };
    match map.get("metric").and_then(Value::as_str) {
        Some(m) if m == metric => Ok(map),
        Some(other) => Err(malformed(format!(
            "its `metric` is {other:?}, not {metric:?}: bind the `{metric}` stage's output here"
        ))),
        None => Err(malformed("the `metric` field is missing".into())),
    }
}

fn field_f64(map: &Map<String, Value>, name: &str) -> Result<Option<f64>, String> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| format!("`{name}` is {v}, not a number")),
    }
}

fn field_u64(map: &Map<String, Value>, name: &str) -> Result<u64, String> {
    map.get(name)
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("`{name}` is missing or not a non-negative integer"))
}

fn required(value: Option<f64>, name: &str) -> Result<f64, String> {
    value.ok_or_else(|| format!("`{name}` is missing or null"))
}

/// An `fid` stage's `metrics.json` (`path` is the file or a folder holding it).
pub fn read_fid(input: &str, path: &Path) -> Result<FidMetrics, ReportError> {
    read_typed_metrics(input, path, "fid", "fid metrics.json", |raw| {
        Ok(FidMetrics {
            fid: required(field_f64(raw, "fid")?, "fid")?,
            kid_mean: field_f64(raw, "kid_mean")?,
            kid_std: field_f64(raw, "kid_std")?,
            n_real: field_u64(raw, "n_real")?,
            n_fake: field_u64(raw, "n_fake")?,
            weights: raw.get("weights").and_then(Value::as_str).map(str::to_string),
            raw: raw.clone(),
        })
    })
}

/// A `scene-accuracy` stage's `metrics.json`, and its `per_image.jsonl` from `per_image` (the
/// bound output) or, when `path` is a folder, from beside the metrics.
pub fn read_scene(
    input: &str,
    path: &Path,
    per_image: Option<(&str, &Path)>,
) -> Result<SceneMetrics, ReportError> {
    let mut scene =
        read_typed_metrics(input, path, "scene-accuracy", "scene-accuracy metrics.json", |raw| {
            Ok(SceneMetrics {
                background: required(field_f64(raw, "background")?, "background")?,
                style: field_f64(raw, "style")?,
                colours: required(field_f64(raw, "colours")?, "colours")?,
                relations: field_f64(raw, "relations")?,
                all: required(field_f64(raw, "all")?, "all")?,
                images: field_u64(raw, "images")?,
                raw: raw.clone(),
                per_image: None,
            })
        })?;
    if let Some((pi_input, file)) = per_image_file(input, path, per_image) {
        scene.per_image = Some(read_scene_per_image(&pi_input, &file)?);
    }
    Ok(scene)
}

/// Where a metric's `per_image.jsonl` is: the bound `per_image` input, else beside its
/// `metrics.json` when `path` is a folder.
fn per_image_file(
    input: &str,
    path: &Path,
    per_image: Option<(&str, &Path)>,
) -> Option<(String, PathBuf)> {
    match per_image {
        Some((i, p)) => Some((i.to_string(), file_in(p, "per_image.jsonl"))),
        None if path.is_dir() && path.join("per_image.jsonl").exists() => {
            Some((input.to_string(), path.join("per_image.jsonl")))
        }
        None => None,
    }
}

/// The key of one item of a `per_image.jsonl`: the stem of its image (unique per draw, and the
/// same for every model sampled from the same prompts and seeds), else its id. A key seen
/// before gets its line number appended, so no value is lost (such items do not pair).
fn item_key(items: &PerItem, id: &str, file: Option<&str>, line: usize) -> String {
    let key = file.and_then(safe_name).map(stem).unwrap_or_else(|| id.to_string());
    if items.contains_key(&key) {
        format!("{key}#{line}")
    } else {
        key
    }
}

fn read_scene_per_image(
    input: &str,
    file: &Path,
) -> Result<BTreeMap<&'static str, PerItem>, ReportError> {
    const EXPECTED: &str = "scene-accuracy per_image.jsonl ({\"id\", \"file_name\", \
                            \"background_correct\", \"style_correct\", \"shapes\", \
                            \"relations\", \"all_correct\"} lines)";
    #[derive(Deserialize)]
    struct Shape {
        present: bool,
    }
    #[derive(Deserialize)]
    struct Line {
        id: String,
        #[serde(default)]
        file_name: Option<String>,
        background_correct: bool,
        #[serde(default)]
        style_correct: Option<bool>,
        #[serde(default)]
        shapes: Vec<Shape>,
        #[serde(default)]
        relations: Vec<bool>,
        all_correct: bool,
    }
    let lines: Vec<Line> = read_jsonl(input, file, EXPECTED)?;
    let mut keys = PerItem::new();
    let mut columns: BTreeMap<&'static str, PerItem> = BTreeMap::new();
    let one = |b: bool| if b { 1.0 } else { 0.0 };
    for (n, line) in lines.iter().enumerate() {
        let key = item_key(&keys, &line.id, line.file_name.as_deref(), n + 1);
        keys.insert(key.clone(), 0.0);
        let mut put = |column: &'static str, value: Option<bool>| {
            if let Some(v) = value {
                columns.entry(column).or_default().insert(key.clone(), one(v));
            }
        };
        put("background", Some(line.background_correct));
        put("style", line.style_correct);
        put("colours", Some(line.shapes.iter().all(|s| s.present)));
        put("relations", (!line.relations.is_empty()).then(|| line.relations.iter().all(|&r| r)));
        put("all", Some(line.all_correct));
    }
    Ok(columns)
}

/// A metric stage's `metrics.json` (its `metric` field checked), read into a typed value by
/// `parse`, whose message names the field that is wrong.
fn read_typed_metrics<T>(
    input: &str,
    path: &Path,
    metric: &str,
    expected: &'static str,
    parse: impl FnOnce(&Map<String, Value>) -> Result<T, String>,
) -> Result<T, ReportError> {
    let raw = read_metrics_object(input, path, metric, expected)?;
    parse(&raw).map_err(|message| ReportError::Malformed {
        input: input.into(),
        path: file_in(path, "metrics.json"),
        expected,
        message,
    })
}

/// An `lpips` stage's `metrics.json`, and its `per_image.jsonl` from `per_image` (the bound
/// output) or, when `path` is a folder, from beside the metrics.
pub fn read_lpips(
    input: &str,
    path: &Path,
    per_image: Option<(&str, &Path)>,
) -> Result<LpipsMetrics, ReportError> {
    const EXPECTED: &str = "lpips metrics.json";
    const EXPECTED_PER_IMAGE: &str =
        "lpips per_image.jsonl ({\"id\", \"real\", \"fake\", \"lpips\"} lines)";
    let raw = read_metrics_object(input, path, "lpips", EXPECTED)?;
    let malformed = |message: String| ReportError::Malformed {
        input: input.into(),
        path: file_in(path, "metrics.json"),
        expected: EXPECTED,
        message,
    };
    let lpips = field_f64(&raw, "lpips").and_then(|v| required(v, "lpips")).map_err(malformed)?;
    let n = field_u64(&raw, "n").map_err(malformed)?;
    let weights = raw.get("weights").and_then(Value::as_str).map(str::to_string);

    let (per_image, per_pair) = match per_image_file(input, path, per_image) {
        None => (None, None),
        Some((pi_input, file)) => {
            #[derive(Deserialize)]
            struct Line {
                id: String,
                #[serde(default)]
                fake: Option<String>,
                lpips: f64,
            }
            let lines: Vec<Line> = read_jsonl(&pi_input, &file, EXPECTED_PER_IMAGE)?;
            let mut map = BTreeMap::new();
            let mut pairs = PerItem::new();
            for (n, line) in lines.iter().enumerate() {
                // Keyed by the fake image's stem when given (it is what the qualitative table
                // shows), which is the id itself for one draw per prompt.
                map.insert(line.id.clone(), line.lpips);
                if let Some(fake) = line.fake.as_deref().and_then(safe_name) {
                    map.entry(stem(fake)).or_insert(line.lpips);
                }
                pairs.insert(item_key(&pairs, &line.id, line.fake.as_deref(), n + 1), line.lpips);
            }
            (Some(map), Some(pairs))
        }
    };
    Ok(LpipsMetrics { lpips, n, weights, raw, per_image, per_pair })
}

/// A `cmmd` stage's `metrics.json` (`path` is the file or a folder holding it).
pub fn read_cmmd(input: &str, path: &Path) -> Result<CmmdMetrics, ReportError> {
    read_typed_metrics(input, path, "cmmd", "cmmd metrics.json", |raw| {
        Ok(CmmdMetrics {
            cmmd: required(field_f64(raw, "cmmd")?, "cmmd")?,
            n_real: field_u64(raw, "n_real")?,
            n_fake: field_u64(raw, "n_fake")?,
            model: raw.get("model").and_then(Value::as_str).map(str::to_string),
            raw: raw.clone(),
        })
    })
}

/// A `clip-score` stage's `metrics.json`, and its `per_image.jsonl` from `per_image` (the
/// bound output) or, when `path` is a folder, from beside the metrics.
pub fn read_clip_score(
    input: &str,
    path: &Path,
    per_image: Option<(&str, &Path)>,
) -> Result<ClipScoreMetrics, ReportError> {
    const EXPECTED_PER_IMAGE: &str = "clip-score per_image.jsonl ({\"id\", \"file_name\", \
                                      \"clip_score\", \"score_raw\"} lines)";
    let mut clip =
        read_typed_metrics(input, path, "clip-score", "clip-score metrics.json", |raw| {
            let clip_score = required(field_f64(raw, "clip_score")?, "clip_score")?;
            Ok(ClipScoreMetrics {
                clip_score,
                mean_clamped: required(field_f64(raw, "mean_clamped")?, "mean_clamped")?,
                n: field_u64(raw, "n")?,
                model: raw.get("model").and_then(Value::as_str).map(str::to_string),
                raw: raw.clone(),
                per_image: None,
            })
        })?;
    if let Some((pi_input, file)) = per_image_file(input, path, per_image) {
        #[derive(Deserialize)]
        struct Line {
            id: String,
            #[serde(default)]
            file_name: Option<String>,
            clip_score: f64,
        }
        let lines: Vec<Line> = read_jsonl(&pi_input, &file, EXPECTED_PER_IMAGE)?;
        let mut items = PerItem::new();
        for (n, line) in lines.iter().enumerate() {
            if !line.clip_score.is_finite() || line.clip_score < 0.0 {
                return Err(ReportError::Malformed {
                    input: pi_input,
                    path: file,
                    expected: EXPECTED_PER_IMAGE,
                    message: format!(
                        "line {}: `clip_score` is {}, not a clamped score (0 or more)",
                        n + 1,
                        line.clip_score
                    ),
                });
            }
            items.insert(
                item_key(&items, &line.id, line.file_name.as_deref(), n + 1),
                line.clip_score,
            );
        }
        clip.per_image = Some(items);
    }
    Ok(clip)
}

/// A train stage's `train_log.jsonl`, sorted by step.
pub fn read_train_log(input: &str, path: &Path) -> Result<Vec<TrainStep>, ReportError> {
    const EXPECTED: &str = "train_log.jsonl ({\"step\", \"loss\", \"lr\", \"grad_norm\"} lines)";
    let file = file_in(path, "train_log.jsonl");
    let mut steps: Vec<TrainStep> = read_jsonl(input, &file, EXPECTED)?;
    steps.sort_by_key(|s| s.step);
    Ok(steps)
}

/// A train stage's `validation/` output (`path` is the folder or its `validation.json`);
/// `None` when the folder is empty, as a run without validation leaves it.
pub fn read_validation(input: &str, path: &Path) -> Result<Option<Validation>, ReportError> {
    const EXPECTED: &str = "train validation.json ({\"prompts\", \"steps\", \"images\": \
                            [{\"step\", \"prompt\", \"file_name\"}], …})";
    #[derive(Deserialize)]
    struct Image {
        step: u64,
        prompt: usize,
        file_name: String,
    }
    #[derive(Deserialize)]
    struct Index {
        prompts: Vec<String>,
        steps: Vec<u64>,
        images: Vec<Image>,
        #[serde(flatten)]
        settings: Map<String, Value>,
    }
    let is_empty_dir = path.is_dir()
        && fs::read_dir(path)
            .map_err(|source| ReportError::Read { path: path.to_path_buf(), source })?
            .next()
            .is_none();
    if is_empty_dir {
        return Ok(None);
    }
    let file = file_in(path, "validation.json");
    let folder = file.parent().unwrap_or(Path::new("")).to_path_buf();
    let text = read_text(input, &file, "expected the `validation` output of a train stage")?;
    let malformed = |message: String| ReportError::Malformed {
        input: input.into(),
        path: file.clone(),
        expected: EXPECTED,
        message,
    };
    let index: Index = serde_json::from_str(&text).map_err(|e| malformed(e.to_string()))?;
    let mut images = BTreeMap::new();
    for image in index.images {
        // Relative paths inside the folder only (`step-000050/prompt-00.png`).
        let relative = Path::new(&image.file_name);
        let inside = relative.components().all(|c| matches!(c, std::path::Component::Normal(_)));
        let source = folder.join(relative);
        if !inside || !source.is_file() {
            return Err(malformed(format!(
                "it lists `{}`, which is not a file in {}",
                image.file_name,
                folder.display()
            )));
        }
        if image.prompt >= index.prompts.len() {
            return Err(malformed(format!("`{}` has no prompt {}", image.file_name, image.prompt)));
        }
        images.insert((image.step, image.prompt), source);
    }
    Ok(Some(Validation {
        prompts: index.prompts,
        steps: index.steps,
        images,
        settings: index.settings,
    }))
}
