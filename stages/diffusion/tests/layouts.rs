//! The pipeline folders people actually have load as diffusers loads them: each fixture under
//! `tests/fixtures/seed/` was written by diffusers' own `save_pretrained` (`tests/parity/seed.py`,
//! diffusers 0.42.1, transformers 5.24) from one tiny SD1.5-shaped pipeline — as it saves today
//! (`sd/`: safetensors, a `tokenizer.json` without `vocab.json`), as `variant="fp16"`,
//! sharded (`max_shard_size`), as PyTorch pickles (`safe_serialization=False`), and with the
//! slow tokenizer files only (SD1.5's own layout). Each `reference.json` holds the token ids,
//! the text encoder's last hidden state (sum and absolute sum) and the UNet's noise prediction
//! on fixed latents, computed by `StableDiffusionPipeline.from_pretrained(folder, variant=…,
//! torch_dtype=float32)`.
//!
//! Tolerances: the UNet's ε to 1e-5 absolute (its values are O(1); measured at most 6.0e-7 on
//! every layout), the hidden-state sums to 1e-4 relative (a sum of 77×16 f32 values).
//! The fp16 variant is compared with the same tolerances: both sides read the same half
//! precision values and compute in f32.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdpipe_diffusion::{SdPipeline, StableDiffusion};
use sdpipe_stages::api::Fetch;
use serde_json::Value;

fn seed_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/seed")
}

fn floats(value: &Value) -> Vec<f32> {
    value.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

/// Loads `folder` (with `variant`) and checks its outputs against its `reference.json`.
fn matches_diffusers(folder: &Path, variant: Option<&str>) {
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(folder.join("reference.json")).unwrap())
            .unwrap();
    let pipeline = SdPipeline::open_variant(folder, variant).unwrap();
    let sd = StableDiffusion::load(&pipeline, &Device::Cpu, DType::F32).unwrap();

    let prompt = reference["prompt"].as_str().unwrap();
    let ids: Vec<u32> = reference["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(sd.tokenizer.encode(prompt).unwrap(), ids, "{}: token ids", folder.display());

    let hidden = sd.embed(&[prompt]).unwrap();
    let sum = hidden.to_dtype(DType::F64).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    let abs_sum =
        hidden.to_dtype(DType::F64).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f64>();
    let want_abs = reference["hidden_abs_sum"].as_f64().unwrap();
    let abs_sum = abs_sum.unwrap();
    assert!(
        (abs_sum - want_abs).abs() <= 1e-4 * want_abs,
        "{}: |hidden| sums to {abs_sum}, diffusers {want_abs}",
        folder.display()
    );
    let want_sum = reference["hidden_sum"].as_f64().unwrap();
    assert!(
        (sum - want_sum).abs() <= 1e-4 * want_abs,
        "{}: hidden sums to {sum}, diffusers {want_sum}",
        folder.display()
    );

    let latents =
        Tensor::from_vec(floats(&reference["latents"]), (1, 4, 4, 4), &Device::Cpu).unwrap();
    let t = reference["timestep"].as_f64().unwrap() as f32;
    let timestep = Tensor::new(&[t], &Device::Cpu).unwrap();
    let eps = sd.unet.predict(&latents, &timestep, &hidden).unwrap();
    let ours = eps.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let theirs = floats(&reference["eps"]);
    let diff = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    eprintln!("{}: UNet ε max abs difference {diff:.2e}", folder.display());
    assert!(diff < 1e-5, "{}: UNet ε differs by {diff}", folder.display());
}

#[test]
fn a_pipeline_saved_by_todays_diffusers_loads_as_diffusers_loads_it() {
    matches_diffusers(&seed_fixtures().join("sd"), None);
}

#[test]
fn the_fp16_variant_loads_into_f32_as_diffusers_loads_it() {
    matches_diffusers(&seed_fixtures().join("sd-variants/fp16"), Some("fp16"));
}

#[test]
fn a_sharded_checkpoint_loads_from_its_index() {
    let folder = seed_fixtures().join("sd-variants/sharded");
    let pipeline = SdPipeline::open(&folder).unwrap();
    assert_eq!(pipeline.weight_files("unet").unwrap().len(), 6);
    matches_diffusers(&folder, None);
}

#[test]
fn pytorch_pickle_weights_load_as_diffusers_loads_them() {
    matches_diffusers(&seed_fixtures().join("sd-variants/bin"), None);
}

#[test]
fn the_slow_tokenizer_files_alone_load() {
    matches_diffusers(&seed_fixtures().join("sd-variants/slow-tokenizer"), None);
}

#[test]
fn asking_for_a_variant_the_folder_lacks_names_the_file_and_the_fix() {
    let pipeline = SdPipeline::open_variant(&seed_fixtures().join("sd"), Some("fp16")).unwrap();
    let err = StableDiffusion::load(&pipeline, &Device::Cpu, DType::F32).err().unwrap();
    let message = err.to_string();
    assert!(message.contains("diffusion_pytorch_model.fp16.safetensors"), "{message}");
}

#[test]
fn dependency_files_of_a_sharded_pipeline_include_its_index_and_every_shard() {
    let folder = seed_fixtures().join("sd-variants/sharded");
    let deps = SdPipeline::open(&folder).unwrap().dependency_files().unwrap();
    assert!(deps.contains_key("unet/diffusion_pytorch_model.safetensors.index.json"));
    let shards = deps.keys().filter(|k| k.starts_with("unet/") && k.contains("-of-")).count();
    assert_eq!(shards, 6);
}

#[test]
fn copying_a_variant_pipeline_writes_the_default_names() {
    let pipeline =
        SdPipeline::open_variant(&seed_fixtures().join("sd-variants/fp16"), Some("fp16")).unwrap();
    let to = tempfile::tempdir().unwrap();
    sdpipe_diffusion::copy_components(&pipeline, to.path(), &["unet"]).unwrap();
    assert!(to.path().join("vae/diffusion_pytorch_model.safetensors").is_file());
    assert!(to.path().join("text_encoder/model.safetensors").is_file());
    assert!(!to.path().join("vae/diffusion_pytorch_model.fp16.safetensors").exists());
    assert!(to.path().join("tokenizer/tokenizer.json").is_file());
}

/// The download path: resolving through the hub fetches the shard index first, then exactly
/// the shards it lists (and, for a variant, the variant's files only), into a cache laid out as
/// `huggingface_hub` lays it out.
#[test]
fn resolving_from_the_hub_fetches_the_shards_an_index_lists_and_a_variants_files() {
    use sdpipe_hub::testing::HubServer;
    let fixtures = seed_fixtures();
    let sharded = fixtures.join("sd-variants/sharded");
    let fp16 = fixtures.join("sd-variants/fp16");
    let hub = HubServer::serve_all(&[("org/sharded", &sharded), ("org/fp16", &fp16)]).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let config = sdpipe_hub::HubConfig {
        cache_dir: cache.path().to_path_buf(),
        endpoint: hub.endpoint(),
        token: None,
        offline: false,
    };
    let resolve = |repo: &str, variant| {
        sdpipe_diffusion::pipeline::resolve_folder(&config, repo, "main", variant, Fetch::allowed())
            .unwrap()
    };

    let root = resolve("org/sharded", None);
    let pipeline = SdPipeline::open(&root).unwrap();
    assert_eq!(pipeline.weight_files("unet").unwrap().len(), 6);
    matches_diffusers_at(&root, &sharded, None);

    let root = resolve("org/fp16", Some("fp16"));
    assert!(root.join("unet/diffusion_pytorch_model.fp16.safetensors").is_file());
    matches_diffusers_at(&root, &fp16, Some("fp16"));

    // Offline, or only looking, the cache alone resolves it, without a request.
    let requests = hub.requests();
    let offline = sdpipe_hub::HubConfig { offline: true, ..config.clone() };
    let resolve = sdpipe_diffusion::pipeline::resolve_folder;
    resolve(&offline, "org/sharded", "main", None, Fetch::allowed()).unwrap();
    resolve(&config, "org/sharded", "main", None, Fetch::LocalOnly).unwrap();
    assert_eq!(hub.requests(), requests);
}

/// [`matches_diffusers`] on a copy of `folder` (a cache snapshot) with the reference of `of`.
fn matches_diffusers_at(folder: &Path, of: &Path, variant: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("pipeline");
    copy_dir(folder, &copy);
    std::fs::copy(of.join("reference.json"), copy.join("reference.json")).unwrap();
    matches_diffusers(&copy, variant);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let dest = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &dest);
        } else {
            std::fs::copy(&path, &dest).unwrap();
        }
    }
}
