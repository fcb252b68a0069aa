//! A stage invocation as plain data ([`NodeJob`]): what the scheduler's [`Job`] becomes once its
//! command is rendered and its environment and paths are resolved. It runs here
//! ([`LocalExecutor`](super::LocalExecutor)) or is written to a file and run on a cluster node by
//! `sdpipe exec-stage` ([`exec_stage_main`](super::exec_stage_main)), through the same [`NodeJob::run`]: a stage does
//! the same work wherever it runs.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sdpipe_stages::api::{
    CancelToken, GatheredInput, Params, Progress, Provenance, StageContext, StageError, StageKind,
};
use sdpipe_stages::device::DeviceChoice;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{env_name, render_command, shell, ExecError, Job};
use crate::spec::template;
use crate::spec::Action;

/// Bumped when the job file's meaning changes: a node running another sdpipe version refuses a
/// file it would misread.
pub const NODE_JOB_SCHEMA: u32 = 2;

/// One stage invocation, every path absolute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeJob {
    pub schema: u32,
    /// The stage's name, for messages.
    pub stage: String,
    pub work: Work,
    /// Where outputs are written (the scratch directory's `out/`).
    pub out_dir: PathBuf,
    pub state_dir: PathBuf,
    pub downloads_dir: PathBuf,
    /// Threads the stage is granted.
    pub threads: usize,
    /// Where a kind computes (`device:`); shell commands see it as `SDPIPE_DEVICE`.
    pub device: DeviceChoice,
}

/// What the stage does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Work {
    /// A shell command, run by bash (or sh) in `out_dir`.
    Shell {
        /// The command with every `${ns.name}` substituted and quoted.
        command: String,
        /// Environment variables with text values (`SDPIPE_PARAM_*`, thread counts).
        env: BTreeMap<String, String>,
        /// Environment variables holding paths (`SDPIPE_IN_*`, `SDPIPE_OUT_*`, ...).
        path_env: BTreeMap<String, PathBuf>,
        /// Declared outputs: their parent directories exist before the command runs.
        outputs: Vec<PathBuf>,
    },
    /// A built-in kind, looked up by name (and checked by version) where it runs.
    Kind {
        kind: String,
        version: u32,
        params: Params,
        inputs: BTreeMap<String, PathBuf>,
        /// Path parameter name → absolute path in the project.
        paths: BTreeMap<String, PathBuf>,
        gathered: BTreeMap<String, Vec<NodeGathered>>,
        provenance: Option<Provenance>,
    },
}

/// One sweep point's binding of a gathered input (`GatheredInput`, as data).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeGathered {
    pub label: String,
    pub values: BTreeMap<String, Json>,
    pub path: PathBuf,
}

/// How a run on a node ended, written by `sdpipe exec-stage` for the submitting process. Its
/// presence is what tells a finished command (success or failure, never retried) from a job
/// that died with its node (retried).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeResult {
    pub ok: bool,
    #[serde(default)]
    pub cancelled: bool,
    #[serde(default)]
    pub error: Option<String>,
}

impl NodeResult {
    pub fn of(result: &Result<(), ExecError>) -> NodeResult {
        match result {
            Ok(()) => NodeResult { ok: true, cancelled: false, error: None },
            Err(ExecError::Cancelled) => {
                NodeResult { ok: false, cancelled: true, error: Some("cancelled".into()) }
            }
            Err(e) => NodeResult { ok: false, cancelled: false, error: Some(e.to_string()) },
        }
    }

    /// Write atomically: a reader never sees half a result.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, path)
    }

    pub fn read(path: &Path) -> Option<NodeResult> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }
}

impl NodeJob {
    /// Resolve a scheduler job: render the command, collect the environment.
    pub fn from_job(job: &Job<'_>) -> Result<NodeJob, ExecError> {
        let work = match &job.stage.action {
            Action::Shell { command, .. } => {
                let rendered = render_command(command, job).map_err(ExecError::Template)?;
                let threads = job.threads.to_string();
                let mut env = BTreeMap::from([
                    ("SDPIPE_STAGE".to_string(), job.stage.name.clone()),
                    ("SDPIPE_THREADS".to_string(), threads.clone()),
                    // Common thread-count knobs, so tools the command calls respect the grant.
                    ("OMP_NUM_THREADS".to_string(), threads.clone()),
                    ("RAYON_NUM_THREADS".to_string(), threads),
                    ("SDPIPE_DEVICE".to_string(), job.stage.device.to_string()),
                ]);
                for (name, value) in job.params {
                    env.insert(
                        format!("SDPIPE_PARAM_{}", env_name(name)),
                        template::plain_text(value),
                    );
                }
                let mut path_env = BTreeMap::from([
                    ("SDPIPE_PROJECT".to_string(), job.project_dir.to_path_buf()),
                    ("SDPIPE_STATE_DIR".to_string(), job.state_dir.clone()),
                ]);
                for (name, path) in &job.inputs {
                    path_env.insert(format!("SDPIPE_IN_{}", env_name(name)), path.clone());
                }
                for (name, paths) in &job.deps {
                    let joined: Vec<String> =
                        paths.iter().map(|p| p.to_string_lossy().into_owned()).collect();
                    path_env
                        .insert(format!("SDPIPE_DEP_{}", env_name(name)), joined.join("\n").into());
                }
                let mut outputs = Vec::new();
                for out in &job.stage.outputs {
                    let path = job.out_dir.join(&out.path);
                    path_env.insert(format!("SDPIPE_OUT_{}", env_name(&out.name)), path.clone());
                    outputs.push(path);
                }
                Work::Shell { command: rendered, env, path_env, outputs }
            }
            Action::Builtin(kind) => {
                let paths: BTreeMap<String, PathBuf> = job
                    .deps
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.first()?.clone())))
                    .collect();
                // A gathered input reaches the kind once per point, not under `input@label`.
                let mut inputs = job.inputs.clone();
                let mut gathered = BTreeMap::new();
                for (name, bindings) in &job.stage.gathered {
                    let points = bindings
                        .iter()
                        .filter_map(|b| {
                            Some(NodeGathered {
                                label: b.label.clone(),
                                values: b.values.clone(),
                                path: inputs.remove(&b.input)?,
                            })
                        })
                        .collect();
                    gathered.insert(name.clone(), points);
                }
                Work::Kind {
                    kind: kind.name().to_string(),
                    version: kind.version(),
                    params: job.params.clone(),
                    inputs,
                    paths,
                    gathered,
                    provenance: job.provenance.clone(),
                }
            }
        };
        Ok(NodeJob {
            schema: NODE_JOB_SCHEMA,
            stage: job.stage.name.clone(),
            work,
            out_dir: job.out_dir.clone(),
            state_dir: job.state_dir.clone(),
            downloads_dir: job.downloads_dir.clone(),
            threads: job.threads,
            device: job.stage.device,
        })
    }

    /// Run here. `resolve` finds a kind by name (the stage's own kind locally, the binary's
    /// registry on a node).
    pub fn run(
        &self,
        resolve: &dyn Fn(&str) -> Option<Arc<dyn StageKind>>,
        log: File,
        progress: &dyn Progress,
        cancel: &CancelToken,
    ) -> Result<(), ExecError> {
        match &self.work {
            Work::Shell { command, env, path_env, outputs } => {
                shell::run_shell(command, env, path_env, outputs, &self.out_dir, log, cancel)
            }
            Work::Kind { kind: name, version, .. } => {
                let kind = resolve(name).ok_or_else(|| {
                    ExecError::Cluster(format!(
                        "this sdpipe binary has no stage kind `{name}`: run the same sdpipe \
                         version on the nodes as where the pipeline was started"
                    ))
                })?;
                if kind.version() != *version {
                    return Err(ExecError::Cluster(format!(
                        "stage kind `{name}` is version {} in this sdpipe binary but version \
                         {version} where the pipeline was started: run the same sdpipe on the \
                         nodes",
                        kind.version()
                    )));
                }
                run_kind(self, &kind, log, progress, cancel)
            }
        }
    }
}

/// Run a built-in kind with the job's context.
fn run_kind(
    job: &NodeJob,
    kind: &Arc<dyn StageKind>,
    mut log: File,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<(), ExecError> {
    let Work::Kind { params, inputs, paths, gathered, provenance, .. } = &job.work else {
        unreachable!("run_kind is called for kinds only");
    };
    let gathered: BTreeMap<String, Vec<GatheredInput>> = gathered
        .iter()
        .map(|(name, points)| {
            let points = points
                .iter()
                .map(|p| GatheredInput {
                    label: p.label.clone(),
                    values: p.values.clone(),
                    path: p.path.clone(),
                })
                .collect();
            (name.clone(), points)
        })
        .collect();
    let empty = Provenance::default();
    let mut ctx = StageContext {
        stage: &job.stage,
        params,
        inputs,
        paths,
        out_dir: &job.out_dir,
        state_dir: &job.state_dir,
        downloads: &job.downloads_dir,
        threads: job.threads,
        device: job.device,
        log: &mut log,
        progress,
        cancel,
        gathered: &gathered,
        provenance: provenance.as_ref().unwrap_or(&empty),
    };
    // Keep the kind's thread pools within the granted threads.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(job.threads)
        .build()
        .map_err(|e| ExecError::Stage(StageError::caused(e)))?;
    let result = pool
        .install(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| kind.run(&mut ctx))));
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(StageError::Cancelled)) => Err(ExecError::Cancelled),
        Ok(Err(e)) => Err(ExecError::Stage(e)),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            let _ = writeln!(log, "panic: {msg}");
            Err(ExecError::Panic(msg))
        }
    }
}
