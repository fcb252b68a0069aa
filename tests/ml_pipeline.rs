//! The whole seed experiment in miniature through the real binary: data, a tiny SD, finetuning,
//! sampling, FID/KID and LPIPS, and the report — then a rerun served from the cache.

mod common;
use common::*;

const PIPELINE: &str = r#"
stages:
  data:
    uses: synthetic
    with: {count: 8, seed: 3, style: textured, resolution: 32}
  set:
    uses: imagefolder
    with: {images: data.images, photos: data.photos, test_count: 2, seed: 0}
  init:
    uses: tiny-sd
    with: {seed: 1, image_size: 32, vae_channels: [32, 32, 64]}
  finetune:
    uses: train
    with:
      pipeline: init.model
      dataset: set.dataset
      resolution: 32
      train_batch_size: 2
      max_train_steps: 3
      learning_rate: 1.0e-3
      use_ema: true
      gradient_checkpointing: true
  sample_base:
    uses: sample
    with: {pipeline: init.model, prompts: set.dataset, steps: 3, seed: 5}
  sample_tuned:
    uses: sample
    with: {pipeline: finetune.model, prompts: set.dataset, steps: 3, seed: 5}
  fid:
    uses: fid
    with: {real: set.dataset, fake: sample_tuned.images, weights: random}
  lpips:
    uses: lpips
    with: {real: set.dataset, fake: sample_tuned.images, weights: random}
  lpips_base:
    uses: lpips
    with: {real: set.dataset, fake: sample_base.images, weights: random}
  report:
    uses: report
    with:
      dataset: set.dataset
      base_samples: sample_base.images
      base_lpips: lpips_base.metrics
      samples: sample_tuned.images
      fid: fid.metrics
      lpips: lpips.metrics
      train_log: finetune.log
"#;

#[test]
fn the_miniature_experiment_runs_end_to_end_and_then_comes_from_the_cache() {
    let p = Project::new();
    p.write("mini.yaml", PIPELINE);
    let first = p.run_ok("mini.yaml", &[]);
    assert_eq!(in_state(&first, "ran").len(), 10, "{first:#}");

    let model = p.path().join("runs/mini/finetune/model");
    for part in ["model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae", "tokenizer"]
    {
        assert!(model.join(part).exists(), "the finetuned pipeline folder lacks {part}");
    }
    assert_eq!(p.read("runs/mini/finetune/train_log.jsonl").lines().count(), 3);
    assert_eq!(
        std::fs::read_dir(p.path().join("runs/mini/sample_tuned/images")).unwrap().count(),
        2
    );
    let fid: serde_json::Value =
        serde_json::from_str(&p.read("runs/mini/fid/metrics.json")).unwrap();
    assert!(fid["fid"].as_f64().is_some_and(f64::is_finite), "{fid:#}");
    let report = p.read("runs/mini/report/report/README.md");
    assert!(report.contains("LPIPS"), "{report}");

    let second = p.run_ok("mini.yaml", &[]);
    assert_eq!(in_state(&second, "cached").len(), 10, "{second:#}");
}
