//! Fetching a model's files from the hub into the cache, with the `hf-hub` crate's synchronous
//! client, so the cache it fills is the one Python's `huggingface_hub` fills.
//!
//! The repository's info (its commit and file list) is asked for first: the wanted files are
//! chosen from that list, and every file is then downloaded at that exact commit, so a push to
//! the branch halfway through cannot mix files of two commits.

use std::path::PathBuf;

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use crate::cache;
use crate::config::HubConfig;
use crate::error::HubError;
use crate::want::{self, Want};

/// A model found on the hub, its files now in the cache.
pub(crate) struct Fetched {
    pub snapshot: PathBuf,
    pub commit: String,
    pub files: Vec<(String, PathBuf)>,
}

/// Fetch the wanted files; `Ok(Err(finding))` when the hub answered but lacks the model.
pub(crate) fn fetch(
    config: &HubConfig,
    repo_id: &str,
    revision: &str,
    wants: &[Want<'_>],
) -> Result<Result<Fetched, String>, HubError> {
    let failed = |what: &str, message: String| HubError::Download {
        repo: repo_id.to_string(),
        endpoint: config.endpoint.clone(),
        what: what.to_string(),
        message,
    };
    // `from_cache`, not `new`: `new` finds the home directory itself and panics without one.
    let api = ApiBuilder::from_cache(Cache::new(config.cache_dir.clone()))
        .with_endpoint(config.endpoint.clone())
        .with_token(config.token.clone())
        .with_progress(false)
        .with_retries(2)
        .build()
        .map_err(|e| failed("the repository info", e.to_string()))?;

    let info = match api.repo(repo(repo_id, revision)).info() {
        Ok(info) => info,
        Err(e) => {
            return match refused(&e, config.token.is_some()) {
                Some(finding) => Ok(Err(finding)),
                None => Err(failed("the repository info", e.to_string())),
            }
        }
    };
    let listed: std::collections::BTreeSet<&str> =
        info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let selection = want::select(wants, |name| listed.contains(name));
    if !selection.missing.is_empty() {
        return Ok(Err(format!(
            "the repository (commit {}) has no {}",
            info.sha,
            selection.missing.join(", ")
        )));
    }

    let snapshot = cache::repo_dir(&config.cache_dir, repo_id).join("snapshots").join(&info.sha);
    let pinned = api.repo(repo(repo_id, &info.sha));
    let mut files = Vec::new();
    for name in selection.chosen {
        let cached = snapshot.join(&name);
        let path = if cached.is_file() {
            cached
        } else {
            pinned.download(&name).map_err(|e| failed(&format!("`{name}`"), e.to_string()))?
        };
        files.push((name, path));
    }
    cache::write_ref(&config.cache_dir, repo_id, revision, &info.sha)?;
    // Downloading at a commit makes hf-hub write `refs/<commit>`, which Python never does.
    if !cache::is_commit_hash(revision) {
        let stray = cache::repo_dir(&config.cache_dir, repo_id).join("refs").join(&info.sha);
        let _ = std::fs::remove_file(stray);
    }
    Ok(Ok(Fetched { snapshot, commit: info.sha, files }))
}

fn repo(repo_id: &str, revision: &str) -> Repo {
    Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string())
}

/// The finding for a hub that answered "no such repository or revision" (401/403/404; the hub
/// answers 401 for private and missing repositories alike), `None` for any other failure.
fn refused(error: &ApiError, has_token: bool) -> Option<String> {
    let ApiError::RequestError(inner) = error else { return None };
    let ureq::Error::Status(code, response) = inner.as_ref() else { return None };
    if !matches!(code, 401 | 403 | 404) {
        return None;
    }
    let detail = response
        .header("x-error-message")
        .or(response.header("x-error-code"))
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    let auth = if has_token {
        " (the token was sent; does it grant access?)"
    } else {
        " (if it is private or gated, set HF_TOKEN)"
    };
    Some(format!("repository or revision not found, HTTP {code}{detail}{auth}"))
}
