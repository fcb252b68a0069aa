//! The `scene-accuracy` kind: how often sampled images show what their synthetic captions say
//! (see [`super::judge`] for how an image is judged). It reads a `sample` stage's images and its
//! `samples.jsonl` (id, file_name, prompt), judges every image whose prompt is a caption of the
//! synthetic grammar, and writes the mean accuracies and one line per image.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Value};

use super::judge::{judge, Judgement, References, PRESENT_FRACTION};
use super::scene::Described;
use sdpipe_stages::api::{OutputKind, OutputSpec, ParamSpec, StageContext, StageError, StageKind};
use sdpipe_stages::params::{Input, KindParams};

const METRICS: &str = "metrics.json";
const PER_IMAGE: &str = "per_image.jsonl";

pub struct SceneAccuracy;

/// The parameters.
#[derive(KindParams)]
struct Settings {
    /// A `sample` stage's `images`.
    #[param(input)]
    samples: Input,
    /// The same stage's `samples` ({id, file_name, prompt} lines).
    #[param(input)]
    samples_jsonl: Input,
}

/// One line of a `sample` stage's `samples.jsonl`.
#[derive(Deserialize)]
struct SampleLine {
    id: String,
    file_name: String,
    prompt: String,
}

impl StageKind for SceneAccuracy {
    fn name(&self) -> &'static str {
        "scene-accuracy"
    }

    fn version(&self) -> u32 {
        // 2: colours judged against every style's references, and the style judged.
        // 3: the dusk references follow the synthetic kind's new dusk grade (its version 2).
        3
    }

    fn doc(&self) -> &'static str {
        "Scores sampled images against their `synthetic` captions, as GenEval scores real models \
         with a detector: the share of images whose background is the colour the caption names, \
         that are drawn in the caption's style (flat, textured, dusk), \
         whose every named shape colour is drawn, whose shapes stand in the stated relations \
         (left/right/above/below, by the centroids of their colours), and all three at once. \
         Pixels are classified by the palette colour and style whose rendering at that pixel is \
         nearest. Reads a `sample` stage's `images` and `samples` outputs; prompts \
         that are not synthetic captions are counted and skipped."
    }

    fn params(&self) -> Vec<ParamSpec> {
        Settings::specs()
    }

    fn outputs(&self) -> Vec<OutputSpec> {
        vec![
            OutputSpec {
                name: "metrics",
                path: METRICS,
                kind: OutputKind::File,
                doc: "Images judged and skipped; mean background, colour, relation and overall \
                      accuracy.",
            },
            OutputSpec {
                name: "per_image",
                path: PER_IMAGE,
                kind: OutputKind::File,
                doc: "Per image: id, file_name, prompt, the background found, each shape \
                      colour's share of the pixels, each relation, and whether all hold.",
            },
        ]
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let settings = Settings::of(ctx)?;
        let images = settings.samples.path();
        let listing = settings.samples_jsonl.path();
        let lines = read_lines(listing)?;
        ctx.progress.set_total(lines.len() as u64);
        let mut refs: BTreeMap<u32, References> = BTreeMap::new();
        let mut judged: Vec<(SampleLine, Judgement)> = Vec::new();
        let mut skipped = Vec::new();
        for line in lines {
            ctx.cancel.check()?;
            let Some(described) = Described::parse(&line.prompt) else {
                skipped.push(line.id);
                continue;
            };
            let path = images.join(&line.file_name);
            let image = sdpipe_jpeg::open_rgb(&path)
                .map_err(|e| StageError::failed(format!("sample `{}`: {e}", line.id)))?;
            if image.width() != image.height() {
                return Err(StageError::failed(format!(
                    "{}: {}x{} is not square; the synthetic scenes are",
                    path.display(),
                    image.width(),
                    image.height()
                )));
            }
            let refs = refs.entry(image.width()).or_insert_with(|| References::new(image.width()));
            ctx.progress.advance(1, &line.id);
            judged.push((line, judge(&image, &described, refs)));
        }
        if judged.is_empty() {
            return Err(StageError::failed(format!(
                "{}: no prompt is a `synthetic` caption ({} skipped); scene accuracy needs \
                 samples of the synthetic kind's captions",
                listing.display(),
                skipped.len()
            )));
        }
        write_per_image(ctx, &judged)?;
        let metrics = summary(&judged, &skipped);
        let path = ctx.output_path(METRICS);
        let text = serde_json::to_string_pretty(&metrics).expect("JSON values serialise");
        fs::write(&path, text + "\n")
            .map_err(|e| StageError::io(format!("writing {}", path.display()), e))?;
        writeln!(
            ctx.log,
            "scene accuracy of {} images: background {:.3}, colours {:.3}, all {:.3}",
            judged.len(),
            metrics["background"].as_f64().unwrap_or_default(),
            metrics["colours"].as_f64().unwrap_or_default(),
            metrics["all"].as_f64().unwrap_or_default()
        )
        .map_err(|e| StageError::io("writing the stage log", e))
    }
}

fn read_lines(path: &Path) -> Result<Vec<SampleLine>, StageError> {
    let text = fs::read_to_string(path)
        .map_err(|e| StageError::io(format!("reading {}", path.display()), e))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| {
            serde_json::from_str(line)
                .map_err(|e| StageError::failed(format!("{} line {}: {e}", path.display(), n + 1)))
        })
        .collect()
}

fn write_per_image(
    ctx: &mut StageContext<'_>,
    judged: &[(SampleLine, Judgement)],
) -> Result<(), StageError> {
    let mut text = String::new();
    for (line, j) in judged {
        let shapes: Vec<Value> = j
            .shapes
            .iter()
            .map(|(colour, share, present)| {
                json!({"colour": colour, "share": round(*share), "present": present})
            })
            .collect();
        let record = json!({
            "id": line.id,
            "file_name": line.file_name,
            "prompt": line.prompt,
            "background": j.background,
            "background_correct": j.background_correct,
            "style": j.style,
            "style_correct": j.style_correct,
            "shapes": shapes,
            "relations": j.relations,
            "all_correct": j.all_correct(),
        });
        text.push_str(&record.to_string());
        text.push('\n');
    }
    let path = ctx.output_path(PER_IMAGE);
    fs::write(&path, text).map_err(|e| StageError::io(format!("writing {}", path.display()), e))
}

/// The means over the judged images (relations over the images that state any).
fn summary(judged: &[(SampleLine, Judgement)], skipped: &[String]) -> Value {
    let n = judged.len() as f64;
    let mean = |hits: usize, of: f64| round(hits as f64 / of);
    let count = |f: &dyn Fn(&Judgement) -> bool| judged.iter().filter(|(_, j)| f(j)).count();
    let with_relations: Vec<bool> =
        judged.iter().filter_map(|(_, j)| j.relations_correct()).collect();
    let relations = (!with_relations.is_empty())
        .then(|| mean(with_relations.iter().filter(|&&r| r).count(), with_relations.len() as f64));
    json!({
        "metric": "scene-accuracy",
        "images": judged.len(),
        "skipped": skipped,
        "background": mean(count(&|j| j.background_correct), n),
        "style": mean(count(&|j| j.style_correct), n),
        "colours": mean(count(&|j| j.colours_correct()), n),
        "relations": relations,
        "all": mean(count(&|j| j.all_correct()), n),
        "present_fraction": PRESENT_FRACTION,
    })
}

/// Six decimals: the JSON stays readable and identical across runs.
fn round(v: f64) -> f64 {
    (v * 1e6).round() / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::Synthetic;
    use sdpipe_stages::testing::{self, Harness};

    /// The synthetic kind's own images as "samples" of their captions; `shift` pairs image i
    /// with caption i + shift (0: the true captions).
    fn judged(style: &str, shapes: i64, shift: usize) -> Value {
        let mut data = Harness::new();
        let overrides = [
            ("count", json!(40)),
            ("resolution", json!(64)),
            ("style", json!(style)),
            ("shapes", json!(shapes)),
        ];
        data.run(&Synthetic, &testing::params(&Synthetic, &overrides)).unwrap();
        let records: Vec<Value> = fs::read_to_string(data.out_dir().join("photos.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let mut listing = String::new();
        for (i, r) in records.iter().enumerate() {
            let caption = &records[(i + shift) % records.len()]["ai_description"];
            let file = r["file_name"].as_str().unwrap().trim_start_matches("images/");
            listing += &json!({"id": r["id"], "file_name": file, "prompt": caption}).to_string();
            listing.push('\n');
        }
        let listing_path = data.state.path().join("samples.jsonl");
        fs::write(&listing_path, listing).unwrap();
        let mut h = Harness::new()
            .input("samples", data.out_dir().join("images"))
            .input("samples_jsonl", &listing_path);
        h.run(&SceneAccuracy, &testing::params(&SceneAccuracy, &[])).unwrap();
        let metrics: Value =
            serde_json::from_str(&fs::read_to_string(h.out_dir().join(METRICS)).unwrap()).unwrap();
        let keys =
            ["background", "style", "colours", "relations", "all"].map(|k| metrics[k].to_string());
        eprintln!("{style}, {shapes} shapes, shift {shift}: {keys:?}");

        metrics
    }

    fn share(metrics: &Value, name: &str) -> f64 {
        metrics[name].as_f64().unwrap_or_else(|| panic!("{name} in {metrics:#}"))
    }

    #[test]
    fn the_synthetic_kinds_own_images_score_full_marks_in_every_style() {
        for style in ["flat", "textured", "dusk"] {
            let m = judged(style, 2, 0);
            assert_eq!(share(&m, "background"), 1.0, "{style}: {m:#}");
            // A lit black background looks flat: such a scene's style rests on its small
            // shapes alone (measured: 1 textured image of 40 read as flat).
            assert!(share(&m, "style") >= 0.95, "{style}: {m:#}");
            assert_eq!(share(&m, "colours"), 1.0, "{style}: {m:#}");
            assert!(share(&m, "relations") >= 0.95, "{style}: {m:#}");
        }
    }

    #[test]
    fn three_shape_scenes_are_judged_on_both_relations() {
        let m = judged("dusk", 3, 0);
        assert_eq!(share(&m, "background"), 1.0, "{m:#}");
        assert!(share(&m, "all") >= 0.9, "{m:#}");
    }

    #[test]
    fn images_paired_with_other_captions_score_near_chance() {
        let m = judged("dusk", 2, 1);
        // Chance for the background is 1 in the 7 colours a caption could name for it.
        assert!(share(&m, "background") <= 0.35, "{m:#}");
        assert!(share(&m, "all") <= 0.2, "{m:#}");
    }

    #[test]
    fn prompts_that_are_not_synthetic_captions_are_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let listing = dir.path().join("samples.jsonl");
        fs::write(&listing, "{\"id\": \"a\", \"file_name\": \"a.png\", \"prompt\": \"a dog\"}\n")
            .unwrap();
        let mut h = Harness::new().input("samples", dir.path()).input("samples_jsonl", &listing);
        let err = h.run(&SceneAccuracy, &testing::params(&SceneAccuracy, &[])).unwrap_err();
        assert!(err.to_string().contains("no prompt is a `synthetic` caption"), "{err}");
    }
}
