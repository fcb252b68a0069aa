//! The `sdpipe` command line: arguments (here), one file per command (`run`, `status`, `sync`
//! for push and pull, `show`, `gc` for gc and cache, `compare` for exp/metrics/params,
//! `stages` for stages and convert-weights), how commands open what they work on (`load`) and
//! what they print (`output`). Errors map to the exit codes in [`exit`].

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use clap::{Parser, Subcommand, ValueEnum};
use sdpipe_stages::api::{human_bytes, CancelToken, DeviceChoice, Registry};

use crate::cache::{Cache, ObjectStore};
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

#[macro_use]
mod output;
mod compare;
mod error;
mod gc;
mod load;
mod run;
mod show;
mod stages;
mod status;
mod sync;

use compare::diff_command;
use error::CliError;
use load::*;
use output::*;
use show::show;
use stages::{convert_weights, print_stages};
use sync::sync_command;

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
    Run(RunArgs),
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

#[derive(clap::Args)]
struct RunArgs {
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
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
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

fn run_command(cli: Cli, registry: &Registry) -> Result<i32, CliError> {
    let cache_dir = cli.cache_dir.as_deref();
    match cli.command {
        Command::Run(args) => run::run(args, cli.quiet, cache_dir, registry),
        Command::Status { p, stages, json } => {
            status::status(&p, &stages, json, cache_dir, registry)
        }
        Command::Dag { p, format } => dag(&p, format, registry),
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
        Command::Gc { dry_run, keep_last, json } => gc::gc(dry_run, keep_last, json, cache_dir),
        Command::Cache { action } => gc::cache(action, cache_dir),
        Command::Stages { kind, json } => print_stages(registry, kind.as_deref(), json),
        Command::Completions { shell } => completions(shell),
        Command::Exp {
            action: ExpAction::Show { pipeline, only_changed, sort_by, sort_order, num, format },
        } => {
            compare::exp_show(&pipeline, only_changed, sort_by, sort_order, num, &format, cache_dir)
        }
        Command::Metrics { action: CompareAction::Show { pipeline, run, format } } => {
            compare::metrics_show(&pipeline, &run, &format, cache_dir)
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

/// `sdpipe dag`: the stage graph as text, Graphviz or Mermaid.
fn dag(p: &PipelineArgs, format: DagFormat, registry: &Registry) -> Result<i32, CliError> {
    let pipeline =
        Pipeline::load(&p.pipeline, registry, &p.set).map_err(|e| CliError::Spec(e, false))?;
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

/// `sdpipe completions <shell>`.
fn completions(shell: clap_complete::Shell) -> Result<i32, CliError> {
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
