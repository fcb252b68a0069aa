//! A loopback stand-in for the Hugging Face hub, for tests: it serves local folders as model
//! repositories, speaking the subset of the hub's HTTP API that the `hf-hub` client uses,
//! and counts the requests it gets (so tests can assert that a cache hit made none).
//!
//! What it reproduces, from the real hub's behaviour as `hf-hub` 0.4 relies on it:
//! - `GET /api/models/<repo>/revision/<rev>`: JSON with the commit `sha` and the `siblings`
//!   file list;
//! - `GET /<repo>/resolve/<rev>/<file>`: the file, honouring `Range`, with `ETag`,
//!   `X-Repo-Commit` and `Content-Range`; weights (`*.safetensors`, `*.bin`, …) are LFS files,
//!   answered as on the hub with a `302` to a CDN URL plus `X-Linked-Etag` (the content hash
//!   that names the cache blob) and `X-Linked-Size`;
//! - `401` without the right `Authorization: Bearer` token when one is required, `404` with
//!   `X-Error-Code` for unknown repositories, revisions and files.
//!
//! The commit hash and etags are derived from the content, so they are stable across runs.
//!
//! [`install_in_cache`] lays a folder out in a Hugging Face cache as `huggingface_hub` does after
//! a download (`blobs/`, `snapshots/<commit>/` of relative links, `refs/main`), with the same
//! commit and etags this server would give, for tests of the offline path.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Extensions the real hub stores in LFS (and so serves through a CDN redirect).
const LFS_EXTENSIONS: &[&str] =
    &["safetensors", "bin", "pt", "pth", "ckpt", "onnx", "msgpack", "h5"];

/// A hub serving repositories from folders, on `127.0.0.1` at a free port, until dropped.
pub struct HubServer {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct State {
    /// Repository id → its files.
    repos: BTreeMap<String, Repo>,
    token: Option<String>,
    log: Mutex<Vec<String>>,
}

struct Repo {
    commit: String,
    /// Relative path → (absolute path, git-style etag, LFS content etag when an LFS file).
    files: BTreeMap<String, ServedFile>,
}

impl Repo {
    fn read(folder: &Path) -> std::io::Result<Repo> {
        let mut names = Vec::new();
        list_files(folder, folder, &mut names)?;
        names.sort();
        let mut commit_hasher = blake3::Hasher::new();
        let mut files = BTreeMap::new();
        for name in names {
            let path = folder.join(&name);
            let bytes = std::fs::read(&path)?;
            let content = blake3::hash(&bytes).to_hex().to_string();
            commit_hasher.update(name.as_bytes()).update(content.as_bytes());
            let is_lfs = Path::new(&name)
                .extension()
                .is_some_and(|e| LFS_EXTENSIONS.contains(&e.to_string_lossy().as_ref()));
            let file = ServedFile {
                path,
                // Git blob ids are 40 hex digits, LFS ids (sha256) 64: kept distinguishable.
                etag: content[..40].to_string(),
                lfs_etag: is_lfs.then_some(content),
                size: bytes.len() as u64,
            };
            files.insert(name, file);
        }
        let commit = commit_hasher.finalize().to_hex()[..40].to_string();
        Ok(Repo { commit, files })
    }
}

struct ServedFile {
    path: PathBuf,
    etag: String,
    lfs_etag: Option<String>,
    size: u64,
}

impl HubServer {
    /// Serve `folder` as the model repository `repo_id` (e.g. `org/name`).
    pub fn serve(repo_id: &str, folder: &Path) -> std::io::Result<HubServer> {
        HubServer::start(&[(repo_id, folder)], None)
    }

    /// Serve each `(repo_id, folder)`, as one hub serves many repositories.
    pub fn serve_all(repos: &[(&str, &Path)]) -> std::io::Result<HubServer> {
        HubServer::start(repos, None)
    }

    /// Like [`HubServer::serve`], but every API and download request must carry `token`.
    pub fn serve_private(repo_id: &str, folder: &Path, token: &str) -> std::io::Result<HubServer> {
        HubServer::start(&[(repo_id, folder)], Some(token.to_string()))
    }

    fn start(repos: &[(&str, &Path)], token: Option<String>) -> std::io::Result<HubServer> {
        let repos = repos
            .iter()
            .map(|(id, folder)| Ok((id.to_string(), Repo::read(folder)?)))
            .collect::<std::io::Result<_>>()?;
        let state = Arc::new(State { repos, token, log: Mutex::default() });

        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let state = state.clone();
                    std::thread::spawn(move || {
                        let _ = handle(&state, addr, stream);
                    });
                }
            })
        };
        Ok(HubServer { addr, state, stop, thread: Some(thread) })
    }

    /// The value for `HF_ENDPOINT` / [`crate::HubConfig::endpoint`].
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The commit hash the (first) repository's `main` points at.
    pub fn commit(&self) -> &str {
        &self.state.repos.values().next().expect("a hub serves a repository").commit
    }

    /// How many requests were answered so far.
    pub fn requests(&self) -> usize {
        self.state.log.lock().expect("log lock").len()
    }

    /// Every request so far, as `METHOD /path` lines.
    pub fn request_log(&self) -> Vec<String> {
        self.state.log.lock().expect("log lock").clone()
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn list_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            list_files(root, &path, out)?;
        } else {
            let rel = path.strip_prefix(root).expect("listed under root");
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
    Ok(())
}

/// A parsed request: method, decoded path, headers with lower-case names.
struct Request {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn new(status: u16) -> Response {
        Response { status, headers: Vec::new(), body: Vec::new() }
    }
    fn header(mut self, name: &str, value: impl Into<String>) -> Response {
        self.headers.push((name.to_string(), value.into()));
        self
    }
    fn error(status: u16, code: &str, message: &str) -> Response {
        let body = serde_json::json!({ "error": message }).to_string().into_bytes();
        Response { body, ..Response::new(status) }
            .header("Content-Type", "application/json")
            .header("X-Error-Code", code)
            .header("X-Error-Message", message)
    }
}

fn handle(state: &State, addr: SocketAddr, stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let Some(request) = read_request(&mut reader)? else { return Ok(()) };
    state.log.lock().expect("log lock").push(format!("{} {}", request.method, request.path));
    let response = route(state, addr, &request);
    write_response(stream, &request, response)
}

fn read_request(reader: &mut impl BufRead) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else { return Ok(None) };
    let path = percent_decode(target.split('?').next().unwrap_or(""));
    let mut headers = BTreeMap::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    Ok(Some(Request { method: method.to_string(), path, headers }))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn route(state: &State, addr: SocketAddr, request: &Request) -> Response {
    if request.method != "GET" && request.method != "HEAD" {
        return Response::error(405, "MethodNotAllowed", "only GET and HEAD are served");
    }
    // The CDN answers signed URLs without a token, as the real one does.
    if let Some(etag) = request.path.strip_prefix("/lfs-cdn/") {
        let mut files = state.repos.values().flat_map(|r| r.files.values());
        return match files.find(|f| f.lfs_etag.as_deref() == Some(etag)) {
            Some(file) => serve_bytes(file, request, Vec::new()),
            None => Response::error(404, "EntryNotFound", "no such LFS object"),
        };
    }
    if let Some(token) = &state.token {
        let sent = request.headers.get("authorization").map(String::as_str);
        if sent != Some(format!("Bearer {token}").as_str()) {
            // The real hub hides private repositories behind 401 RepoNotFound.
            return Response::error(401, "RepoNotFound", "Repository not found");
        }
    }
    let Some((repo_id, repo, endpoint, rest)) = find_repo(state, &request.path) else {
        return Response::error(404, "RepoNotFound", "Repository not found");
    };
    if endpoint == "api" {
        let Some(revision) = rest.strip_prefix("revision/") else {
            return Response::error(404, "EntryNotFound", "unknown API");
        };
        if !known_revision(repo, revision) {
            return Response::error(404, "RevisionNotFound", "Invalid rev id");
        }
        let siblings: Vec<_> =
            repo.files.keys().map(|name| serde_json::json!({ "rfilename": name })).collect();
        let body = serde_json::json!({
            "id": repo_id,
            "modelId": repo_id,
            "sha": repo.commit,
            "private": state.token.is_some(),
            "siblings": siblings,
        });
        let mut response = Response::new(200).header("Content-Type", "application/json");
        response.body = body.to_string().into_bytes();
        return response;
    }
    let Some((revision, name)) = rest.split_once('/') else {
        return Response::error(404, "EntryNotFound", "no file given");
    };
    if !known_revision(repo, revision) {
        return Response::error(404, "RevisionNotFound", "Invalid rev id");
    }
    let Some(file) = repo.files.get(name) else {
        return Response::error(404, "EntryNotFound", "Entry not found");
    };
    let commit = ("X-Repo-Commit".to_string(), repo.commit.clone());
    match &file.lfs_etag {
        Some(lfs_etag) => Response::new(302)
            .header("Location", format!("http://{addr}/lfs-cdn/{lfs_etag}"))
            .header("ETag", format!("\"{}\"", file.etag))
            .header("X-Linked-Etag", format!("\"{lfs_etag}\""))
            .header("X-Linked-Size", file.size.to_string())
            .header(&commit.0, commit.1),
        None => serve_bytes(file, request, vec![commit]),
    }
}

/// The repository a request is for, and the rest of its path: `/api/models/<id>/<rest>` gives
/// `"api"`, `/<id>/resolve/<rest>` gives `"resolve"`.
fn find_repo<'a>(
    state: &'a State,
    path: &'a str,
) -> Option<(&'a str, &'a Repo, &'static str, &'a str)> {
    state.repos.iter().find_map(|(id, repo)| {
        if let Some(rest) =
            path.strip_prefix("/api/models/").and_then(|p| p.strip_prefix(id.as_str()))
        {
            return rest.strip_prefix('/').map(|rest| (id.as_str(), repo, "api", rest));
        }
        let rest = path.strip_prefix('/')?.strip_prefix(id.as_str())?.strip_prefix("/resolve/")?;
        Some((id.as_str(), repo, "resolve", rest))
    })
}

fn known_revision(repo: &Repo, revision: &str) -> bool {
    revision == "main" || revision == repo.commit
}

/// Lay `folder` out in the Hugging Face cache `cache_dir` as the repository `repo_id`, the way
/// `huggingface_hub` leaves it after downloading `main`: `models--org--name/blobs/<etag>`
/// holding the bytes, `snapshots/<commit>/<path>` as relative links into `blobs/`, and
/// `refs/main` naming the commit. Returns the commit, the same one [`HubServer`] would serve.
pub fn install_in_cache(cache_dir: &Path, repo_id: &str, folder: &Path) -> std::io::Result<String> {
    let repo = Repo::read(folder)?;
    let root = cache_dir.join(format!("models--{}", repo_id.replace('/', "--")));
    let snapshot = root.join("snapshots").join(&repo.commit);
    std::fs::create_dir_all(root.join("blobs"))?;
    std::fs::create_dir_all(root.join("refs"))?;
    std::fs::write(root.join("refs/main"), &repo.commit)?;
    for (name, file) in &repo.files {
        let blob = file.lfs_etag.as_deref().unwrap_or(&file.etag);
        std::fs::copy(&file.path, root.join("blobs").join(blob))?;
        let link = snapshot.join(name);
        std::fs::create_dir_all(link.parent().expect("a file has a parent"))?;
        // From snapshots/<commit>/<name>: up past each folder of `name`, the commit and
        // `snapshots`.
        let up = "../".repeat(name.matches('/').count() + 2);
        std::os::unix::fs::symlink(format!("{up}blobs/{blob}"), &link)?;
    }
    Ok(repo.commit)
}

/// The file, or the byte range the request asks for (`bytes=a-b`, `bytes=a-`).
fn serve_bytes(file: &ServedFile, request: &Request, extra: Vec<(String, String)>) -> Response {
    let bytes = match std::fs::read(&file.path) {
        Ok(bytes) => bytes,
        Err(e) => return Response::error(500, "InternalError", &e.to_string()),
    };
    let size = bytes.len() as u64;
    let etag = file.lfs_etag.as_deref().unwrap_or(&file.etag);
    let mut response =
        Response::new(200).header("ETag", format!("\"{etag}\"")).header("Accept-Ranges", "bytes");
    response.headers.extend(extra);
    if size == 0 {
        // No byte range exists in an empty file; the size is all a client can learn.
        return response.header("Content-Range", "bytes */0");
    }
    let range = request.headers.get("range").and_then(|r| parse_range(r, size));
    match range {
        Some(Ok((start, end))) => {
            response.status = 206;
            response.body = bytes[start as usize..=end as usize].to_vec();
            response.header("Content-Range", format!("bytes {start}-{end}/{size}"))
        }
        Some(Err(())) => Response::error(416, "RangeNotSatisfiable", "range not satisfiable")
            .header("Content-Range", format!("bytes */{size}")),
        None => {
            response.body = bytes;
            response
        }
    }
}

/// `Some(Ok((first, last)))` for a satisfiable range, `Some(Err(()))` for one past the end,
/// `None` for a header this server does not understand (answered with the whole file).
fn parse_range(header: &str, size: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = header.strip_prefix("bytes=")?;
    let (start, end) = spec.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    if start >= size {
        return Some(Err(()));
    }
    let end = match end.trim() {
        "" => size - 1,
        e => e.parse::<u64>().ok()?.min(size - 1),
    };
    (end >= start).then_some(Ok((start, end)))
}

fn write_response(
    mut stream: TcpStream,
    request: &Request,
    response: Response,
) -> std::io::Result<()> {
    let reason = match response.status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        416 => "Range Not Satisfiable",
        _ => "Error",
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", response.status);
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", response.body.len()));
    stream.write_all(head.as_bytes())?;
    if request.method != "HEAD" {
        stream.write_all(&response.body)?;
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_clamped_and_checked() {
        assert_eq!(parse_range("bytes=0-0", 10), Some(Ok((0, 0))));
        assert_eq!(parse_range("bytes=3-", 10), Some(Ok((3, 9))));
        assert_eq!(parse_range("bytes=3-99", 10), Some(Ok((3, 9))));
        assert_eq!(parse_range("bytes=10-", 10), Some(Err(())));
        assert_eq!(parse_range("lines=1-2", 10), None);
    }

    #[test]
    fn paths_are_percent_decoded() {
        assert_eq!(percent_decode("/a%20b/c%2Fd"), "/a b/c/d");
        assert_eq!(percent_decode("/bad%zz"), "/bad%zz");
    }
}
