//! Where a pipeline's project, cache and run directory are, and the project's own settings
//! (`sdpipe.toml` at its root).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::spec::remote_settings::RemoteSettings;
use crate::spec::{SourceFile, Span, SpecError};

/// `sdpipe.toml`: what every pipeline of the project shares. Empty (or absent) is valid: the
/// file's first job is to mark the project root.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectSettings {
    /// The shared remote cache (`[remote]`, the fields of a pipeline's `remote:`).
    pub remote: Option<RemoteSettings>,
}

/// Resolved locations for one pipeline file.
#[derive(Debug, Clone)]
pub struct Project {
    /// The project root: the nearest ancestor of the pipeline holding `sdpipe.toml` or `.git`,
    /// else the pipeline's own directory.
    pub root: PathBuf,
    pub cache_dir: PathBuf,
    /// `runs/<pipeline name>/`: where outputs are materialised for people.
    pub runs_dir: PathBuf,
    /// The pipeline file relative to the root (`pipelines/hello.yaml`): names stage identities
    /// in the cache without depending on where the project lives.
    pub pipeline_rel: String,
}

/// The directory under `runs/` for a pipeline file: its stem, unless that is not a plain
/// directory name. `...yaml` has the stem `..`, and `runs/..` is the project root, where
/// replacing a stage's run directory would delete a project directory of the same name (a stage
/// `src` would replace `src/`); such files use their whole file name instead.
fn run_dir_name(pipeline_file: &Path) -> String {
    let stem =
        pipeline_file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    if matches!(stem.as_str(), "" | "." | "..") {
        let file =
            pipeline_file.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        if !matches!(file.as_str(), "" | "." | "..") {
            return file;
        }
        return "pipeline".to_string();
    }
    stem
}

impl Project {
    /// `cache_override` is `--cache-dir` or `SDPIPE_CACHE`.
    pub fn locate(pipeline_file: &Path, cache_override: Option<&Path>) -> Project {
        let dir = pipeline_file.parent().unwrap_or(Path::new("/"));
        let root = dir
            .ancestors()
            .find(|d| d.join("sdpipe.toml").exists() || d.join(".git").exists())
            .unwrap_or(dir)
            .to_path_buf();
        let pipeline_rel = pipeline_file
            .strip_prefix(&root)
            .unwrap_or(pipeline_file)
            .to_string_lossy()
            .into_owned();
        let name = run_dir_name(pipeline_file);
        Project {
            cache_dir: cache_override.map(Path::to_path_buf).unwrap_or_else(|| root.join("cache")),
            runs_dir: root.join("runs").join(name),
            root,
            pipeline_rel,
        }
    }

    /// The project's `sdpipe.toml`, parsed; an error points at the offending line.
    pub fn settings(&self) -> Result<ProjectSettings, SpecError> {
        let path = self.root.join("sdpipe.toml");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ProjectSettings::default())
            }
            Err(e) => {
                return Err(SpecError::unlocated(format!("cannot read {}: {e}", path.display())))
            }
        };
        toml::from_str(&text).map_err(|e| {
            let message = e.message().trim_end().to_string();
            let source = Arc::new(SourceFile::new(path.display().to_string(), text.clone()));
            match e.span() {
                Some(r) => SpecError::at(&source, Span { offset: r.start, len: r.len() }, message),
                None => SpecError::unlocated(format!("{}: {message}", path.display())),
            }
        })
    }

    /// The cache's name for a stage across runs.
    pub fn identity(&self, stage: &str) -> String {
        format!("{}#{stage}", self.pipeline_rel)
    }
}
