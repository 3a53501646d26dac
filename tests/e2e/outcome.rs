//! A session that produces something: a command-line tool's login run in
//! the session (its sign-in page opened with xdg-open in the session's
//! browser, signed in through the real viewer, its OAuth callback received
//! on the session's loopback), the session completed by the tool's exit,
//! its token collected and kept for `result_ttl_seconds`; and the files
//! API, with every way out of the home refused.

use std::time::{Duration, Instant};

use base64::Engine;
use sandcast_e2e::webhook_receiver::{self, Receiver};
use sandcast_e2e::{Server, ServerOptions, run_viewer, wait_no_leftovers, with_query};
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(40);

/// A tool's `login`: serves a sign-in page on the session's loopback, opens
/// it with xdg-open, and on the callback writes its token and exits 0. The
/// page is one green text field over the whole window.
const DEMOCLI_LOGIN: &str = r#"
import http.server, json, os, subprocess, urllib.parse
PAGE = b"""<!doctype html><title>Sign in to democli</title>
<form action="/callback"><input name="code" autofocus autocomplete="off"
 style="position:fixed;inset:0;width:100%;height:100%;border:0;margin:0;
 background:#00c000;color:#00c000;font-size:1px"></form>"""
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        body = PAGE
        if url.path == "/callback":
            code = urllib.parse.parse_qs(url.query).get("code", [""])[0]
            home = os.path.expanduser("~/.config/democli")
            os.makedirs(home, exist_ok=True)
            with open(os.path.join(home, "token.json"), "w") as f:
                json.dump({"token": "tok-" + code}, f)
            self.server.done = True
            body = b"<title>done</title>signed in"
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
server.done = False
subprocess.run(["xdg-open", "http://127.0.0.1:%d/signin" % server.server_port], check=True)
while not server.done:
    server.handle_request()
print("democli: signed in", flush=True)
"#;

fn b64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64")
}

#[test]
fn a_cli_login_signed_in_through_the_viewer_completes_the_session_with_its_token() {
    let hooks = Receiver::start(&[]);
    let s = Server::start(ServerOptions {
        tables: webhook_receiver::tables(&hooks.url),
        ..Default::default()
    });
    let created = s.create(&json!({
        "user_id": "alice",
        "start_url": "about:blank",
        "kiosk": true,
        "launch": ["python3", "-c", DEMOCLI_LOGIN],
        "complete_on": "launch_exit",
        "collect": ["~/.config/democli/token.json", "~/.config/democli/absent"],
        "result_ttl_seconds": 4,
    }));
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["complete_on"], "launch_exit");
    s.wait_state(&id, "ready", READY);
    // The person sees the sign-in page the tool opened, types a name into
    // it through the viewer and presses Enter.
    let url = with_query(created["viewer_url"].as_str().unwrap(), "mode=webrtc");
    let view = run_viewer(&json!({
        "url": url,
        "kind": "video",
        "mode": "webrtc",
        "steps": [
            { "expect": "#00c000", "timeoutMs": 30000 },
            { "click": true },
            { "type": "alice" },
            { "press": "Enter" },
        ],
    }));
    assert!(
        view["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["ok"] == true),
        "viewer steps: {}",
        view["steps"]
    );
    let done = s.wait_state(&id, "completed", Duration::from_secs(30));
    assert_eq!(done["exit_code"], 0, "{done}");
    let logs = s.api("GET", &format!("/api/sessions/{id}/logs"), None).body;
    assert!(logs.contains("democli: signed in"), "{logs}");
    // The operator's endpoint hears of it, signed.
    hooks.wait("the completed event", Duration::from_secs(30), |got| {
        got.iter()
            .any(|r| r.acknowledged() && r.event() == "completed")
    });
    let completed = hooks
        .acknowledged()
        .into_iter()
        .find(|r| r.event() == "completed")
        .unwrap();
    assert_eq!(
        completed.header("x-sandcast-signature"),
        webhook_receiver::expected_signature(&completed.body)
    );
    let event = completed.json();
    assert_eq!(event["session_id"], id.as_str());
    assert_eq!(event["user_id"], "alice");
    assert_eq!(event["data"]["exit_code"], 0, "{event}");

    let r = s.api("GET", &format!("/api/sessions/{id}/result"), None);
    assert_eq!(r.status, 200, "{r:?}");
    let result = r.json();
    assert_eq!(result["exit_code"], 0);
    let token: Value =
        serde_json::from_slice(&b64(result["files"]["~/.config/democli/token.json"]
            .as_str()
            .unwrap()))
        .unwrap();
    assert_eq!(token, json!({ "token": "tok-alice" }));
    assert!(
        result["missing"]["~/.config/democli/absent"]
            .as_str()
            .is_some(),
        "{result}"
    );
    // The token never reaches a log.
    let logs = s.api("GET", &format!("/api/sessions/{id}/logs"), None).body;
    assert!(!logs.contains("tok-alice") && !s.logs().contains("tok-alice"));
    let tar = s.api(
        "GET",
        &format!("/api/sessions/{id}/result?format=tar"),
        None,
    );
    assert_eq!(tar.status, 200);
    assert!(tar.body.contains(".config/democli/token.json") && tar.body.contains("tok-alice"));

    // Nothing of the session runs any more, and the result goes after its
    // time to live.
    let left = wait_no_leftovers(&id, Duration::from_secs(15));
    assert!(left.is_empty(), "session {id} left behind: {left:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = s.api("GET", &format!("/api/sessions/{id}/result"), None);
        if r.status == 404 {
            assert!(r.body.contains("expired"), "{r:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the result outlived its 4 s: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let files = std::fs::read_dir(s.data_dir().join("results"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(files, 0, "the result file is still on disk");
}

#[test]
fn a_non_zero_exit_fails_the_session_and_a_bad_outcome_request_is_refused() {
    let s = Server::start_default();
    let created = s.create(&json!({
        "start_url": "about:blank",
        "launch": ["sh", "-c", "echo no-login >&2; exit 7"],
        "complete_on": "launch_exit",
    }));
    let id = created["id"].as_str().unwrap();
    let failed = s.wait_state(id, "failed", READY);
    assert_eq!(failed["exit_code"], 7, "{failed}");
    assert!(
        failed["reason"].as_str().unwrap().contains("exit code 7"),
        "{failed}"
    );

    // More files than a session may have streams waiting
    // ([agent_channel] streams, 8): they are read one after the other.
    let paths: Vec<String> = (0..12).map(|i| format!("~/out/f{i}")).collect();
    let many = s.create(&json!({
        "start_url": "about:blank",
        "launch": ["sh", "-c", "mkdir -p $HOME/out; for i in 0 1 2 3 4 5 6 7 8 9 10 11; do echo file-$i > $HOME/out/f$i; done"],
        "complete_on": "launch_exit",
        "collect": paths,
    }));
    let id = many["id"].as_str().unwrap();
    s.wait_state(id, "completed", READY);
    let result = s
        .api("GET", &format!("/api/sessions/{id}/result"), None)
        .json();
    for i in 0..12 {
        let got = b64(result["files"][format!("~/out/f{i}")]
            .as_str()
            .unwrap_or_default());
        assert_eq!(got, format!("file-{i}\n").as_bytes(), "{result}");
    }

    for (body, field) in [
        (json!({ "complete_on": "launch_exit" }), "complete_on"),
        (json!({ "complete_on": "sometime" }), ""),
        (
            json!({ "launch": ["true"], "complete_on": "launch_exit", "collect": ["../etc/passwd"] }),
            "collect",
        ),
        (
            json!({ "launch": ["true"], "complete_on": "launch_exit", "collect": ["/etc/passwd"] }),
            "collect",
        ),
        (json!({ "launch": ["true"], "collect": ["a"] }), "collect"),
        (
            json!({ "launch": ["true"], "complete_on": "launch_exit", "result_ttl_seconds": 0 }),
            "result_ttl_seconds",
        ),
    ] {
        let r = s.api("POST", "/api/sessions", Some(&body.to_string()));
        assert_eq!(r.status, 400, "{body}: {r:?}");
        assert!(r.body.contains(field), "{body}: {r:?}");
    }
}

/// A session whose home holds the ways out a hostile session would plant.
fn files_session(s: &Server) -> String {
    let created = s.create(&json!({
        "start_url": "about:blank",
        "launch": ["sh", "-c", "ln -s /etc ~/etc; ln -s /tmp/other ~/other; mkdir -p /tmp/other ~/in; \
                   echo outside > /tmp/other/secret; ln -s in ~/inner; mkfifo ~/fifo; \
                   ln -s /etc/hostname ~/hostname; touch ~/planted; exec sleep 3600"],
    }));
    let id = created["id"].as_str().unwrap().to_string();
    s.wait_state(&id, "ready", READY);
    // The launch command's files are there before the test goes on.
    let deadline = Instant::now() + Duration::from_secs(20);
    while s
        .api("GET", &format!("/api/sessions/{id}/files/planted"), None)
        .status
        != 200
    {
        assert!(Instant::now() < deadline, "the launch command did not run");
        std::thread::sleep(Duration::from_millis(100));
    }
    id
}

#[test]
fn files_go_in_and_out_of_the_home_and_nowhere_else() {
    let s = Server::start_default();
    let id = files_session(&s);
    let files = |p: &str| format!("/api/sessions/{id}/files/{p}");
    let auth = format!("Bearer {}", s.api_key);

    // 50 MiB in and out again, whole.
    let big: Vec<u8> = (0..50u32 << 20).map(|i| b'a' + (i % 26) as u8).collect();
    let put = s.raw(
        "PUT",
        &files("in/deep/big.bin"),
        &[
            ("authorization", &auth),
            ("content-type", "application/octet-stream"),
        ],
        Some(&big),
    );
    assert_eq!(put.status, 200, "{put:?}");
    assert_eq!(put.json()["size"], big.len() as u64);
    let got = s.api("GET", &files("inner/deep/big.bin"), None);
    assert_eq!(got.status, 200);
    assert_eq!(got.body.len(), big.len());
    assert!(
        got.body.as_bytes() == big.as_slice(),
        "the file came back changed"
    );
    let listing = s.api("GET", &files("in/deep"), None).json();
    assert_eq!(listing["entries"][0]["name"], "big.bin");
    assert_eq!(listing["entries"][0]["size"], big.len() as u64);
    let home = s
        .api("GET", &format!("/api/sessions/{id}/files"), None)
        .json();
    let kind = |name: &str| {
        home["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["kind"].clone())
    };
    assert_eq!(kind("etc"), Some(json!("symlink")));
    assert_eq!(kind("in"), Some(json!("directory")));

    // Every way out is refused, with a message, and nothing outside moves.
    for (method, path) in [
        ("GET", "etc/passwd"),
        ("GET", "other/secret"),
        ("GET", "hostname"),
        ("GET", "fifo"),
        ("GET", "%2E%2E/%2E%2E/etc/passwd"),
        ("GET", "%2Fetc%2Fpasswd"),
        ("PUT", "etc/evil"),
        ("PUT", "other/secret"),
        ("PUT", "fifo"),
        ("DELETE", "other/secret"),
        ("GET", "other?archive=tar"),
        ("DELETE", "~"),
    ] {
        let body = b"overwritten".to_vec();
        let r = s.raw(
            method,
            &files(path),
            &[("authorization", &auth)],
            (method == "PUT").then_some(body.as_slice()),
        );
        assert_eq!(r.status, 400, "{method} {path}: {r:?}");
        assert!(
            r.json()["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{r:?}"
        );
    }
    // The symbolic links themselves can go; what they point to stays.
    assert_eq!(s.api("DELETE", &files("other"), None).status, 204);
    assert_eq!(s.api("DELETE", &files("etc"), None).status, 204);
    assert!(std::path::Path::new("/etc/passwd").exists());
    assert_eq!(s.api("GET", &files("etc"), None).status, 404);

    // Removal, and a clear answer for what is not there.
    assert_eq!(s.api("DELETE", &files("in"), None).status, 204);
    let r = s.api("GET", &files("in/deep/big.bin"), None);
    assert_eq!(r.status, 404, "{r:?}");

    assert_eq!(s.delete(&id)["state"], "stopped");
    let r = s.api("GET", &files("planted"), None);
    assert_eq!(r.status, 409, "{r:?}");
    assert!(r.body.contains("stopped"), "{r:?}");
    let left = wait_no_leftovers(&id, Duration::from_secs(15));
    assert!(left.is_empty(), "session {id} left behind: {left:?}");
}
