//! The Hugging Face cache layout, shared with the Python `huggingface_hub` library:
//!
//! ```text
//! <cache>/models--org--name/refs/<revision>        the commit hash the revision pointed at
//! <cache>/models--org--name/snapshots/<commit>/…   the repository's files (links into blobs/)
//! <cache>/models--org--name/blobs/<etag>           file contents, named by their etag
//! ```
//!
//! A revision that is itself a commit hash has no ref: its snapshot is looked up directly.

use std::path::{Path, PathBuf};

use crate::error::HubError;

/// `models--org--name`: the repository's folder in the cache.
pub(crate) fn repo_dir(cache_dir: &Path, repo_id: &str) -> PathBuf {
    cache_dir.join(format!("models--{}", repo_id.replace('/', "--")))
}

/// A full 40-character commit hash (which needs no ref).
pub(crate) fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The snapshot folder `revision` points at, or why there is none (a finding for the error).
pub(crate) fn snapshot(cache_dir: &Path, repo_id: &str, revision: &str) -> Result<PathBuf, String> {
    let repo = repo_dir(cache_dir, repo_id);
    if !repo.is_dir() {
        return Err(format!("not cached (no {})", repo.display()));
    }
    let commit = if is_commit_hash(revision) {
        revision.to_string()
    } else {
        let ref_path = repo.join("refs").join(revision);
        match std::fs::read_to_string(&ref_path) {
            Ok(text) => text.trim().to_string(),
            Err(_) => {
                return Err(format!("revision `{revision}` not cached (no {})", ref_path.display()))
            }
        }
    };
    let dir = repo.join("snapshots").join(&commit);
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(format!("snapshot {} is missing", dir.display()))
    }
}

/// Point `refs/<revision>` at `commit`, replacing the file atomically (another process may be
/// reading it).
pub(crate) fn write_ref(
    cache_dir: &Path,
    repo_id: &str,
    revision: &str,
    commit: &str,
) -> Result<(), HubError> {
    if is_commit_hash(revision) {
        return Ok(());
    }
    let path = repo_dir(cache_dir, repo_id).join("refs").join(revision);
    let io = |source| HubError::Io { context: format!("writing {}", path.display()), source };
    // Revisions may contain `/` (branch names), which become folders, as in Python.
    std::fs::create_dir_all(path.parent().expect("refs/<revision> has a parent")).map_err(io)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, commit).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn a_ref_leads_to_its_snapshot() {
        let cache = tempfile::tempdir().unwrap();
        let snap = repo_dir(cache.path(), "org/name").join("snapshots").join(COMMIT);
        std::fs::create_dir_all(&snap).unwrap();
        write_ref(cache.path(), "org/name", "main", COMMIT).unwrap();
        assert_eq!(snapshot(cache.path(), "org/name", "main").unwrap(), snap);
        assert_eq!(snapshot(cache.path(), "org/name", COMMIT).unwrap(), snap);
    }

    #[test]
    fn findings_say_what_is_missing() {
        let cache = tempfile::tempdir().unwrap();
        let err = snapshot(cache.path(), "org/name", "main").unwrap_err();
        assert!(err.contains("models--org--name"), "{err}");
        std::fs::create_dir_all(repo_dir(cache.path(), "org/name")).unwrap();
        let err = snapshot(cache.path(), "org/name", "v2").unwrap_err();
        assert!(err.contains("refs/v2"), "{err}");
    }
}
