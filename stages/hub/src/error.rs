//! What can go wrong when resolving a model, worded for the person who has to fix it.

use std::fmt;

/// One place the resolver looked for a model, and what it found there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Looked {
    /// E.g. `local folder /data/blip`, `Hugging Face cache /root/.cache/huggingface/hub`.
    pub place: String,
    /// E.g. `does not exist`, `missing model.safetensors`.
    pub finding: String,
}

impl Looked {
    pub(crate) fn new(place: impl Into<String>, finding: impl Into<String>) -> Looked {
        Looked { place: place.into(), finding: finding.into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The model spec is neither an existing folder nor a well-formed repository id.
    #[error("invalid model `{spec}`: {reason}")]
    InvalidSpec { spec: String, reason: String },

    /// No place had every required file.
    #[error("{}", NotFoundMessage(self))]
    NotFound {
        spec: String,
        revision: String,
        /// Every file the caller needs (alternatives written `a (or b)`).
        needed: Vec<String>,
        /// Every place looked, in order.
        looked: Vec<Looked>,
        /// What the user can do about it.
        hint: String,
    },

    /// From [`crate::resolve_local`]: not in the cache, and a run would download it.
    #[error(
        "model `{spec}` (revision `{revision}`) is not in the Hugging Face cache ({}) yet; \
         `sdpipe run` will download it",
        cache_dir.display()
    )]
    NotLocal { spec: String, revision: String, cache_dir: std::path::PathBuf },

    /// The caller stopped a download (Ctrl-C). The partial file resumes next time.
    #[error("downloading `{file}` of `{repo}`: stopped (the next run resumes the download)")]
    Cancelled { repo: String, file: String },

    /// The hub was reachable in principle but a request failed (network, server error).
    #[error("downloading {what} of `{repo}` from {endpoint}: {message}")]
    Download { repo: String, endpoint: String, what: String, message: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

struct NotFoundMessage<'a>(&'a HubError);

impl fmt::Display for NotFoundMessage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let HubError::NotFound { spec, revision, needed, looked, hint } = self.0 else {
            unreachable!("only used for NotFound")
        };
        write!(
            f,
            "model `{spec}` (revision `{revision}`) not found; it needs: {}",
            needed.join(", ")
        )?;
        write!(f, "\n  looked in:")?;
        for l in looked {
            write!(f, "\n  - {}: {}", l.place, l.finding)?;
        }
        if !hint.is_empty() {
            write!(f, "\n  {hint}")?;
        }
        Ok(())
    }
}
