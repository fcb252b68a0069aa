//! `sdpipe run`: run what is stale, print what happened, and record the run in the journal.

use super::*;

/// Add the finished run to the pipeline's journal (`exp show`). An interrupted run is not a
/// run to compare; a journal that cannot be written costs only the comparison, so a warning.
pub(super) fn record_run(l: &Loaded, summary: &Summary) {
    if summary.interrupted {
        return;
    }
    let entry = journal::RunEntry::of_run(&l.pipeline, &l.project.pipeline_rel, summary);
    let journal = journal::Journal::new(&l.project.cache_dir, &l.project.pipeline_rel);
    let recorded = journal.append(entry, |entry| entry.read_metrics(summary));
    if let Err(e) = recorded {
        tracing::warn!("could not record the run for `sdpipe exp show`: {e}");
    }
}

/// First Ctrl-C: cancel running stages and stop cleanly (nothing half-done is recorded).
/// Second: exit at once.
pub(super) fn install_interrupt_handler() -> CancelToken {
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

/// The run's table, totals and outputs; with `quiet`, only its failures.
pub(super) fn print_run(summary: &Summary, project: &Project, quiet: bool) {
    if !quiet {
        let width = summary.stages.iter().map(|s| s.name.len()).max().unwrap_or(5).max(5);
        for s in &summary.stages {
            let why = s.reasons.iter().map(|r| r.message.as_str()).collect::<Vec<_>>().join("; ");
            let why = if s.state == State::Ran { why } else { String::new() };
            let word = match (s.state, s.remote) {
                (State::Cached, Some(RemoteState::Pulled)) => "pulled",
                (state, _) => state_word(state),
            };
            outln!("{:width$}  {:8} {:>7}  {}", s.name, word, seconds(s.duration_ms), why);
        }
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

/// `sdpipe run`.
pub(super) fn run(
    args: RunArgs,
    quiet: bool,
    cache_dir: Option<&Path>,
    registry: &Registry,
) -> Result<i32, CliError> {
    let RunArgs { p, stages, jobs, force, force_all, executor, device, json } = args;
    let mut l = load(&p, cache_dir, registry, json)?;
    if let Some(name) = executor {
        let choice = crate::spec::resources::ExecutorChoice::parse(&name).ok_or_else(|| {
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
    let jobs =
        jobs.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
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
    let quiet = json || quiet;
    let summary = engine.run(&RunOptions { jobs, force, targets: stages, quiet });
    record_run(&l, &summary);
    if json {
        print_json(&summary);
    } else {
        print_run(&summary, &l.project, quiet);
    }
    Ok(if summary.interrupted {
        exit::INTERRUPTED
    } else if summary.ok {
        exit::OK
    } else {
        exit::FAILED
    })
}
