//! TLS built in: the real `sandcast serve` with `tls_cert`/`tls_key` made by
//! the test (a private CA and a certificate for 127.0.0.1), its API over
//! https, the `sandcast` client with `SANDCAST_CA_CERT`, plain HTTP refused,
//! and a session's viewer over https in headless Chromium, still a secure
//! context and still streaming over WebRTC.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use sandcast_e2e::{
    Server, ServerOptions, colours, input_page, run_viewer, wait_no_leftovers, with_query,
};
use serde_json::json;
use sha2::Digest;

/// A CA and a server certificate it signed for 127.0.0.1 and localhost,
/// written as PEM files (the key 0600).
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    /// base64 SHA-256 of the server key's SubjectPublicKeyInfo, for
    /// Chromium's `--ignore-certificate-errors-spki-list`.
    spki_sha256: String,
}

fn pki(name: &str) -> Pki {
    use rcgen::PublicKeyData;
    use std::os::unix::fs::PermissionsExt;
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("sandcast e2e CA {name}"));
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = |f: &str| dir.path().join(f);
    std::fs::write(path("ca.pem"), ca.pem()).unwrap();
    std::fs::write(path("cert.pem"), cert.pem()).unwrap();
    std::fs::write(path("key.pem"), key.serialize_pem()).unwrap();
    std::fs::set_permissions(path("key.pem"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let spki = sha2::Sha256::digest(key.subject_public_key_info());
    Pki {
        ca: path("ca.pem"),
        cert: path("cert.pem"),
        key: path("key.pem"),
        spki_sha256: base64::engine::general_purpose::STANDARD.encode(spki),
        _dir: dir,
    }
}

fn tls_server(p: &Pki) -> Server {
    Server::start(ServerOptions {
        top: format!(
            "tls_cert = {:?}\ntls_key = {:?}\n",
            p.cert.to_str().unwrap(),
            p.key.to_str().unwrap()
        ),
        ca_cert: Some(p.ca.clone()),
        ..Default::default()
    })
}

/// What the server answers a plain HTTP request on its port (empty when it
/// closes the connection without a word).
fn plain_http(port: u16) -> Vec<u8> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

fn ca_arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn api_and_cli_over_https_and_plain_http_refused() {
    let p = pki("a");
    let s = tls_server(&p);
    assert!(s.base.starts_with("https://127.0.0.1:"), "{}", s.base);
    assert!(
        !s.logs().contains("without TLS"),
        "no plain-HTTP warning with TLS on:\n{}",
        s.logs()
    );

    let r = s.api("GET", "/api/sessions", None);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.json()["sessions"].is_array(), "{}", r.body);
    let r = s.raw("GET", "/api/sessions", &[], None);
    assert_eq!(r.status, 401, "no key over https is still refused: {r:?}");

    let answer = plain_http(s.port);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain HTTP got an HTTP answer: {:?}",
        String::from_utf8_lossy(&answer)
    );

    // The CLI with SANDCAST_CA_CERT (set by the harness) trusts the server...
    let (code, out, err) = s.cli(&["session", "list"]);
    assert_eq!(code, 0, "sandcast session list over https: {out}{err}");
    assert!(out.contains("\"sessions\""), "{out}");
    // ...and with another CA it refuses the server, saying why.
    let other = pki("other");
    let (code, out, err) = s.cli(&["session", "--ca-cert", ca_arg(&other.ca), "list"]);
    assert_ne!(
        code, 0,
        "a server certificate of another CA is refused: {out}"
    );
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    let (code, _, err) = s.cli(&["session", "--ca-cert", "/nonexistent/ca.pem", "list"]);
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");
}

#[test]
fn a_viewer_over_https_is_a_secure_context_and_streams_over_webrtc() {
    let p = pki("a");
    let s = tls_server(&p);
    let created = s.create(&json!({
        "start_url": input_page(), "kiosk": true, "width": 1280, "height": 720
    }));
    let id = created["id"].as_str().expect("id").to_string();
    let url = created["viewer_url"].as_str().expect("viewer_url");
    assert!(
        url.starts_with(&format!("{}/viewer/", s.base)),
        "viewer_url {url} is not under {}",
        s.base
    );
    s.wait_state(&id, "ready", Duration::from_secs(40));

    let view = run_viewer(&json!({
        "url": url,
        "kind": "video",
        "mode": "webrtc",
        // Trusts exactly this test's server key; the page stays a secure context.
        "chromiumArgs": [format!("--ignore-certificate-errors-spki-list={}", p.spki_sha256)],
        "steps": [
            { "expect": colours::START, "timeoutMs": 30000 },
            { "click": true },
            { "expect": colours::CLICKED },
            { "stats": true },
        ],
    }));
    eprintln!("viewer over https: {}", view["steps"]);
    let sample = &view["steps"][0]["samples"][0];
    assert_eq!(sample["secureContext"], true, "{sample}");
    assert_eq!(sample["notice"], json!(null), "{sample}");
    let stats = &view["steps"][3]["stats"][0];
    assert!(stats["framesDecoded"].as_u64().unwrap_or(0) > 0, "{stats}");

    // noVNC's WebSocket tunnel over WSS on the same port.
    let vnc = run_viewer(&json!({
        "url": with_query(url, "mode=vnc"),
        "kind": "canvas",
        "mode": "vnc",
        "chromiumArgs": [format!("--ignore-certificate-errors-spki-list={}", p.spki_sha256)],
        "steps": [{ "expect": colours::CLICKED, "timeoutMs": 30000 }],
    }));
    assert_eq!(
        vnc["steps"][0]["samples"][0]["secureContext"], true,
        "{vnc}"
    );

    let stopped = s.delete(&id);
    assert_eq!(stopped["state"], "stopped", "{stopped:#}");
    let left = wait_no_leftovers(&id, Duration::from_secs(15));
    assert!(
        left.is_empty(),
        "session {id} left behind:\n{}",
        left.join("\n")
    );
}

/// Runs `sandcast doctor` with a throw-away data directory; (success, output).
fn doctor(args: &[&str], env: &[(&str, &Path)]) -> (bool, String) {
    let data = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(sandcast_e2e::bin_dir().join("sandcast"));
    cmd.arg("doctor")
        .arg("--data-dir")
        .arg(data.path())
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run sandcast doctor");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn doctor_warns_about_plain_http_beyond_loopback_and_checks_the_pair() {
    use std::os::unix::fs::PermissionsExt;
    let (ok, text) = doctor(&["--listen", "0.0.0.0:8080"], &[]);
    assert!(ok, "a warning is no failure:\n{text}");
    let warn = text
        .lines()
        .find(|l| l.starts_with("warn") && l.contains("without TLS"))
        .unwrap_or_else(|| panic!("no plain-HTTP warning:\n{text}"));
    assert!(
        warn.contains("API key") && warn.contains("clipboard"),
        "{warn}"
    );
    let (_, text) = doctor(&["--listen", "127.0.0.1:8080"], &[]);
    assert!(!text.contains("without TLS"), "loopback is fine:\n{text}");

    let p = pki("a");
    let files = [
        ("SANDCAST_TLS_CERT", p.cert.as_path()),
        ("SANDCAST_TLS_KEY", p.key.as_path()),
    ];
    let (_, text) = doctor(&["--listen", "0.0.0.0:8080"], &files);
    assert!(
        text.lines()
            .any(|l| l.starts_with("ok") && l.contains("tls")),
        "{text}"
    );
    assert!(!text.contains("without TLS"), "{text}");
    assert!(!text.contains("chmod"), "{text}");

    std::fs::set_permissions(&p.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (_, text) = doctor(&[], &files);
    assert!(
        text.lines()
            .any(|l| l.starts_with("warn") && l.contains("chmod 600")),
        "a key readable by others is warned about:\n{text}"
    );

    let other = pki("b");
    let mismatched = [
        ("SANDCAST_TLS_CERT", p.cert.as_path()),
        ("SANDCAST_TLS_KEY", other.key.as_path()),
    ];
    let (ok, text) = doctor(&[], &mismatched);
    assert!(!ok, "a key of another certificate fails:\n{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("FAIL") && l.contains("does not belong")),
        "{text}"
    );
}

#[test]
fn serve_refuses_to_start_with_a_pair_that_does_not_load() {
    let p = pki("a");
    let other = pki("b");
    let data = tempfile::tempdir().unwrap();
    let serve = |cert: &Path, key: &Path| {
        let out = std::process::Command::new(sandcast_e2e::bin_dir().join("sandcast"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data.path())
            .env("SANDCAST_TLS_CERT", cert)
            .env("SANDCAST_TLS_KEY", key)
            .env_remove("SANDCAST_API_KEY")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run sandcast serve");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), err)
    };
    let (code, err) = serve(Path::new("/nonexistent/cert.pem"), &p.key);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("/nonexistent/cert.pem"), "{err}");
    let (code, err) = serve(&p.cert, &other.key);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("does not belong"), "{err}");
}
