//! `convert_weights` and the checkpoint reader on files written by `torch.save` (both container
//! formats) and on the lpips package's published `alex.pth`.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{f64s, fixtures};
use sdpipe_metrics::lpips::{lin_specs, Net};
use sdpipe_metrics::pth::read_tensors;
use sdpipe_metrics::weights::Weights;
use sdpipe_metrics::{convert_weights, ConvertError, WeightsKind};

fn pth(name: &str) -> std::path::PathBuf {
    fixtures().join("pth").join(name)
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

#[test]
fn legacy_and_zip_checkpoints_convert_to_the_same_exact_values() {
    let expected = Weights::random(&lin_specs(Net::Alex), 0);
    for file in ["lin_alex_legacy.pth", "lin_alex_zip.pth"] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("lins.safetensors");
        let report = convert_weights(WeightsKind::LpipsAlex, &pth(file), &out).unwrap();
        assert_eq!(report.written, 5, "{file}");
        assert!(report.dropped.is_empty(), "{file}: {:?}", report.dropped);
        for (name, tensor) in load(&out) {
            assert_eq!(tensor.dtype(), DType::F32);
            assert_eq!(values(&tensor), values(expected.get(&name).unwrap()), "{file}: {name}");
        }
    }
}

#[test]
fn the_published_python2_alex_pth_converts_to_non_negative_linear_weights() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lins.safetensors");
    convert_weights(WeightsKind::LpipsAlex, &pth("lpips_v0.1_alex.pth"), &out).unwrap();
    let lins = load(&out);
    let total: usize = lins.values().map(|t| t.elem_count()).sum();
    assert_eq!(total, 1152);
    assert!(lins.values().flat_map(values).all(|v| v >= 0.0));
}

#[test]
fn views_offsets_transposes_parameters_and_dtypes_read_as_torch_saved_them() {
    let text = std::fs::read_to_string(pth("layouts.json")).unwrap();
    let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
    for file in ["layouts_legacy.pth", "layouts_zip.pth"] {
        let tensors: HashMap<String, Tensor> =
            read_tensors(&pth(file)).unwrap().into_iter().collect();
        for (name, want) in expected.as_object().unwrap() {
            let got = tensors.get(name).unwrap_or_else(|| panic!("{file}: `{name}` missing"));
            let shape: Vec<usize> = f64s(&want["shape"]).into_iter().map(|x| x as usize).collect();
            assert_eq!(got.dims(), shape.as_slice(), "{file}: {name}");
            let dtype = match want["dtype"].as_str().unwrap() {
                "float32" => DType::F32,
                "float16" => DType::F16,
                "int64" => DType::I64,
                other => panic!("unexpected dtype {other}"),
            };
            assert_eq!(got.dtype(), dtype, "{file}: {name}");
            assert_eq!(values(got), f64s(&want["values"]), "{file}: {name}");
        }
    }
}

#[test]
fn converting_a_file_of_another_kind_names_the_missing_tensor_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    let err =
        convert_weights(WeightsKind::FidInception, &pth("lin_alex_zip.pth"), &out).unwrap_err();
    assert!(matches!(err, ConvertError::Missing { .. }));
    let text = err.to_string();
    assert!(text.contains("Conv2d_1a_3x3.conv.weight") && text.contains("lin_alex_zip.pth"));
    assert!(!out.exists(), "nothing is written on failure");
}

#[test]
fn a_file_that_is_not_a_checkpoint_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("weights.pth");
    std::fs::write(&input, b"<html>rate limited</html>").unwrap();
    let err = convert_weights(WeightsKind::Alexnet, &input, &dir.path().join("o.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("weights.pth") && err.contains("not a PyTorch checkpoint"), "{err}");
}

#[test]
fn a_missing_input_is_an_io_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("absent.pth");
    let err = convert_weights(WeightsKind::Alexnet, &input, &dir.path().join("o.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("absent.pth"), "{err}");
}

/// Full-size random checkpoints in the published layouts are ~100 MB, so they are not
/// committed: `python3 tests/parity/metrics.py --big DIR` writes them, then
/// `SDPIPE_METRICS_BIG_PTH=DIR cargo test -p sdpipe-metrics --test convert -- --ignored`.
#[test]
#[ignore]
fn converts_full_size_checkpoints() {
    let dir = std::path::PathBuf::from(std::env::var("SDPIPE_METRICS_BIG_PTH").unwrap());
    let out = tempfile::tempdir().unwrap();
    for (kind, stem, dropped) in [
        (WeightsKind::FidInception, "inception", 2 + 94), // fc.{weight,bias}, num_batches_tracked
        (WeightsKind::Alexnet, "alexnet", 6),             // classifier.{1,4,6}.{weight,bias}
    ] {
        let expected = Weights::random(&kind.specs(), 0);
        for format in ["legacy", "zip"] {
            let input = dir.join(format!("{stem}_{format}.pth"));
            let target = out.path().join(format!("{stem}_{format}.safetensors"));
            let report = convert_weights(kind, &input, &target).unwrap();
            assert_eq!(report.written, kind.specs().len());
            assert_eq!(report.dropped.len(), dropped, "{:?}", report.dropped);
            let converted = Weights::load(&target, &kind.specs(), kind.what()).unwrap();
            for spec in kind.specs() {
                assert_eq!(
                    values(converted.get(&spec.name).unwrap()),
                    values(expected.get(&spec.name).unwrap()),
                    "{stem} {format}: {}",
                    spec.name
                );
            }
        }
    }
}
