//! The `synthetic` kind: the embedded, offline default dataset.
//!
//! It owns generating N captioned images from a seed: coloured shapes on a coloured background,
//! with captions that state exactly what is drawn ("a red circle above a blue square on a yellow
//! background"), in a flat, a textured (lit, shaded, grainy) and a dusk (textured, dim, blue,
//! vignetted) style so a demo can train a base model on one domain and finetune on another. The output has the download stage's layout
//! (`images/<id>.jpg` plus `photos.jsonl`), so every later stage accepts either source.
//!
//! `scene` decides what an image shows and says it; `render` draws it. Both are pure
//! functions of the parameters, and the bytes written are identical across runs and machines.

mod judge;
mod render;
mod scene;
mod scene_accuracy;

pub use scene_accuracy::SceneAccuracy;

use std::fs;
use std::io::{BufWriter, Write};

use image::codecs::jpeg::JpegEncoder;
use serde::Serialize;

use render::render;
use scene::{Scene, Style};
use sdpipe_stages::api::{OutputKind, OutputSpec, ParamSpec, StageContext, StageError, StageKind};
use sdpipe_stages::params::KindParams;

/// Output paths, relative to the stage's output directory (the download stage's layout).
const IMAGES: &str = "images";
const PHOTOS: &str = "photos.jsonl";

pub struct Synthetic;

impl StageKind for Synthetic {
    fn name(&self) -> &'static str {
        "synthetic"
    }

    fn version(&self) -> u32 {
        // 2: dusk keeps more of each colour (per-channel grade, smaller cast, milder vignette).
        2
    }

    fn doc(&self) -> &'static str {
        "Generates `count` captioned images offline and deterministically from `seed`: coloured \
         circles, squares and triangles on a coloured background, with exact captions such as \
         \"a red circle above a blue square on a yellow background\". `style: flat` draws solid \
         fills; `style: textured` draws the same scenes lit, shaded and grainy, with captions \
         ending in \", photographic lighting\"; `style: dusk` grades the textured scenes dim, \
         blue and vignetted (\", photographic lighting at dusk\"), a shift of whole-image \
         statistics that even a tiny model learns. A base model can be trained on one domain and \
         finetuned on another. Writes the download stage's layout: `images/<id>.jpg` and \
         `photos.jsonl`."
    }

    fn params(&self) -> Vec<ParamSpec> {
        Settings::specs()
    }

    fn outputs(&self) -> Vec<OutputSpec> {
        vec![
            OutputSpec {
                name: "images",
                path: IMAGES,
                kind: OutputKind::Dir,
                doc: "The images, `<id>.jpg`.",
            },
            OutputSpec {
                name: "photos",
                path: PHOTOS,
                kind: OutputKind::File,
                doc: "One JSON object per image: id, file_name, url (null), attribution, width, \
                      height, ai_description (the caption).",
            },
        ]
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let settings = Settings::of(ctx)?;
        let images_dir = ctx.output_path(IMAGES);
        fs::create_dir_all(&images_dir)
            .map_err(|e| StageError::io(format!("creating {}", images_dir.display()), e))?;
        let photos_path = ctx.output_path(PHOTOS);
        let photos_file = fs::File::create(&photos_path)
            .map_err(|e| StageError::io(format!("creating {}", photos_path.display()), e))?;
        let mut photos = BufWriter::new(photos_file);
        let photos_error = |e| StageError::io(format!("writing {}", photos_path.display()), e);

        ctx.progress.set_total(settings.count);
        for index in 0..settings.count {
            ctx.cancel.check()?;
            let scene = Scene::generate(settings.seed, index, settings.shapes);
            let caption = scene.caption(settings.style);
            let image = render(&scene, settings.style, settings.resolution);

            let id = image_id(settings.style, settings.seed, index);
            let file_name = format!("{IMAGES}/{id}.jpg");
            let mut jpeg = Vec::new();
            JpegEncoder::new_with_quality(&mut jpeg, settings.quality)
                .encode_image(&image)
                .map_err(|e| StageError::failed(format!("encoding {file_name}: {e}")))?;
            let path = ctx.output_path(&file_name);
            fs::write(&path, &jpeg)
                .map_err(|e| StageError::io(format!("writing {}", path.display()), e))?;

            let record = PhotoRecord {
                id: &id,
                file_name: &file_name,
                url: None,
                attribution: "sdpipe synthetic",
                width: settings.resolution,
                height: settings.resolution,
                ai_description: &caption,
            };
            serde_json::to_writer(&mut photos, &record).map_err(|e| photos_error(e.into()))?;
            photos.write_all(b"\n").map_err(photos_error)?;
            ctx.progress.advance(1, &id);
        }
        photos.flush().map_err(photos_error)?;

        writeln!(
            ctx.log,
            "synthetic: {} {} images at {}px, seed {}, {} shapes each",
            settings.count,
            settings.style.name(),
            settings.resolution,
            settings.seed,
            settings.shapes
        )
        .map_err(|e| StageError::io("writing the stage log", e))?;
        Ok(())
    }
}

/// One line of `photos.jsonl`; fields in the download stage's order, so lines are stable.
#[derive(Serialize)]
struct PhotoRecord<'a> {
    id: &'a str,
    file_name: &'a str,
    url: Option<&'a str>,
    attribution: &'a str,
    width: u32,
    height: u32,
    ai_description: &'a str,
}

/// `syn-flat-s0-00003`: style and seed are in the id so datasets of different domains or seeds
/// can be merged without collisions. Only `[A-Za-z0-9_-]`: a negative seed is written `sm5`.
fn image_id(style: Style, seed: i64, index: u64) -> String {
    let sign = if seed < 0 { "m" } else { "" };
    format!("syn-{}-s{sign}{}-{index:05}", style.name(), seed.unsigned_abs())
}

/// The parameters.
#[derive(KindParams)]
struct Settings {
    /// Number of images to generate.
    #[param(default = 16, min = 1)]
    count: u64,
    /// Seed of the scenes; image i depends only on the seed, i and `shapes`, so a larger
    /// `count` extends a smaller one.
    #[param(default = 0)]
    seed: i64,
    /// Side of the square images, in pixels; the scenes scale with it.
    #[param(default = 64, min = 16, max = 2048)]
    resolution: u32,
    /// `flat` (solid fills), `textured` (lighting, shading, shadows, grain) or `dusk`
    /// (textured, then dimmed, cast blue and vignetted); one seed gives the same scenes in all
    /// three.
    #[param(default = "flat", one_of = Style::NAMES)]
    style: Style,
    /// Shapes per image; with two or more, the caption relates the others to one anchor shape
    /// ("... and a green triangle below the blue square").
    #[param(default = 2, min = 1, max = 3)]
    shapes: usize,
    /// JPEG quality, 1 to 100.
    #[param(default = 95, min = 1, max = 100)]
    quality: u8,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    use serde_json::{json, Value};

    use super::render::PixelShape;
    use super::scene::{Relation, Shape, PALETTE};
    use super::*;
    use sdpipe_stages::api::{CancelToken, Params};
    use sdpipe_stages::testing::{self, Harness};

    fn params(overrides: &[(&str, Value)]) -> Params {
        testing::params(&Synthetic, overrides)
    }

    fn run_with(
        params: &Params,
        cancel: &CancelToken,
    ) -> (tempfile::TempDir, Result<(), StageError>) {
        let mut harness = Harness::new();
        harness.cancel = cancel.clone();
        let result = harness.run(&Synthetic, params);
        (harness.out, result)
    }

    /// Runs the stage with the given overrides and returns its output directory.
    fn run(overrides: &[(&str, Value)]) -> tempfile::TempDir {
        let (out, result) = run_with(&params(overrides), &CancelToken::new());
        result.expect("the stage succeeds");
        out
    }

    fn records(out: &Path) -> Vec<Value> {
        fs::read_to_string(out.join(PHOTOS))
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    fn captions(out: &Path) -> Vec<String> {
        records(out).iter().map(|r| r["ai_description"].as_str().unwrap().to_string()).collect()
    }

    /// Every file under `dir`, by relative path, with its bytes.
    fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut files = BTreeMap::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(next) = pending.pop() {
            for entry in fs::read_dir(next).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    pending.push(path);
                } else {
                    files.insert(
                        path.strip_prefix(dir).unwrap().to_path_buf(),
                        fs::read(&path).unwrap(),
                    );
                }
            }
        }
        files
    }

    fn nearest_palette_colour(c: [f64; 3]) -> &'static str {
        let distance = |p: [u8; 3]| (0..3).map(|k| (c[k] - f64::from(p[k])).powi(2)).sum::<f64>();
        PALETTE.iter().min_by(|a, b| distance(a.rgb).total_cmp(&distance(b.rgb))).unwrap().name
    }

    #[test]
    fn same_params_give_byte_identical_outputs() {
        for style in Style::NAMES {
            let overrides = [("style", json!(style)), ("count", json!(6)), ("shapes", json!(3))];
            let (a, b) = (run(&overrides), run(&overrides));
            let (a, b) = (tree(a.path()), tree(b.path()));
            assert_eq!(a.len(), 7, "six images and photos.jsonl");
            assert_eq!(a, b);
        }
    }

    #[test]
    fn images_do_not_depend_on_count() {
        let small = tree(run(&[("count", json!(2))]).path());
        let large = tree(run(&[("count", json!(5))]).path());
        for (path, bytes) in small.iter().filter(|(p, _)| p.starts_with(IMAGES)) {
            assert_eq!(Some(bytes), large.get(path), "{}", path.display());
        }
    }

    #[test]
    fn different_seeds_give_different_scenes() {
        let a = captions(run(&[("seed", json!(1))]).path());
        let b = captions(run(&[("seed", json!(2))]).path());
        assert_ne!(a, b);
        let a = Scene::generate(1, 0, 2);
        let b = Scene::generate(2, 0, 2);
        assert_ne!(a, b);
    }

    #[test]
    fn count_is_honoured() {
        let out = run(&[("count", json!(5))]);
        assert_eq!(records(out.path()).len(), 5);
        assert_eq!(fs::read_dir(out.path().join(IMAGES)).unwrap().count(), 5);
    }

    #[test]
    fn images_decode_at_requested_resolution() {
        let out =
            run(&[("resolution", json!(48)), ("count", json!(3)), ("style", json!("textured"))]);
        for record in records(out.path()) {
            let path = out.path().join(record["file_name"].as_str().unwrap());
            let image = image::open(&path).unwrap();
            assert_eq!((image.width(), image.height()), (48, 48), "{}", path.display());
            assert_eq!((record["width"].clone(), record["height"].clone()), (json!(48), json!(48)));
        }
    }

    #[test]
    fn records_use_the_download_layout() {
        let out = run(&[("count", json!(3))]);
        for record in records(out.path()) {
            let keys: Vec<&str> = record.as_object().unwrap().keys().map(String::as_str).collect();
            let mut expected =
                ["id", "file_name", "url", "attribution", "width", "height", "ai_description"];
            expected.sort();
            assert_eq!(keys, expected);
            let id = record["id"].as_str().unwrap();
            assert_eq!(record["file_name"], json!(format!("images/{id}.jpg")));
            assert!(out.path().join(record["file_name"].as_str().unwrap()).is_file());
            assert_eq!(record["url"], Value::Null);
            assert_eq!(record["attribution"], json!("sdpipe synthetic"));
        }
    }

    #[test]
    fn ids_carry_style_and_seed_in_a_safe_alphabet() {
        assert_eq!(image_id(Style::Flat, 0, 3), "syn-flat-s0-00003");
        assert_eq!(image_id(Style::Textured, 42, 12), "syn-textured-s42-00012");
        assert_eq!(image_id(Style::Flat, -5, 0), "syn-flat-sm5-00000");
        let extreme = image_id(Style::Flat, i64::MIN, u64::MAX);
        assert!(extreme.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
    }

    #[test]
    fn caption_relations_match_shape_geometry() {
        // Independently of `Relation::between`: a stated relation holds when the boxes are
        // disjoint along its axis and the centres are further apart along it than across it.
        let holds = |a: &Shape, relation: Relation, b: &Shape| {
            let (ha, hb) = (a.size / 2.0, b.size / 2.0);
            let (dx, dy) = ((a.cx - b.cx).abs(), (a.cy - b.cy).abs());
            match relation {
                Relation::Above => a.cy + ha < b.cy - hb && dy > dx,
                Relation::Below => a.cy - ha > b.cy + hb && dy > dx,
                Relation::LeftOf => a.cx + ha < b.cx - hb && dx > dy,
                Relation::RightOf => a.cx - ha > b.cx + hb && dx > dy,
            }
        };
        // "a|an|the <noun> <relation> a|an|the <noun>", the nouns naming scene shapes.
        let check_clause = |scene: &Scene, clause: &str| {
            let find = |phrase: &str| {
                let noun = phrase.split_once(' ').unwrap().1;
                scene.shapes.iter().find(|s| s.noun() == noun).unwrap_or_else(|| panic!("{noun}"))
            };
            let (relation, (a, b)) =
                [Relation::Above, Relation::Below, Relation::LeftOf, Relation::RightOf]
                    .iter()
                    .find_map(|r| Some((*r, clause.split_once(&format!(" {} ", r.phrase()))?)))
                    .unwrap_or_else(|| panic!("no relation in `{clause}`"));
            assert!(holds(find(a), relation, find(b)), "`{clause}` is false: {scene:?}");
        };
        for seed in 0..60 {
            for shape_count in [2, 3] {
                let scene = Scene::generate(seed, 7, shape_count);
                let caption = scene.caption(Style::Flat);
                let (body, place) = caption.rsplit_once(" on ").unwrap();
                assert!(place.ends_with(&format!(" {} background", scene.background.name)));
                let clauses: Vec<&str> = body.split(" and ").collect();
                assert_eq!(clauses.len(), shape_count - 1, "{caption}");
                for clause in clauses {
                    check_clause(&scene, clause);
                }
            }
        }
    }

    #[test]
    fn captions_name_every_shape_once_with_distinct_colours() {
        for seed in 0..40 {
            let scene = Scene::generate(seed, 0, 3);
            let caption = scene.caption(Style::Flat);
            let mut colours: Vec<&str> = scene.shapes.iter().map(|s| s.colour.name).collect();
            colours.push(scene.background.name);
            colours.sort();
            colours.dedup();
            assert_eq!(colours.len(), 4, "{caption}");
            for shape in &scene.shapes {
                assert!(caption.contains(&shape.noun()), "{caption} lacks {}", shape.noun());
            }
            assert!(!caption.contains("a orange"), "{caption}");
        }
    }

    #[test]
    fn rendered_colours_match_their_names() {
        let res = 64;
        for style in [Style::Flat, Style::Textured] {
            for seed in 0..30 {
                let scene = Scene::generate(seed, 0, 3);
                let image = render(&scene, style, res);
                let bodies: Vec<PixelShape> =
                    scene.shapes.iter().map(|s| PixelShape::new(s, res)).collect();
                // Interior pixels, away from anti-aliased edges, and background pixels away
                // from every shape (and most of its shadow).
                let inside = |body: &PixelShape, x: f64, y: f64| {
                    [(0.0, 0.0), (-1.0, 0.0), (1.0, 0.0), (0.0, -1.0), (0.0, 1.0)]
                        .iter()
                        .all(|(dx, dy)| body.contains(x + dx, y + dy))
                };
                let mut sums = vec![([0.0; 3], 0usize); bodies.len() + 1];
                for (px, py, pixel) in image.enumerate_pixels() {
                    let (x, y) = (f64::from(px) + 0.5, f64::from(py) + 0.5);
                    let near = |b: &PixelShape| {
                        (x - b.cx).abs() < b.half + 4.0 && (y - b.cy).abs() < b.half + 4.0
                    };
                    let slot = match bodies.iter().position(|b| inside(b, x, y)) {
                        Some(i) => i,
                        None if !bodies.iter().any(near) => bodies.len(),
                        None => continue,
                    };
                    for k in 0..3 {
                        sums[slot].0[k] += f64::from(pixel[k]);
                    }
                    sums[slot].1 += 1;
                }
                let mut names: Vec<&str> = scene.shapes.iter().map(|s| s.colour.name).collect();
                names.push(scene.background.name);
                for ((sum, n), name) in sums.iter().zip(names) {
                    assert!(*n > 0, "no pixels for {name}");
                    let mean = sum.map(|s| s / *n as f64);
                    assert_eq!(
                        nearest_palette_colour(mean),
                        name,
                        "{style:?} seed {seed}: {mean:?} {n}"
                    );
                }
            }
        }
    }

    #[test]
    fn styles_render_the_same_scene_in_different_domains() {
        let flat = run(&[("style", json!("flat")), ("count", json!(4))]);
        let textured = run(&[("style", json!("textured")), ("count", json!(4))]);
        for (f, t) in captions(flat.path()).iter().zip(captions(textured.path())) {
            assert_eq!(format!("{f}, photographic lighting"), t);
        }
        // Flat images are a handful of solid colours; textured ones vary almost everywhere.
        for index in 0..4 {
            let scene = Scene::generate(0, index, 2);
            let (flat, textured) =
                (render(&scene, Style::Flat, 64), render(&scene, Style::Textured, 64));
            let plain = |image: &image::RgbImage| {
                image.pixels().filter(|p| p.0 == scene.background.rgb).count()
            };
            let distinct = |image: &image::RgbImage| {
                image.pixels().map(|p| p.0).collect::<std::collections::BTreeSet<_>>().len()
            };
            let total = 64 * 64;
            assert!(plain(&flat) * 2 > total, "flat image {index} is not solid");
            assert!(plain(&textured) * 20 < total, "textured image {index} is mostly solid");
            assert!(
                distinct(&textured) > 10 * distinct(&flat),
                "image {index}: {} textured colours vs {} flat",
                distinct(&textured),
                distinct(&flat)
            );
        }
    }

    #[test]
    fn dusk_is_the_textured_scene_dimmer_bluer_and_darker_in_the_corners() {
        let flat = run(&[("style", json!("flat")), ("count", json!(4))]);
        let dusk = run(&[("style", json!("dusk")), ("count", json!(4))]);
        for (f, d) in captions(flat.path()).iter().zip(captions(dusk.path())) {
            assert_eq!(format!("{f}, photographic lighting at dusk"), d);
        }
        let mean = |image: &image::RgbImage| {
            let mut sum = [0.0; 3];
            for p in image.pixels() {
                for k in 0..3 {
                    sum[k] += f64::from(p[k]);
                }
            }
            sum.map(|s| s / f64::from(image.width() * image.height()))
        };
        for seed in 0..20 {
            let scene = Scene::generate(seed, 0, 2);
            let (textured, dusk) =
                (render(&scene, Style::Textured, 64), render(&scene, Style::Dusk, 64));
            let (t, d) = (mean(&textured), mean(&dusk));
            let luma = |c: [f64; 3]| (c[0] + c[1] + c[2]) / 3.0;
            // Whatever the palette draws, a dusk image is dimmer (only the darkest scenes, lifted
            // by the cast, are not) and bluer: its blue gains on its red.
            assert!(luma(d) < 0.75 * luma(t) + 25.0, "seed {seed}: {d:?} vs {t:?}");
            assert!(
                (d[2] + 1.0) / (d[0] + 1.0) > 1.3 * (t[2] + 1.0) / (t[0] + 1.0),
                "seed {seed}: {d:?} is not cast blue against {t:?}"
            );
            // The vignette: against the same grade without it (55/65/85% of the channels plus
            // the cast (0, 10, 40)), the corners lose about 30%, the centre nothing. A corner
            // the textured image clips at 255 is skipped: the grade saw its unclipped value.
            let graded = |x: u32, y: u32| {
                let [r, g, b] = textured.get_pixel(x, y).0.map(f64::from);
                luma([0.55 * r, 0.65 * g + 10.0, 0.85 * b + 40.0])
            };
            let dimmed =
                |x: u32, y: u32| luma(dusk.get_pixel(x, y).0.map(f64::from)) / graded(x, y);
            for (x, y) in [(0, 0), (63, 0), (0, 63), (63, 63)] {
                if textured.get_pixel(x, y).0.contains(&255) {
                    continue;
                }
                assert!(dimmed(x, y) < 0.75, "seed {seed}: corner ({x}, {y}) not darkened");
            }
            assert!(dimmed(32, 32) > 0.95, "seed {seed}: centre darkened");
        }
    }

    #[test]
    fn cancellation_stops_the_stage() {
        let cancel = CancelToken::new();
        cancel.cancel();
        let (_out, result) = run_with(&params(&[]), &cancel);
        assert!(matches!(result, Err(StageError::Cancelled)));
    }

    #[test]
    fn out_of_range_params_are_rejected() {
        for (name, value) in
            [("style", json!("oil")), ("shapes", json!(4)), ("resolution", json!(8))]
        {
            let (_out, result) = run_with(&params(&[(name, value)]), &CancelToken::new());
            match result {
                Err(StageError::InvalidParam { param, .. }) => assert_eq!(param, name),
                other => panic!("{name}: {other:?}"),
            }
        }
    }
}
