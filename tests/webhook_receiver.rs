//! A webhook endpoint for end-to-end tests: an HTTP receiver on 127.0.0.1
//! that records every delivery and refuses the first two attempts of each
//! (so retries are exercised), with the secret the test servers sign with.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{KeyInit, Mac};
use serde_json::Value;

/// The secret of the test servers' webhooks.
pub const SECRET: &str = "e2e-webhook-secret-0123456789";

/// The server's config tables for one webhook at `url`, retried quickly.
pub fn tables(url: &str) -> String {
    format!(
        "[[webhooks]]\nurl = {url:?}\nsecret = {SECRET:?}\n\n\
         [webhook_retry]\nfirst_ms = 200\nmax_ms = 400\n"
    )
}

/// One request the receiver got, and what it answered.
#[derive(Debug, Clone)]
pub struct Received {
    /// Its headers, names lowercase.
    pub headers: HashMap<String, String>,
    /// Its body.
    pub body: Vec<u8>,
    /// The status it was answered with.
    pub answered: u16,
}

impl Received {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }
    /// A header's value (empty when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
    /// The `X-Sandcast-Event` header.
    pub fn event(&self) -> &str {
        self.header("x-sandcast-event")
    }
    /// Whether it was answered 200.
    pub fn acknowledged(&self) -> bool {
        self.answered == 200
    }
}

/// A webhook endpoint on 127.0.0.1: it answers 500 to the first two
/// attempts of every delivery and to any delivery of an event it holds
/// back, then 200.
pub struct Receiver {
    /// Where it listens (`http://127.0.0.1:PORT/hook`).
    pub url: String,
    got: Arc<Mutex<Vec<Received>>>,
    hold: Arc<Mutex<Vec<String>>>,
    closed: Arc<AtomicBool>,
}

impl Receiver {
    /// Listens on 127.0.0.1; deliveries of the events in `hold` are refused until released.
    pub fn start(hold: &[&str]) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the receiver");
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let got = Arc::new(Mutex::new(Vec::<Received>::new()));
        let hold = Arc::new(Mutex::new(hold.iter().map(|e| e.to_string()).collect()));
        let closed = Arc::new(AtomicBool::new(false));
        let (g, h, c) = (got.clone(), hold.clone(), closed.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if c.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                serve(conn, &g, &h);
            }
        });
        Receiver {
            url,
            got,
            hold,
            closed,
        }
    }

    /// Stops refusing `event`.
    pub fn release(&self, event: &str) {
        self.hold.lock().unwrap().retain(|e| e != event);
    }

    /// Every request so far.
    pub fn got(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until `pred` holds for what was received.
    pub fn wait(&self, what: &str, timeout: Duration, pred: impl Fn(&[Received]) -> bool) {
        let deadline = Instant::now() + timeout;
        while !pred(&self.got()) {
            assert!(
                Instant::now() < deadline,
                "the receiver did not get {what} in {timeout:?}: {:#?}",
                self.got()
                    .iter()
                    .map(|r| (r.event().to_string(), r.answered))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The acknowledged events in the order they were acknowledged.
    /// Whether it was answered 200.
    pub fn acknowledged(&self) -> Vec<Received> {
        self.got()
            .into_iter()
            .filter(Received::acknowledged)
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect(
            self.url
                .trim_start_matches("http://")
                .trim_end_matches("/hook"),
        );
    }
}

/// Reads one request, records it and answers with `Connection: close`.
fn serve(conn: TcpStream, got: &Mutex<Vec<Received>>, hold: &Mutex<Vec<String>>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() || !line.starts_with("POST /hook ") {
        return;
    }
    let mut headers = HashMap::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let mut got = got.lock().unwrap();
    let delivery = headers
        .get("x-sandcast-delivery")
        .cloned()
        .unwrap_or_default();
    let earlier = got
        .iter()
        .filter(|r| r.header("x-sandcast-delivery") == delivery)
        .count();
    let event = headers.get("x-sandcast-event").cloned().unwrap_or_default();
    let held = hold.lock().unwrap().contains(&event);
    let answered = if earlier < 2 || held { 500 } else { 200 };
    got.push(Received {
        headers,
        body,
        answered,
    });
    drop(got);
    let text = if answered == 200 { "OK" } else { "Nope" };
    let mut conn = reader.into_inner();
    let _ = write!(
        conn,
        "HTTP/1.1 {answered} {text}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
}

/// `X-Sandcast-Signature` of `body` under [`SECRET`].
pub fn expected_signature(body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}
