//! The CLIP metrics against the reference tools, from the fixtures tests/parity/clip.py wrote
//! with transformers (a tiny random CLIPModel of the real architecture), and the `clip-score`
//! and `cmmd` kinds run end to end through the stage harness.
//!
//! Tolerances, and why:
//! - Preprocessing (Pillow's resize and the crops): byte-identical, and the normalised pixels'
//!   sums to 1e-4 relative (f32 rounding only).
//! - Token ids: identical.
//! - Embeddings: |Δ| ≤ 1e-4 · max|e| per vector. Same network and weights; only f32 summation
//!   order differs (candle's gemm and softmax vs PyTorch's SDPA).
//! - CLIP scores (100 · cos): |Δ| ≤ 1e-3 (1e-5 in the cosine).
//! - CMMD: 1e-3 relative to the reference's formula evaluated in float64 on its embeddings
//!   (the reference itself runs in float32, which is ~2e-3 off here; reference.json has both).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Device;
use sdpipe_metrics::clip::{normalized, Clip, ModelFiles, ProcessorConfig};
use sdpipe_metrics::{kinds, mmd, ClipScore, Cmmd};
use sdpipe_stages::api::{Fetch, StageKind};
use sdpipe_stages::testing::{params, Harness};
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/clip")
}

fn model_dir() -> PathBuf {
    fixtures().join("model")
}

fn reference() -> &'static Value {
    static REF: OnceLock<Value> = OnceLock::new();
    REF.get_or_init(|| {
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("reference.json")).unwrap())
            .unwrap()
    })
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn load(dir: &Path, text: bool) -> Clip {
    Clip::load(
        &ModelFiles {
            config: &dir.join("config.json"),
            weights: &dir.join("model.safetensors"),
            tokenizer: Some(&dir.join("tokenizer.json")),
            root: dir,
        },
        &Device::Cpu,
        text,
    )
    .unwrap()
}

fn model() -> &'static Clip {
    static MODEL: OnceLock<Clip> = OnceLock::new();
    MODEL.get_or_init(|| load(&model_dir(), true))
}

fn names() -> Vec<String> {
    reference()["order"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().into()).collect()
}

fn rgb(path: &Path) -> image::RgbImage {
    sdpipe_jpeg::open_rgb(path).unwrap()
}

/// The largest |a − b| relative to max|b|.
fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn clip_score_preprocessing_is_pillows_byte_for_byte() {
    let clip = model();
    for name in names() {
        let image = rgb(&fixtures().join("images").join(format!("{name}.png")));
        let ours = clip.processor.clip_pixels(&image).unwrap();
        let expected = rgb(&fixtures().join("clip_pixels").join(format!("{name}.png")));
        assert_eq!(ours, expected.into_raw(), "{name}");
        let sum: f64 = clip.processor.normalise_rescaled(&ours).iter().map(|&v| v as f64).sum();
        let want = reference()["images"][&name]["pixel_sum"].as_f64().unwrap();
        assert!((sum - want).abs() <= 1e-4 * want.abs().max(1.0), "{name}: {sum} vs {want}");
    }
}

#[test]
fn cmmd_preprocessing_is_the_readers_byte_for_byte() {
    let size = model().config.vision_config.image_size;
    let cmmd = &reference()["cmmd"];
    for (set, prefix, order, sums) in [
        ("images", "", "images_order", "images_pixel_sums"),
        ("other", "other_", "other_order", "other_pixel_sums"),
    ] {
        for (i, name) in cmmd[order].as_array().unwrap().iter().enumerate() {
            let name = name.as_str().unwrap();
            let image = rgb(&fixtures().join(set).join(format!("{name}.png")));
            let ours = ProcessorConfig::cmmd_pixels(&image, size);
            let expected = rgb(&fixtures().join("cmmd_pixels").join(format!("{prefix}{name}.png")));
            assert_eq!(ours, expected.into_raw(), "{set}/{name}");
            let sum: f64 = model().processor.normalise_unit(&ours).iter().map(|&v| v as f64).sum();
            let want = cmmd[sums][i].as_f64().unwrap();
            assert!((sum - want).abs() <= 1e-4 * want.abs().max(1.0), "{name}: {sum} vs {want}");
        }
    }
}

#[test]
fn captions_tokenize_and_truncate_as_the_processor_and_torchmetrics_do() {
    let clip = model();
    let mut truncated = 0;
    for name in names() {
        let r = &reference()["images"][&name];
        let (ids, cut) = clip.text_ids(r["caption"].as_str().unwrap()).unwrap();
        let want: Vec<u32> =
            r["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(ids, want, "{name}");
        assert_eq!(cut, r["untruncated_length"].as_u64().unwrap() as usize > ids.len(), "{name}");
        truncated += cut as usize;
    }
    assert_eq!(truncated, 1, "the fixture has one caption longer than the positions");
}

/// Embeddings and scores of every fixture image against its caption.
fn scores(clip: &Clip) -> Vec<(String, Vec<f32>, Vec<f32>, f32)> {
    let mut pixels = Vec::new();
    let mut ids = Vec::new();
    for name in names() {
        let r = &reference()["images"][&name];
        let image = rgb(&fixtures().join("images").join(format!("{name}.png")));
        pixels
            .push(clip.processor.normalise_rescaled(&clip.processor.clip_pixels(&image).unwrap()));
        ids.push(clip.text_ids(r["caption"].as_str().unwrap()).unwrap().0);
    }
    let images = clip.image_embeds(&pixels).unwrap();
    let texts = clip.text_embeds(&ids).unwrap();
    names()
        .into_iter()
        .zip(images.into_iter().zip(texts))
        .map(|(name, (i, t))| {
            let cos: f32 = normalized(&i).iter().zip(normalized(&t)).map(|(a, b)| a * b).sum();
            (name, i, t, 100.0 * cos)
        })
        .collect()
}

#[test]
fn embeddings_and_scores_match_transformers() {
    let mut worst = (0f32, 0f32, 0f32);
    let mut sum = 0.0;
    for (name, image, text, score) in scores(model()) {
        let r = &reference()["images"][&name];
        let e_img = max_rel(&image, &f32s(&r["image_embeds"]));
        let e_txt = max_rel(&text, &f32s(&r["text_embeds"]));
        let e_score = (score - r["score"].as_f64().unwrap() as f32).abs();
        assert!(e_img <= 1e-4, "{name}: image embeddings off by {e_img} (relative)");
        assert!(e_txt <= 1e-4, "{name}: text embeddings off by {e_txt} (relative)");
        assert!(e_score <= 1e-3, "{name}: score {score} vs {}", r["score"]);
        worst = (worst.0.max(e_img), worst.1.max(e_txt), worst.2.max(e_score));
        sum += score as f64;
    }
    let mean = (sum / names().len() as f64).max(0.0);
    let want = reference()["clip_score"].as_f64().unwrap();
    assert!((mean - want).abs() <= 1e-3, "clip score {mean} vs torchmetrics' {want}");
    eprintln!(
        "max errors: image embeds {:.2e}, text embeds {:.2e} (relative), score {:.2e}, mean {:.2e}",
        worst.0,
        worst.1,
        worst.2,
        (mean - want).abs()
    );
}

#[test]
fn padding_a_text_batch_does_not_change_its_embeddings() {
    let clip = model();
    let rows: Vec<Vec<u32>> = names()
        .iter()
        .map(|n| clip.text_ids(reference()["images"][n]["caption"].as_str().unwrap()).unwrap().0)
        .collect();
    let batched = clip.text_embeds(&rows).unwrap();
    for (row, together) in rows.iter().zip(&batched) {
        let alone = &clip.text_embeds(std::slice::from_ref(row)).unwrap()[0];
        assert!(max_rel(together, alone) <= 1e-5, "{row:?}");
    }
}

#[test]
fn the_legacy_eos_token_id_pools_as_transformers_does() {
    let mut clip = load(&model_dir(), true);
    clip.set_eos_token_id(2);
    for (name, _, _, score) in scores(&clip) {
        let want = reference()["images"][&name]["score_legacy_pooling"].as_f64().unwrap() as f32;
        assert!((score - want).abs() <= 1e-3, "{name}: {score} vs {want}");
    }
}

fn cmmd_embeds(set: &str, order: &str) -> Vec<Vec<f32>> {
    let clip = model();
    let size = clip.config.vision_config.image_size;
    let pixels: Vec<Vec<f32>> = reference()["cmmd"][order]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let image = rgb(&fixtures().join(set).join(format!("{}.png", n.as_str().unwrap())));
            clip.processor.normalise_unit(&ProcessorConfig::cmmd_pixels(&image, size))
        })
        .collect();
    clip.image_embeds(&pixels).unwrap().iter().map(|e| normalized(e)).collect()
}

#[test]
fn cmmd_embeddings_and_value_match_the_reference() {
    let cmmd = &reference()["cmmd"];
    let a = cmmd_embeds("images", "images_order");
    let b = cmmd_embeds("other", "other_order");
    let mut worst = 0f32;
    for (ours, want) in a.iter().zip(cmmd["images_embeds"].as_array().unwrap()) {
        worst = worst.max(max_rel(ours, &f32s(want)));
    }
    for (ours, want) in b.iter().zip(cmmd["other_embeds"].as_array().unwrap()) {
        worst = worst.max(max_rel(ours, &f32s(want)));
    }
    assert!(worst <= 1e-4, "embeddings off by {worst} (relative)");
    let value = mmd::cmmd(&a, &b).unwrap();
    let want = cmmd["images_vs_other"].as_f64().unwrap();
    let rel = (value - want).abs() / want;
    assert!(rel <= 1e-3, "cmmd {value} vs {want} (relative {rel})");
    // On the reference's own embeddings, the statistic agrees to f64 rounding.
    let rows =
        |key: &str| -> Vec<Vec<f32>> { cmmd[key].as_array().unwrap().iter().map(f32s).collect() };
    let exact = mmd::cmmd(&rows("images_embeds"), &rows("other_embeds")).unwrap();
    assert!((exact - want).abs() <= 1e-9 * want, "{exact} vs {want}");
    eprintln!("max errors: cmmd embeds {worst:.2e} (relative); cmmd {rel:.2e} (relative)");
}

// ------------------------------------------------------------------------------ the kinds

/// A `sample`-style output: the fixture images and a samples.jsonl naming them with captions.
fn samples_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let mut lines = String::new();
    for (k, name) in names().iter().enumerate() {
        std::fs::copy(
            fixtures().join("images").join(format!("{name}.png")),
            images.join(format!("{name}.png")),
        )
        .unwrap();
        let caption = reference()["images"][name]["caption"].clone();
        let line = json!({"id": name, "file_name": format!("{name}.png"), "prompt": caption,
                          "seed": 42 + k, "k": 0});
        lines.push_str(&format!("{line}\n"));
    }
    std::fs::write(dir.path().join("samples.jsonl"), lines).unwrap();
    dir
}

fn run_clip_score(samples: &Path, model: &Path) -> Result<Harness, String> {
    let mut h = Harness::new()
        .input("samples", samples.join("images"))
        .input("samples_jsonl", samples.join("samples.jsonl"));
    h.threads = 2;
    let kind = ClipScore::default();
    let p = params(&kind, &[("model", json!(model)), ("batch_size", json!(2))]);
    h.run(&kind, &p).map_err(|e| e.to_string())?;
    Ok(h)
}

fn run_cmmd(real: &Path, fake: &Path, model: &Path) -> Result<Harness, String> {
    let mut h = Harness::new().input("real", real).input("fake", fake);
    h.threads = 2;
    let kind = Cmmd::default();
    let p = params(&kind, &[("model", json!(model)), ("batch_size", json!(2))]);
    h.run(&kind, &p).map_err(|e| e.to_string())?;
    Ok(h)
}

fn read_json(path: PathBuf) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn the_crate_registers_both_clip_kinds_with_documented_parameters() {
    let all = kinds();
    for name in ["cmmd", "clip-score"] {
        let kind = all.iter().find(|k| k.name() == name).expect(name);
        assert!(kind.params().iter().all(|p| !p.doc.is_empty()), "{name}");
        assert!(kind.outputs().iter().all(|o| !o.doc.is_empty()), "{name}");
    }
}

#[test]
fn clip_score_stage_scores_a_sample_stages_output_as_torchmetrics() {
    let samples = samples_dir();
    let h = run_clip_score(samples.path(), &model_dir()).unwrap();
    let m = read_json(h.out_dir().join("metrics.json"));
    assert_eq!(m["metric"], "clip-score");
    assert_eq!(m["n"], 5);
    assert_eq!(m["truncated"], 1);
    assert_eq!(m["model"], "model", "the folder's name, not a machine path");
    let want = reference()["clip_score"].as_f64().unwrap();
    let got = m["clip_score"].as_f64().unwrap();
    assert!((got - want).abs() <= 1e-3, "{got} vs {want}");
    let lines: Vec<Value> = std::fs::read_to_string(h.out_dir().join("per_image.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    let mut negatives = 0;
    for (line, name) in lines.iter().zip(names()) {
        assert_eq!(line["file_name"], format!("{name}.png"));
        assert_eq!(line["caption"], reference()["images"][&name]["caption"]);
        let raw = line["score_raw"].as_f64().unwrap();
        let want = reference()["images"][&name]["score"].as_f64().unwrap();
        assert!((raw - want).abs() <= 1e-3, "{name}: {raw} vs {want}");
        assert_eq!(line["clip_score"].as_f64().unwrap(), raw.max(0.0));
        negatives += (raw < 0.0) as usize;
    }
    assert!(negatives > 0, "the fixture exercises the clamp");
    let mean_clamped = m["mean_clamped"].as_f64().unwrap();
    assert!(mean_clamped > got, "clamping each image raises the mean here");
}

#[test]
fn clip_score_reads_an_imagefolder_style_listing_too() {
    let samples = samples_dir();
    let mut lines = String::new();
    for name in names() {
        let caption = reference()["images"][&name]["caption"].clone();
        lines.push_str(&format!(
            "{}\n",
            json!({"file_name": format!("{name}.png"), "text": caption})
        ));
    }
    std::fs::write(samples.path().join("samples.jsonl"), lines).unwrap();
    let h = run_clip_score(samples.path(), &model_dir()).unwrap();
    let first = std::fs::read_to_string(h.out_dir().join("per_image.jsonl")).unwrap();
    let first: Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    assert_eq!(first["id"], names()[0], "the id is the file stem");
    let m = read_json(h.out_dir().join("metrics.json"));
    let want = reference()["clip_score"].as_f64().unwrap();
    assert!((m["clip_score"].as_f64().unwrap() - want).abs() <= 1e-3);
}

#[test]
fn cmmd_stage_matches_the_reference_and_is_zero_for_a_set_against_itself() {
    let images = fixtures().join("images");
    let h = run_cmmd(&images, &fixtures().join("other"), &model_dir()).unwrap();
    let m = read_json(h.out_dir().join("metrics.json"));
    assert_eq!(m["metric"], "cmmd");
    assert_eq!((m["n_real"].as_u64(), m["n_fake"].as_u64()), (Some(5), Some(3)));
    let want = reference()["cmmd"]["images_vs_other"].as_f64().unwrap();
    let got = m["cmmd"].as_f64().unwrap();
    assert!((got - want).abs() <= 1e-3 * want, "{got} vs {want}");
    assert_eq!(m["sigma"], 10.0);
    assert_eq!(m["scale"], 1000.0);

    let h = run_cmmd(&images, &images, &model_dir()).unwrap();
    let same = read_json(h.out_dir().join("metrics.json"))["cmmd"].as_f64().unwrap();
    assert!(same.abs() < 1e-9, "a set against itself: {same}");
}

/// A copy of the fixture model whose config.json is `edit`ed.
fn model_with_config(edit: impl Fn(&mut Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(model_dir()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    let path = dir.path().join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
    dir
}

#[test]
fn a_hostile_config_is_a_clear_error_naming_the_file() {
    let model = model_with_config(|c| c["vision_config"]["hidden_size"] = json!(1u64 << 40));
    let config = model.path().join("config.json").display().to_string();
    let e = run_cmmd(&fixtures().join("images"), &fixtures().join("other"), model.path())
        .err()
        .expect("refused");
    assert!(e.contains(&config) && e.contains("vision_config.hidden_size"), "{e}");
    let samples = samples_dir();
    let e = run_clip_score(samples.path(), model.path()).err().expect("refused");
    assert!(e.contains(&config), "{e}");
}

#[test]
fn a_config_that_does_not_match_the_weights_is_a_clear_error() {
    let model = model_with_config(|c| c["projection_dim"] = json!(8));
    let e = run_cmmd(&fixtures().join("images"), &fixtures().join("other"), model.path())
        .err()
        .expect("refused");
    assert!(e.contains("does not match") && e.contains("config.json"), "{e}");
    assert!(e.contains("visual_projection"), "names the tensor: {e}");
}

#[test]
fn an_activation_candle_cannot_compute_is_refused() {
    let model = model_with_config(|c| c["text_config"]["hidden_act"] = json!("gelu"));
    let samples = samples_dir();
    let e = run_clip_score(samples.path(), model.path()).err().expect("refused");
    assert!(e.contains("hidden_act is `gelu`"), "{e}");
}

#[test]
fn empty_inputs_are_clear_errors() {
    let empty = tempfile::tempdir().unwrap();
    let e = run_cmmd(empty.path(), &fixtures().join("other"), &model_dir()).err().unwrap();
    assert!(e.contains("holds no images") && e.contains("real input"), "{e}");

    let samples = tempfile::tempdir().unwrap();
    std::fs::create_dir(samples.path().join("images")).unwrap();
    std::fs::write(samples.path().join("samples.jsonl"), "").unwrap();
    let e = run_clip_score(samples.path(), &model_dir()).err().unwrap();
    assert!(e.contains("lists no images"), "{e}");

    let line = json!({"id": "x", "file_name": "x.png", "prompt": "a tree"});
    std::fs::write(samples.path().join("samples.jsonl"), format!("{line}\n")).unwrap();
    let e = run_clip_score(samples.path(), &model_dir()).err().unwrap();
    assert!(e.contains("x.png") && e.contains("not in"), "{e}");
}

#[test]
fn the_model_files_are_the_external_dependencies() {
    let kind = ClipScore::default();
    let deps = kind
        .external_deps(&params(&kind, &[("model", json!(model_dir()))]), Fetch::LocalOnly)
        .unwrap();
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
    let kind = Cmmd::default();
    let deps = kind
        .external_deps(&params(&kind, &[("model", json!(model_dir()))]), Fetch::LocalOnly)
        .unwrap();
    assert!(!deps.contains_key("model/tokenizer.json"), "cmmd reads no tokenizer");
    let missing = kind.external_deps(
        &params(&kind, &[("model", json!("/no/such/clip-model"))]),
        Fetch::LocalOnly,
    );
    assert!(missing.unwrap_err().to_string().contains("/no/such/clip-model"));
}
