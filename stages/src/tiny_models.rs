//! What the toy-model kinds share: `tiny-sd` (sdpipe-diffusion), which writes a random-weight
//! Stable Diffusion pipeline, and `tiny-clip` (sdpipe-metrics), which writes a random-weight
//! CLIP. Both exist so that pipelines run offline, and both need the same two things, owned
//! here so that there is one implementation of each:
//!
//! - **A small CLIP-format BPE vocabulary** ([`BpeVocab::learn`] over [`CAPTION_CORPUS`]): CLIP's
//!   layout — the 256 byte symbols in CLIP's order ([`byte_symbols`]), the same with `</w>`,
//!   one token per merge, then [`BOS`] and [`EOS`] — with merges learned the classic way:
//!   repeatedly merge the most frequent adjacent pair (ties broken by the pair's text), words
//!   ending in `</w>`, until every corpus word is one token. That is what CLIP's 49k merges do
//!   for common English words, and it matters: a caption split into letters gives a tiny
//!   random text encoder almost nothing a UNet can condition on (a colour spread over six
//!   letter tokens differs from another by ~5% of the hidden states), while one token per word
//!   gives each colour its own embedding.
//! - **Weights initialised as PyTorch initialises the layers** ([`Recorder`]): a candle
//!   `VarBuilder` backend that makes up each tensor a module asks for and remembers it, so
//!   building a model's candle modules enumerates exactly the tensors its loader reads (no
//!   hand-maintained tensor list). Values follow PyTorch's and transformers' defaults:
//!   `nn.Linear`/`nn.Conv2d` weights and biases uniform in ±1/√fan_in (kaiming-uniform with
//!   a = √5 for weights), norms at the identity, embeddings with transformers' std 0.02 and
//!   CLIP's class embedding with std hidden^-½ (as uniforms of that std). Every value depends
//!   only on (seed, component, tensor name) — one ChaCha stream per tensor, IEEE basic
//!   arithmetic — so the bytes are identical on every platform and a tensor's values do not
//!   depend on which other tensors exist.
//!
//! What each kind writes from these (SD1.5's `vocab.json`/`merges.txt` or transformers'
//! `tokenizer.json`, its configs and weight files) stays in its own crate. The code lives here
//! because sdpipe-metrics does not depend on sdpipe-diffusion; both depend on this crate.
//!
//! Both kinds' output bytes depend on this module (and are cached by the engine under the
//! kinds' versions): a change to any value it produces changes every tiny model, and needs
//! both kinds' `version()` raised.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ------------------------------------------------------------------------------ vocabulary

/// Words the tiny vocabularies learn their merges from: the register of SD captions, and the
/// words of the `synthetic` kind's scene grammar (colours, shapes, relations, styles), which
/// the demo's captions are written in.
pub const CAPTION_CORPUS: &str = "there is a photo of a man and a woman standing on a beach at \
    sunset there are two dogs playing in the grass near a house with a red door \
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

/// CLIP's start-of-text token, the second-to-last of the vocabulary.
pub const BOS: &str = "<|startoftext|>";
/// CLIP's end-of-text token (also its padding and unknown token), the last of the vocabulary.
pub const EOS: &str = "<|endoftext|>";

/// A CLIP-layout BPE vocabulary: `tokens[i]` has id `i`; `merges` in rank order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BpeVocab {
    pub tokens: Vec<String>,
    pub merges: Vec<(String, String)>,
}

impl BpeVocab {
    /// Learn up to `max_merges` merges from the whitespace-separated words of `corpus` (fewer
    /// once every corpus word is a single token; `usize::MAX` for exactly that many).
    pub fn learn(corpus: &str, max_merges: usize) -> BpeVocab {
        let (symbols, vocab_order) = byte_symbols();
        let mut counts: BTreeMap<Vec<String>, usize> = BTreeMap::new();
        for word in corpus.split_whitespace() {
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
            let mut merged: BTreeMap<Vec<String>, usize> = BTreeMap::new();
            for (word, n) in counts {
                *merged.entry(merge_word(&word, &best)).or_default() += n;
            }
            counts = merged;
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
        BpeVocab { tokens, merges }
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Never: a vocabulary has at least the byte symbols and the two special tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn bos_id(&self) -> usize {
        self.tokens.len() - 2
    }

    pub fn eos_id(&self) -> usize {
        self.tokens.len() - 1
    }
}

/// `word` with every non-overlapping occurrence of `pair` (left to right) made one symbol.
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

// --------------------------------------------------------------------------------- weights

/// A [`SimpleBackend`] that makes up each tensor a module asks for (deterministically, see the
/// module docs) and remembers it, so building candle modules against it enumerates their
/// weights. [`Recorder::record`] runs the build and returns the tensors by name.
pub struct Recorder {
    seed: u64,
    component: String,
    contains: fn(&str) -> bool,
    state: Arc<Mutex<Recorded>>,
}

#[derive(Default)]
struct Recorded {
    tensors: BTreeMap<String, Tensor>,
    /// Layer prefix (`…conv_in.`) → fan_in of its weight, for the matching bias's bound.
    fan_in: HashMap<String, usize>,
}

impl Recorder {
    /// Tensors of `component` (which names their streams, with the seed and each tensor's
    /// name). `contains` answers candle's `contains_tensor`, which some modules ask to choose
    /// between namings or optional tensors; the answer is the checkpoint layout being written.
    pub fn new(seed: u64, component: &str, contains: fn(&str) -> bool) -> Recorder {
        Recorder { seed, component: component.into(), contains, state: Arc::default() }
    }

    /// Run `build` against a recording `VarBuilder` (f32, CPU) and return every tensor it
    /// asked for.
    pub fn record<E>(
        self,
        build: impl FnOnce(VarBuilder) -> Result<(), E>,
    ) -> Result<BTreeMap<String, Tensor>, E> {
        let state = self.state.clone();
        let backend: Box<dyn SimpleBackend> = Box::new(self);
        build(VarBuilder::from_backend(backend, DType::F32, Device::Cpu))?;
        let mut state = state.lock().expect("recorder lock");
        Ok(std::mem::take(&mut state.tensors))
    }
}

impl SimpleBackend for Recorder {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _hint: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut state = self.state.lock().expect("recorder lock");
        if let Some(t) = state.tensors.get(name) {
            if t.shape() != &shape {
                candle_core::bail!("{name} requested as {shape:?} and as {:?}", t.shape());
            }
            return t.to_dtype(dtype)?.to_device(device);
        }
        let dims = shape.dims().to_vec();
        let prefix = name.trim_end_matches("weight").trim_end_matches("bias").to_string();
        let fan_in = if dims.len() >= 2 {
            let fan_in = dims[1..].iter().product();
            state.fan_in.insert(prefix, fan_in);
            fan_in
        } else {
            // candle's layers request a weight before its bias; a lone vector falls back to
            // its own length.
            state.fan_in.get(&prefix).copied().unwrap_or(dims.first().copied().unwrap_or(1))
        };
        let values = init_values(self.seed, &self.component, name, &dims, fan_in);
        let tensor = Tensor::from_vec(values, shape, &Device::Cpu)?;
        state.tensors.insert(name.to_string(), tensor.clone());
        tensor.to_dtype(dtype)?.to_device(device)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let state = self.state.lock().expect("recorder lock");
        match state.tensors.get(name) {
            Some(t) => t.to_dtype(dtype)?.to_device(device),
            None => candle_core::bail!("{name} was never requested"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        (self.contains)(name)
    }
}

/// The initial values of one tensor, from the seed, its component, name and shape alone
/// (`fan_in`: of the layer it belongs to).
fn init_values(seed: u64, component: &str, name: &str, dims: &[usize], fan_in: usize) -> Vec<f32> {
    let numel: usize = dims.iter().product();
    let leaf = name.rsplit('.').next().unwrap_or(name);
    let layer = name.rsplit('.').nth(1).unwrap_or("");
    // Norm layers (the only 1-d weights besides biases and CLIP's class embedding): weight 1,
    // bias 0, as PyTorch.
    if dims.len() == 1 && layer.contains("norm") {
        let value = if leaf == "weight" { 1.0 } else { 0.0 };
        return vec![value; numel];
    }
    let bound = if leaf == "class_embedding" {
        // transformers initialises CLIP's class embedding N(0, hidden^-1): a uniform of that std.
        (3.0 / numel.max(1) as f32).sqrt()
    } else if layer.ends_with("_embedding") && layer != "patch_embedding" {
        // transformers initialises CLIP's token and position embeddings N(0, 0.02²).
        0.02 * 3f32.sqrt()
    } else {
        // PyTorch's Linear/Conv2d default (CLIP's patch embedding is a Conv2d):
        // kaiming_uniform(a=√5) for weights and U(±1/√fan_in) for biases — both bounded by
        // 1/√fan_in.
        1.0 / (fan_in.max(1) as f32).sqrt()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(stream_seed(seed, component, name));
    (0..numel)
        .map(|_| {
            // 24 random bits → an exact f32 in [0, 1), then scaled to [-bound, bound).
            let unit = (rng.next_u32() >> 8) as f32 * (1.0 / 16_777_216.0);
            (2.0 * unit - 1.0) * bound
        })
        .collect()
}

/// FNV-1a over (component, name) mixed with the seed: one independent ChaCha stream per tensor,
/// so a tensor's values do not depend on which other tensors exist or their order.
fn stream_seed(seed: u64, component: &str, name: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in component.bytes().chain([b'/']).chain(name.bytes()) {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vocabulary_has_clips_layout() {
        let vocab = BpeVocab::learn(CAPTION_CORPUS, usize::MAX);
        let (by_byte, order) = byte_symbols();
        assert_eq!(by_byte[b'a' as usize], 'a');
        assert_eq!(by_byte[b' ' as usize], 'Ġ');
        assert_eq!(vocab.tokens[0], "!");
        assert_eq!(vocab.tokens[256], format!("{}</w>", order[0]));
        assert_eq!(
            (vocab.tokens[vocab.bos_id()].as_str(), vocab.tokens[vocab.eos_id()].as_str()),
            (BOS, EOS)
        );
        // Every corpus word became one token: merging stopped by itself.
        for word in CAPTION_CORPUS.split_whitespace() {
            assert!(vocab.tokens.contains(&format!("{word}</w>")), "{word}");
        }
        let capped = BpeVocab::learn(CAPTION_CORPUS, 10);
        assert_eq!(capped.merges[..], vocab.merges[..10]);
    }

    #[test]
    fn a_tensors_values_depend_only_on_seed_component_and_name() {
        let build = |seed: u64, first: &str| {
            Recorder::new(seed, "c", |_| false)
                .record(|vb| {
                    vb.get((3, 4), first)?;
                    vb.get((3, 4), "b.weight")?;
                    vb.get(3, "b.bias")?;
                    vb.get(4, "b.norm.weight").map(|_| ())
                })
                .unwrap()
        };
        let values = |t: &BTreeMap<String, Tensor>, name: &str| {
            t[name].flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let (one, other, reseeded) =
            (build(0, "a.weight"), build(0, "z.weight"), build(1, "a.weight"));
        assert_eq!(values(&one, "b.weight"), values(&other, "b.weight"));
        assert_ne!(values(&one, "b.weight"), values(&reseeded, "b.weight"));
        // Weight and bias bounded by 1/√fan_in; norms at the identity.
        assert!(values(&one, "b.bias").iter().all(|v| v.abs() < 0.5));
        assert_eq!(values(&one, "b.norm.weight"), vec![1.0; 4]);
    }
}
