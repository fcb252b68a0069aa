//! Cleanup that happens even when sdpipe is killed outright.
//!
//! A [`Watchdog`] is a tiny `sh` process holding the read end of a pipe whose only write end
//! is in sdpipe (close-on-exec, so no stage command inherits it). When sdpipe lets go of the
//! write end — by dropping the watchdog, or by dying in any way, SIGKILL included, since the
//! kernel then closes its descriptors — the shell reads end-of-file and runs its action: kill a
//! stage's process group, cancel a Slurm job. [`Watchdog::disarm`] ends it without acting.
//!
//! Why this and not `PR_SET_PDEATHSIG` alone: the death signal reaches only the direct child
//! (the stage's shell), not the processes it started in the background. Why not a re-executed
//! `sdpipe` supervisor as subreaper: it would have to own the stage's output and exit status
//! and outlive sdpipe by design, for one extra guarantee (catching processes that leave the
//! process group with `setsid`), while a pipe and `kill` cover pipelines, subshells and `&`
//! jobs in a few lines. The watchdog runs in its own process group, so a Ctrl-C at the terminal
//! (delivered to sdpipe's group) does not kill it before it has done its job.

use std::io::{self, PipeWriter, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The shell's loop: any line but `disarm` is ignored; end-of-file runs the action.
const PRELUDE: &str =
    "trap '' INT HUP TERM QUIT; while read -r line; do [ \"$line\" = disarm ] && exit 0; done; ";

pub struct Watchdog {
    child: Child,
    writer: Option<PipeWriter>,
}

impl Watchdog {
    /// Start a watchdog that runs the `sh` snippet `action` (its arguments are `$1`...) once
    /// this process lets go of it.
    pub fn spawn(action: &str, args: &[&str]) -> io::Result<Watchdog> {
        let (reader, writer) = io::pipe()?;
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(format!("{PRELUDE}{action}")).arg("sdpipe-watchdog").args(args);
        cmd.stdin(reader).stdout(Stdio::null()).stderr(Stdio::null());
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let child = cmd.spawn()?;
        Ok(Watchdog { child, writer: Some(writer) })
    }

    /// A watchdog that SIGKILLs process group `pgid`.
    pub fn kill_group(pgid: i32) -> io::Result<Watchdog> {
        Watchdog::spawn("kill -s KILL -- \"-$1\" 2>/dev/null", &[&pgid.to_string()])
    }

    /// End the watchdog without running its action.
    pub fn disarm(mut self) {
        if let Some(mut w) = self.writer.take() {
            let _ = w.write_all(b"disarm\n");
        }
        self.reap();
    }

    /// Wait briefly for the shell to exit (its action is quick: `kill`, `scancel`); a hung one is
    /// left behind rather than hanging the run.
    fn reap(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut pause = super::Backoff::new(Duration::from_millis(5));
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            pause.sleep();
        }
    }
}

impl Drop for Watchdog {
    /// Run the action now (closing the pipe) and wait for it.
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            self.reap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_for(path: &std::path::Path) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if path.exists() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn dropping_the_watchdog_runs_its_action() {
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("fired");
        let dog = Watchdog::spawn("touch \"$1\"", &[flag.to_str().unwrap()]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!flag.exists(), "fired while armed");
        drop(dog);
        assert!(wait_for(&flag), "did not fire when dropped");
    }

    #[test]
    fn a_disarmed_watchdog_does_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("fired");
        let dog = Watchdog::spawn("touch \"$1\"", &[flag.to_str().unwrap()]).unwrap();
        dog.disarm();
        std::thread::sleep(Duration::from_millis(100));
        assert!(!flag.exists(), "a disarmed watchdog acted");
    }
}
