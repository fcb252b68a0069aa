//! A blocking facade over `object_store`'s async S3 client: the engine is synchronous, so the
//! bucket owns a private current-thread tokio runtime and every call blocks on it.
//!
//! Credentials come from the `AWS_*` environment variables, else the AWS shared files' profile
//! ([`profile`]), else `object_store`'s own resolution (web identity, container or instance
//! metadata); they are never stored or printed.

use std::fs;
use std::future::Future;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, Once};
use std::time::Duration;

use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{
    BackoffConfig, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
    WriteMultipart,
};

use super::config::RemoteConfig;
use super::profile;
use crate::hash::Digest;

/// Objects larger than this are uploaded in parts (S3 limits a single PUT to 5 GiB, and a
/// whole checkpoint in one request body would also be held in memory).
const MULTIPART_ABOVE: u64 = 64 << 20;
const PART_SIZE: usize = 16 << 20;

/// How often [`Bucket::put_new`] sends a request whose connection failed under it.
const PUT_ATTEMPTS: u32 = 3;

/// Whether `e` is a failure of the connection (refused, dropped, reset, timed out) rather
/// than an answer from the server.
fn is_transport_error(e: &object_store::Error) -> bool {
    use object_store::client::{HttpError, HttpErrorKind};
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(error) = source {
        if let Some(http) = error.downcast_ref::<HttpError>() {
            return !matches!(http.kind(), HttpErrorKind::Decode);
        }
        source = error.source();
    }
    false
}

/// An S3 failure, with the key it concerned (never a credential).
#[derive(Debug, thiserror::Error)]
#[error("{op} {key}: {source}")]
pub struct S3Error {
    pub op: &'static str,
    pub key: String,
    #[source]
    pub source: object_store::Error,
}

impl S3Error {
    /// Whether the server was reached and answered about the object (as opposed to a transport
    /// failure or a server error, after which the remote is not worth asking again this run).
    pub fn is_answer(&self) -> bool {
        matches!(
            self.source,
            object_store::Error::NotFound { .. }
                | object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. }
        )
    }
}

pub struct Bucket {
    store: Arc<AmazonS3>,
    runtime: tokio::runtime::Runtime,
}

/// reqwest is built without a bundled TLS provider (ring is already in the tree; aws-lc would
/// add a C build), so the process-wide rustls provider is installed once before any client.
fn install_tls_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err means some other part of the process installed one first: that one is used.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The client's settings before the environment's: bounded, so that a remote that is down costs
/// a run seconds, not minutes, with a generous total timeout for transfers (checkpoints are
/// gigabytes). The environment's `AWS_*` settings (timeouts, proxies, credentials) override them.
fn defaults() -> AmazonS3Builder {
    use object_store::aws::AmazonS3ConfigKey as Conf;
    use object_store::ClientConfigKey as Client;
    AmazonS3Builder::new()
        .with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: 2,
            retry_timeout: Duration::from_secs(20),
        })
        .with_config(Conf::Client(Client::ConnectTimeout), "5s")
        .with_config(Conf::Client(Client::Timeout), "900s")
}

/// Keys and region from the AWS shared files' profile where the environment gives none (the
/// AWS CLI's order: environment first, then the profile, then the cloud metadata services that
/// `object_store` asks by itself).
fn with_profile(
    mut builder: AmazonS3Builder,
    config: &RemoteConfig,
) -> Result<AmazonS3Builder, String> {
    let set = |var: &str| std::env::var_os(var).is_some_and(|v| !v.is_empty());
    let need_keys = !set("AWS_ACCESS_KEY_ID");
    let need_region = config.region.is_none() && !set("AWS_REGION") && !set("AWS_DEFAULT_REGION");
    if !need_keys && !need_region {
        return Ok(builder);
    }
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    let Some(found) = profile::load(|k| std::env::var(k).ok(), home.as_deref())? else {
        return Ok(builder);
    };
    if let (true, Some(keys)) = (need_keys, found.keys) {
        builder = builder
            .with_access_key_id(keys.access_key_id)
            .with_secret_access_key(keys.secret_access_key);
        if let Some(token) = keys.session_token {
            builder = builder.with_token(token);
        }
    }
    if let (true, Some(region)) = (need_region, found.region) {
        builder = builder.with_region(region);
    }
    Ok(builder)
}

impl Bucket {
    pub fn open(config: &RemoteConfig) -> Result<Bucket, String> {
        use object_store::aws::AmazonS3ConfigKey as Conf;
        let mut builder = defaults();
        // What `AmazonS3Builder::from_env` does, after the defaults.
        for (name, value) in std::env::vars_os() {
            let (Some(name), Some(value)) = (name.to_str(), value.to_str()) else { continue };
            if name.starts_with("AWS_") {
                if let Ok(key) = name.to_ascii_lowercase().parse::<Conf>() {
                    builder = builder.with_config(key, value);
                }
            }
        }
        builder = with_profile(builder, config)?;
        builder = builder.with_bucket_name(&config.bucket);
        if config.allow_http {
            builder = builder.with_allow_http(true);
        }
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = &config.region {
            builder = builder.with_region(region);
        }
        Bucket::build(builder)
    }

    fn build(builder: AmazonS3Builder) -> Result<Bucket, String> {
        install_tls_provider();
        let store = builder.build().map_err(|e| format!("cannot configure S3 client: {e}"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the remote cache's I/O runtime: {e}"))?;
        Ok(Bucket { store: Arc::new(store), runtime })
    }

    /// Run async work on the bucket's runtime. Several threads may block on it at once (the
    /// scheduler's stages): one drives the I/O while the others wait their turn.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// Whether `key` exists.
    pub async fn exists(&self, key: &Key) -> Result<bool, S3Error> {
        match self.store.head(key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(source) => Err(S3Error { op: "HEAD", key: key.to_string(), source }),
        }
    }

    /// A small object's bytes, or `None` when it does not exist.
    pub async fn get_bytes(&self, key: &Key) -> Result<Option<Vec<u8>>, S3Error> {
        let result = async { self.store.get(key).await?.bytes().await }.await;
        match result {
            Ok(bytes) => Ok(Some(bytes.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(source) => Err(S3Error { op: "GET", key: key.to_string(), source }),
        }
    }

    /// Stream an object into `dest`, returning the blake3 digest of what was written (`None`
    /// when the object does not exist).
    pub async fn get_to_file(&self, key: &Key, dest: &Path) -> Result<Option<Digest>, GetError> {
        let s3 = |source| GetError::S3(S3Error { op: "GET", key: key.to_string(), source });
        let got = match self.store.get(key).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(s3(e)),
        };
        let mut file = io::BufWriter::new(fs::File::create(dest).map_err(GetError::Local)?);
        let mut hasher = blake3::Hasher::new();
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(s3)?;
            hasher.update(&chunk);
            file.write_all(&chunk).map_err(GetError::Local)?;
        }
        file.into_inner().map_err(|e| GetError::Local(e.into_error()))?;
        Ok(Some(Digest(*hasher.finalize().as_bytes())))
    }

    /// Create `key` with `bytes` unless it exists. `Ok(false)`: it already existed (another
    /// writer's, left as it is).
    ///
    /// A conditional create is not idempotent to `object_store`, which therefore does not retry
    /// it when the connection fails under it. It does fail that way when another writer has
    /// just created the same object: the server answers "precondition failed" before reading
    /// the body and closes the connection, and closing with the body unread resets it, so the
    /// client may see the reset instead of the answer (seen with parallel sweep points pushing
    /// the same model files). So after a connection failure the object is looked up (HEAD, which
    /// carries no body) and the PUT sent again only when it is still missing; every key sdpipe
    /// creates names its content or a record of it, so an object found there is the same.
    pub async fn put_new(&self, key: &Key, bytes: Vec<u8>) -> Result<bool, S3Error> {
        let payload = PutPayload::from(bytes);
        let mut attempt = 1;
        loop {
            let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
            match self.store.put_opts(key, payload.clone(), opts).await {
                Ok(_) => return Ok(true),
                Err(object_store::Error::AlreadyExists { .. }) => return Ok(false),
                Err(source) if attempt < PUT_ATTEMPTS && is_transport_error(&source) => {
                    tracing::debug!("PUT {key}: {source}; looking it up (attempt {attempt})");
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                    if self.exists(key).await? {
                        return Ok(false);
                    }
                    attempt += 1;
                }
                Err(source) => return Err(S3Error { op: "PUT", key: key.to_string(), source }),
            }
        }
    }

    /// Upload a local file as `key` unless the key exists. Only for content-addressed keys:
    /// large files go up in parts, whose completion cannot be made conditional, so a racing
    /// writer may replace the object — with the same bytes, since the key names the content.
    pub async fn put_file(&self, key: &Key, path: &Path) -> Result<bool, PutFileError> {
        let size = fs::metadata(path).map_err(PutFileError::Local)?.len();
        if size <= MULTIPART_ABOVE {
            let bytes = fs::read(path).map_err(PutFileError::Local)?;
            return self.put_new(key, bytes).await.map_err(PutFileError::S3);
        }
        let err = |source| {
            PutFileError::S3(S3Error { op: "PUT (multipart)", key: key.to_string(), source })
        };
        let upload = self.store.put_multipart(key).await.map_err(err)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut file = fs::File::open(path).map_err(PutFileError::Local)?;
        let mut buf = vec![0u8; PART_SIZE];
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(PutFileError::Local(e));
                }
            };
            if let Err(e) = writer.wait_for_capacity(4).await {
                let _ = writer.abort().await;
                return Err(err(e));
            }
            writer.put(buf[..n].to_vec().into());
        }
        writer.finish().await.map_err(err)?;
        Ok(true)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error(transparent)]
    S3(S3Error),
    #[error("writing the downloaded object: {0}")]
    Local(io::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum PutFileError {
    #[error(transparent)]
    S3(S3Error),
    #[error("reading the local object: {0}")]
    Local(io::Error),
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    use super::*;

    /// A loopback HTTP server that resets its first connection while the request is still
    /// arriving, then answers HEAD with 200 when `exists` (else 404) and PUT with 200. Yields
    /// the requests it answered, as `METHOD path`.
    fn resetting_server(exists: bool) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            let (first, _) = listener.accept().unwrap();
            // Closing a socket with unread bytes makes the kernel send a reset.
            (&first).read_exact(&mut [0u8; 8]).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            drop(first);
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(&stream);
            let mut answered = Vec::new();
            loop {
                let mut request = String::new();
                if reader.read_line(&mut request).unwrap() == 0 {
                    return answered;
                }
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                reader.read_exact(&mut vec![0; length]).unwrap();
                let request: Vec<&str> = request.split(' ').take(2).collect();
                let status = match request[0] {
                    "HEAD" if !exists => "404 Not Found",
                    _ => "200 OK",
                };
                (&stream)
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\nETag: \"e\"\r\nContent-Length: 0\r\n\
                             Last-Modified: Mon, 07 Dec 2026 09:00:00 GMT\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .unwrap();
                answered.push(request.join(" "));
                if answered.len() == 2 || (exists && answered.len() == 1) {
                    return answered;
                }
            }
        });
        (address, server)
    }

    fn bucket(endpoint: String) -> Bucket {
        let builder = defaults()
            .with_bucket_name("bucket")
            .with_endpoint(endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("key")
            .with_secret_access_key("secret");
        Bucket::build(builder).unwrap()
    }

    #[test]
    fn a_conditional_put_whose_connection_is_reset_is_sent_again_when_the_object_is_missing() {
        let (endpoint, server) = resetting_server(false);
        let bucket = bucket(endpoint);
        let created = bucket.block_on(bucket.put_new(&Key::from("objects/ab"), vec![7; 4096]));
        assert!(created.unwrap(), "the second attempt creates the object");
        assert_eq!(server.join().unwrap(), ["HEAD /bucket/objects/ab", "PUT /bucket/objects/ab"]);
    }

    #[test]
    fn a_conditional_put_whose_connection_is_reset_finds_the_object_another_writer_made() {
        let (endpoint, server) = resetting_server(true);
        let bucket = bucket(endpoint);
        let created = bucket.block_on(bucket.put_new(&Key::from("objects/ab"), vec![7; 4096]));
        assert!(!created.unwrap(), "it was there already");
        assert_eq!(server.join().unwrap(), ["HEAD /bucket/objects/ab"]);
    }
}
