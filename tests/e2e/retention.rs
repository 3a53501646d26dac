//! Retention and logs that cannot hurt the host, with a real server and
//! real sandboxed sessions: a session printing without pause keeps its log
//! within the configured size, the server streams it without growing, and
//! ended sessions' rows and log files go once the retention time passes;
//! create/delete cycles do not grow the server; the session list is paged
//! and filtered, and bad query values are refused by name.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sandcast_e2e::{Resp, Server, ServerOptions};
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(60);
const MIB: u64 = 1024 * 1024;

fn server(retention_seconds: u64, logs: &str) -> Server {
    Server::start(ServerOptions {
        top: "max_sessions = 4".into(),
        tables: format!("[retention]\nseconds = {retention_seconds}\n\n[logs]\n{logs}\n"),
        ..ServerOptions::default()
    })
}

fn log_files(data: &Path, id: &str) -> [PathBuf; 2] {
    let dir = data.join("logs");
    [
        dir.join(format!("{id}.log.1")),
        dir.join(format!("{id}.log")),
    ]
}

fn on_disk(data: &Path, id: &str) -> u64 {
    log_files(data, id)
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Polls until `f` is true; panics with `what` at the deadline.
fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reads `path` through the API without keeping it, sampling the server's
/// RSS meanwhile; returns (bytes read, lines, last line, peak RSS in KiB).
fn read_log_sampling(s: &Server, path: &str) -> (u64, u64, String, u64) {
    let pid = s.pid();
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (done, peak) = (done.clone(), peak.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                if let Some(kib) = rss_of(pid) {
                    peak.fetch_max(kib, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    let resp = agent
        .get(format!("{}{path}", s.base))
        .header("authorization", &format!("Bearer {}", s.api_key))
        .call()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(resp.status().as_u16(), 200, "GET {path}");
    let mut body = resp.into_body().into_reader();
    let (mut bytes, mut lines) = (0u64, 0u64);
    let mut last = Vec::new();
    let mut cur = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = body.read(&mut buf).expect("read log body");
        if n == 0 {
            break;
        }
        bytes += n as u64;
        for &b in &buf[..n] {
            if b == b'\n' {
                lines += 1;
                std::mem::swap(&mut last, &mut cur);
                cur.clear();
            } else if cur.len() < 200 {
                cur.push(b);
            }
        }
    }
    done.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    (
        bytes,
        lines,
        String::from_utf8_lossy(&last).into_owned(),
        peak.load(Ordering::SeqCst),
    )
}

fn rss_of(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[test]
fn a_flooding_session_keeps_its_log_bounded_streamed_and_removed_with_retention() {
    // A rate far above the default so the 16 MiB limit is reached in 30 s.
    let max = 16 * MIB;
    // Long enough for the reads below, which need the log.
    let retention = 20;
    let s = server(
        retention,
        &format!(
            "rate_bytes_per_second = {}\nburst_bytes = {}\nmax_bytes = {max}\n",
            MIB, MIB
        ),
    );
    let data = s.data_dir().to_path_buf();
    let created = s.create(&json!({
        "launch": ["sh", "-c", "yes $(head -c 3000 /dev/zero | tr '\\0' x)"],
        "width": 640, "height": 480,
    }));
    let id = created["id"].as_str().expect("id").to_string();
    s.wait_state(&id, "ready", READY);

    // 30 s of printing without pause: never more than the limit on disk.
    let start = Instant::now();
    let mut biggest = 0;
    while start.elapsed() < Duration::from_secs(30) {
        biggest = biggest.max(on_disk(&data, &id));
        assert!(biggest <= max, "the log holds {biggest} bytes, over {max}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(s.session(&id)["state"], "ready");
    eprintln!("30 s of output without pause: at most {biggest} bytes on disk (limit {max})");
    assert!(
        biggest > max / 2,
        "the flood never filled the log ({biggest} bytes): the test shows nothing"
    );
    let [prev, cur] = log_files(&data, &id);
    assert!(prev.exists(), "no rotation after 30 s at 1 MiB/s");
    use std::os::unix::fs::MetadataExt;
    for p in [&prev, &cur, &data.join("sandcast.sqlite")] {
        let mode = std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", p.display());
    }
    let dir_mode = std::fs::metadata(data.join("logs")).unwrap().mode() & 0o777;
    assert_eq!(dir_mode, 0o700, "logs/ has mode {dir_mode:o}");
    for d in [data.join("sessions"), data.join("sessions").join(&id)] {
        let mode = std::fs::metadata(&d).unwrap().mode() & 0o777;
        assert_eq!(
            mode & 0o044,
            0,
            "{} is readable by others: {mode:o}",
            d.display()
        );
    }

    let r = s.api("DELETE", &format!("/api/sessions/{id}"), None);
    assert_eq!(r.status, 200, "{r:?}");
    s.wait_state(&id, "stopped", Duration::from_secs(30));
    let stopped_at = Instant::now();

    // Read the whole log through the API (warm-up once, then three times
    // with the server's RSS sampled every 20 ms).
    let path = format!("/api/sessions/{id}/logs");
    let (warm, _, _, _) = read_log_sampling(&s, &path);
    let base = s.rss_kib();
    let mut peaks = Vec::new();
    for _ in 0..3 {
        let (bytes, lines, last, peak) = read_log_sampling(&s, &path);
        assert_eq!(bytes, warm, "the stopped session's log changed");
        assert!(bytes > max / 2 && bytes <= max, "{bytes} bytes read");
        assert!(lines > 1000, "{lines} lines");
        assert!(
            last.contains("session stopped") || last.contains("server limit: dropped"),
            "last line: {last}"
        );
        peaks.push(peak);
    }
    let growth = peaks.iter().max().unwrap().saturating_sub(base);
    eprintln!(
        "log of {warm} bytes read 3 times: server RSS {base} KiB before, peaks {peaks:?} KiB (+{growth} KiB)"
    );
    assert!(
        growth < 4 * 1024,
        "the server's RSS grew {growth} KiB while streaming a {warm}-byte log"
    );
    let whole = s.api("GET", &path, None).body;
    assert!(
        whole
            .lines()
            .any(|l| l.contains("server limit: dropped") && l.contains("bytes/s")),
        "no marker line about dropped output"
    );
    assert!(
        whole
            .lines()
            .rev()
            .take(2)
            .any(|l| l.contains("server agent: session stopped")),
        "the server's own last line was crowded out"
    );
    // The file's lines, the tail, and the lines since a time agree.
    let tail = s.api("GET", &format!("{path}?tail=3"), None);
    assert_eq!(tail.status, 200, "{tail:?}");
    let want: Vec<&str> = whole.lines().rev().take(3).collect::<Vec<_>>();
    let got: Vec<&str> = tail.body.lines().rev().collect();
    assert_eq!(got, want);
    let middle = whole.lines().nth(whole.lines().count() / 2).unwrap();
    let stamp = &middle[..24];
    let since = s.api("GET", &format!("{path}?since={stamp}"), None);
    assert_eq!(since.status, 200);
    let first = since.body.lines().next().expect("lines since the middle");
    assert_eq!(&first[..24], stamp, "{first}");
    assert!(since.body.len() < whole.len() && whole.ends_with(&since.body));

    assert!(
        stopped_at.elapsed() < Duration::from_secs(retention),
        "reading took longer than the retention time; the test shows nothing"
    );
    assert!(
        prev.exists() && cur.exists(),
        "removed before the retention time"
    );
    // Retention: the row and both files go once the time has passed.
    wait_until(
        Duration::from_secs(retention + 10),
        "the session's log files removed",
        || !prev.exists() && !cur.exists(),
    );
    assert!(
        stopped_at.elapsed() >= Duration::from_secs(retention - 1),
        "removed after {:?}, before the retention time",
        stopped_at.elapsed()
    );
    let gone = s.api("GET", &format!("/api/sessions/{id}"), None);
    assert_eq!(gone.status, 404, "{gone:?}");
    assert_eq!(s.api("GET", &path, None).status, 404);
}

/// Create/delete cycles in the memory test; `SANDCAST_E2E_CYCLES` overrides.
const CYCLES: usize = 100;
/// Cycles before the first measurement.
const WARM_UP: usize = 10;

#[test]
fn create_delete_cycles_do_not_grow_the_server_and_leave_nothing_after_retention() {
    let cycles = std::env::var("SANDCAST_E2E_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CYCLES)
        .max(WARM_UP + 1);
    let retention = 4;
    let s = server(retention, "");
    let data = s.data_dir().to_path_buf();
    let mut base = 0;
    let mut ids = Vec::new();
    let t0 = Instant::now();
    for i in 0..cycles {
        if i == WARM_UP {
            base = s.rss_kib();
        }
        let created = s.create(&json!({
            "user_id": "cycles",
            "width": 320, "height": 240,
            "launch": ["sh", "-c", "echo hello from the launch command; exec sleep 600"],
        }));
        let id = created["id"].as_str().expect("id").to_string();
        s.wait_state(&id, "ready", READY);
        s.delete(&id);
        ids.push(id);
    }
    let end = s.rss_kib();
    let per_cycle = t0.elapsed() / cycles as u32;
    let growth = end as i64 - base as i64;
    eprintln!(
        "{cycles} create/ready/delete cycles, {per_cycle:?} each: server RSS {base} KiB after {WARM_UP}, {end} KiB at the end ({growth:+} KiB)"
    );
    assert!(
        growth < 5 * 1024,
        "the server grew {growth} KiB over {} cycles",
        cycles - WARM_UP
    );
    // After the retention time nothing of any of them is left.
    wait_until(
        Duration::from_secs(retention + 10),
        "every ended session removed",
        || s.session_ids().is_empty(),
    );
    for id in &ids {
        assert_eq!(
            s.api("GET", &format!("/api/sessions/{id}"), None).status,
            404
        );
    }
    let logs: Vec<_> = std::fs::read_dir(data.join("logs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(logs.is_empty(), "log files left: {logs:?}");
    let sessions: Vec<_> = std::fs::read_dir(data.join("sessions"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        sessions.is_empty(),
        "session directories left: {sessions:?}"
    );
}

fn assert_bad(r: &Resp, field: &str) {
    assert_eq!(r.status, 400, "{field}: {r:?}");
    let v: Value = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body));
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains(field)),
        "the error does not name {field}: {}",
        r.body
    );
}

#[test]
fn the_session_list_is_paged_and_filtered_and_refuses_bad_values_by_name() {
    // A long retention: the ended sessions must stay listed.
    let s = Server::start(ServerOptions {
        tables: "[retention]\nseconds = 3600\n".into(),
        ..ServerOptions::default()
    });
    let mut ids = Vec::new();
    for i in 0..5 {
        let user = if i % 2 == 0 { "even" } else { "odd" };
        let c = s.create(&json!({ "user_id": user, "width": 320, "height": 240 }));
        let id = c["id"].as_str().unwrap().to_string();
        if i < 3 {
            s.delete(&id);
        }
        ids.push(id);
    }
    // Newest first, three pages of two.
    let mut seen = Vec::new();
    let mut path = "/api/sessions?limit=2".to_string();
    let mut pages = 0;
    loop {
        let v = s.api("GET", &path, None).json();
        pages += 1;
        let page = v["sessions"].as_array().unwrap();
        assert!(page.len() <= 2);
        seen.extend(page.iter().map(|x| x["id"].as_str().unwrap().to_string()));
        match v["next"].as_str() {
            Some(c) => path = format!("/api/sessions?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first);

    let list = |q: &str| -> Vec<String> {
        let r = s.api("GET", &format!("/api/sessions?{q}"), None);
        assert_eq!(r.status, 200, "{q}: {r:?}");
        r.json()["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        list("state=stopped"),
        [ids[2].clone(), ids[1].clone(), ids[0].clone()]
    );
    assert_eq!(list("user_id=odd"), [ids[3].clone(), ids[1].clone()]);
    assert_eq!(
        list("state=stopped&user_id=even"),
        [ids[2].clone(), ids[0].clone()]
    );
    assert_eq!(
        list("state=starting,ready"),
        [ids[4].clone(), ids[3].clone()]
    );

    assert_bad(&s.api("GET", "/api/sessions?limit=0", None), "limit");
    assert_bad(&s.api("GET", "/api/sessions?limit=1001", None), "limit");
    assert_bad(&s.api("GET", "/api/sessions?limit=ten", None), "limit");
    assert_bad(&s.api("GET", "/api/sessions?state=asleep", None), "state");
    assert_bad(&s.api("GET", "/api/sessions?state=ready,", None), "state");
    assert_bad(&s.api("GET", "/api/sessions?cursor=abc", None), "cursor");
    let long_user = format!("/api/sessions?user_id={}", "u".repeat(200));
    assert_bad(&s.api("GET", &long_user, None), "user_id");
    let r = s.api("GET", "/api/sessions?colour=red", None);
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("colour"), "{}", r.body);

    let logs = format!("/api/sessions/{}/logs", ids[0]);
    assert_bad(&s.api("GET", &format!("{logs}?tail=-1"), None), "tail");
    assert_bad(
        &s.api("GET", &format!("{logs}?since=yesterday"), None),
        "since",
    );
    assert_bad(
        &s.api("GET", &format!("{logs}?follow=maybe"), None),
        "follow",
    );
    // follow=1: the tail, then new lines until the session ends.
    let live = ids[4].clone();
    let url = format!("{}/api/sessions/{live}/logs?tail=1&follow=1", s.base);
    let key = s.api_key.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let resp = agent
            .get(&url)
            .header("authorization", &format!("Bearer {key}"))
            .call()
            .expect("GET logs?follow=1");
        tx.send(()).unwrap();
        resp.into_body().read_to_string().expect("follow body")
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("the follow request was answered");
    s.delete(&live);
    let followed = reader
        .join()
        .expect("the follow stream ended with the session");
    assert!(
        followed.contains("session stopping: deleted through the API"),
        "{followed}"
    );
    let ok = s.api("GET", &format!("{logs}?tail=1"), None);
    assert_eq!(ok.status, 200);
    assert!(ok.body.contains("session stopped"), "{}", ok.body);
}
