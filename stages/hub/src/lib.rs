//! Finding a model's files for a stage: a local folder, else the Hugging Face cache, else a
//! download from the hub into that cache.
//!
//! A stage names a model by a *spec*: a path to a folder, or a hub repository id (`org/name`)
//! with a revision. [`resolve_with`] returns the files the stage asked for; the stage reports
//! them from `external_deps()`, so the model's content (not its name) is part of the stage key:
//! swapping the weights behind a name reruns the stage.
//!
//! Order, with reasons:
//! 1. an existing folder: the user pointed at it, so nothing else is consulted;
//! 2. the cache (`refs/<revision>` → snapshot): no network when the files are there, which also
//!    makes runs reproducible offline;
//! 3. the hub (`HF_ENDPOINT`, `HF_TOKEN`), unless `HF_HUB_OFFLINE` is set; `hf-hub` itself
//!    ignores that variable, so it is honoured here, before any request is made.
//!
//! When no place has the model, [`HubError::NotFound`] lists the files needed and every place
//! looked, with what was found there.

mod cache;
mod config;
mod download;
mod error;
mod observe;
pub mod testing;
mod want;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use config::{HubConfig, DEFAULT_ENDPOINT};
pub use error::{HubError, Looked};
pub use observe::{FnObserver, Observer, Quiet};
pub use want::Want;

/// Where a resolved model's files are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A folder the spec named.
    Local,
    /// Already in the Hugging Face cache; no request was made.
    Cache,
    /// Downloaded from the hub into the cache just now (files already cached were reused).
    Hub,
}

/// A model whose wanted files all exist locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModel {
    /// The folder holding the model (a cache snapshot for [`Origin::Cache`] and [`Origin::Hub`]).
    pub root: PathBuf,
    /// Each wanted file present, by its name relative to `root` → its path. For
    /// [`Want::OneOf`] the key is the alternative chosen.
    pub files: BTreeMap<String, PathBuf>,
    pub origin: Origin,
    /// The hub repository id, for cache and hub models.
    pub repo: Option<String>,
    /// The snapshot's commit hash, for cache and hub models.
    pub commit: Option<String>,
}

impl ResolvedModel {
    /// The path of a wanted file, if the model has it.
    pub fn file(&self, name: &str) -> Option<&Path> {
        self.files.get(name).map(PathBuf::as_path)
    }

    /// One line for logs: which model, at which commit, from where.
    pub fn describe(&self) -> String {
        match (&self.repo, &self.commit, self.origin) {
            (Some(repo), Some(commit), Origin::Cache) => {
                format!("{repo}@{} (Hugging Face cache)", short(commit))
            }
            (Some(repo), Some(commit), _) => format!("{repo}@{} (downloaded)", short(commit)),
            _ => format!("{} (local folder)", self.root.display()),
        }
    }
}

fn short(commit: &str) -> &str {
    commit.get(..10).unwrap_or(commit)
}

/// Resolve `spec` at `revision`, requiring every one of `files`, with the environment's
/// configuration ([`HubConfig::from_env`]).
pub fn resolve(spec: &str, revision: &str, files: &[&str]) -> Result<ResolvedModel, HubError> {
    let wants: Vec<Want<'_>> = files.iter().map(|f| Want::File(f)).collect();
    resolve_with(&HubConfig::from_env(), spec, revision, &wants)
}

/// [`resolve_with`] that never touches the network, for a caller that only looks (`sdpipe
/// status`): a hub model the local folder and the cache lack is [`HubError::NotLocal`] when
/// `config` would let a run download it, and [`HubError::NotFound`] as usual when it would not
/// (offline) or when the spec is a folder.
pub fn resolve_local(
    config: &HubConfig,
    spec: &str,
    revision: &str,
    wants: &[Want<'_>],
) -> Result<ResolvedModel, HubError> {
    if config.offline {
        return resolve_with(config, spec, revision, wants);
    }
    let local = HubConfig { offline: true, ..config.clone() };
    match resolve_with(&local, spec, revision, wants) {
        Err(HubError::NotFound { .. }) if matches!(classify(spec), Ok(Spec::Repo(_))) => {
            Err(HubError::NotLocal {
                spec: spec.into(),
                revision: revision.into(),
                cache_dir: config.cache_dir.clone(),
            })
        }
        other => other,
    }
}

/// Resolve `spec` (a folder, or a repository id at `revision`) to the `wants`' files.
pub fn resolve_with(
    config: &HubConfig,
    spec: &str,
    revision: &str,
    wants: &[Want<'_>],
) -> Result<ResolvedModel, HubError> {
    resolve_observed(config, spec, revision, wants, &Quiet)
}

/// [`resolve_with`], telling `observer` about downloads as they happen and stopping them when
/// it says so ([`HubError::Cancelled`]).
pub fn resolve_observed(
    config: &HubConfig,
    spec: &str,
    revision: &str,
    wants: &[Want<'_>],
    observer: &dyn Observer,
) -> Result<ResolvedModel, HubError> {
    match classify(spec)? {
        Spec::Folder(dir) => from_folder(spec, revision, dir, wants),
        Spec::Repo(repo_id) => {
            check_revision(spec, revision)?;
            from_repo(config, spec, repo_id, revision, wants, observer)
        }
        Spec::MissingFolder(dir) => Err(HubError::NotFound {
            spec: spec.to_string(),
            revision: revision.to_string(),
            needed: want::needed(wants),
            looked: vec![Looked::new(format!("local folder {}", dir.display()), "does not exist")],
            hint: "the model looks like a path; check it (repository ids are `org/name`)".into(),
        }),
    }
}

/// What a spec names.
enum Spec<'a> {
    Folder(PathBuf),
    /// Looks like a path (`./x`, `/x`, `a/b/c`) but nothing is there: never sent to the hub.
    MissingFolder(PathBuf),
    Repo(&'a str),
}

fn classify(spec: &str) -> Result<Spec<'_>, HubError> {
    let invalid = |reason: &str| HubError::InvalidSpec { spec: spec.into(), reason: reason.into() };
    if spec.trim().is_empty() {
        return Err(invalid("empty; give a folder or a hub repository id such as `org/name`"));
    }
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(Spec::Folder(absolute(path)));
    }
    if path.is_file() {
        return Err(invalid("is a file; give the folder that holds the model's files"));
    }
    let looks_like_path =
        spec.starts_with(['/', '.', '~']) || spec.contains('\\') || spec.matches('/').count() > 1;
    if looks_like_path {
        return Ok(Spec::MissingFolder(absolute(path)));
    }
    validate_repo_id(spec).map_err(|reason| invalid(&reason))?;
    Ok(Spec::Repo(spec))
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The hub's rules for repository ids (as `huggingface_hub.utils.validate_repo_id` checks them).
fn validate_repo_id(id: &str) -> Result<(), String> {
    if id.len() > 96 {
        return Err("a repository id has at most 96 characters".into());
    }
    if id.contains("--") || id.contains("..") {
        return Err("`--` and `..` are not allowed in a repository id".into());
    }
    for part in id.split('/') {
        let ok_chars = part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if part.is_empty()
            || !ok_chars
            || part.starts_with(['-', '.'])
            || part.ends_with(['-', '.'])
        {
            return Err(format!(
                "not an existing folder, nor a repository id (`name` or `org/name`, letters, \
                 digits, `-`, `_`, `.`): `{part}`"
            ));
        }
    }
    Ok(())
}

fn check_revision(spec: &str, revision: &str) -> Result<(), HubError> {
    let bad = revision.is_empty()
        || revision.starts_with('/')
        || revision.split('/').any(|p| p.is_empty() || p == "." || p == "..")
        || revision.chars().any(|c| c.is_whitespace() || c.is_control());
    if bad {
        return Err(HubError::InvalidSpec {
            spec: spec.into(),
            reason: format!("invalid revision `{revision}` (a branch, tag or commit hash)"),
        });
    }
    Ok(())
}

fn from_folder(
    spec: &str,
    revision: &str,
    dir: PathBuf,
    wants: &[Want<'_>],
) -> Result<ResolvedModel, HubError> {
    let selection = want::select(wants, |name| dir.join(name).is_file());
    if !selection.missing.is_empty() {
        return Err(HubError::NotFound {
            spec: spec.into(),
            revision: revision.into(),
            needed: want::needed(wants),
            looked: vec![Looked::new(
                format!("local folder {}", dir.display()),
                format!("missing {}", selection.missing.join(", ")),
            )],
            hint: "a local folder is used as it is; add the missing files to it".into(),
        });
    }
    let files = selection.chosen.into_iter().map(|name| (name.clone(), dir.join(name)));
    Ok(ResolvedModel {
        files: files.collect(),
        root: dir,
        origin: Origin::Local,
        repo: None,
        commit: None,
    })
}

fn from_repo(
    config: &HubConfig,
    spec: &str,
    repo_id: &str,
    revision: &str,
    wants: &[Want<'_>],
    observer: &dyn Observer,
) -> Result<ResolvedModel, HubError> {
    let mut looked = vec![Looked::new(
        format!("local folder {}", absolute(Path::new(spec)).display()),
        "does not exist",
    )];
    let cache_place = format!("Hugging Face cache {}", config.cache_dir.display());
    match cache::snapshot(&config.cache_dir, repo_id, revision) {
        Ok(snapshot) => {
            let selection = want::select(wants, |name| snapshot.join(name).is_file());
            if selection.missing.is_empty() {
                let commit = snapshot.file_name().map(|c| c.to_string_lossy().into_owned());
                let files = selection.chosen.into_iter().map(|n| (n.clone(), snapshot.join(n)));
                return Ok(ResolvedModel {
                    files: files.collect(),
                    root: snapshot,
                    origin: Origin::Cache,
                    repo: Some(repo_id.into()),
                    commit,
                });
            }
            looked.push(Looked::new(
                cache_place,
                format!("snapshot {} lacks {}", snapshot.display(), selection.missing.join(", ")),
            ));
        }
        Err(finding) => looked.push(Looked::new(cache_place, finding)),
    }
    let hub_place = format!("hub {}", config.endpoint);
    let not_found = |looked, hint: &str| HubError::NotFound {
        spec: spec.into(),
        revision: revision.into(),
        needed: want::needed(wants),
        looked,
        hint: hint.into(),
    };
    if config.offline {
        looked.push(Looked::new(hub_place, "not contacted: HF_HUB_OFFLINE is set"));
        return Err(not_found(
            looked,
            "to fix: run once online (unset HF_HUB_OFFLINE) to fill the cache, or give a local \
             folder holding these files",
        ));
    }
    match download::fetch(config, repo_id, revision, wants, observer)? {
        Ok(fetched) => Ok(ResolvedModel {
            root: fetched.snapshot,
            files: fetched.files.into_iter().collect(),
            origin: Origin::Hub,
            repo: Some(repo_id.into()),
            commit: Some(fetched.commit),
        }),
        Err(finding) => {
            looked.push(Looked::new(hub_place, finding));
            Err(not_found(looked, "to fix: check the repository id and revision"))
        }
    }
}
