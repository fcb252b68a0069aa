//! Fetching over HTTP(S) with timeouts and retries, and the URL-keyed download cache.
//!
//! A request is retried when a later try may succeed: a 5xx, 408 or 429 status, a timeout, a
//! refused or dropped connection, or a body cut short. The wait before try k+1 is
//! `base · 2^k`, capped, times a random factor in [0.5, 1) so that parallel workers do not
//! retry in lockstep; a `Retry-After: <seconds>` header replaces it (capped too, so a server
//! cannot park the run for hours). A 404/410 or another 4xx is final. Waits poll the cancel
//! token, so Ctrl-C stops a run within a fraction of a second plus at most one in-flight
//! request's timeout.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sdpipe_stages::api::CancelToken;

/// How long a single try may take, and how often and how patiently to retry.
#[derive(Debug, Clone)]
pub struct Policy {
    pub timeout: Duration,
    /// Retries after the first try.
    pub retries: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub max_retry_after: Duration,
}

/// Which timeout applies to a whole try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// The whole request, body included, within `timeout` (small files: images).
    Total,
    /// Connecting, the response head and every read within `timeout`, but no bound on the
    /// total (large files: a release zip takes minutes on a slow line).
    PerRead,
}

/// Why a fetch did not produce a body. Callers sort failures by this.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("not found (HTTP {0})")]
    Gone(u16),
    #[error("HTTP {0}")]
    Status(u16),
    #[error("gave up after {attempts} attempts: {last}")]
    Exhausted { attempts: u32, last: String },
    #[error("request failed: {0}")]
    Request(String),
    #[error("response is larger than {0} bytes")]
    TooLarge(u64),
    #[error("unsupported URL `{0}`: only http:// and https:// are fetched")]
    Scheme(String),
    #[error("writing the download: {0}")]
    Local(io::Error),
    #[error("cancelled")]
    Cancelled,
}

impl FetchError {
    /// A short, stable label for grouping failures in summaries.
    pub fn kind(&self) -> &'static str {
        match self {
            FetchError::Gone(_) => "not_found",
            FetchError::Status(_) => "http_status",
            FetchError::Exhausted { .. } => "gave_up",
            FetchError::Request(_) => "request",
            FetchError::TooLarge(_) => "too_large",
            FetchError::Scheme(_) => "bad_url",
            FetchError::Local(_) => "local_io",
            FetchError::Cancelled => "cancelled",
        }
    }
}

/// Whether a URL may be fetched: http or https, nothing else (no file://, no ftp://).
pub fn is_http_url(url: &str) -> bool {
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    (lower.starts_with("http://") && url.len() > 7)
        || (lower.starts_with("https://") && url.len() > 8)
}

/// A blocking HTTP client; shared by reference across worker threads.
pub struct Client {
    agent: ureq::Agent,
    policy: Policy,
    cancel: CancelToken,
}

/// What went wrong inside one try.
enum TryError {
    /// Worth another try, after the server's `Retry-After` if it gave one.
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    Final(FetchError),
}

impl Client {
    pub fn new(policy: Policy, budget: Budget, cancel: CancelToken) -> Client {
        let builder = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .user_agent(concat!("sdpipe/", env!("CARGO_PKG_VERSION")));
        let builder = match budget {
            Budget::Total => builder.timeout_global(Some(policy.timeout)),
            Budget::PerRead => builder
                .timeout_connect(Some(policy.timeout))
                .timeout_recv_response(Some(policy.timeout))
                .timeout_per_read(Some(policy.timeout)),
        };
        Client { agent: builder.build().new_agent(), policy, cancel }
    }

    /// The body of `url`, at most `max_bytes` long.
    pub fn get_bytes(&self, url: &str, max_bytes: u64) -> Result<Vec<u8>, FetchError> {
        self.fetch(url, |body, _| {
            let mut bytes = Vec::new();
            self.copy_body(body, &mut bytes, max_bytes, &mut |_| {})?;
            Ok(bytes)
        })
    }

    /// Stream the body of `url` into `file` (rewound and truncated before every try), telling
    /// `progress` the bytes received so far and the length the server announced.
    pub fn get_to_file(
        &self,
        url: &str,
        file: &mut fs::File,
        progress: &dyn Fn(u64, Option<u64>),
    ) -> Result<u64, FetchError> {
        use std::io::Seek;
        self.fetch(url, |body, length| {
            file.set_len(0).and_then(|_| file.rewind()).map_err(fatal_local)?;
            let mut writer = io::BufWriter::new(&mut *file);
            let n = self.copy_body(body, &mut writer, u64::MAX, &mut |n| progress(n, length))?;
            writer.flush().map_err(fatal_local)?;
            Ok(n)
        })
    }

    /// Tries `url` until `read` accepts a 2xx body or a final error.
    fn fetch<T>(
        &self,
        url: &str,
        mut read: impl FnMut(&mut dyn Read, Option<u64>) -> Result<T, TryError>,
    ) -> Result<T, FetchError> {
        if !is_http_url(url) {
            return Err(FetchError::Scheme(url.to_string()));
        }
        let attempts = self.policy.retries + 1;
        let mut last = String::new();
        for attempt in 0..attempts {
            self.check_cancel()?;
            match self.try_once(url, &mut read) {
                Ok(value) => return Ok(value),
                Err(TryError::Final(e)) => return Err(e),
                Err(TryError::Retry { reason, after }) => {
                    last = reason;
                    if attempt + 1 < attempts {
                        self.sleep(after.unwrap_or_else(|| self.backoff(url, attempt)))?;
                    }
                }
            }
        }
        Err(FetchError::Exhausted { attempts, last })
    }

    fn try_once<T>(
        &self,
        url: &str,
        read: &mut impl FnMut(&mut dyn Read, Option<u64>) -> Result<T, TryError>,
    ) -> Result<T, TryError> {
        let mut response = match self.agent.get(url).call() {
            Ok(response) => response,
            Err(e) if is_transient(&e) => {
                return Err(TryError::Retry { reason: e.to_string(), after: None })
            }
            Err(e) => return Err(TryError::Final(FetchError::Request(e.to_string()))),
        };
        let status = response.status().as_u16();
        match status {
            200..=299 => {
                let length = response
                    .headers()
                    .get("content-length")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok());
                read(&mut response.body_mut().as_reader(), length)
            }
            404 | 410 => Err(TryError::Final(FetchError::Gone(status))),
            408 | 429 | 500..=599 => {
                let after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|s| Duration::from_secs(s).min(self.policy.max_retry_after));
                Err(TryError::Retry { reason: format!("HTTP {status}"), after })
            }
            _ => Err(TryError::Final(FetchError::Status(status))),
        }
    }

    /// Copy a body in chunks, checking for cancellation and the size limit between them and
    /// telling `received` the running total. A read error (a dropped connection, a stalled
    /// read) is worth another try.
    fn copy_body(
        &self,
        body: &mut dyn Read,
        out: &mut dyn Write,
        max_bytes: u64,
        received: &mut dyn FnMut(u64),
    ) -> Result<u64, TryError> {
        let mut buffer = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            if self.cancel.is_cancelled() {
                return Err(TryError::Final(FetchError::Cancelled));
            }
            let n = match body.read(&mut buffer) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let reason = format!("reading the body: {e}");
                    return Err(TryError::Retry { reason, after: None });
                }
            };
            total += n as u64;
            if total > max_bytes {
                return Err(TryError::Final(FetchError::TooLarge(max_bytes)));
            }
            out.write_all(&buffer[..n]).map_err(fatal_local)?;
            received(total);
        }
    }

    /// `base · 2^attempt`, capped, times a factor in [0.5, 1).
    fn backoff(&self, url: &str, attempt: u32) -> Duration {
        let exponential = self.policy.base_delay.saturating_mul(1u32 << attempt.min(20));
        exponential.min(self.policy.max_delay).mul_f64(0.5 + 0.5 * jitter(url, attempt))
    }

    fn sleep(&self, duration: Duration) -> Result<(), FetchError> {
        let until = Instant::now() + duration;
        loop {
            self.check_cancel()?;
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            std::thread::sleep((until - now).min(Duration::from_millis(50)));
        }
    }

    fn check_cancel(&self) -> Result<(), FetchError> {
        if self.cancel.is_cancelled() {
            Err(FetchError::Cancelled)
        } else {
            Ok(())
        }
    }
}

fn fatal_local(e: io::Error) -> TryError {
    TryError::Final(FetchError::Local(e))
}

fn is_transient(e: &ureq::Error) -> bool {
    matches!(
        e,
        ureq::Error::Timeout(_)
            | ureq::Error::Io(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Protocol(_)
    )
}

/// A uniform number in [0, 1), different per URL, try and moment: jitter needs spread, not
/// reproducibility.
fn jitter(url: &str, attempt: u32) -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut hasher = blake3::Hasher::new();
    hasher.update(url.as_bytes());
    hasher.update(&attempt.to_le_bytes());
    hasher.update(&nanos.to_le_bytes());
    hasher.update(format!("{:?}", std::thread::current().id()).as_bytes());
    let bytes: [u8; 8] = hasher.finalize().as_bytes()[..8].try_into().expect("8 bytes");
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// Complete downloads, one file per URL: `<dir>/<blake3(url) in hex>`. Entries are written
/// under a temporary name in the same directory and renamed into place, so a reader (another
/// stage, a resumed run) sees a whole file or none.
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    pub fn new(dir: &Path) -> Cache {
        Cache { dir: dir.to_path_buf() }
    }

    pub fn path(&self, url: &str) -> PathBuf {
        self.dir.join(blake3::hash(url.as_bytes()).to_hex().as_str())
    }

    pub fn get(&self, url: &str) -> Option<Vec<u8>> {
        fs::read(self.path(url)).ok()
    }

    /// Drop an entry found to be bad (it will be fetched again).
    pub fn remove(&self, url: &str) {
        let _ = fs::remove_file(self.path(url));
    }

    pub fn put(&self, url: &str, bytes: &[u8]) -> io::Result<()> {
        let mut temp = self.temp_file()?;
        temp.write_all(bytes)?;
        self.commit(temp, url)
    }

    /// A temporary file in the cache directory, for streaming a large download into.
    pub fn temp_file(&self) -> io::Result<tempfile::NamedTempFile> {
        fs::create_dir_all(&self.dir)?;
        tempfile::Builder::new().prefix(".partial-").tempfile_in(&self.dir)
    }

    /// Move a complete temporary file into place as the entry for `url`.
    pub fn commit(&self, temp: tempfile::NamedTempFile, url: &str) -> io::Result<()> {
        temp.as_file().sync_all()?;
        temp.persist(self.path(url)).map(|_| ()).map_err(|e| e.error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_and_https_urls_are_fetchable() {
        for ok in ["http://a", "https://images.unsplash.com/photo-1?w=1", "HTTPS://X"] {
            assert!(is_http_url(ok), "{ok}");
        }
        for bad in ["file:///etc/passwd", "ftp://x", "https://", "//x", "", "javascript:1"] {
            assert!(!is_http_url(bad), "{bad}");
        }
    }

    #[test]
    fn non_http_urls_are_refused_before_any_request() {
        let client = Client::new(policy(), Budget::Total, CancelToken::new());
        let err = client.get_bytes("file:///etc/passwd", 10).unwrap_err();
        assert!(matches!(err, FetchError::Scheme(_)), "{err}");
    }

    fn policy() -> Policy {
        Policy {
            timeout: Duration::from_secs(1),
            retries: 4,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(250),
            max_retry_after: Duration::from_secs(60),
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let client = Client::new(policy(), Budget::Total, CancelToken::new());
        for _ in 0..20 {
            let d0 = client.backoff("u", 0);
            assert!(d0 >= Duration::from_millis(50) && d0 < Duration::from_millis(100), "{d0:?}");
            let d1 = client.backoff("u", 1);
            assert!(d1 >= Duration::from_millis(100) && d1 < Duration::from_millis(200), "{d1:?}");
            let d9 = client.backoff("u", 9);
            assert!(d9 < Duration::from_millis(250), "{d9:?}");
        }
    }

    #[test]
    fn sleeping_stops_on_cancel() {
        let cancel = CancelToken::new();
        cancel.cancel();
        let client = Client::new(policy(), Budget::Total, cancel);
        let start = Instant::now();
        assert!(matches!(client.sleep(Duration::from_secs(10)), Err(FetchError::Cancelled)));
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn cache_entries_are_keyed_by_url_and_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        assert_eq!(cache.get("https://a/1"), None);
        cache.put("https://a/1", b"one").unwrap();
        assert_eq!(cache.get("https://a/1").as_deref(), Some(&b"one"[..]));
        assert_eq!(cache.get("https://a/2"), None);
        let name = cache.path("https://a/1").file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(name, blake3::hash(b"https://a/1").to_hex().as_str());
        let leftovers = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary files are left behind");
    }
}
