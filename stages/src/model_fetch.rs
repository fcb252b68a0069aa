//! Resolving a hub model for a kind: local folder, Hugging Face cache, then the hub, with the
//! downloads shown on the stage's progress and stopped by its cancellation when the kind may
//! fetch ([`Fetch::Allowed`], in `run`), and nothing downloaded when it may not
//! ([`Fetch::LocalOnly`], while the engine computes keys).

use sdpipe_hub::{FnObserver, HubConfig, HubError, ResolvedModel, Want};

use crate::api::{Downloads, Fetch, StageError};

/// `model` at `revision` with the files `wants` names, as `fetch` allows.
pub fn resolve(
    config: &HubConfig,
    model: &str,
    revision: &str,
    wants: &[Want<'_>],
    fetch: Fetch,
) -> Result<ResolvedModel, HubError> {
    match fetch {
        Fetch::Allowed { progress, cancel } => {
            let downloads = Downloads::new(progress, cancel);
            let observer = FnObserver {
                started: |file: &str, bytes| downloads.started(file, bytes),
                advanced: |bytes| downloads.advanced(bytes),
                should_stop: || downloads.should_stop(),
            };
            sdpipe_hub::resolve_observed(config, model, revision, wants, &observer)
        }
        Fetch::LocalOnly => sdpipe_hub::resolve_local(config, model, revision, wants),
    }
}

/// A resolution failure as the stage reports it: a model not yet local is
/// [`StageError::NotLocal`] (the engine then says `run` will download it); a repository without
/// the safetensors file `weights` says how to convert one that has only `pytorch_model.bin`.
pub fn stage_error(e: HubError, weights: &str) -> StageError {
    let note = match &e {
        HubError::NotLocal { .. } => return StageError::NotLocal(e.to_string()),
        HubError::NotFound { .. } if e.to_string().contains(weights) => {
            "\n  note: sdpipe loads safetensors weights only; a model with only \
             pytorch_model.bin must be converted first (transformers: \
             `model.save_pretrained(dir, safe_serialization=True)`)"
        }
        _ => "",
    };
    StageError::failed(format!("{e}{note}"))
}
