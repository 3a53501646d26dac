//! Per-user profiles with the real server: what a user's first session
//! leaves (a cookie the page set, a file in the home) is there in their
//! next session and absent from another user's; one live session per
//! profile; the quota holds inside the session; a session killed while
//! writing leaves a profile the next one mounts; wipe, export and import.

use std::time::{Duration, Instant};

use sandcast_e2e::{
    Server, ServerOptions, agent_process, run_viewer, sigkill, wait_no_leftovers, with_query,
};
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(40);

/// Serves a page on the session's loopback and opens it in the session's
/// browser: red when the page's cookie is already there, green when it
/// sets it. Also notes in the home whether it saw the note before, and the
/// home's file system type.
const SITE: &str = r#"
import http.server, os, subprocess, threading
PAGE = b"""<!doctype html><body style="margin:0"><script>
const seen = document.cookie.includes('seen=1');
document.cookie = 'seen=1; max-age=31536000; path=/';
document.body.style.background = seen ? '#c00000' : '#00c000';
</script>"""
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)
    def log_message(self, *args):
        pass
note = os.path.expanduser("~/note.txt")
print("note before:", open(note).read() if os.path.exists(note) else "none", flush=True)
with open(note, "w") as f:
    f.write("written by " + os.environ.get("SESSION_MARK", "a session"))
print("home fs:", subprocess.run(["stat", "-f", "-c", "%T", os.path.expanduser("~")], capture_output=True, text=True).stdout.strip(), flush=True)
server = http.server.HTTPServer(("127.0.0.1", 8123), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
subprocess.run(["xdg-open", "http://127.0.0.1:8123/"], check=True)
threading.Event().wait()
"#;

fn profile_session(s: &Server, user: &str) -> Value {
    let created = s.create(&json!({
        "user_id": user,
        "profile": true,
        "start_url": "about:blank",
        "kiosk": true,
        "launch": ["python3", "-c", SITE],
    }));
    assert_eq!(created["profile"], true);
    s.wait_state(created["id"].as_str().unwrap(), "ready", READY);
    created
}

/// Waits until the session's log holds `needle`; returns the log.
fn log_with(s: &Server, id: &str, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = s.api("GET", &format!("/api/sessions/{id}/logs"), None).body;
        if logs.contains(needle) {
            return logs;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log: {logs}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The page the session opened shows `colour` in the real viewer.
fn shows(created: &Value, colour: &str) {
    let url = with_query(created["viewer_url"].as_str().unwrap(), "mode=webrtc");
    let view = run_viewer(&json!({
        "url": url, "kind": "video", "mode": "webrtc",
        "steps": [{ "expect": colour, "timeoutMs": 30000 }],
    }));
    assert_eq!(view["steps"][0]["ok"], true, "{}", view["steps"]);
}

/// The member names of a tar archive, listed by tar(1).
fn tar_names(archive: &[u8]) -> Vec<String> {
    use std::io::Write;
    let mut tar = std::process::Command::new("tar")
        .args(["-tf", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("tar");
    tar.stdin.take().unwrap().write_all(archive).unwrap();
    let out = tar.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

fn end(s: &Server, id: &str) {
    assert_eq!(s.delete(id)["state"], "stopped");
    let left = wait_no_leftovers(id, Duration::from_secs(15));
    assert!(left.is_empty(), "session {id} left behind: {left:?}");
}

#[test]
fn a_users_profile_carries_cookies_and_files_to_their_next_session_only() {
    let s = Server::start_default();
    let first = profile_session(&s, "alice");
    let a = first["id"].as_str().unwrap().to_string();
    let logs = log_with(&s, &a, "home fs:");
    assert!(logs.contains("note before: none"), "{logs}");
    // The mount really happened: the home is the profile's ext4.
    assert!(logs.contains("home fs: ext2/ext3"), "{logs}");
    shows(&first, "#00c000");

    // One live session per profile: the same user gets it again, with a
    // new viewer token, or a 409 when asked to refuse.
    let again = s.api(
        "POST",
        "/api/sessions",
        Some(&json!({ "user_id": "alice", "profile": true }).to_string()),
    );
    assert_eq!(again.status, 200, "{again:?}");
    let again = again.json();
    assert_eq!(again["id"], a.as_str());
    assert_ne!(again["viewer_token"], first["viewer_token"]);
    let refused = s.api(
        "POST",
        "/api/sessions",
        Some(
            &json!({ "user_id": "alice", "profile": true, "profile_conflict": "reject" })
                .to_string(),
        ),
    );
    assert_eq!(refused.status, 409, "{refused:?}");
    assert!(refused.body.contains(&a), "{refused:?}");
    let busy = s.api("DELETE", "/api/users/alice/profile", None);
    assert_eq!(busy.status, 409, "{busy:?}");
    let info = s.api("GET", "/api/users/alice/profile", None).json();
    assert_eq!(info["live_session"], a.as_str());
    end(&s, &a);

    let info = s.api("GET", "/api/users/alice/profile", None).json();
    assert_eq!(info["user_id"], "alice");
    assert_eq!(info["size_mib"], 512);
    assert_eq!(info["last_session"], a.as_str());
    assert_eq!(info["live_session"], Value::Null);
    assert!(info["used_bytes"].as_u64().unwrap() > 0);

    // Her next session: the page finds its cookie, the note is there.
    let second = profile_session(&s, "alice");
    let b = second["id"].as_str().unwrap().to_string();
    assert_ne!(a, b);
    let logs = log_with(&s, &b, "home fs:");
    assert!(logs.contains("note before: written by a session"), "{logs}");
    shows(&second, "#c00000");
    end(&s, &b);

    // Another user's profile is another file system.
    let other = profile_session(&s, "bob");
    let c = other["id"].as_str().unwrap().to_string();
    let logs = log_with(&s, &c, "home fs:");
    assert!(logs.contains("note before: none"), "{logs}");
    shows(&other, "#00c000");
    end(&s, &c);

    // Export, wipe, import.
    let tar = s.api("GET", "/api/users/alice/profile?archive=tar", None);
    assert_eq!(tar.status, 200);
    let names = tar_names(&tar.bytes);
    assert!(
        names.iter().any(|n| n == "./note.txt"),
        "no note in the export: {names:?}"
    );
    assert!(
        names.iter().any(|n| n.ends_with("Default/Cookies")),
        "{names:?}"
    );
    assert_eq!(
        s.api("DELETE", "/api/users/alice/profile", None).status,
        204
    );
    assert_eq!(s.api("GET", "/api/users/alice/profile", None).status, 404);
    let key = format!("Bearer {}", s.api_key);
    let put = s.raw(
        "PUT",
        "/api/users/alice/profile",
        &[
            ("authorization", &key),
            ("content-type", "application/x-tar"),
        ],
        Some(&tar.bytes),
    );
    assert_eq!(put.status, 200, "{put:?}");
    let third = profile_session(&s, "alice");
    let d = third["id"].as_str().unwrap().to_string();
    let logs = log_with(&s, &d, "home fs:");
    assert!(logs.contains("note before: written by a session"), "{logs}");
    end(&s, &d);
    let bad = s.raw(
        "PUT",
        "/api/users/alice/profile",
        &[("authorization", &key)],
        Some(b"not a tar archive"),
    );
    assert_eq!(bad.status, 400, "{bad:?}");
    assert_eq!(
        s.api(
            "POST",
            "/api/sessions",
            Some(&json!({ "profile": true }).to_string())
        )
        .status,
        400,
        "a profile without a user"
    );
}

#[test]
fn a_full_profile_fails_writes_inside_and_a_killed_session_leaves_it_usable() {
    let s = Server::start(ServerOptions {
        env: vec![("SANDCAST_SESSION__PROFILE_MIB".into(), "16".into())],
        ..Default::default()
    });
    // Past the quota: the write fails in the session, nothing else does.
    let full = s.create(&json!({
        "user_id": "carol", "profile": true, "start_url": "about:blank",
        "launch": ["sh", "-c", "dd if=/dev/zero of=$HOME/big bs=1M count=64 2>&1; echo dd-exit=$?; exec sleep 3600"],
    }));
    let id = full["id"].as_str().unwrap().to_string();
    s.wait_state(&id, "ready", READY);
    let logs = log_with(&s, &id, "dd-exit=");
    assert!(logs.contains("No space left on device"), "{logs}");
    assert!(!logs.contains("dd-exit=0"), "{logs}");
    assert_eq!(s.session(&id)["state"], "ready");
    let info = s.api("GET", "/api/users/carol/profile", None).json();
    assert_eq!(info["size_mib"], 16);
    end(&s, &id);

    // Killed mid-write: the journal keeps the file system whole, and the
    // next session mounts it after e2fsck.
    let writing = s.create(&json!({
        "user_id": "carol", "profile": true, "start_url": "about:blank",
        "launch": ["sh", "-c", "rm -f $HOME/big; i=0; while :; do echo line-$i >> $HOME/lines.txt; i=$((i+1)); done"],
    }));
    let w = writing["id"].as_str().unwrap().to_string();
    s.wait_state(&w, "ready", READY);
    let deadline = Instant::now() + Duration::from_secs(20);
    while s
        .api("GET", &format!("/api/sessions/{w}/files/lines.txt"), None)
        .body
        .len()
        < 10_000
    {
        assert!(Instant::now() < deadline, "the writer did not write");
        std::thread::sleep(Duration::from_millis(50));
    }
    let agent = agent_process(&w).expect("the session's agent");
    sigkill(agent.pid);
    s.wait_state(&w, "failed", Duration::from_secs(20));
    let left = wait_no_leftovers(&w, Duration::from_secs(15));
    assert!(left.is_empty(), "session {w} left behind: {left:?}");
    let next = s.create(&json!({
        "user_id": "carol", "profile": true, "start_url": "about:blank",
    }));
    let n = next["id"].as_str().unwrap().to_string();
    s.wait_state(&n, "ready", READY);
    let lines = s.api("GET", &format!("/api/sessions/{n}/files/lines.txt"), None);
    assert_eq!(lines.status, 200);
    assert!(
        lines.body.starts_with("line-0\nline-1\n"),
        "{}",
        &lines.body[..40.min(lines.body.len())]
    );
    end(&s, &n);

    // The user clicks again the moment a session completes: the new one
    // waits for the profile to be let go of, and has what the other wrote.
    let once = s.create(&json!({
        "user_id": "carol", "profile": true, "start_url": "about:blank",
        // The killed writer above may have filled the 16 MiB profile.
        "launch": ["sh", "-c", "rm -f $HOME/lines.txt; echo handed-over > $HOME/h.txt"], "complete_on": "launch_exit",
    }));
    let o = once["id"].as_str().unwrap().to_string();
    s.wait_state(&o, "completed", READY);
    let next = s.api(
        "POST",
        "/api/sessions",
        Some(
            &json!({ "user_id": "carol", "profile": true, "start_url": "about:blank" }).to_string(),
        ),
    );
    assert_eq!(next.status, 201, "{next:?}");
    let n = next.json()["id"].as_str().unwrap().to_string();
    assert_ne!(n, o);
    s.wait_state(&n, "ready", READY);
    let h = s.api("GET", &format!("/api/sessions/{n}/files/h.txt"), None);
    assert_eq!(h.body, "handed-over\n", "{h:?}");
    end(&s, &n);
}
