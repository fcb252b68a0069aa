//! A small CLIP-format BPE vocabulary for tiny pipelines, learned deterministically from a
//! built-in caption-like corpus.
//!
//! The files have CLIP's exact layout — `vocab.json` holding the 256 byte symbols, the same
//! with `</w>`, one token per merge, then `<|startoftext|>` and `<|endoftext|>`; `merges.txt`
//! with a `#version` header — so any CLIP tokenizer reads them; only the merges are fewer.
//! Merges are learned the classic way: repeatedly merge the most frequent adjacent pair
//! (ties broken by the pair's text), words ending in `</w>`, until every corpus word is one
//! token. That is what CLIP's 49k merges do for common English words, and it matters: a
//! caption split into letters gives a tiny random text encoder almost nothing a UNet can
//! condition on (a colour spread over six letter tokens differs from another by ~5% of the
//! hidden states), while one token per word gives each colour its own embedding.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;

use crate::config::write_json;
use crate::error::PipelineError;

/// Words the tiny vocabulary learns its merges from: the register of SD captions, and the
/// words of the `synthetic` kind's scene grammar (colours, shapes, relations, styles), which
/// the demo's captions are written in.
const CORPUS: &str = "there is a photo of a man and a woman standing on a beach at sunset \
    there are two dogs playing in the grass near a house with a red door \
    a cat sitting on a wooden table next to a window in the morning light \
    there is a city street at night with cars and people walking under the lights \
    a mountain lake surrounded by trees with snow on the peaks in the distance \
    there are many flowers in a garden with a stone path and a bench \
    a close up of a bowl of fruit on a kitchen counter with a white wall behind it \
    there is a boat on the water near the shore with birds flying over the sea \
    a person riding a bicycle down a road through a green forest in the summer \
    there is a building with large windows and a blue sky with white clouds above it \
    a red circle above a blue square on a yellow background \
    an orange triangle below a green circle and a purple square to the left of the circle \
    a white square to the right of a black triangle on an orange background \
    photographic lighting at dusk on a flat textured purple background";

pub const BOS: &str = "<|startoftext|>";
pub const EOS: &str = "<|endoftext|>";

pub(crate) struct TinyVocab {
    tokens: Vec<String>,
    merges: Vec<(String, String)>,
}

impl TinyVocab {
    /// Learn up to `max_merges` merges (fewer once every corpus word is a single token).
    pub fn train(max_merges: usize) -> TinyVocab {
        let (symbols, vocab_order) = byte_symbols();
        let mut counts: BTreeMap<Vec<String>, usize> = BTreeMap::new();
        for word in CORPUS.split_whitespace() {
            let mut parts: Vec<String> =
                word.bytes().map(|b| symbols[b as usize].to_string()).collect();
            if let Some(last) = parts.last_mut() {
                last.push_str("</w>");
            }
            *counts.entry(parts).or_default() += 1;
        }
        let mut merges = Vec::new();
        while merges.len() < max_merges {
            let mut pairs: BTreeMap<(String, String), usize> = BTreeMap::new();
            for (word, n) in &counts {
                for pair in word.windows(2) {
                    *pairs.entry((pair[0].clone(), pair[1].clone())).or_default() += n;
                }
            }
            // The most frequent pair; among equals the first in text order (BTreeMap order).
            let Some((best, _)) = pairs.into_iter().fold(None, |best, (pair, n)| match best {
                Some((_, m)) if m >= n => best,
                _ => Some((pair, n)),
            }) else {
                break;
            };
            counts = counts.into_iter().map(|(word, n)| (merge_word(&word, &best), n)).fold(
                BTreeMap::new(),
                |mut acc, (word, n)| {
                    *acc.entry(word).or_default() += n;
                    acc
                },
            );
            merges.push(best);
        }
        let mut tokens: Vec<String> = vocab_order.iter().map(|c| c.to_string()).collect();
        tokens.extend(vocab_order.iter().map(|c| format!("{c}</w>")));
        for (a, b) in &merges {
            let merged = format!("{a}{b}");
            if !tokens.contains(&merged) {
                tokens.push(merged);
            }
        }
        tokens.push(BOS.into());
        tokens.push(EOS.into());
        TinyVocab { tokens, merges }
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn bos_id(&self) -> usize {
        self.tokens.len() - 2
    }

    pub fn eos_id(&self) -> usize {
        self.tokens.len() - 1
    }

    /// Write `vocab.json`, `merges.txt`, `tokenizer_config.json` and `special_tokens_map.json`
    /// as the SD1.5 repository has them.
    pub fn write(&self, dir: &Path) -> Result<(), PipelineError> {
        let vocab: BTreeMap<&str, usize> =
            self.tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
        write_json(&dir.join("vocab.json"), &vocab)?;
        let mut merges = String::from("#version: 0.2\n");
        for (a, b) in &self.merges {
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
}

fn merge_word(word: &[String], pair: &(String, String)) -> Vec<String> {
    let mut out = Vec::with_capacity(word.len());
    let mut i = 0;
    while i < word.len() {
        if i + 1 < word.len() && word[i] == pair.0 && word[i + 1] == pair.1 {
            out.push(format!("{}{}", pair.0, pair.1));
            i += 2;
        } else {
            out.push(word[i].clone());
            i += 1;
        }
    }
    out
}

/// GPT-2/CLIP's reversible byte → printable character map: the printable Latin-1 bytes map to
/// themselves, the other 68 bytes to U+0100 onwards. Returns the map indexed by byte, and the
/// characters in CLIP's vocabulary order (printable bytes first, then the remapped ones).
pub fn byte_symbols() -> (Vec<char>, Vec<char>) {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut order: Vec<u32> = (0..256).filter(|&b| printable(b)).collect();
    let mut symbols: Vec<u32> = order.clone();
    let mut next = 256;
    for b in 0..256 {
        if !printable(b) {
            order.push(b);
            symbols.push(next);
            next += 1;
        }
    }
    let chars: Vec<char> =
        symbols.iter().map(|&s| char::from_u32(s).expect("valid scalar")).collect();
    // `chars[i]` is the character of byte `order[i]`.
    let mut by_byte = vec!['\0'; 256];
    for (b, c) in order.iter().zip(&chars) {
        by_byte[*b as usize] = *c;
    }
    (by_byte, chars)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClipTokenizer;

    #[test]
    fn the_words_of_sd_captions_and_of_the_scene_grammar_are_single_tokens() {
        let dir = tempfile::tempdir().unwrap();
        TinyVocab::train(2000).write(dir.path()).unwrap();
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
