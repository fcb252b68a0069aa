//! The data stages wired through the engine: synthetic → imagefolder.

use crate::common;
use common::*;

const PIPELINE: &str = r#"
stages:
  data:
    uses: synthetic
    with: {count: 6, resolution: 16, style: textured, seed: 3}
  set:
    uses: imagefolder
    with: {images: data.images, photos: data.photos, test_count: 2}
"#;

fn lines(p: &Project, rel: &str) -> Vec<serde_json::Value> {
    p.read(rel).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn synthetic_dataset_becomes_an_imagefolder_in_the_run_directory() {
    let p = Project::new();
    p.write("p.yaml", PIPELINE);
    p.run_ok("p.yaml", &[]);
    let train = lines(&p, "runs/p/set/dataset/train/metadata.jsonl");
    let test = lines(&p, "runs/p/set/dataset/test/metadata.jsonl");
    assert_eq!((train.len(), test.len()), (4, 2));
    for row in train.iter().chain(&test) {
        assert!(row["text"].as_str().unwrap().ends_with(", photographic lighting"), "{row}");
    }
    let first = train[0]["file_name"].as_str().unwrap();
    assert!(p.path().join("runs/p/set/dataset/train").join(first).is_file());
}

#[test]
fn changing_the_split_reruns_only_the_imagefolder() {
    let p = Project::new();
    p.write("p.yaml", PIPELINE);
    p.run_ok("p.yaml", &[]);
    let s = p.run_ok("p.yaml", &["--set", "set.test_count=3"]);
    assert_eq!(in_state(&s, "ran"), vec!["set"]);
    assert_eq!(reasons(&s, "set"), vec!["param test_count changed 2 → 3"]);
}

#[test]
fn missing_required_input_is_a_located_error() {
    let p = Project::new();
    p.write("p.yaml", "stages:\n  set:\n    uses: imagefolder\n    with: {images: x.images}\n");
    let (v, code) = p.status_json("p.yaml", &[]);
    assert_eq!(code, 2);
    let messages: Vec<&str> =
        v["errors"].as_array().unwrap().iter().map(|e| e["message"].as_str().unwrap()).collect();
    assert!(
        messages.contains(
            &"stage `set` is missing required parameter `photos` (upstream output `stage.output`)"
        ),
        "{messages:?}"
    );
    assert!(messages.contains(&"no stage named `x` (in `x.images`)"), "{messages:?}");
}
