//! Running a rendered shell command on this machine, for a stage here or on a cluster node.
//!
//! A shell stage's processes never outlive it: when the command exits, whatever it left running
//! in the background is killed; on cancellation the whole group gets SIGTERM, then SIGKILL; and
//! if sdpipe itself is killed (even by SIGKILL) the shell gets the parent-death signal and a
//! [`Watchdog`] kills the rest of the group.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sdpipe_stages::api::CancelToken;

use super::watchdog::Watchdog;
use super::{Backoff, ExecError};

/// Run a rendered shell command in `cwd`, its output into `log`.
pub(super) fn run_shell(
    command: &str,
    env: &BTreeMap<String, String>,
    path_env: &BTreeMap<String, PathBuf>,
    outputs: &[PathBuf],
    cwd: &Path,
    log: File,
    cancel: &CancelToken,
) -> Result<(), ExecError> {
    // Outputs may be nested (`reports/summary.txt`): their directories exist before the command.
    for out in outputs {
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent).map_err(ExecError::Spawn)?;
        }
    }
    let (shell, flags): (&str, &[&str]) = if Path::new("/bin/bash").exists() {
        ("/bin/bash", &["-e", "-o", "pipefail", "-c"])
    } else {
        ("/bin/sh", &["-e", "-c"])
    };
    let mut cmd = Command::new(shell);
    cmd.args(flags).arg(command).current_dir(cwd);
    cmd.envs(env).envs(path_env);
    let log_err = log.try_clone().map_err(ExecError::Spawn)?;
    cmd.stdin(Stdio::null()).stdout(log).stderr(log_err);
    // Own process group, so cancellation reaches the whole pipeline of processes; and die with
    // sdpipe if it is killed outright (the watchdog below takes the rest of the group).
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
    let watchdog = match Watchdog::kill_group(pgid) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(
                "no watchdog for the stage's processes (they may outlive a killed sdpipe): {e}"
            );
            None
        }
    };
    let mut pause = Backoff::new(Duration::from_millis(20));
    let outcome = loop {
        if let Some(status) = child.try_wait().map_err(ExecError::Spawn)? {
            break if status.success() {
                Ok(())
            } else if cancel.is_cancelled() {
                Err(ExecError::Cancelled)
            } else {
                Err(ExecError::Exit(describe_status(status)))
            };
        }
        if cancel.is_cancelled() {
            terminate_group(pgid, &mut child);
            break Err(ExecError::Cancelled);
        }
        pause.sleep();
    };
    // Whatever the command left running in the background goes with it: nothing may keep
    // writing into the scratch directory while the outputs are stored.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    if let Some(w) = watchdog {
        w.disarm();
    }
    outcome
}

/// SIGTERM the group, then SIGKILL whatever is left after a grace period.
fn terminate_group(pgid: i32, child: &mut std::process::Child) {
    unsafe { libc::kill(-pgid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut pause = Backoff::new(Duration::from_millis(20));
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            return;
        }
        pause.sleep();
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
