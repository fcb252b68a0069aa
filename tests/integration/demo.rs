//! The committed `pipelines/demo.yaml` itself (the README's first command), shrunk by `--set`
//! only: every stage runs, the report compares the original and the finetuned model on FID,
//! LPIPS, CMMD and CLIP score (with a tiny random CLIP) and scene accuracy, and a second run
//! comes entirely from the cache.

use crate::common;

use common::*;
use std::path::Path;

#[test]
fn the_committed_demo_runs_every_stage_and_reports_scene_accuracy() {
    let p = Project::new();
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/demo.yaml");
    p.write("pipelines/demo.yaml", &std::fs::read_to_string(committed).unwrap());
    let mut run = p.cmd();
    run.args(["run", "pipelines/demo.yaml", "--json"]).args(DEMO_AT_TEST_SIZE);
    let (summary, code) = json_of(&mut run);
    assert_eq!(code, 0, "run failed: {summary:#}");
    assert!(in_state(&summary, "failed").is_empty(), "{summary:#}");

    // The demo sweeps two finetuning learning rates: one scene_finetuned instance per point.
    let mut stages: Vec<String> = std::fs::read_dir(p.path().join("runs/demo"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name == "scene_base" || name.starts_with("scene_finetuned@"))
        .collect();
    stages.sort();
    assert_eq!(stages.len(), 3, "{stages:?}");
    for stage in stages {
        let metrics: serde_json::Value =
            serde_json::from_str(&p.read(&format!("runs/demo/{stage}/metrics.json"))).unwrap();
        assert_eq!(metrics["images"], 4, "{stage}: {metrics:#}");
        let background = metrics["background"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&background), "{stage}: {metrics:#}");
    }
    let report = p.read("runs/demo/report/report/README.md");
    for section in ["LPIPS", "CMMD", "CLIP score", "Scene accuracy", "Background"] {
        assert!(report.contains(section), "no {section} in the report:\n{report}");
    }

    let mut again = p.cmd();
    again.args(["run", "pipelines/demo.yaml", "--json"]).args(DEMO_AT_TEST_SIZE);
    let (second, code) = json_of(&mut again);
    assert_eq!(code, 0, "{second:#}");
    assert!(in_state(&second, "ran").is_empty(), "{second:#}");
}
