//! Executing one stage invocation: a shell command or a built-in kind, in a prepared scratch
//! directory. The scheduler decides *what* runs and stores results; an executor only runs.
//! A cluster executor (Slurm) implements the same trait later.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sdpipe_stages::api::{CancelToken, GatheredInput, Params, Progress, StageContext, StageError};
use serde_json::Value as Json;

use crate::spec::template::{self, Namespace};
use crate::spec::{Action, Stage};

/// Everything needed to run one stage, with every path already resolved.
pub struct Job<'a> {
    pub stage: &'a Stage,
    pub vars: &'a BTreeMap<String, Json>,
    pub params: &'a Params,
    /// Input name → path of its read-only view in scratch.
    pub inputs: BTreeMap<String, PathBuf>,
    /// The stage's provenance for kinds that want it (`Null` otherwise).
    pub provenance: Json,
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
}

pub trait Executor: Send + Sync {
    fn execute(&self, job: Job<'_>) -> Result<(), ExecError>;
}

/// Runs stages on this machine.
#[derive(Default)]
pub struct LocalExecutor;

impl Executor for LocalExecutor {
    fn execute(&self, job: Job<'_>) -> Result<(), ExecError> {
        match &job.stage.action {
            Action::Shell { command, .. } => run_shell(command, job),
            Action::Builtin(kind) => {
                let kind = kind.clone();
                let mut log = job.log;
                let paths: BTreeMap<String, PathBuf> = job
                    .deps
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.first()?.clone())))
                    .collect();
                // A gathered input reaches the kind once per point, not under `input@label`.
                let mut inputs = job.inputs.clone();
                let mut gathered: BTreeMap<String, Vec<GatheredInput>> = BTreeMap::new();
                for (name, bindings) in &job.stage.gathered {
                    let points = bindings
                        .iter()
                        .filter_map(|b| {
                            Some(GatheredInput {
                                label: b.label.clone(),
                                values: b.values.clone(),
                                path: inputs.remove(&b.input)?,
                            })
                        })
                        .collect();
                    gathered.insert(name.clone(), points);
                }
                let mut ctx = StageContext {
                    stage: &job.stage.name,
                    params: job.params,
                    inputs: &inputs,
                    paths: &paths,
                    out_dir: &job.out_dir,
                    state_dir: &job.state_dir,
                    downloads: &job.downloads_dir,
                    threads: job.threads,
                    log: &mut log,
                    progress: job.progress,
                    cancel: job.cancel,
                    gathered: &gathered,
                    provenance: &job.provenance,
                };
                // Keep the kind's thread pools within the granted threads.
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(job.threads)
                    .build()
                    .map_err(|e| ExecError::Stage(StageError::failed(e.to_string())))?;
                let result = pool.install(|| {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| kind.run(&mut ctx)))
                });
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

fn run_shell(command: &str, job: Job<'_>) -> Result<(), ExecError> {
    let rendered = render_command(command, &job).map_err(ExecError::Template)?;
    // Outputs may be nested (`reports/summary.txt`): their directories exist before the command.
    for out in &job.stage.outputs {
        if let Some(parent) = job.out_dir.join(&out.path).parent() {
            std::fs::create_dir_all(parent).map_err(ExecError::Spawn)?;
        }
    }
    let (shell, flags): (&str, &[&str]) = if Path::new("/bin/bash").exists() {
        ("/bin/bash", &["-e", "-o", "pipefail", "-c"])
    } else {
        ("/bin/sh", &["-e", "-c"])
    };
    let mut cmd = Command::new(shell);
    cmd.args(flags).arg(&rendered).current_dir(&job.out_dir);
    cmd.env("SDPIPE_STAGE", &job.stage.name)
        .env("SDPIPE_THREADS", job.threads.to_string())
        .env("SDPIPE_PROJECT", job.project_dir)
        .env("SDPIPE_STATE_DIR", &job.state_dir)
        // Common thread-count knobs, so tools the command calls respect the granted threads.
        .env("OMP_NUM_THREADS", job.threads.to_string())
        .env("RAYON_NUM_THREADS", job.threads.to_string());
    for (name, value) in job.params {
        cmd.env(format!("SDPIPE_PARAM_{}", env_name(name)), template::plain_text(value));
    }
    for (name, path) in &job.inputs {
        cmd.env(format!("SDPIPE_IN_{}", env_name(name)), path);
    }
    for (name, paths) in &job.deps {
        let joined: Vec<String> = paths.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        cmd.env(format!("SDPIPE_DEP_{}", env_name(name)), joined.join("\n"));
    }
    for out in &job.stage.outputs {
        cmd.env(format!("SDPIPE_OUT_{}", env_name(&out.name)), job.out_dir.join(&out.path));
    }
    let log_err = job.log.try_clone().map_err(ExecError::Spawn)?;
    cmd.stdin(Stdio::null()).stdout(job.log).stderr(log_err);
    // Own process group, so cancellation reaches the whole pipeline of processes; and die with
    // sdpipe if it is killed outright, so no orphan keeps writing into the scratch directory.
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        #[cfg(target_os = "linux")]
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().map_err(ExecError::Spawn)?;
    let pgid = child.id() as i32;
    loop {
        if let Some(status) = child.try_wait().map_err(ExecError::Spawn)? {
            return if status.success() {
                Ok(())
            } else if job.cancel.is_cancelled() {
                Err(ExecError::Cancelled)
            } else {
                Err(ExecError::Exit(describe_status(status)))
            };
        }
        if job.cancel.is_cancelled() {
            terminate_group(pgid, &mut child);
            return Err(ExecError::Cancelled);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM the group, then SIGKILL whatever is left after a grace period.
fn terminate_group(pgid: i32, child: &mut std::process::Child) {
    unsafe { libc::kill(-pgid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let _ = child.wait();
}

fn describe_status(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("status {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => status.to_string(),
    }
}
