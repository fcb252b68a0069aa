//! Fetching a model's files from the hub into the cache, with the `hf-hub` crate's synchronous
//! client, so the cache it fills is the one Python's `huggingface_hub` fills.
//!
//! The repository's info (its commit and file list) is asked for first: the wanted files are
//! chosen from that list, and every file is then downloaded at that exact commit, so a push to
//! the branch halfway through cannot mix files of two commits.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::api::Progress;
use hf_hub::{Cache, Repo, RepoType};

use crate::cache;
use crate::config::HubConfig;
use crate::error::HubError;
use crate::observe::Observer;
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
    observer: &dyn Observer,
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
    let pinned = repo(repo_id, &info.sha);
    let mut files = Vec::new();
    for name in selection.chosen {
        let cached = snapshot.join(&name);
        let path = if cached.is_file() {
            cached
        } else {
            match download(&api, &pinned, &name, observer) {
                Some(result) => result.map_err(|e| failed(&format!("`{name}`"), e.to_string()))?,
                None => {
                    return Err(HubError::Cancelled { repo: repo_id.into(), file: name.clone() })
                }
            }
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

/// A report from a download thread.
enum Report {
    Started(u64),
    Advanced(u64),
}

/// Sends a download thread's progress to the calling thread.
struct Reporter(mpsc::Sender<Report>);

impl Progress for Reporter {
    fn init(&mut self, size: usize, _filename: &str) {
        let _ = self.0.send(Report::Started(size as u64));
    }
    fn update(&mut self, size: usize) {
        let _ = self.0.send(Report::Advanced(size as u64));
    }
    fn finish(&mut self) {}
}

/// Download one file on a thread of its own (see [`crate::observe`]); `None` when the
/// observer stopped it.
fn download(
    api: &Api,
    repo: &Repo,
    name: &str,
    observer: &dyn Observer,
) -> Option<Result<PathBuf, ApiError>> {
    let (reports, received) = mpsc::channel();
    let (done, finished) = mpsc::channel();
    let (api, repo, file) = (api.clone(), repo.clone(), name.to_string());
    std::thread::spawn(move || {
        let result = api.repo(repo).download_with_progress(&file, Reporter(reports));
        let _ = done.send(result);
    });
    // hf-hub announces a file once per request (again on a retry): tell the observer once.
    let mut announced = false;
    loop {
        if observer.should_stop() {
            return None;
        }
        match received.recv_timeout(Duration::from_millis(100)) {
            Ok(Report::Started(bytes)) if !announced => {
                announced = true;
                observer.started(name, bytes);
            }
            Ok(Report::Started(_)) => {}
            Ok(Report::Advanced(bytes)) => observer.advanced(bytes),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // The thread dropped its reporter: it is done (or panicked).
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Some(finished.recv().unwrap_or_else(|_| {
                    Err(ApiError::IoError(std::io::Error::other("the download thread panicked")))
                }));
            }
        }
    }
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
