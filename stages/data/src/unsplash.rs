//! The `unsplash-lite` kind: a captioned photo dataset downloaded from the Unsplash Lite release.
//!
//! It owns the whole download: getting the release (a zip by URL, cached, or a local zip or
//! folder of TSV shards), reading its `photos` table, choosing the photos, fetching them resized
//! with retries, verifying every image and writing the dataset layout the `synthetic` kind also
//! writes (`images/<id>.jpg`, `photos.jsonl`), plus `failures.jsonl` for what could not be had.
//!
//! - [`tsv`]: the 31 `photos` columns and the parsing of one shard;
//! - [`release`]: finding shards in a zip or folder without trusting entry names as paths;
//! - [`select`]: which photos, deterministic and prefix-stable, and which are held out;
//! - [`http`]: requests with timeouts, retries and backoff, and the URL-keyed cache;
//! - [`verify`]: strict decoding and the JPEG that is saved;
//! - [`fetch`]: the worker pool.

mod fetch;
mod http;
mod release;
mod select;
mod tsv;
mod verify;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use fetch::{Downloader, Job, Outcome};
use http::{Budget, Cache, Client, FetchError, Policy};
use release::Release;
use sdpipe_stages::api::{
    human_bytes, OutputKind, OutputSpec, ParamSpec, StageContext, StageError, StageKind,
};
use sdpipe_stages::params::{KindParams, ProjectPath};
use select::{Selection, Spec};
use tsv::Photo;

/// The official "latest" Lite release; it redirects to the current version's zip.
pub const LATEST_URL: &str = "https://unsplash.com/data/lite/latest";

const IMAGES: &str = "images";
const PHOTOS: &str = "photos.jsonl";
const FAILURES: &str = "failures.jsonl";

/// Longest wait a `Retry-After` header can impose, and the cap on exponential backoff.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

pub struct UnsplashLite;

impl StageKind for UnsplashLite {
    fn name(&self) -> &'static str {
        "unsplash-lite"
    }

    fn version(&self) -> u32 {
        1
    }

    fn doc(&self) -> &'static str {
        "Downloads photos of the Unsplash Lite dataset (25,000 nature photos with AI captions): \
         reads every `photos` shard of the release zip (`source` URL, cached by URL) or of \
         `local` (a zip or a folder of TSV shards), selects `limit` photos (`first` in release \
         order or a seeded `random` sample; or exactly `ids`), holds out `test` ids plus \
         `test_count` seeded draws, and fetches each photo resized (`width`, `quality`) with \
         bounded concurrency, timeouts and retries. Every image is verified by decoding; \
         photos that are gone (404/410) or undecodable are skipped and listed in \
         `failures.jsonl`, and the stage fails only if more than `max_failure_fraction` of the \
         selection failed. Writes `images/<id>.jpg` and `photos.jsonl` (id, file_name, url, \
         image_url, attribution, width, height, ai_description, description, split, and all 31 \
         release columns), the layout `imagefolder` reads. Raising `limit` downloads only the \
         new photos. Licence: the Unsplash Lite dataset is for internal use and model training; \
         its photos must not be redistributed, so never commit or publish this stage's output."
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
                doc: "The photos, `<id>.jpg`, each verified by decoding.",
            },
            OutputSpec {
                name: "photos",
                path: PHOTOS,
                kind: OutputKind::File,
                doc: "One JSON object per saved photo, in selection order: id, file_name, url, \
                      image_url, attribution {username, name}, width, height, ai_description, \
                      description, split (train|test), columns (the release row).",
            },
            OutputSpec {
                name: "failures",
                path: FAILURES,
                kind: OutputKind::File,
                doc: "One JSON object per selected photo that was skipped: id, url, kind, reason.",
            },
        ]
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let settings = Settings::of(ctx)?;
        let policy = settings.policy()?;
        let release = load_release(ctx, &settings, &policy)?;
        for note in &release.notes {
            log(ctx, note)?;
        }
        let selection = select::select(&release.photos, &settings.spec).map_err(|e| {
            let param = match &e {
                select::SelectError::UnknownIds { param, .. } => *param,
                select::SelectError::TooFewForTest { .. } => "test_count",
            };
            StageError::InvalidParam { param: param.into(), message: e.to_string() }
        })?;
        log(
            ctx,
            &format!(
                "selected {} training and {} held-out photos of {}",
                selection.train.len(),
                selection.test.len(),
                release.photos.len()
            ),
        )?;

        let images_dir = ctx.output_path(IMAGES);
        fs::create_dir_all(&images_dir)
            .map_err(|e| StageError::io(format!("creating {}", images_dir.display()), e))?;
        let plan = plan(&release, &selection, &settings);
        let jobs: Vec<Job> = plan
            .iter()
            .filter(|p| p.problem.is_none())
            .map(|p| Job { id: p.photo.id().to_string(), url: p.url.clone() })
            .collect();
        ctx.progress.set_total(plan.len() as u64);
        ctx.progress.advance((plan.len() - jobs.len()) as u64, "skipped unusable rows");
        let client = Client::new(policy, Budget::Total, ctx.cancel.clone());
        let downloader = Downloader {
            client: &client,
            cache: &Cache::new(ctx.downloads),
            images_dir: &images_dir,
            quality: settings.quality,
            concurrency: settings.concurrency,
            progress: ctx.progress,
            cancel: ctx.cancel,
        };
        let mut outcomes = downloader.run(&jobs)?.into_iter();

        let mut photos = Vec::new();
        let mut failures = Vec::new();
        let mut from_cache = 0;
        for planned in &plan {
            let outcome = match &planned.problem {
                Some((kind, reason)) => Outcome::Failed { kind, reason: reason.clone() },
                None => outcomes.next().expect("one outcome per job"),
            };
            let id = planned.photo.id();
            match outcome {
                Outcome::Saved { width, height, from_cache: cached, reencoded_from } => {
                    from_cache += usize::from(cached);
                    if let Some(format) = reencoded_from {
                        log(ctx, &format!("{id}: the server sent {format}; re-encoded as JPEG"))?;
                    }
                    photos.push(photo_record(planned, width, height));
                }
                Outcome::Failed { kind, reason } => {
                    log(ctx, &format!("skipped {id}: {reason}"))?;
                    failures.push(Failure { id, url: &planned.url, kind, reason });
                }
            }
        }
        write_jsonl(&ctx.output_path(PHOTOS), &photos)?;
        write_jsonl(&ctx.output_path(FAILURES), &failures)?;
        log(
            ctx,
            &format!(
                "saved {} photos ({} from the download cache, {} fetched), {} failed",
                photos.len(),
                from_cache,
                photos.len() - from_cache,
                failures.len()
            ),
        )?;
        check_failures(&failures, plan.len(), settings.max_failure_fraction)
    }
}

/// One selected photo and the URL it is fetched from, or why it cannot be.
struct Planned<'a> {
    photo: &'a Photo,
    split: &'static str,
    url: String,
    problem: Option<(&'static str, String)>,
}

/// The selected photos in output order (training, then held out), each with its resize URL.
fn plan<'a>(release: &'a Release, selection: &Selection, settings: &Settings) -> Vec<Planned<'a>> {
    let train = selection.train.iter().map(|i| (*i, "train"));
    let test = selection.test.iter().map(|i| (*i, "test"));
    train
        .chain(test)
        .map(|(index, split)| {
            let photo = &release.photos[index];
            let base = photo.get("photo_image_url").unwrap_or_default();
            let url = resize_url(base, settings.width, settings.quality, &settings.format);
            let problem = if !select::is_safe_id(photo.id()) {
                Some(("unsafe_id", "the photo id is not 1-64 characters of [A-Za-z0-9_-]".into()))
            } else if !http::is_http_url(base) {
                Some(("bad_url", format!("photo_image_url `{base}` is not an http(s) URL")))
            } else {
                None
            };
            Planned { photo, split, url, problem }
        })
        .collect()
}

/// `photo_image_url` with Unsplash's (imgix) resize parameters appended.
fn resize_url(base: &str, width: u32, quality: u8, format: &str) -> String {
    let separator = if base.contains('?') { '&' } else { '?' };
    format!("{base}{separator}w={width}&q={quality}&fm={format}")
}

/// One line of `failures.jsonl`: a selected photo that was skipped, and why.
#[derive(Serialize)]
struct Failure<'a> {
    id: &'a str,
    url: &'a str,
    /// A stable label to group by (`not_found`, `undecodable`, `gave_up`, `unsafe_id`, ...).
    kind: &'static str,
    reason: String,
}

/// One line of `photos.jsonl`: the `synthetic` kind's fields in its order, then what only a
/// real photo has. A struct rather than a `json!` map, whose keys would be sorted.
#[derive(Serialize)]
struct PhotoRecord<'a> {
    id: &'a str,
    file_name: String,
    url: Option<&'a str>,
    image_url: &'a str,
    attribution: Attribution<'a>,
    width: u32,
    height: u32,
    ai_description: Option<&'a str>,
    description: Option<&'a str>,
    split: &'a str,
    photo_width: Option<u64>,
    photo_height: Option<u64>,
    columns: Columns<'a>,
}

#[derive(Serialize)]
struct Attribution<'a> {
    username: Option<&'a str>,
    name: Option<String>,
}

/// All columns of the release row, in the release's documented order.
struct Columns<'a>(&'a Photo);

impl Serialize for Columns<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(tsv::COLUMNS.len()))?;
        for (name, value) in self.0.columns() {
            map.serialize_entry(name, &value)?;
        }
        map.end()
    }
}

fn photo_record<'a>(planned: &'a Planned<'_>, width: u32, height: u32) -> PhotoRecord<'a> {
    let photo = planned.photo;
    let id = photo.id();
    PhotoRecord {
        id,
        file_name: format!("{IMAGES}/{id}.jpg"),
        url: photo.get("photo_url"),
        image_url: &planned.url,
        attribution: Attribution {
            username: photo.get("photographer_username"),
            name: photo.photographer_name(),
        },
        width,
        height,
        ai_description: photo.get("ai_description"),
        description: photo.get("photo_description"),
        split: planned.split,
        photo_width: photo.dimension("photo_width"),
        photo_height: photo.dimension("photo_height"),
        columns: Columns(photo),
    }
}

/// The release from `local` or from the (cached) `source` zip.
fn load_release(
    ctx: &mut StageContext<'_>,
    settings: &Settings,
    policy: &Policy,
) -> Result<Release, StageError> {
    let path = match &settings.local {
        Some(local) => {
            log(ctx, &format!("reading the release from {}", local.path().display()))?;
            local.path().to_path_buf()
        }
        None => fetch_release_zip(ctx, &settings.source, policy)?,
    };
    release::read(&path).map_err(StageError::caused)
}

/// The release zip in the download cache, fetched first if it is not there yet.
fn fetch_release_zip(
    ctx: &mut StageContext<'_>,
    url: &str,
    policy: &Policy,
) -> Result<std::path::PathBuf, StageError> {
    if !http::is_http_url(url) {
        return Err(StageError::InvalidParam {
            param: "source".into(),
            message: format!("`{url}` is not an http:// or https:// URL; use `local` for files"),
        });
    }
    let cache = Cache::new(ctx.downloads);
    let path = cache.path(url);
    if path.is_file() && zip_opens(&path) {
        log(ctx, &format!("using the cached release of {url} ({})", path.display()))?;
        return Ok(path);
    }
    log(ctx, &format!("downloading the release from {url}"))?;
    let client = Client::new(policy.clone(), Budget::PerRead, ctx.cancel.clone());
    let mut temp = cache.temp_file().map_err(|e| {
        StageError::io(format!("creating a file in {}", ctx.downloads.display()), e)
    })?;
    // The release is tens of megabytes: show it arriving, at most once per megabyte.
    let progress = ctx.progress;
    let shown = std::sync::atomic::AtomicU64::new(0);
    let report = |received: u64, length: Option<u64>| {
        let step = received / 1_000_000;
        if step > shown.load(std::sync::atomic::Ordering::Relaxed) {
            shown.store(step, std::sync::atomic::Ordering::Relaxed);
            let of = length.map(|l| format!(" of {}", human_bytes(l))).unwrap_or_default();
            progress.advance(0, &format!("release: {}{of}", human_bytes(received)));
        }
    };
    let bytes = client.get_to_file(url, temp.as_file_mut(), &report).map_err(|e| match e {
        FetchError::Cancelled => StageError::Cancelled,
        e => StageError::failed(format!(
            "downloading the Unsplash Lite release from {url}: {e}. Check the URL and your \
             connection, or download it yourself and set `local` to the zip"
        )),
    })?;
    if !zip_opens(temp.path()) {
        return Err(StageError::failed(format!(
            "{url} did not return a zip archive ({bytes} bytes); check `source`"
        )));
    }
    cache.commit(temp, url).map_err(|e| StageError::io(format!("caching {url}"), e))?;
    log(ctx, &format!("downloaded {bytes} bytes"))?;
    Ok(path)
}

fn zip_opens(path: &Path) -> bool {
    fs::File::open(path).ok().is_some_and(|f| zip::ZipArchive::new(f).is_ok())
}

/// Fail the stage when too many photos were skipped, saying how many and why.
fn check_failures(
    failures: &[Failure<'_>],
    selected: usize,
    max_fraction: f64,
) -> Result<(), StageError> {
    if selected == 0 || failures.len() as f64 <= max_fraction * selected as f64 {
        return Ok(());
    }
    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    for failure in failures {
        *by_kind.entry(failure.kind).or_default() += 1;
    }
    let kinds: Vec<String> = by_kind.iter().map(|(kind, n)| format!("{n} {kind}")).collect();
    let examples: Vec<String> =
        failures.iter().take(3).map(|f| format!("{}: {}", f.id, f.reason)).collect();
    Err(StageError::failed(format!(
        "{} of {selected} selected photos failed ({:.0}% > max_failure_fraction {:.0}%): {}. \
         For example {}. Check the connection or raise `max_failure_fraction`",
        failures.len(),
        100.0 * failures.len() as f64 / selected as f64,
        100.0 * max_fraction,
        kinds.join(", "),
        examples.join("; ")
    )))
}

fn write_jsonl<T: Serialize>(path: &Path, lines: &[T]) -> Result<(), StageError> {
    let error = |e| StageError::io(format!("writing {}", path.display()), e);
    let mut out = BufWriter::new(fs::File::create(path).map_err(error)?);
    for line in lines {
        serde_json::to_writer(&mut out, line).map_err(|e| error(e.into()))?;
        out.write_all(b"\n").map_err(error)?;
    }
    out.flush().map_err(error)
}

fn log(ctx: &mut StageContext<'_>, line: &str) -> Result<(), StageError> {
    writeln!(ctx.log, "unsplash-lite: {line}").map_err(|e| StageError::io("writing the log", e))
}

/// The parameters.
#[derive(KindParams)]
struct Settings {
    /// URL of the release zip (http or https). `latest` moves with new releases; pin a version
    /// such as https://unsplash.com/data/lite/1.2.1 for a fixed dataset (the zip is cached by
    /// URL).
    #[param(default = LATEST_URL)]
    source: String,
    /// A release zip or a folder of extracted TSV shards in the project; when set, `source` is
    /// not used.
    #[param(path, default = null)]
    local: Option<ProjectPath>,
    /// `limit`, `sample`, `seed`, `ids`, `test` and `test_count`.
    #[param(flatten)]
    spec: Spec,
    /// Width the server resizes each photo to (`w=`), keeping its aspect ratio.
    #[param(default = 512, min = 16, max = 8192)]
    width: u32,
    /// JPEG quality asked of the server (`q=`), and used to re-encode a non-JPEG reply.
    #[param(default = 80, min = 1, max = 100)]
    quality: u8,
    /// Image format asked of the server (`fm=`); files are saved as `.jpg`.
    #[param(default = "jpg", one_of = &["jpg"])]
    format: String,
    /// Downloads in flight at once (I/O-bound threads).
    #[param(default = 8, min = 1, max = 64)]
    concurrency: usize,
    /// Seconds one image request may take in all; for the release zip, seconds any single read
    /// may stall.
    #[param(default = 30, min = 0.001)]
    timeout_s: f64,
    /// Retries after a 5xx/429/408 reply, a timeout or a connection error.
    #[param(default = 4, min = 0, max = 20)]
    retries: u32,
    /// First backoff delay; it doubles per retry, with jitter. A `Retry-After` reply header is
    /// honoured instead (up to 120 s).
    #[param(default = 500, min = 0, max = 600_000)]
    retry_base_ms: u64,
    /// The stage fails if more than this fraction of the selected photos could not be
    /// downloaded and verified.
    #[param(default = 0.2, min = 0.0, max = 1.0)]
    max_failure_fraction: f64,
}

impl Settings {
    /// How requests are timed and retried. The timeout's upper bound is not in the declared
    /// type: it keeps `Duration::from_secs_f64` far from overflowing.
    fn policy(&self) -> Result<Policy, StageError> {
        let timeout_s = self.timeout_s;
        if timeout_s > 86_400.0 {
            return Err(StageError::InvalidParam {
                param: "timeout_s".into(),
                message: format!("{timeout_s} is not in (0, 86400]"),
            });
        }
        Ok(Policy {
            timeout: Duration::from_secs_f64(timeout_s),
            retries: self.retries,
            base_delay: Duration::from_millis(self.retry_base_ms),
            max_delay: MAX_BACKOFF,
            max_retry_after: MAX_RETRY_AFTER,
        })
    }
}

/// The TSV reader as the fuzzer (`fuzz/`) and its corpus replay test drive it: one shard's
/// bytes through the release parser, then every accessor of every row. Returns the number of
/// photos read, or the error a user would see. Not part of the API.
#[doc(hidden)]
pub fn fuzz_read_shard(bytes: &[u8]) -> Result<usize, String> {
    let shard = release::RawShard { name: "photos.tsv000".into(), bytes: bytes.to_vec() };
    let release = release::parse_shards(vec![shard]).map_err(|e| e.to_string())?;
    for photo in &release.photos {
        let _ = (photo.id(), photo.photographer_name());
        let _ = (photo.dimension("photo_width"), photo.dimension("photo_height"));
        let _ = photo.columns().filter(|(_, v)| v.is_some()).count();
    }
    Ok(release.photos.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_parameters_are_appended_to_the_query() {
        assert_eq!(
            resize_url("https://images.unsplash.com/photo-1", 512, 80, "jpg"),
            "https://images.unsplash.com/photo-1?w=512&q=80&fm=jpg"
        );
        assert_eq!(
            resize_url("https://images.unsplash.com/photo-1?ixid=abc", 256, 90, "jpg"),
            "https://images.unsplash.com/photo-1?ixid=abc&w=256&q=90&fm=jpg"
        );
    }

    #[test]
    fn failures_within_the_fraction_pass_and_beyond_it_fail_with_counts() {
        let failure = |id, kind| Failure { id, url: "u", kind, reason: "r".into() };
        let two = [failure("a", "not_found"), failure("b", "undecodable")];
        assert!(check_failures(&two, 10, 0.2).is_ok(), "2 of 10 is not more than 20%");
        let err = check_failures(&two, 5, 0.2).unwrap_err().to_string();
        assert!(
            err.starts_with("2 of 5 selected photos failed (40% > max_failure_fraction 20%): 1 not_found, 1 undecodable."),
            "{err}"
        );
        assert!(err.contains("a: r; b: r"), "{err}");
    }
}
