//! Running a stage as a Slurm batch job.
//!
//! The scheduler has already checked the cache and prepared the scratch directory; this
//! executor writes the stage as a job file ([`NodeJob`]) and a batch script into
//! `<scratch>/slurm/`, submits the script with `sbatch --parsable`, follows the job with
//! `squeue` (then `sacct`, or `scontrol show job` where accounting is off), copies the job's
//! output file into the stage's log as it grows, and returns when the job has ended. On the node
//! the script runs `sdpipe exec-stage`, which runs the stage through the same code as a local
//! run and writes its outputs into the scratch `out/`; the scheduler then stores them as for a
//! local run. **The cache directory must be on a filesystem the nodes share, at the same path**,
//! and the `sdpipe` binary must be reachable there too (`SDPIPE_SLURM_BINARY`).
//!
//! A job that ends with its node (`NODE_FAIL`, `BOOT_FAIL`, `PREEMPTED`) is submitted again,
//! up to `SDPIPE_SLURM_RETRIES` more times (default 2): the node writes a result file when the
//! stage itself finished, so a command that failed is a stage failure and is never retried.
//! Cancellation (Ctrl-C) runs `scancel`; so does a [`Watchdog`] if sdpipe is killed outright,
//! so no job is left running for a result nobody will record.
//!
//! Settings come from the environment: `SDPIPE_SLURM_BINARY` (sdpipe on the nodes; default this
//! executable), `SDPIPE_SLURM_RETRIES`, `SDPIPE_SLURM_POLL_MS` (default 2000) and
//! `SDPIPE_SBATCH_ARGS` (extra `sbatch` flags such as `--account=x --qos=y`, split like a shell).

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sdpipe_stages::api::CancelToken;

use super::node::{NodeJob, NodeResult};
use super::watchdog::Watchdog;
use super::{ExecError, Executor, Job};
use crate::spec::resources::Resources;
use crate::spec::template;

/// How the Slurm executor submits and follows jobs.
#[derive(Debug, Clone)]
pub struct SlurmConfig {
    /// The `sdpipe` executable the nodes run (`None`: unknown, refused at submission).
    pub binary: Option<PathBuf>,
    /// Resubmissions after a node failure.
    pub retries: u32,
    /// How often the job's state and output are polled.
    pub poll: Duration,
    /// Extra `sbatch` arguments (site settings: account, QOS, constraints).
    pub sbatch_args: Vec<String>,
}

impl SlurmConfig {
    pub fn from_env() -> SlurmConfig {
        let number =
            |name: &str| std::env::var(name).ok().and_then(|v| v.trim().parse::<u64>().ok());
        SlurmConfig {
            binary: std::env::var_os("SDPIPE_SLURM_BINARY")
                .map(PathBuf::from)
                .or_else(|| std::env::current_exe().ok()),
            retries: number("SDPIPE_SLURM_RETRIES").map_or(2, |n| n.min(100) as u32),
            poll: Duration::from_millis(number("SDPIPE_SLURM_POLL_MS").unwrap_or(2000).max(50)),
            sbatch_args: std::env::var("SDPIPE_SBATCH_ARGS")
                .ok()
                .and_then(|a| shlex::split(&a))
                .unwrap_or_default(),
        }
    }
}

/// Runs stages as Slurm batch jobs.
pub struct SlurmExecutor {
    pub config: SlurmConfig,
    /// The most CPUs any node has, per partition asked for (`None` key: the default), as
    /// `sinfo` reported them; `None` value: unknown.
    largest_node: std::sync::Mutex<std::collections::HashMap<Option<String>, Option<usize>>>,
}

impl Default for SlurmExecutor {
    fn default() -> Self {
        SlurmExecutor { config: SlurmConfig::from_env(), largest_node: Default::default() }
    }
}

/// The largest CPU count in `sinfo -h -N -o %c` output (one node per line; `64+` style counts
/// of mixed node groups read as their number).
fn largest_cpu_count(sinfo: &str) -> Option<usize> {
    sinfo.lines().filter_map(|l| l.trim().trim_end_matches('+').parse::<usize>().ok()).max()
}

/// A Slurm job state, as `squeue`, `sacct` and `scontrol` spell it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    Pending,
    Running,
    Completing,
    Suspended,
    Requeued,
    Completed,
    Failed,
    Cancelled,
    Timeout,
    NodeFail,
    BootFail,
    Preempted,
    OutOfMemory,
    Deadline,
    Other(String),
}

impl JobState {
    /// Parse a state word (`CANCELLED by 0` and `COMPLETED+` are accepted too).
    pub fn parse(text: &str) -> Option<JobState> {
        let word = text.split_whitespace().next()?.trim_end_matches('+');
        Some(match word {
            "PENDING" | "PD" | "CONFIGURING" | "CF" | "REQUEUE_HOLD" | "RESV_DEL_HOLD" => {
                JobState::Pending
            }
            "RUNNING" | "R" | "SIGNALING" | "STAGE_OUT" | "RESIZING" => JobState::Running,
            "COMPLETING" | "CG" => JobState::Completing,
            "SUSPENDED" | "S" | "STOPPED" | "ST" => JobState::Suspended,
            "REQUEUED" | "RQ" | "REQUEUE_FED" => JobState::Requeued,
            "COMPLETED" | "CD" => JobState::Completed,
            "FAILED" | "F" => JobState::Failed,
            "CANCELLED" | "CA" => JobState::Cancelled,
            "TIMEOUT" | "TO" => JobState::Timeout,
            "NODE_FAIL" | "NF" => JobState::NodeFail,
            "BOOT_FAIL" | "BF" => JobState::BootFail,
            "PREEMPTED" | "PR" => JobState::Preempted,
            "OUT_OF_MEMORY" | "OOM" => JobState::OutOfMemory,
            "DEADLINE" | "DL" => JobState::Deadline,
            "" => return None,
            other => JobState::Other(other.to_string()),
        })
    }

    /// The job has ended and will not run again by itself.
    pub fn is_final(&self) -> bool {
        !matches!(
            self,
            JobState::Pending
                | JobState::Running
                | JobState::Completing
                | JobState::Suspended
                | JobState::Requeued
                | JobState::Other(_)
        )
    }

    /// The job ended because of its node or the scheduler, not because of the stage: worth
    /// submitting again.
    pub fn is_node_failure(&self) -> bool {
        matches!(self, JobState::NodeFail | JobState::BootFail | JobState::Preempted)
    }

    pub fn name(&self) -> &str {
        match self {
            JobState::Pending => "PENDING",
            JobState::Running => "RUNNING",
            JobState::Completing => "COMPLETING",
            JobState::Suspended => "SUSPENDED",
            JobState::Requeued => "REQUEUED",
            JobState::Completed => "COMPLETED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELLED",
            JobState::Timeout => "TIMEOUT",
            JobState::NodeFail => "NODE_FAIL",
            JobState::BootFail => "BOOT_FAIL",
            JobState::Preempted => "PREEMPTED",
            JobState::OutOfMemory => "OUT_OF_MEMORY",
            JobState::Deadline => "DEADLINE",
            JobState::Other(s) => s,
        }
    }
}

/// The job id printed by `sbatch --parsable` (`123`, or `123;cluster` on a federation).
pub fn parse_sbatch_id(stdout: &str) -> Option<String> {
    let first = stdout.lines().map(str::trim).find(|l| !l.is_empty())?;
    let id = first.split(';').next()?.trim();
    (!id.is_empty() && id.chars().all(|c| c.is_ascii_digit())).then(|| id.to_string())
}

/// The state and pending reason in `squeue -h -o '%T %r'` output (`None`: the job is not in
/// the queue any more).
pub fn parse_squeue(stdout: &str) -> Option<(JobState, Option<String>)> {
    stdout.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        let state = JobState::parse(words.next()?)?;
        let reason = words.next().filter(|r| *r != "None").map(str::to_string);
        Some((state, reason))
    })
}

/// Pending reasons that mean the cluster, as configured, will never start the job: what it
/// asks for exceeds every node or the partition's limits, or the account may not use it.
pub fn never_starts(reason: &str) -> bool {
    matches!(
        reason,
        "PartitionConfig"
            | "BadConstraints"
            | "PartitionNodeLimit"
            | "PartitionTimeLimit"
            | "InvalidAccount"
            | "InvalidQOS"
            | "QOSMaxCpuPerJobLimit"
            | "QOSMaxGRESPerJob"
            | "QOSMaxMemoryPerJob"
            | "QOSMaxWallDurationPerJobLimit"
    )
}

/// The state in `sacct -X -n -P -o State,ExitCode` output: the first line, `STATE|exit:signal`.
pub fn parse_sacct(stdout: &str) -> Option<JobState> {
    let line = stdout.lines().map(str::trim).find(|l| !l.is_empty())?;
    JobState::parse(line.split('|').next()?)
}

/// The state and its reason in `scontrol show job -o` output (`JobState=FAILED Reason=...`).
pub fn parse_scontrol(stdout: &str) -> Option<(JobState, Option<String>)> {
    let field = |name: &str| {
        stdout.split_whitespace().find_map(|t| t.strip_prefix(name)).map(str::to_string)
    };
    let state = JobState::parse(&field("JobState=")?)?;
    let reason = field("Reason=").filter(|r| r != "None");
    Some((state, reason))
}

/// `sdpipe-<stage>` with characters outside a safe set replaced, for `--job-name`.
fn job_name(stage: &str) -> String {
    let name: String = stage
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "_-.@=,+".contains(c) { c } else { '_' })
        .collect();
    format!("sdpipe-{name}")
}

/// The `#SBATCH` directives for a stage: one node, one task, the resources it asks for, and no
/// automatic requeue (sdpipe resubmits node failures itself, with a fresh log per attempt).
pub fn sbatch_directives(stage: &str, resources: &Resources, cpus: usize) -> Vec<String> {
    let mut flags = vec![
        format!("--job-name={}", job_name(stage)),
        "--nodes=1".to_string(),
        "--ntasks=1".to_string(),
        format!("--cpus-per-task={cpus}"),
    ];
    if let Some(gpus) = resources.gpus.filter(|&g| g > 0) {
        flags.push(format!("--gres=gpu:{gpus}"));
    }
    if let Some(mem) = &resources.mem {
        flags.push(format!("--mem={mem}"));
    }
    if let Some(time) = &resources.time {
        flags.push(format!("--time={time}"));
    }
    if let Some(partition) = &resources.partition {
        flags.push(format!("--partition={partition}"));
    }
    flags.push("--no-requeue".to_string());
    flags
}

/// The batch script for one attempt: the directives, then `sdpipe exec-stage` on the job file.
/// Paths (output file, working directory) are passed on the `sbatch` command line instead, so
/// that no directive has to quote them.
pub fn batch_script(
    stage: &str,
    attempt: u32,
    directives: &[String],
    binary: &Path,
    job_file: &Path,
    result_file: &Path,
) -> Result<String, String> {
    let quote = |p: &Path| template::quote_word(&p.to_string_lossy());
    let mut script = String::from("#!/bin/bash\n");
    script.push_str(&format!(
        "# sdpipe stage `{}`, attempt {attempt}. Written and submitted by sdpipe.\n",
        stage.replace('\n', " ")
    ));
    for d in directives {
        script.push_str(&format!("#SBATCH {d}\n"));
    }
    script.push_str(&format!(
        "exec {} exec-stage {} {}\n",
        quote(binary)?,
        quote(job_file)?,
        quote(result_file)?
    ));
    Ok(script)
}

/// Copies what a job has appended to its output file into the stage's log.
struct LogTail {
    path: PathBuf,
    offset: u64,
}

impl LogTail {
    fn pump(&mut self, log: &mut File) {
        let Ok(mut f) = File::open(&self.path) else { return };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if let Ok(n) = f.read_to_end(&mut buf) {
            self.offset += n as u64;
            let _ = log.write_all(&buf);
        }
    }
}

/// Run a Slurm client command; its stdout on success, a readable error otherwise.
fn slurm_tool(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program).args(args).output().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            format!(
                "`{program}` is not installed here: the Slurm executor needs the Slurm client \
                 commands on the machine running sdpipe (scripts/slurm-up.sh sets up a \
                 single-node test cluster)"
            )
        } else {
            format!("cannot run `{program}`: {e}")
        }
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(format!("`{program} {}` failed: {}", args.join(" "), err.trim()))
    }
}

/// Where a job is: in the queue (`squeue`), else in accounting (`sacct`), else in the
/// controller's memory of finished jobs (`scontrol`, for clusters without accounting).
fn query_state(id: &str) -> Result<Option<(JobState, Option<String>)>, String> {
    let queue = slurm_tool("squeue", &["-h", "-j", id, "-o", "%T %r"]);
    if let Ok(out) = &queue {
        if let Some(found) = parse_squeue(out) {
            return Ok(Some(found));
        }
    }
    if let Ok(out) = slurm_tool("sacct", &["-j", id, "-X", "-n", "-P", "-o", "State,ExitCode"]) {
        if let Some(state) = parse_sacct(&out) {
            return Ok(Some((state, None)));
        }
    }
    match slurm_tool("scontrol", &["show", "job", id, "-o"]) {
        Ok(out) => Ok(parse_scontrol(&out)),
        // Unknown to every tool: purged, or the controller is unreachable.
        Err(e) => match queue {
            Ok(_) => Ok(None),
            Err(_) => Err(e),
        },
    }
}

/// How one submitted attempt ended.
enum Attempt {
    Done,
    /// The node failed: submit again.
    NodeFailed(String),
}

impl SlurmExecutor {
    /// The CPUs of the largest node in `partition` (the default one for `None`), asked once.
    fn largest_node_cpus(&self, partition: Option<&str>) -> Option<usize> {
        let mut known = self.largest_node.lock().unwrap_or_else(|e| e.into_inner());
        *known.entry(partition.map(str::to_string)).or_insert_with(|| {
            let mut args = vec!["-h", "-N", "-o", "%c"];
            if let Some(p) = partition {
                args.extend(["-p", p]);
            }
            slurm_tool("sinfo", &args).ok().as_deref().and_then(largest_cpu_count)
        })
    }

    /// What a job asks for: `resources.cpus` as written, else the threads the stage wants, but
    /// never more than the largest node has (as a local run never gets more than `--jobs`):
    /// a kind's default thread count is a wish, not a requirement a small cluster must fail on.
    fn cpus_for(&self, stage: &crate::spec::Stage, log: &mut File) -> usize {
        let resources = &stage.resources;
        if let Some(cpus) = resources.cpus {
            return (cpus as usize).max(1);
        }
        let wanted = stage.threads.max(1);
        match self.largest_node_cpus(resources.partition.as_deref()) {
            Some(largest) if largest < wanted => {
                let _ = writeln!(
                    log,
                    "[sdpipe] the stage wants {wanted} threads and the largest node has                      {largest} CPUs: asking for {largest} (set `resources.cpus` to insist)"
                );
                largest.max(1)
            }
            _ => wanted,
        }
    }

    fn submit(&self, script: &Path, output: &Path, workdir: &Path) -> Result<String, ExecError> {
        let mut args = vec![
            "--parsable".to_string(),
            format!("--output={}", output.display()),
            format!("--chdir={}", workdir.display()),
        ];
        args.extend(self.config.sbatch_args.iter().cloned());
        args.push(script.display().to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = slurm_tool("sbatch", &args)
            .map_err(|e| ExecError::Cluster(format!("cannot submit the stage: {e}")))?;
        parse_sbatch_id(&out).ok_or_else(|| {
            ExecError::Cluster(format!("sbatch printed no job id (it printed {:?})", out.trim()))
        })
    }

    /// Follow job `id` until it has ended; copy its output into `log` as it grows.
    fn follow(
        &self,
        id: &str,
        asked: &[String],
        result_file: &Path,
        tail: &mut LogTail,
        log: &mut File,
        cancel: &CancelToken,
    ) -> Result<(JobState, Option<String>), ExecError> {
        let mut unknown_since: Option<Instant> = None;
        let mut last_reason = None;
        loop {
            tail.pump(log);
            if cancel.is_cancelled() {
                let _ = slurm_tool("scancel", &[id]);
                let _ = writeln!(log, "[sdpipe] cancelled: scancel {id}");
                // Wait for the job to go, so its processes stop writing into scratch.
                let deadline = Instant::now() + Duration::from_secs(60);
                while Instant::now() < deadline {
                    match query_state(id) {
                        Ok(Some((s, _))) if !s.is_final() => {}
                        _ => break,
                    }
                    std::thread::sleep(self.config.poll);
                }
                tail.pump(log);
                return Err(ExecError::Cancelled);
            }
            match query_state(id) {
                Ok(Some((state, reason))) if state.is_final() => {
                    tail.pump(log);
                    return Ok((state, reason));
                }
                Ok(Some((state, reason))) => {
                    unknown_since = None;
                    if reason.is_some() && reason != last_reason {
                        let why = reason.as_deref().unwrap_or_default();
                        let _ = writeln!(log, "[sdpipe] Slurm job {id} is {}: {why}", state.name());
                        // The caller's watchdog cancels the job when this returns.
                        if state == JobState::Pending && never_starts(why) {
                            return Err(ExecError::Cluster(format!(
                                "Slurm will never start job {id} as submitted ({why}): the \
                                 stage asks for more than the partition's nodes or limits allow \
                                 ({}); set the stage's `resources` (cpus, mem, time, \
                                 partition) to fit the cluster",
                                asked.join(" ")
                            )));
                        }
                    }
                    last_reason = reason;
                }
                // Slurm forgot the job (purged after it ended) but the node left its result.
                Ok(None) if NodeResult::read(result_file).is_some() => {
                    tail.pump(log);
                    return Ok((JobState::Other("PURGED".into()), None));
                }
                Ok(None) | Err(_) => {
                    // Tolerate a controller restart or a slow accounting database for a while.
                    let since = *unknown_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(300) {
                        let why = query_state(id).err().unwrap_or_default();
                        return Err(ExecError::Cluster(format!(
                            "lost track of Slurm job {id} for 5 minutes {why}"
                        )));
                    }
                }
            }
            std::thread::sleep(self.config.poll);
        }
    }

    fn attempt(
        &self,
        job: &NodeJob,
        dir: &Path,
        attempt: u32,
        directives: &[String],
        log: &mut File,
        cancel: &CancelToken,
    ) -> Result<Attempt, ExecError> {
        let binary = self.config.binary.as_deref().ok_or_else(|| {
            ExecError::Cluster(
                "cannot tell where the sdpipe executable is: set SDPIPE_SLURM_BINARY".into(),
            )
        })?;
        let io_err = |what: &str, e: io::Error| ExecError::Cluster(format!("{what}: {e}"));
        let job_file = dir.join("job.json");
        let script_file = dir.join(format!("attempt-{attempt}.sbatch"));
        let output = dir.join(format!("attempt-{attempt}.log"));
        let result_file = dir.join(format!("attempt-{attempt}.result.json"));
        let script = batch_script(&job.stage, attempt, directives, binary, &job_file, &result_file)
            .map_err(ExecError::Template)?;
        fs::write(&script_file, script).map_err(|e| io_err("cannot write the batch script", e))?;
        let _ = fs::remove_file(&result_file);
        if cancel.is_cancelled() {
            return Err(ExecError::Cancelled);
        }
        let id = self.submit(&script_file, &output, &job.out_dir)?;
        let _ = writeln!(
            log,
            "[sdpipe] submitted Slurm job {id} (attempt {attempt}): {}",
            script_file.display()
        );
        // If sdpipe dies while the job runs, nobody would record its result: cancel it.
        let watchdog = Watchdog::spawn("scancel \"$1\" 2>/dev/null", &[&id]).ok();
        let mut tail = LogTail { path: output, offset: 0 };
        let (state, reason) =
            match self.follow(&id, directives, &result_file, &mut tail, log, cancel) {
                Ok(ended) => ended,
                Err(e) => {
                    // Cancelled: `follow` ran scancel already. Otherwise (lost track, never
                    // startable) the watchdog cancels the job as it goes: nobody will record it.
                    if let (ExecError::Cancelled, Some(w)) = (&e, watchdog) {
                        w.disarm();
                    }
                    return Err(e);
                }
            };
        // On a shared filesystem the result may show up a little after the job's end.
        let mut result = NodeResult::read(&result_file);
        let deadline = Instant::now() + Duration::from_secs(10);
        while result.is_none() && state == JobState::Completed && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            result = NodeResult::read(&result_file);
        }
        tail.pump(log);
        if let Some(w) = watchdog {
            w.disarm();
        }
        let why = reason.map(|r| format!(" ({r})")).unwrap_or_default();
        let ended = format!("Slurm job {id} ended {}{why}", state.name());
        let _ = writeln!(log, "[sdpipe] {ended}");
        if result.as_ref().is_some_and(|r| r.ok) {
            return Ok(Attempt::Done);
        }
        if state.is_node_failure() {
            return Ok(Attempt::NodeFailed(ended));
        }
        let fail = |m: String| Err(ExecError::Cluster(m));
        match (state, result) {
            (JobState::Timeout, _) => {
                fail(format!("{ended}: it reached its time limit (raise `resources.time`)"))
            }
            (JobState::OutOfMemory, _) => {
                fail(format!("{ended}: it ran out of memory (raise `resources.mem`)"))
            }
            (_, Some(NodeResult { error: Some(e), cancelled: false, .. })) => fail(e),
            (JobState::Cancelled, _) => fail(format!("{ended}: it was cancelled outside sdpipe")),
            (_, _) => fail(format!(
                "{ended} without a result from `sdpipe exec-stage`: check that {} runs on the \
                 nodes and that the cache directory is on a filesystem they share at the same \
                 path",
                binary.display()
            )),
        }
    }
}

impl Executor for SlurmExecutor {
    fn execute(&self, mut job: Job<'_>) -> Result<(), ExecError> {
        let resources = job.stage.resources.clone();
        // The node grants what the job asked for, not the local thread budget.
        let cpus = self.cpus_for(job.stage, &mut job.log);
        job.threads = cpus;
        let node_job = NodeJob::from_job(&job)?;
        let dir = job.out_dir.parent().unwrap_or(&job.out_dir).join("slurm");
        fs::create_dir_all(&dir)
            .map_err(|e| ExecError::Cluster(format!("cannot create {}: {e}", dir.display())))?;
        let bytes = serde_json::to_vec_pretty(&node_job)
            .map_err(|e| ExecError::Cluster(format!("cannot write the job file: {e}")))?;
        fs::write(dir.join("job.json"), bytes)
            .map_err(|e| ExecError::Cluster(format!("cannot write the job file: {e}")))?;
        let directives = sbatch_directives(&job.stage.name, &resources, cpus);
        let mut log = job.log;
        let attempts = self.config.retries + 1;
        for attempt in 1..=attempts {
            if attempt > 1 {
                // A fresh output directory: nothing half-written by the lost attempt survives.
                let _ = crate::materialize::remove_tree(&job.out_dir);
                fs::create_dir_all(&job.out_dir).map_err(ExecError::Spawn)?;
            }
            match self.attempt(&node_job, &dir, attempt, &directives, &mut log, job.cancel)? {
                Attempt::Done => return Ok(()),
                Attempt::NodeFailed(why) if attempt < attempts => {
                    let _ = writeln!(log, "[sdpipe] {why}: node failure, submitting again");
                }
                Attempt::NodeFailed(why) => {
                    return Err(ExecError::Cluster(format!(
                        "{why}: node failure on each of {attempts} attempts \
                         (SDPIPE_SLURM_RETRIES={})",
                        self.config.retries
                    )));
                }
            }
        }
        unreachable!("the last attempt returns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_node_is_read_from_sinfos_cpu_column() {
        assert_eq!(largest_cpu_count("2\n64\n16\n"), Some(64));
        assert_eq!(largest_cpu_count("  8+\n4\n"), Some(8));
        assert_eq!(largest_cpu_count(""), None);
        assert_eq!(largest_cpu_count("n/a\n"), None);
    }

    #[test]
    fn sbatch_parsable_output_gives_the_job_id() {
        assert_eq!(parse_sbatch_id("4242\n").as_deref(), Some("4242"));
        assert_eq!(parse_sbatch_id("77;cluster-a\n").as_deref(), Some("77"));
        assert_eq!(parse_sbatch_id("Submitted batch job 5\n"), None);
        assert_eq!(parse_sbatch_id(""), None);
    }

    #[test]
    fn squeue_states_are_active_until_the_job_leaves_the_queue() {
        assert_eq!(
            parse_squeue("PENDING Resources\n"),
            Some((JobState::Pending, Some("Resources".to_string())))
        );
        assert_eq!(parse_squeue("RUNNING None\n"), Some((JobState::Running, None)));
        assert_eq!(parse_squeue("\n"), None);
        assert!(!JobState::Running.is_final());
        assert!(!JobState::Completing.is_final());
        assert!(!JobState::Requeued.is_final());
    }

    #[test]
    fn sacct_lines_give_the_state_with_its_decorations_removed() {
        assert_eq!(parse_sacct("COMPLETED|0:0\n"), Some(JobState::Completed));
        assert_eq!(parse_sacct("CANCELLED by 0|0:15\n"), Some(JobState::Cancelled));
        assert_eq!(parse_sacct("NODE_FAIL|0:0\n"), Some(JobState::NodeFail));
        assert_eq!(parse_sacct("OUT_OF_MEMORY|0:125\n"), Some(JobState::OutOfMemory));
        assert_eq!(parse_sacct("COMPLETED+|0:0\n"), Some(JobState::Completed));
        assert_eq!(parse_sacct(""), None);
    }

    #[test]
    fn scontrol_gives_the_state_and_reason_of_a_finished_job() {
        let line = "JobId=1 JobName=wrap UserId=root(0) JobState=FAILED Reason=NonZeroExitCode \
                    Dependency=(null) ExitCode=3:0 RunTime=00:00:00";
        assert_eq!(
            parse_scontrol(line),
            Some((JobState::Failed, Some("NonZeroExitCode".to_string())))
        );
        let done = "JobId=2 JobState=COMPLETED Reason=None ExitCode=0:0";
        assert_eq!(parse_scontrol(done), Some((JobState::Completed, None)));
        assert_eq!(parse_scontrol("slurm_load_jobs error: Invalid job id specified"), None);
    }

    #[test]
    fn a_request_beyond_the_partition_never_starts_but_a_busy_cluster_does() {
        assert!(never_starts("PartitionConfig"));
        assert!(never_starts("BadConstraints"));
        for waiting in ["Resources", "Priority", "Dependency", "BeginTime", "ReqNodeNotAvail"] {
            assert!(!never_starts(waiting), "{waiting}");
        }
    }

    #[test]
    fn only_node_failures_and_preemption_are_retried() {
        for s in [JobState::NodeFail, JobState::BootFail, JobState::Preempted] {
            assert!(s.is_node_failure() && s.is_final(), "{s:?}");
        }
        for s in [
            JobState::Failed,
            JobState::Completed,
            JobState::Cancelled,
            JobState::Timeout,
            JobState::OutOfMemory,
        ] {
            assert!(!s.is_node_failure() && s.is_final(), "{s:?}");
        }
    }

    #[test]
    fn resources_become_sbatch_directives() {
        let r = Resources {
            cpus: Some(8),
            gpus: Some(2),
            mem: Some("32G".into()),
            time: Some("1:30:00".into()),
            partition: Some("gpu".into()),
        };
        let d = sbatch_directives("train@lr=3e-05", &r, 8);
        assert_eq!(
            d,
            [
                "--job-name=sdpipe-train@lr=3e-05",
                "--nodes=1",
                "--ntasks=1",
                "--cpus-per-task=8",
                "--gres=gpu:2",
                "--mem=32G",
                "--time=1:30:00",
                "--partition=gpu",
                "--no-requeue",
            ]
        );
    }

    #[test]
    fn unset_resources_leave_the_cluster_defaults() {
        let d = sbatch_directives("weird name/x", &Resources::default(), 1);
        assert_eq!(
            d,
            [
                "--job-name=sdpipe-weird_name_x",
                "--nodes=1",
                "--ntasks=1",
                "--cpus-per-task=1",
                "--no-requeue"
            ]
        );
    }

    #[test]
    fn the_batch_script_runs_exec_stage_with_quoted_paths() {
        let script = batch_script(
            "caption",
            2,
            &["--cpus-per-task=4".to_string()],
            Path::new("/opt/sd pipe/sdpipe"),
            Path::new("/cache/scratch/ab/slurm/job.json"),
            Path::new("/cache/scratch/ab/slurm/attempt-2.result.json"),
        )
        .unwrap();
        assert_eq!(
            script,
            "#!/bin/bash\n\
             # sdpipe stage `caption`, attempt 2. Written and submitted by sdpipe.\n\
             #SBATCH --cpus-per-task=4\n\
             exec '/opt/sd pipe/sdpipe' exec-stage /cache/scratch/ab/slurm/job.json \
             /cache/scratch/ab/slurm/attempt-2.result.json\n"
        );
    }
}
