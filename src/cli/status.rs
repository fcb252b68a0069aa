//! `sdpipe status`: per stage, cached or will run, and why.

use super::*;

pub(super) fn print_status(summary: &Summary) {
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

/// `sdpipe status`.
pub(super) fn status(
    p: &PipelineArgs,
    stages: &[String],
    json: bool,
    cache_dir: Option<&Path>,
    registry: &Registry,
) -> Result<i32, CliError> {
    let l = load(p, cache_dir, registry, json)?;
    check_stage_names(&l.pipeline, stages, json)?;
    let engine = Engine {
        pipeline: &l.pipeline,
        project: &l.project,
        cache: &l.cache,
        executor: &LocalExecutor,
        cancel: CancelToken::new(),
        remote: l.remote.as_ref(),
    };
    let summary = engine.status(stages);
    if json {
        print_json(&summary);
    } else {
        print_status(&summary);
    }
    Ok(if summary.ok { exit::OK } else { exit::FAILED })
}
