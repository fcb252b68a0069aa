//! The `tiny-clip` kind through the stage harness: its folder is a model the `cmmd` and
//! `clip-score` kinds load as they load a hub model, the same seed writes the same bytes, its
//! files, tensor names and shapes are those transformers wrote for the parity fixture
//! (`tests/fixtures/clip/model`, a CLIPModel of the same sizes saved by transformers 5.25), and
//! its tokenizer is CLIP's BPE.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use sdpipe_metrics::clip::{Clip, ModelFiles};
use sdpipe_metrics::{kinds, ClipScore, Cmmd, TinyClip};
use sdpipe_stages::api::{Fetch, StageKind};
use sdpipe_stages::testing::{params, Harness};
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/clip")
}

fn fixture_model() -> PathBuf {
    fixtures().join("model")
}

/// A model written by the kind (kept alive with its harness), and its folder.
fn tiny_clip(overrides: &[(&str, Value)]) -> (Harness, PathBuf) {
    let mut h = Harness::new();
    h.run(&TinyClip, &params(&TinyClip, overrides)).unwrap_or_else(|e| panic!("tiny-clip: {e}"));
    let model = h.out_dir().join("model");
    (h, model)
}

fn tiny_clip_err(overrides: &[(&str, Value)]) -> String {
    let mut h = Harness::new();
    h.run(&TinyClip, &params(&TinyClip, overrides)).expect_err("should be refused").to_string()
}

/// The sizes of the parity fixture's CLIPModel (tests/parity/clip.py).
fn fixture_sizes() -> Vec<(&'static str, Value)> {
    vec![
        ("text_hidden_size", json!(32)),
        ("text_layers", json!(2)),
        ("text_heads", json!(4)),
        ("text_intermediate_size", json!(64)),
        ("max_position_embeddings", json!(24)),
        ("vision_hidden_size", json!(32)),
        ("vision_layers", json!(2)),
        ("vision_heads", json!(4)),
        ("vision_intermediate_size", json!(64)),
        ("image_size", json!(32)),
        ("patch_size", json!(4)),
        ("projection_dim", json!(16)),
    ]
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A safetensors file's metadata and (name → (dtype, shape)), read from its header; checks the
/// layout the safetensors library writes (8-byte aligned header, contiguous data in order).
fn safetensors_header(path: &Path) -> (Value, BTreeMap<String, (String, Vec<u64>)>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(n % 8, 0, "{}: header padded to 8 bytes", path.display());
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut metadata = Value::Null;
    let mut tensors = BTreeMap::new();
    let mut offsets = Vec::new();
    for (name, entry) in header {
        if name == "__metadata__" {
            metadata = entry;
            continue;
        }
        let dtype = entry["dtype"].as_str().unwrap().to_string();
        let shape: Vec<u64> =
            entry["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
        let o = entry["data_offsets"].as_array().unwrap();
        offsets.push((o[0].as_u64().unwrap(), o[1].as_u64().unwrap(), name.clone()));
        assert_eq!(
            o[1].as_u64().unwrap() - o[0].as_u64().unwrap(),
            shape.iter().product::<u64>() * 4
        );
        tensors.insert(name, (dtype, shape));
    }
    offsets.sort();
    let mut end = 0;
    for (start, stop, _) in &offsets {
        assert_eq!(*start, end, "contiguous data");
        end = *stop;
    }
    assert_eq!(8 + n as u64 + end, bytes.len() as u64, "no trailing bytes");
    // The data is in name order, as the library orders tensors of one dtype.
    let by_offset: Vec<&String> = offsets.iter().map(|(_, _, n)| n).collect();
    let mut sorted = by_offset.clone();
    sorted.sort();
    assert_eq!(by_offset, sorted);
    (metadata, tensors)
}

/// A `sample`-style output: the fixture images with demo-grammar captions.
fn samples_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let captions = [
        ("wide", "a red circle above a blue square on a yellow background"),
        ("tall", "an orange triangle below a green circle, photographic lighting at dusk"),
        ("small", "a white square to the right of a black triangle on an orange background"),
        ("gray", "a purple circle on a white background"),
        ("square", "A Green Square to the LEFT of a red triangle!"),
    ];
    let mut lines = String::new();
    for (k, (name, caption)) in captions.iter().enumerate() {
        std::fs::copy(
            fixtures().join("images").join(format!("{name}.png")),
            images.join(format!("{name}.png")),
        )
        .unwrap();
        let line = json!({"id": name, "file_name": format!("{name}.png"), "prompt": caption,
                          "seed": k, "k": 0});
        lines.push_str(&format!("{line}\n"));
    }
    std::fs::write(dir.path().join("samples.jsonl"), lines).unwrap();
    dir
}

#[test]
fn the_crate_registers_tiny_clip_with_documented_parameters() {
    let all = kinds();
    let kind = all.iter().find(|k| k.name() == "tiny-clip").expect("registered");
    assert!(kind.params().iter().all(|p| !p.doc.is_empty() && p.default.is_some()));
    assert!(kind.outputs().iter().all(|o| !o.doc.is_empty()));
    assert!(kind.doc().contains("nothing") && kind.doc().contains("semantic"));
    let default =
        |name: &str| kind.params().into_iter().find(|p| p.name == name).unwrap().default.unwrap();
    assert_eq!(default("max_position_embeddings"), json!(77));
}

#[test]
fn the_folder_loads_through_the_cmmd_and_clip_score_kinds_as_a_hub_model_does() {
    let (_model_harness, model) = tiny_clip(&[]);

    // The files the kinds resolve (and key on) from a local folder, as from the hub.
    let kind = ClipScore::default();
    let deps =
        kind.external_deps(&params(&kind, &[("model", json!(model))]), Fetch::LocalOnly).unwrap();
    let names: Vec<&str> = deps.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "model/config.json",
            "model/model.safetensors",
            "model/preprocessor_config.json",
            "model/tokenizer.json"
        ]
    );

    let samples = samples_dir();
    let mut h = Harness::new()
        .input("samples", samples.path().join("images"))
        .input("samples_jsonl", samples.path().join("samples.jsonl"));
    h.threads = 2;
    h.run(&kind, &params(&kind, &[("model", json!(model)), ("batch_size", json!(2))]))
        .unwrap_or_else(|e| panic!("clip-score: {e}"));
    let m = read_json(&h.out_dir().join("metrics.json"));
    assert_eq!(m["metric"], "clip-score");
    assert_eq!(m["n"], 5);
    assert_eq!(m["truncated"], 0);
    assert_eq!(m["model"], "model");
    assert!(m["clip_score"].as_f64().unwrap().is_finite(), "{m}");
    let per_image = std::fs::read_to_string(h.out_dir().join("per_image.jsonl")).unwrap();
    let raw: Vec<f64> = per_image
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["score_raw"].as_f64().unwrap())
        .collect();
    assert_eq!(raw.len(), 5);
    assert!(raw.iter().all(|s| s.is_finite() && s.abs() <= 100.0), "{raw:?}");
    assert!(raw.windows(2).any(|w| w[0] != w[1]), "scores vary with image and caption");

    let kind = Cmmd::default();
    let cmmd = |fake: &Path| {
        let mut h = Harness::new().input("real", fixtures().join("images")).input("fake", fake);
        h.threads = 2;
        h.run(&kind, &params(&kind, &[("model", json!(model)), ("batch_size", json!(2))]))
            .unwrap_or_else(|e| panic!("cmmd: {e}"));
        read_json(&h.out_dir().join("metrics.json"))
    };
    let m = cmmd(&fixtures().join("other"));
    assert_eq!(m["image_size"], 32);
    let value = m["cmmd"].as_f64().unwrap();
    assert!(value.is_finite() && value > 0.0, "two different sets: {value}");
    let same = cmmd(&fixtures().join("images"))["cmmd"].as_f64().unwrap();
    assert!(same.abs() < 1e-9, "a set against itself: {same}");
}

#[test]
fn the_same_seed_writes_identical_bytes_and_another_seed_other_weights() {
    let (_a, first) = tiny_clip(&[("seed", json!(3))]);
    let (_b, again) = tiny_clip(&[("seed", json!(3))]);
    let (_c, other) = tiny_clip(&[("seed", json!(4))]);
    let files = file_names(&first);
    assert_eq!(files, file_names(&again));
    for file in &files {
        let bytes = std::fs::read(first.join(file)).unwrap();
        assert!(bytes == std::fs::read(again.join(file)).unwrap(), "{file} differs");
        let differs = bytes != std::fs::read(other.join(file)).unwrap();
        assert_eq!(differs, file == "model.safetensors", "{file} with another seed");
    }
}

#[test]
fn tensor_names_and_shapes_are_those_transformers_saved_for_the_same_config() {
    let (_h, model) = tiny_clip(&fixture_sizes());
    let (metadata, ours) = safetensors_header(&model.join("model.safetensors"));
    let (want_metadata, mut theirs) =
        safetensors_header(&fixture_model().join("model.safetensors"));
    assert_eq!(metadata, want_metadata);
    assert_eq!(metadata, json!({"format": "pt"}));
    // The vocabulary (the token embedding's rows) is this kind's own; everything else is
    // fixed by the sizes.
    let vocab = read_json(&model.join("config.json"))["text_config"]["vocab_size"].as_u64();
    let token = "text_model.embeddings.token_embedding.weight";
    theirs.get_mut(token).unwrap().1[0] = vocab.unwrap();
    let names: Vec<&String> = ours.keys().collect();
    assert_eq!(names, theirs.keys().collect::<Vec<_>>());
    for (name, entry) in &theirs {
        assert_eq!(&ours[name], entry, "{name}");
    }
    assert_eq!(ours.len(), 78);
    assert_eq!(ours["logit_scale"], ("F32".to_string(), vec![]));

    // LayerNorms at the identity, logit_scale at transformers' initial value.
    let tensors =
        candle_core::safetensors::load(model.join("model.safetensors"), &Device::Cpu).unwrap();
    let norm = tensors["vision_model.pre_layrnorm.weight"].to_vec1::<f32>().unwrap();
    assert!(norm.iter().all(|&v| v == 1.0));
    let scale = tensors["logit_scale"].to_scalar::<f32>().unwrap();
    assert_eq!(scale, 2.6592f32);
}

#[test]
fn config_processor_and_tokenizer_files_are_those_transformers_wrote_for_the_same_sizes() {
    let (_h, model) = tiny_clip(&fixture_sizes());
    assert_eq!(file_names(&model), file_names(&fixture_model()));

    // config.json: equal but for the vocabulary's size and special token ids.
    let ours = read_json(&model.join("config.json"));
    let mut theirs = read_json(&fixture_model().join("config.json"));
    for key in ["vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"] {
        theirs["text_config"][key] = ours["text_config"][key].clone();
    }
    assert_eq!(ours, theirs);
    let vocab = ours["text_config"]["vocab_size"].as_u64().unwrap();
    assert_eq!(ours["text_config"]["bos_token_id"], vocab - 2);
    assert_eq!(ours["text_config"]["eos_token_id"], vocab - 1);

    // Byte for byte, as transformers formats JSON (sorted keys, indent 2, `1e-05`).
    let text = |dir: &Path, file: &str| std::fs::read_to_string(dir.join(file)).unwrap();
    let mut want = text(&fixture_model(), "config.json");
    for (key, fixture_value) in
        [("vocab_size", 577), ("bos_token_id", 575), ("eos_token_id", 576), ("pad_token_id", 576)]
    {
        let (from, to) = (
            format!("\"{key}\": {fixture_value}"),
            format!("\"{key}\": {}", ours["text_config"][key]),
        );
        assert_eq!(want.matches(&from).count(), 1, "{from}");
        want = want.replace(&from, &to);
    }
    assert_eq!(text(&model, "config.json"), want);
    for file in ["preprocessor_config.json", "tokenizer_config.json"] {
        assert_eq!(text(&model, file), text(&fixture_model(), file), "{file}");
    }

    // tokenizer.json: CLIP's pipeline exactly as transformers saved it; only the vocabulary,
    // the merges and so the special tokens' ids are this kind's own.
    let ours = read_json(&model.join("tokenizer.json"));
    let mut theirs = read_json(&fixture_model().join("tokenizer.json"));
    let (bos, eos) = (vocab - 2, vocab - 1);
    theirs["added_tokens"][0]["id"] = json!(bos);
    theirs["added_tokens"][1]["id"] = json!(eos);
    theirs["post_processor"]["cls"][1] = json!(bos);
    theirs["post_processor"]["sep"][1] = json!(eos);
    theirs["model"]["vocab"] = ours["model"]["vocab"].clone();
    theirs["model"]["merges"] = ours["model"]["merges"].clone();
    assert_eq!(ours, theirs);
}

// ------------------------------------------------------------------------------ tokenizer

/// CLIP's byte → character map (`bytes_to_unicode` in openai/CLIP simple_tokenizer.py).
fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap()
            }
        })
        .collect()
}

/// openai/CLIP's `SimpleTokenizer.encode` with `<|startoftext|>`/`<|endoftext|>` around it,
/// over a vocabulary and merge list, for lowercase ASCII text: words are runs of letters,
/// single digits, or runs of other non-space characters; each word's bytes are mapped to
/// characters, `</w>` is appended to the last, and the lowest-ranked adjacent pair is merged
/// until none is in the merge list (`bpe()`).
fn clip_reference_ids(text: &str, vocab: &Value, merges: &[(String, String)]) -> Vec<u64> {
    let rank: BTreeMap<(&str, &str), usize> =
        merges.iter().enumerate().map(|(i, (a, b))| ((a.as_str(), b.as_str()), i)).collect();
    let byte_char = bytes_to_unicode();
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
    let mut words: Vec<String> = Vec::new();
    let class = |c: char| {
        if c.is_alphabetic() {
            0
        } else if c.is_numeric() {
            1
        } else if c.is_whitespace() {
            2
        } else {
            3
        }
    };
    let mut current = String::new();
    for c in text.chars() {
        let same = current.chars().last().is_some_and(|p| class(p) == class(c) && class(c) != 1);
        if !same && !current.is_empty() {
            words.push(std::mem::take(&mut current));
        }
        current.push(c);
    }
    words.push(current);
    let id = |token: &str| vocab[token].as_u64().unwrap_or_else(|| panic!("no token {token}"));
    let mut ids = vec![id("<|startoftext|>")];
    for word in words.into_iter().filter(|w| !w.trim().is_empty()) {
        let mut parts: Vec<String> =
            word.bytes().map(|b| byte_char[b as usize].to_string()).collect();
        parts.last_mut().unwrap().push_str("</w>");
        loop {
            let best = parts
                .windows(2)
                .enumerate()
                .filter_map(|(i, p)| rank.get(&(p[0].as_str(), p[1].as_str())).map(|r| (*r, i)))
                .min();
            let Some((r, _)) = best else { break };
            let (a, b) = &merges[r];
            let mut merged = Vec::new();
            let mut i = 0;
            while i < parts.len() {
                if i + 1 < parts.len() && &parts[i] == a && &parts[i + 1] == b {
                    merged.push(format!("{a}{b}"));
                    i += 2;
                } else {
                    merged.push(parts[i].clone());
                    i += 1;
                }
            }
            parts = merged;
        }
        ids.extend(parts.iter().map(|p| id(p)));
    }
    ids.push(id("<|endoftext|>"));
    ids
}

#[test]
fn captions_encode_to_the_ids_clips_bpe_gives() {
    let (_h, model) = tiny_clip(&[]);
    let clip = Clip::load(
        &ModelFiles {
            config: &model.join("config.json"),
            weights: &model.join("model.safetensors"),
            tokenizer: Some(&model.join("tokenizer.json")),
            root: &model,
        },
        &Device::Cpu,
        true,
    )
    .unwrap();
    let tokenizer = read_json(&model.join("tokenizer.json"));
    let vocab = &tokenizer["model"]["vocab"];
    let merges: Vec<(String, String)> = tokenizer["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m[0].as_str().unwrap().into(), m[1].as_str().unwrap().into()))
        .collect();
    let n = vocab.as_object().unwrap().len() as u64;
    // CLIP's layout: byte symbols in CLIP's order, then with `</w>`, merges, BOS, EOS last.
    assert_eq!(vocab["!"], 0);
    assert_eq!(vocab["!</w>"], 256);
    assert_eq!(vocab["<|startoftext|>"], n - 2);
    assert_eq!(vocab["<|endoftext|>"], n - 1);
    assert_eq!(clip.config.text_config.vocab_size as u64, n);
    assert_eq!(clip.config.text_config.eos_token_id, Some(n as i64 - 1));

    for caption in [
        "a yellow triangle to the left of a red circle on a purple background, photographic \
         lighting at dusk",
        "A  Zebra grazing near 42 bright-orange lamps!!",
        "there is a photo of a man standing on the beach at sunset",
    ] {
        let (ids, cut) = clip.text_ids(caption).unwrap();
        assert!(!cut);
        let ids: Vec<u64> = ids.iter().map(|&i| i as u64).collect();
        assert_eq!(ids, clip_reference_ids(caption, vocab, &merges), "{caption:?}");
    }
    // The demo's captions are one token per word (and per comma), as CLIP's own vocabulary
    // splits them; a word outside the corpus falls apart into pieces.
    let (ids, _) = clip.text_ids("a yellow triangle below a green circle, photographic").unwrap();
    assert_eq!(ids.len(), 2 + 9);
    let (ids, _) = clip.text_ids("zebra").unwrap();
    assert!(ids.len() > 3);
}

// ----------------------------------------------------------------------------- refusals

#[test]
fn invalid_sizes_are_refused_naming_the_parameter() {
    let e = tiny_clip_err(&[("text_hidden_size", json!(30)), ("text_heads", json!(4))]);
    assert!(e.contains("`text_heads`") && e.contains("not a multiple of 4 heads"), "{e}");
    let e = tiny_clip_err(&[("image_size", json!(30))]);
    assert!(e.contains("`patch_size`") && e.contains("image_size 30"), "{e}");
    let e = tiny_clip_err(&[("vision_layers", json!(0))]);
    assert!(e.contains("`vision_layers`") && e.contains("not a positive size"), "{e}");
    let e = tiny_clip_err(&[("vision_hidden_size", json!(1_000_000))]);
    assert!(e.contains("`vision_hidden_size` = 1000000 is outside 1..=16384"), "{e}");
    let e = tiny_clip_err(&[("image_size", json!(4096)), ("patch_size", json!(1))]);
    assert!(e.contains("16777216 patches"), "{e}");
    // Within every cap, but far from tiny: refused before anything is allocated.
    let e = tiny_clip_err(&[
        ("text_hidden_size", json!(16384)),
        ("text_layers", json!(64)),
        ("text_heads", json!(1)),
    ]);
    assert!(e.contains("parameters") && e.contains("at most"), "{e}");
}

#[test]
fn a_bound_clip_input_is_used_instead_of_model_and_is_no_external_dependency() {
    let (_model_harness, model) = tiny_clip(&[]);
    let kind = ClipScore::default();
    // Before inputs are bound, the parameter holds the binding; `model` keeps its hub default,
    // which must not be resolved (it is not in this machine's cache).
    let bound = params(&kind, &[("clip", json!("clip_init.model"))]);
    assert!(kind.external_deps(&bound, Fetch::LocalOnly).unwrap().is_empty());

    let samples = samples_dir();
    let mut h = Harness::new()
        .input("samples", samples.path().join("images"))
        .input("samples_jsonl", samples.path().join("samples.jsonl"))
        .input("clip", &model);
    h.threads = 2;
    h.run(&kind, &bound).unwrap_or_else(|e| panic!("clip-score: {e}"));
    let m = read_json(&h.out_dir().join("metrics.json"));
    assert_eq!(m["model"], "model");
    assert!(m["clip_score"].as_f64().unwrap().is_finite(), "{m}");
}
