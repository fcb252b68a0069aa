//! The pipeline file: its model (this module), parsing ([`yaml`]), validation into the model
//! ([`validate`]), command-line overrides ([`overrides`]) and command templates ([`template`]).
//!
//! Everything that can be checked without running a stage is checked here, so a bad pipeline
//! fails before anything runs, with every error located at `file:line:column`.

pub mod cycles;
pub mod error;
pub mod nesting;
pub mod overrides;
pub mod remote_settings;
pub mod resources;
pub mod source;
pub mod sweep;
pub mod template;
pub mod validate;
pub mod yaml;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use indexmap::IndexMap;
use sdpipe_stages::api::{OutputKind, Registry, StageKind};
use serde_json::Value as Json;

pub use error::{SpecError, SpecErrors};
pub use source::{SourceFile, Span};

/// A validated pipeline.
pub struct Pipeline {
    /// Absolute path of the pipeline file.
    pub file: PathBuf,
    /// Its directory: relative paths in the file resolve against it.
    pub dir: PathBuf,
    /// The file stem, naming the run directory.
    pub name: String,
    pub source: Arc<SourceFile>,
    pub vars: BTreeMap<String, Json>,
    /// Stages in file order.
    pub stages: IndexMap<String, Stage>,
    /// The shared remote cache (`remote:`) as written; `SDPIPE_REMOTE*` variables override it.
    /// Never part of a key.
    pub remote: Option<remote_settings::RemoteSettings>,
    /// The sweep's points, each with the stage instances that compute it (empty outside a
    /// sweep, where every stage belongs to the one implicit point). What `exp show` makes rows
    /// of.
    pub points: Vec<SweepPoint>,
}

/// One point of a sweep, as run.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepPoint {
    /// `stage.param=value,...`, every swept value of the point.
    pub label: String,
    /// `stage.param` → value.
    pub values: BTreeMap<String, Json>,
    /// The instance of every stage at this point (shared stages and gathering stages too).
    pub instances: Vec<String>,
}

/// What a stage does.
#[derive(Clone)]
pub enum Action {
    /// A shell command (templated), and the host environment variables whose values it may read
    /// (passed through and part of the key).
    Shell { command: String, env: Vec<String> },
    /// A built-in kind from the registry.
    Builtin(Arc<dyn StageKind>),
}

impl Action {
    pub fn kind_name(&self) -> &str {
        match self {
            Action::Shell { .. } => "shell",
            Action::Builtin(kind) => kind.name(),
        }
    }
    pub fn kind_version(&self) -> u32 {
        match self {
            Action::Shell { .. } => SHELL_KIND_VERSION,
            Action::Builtin(kind) => kind.version(),
        }
    }
}

/// Bumped when the way shell stages run changes what they produce.
pub const SHELL_KIND_VERSION: u32 = 1;

/// A binding to an upstream stage's output: `stage.output`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputRef {
    pub stage: String,
    pub output: String,
}

impl std::fmt::Display for InputRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.stage, self.output)
    }
}

/// A file, directory or glob in the project that a stage reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dep {
    /// As written, relative to the pipeline's directory (this, not an absolute path, goes in
    /// the key so moving the project keeps its cache).
    pub pattern: String,
    pub is_glob: bool,
}

impl Dep {
    pub fn new(pattern: &str) -> Self {
        Dep { pattern: pattern.to_string(), is_glob: crate::hash::is_glob(pattern) }
    }
}

/// One declared output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub name: String,
    /// Relative path inside the stage's output directory.
    pub path: String,
    /// Known for built-in kinds; inferred from what a shell command wrote.
    pub kind: Option<OutputKind>,
}

/// A validated stage.
#[derive(Clone)]
pub struct Stage {
    pub name: String,
    pub action: Action,
    /// Fully resolved parameters, defaults included (canonical JSON).
    pub params: BTreeMap<String, Json>,
    /// Input name → upstream output.
    pub inputs: BTreeMap<String, InputRef>,
    /// Dependency name → project path or glob.
    pub deps: BTreeMap<String, Dep>,
    pub outputs: Vec<Output>,
    /// Threads the stage will use (scheduler slots).
    pub threads: usize,
    /// Where the stage is defined (its name in the file).
    pub span: Span,
    /// `gather: true`: in a sweep, receive every point's instance of a swept input.
    pub gather: bool,
    /// For a gathering stage in a sweep: input name → one binding per point (each an entry of
    /// `inputs` under the name `input@label`).
    pub gathered: BTreeMap<String, Vec<GatherBinding>>,
    /// The sweep point this instance belongs to (`None` outside a sweep or when the stage is
    /// the same at every point).
    pub point: Option<StagePoint>,
    /// Where the stage runs (`executor:`, the pipeline's unless the stage sets its own).
    pub executor: resources::ExecutorChoice,
    /// What it asks a cluster for (`resources:`, the pipeline's overlaid with the stage's).
    pub resources: resources::Resources,
    /// Where a built-in kind computes (`device:`, the pipeline's unless the stage sets its own;
    /// `auto` by default). Not in the key, like `executor:`.
    pub device: sdpipe_stages::device::DeviceChoice,
}

/// Which sweep point a stage instance computes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StagePoint {
    /// The swept values that reach the stage, e.g. `learning_rate=3e-05`.
    pub label: String,
    /// `stage.param` → value.
    pub values: BTreeMap<String, Json>,
}

/// One point's binding of a gathered input.
#[derive(Debug, Clone, PartialEq)]
pub struct GatherBinding {
    pub label: String,
    pub values: BTreeMap<String, Json>,
    /// The entry of `Stage::inputs` holding the binding.
    pub input: String,
}

impl Stage {
    pub fn output(&self, name: &str) -> Option<&Output> {
        self.outputs.iter().find(|o| o.name == name)
    }
    pub fn upstream(&self) -> impl Iterator<Item = &str> {
        let mut names: Vec<&str> = self.inputs.values().map(|i| i.stage.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names.into_iter()
    }
}

impl Pipeline {
    /// Read, parse and validate a pipeline file with `overrides` (`--set`) applied.
    pub fn load(
        path: &Path,
        registry: &Registry,
        overrides: &[overrides::Override],
    ) -> Result<Pipeline, SpecErrors> {
        let bytes = std::fs::read(path).map_err(|e| {
            SpecError::unlocated(format!("cannot read pipeline {}: {e}", path.display()))
        })?;
        // Say where the bad bytes are: "stream did not contain valid UTF-8" alone leaves the
        // user searching the whole file.
        let text = String::from_utf8(bytes).map_err(|e| {
            let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let line = valid.iter().filter(|b| **b == b'\n').count() + 1;
            let line_start = valid.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            let column = String::from_utf8_lossy(&valid[line_start..]).chars().count() + 1;
            SpecError::unlocated(format!(
                "{}:{line}:{column}: the pipeline is not UTF-8 text (invalid byte 0x{:02x})",
                path.display(),
                e.as_bytes()[valid.len()]
            ))
            .help("save the file as UTF-8")
        })?;
        let file = std::path::absolute(path)
            .map_err(|e| SpecError::unlocated(format!("cannot resolve {}: {e}", path.display())))?;
        Self::from_source(&file, path.display().to_string(), text, registry, overrides)
    }

    /// Validate pipeline text as if it were the file at `file` (shown as `display_name`).
    pub fn from_source(
        file: &Path,
        display_name: String,
        text: String,
        registry: &Registry,
        overrides: &[overrides::Override],
    ) -> Result<Pipeline, SpecErrors> {
        let source = Arc::new(SourceFile::new(display_name, text));
        let parse = || {
            yaml::parse(source.clone())
                .map_err(|e| SpecError::at(&source, e.span, e.message).label("syntax error"))
        };
        let doc = parse()?;
        let file_points = sweep::parse(&doc)?;
        let cli_axes: Vec<sweep::Axis> = overrides
            .iter()
            .filter(|o| !o.values.is_empty())
            .map(|o| sweep::Axis { target: o.path.join("."), values: o.values.clone() })
            .collect();
        // The pipeline as written (first values of command-line axes): its errors are reported
        // once, not once per point.
        let base = validate::validate(file, doc, registry, overrides)?;
        if file_points.is_none() && cli_axes.is_empty() {
            return Ok(base);
        }
        let points = sweep::with_cli_axes(file_points, &cli_axes);
        // Every point is validated and becomes stage instances: refuse an accidental explosion
        // (six axes of ten values) before doing that work.
        if points.len() > sweep::MAX_POINTS {
            return Err(SpecError::unlocated(format!(
                "the sweep has more than the {} points sdpipe runs at once; use `random` with a \
                 `count`, or fewer values",
                sweep::MAX_POINTS
            ))
            .into());
        }
        let mut variants = Vec::with_capacity(points.len());
        let mut errors = Vec::new();
        for point in &points {
            let mut point_overrides: Vec<_> =
                overrides.iter().filter(|o| o.values.is_empty()).cloned().collect();
            point_overrides.extend(point.overrides());
            match validate::validate(file, parse()?, registry, &point_overrides) {
                Ok(p) => variants.push(p),
                Err(SpecErrors(es)) => errors.extend(es.into_iter().map(|mut e| {
                    e.message = format!("sweep point {}: {}", point.describe(), e.message);
                    e
                })),
            }
        }
        if !errors.is_empty() {
            return Err(SpecErrors(errors));
        }
        sweep::merge(base, &points, variants)
    }

    /// Stage names that (transitively) feed `targets`, the targets included, in file order.
    pub fn with_upstream(&self, targets: &[String]) -> Vec<String> {
        let mut wanted: std::collections::BTreeSet<String> = Default::default();
        let mut stack: Vec<String> = targets.to_vec();
        while let Some(name) = stack.pop() {
            if let Some(stage) = self.stages.get(&name) {
                if wanted.insert(name.clone()) {
                    stack.extend(stage.upstream().map(str::to_string));
                }
            }
        }
        self.stages.keys().filter(|k| wanted.contains(*k)).cloned().collect()
    }
}
