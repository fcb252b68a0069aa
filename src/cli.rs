//! The `sdpipe` command line: argument parsing, wiring the engine together, and printing.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use clap::{Parser, Subcommand, ValueEnum};
use sdpipe_stages::api::{human_bytes, CancelToken, DeviceChoice, Registry};

use crate::cache::{Cache, Index, ObjectStore};
use crate::dag::Dag;
use crate::executor::{Dispatch, LocalExecutor};
use crate::experiments;
use crate::journal;
use crate::maintenance;
use crate::project::Project;
use crate::remote::sync::{self as remote_sync, Direction, Outcome};
use crate::remote::{Remote, RemoteConfig};
use crate::scheduler::{Engine, RunOptions};
use crate::spec::overrides::Override;
use crate::spec::remote_settings::RemoteSettings;
use crate::spec::{Pipeline, SpecErrors};
use crate::summary::{RemoteState, State, Summary};

/// Exit codes: stable, documented in the README.
pub mod exit {
    pub const OK: i32 = 0;
    /// A stage failed (or `cache verify` found corruption).
    pub const FAILED: i32 = 1;
    /// The pipeline or the command line is invalid; nothing ran.
    pub const INVALID: i32 = 2;
    pub const INTERRUPTED: i32 = 130;
}

#[derive(Parser)]
#[command(
    name = "sdpipe",
    version,
    about = "Declarative, cached, reproducible Stable Diffusion finetuning pipelines"
)]
struct Cli {
    /// Cache directory (default: `cache/` in the project root).
    #[arg(long, global = true, env = "SDPIPE_CACHE")]
    cache_dir: Option<PathBuf>,
    /// More log output on stderr (repeat for more); `SDPIPE_LOG` takes a tracing filter.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// No progress and no per-stage lines: only warnings, errors and what was asked for
    /// (`--json`, tables, failures).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct PipelineArgs {
    /// The pipeline file.
    pipeline: PathBuf,
    /// Override a parameter: `stage.param=value` or `vars.name=value` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<Override>,
}

#[derive(Subcommand)]
enum Command {
    /// Run what is stale, reuse what is cached.
    Run {
        #[command(flatten)]
        p: PipelineArgs,
        /// Only these stages (and what they need).
        stages: Vec<String>,
        /// Thread budget for stages running at once (default: the number of cores).
        #[arg(short, long)]
        jobs: Option<usize>,
        /// Run this stage even if cached (repeatable).
        #[arg(long, value_name = "STAGE")]
        force: Vec<String>,
        /// Run every stage even if cached.
        #[arg(long)]
        force_all: bool,
        /// Run every stage with this executor (`local` or `slurm`), whatever the pipeline says.
        #[arg(long, value_name = "EXECUTOR")]
        executor: Option<String>,
        /// Run every stage on this device (`auto`, `cpu`, `cuda`, `cuda:N`), whatever the pipeline
        /// says. Not part of any key: cached results are reused.
        #[arg(long, value_name = "DEVICE")]
        device: Option<DeviceChoice>,
        /// Print one JSON summary on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Per stage: cached, or will run and why.
    Status {
        #[command(flatten)]
        p: PipelineArgs,
        /// Only these stages (and what they need).
        stages: Vec<String>,
        /// Print one JSON document on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the stage graph.
    Dag {
        #[command(flatten)]
        p: PipelineArgs,
        /// `text` for a terminal, `dot` for Graphviz, `mermaid` for a Markdown page.
        #[arg(long, value_enum, default_value_t = DagFormat::Text)]
        format: DagFormat,
    },
    /// Upload the pipeline's results to the remote cache (`remote:` or SDPIPE_REMOTE).
    Push {
        #[command(flatten)]
        p: PipelineArgs,
        /// Only these stages (and what they need).
        stages: Vec<String>,
        /// Print one JSON document on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Download the pipeline's results from the remote cache into the local cache.
    Pull {
        #[command(flatten)]
        p: PipelineArgs,
        /// Only these stages (and what they need).
        stages: Vec<String>,
        /// Print one JSON document on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Where a stage's outputs are, its key, timings and log.
    Show {
        #[command(flatten)]
        p: PipelineArgs,
        /// The stage (or sweep instance, `stage@point`) to show.
        stage: String,
        /// Print one JSON document on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Drop cache entries no pipeline's recent runs reference.
    Gc {
        /// Report what would be removed without removing it.
        #[arg(long)]
        dry_run: bool,
        /// Results to keep per stage (most recent first).
        #[arg(long, default_value_t = 1)]
        keep_last: usize,
        /// Print one JSON document on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Inspect or check the cache.
    Cache {
        #[command(subcommand)]
        action: CacheAction,
    },
    /// Convert a published FID/LPIPS weights file (.pth) into the safetensors file the `fid` and
    /// `lpips` stages read (by default into the first weights directory they search).
    ConvertWeights {
        /// fid-inception, lpips-alex, lpips-vgg, alexnet or vgg16.
        kind: String,
        /// The published checkpoint, e.g. pt_inception-2015-12-05-6726825d.pth.
        input: PathBuf,
        /// Where to write (default: $SDPIPE_WEIGHTS_DIR or ~/.cache/sdpipe/weights, under the
        /// name the stages look for).
        output: Option<PathBuf>,
    },
    /// Run one stage from a job file written by a cluster executor (on a cluster node; not for
    /// people).
    #[command(hide = true)]
    ExecStage {
        /// The job file (`<scratch>/slurm/job.json`).
        job: PathBuf,
        /// Where to write how the stage ended.
        result: PathBuf,
    },
    /// Compare the pipeline's recorded runs: one row per run and sweep point.
    Exp {
        #[command(subcommand)]
        action: ExpAction,
    },
    /// The metrics of a recorded run (outputs named `metrics`), or how two runs' differ.
    Metrics {
        #[command(subcommand)]
        action: CompareAction,
    },
    /// How two recorded runs' parameters differ.
    Params {
        #[command(subcommand)]
        action: ParamsAction,
    },
    /// Print a shell completion script: `sdpipe completions bash > /etc/bash_completion.d/sdpipe`
    /// (also zsh, fish, elvish, powershell).
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Built-in stage kinds and their parameters.
    Stages {
        /// Only this kind.
        kind: Option<String>,
        /// Print one JSON document on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CacheAction {
    /// Sizes and counts.
    Stats {
        /// Print one JSON document on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Rehash every object; evict corrupt ones and the records that need them.
    Verify {
        /// Print one JSON document on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ExpAction {
    /// Every recorded run of the pipeline (newest last), parameters and metrics as columns.
    Show {
        /// The pipeline file whose runs to show.
        pipeline: PathBuf,
        /// Only the parameter and metric columns whose values differ between rows.
        #[arg(long)]
        only_changed: bool,
        /// Sort rows by this column (its full name, or the part after the stage name).
        #[arg(long, value_name = "COLUMN")]
        sort_by: Option<String>,
        /// With --sort-by: ascending or descending.
        #[arg(long, value_enum, default_value_t = SortOrder::Asc)]
        sort_order: SortOrder,
        /// Only the last N runs.
        #[arg(short = 'n', long, value_name = "N")]
        num: Option<usize>,
        #[command(flatten)]
        format: TableFormat,
    },
}

#[derive(Subcommand)]
enum CompareAction {
    /// One run's metrics (default: the latest).
    Show {
        /// The pipeline file whose runs to read.
        pipeline: PathBuf,
        /// The run: an id (or its start) from `exp show`, `latest` or `latest~N`.
        #[arg(long, default_value = "latest")]
        run: String,
        #[command(flatten)]
        format: TableFormat,
    },
    /// The metrics that differ between two runs (default: the one before the latest, and the
    /// latest).
    Diff(DiffArgs),
}

#[derive(Subcommand)]
enum ParamsAction {
    /// The parameters that differ between two runs (default: the one before the latest, and
    /// the latest).
    Diff(DiffArgs),
}

#[derive(clap::Args)]
struct DiffArgs {
    /// The pipeline file whose runs to compare.
    pipeline: PathBuf,
    /// The older run: an id (or its start) from `exp show`, `latest` or `latest~N`.
    #[arg(default_value = "latest~1")]
    a: String,
    /// The newer run.
    #[arg(default_value = "latest")]
    b: String,
    /// List unchanged values too.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    format: TableFormat,
}

/// How a comparison is printed (an aligned table by default).
#[derive(clap::Args)]
struct TableFormat {
    /// A Markdown table (for a pull request or a report).
    #[arg(long, group = "format")]
    md: bool,
    /// CSV.
    #[arg(long, group = "format")]
    csv: bool,
    /// JSON, with every digit.
    #[arg(long, group = "format")]
    json: bool,
    /// Significant digits of metric values.
    #[arg(long, default_value_t = 5, value_name = "DIGITS")]
    precision: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum SortOrder {
    Asc,
    Desc,
}

#[derive(Clone, Copy, ValueEnum)]
enum DagFormat {
    Text,
    Dot,
    Mermaid,
}

/// Write command output to stdout. A reader that has gone away (`sdpipe status --json | head`)
/// ends the command quietly, as other Unix tools do; but SIGPIPE itself stays ignored (Rust's
/// default), because a fatal SIGPIPE kills the whole process on *any* closed pipe — a
/// watchdog's, a child's — silently, in the middle of a run.
fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(exit::OK);
        }
        panic!("failed printing to stdout: {e}");
    }
}

/// `print!` through [`write_out`].
macro_rules! out {
    ($($arg:tt)*) => { write_out(format_args!($($arg)*)) };
}

/// `println!` through [`write_out`].
macro_rules! outln {
    () => { write_out(format_args!("\n")) };
    ($($arg:tt)*) => { write_out(format_args!("{}\n", format_args!($($arg)*))) };
}

impl TableFormat {
    fn style(&self) -> experiments::Format {
        if self.md {
            experiments::Format::Markdown
        } else if self.csv {
            experiments::Format::Csv
        } else {
            experiments::Format::Plain
        }
    }
}

/// The recorded runs of the pipeline file at `pipeline`, oldest first. The file itself is not
/// read: its runs stay comparable after it changed or was removed.
fn journal_entries(
    pipeline: &Path,
    cache_dir: Option<&Path>,
) -> Result<Vec<journal::RunEntry>, CliError> {
    let file = std::path::absolute(pipeline).map_err(io_err("cannot resolve the pipeline path"))?;
    let project = Project::locate(&file, cache_dir);
    journal::Journal::new(&project.cache_dir, &project.pipeline_rel)
        .entries()
        .map_err(io_err("cannot read the run journal"))
}

/// Add the finished run to the pipeline's journal (`exp show`). An interrupted run is not a
/// run to compare; a journal that cannot be written costs only the comparison, so a warning.
fn record_run(l: &Loaded, summary: &Summary) {
    if summary.interrupted {
        return;
    }
    let entry = journal::RunEntry::of_run(&l.pipeline, &l.project.pipeline_rel, summary);
    let journal = journal::Journal::new(&l.project.cache_dir, &l.project.pipeline_rel);
    if let Err(e) = journal.append(&entry) {
        tracing::warn!("could not record the run for `sdpipe exp show`: {e}");
    }
}

/// `metrics diff` and `params diff`.
fn diff_command(
    args: DiffArgs,
    cache_dir: Option<&Path>,
    of: experiments::DiffOf,
) -> Result<i32, CliError> {
    let entries = journal_entries(&args.pipeline, cache_dir)?;
    let a = journal::resolve(&entries, &args.a).map_err(CliError::Usage)?;
    let b = journal::resolve(&entries, &args.b).map_err(CliError::Usage)?;
    let lines = experiments::diff(a, b, of, args.all);
    if args.format.json {
        print_json(&serde_json::json!({"a": a.id, "b": b.id, "changes": lines}));
        return Ok(exit::OK);
    }
    let table = experiments::diff_table(&lines, &a.id, &b.id, of, args.format.precision);
    out!("{}", experiments::render(&table, args.format.style()));
    Ok(exit::OK)
}

/// Parse arguments, run, and return the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { exit::INVALID } else { exit::OK };
        }
    };
    init_tracing(cli.verbose);
    let registry = crate::kinds::builtin();
    match run_command(cli, &registry) {
        Ok(code) => code,
        Err(CliError::Spec(errors, json)) => {
            if json {
                print_json(&spec_error_json(&errors));
            }
            for e in errors.0 {
                eprintln!("{:?}", miette::Report::new(e));
            }
            exit::INVALID
        }
        Err(CliError::Usage(msg)) => {
            eprintln!("error: {msg}");
            exit::INVALID
        }
        Err(CliError::Io(msg)) => {
            eprintln!("error: {msg}");
            exit::FAILED
        }
    }
}

fn init_tracing(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_env("SDPIPE_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Through the progress bars while they are drawn, so a warning never tears them.
        .with_writer(crate::ui::LogWriter)
        .with_target(false)
        .try_init();
}

enum CliError {
    /// Invalid pipeline (with whether `--json` was asked for).
    Spec(SpecErrors, bool),
    Usage(String),
    Io(String),
}

fn spec_error_json(errors: &SpecErrors) -> serde_json::Value {
    let list: Vec<serde_json::Value> = errors
        .0
        .iter()
        .map(|e| {
            let loc = e.location();
            serde_json::json!({
                "message": e.message,
                "help": e.help,
                "file": loc.as_ref().map(|l| l.0.clone()),
                "line": loc.as_ref().map(|l| l.1),
                "column": loc.as_ref().map(|l| l.2),
            })
        })
        .collect();
    serde_json::json!({"schema": crate::summary::SUMMARY_SCHEMA, "ok": false, "errors": list})
}

fn print_json<T: serde::Serialize>(value: &T) {
    outln!("{}", serde_json::to_string_pretty(value).expect("summaries serialise"));
}

fn io_err(context: &str) -> impl Fn(std::io::Error) -> CliError + '_ {
    move |e| CliError::Io(format!("{context}: {e}"))
}

struct Loaded {
    pipeline: Pipeline,
    project: Project,
    cache: Cache,
    /// The shared remote cache, when one is configured and could be set up.
    remote: Option<Remote>,
}

fn load(
    p: &PipelineArgs,
    cache_dir: Option<&Path>,
    registry: &Registry,
    json: bool,
) -> Result<Loaded, CliError> {
    let pipeline =
        Pipeline::load(&p.pipeline, registry, &p.set).map_err(|e| CliError::Spec(e, json))?;
    let project = Project::locate(&pipeline.file, cache_dir);
    // Before anything is created: a broken settings file stops the command with its location.
    let settings = project.settings().map_err(|e| CliError::Spec(e.into(), json))?;
    let cache = Cache::open(&project.cache_dir).map_err(io_err("cannot open the cache"))?;
    let remote = open_remote(settings.remote.unwrap_or_default(), &pipeline)?;
    Ok(Loaded { pipeline, project, cache, remote })
}

/// The project's `[remote]`, overridden by the pipeline's `remote:`, then by `SDPIPE_REMOTE*`.
/// A setting that does not parse is a usage error; a client that cannot be set up only costs
/// the remote (with a warning).
fn open_remote(project: RemoteSettings, pipeline: &Pipeline) -> Result<Option<Remote>, CliError> {
    let settings = project.overlaid_by(pipeline.remote.as_ref());
    let config = RemoteConfig::resolve(Some(&settings), |k| std::env::var(k).ok())
        .map_err(CliError::Usage)?;
    let Some(config) = config else {
        return Ok(None);
    };
    match Remote::open(config) {
        Ok(remote) => Ok(Some(remote)),
        Err(e) => {
            tracing::warn!("{e}; continuing without the remote cache");
            Ok(None)
        }
    }
}

fn check_stage_names(pipeline: &Pipeline, names: &[String], json: bool) -> Result<(), CliError> {
    for name in names {
        if !pipeline.stages.contains_key(name) {
            let e = crate::spec::SpecError::unlocated(format!(
                "no stage named `{name}` in {}",
                pipeline.source.name()
            ))
            .suggest(name, pipeline.stages.keys().map(String::as_str));
            return Err(CliError::Spec(e.into(), json));
        }
    }
    Ok(())
}

/// A cache directory for commands that take no pipeline: `--cache-dir`, `SDPIPE_CACHE`, or
/// `cache/` in the project around the current directory.
fn standalone_cache(cache_dir: Option<&Path>) -> Result<Cache, CliError> {
    let dir = match cache_dir {
        Some(d) => d.to_path_buf(),
        None => {
            let cwd = std::env::current_dir().map_err(io_err("current directory"))?;
            Project::locate(&cwd.join("pipeline.yaml"), None).cache_dir
        }
    };
    if !dir.join("index").exists() {
        return Err(CliError::Usage(format!(
            "no sdpipe cache at {} (use --cache-dir or SDPIPE_CACHE)",
            dir.display()
        )));
    }
    Cache::open(&dir).map_err(io_err("cannot open the cache"))
}

fn run_command(cli: Cli, registry: &Registry) -> Result<i32, CliError> {
    let cache_dir = cli.cache_dir.as_deref();
    match cli.command {
        Command::Run { p, stages, jobs, force, force_all, executor, device, json } => {
            let mut l = load(&p, cache_dir, registry, json)?;
            if let Some(name) = executor {
                let choice =
                    crate::spec::resources::ExecutorChoice::parse(&name).ok_or_else(|| {
                        CliError::Usage(format!("unknown executor `{name}` (use local or slurm)"))
                    })?;
                for stage in l.pipeline.stages.values_mut() {
                    stage.executor = choice;
                }
            }
            if let Some(device) = device {
                for stage in l.pipeline.stages.values_mut() {
                    stage.device = device;
                }
            }
            check_stage_names(&l.pipeline, &stages, json)?;
            check_stage_names(&l.pipeline, &force, json)?;
            let _maintenance = l.cache.maintenance_lock(false).map_err(io_err("cache lock"))?;
            let cancel = install_interrupt_handler();
            let force: HashSet<String> = if force_all {
                l.pipeline.stages.keys().cloned().collect()
            } else {
                force.into_iter().collect()
            };
            let jobs = jobs.unwrap_or_else(|| {
                std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
            });
            // candle sizes one global pool for element-wise ops from this variable at first use;
            // keep it within the run's thread budget unless the user chose otherwise. Set before
            // any stage thread exists.
            if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
                std::env::set_var("CANDLE_NUM_THREADS", jobs.to_string());
            }
            let engine = Engine {
                pipeline: &l.pipeline,
                project: &l.project,
                cache: &l.cache,
                executor: &Dispatch::default(),
                cancel: cancel.clone(),
                remote: l.remote.as_ref(),
            };
            let quiet = json || cli.quiet;
            let summary = engine.run(&RunOptions { jobs, force, targets: stages, quiet });
            record_run(&l, &summary);
            if json {
                print_json(&summary);
            } else {
                print_run(&summary, &l.project, cli.quiet);
            }
            Ok(if summary.interrupted {
                exit::INTERRUPTED
            } else if summary.ok {
                exit::OK
            } else {
                exit::FAILED
            })
        }
        Command::Status { p, stages, json } => {
            let l = load(&p, cache_dir, registry, json)?;
            check_stage_names(&l.pipeline, &stages, json)?;
            let engine = Engine {
                pipeline: &l.pipeline,
                project: &l.project,
                cache: &l.cache,
                executor: &LocalExecutor,
                cancel: CancelToken::new(),
                remote: l.remote.as_ref(),
            };
            let summary = engine.status(&stages);
            if json {
                print_json(&summary);
            } else {
                print_status(&summary);
            }
            Ok(if summary.ok { exit::OK } else { exit::FAILED })
        }
        Command::Dag { p, format } => {
            let pipeline = Pipeline::load(&p.pipeline, registry, &p.set)
                .map_err(|e| CliError::Spec(e, false))?;
            let dag = Dag::build(&pipeline);
            match format {
                DagFormat::Dot => out!("{}", dag.to_dot(&pipeline)),
                DagFormat::Mermaid => out!("{}", dag.to_mermaid(&pipeline)),
                DagFormat::Text => {
                    for name in dag.topo_order() {
                        let stage = &pipeline.stages[&name];
                        let ups = dag.upstream(&name);
                        let from = if ups.is_empty() {
                            String::new()
                        } else {
                            format!("  ← {}", ups.join(", "))
                        };
                        outln!("{name} ({}){from}", stage.action.kind_name());
                    }
                }
            }
            Ok(exit::OK)
        }
        Command::Push { p, stages, json } => {
            sync_command(p, stages, json, Direction::Push, cache_dir, registry)
        }
        Command::Pull { p, stages, json } => {
            sync_command(p, stages, json, Direction::Pull, cache_dir, registry)
        }
        Command::Show { p, stage, json } => {
            let l = load(&p, cache_dir, registry, json)?;
            check_stage_names(&l.pipeline, std::slice::from_ref(&stage), json)?;
            show(&l, &stage, json)
        }
        Command::Gc { dry_run, keep_last, json } => {
            let cache = standalone_cache(cache_dir)?;
            let _lock = cache.maintenance_lock(true).map_err(io_err("cache lock"))?;
            let report = maintenance::gc(&cache, keep_last, dry_run).map_err(io_err("gc"))?;
            if json {
                print_json(&report);
            } else {
                let verb = if dry_run { "would remove" } else { "removed" };
                outln!(
                    "{verb} {} records and {} objects ({}), kept {} records",
                    report.records_removed,
                    report.objects_removed,
                    human_bytes(report.bytes_freed),
                    report.records_kept
                );
            }
            Ok(exit::OK)
        }
        Command::Cache { action } => {
            let cache = standalone_cache(cache_dir)?;
            match action {
                CacheAction::Stats { json } => {
                    let stats = maintenance::stats(&cache).map_err(io_err("stats"))?;
                    if json {
                        print_json(&stats);
                    } else {
                        outln!("cache:    {}", cache.root().display());
                        outln!("objects:  {} ({})", stats.objects, human_bytes(stats.object_bytes));
                        outln!(
                            "records:  {} results of {} stages",
                            stats.records,
                            stats.stages_tracked
                        );
                        outln!("index:    {}", human_bytes(stats.index_bytes));
                    }
                    Ok(exit::OK)
                }
                CacheAction::Verify { json } => {
                    let _lock = cache.maintenance_lock(true).map_err(io_err("cache lock"))?;
                    let report = maintenance::verify(&cache).map_err(io_err("verify"))?;
                    if json {
                        print_json(&report);
                    } else {
                        outln!("checked {} objects", report.objects_checked);
                        for d in &report.corrupt_objects {
                            outln!("corrupt object removed: {d}");
                        }
                        for r in &report.records_evicted {
                            outln!("record evicted: {r}");
                        }
                        if let Some(aside) = &report.damaged_index_moved_to {
                            outln!("damaged index moved to {aside}; a fresh one replaces it");
                        }
                        if report.corrupt_objects.is_empty() && report.records_evicted.is_empty() {
                            outln!("all objects intact");
                        }
                    }
                    let intact = report.corrupt_objects.is_empty()
                        && report.records_evicted.is_empty()
                        && report.damaged_index_moved_to.is_none();
                    Ok(if intact { exit::OK } else { exit::FAILED })
                }
            }
        }
        Command::Stages { kind, json } => print_stages(registry, kind.as_deref(), json),
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "sdpipe",
                &mut script,
            );
            out!("{}", String::from_utf8_lossy(&script));
            Ok(exit::OK)
        }
        Command::Exp {
            action: ExpAction::Show { pipeline, only_changed, sort_by, sort_order, num, format },
        } => {
            let entries = journal_entries(&pipeline, cache_dir)?;
            let skip = num.map_or(0, |n| entries.len().saturating_sub(n));
            let rows: Vec<experiments::Row> =
                entries[skip..].iter().flat_map(experiments::rows).collect();
            if format.json {
                print_json(&rows);
                return Ok(exit::OK);
            }
            let opts = experiments::ShowOptions {
                only_changed,
                sort_by,
                descending: matches!(sort_order, SortOrder::Desc),
                precision: format.precision,
            };
            let table = experiments::show_table(rows, &opts).map_err(CliError::Usage)?;
            out!("{}", experiments::render(&table, format.style()));
            Ok(exit::OK)
        }
        Command::Metrics { action: CompareAction::Show { pipeline, run, format } } => {
            let entries = journal_entries(&pipeline, cache_dir)?;
            let entry = journal::resolve(&entries, &run).map_err(CliError::Usage)?;
            let rows = experiments::rows(entry);
            if format.json {
                let json: Vec<_> = rows
                    .iter()
                    .map(|r| serde_json::json!({"run": r.run, "point": r.point, "metrics": r.metrics}))
                    .collect();
                print_json(&json);
                return Ok(exit::OK);
            }
            let table = experiments::metrics_table(&rows, format.precision);
            out!("{}", experiments::render(&table, format.style()));
            Ok(exit::OK)
        }
        Command::Metrics { action: CompareAction::Diff(args) } => {
            diff_command(args, cache_dir, experiments::DiffOf::Metrics)
        }
        Command::Params { action: ParamsAction::Diff(args) } => {
            diff_command(args, cache_dir, experiments::DiffOf::Params)
        }
        Command::ExecStage { job, result } => {
            Ok(crate::executor::exec_stage_main(&job, &result, registry))
        }
        Command::ConvertWeights { kind, input, output } => convert_weights(&kind, &input, output),
    }
}

fn sync_command(
    p: PipelineArgs,
    stages: Vec<String>,
    json: bool,
    direction: Direction,
    cache_dir: Option<&Path>,
    registry: &Registry,
) -> Result<i32, CliError> {
    let l = load(&p, cache_dir, registry, json)?;
    check_stage_names(&l.pipeline, &stages, json)?;
    let Some(remote) = &l.remote else {
        return Err(CliError::Usage(
            "no remote cache configured: add `remote: s3://bucket/prefix` to the pipeline or set \
             SDPIPE_REMOTE"
                .into(),
        ));
    };
    if direction == Direction::Push && remote.read_only() {
        return Err(CliError::Usage(format!(
            "remote {} is read-only: nothing to push",
            remote.url()
        )));
    }
    let _maintenance = l.cache.maintenance_lock(false).map_err(io_err("cache lock"))?;
    let report = remote_sync::sync(&l.pipeline, &l.project, &l.cache, remote, direction, &stages);
    if json {
        print_json(&report);
    } else {
        let width = report.stages.iter().map(|s| s.name.len()).max().unwrap_or(5).max(5);
        for s in &report.stages {
            let what = match s.outcome {
                Outcome::Pushed => {
                    format!("pushed ({} objects, {})", s.objects, human_bytes(s.bytes))
                }
                Outcome::AlreadyOnRemote => "already on the remote".into(),
                Outcome::NotComputed => "no local result (run it first)".into(),
                Outcome::Pulled => "pulled".into(),
                Outcome::AlreadyLocal => "already in the local cache".into(),
                Outcome::NotOnRemote => "not on the remote".into(),
                Outcome::UpstreamMissing => "upstream has no result yet".into(),
                Outcome::Failed => {
                    format!("FAILED: {}", s.error.as_deref().unwrap_or("unknown error"))
                }
            };
            outln!("{:width$}  {what}", s.name);
        }
        outln!("remote: {}", report.remote);
    }
    Ok(if report.ok { exit::OK } else { exit::FAILED })
}

fn convert_weights(kind: &str, input: &Path, output: Option<PathBuf>) -> Result<i32, CliError> {
    use sdpipe_metrics::{convert_weights, weights::search_dirs, WeightsKind};
    let kind: WeightsKind = kind.parse().map_err(CliError::Usage)?;
    let output = match output {
        Some(o) => o,
        None => search_dirs()
            .into_iter()
            .next()
            .ok_or_else(|| CliError::Usage("no HOME or SDPIPE_WEIGHTS_DIR: pass OUTPUT".into()))?
            .join(kind.default_file_name()),
    };
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err("create the weights directory"))?;
    }
    let converted = convert_weights(kind, input, &output)
        .map_err(|e| CliError::Io(format!("converting {}: {e}", input.display())))?;
    outln!(
        "wrote {} ({} tensors; left out {} unused)",
        output.display(),
        converted.written,
        converted.dropped.len()
    );
    Ok(exit::OK)
}

/// First Ctrl-C: cancel running stages and stop cleanly (nothing half-done is recorded).
/// Second: exit at once.
fn install_interrupt_handler() -> CancelToken {
    static PRESSES: AtomicUsize = AtomicUsize::new(0);
    let cancel = CancelToken::new();
    let token = cancel.clone();
    let _ = ctrlc::set_handler(move || {
        if PRESSES.fetch_add(1, Ordering::SeqCst) == 0 {
            eprintln!("\ninterrupted: stopping running stages (press Ctrl-C again to exit now)");
            token.cancel();
        } else {
            std::process::exit(exit::INTERRUPTED);
        }
    });
    cancel
}

fn seconds(ms: Option<u64>) -> String {
    ms.map(|ms| format!("{:.1}s", ms as f64 / 1000.0)).unwrap_or_default()
}

fn state_word(state: State) -> &'static str {
    match state {
        State::Ran => "ran",
        State::Cached => "cached",
        State::Skipped => "skipped",
        State::Failed => "FAILED",
        State::WillRun => "will run",
    }
}

/// The run's table, totals and outputs; with `quiet`, only its failures.
fn print_run(summary: &Summary, project: &Project, quiet: bool) {
    let width = summary.stages.iter().map(|s| s.name.len()).max().unwrap_or(5).max(5);
    for s in summary.stages.iter().filter(|_| !quiet) {
        let why = s.reasons.iter().map(|r| r.message.as_str()).collect::<Vec<_>>().join("; ");
        let why = if s.state == State::Ran { why } else { String::new() };
        let word = match (s.state, s.remote) {
            (State::Cached, Some(RemoteState::Pulled)) => "pulled",
            (state, _) => state_word(state),
        };
        outln!("{:width$}  {:8} {:>7}  {}", s.name, word, seconds(s.duration_ms), why);
    }
    if !quiet {
        outln!(
            "{} ran, {} cached, {} failed, {} skipped in {}",
            summary.count(State::Ran),
            summary.count(State::Cached),
            summary.count(State::Failed),
            summary.count(State::Skipped),
            seconds(Some(summary.duration_ms))
        );
    }
    for s in summary.stages.iter().filter(|s| s.state == State::Failed) {
        outln!("\nstage `{}` failed: {}", s.name, s.error.as_deref().unwrap_or("unknown error"));
        if let Some(log) = &s.log {
            outln!("  log: {log}");
        }
    }
    if summary.interrupted {
        outln!("interrupted: finished stages are cached; run again to resume");
    } else if !quiet && summary.count(State::Ran) + summary.count(State::Cached) > 0 {
        outln!("outputs: {}", project.runs_dir.display());
        for s in &summary.stages {
            if let Some(headline) = &s.headline {
                outln!("{}: {headline}", s.name);
            }
        }
    }
}

fn print_status(summary: &Summary) {
    let width = summary.stages.iter().map(|s| s.name.len()).max().unwrap_or(5).max(5);
    for s in &summary.stages {
        let detail = match (&s.error, s.state) {
            (Some(e), _) => format!("error: {e}"),
            (None, State::WillRun) => {
                s.reasons.iter().map(|r| r.message.as_str()).collect::<Vec<_>>().join("; ")
            }
            _ => String::new(),
        };
        let detail = match s.remote {
            Some(RemoteState::Available) => "on the remote (the next run pulls it)".to_string(),
            _ => detail,
        };
        outln!("{:width$}  {:8}  {detail}", s.name, state_word(s.state));
    }
}

fn show(l: &Loaded, stage: &str, json: bool) -> Result<i32, CliError> {
    let engine = Engine {
        pipeline: &l.pipeline,
        project: &l.project,
        cache: &l.cache,
        executor: &LocalExecutor,
        cancel: CancelToken::new(),
        remote: None,
    };
    let summary = engine.status(&[stage.to_string()]);
    let s =
        summary.stages.into_iter().find(|s| s.name == stage).expect("selected stage is reported");
    let record = match s.key.as_deref().and_then(crate::hash::Digest::from_hex) {
        Some(key) => l.cache.with_index(|i| i.record(&key)).map_err(io_err("cache index"))?,
        None => None,
    };
    let store = l.cache.store();
    let value = serde_json::json!({
        "stage": s.name,
        "kind": s.kind,
        "state": s.state,
        "key": s.key,
        "reasons": s.reasons,
        "run_dir": l.project.runs_dir.join(stage).display().to_string(),
        "record": record.as_ref().map(|r| serde_json::json!({
            "started_at": r.started_at,
            "duration_ms": r.duration_ms,
            "threads": r.threads,
            "outputs": r.outputs.iter().map(|(n, o)| (n.clone(), serde_json::json!({
                "path": l.project.runs_dir.join(stage).join(&o.path).display().to_string(),
                "object": store.path(&o.digest).display().to_string(),
                "kind": o.kind,
                "digest": o.digest,
                "size": o.size,
                "files": o.files,
            }))).collect::<serde_json::Map<_, _>>(),
            "log": r.log.map(|d| store.path(&d).display().to_string()),
            "manifest": store.path(&r.manifest).display().to_string(),
        })),
    });
    if json {
        print_json(&value);
        return Ok(exit::OK);
    }
    outln!("stage:    {} ({})", s.name, s.kind);
    outln!("state:    {}", state_word(s.state));
    outln!(
        "key:      {}",
        s.key.as_deref().unwrap_or("(not computable yet: an upstream stage will run)")
    );
    for r in &s.reasons {
        outln!("why:      {}", r.message);
    }
    match record {
        Some(r) => {
            outln!("ran:      {} for {}", r.started_at, seconds(Some(r.duration_ms)));
            for (name, o) in &r.outputs {
                outln!(
                    "output:   {name} → {}",
                    l.project.runs_dir.join(stage).join(&o.path).display()
                );
                outln!(
                    "          {:?}, {} files, {}, object {}",
                    o.kind,
                    o.files,
                    human_bytes(o.size),
                    store.path(&o.digest).display()
                );
            }
            if let Some(d) = r.log {
                outln!("log:      {}", store.path(&d).display());
            }
            outln!("manifest: {}", store.path(&r.manifest).display());
        }
        None => outln!("no cached result for the current inputs"),
    }
    Ok(exit::OK)
}

fn print_stages(registry: &Registry, only: Option<&str>, json: bool) -> Result<i32, CliError> {
    if let Some(name) = only {
        if registry.get(name).is_none() {
            let names: Vec<&str> = registry.names().collect();
            let hint = crate::spec::error::did_you_mean(name, names.iter().copied())
                .map(|n| format!(" (did you mean `{n}`?)"))
                .unwrap_or_default();
            return Err(CliError::Usage(format!(
                "no built-in kind `{name}`{hint}; `shell` stages use `run:`"
            )));
        }
    }
    let kinds: Vec<_> = registry.iter().filter(|k| only.is_none_or(|n| k.name() == n)).collect();
    if json {
        let list: Vec<serde_json::Value> = kinds
            .iter()
            .map(|k| {
                serde_json::json!({
                    "name": k.name(),
                    "version": k.version(),
                    "doc": k.doc(),
                    "params": k.params().iter().map(|p| serde_json::json!({
                        "name": p.name, "type": p.ty.describe(), "default": p.default,
                        "required": p.default.is_none(), "doc": p.doc,
                    })).collect::<Vec<_>>(),
                    "outputs": k.outputs().iter().map(|o| serde_json::json!({
                        "name": o.name, "path": o.path, "kind": o.kind, "doc": o.doc,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        print_json(&list);
        return Ok(exit::OK);
    }
    if only.is_none() {
        outln!("shell (built into the engine)\n  A command run with `run:`; see README.md for `deps`, `inputs`, `outs`, `params`, `env`.\n");
    }
    for k in kinds {
        outln!("{} (version {})\n  {}", k.name(), k.version(), k.doc());
        outln!("  parameters:");
        for p in k.params() {
            let default = match &p.default {
                None => "required".to_string(),
                Some(v) => format!("default {v}"),
            };
            outln!("    {:20} {} ({default})\n    {:20} {}", p.name, p.ty.describe(), "", p.doc);
        }
        outln!("  outputs:");
        for o in k.outputs() {
            outln!("    {:20} {} {:?}: {}", o.name, o.path, o.kind, o.doc);
        }
        outln!();
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod help_tests {
    use super::*;
    use clap::CommandFactory;

    /// `(command path, argument)` of every argument and subcommand without help text.
    fn undocumented(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let builtin = matches!(arg.get_id().as_str(), "help" | "version");
            if !builtin && arg.get_help().is_none() {
                out.push(format!("{path} {}", arg.get_id()));
            }
        }
        for sub in cmd.get_subcommands() {
            let sub_path = format!("{path} {}", sub.get_name());
            if sub.get_name() != "help" && sub.get_about().is_none() {
                out.push(sub_path.clone());
            }
            undocumented(sub, &sub_path, out);
        }
    }

    #[test]
    fn every_argument_and_subcommand_has_help_text() {
        let mut missing = Vec::new();
        undocumented(&Cli::command(), "sdpipe", &mut missing);
        assert!(missing.is_empty(), "no help text:\n{}", missing.join("\n"));
    }
}
