//! Where a pipeline's project, cache and run directory are.

use std::path::{Path, PathBuf};

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
        let name =
            pipeline_file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Project {
            cache_dir: cache_override.map(Path::to_path_buf).unwrap_or_else(|| root.join("cache")),
            runs_dir: root.join("runs").join(name),
            root,
            pipeline_rel,
        }
    }

    /// The cache's name for a stage across runs.
    pub fn identity(&self, stage: &str) -> String {
        format!("{}#{stage}", self.pipeline_rel)
    }
}
