//! The `sandcast` command line against a real server: the session
//! commands, `serve --open-session` and `doctor`.

use std::time::Duration;

use sandcast_e2e::{Server, ServerOptions, bin_dir, input_page, wait_no_leftovers};
use serde_json::Value;

fn json_of(out: &str) -> Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"))
}

#[test]
fn session_commands_drive_the_api() {
    let s = Server::start_default();
    let page = input_page();
    let (code, out, err) = s.cli(&[
        "session",
        "create",
        "--start-url",
        &page,
        "--width",
        "1024",
        "--height",
        "768",
        "--wait",
    ]);
    assert_eq!(code, 0, "create failed: {out}\n{err}");
    let created = json_of(&out);
    let id = created["id"].as_str().expect("id").to_string();
    let got = s.session(&id);
    assert_eq!(
        got["state"], "ready",
        "--wait returned before ready: {got:#}"
    );
    assert_eq!(
        (got["width"].as_u64(), got["height"].as_u64()),
        (Some(1024), Some(768))
    );

    let (code, out, err) = s.cli(&["session", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&id), "list lacks {id}: {out}");
    let (code, out, err) = s.cli(&["session", "list", "--state", "stopped,failed"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains(&id),
        "a ready session is listed as stopped or failed: {out}"
    );
    let (code, out, err) = s.cli(&["session", "list", "--state", "nonsense"]);
    assert_ne!(code, 0, "a bad state filter was accepted: {out}");
    assert!(
        err.contains("nonsense"),
        "the error does not name it: {err}"
    );
    let (code, out, err) = s.cli(&["session", "get", &id]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json_of(&out)["id"], id.as_str());
    let (code, out, err) = s.cli(&["session", "logs", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("browser"), "logs: {out}");
    let (code, out, err) = s.cli(&["session", "logs", &id, "--tail", "2"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 2, "--tail 2 printed: {out}");

    let (code, out, err) = s.cli(&["session", "get", "no-such-session-42"]);
    assert_ne!(code, 0, "get of an unknown session succeeded: {out}");
    assert!(
        err.contains("no-such-session-42") || err.contains("404"),
        "{err}"
    );
    let (code, _, err) = s.cli(&["session", "create", "--start-url", "file:///etc/passwd"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("file"),
        "bad URL error does not name it: {err}"
    );

    let (code, _, err) = s.cli(&["session", "delete", &id]);
    assert_eq!(code, 0, "{err}");
    s.wait_state(&id, "stopped", Duration::from_secs(20));
    let left = wait_no_leftovers(&id, Duration::from_secs(15));
    assert!(left.is_empty(), "left behind:\n{}", left.join("\n"));
}

#[test]
fn serve_open_session_prints_the_viewer_of_a_ready_session() {
    let s = Server::start(ServerOptions {
        args: vec!["--open-session".into()],
        ..Default::default()
    });
    let line = s.wait_output("viewer: ", Duration::from_secs(60));
    let url = line.split("viewer: ").nth(1).unwrap().trim().to_string();
    assert!(url.starts_with(&format!("{}/viewer/", s.base)), "{url}");
    let (path, token) = url
        .split_once("#token=")
        .unwrap_or_else(|| panic!("no token in {url}"));
    let id = path.rsplit('/').next().unwrap();
    let st = s.raw(
        "GET",
        &format!("/viewer/{id}/state"),
        &[("authorization", &format!("Bearer {token}"))],
        None,
    );
    assert_eq!(st.status, 200, "{st:?}");
    assert_eq!(st.json()["state"], "ready", "{}", st.body);
    assert!(
        !s.logs().replace(&line, "").contains(token),
        "the token was printed elsewhere too"
    );
    s.delete(id);
}

/// The variables of the log filter and the client, exported as a user of
/// both would have them.
fn client_env(data_dir: &str) -> Vec<(String, String)> {
    [
        ("SANDCAST_LOG", "debug"),
        ("SANDCAST_SERVER", "http://127.0.0.1:9"),
        ("SANDCAST_API_KEY", "a-key-from-the-environment"),
        ("SANDCAST_DATA_DIR", data_dir),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

#[test]
fn serve_starts_with_the_log_and_client_variables_exported() {
    let other = tempfile::tempdir().expect("temp dir");
    let env = client_env(other.path().to_str().unwrap());
    let s = Server::start(ServerOptions {
        env: env.clone(),
        ..Default::default()
    });
    // SANDCAST_API_KEY is the server's key too.
    assert_eq!(s.api_key, "a-key-from-the-environment");
    assert_eq!(s.api("GET", "/api/sessions", None).status, 200);
    // SANDCAST_LOG is the log filter.
    s.wait_output("DEBUG", Duration::from_secs(10));
    let logs = s.logs();
    assert!(
        !logs.contains("ignoring SANDCAST_"),
        "serve warned about a variable of its own:\n{logs}"
    );
    // The client reads SANDCAST_SERVER beside a server started with it.
    let (code, out, err) = s.cli(&["session", "list"]);
    assert_eq!(code, 0, "session list: {out}\n{err}");
    drop(s);
    // A variable naming no setting is ignored with a warning.
    let s = Server::start(ServerOptions {
        env: vec![("SANDCAST_LISTN".into(), "127.0.0.1:1".into())],
        ..Default::default()
    });
    s.wait_output("ignoring SANDCAST_LISTN", Duration::from_secs(10));
}

#[test]
fn doctor_says_this_host_is_ready() {
    let other = tempfile::tempdir().expect("temp dir");
    let out = std::process::Command::new(bin_dir().join("sandcast"))
        .arg("doctor")
        .envs(client_env(other.path().to_str().unwrap()))
        .output()
        .expect("run sandcast doctor");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "doctor says the host is not ready:\n{text}"
    );
    assert!(
        text.to_lowercase().contains("chromium"),
        "doctor does not check the browser:\n{text}"
    );
}
