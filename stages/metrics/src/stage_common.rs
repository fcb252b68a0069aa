//! What the `fid` and `lpips` kinds share: their common parameters and how they are read
//! ([`MetricInputs`]), resolving and loading weights (a converted file, or the `random`
//! stand-in), and writing outputs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sdpipe_stages::api::{ParamSpec, ParamType, Params, StageContext, StageError};
use serde_json::{json, Value};

use crate::convert::WeightsKind;
use crate::images::{self, Entry, Resize};
use crate::weights::{self, Weights};

/// The `weights` value that selects the deterministic random stand-in network.
pub const RANDOM: &str = "random";

/// The two image sets a set-to-set metric compares (`real`, `fake` and their splits).
pub fn set_params() -> Vec<ParamSpec> {
    vec![
        ParamSpec::required(
            "real",
            ParamType::Input,
            "Ground-truth images: a folder of images, or an imagefolder `dataset/` (then \
             `real_split` is read).",
        ),
        ParamSpec::required(
            "fake",
            ParamType::Input,
            "Generated images: a folder of images (e.g. `sample.images`), or an imagefolder.",
        ),
        ParamSpec::optional(
            "real_split",
            ParamType::String,
            json!("test"),
            "Split read when `real` is an imagefolder dataset.",
        ),
        ParamSpec::optional(
            "fake_split",
            ParamType::String,
            json!("test"),
            "Split read when `fake` is an imagefolder dataset.",
        ),
    ]
}

/// [`set_params`], how ground truth is resized, and the stand-in weights' seed (`fid`, `lpips`).
pub fn input_params() -> Vec<ParamSpec> {
    let mut params = set_params();
    params.extend([
        ParamSpec::optional(
            "resize",
            ParamType::Enum(&Resize::NAMES),
            json!("resize"),
            "How ground truth is brought to the samples' size first (recorded in \
             metrics.json): `resize` (Catmull-Rom, antialiased), `center-crop` (crop to the \
             samples' aspect ratio, then resize) or `none`.",
        ),
        ParamSpec::optional(
            "seed",
            ParamType::Int { min: Some(0), max: None },
            json!(0),
            "Seed of the `random` stand-in weights (and of KID's subsets).",
        ),
    ]);
    params
}

pub fn batch_size_param(default: i64) -> ParamSpec {
    ParamSpec::optional(
        "batch_size",
        ParamType::Int { min: Some(1), max: Some(1024) },
        json!(default),
        "Images per network pass (memory vs. speed; results do not depend on it).",
    )
}

/// The parameters of [`input_params`] (plus `batch_size`) as a run reads them: both image
/// sets listed, the ground-truth resize, the seed.
pub struct MetricInputs {
    pub real: Vec<Entry>,
    pub fake: Vec<Entry>,
    pub real_split: String,
    pub fake_split: String,
    pub resize: Resize,
    pub seed: u64,
    pub batch_size: usize,
}

impl MetricInputs {
    pub fn read(ctx: &StageContext<'_>) -> Result<MetricInputs, StageError> {
        let real_split: String = ctx.param("real_split")?;
        let fake_split: String = ctx.param("fake_split")?;
        Ok(MetricInputs {
            real: images::list(ctx.input("real")?, &real_split, "real")?,
            fake: images::list(ctx.input("fake")?, &fake_split, "fake")?,
            real_split,
            fake_split,
            resize: resize_param(ctx)?,
            seed: ctx.param("seed")?,
            batch_size: ctx.param("batch_size")?,
        })
    }

    /// Adds the settings every `metrics.json` records (seed and splits) to `metrics`.
    pub fn record(&self, mut metrics: Value) -> Value {
        if let Some(map) = metrics.as_object_mut() {
            map.insert("seed".into(), json!(self.seed));
            map.insert("real_split".into(), json!(self.real_split));
            map.insert("fake_split".into(), json!(self.fake_split));
        }
        metrics
    }
}

/// The threads a metric stage asks for: all the machine has (the scheduler grants fewer).
pub fn wanted_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Runs `f` on a thread pool of the threads the scheduler granted: candle's CPU kernels use
/// the current rayon pool, which would otherwise be the machine-wide one.
pub fn with_granted_threads<T>(
    ctx: &mut StageContext<'_>,
    f: impl FnOnce(&mut StageContext<'_>) -> Result<T, StageError> + Send,
) -> Result<T, StageError>
where
    T: Send,
{
    let threads = ctx.threads.max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| StageError::failed(format!("starting {threads} threads: {e}")))?;
    pool.install(|| f(ctx))
}

/// A string parameter, from context-free `Params` (for `external_deps`).
pub fn string_param(params: &Params, name: &str) -> String {
    params.get(name).and_then(Value::as_str).unwrap_or_default().to_string()
}

pub fn resize_param(ctx: &StageContext<'_>) -> Result<Resize, StageError> {
    let value: String = ctx.param("resize")?;
    Resize::parse(&value).ok_or_else(|| StageError::InvalidParam {
        param: "resize".into(),
        message: format!("`{value}` is not one of {}", Resize::NAMES.join(", ")),
    })
}

/// The weights file a parameter value resolves to (`None` for `random`).
pub fn resolve(value: &str, kind: WeightsKind, param: &str) -> Result<Option<PathBuf>, StageError> {
    if value == RANDOM {
        return Ok(None);
    }
    weights::locate(value, kind)
        .map(Some)
        .map_err(|e| StageError::InvalidParam { param: param.to_string(), message: e.to_string() })
}

/// Add `param`'s resolved file to the external dependencies.
pub fn add_dep(
    deps: &mut BTreeMap<String, PathBuf>,
    params: &Params,
    param: &str,
    kind: WeightsKind,
    fallback: Option<&str>,
) -> Result<(), StageError> {
    let mut value = string_param(params, param);
    if value.is_empty() {
        value = fallback.unwrap_or(kind.default_file_name()).to_string();
    }
    if let Some(path) = resolve(&value, kind, param)? {
        deps.insert(param.to_string(), path);
    }
    Ok(())
}

/// Load the weights `value` names for `kind` (`random` → the recipe with `seed`).
pub fn load(value: &str, kind: WeightsKind, param: &str, seed: u64) -> Result<Weights, StageError> {
    let specs = kind.specs();
    match resolve(value, kind, param)? {
        None => Ok(Weights::random(&specs, seed)),
        Some(path) => {
            Weights::load(&path, &specs, kind.what()).map_err(|e| StageError::failed(e.to_string()))
        }
    }
}

/// How a set of weights is recorded in `metrics.json`: the file name (not the machine-specific
/// path; the engine keys the result on the file's content) or the random stand-in.
pub fn describe(weights: &Weights) -> String {
    match &weights.source {
        weights::Source::File(path) => {
            path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        }
        source => source.to_string(),
    }
}

pub fn candle_err(context: &str) -> impl Fn(candle_core::Error) -> StageError + '_ {
    move |e| StageError::failed(format!("{context}: {e}"))
}

pub fn write_json(path: &Path, value: &Value) -> Result<(), StageError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| StageError::failed(format!("serialising {}: {e}", path.display())))?;
    std::fs::write(path, text + "\n")
        .map_err(|e| StageError::io(format!("writing {}", path.display()), e))
}

/// A file's name for the outputs (ids and file names, never machine-specific paths).
pub fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}
