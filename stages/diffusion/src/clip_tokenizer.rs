//! CLIP's byte-level BPE tokenizer, as transformers' `CLIPTokenizer` runs it, built with the
//! `tokenizers` crate from a pipeline's `tokenizer/vocab.json` + `merges.txt` (what SD1.5 and
//! other older repos ship) or from the BPE model inside `tokenizer/tokenizer.json` (all that
//! transformers 5's `save_pretrained` writes). Both become the same pipeline below: the file
//! only supplies the vocabulary and the merges.
//!
//! The pieces are transformers' (5.x `CLIPTokenizer`, identical to 4.x `CLIPTokenizerFast`):
//! normalise (NFC, runs of whitespace → one space, lowercase); split on CLIP's regex
//! (`<|startoftext|>`, `<|endoftext|>`, English contractions, letter runs, single digits,
//! other-symbol runs; whitespace dropped); byte-level map; BPE with `</w>` marking each word's
//! end; `<|startoftext|> … <|endoftext|>`; truncate to `model_max_length` and pad to it with the
//! pad token. SD1.5 pads with `<|endoftext|>`, SD2 with `!`: the pad token is read from
//! `tokenizer_config.json`, never assumed.
//!
//! transformers 4's *slow* `CLIPTokenizer` cleaned text with `ftfy` (or a BERT-style basic
//! tokenizer) instead of NFC; the two agree on ordinary prompts and can differ on unusual
//! Unicode. sdpipe matches the fast one, which is what transformers 5 ships.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior,
    Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::error::PipelineError;

/// CLIP's pre-tokenisation pattern (OpenAI's `simple_tokenizer.py`, as transformers uses it).
pub const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A special token as `tokenizer_config.json` declares it (a string or an `AddedToken` object).
#[derive(Debug, Clone, PartialEq)]
struct SpecialToken {
    content: String,
    normalized: bool,
    lstrip: bool,
    rstrip: bool,
    single_word: bool,
}

impl SpecialToken {
    fn parse(value: &Value) -> Option<SpecialToken> {
        match value {
            Value::String(s) => Some(SpecialToken {
                content: s.clone(),
                normalized: false,
                lstrip: false,
                rstrip: false,
                single_word: false,
            }),
            Value::Object(map) => {
                let flag = |k: &str| map.get(k).and_then(Value::as_bool).unwrap_or(false);
                Some(SpecialToken {
                    content: map.get("content")?.as_str()?.to_string(),
                    normalized: flag("normalized"),
                    lstrip: flag("lstrip"),
                    rstrip: flag("rstrip"),
                    single_word: flag("single_word"),
                })
            }
            _ => None,
        }
    }

    fn plain(content: &str) -> SpecialToken {
        SpecialToken::parse(&Value::String(content.into())).expect("a string parses")
    }

    fn added(&self) -> AddedToken {
        AddedToken::from(self.content.clone(), true)
            .normalized(self.normalized)
            .lstrip(self.lstrip)
            .rstrip(self.rstrip)
            .single_word(self.single_word)
    }
}

/// A ready CLIP tokenizer: `encode` gives exactly `model_max_length` ids per prompt.
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    pad_id: u32,
    bos_id: u32,
    eos_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("max_length", &self.max_length)
            .field("pad_id", &self.pad_id)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

impl ClipTokenizer {
    /// Load from a `tokenizer/` folder: `vocab.json` + `merges.txt`, or else `tokenizer.json`,
    /// and (optional, but every SD1.x pipeline has them) `tokenizer_config.json` and
    /// `special_tokens_map.json`.
    pub fn from_dir(dir: &Path) -> Result<ClipTokenizer, PipelineError> {
        let bpe = BpeFiles::find(dir)?;
        let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let special_map = read_optional_json(&dir.join("special_tokens_map.json"))?;
        let token = |key: &str, default: &str| -> SpecialToken {
            [&config, &special_map]
                .into_iter()
                .find_map(|source| source.get(key).and_then(SpecialToken::parse))
                .unwrap_or_else(|| SpecialToken::plain(default))
        };
        let bos = token("bos_token", "<|startoftext|>");
        let eos = token("eos_token", "<|endoftext|>");
        let unk = token("unk_token", "<|endoftext|>");
        let pad = token("pad_token", "<|endoftext|>");
        // transformers' default for CLIP is 77; configs without the key (or with its
        // "very large" sentinel) get the text encoder's 77 positions.
        let max_length = config
            .get("model_max_length")
            .and_then(Value::as_u64)
            .filter(|&n| n > 0 && n <= 4096)
            .unwrap_or(77) as usize;

        let bad = |message: String| PipelineError::Tokenizer { path: dir.to_path_buf(), message };
        let model = bpe
            .builder()?
            .unk_token(unk.content.clone())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .fuse_unk(false)
            .build()
            .map_err(|e| bad(format!("{}: {e}", bpe.describe())))?;
        let mut tokenizer = Tokenizer::new(model);
        let whitespace = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(|e| bad(e.to_string()))?;
        tokenizer
            .with_normalizer(Some(NormalizerSequence::new(vec![
                NFC.into(),
                whitespace.into(),
                Lowercase.into(),
            ])))
            .map_err(|e| bad(e.to_string()))?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| bad(e.to_string()))?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tokenizer.with_decoder(Some(ByteLevel::default()));

        // transformers registers the special tokens in this order; the first declaration of a
        // content wins (SD1.5's pad token is the eos token again).
        let mut specials: Vec<SpecialToken> = Vec::new();
        for t in [&bos, &eos, &unk, &pad] {
            if !specials.iter().any(|s| s.content == t.content) {
                specials.push(t.clone());
            }
        }
        let added: Vec<AddedToken> = specials.iter().map(SpecialToken::added).collect();
        tokenizer.add_special_tokens(added).map_err(|e| bad(e.to_string()))?;

        let id = |t: &SpecialToken| {
            tokenizer.token_to_id(&t.content).ok_or_else(|| {
                bad(format!("special token {:?} is not in {}", t.content, bpe.describe()))
            })
        };
        let (bos_id, eos_id, pad_id) = (id(&bos)?, id(&eos)?, id(&pad)?);
        tokenizer.with_post_processor(Some(
            RobertaProcessing::new((eos.content.clone(), eos_id), (bos.content.clone(), bos_id))
                .trim_offsets(false)
                .add_prefix_space(false),
        ));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| bad(e.to_string()))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: pad.content.clone(),
        }));
        Ok(ClipTokenizer { tokenizer, max_length, pad_id, bos_id, eos_id })
    }

    /// Token ids of one prompt: BOS, the text's tokens (truncated), EOS, pad to `max_length`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, PipelineError> {
        let encoding = self.tokenizer.encode(text, true).map_err(|e| PipelineError::Tokenizer {
            path: PathBuf::from("tokenizer"),
            message: format!("encoding {text:?}: {e}"),
        })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The sequence length every encoding has (77 for SD).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The number of ids the tokenizer can produce (vocabulary plus added tokens).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}

/// Where a folder's BPE vocabulary and merges are.
enum BpeFiles {
    /// `vocab.json` + `merges.txt`.
    Separate { vocab: PathBuf, merges: PathBuf },
    /// The `model` of a `tokenizer.json`.
    Json(PathBuf),
}

impl BpeFiles {
    /// The separate files when both are there (every tokenizer that has them was saved from
    /// them), else `tokenizer.json`.
    fn find(dir: &Path) -> Result<BpeFiles, PipelineError> {
        let (vocab, merges, json) =
            (dir.join("vocab.json"), dir.join("merges.txt"), dir.join("tokenizer.json"));
        match (vocab.is_file(), merges.is_file(), json.is_file()) {
            (true, true, _) => Ok(BpeFiles::Separate { vocab, merges }),
            (_, _, true) => Ok(BpeFiles::Json(json)),
            (has_vocab, _, false) => Err(PipelineError::Missing {
                path: if has_vocab { merges } else { json },
                hint: "the CLIP tokenizer needs `tokenizer.json`, or `vocab.json` and \
                       `merges.txt`"
                    .into(),
            }),
        }
    }

    fn describe(&self) -> String {
        match self {
            BpeFiles::Separate { .. } => "vocab.json/merges.txt".into(),
            BpeFiles::Json(_) => "tokenizer.json".into(),
        }
    }

    fn builder(&self) -> Result<tokenizers::models::bpe::BpeBuilder, PipelineError> {
        match self {
            BpeFiles::Separate { vocab, merges } => {
                Ok(BPE::builder().vocab_and_merges(read_vocab(vocab)?, read_merges(merges)?))
            }
            BpeFiles::Json(path) => {
                let (vocab, merges) = bpe_of_tokenizer_json(path)?;
                Ok(BPE::builder().vocab_and_merges(vocab, merges))
            }
        }
    }
}

/// The vocabulary and merges of `tokenizer.json`'s `model`, which must be a byte-level BPE
/// with CLIP's `</w>` word ends (anything else is not a CLIP tokenizer and is refused, rather
/// than tokenised differently). Merges are `"a b"` strings in older files, `["a", "b"]` pairs
/// in newer ones.
fn bpe_of_tokenizer_json(
    path: &Path,
) -> Result<(tokenizers::models::bpe::Vocab, tokenizers::models::bpe::Merges), PipelineError> {
    let bad = |message: String| PipelineError::Tokenizer { path: path.to_path_buf(), message };
    let value: Value = crate::config::read_json_at_most(path, crate::config::MAX_TOKENIZER_BYTES)?;
    let model = &value["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(bad(format!("the model is {}, not CLIP's BPE", model["type"])));
    }
    if model["end_of_word_suffix"].as_str() != Some("</w>") {
        return Err(bad("the BPE model has no `</w>` end-of-word suffix: not CLIP's".into()));
    }
    let vocab: tokenizers::models::bpe::Vocab = serde_json::from_value(model["vocab"].clone())
        .map_err(|e| bad(format!("model.vocab: {e}")))?;
    let merges = model["merges"].as_array().ok_or_else(|| bad("no model.merges".into()))?;
    let merges = merges
        .iter()
        .map(|m| match m {
            Value::String(pair) => pair.split_once(' ').map(|(a, b)| (a.into(), b.into())),
            Value::Array(pair) => match pair.as_slice() {
                [Value::String(a), Value::String(b)] => Some((a.clone(), b.clone())),
                _ => None,
            },
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| bad("model.merges: each merge is \"a b\" or [\"a\", \"b\"]".into()))?;
    Ok((vocab, merges))
}

/// `vocab.json`: token → id, as `tokenizers`' `BPE::from_file` reads it; the error names the
/// file.
fn read_vocab(path: &Path) -> Result<tokenizers::models::bpe::Vocab, PipelineError> {
    let value: Value = crate::config::read_json_at_most(path, crate::config::MAX_TOKENIZER_BYTES)?;
    serde_json::from_value(value).map_err(|e| PipelineError::Tokenizer {
        path: path.to_path_buf(),
        message: format!("not a JSON object of token → id: {e}"),
    })
}

/// `merges.txt`: one `a b` pair per line after an optional `#version` line, as `tokenizers`'
/// `BPE::from_file` reads it; the error names the file and the line.
fn read_merges(path: &Path) -> Result<tokenizers::models::bpe::Merges, PipelineError> {
    let bad = |message: String| PipelineError::Tokenizer { path: path.to_path_buf(), message };
    crate::config::check_file_size(path, crate::config::MAX_TOKENIZER_BYTES)?;
    let text = std::fs::read_to_string(path)
        .map_err(|source| PipelineError::Read { path: path.to_path_buf(), source })?;
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("#version") {
            continue;
        }
        match line.split(' ').collect::<Vec<_>>().as_slice() {
            [a, b] => merges.push((a.to_string(), b.to_string())),
            _ => {
                return Err(bad(format!(
                    "line {}: {line:?} is not a merge (two tokens separated by one space)",
                    i + 1
                )))
            }
        }
    }
    Ok(merges)
}

fn read_optional_json(path: &Path) -> Result<Value, PipelineError> {
    if !path.is_file() {
        return Ok(Value::Null);
    }
    crate::config::read_json(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_merges_line_that_is_not_a_pair_is_refused_naming_the_file_and_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "merges.txt", "#version: 0.2\na b\na b c\n");
        let err = read_merges(&path).unwrap_err().to_string();
        assert!(err.contains("merges.txt: bad tokenizer files: line 3: \"a b c\""), "{err}");
    }

    #[test]
    fn merges_are_read_as_tokenizers_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "merges.txt", "#version: 0.2\nt h\nth e</w>\n");
        let merges = read_merges(&path).unwrap();
        assert_eq!(merges, vec![("t".into(), "h".into()), ("th".into(), "e</w>".into())]);
    }

    #[test]
    fn a_vocab_that_is_not_a_token_map_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "vocab.json", r#"{"a": "not an id"}"#);
        let err = read_vocab(&path).unwrap_err().to_string();
        assert!(
            err.contains("vocab.json: bad tokenizer files: not a JSON object of token"),
            "{err}"
        );
    }

    #[test]
    fn a_huge_merges_file_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("merges.txt");
        std::fs::File::create(&path).unwrap().set_len(1 << 40).unwrap();
        let err = read_merges(&path).unwrap_err().to_string();
        assert!(err.contains("1099511627776 bytes, more than"), "{err}");
    }
}
