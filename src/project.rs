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

    /// The cache's name for a stage across runs.
    pub fn identity(&self, stage: &str) -> String {
        format!("{}#{stage}", self.pipeline_rel)
    }
}
