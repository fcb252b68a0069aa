//! Running a kind outside the engine, for tests: temporary directories for its output, state
//! and downloads, defaults filled in from its schema. Not used by sdpipe itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::api::{
    CancelToken, GatheredInput, NoProgress, Params, Provenance, StageContext, StageError, StageKind,
};
use crate::device::DeviceChoice;

/// The kind's defaults (required parameters left out), overridden by `overrides`.
pub fn params(kind: &dyn StageKind, overrides: &[(&str, Value)]) -> Params {
    let mut params: Params = kind
        .params()
        .into_iter()
        .filter_map(|spec| Some((spec.name.to_string(), spec.default?)))
        .collect();
    for (name, value) in overrides {
        params.insert(name.to_string(), value.clone());
    }
    params
}

/// The device kind tests run on: `SDPIPE_TEST_DEVICE` when set, else the CPU.
pub fn test_device() -> DeviceChoice {
    match std::env::var("SDPIPE_TEST_DEVICE") {
        Ok(text) => {
            DeviceChoice::parse(&text).unwrap_or_else(|e| panic!("SDPIPE_TEST_DEVICE: {e}"))
        }
        Err(_) => DeviceChoice::Cpu,
    }
}

/// Temporary directories and bindings for one or more runs of a kind.
pub struct Harness {
    pub out: tempfile::TempDir,
    pub state: tempfile::TempDir,
    pub downloads: tempfile::TempDir,
    pub inputs: BTreeMap<String, PathBuf>,
    pub paths: BTreeMap<String, PathBuf>,
    pub cancel: CancelToken,
    pub threads: usize,
    /// `SDPIPE_TEST_DEVICE` (e.g. `cuda:0`, as scripts/gpu-check.sh sets it), else the CPU: the
    /// same kind tests run on whatever device a machine offers.
    pub device: DeviceChoice,
    pub gathered: BTreeMap<String, Vec<GatheredInput>>,
    pub provenance: Provenance,
    /// Everything the stage wrote to its log.
    pub log: Vec<u8>,
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness {
    pub fn new() -> Harness {
        Harness {
            out: tempfile::tempdir().expect("tempdir"),
            state: tempfile::tempdir().expect("tempdir"),
            downloads: tempfile::tempdir().expect("tempdir"),
            inputs: BTreeMap::new(),
            paths: BTreeMap::new(),
            cancel: CancelToken::new(),
            threads: 1,
            device: test_device(),
            gathered: BTreeMap::new(),
            provenance: Provenance::default(),
            log: Vec::new(),
        }
    }

    pub fn input(mut self, name: &str, path: impl Into<PathBuf>) -> Self {
        self.inputs.insert(name.to_string(), path.into());
        self
    }

    /// Bind a gathered input: one path per sweep point `(label, values, path)`.
    pub fn gathered(mut self, name: &str, points: Vec<GatheredInput>) -> Self {
        self.gathered.insert(name.to_string(), points);
        self
    }

    /// The provenance as the engine would pass it, from its JSON form (`{"stages": [...]}`).
    pub fn provenance(mut self, provenance: Value) -> Self {
        self.provenance =
            serde_json::from_value(provenance).expect("a provenance in the engine's shape");
        self
    }

    pub fn path(mut self, name: &str, path: impl Into<PathBuf>) -> Self {
        self.paths.insert(name.to_string(), path.into());
        self
    }

    /// Run the kind once into `self.out` (which must be empty for a faithful run).
    pub fn run(&mut self, kind: &dyn StageKind, params: &Params) -> Result<(), StageError> {
        let mut ctx = StageContext {
            stage: "test",
            params,
            inputs: &self.inputs,
            paths: &self.paths,
            out_dir: self.out.path(),
            state_dir: self.state.path(),
            downloads: self.downloads.path(),
            threads: self.threads,
            device: self.device,
            log: &mut self.log,
            progress: &NoProgress,
            cancel: &self.cancel,
            gathered: &self.gathered,
            provenance: &self.provenance,
        };
        kind.run(&mut ctx)
    }

    pub fn out_dir(&self) -> &Path {
        self.out.path()
    }

    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&self.log).into_owned()
    }
}
