//! Executing one stage invocation: a shell command or a built-in kind, in a prepared scratch
//! directory. The scheduler decides *what* runs and stores results; an executor only runs.
//!
//! Every executor turns the scheduler's [`Job`] into a [`NodeJob`] (the command rendered, the
//! environment and paths resolved, plain data that can be written to a file) and runs it with
//! [`NodeJob::run`]: [`LocalExecutor`] does so in this process; [`SlurmExecutor`] writes it next
//! to a batch script, and the node runs it through `sdpipe exec-stage`. So a stage computes the
//! same thing wherever it runs. [`Dispatch`] picks the executor each stage asks for.

mod exec_stage;
mod local;
mod node;
mod shell;
pub mod slurm;
mod watchdog;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sdpipe_stages::api::{CancelToken, Params, Progress, StageError};
use serde_json::Value as Json;

pub use exec_stage::exec_stage_main;
pub use local::LocalExecutor;
pub use node::{NodeGathered, NodeJob, NodeResult, Work};
pub use slurm::SlurmExecutor;

use crate::spec::resources::ExecutorChoice;
use crate::spec::template::{self, Namespace};
use crate::spec::Stage;

/// Everything needed to run one stage, with every path already resolved.
pub struct Job<'a> {
    pub stage: &'a Stage,
    pub vars: &'a BTreeMap<String, Json>,
    pub params: &'a Params,
    /// Input name → path of its read-only view in scratch.
    pub inputs: BTreeMap<String, PathBuf>,
    /// The stage's provenance for kinds that want it (`None` otherwise).
    pub provenance: Option<sdpipe_stages::api::Provenance>,
    /// Dependency name → absolute paths (one for files and directories, the matches for globs).
    pub deps: BTreeMap<String, Vec<PathBuf>>,
    /// The project directory (the pipeline's directory), offered to shell commands.
    pub project_dir: &'a Path,
    pub out_dir: PathBuf,
    pub state_dir: PathBuf,
    /// The kind's shared download cache (see `StageContext::downloads`).
    pub downloads_dir: PathBuf,
    pub log: File,
    pub threads: usize,
    pub cancel: &'a CancelToken,
    pub progress: &'a dyn Progress,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("command exited with {0}")]
    Exit(String),
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Stage(#[from] StageError),
    #[error("could not start the command: {0}")]
    Spawn(std::io::Error),
    #[error("{0}")]
    Template(String),
    #[error("stage panicked: {0}")]
    Panic(String),
    /// The cluster could not run the job (submission refused, node lost past the retry limit).
    #[error("{0}")]
    Cluster(String),
}

pub trait Executor: Send + Sync {
    fn execute(&self, job: Job<'_>) -> Result<(), ExecError>;
}

/// Runs each stage with the executor it asks for (`executor:` in the pipeline).
#[derive(Default)]
pub struct Dispatch {
    pub local: LocalExecutor,
    pub slurm: SlurmExecutor,
}

impl Executor for Dispatch {
    fn execute(&self, job: Job<'_>) -> Result<(), ExecError> {
        match job.stage.executor {
            ExecutorChoice::Local => self.local.execute(job),
            ExecutorChoice::Slurm => self.slurm.execute(job),
        }
    }
}

/// Environment variable suffix for a name: `my-param` → `MY_PARAM`.
fn env_name(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' })
        .collect()
}

fn quote_paths(paths: &[PathBuf]) -> Result<String, String> {
    let words: Result<Vec<String>, String> =
        paths.iter().map(|p| template::quote_word(&p.to_string_lossy())).collect();
    Ok(words?.join(" "))
}

/// The command with every `${ns.name}` replaced by its quoted value.
pub fn render_command(command: &str, job: &Job<'_>) -> Result<String, String> {
    template::render(command, |ns, name| {
        let missing = || format!("`${{{}.{name}}}` is not defined", ns.as_str());
        match ns {
            Namespace::Params => template::quote_value(job.params.get(name).ok_or_else(missing)?),
            Namespace::Vars => template::quote_value(job.vars.get(name).ok_or_else(missing)?),
            Namespace::Deps => quote_paths(job.deps.get(name).ok_or_else(missing)?),
            Namespace::Inputs => {
                quote_paths(std::slice::from_ref(job.inputs.get(name).ok_or_else(missing)?))
            }
            Namespace::Outs => {
                let out = job.stage.output(name).ok_or_else(missing)?;
                template::quote_word(&job.out_dir.join(&out.path).to_string_lossy())
            }
        }
    })
}

/// The pauses between checks on a child process: 1 ms, doubling up to `max`. A quick command
/// (most shell stages) is noticed within a millisecond or two instead of a whole fixed interval,
/// and a long one is still checked only every `max`.
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(max: Duration) -> Backoff {
        Backoff { next: Duration::from_millis(1).min(max), max }
    }

    pub(crate) fn sleep(&mut self) {
        std::thread::sleep(self.next);
        self.next = (self.next * 2).min(self.max);
    }
}
