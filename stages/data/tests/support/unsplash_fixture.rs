//! A miniature Unsplash Lite release in the real format, served by a loopback server.
//!
//! The release zip holds three `photos` shards (`photos.tsv000`, `photos.tsv001` with its
//! columns in reverse order, and `photos.csv002` in the older naming without the newer
//! `blur_hash` column), a `keywords` table, and hostile entries: `..` and absolute names and a
//! symlink, all named like shards. Image URLs point back at the server, which answers each
//! photo id with a fixed behaviour (see [`behaviour`]) and honours `w=` by drawing a real JPEG
//! of that width.

use std::io::{Cursor, Write};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use image::codecs::jpeg::JpegEncoder;
use zip::write::SimpleFileOptions;

use super::http_server::{Reply, Server};

/// The `photos` columns in Unsplash's documented order.
pub const COLUMNS: [&str; 31] = [
    "photo_id",
    "photo_url",
    "photo_image_url",
    "photo_submitted_at",
    "photo_featured",
    "photo_width",
    "photo_height",
    "photo_aspect_ratio",
    "photo_description",
    "photographer_username",
    "photographer_first_name",
    "photographer_last_name",
    "exif_camera_make",
    "exif_camera_model",
    "exif_iso",
    "exif_aperture_value",
    "exif_focal_length",
    "exif_exposure_time",
    "photo_location_name",
    "photo_location_latitude",
    "photo_location_longitude",
    "photo_location_country",
    "photo_location_city",
    "stats_views",
    "stats_downloads",
    "ai_description",
    "ai_primary_landmark_name",
    "ai_primary_landmark_latitude",
    "ai_primary_landmark_longitude",
    "ai_primary_landmark_confidence",
    "blur_hash",
];

/// Shard contents, by id, in release order.
pub const SHARD_000: [&str; 6] = ["ok-01", "ok-02", "ok-03", "ok-04", "ok-05", "ok-06"];
pub const SHARD_001: [&str; 6] =
    ["ok-07", "ok-08", "gone-404", "flaky-500", "limited-429", "truncated"];
pub const SHARD_002: [&str; 7] =
    ["slow-once", "slow-always", "png-reply", "ok-09", "gone-410", "../evil", "has space"];
/// Ids only present in entries that must be ignored.
pub const HOSTILE_IDS: [&str; 3] = ["evil-dotdot", "evil-absolute", "evil-nested"];

/// How long the slow photos make the client wait before the server replies.
pub const SLOW: Duration = Duration::from_millis(1500);

/// The description of `ok-01` has quotes inside an unquoted field; that of `ok-07` is a
/// CSV-quoted field with doubled quotes and a tab.
pub const OK_01_DESCRIPTION: &str = "He said \"wow\" at the lake";
pub const OK_07_DESCRIPTION: &str = "A \"quoted\" title\twith a tab";

pub fn ai_description(id: &str) -> String {
    format!("a mountain lake photographed for {id}")
}

/// One TSV field of `column` for `id`, as a real release writes it.
fn field(column: &str, id: &str, base_url: &str) -> String {
    match column {
        "photo_id" => id.to_string(),
        "photo_url" => format!("https://unsplash.com/photos/{id}"),
        "photo_image_url" => format!("{base_url}/img/{id}"),
        "photo_submitted_at" => "2020-05-01 10:00:00.000".into(),
        "photo_featured" => "t".into(),
        "photo_width" => "6000".into(),
        "photo_height" => "4000".into(),
        "photo_aspect_ratio" => "1.5".into(),
        "photo_description" => match id {
            "ok-01" => OK_01_DESCRIPTION.into(),
            "ok-07" => format!("\"{}\"", OK_07_DESCRIPTION.replace('"', "\"\"")),
            _ => String::new(),
        },
        "photographer_username" => format!("user_{}", id.replace(['.', '/', ' '], "")),
        "photographer_first_name" => "Ansel".into(),
        "photographer_last_name" => "Adams".into(),
        "exif_iso" => "100".into(),
        "photo_location_country" => "Iceland".into(),
        "stats_views" => "12345".into(),
        "ai_description" => ai_description(id),
        "blur_hash" => "LEHV6nWB2yk8pyo0adR*.7kCMdnj".into(),
        // The rest are empty, as many are in the real table.
        _ => String::new(),
    }
}

pub fn shard(columns: &[&str], ids: &[&str], base_url: &str) -> String {
    let mut text = columns.join("\t");
    for id in ids {
        text.push('\n');
        let fields: Vec<String> = columns.iter().map(|c| field(c, id, base_url)).collect();
        text.push_str(&fields.join("\t"));
    }
    text.push('\n');
    text
}

/// The three shards as (name, content).
pub fn shards(base_url: &str) -> Vec<(&'static str, String)> {
    let reversed: Vec<&str> = COLUMNS.iter().rev().copied().collect();
    let without_blur_hash = &COLUMNS[..30];
    vec![
        ("photos.tsv000", shard(&COLUMNS, &SHARD_000, base_url)),
        ("photos.tsv001", shard(&reversed, &SHARD_001, base_url)),
        ("photos.csv002", shard(without_blur_hash, &SHARD_002, base_url)),
    ]
}

pub fn release_zip(base_url: &str) -> Vec<u8> {
    let options = SimpleFileOptions::default();
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    for (name, text) in shards(base_url) {
        zip.start_file(name, options).unwrap();
        zip.write_all(text.as_bytes()).unwrap();
    }
    zip.start_file("keywords.tsv000", options).unwrap();
    zip.write_all(b"photo_id\tkeyword\nok-01\tlake\n").unwrap();
    let hostile = [
        ("../photos.tsv009", "evil-dotdot"),
        ("/tmp/photos.tsv010", "evil-absolute"),
        ("lite/../../photos.tsv011", "evil-nested"),
    ];
    for (name, id) in hostile {
        zip.start_file(name, options).unwrap();
        zip.write_all(shard(&COLUMNS, &[id], base_url).as_bytes()).unwrap();
    }
    // Read as a shard, this would fail the run: its content is not a TSV with a header.
    zip.add_symlink("photos.tsv012", "/etc/passwd", options).unwrap();
    zip.finish().unwrap().into_inner()
}

/// A real JPEG of `width` × `2·width/3`.
pub fn jpeg(width: u32, seed: u8) -> Vec<u8> {
    let height = (width * 2 / 3).max(1);
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x * 3) as u8 ^ seed, (y * 5) as u8, seed.wrapping_mul(37)])
    });
    let mut bytes = Vec::new();
    JpegEncoder::new_with_quality(&mut bytes, 85).encode_image(&image).unwrap();
    bytes
}

fn png(width: u32) -> Vec<u8> {
    let image = image::RgbImage::from_fn(width, width / 2, |x, _| image::Rgb([x as u8, 20, 200]));
    let mut bytes = Vec::new();
    image.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
    bytes
}

/// The reply for photo `id`, requested with `query`, on its `previous`+1-th request.
pub fn behaviour(id: &str, query: &str, previous: usize) -> Reply {
    let width: u32 = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("w="))
        .and_then(|w| w.parse().ok())
        .unwrap_or(64);
    let seed = id.bytes().fold(0u8, |a, b| a.wrapping_add(b));
    let image = || Reply::ok(jpeg(width, seed), "image/jpeg");
    match id {
        "gone-404" => Reply::status(404),
        "gone-410" => Reply::status(410),
        "flaky-500" if previous == 0 => Reply::status(500),
        "limited-429" if previous == 0 => Reply::status(429).header("Retry-After", "1"),
        "truncated" => {
            let mut bytes = jpeg(width, seed);
            bytes.truncate(bytes.len() * 2 / 3);
            Reply::ok(bytes, "image/jpeg")
        }
        "slow-once" if previous == 0 => image().delay(SLOW),
        "slow-always" => image().delay(SLOW),
        "png-reply" => Reply::ok(png(width), "image/png"),
        _ if id.starts_with("ok-") || ["flaky-500", "limited-429", "slow-once"].contains(&id) => {
            image()
        }
        _ => Reply::status(404),
    }
}

/// A server for the release: `/lite.zip` and `/img/<id>`, plus `/not-a-zip`.
pub struct Fixture {
    pub server: Server,
}

impl Fixture {
    pub fn start() -> Fixture {
        let zip: Arc<OnceLock<Vec<u8>>> = Arc::new(OnceLock::new());
        let served = zip.clone();
        let server = Server::start(move |path, query, previous| {
            if path == "/lite.zip" {
                Reply::ok(served.get().expect("zip is built").clone(), "application/zip")
            } else if path == "/not-a-zip" {
                Reply::ok(b"<html>maintenance</html>".to_vec(), "text/html")
            } else if let Some(id) = path.strip_prefix("/img/") {
                behaviour(&percent_decode(id), query, previous)
            } else {
                Reply::status(404)
            }
        });
        zip.set(release_zip(&server.url(""))).unwrap();
        Fixture { server }
    }

    pub fn zip_url(&self) -> String {
        self.server.url("/lite.zip")
    }

    /// Image requests for `id` so far.
    pub fn image_hits(&self, id: &str) -> usize {
        self.server.hits(&format!("/img/{id}"))
    }

    pub fn all_image_hits(&self) -> usize {
        self.server.hits_under("/img/")
    }

    /// The shards written to `dir` as files, with another table beside them.
    pub fn write_folder(&self, dir: &Path) {
        for (name, text) in shards(&self.server.url("")) {
            std::fs::write(dir.join(name), text).unwrap();
        }
        std::fs::write(dir.join("keywords.tsv000"), "photo_id\tkeyword\n").unwrap();
    }
}

/// Enough percent-decoding for the ids above (`has space` is sent as `has%20space`).
fn percent_decode(text: &str) -> String {
    text.replace("%20", " ")
}
