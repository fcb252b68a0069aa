//! What the metric kinds share: their common parameters ([`ImageSets`], [`InputParams`],
//! [`BatchSize`]), resolving and loading weights (a converted file, or the `random` stand-in),
//! and writing outputs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sdpipe_stages::api::{StageContext, StageError};
use sdpipe_stages::params::{Input, KindParams};
use serde_json::{json, Value};

use crate::convert::WeightsKind;
use crate::images::{self, Entry, Resize};
use crate::weights::{self, Weights};

/// The `weights` value that selects the deterministic random stand-in network.
pub const RANDOM: &str = "random";

/// The two image sets a set-to-set metric compares (`real`, `fake` and their splits).
#[derive(KindParams)]
pub struct ImageSets {
    /// Ground-truth images: a folder of images, or an imagefolder `dataset/` (then `real_split`
    /// is read).
    #[param(input)]
    pub real: Input,
    /// Generated images: a folder of images (e.g. `sample.images`), or an imagefolder.
    #[param(input)]
    pub fake: Input,
    /// Split read when `real` is an imagefolder dataset.
    #[param(default = "test")]
    pub real_split: String,
    /// Split read when `fake` is an imagefolder dataset.
    #[param(default = "test")]
    pub fake_split: String,
}

impl ImageSets {
    /// The images of both sets, `real` then `fake` (while the stage runs).
    pub fn list(&self) -> Result<(Vec<Entry>, Vec<Entry>), StageError> {
        Ok((
            images::list(self.real.path(), &self.real_split, "real")?,
            images::list(self.fake.path(), &self.fake_split, "fake")?,
        ))
    }
}

/// [`ImageSets`], how ground truth is resized, and the stand-in weights' seed (`fid`, `lpips`).
#[derive(KindParams)]
pub struct InputParams {
    #[param(flatten)]
    pub sets: ImageSets,
    /// How ground truth is brought to the samples' size first (recorded in metrics.json):
    /// `resize` (Catmull-Rom, antialiased), `center-crop` (crop to the samples' aspect ratio,
    /// then resize) or `none`.
    #[param(default = "resize", one_of = &Resize::NAMES)]
    pub resize: Resize,
    /// Seed of the `random` stand-in weights (and of KID's subsets).
    #[param(default = 0, min = 0)]
    pub seed: u64,
}

impl InputParams {
    /// Adds the settings every `metrics.json` records (seed and splits) to `metrics`.
    pub fn record(&self, mut metrics: Value) -> Value {
        if let Some(map) = metrics.as_object_mut() {
            map.insert("seed".into(), json!(self.seed));
            map.insert("real_split".into(), json!(self.sets.real_split));
            map.insert("fake_split".into(), json!(self.sets.fake_split));
        }
        metrics
    }
}

/// Images per network pass; each kind gives its default (`with_default`).
#[derive(KindParams)]
pub struct BatchSize {
    /// Images per network pass (memory vs. speed; results do not depend on it).
    #[param(default = 8, min = 1, max = 1024)]
    pub batch_size: usize,
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

/// The weights file a parameter value resolves to (`None` for `random`).
pub fn resolve(value: &str, kind: WeightsKind, param: &str) -> Result<Option<PathBuf>, StageError> {
    if value == RANDOM {
        return Ok(None);
    }
    weights::locate(value, kind)
        .map(Some)
        .map_err(|e| StageError::InvalidParam { param: param.to_string(), message: e.to_string() })
}

/// Add the file `value` (parameter `param`; empty: `kind`'s default file) resolves to to the
/// external dependencies.
pub fn add_dep(
    deps: &mut BTreeMap<String, PathBuf>,
    param: &str,
    value: &str,
    kind: WeightsKind,
) -> Result<(), StageError> {
    let value = if value.is_empty() { kind.default_file_name() } else { value };
    if let Some(path) = resolve(value, kind, param)? {
        deps.insert(param.to_string(), path);
    }
    Ok(())
}

/// Load the weights `value` names for `kind` (`random` → the recipe with `seed`).
pub fn load(value: &str, kind: WeightsKind, param: &str, seed: u64) -> Result<Weights, StageError> {
    let specs = kind.specs();
    match resolve(value, kind, param)? {
        None => Ok(Weights::random(&specs, seed)),
        Some(path) => Weights::load(&path, &specs, kind.what()).map_err(StageError::caused),
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
