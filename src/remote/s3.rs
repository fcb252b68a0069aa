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
        install_tls_provider();
        use object_store::aws::AmazonS3ConfigKey as Conf;
        use object_store::ClientConfigKey as Client;
        // Bounded: a remote that is down must cost a run seconds, not minutes. Transfers get a
        // generous total timeout (checkpoints are gigabytes). Set before the environment is
        // read, so `AWS_*` settings (timeouts, proxies, credentials) still take precedence.
        let mut builder = AmazonS3Builder::new()
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
            .with_config(Conf::Client(Client::Timeout), "900s");
        // What `AmazonS3Builder::from_env` does, after the defaults above.
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
    pub async fn put_new(&self, key: &Key, bytes: Vec<u8>) -> Result<bool, S3Error> {
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.store.put_opts(key, PutPayload::from(bytes), opts).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(source) => Err(S3Error { op: "PUT", key: key.to_string(), source }),
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
