//! The whole seed experiment in miniature through the real binary: data, a tiny SD, finetuning,
//! sampling, FID/KID and LPIPS, and the report — then a rerun served from the cache.

use crate::common;
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

/// The demo's experiment at a smaller size: a VAE trained on both domains, a UNet pretrained on
/// the flat one (the "original" model) and finetuned on the dusk one, both sampled on the dusk
/// domain's held-out captions and scored against its images (what holds at this size: the test
/// below).
/// GroupNorm uses 4 groups: with one group per channel the VAE's decoder normalises each image's
/// mean colour away and ignores its latents, so no UNet could move the samples. The VAE trains
/// on batches of 4: at 60 steps, batches of 8 left every sample one grey-blue field.
const IMPROVES: &str = r#"
stages:
  base_data:
    uses: synthetic
    with: {count: 16, seed: 1, style: flat, resolution: 32}
  target_data:
    uses: synthetic
    with: {count: 20, seed: 2, style: dusk, resolution: 32}
  base_set:
    uses: imagefolder
    with: {images: base_data.images, photos: base_data.photos}
  target_set:
    uses: imagefolder
    with: {images: target_data.images, photos: target_data.photos, test_count: 4, seed: 0}
  init:
    uses: tiny-sd
    with: {seed: 7, image_size: 32, vae_channels: [16, 16, 32], norm_num_groups: 4}
  vae:
    uses: train-vae
    with:
      pipeline: init.model
      dataset: base_set.dataset
      extra_dataset: target_set.dataset
      resolution: 32
      center_crop: true
      random_flip: true
      train_batch_size: 4
      max_train_steps: 60
      learning_rate: 2.0e-3
      seed: 7
  pretrain:
    uses: train
    with:
      pipeline: vae.model
      dataset: base_set.dataset
      resolution: 32
      center_crop: true
      random_flip: true
      train_batch_size: 4
      gradient_accumulation_steps: 1
      max_train_steps: 40
      learning_rate: 1.0e-3
      seed: 7
  finetune:
    uses: train
    with:
      pipeline: pretrain.model
      dataset: target_set.dataset
      resolution: 32
      center_crop: true
      random_flip: true
      train_batch_size: 4
      gradient_accumulation_steps: 1
      max_train_steps: 80
      learning_rate: 5.0e-3
      seed: 7
  sample_base:
    uses: sample
    with: {pipeline: pretrain.model, prompts: target_set.dataset, steps: 8, guidance_scale: 4.0, seed: 7}
  sample_tuned:
    uses: sample
    with: {pipeline: finetune.model, prompts: target_set.dataset, steps: 8, guidance_scale: 4.0, seed: 7}
  fid_base:
    uses: fid
    with: {real: target_set.dataset, fake: sample_base.images, weights: random, seed: 0}
  fid_tuned:
    uses: fid
    with: {real: target_set.dataset, fake: sample_tuned.images, weights: random, seed: 0}
  lpips_base:
    uses: lpips
    with: {real: target_set.dataset, fake: sample_base.images, weights: random, seed: 0}
  lpips_tuned:
    uses: lpips
    with: {real: target_set.dataset, fake: sample_tuned.images, weights: random, seed: 0}
"#;

/// What finetuning provably does at this size: it learns the target domain (the denoising loss
/// on it falls) and changes what the model draws; every metric stage scores both models.
///
/// Not asserted: that FID/KID/LPIPS improve. At this size they do for some seeds and not for
/// others. Measured 2026-12-07 (Intel Xeon, release build, every seed of this pipeline set to
/// 7, 8, 9, 10, 11): FID fell below 0.7 of the original's for 1 of the 5 seeds before the
/// vectorised exponential (f2b3cf6; seed 7, the one this test used: 199.7 → 60.1) and for 2
/// of 5 after it (seed 7 then went 1200.8 → 1551.3); with v-prediction, a 300-step VAE or other
/// learning rates 2–3 of 5. The 60-step VAE decodes few colours faithfully and the samples'
/// mean colour barely moves. The full-size demo's figures, and how they vary with the seed, are
/// benchmarks (`bench/demo.sh`, `bench/demo-seeds.sh`). The loss fell to 0.29–0.57 of its
/// first 20 steps' mean over those ten runs (both builds).
#[test]
fn finetuning_learns_the_target_domain_and_changes_the_samples() {
    let p = Project::new();
    p.write("improves.yaml", IMPROVES);
    p.run_ok("improves.yaml", &[]);
    let runs = p.path().join("runs/improves");

    let losses: Vec<f64> = p
        .read("runs/improves/finetune/train_log.jsonl")
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["loss"].as_f64())
        .map(Option::unwrap)
        .collect();
    assert_eq!(losses.len(), 80);
    let mean = |window: &[f64]| window.iter().sum::<f64>() / window.len() as f64;
    let (first, last) = (mean(&losses[..20]), mean(&losses[60..]));
    assert!(last < 0.7 * first, "loss {first:.4} over the first 20 steps, {last:.4} over the last");

    // Both draw the same test captions with the same seeds: only the weights differ.
    let samples = |stage: &str| -> Vec<Vec<u8>> {
        let mut paths: Vec<_> = std::fs::read_dir(runs.join(stage).join("images"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        paths.sort();
        paths.iter().map(|path| std::fs::read(path).unwrap()).collect()
    };
    let (original, finetuned) = (samples("sample_base"), samples("sample_tuned"));
    assert_eq!(original.len(), 4);
    assert!(original.iter().zip(&finetuned).all(|(a, b)| a != b), "a sample did not change");

    for stage in ["fid_base", "fid_tuned", "lpips_base", "lpips_tuned"] {
        let metrics: serde_json::Value =
            serde_json::from_str(&p.read(&format!("runs/improves/{stage}/metrics.json"))).unwrap();
        let key = if stage.starts_with("fid") { "fid" } else { "lpips" };
        assert!(metrics[key].as_f64().is_some_and(f64::is_finite), "{stage}: {metrics:#}");
    }
}
