//! The `report` kind, run on small inputs written in the formats of the stages it reads.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use sdpipe_report::loss::palette;
use sdpipe_report::Report;
use sdpipe_stages::api::GatheredInput;
use sdpipe_stages::testing::{self, Harness};
use serde_json::{json, Value};

/// Upstream outputs of one experiment: a test split of three photos, the original model, and
/// two learning-rate variants (listed in reverse order, to check that the report sorts them).
struct Experiment {
    dir: tempfile::TempDir,
}

const IDS: [&str; 3] = ["photo-a", "photo-b", "photo-c"];
const POINTS: [(&str, f64); 2] = [("learning_rate=0.0001", 1e-4), ("learning_rate=3e-05", 3e-5)];

fn image(w: u32, h: u32, seed: u8) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| Rgb([seed.wrapping_mul(40), (x * 7) as u8, (y * 5) as u8]))
}

fn write_jsonl(path: &Path, lines: &[Value]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    fs::write(path, text).unwrap();
}

impl Experiment {
    fn new() -> Experiment {
        let e = Experiment { dir: tempfile::tempdir().unwrap() };
        let test = e.path("dataset/test");
        fs::create_dir_all(&test).unwrap();
        let mut metadata = Vec::new();
        for (i, id) in IDS.iter().enumerate() {
            image(64, 48, i as u8).save(test.join(format!("{id}.jpg"))).unwrap();
            metadata.push(
                json!({"file_name": format!("{id}.jpg"), "text": format!("a photo | of {id}")}),
            );
        }
        write_jsonl(&test.join("metadata.jsonl"), &metadata);
        e.model("base", 0, 120.0, 0.020, 0.60);
        e.model("v1", 1, 100.0, 0.012, 0.55); // learning_rate=0.0001
        e.model("v2", 2, 130.0, 0.023, 0.50); // learning_rate=3e-05
        for (name, losses) in [("v1", [0.9, 0.7, 0.5, 0.4]), ("v2", [0.8, 0.8, 0.6, 0.3])] {
            let log: Vec<Value> = losses
                .iter()
                .enumerate()
                .map(|(i, l)| json!({"step": i + 1, "loss": l, "lr": 1e-4, "grad_norm": 1.0}))
                .collect();
            write_jsonl(&e.path(&format!("{name}/train_log.jsonl")), &log);
        }
        e
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A model's sample images, samples.jsonl, fid and lpips outputs under `<name>/`.
    fn model(&self, name: &str, shade: u8, fid: f64, kid: f64, lpips: f64) {
        let images = self.path(&format!("{name}/images"));
        fs::create_dir_all(&images).unwrap();
        let mut samples = Vec::new();
        let mut per_image = Vec::new();
        for (i, id) in IDS.iter().enumerate() {
            image(32, 32, shade + 3 * i as u8).save(images.join(format!("{id}.png"))).unwrap();
            samples.push(json!({"id": id, "file_name": format!("{id}.png"), "prompt": format!("a photo | of {id}"), "seed": 7 + i, "k": 0}));
            per_image.push(json!({"id": id, "real": format!("{id}.jpg"), "fake": format!("{id}.png"), "lpips": lpips + 0.01 * i as f64}));
        }
        write_jsonl(&self.path(&format!("{name}/samples.jsonl")), &samples);
        write_jsonl(&self.path(&format!("{name}/per_image.jsonl")), &per_image);
        let random = "random (deterministic stand-in, seed 0: NOT the published weights)";
        let fid = json!({"metric": "fid", "fid": fid, "kid_mean": kid, "kid_std": 0.004,
            "n_real": 3, "n_fake": 3, "weights": random, "resize": "bilinear"});
        fs::write(self.path(&format!("{name}/fid.json")), fid.to_string()).unwrap();
        let lp = json!({"metric": "lpips", "lpips": lpips + 0.01, "n": 3, "net": "alex",
            "version": "0.1", "weights": random});
        fs::write(self.path(&format!("{name}/lpips.json")), lp.to_string()).unwrap();
    }

    fn gathered(&self, file: &str) -> Vec<GatheredInput> {
        POINTS
            .iter()
            .zip(["v1", "v2"])
            .map(|((label, lr), dir)| GatheredInput {
                label: label.to_string(),
                values: BTreeMap::from([("finetune.learning_rate".to_string(), json!(lr))]),
                path: self.path(&format!("{dir}/{file}")),
            })
            .collect()
    }

    fn provenance(&self) -> Value {
        let stage =
            |name: &str, kind: &str, key: char, seconds: f64, point: &str, params: Value| {
                json!({"name": name, "kind": kind, "version": 1, "params": params,
                   "key": key.to_string().repeat(64), "seconds": seconds, "point": point})
            };
        let sample = json!({"scheduler": "pndm", "steps": 50, "guidance_scale": 7.5, "seed": 7,
                            "n_per_prompt": 1, "split": "test"});
        json!({"stages": [
            stage("data", "synthetic", 'a', 1.5, "", json!({"count": 12})),
            stage("sample_base", "sample", 'b', 20.0, "", sample),
            stage("finetune@learning_rate=0.0001", "train", 'c', 100.0, "learning_rate=0.0001",
                  json!({"learning_rate": 1e-4, "max_train_steps": 4})),
            stage("finetune@learning_rate=3e-05", "train", 'd', 110.0, "learning_rate=3e-05",
                  json!({"learning_rate": 3e-5, "max_train_steps": 4})),
        ]})
    }

    /// A harness with every input bound.
    fn harness(&self) -> Harness {
        Harness::new()
            .input("dataset", self.path("dataset"))
            .input("base_samples", self.path("base/images"))
            .input("base_samples_jsonl", self.path("base/samples.jsonl"))
            .input("base_fid", self.path("base/fid.json"))
            .input("base_lpips", self.path("base/lpips.json"))
            .input("base_lpips_per_image", self.path("base/per_image.jsonl"))
            .gathered("samples", self.gathered("images"))
            .gathered("samples_jsonl", self.gathered("samples.jsonl"))
            .gathered("fid", self.gathered("fid.json"))
            .gathered("lpips", self.gathered("lpips.json"))
            .gathered("lpips_per_image", self.gathered("per_image.jsonl"))
            .gathered("train_log", self.gathered("train_log.jsonl"))
            .provenance(self.provenance())
    }
}

fn run(mut h: Harness, overrides: &[(&str, Value)]) -> Harness {
    h.run(&Report, &testing::params(&Report, overrides)).unwrap();
    h
}

fn readme(h: &Harness) -> String {
    fs::read_to_string(h.out_dir().join("report/README.md")).unwrap()
}

fn report_json(h: &Harness) -> Value {
    serde_json::from_slice(&fs::read(h.out_dir().join("report/report.json")).unwrap()).unwrap()
}

/// The README's lines between `## title` and the next `## ` heading.
fn section(readme: &str, title: &str) -> String {
    let start = readme.find(&format!("\n## {title}\n")).unwrap_or_else(|| panic!("no {title}"));
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map(|i| i + 4).unwrap_or(rest.len());
    rest[..end].to_string()
}

fn table_rows(section: &str) -> Vec<String> {
    section.lines().filter(|l| l.starts_with('|')).skip(2).map(str::to_string).collect()
}

#[test]
fn metrics_table_has_values_and_deltas_against_the_original() {
    let e = Experiment::new();
    let h = run(e.harness(), &[]);
    let json = report_json(&h);
    let rows = json["metrics"].as_array().unwrap();
    assert_eq!(rows[0]["model"], "original");
    // learning_rate=0.0001: FID 100 vs 120, KID 0.012 vs 0.020, LPIPS 0.56 vs 0.61.
    let v = rows.iter().find(|r| r["label"] == "learning_rate=0.0001").unwrap();
    let d = &v["delta_vs_original"];
    assert!((d["fid"].as_f64().unwrap() - -20.0).abs() < 1e-12);
    assert!((d["kid_mean"].as_f64().unwrap() - -0.008).abs() < 1e-12);
    assert!((d["lpips"].as_f64().unwrap() - -0.05).abs() < 1e-12);

    let table = section(&readme(&h), "Metrics");
    let rows = table_rows(&table);
    let row = rows.iter().find(|r| r.contains("`learning_rate=0.0001`")).unwrap();
    assert!(row.contains("**100.0**"), "best FID is bold: {row}");
    assert!(row.contains("-20.00 (-16.7%) ▼ better"), "{row}");
    assert!(row.contains("0.01200 ± 0.004000"), "{row}");
    assert!(row.contains("-0.008000 (-40.0%) ▼ better"), "{row}");
    assert!(!row.contains("within"), "|ΔKID| 0.008 > std 0.004: {row}");
    let worse = rows.iter().find(|r| r.contains("`learning_rate=3e-05`")).unwrap();
    assert!(worse.contains("+10.00 (+8.3%) ▲ worse"), "{worse}");
    assert!(worse.contains("+0.003000 (+15.0%) ▲ worse (within ±std)"), "{worse}");
    assert!(rows[0].contains("**original**") && rows[0].contains("120.0"), "{}", rows[0]);
}

#[test]
fn gathered_variants_are_rows_and_columns_in_sweep_order() {
    let e = Experiment::new();
    let h = run(e.harness(), &[]);
    let text = readme(&h);
    // 3e-05 < 0.0001: numeric order of the swept value, not the labels' string order.
    let metrics = table_rows(&section(&text, "Metrics"));
    assert_eq!(metrics.len(), 3);
    assert!(metrics[1].contains("`learning_rate=3e-05`"), "{}", metrics[1]);
    assert!(metrics[2].contains("`learning_rate=0.0001`"), "{}", metrics[2]);
    let qualitative = section(&text, "Qualitative comparison");
    let header = qualitative.lines().find(|l| l.starts_with('|')).unwrap();
    assert_eq!(
        header,
        "| Caption | Ground truth | Original | `learning_rate=3e-05` | `learning_rate=0.0001` |"
    );
    let json = report_json(&h);
    let models: Vec<&str> =
        json["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(models, ["original", "learning_rate=3e-05", "learning_rate=0.0001"]);
}

fn url_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

fn links(markdown: &str) -> Vec<String> {
    markdown
        .split("](")
        .skip(1)
        .map(|rest| url_decode(&rest[..rest.find(')').unwrap()]))
        .filter(|l| !l.starts_with('#'))
        .collect()
}

#[test]
fn qualitative_rows_link_to_images_in_the_report() {
    let e = Experiment::new();
    let h = run(e.harness(), &[]);
    let qualitative = section(&readme(&h), "Qualitative comparison");
    let rows = table_rows(&qualitative);
    assert_eq!(rows.len(), IDS.len());
    for (row, id) in rows.iter().zip(IDS) {
        assert!(row.starts_with(&format!("| a photo \\| of {id} |")), "{row}");
        let row_links = links(row);
        assert_eq!(row_links.len(), 4, "ground truth + 3 models: {row}");
        for link in row_links {
            assert!(h.out_dir().join("report").join(&link).is_file(), "{link} missing");
        }
    }
    // Per-image LPIPS of learning_rate=3e-05 (v2: 0.50 + 0.01 i) under its samples.
    assert!(rows[1].contains("![learning\\_rate=3e-05 photo-b](images/learning_rate_3e-05/photo-b.png)<br>LPIPS 0.5100"), "{}", rows[1]);
    for link in links(&readme(&h)) {
        assert!(h.out_dir().join("report").join(&link).exists(), "{link} missing");
    }
}

#[test]
fn images_are_downscaled_copies() {
    let e = Experiment::new();
    let h = run(e.harness(), &[("thumb_size", json!(16))]);
    let gt = image::open(h.out_dir().join("report/images/ground_truth/photo-a.jpg")).unwrap();
    assert_eq!((gt.width(), gt.height()), (16, 12), "64x48 fits in 16x16 keeping its aspect");
    let sample = image::open(h.out_dir().join("report/images/original/photo-a.png")).unwrap();
    assert_eq!((sample.width(), sample.height()), (16, 16));
}

#[test]
fn small_images_are_enlarged_by_a_whole_factor_pixel_for_pixel() {
    let e = Experiment::new();
    let h = run(e.harness(), &[("thumb_size", json!(100))]);
    let source = image::open(e.path("base/images/photo-a.png")).unwrap().to_rgb8();
    let sample = image::open(h.out_dir().join("report/images/original/photo-a.png")).unwrap();
    let sample = sample.to_rgb8();
    assert_eq!(sample.dimensions(), (96, 96), "32 px times 3, the largest factor within 100");
    for (x, y, pixel) in sample.enumerate_pixels() {
        assert_eq!(pixel, source.get_pixel(x / 3, y / 3), "({x}, {y})");
    }
    let gt = image::open(h.out_dir().join("report/images/ground_truth/photo-a.jpg")).unwrap();
    assert_eq!((gt.width(), gt.height()), (64, 48), "64 px fits once: kept as it is");
    // A photo enlarged becomes PNG: JPEG would blur the blocks' edges.
    let h = run(e.harness(), &[("thumb_size", json!(128))]);
    let gt = image::open(h.out_dir().join("report/images/ground_truth/photo-a.png")).unwrap();
    assert_eq!((gt.width(), gt.height()), (128, 96));
}

#[test]
fn max_rows_limits_the_qualitative_table() {
    let e = Experiment::new();
    let h = run(e.harness(), &[("max_rows", json!(2))]);
    let qualitative = section(&readme(&h), "Qualitative comparison");
    assert_eq!(table_rows(&qualitative).len(), 2);
    assert!(qualitative.starts_with("## Qualitative comparison\n\n2 of 3 test images"));
    assert!(!h.out_dir().join("report/images/original/photo-c.png").exists());
}

#[test]
fn loss_svg_is_valid_svg_with_one_bold_path_per_variant() {
    let e = Experiment::new();
    let h = run(e.harness(), &[]);
    let svg = fs::read_to_string(h.out_dir().join("report/loss.svg")).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let polylines: Vec<_> =
        doc.descendants().filter(|n| n.tag_name().name() == "polyline").collect();
    for i in 0..2 {
        let c = palette(i);
        let colour = format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2);
        let bold = polylines
            .iter()
            .filter(|n| {
                n.attribute("stroke").is_some_and(|s| s.eq_ignore_ascii_case(&colour))
                    && n.attribute("stroke-width") == Some("2")
            })
            .count();
        assert_eq!(bold, 1, "variant {i} ({colour})");
    }
    let texts: String = doc.descendants().filter_map(|n| n.text()).collect();
    assert!(texts.contains("learning_rate=3e-05") && texts.contains("Training loss"));
    let text = readme(&h);
    let training = section(&text, "Training loss");
    assert!(training.contains("![Training loss per step](loss.svg)"));
    let rows = table_rows(&training);
    // v1 (learning_rate=0.0001): 4 steps, 0.9 → 0.4.
    assert_eq!(rows[1], "| `learning_rate=0.0001` | 4 | 0.9000 | 0.4000 | 0.4000 (last 1) |");
}

#[test]
fn provenance_lists_keys_parameters_and_seconds_per_variant() {
    let e = Experiment::new();
    let h = run(e.harness(), &[]);
    let provenance = section(&readme(&h), "Provenance");
    assert!(provenance.contains("### Shared stages (every variant)"));
    assert!(provenance.contains("### Variant `learning_rate=3e-05`"));
    assert!(provenance
        .contains("| `finetune@learning_rate=3e-05` | `train` v1 | `dddddddddddd` | 110.0 |"));
    assert!(provenance.contains(&format!("key `{}`", "d".repeat(64))));
    assert!(provenance.contains("| `learning_rate` | `0.00003` |"));
    assert!(provenance.contains("| **total** | | | **21.50** |"), "shared: 1.5 + 20");
    assert!(provenance.contains("131.5 s of compute for this variant end to end"));
    // Variant groups follow the report's variant order.
    let a = provenance.find("### Variant `learning_rate=3e-05`").unwrap();
    let b = provenance.find("### Variant `learning_rate=0.0001`").unwrap();
    assert!(a < b);
    assert_eq!(report_json(&h)["provenance"]["points"]["learning_rate=3e-05"]["seconds"], 110.0);
}

#[test]
fn caveats_state_n_random_weights_and_sampling() {
    let e = Experiment::new();
    let h = run(e.harness(), &[]);
    let caveats = section(&readme(&h), "Caveats");
    assert!(caveats.contains("N = 3 images per side (3 real / 3 generated)"), "{caveats}");
    assert!(caveats.contains("The FID/KID (Inception) network ran with random stand-in weights"));
    assert!(caveats.contains("The LPIPS network ran with random stand-in weights"));
    assert!(caveats.contains("scheduler = `pndm`, steps = 50, guidance_scale = 7.5"), "{caveats}");
    assert!(caveats.contains("same seed for each caption (seeds 7–9"), "{caveats}");
    assert!(caveats.contains("Each caption was sampled once"));
}

#[test]
fn published_weights_are_not_called_random() {
    let e = Experiment::new();
    for name in ["base", "v1", "v2"] {
        let path = e.path(&format!("{name}/fid.json"));
        let mut v: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        v["weights"] = json!("/weights/pt_inception-2015-12-05.safetensors");
        fs::write(&path, v.to_string()).unwrap();
    }
    let h = run(e.harness(), &[]);
    let caveats = section(&readme(&h), "Caveats");
    assert!(!caveats.contains("FID/KID (Inception) network ran with random"), "{caveats}");
    assert!(caveats.contains("LPIPS network ran with random"));
}

#[test]
fn missing_optional_inputs_leave_their_sections_out() {
    let e = Experiment::new();
    let h = run(Harness::new().gathered("fid", e.gathered("fid.json")), &[]);
    let text = readme(&h);
    assert!(text.contains("\n## Metrics\n"));
    for absent in ["Qualitative comparison", "Training loss", "Provenance"] {
        assert!(!text.contains(&format!("## {absent}")), "{absent}");
    }
    assert!(!h.out_dir().join("report/loss.svg").exists());
    assert!(!h.out_dir().join("report/images").exists());
    let metrics = section(&text, "Metrics");
    assert!(!metrics.contains("Δ"), "no original, no deltas");
    assert!(section(&text, "Caveats").contains("No metrics of the original model were bound"));

    let h = run(Harness::new(), &[]);
    assert!(readme(&h).contains("No inputs were bound"));
}

#[test]
fn a_single_unswept_variant_is_called_finetuned() {
    let e = Experiment::new();
    let h = run(
        Harness::new()
            .input("base_fid", e.path("base/fid.json"))
            .input("fid", e.path("v1/fid.json"))
            .input("train_log", e.path("v1/train_log.jsonl")),
        &[],
    );
    let text = readme(&h);
    assert!(text.contains("The original model against the finetuned variant `finetuned`"));
    assert!(table_rows(&section(&text, "Metrics"))[1].contains("-20.00 (-16.7%) ▼ better"));
}

/// `v1`'s (learning_rate=0.0001) samples.jsonl as the sample stage writes it with a LoRA bound.
fn sample_v1_with_a_lora(e: &Experiment) {
    let lora = json!({"rank": 4, "alpha": 8.0, "scale": 1.0, "layers": 32,
                      "targets": ["to_k", "to_out.0", "to_q", "to_v"]});
    let path = e.path("v1/samples.jsonl");
    let lines: Vec<Value> = fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut line: Value = serde_json::from_str(l).unwrap();
            line["lora"] = lora.clone();
            line
        })
        .collect();
    write_jsonl(&path, &lines);
}

#[test]
fn a_variant_sampled_with_a_lora_is_labelled_with_it() {
    let e = Experiment::new();
    sample_v1_with_a_lora(&e);
    let h = run(e.harness(), &[]);
    let text = readme(&h);
    let label = "`learning_rate=0.0001` (LoRA r=4, α=8, scale 1)";
    let metrics = section(&text, "Metrics");
    let rows = table_rows(&metrics);
    assert!(rows.iter().any(|r| r.starts_with(&format!("| {label} |"))), "{metrics}");
    assert_eq!(rows.iter().filter(|r| r.contains("LoRA")).count(), 1, "{metrics}");
    assert!(metrics.contains("sampled with a LoRA of rank r and alpha α"), "{metrics}");
    let qualitative = section(&text, "Qualitative comparison");
    let header = qualitative.lines().find(|l| l.starts_with('|')).unwrap();
    assert!(header.contains(&format!("| {label} |")), "{header}");
    let json = report_json(&h);
    let lora_of = |name: &str| {
        let models = json["models"].as_array().unwrap();
        models.iter().find(|m| m["name"] == name).unwrap()["lora"].clone()
    };
    assert_eq!(lora_of("learning_rate=0.0001")["rank"], 4);
    assert_eq!(lora_of("learning_rate=3e-05"), Value::Null);
}

#[test]
fn without_a_lora_the_report_mentions_none() {
    let e = Experiment::new();
    let h = run(e.harness(), &[]);
    assert!(!readme(&h).contains("LoRA"));
    let json = fs::read_to_string(h.out_dir().join("report/report.json")).unwrap();
    assert!(!json.contains("lora"), "no `lora` key in report.json");
}

#[test]
fn malformed_metrics_json_is_an_error_naming_the_file() {
    let e = Experiment::new();
    fs::write(e.path("v2/fid.json"), "{\"metric\": \"fid\", \"fid\": ").unwrap();
    let mut h = e.harness();
    let err = h.run(&Report, &testing::params(&Report, &[])).unwrap_err().to_string();
    assert!(err.contains("fid@learning_rate=3e-05"), "{err}");
    assert!(err.contains(&e.path("v2/fid.json").display().to_string()), "{err}");
    assert!(err.contains("not JSON"), "{err}");
}

#[test]
fn metrics_of_the_wrong_stage_are_an_error_saying_what_to_bind() {
    let e = Experiment::new();
    let mut h = Harness::new().input("base_fid", e.path("base/lpips.json"));
    let err = h.run(&Report, &testing::params(&Report, &[])).unwrap_err().to_string();
    assert!(err.contains("input `base_fid`"), "{err}");
    assert!(err.contains("its `metric` is \"lpips\", not \"fid\""), "{err}");
}

#[test]
fn a_metrics_file_without_its_numbers_is_an_error() {
    let e = Experiment::new();
    fs::write(e.path("base/fid.json"), "{\"metric\": \"fid\", \"fid\": \"high\"}").unwrap();
    let mut h = Harness::new().input("base_fid", e.path("base/fid.json"));
    let err = h.run(&Report, &testing::params(&Report, &[])).unwrap_err().to_string();
    assert!(err.contains("`fid` is \"high\", not a number"), "{err}");
}

#[test]
fn a_missing_split_is_an_error_naming_the_parameter() {
    let e = Experiment::new();
    let mut h = Harness::new().input("dataset", e.path("dataset"));
    let err = h
        .run(&Report, &testing::params(&Report, &[("split", json!("validation"))]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("validation/metadata.jsonl not found"), "{err}");
    assert!(err.contains("`split` parameter"), "{err}");
}

fn files(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, fs::read(&path).unwrap());
            }
        }
    }
    out
}

#[test]
fn same_inputs_give_the_same_bytes() {
    let e = Experiment::new();
    let first = run(e.harness(), &[]);
    let second = run(e.harness(), &[]);
    let (a, b) = (files(first.out_dir()), files(second.out_dir()));
    assert!(a.len() > 10, "{:?}", a.keys());
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, bytes) in &a {
        assert!(bytes == &b[name], "{name} differs");
    }
}

#[test]
fn readme_snapshot() {
    let e = Experiment::new();
    let h = run(e.harness(), &[("title", json!("Demo report"))]);
    insta::assert_snapshot!(readme(&h));
}

#[test]
fn several_draws_per_caption_show_the_first_draw() {
    let e = Experiment::new();
    let draws = e.path("draws");
    fs::create_dir_all(draws.join("images")).unwrap();
    let mut records = Vec::new();
    for id in IDS {
        for k in 0..2u8 {
            let name = format!("{id}_{k}.png");
            image(16, 16, 50 * k).save(draws.join("images").join(&name)).unwrap();
            records.push(json!({"id": id, "file_name": name, "prompt": id, "seed": k, "k": k}));
        }
    }
    write_jsonl(&draws.join("samples.jsonl"), &records);
    let h = run(
        Harness::new()
            .input("dataset", e.path("dataset"))
            .input("base_samples", draws.join("images"))
            .input("base_samples_jsonl", draws.join("samples.jsonl"))
            // Without its records, a variant's `<id>_0.png` is still found as `<id>`'s image.
            .input("samples", draws.join("images")),
        // The images' own size: copied as they are.
        &[("thumb_size", json!(16))],
    );
    let first_draw = image::open(draws.join("images/photo-a_0.png")).unwrap().to_rgb8();
    for dir in ["original", "finetuned"] {
        let shown = image::open(h.out_dir().join(format!("report/images/{dir}/photo-a.png")));
        assert_eq!(shown.unwrap().to_rgb8(), first_draw, "{dir}");
    }
    let caveats = section(&readme(&h), "Caveats");
    assert!(caveats.contains("Captions were sampled 2 times per model"), "{caveats}");
}

/// Per-image metrics of 16 images for the original (`base/`) and one variant (`finetuned/`):
/// LPIPS from `lpips(model, i)` and scene judgements from `scene(model, i)` (background right,
/// shapes right), written as the lpips and scene-accuracy stages write them.
struct PerImage {
    dir: tempfile::TempDir,
}

const N: usize = 16;

impl PerImage {
    fn new(
        lpips: impl Fn(&str, usize) -> f64,
        scene: impl Fn(&str, usize) -> (bool, bool),
    ) -> Self {
        let p = PerImage { dir: tempfile::tempdir().unwrap() };
        for model in ["base", "finetuned"] {
            let dir = p.path(model);
            fs::create_dir_all(&dir).unwrap();
            let id = |i: usize| format!("s{i:02}");
            let values: Vec<f64> = (0..N).map(|i| lpips(model, i)).collect();
            let lines: Vec<Value> = (0..N)
                .map(|i| {
                    json!({"id": id(i), "real": format!("{}.png", id(i)),
                    "fake": format!("{}.png", id(i)), "lpips": values[i]})
                })
                .collect();
            write_jsonl(&dir.join("lpips_per_image.jsonl"), &lines);
            let mean = values.iter().sum::<f64>() / N as f64;
            let metrics = json!({"metric": "lpips", "lpips": mean, "n": N, "weights": "alex"});
            fs::write(dir.join("lpips.json"), metrics.to_string()).unwrap();

            let judged: Vec<(bool, bool)> = (0..N).map(|i| scene(model, i)).collect();
            let lines: Vec<Value> = judged
                .iter()
                .enumerate()
                .map(|(i, (bg, shape))| {
                    json!({"id": id(i), "file_name": format!("{}.png", id(i)),
                    "prompt": "a red circle on a blue background", "background": "blue",
                    "background_correct": bg, "style": "flat", "style_correct": true,
                    "shapes": [{"colour": "red", "share": 0.2, "present": shape}],
                    "relations": [], "all_correct": *bg && *shape})
                })
                .collect();
            write_jsonl(&dir.join("scene_per_image.jsonl"), &lines);
            let share = |f: &dyn Fn(&(bool, bool)) -> bool| {
                judged.iter().filter(|j| f(j)).count() as f64 / N as f64
            };
            let metrics = json!({"metric": "scene-accuracy", "images": N,
                "background": share(&|j| j.0), "style": 1.0, "colours": share(&|j| j.1),
                "relations": null, "all": share(&|j| j.0 && j.1)});
            fs::write(dir.join("scene.json"), metrics.to_string()).unwrap();
        }
        p
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn harness(&self) -> Harness {
        let mut h = Harness::new();
        for (prefix, model) in [("base_", "base"), ("", "finetuned")] {
            for input in ["lpips", "lpips_per_image", "scene", "scene_per_image"] {
                let file = format!(
                    "{model}/{}.{}",
                    input,
                    if input.ends_with("image") { "jsonl" } else { "json" }
                );
                h = h.input(&format!("{prefix}{input}"), self.path(&file));
            }
        }
        h
    }
}

/// LPIPS that varies a lot between images, lowered by `shift` for the finetuned model.
fn lpips_shifted(shift: f64) -> impl Fn(&str, usize) -> f64 {
    move |model, i| {
        let v = 0.3 + 0.04 * ((i * 7) % 11) as f64;
        if model == "finetuned" {
            v - shift
        } else {
            v
        }
    }
}

#[test]
fn a_clearly_better_lpips_is_bold_and_said_to_be_significant() {
    let p = PerImage::new(lpips_shifted(0.1), |_, _| (true, true));
    let text = readme(&run(p.harness(), &[]));
    let metrics = section(&text, "Metrics");
    let rows = table_rows(&metrics);
    assert!(!rows[0].contains("**0."), "the original is not bold: {}", rows[0]);
    // The mean with its interval, bold; Δ with the interval of the paired difference.
    assert!(rows[1].contains("| **0.4025 [0.3"), "{}", rows[1]);
    assert!(rows[1].contains("| -0.1000 [-0.1000, -0.1000] ▼ better |"), "{}", rows[1]);
    assert!(
        metrics.contains(
            "- `finetuned` has lower LPIPS than the original at N = 16 image pairs (-0.1000 \
             [-0.1000, -0.1000], paired): the difference is significant, so `finetuned` is \
             better on LPIPS than the original.\n"
        ),
        "{metrics}"
    );
}

#[test]
fn identical_per_image_lpips_is_not_bold_and_no_significant_difference() {
    let p = PerImage::new(lpips_shifted(0.0), |_, _| (true, true));
    let h = run(p.harness(), &[]);
    let metrics = section(&readme(&h), "Metrics");
    let rows = table_rows(&metrics);
    assert!(rows.iter().all(|r| !r.contains("**0.")), "nothing bold: {metrics}");
    assert!(rows[1].contains("| 0 [0, 0] (not significant) |"), "{}", rows[1]);
    assert!(
        metrics.contains(
            "- `finetuned` and the original show no significant difference in LPIPS at N = 16 \
             image pairs (0 [0, 0], paired).\n"
        ),
        "{metrics}"
    );
    let json = report_json(&h);
    let versus = &json["metrics"][1]["intervals"]["lpips"]["versus_reference"];
    assert_eq!(versus["paired"], true);
    assert_eq!(versus["significant"], false);
}

#[test]
fn a_small_noisy_lpips_difference_is_not_significant() {
    // The finetuned model is better on half the images and worse on the other half.
    let lpips = |model: &str, i: usize| {
        let v = 0.3 + 0.04 * ((i * 7) % 11) as f64;
        match model {
            "finetuned" if i.is_multiple_of(2) => v - 0.1,
            "finetuned" => v + 0.09,
            _ => v,
        }
    };
    let p = PerImage::new(lpips, |_, _| (true, true));
    let metrics = section(&readme(&run(p.harness(), &[])), "Metrics");
    let rows = table_rows(&metrics);
    assert!(rows.iter().all(|r| !r.contains("**0.")), "lower on average, not bold: {metrics}");
    assert!(rows[1].contains("(not significant)"), "{}", rows[1]);
    assert!(metrics.contains("show no significant difference in LPIPS at N = 16"), "{metrics}");
}

#[test]
fn a_clearly_better_scene_accuracy_is_bold_and_said_to_be_significant() {
    // The original draws the caption's background on 4 of 16 images, the finetuned on all;
    // both draw the shape colours on every other image.
    let p = PerImage::new(lpips_shifted(0.0), |model, i| {
        (model == "finetuned" || i % 4 == 0, i % 2 == 0)
    });
    let h = run(p.harness(), &[]);
    let scene = section(&readme(&h), "Scene accuracy");
    let rows = table_rows(&scene);
    assert!(rows[0].starts_with("| **original** | 25% [6%, 50%] |"), "{}", rows[0]);
    assert!(rows[1].starts_with("| `finetuned` | **100% [100%, 100%]** |"), "{}", rows[1]);
    // Equal shape colours: not bold; all at once (never worse, 4 images better): bold.
    assert!(rows[1].ends_with("| 50% [25%, 75%] | — | **50% [25%, 75%]** | 16 |"), "{}", rows[1]);
    assert!(
        scene.contains(
            "- `finetuned` has higher background accuracy than the original at N = 16 images \
             (+75 percentage points [+56, +94], paired): the difference is significant, so \
             `finetuned` is better on background accuracy than the original.\n"
        ),
        "{scene}"
    );
    assert!(
        scene.contains(
            "- `finetuned` and the original show no significant difference in shape-colour \
             accuracy at N = 16 images (0 percentage points [0, 0], paired).\n"
        ),
        "{scene}"
    );
    let json = report_json(&h);
    let background = &json["scene_accuracy"][1]["intervals"]["background"];
    assert_eq!(background["n"], 16);
    assert_eq!(background["versus_reference"]["significant"], true);
}

#[test]
fn identical_per_image_scene_judgements_are_not_bold_and_no_significant_difference() {
    let p = PerImage::new(lpips_shifted(0.0), |_, i| (i % 4 != 0, i % 2 == 0));
    let scene = section(&readme(&run(p.harness(), &[])), "Scene accuracy");
    assert!(!table_rows(&scene).iter().any(|r| r.contains("%**")), "{scene}");
    for noun in ["background", "style", "shape-colour", "all-at-once"] {
        assert!(
            scene.contains(&format!(
                "- `finetuned` and the original show no significant difference in {noun} \
                 accuracy at N = 16 images"
            )),
            "{noun}: {scene}"
        );
    }
    assert!(!scene.contains("relation accuracy"), "no caption states a relation: {scene}");
}

#[test]
fn images_that_cannot_be_paired_are_compared_by_overlapping_intervals() {
    let p = PerImage::new(lpips_shifted(0.2), |_, _| (true, true));
    // Renumber the finetuned model's images: the same values, but no id in common.
    let file = p.path("finetuned/lpips_per_image.jsonl");
    let text = fs::read_to_string(&file).unwrap().replace("\"s", "\"t");
    fs::write(&file, text).unwrap();
    let metrics = section(&readme(&run(p.harness(), &[])), "Metrics");
    let rows = table_rows(&metrics);
    assert!(rows[1].contains("| -0.2000 ▼ better (intervals do not overlap) |"), "{}", rows[1]);
    assert!(
        metrics.contains("(-0.2000; evaluated on different image pairs, so their 95% intervals are compared: they do not overlap): the difference is significant"),
        "{metrics}"
    );
}

#[test]
fn without_per_image_values_lpips_is_marked_by_point_values_and_the_caveats_say_so() {
    let e = Experiment::new();
    let h = run(
        Harness::new()
            .input("base_lpips", e.path("base/lpips.json"))
            .gathered("lpips", e.gathered("lpips.json")),
        &[],
    );
    let text = readme(&h);
    let metrics = section(&text, "Metrics");
    assert!(metrics.contains("| **0.5100** | -0.1000 (-16.4%) ▼ better |"), "{metrics}");
    assert!(!metrics.contains("significant"), "{metrics}");
    let caveats = section(&text, "Caveats");
    assert!(caveats.contains("No per-image values were bound for the LPIPS of the original, `learning_rate=3e-05`, `learning_rate=0.0001`"), "{caveats}");
    assert!(!caveats.contains("percentile-bootstrap"), "{caveats}");
}

/// A `clip-score` stage's outputs under `dir/`: `clip.json` and `clip_per_image.jsonl`, from
/// each image's raw `100 · cos` (the per-image `clip_score` is clamped at 0, as the stage does).
fn write_clip_score(dir: &Path, raw: &[f64]) {
    let lines: Vec<Value> = raw
        .iter()
        .enumerate()
        .map(|(i, r)| {
            json!({"id": format!("s{i:02}"), "file_name": format!("s{i:02}.png"),
            "caption": "a red circle", "clip_score": r.max(0.0), "score_raw": r,
            "tokens": 5, "truncated": false})
        })
        .collect();
    write_jsonl(&dir.join("clip_per_image.jsonl"), &lines);
    let n = raw.len() as f64;
    let mean_raw = raw.iter().sum::<f64>() / n;
    let mean_clamped = raw.iter().map(|r| r.max(0.0)).sum::<f64>() / n;
    let metrics = json!({"metric": "clip-score", "clip_score": mean_raw.max(0.0),
        "mean_raw": mean_raw, "mean_clamped": mean_clamped, "n": raw.len(), "truncated": 0,
        "model": "openai/clip-vit-large-patch14@0123abcd", "revision": "main"});
    fs::write(dir.join("clip.json"), metrics.to_string()).unwrap();
}

/// A `cmmd` stage's `metrics.json` at `dir/cmmd.json`.
fn write_cmmd(dir: &Path, cmmd: f64, n: usize) {
    let metrics = json!({"metric": "cmmd", "cmmd": cmmd, "n_real": n, "n_fake": n,
        "model": "openai/clip-vit-large-patch14-336@4567cdef", "sigma": 10.0, "scale": 1000.0});
    fs::write(dir.join("cmmd.json"), metrics.to_string()).unwrap();
}

/// CLIP scores that vary a lot between images, raised by `shift` for the finetuned model.
fn clip_shifted(model: &str, shift: f64) -> Vec<f64> {
    (0..N)
        .map(|i| {
            let v = 20.0 + 1.5 * ((i * 5) % 7) as f64;
            if model == "finetuned" {
                v + shift
            } else {
                v
            }
        })
        .collect()
}

impl PerImage {
    /// [`PerImage::new`] with identical LPIPS and scene judgements, plus CMMD (`cmmd(model)`)
    /// and CLIP scores (`clip(model)`, raw per image) for both models.
    fn with_cmmd_and_clip(cmmd: impl Fn(&str) -> f64, clip: impl Fn(&str) -> Vec<f64>) -> Self {
        let p = PerImage::new(lpips_shifted(0.0), |_, _| (true, true));
        for model in ["base", "finetuned"] {
            write_cmmd(&p.path(model), cmmd(model), N);
            write_clip_score(&p.path(model), &clip(model));
        }
        p
    }

    fn harness_with_cmmd_and_clip(&self) -> Harness {
        let mut h = self.harness();
        for (prefix, model) in [("base_", "base"), ("", "finetuned")] {
            h = h
                .input(&format!("{prefix}cmmd"), self.path(&format!("{model}/cmmd.json")))
                .input(&format!("{prefix}clip_score"), self.path(&format!("{model}/clip.json")))
                .input(
                    &format!("{prefix}clip_score_per_image"),
                    self.path(&format!("{model}/clip_per_image.jsonl")),
                );
        }
        h
    }
}

#[test]
fn a_clearly_higher_clip_score_is_bold_with_its_interval_and_said_to_be_significant() {
    let p = PerImage::with_cmmd_and_clip(
        |model| if model == "finetuned" { 0.8 } else { 1.2 },
        |model| clip_shifted(model, 2.0),
    );
    let h = run(p.harness_with_cmmd_and_clip(), &[]);
    let text = readme(&h);
    let metrics = section(&text, "Metrics");
    let header = metrics.lines().find(|l| l.starts_with('|')).unwrap();
    assert_eq!(
        header,
        "| Model | CMMD ↓ | Δ CMMD | LPIPS ↓ | Δ LPIPS | CLIP score ↑ | Δ CLIP score | \
         N (CMMD real / fake, LPIPS pairs, CLIP score images) |"
    );
    let rows = table_rows(&metrics);
    // CMMD: lower is better, bold like FID; the CLIP score: higher is better, bold only when
    // significant, with its interval; Δ says ▲ better for a higher CLIP score.
    assert!(rows[0].starts_with("| **original** | 1.200 | — |"), "{}", rows[0]);
    assert!(rows[1].starts_with("| `finetuned` | **0.8000** | -0.4000 (-33.3%) ▼ better |"));
    assert!(rows[0].contains("| 24.41 [22.91, 26.00] |"), "{}", rows[0]);
    assert!(!rows[0].contains("**24."), "{}", rows[0]);
    assert!(rows[1].contains("| **26.41 [24.91, 28.00]** |"), "{}", rows[1]);
    assert!(rows[1].contains("| +2.000 [+2.000, +2.000] ▲ better |"), "{}", rows[1]);
    assert!(rows[1].ends_with("| 16 / 16, 16, 16 |"), "{}", rows[1]);
    assert!(
        metrics.contains(
            "Lower is better for CMMD and LPIPS; higher is better for CLIP score. The best value \
             of CMMD is bold. LPIPS and CLIP score are each the mean over images"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("(▼ better, ▲ worse; for CLIP score ▲ better, ▼ worse)"));
    assert!(
        metrics.contains(
            "- `finetuned` has higher CLIP score than the original at N = 16 images (+2.000 \
             [+2.000, +2.000], paired): the difference is significant, so `finetuned` is better \
             on CLIP score than the original.\n"
        ),
        "{metrics}"
    );
    let caveats = section(&text, "Caveats");
    assert!(caveats.contains("- CMMD was computed from as few as N = 16 images per side"));
    assert!(caveats.contains("a set compared with itself scores exactly 0"), "{caveats}");
    assert!(caveats.contains("- The CLIP score is 100 × the cosine"), "{caveats}");
    assert!(caveats
        .contains("With random CLIP weights (as in sdpipe's tests and demo) it means nothing."));
    assert!(!caveats.contains("differs from the mean of the per-image clamped"), "{caveats}");

    let json = report_json(&h);
    let finetuned = &json["metrics"][1];
    assert_eq!(finetuned["cmmd"]["cmmd"], 0.8);
    assert_eq!(finetuned["clip_score"]["n"], 16);
    assert!((finetuned["delta_vs_original"]["clip_score"].as_f64().unwrap() - 2.0).abs() < 1e-9);
    let versus = &finetuned["intervals"]["clip_score"]["versus_reference"];
    assert_eq!(
        (versus["paired"].as_bool(), versus["significant"].as_bool()),
        (Some(true), Some(true))
    );
    insta::assert_snapshot!(metrics);
}

#[test]
fn a_lower_clip_score_is_worse_and_the_original_is_bold() {
    let p = PerImage::with_cmmd_and_clip(|_| 1.0, |model| clip_shifted(model, -3.0));
    let metrics = section(&readme(&run(p.harness_with_cmmd_and_clip(), &[])), "Metrics");
    let rows = table_rows(&metrics);
    assert!(
        rows[0].contains("| **24.41 [22.91, 26.00]** |"),
        "the original is significantly best: {}",
        rows[0]
    );
    assert!(rows[1].contains("| -3.000 [-3.000, -3.000] ▼ worse |"), "{}", rows[1]);
    // Equal CMMDs: both are the best value, so both are bold (as FID's ties are).
    assert!(rows[1].contains("| **1.000** | 0 = same |"), "{}", rows[1]);
    assert!(
        metrics.contains(
            "- `finetuned` has lower CLIP score than the original at N = 16 images (-3.000 \
             [-3.000, -3.000], paired): the difference is significant, so the original is better \
             on CLIP score than `finetuned`.\n"
        ),
        "{metrics}"
    );
}

#[test]
fn a_noisy_clip_score_difference_is_not_significant() {
    let clip = |model: &str| {
        let mut v = clip_shifted(model, 0.0);
        if model == "finetuned" {
            for (i, x) in v.iter_mut().enumerate() {
                *x += if i % 2 == 0 { 1.0 } else { -0.9 };
            }
        }
        v
    };
    let p = PerImage::with_cmmd_and_clip(|_| 1.0, clip);
    let metrics = section(&readme(&run(p.harness_with_cmmd_and_clip(), &[])), "Metrics");
    let rows = table_rows(&metrics);
    assert!(rows.iter().all(|r| !r.contains("**2")), "nothing bold: {metrics}");
    assert!(rows[1].contains("(not significant)"), "{}", rows[1]);
    assert!(metrics.contains("show no significant difference in CLIP score at N = 16 images"));
}

#[test]
fn negative_clip_scores_are_clamped_per_image_and_the_caveats_say_how_that_differs() {
    // Random CLIP weights score around 0: the table shows the mean of the clamped scores, and
    // torchmetrics' clamped mean is named where it differs.
    let raw = |model: &str| -> Vec<f64> {
        (0..N).map(|i| if model == "base" { i as f64 - 10.0 } else { i as f64 - 8.0 }).collect()
    };
    let p = PerImage::with_cmmd_and_clip(|_| 0.5, raw);
    let h = run(p.harness_with_cmmd_and_clip(), &[]);
    let text = readme(&h);
    let rows = table_rows(&section(&text, "Metrics"));
    // base: 1 + 2 + 3 + 4 + 5 over 16 images = 0.9375.
    assert!(rows[0].contains("| 0.9375 ["), "{}", rows[0]);
    let caveats = section(&text, "Caveats");
    assert!(
        caveats.contains("differs from the mean of the per-image clamped scores the table shows: the original 0, `finetuned` 0 (`clip_score` in report.json)"),
        "{caveats}"
    );
}

#[test]
fn cmmd_and_clip_scores_are_gathered_over_sweep_points() {
    let e = Experiment::new();
    for (dir, cmmd, shift) in [("base", 2.0, 0.0), ("v1", 1.5, 1.0), ("v2", 2.5, -1.0)] {
        write_cmmd(&e.path(dir), cmmd, 3);
        write_clip_score(&e.path(dir), &[20.0 + shift, 21.0 + shift, 25.0 + shift]);
    }
    let h = run(
        e.harness()
            .input("base_cmmd", e.path("base/cmmd.json"))
            .input("base_clip_score", e.path("base/clip.json"))
            .input("base_clip_score_per_image", e.path("base/clip_per_image.jsonl"))
            .gathered("cmmd", e.gathered("cmmd.json"))
            .gathered("clip_score", e.gathered("clip.json"))
            .gathered("clip_score_per_image", e.gathered("clip_per_image.jsonl")),
        &[],
    );
    let metrics = section(&readme(&h), "Metrics");
    let rows = table_rows(&metrics);
    assert_eq!(rows.len(), 3);
    // 3e-05 (v2) before 0.0001 (v1).
    assert!(rows[1].contains("`learning_rate=3e-05`") && rows[1].contains("| 2.500 |"));
    assert!(rows[2].contains("| **1.500** | -0.5000 (-25.0%) ▼ better |"), "{}", rows[2]);
    assert!(rows[2].contains("| **23.00 [21.00, 26.00]** |"), "{}", rows[2]);
    assert!(rows[2].ends_with("| 3 / 3, 3 / 3, 3, 3 |"), "{}", rows[2]);
    assert!(
        metrics.contains("N (FID real / fake, CMMD real / fake, LPIPS pairs, CLIP score images)")
    );
    // The per-image values pair with the original's: +1 on every image, significant (N = 3).
    assert!(metrics.contains("- `learning_rate=0.0001` has higher CLIP score than the original at N = 3 images (+1.000 [+1.000, +1.000], paired)"), "{metrics}");
    assert!(
        metrics.contains(
            "Lower is better for FID, KID, CMMD and LPIPS; higher is better for CLIP score."
        ),
        "{metrics}"
    );
}

#[test]
fn without_cmmd_and_clip_score_inputs_the_report_has_neither() {
    let e = Experiment::new();
    let h = run(e.harness(), &[]);
    let text = readme(&h);
    assert!(!text.contains("CMMD") && !text.contains("CLIP"), "{text}");
    let metrics = section(&text, "Metrics");
    assert!(metrics.contains("| N (FID real / fake, LPIPS pairs) |"), "{metrics}");
    assert!(metrics.contains("Lower is better for all three metrics."));
    for row in report_json(&h)["metrics"].as_array().unwrap() {
        let keys: Vec<&String> = row.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            ["delta_vs_original", "fid", "intervals", "label", "lpips", "model", "values"],
            "report.json's rows keep their keys"
        );
    }
}

#[test]
fn cmmd_and_clip_score_inputs_are_validated() {
    let p = PerImage::with_cmmd_and_clip(|_| 1.0, |model| clip_shifted(model, 0.0));
    let mut h = Harness::new().input("base_cmmd", p.path("base/clip.json"));
    let err = h.run(&Report, &testing::params(&Report, &[])).unwrap_err().to_string();
    assert!(err.contains("input `base_cmmd`"), "{err}");
    assert!(err.contains("its `metric` is \"clip-score\", not \"cmmd\""), "{err}");

    let file = p.path("finetuned/clip_per_image.jsonl");
    let text = fs::read_to_string(&file).unwrap().replacen(
        "\"clip_score\":20.0",
        "\"clip_score\":-1.0",
        1,
    );
    fs::write(&file, text).unwrap();
    let mut h = Harness::new()
        .input("clip_score", p.path("finetuned/clip.json"))
        .input("clip_score_per_image", file.clone());
    let err = h.run(&Report, &testing::params(&Report, &[])).unwrap_err().to_string();
    assert!(err.contains("clip_score_per_image"), "{err}");
    assert!(err.contains("`clip_score` is -1, not a clamped score"), "{err}");

    fs::write(p.path("base/clip.json"), "{\"metric\": \"clip-score\", \"clip_score\": 3}").unwrap();
    let mut h = Harness::new().input("base_clip_score", p.path("base/clip.json"));
    let err = h.run(&Report, &testing::params(&Report, &[])).unwrap_err().to_string();
    assert!(err.contains("`mean_clamped` is missing or null"), "{err}");
}

#[test]
#[ignore = "writes the example report to $REPORT_DUMP for a person to look at"]
fn dump_example_report() {
    let e = Experiment::new();
    let h = run(e.harness(), &[]);
    let dest = PathBuf::from(std::env::var("REPORT_DUMP").expect("set REPORT_DUMP"));
    for (rel, bytes) in files(&h.out_dir().join("report")) {
        let path = dest.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, bytes).unwrap();
    }
}

const VALIDATION_PROMPTS: [&str; 2] = ["a red | circle", "a blue square"];

impl Experiment {
    /// A train stage's `validation/` output under `<name>/validation/`: both prompts drawn
    /// after each of `steps`.
    fn validation(&self, name: &str, steps: &[u64]) {
        let dir = self.path(&format!("{name}/validation"));
        let mut images = Vec::new();
        for &step in steps {
            fs::create_dir_all(dir.join(format!("step-{step:06}"))).unwrap();
            for prompt in 0..VALIDATION_PROMPTS.len() {
                let file_name = format!("step-{step:06}/prompt-{prompt:02}.png");
                image(32, 32, step as u8 + prompt as u8).save(dir.join(&file_name)).unwrap();
                images.push(json!({"step": step, "prompt": prompt, "seed": 7 + prompt,
                                   "file_name": file_name}));
            }
        }
        let index = json!({"prompts": VALIDATION_PROMPTS, "steps": steps, "seed": 7,
            "guidance_scale": 7.5, "num_inference_steps": 20, "scheduler": "pndm",
            "resolution": 32, "images": images});
        fs::write(dir.join("validation.json"), index.to_string()).unwrap();
    }
}

#[test]
fn each_variants_validation_images_are_a_grid_of_prompts_by_steps() {
    let e = Experiment::new();
    e.validation("v1", &[2, 4]);
    e.validation("v2", &[2, 4]);
    let h = run(e.harness().gathered("validation", e.gathered("validation")), &[]);
    let text = section(&readme(&h), "Validation during training");
    // One grid per variant, in sweep order.
    let slow = text.find("### `learning_rate=3e-05`").expect("3e-05's grid");
    let fast = text.find("### `learning_rate=0.0001`").expect("0.0001's grid");
    assert!(slow < fast, "{text}");
    assert!(text.contains("`pndm`, 20 inference steps, guidance 7.5, seed 7"), "{text}");
    let grid = &text[fast..];
    let header = grid.lines().find(|l| l.starts_with('|')).unwrap();
    assert_eq!(header, "| Prompt | Step 2 | Step 4 |");
    let rows = table_rows(grid);
    assert_eq!(rows.len(), 2, "one row per prompt: {grid}");
    assert!(rows[0].starts_with("| a red \\| circle |"), "{}", rows[0]);
    let cells = links(&rows[1]);
    assert_eq!(
        cells,
        [
            "images/learning_rate_0.0001/validation/step-000002/prompt-01.png",
            "images/learning_rate_0.0001/validation/step-000004/prompt-01.png"
        ]
    );
    for link in links(&text) {
        assert!(h.out_dir().join("report").join(&link).is_file(), "{link} missing");
    }
    let json = &report_json(&h)["validation_during_training"];
    assert_eq!(json[1]["model"], "learning_rate=0.0001");
    assert_eq!(json[1]["steps"], json!([2, 4]));
    assert_eq!(json[1]["rows"][1]["images"][1], json!(cells[1]));
}

#[test]
fn without_validation_images_the_grid_is_left_out() {
    let e = Experiment::new();
    let unbound = readme(&run(e.harness(), &[]));
    // A train stage without validation leaves its `validation/` output empty.
    fs::create_dir_all(e.path("v1/validation")).unwrap();
    fs::create_dir_all(e.path("v2/validation")).unwrap();
    let empty = readme(&run(e.harness().gathered("validation", e.gathered("validation")), &[]));
    for text in [unbound, empty] {
        assert!(!text.contains("Validation during training"), "{text}");
    }
}

#[test]
fn a_validation_index_listing_a_missing_image_is_an_error_naming_the_input() {
    let e = Experiment::new();
    e.validation("v1", &[2]);
    e.validation("v2", &[2]);
    fs::remove_file(e.path("v2/validation/step-000002/prompt-01.png")).unwrap();
    let mut h = e.harness().gathered("validation", e.gathered("validation"));
    let message = h.run(&Report, &testing::params(&Report, &[])).unwrap_err().to_string();
    assert!(
        message.contains("validation@learning_rate=3e-05")
            && message.contains("step-000002/prompt-01.png"),
        "{message}"
    );
}

#[test]
fn the_sweep_table_has_a_row_per_sweep_point_and_the_original_with_swept_values_and_metrics() {
    let e = Experiment::new();
    let h = run(e.harness(), &[]);
    let sweep = section(&readme(&h), "Sweep");
    let header = sweep.lines().find(|l| l.starts_with('|')).unwrap();
    // Only metrics some model has (no CMMD, CLIP score or scene accuracy bound).
    assert_eq!(header, "| Model | `finetune.learning_rate` | FID ↓ | KID mean ↓ | LPIPS mean ↓ |");
    assert_eq!(
        table_rows(&sweep),
        [
            "| **original** | — | 120 | 0.02 | 0.61 |",
            "| `learning_rate=3e-05` | 0.00003 | 130 | 0.023 | 0.51 |",
            "| `learning_rate=0.0001` | 0.0001 | 100 | 0.012 | 0.56 |",
        ]
    );
    assert!(sweep.contains("`sdpipe exp show <pipeline>` gives the same table"), "{sweep}");
    let json = report_json(&h);
    let rows = json["sweep"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["model"], "original");
    assert_eq!(rows[0]["params"], json!({}));
    assert_eq!(rows[2]["label"], "learning_rate=0.0001");
    assert_eq!(rows[2]["params"], json!({"finetune.learning_rate": 1e-4}));
    assert_eq!(rows[2]["metrics"], json!({"fid": 100.0, "kid_mean": 0.012, "lpips": 0.56}));
}

#[test]
fn swept_parameters_the_same_at_every_point_are_left_out_of_the_sweep_table() {
    let e = Experiment::new();
    let with_seed = |file: &str| -> Vec<GatheredInput> {
        let mut points = e.gathered(file);
        for p in &mut points {
            p.values.insert("finetune.seed".into(), json!(1));
        }
        points
    };
    let h = run(
        Harness::new()
            .input("base_fid", e.path("base/fid.json"))
            .gathered("fid", with_seed("fid.json")),
        &[],
    );
    let sweep = section(&readme(&h), "Sweep");
    let header = sweep.lines().find(|l| l.starts_with('|')).unwrap();
    assert_eq!(header, "| Model | `finetune.learning_rate` | FID ↓ | KID mean ↓ |");
    assert!(sweep.contains("left out: `finetune.seed` = 1."), "{sweep}");
    let rows = report_json(&h)["sweep"].as_array().unwrap().clone();
    assert!(rows.iter().all(|r| r["params"].get("finetune.seed").is_none()), "{rows:?}");
}

#[test]
fn without_a_sweep_the_report_has_no_sweep_table() {
    let e = Experiment::new();
    let h = run(
        Harness::new()
            .input("base_fid", e.path("base/fid.json"))
            .input("fid", e.path("v1/fid.json")),
        &[],
    );
    assert!(!readme(&h).contains("## Sweep"));
    assert!(report_json(&h).get("sweep").is_none());
}

#[test]
fn each_sample_shows_whether_scene_accuracy_judged_its_background_and_style_right() {
    let e = Experiment::new();
    // The original gets the background right on photo-a only; both variants on every image;
    // every model gets the style wrong on photo-b.
    for (dir, every_background) in [("base", false), ("v1", true), ("v2", true)] {
        let lines: Vec<Value> = IDS
            .iter()
            .enumerate()
            .map(|(i, id)| {
                json!({"id": id, "file_name": format!("{id}.png"), "prompt": "a photo",
                    "background": "blue", "background_correct": every_background || i == 0,
                    "style": "dusk", "style_correct": i != 1, "shapes": [], "relations": [],
                    "all_correct": false})
            })
            .collect();
        write_jsonl(&e.path(&format!("{dir}/scene_per_image.jsonl")), &lines);
        let metrics = json!({"metric": "scene-accuracy", "images": 3, "background": 1.0,
            "style": 0.67, "colours": 1.0, "relations": null, "all": 0.0});
        fs::write(e.path(&format!("{dir}/scene.json")), metrics.to_string()).unwrap();
    }
    let h = run(
        e.harness()
            .input("base_scene", e.path("base/scene.json"))
            .input("base_scene_per_image", e.path("base/scene_per_image.jsonl"))
            .gathered("scene", e.gathered("scene.json"))
            .gathered("scene_per_image", e.gathered("scene_per_image.jsonl")),
        &[],
    );
    let qualitative = section(&readme(&h), "Qualitative comparison");
    assert!(qualitative.contains("whether scene accuracy judged it"), "{qualitative}");
    let rows = table_rows(&qualitative);
    assert!(rows[0].contains("LPIPS 0.6000<br>background ✓, style ✓ |"), "{}", rows[0]);
    assert!(rows[1].contains("LPIPS 0.6100<br>background ✗, style ✗ |"), "{}", rows[1]);
    assert!(rows[1].contains("LPIPS 0.5100<br>background ✓, style ✗ |"), "{}", rows[1]);
    let json = report_json(&h);
    let original = &json["qualitative_comparison"]["rows"][1]["samples"][0];
    assert_eq!(original["scene"], json!({"background": false, "style": false}), "{original}");
}
