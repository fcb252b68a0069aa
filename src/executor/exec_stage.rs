//! `sdpipe exec-stage`: the entry point a cluster node runs, reading a job file written by a
//! cluster executor and running it through the same [`NodeJob::run`] as a local stage.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use sdpipe_stages::api::{CancelToken, NoProgress, Registry};

use super::node::{NodeJob, NodeResult, NODE_JOB_SCHEMA};
use super::ExecError;

/// `sdpipe exec-stage JOB RESULT`: run a job file on this machine (a cluster node) and write
/// how it ended to `RESULT`. The job's log is this process's stdout and stderr (the batch
/// system's output file). Returns the exit code: 0 done, 1 failed, 130 cancelled (SIGTERM from
/// `scancel`), 2 unreadable job file.
pub fn exec_stage_main(job_file: &Path, result_file: &Path, registry: &Registry) -> i32 {
    let job: NodeJob = match std::fs::read(job_file)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(job) => job,
        Err(e) => {
            let message = format!("cannot read the job file {}: {e}", job_file.display());
            eprintln!("sdpipe exec-stage: {message}");
            let _ =
                NodeResult { ok: false, cancelled: false, error: Some(message) }.write(result_file);
            return 2;
        }
    };
    if job.schema != NODE_JOB_SCHEMA {
        let message = format!(
            "the job file {} has format {} but this sdpipe reads format {NODE_JOB_SCHEMA}: run \
             the same sdpipe version on the nodes",
            job_file.display(),
            job.schema
        );
        eprintln!("sdpipe exec-stage: {message}");
        let _ = NodeResult { ok: false, cancelled: false, error: Some(message) }.write(result_file);
        return 2;
    }
    // `scancel` sends SIGTERM (then SIGKILL after the cluster's KillWait): stop the stage as
    // Ctrl-C does locally, so its command's whole process group goes too.
    let cancel = CancelToken::new();
    let token = cancel.clone();
    let _ = ctrlc::set_handler(move || token.cancel());
    // The submitting process's budget (inherited through sbatch) is not this node's grant.
    std::env::set_var("CANDLE_NUM_THREADS", job.threads.to_string());
    let log = match stdout_file() {
        Ok(f) => f,
        Err(e) => {
            let message = format!("cannot use stdout as the stage log: {e}");
            let _ =
                NodeResult { ok: false, cancelled: false, error: Some(message) }.write(result_file);
            return 1;
        }
    };
    let resolve = |name: &str| registry.get(name);
    eprintln!("sdpipe exec-stage: stage `{}` on {}", job.stage, hostname());
    let result = job.run(&resolve, log, &NoProgress, &cancel);
    let outcome = NodeResult::of(&result);
    if let Some(e) = &outcome.error {
        eprintln!("sdpipe exec-stage: stage `{}` failed: {e}", job.stage);
    }
    let _ = std::io::stderr().flush();
    if let Err(e) = outcome.write(result_file) {
        eprintln!("sdpipe exec-stage: cannot write {}: {e}", result_file.display());
        return 1;
    }
    match result {
        Ok(()) => 0,
        Err(ExecError::Cancelled) => 130,
        Err(_) => 1,
    }
}

/// This process's stdout as a `File` (a batch job's stdout is its output file).
fn stdout_file() -> std::io::Result<File> {
    use std::os::fd::AsFd;
    Ok(File::from(std::io::stdout().as_fd().try_clone_to_owned()?))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "this node".into())
}
