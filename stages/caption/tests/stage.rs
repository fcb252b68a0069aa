//! The `caption` stage end to end on the tiny fixture model: from a local folder and through a
//! loopback hub, with templates, prompts, resumption and bad input.

use std::fs;
use std::path::{Path, PathBuf};

use sdpipe_caption::Caption;
use sdpipe_hub::testing::HubServer;
use sdpipe_hub::HubConfig;
use sdpipe_stages::api::{StageError, StageKind};
use sdpipe_stages::testing::{self, Harness};
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/blip")
}

fn model_dir() -> String {
    fixtures().join("model").display().to_string()
}

fn reference() -> Value {
    serde_json::from_slice(&fs::read(fixtures().join("reference.json")).unwrap()).unwrap()
}

/// A hub config that can reach nothing, so a test can only pass without the network.
fn no_network(cache: &Path) -> HubConfig {
    HubConfig {
        cache_dir: cache.to_path_buf(),
        endpoint: "http://127.0.0.1:9".into(),
        token: None,
        offline: true,
    }
}

fn run(
    kind: &Caption,
    images: &Path,
    overrides: &[(&str, Value)],
) -> (Harness, Result<(), StageError>) {
    let mut h = Harness::new().input("images", images);
    let params = testing::params(kind, overrides);
    let result = h.run(kind, &params);
    (h, result)
}

fn captions(h: &Harness) -> Vec<(String, String)> {
    fs::read_to_string(h.out_dir().join("captions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["id"].as_str().unwrap().to_string(), v["text"].as_str().unwrap().to_string())
        })
        .collect()
}

/// Transformers' beam captions of the lossless fixture images (the JPEG is decoded slightly
/// differently from Pillow, so its caption is not expected to be identical).
fn expected_png_captions() -> Vec<(String, String)> {
    let refs = reference();
    let mut out: Vec<(String, String)> = refs["images"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, r)| r["file"].as_str().unwrap().ends_with(".png"))
        .map(|(name, r)| (name.clone(), r["beam"]["text"].as_str().unwrap().to_string()))
        .collect();
    out.sort();
    out
}

fn png_only(all: Vec<(String, String)>) -> Vec<(String, String)> {
    all.into_iter().filter(|(id, _)| id != "photo").collect()
}

#[test]
fn captions_a_folder_from_a_local_model_as_transformers_does() {
    let cache = tempfile::tempdir().unwrap();
    let kind = Caption { hub: Some(no_network(cache.path())) };
    let (h, result) = run(&kind, &fixtures().join("images"), &[("model", json!(model_dir()))]);
    result.unwrap();
    let all = captions(&h);
    let ids: Vec<&str> = all.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["gray", "photo", "squash", "tiny-upscale"]);
    assert!(all.iter().all(|(_, text)| !text.is_empty()));
    assert_eq!(png_only(all), expected_png_captions());
    assert!(h.log_text().contains("images/s"), "{}", h.log_text());
}

#[test]
fn downloads_the_model_through_the_hub_and_lists_its_files_as_dependencies() {
    let server = HubServer::serve("Salesforce/blip-tiny", &fixtures().join("model")).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let online =
        HubConfig { offline: false, endpoint: server.endpoint(), ..no_network(cache.path()) };
    let kind = Caption { hub: Some(online) };
    let params = testing::params(&kind, &[("model", json!("Salesforce/blip-tiny"))]);

    let deps = kind.external_deps(&params, sdpipe_stages::api::Fetch::allowed()).unwrap();
    let names: Vec<&str> = deps.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "model/config.json",
            "model/model.safetensors",
            "model/processor_config.json",
            "model/tokenizer.json"
        ]
    );
    for path in deps.values() {
        assert!(path.starts_with(cache.path()), "{}", path.display());
    }

    // The run itself finds everything in the cache: no network needed any more.
    let offline = Caption { hub: Some(no_network(cache.path())) };
    let (h, result) =
        run(&offline, &fixtures().join("images"), &[("model", json!("Salesforce/blip-tiny"))]);
    result.unwrap();
    assert_eq!(png_only(captions(&h)), expected_png_captions());
    assert!(h.log_text().contains("Salesforce/blip-tiny@"), "{}", h.log_text());
}

#[test]
fn greedy_decoding_is_available() {
    let cache = tempfile::tempdir().unwrap();
    let kind = Caption { hub: Some(no_network(cache.path())) };
    let images = tempfile::tempdir().unwrap();
    fs::copy(fixtures().join("images/gray.png"), images.path().join("gray.png")).unwrap();
    let (h, result) =
        run(&kind, images.path(), &[("model", json!(model_dir())), ("decoding", json!("greedy"))]);
    result.unwrap();
    let expected = reference()["images"]["gray"]["greedy"]["text"].as_str().unwrap().to_string();
    assert_eq!(captions(&h), [("gray".to_string(), expected)]);
}

#[test]
fn the_template_wraps_every_caption() {
    let cache = tempfile::tempdir().unwrap();
    let kind = Caption { hub: Some(no_network(cache.path())) };
    let (h, result) = run(
        &kind,
        &fixtures().join("images"),
        &[("model", json!(model_dir())), ("template", json!("{caption}, in the style of X"))],
    );
    result.unwrap();
    let wrapped: Vec<(String, String)> = expected_png_captions()
        .into_iter()
        .map(|(id, text)| (id, format!("{text}, in the style of X")))
        .collect();
    assert_eq!(png_only(captions(&h)), wrapped);
}

#[test]
fn a_prompt_is_stripped_unless_kept() {
    let refs = reference();
    let prompt = refs["prompt"].as_str().unwrap();
    let full = refs["images"]["squash"]["prompt"]["text"].as_str().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let kind = Caption { hub: Some(no_network(cache.path())) };
    let images = tempfile::tempdir().unwrap();
    fs::copy(fixtures().join("images/squash.png"), images.path().join("squash.png")).unwrap();
    let base = [("model", json!(model_dir())), ("prompt", json!(prompt))];

    let (h, result) = run(
        &kind,
        images.path(),
        &[base[0].clone(), base[1].clone(), ("keep_prompt", json!(true))],
    );
    result.unwrap();
    assert_eq!(captions(&h)[0].1, full);

    let (h, result) = run(&kind, images.path(), &base);
    result.unwrap();
    let stripped = &captions(&h)[0].1;
    assert!(full.ends_with(stripped.as_str()) && !stripped.starts_with(prompt), "{stripped:?}");
}

#[test]
fn an_interrupted_run_resumes_from_its_state() {
    let cache = tempfile::tempdir().unwrap();
    let kind = Caption { hub: Some(no_network(cache.path())) };
    let mut h = Harness::new().input("images", fixtures().join("images"));
    // What an earlier, interrupted run of this stage left behind (last line torn).
    fs::write(
        h.state.path().join("captions.partial.jsonl"),
        "{\"id\":\"gray\",\"text\":\"from before\"}\n{\"id\":\"pho",
    )
    .unwrap();
    h.run(&kind, &testing::params(&kind, &[("model", json!(model_dir()))])).unwrap();
    let all = captions(&h);
    assert_eq!(all[0], ("gray".to_string(), "from before".to_string()));
    assert_eq!(all.len(), 4);
    assert!(h.log_text().contains("resuming: 1 of 4"), "{}", h.log_text());
}

#[test]
fn a_missing_model_offline_says_what_is_needed_and_where_it_looked() {
    let cache = tempfile::tempdir().unwrap();
    let kind = Caption { hub: Some(no_network(cache.path())) };
    let (_, result) =
        run(&kind, &fixtures().join("images"), &[("model", json!("Salesforce/nope"))]);
    let err = result.unwrap_err().to_string();
    for needed in ["config.json", "model.safetensors", "tokenizer.json", "HF_HUB_OFFLINE"] {
        assert!(err.contains(needed), "{needed}: {err}");
    }
    assert!(err.contains(&cache.path().display().to_string()), "{err}");
}

#[test]
fn a_template_without_the_caption_is_rejected() {
    let cache = tempfile::tempdir().unwrap();
    let kind = Caption { hub: Some(no_network(cache.path())) };
    for template in ["a photo", "{caption} by {artist}", "{caption"] {
        let (_, result) = run(
            &kind,
            &fixtures().join("images"),
            &[("model", json!(model_dir())), ("template", json!(template))],
        );
        assert!(matches!(result, Err(StageError::InvalidParam { .. })), "{template}: {result:?}");
    }
}

#[test]
fn a_folder_without_images_is_an_error() {
    let cache = tempfile::tempdir().unwrap();
    let kind = Caption { hub: Some(no_network(cache.path())) };
    let empty = tempfile::tempdir().unwrap();
    fs::write(empty.path().join("notes.txt"), "not an image").unwrap();
    let (_, result) = run(&kind, empty.path(), &[("model", json!(model_dir()))]);
    assert!(result.unwrap_err().to_string().contains("no images"));
}

#[test]
fn an_unreadable_image_names_the_file() {
    let cache = tempfile::tempdir().unwrap();
    let kind = Caption { hub: Some(no_network(cache.path())) };
    let images = tempfile::tempdir().unwrap();
    fs::write(images.path().join("broken.jpg"), b"not a jpeg").unwrap();
    let (_, result) = run(&kind, images.path(), &[("model", json!(model_dir()))]);
    let err = result.unwrap_err().to_string();
    assert!(err.contains("broken.jpg"), "{err}");
}
