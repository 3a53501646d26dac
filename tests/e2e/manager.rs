//! The session manager under load with the real server: concurrent creates
//! against `max_sessions`, a session whose agent is stopped (SIGSTOP) while
//! its viewer floods it with input, and a hostile session hammering its own
//! agent socket.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sandcast_e2e::{
    Server, ServerOptions, agent_process, children_running, colours, input_page, input_steps,
    run_browser, wait_no_leftovers,
};
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(60);

fn ready(s: &Server, body: Value) -> (String, Value) {
    let created = s.create(&body);
    let id = created["id"].as_str().expect("id").to_string();
    s.wait_state(&id, "ready", READY);
    (id, created)
}

fn delete_clean(s: &Server, id: &str) {
    s.delete(id);
    let left = wait_no_leftovers(id, Duration::from_secs(20));
    assert!(left.is_empty(), "{id} left behind:\n{}", left.join("\n"));
}

#[test]
fn concurrent_creates_never_exceed_max_sessions() {
    let s = Arc::new(Server::start(ServerOptions {
        top: "max_sessions = 3".into(),
        ..ServerOptions::default()
    }));
    let go = Arc::new(std::sync::Barrier::new(20));
    let threads: Vec<_> = (0..20)
        .map(|_| {
            let s = s.clone();
            let go = go.clone();
            std::thread::spawn(move || {
                go.wait();
                s.api(
                    "POST",
                    "/api/sessions",
                    Some(&json!({ "start_url": "about:blank" }).to_string()),
                )
            })
        })
        .collect();
    let answers: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let created: Vec<String> = answers
        .iter()
        .filter(|r| r.status == 201)
        .map(|r| r.json()["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(created.len(), 3, "{answers:#?}");
    for r in answers.iter().filter(|r| r.status != 201) {
        assert_eq!(r.status, 503, "{r:?}");
        assert!(r.body.contains("3 sessions"), "{}", r.body);
    }
    let listed = s.api("GET", "/api/sessions", None).json();
    let live = listed["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| matches!(v["state"].as_str(), Some("starting" | "ready")))
        .count();
    assert!(live <= 3, "{listed:#}");
    for id in &created {
        delete_clean(&s, id);
    }
    // Room again once they are gone.
    let (id, _) = ready(&s, json!({ "start_url": "about:blank" }));
    delete_clean(&s, &id);
}

fn signal_agent(id: &str, sig: nix::sys::signal::Signal) {
    let agent = agent_process(id).unwrap_or_else(|| panic!("no agent for {id}"));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent.pid), sig)
        .unwrap_or_else(|e| panic!("{sig} to the agent of {id}: {e}"));
}

/// Session A's agent is stopped (it reads nothing) while A's viewer types
/// without pause; session B's viewer then connects, clicks and types: its
/// video start (a viewer event) and its input must reach B's agent at once.
/// Before one task per session, the relay waited on A's full queue and B's
/// viewer saw nothing.
#[test]
fn a_stopped_agent_flooded_with_input_does_not_hold_up_another_session() {
    let s = Server::start_default();
    let (a, created_a) = ready(&s, json!({ "start_url": input_page(), "kiosk": true }));
    let (b, created_b) = ready(&s, json!({ "start_url": input_page(), "kiosk": true }));
    let tmp = tempfile::tempdir().unwrap();
    let reached = tmp.path().join("a-viewer-ready");
    let go = tmp.path().join("agent-stopped");
    let flood = std::thread::spawn({
        let url = created_a["viewer_url"].clone();
        let (reached, go) = (reached.clone(), go.clone());
        move || {
            run_browser(
                "e2e-viewer.mjs",
                &json!({
                    "url": url, "kind": "video", "mode": "webrtc", "timeoutMs": 120000,
                    "steps": [
                        { "expect": colours::START, "timeoutMs": 30000 },
                        { "click": true },
                        { "signal": reached },
                        { "waitFile": go, "timeoutMs": 60000 },
                        { "flood": 25000 },
                    ],
                }),
            )
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while !reached.exists() {
        assert!(Instant::now() < deadline, "A's viewer never showed A");
        std::thread::sleep(Duration::from_millis(50));
    }
    signal_agent(&a, nix::sys::signal::Signal::SIGSTOP);
    std::fs::write(&go, "").unwrap();
    // Let the flood fill A's socket and queues before B's viewer arrives.
    std::thread::sleep(Duration::from_secs(8));
    let t0 = Instant::now();
    let view_b = run_browser(
        "e2e-viewer.mjs",
        &json!({
            "url": created_b["viewer_url"], "kind": "video", "mode": "webrtc",
            "steps": input_steps(),
        }),
    );
    let b_took = t0.elapsed();
    let view_a = flood.join().unwrap();
    signal_agent(&a, nix::sys::signal::Signal::SIGCONT);
    eprintln!(
        "B's viewer took {b_took:?} while A was stopped: {}",
        view_b["steps"]
    );
    eprintln!("A's flood: {}", view_a["steps"]);
    assert!(view_b["ok"] == true, "B's viewer failed: {view_b:#}");
    assert!(view_a["ok"] == true, "A's viewer failed: {view_a:#}");
    let chars = view_a["steps"][4]["chars"].as_u64().unwrap_or(0);
    assert!(chars > 2000, "A's viewer typed only {chars} characters");
    // A itself survives being behind.
    let after = s.wait_state(&a, "ready", Duration::from_secs(10));
    assert!(children_running(&after), "{after:#}");
    delete_clean(&s, &a);
    delete_clean(&s, &b);
}

fn proc_status(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (rss_kib, fds)
}

/// The hostile client: 10,000 connections to the session's own agent socket
/// (bound at this path into the sandbox), held in waves as large as the
/// session's descriptor limit allows; each announces a frame far over any
/// limit (as its hello, or after a video hello, with 256 KiB of it sent).
const HOSTILE: &str = r#"
import json, resource, socket, struct, time
P = "/run/sandcast/agent.sock"
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
wave = max(64, min(hard - 64, 2000))
def hello(role):
    b = json.dumps({"type": "hello", "protocol": 1, "role": role, "agent_version": "hostile"}).encode()
    return struct.pack(">IB", len(b) + 1, 1) + b
big = struct.pack(">IB", 8 * 1024 * 1024, 2) + b"\0" * (256 * 1024)
roles = ["video", "control", {"stream": {"id": 7}}]
n = connected = sent = 0
t0 = time.time()
while n < 10000:
    held = []
    for _ in range(min(wave, 10000 - n)):
        n += 1
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(0.2)
        try:
            c.connect(P)
            connected += 1
            k = n % 3
            if k == 0:
                c.sendall(struct.pack(">IB", 0x7FFFFFFF, 1))
            elif k == 1:
                c.sendall(hello(roles[n // 3 % 3]) + big)
            else:
                c.sendall(big)
            sent += 1
        except OSError:
            pass
        held.append(c)
    for c in held:
        c.close()
print("HOSTILE DONE connections=%d connected=%d sent=%d wave=%d seconds=%.1f" % (n, connected, sent, wave, time.time() - t0), flush=True)
time.sleep(3600)
"#;

#[test]
fn a_hostile_session_cannot_raise_the_servers_memory_or_descriptors() {
    // The default agent channel budget, written out: 4 MiB a session.
    let s = Server::start(ServerOptions {
        tables: "[agent_channel]\nbuffer_kib = 4096\npending = 4\nstreams = 8\n".into(),
        ..ServerOptions::default()
    });
    let pid = s.pid();
    assert!(
        Path::new("/usr/bin/python3").exists(),
        "the hostile client needs /usr/bin/python3"
    );
    let (b, _) = ready(&s, json!({ "start_url": "about:blank" }));
    let (base_rss, base_fds) = proc_status(pid);

    let samples = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = std::thread::spawn({
        let (samples, stop) = (samples.clone(), stop.clone());
        move || {
            while !stop.load(Ordering::Relaxed) {
                samples.lock().unwrap().push(proc_status(pid));
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    });
    let (h, _) = ready(
        &s,
        json!({ "start_url": "about:blank", "launch": ["/usr/bin/python3", "-c", HOSTILE] }),
    );
    // While it runs: the API answers and another session starts.
    let t0 = Instant::now();
    let (c, _) = ready(&s, json!({ "start_url": "about:blank" }));
    let c_ready = t0.elapsed();
    let mut api_slowest = Duration::ZERO;
    let deadline = Instant::now() + Duration::from_secs(300);
    let done = loop {
        let t = Instant::now();
        let logs = s.api("GET", &format!("/api/sessions/{h}/logs"), None);
        api_slowest = api_slowest.max(t.elapsed());
        assert_eq!(logs.status, 200, "{logs:?}");
        if let Some(l) = logs.body.lines().find(|l| l.contains("HOSTILE DONE")) {
            break l.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "the hostile client did not finish; its log:\n{}",
            logs.body
        );
        let t = Instant::now();
        assert_eq!(s.session(&b)["state"], "ready");
        api_slowest = api_slowest.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(200));
    };
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let samples = samples.lock().unwrap();
    let max_rss = samples.iter().map(|s| s.0).max().unwrap();
    let max_fds = samples.iter().map(|s| s.1).max().unwrap();
    eprintln!(
        "{done}; server RSS {base_rss} KiB -> max {max_rss} KiB, fds {base_fds} -> max {max_fds} \
         ({} samples); session C ready in {c_ready:?}; slowest API answer {api_slowest:?}",
        samples.len()
    );
    assert!(done.contains("connections=10000"), "{done}");
    // The server took them (and closed them), not the kernel's backlog.
    let connected: u32 = done
        .split("connected=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("connected=");
    assert!(connected >= 9000, "{done}");
    // Bound: the hostile session's 4 MiB budget, plus what two ordinary
    // sessions (H's and C's normal start) cost, with room for the
    // allocator. Before the bounds, 200 such connections took 1.4 GiB.
    let growth_mib = (max_rss.saturating_sub(base_rss)) / 1024;
    assert!(growth_mib <= 48, "server RSS grew by {growth_mib} MiB");
    // Bound: `pending` waiting connections, one control and one video each
    // for H and C, their listeners and C's own connections, with room.
    let fd_growth = max_fds.saturating_sub(base_fds);
    assert!(fd_growth <= 48, "server descriptors grew by {fd_growth}");
    assert!(
        api_slowest < Duration::from_secs(2),
        "an API answer took {api_slowest:?}"
    );
    let b_after = s.session(&b);
    assert!(children_running(&b_after), "{b_after:#}");
    for id in [&h, &c, &b] {
        delete_clean(&s, id);
    }
}
