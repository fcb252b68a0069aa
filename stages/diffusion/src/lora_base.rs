//! Which base model a LoRA belongs to: a LoRA only means something on the UNet it was trained
//! on, and applied to another one of the same architecture it loads without complaint and draws
//! nonsense. The `train-lora` kind records the base's identity in the LoRA file's safetensors
//! metadata (beside diffusers' own entries, which diffusers ignores), and the `sample` kind
//! checks it before merging.
//!
//! The identity is the blake3 digest of the base UNet's weight files as the pipeline reads them
//! (file names and contents, in the pipeline's order), plus the model's name for messages. It
//! is content, not a name: the same weights under another hub id or a local copy match, a
//! retrained or different variant (`fp16` files) does not. LoRA files written elsewhere carry
//! no identity; they are merged with a note in the stage's log.

use std::collections::HashMap;
use std::io::Read;

use crate::error::PipelineError;
use crate::pipeline::SdPipeline;

/// The metadata key of the base UNet's digest.
pub const UNET_DIGEST_KEY: &str = "sdpipe.base_unet_blake3";
/// The metadata key of the base model's name (a hub id, or the folder's name).
pub const MODEL_KEY: &str = "sdpipe.base_model";
/// The most characters of a recorded model name that go into a message.
pub const MAX_NAME: usize = 200;

/// The base model a LoRA was trained on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseIdentity {
    /// How the user named it (a hub id, or the pipeline folder's name); for messages only.
    pub model: String,
    /// [`unet_digest`] of its UNet.
    pub unet_blake3: String,
}

/// What checking a LoRA's base against a pipeline found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseCheck {
    /// The LoRA names this UNet; the identity it records.
    Matches(BaseIdentity),
    /// The LoRA names no base (written by diffusers, kohya, …): merged on trust.
    Unrecorded,
}

/// The blake3 digest of a pipeline's UNet weight files: each file's name and length, then its
/// bytes, in the order the pipeline reads them (shards in index order).
pub fn unet_digest(pipeline: &SdPipeline) -> Result<String, PipelineError> {
    let mut hasher = blake3::Hasher::new();
    for path in pipeline.weight_files("unet")? {
        let io = |source: std::io::Error| PipelineError::Read { path: path.clone(), source };
        let mut file = std::fs::File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        hasher.update(&(name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update(&len.to_le_bytes());
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buffer).map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
    }
    Ok(hasher.finalize().to_hex().to_string())
}

impl BaseIdentity {
    /// The identity of `pipeline`, named `model` in messages.
    pub fn of(pipeline: &SdPipeline, model: &str) -> Result<BaseIdentity, PipelineError> {
        Ok(BaseIdentity { model: model.to_string(), unet_blake3: unet_digest(pipeline)? })
    }

    /// The metadata entries that record it in a LoRA file.
    pub fn metadata(&self) -> [(&'static str, &str); 2] {
        [(MODEL_KEY, self.model.as_str()), (UNET_DIGEST_KEY, self.unet_blake3.as_str())]
    }

    /// The identity a LoRA file's metadata records: none when it records no digest, an error
    /// when the digest is not one (64 hex digits: a damaged or hand-edited file). The name is
    /// cut to [`MAX_NAME`] characters and its control characters blanked: it is read from a
    /// file and only goes into messages.
    pub fn recorded(metadata: &HashMap<String, String>) -> Result<Option<BaseIdentity>, String> {
        let Some(digest) = metadata.get(UNET_DIGEST_KEY) else {
            return Ok(None);
        };
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "the LoRA's `{UNET_DIGEST_KEY}` metadata is not a blake3 digest (64 hex digits)"
            ));
        }
        let model = match metadata.get(MODEL_KEY) {
            Some(name) => {
                name.chars().take(MAX_NAME).map(|c| if c.is_control() { ' ' } else { c }).collect()
            }
            None => "an unnamed model".into(),
        };
        Ok(Some(BaseIdentity { model, unet_blake3: digest.to_ascii_lowercase() }))
    }

    /// Checks a LoRA file's recorded base (its `metadata`) against `pipeline`, named `model`:
    /// an error that says both sides when they differ.
    pub fn check(
        metadata: &HashMap<String, String>,
        pipeline: &SdPipeline,
        model: &str,
    ) -> Result<BaseCheck, String> {
        let Some(recorded) = BaseIdentity::recorded(metadata)? else {
            return Ok(BaseCheck::Unrecorded);
        };
        let here = unet_digest(pipeline).map_err(|e| e.to_string())?;
        if here == recorded.unet_blake3 {
            return Ok(BaseCheck::Matches(recorded));
        }
        Err(format!(
            "the LoRA was trained on {} (UNet weights blake3 {}), but this model ({model}) has \
             other UNet weights (blake3 {here}); sample with the base the LoRA was trained on \
             (the same files: another `variant` counts as other weights)",
            recorded.model,
            short(&recorded.unet_blake3),
            here = short(&here),
        ))
    }
}

/// The first 16 hex digits of a digest (ASCII, checked), enough to tell two apart in a message.
fn short(digest: &str) -> &str {
    digest.get(..16).unwrap_or(digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny::{write_tiny, TinySpec};

    fn tiny(dir: &std::path::Path, seed: u64) -> SdPipeline {
        write_tiny(dir, &TinySpec { seed, ..TinySpec::default() }).unwrap();
        SdPipeline::open(dir).unwrap()
    }

    #[test]
    fn the_same_unet_weights_have_the_same_digest_wherever_they_live() {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let digest = |dir, seed| unet_digest(&tiny(dir, seed)).unwrap();
        assert_eq!(digest(a.path(), 1), digest(b.path(), 1));
        assert_ne!(digest(a.path(), 1), digest(c.path(), 2));
    }

    #[test]
    fn a_lora_recording_its_base_is_checked_against_the_pipeline() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (base, other) = (tiny(a.path(), 1), tiny(b.path(), 2));
        let identity = BaseIdentity::of(&base, "tiny-base").unwrap();
        let metadata: HashMap<String, String> =
            identity.metadata().iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(BaseIdentity::check(&metadata, &base, "here"), Ok(BaseCheck::Matches(identity)));
        let refused = BaseIdentity::check(&metadata, &other, "other-model").unwrap_err();
        assert!(refused.contains("trained on tiny-base"), "{refused}");
        assert!(refused.contains("this model (other-model)"), "{refused}");
    }

    #[test]
    fn a_damaged_digest_or_an_overlong_name_is_refused_or_cut_without_panicking() {
        let a = tempfile::tempdir().unwrap();
        let pipeline = tiny(a.path(), 1);
        let damaged = format!("a{}", "é".repeat(40));
        let metadata = HashMap::from([(UNET_DIGEST_KEY.to_string(), damaged)]);
        let refused = BaseIdentity::check(&metadata, &pipeline, "m").unwrap_err();
        assert!(refused.contains("not a blake3 digest"), "{refused}");
        let metadata = HashMap::from([
            (UNET_DIGEST_KEY.to_string(), "0".repeat(64)),
            (MODEL_KEY.to_string(), "x".repeat(100_000)),
        ]);
        let recorded = BaseIdentity::recorded(&metadata).unwrap().unwrap();
        assert_eq!(recorded.model.len(), MAX_NAME);
        let refused = BaseIdentity::check(&metadata, &pipeline, "m").unwrap_err();
        assert!(refused.len() < 1000, "{refused}");
    }

    #[test]
    fn a_lora_without_a_recorded_base_is_merged_on_trust() {
        let a = tempfile::tempdir().unwrap();
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        assert_eq!(
            BaseIdentity::check(&metadata, &tiny(a.path(), 1), "m"),
            Ok(BaseCheck::Unrecorded)
        );
    }
}
