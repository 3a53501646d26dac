//! Downloads and uploads for the person in the viewer: a file the remote
//! page downloads is offered in the real viewer and saved through the
//! viewer route with the viewer token (exactly its bytes; no token, another
//! token or a name that climbs is refused); a file chooser the remote page
//! opens is answered with a file from the viewer's computer, which the page
//! then holds; and a session created with `transfers: false` has neither.

use std::time::Duration;

use sandcast_e2e::{Server, data_url, run_viewer, wait_no_leftovers, with_query};
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(40);

/// What the download page offers, with characters that need care on the
/// way (UTF-8, quotes, a line break).
const DOWNLOAD_NAME: &str = "e2e download ✓.txt";
const DOWNLOAD_TEXT: &str = "the downloaded bytes, exactly: ✓ \"quoted\"\nline two\n";

/// What the viewer's person picks for the upload page.
const UPLOAD_NAME: &str = "from the viewer ✓.txt";
const UPLOAD_TEXT: &str = "uploaded through the viewer ✓\n";

/// Green; a click anywhere downloads [`DOWNLOAD_TEXT`] as
/// [`DOWNLOAD_NAME`] (an `<a download>` of a blob over the whole page).
fn download_page() -> String {
    let js = |s: &str| serde_json::to_string(s).unwrap();
    data_url(&format!(
        "<!doctype html><html><head><meta charset=utf-8><title>download</title>\
         <style>html,body{{margin:0;height:100%;background:#00c000}}</style></head><body><script>\
         const a=document.createElement('a');\
         a.href=URL.createObjectURL(new Blob([{text}],{{type:'text/plain'}}));\
         a.download={name};a.style='position:fixed;inset:0';\
         document.body.append(a);\
         </script></body></html>",
        text = js(DOWNLOAD_TEXT),
        name = js(DOWNLOAD_NAME),
    ))
}

/// Green, an `<input type=file>` over the whole page; once a file is
/// chosen it turns red if the page holds exactly [`UPLOAD_NAME`] with
/// [`UPLOAD_TEXT`], yellow if it holds something else.
fn upload_page() -> String {
    let js = |s: &str| serde_json::to_string(s).unwrap();
    data_url(&format!(
        "<!doctype html><html><head><meta charset=utf-8><title>upload</title>\
         <style>html,body{{margin:0;height:100%;background:#00c000}}\
         input{{position:fixed;inset:0;width:100%;height:100%;opacity:0}}</style></head>\
         <body><input type=file id=f><script>\
         const f=document.getElementById('f');\
         f.addEventListener('change',async()=>{{const x=f.files[0];if(!x)return;const t=await x.text();\
           document.body.style.background=(x.name==={name}&&t==={text}&&x.size===new Blob([t]).size)?'#c00000':'#c0c000'}});\
         </script></body></html>",
        name = js(UPLOAD_NAME),
        text = js(UPLOAD_TEXT),
    ))
}

fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn steps_ok(r: &Value) -> bool {
    r["steps"]
        .as_array()
        .is_some_and(|s| s.iter().all(|s| s["ok"] == true))
}

#[test]
fn a_download_of_the_remote_page_is_saved_through_the_viewer() {
    let s = Server::start_default();
    let created = s.create(&json!({ "start_url": download_page() }));
    let id = created["id"].as_str().unwrap().to_string();
    let token = created["viewer_token"].as_str().unwrap().to_string();
    assert_eq!(created["transfers"], true, "{created}");
    s.wait_state(&id, "ready", READY);

    // The person clicks the page's link in the viewer; the viewer lists the
    // download and saves it through its route.
    let url = with_query(created["viewer_url"].as_str().unwrap(), "mode=webrtc");
    let view = run_viewer(&json!({
        "url": url,
        "kind": "video",
        "mode": "webrtc",
        "steps": [
            { "expect": "#00c000", "timeoutMs": 30000 },
            { "click": true },
            { "expectDownload": DOWNLOAD_NAME, "timeoutMs": 20000 },
            { "saveDownload": DOWNLOAD_NAME, "expectText": DOWNLOAD_TEXT },
        ],
    }));
    assert!(steps_ok(&view), "{view:#}");
    let listed = &view["steps"][2]["got"];
    assert_eq!(
        listed[0],
        json!({ "name": DOWNLOAD_NAME, "size": DOWNLOAD_TEXT.len() }),
        "{listed}"
    );

    // Over noVNC the input socket brings the same message; a second
    // download of the name replaces the first.
    let url = with_query(created["viewer_url"].as_str().unwrap(), "mode=vnc");
    let view = run_viewer(&json!({
        "url": url,
        "kind": "canvas",
        "mode": "vnc",
        "steps": [
            { "expect": "#00c000", "timeoutMs": 30000 },
            { "click": true },
            { "expectDownload": DOWNLOAD_NAME, "timeoutMs": 20000 },
        ],
    }));
    assert!(steps_ok(&view), "{view:#}");
    let listing = s
        .api("GET", &format!("/api/sessions/{id}/files/Downloads"), None)
        .json();
    assert_eq!(
        listing["entries"].as_array().map(Vec::len),
        Some(1),
        "{listing}"
    );

    // The route itself: the exact bytes with the viewer token, as an
    // attachment named in RFC 5987 form.
    let path = format!("/viewer/{id}/downloads/{}", pct(DOWNLOAD_NAME));
    let bearer = format!("Bearer {token}");
    let r = s.raw("GET", &path, &[("authorization", &bearer)], None);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, DOWNLOAD_TEXT);
    assert_eq!(
        r.header("content-disposition"),
        Some(
            format!(
                "attachment; filename=\"e2e download _.txt\"; filename*=UTF-8''{}",
                pct(DOWNLOAD_NAME)
            )
            .as_str()
        ),
        "{r:?}"
    );
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    // The token in the query works too (a plain link).
    let r = s.raw("GET", &format!("{path}?token={token}"), &[], None);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, DOWNLOAD_TEXT);

    // No token, another session's token, or a name that leaves ~/Downloads.
    assert_eq!(s.raw("GET", &path, &[], None).status, 401);
    let other = s.create(&json!({ "start_url": "about:blank" }));
    let other_bearer = format!("Bearer {}", other["viewer_token"].as_str().unwrap());
    let r = s.raw("GET", &path, &[("authorization", &other_bearer)], None);
    assert_eq!(r.status, 401, "{r:?}");
    let r = s.raw("GET", &path, &[("authorization", "Bearer nope")], None);
    assert_eq!(r.status, 401, "{r:?}");
    for bad in ["..%2Fx", "..", "%2E%2E", "a%2Fb", "x%0Ay"] {
        let r = s.raw(
            "GET",
            &format!("/viewer/{id}/downloads/{bad}"),
            &[("authorization", &bearer)],
            None,
        );
        assert_eq!(r.status, 400, "{bad}: {r:?}");
        assert_eq!(r.json()["detail"]["field"], "name", "{bad}: {r:?}");
    }
    // A name that is not there (a file elsewhere in the home is not a download).
    let r = s.raw(
        "GET",
        &format!("/viewer/{id}/downloads/absent.txt"),
        &[("authorization", &bearer)],
        None,
    );
    assert_eq!(r.status, 404, "{r:?}");
    // The token never reaches the server's log.
    assert!(!s.logs().contains(&token), "the viewer token was logged");

    s.delete(other["id"].as_str().unwrap());
    assert_eq!(s.delete(&id)["state"], "stopped");
    let r = s.raw("GET", &path, &[("authorization", &bearer)], None);
    assert_eq!(r.status, 409, "{r:?}");
    let left = wait_no_leftovers(&id, Duration::from_secs(15));
    assert!(left.is_empty(), "session {id} left behind: {left:?}");
}

#[test]
fn a_remote_file_chooser_is_answered_with_a_file_of_the_viewer() {
    let s = Server::start_default();
    let created = s.create(&json!({ "start_url": upload_page() }));
    let id = created["id"].as_str().unwrap().to_string();
    let token = created["viewer_token"].as_str().unwrap().to_string();
    s.wait_state(&id, "ready", READY);

    // The person clicks the page's file input in the viewer; the viewer's
    // own chooser opens, the person picks a file, and the remote page ends
    // up holding it.
    let url = with_query(created["viewer_url"].as_str().unwrap(), "mode=webrtc");
    let view = run_viewer(&json!({
        "url": url,
        "kind": "video",
        "mode": "webrtc",
        "steps": [
            { "expect": "#00c000", "timeoutMs": 30000 },
            { "armFileChooser": [{ "name": UPLOAD_NAME, "text": UPLOAD_TEXT }] },
            { "click": true },
            { "expectFileChosen": true, "timeoutMs": 20000 },
            { "expect": "#c00000", "timeoutMs": 20000 },
        ],
    }));
    assert!(steps_ok(&view), "{view:#}");
    // It went through ~/Uploads.
    let r = s.api(
        "GET",
        &format!("/api/sessions/{id}/files/Uploads/{}", pct(UPLOAD_NAME)),
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, UPLOAD_TEXT);

    // The upload route: the viewer token only, plain names only.
    let bearer = format!("Bearer {token}");
    let put = |name: &str, auth: &[(&str, &str)]| {
        s.raw(
            "PUT",
            &format!("/viewer/{id}/uploads/{name}"),
            auth,
            Some(b"x".as_slice()),
        )
    };
    let r = put("plain.txt", &[("authorization", &bearer)]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        json!({ "path": "~/Uploads/plain.txt", "size": 1 })
    );
    assert_eq!(put("plain.txt", &[]).status, 401);
    assert_eq!(
        put("plain.txt", &[("authorization", "Bearer nope")]).status,
        401
    );
    for bad in ["..%2Fescaped", "..", "a%2Fb"] {
        let r = put(bad, &[("authorization", &bearer)]);
        assert_eq!(r.status, 400, "{bad}: {r:?}");
    }
    let r = s.api("GET", &format!("/api/sessions/{id}/files/escaped"), None);
    assert_eq!(r.status, 404, "{r:?}");

    assert_eq!(s.delete(&id)["state"], "stopped");
    let left = wait_no_leftovers(&id, Duration::from_secs(15));
    assert!(left.is_empty(), "session {id} left behind: {left:?}");
}

#[test]
fn with_transfers_off_the_viewer_routes_say_forbidden() {
    let s = Server::start_default();
    let created = s.create(&json!({ "start_url": download_page(), "transfers": false }));
    let id = created["id"].as_str().unwrap().to_string();
    let token = created["viewer_token"].as_str().unwrap().to_string();
    assert_eq!(created["transfers"], false, "{created}");
    s.wait_state(&id, "ready", READY);
    assert_eq!(s.session(&id)["transfers"], false);
    let bearer = format!("Bearer {token}");
    for (method, path) in [
        ("GET", format!("/viewer/{id}/downloads/a.txt")),
        ("PUT", format!("/viewer/{id}/uploads/a.txt")),
    ] {
        let r = s.raw(
            method,
            &path,
            &[("authorization", &bearer)],
            (method == "PUT").then_some(b"x".as_slice()),
        );
        assert_eq!(r.status, 403, "{method} {path}: {r:?}");
        assert!(
            r.json()["error"].as_str().unwrap().contains("transfers"),
            "{r:?}"
        );
        assert_eq!(r.json()["detail"]["field"], "transfers");
        // The token is checked first: without it, it is 401 as anywhere.
        assert_eq!(s.raw(method, &path, &[], None).status, 401);
    }
    // Nothing was written.
    let r = s.api("GET", &format!("/api/sessions/{id}/files/Uploads"), None);
    assert_eq!(r.status, 404, "{r:?}");

    // A bad value is named.
    let r = s.api(
        "POST",
        "/api/sessions",
        Some(&json!({ "transfers": "yes" }).to_string()),
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("transfers"), "{r:?}");

    assert_eq!(s.delete(&id)["state"], "stopped");
    let left = wait_no_leftovers(&id, Duration::from_secs(15));
    assert!(left.is_empty(), "session {id} left behind: {left:?}");
}
