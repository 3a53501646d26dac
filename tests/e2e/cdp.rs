//! Automation beside the person: a program drives the session's browser
//! through the server's DevTools endpoint while a person watches and clicks
//! in the real viewer; the person can take control (automation input is
//! refused) and give it back; credentials other than the API key or an
//! automation token are refused; malformed, binary and oversized messages
//! close nothing but their own connection.

use std::net::TcpStream;
use std::time::Duration;

use sandcast_e2e::{Server, ServerOptions, data_url, run_browser, run_viewer, with_query};
use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

const READY: Duration = Duration::from_secs(40);

/// White with a text field at the top; typing in it turns the page green,
/// and a click anywhere below the field (the centre of the screen) turns it
/// blue and titles it `clicked`.
fn form_page() -> String {
    data_url(
        "<!doctype html><html><head><meta charset=utf-8><title>form</title>\
         <style>html,body{margin:0;height:100%;background:#ffffff}\
         input{position:fixed;top:10px;left:10px;width:300px;height:40px;font-size:24px}\
         button{position:fixed;top:80px;left:0;right:0;bottom:0;opacity:0}</style></head>\
         <body><input id=name autofocus><button id=b></button><script>\
         const n=document.getElementById('name');\
         n.addEventListener('input',()=>{document.body.style.background='#00c000'});\
         document.getElementById('b').addEventListener('click',()=>{\
           document.body.style.background='#0000c0';document.title='clicked'});\
         </script></body></html>",
    )
}

/// The page's title once its document has loaded and has one (the blank
/// document before it has none).
const LOADED_TITLE: &str = "new Promise(r => { const done = () => document.title ? r(document.title) : \
     setTimeout(done, 20); document.readyState === 'complete' ? done() : addEventListener('load', done); })";

type Ws = WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>;

/// A raw DevTools client on `path` of the server with `auth` (a bearer).
fn connect(s: &Server, path: &str, auth: &str) -> Result<Ws, tungstenite::Error> {
    let mut req = format!("ws://127.0.0.1:{}{path}", s.port)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {auth}").parse().unwrap());
    let (ws, _) = tungstenite::connect(req)?;
    if let tungstenite::stream::MaybeTlsStream::Plain(t) = ws.get_ref() {
        t.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    }
    Ok(ws)
}

/// Sends a command and returns the reply with its id (events are skipped).
fn call(ws: &mut Ws, id: i64, method: &str, params: Value, session: Option<&str>) -> Value {
    let mut msg = json!({"id": id, "method": method, "params": params});
    if let Some(s) = session {
        msg["sessionId"] = json!(s);
    }
    ws.send(Message::text(msg.to_string())).unwrap();
    reply(ws, id)
}

fn reply(ws: &mut Ws, id: i64) -> Value {
    loop {
        match ws.read().expect("reading the DevTools connection") {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["id"] == id || (v.get("id").is_none() && v.get("error").is_some()) {
                    return v;
                }
            }
            Message::Close(c) => panic!("closed while waiting for reply {id}: {c:?}"),
            _ => {}
        }
    }
}

/// Reads until the server closes the connection; the close code, if any.
fn closed(ws: &mut Ws) -> Option<u16> {
    loop {
        match ws.read() {
            Ok(Message::Close(c)) => return c.map(|c| c.code.into()),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

#[test]
fn a_program_drives_the_browser_the_person_sees_and_the_person_can_click() {
    let s = Server::start_default();
    // Kiosk: the page fills the display, so a screenshot is its size.
    let created = s.create(&json!({ "start_url": "about:blank", "kiosk": true }));
    let id = created["id"].as_str().unwrap().to_string();
    let cdp_url = created["cdp_url"].as_str().unwrap();
    assert_eq!(
        cdp_url,
        format!("ws://127.0.0.1:{}/api/sessions/{id}/cdp", s.port)
    );
    s.wait_state(&id, "ready", READY);

    // The person watches over WebRTC: the page the program opens and fills
    // turns green; the person's click then reaches it.
    let viewer_url = with_query(created["viewer_url"].as_str().unwrap(), "mode=webrtc");
    let viewer = std::thread::spawn(move || {
        run_viewer(&json!({
            "url": viewer_url,
            "kind": "video",
            "mode": "webrtc",
            "timeoutMs": 120000,
            "steps": [
                { "expect": "#00c000", "timeoutMs": 90000 },
                { "click": true },
                { "expect": "#0000c0", "timeoutMs": 20000 },
            ],
        }))
    });
    let program = run_browser(
        "cdp-client.mjs",
        &json!({
            "endpoint": format!("{}/api/sessions/{id}/cdp", s.base),
            "headers": { "Authorization": format!("Bearer {}", s.api_key) },
            "goto": form_page(),
            "fill": { "selector": "#name", "text": "sandcast" },
            "screenshot": true,
            "waitTitle": "clicked",
            "timeoutMs": 100000,
        }),
    );
    let seen = viewer.join().expect("viewer thread");
    assert_eq!(program["ok"], true, "{program:#}");
    let steps = program["steps"].as_array().unwrap();
    assert!(
        steps[0]["version"].as_str().is_some_and(|v| !v.is_empty()),
        "{program:#}"
    );
    let shot = steps
        .iter()
        .find(|s| s.get("screenshot").is_some())
        .unwrap();
    // The page fills the display (Chromium's kiosk window may be a pixel short).
    let (w, h) = (
        shot["screenshot"][0].as_u64(),
        shot["screenshot"][1].as_u64(),
    );
    assert!(
        w.is_some_and(|w| w.abs_diff(1280) <= 2) && h.is_some_and(|h| h.abs_diff(720) <= 2),
        "{program:#}"
    );
    assert_eq!(steps.last().unwrap()["value"], "sandcast", "{program:#}");
    assert_eq!(seen["ok"], true, "{seen:#}");

    // The program left without a goodbye: the session goes on, and a new
    // client is served.
    let after = s.session(&id);
    assert_eq!(after["state"], "ready", "{after}");
    let mut ws = connect(&s, &format!("/api/sessions/{id}/cdp"), &s.api_key).unwrap();
    let v = call(&mut ws, 1, "Browser.getVersion", json!({}), None);
    assert!(
        v["result"]["product"].as_str().unwrap().contains("Chrome"),
        "{v}"
    );
}

#[test]
fn the_person_takes_control_and_gives_it_back() {
    let s = Server::start_default();
    let created = s.create(&json!({ "start_url": form_page() }));
    let id = created["id"].as_str().unwrap().to_string();
    s.wait_state(&id, "ready", READY);
    let events = s.events(&id);

    // The endpoints clients read first point back at this server.
    let v = s.api(
        "GET",
        &format!("/api/sessions/{id}/cdp/json/version/"),
        None,
    );
    assert_eq!(v.status, 200, "{v:?}");
    let v = v.json();
    assert_eq!(
        v["webSocketDebuggerUrl"],
        format!("ws://127.0.0.1:{}/api/sessions/{id}/cdp", s.port)
    );
    assert!(v["Browser"].as_str().unwrap().starts_with("Chrome/"), "{v}");
    let list = s.api("GET", &format!("/api/sessions/{id}/cdp/json/list"), None);
    assert_eq!(list.status, 200, "{list:?}");
    let list = list.json();
    let page = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type"] == "page" && t["url"].as_str().is_some_and(|u| u.starts_with("data:")))
        .unwrap_or_else(|| panic!("no page in {list}"));
    let target = page["id"].as_str().unwrap();
    let page_ws = page["webSocketDebuggerUrl"].as_str().unwrap();
    assert_eq!(
        page_ws,
        format!(
            "ws://127.0.0.1:{}/api/sessions/{id}/cdp/devtools/page/{target}",
            s.port
        )
    );

    // A page-level connection works too.
    let mut pws = connect(
        &s,
        &format!("/api/sessions/{id}/cdp/devtools/page/{target}"),
        &s.api_key,
    )
    .unwrap();
    // `ready` means the window is up; the page may still be loading, and
    // until its document commits the title is the blank page's.
    let mut r = Value::Null;
    for n in 1..=5 {
        r = call(
            &mut pws,
            n,
            "Runtime.evaluate",
            json!({"expression": LOADED_TITLE, "awaitPromise": true}),
            None,
        );
        // A blank document replaced mid-wait ends the call with an error.
        if r.get("error").is_none() {
            break;
        }
    }
    assert_eq!(r["result"]["result"]["value"], "form", "{r}");
    drop(pws);

    let mut ws = connect(&s, &format!("/api/sessions/{id}/cdp"), &s.api_key).unwrap();
    let r = call(
        &mut ws,
        1,
        "Target.attachToTarget",
        json!({"targetId": target, "flatten": true}),
        None,
    );
    let sid = r["result"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("{r}"))
        .to_string();
    let sid = Some(sid.as_str());
    events
        .wait_for(Duration::from_secs(10), |e, d| {
            e == "control" && d["automation_clients"].as_u64() >= Some(1)
        })
        .expect("a control event counting the client");
    let r = call(
        &mut ws,
        2,
        "Runtime.evaluate",
        json!({"expression": "document.getElementById('name').focus(); 1"}),
        sid,
    );
    assert!(r.get("result").is_some(), "{r}");
    let insert = |ws: &mut Ws, n: i64, text: &str| {
        call(ws, n, "Input.insertText", json!({"text": text}), sid)
    };
    let r = insert(&mut ws, 3, "a");
    assert!(
        r.get("error").is_none(),
        "shared control lets automation type: {r}"
    );

    // The person takes over: automation input is refused with a reason,
    // everything else goes on.
    let c = s.api(
        "PUT",
        &format!("/api/sessions/{id}/control"),
        Some(r#"{"holder": "person"}"#),
    );
    assert_eq!(c.status, 200, "{c:?}");
    assert_eq!(
        c.json(),
        json!({"holder": "person", "automation_clients": 1})
    );
    events
        .wait_for(Duration::from_secs(10), |e, d| {
            e == "control" && d["holder"] == "person"
        })
        .expect("a control event naming the person");
    assert_eq!(s.session(&id)["control"], "person");
    let r = insert(&mut ws, 4, "b");
    assert_eq!(r["sessionId"].as_str(), sid, "{r}");
    let msg = r["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{r}"));
    assert!(msg.contains("paused") && msg.contains("/control"), "{msg}");
    let value = |ws: &mut Ws, n: i64| {
        call(
            ws,
            n,
            "Runtime.evaluate",
            json!({"expression": "document.getElementById('name').value"}),
            sid,
        )["result"]["result"]["value"]
            .clone()
    };
    assert_eq!(value(&mut ws, 5), "a");

    // Given back: input works again.
    let c = s.api(
        "PUT",
        &format!("/api/sessions/{id}/control"),
        Some(r#"{"holder": "shared"}"#),
    );
    assert_eq!(c.json()["holder"], "shared");
    let r = insert(&mut ws, 6, "c");
    assert!(r.get("error").is_none(), "{r}");
    assert_eq!(value(&mut ws, 7), "ac");
    let bad = s.api(
        "PUT",
        &format!("/api/sessions/{id}/control"),
        Some(r#"{"holder": "robot"}"#),
    );
    assert_eq!(bad.status, 400, "{bad:?}");
    assert!(
        bad.json()["error"].as_str().unwrap().contains("holder"),
        "{bad:?}"
    );

    // The person in the viewer does the same with the viewer's own control.
    let dir = tempfile::tempdir().unwrap();
    let (taken, checked) = (dir.path().join("taken"), dir.path().join("checked"));
    let viewer_url = with_query(created["viewer_url"].as_str().unwrap(), "mode=webrtc");
    let scenario = json!({
        "url": viewer_url,
        "kind": "video",
        "mode": "webrtc",
        "timeoutMs": 90000,
        "steps": [
            { "expectAutomation": { "clients": 1, "paused": false }, "timeoutMs": 30000 },
            { "holdButton": true },
            { "expectAutomation": { "clients": 1, "paused": true } },
            { "signal": taken },
            { "waitFile": checked, "timeoutMs": 30000 },
            { "holdButton": true },
            { "expectAutomation": { "clients": 1, "paused": false } },
        ],
    });
    let viewer = std::thread::spawn(move || run_viewer(&scenario));
    events
        .wait_for(Duration::from_secs(60), |e, d| {
            e == "control" && d["holder"] == "person"
        })
        .expect("the viewer's person took control");
    let r = insert(&mut ws, 20, "d");
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("paused")),
        "{r}"
    );
    std::fs::write(&checked, "").unwrap();
    events
        .wait_for(Duration::from_secs(30), |e, d| {
            e == "control" && d["holder"] == "shared"
        })
        .expect("the viewer's person gave control back");
    let r = insert(&mut ws, 21, "e");
    assert!(r.get("error").is_none(), "{r}");
    assert_eq!(value(&mut ws, 22), "ace");
    let seen = viewer.join().expect("viewer thread");
    assert_eq!(seen["steps"][1]["label"], "take control", "{seen:#}");
    assert_eq!(seen["steps"][5]["label"], "give back", "{seen:#}");
    assert!(taken.exists());

    // Something that is not a command is answered, not passed on, and the
    // connection goes on.
    ws.send(Message::text("this is not JSON")).unwrap();
    let r = reply(&mut ws, -1);
    assert_eq!(r["error"]["code"], -32700, "{r}");
    assert_eq!(value(&mut ws, 8), "ace");
    // A binary message closes this connection only.
    ws.send(Message::binary(vec![0u8; 16])).unwrap();
    assert_eq!(closed(&mut ws), Some(1003));
    events
        .wait_for(Duration::from_secs(10), |e, d| {
            e == "control" && d["automation_clients"] == 0
        })
        .expect("the client counted out");
    assert_eq!(s.session(&id)["state"], "ready");
}

#[test]
fn only_the_api_key_or_an_automation_token_opens_the_endpoint() {
    let s = Server::start(ServerOptions {
        tables: "[cdp]\nmax_message_mib = 1\n".into(),
        ..Default::default()
    });
    let a = s.create(&json!({ "start_url": "about:blank" }));
    let id = a["id"].as_str().unwrap().to_string();
    let viewer_token = a["viewer_token"].as_str().unwrap().to_string();
    s.wait_state(&id, "ready", READY);
    let path = format!("/api/sessions/{id}/cdp/json/version");
    let none = s.raw("GET", &path, &[], None);
    assert_eq!(none.status, 401, "{none:?}");
    assert!(
        none.json()["error"]
            .as_str()
            .unwrap()
            .contains("Authorization"),
        "{none:?}"
    );
    let bearer = format!("Bearer {viewer_token}");
    let viewer = s.raw("GET", &path, &[("authorization", bearer.as_str())], None);
    assert_eq!(
        viewer.status, 401,
        "a viewer token never automates: {viewer:?}"
    );
    let q = s.raw("GET", &format!("{path}?token={viewer_token}"), &[], None);
    assert_eq!(q.status, 401, "{q:?}");
    assert!(matches!(
        connect(&s, &format!("/api/sessions/{id}/cdp"), &viewer_token),
        Err(tungstenite::Error::Http(r)) if r.status() == 401
    ));
    // An automation token of this session opens it; a view token, or a
    // revoked automation token, does not.
    let tokens = format!("/api/sessions/{id}/tokens");
    let with = |token: &str| {
        let bearer = format!("Bearer {token}");
        s.raw("GET", &path, &[("authorization", bearer.as_str())], None)
            .status
    };
    let auto = s
        .api("POST", &tokens, Some(r#"{"role":"automation"}"#))
        .json();
    let auto_token = auto["token"].as_str().unwrap();
    assert_eq!(
        auto["cdp_url"],
        format!("ws://127.0.0.1:{}/api/sessions/{id}/cdp", s.port)
    );
    assert_eq!(with(auto_token), 200);
    let mut ws = connect(&s, &format!("/api/sessions/{id}/cdp"), auto_token).unwrap();
    let v = call(&mut ws, 1, "Browser.getVersion", json!({}), None);
    assert!(v["result"]["product"].is_string(), "{v}");
    // Another session's automation token does not open this one.
    let b = s.create(&json!({ "start_url": "about:blank" }));
    let other = s
        .api(
            "POST",
            &format!("/api/sessions/{}/tokens", b["id"].as_str().unwrap()),
            Some(r#"{"role":"automation"}"#),
        )
        .json();
    assert_eq!(with(other["token"].as_str().unwrap()), 401);
    let view = s.api("POST", &tokens, Some(r#"{"role":"view"}"#)).json();
    assert_eq!(with(view["token"].as_str().unwrap()), 401);
    let r = s.api(
        "DELETE",
        &format!("{tokens}/{}", auto["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(r.status, 204, "{r:?}");
    // Revoking it ends the connection it opened.
    assert_eq!(closed(&mut ws), Some(1008));
    assert_eq!(with(auto_token), 401, "a revoked automation token");
    let unknown = s.api("GET", "/api/sessions/nosuchsession/cdp/json/version", None);
    assert_eq!(unknown.status, 404, "{unknown:?}");
    let bad = s.api(
        "GET",
        &format!("/api/sessions/{id}/cdp/devtools/page/..%2Fx"),
        None,
    );
    assert!(bad.status == 400 || bad.status == 404, "{bad:?}");

    // A message over [cdp] max_message_mib closes its connection; the
    // server and the session go on.
    let mut ws = connect(&s, &format!("/api/sessions/{id}/cdp"), &s.api_key).unwrap();
    let big = format!(
        r#"{{"id":1,"method":"Runtime.evaluate","params":{{"expression":"'{}'"}}}}"#,
        "x".repeat(2 << 20)
    );
    let _ = ws.send(Message::text(big));
    assert_eq!(closed(&mut ws), Some(1009));
    assert_eq!(s.session(&id)["state"], "ready");
    let mut ws = connect(&s, &format!("/api/sessions/{id}/cdp"), &s.api_key).unwrap();
    let v = call(&mut ws, 1, "Browser.getVersion", json!({}), None);
    assert!(v["result"]["product"].is_string(), "{v}");

    // An ended session has no endpoint.
    s.delete(&id);
    let gone = s.api("GET", &path, None);
    assert_eq!(gone.status, 409, "{gone:?}");
}
