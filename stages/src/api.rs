//! The contract between sdpipe's engine and a stage kind.
//!
//! A kind declares its typed parameters (some of which are *inputs*: bindings to an upstream
//! stage's output), as one struct ([`crate::params`]), and the outputs it writes, and implements [`StageKind::run`], which reads its
//! inputs from paths, writes its outputs under a fresh directory and returns. That is all a kind
//! sees: it knows nothing of keys, caches or scheduling, so the same kind can run locally or,
//! later, on a cluster executor.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::device::DeviceChoice;

/// The type of one parameter, used to validate and canonicalise the pipeline's values.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamType {
    /// Any string.
    String,
    /// A signed integer, optionally bounded (inclusive).
    Int {
        min: Option<i64>,
        max: Option<i64>,
    },
    /// A float; integers are accepted and widened, so `1e-5` and `0.00001` give one key.
    Float {
        min: Option<f64>,
        max: Option<f64>,
    },
    Bool,
    /// One of a fixed set of strings.
    Enum(&'static [&'static str]),
    /// A list whose items all have the given type.
    List(Box<ParamType>),
    /// A binding `stage.output` to an upstream output; the kind receives its path.
    Input,
    /// A file or directory in the project, relative to the pipeline file; its content is hashed
    /// into the key and the kind receives its absolute path.
    Path,
    /// Free-form JSON (nested maps): canonicalised, never interpreted by the engine.
    Any,
}

impl ParamType {
    /// A short human description, used in `sdpipe stages` and in type errors.
    pub fn describe(&self) -> String {
        match self {
            ParamType::String => "string".into(),
            ParamType::Int { min, max } => match (min, max) {
                (Some(a), Some(b)) => format!("integer in {a}..={b}"),
                (Some(a), None) => format!("integer >= {a}"),
                (None, Some(b)) => format!("integer <= {b}"),
                (None, None) => "integer".into(),
            },
            ParamType::Float { min, max } => match (min, max) {
                (Some(a), Some(b)) => format!("number in {a}..={b}"),
                (Some(a), None) => format!("number >= {a}"),
                (None, Some(b)) => format!("number <= {b}"),
                (None, None) => "number".into(),
            },
            ParamType::Bool => "boolean".into(),
            ParamType::Enum(values) => format!("one of {}", values.join(", ")),
            ParamType::List(item) => format!("list of {}", item.describe()),
            ParamType::Input => "upstream output `stage.output`".into(),
            ParamType::Path => "path (file or directory)".into(),
            ParamType::Any => "any value".into(),
        }
    }
}

/// One documented, typed parameter of a kind.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: &'static str,
    pub ty: ParamType,
    /// `None` means the parameter is required.
    pub default: Option<Value>,
    pub doc: &'static str,
}

impl ParamSpec {
    pub fn required(name: &'static str, ty: ParamType, doc: &'static str) -> Self {
        ParamSpec { name, ty, default: None, doc }
    }
    pub fn optional(name: &'static str, ty: ParamType, default: Value, doc: &'static str) -> Self {
        ParamSpec { name, ty, default: Some(default), doc }
    }
}

/// Whether an output is a single file or a directory tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    File,
    Dir,
}

/// One output a kind writes, at `path` relative to the stage's output directory.
#[derive(Debug, Clone)]
pub struct OutputSpec {
    pub name: &'static str,
    pub path: &'static str,
    pub kind: OutputKind,
    pub doc: &'static str,
}

/// Resolved, validated parameters (defaults filled in), keyed by parameter name.
pub type Params = BTreeMap<String, Value>;

/// Errors a stage reports. The engine adds the stage name and log location for the user.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("invalid parameter `{param}`: {message}")]
    InvalidParam { param: String, message: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cancelled")]
    Cancelled,
    /// From [`StageKind::external_deps`] under [`Fetch::LocalOnly`]: content the kind would
    /// download is not here yet (the message names it and where it was looked for).
    #[error("{0}")]
    NotLocal(String),
    /// A failure described by a message alone.
    #[error("{0}")]
    Failed(String),
    /// A failure with its cause kept: the message is the cause's own, and `source()` reaches
    /// the cause's chain, so a caller (or a log) can ask what failed underneath.
    #[error("{0}")]
    Caused(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Whether [`StageKind::external_deps`] may fetch what it resolves (a model from the hub).
/// `sdpipe run` allows it; `status` and the remote commands only look, so that asking what
/// would run never starts a multi-gigabyte download.
#[derive(Clone, Copy)]
pub enum Fetch<'a> {
    /// Download what is missing, reporting it through `progress` ([`Downloads`]) and stopping
    /// when `cancel` is set (Ctrl-C).
    Allowed { progress: &'a dyn Progress, cancel: &'a CancelToken },
    /// Resolve from local places only; what is missing there is [`StageError::NotLocal`]
    /// when a run would fetch it.
    LocalOnly,
}

impl Fetch<'_> {
    /// Allowed, reporting to nothing and never cancelled (tests, one-off tools).
    pub fn allowed() -> Fetch<'static> {
        static NEVER: std::sync::OnceLock<CancelToken> = std::sync::OnceLock::new();
        Fetch::Allowed { progress: &NoProgress, cancel: NEVER.get_or_init(CancelToken::new) }
    }
}

/// `bytes` as a person reads a size, in binary units as the progress bars show them
/// (`3.2 GiB`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Downloads as a [`Progress`] shows them: the total grows by each file's size as the file
/// starts, the position by the bytes that arrive, the message names the file.
pub struct Downloads<'a> {
    progress: &'a dyn Progress,
    cancel: &'a CancelToken,
    total: AtomicU64,
    file: std::sync::Mutex<String>,
}

impl<'a> Downloads<'a> {
    pub fn new(progress: &'a dyn Progress, cancel: &'a CancelToken) -> Self {
        Downloads { progress, cancel, total: AtomicU64::new(0), file: Default::default() }
    }
    /// `file` of `bytes` starts downloading.
    pub fn started(&self, file: &str, bytes: u64) {
        let total = self.total.fetch_add(bytes, Ordering::SeqCst) + bytes;
        self.progress.set_total(total);
        let message = format!("downloading {file} ({})", human_bytes(bytes));
        self.progress.advance(0, &message);
        *self.file.lock().unwrap_or_else(|e| e.into_inner()) = message;
    }
    /// `bytes` more arrived.
    pub fn advanced(&self, bytes: u64) {
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        self.progress.advance(bytes, &file);
    }
    pub fn should_stop(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

impl StageError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StageError::Io { context: context.into(), source }
    }
    pub fn failed(message: impl Into<String>) -> Self {
        StageError::Failed(message.into())
    }
    /// `error` as the stage's failure, its cause kept ([`StageError::Caused`]).
    pub fn caused(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        StageError::Caused(Box::new(error))
    }
}

/// Cooperative cancellation: set on Ctrl-C; long stages poll it between units of work.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    /// `Err(Cancelled)` once cancellation was requested: `ctx.cancel.check()?` in loops.
    pub fn check(&self) -> Result<(), StageError> {
        if self.is_cancelled() {
            Err(StageError::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// Progress of a long stage, shown by the engine (a bar, a log line): the stage only reports.
pub trait Progress: Send + Sync {
    /// Set the total number of units of work (images, steps).
    fn set_total(&self, total: u64);
    /// Advance by `n` units, with an optional short message (e.g. the current loss).
    fn advance(&self, n: u64, message: &str);
}

/// A progress sink that ignores everything (tests, non-interactive use).
pub struct NoProgress;
impl Progress for NoProgress {
    fn set_total(&self, _total: u64) {}
    fn advance(&self, _n: u64, _message: &str) {}
}

/// Everything a running stage may touch.
pub struct StageContext<'a> {
    /// The stage's name in the pipeline, for messages.
    pub stage: &'a str,
    pub params: &'a Params,
    /// Input parameter name → path of the bound upstream output (read-only).
    pub inputs: &'a BTreeMap<String, PathBuf>,
    /// Path parameter name → absolute path in the project (read-only).
    pub paths: &'a BTreeMap<String, PathBuf>,
    /// Fresh, empty directory; every declared output must be written at its `path` under it.
    pub out_dir: &'a Path,
    /// A directory that survives an interrupted run of this exact stage invocation (same inputs
    /// and parameters), for checkpoints to resume from. Removed once the stage has succeeded.
    pub state_dir: &'a Path,
    /// A directory shared by every run of this kind, for content fetched from the network and
    /// keyed by what was fetched (its URL), like a browser's or pip's download cache: a changed
    /// selection or an interrupted run refetches nothing already here. Stages sharing it may
    /// run at once, so entries are written under a temporary name and renamed into place.
    pub downloads: &'a Path,
    /// The number of threads the stage was granted; it must not use more.
    pub threads: usize,
    /// Where the stage computes (`device:`); kinds that use candle open it with
    /// [`StageContext::candle_device`].
    pub device: DeviceChoice,
    /// The stage's log (kept with its result).
    pub log: &'a mut (dyn Write + Send),
    pub progress: &'a dyn Progress,
    pub cancel: &'a CancelToken,
    /// For a stage marked `gather: true` downstream of a sweep: input name → one binding per
    /// sweep point that reaches it. Empty otherwise. [`StageContext::input_points`] reads both.
    pub gathered: &'a BTreeMap<String, Vec<GatheredInput>>,
    /// What this stage's result derives from, for kinds whose [`StageKind::wants_provenance`] is
    /// true (empty for the others). Its keys are part of the stage's key, so a report never
    /// shows another run's provenance.
    pub provenance: &'a Provenance,
}

/// What a stage's result derives from: every upstream stage that has a result, in pipeline
/// order. Serialised (as `{"stages": [...]}`) into cluster job files and, without the compute
/// times, into the stage's key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub stages: Vec<ProvenanceStage>,
}

/// One upstream stage of a [`Provenance`]. The field order is the serialised order, which the
/// key hashes: keep it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProvenanceStage {
    /// Its instance name (`finetune@learning_rate=3e-05` in a sweep).
    pub name: String,
    pub kind: String,
    pub version: u32,
    /// Resolved parameters, defaults included.
    pub params: BTreeMap<String, Value>,
    /// Its stage key (hex).
    pub key: String,
    /// How long its result took to compute (when it was computed, not when it was reused).
    pub seconds: f64,
    /// The sweep point it belongs to; empty when shared by every point.
    pub point: String,
}

/// One sweep point's binding of a gathered input.
#[derive(Debug, Clone, PartialEq)]
pub struct GatheredInput {
    /// The point's label, e.g. `learning_rate=3e-05` (empty outside a sweep).
    pub label: String,
    /// The swept parameters of that point (`stage.param` → value).
    pub values: BTreeMap<String, Value>,
    pub path: PathBuf,
}

impl StageContext<'_> {
    /// Every binding of input `name`: one per sweep point for a gathered input, else the single
    /// bound path with an empty label; empty when the (optional) input is unbound.
    pub fn input_points(&self, name: &str) -> Vec<GatheredInput> {
        if let Some(points) = self.gathered.get(name) {
            return points.clone();
        }
        self.inputs
            .get(name)
            .map(|path| GatheredInput {
                label: String::new(),
                values: BTreeMap::new(),
                path: path.clone(),
            })
            .into_iter()
            .collect()
    }
    /// Where the declared output `name` (with the given relative path) is written.
    pub fn output_path(&self, relative: &str) -> PathBuf {
        self.out_dir.join(relative)
    }
    /// The candle device the stage's `device:` names, noted in the stage's log.
    #[cfg(feature = "candle")]
    pub fn candle_device(&mut self) -> Result<candle_core::Device, StageError> {
        let device = self.device.open()?;
        let _ = writeln!(
            self.log,
            "device: {} (`device: {}`)",
            crate::device::describe(&device),
            self.device
        );
        Ok(device)
    }
}

/// A built-in stage kind.
pub trait StageKind: Send + Sync {
    /// The name used in `uses:`.
    fn name(&self) -> &'static str;
    /// Bumped whenever the kind's output for the same inputs may change: part of every key.
    fn version(&self) -> u32;
    /// One paragraph for `sdpipe stages`.
    fn doc(&self) -> &'static str;
    fn params(&self) -> Vec<ParamSpec>;
    fn outputs(&self) -> Vec<OutputSpec>;
    /// How many threads the stage wants, given its parameters (the scheduler may grant fewer
    /// when the machine has fewer cores, never more).
    fn threads(&self, _params: &Params) -> usize {
        1
    }
    /// Extra content the result depends on that is not a parameter or input, such as model
    /// weights resolved from a hub cache: name → path whose content the engine hashes into the key.
    /// `params` also holds each bound input under its name, as its `stage.output` binding text.
    /// Under [`Fetch::LocalOnly`] nothing may be downloaded.
    fn external_deps(
        &self,
        _params: &Params,
        _fetch: Fetch,
    ) -> Result<BTreeMap<String, PathBuf>, StageError> {
        Ok(BTreeMap::new())
    }
    /// A file among the outputs that a person opens after the run (the report's
    /// `report/README.md`): `sdpipe run` prints where it was materialised.
    fn headline(&self) -> Option<&'static str> {
        None
    }
    /// Whether the kind reads [`StageContext::provenance`] (the report does).
    fn wants_provenance(&self) -> bool {
        false
    }
    /// Do the work.
    fn run(&self, ctx: &mut StageContext<'_>) -> Result<(), StageError>;
}

/// The set of kinds a binary knows, looked up by name.
#[derive(Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn StageKind>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn register(&mut self, kind: Arc<dyn StageKind>) {
        self.kinds.insert(kind.name(), kind);
    }
    pub fn get(&self, name: &str) -> Option<Arc<dyn StageKind>> {
        self.kinds.get(name).cloned()
    }
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.keys().copied()
    }
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn StageKind>> {
        self.kinds.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn a_caused_failure_reads_as_its_cause_and_keeps_it() {
        let cause = std::io::Error::new(std::io::ErrorKind::NotFound, "config.json is missing");
        let error = StageError::caused(cause);
        assert_eq!(error.to_string(), "config.json is missing");
        let source = std::error::Error::source(&error).expect("a source");
        let io = source.downcast_ref::<std::io::Error>().expect("the io error itself");
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn sizes_read_in_binary_units_as_the_bars_show_them() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(3_438_167_536), "3.2 GiB");
        assert_eq!(human_bytes(1_536), "1.5 KiB");
    }

    /// Keeps what a progress sink was told.
    #[derive(Default)]
    struct Seen {
        total: AtomicU64,
        position: AtomicU64,
        message: Mutex<String>,
    }
    impl Progress for Seen {
        fn set_total(&self, total: u64) {
            self.total.store(total, Ordering::SeqCst);
        }
        fn advance(&self, n: u64, message: &str) {
            self.position.fetch_add(n, Ordering::SeqCst);
            *self.message.lock().unwrap() = message.to_string();
        }
    }

    #[test]
    fn downloads_add_up_the_files_and_name_the_current_one() {
        let (seen, cancel) = (Seen::default(), CancelToken::new());
        let downloads = Downloads::new(&seen, &cancel);
        downloads.started("unet/config.json", 2_000);
        downloads.advanced(2_000);
        downloads.started("unet/diffusion_pytorch_model.safetensors", 3_000_000);
        downloads.advanced(1_000);
        assert_eq!(seen.total.load(Ordering::SeqCst), 3_002_000);
        assert_eq!(seen.position.load(Ordering::SeqCst), 3_000);
        assert_eq!(
            *seen.message.lock().unwrap(),
            "downloading unet/diffusion_pytorch_model.safetensors (2.9 MiB)"
        );
        assert!(!downloads.should_stop());
        cancel.cancel();
        assert!(downloads.should_stop());
    }
}
