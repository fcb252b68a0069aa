//! The `unsplash-lite` kind against a loopback server serving a miniature release in the real
//! format (see `support/unsplash_fixture.rs`). No test touches the internet.

#[path = "support/http_server.rs"]
mod http_server;
#[path = "support/unsplash_fixture.rs"]
mod unsplash_fixture;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use sdpipe_data::imagefolder::ImageFolder;
use sdpipe_data::unsplash::UnsplashLite;
use sdpipe_stages::api::{Params, StageError};
use sdpipe_stages::testing::{self, Harness};
use serde_json::{json, Value};

use unsplash_fixture::{Fixture, COLUMNS, OK_01_DESCRIPTION, OK_07_DESCRIPTION};

/// The kind's defaults with the fixture's zip, small images, and fast retries.
fn params(fixture: &Fixture, overrides: &[(&str, Value)]) -> Params {
    let mut all = vec![
        ("source", json!(fixture.zip_url())),
        ("width", json!(48)),
        ("retry_base_ms", json!(5)),
        ("timeout_s", json!(5)),
    ];
    all.extend(overrides.iter().cloned());
    testing::params(&UnsplashLite, &all)
}

fn run(fixture: &Fixture, overrides: &[(&str, Value)]) -> (Harness, Result<(), StageError>) {
    let mut harness = Harness::new();
    let result = harness.run(&UnsplashLite, &params(fixture, overrides));
    (harness, result)
}

fn run_ok(fixture: &Fixture, overrides: &[(&str, Value)]) -> Harness {
    let (harness, result) = run(fixture, overrides);
    if let Err(e) = result {
        panic!("the stage failed: {e}\nlog:\n{}", harness.log_text());
    }
    harness
}

fn jsonl(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn photos(h: &Harness) -> Vec<Value> {
    jsonl(&h.out_dir().join("photos.jsonl"))
}

fn failures(h: &Harness) -> Vec<Value> {
    jsonl(&h.out_dir().join("failures.jsonl"))
}

fn ids(records: &[Value]) -> Vec<String> {
    records.iter().map(|r| r["id"].as_str().unwrap().to_string()).collect()
}

fn image_files(h: &Harness) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(h.out_dir().join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn explicit(ids: &[&str]) -> (&'static str, Value) {
    ("ids", json!(ids))
}

#[test]
fn downloads_the_first_photos_with_their_records() {
    let fixture = Fixture::start();
    let h = run_ok(&fixture, &[("limit", json!(3))]);
    let records = photos(&h);
    assert_eq!(ids(&records), ["ok-01", "ok-02", "ok-03"]);
    assert_eq!(image_files(&h), ["ok-01.jpg", "ok-02.jpg", "ok-03.jpg"]);
    assert!(failures(&h).is_empty());

    let first = &records[0];
    assert_eq!(first["file_name"], "images/ok-01.jpg");
    assert_eq!(first["url"], "https://unsplash.com/photos/ok-01");
    assert_eq!(first["image_url"], fixture.server.url("/img/ok-01?w=48&q=80&fm=jpg"));
    assert_eq!(first["attribution"], json!({"username": "user_ok-01", "name": "Ansel Adams"}));
    assert_eq!(first["ai_description"], "a mountain lake photographed for ok-01");
    assert_eq!(first["description"], OK_01_DESCRIPTION);
    assert_eq!(first["split"], "train");
    assert_eq!(
        (first["photo_width"].clone(), first["photo_height"].clone()),
        (json!(6000), json!(4000))
    );
    let columns = first["columns"].as_object().unwrap();
    assert_eq!(columns.len(), 31);
    assert_eq!(columns["exif_iso"], "100");
    assert_eq!(columns["exif_camera_make"], Value::Null, "empty fields are null");

    for record in &records {
        let path = h.out_dir().join(record["file_name"].as_str().unwrap());
        let bytes = fs::read(&path).unwrap();
        assert_eq!(image::guess_format(&bytes).unwrap(), image::ImageFormat::Jpeg);
        let image = image::load_from_memory(&bytes).unwrap();
        assert_eq!((image.width(), image.height()), (48, 32), "the server honoured w=48");
        assert_eq!((record["width"].clone(), record["height"].clone()), (json!(48), json!(32)));
    }
}

#[test]
fn shards_of_both_namings_and_any_column_order_are_read() {
    let fixture = Fixture::start();
    let h = run_ok(&fixture, &[explicit(&["ok-09", "ok-07", "ok-02"])]);
    let records = photos(&h);
    assert_eq!(ids(&records), ["ok-09", "ok-07", "ok-02"], "selection order is kept");
    assert_eq!(records[1]["description"], OK_07_DESCRIPTION, "CSV quoting is undone");
    assert_eq!(records[1]["columns"]["blur_hash"], "LEHV6nWB2yk8pyo0adR*.7kCMdnj");
    assert_eq!(records[0]["columns"]["blur_hash"], Value::Null, "csv002 lacks the column");
    assert_eq!(records[0]["ai_description"], "a mountain lake photographed for ok-09");
}

#[test]
fn missing_photos_are_skipped_listed_and_not_retried() {
    let fixture = Fixture::start();
    let h = run_ok(
        &fixture,
        &[explicit(&["ok-01", "gone-404", "gone-410"]), ("max_failure_fraction", json!(1.0))],
    );
    assert_eq!(ids(&photos(&h)), ["ok-01"]);
    assert_eq!(image_files(&h), ["ok-01.jpg"]);
    let failed = failures(&h);
    assert_eq!(ids(&failed), ["gone-404", "gone-410"]);
    assert_eq!(failed[0]["kind"], "not_found");
    assert_eq!(failed[0]["reason"], "not found (HTTP 404)");
    assert_eq!(failed[1]["reason"], "not found (HTTP 410)");
    assert_eq!(failed[0]["url"], fixture.server.url("/img/gone-404?w=48&q=80&fm=jpg"));
    assert_eq!(fixture.image_hits("gone-404"), 1);
    assert!(h.log_text().contains("skipped gone-404: not found (HTTP 404)"), "{}", h.log_text());
}

#[test]
fn server_errors_are_retried_until_the_photo_arrives() {
    let fixture = Fixture::start();
    let h = run_ok(&fixture, &[explicit(&["flaky-500"])]);
    assert_eq!(ids(&photos(&h)), ["flaky-500"]);
    assert_eq!(fixture.image_hits("flaky-500"), 2, "one 500, then the image");
}

#[test]
fn too_many_requests_waits_for_retry_after() {
    let fixture = Fixture::start();
    let start = Instant::now();
    let h = run_ok(&fixture, &[explicit(&["limited-429"])]);
    let elapsed = start.elapsed();
    assert_eq!(ids(&photos(&h)), ["limited-429"]);
    assert_eq!(fixture.image_hits("limited-429"), 2);
    // `retry_base_ms` is 5: only the server's `Retry-After: 1` explains a one-second wait.
    assert!(elapsed >= Duration::from_secs(1), "retried after {elapsed:?}");
}

#[test]
fn a_truncated_jpeg_is_skipped_and_listed() {
    let fixture = Fixture::start();
    let h = run_ok(
        &fixture,
        &[explicit(&["ok-01", "truncated"]), ("max_failure_fraction", json!(0.5))],
    );
    assert_eq!(ids(&photos(&h)), ["ok-01"]);
    let failed = failures(&h);
    assert_eq!(ids(&failed), ["truncated"]);
    assert_eq!(failed[0]["kind"], "undecodable");
    assert!(failed[0]["reason"].as_str().unwrap().starts_with("undecodable JPEG"), "{failed:?}");
    assert_eq!(fixture.image_hits("truncated"), 1, "a complete but corrupt reply is not retried");
    // Nothing unverified enters the download cache: a rerun asks the server again.
    let mut again = Harness::new();
    again.downloads = h.downloads;
    let params =
        params(&fixture, &[explicit(&["truncated"]), ("max_failure_fraction", json!(1.0))]);
    again.run(&UnsplashLite, &params).unwrap();
    assert_eq!(fixture.image_hits("truncated"), 2);
}

#[test]
fn slow_replies_time_out_and_are_retried_then_listed() {
    let fixture = Fixture::start();
    let h = run_ok(
        &fixture,
        &[
            explicit(&["slow-once", "slow-always"]),
            ("timeout_s", json!(0.5)),
            ("retries", json!(1)),
            ("max_failure_fraction", json!(0.5)),
        ],
    );
    assert_eq!(ids(&photos(&h)), ["slow-once"]);
    assert_eq!(fixture.image_hits("slow-once"), 2, "timed out once, then served");
    let failed = failures(&h);
    assert_eq!(ids(&failed), ["slow-always"]);
    assert_eq!(failed[0]["kind"], "gave_up");
    let reason = failed[0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("gave up after 2 attempts: ") && reason.contains("imeout"),
        "{reason}"
    );
    assert_eq!(fixture.image_hits("slow-always"), 2);
}

#[test]
fn a_non_jpeg_reply_is_reencoded_as_jpeg() {
    let fixture = Fixture::start();
    let h = run_ok(&fixture, &[explicit(&["png-reply"])]);
    let bytes = fs::read(h.out_dir().join("images/png-reply.jpg")).unwrap();
    assert_eq!(image::guess_format(&bytes).unwrap(), image::ImageFormat::Jpeg);
    assert_eq!(photos(&h)[0]["width"], 48);
    assert!(h.log_text().contains("png-reply: the server sent png; re-encoded as JPEG"));
}

#[test]
fn traversal_absolute_and_symlink_zip_entries_are_ignored() {
    let fixture = Fixture::start();
    // The symlink entry is named like a shard; read, it would fail the run (no header).
    let h = run_ok(&fixture, &[("limit", json!(1))]);
    let log = h.log_text();
    for name in
        ["../photos.tsv009", "/tmp/photos.tsv010", "lite/../../photos.tsv011", "photos.tsv012"]
    {
        assert!(log.contains(&format!("ignored zip entry `{name}`")), "{name}: {log}");
    }
    assert!(log.contains("`photos.tsv012`: symlink entry"), "{log}");
    for id in unsplash_fixture::HOSTILE_IDS {
        let (_, result) = run(&fixture, &[explicit(&[id])]);
        match result {
            Err(StageError::InvalidParam { param, message }) => {
                assert_eq!(param, "ids");
                assert!(message.contains("not in the release"), "{message}");
            }
            other => panic!("{id}: {other:?}"),
        }
    }
    // Nothing was extracted next to the download cache or the output.
    for dir in [h.downloads.path(), h.out_dir()] {
        let parent = dir.parent().unwrap();
        assert!(!parent.join("photos.tsv009").exists());
    }
    assert!(!Path::new("/tmp/photos.tsv010").exists());
}

#[test]
fn unsafe_ids_are_skipped_with_a_reason_and_never_requested() {
    let fixture = Fixture::start();
    let h = run_ok(
        &fixture,
        &[explicit(&["ok-01", "../evil", "has space"]), ("max_failure_fraction", json!(1.0))],
    );
    assert_eq!(ids(&photos(&h)), ["ok-01"]);
    assert_eq!(image_files(&h), ["ok-01.jpg"]);
    let failed = failures(&h);
    assert_eq!(ids(&failed), ["../evil", "has space"]);
    assert!(failed.iter().all(|f| f["kind"] == "unsafe_id"), "{failed:?}");
    assert_eq!(fixture.all_image_hits(), 1, "only ok-01 was requested");
}

#[test]
fn one_more_in_limit_fetches_exactly_one_new_image() {
    let fixture = Fixture::start();
    let first = run_ok(&fixture, &[("limit", json!(3))]);
    assert_eq!((fixture.all_image_hits(), fixture.server.hits("/lite.zip")), (3, 1));

    // The engine gives each run a fresh output but the kind's shared download cache.
    let mut second = Harness::new();
    second.downloads = first.downloads;
    second.run(&UnsplashLite, &params(&fixture, &[("limit", json!(4))])).unwrap();
    assert_eq!(ids(&photos(&second)), ["ok-01", "ok-02", "ok-03", "ok-04"]);
    assert_eq!(fixture.all_image_hits(), 4, "only ok-04 was fetched");
    assert_eq!(fixture.image_hits("ok-04"), 1);
    assert_eq!(fixture.server.hits("/lite.zip"), 1, "the release zip came from the cache");
    assert!(second.log_text().contains("saved 4 photos (3 from the download cache, 1 fetched)"));

    // An interrupted run's rerun (same parameters) fetches nothing at all.
    let mut third = Harness::new();
    std::mem::swap(&mut third.downloads, &mut second.downloads);
    third.run(&UnsplashLite, &params(&fixture, &[("limit", json!(4))])).unwrap();
    assert_eq!(fixture.all_image_hits(), 4);
    assert_eq!(photos(&third), photos(&second));
}

#[test]
fn cache_entries_are_named_by_url_and_a_corrupt_one_is_fetched_again() {
    let fixture = Fixture::start();
    let first = run_ok(&fixture, &[explicit(&["ok-05"])]);
    let url = fixture.server.url("/img/ok-05?w=48&q=80&fm=jpg");
    let entry = first.downloads.path().join(blake3::hash(url.as_bytes()).to_hex().as_str());
    let original = fs::read(&entry).expect("the image is cached under blake3(url)");
    assert_eq!(original, fs::read(first.out_dir().join("images/ok-05.jpg")).unwrap());
    let zip_entry = blake3::hash(fixture.zip_url().as_bytes()).to_hex();
    assert!(first.downloads.path().join(zip_entry.as_str()).is_file(), "so is the zip");

    fs::write(&entry, &original[..original.len() / 2]).unwrap();
    let mut second = Harness::new();
    second.downloads = first.downloads;
    second.run(&UnsplashLite, &params(&fixture, &[explicit(&["ok-05"])])).unwrap();
    assert_eq!(fixture.image_hits("ok-05"), 2, "the damaged entry was not trusted");
    assert_eq!(fs::read(&entry).unwrap(), original);
}

#[test]
fn random_sampling_is_deterministic_and_prefix_stable() {
    let fixture = Fixture::start();
    let sample = |limit: i64, seed: i64| {
        let overrides = [
            ("sample", json!("random")),
            ("seed", json!(seed)),
            ("limit", json!(limit)),
            ("max_failure_fraction", json!(1.0)),
            ("timeout_s", json!(0.2)),
            ("retries", json!(0)),
        ];
        let h = run_ok(&fixture, &overrides);
        let mut selected = ids(&photos(&h));
        selected.extend(ids(&failures(&h)));
        selected.sort();
        selected
    };
    let four = sample(4, 11);
    let five = sample(5, 11);
    assert_eq!(five.len(), 5);
    assert!(four.iter().all(|id| five.contains(id)), "{four:?} ⊄ {five:?}");
    assert_eq!(sample(4, 11), four);
    assert_ne!(sample(4, 12), four);
}

#[test]
fn too_many_failures_fail_the_stage_and_say_why() {
    let fixture = Fixture::start();
    let (h, result) = run(&fixture, &[explicit(&["ok-01", "gone-404", "truncated"])]);
    let message = match result {
        Err(StageError::Failed(message)) => message,
        other => panic!("{other:?}"),
    };
    assert!(
        message.starts_with(
            "2 of 3 selected photos failed (67% > max_failure_fraction 20%): \
             1 not_found, 1 undecodable."
        ),
        "{message}"
    );
    assert!(message.contains("gone-404: not found (HTTP 404)"), "{message}");
    assert!(message.contains("raise `max_failure_fraction`"), "{message}");
    assert_eq!(failures(&h).len(), 2, "the failures are still written for inspection");
}

#[test]
fn held_out_photos_are_marked_test() {
    let fixture = Fixture::start();
    let h = run_ok(
        &fixture,
        &[("limit", json!(3)), ("test", json!(["ok-08"])), ("test_count", json!(1))],
    );
    let records = photos(&h);
    let splits: Vec<(&str, &str)> =
        records.iter().map(|r| (r["id"].as_str().unwrap(), r["split"].as_str().unwrap())).collect();
    assert_eq!(splits.len(), 5, "{splits:?}");
    assert_eq!(splits[3], ("ok-08", "test"));
    assert_eq!(splits[4].1, "test");
    assert!(splits[..3].iter().all(|(_, s)| *s == "train"));
}

#[test]
fn a_local_folder_of_shards_needs_no_release_download() {
    let fixture = Fixture::start();
    let folder = tempfile::tempdir().unwrap();
    fixture.write_folder(folder.path());
    let mut h = Harness::new().path("local", folder.path());
    let params = params(&fixture, &[explicit(&["ok-02", "ok-07", "ok-09"])]);
    h.run(&UnsplashLite, &params).unwrap();
    assert_eq!(ids(&photos(&h)), ["ok-02", "ok-07", "ok-09"]);
    assert_eq!(fixture.server.hits("/lite.zip"), 0);
}

#[test]
fn a_local_zip_is_read_like_a_downloaded_one() {
    let fixture = Fixture::start();
    let folder = tempfile::tempdir().unwrap();
    let zip = folder.path().join("lite.zip");
    fs::write(&zip, unsplash_fixture::release_zip(&fixture.server.url(""))).unwrap();
    let mut h = Harness::new().path("local", &zip);
    h.run(&UnsplashLite, &params(&fixture, &[("limit", json!(2))])).unwrap();
    assert_eq!(ids(&photos(&h)), ["ok-01", "ok-02"]);
    assert_eq!(fixture.server.hits("/lite.zip"), 0);
}

#[test]
fn the_output_is_accepted_by_imagefolder() {
    let fixture = Fixture::start();
    let data = run_ok(&fixture, &[("limit", json!(4)), ("test", json!(["ok-09"]))]);
    let mut folder = Harness::new()
        .input("images", data.out_dir().join("images"))
        .input("photos", data.out_dir().join("photos.jsonl"));
    folder.run(&ImageFolder, &testing::params(&ImageFolder, &[])).unwrap();
    let dataset = folder.out_dir().join("dataset");
    let train = jsonl(&dataset.join("train/metadata.jsonl"));
    let test = jsonl(&dataset.join("test/metadata.jsonl"));
    assert_eq!(train.len(), 4);
    assert_eq!(
        test,
        [json!({"file_name": "ok-09.jpg", "text": "a mountain lake photographed for ok-09"})]
    );
    assert!(dataset.join("train/ok-01.jpg").is_file());
}

#[test]
fn a_source_that_is_not_http_is_rejected() {
    let fixture = Fixture::start();
    let (_, result) = run(&fixture, &[("source", json!("file:///etc/passwd"))]);
    match result {
        Err(StageError::InvalidParam { param, message }) => {
            assert_eq!(param, "source");
            assert!(message.contains("not an http:// or https:// URL"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_source_that_is_not_a_zip_is_a_clear_error() {
    let fixture = Fixture::start();
    let (h, result) = run(&fixture, &[("source", json!(fixture.server.url("/not-a-zip")))]);
    let message = result.unwrap_err().to_string();
    assert!(message.contains("did not return a zip archive"), "{message}");
    let cached = fs::read_dir(h.downloads.path()).unwrap().count();
    assert_eq!(cached, 0, "a bad release is not cached");
}

#[test]
fn a_missing_release_is_a_clear_error() {
    let fixture = Fixture::start();
    let (_, result) = run(&fixture, &[("source", json!(fixture.server.url("/lite-9.9.9.zip")))]);
    let message = result.unwrap_err().to_string();
    assert!(message.contains("not found (HTTP 404)"), "{message}");
    assert!(message.contains("set `local` to the zip"), "{message}");
}

#[test]
fn a_cancelled_run_stops_before_fetching() {
    let fixture = Fixture::start();
    let mut h = Harness::new();
    h.cancel.cancel();
    let result = h.run(&UnsplashLite, &params(&fixture, &[]));
    assert!(matches!(result, Err(StageError::Cancelled)), "{result:?}");
    assert_eq!(fixture.server.requests().len(), 0);
}

#[test]
fn cancelling_during_a_retry_wait_stops_the_run_promptly() {
    let fixture = Fixture::start();
    let mut h = Harness::new();
    let cancel = h.cancel.clone();
    // `limited-429` answers `Retry-After: 1` first; cancel while the stage waits on it.
    let params = params(&fixture, &[explicit(&["limited-429"])]);
    let canceller = std::thread::spawn(move || {
        while fixture.image_hits("limited-429") == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        cancel.cancel();
        (fixture, Instant::now())
    });
    let result = h.run(&UnsplashLite, &params);
    let returned = Instant::now();
    let (fixture, cancelled) = canceller.join().unwrap();
    assert!(matches!(result, Err(StageError::Cancelled)), "{result:?}");
    let reaction = returned.duration_since(cancelled);
    assert!(reaction < Duration::from_millis(500), "returned {reaction:?} after the cancel");
    assert_eq!(fixture.image_hits("limited-429"), 1, "no retry after the cancel");
}

#[test]
fn the_fixture_shards_have_all_31_columns() {
    // Guards the fixture itself: a real-format release has every documented column.
    let fixture = Fixture::start();
    let shards = unsplash_fixture::shards(&fixture.server.url(""));
    let header: Vec<&str> = shards[0].1.lines().next().unwrap().split('\t').collect();
    assert_eq!(header, COLUMNS);
}

#[test]
fn out_of_range_params_are_rejected_before_any_request() {
    let fixture = Fixture::start();
    for (name, value) in [
        ("width", json!(8)),
        ("sample", json!("best")),
        ("format", json!("png")),
        ("timeout_s", json!(0)),
        ("max_failure_fraction", json!(1.5)),
    ] {
        match run(&fixture, &[(name, value)]).1 {
            Err(StageError::InvalidParam { param, .. }) => assert_eq!(param, name),
            other => panic!("{name}: {other:?}"),
        }
    }
    assert_eq!(fixture.server.requests().len(), 0);
}
