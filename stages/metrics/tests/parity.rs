//! Parity with the reference tools, from the fixtures tests/parity/metrics.py wrote by running
//! pytorch-fid, lpips and clean-fid on networks with the shared random-recipe weights.
//!
//! Tolerances, and why:
//! - Inception features: |Δ| ≤ 1e-4·max|f|. The networks are the same to the bit; only f32
//!   summation order differs (candle's im2col/gemm vs PyTorch's conv kernels, and folding
//!   BatchNorm into the conv), and the ~1e-7 relative rounding per layer compounds over 48
//!   layers.
//! - FID: 1e-3 relative, the project's target for the end-to-end value; the statistics
//!   themselves are checked much tighter on identical inputs (1e-9 against the exact value).
//! - LPIPS: 1e-4 absolute per pair (f32 rounding in the trunk; the distances are ≥ 1e-3).
//! - Bilinear resize: 1e-6 (PyTorch weights the four neighbours in f32, candle in f64).
//! - KID on identical features: 1e-9 relative (both f64).

// The generic (GPU) path against the CPU kernels, in this binary to save a link.
mod common;
mod device_paths;

use std::sync::OnceLock;

use candle_core::{DType, Tensor};
use common::{f64s, fixtures, reference, reference_tensor, relative_error, rows};
use sdpipe_metrics::frechet::{self, Method};
use sdpipe_metrics::images;
use sdpipe_metrics::inception::{self, FidInception};
use sdpipe_metrics::kid;
use sdpipe_metrics::lpips::{lin_specs, trunk_specs, Lpips, Net};
use sdpipe_metrics::weights::Weights;
use sdpipe_metrics::{convert_weights, WeightsKind};

fn image_paths(set: &str) -> Vec<std::path::PathBuf> {
    let n = if set == "real" { 6 } else { 5 };
    (0..n).map(|i| fixtures().join(set).join(format!("img{i}.png"))).collect()
}

/// The Inception with recipe weights (seed 0), built once per test binary.
fn model() -> &'static FidInception {
    static MODEL: OnceLock<FidInception> = OnceLock::new();
    MODEL.get_or_init(|| {
        let weights = Weights::random(&inception::tensor_specs(), 0);
        FidInception::new(&weights).unwrap()
    })
}

/// Rust features of a fixture set `[N, 2048]`, computed once.
fn rust_features(set: &'static str) -> &'static Vec<Vec<f32>> {
    static REAL: OnceLock<Vec<Vec<f32>>> = OnceLock::new();
    static FAKE: OnceLock<Vec<Vec<f32>>> = OnceLock::new();
    let cell = if set == "real" { &REAL } else { &FAKE };
    cell.get_or_init(|| {
        let batch: Vec<Tensor> = image_paths(set)
            .iter()
            .map(|p| {
                let image = images::load_rgb(p).unwrap();
                inception::preprocess(&images::to_unit_tensor(&image).unwrap()).unwrap()
            })
            .collect();
        let batch = inception::stack(&batch).unwrap();
        model().features(&batch).unwrap().to_vec2::<f32>().unwrap()
    })
}

fn reference_rows(name: &str) -> Vec<Vec<f32>> {
    reference_tensor(name).to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap()
}

#[test]
fn bilinear_resize_to_299_matches_torch_interpolate() {
    let image = images::load_rgb(&fixtures().join("real/img0.png")).unwrap();
    let resized = inception::preprocess(&images::to_unit_tensor(&image).unwrap()).unwrap();
    let grid: Vec<i64> = reference_tensor("probe_grid").to_vec1().unwrap();
    let probe = reference_tensor("resized_probe").to_vec3::<f32>().unwrap();
    let resized = resized.to_vec3::<f32>().unwrap();
    for c in 0..3 {
        for (a, &y) in grid.iter().enumerate() {
            for (b, &x) in grid.iter().enumerate() {
                let (got, want) = (resized[c][y as usize][x as usize], probe[c][a][b]);
                assert!((got - want).abs() <= 1e-6, "c{c} ({y},{x}): {got} vs {want}");
            }
        }
    }
}

#[test]
fn inception_features_match_pytorch_fid() {
    for set in ["real", "fake"] {
        let ours = rust_features(set);
        let theirs = reference_rows(set);
        assert_eq!(ours.len(), theirs.len());
        let scale = theirs.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
        let worst = ours
            .iter()
            .flatten()
            .zip(theirs.iter().flatten())
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("{set}: max |Δ| {worst:e}, max |f| {scale}");
        assert!(scale > 0.1, "features should not vanish ({scale})");
        assert!(worst <= 1e-4 * scale, "{set}: max |Δ| {worst} vs scale {scale}");
    }
}

#[test]
fn fid_of_our_features_matches_pytorch_fid_within_1e_3() {
    let r = reference();
    let real = frechet::to_matrix(rust_features("real"), "real").unwrap();
    let fake = frechet::to_matrix(rust_features("fake"), "fake").unwrap();
    let fid = frechet::frechet_distance(&real, &fake).unwrap();
    let expected = r["fid"]["pytorch_fid"].as_f64().unwrap();
    eprintln!("fid {} vs pytorch-fid {expected}", fid.fid);
    assert!(relative_error(fid.fid, expected) < 1e-3, "{} vs {expected}", fid.fid);
}

#[test]
fn fid_statistics_on_pytorch_fid_features_are_exact() {
    let r = reference();
    let real = frechet::to_matrix(&reference_rows("real"), "real").unwrap();
    let fake = frechet::to_matrix(&reference_rows("fake"), "fake").unwrap();
    let fid = frechet::frechet_distance(&real, &fake).unwrap();
    assert_eq!(fid.method, Method::NuclearNorm);
    // numpy's SVD of the same matrix: the exact value.
    let exact = r["fid"]["nuclear_norm"].as_f64().unwrap();
    assert!(relative_error(fid.fid, exact) < 1e-9, "{} vs {exact}", fid.fid);
    // pytorch-fid itself (scipy sqrtm of the singular 2048² product) lands within 1e-5.
    let tool = r["fid"]["pytorch_fid"].as_f64().unwrap();
    assert!(relative_error(fid.fid, tool) < 1e-3, "{} vs {tool}", fid.fid);
}

#[test]
fn covariance_path_matches_pytorch_fid_when_n_exceeds_the_dimension() {
    let r = reference();
    let case = &r["covariance_case"];
    let a = frechet::to_matrix(&rows(&case["a"]), "a").unwrap();
    let b = frechet::to_matrix(&rows(&case["b"]), "b").unwrap();
    let expected = case["pytorch_fid"].as_f64().unwrap();
    for method in [Method::Covariance, Method::NuclearNorm] {
        let fid = frechet::frechet_distance_with(&a, &b, method).unwrap().fid;
        assert!(relative_error(fid, expected) < 1e-9, "{method:?}: {fid} vs {expected}");
    }
}

#[test]
fn kid_on_given_subsets_matches_clean_fid() {
    let r = reference();
    let real = frechet::to_matrix(&reference_rows("real"), "real").unwrap();
    let fake = frechet::to_matrix(&reference_rows("fake"), "fake").unwrap();
    let subsets = r["kid_subsets"]["subsets"].as_array().unwrap();
    let idx = |v: &serde_json::Value| -> Vec<usize> {
        v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
    };
    let mean = subsets
        .iter()
        .map(|s| kid::mmd2_of_subsets(&real, &fake, &idx(&s[0]), &idx(&s[1])))
        .sum::<f64>()
        / subsets.len() as f64;
    let expected = r["kid_subsets"]["clean_fid"].as_f64().unwrap();
    assert!(relative_error(mean, expected) < 1e-9, "{mean} vs {expected}");
}

#[test]
fn kid_over_whole_sets_matches_clean_fid_whatever_the_seed() {
    let r = reference();
    let real_rows: Vec<Vec<f32>> = reference_rows("real").into_iter().take(5).collect();
    let real = frechet::to_matrix(&real_rows, "real").unwrap();
    let fake = frechet::to_matrix(&reference_rows("fake"), "fake").unwrap();
    let k = kid::kid(&real, &fake, 100, 1000, 12345).unwrap();
    let expected = r["kid_subsets"]["first_five_of_each"].as_f64().unwrap();
    assert_eq!(k.subset_size, 5);
    assert!(relative_error(k.mean, expected) < 1e-9, "{} vs {expected}", k.mean);
    assert!(k.std < 1e-12);
}

fn lpips_pairs() -> Vec<(Tensor, Tensor)> {
    (0..4)
        .map(|i| {
            let load = |side: &str| {
                let p = fixtures().join(format!("lpips/{side}/p{i}.png"));
                images::to_signed_tensor(&images::load_rgb(&p).unwrap()).unwrap().unsqueeze(0)
            };
            (load("ref").unwrap(), load("dist").unwrap())
        })
        .collect()
}

fn assert_lpips(model: &Lpips, expected: &[f64]) {
    for (i, (r, d)) in lpips_pairs().iter().enumerate() {
        let got = model.distance(r, d).unwrap().to_vec1::<f32>().unwrap()[0] as f64;
        eprintln!("lpips pair {i}: {got} vs {} (|Δ| {:e})", expected[i], (got - expected[i]).abs());
        assert!((got - expected[i]).abs() <= 1e-4, "pair {i}: {got} vs {}", expected[i]);
        // Tighter than required, to notice drift early: relative 1e-4.
        assert!(relative_error(got, expected[i]) < 1e-4, "pair {i}: {got} vs {}", expected[i]);
    }
}

#[test]
fn lpips_alex_matches_the_lpips_package() {
    let r = reference();
    for (net, key) in [(Net::Alex, "alex"), (Net::Vgg16, "vgg")] {
        let w = Weights::random(&trunk_specs(net), 0).merged(Weights::random(&lin_specs(net), 0));
        assert_lpips(&Lpips::new(net, &w).unwrap(), &f64s(&r["lpips"][key]));
    }
}

#[test]
fn lpips_with_the_published_linear_layers_matches_the_lpips_package() {
    // The package's own v0.1 alex.pth (a Python 2 legacy pickle), converted by us.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lpips-v0.1-alex.safetensors");
    let input = fixtures().join("pth/lpips_v0.1_alex.pth");
    let converted = convert_weights(WeightsKind::LpipsAlex, &input, &out).unwrap();
    assert_eq!(converted.written, 5);
    let lins = Weights::load(&out, &lin_specs(Net::Alex), "lpips").unwrap();
    let w = Weights::random(&trunk_specs(Net::Alex), 0).merged(lins);
    let r = reference();
    assert_lpips(&Lpips::new(Net::Alex, &w).unwrap(), &f64s(&r["lpips"]["alex_published_lin"]));
}
