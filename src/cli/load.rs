//! Opening what a command works on: the pipeline (validated), its project, the cache and the
//! remote cache; and the errors a person reads when one cannot be opened.

use super::*;

pub(super) struct Loaded {
    pub(super) pipeline: Pipeline,
    pub(super) project: Project,
    pub(super) cache: Cache,
    /// The shared remote cache, when one is configured and could be set up.
    pub(super) remote: Option<Remote>,
}

pub(super) fn load(
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
pub(super) fn open_remote(
    project: RemoteSettings,
    pipeline: &Pipeline,
) -> Result<Option<Remote>, CliError> {
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

pub(super) fn check_stage_names(
    pipeline: &Pipeline,
    names: &[String],
    json: bool,
) -> Result<(), CliError> {
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
pub(super) fn standalone_cache(cache_dir: Option<&Path>) -> Result<Cache, CliError> {
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

pub(super) fn io_err(context: &str) -> impl Fn(std::io::Error) -> CliError + '_ {
    move |source| CliError::Io { context: context.to_string(), source }
}
