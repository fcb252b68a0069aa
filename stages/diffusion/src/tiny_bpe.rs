//! The tiny pipeline's tokenizer files: a small CLIP-format BPE vocabulary, learned by
//! [`sdpipe_stages::tiny_models`] (shared with the `tiny-clip` kind) from its caption corpus,
//! written as the SD1.5 repository has its tokenizer — `vocab.json`, `merges.txt` with a
//! `#version` header, `tokenizer_config.json` and `special_tokens_map.json` — so any CLIP
//! tokenizer reads them; only the merges are fewer. One token per caption word (see the shared
//! module for why that matters to a tiny text encoder).

use std::collections::BTreeMap;
use std::path::Path;

use sdpipe_stages::tiny_models::{BpeVocab, BOS, CAPTION_CORPUS, EOS};
use serde_json::json;

use crate::config::write_json;
use crate::error::PipelineError;

/// The tiny pipeline's vocabulary: up to `max_merges` merges (fewer once every corpus word is a
/// single token).
pub(crate) fn train(max_merges: usize) -> BpeVocab {
    BpeVocab::learn(CAPTION_CORPUS, max_merges)
}

/// Write `vocab.json`, `merges.txt`, `tokenizer_config.json` and `special_tokens_map.json` as
/// the SD1.5 repository has them.
pub(crate) fn write(vocab: &BpeVocab, dir: &Path) -> Result<(), PipelineError> {
    let ids: BTreeMap<&str, usize> =
        vocab.tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    write_json(&dir.join("vocab.json"), &ids)?;
    let mut merges = String::from("#version: 0.2\n");
    for (a, b) in &vocab.merges {
        merges.push_str(&format!("{a} {b}\n"));
    }
    let path = dir.join("merges.txt");
    std::fs::write(&path, merges).map_err(|source| PipelineError::Write { path, source })?;
    let added = |content: &str| {
        json!({"__type": "AddedToken", "content": content, "lstrip": false,
               "normalized": true, "rstrip": false, "single_word": false})
    };
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "add_prefix_space": false,
            "bos_token": added(BOS),
            "do_lower_case": true,
            "eos_token": added(EOS),
            "errors": "replace",
            "model_max_length": 77,
            "pad_token": EOS,
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": added(EOS),
        }),
    )?;
    let plain = |content: &str| {
        json!({"content": content, "lstrip": false, "normalized": true, "rstrip": false,
               "single_word": false})
    };
    write_json(
        &dir.join("special_tokens_map.json"),
        &json!({"bos_token": plain(BOS), "eos_token": plain(EOS), "pad_token": EOS,
                "unk_token": plain(EOS)}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClipTokenizer;

    #[test]
    fn the_words_of_sd_captions_and_of_the_scene_grammar_are_single_tokens() {
        let dir = tempfile::tempdir().unwrap();
        write(&train(2000), dir.path()).unwrap();
        let tokenizer = ClipTokenizer::from_dir(dir.path()).unwrap();
        let caption = "a yellow triangle to the left of a red circle on a purple background, \
                       photographic lighting at dusk";
        // Tokens up to and including the first EOS (padding repeats it).
        let length = |text: &str| {
            let ids = tokenizer.encode(text).unwrap();
            ids.iter().position(|&id| id == tokenizer.eos_id()).unwrap() + 1
        };
        // BOS, one token per word and the comma, EOS: as CLIP's own vocabulary splits it.
        let words = caption.replace(',', " ,").split_whitespace().count();
        assert_eq!(length(caption), words + 2);
        for word in ["orange", "green", "blue", "white", "black", "square", "below", "above"] {
            assert_eq!(length(word), 3, "{word}");
        }
    }
}
