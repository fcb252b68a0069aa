//! `sdpipe push` and `sdpipe pull`: the pipeline's results to and from the remote cache.

use super::*;

pub(super) fn sync_command(
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
