//! A loopback HTTP/1.1 server for tests: one thread per connection, one request per
//! connection (`Connection: close`), replies chosen by a handler that also sees how many times
//! the path was requested before. It records every request so tests can count server hits.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// What the server sends for one request.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Wait this long before sending anything (a slow server).
    pub delay: Duration,
}

impl Reply {
    pub fn ok(body: Vec<u8>, content_type: &str) -> Reply {
        Reply::status(200).body(body).header("Content-Type", content_type)
    }
    pub fn status(status: u16) -> Reply {
        Reply { status, headers: Vec::new(), body: Vec::new(), delay: Duration::ZERO }
    }
    pub fn body(mut self, body: Vec<u8>) -> Reply {
        self.body = body;
        self
    }
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
    pub fn delay(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

type Handler = dyn Fn(&str, &str, usize) -> Reply + Send + Sync;

pub struct Server {
    port: u16,
    /// Every request target (path and query), in arrival order.
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Server {
    /// Start serving; `handler(path, query, previous_hits_of_path)` picks each reply.
    pub fn start(handler: impl Fn(&str, &str, usize) -> Reply + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let (log, flag) = (requests.clone(), stop.clone());
        thread::spawn(move || {
            for stream in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let (handler, log) = (handler.clone(), log.clone());
                thread::spawn(move || serve(stream, &*handler, &log));
            }
        });
        Server { port, requests, stop }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// How many requests were made for `path` (query ignored).
    pub fn hits(&self, path: &str) -> usize {
        self.requests().iter().filter(|r| r.split('?').next() == Some(path)).count()
    }

    /// Requests whose path starts with `prefix`.
    pub fn hits_under(&self, prefix: &str) -> usize {
        self.requests().iter().filter(|r| r.starts_with(prefix)).count()
    }

    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(stream: TcpStream, handler: &Handler, log: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(stream.try_clone().expect("cloning a socket"));
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() || request_line.is_empty() {
        return;
    }
    // Skip the headers; GET requests have no body.
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => {}
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let previous = {
        let mut log = log.lock().unwrap();
        let previous = log.iter().filter(|r| r.split('?').next() == Some(path)).count();
        log.push(target.clone());
        previous
    };
    let reply = handler(path, query, previous);
    thread::sleep(reply.delay);
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status,
        reason(reply.status),
        reply.body.len()
    );
    for (name, value) in &reply.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut stream = stream;
    // The client may have given up (a timeout test): write errors are expected then.
    let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(&reply.body));
    let _ = stream.flush();
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        410 => "Gone",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        _ => "Status",
    }
}
