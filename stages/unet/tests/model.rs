//! Loading, saving, input checking and training behaviour of the UNet (no reference tool needed).

// The generic (GPU) path against the CPU kernels, in this binary to save a link.
mod device_path;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::Optimizer;
use sdpipe_unet::{UNet, UNetConfig, UNetError};

fn tiny_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/unet/tiny/unet")
}

fn tiny() -> UNet {
    UNet::from_pretrained(&tiny_dir(), &Device::Cpu).unwrap()
}

fn inputs(batch: usize, seed: u64) -> (Tensor, Tensor, Tensor) {
    let d = &Device::Cpu;
    let noise = |dims: &[usize], k: u64| {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u64 + 1) * 2654435761 + seed * 97 + k) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Tensor::from_vec(v, dims, d).unwrap()
    };
    let t =
        Tensor::from_vec((0..batch).map(|i| (i * 333 + 17) as f32).collect(), batch, d).unwrap();
    (noise(&[batch, 4, 8, 8], 1), t, noise(&[batch, 7, 32], 2))
}

/// Shape and dtype of each tensor of a safetensors file, by name.
type Entries = HashMap<String, (Vec<usize>, safetensors::Dtype)>;

/// The tensors of a safetensors file and its metadata.
fn header(path: &Path) -> (Entries, Option<HashMap<String, String>>) {
    let bytes = std::fs::read(path).unwrap();
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors =
        st.tensors().into_iter().map(|(n, v)| (n, (v.shape().to_vec(), v.dtype()))).collect();
    (tensors, metadata.metadata().clone())
}

#[test]
fn save_pretrained_writes_diffusers_names_and_shapes_in_f32() {
    let dir = tempfile::tempdir().unwrap();
    tiny().save_pretrained(dir.path()).unwrap();
    let (ours, metadata) = header(&dir.path().join("diffusion_pytorch_model.safetensors"));
    let (original, _) = header(&tiny_dir().join("diffusion_pytorch_model.safetensors"));
    assert_eq!(ours.len(), original.len());
    for (name, (shape, _)) in &original {
        let (our_shape, dtype) = ours.get(name).unwrap_or_else(|| panic!("`{name}` not saved"));
        assert_eq!(our_shape, shape, "{name}");
        assert_eq!(*dtype, safetensors::Dtype::F32, "{name}");
    }
    assert_eq!(metadata.unwrap().get("format").map(String::as_str), Some("pt"));
}

#[test]
fn save_pretrained_keeps_the_config_as_loaded() {
    let dir = tempfile::tempdir().unwrap();
    tiny().save_pretrained(dir.path()).unwrap();
    let read = |p: PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    assert_eq!(read(dir.path().join("config.json")), read(tiny_dir().join("config.json")));
}

#[test]
fn a_saved_model_reloads_with_identical_weights_and_predictions() {
    let dir = tempfile::tempdir().unwrap();
    let unet = tiny();
    unet.save_pretrained(dir.path()).unwrap();
    let reloaded = UNet::from_pretrained(dir.path(), &Device::Cpu).unwrap();
    for (name, var) in unet.vars() {
        let diff: f32 = (var.as_tensor() - reloaded.vars()[name].as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(diff, 0.0, "{name}");
    }
    let (x, t, c) = inputs(2, 0);
    let a = unet.forward(&x, &t, &c).unwrap();
    let b = reloaded.forward(&x, &t, &c).unwrap();
    assert_eq!((a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
}

/// A copy of the tiny model folder whose weights file lacks `drop` and whose config has
/// `edit` applied.
fn altered_copy(drop: Option<&str>, edit: impl Fn(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = candle_core::safetensors::load(
        tiny_dir().join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    if let Some(name) = drop {
        tensors.remove(name);
    }
    candle_core::safetensors::save(
        &tensors,
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_dir().join("config.json")).unwrap())
            .unwrap();
    edit(&mut config);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

#[test]
fn a_missing_weight_is_reported_by_name_and_file() {
    let dir = altered_copy(Some("mid_block.attentions.0.proj_in.weight"), |_| {});
    let err = UNet::from_pretrained(dir.path(), &Device::Cpu).unwrap_err();
    assert!(matches!(err, UNetError::Weights { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("missing tensor `mid_block.attentions.0.proj_in.weight`"),
        "{message}"
    );
    assert!(message.contains("diffusion_pytorch_model.safetensors"), "{message}");
}

#[test]
fn weights_of_another_architecture_are_rejected_with_the_mismatches() {
    let dir = altered_copy(None, |c| c["block_out_channels"] = serde_json::json!([32, 96]));
    let message = UNet::from_pretrained(dir.path(), &Device::Cpu).unwrap_err().to_string();
    assert!(message.contains("do not match the UNet described by config.json"), "{message}");
    assert!(
        message.contains("has shape [64, 32, 3, 3], the config implies [96, 32, 3, 3]"),
        "{message}"
    );
}

#[test]
fn weights_that_disagree_with_a_config_at_the_size_caps_are_refused_without_allocating() {
    // 16384 channels: every parameter the config implies is gigabytes. The weights' headers
    // disagree, so nothing is read or allocated (before, a zero placeholder per parameter was).
    let dir = altered_copy(None, |c| c["block_out_channels"] = serde_json::json!([16384, 16384]));
    let started = std::time::Instant::now();
    let message = UNet::from_pretrained(dir.path(), &Device::Cpu).unwrap_err().to_string();
    assert!(message.contains("the config implies [16384, 4, 3, 3]"), "{message}");
    assert!(started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());
}

#[test]
fn an_unsupported_block_type_is_rejected_naming_the_key() {
    let dir = altered_copy(None, |c| {
        c["down_block_types"] = serde_json::json!(["AttnDownBlock2D", "DownBlock2D"])
    });
    let err = UNet::from_pretrained(dir.path(), &Device::Cpu).unwrap_err();
    assert!(matches!(err, UNetError::Config { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("config.json"), "{message}");
    assert!(
        message.contains("`down_block_types`: block type `AttnDownBlock2D` is not supported"),
        "{message}"
    );
}

#[test]
fn a_missing_folder_is_an_error_naming_the_config_path() {
    let err = UNet::from_pretrained(Path::new("/nonexistent/unet"), &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/unet/config.json"), "{err}");
}

#[test]
fn inputs_that_do_not_fit_the_model_are_clear_errors() {
    let unet = tiny();
    let (x, t, c) = inputs(2, 0);
    let d = &Device::Cpu;
    let odd = Tensor::zeros((2, 4, 6, 7), DType::F32, d).unwrap();
    let three = Tensor::zeros((2, 3, 8, 8), DType::F32, d).unwrap();
    let wide = Tensor::zeros((2, 7, 48), DType::F32, d).unwrap();
    let cases = [
        (unet.forward(&odd, &t, &c), "must be multiples of 2"),
        (unet.forward(&three, &t, &c), "the sample has 3 channels, the UNet takes 4"),
        (unet.forward(&x, &t, &wide), "width 48, the UNet's cross-attention expects 32"),
        (
            unet.forward(&x, &Tensor::zeros(3, DType::F32, d).unwrap(), &c),
            "timesteps must be a scalar or have shape (2,)",
        ),
    ];
    for (result, expected) in cases {
        let err = result.unwrap_err();
        assert!(matches!(err, UNetError::Input(_)), "{err:?}");
        assert!(err.to_string().contains(expected), "{err}");
    }
}

#[test]
fn a_scalar_timestep_applies_to_the_whole_batch() {
    let unet = tiny();
    let (x, _, c) = inputs(2, 0);
    let scalar = unet.forward(&x, &Tensor::new(250f32, &Device::Cpu).unwrap(), &c).unwrap();
    let per_item =
        unet.forward(&x, &Tensor::new(&[250f32, 250.0], &Device::Cpu).unwrap(), &c).unwrap();
    let diff: f32 =
        (scalar - per_item).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    assert_eq!(diff, 0.0);
}

#[test]
fn the_loss_function_must_return_a_scalar() {
    let unet = tiny();
    let (x, t, c) = inputs(1, 0);
    let err = unet.loss_and_grads(&x, &t, &c, false, |p| p.sqr()).unwrap_err();
    assert!(err.to_string().contains("must return a scalar"), "{err}");
}

#[test]
fn random_models_are_reproducible_from_their_seed() {
    let d = &Device::Cpu;
    let a = UNet::random(UNetConfig::tiny(), 7, d).unwrap();
    let b = UNet::random(UNetConfig::tiny(), 7, d).unwrap();
    let c = UNet::random(UNetConfig::tiny(), 8, d).unwrap();
    let w = |u: &UNet| {
        u.vars()["conv_in.weight"].as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    assert_eq!(w(&a), w(&b));
    assert_ne!(w(&a), w(&c));
    // The same parameter set as the diffusers model of the same config.
    assert_eq!(a.parameter_count(), tiny().parameter_count());
}

#[test]
fn following_the_gradients_lowers_the_loss() {
    let unet = tiny();
    let (x, t, c) = inputs(2, 3);
    let target = (&x * 0.5).unwrap();
    let loss_fn = |p: &Tensor| (p - &target)?.sqr()?.mean_all();
    let vars: Vec<_> = unet.vars().values().cloned().collect();
    let mut sgd = candle_nn::SGD::new(vars, 0.05).unwrap();
    let mut losses = Vec::new();
    for step in 0..4 {
        // Alternate the two modes: both must drive the same optimisation.
        let (loss, grads) = unet.loss_and_grads(&x, &t, &c, step % 2 == 1, loss_fn).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        sgd.step(&grads).unwrap();
    }
    assert!(losses.windows(2).all(|w| w[1] < w[0]), "losses {losses:?}");
}

#[test]
fn predict_equals_forward_without_a_graph() {
    let unet = tiny();
    let (x, t, c) = inputs(2, 5);
    let tracked = unet.forward(&x, &t, &c).unwrap();
    let plain = unet.predict(&x, &t, &c).unwrap();
    assert!(tracked.track_op() && !plain.track_op());
    let diff: f32 =
        (tracked - plain).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    assert_eq!(diff, 0.0);
}

fn for_inference() -> UNet {
    let weights = tiny_dir().join("diffusion_pytorch_model.safetensors");
    UNet::for_inference(&tiny_dir(), &[weights], DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn an_inference_model_predicts_what_the_trainable_one_does_without_a_graph() {
    let unet = for_inference();
    assert!(!unet.is_trainable());
    let (x, t, c) = inputs(2, 6);
    let ours = unet.forward(&x, &t, &c).unwrap();
    assert!(!ours.track_op(), "an inference forward records no graph");
    let trained = tiny().forward(&x, &t, &c).unwrap();
    let scale: f32 = trained.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    let diff: f32 =
        (ours - trained).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    // Inference attention is a blocked kernel that sums in another order than the training
    // path: equal up to f32 rounding (measured 1.8e-6 at scale 1.3).
    eprintln!("max |Δ| {diff:e} at scale {scale}");
    assert!(diff <= 1e-5 * scale.max(1.0), "max |Δ| {diff} at scale {scale}");
}

#[test]
fn an_inference_model_refuses_to_compute_gradients() {
    let (x, t, c) = inputs(1, 7);
    let err = for_inference().loss_and_grads(&x, &t, &c, false, |p| p.sqr()?.mean_all());
    let err = err.unwrap_err().to_string();
    assert!(err.contains("inference"), "{err}");
}

#[test]
fn sharded_weights_load_as_one_state_dict() {
    let whole = candle_core::safetensors::load(
        tiny_dir().join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    for (i, (name, tensor)) in whole.into_iter().enumerate() {
        if i % 2 == 0 {
            a.insert(name, tensor)
        } else {
            b.insert(name, tensor)
        };
    }
    let shards = [dir.path().join("a.safetensors"), dir.path().join("b.safetensors")];
    candle_core::safetensors::save(&a, &shards[0]).unwrap();
    candle_core::safetensors::save(&b, &shards[1]).unwrap();
    let sharded = UNet::for_inference(&tiny_dir(), &shards, DType::F32, &Device::Cpu).unwrap();
    let (x, t, c) = inputs(1, 8);
    let diff: f32 = (sharded.forward(&x, &t, &c).unwrap()
        - for_inference().forward(&x, &t, &c).unwrap())
    .unwrap()
    .abs()
    .unwrap()
    .max_all()
    .unwrap()
    .to_scalar()
    .unwrap();
    assert_eq!(diff, 0.0);
}

#[test]
fn a_tensor_in_two_shards_is_an_error_naming_it() {
    let whole = candle_core::safetensors::load(
        tiny_dir().join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let shards = [dir.path().join("a.safetensors"), dir.path().join("b.safetensors")];
    let name = whole.keys().next().unwrap().clone();
    candle_core::safetensors::save(&whole, &shards[0]).unwrap();
    let one: HashMap<String, Tensor> = [(name.clone(), whole[&name].clone())].into();
    candle_core::safetensors::save(&one, &shards[1]).unwrap();
    let err = UNet::for_inference(&tiny_dir(), &shards, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&name) && err.contains("b.safetensors"), "{err}");
}

#[test]
fn the_context_gradient_matches_finite_differences_with_and_without_checkpointing() {
    let unet = tiny();
    let (x, t, c) = inputs(2, 5);
    let target = (&x * 0.5).unwrap();
    let loss_fn = |p: &Tensor| (p - &target)?.sqr()?.mean_all();
    let loss_at = |c: &Tensor| {
        let (loss, _) = unet.loss_and_grads(&x, &t, c, false, loss_fn).unwrap();
        loss.to_scalar::<f32>().unwrap() as f64
    };
    let values = c.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for checkpointing in [false, true] {
        let (_, _, grad) =
            unet.loss_and_grads_with_context(&x, &t, &c, checkpointing, loss_fn).unwrap();
        assert_eq!(grad.dims(), c.dims());
        let grad = grad.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut largest: Vec<usize> = (0..grad.len()).collect();
        largest.sort_by(|&a, &b| grad[b].abs().total_cmp(&grad[a].abs()));
        for &i in &largest[..3] {
            let h = 1e-2f32;
            let shifted = |delta: f32| {
                let mut v = values.clone();
                v[i] += delta;
                Tensor::from_vec(v, c.dims(), c.device()).unwrap()
            };
            let numeric = (loss_at(&shifted(h)) - loss_at(&shifted(-h))) / (2.0 * h as f64);
            let analytic = grad[i] as f64;
            assert!(
                (numeric - analytic).abs() <= 0.05 * analytic.abs() + 1e-5,
                "checkpointing {checkpointing}, context[{i}]: numeric {numeric}, analytic {analytic}"
            );
        }
    }
}
