//! Fixture access for the metric tests (fixtures are written by tests/parity/metrics.py).
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use serde_json::Value;

/// `tests/fixtures/metrics/` at the repository root.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/metrics")
}

pub fn reference() -> Value {
    let text = std::fs::read_to_string(fixtures().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A tensor of `features.safetensors` (pytorch-fid's outputs).
pub fn reference_tensor(name: &str) -> Tensor {
    let mut all =
        candle_core::safetensors::load(fixtures().join("features.safetensors"), &Device::Cpu)
            .unwrap();
    all.remove(name).unwrap()
}

pub fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

pub fn rows(v: &Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(|r| f64s(r).into_iter().map(|x| x as f32).collect()).collect()
}

pub fn relative_error(actual: f64, expected: f64) -> f64 {
    (actual - expected).abs() / expected.abs().max(1e-12)
}
