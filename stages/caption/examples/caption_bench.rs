//! Captioning throughput: images per second through the whole path (decode the file, resize and
//! normalise, vision encoder, beam search with 3 beams, max_length 20, min_length 5).
//!
//! ```text
//! cargo run --release -p sdpipe-caption --example caption_bench -- tiny  [images] [batch] [threads]
//! cargo run --release -p sdpipe-caption --example caption_bench -- large [images] [batch] [threads]
//! ```
//!
//! `tiny` is the parity fixture model; `large` has BLIP-large's shapes (ViT-L/16 at 384, a
//! 12-layer BERT-base decoder with a 30524-token vocabulary) with random weights, since none can
//! be downloaded here: the arithmetic per image is the real model's. With random weights the
//! captions rarely end early, so every one runs to max_length: a worst case for decoding.
//! Candle's element-wise pool uses `RAYON_NUM_THREADS` (else all physical cores); set it to the
//! same value as `threads` for a fair per-thread figure.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sdpipe_caption::model::{BlipConfig, Decoding};
use sdpipe_caption::preprocess::{load_rgb, ImageProcessorConfig};
use sdpipe_caption::{Blip, ModelFiles};

/// The shapes of Salesforce/blip-image-captioning-large's `config.json` (other values default).
const LARGE: &str = r#"{
  "model_type": "blip",
  "text_config": {"num_attention_heads": 12},
  "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                    "num_attention_heads": 16}
}"#;

fn main() {
    // As sdpipe runs the stage (src/main.rs).
    sdpipe_stages::process::set_up();
    let args: Vec<String> = std::env::args().collect();
    let which = args.get(1).map(String::as_str).unwrap_or("tiny");
    let arg =
        |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (n_images, batch, threads) = match which {
        "large" => (arg(2, 4), arg(3, 2), arg(4, 2)),
        _ => (arg(2, 32), arg(3, 4), arg(4, 2)),
    };
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/blip");
    let model_dir = fixtures.join("model");
    let load_started = Instant::now();
    let blip = match which {
        "large" => random_large(&model_dir),
        "tiny" => Blip::load(
            &ModelFiles {
                config: &model_dir.join("config.json"),
                weights: &model_dir.join("model.safetensors"),
                tokenizer: &model_dir.join("tokenizer.json"),
                root: &model_dir,
            },
            &candle_core::Device::Cpu,
        )
        .expect("the fixture model loads"),
        other => panic!("unknown model `{other}`: tiny or large"),
    };
    eprintln!("{which}: model ready in {:.1} s", load_started.elapsed().as_secs_f64());

    let mut files: Vec<PathBuf> =
        std::fs::read_dir(fixtures.join("images")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let files: Vec<&Path> = files.iter().cycle().take(n_images).map(PathBuf::as_path).collect();
    let decoding = Decoding { num_beams: 3, max_length: 20, min_length: 5 };
    let prompt = blip.prompt_ids("").unwrap();

    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let (mut t_pre, mut t_vision, mut t_decode) = (0.0, 0.0, 0.0);
    let mut tokens = 0;
    let started = Instant::now();
    pool.install(|| {
        for chunk in files.chunks(batch) {
            let t0 = Instant::now();
            let pixels: Vec<Vec<f32>> = chunk
                .iter()
                .map(|p| {
                    let (rgb, w, h) = load_rgb(p).unwrap();
                    blip.processor.pixels(&rgb, w, h)
                })
                .collect();
            let t1 = Instant::now();
            let embeds = blip.encode(&pixels).unwrap();
            let t2 = Instant::now();
            let out = blip.generate(&embeds, &prompt, &decoding).unwrap();
            let t3 = Instant::now();
            tokens += out.iter().map(Vec::len).sum::<usize>();
            t_pre += (t1 - t0).as_secs_f64();
            t_vision += (t2 - t1).as_secs_f64();
            t_decode += (t3 - t2).as_secs_f64();
        }
    });
    let total = started.elapsed().as_secs_f64();
    println!(
        "{which}: {n_images} images, batch {batch}, {threads} threads: {:.3} images/s \
         ({total:.2} s; preprocess {t_pre:.2} s, vision {t_vision:.2} s, beam search {t_decode:.2} s; \
         {:.1} tokens/caption)",
        n_images as f64 / total,
        tokens as f64 / n_images as f64
    );
}

/// BLIP-large's shapes with N(0, 0.02) weights (LayerNorms at identity), the fixture's tokenizer
/// (only used to encode the empty prompt).
fn random_large(fixture_model: &Path) -> Blip {
    let config = BlipConfig::from_json(LARGE, Path::new("<blip-large shapes>")).unwrap();
    let device = Device::cuda_if_available(0).unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let tokenizer = tokenizers::Tokenizer::from_file(fixture_model.join("tokenizer.json")).unwrap();
    let blip = Blip::new(config, ImageProcessorConfig::default(), vb, tokenizer).unwrap();
    let mut params = 0;
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let shape = var.shape().clone();
        params += shape.elem_count();
        let value = if name.contains("LayerNorm") || name.contains("layer_norm") {
            if name.ends_with("weight") {
                Tensor::ones(&shape, DType::F32, &device)
            } else {
                Tensor::zeros(&shape, DType::F32, &device)
            }
        } else {
            Tensor::randn(0f32, 0.02, &shape, &device)
        };
        var.set(&value.unwrap()).unwrap();
    }
    eprintln!("large: {:.1} M parameters", params as f64 / 1e6);
    blip
}
