//! Downloading the selected photos with a bounded pool of worker threads.
//!
//! Each worker takes the next job, looks for its URL in the download cache, fetches it
//! otherwise, verifies it by decoding and saves `images/<id>.jpg`. Only verified bytes enter
//! the cache, so a resumed run trusts what it finds there (and still re-verifies it, cheaply,
//! dropping an entry that no longer decodes). A photo that cannot be had is an [`Outcome::Failed`]
//! with a reason; only local I/O errors and cancellation stop the whole run.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::http::{Cache, Client, FetchError};
use super::verify;
use sdpipe_stages::api::{CancelToken, Progress, StageError};

/// The largest image body accepted; a resized Unsplash JPEG is well under 1 MB.
const MAX_IMAGE_BYTES: u64 = 64 << 20;

/// One photo to fetch into `<images>/<id>.jpg`; the id was checked to be a safe file name.
pub struct Job {
    pub id: String,
    pub url: String,
}

#[derive(Debug)]
pub enum Outcome {
    Saved { width: u32, height: u32, from_cache: bool, reencoded_from: Option<&'static str> },
    Failed { kind: &'static str, reason: String },
}

pub struct Downloader<'a> {
    pub client: &'a Client,
    pub cache: &'a Cache,
    pub images_dir: &'a Path,
    pub quality: u8,
    pub concurrency: usize,
    pub progress: &'a dyn Progress,
    pub cancel: &'a CancelToken,
}

impl Downloader<'_> {
    /// One outcome per job, in job order.
    pub fn run(&self, jobs: &[Job]) -> Result<Vec<Outcome>, StageError> {
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let fatal: Mutex<Option<StageError>> = Mutex::new(None);
        let outcomes: Vec<Mutex<Option<Outcome>>> = jobs.iter().map(|_| Mutex::new(None)).collect();
        let workers = self.concurrency.clamp(1, jobs.len().max(1));
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    if stop.load(Ordering::SeqCst) || self.cancel.is_cancelled() {
                        return;
                    }
                    let index = next.fetch_add(1, Ordering::SeqCst);
                    let Some(job) = jobs.get(index) else { return };
                    match self.one(job) {
                        Ok(outcome) => {
                            self.progress.advance(1, &job.id);
                            *outcomes[index].lock().expect("no worker panics") = Some(outcome);
                        }
                        Err(e) => {
                            stop.store(true, Ordering::SeqCst);
                            fatal.lock().expect("no worker panics").get_or_insert(e);
                            return;
                        }
                    }
                });
            }
        });
        if let Some(e) = fatal.into_inner().expect("no worker panics") {
            return Err(e);
        }
        self.cancel.check()?;
        Ok(outcomes
            .into_iter()
            .map(|slot| slot.into_inner().expect("no worker panics").expect("every job ran"))
            .collect())
    }

    fn one(&self, job: &Job) -> Result<Outcome, StageError> {
        let cached = self.cache.get(&job.url).and_then(|bytes| {
            let verified = verify::to_jpeg(bytes, self.quality).ok();
            if verified.is_none() {
                self.cache.remove(&job.url);
            }
            verified
        });
        let from_cache = cached.is_some();
        let verified = match cached {
            Some(verified) => verified,
            None => {
                let bytes = match self.client.get_bytes(&job.url, MAX_IMAGE_BYTES) {
                    Ok(bytes) => bytes,
                    Err(FetchError::Cancelled) => return Err(StageError::Cancelled),
                    Err(FetchError::Local(e)) => {
                        return Err(StageError::io(format!("downloading {}", job.url), e))
                    }
                    Err(e) => return Ok(Outcome::Failed { kind: e.kind(), reason: e.to_string() }),
                };
                // Cache what the server sent (not the re-encoding): the entry is the response.
                match verify::to_jpeg(bytes.clone(), self.quality) {
                    Ok(verified) => {
                        self.cache
                            .put(&job.url, &bytes)
                            .map_err(|e| StageError::io(format!("caching {}", job.url), e))?;
                        verified
                    }
                    Err(reason) => return Ok(Outcome::Failed { kind: "undecodable", reason }),
                }
            }
        };
        let path = self.images_dir.join(format!("{}.jpg", job.id));
        fs::write(&path, &verified.jpeg)
            .map_err(|e| StageError::io(format!("writing {}", path.display()), e))?;
        Ok(Outcome::Saved {
            width: verified.width,
            height: verified.height,
            from_cache,
            reencoded_from: verified.reencoded_from,
        })
    }
}
