//! The seed experiment as a user runs it: the committed `pipelines/unsplash.yaml`, changed only
//! by `--set` (the release URL, a small photo count, resolution and step count), against
//! miniatures of everything it reaches outside the project:
//!
//! - the Unsplash Lite release: a loopback server with a zip of two `photos.tsv00N` shards in
//!   the published 31 columns, a premium row whose photo is gone (404), ids with `-` and `_`,
//!   and JPEG photos written by Pillow (baseline and progressive, 4:2:0 and 4:4:4, three aspect
//!   ratios);
//! - BLIP and Stable Diffusion 1.5 under their hub ids, as tiny random models written by
//!   transformers and diffusers themselves (tests/parity/seed.py, tests/parity/blip.py), once
//!   in a Hugging Face cache laid out as `huggingface_hub` leaves it (snapshots of links into
//!   `blobs/`) and once served by a loopback hub (the download path); the two CLIP models of
//!   CMMD and the CLIP score are one tiny random CLIPModel written by transformers
//!   (tests/parity/clip.py), installed in the cache under both ids;
//! - the FID and LPIPS weights as converted files in `$SDPIPE_WEIGHTS_DIR`: the published LPIPS
//!   linear layers through `sdpipe convert-weights`, the Inception and AlexNet trunks as random
//!   stand-ins written in the same format (the published ones are 100 MB and more).
//!
//! The pipeline file is copied byte for byte into a scratch project (so the run directory is not
//! the repository's); its project-relative path, and so every stage identity, is the user's.

use crate::common;
use common::*;

#[allow(dead_code)]
#[path = "../../stages/data/tests/support/http_server.rs"]
mod http_server;
#[allow(dead_code)]
#[path = "../../stages/data/tests/support/unsplash_fixture.rs"]
mod unsplash_fixture;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use http_server::{Reply, Server};
use sdpipe_metrics::weights::Weights;
use sdpipe_metrics::WeightsKind;
use serde_json::Value;

const BLIP_REPO: &str = "Salesforce/blip-image-captioning-large";
const SD_REPO: &str = "stable-diffusion-v1-5/stable-diffusion-v1-5";
/// The `clip-score` kind's default model.
const CLIP_REPO: &str = "openai/clip-vit-large-patch14";
/// The `cmmd` kind's default model.
const CLIP_336_REPO: &str = "openai/clip-vit-large-patch14-336";
/// A premium photo: listed in the release, but its image URL answers 404.
const DEAD: &str = "premium-Gone_x9";
const STAGES: [&str; 15] = [
    "download",
    "caption",
    "dataset",
    "finetune",
    "sample_base",
    "sample_finetuned",
    "fid_base",
    "fid_finetuned",
    "lpips_base",
    "lpips_finetuned",
    "cmmd_base",
    "cmmd_finetuned",
    "clip_base",
    "clip_finetuned",
    "report",
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The live photos' ids, from the fixture folder.
fn photo_ids() -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(fixtures().join("seed/photos"))
        .unwrap()
        .map(|e| e.unwrap().path().file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    ids.sort();
    ids
}

/// The release: two shards in the published column order, the dead row in the first.
fn release_zip(base_url: &str) -> Vec<u8> {
    let ids = photo_ids();
    let (first, second) = ids.split_at(ids.len() / 2);
    let mut first: Vec<&str> = first.iter().map(String::as_str).collect();
    first.insert(1, DEAD);
    let second: Vec<&str> = second.iter().map(String::as_str).collect();
    let options = zip::write::SimpleFileOptions::default();
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, rows) in [("photos.tsv000", &first), ("photos.tsv001", &second)] {
        zip.start_file(name, options).unwrap();
        let text = unsplash_fixture::shard(&unsplash_fixture::COLUMNS, rows, base_url);
        zip.write_all(text.as_bytes()).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

/// `/lite.zip` and `/img/<id>` (the fixture's JPEG whatever the resize query: they are small
/// already).
fn unsplash_server() -> Server {
    let zip = std::sync::Arc::new(std::sync::OnceLock::new());
    let served = zip.clone();
    let server = Server::start(move |path, _query, _previous| {
        if path == "/lite.zip" {
            return Reply::ok(served.get().cloned().expect("zip is built"), "application/zip");
        }
        let photo =
            path.strip_prefix("/img/").map(|id| fixtures().join(format!("seed/photos/{id}.jpg")));
        match photo.and_then(|p| std::fs::read(p).ok()) {
            Some(bytes) => Reply::ok(bytes, "image/jpeg"),
            None => Reply::status(404),
        }
    });
    zip.set(release_zip(&server.url(""))).unwrap();
    server
}

/// Everything the pipeline finds outside the project, and the scratch project itself.
struct World {
    project: Project,
    /// The committed pipeline file's stem (`unsplash`, `unsplash-lora`).
    pipeline: &'static str,
    unsplash: Server,
    weights: tempfile::TempDir,
    hf_cache: tempfile::TempDir,
}

impl World {
    fn new() -> World {
        World::of("unsplash")
    }

    /// The world for `pipelines/<pipeline>.yaml`.
    fn of(pipeline: &'static str) -> World {
        let project = Project::new();
        let file = format!("pipelines/{pipeline}.yaml");
        let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join(&file);
        std::fs::create_dir_all(project.path().join("pipelines")).unwrap();
        std::fs::copy(&committed, project.path().join(&file)).unwrap();
        let world = World {
            project,
            pipeline,
            unsplash: unsplash_server(),
            weights: tempfile::tempdir().unwrap(),
            hf_cache: tempfile::tempdir().unwrap(),
        };
        world.convert_metric_weights();
        world
    }

    fn convert_metric_weights(&self) {
        let lin = self.weights.path().join(WeightsKind::LpipsAlex.default_file_name());
        let pth = fixtures().join("metrics/pth/lpips_v0.1_alex.pth");
        let out = self.project.sdpipe(&[
            "convert-weights",
            "lpips-alex",
            pth.to_str().unwrap(),
            lin.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "convert-weights: {}", stderr(&out));
        for (kind, seed) in [(WeightsKind::FidInception, 1), (WeightsKind::Alexnet, 2)] {
            let path = self.weights.path().join(kind.default_file_name());
            Weights::random(&kind.specs(), seed).save(&path).unwrap();
        }
    }

    /// Install the models in the HF cache, as `huggingface_hub` would have after a download.
    fn install_models(&self) {
        self.install_models_with_sd("seed/sd");
    }

    /// [`World::install_models`] with the SD repository's files from `sd` (under fixtures/).
    fn install_models_with_sd(&self, sd: &str) {
        for (repo, folder) in [
            (BLIP_REPO, "blip/model"),
            (SD_REPO, sd),
            (CLIP_REPO, "clip/model"),
            (CLIP_336_REPO, "clip/model"),
        ] {
            sdpipe_hub::testing::install_in_cache(
                self.hf_cache.path(),
                repo,
                &fixtures().join(folder),
            )
            .unwrap();
        }
    }

    /// `sdpipe <args> pipelines/<pipeline>.yaml --set …` with the world's environment.
    fn command(&self, verb: &str, extra: &[&str]) -> std::process::Command {
        let mut c = self.project.cmd();
        c.arg(verb).arg(format!("pipelines/{}.yaml", self.pipeline));
        for set in [
            format!("download.source={}", self.unsplash.url("/lite.zip")),
            "download.limit=4".into(),
            "download.test_count=3".into(),
            "finetune.resolution=32".into(),
            "finetune.max_train_steps=2".into(),
        ] {
            c.arg("--set").arg(set);
        }
        c.args(extra)
            .env("HF_HUB_CACHE", self.hf_cache.path())
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("HF_HOME")
            .env_remove("HF_ENDPOINT")
            .env("SDPIPE_WEIGHTS_DIR", self.weights.path());
        c
    }

    fn run(&self, extra: &[&str]) -> Value {
        let mut args = vec!["--json"];
        args.extend_from_slice(extra);
        let (summary, code) = json_of(&mut self.command("run", &args));
        assert_eq!(code, 0, "run failed: {summary:#}");
        summary
    }

    /// Runs up to both samples with `sets` (each a `--set` value): the finetune and both
    /// samples must run.
    fn finetune_and_sample(&self, sets: &[&str]) {
        let mut args = vec!["sample_base", "sample_finetuned"];
        for set in sets {
            args.extend(["--set", set]);
        }
        let summary = self.run(&args);
        for stage in ["finetune", "sample_base", "sample_finetuned"] {
            assert!(in_state(&summary, "ran").contains(&stage.to_string()), "{summary:#}");
        }
    }

    fn output(&self, rel: &str) -> PathBuf {
        self.project.path().join("runs").join(self.pipeline).join(rel)
    }

    fn captions(&self) -> BTreeMap<String, String> {
        std::fs::read_to_string(self.output("caption/captions.jsonl"))
            .unwrap()
            .lines()
            .map(|line| {
                let v: Value = serde_json::from_str(line).unwrap();
                (v["id"].as_str().unwrap().to_string(), v["text"].as_str().unwrap().to_string())
            })
            .collect()
    }
}

fn reference_captions() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(fixtures().join("seed/captions.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    serde_json::from_value(v["captions"].clone()).unwrap()
}

fn sorted<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> Vec<String> {
    let mut names: Vec<String> = names.into_iter().map(|s| s.as_ref().to_string()).collect();
    names.sort();
    names
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn the_committed_seed_pipeline_runs_every_stage_from_a_hub_cache_and_then_reruns_nothing() {
    let world = World::new();
    world.install_models();
    let first = world.run(&[]);
    assert_eq!(sorted(in_state(&first, "ran")), sorted(STAGES), "{first:#}");

    // The dead premium row is skipped and recorded; the other photos are all there.
    let failures = jsonl(&world.output("download/failures.jsonl"));
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0]["id"], DEAD);
    // BLIP's captions on the JPEGs, exactly as transformers' generate gives them.
    assert_eq!(world.captions(), reference_captions());

    // The imagefolder: train/ and test/, each a folder of JPEGs and metadata.jsonl.
    let dataset = world.output("dataset/dataset");
    let mut rows = 0;
    for split in ["train", "test"] {
        for row in jsonl(&dataset.join(split).join("metadata.jsonl")) {
            let file = row["file_name"].as_str().unwrap();
            assert!(dataset.join(split).join(file).is_file(), "{split}/{file}");
            assert_eq!(
                row["text"].as_str(),
                world.captions().get(file.trim_end_matches(".jpg")).map(String::as_str)
            );
            rows += 1;
        }
    }
    assert_eq!(rows, photo_ids().len());

    // The finetuned model is a whole diffusers pipeline folder.
    let model = world.output("finetune/model");
    for part in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "scheduler/scheduler_config.json",
    ] {
        assert!(model.join(part).is_file(), "the finetuned folder lacks {part}");
    }
    let report = std::fs::read_to_string(world.output("report/report/README.md")).unwrap();
    assert!(report.contains("LPIPS") && report.contains("FID"), "{report}");
    // CMMD and the CLIP score of both models, the CLIP score with its interval (3 test photos).
    let header = report.lines().find(|l| l.starts_with("| Model | FID")).unwrap_or_default();
    assert!(header.contains("| CMMD ↓ | Δ CMMD |"), "{report}");
    assert!(header.contains("| CLIP score ↑ | Δ CLIP score |"), "{report}");
    assert!(header.contains("CMMD real / fake") && header.contains("CLIP score images"));
    assert!(report.contains("CLIP score at N = 3 images"), "{report}");
    for stage in ["cmmd_base", "cmmd_finetuned", "clip_base", "clip_finetuned"] {
        let metrics = std::fs::read_to_string(world.output(&format!("{stage}/metrics.json")));
        let metrics: Value = serde_json::from_str(&metrics.unwrap()).unwrap();
        let model = metrics["model"].as_str().unwrap_or_default();
        let repo = if stage.starts_with("cmmd") { CLIP_336_REPO } else { CLIP_REPO };
        assert!(model.starts_with(&format!("{repo}@")), "{stage}: {metrics:#}");
    }

    // For tests/parity/check_seed_outputs.py, which loads these outputs with the reference tools.
    if let Some(keep) = std::env::var_os("SDPIPE_SEED_KEEP") {
        let status = std::process::Command::new("cp")
            .arg("-rL")
            .arg(world.output(""))
            .arg(&keep)
            .status()
            .unwrap();
        assert!(status.success(), "copying the outputs to {keep:?}");
    }

    let second = world.run(&[]);
    assert_eq!(sorted(in_state(&second, "cached")), sorted(STAGES), "{second:#}");

    // A caption parameter that changes the captions reruns the captions and everything
    // downstream of them, and nothing upstream.
    let third = world.run(&["--set", "caption.min_length=12"]);
    assert_eq!(in_state(&third, "cached"), ["download"], "{third:#}");
    assert_ne!(world.captions(), reference_captions());
}

#[test]
fn the_seed_pipeline_downloads_its_models_from_the_hub_into_the_cache() {
    let world = World::new();
    let hub = sdpipe_hub::testing::HubServer::serve_all(&[
        (BLIP_REPO, &fixtures().join("blip/model")),
        (SD_REPO, &fixtures().join("seed/sd")),
    ])
    .unwrap();
    // `status` only looks: no request reaches the hub, and the stages whose models are not
    // in the cache say that `run` will download them (`download` needs no model: run it first
    // so that `caption` is the next stage to decide).
    world.run(&["download"]);
    let mut status = world.command("status", &["--json", "sample_base"]);
    status.env_remove("HF_HUB_OFFLINE").env("HF_ENDPOINT", hub.endpoint());
    let (summary, code) = json_of(&mut status);
    assert_eq!(code, 0, "status failed: {summary:#}");
    assert_eq!(hub.requests(), 0, "status contacted the hub: {:?}", hub.request_log());
    let caption = stage_of(&summary, "caption");
    assert_eq!(caption["reasons"][0]["code"], "not_local", "{summary:#}");
    let message = caption["reasons"][0]["message"].as_str().unwrap();
    assert!(message.contains(BLIP_REPO) && message.contains("will download"), "{message}");
    assert_eq!(stage_of(&summary, "sample_base")["reasons"][0]["code"], "upstream_will_run");

    let mut run = world.command("run", &["--json", "sample_base"]);
    run.env_remove("HF_HUB_OFFLINE").env("HF_ENDPOINT", hub.endpoint());
    let (summary, code) = json_of(&mut run);
    assert_eq!(code, 0, "run failed: {summary:#}");
    assert_eq!(
        sorted(in_state(&summary, "ran")),
        sorted(["caption", "dataset", "sample_base"]),
        "{summary:#}"
    );
    assert_eq!(world.captions(), reference_captions());
    for (repo, file) in [(BLIP_REPO, "model.safetensors"), (SD_REPO, "unet/config.json")] {
        let snapshots = world
            .hf_cache
            .path()
            .join(format!("models--{}", repo.replace('/', "--")))
            .join("snapshots");
        let commit = std::fs::read_dir(&snapshots).unwrap().next().unwrap().unwrap().path();
        assert!(commit.join(file).is_file(), "{repo}: {file} not in {}", commit.display());
    }

    // Offline now, the same stages come from sdpipe's cache and the models from the HF cache.
    let again = world.run(&["sample_base"]);
    assert_eq!(in_state(&again, "ran"), Vec::<String>::new(), "{again:#}");
}

/// A repository that holds only diffusers' fp16 variant (as a user who downloaded
/// `--include '*.fp16.safetensors'` has it): with `variant: fp16` the base model samples and
/// finetunes from it, and the finetuned folder is written with the default file names, as
/// diffusers' `save_pretrained` writes a pipeline loaded with a variant.
#[test]
fn the_seed_pipeline_runs_on_the_fp16_variant_when_asked() {
    let world = World::new();
    world.install_models_with_sd("seed/sd-variants/fp16");
    world.finetune_and_sample(&["finetune.variant=fp16", "sample_base.variant=fp16"]);
    let model = world.output("finetune/model");
    for file in [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ] {
        assert!(model.join(file).is_file(), "{file} missing from the finetuned folder");
    }
    assert!(!model.join("vae/diffusion_pytorch_model.fp16.safetensors").exists());

    // Without the variant the fp16-only repository has no weights to read: named in the error.
    let mut plain = world.command("run", &["--json", "sample_base"]);
    let (summary, code) = json_of(&mut plain);
    assert_ne!(code, 0, "{summary:#}");
    let error = stage_of(&summary, "sample_base")["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("diffusion_pytorch_model.safetensors"), "{error}");
}

#[test]
fn the_seed_pipeline_trains_and_samples_in_half_precision_with_the_documented_sets() {
    // What pipelines/unsplash.yaml's header tells a GPU user to add: the tutorial's
    // --mixed_precision fp16 for the finetune and fp16 sampling.
    let world = World::new();
    world.install_models();
    world.finetune_and_sample(&["vars.mixed_precision=fp16", "vars.precision=fp16"]);
    // The UNet trained under autocast is saved in f32, as diffusers saves it.
    let unet = world.output("finetune/model/unet/diffusion_pytorch_model.safetensors");
    let header = safetensors_header(&unet);
    let tensors = header.as_object().unwrap().iter().filter(|(name, _)| *name != "__metadata__");
    for (name, tensor) in tensors {
        assert_eq!(tensor["dtype"], "F32", "`{name}` is saved in f32");
    }
    let log = jsonl(&world.output("finetune/train_log.jsonl"));
    assert_eq!(log.len(), 2, "two optimiser steps");
    assert!(log.iter().all(|line| line["grad_norm"].as_f64().is_some_and(f64::is_finite)));
    assert_eq!(std::fs::read_dir(world.output("sample_finetuned/images")).unwrap().count(), 3);
}

/// The `__metadata__` of a safetensors file's header.
fn safetensors_metadata(path: &Path) -> Value {
    safetensors_header(path)["__metadata__"].clone()
}

/// A safetensors file's JSON header: each tensor's dtype, shape and offsets, and `__metadata__`.
fn safetensors_header(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[8..8 + len]).unwrap()
}

#[test]
fn the_lora_sweep_trains_an_adapter_per_point_on_one_cached_original_and_its_samples() {
    let world = World::of("unsplash-lora");
    world.install_models();
    let first = world.run(&[]);
    let points = ["4,learning_rate=1e-4", "4,learning_rate=5e-5", "16,learning_rate=1e-4"];
    let ran = in_state(&first, "ran");
    // The original model's samples and metrics, and everything upstream, once for the sweep.
    for once in ["download", "caption", "dataset", "sample_base", "fid_base", "clip_base"] {
        assert_eq!(ran.iter().filter(|n| *n == once).count(), 1, "{once}: {first:#}");
    }
    // Four adapters, each sampled from the base with the adapter merged.
    let finetunes: Vec<&String> = ran.iter().filter(|n| n.starts_with("finetune@")).collect();
    assert_eq!(finetunes.len(), 4, "{first:#}");
    for point in points {
        let name = format!("finetune@lora_rank={point}");
        assert!(finetunes.iter().any(|n| **n == name), "{name}: {finetunes:?}");
    }
    let lora = world.output("finetune@lora_rank=16,learning_rate=1e-4/lora");
    let metadata = safetensors_metadata(&lora.join("pytorch_lora_weights.safetensors"));
    let adapter: Value =
        serde_json::from_str(metadata["lora_adapter_metadata"].as_str().unwrap()).unwrap();
    assert_eq!(adapter["unet.r"], 16);
    assert_eq!(metadata["sdpipe.base_model"], SD_REPO);
    let samples = ran.iter().filter(|n| n.starts_with("sample_finetuned@")).count();
    assert_eq!(samples, 4, "{first:#}");

    // The report puts the original and the four points side by side.
    let report = std::fs::read_to_string(world.output("report/report/README.md")).unwrap();
    for point in points {
        assert!(report.contains(&format!("lora_rank={point}")), "{point}: {report}");
    }

    let second = world.run(&[]);
    assert!(in_state(&second, "ran").is_empty(), "{second:#}");
}
