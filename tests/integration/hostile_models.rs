//! Hostile model folders: each case of `tests/hostile/models/` (see its README) is a tiny model
//! folder with a few files changed — configs claiming absurd or inconsistent sizes, truncated or
//! lying safetensors headers, malformed or huge tokenizer files. The cases of `sd/` (changes to
//! the tiny SD pipeline of `tests/fixtures/seed/sd`) are sampled through the real loading path
//! (a `sample` stage whose `model` is the folder), those of `blip/` (changes to
//! `tests/fixtures/blip/model`) captioned (a `caption` stage). Each must fail its stage, not
//! panic, with an error naming the file and the cause, in well under a second.

use crate::common;
use common::*;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Case of `sd/` → (the file the error names, relative to the model folder; part of the cause).
const SD_CASES: &[(&str, &str, &str)] = &[
    ("model_index_huge", "model_index.json", "1073741824 bytes, more than the 16777216"),
    (
        "scheduler_absurd_timesteps",
        "scheduler/scheduler_config.json",
        "`num_train_timesteps` = 1000000000000000 is outside 1..=100000",
    ),
    (
        "text_encoder_absurd_positions",
        "text_encoder/config.json",
        "`max_position_embeddings` = 4000000000 is outside 1..=65536",
    ),
    (
        "text_encoder_vocab_smaller_than_tokenizer",
        "text_encoder/config.json",
        "`vocab_size` = 100 is smaller than the tokenizer's 553 tokens",
    ),
    (
        "text_encoder_weights_header_not_json",
        "text_encoder/model.safetensors",
        "its header is not a JSON object",
    ),
    (
        "text_encoder_width_disagrees_with_weights",
        "text_encoder/config.json",
        "`embeddings.token_embedding.weight` of shape [553, 32], but the weights have [553, 16]",
    ),
    ("text_encoder_zero_heads", "text_encoder/config.json", "`num_attention_heads` = 0 is outside"),
    ("tokenizer_json_huge", "tokenizer/tokenizer.json", "1073741824 bytes, more than the 67108864"),
    (
        "tokenizer_json_malformed",
        "tokenizer/tokenizer.json",
        "not a valid config: EOF while parsing",
    ),
    (
        "tokenizer_json_not_bpe",
        "tokenizer/tokenizer.json",
        "the model is \"WordPiece\", not CLIP's BPE",
    ),
    (
        "tokenizer_longer_than_text_encoder",
        "tokenizer/tokenizer_config.json",
        "prompts are 1000 tokens long",
    ),
    (
        "tokenizer_merges_malformed",
        "tokenizer/merges.txt",
        "line 3: \"this line has three parts\" is not a merge",
    ),
    (
        "tokenizer_vocab_not_json",
        "tokenizer/vocab.json",
        "not a valid config: expected value at line 1",
    ),
    (
        "unet_absurd_channels",
        "unet/config.json",
        "`block_out_channels`[0] = 1000000000 is outside 1..=16384",
    ),
    ("unet_absurd_layers", "unet/config.json", "`layers_per_block` = 4000000000 is outside 1..=64"),
    (
        "unet_absurd_sample_size",
        "unet/config.json",
        "`sample_size` = 1000000000000 is outside 1..=1024",
    ),
    (
        "unet_channels_disagree_with_weights",
        "unet/diffusion_pytorch_model.safetensors",
        "`conv_in.weight` has shape [8, 4, 3, 3], the config implies [16, 4, 3, 3]",
    ),
    ("unet_too_many_blocks", "unet/config.json", "`block_out_channels` lists 100 blocks"),
    ("unet_weights_empty", "unet/diffusion_pytorch_model.safetensors", "0 bytes, too short"),
    (
        "unet_weights_header_length_huge",
        "unet/diffusion_pytorch_model.safetensors",
        "header length field says 18446744073709551615 bytes",
    ),
    (
        "unet_weights_header_past_the_end",
        "unet/diffusion_pytorch_model.safetensors",
        "says 99999999 bytes but only",
    ),
    (
        "unet_weights_offsets_beyond_file",
        "unet/diffusion_pytorch_model.safetensors",
        "the file holds 16 bytes of data: truncated",
    ),
    (
        "unet_weights_pickle_not_a_zip",
        "unet/diffusion_pytorch_model.bin",
        "not a readable PyTorch state dict",
    ),
    (
        "unet_weights_shape_disagrees_with_dtype",
        "unet/diffusion_pytorch_model.safetensors",
        "tensor `conv_in.weight`: shape [8, 4, 3, 3] of F32 is 1152 bytes",
    ),
    (
        "unet_weights_shape_overflows",
        "unet/diffusion_pytorch_model.safetensors",
        "tensor `conv_in.weight`: shape [4294967296, 4294967296, 4294967296]",
    ),
    (
        "vae_absurd_channels",
        "vae/config.json",
        "`block_out_channels`[3] = 1000000000 is outside 1..=16384",
    ),
    (
        "vae_channels_disagree_with_weights",
        "vae/config.json",
        "`encoder.conv_in.weight` of shape [16, 3, 3, 3], but the weights have [8, 3, 3, 3]",
    ),
    ("vae_weights_truncated", "vae/diffusion_pytorch_model.safetensors", "truncated"),
    ("vae_zero_norm_groups", "vae/config.json", "`norm_num_groups` = 0 is outside"),
];

/// Case of `blip/` → (the file the error names, relative to the model folder; part of the cause).
const BLIP_CASES: &[(&str, &str, &str)] = &[
    ("absurd_image_size", "config.json", "`vision_config.image_size` = 1000000000"),
    ("absurd_text_width", "config.json", "`text_config.hidden_size` = 1000000000 is outside"),
    ("config_huge", "config.json", "1073741824 bytes, too large for a model config"),
    ("processor_absurd_size", "processor_config.json", "resizes to 1000000000x1000000000"),
    ("tokenizer_json_malformed", "tokenizer.json", "EOF while parsing"),
    ("weights_header_length_huge", "model.safetensors", "header too large"),
    ("weights_truncated", "model.safetensors", "not fully covered"),
    ("width_disagrees_with_weights", "model.safetensors", "does not match"),
    ("zero_vision_heads", "config.json", "`vision_config.num_attention_heads` = 0 is outside"),
];

/// How long one case may take to be refused (its stage's own time). The tiny model loads and
/// each case is refused in tens of milliseconds; a refusal that reads or allocates from a lying
/// number takes many seconds or runs out of memory. The margin is for a loaded CI machine (two
/// cores shared with the other tests): a refusal once took 1.6 s there, when every error also
/// captured a backtrace.
const STAGE_LIMIT: Duration = Duration::from_secs(3);

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Copies `from` into `to` (files and folders).
fn copy_tree(from: &Path, to: &Path) {
    for entry in walkdir::WalkDir::new(from) {
        let entry = entry.unwrap();
        let dest = to.join(entry.path().strip_prefix(from).unwrap());
        if entry.file_type().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
        } else {
            std::fs::copy(entry.path(), &dest).unwrap();
        }
    }
}

/// RFC 7396: `patch`'s keys replace `target`'s, recursively; a null removes the key.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let map = target.as_object_mut().unwrap();
    for (key, value) in patch {
        if value.is_null() {
            map.remove(key);
        } else {
            merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

fn number_in(path: &Path) -> u64 {
    let text = std::fs::read_to_string(path).unwrap();
    text.trim().parse().unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `base` model folder with the case's files applied, at `to` (the rules are the README's).
fn build_case(base: &Path, case: &Path, to: &Path) {
    copy_tree(base, to);
    for entry in walkdir::WalkDir::new(case).sort_by_file_name() {
        let entry = entry.unwrap();
        if !entry.file_type().is_file() {
            continue;
        }
        let rel = entry.path().strip_prefix(case).unwrap().to_string_lossy().into_owned();
        let rule = |suffix: &str| rel.strip_suffix(suffix).map(|target| to.join(target));
        if let Some(target) = rule(".merge.json") {
            let mut value: Value =
                serde_json::from_str(&std::fs::read_to_string(&target).unwrap()).unwrap();
            let patch: Value =
                serde_json::from_str(&std::fs::read_to_string(entry.path()).unwrap()).unwrap();
            merge_patch(&mut value, &patch);
            std::fs::write(&target, serde_json::to_string_pretty(&value).unwrap()).unwrap();
        } else if let Some(target) = rule(".truncate") {
            let file = std::fs::OpenOptions::new().write(true).open(&target).unwrap();
            file.set_len(number_in(entry.path())).unwrap();
        } else if let Some(target) = rule(".sparse") {
            std::fs::File::create(&target).unwrap().set_len(number_in(entry.path())).unwrap();
        } else if let Some(target) = rule(".delete") {
            std::fs::remove_file(&target).unwrap();
        } else if let Some(target) = rule(".forge.json") {
            let spec: Value =
                serde_json::from_str(&std::fs::read_to_string(entry.path()).unwrap()).unwrap();
            let header = match &spec["header"] {
                Value::String(text) => text.clone(),
                value => value.to_string(),
            };
            let length = spec["header_length"].as_u64().unwrap_or(header.len() as u64);
            let mut bytes = length.to_le_bytes().to_vec();
            bytes.extend(header.as_bytes());
            bytes.resize(bytes.len() + spec["data_bytes"].as_u64().unwrap() as usize, 0);
            std::fs::write(&target, bytes).unwrap();
        } else {
            std::fs::copy(entry.path(), to.join(&rel)).unwrap();
        }
    }
}

/// One corpus: its folder under `tests/hostile/models/`, the model folder its cases change, the
/// stages before the cases', each case's stage (given the case's name and model folder), and the
/// expectations.
struct Corpus {
    dir: &'static str,
    base: &'static str,
    prelude: &'static str,
    stage: fn(&str) -> String,
    cases: &'static [(&'static str, &'static str, &'static str)],
}

/// Runs every case of `corpus` (and the unchanged base model, which must succeed: the cases fail
/// for what they change) as stages of one pipeline, and checks each case's error.
fn replay(corpus: &Corpus) {
    let dir = repo_path("tests/hostile/models").join(corpus.dir);
    let cases: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let listed: BTreeSet<String> = corpus.cases.iter().map(|c| c.0.to_string()).collect();
    assert_eq!(cases, listed, "every case of {} needs an expectation", corpus.dir);

    let p = Project::new();
    let mut pipeline = corpus.prelude.to_string();
    for case in std::iter::once("base").chain(corpus.cases.iter().map(|c| c.0)) {
        let folder = p.path().join("models").join(case);
        if case == "base" {
            copy_tree(&repo_path(corpus.base), &folder);
        } else {
            build_case(&repo_path(corpus.base), &dir.join(case), &folder);
        }
        pipeline.push_str(&(corpus.stage)(case));
    }
    p.write(
        "prompts/test/metadata.jsonl",
        "{\"file_name\": \"a.png\", \"text\": \"a red square\"}\n",
    );
    let photo = repo_path("tests/fixtures/seed/photos/Lm0-_Zx8cVb.jpg");
    std::fs::create_dir_all(p.path().join("photos")).unwrap();
    std::fs::copy(photo, p.path().join("photos/a.jpg")).unwrap();
    p.write("hostile.yaml", &pipeline);

    let started = Instant::now();
    // As a user debugging a failure would run it: with RUST_BACKTRACE set (and no
    // RUST_LIB_BACKTRACE, which scripts/test.sh sets), which must neither bury the cause under
    // library frames nor slow the refusal down.
    let (summary, code) =
        json_of(p.cmd().env("RUST_BACKTRACE", "1").env_remove("RUST_LIB_BACKTRACE").args([
            "run",
            "hostile.yaml",
            "--json",
        ]));
    let elapsed = started.elapsed();
    assert_eq!(code, 1, "{summary:#}");
    assert_eq!(state_of(&summary, "base"), "ran", "the base model runs: {summary:#}");
    let mut wrong = Vec::new();
    for (case, file, cause) in corpus.cases {
        let stage = stage_of(&summary, case);
        let error = stage["error"].as_str().unwrap_or_default();
        let named = p.path().join("models").join(case).join(file);
        // Null for a case refused while planning (opening the folder), before the stage ran.
        let ms = stage["duration_ms"].as_u64().unwrap_or(0);
        if stage["state"] != "failed" {
            wrong.push(format!("{case}: {} instead of failed", stage["state"]));
        } else if error.contains("panicked") {
            wrong.push(format!("{case}: the stage panicked: {error}"));
        } else if error.contains("Error::bt") || error.contains("backtrace") {
            wrong.push(format!("{case}: the error carries a backtrace: {error}"));
        } else if !error.contains(&named.display().to_string()) {
            wrong.push(format!("{case}: the error does not name {file}: {error}"));
        } else if !error.contains(cause) {
            wrong.push(format!("{case}: the error does not say `{cause}`: {error}"));
        } else if Duration::from_millis(ms) >= STAGE_LIMIT {
            wrong.push(format!("{case}: refused after {ms} ms: {error}"));
        }
    }
    let n = corpus.cases.len();
    assert!(wrong.is_empty(), "{} of {n} cases:\n{}", wrong.len(), wrong.join("\n"));
    // Every case together (and the base model run), with the process's start, the planning
    // that refuses some cases and the hashing: about half a second.
    assert!(elapsed < Duration::from_secs(10), "the whole run took {elapsed:?}");
}

#[test]
fn every_hostile_sd_folder_fails_its_stage_quickly_naming_the_file_and_the_cause() {
    replay(&Corpus {
        dir: "sd",
        base: "tests/fixtures/seed/sd",
        prelude: concat!(
            "stages:\n",
            "  prompts:\n",
            "    run: cp -r ${deps.d} dataset\n",
            "    deps: {d: prompts}\n",
            "    outs: {dataset: dataset}\n",
        ),
        stage: |case| {
            format!(
                "  {case}:\n    uses: sample\n    with: {{model: ./models/{case}, \
                 prompts: prompts.dataset, steps: 1, threads: 1}}\n"
            )
        },
        cases: SD_CASES,
    });
}

#[test]
fn every_hostile_blip_folder_fails_its_stage_quickly_naming_the_file_and_the_cause() {
    replay(&Corpus {
        dir: "blip",
        base: "tests/fixtures/blip/model",
        prelude: concat!(
            "stages:\n",
            "  photos:\n",
            "    run: cp -r ${deps.d} images\n",
            "    deps: {d: photos}\n",
            "    outs: {images: images}\n",
        ),
        stage: |case| {
            format!(
                "  {case}:\n    uses: caption\n    with: {{model: ./models/{case}, \
                 images: photos.images, decoding: greedy, max_length: 5, threads: 1}}\n"
            )
        },
        cases: BLIP_CASES,
    });
}
