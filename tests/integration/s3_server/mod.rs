//! A real S3 server for tests: `s3s-fs` (a directory served as S3 over HTTP) on loopback,
//! started by each test, behind a thin layer that can answer 500s or stall uploads. The real
//! `sdpipe` binary talks to it with ordinary AWS credentials from the environment
//! ([`credentials`]), as it would talk to a bucket.
#![allow(dead_code)] // each test file uses a different part

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const BUCKET: &str = "team-cache";
pub const ACCESS_KEY: &str = "sdpipe-test-access";
pub const SECRET_KEY: &str = "sdpipe-test-secret-never-printed";

/// What the server does besides serving S3.
#[derive(Default)]
pub struct Faults {
    /// Answer every request with 500 Internal Server Error.
    pub fail_all: AtomicBool,
    /// PUTs beyond this many (counted from when it was set) hang until it is lifted.
    pub stall_after_puts: AtomicUsize,
    pub stall: AtomicBool,
    pub puts_seen: AtomicUsize,
    /// Requests currently hanging.
    pub stalled: AtomicUsize,
    /// Every request that could change the bucket (PUT, POST, DELETE).
    pub writes: AtomicUsize,
    /// Multipart uploads started (`POST ?uploads`).
    pub multipart_uploads: AtomicUsize,
}

pub struct S3Server {
    addr: SocketAddr,
    root: tempfile::TempDir,
    pub faults: Arc<Faults>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl S3Server {
    /// Serve a fresh directory holding one empty bucket on 127.0.0.1 (an OS-chosen port).
    pub fn start() -> S3Server {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join(BUCKET)).unwrap();
        let faults = Arc::new(Faults::default());
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let (dir, f, s) = (root.path().to_path_buf(), faults.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(serve(dir, f, addr_tx, s));
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(10)).expect("S3 server started");
        S3Server { addr, root, faults, stop, thread: Some(thread) }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn bucket_dir(&self) -> PathBuf {
        self.root.path().join(BUCKET)
    }

    /// Keys (relative paths) stored under `sub` of the bucket, e.g. `exp/sdpipe-v1/records`.
    pub fn keys(&self, sub: &str) -> Vec<String> {
        let dir = self.bucket_dir().join(sub);
        let mut out: Vec<String> = walkdir::WalkDir::new(&dir)
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .map(|e| e.path().strip_prefix(&dir).unwrap().to_string_lossy().into_owned())
            .collect();
        out.sort();
        out
    }

    pub fn writes(&self) -> usize {
        self.faults.writes.load(Ordering::SeqCst)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.faults.stall.store(false, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    root: PathBuf,
    faults: Arc<Faults>,
    addr_tx: std::sync::mpsc::Sender<SocketAddr>,
    stop: Arc<AtomicBool>,
) {
    let service = {
        let mut b = s3s::service::S3ServiceBuilder::new(s3s_fs::FileSystem::new(&root).unwrap());
        b.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        b.build()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    addr_tx.send(listener.local_addr().unwrap()).unwrap();
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let socket = match tokio::time::timeout(Duration::from_millis(50), listener.accept()).await
        {
            Ok(Ok((socket, _))) => socket,
            _ => continue,
        };
        let (service, faults) = (service.clone(), faults.clone());
        let handler =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (service, faults) = (service.clone(), faults.clone());
                async move {
                    let method = req.method().clone();
                    let writes = matches!(method.as_str(), "PUT" | "POST" | "DELETE");
                    if writes {
                        faults.writes.fetch_add(1, Ordering::SeqCst);
                    }
                    if method == hyper::Method::POST
                        && req
                            .uri()
                            .query()
                            .is_some_and(|q| q.split('&').any(|p| p.starts_with("uploads")))
                    {
                        faults.multipart_uploads.fetch_add(1, Ordering::SeqCst);
                    }
                    if faults.fail_all.load(Ordering::SeqCst) {
                        return Ok(error_response(500));
                    }
                    if method == hyper::Method::PUT && faults.stall.load(Ordering::SeqCst) {
                        let n = faults.puts_seen.fetch_add(1, Ordering::SeqCst);
                        if n >= faults.stall_after_puts.load(Ordering::SeqCst) {
                            faults.stalled.fetch_add(1, Ordering::SeqCst);
                            while faults.stall.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            faults.stalled.fetch_sub(1, Ordering::SeqCst);
                            // The client that sent it is gone by now: it never reaches the bucket.
                            return Ok(error_response(503));
                        }
                    }
                    service.call(req.map(s3s::Body::from)).await
                }
            });
        tokio::spawn(async move {
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(socket), handler).await;
        });
    }
}

fn error_response(status: u16) -> hyper::Response<s3s::Body> {
    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>InternalError</Code>\
                <Message>injected by the test</Message></Error>";
    hyper::Response::builder().status(status).body(s3s::Body::from(body.to_string())).unwrap()
}

/// Give `c` the test server's credentials and no AWS or remote setting of the machine running
/// the tests.
pub fn credentials(c: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("AWS_") || k.starts_with("SDPIPE_REMOTE") {
            c.env_remove(k);
        }
    }
    c.env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_REGION", "us-east-1")
}
