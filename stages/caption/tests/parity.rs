//! Parity with transformers, from the fixtures `tests/parity/blip.py` wrote
//! (`tests/fixtures/blip/`): a tiny random-weight BLIP in the published layout, fixed images,
//! the Pillow-resized images, and transformers' token ids and texts.

use std::path::PathBuf;

use sdpipe_caption::preprocess::load_rgb;
use sdpipe_caption::{Blip, Decoding, ModelFiles};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/blip")
}

fn reference() -> Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("reference.json")).unwrap()).unwrap()
}

fn model() -> Blip {
    let dir = fixtures().join("model");
    Blip::load(
        &ModelFiles {
            config: &dir.join("config.json"),
            weights: &dir.join("model.safetensors"),
            tokenizer: &dir.join("tokenizer.json"),
            root: &dir,
        },
        &candle_core::Device::Cpu,
    )
    .unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The normalised pixels transformers' model saw: Pillow's resize (a fixture) normalised here.
fn reference_pixels(blip: &Blip, name: &str) -> Vec<f32> {
    let (rgb, w, h) = load_rgb(&fixtures().join("resized").join(format!("{name}.png"))).unwrap();
    assert_eq!((w, h), (384, 384));
    blip.processor.normalise(&rgb)
}

const BEAM: Decoding = Decoding { num_beams: 3, max_length: 20, min_length: 5 };
const GREEDY: Decoding = Decoding { num_beams: 1, max_length: 20, min_length: 5 };

#[test]
fn resize_matches_pillow_exactly_for_png_and_jpeg_images() {
    let refs = reference();
    for (name, r) in refs["images"].as_object().unwrap() {
        let file = r["file"].as_str().unwrap();
        let (rgb, w, h) = load_rgb(&fixtures().join("images").join(file)).unwrap();
        let ours = sdpipe_stages::pillow::resize_rgb(
            &rgb,
            w,
            h,
            384,
            384,
            sdpipe_stages::pillow::Filter::Bicubic,
        );
        let (pil, _, _) =
            load_rgb(&fixtures().join("resized").join(format!("{name}.png"))).unwrap();
        let diff = ours.iter().zip(&pil).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert_eq!(diff, 0, "{name}: max difference {diff} levels");
    }
}

/// Normalisation in f32 against transformers' float tensor: statistics and an 8x8 crop agree to
/// 1e-5 (f32 rounding of (x/255 - mean)/std; values are at most ~2.2 in magnitude).
#[test]
fn pixel_tensor_matches_the_processor_output() {
    let blip = model();
    let refs = reference();
    for (name, r) in refs["images"].as_object().unwrap() {
        let pixels = reference_pixels(&blip, name);
        let p = &r["pixel"];
        let sum: f64 = pixels.iter().map(|&x| x as f64).sum();
        let rel = (sum - p["sum"].as_f64().unwrap()).abs() / pixels.len() as f64;
        assert!(rel < 1e-6, "{name}: mean difference {rel}");
        let plane = 384 * 384;
        let [y0, x0] = [100usize, 200usize];
        let mut max_diff = 0f64;
        for (c, rows) in p["crop"].as_array().unwrap().iter().enumerate() {
            for (dy, row) in rows.as_array().unwrap().iter().enumerate() {
                for (dx, v) in row.as_array().unwrap().iter().enumerate() {
                    let ours = pixels[c * plane + (y0 + dy) * 384 + x0 + dx] as f64;
                    max_diff = max_diff.max((ours - v.as_f64().unwrap()).abs());
                }
            }
        }
        assert!(max_diff < 1e-5, "{name}: crop max difference {max_diff}");
    }
}

#[test]
fn beam_search_gives_transformers_token_ids_and_text() {
    let blip = model();
    let refs = reference();
    let prompt = blip.prompt_ids("").unwrap();
    for (name, r) in refs["images"].as_object().unwrap() {
        let embeds = blip.encode(&[reference_pixels(&blip, name)]).unwrap();
        let generated = blip.generate(&embeds, &prompt, &BEAM).unwrap().remove(0);
        let all: Vec<u32> = prompt.iter().copied().chain(generated.iter().copied()).collect();
        assert_eq!(all, ids(&r["beam"]["ids"]), "{name}");
        assert_eq!(blip.decode(&generated).unwrap(), r["beam"]["text"].as_str().unwrap(), "{name}");
    }
}

#[test]
fn greedy_gives_transformers_token_ids_and_text() {
    let blip = model();
    let refs = reference();
    let prompt = blip.prompt_ids("").unwrap();
    for (name, r) in refs["images"].as_object().unwrap() {
        let embeds = blip.encode(&[reference_pixels(&blip, name)]).unwrap();
        let generated = blip.generate(&embeds, &prompt, &GREEDY).unwrap().remove(0);
        let all: Vec<u32> = prompt.iter().copied().chain(generated.iter().copied()).collect();
        assert_eq!(all, ids(&r["greedy"]["ids"]), "{name}");
        assert_eq!(blip.decode(&all).unwrap(), r["greedy"]["text"].as_str().unwrap(), "{name}");
    }
}

#[test]
fn min_length_changes_the_beam_result_where_transformers_says_it_does() {
    let blip = model();
    let refs = reference();
    let prompt = blip.prompt_ids("").unwrap();
    let no_min = Decoding { min_length: 0, ..BEAM };
    let mut changed = 0;
    for (name, r) in refs["images"].as_object().unwrap() {
        let embeds = blip.encode(&[reference_pixels(&blip, name)]).unwrap();
        let generated = blip.generate(&embeds, &prompt, &no_min).unwrap().remove(0);
        let all: Vec<u32> = prompt.iter().copied().chain(generated).collect();
        assert_eq!(all, ids(&r["beam_without_min_length"]), "{name}");
        changed += usize::from(all != ids(&r["beam"]["ids"]));
    }
    assert!(changed > 0, "the fixture should exercise min_length");
}

#[test]
fn a_prompt_conditions_the_caption_as_in_transformers() {
    let blip = model();
    let refs = reference();
    let prompt = blip.prompt_ids(refs["prompt"].as_str().unwrap()).unwrap();
    for (name, r) in refs["images"].as_object().unwrap() {
        // transformers' processor gives [CLS] prompt [SEP]; generate() swaps in [DEC], drops [SEP].
        let mut expected_prompt = ids(&r["prompt"]["input_ids"]);
        expected_prompt.pop();
        expected_prompt[0] = prompt[0];
        assert_eq!(prompt, expected_prompt, "{name}");
        let embeds = blip.encode(&[reference_pixels(&blip, name)]).unwrap();
        let generated = blip.generate(&embeds, &prompt, &BEAM).unwrap().remove(0);
        let all: Vec<u32> = prompt.iter().copied().chain(generated).collect();
        assert_eq!(all, ids(&r["prompt"]["ids"]), "{name}");
        assert_eq!(blip.decode(&all).unwrap(), r["prompt"]["text"].as_str().unwrap(), "{name}");
    }
}

#[test]
fn a_batch_of_images_gives_each_image_its_own_result() {
    let blip = model();
    let refs = reference();
    let names: Vec<&str> =
        refs["batch_order"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    let pixels: Vec<Vec<f32>> = names.iter().map(|n| reference_pixels(&blip, n)).collect();
    let prompt = blip.prompt_ids("").unwrap();
    let embeds = blip.encode(&pixels).unwrap();
    let generated = blip.generate(&embeds, &prompt, &BEAM).unwrap();
    for ((name, tokens), expected) in
        names.iter().zip(generated).zip(refs["batched_beam"].as_array().unwrap())
    {
        let all: Vec<u32> = prompt.iter().copied().chain(tokens).collect();
        assert_eq!(all, ids(expected), "{name}");
    }
}
