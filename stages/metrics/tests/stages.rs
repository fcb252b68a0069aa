//! The `fid` and `lpips` kinds run through the stage harness: outputs per the data contract,
//! parity of the whole stage with the reference tools, and clear errors on bad input.

mod common;

use std::path::{Path, PathBuf};

use common::{f64s, fixtures, reference, relative_error};
use sdpipe_metrics::{kinds, Fid, LpipsKind};
use sdpipe_stages::api::{Fetch, StageKind};
use sdpipe_stages::testing::{params, Harness};
use serde_json::{json, Value};

fn run(kind: &dyn StageKind, real: &Path, fake: &Path, overrides: &[(&str, Value)]) -> Harness {
    let mut h = Harness::new().input("real", real).input("fake", fake);
    h.threads = 2;
    let p = params(kind, overrides);
    h.run(kind, &p).unwrap_or_else(|e| panic!("stage failed: {e}"));
    h
}

fn run_err(kind: &dyn StageKind, real: &Path, fake: &Path, overrides: &[(&str, Value)]) -> String {
    let mut h = Harness::new().input("real", real).input("fake", fake);
    let p = params(kind, overrides);
    h.run(kind, &p).expect_err("the stage should fail").to_string()
}

fn read_json(path: PathBuf) -> Value {
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// A copy of fixture images `ids` of `set` into a fresh folder (optionally as an imagefolder).
fn copy_set(set: &str, ids: &[&str], imagefolder_split: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let target = match imagefolder_split {
        Some(split) => dir.path().join(split),
        None => dir.path().to_path_buf(),
    };
    std::fs::create_dir_all(&target).unwrap();
    let mut metadata = String::new();
    for id in ids {
        std::fs::copy(
            fixtures().join(set).join(format!("{id}.png")),
            target.join(format!("{id}.png")),
        )
        .unwrap();
        metadata.push_str(&format!("{{\"file_name\": \"{id}.png\", \"text\": \"a caption\"}}\n"));
    }
    if imagefolder_split.is_some() {
        std::fs::write(target.join("metadata.jsonl"), metadata).unwrap();
    }
    dir
}

#[test]
fn the_crate_exports_its_metric_kinds() {
    let names: Vec<&str> = kinds().iter().map(|k| k.name()).collect();
    assert_eq!(names, ["fid", "lpips", "cmmd", "clip-score", "tiny-clip"]);
}

#[test]
fn fid_stage_matches_pytorch_fid_on_the_same_images() {
    let h = run(
        &Fid,
        &fixtures().join("real"),
        &fixtures().join("fake"),
        &[("weights", json!("random")), ("resize", json!("none"))],
    );
    let m = read_json(h.out_dir().join("metrics.json"));
    let expected = reference()["fid"]["pytorch_fid"].as_f64().unwrap();
    let fid = m["fid"].as_f64().unwrap();
    assert!(relative_error(fid, expected) < 1e-3, "{fid} vs pytorch-fid {expected}");
    assert_eq!(m["metric"], "fid");
    assert_eq!((m["n_real"].as_u64(), m["n_fake"].as_u64()), (Some(6), Some(5)));
    assert!(m["weights"].as_str().unwrap().starts_with("random"));
    assert_eq!(m["kid_subset_size"], 5);
    assert!(m["kid_mean"].as_f64().unwrap().is_finite());
    assert!(m["kid_std"].as_f64().unwrap() >= 0.0);
    assert!(m["note"].as_str().unwrap().contains("KID"), "small N is flagged");
}

#[test]
fn fid_stage_reads_an_imagefolder_split_and_records_the_ground_truth_resize() {
    let real = copy_set("real", &["img0", "img1", "img2"], Some("test"));
    let h = run(&Fid, real.path(), &fixtures().join("fake"), &[("weights", json!("random"))]);
    let m = read_json(h.out_dir().join("metrics.json"));
    assert_eq!(m["n_real"], 3);
    assert!(m["resize"].as_str().unwrap().contains("48x48"), "{}", m["resize"]);
    assert_eq!(m["real_split"], "test");
    assert!(m["fid"].as_f64().unwrap() > 0.0);
}

#[test]
fn fid_with_missing_weights_names_the_file_and_the_convert_command() {
    let e = run_err(
        &Fid,
        &fixtures().join("real"),
        &fixtures().join("fake"),
        &[("weights", json!("/nonexistent/weights/pt_inception.safetensors"))],
    );
    assert!(e.contains("/nonexistent/weights/pt_inception.safetensors"), "{e}");
    assert!(e.contains("sdpipe convert-weights fid-inception"), "{e}");
}

#[test]
fn fid_external_deps_are_the_weights_file_unless_random() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("inception.safetensors");
    std::fs::write(&file, b"x").unwrap();
    let deps =
        Fid.external_deps(&params(&Fid, &[("weights", json!(file))]), Fetch::allowed()).unwrap();
    assert_eq!(deps.get("weights"), Some(&file));
    assert!(Fid
        .external_deps(&params(&Fid, &[("weights", json!("random"))]), Fetch::allowed())
        .unwrap()
        .is_empty());
    let missing = Fid.external_deps(
        &params(&Fid, &[("weights", json!("/no/such.safetensors"))]),
        Fetch::allowed(),
    );
    assert!(missing.unwrap_err().to_string().contains("convert-weights"));
}

#[test]
fn fid_of_a_single_image_is_an_error_naming_it() {
    let one = copy_set("fake", &["img0"], None);
    let e = run_err(&Fid, &fixtures().join("real"), one.path(), &[("weights", json!("random"))]);
    assert!(e.contains("at least 2 fake images") && e.contains("img0.png"), "{e}");
}

#[test]
fn fid_of_an_empty_folder_is_an_error_naming_it() {
    let empty = tempfile::tempdir().unwrap();
    let e = run_err(&Fid, empty.path(), &fixtures().join("fake"), &[("weights", json!("random"))]);
    assert!(e.contains("holds no images") && e.contains(&empty.path().display().to_string()));
}

#[test]
fn an_unreadable_generated_image_is_an_error_naming_it() {
    let fake = copy_set("fake", &["img0", "img1"], None);
    std::fs::write(fake.path().join("img2.png"), b"truncated").unwrap();
    let e = run_err(&Fid, &fixtures().join("real"), fake.path(), &[("weights", json!("random"))]);
    assert!(e.contains("img2.png"), "{e}");
}

#[test]
fn generated_images_of_different_sizes_cannot_set_the_ground_truth_size() {
    let fake = copy_set("fake", &["img0", "img1"], None);
    std::fs::copy(fixtures().join("real/img0.png"), fake.path().join("img9.png")).unwrap();
    let e = run_err(&Fid, &fixtures().join("real"), fake.path(), &[("weights", json!("random"))]);
    assert!(e.contains("differ in size") && e.contains("resize: none"), "{e}");
}

#[test]
fn lpips_stage_matches_the_lpips_package_per_pair() {
    let lp = fixtures().join("lpips");
    let h = run(
        &LpipsKind,
        &lp.join("ref"),
        &lp.join("dist"),
        &[("weights", json!("random")), ("batch_size", json!(3))],
    );
    let expected = f64s(&reference()["lpips"]["alex"]);
    let lines = std::fs::read_to_string(h.out_dir().join("per_image.jsonl")).unwrap();
    let rows: Vec<Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 4);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["id"], format!("p{i}"));
        assert_eq!(row["real"], format!("p{i}.png"));
        let got = row["lpips"].as_f64().unwrap();
        assert!((got - expected[i]).abs() <= 1e-4, "p{i}: {got} vs {}", expected[i]);
    }
    let m = read_json(h.out_dir().join("metrics.json"));
    let mean = expected.iter().sum::<f64>() / 4.0;
    assert!((m["lpips"].as_f64().unwrap() - mean).abs() <= 1e-4);
    assert_eq!(
        (m["metric"].as_str(), m["net"].as_str(), m["version"].as_str()),
        (Some("lpips"), Some("alex"), Some("0.1"))
    );
    assert_eq!(m["n"], 4);
    assert!(m["trunk_weights"].as_str().unwrap().starts_with("random"));
}

#[test]
fn lpips_resizes_ground_truth_to_the_sample_size_and_says_so() {
    let ids = ["img0", "img1"];
    let (real, fake) = (copy_set("real", &ids, None), copy_set("fake", &ids, None));
    let h = run(&LpipsKind, real.path(), fake.path(), &[("weights", json!("random"))]);
    let m = read_json(h.out_dir().join("metrics.json"));
    assert!(m["resize"].as_str().unwrap().contains("48x48"), "{}", m["resize"]);
    assert_eq!(m["n"], 2);
}

#[test]
fn lpips_without_resizing_refuses_pairs_of_different_sizes() {
    let ids = ["img0", "img1"];
    let (real, fake) = (copy_set("real", &ids, None), copy_set("fake", &ids, None));
    let e = run_err(
        &LpipsKind,
        real.path(),
        fake.path(),
        &[("weights", json!("random")), ("resize", json!("none"))],
    );
    assert!(e.contains("64x48") && e.contains("48x48") && e.contains("img0.png"), "{e}");
}

#[test]
fn lpips_with_mismatched_ids_lists_the_unpaired_images() {
    let real = copy_set("real", &["img0", "img1"], None);
    let fake = copy_set("fake", &["img1", "img2"], None);
    let e = run_err(&LpipsKind, real.path(), fake.path(), &[("weights", json!("random"))]);
    assert!(e.contains("img2.png") && e.contains("img0.png"), "{e}");
}

#[test]
fn lpips_external_deps_cover_linear_layers_and_trunk() {
    let dir = tempfile::tempdir().unwrap();
    let (lin, trunk) = (dir.path().join("lin.safetensors"), dir.path().join("trunk.safetensors"));
    std::fs::write(&lin, b"x").unwrap();
    std::fs::write(&trunk, b"x").unwrap();
    let p = params(&LpipsKind, &[("weights", json!(lin)), ("trunk_weights", json!(trunk))]);
    let deps = LpipsKind.external_deps(&p, Fetch::allowed()).unwrap();
    assert_eq!((deps.get("weights"), deps.get("trunk_weights")), (Some(&lin), Some(&trunk)));
    let random = params(&LpipsKind, &[("weights", json!("random"))]);
    assert!(LpipsKind.external_deps(&random, Fetch::allowed()).unwrap().is_empty());
}
