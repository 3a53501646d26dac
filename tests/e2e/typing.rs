//! Typing through the real viewer into a page in a real session: any
//! character, dead keys, input methods, shortcuts, over WebRTC and noVNC.
//! The page in the session copies what it received to the session's
//! clipboard on F8, and the viewer's mirror of that clipboard is compared
//! character by character with what was typed.

use std::time::Duration;

use sandcast_webrtc::SILENT_CONTROLLER;

use sandcast_e2e::{
    SCROLL_REPORT_KEY, Server, TYPING_CODES_KEY, TYPING_COPY_KEY, colours, focus_page, run_browser,
    run_viewer, typing_page, wait_no_leftovers, with_query,
};
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(40);

/// Mixed scripts, as the issue asks: ASCII, Latin-1, Latin Extended,
/// Cyrillic, Greek, CJK, Hangul, right-to-left and emoji.
const MIXED: &str = "Grüße, ü@example.org |?<> łŒž Привет Ωμέγα 漢字かな 한국어 שלום مرحبا 😀👍🏽";

/// A session showing the typing page, ready.
fn typing_session(s: &Server) -> (String, Value) {
    typing_session_with(s, json!({}))
}

/// [`typing_session`] with more fields for the create request.
fn typing_session_with(s: &Server, extra: Value) -> (String, Value) {
    let mut body =
        json!({ "start_url": typing_page(), "kiosk": true, "width": 1280, "height": 720 });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let created = s.create(&body);
    let id = created["id"].as_str().expect("id").to_string();
    s.wait_state(&id, "ready", READY);
    (id, created)
}

/// Runs `steps` in a viewer (after the page showed and got the focus), then
/// F8, and returns what the page in the session received (waiting up to
/// 10 s for it to become `want`). The page is green while empty, red with
/// text: `shows` is the colour it has before the steps.
fn typed(url: &str, mode: &str, shows: &str, steps: &[Value], want: &str) -> String {
    read_back(url, mode, shows, steps, TYPING_COPY_KEY, want)
}

/// Runs `steps`, presses `report` (F8: the text, F9: the key codes) and
/// returns what the page copied.
fn read_back(
    url: &str,
    mode: &str,
    shows: &str,
    steps: &[Value],
    report: &str,
    want: &str,
) -> String {
    let mut all = vec![
        json!({ "expect": shows, "timeoutMs": 30000 }),
        json!({ "click": true }),
    ];
    all.extend(steps.iter().cloned());
    all.push(json!({ "press": report }));
    // What did arrive is in the step's record, for the test's message.
    all.push(json!({ "expectRemoteClipboard": want, "timeoutMs": 10000 }));
    let view = run_browser(
        "e2e-viewer.mjs",
        &json!({
            "url": url,
            "kind": if mode == "vnc" { "canvas" } else { "video" },
            "mode": mode,
                "steps": all,
        }),
    );
    eprintln!("{mode} steps: {}", view["steps"]);
    view["steps"].as_array().unwrap().last().unwrap()["got"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn key(key: &str, code: &str) -> Value {
    json!({ "key": key, "code": code })
}

/// The session's viewer URL for a mode (`webrtc` or `vnc`).
fn viewer_url(created: &Value, mode: &str) -> String {
    with_query(
        created["viewer_url"].as_str().expect("viewer_url"),
        &format!("mode={mode}"),
    )
}

fn delete_clean(s: &Server, id: &str) {
    assert_eq!(s.delete(id)["state"], "stopped");
    let left = wait_no_leftovers(id, Duration::from_secs(15));
    assert!(left.is_empty(), "session {id} left behind: {left:?}");
}

/// Key events as a German keyboard sends them, then text that comes
/// without keys (an input method's commit, dictation, automation's
/// insertText) in every script: all of it arrives, character by character.
fn any_character_arrives(mode: &str) {
    let s = Server::start_default();
    let (id, created) = typing_session(&s);
    let german = ["G", "r", "ü", "ß", "e", " ", "ö", "Ä", "€", "@"]
        .iter()
        .zip([
            "KeyG",
            "KeyR",
            "BracketLeft",
            "Minus",
            "KeyE",
            "Space",
            "Semicolon",
            "Quote",
            "KeyE",
            "KeyQ",
        ])
        .map(|(k, c)| key(k, c))
        .collect::<Vec<_>>();
    // Key events of characters that need a binding, one after another, more
    // distinct ones than the keymap has spare codes.
    let cyrillic: String = ('а'..='я').collect();
    let cyrillic_keys = cyrillic
        .chars()
        .map(|c| key(&c.to_string(), "KeyA"))
        .collect::<Vec<_>>();
    let want = format!("Grüße öÄ€@{MIXED}{cyrillic}");
    let got = typed(
        &viewer_url(&created, mode),
        mode,
        colours::START,
        &[
            json!({ "keys": german }),
            json!({ "insertText": MIXED }),
            json!({ "keys": cyrillic_keys }),
        ],
        &want,
    );
    assert_eq!(
        got.chars().collect::<Vec<_>>(),
        want.chars().collect::<Vec<_>>(),
        "{mode}: what the page received differs"
    );
    delete_clean(&s, &id);
}

/// Dead keys (as Linux and macOS deliver them: a composition; as Windows
/// does: the composed character as the next key), input methods (Chinese,
/// Korean) and the shortcuts and editing keys beside them.
fn compositions_and_shortcuts(mode: &str) {
    let s = Server::start_default();
    let (id, created) = typing_session(&s);
    // Then shortcuts act in the page: select all, copy, go to the end,
    // paste, delete the last character.
    let typed_first = "éô你好한 abXc";
    let want = format!("{typed_first}{}", &typed_first[..typed_first.len() - 1]);
    let ctrl = |k: &str| json!({ "key": k, "code": format!("Key{}", k.to_uppercase()), "modifiers": ["Control"] });
    let got = typed(
        &viewer_url(&created, mode),
        mode,
        colours::START,
        &[
            // ´ then e on a French layout, composed by the host browser.
            json!({ "keys": [key("Dead", "BracketLeft")] }),
            json!({ "compose": ["´"], "commit": "é" }),
            // ^ then o, where the next key carries the composed character.
            json!({ "keys": [key("Dead", "BracketLeft"), key("ô", "KeyO")] }),
            json!({ "compose": ["n", "ni", "你", "你h", "你ha", "你hao"], "commit": "你好" }),
            json!({ "compose": ["ㅎ", "하", "한"], "commit": "한" }),
            json!({ "keys": [key(" ", "Space"), key("a", "KeyA"), key("b", "KeyB"), key("c", "KeyC"),
                key("ArrowLeft", "ArrowLeft"), key("X", "KeyX")] }),
            json!({ "keys": [ctrl("a"), ctrl("c"), key("End", "End"), ctrl("v"), key("Backspace", "Backspace")] }),
        ],
        &want,
    );
    assert_eq!(
        got, want,
        "{mode}: dead keys, compositions, arrows or shortcuts"
    );
    delete_clean(&s, &id);
}

#[test]
fn any_character_arrives_over_webrtc() {
    any_character_arrives("webrtc");
}

#[test]
fn any_character_arrives_over_novnc() {
    any_character_arrives("vnc");
}

#[test]
fn dead_keys_input_methods_and_shortcuts_over_webrtc() {
    compositions_and_shortcuts("webrtc");
}

#[test]
fn dead_keys_input_methods_and_shortcuts_over_novnc() {
    compositions_and_shortcuts("vnc");
}

/// Malformed, out-of-range and oversized input on the input socket is
/// dropped and counted; the agent and server go on, and typing after it
/// arrives whole.
#[test]
fn bad_input_is_dropped_and_typing_goes_on() {
    let s = Server::start_default();
    let (id, created) = typing_session(&s);
    let text = |t: &str| json!({ "kind": "text", "text": t }).to_string();
    let got = typed(
        &viewer_url(&created, "vnc"),
        "vnc",
        colours::START,
        &[
            json!({ "rawInput": [
            "{",
            "[]",
            "{\"kind\":\"nonsense\"}",
            text(""),
            // Over the protocol's 64 KiB: refused by the server.
            { "textOf": "x", "times": 65 * 1024 },
            // Within it but beyond the agent's burst: refused by the agent.
            { "textOf": "y", "times": 20_000 },
            "{\"kind\":\"key\",\"code\":\"NoSuchCode\",\"key\":\"NoSuchKey\",\"down\":true}",
            text("ok"),
        ] }),
            // The raw socket is not the viewer's: wait for the text before F8.
            json!({ "expect": colours::TYPED }),
        ],
        "ok",
    );
    assert_eq!(got, "ok");
    let logs = s.api("GET", &format!("/api/sessions/{id}/logs"), None).body;
    assert!(
        logs.contains("refused input"),
        "the agent's refusal is not in the session log:\n{logs}"
    );
    assert!(
        s.logs().contains("viewer input dropped"),
        "the server did not count the dropped messages"
    );
    assert!(
        !logs.contains("yyyy") && !s.logs().contains("yyyy"),
        "typed text was logged"
    );
    assert_eq!(
        s.api("GET", &format!("/api/sessions/{id}"), None).json()["state"],
        "ready"
    );
    delete_clean(&s, &id);
}

/// A session with a German layout: the keys a German keyboard sends reach
/// the page as the same physical keys (Z and Y swapped, Ü where US has
/// `[`), so shortcuts and games see the person's keyboard; the default US
/// session sees the US keys for the same characters.
#[test]
fn a_session_keyboard_layout_gives_the_page_the_physical_keys() {
    let s = Server::start_default();
    // Refused before anything starts, naming the value.
    for (bad, names) in [
        ("de;rm", "de;rm"),
        ("zz", "layout \"zz\""),
        ("de(nope)", "nope"),
    ] {
        let r = s.api(
            "POST",
            "/api/sessions",
            Some(&json!({ "start_url": "about:blank", "keyboard_layout": bad }).to_string()),
        );
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        let error = r.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(
            error.contains(names) && error.contains("keyboard_layout"),
            "{error}"
        );
    }
    let keys = json!({ "keys": [key("z", "KeyY"), key("y", "KeyZ"), key("ü", "BracketLeft")] });
    let (de, created) = typing_session_with(&s, json!({ "keyboard_layout": "de" }));
    assert_eq!(created["keyboard_layout"], "de", "{created:#}");
    let got = read_back(
        &viewer_url(&created, "webrtc"),
        "webrtc",
        colours::START,
        std::slice::from_ref(&keys),
        TYPING_CODES_KEY,
        "KeyY,KeyZ,BracketLeft",
    );
    assert_eq!(got, "KeyY,KeyZ,BracketLeft", "German layout");
    delete_clean(&s, &de);
    let (us, created) = typing_session(&s);
    let got = read_back(
        &viewer_url(&created, "webrtc"),
        "webrtc",
        colours::START,
        &[keys],
        TYPING_CODES_KEY,
        "KeyZ,KeyY,",
    );
    // On US, "ü" has no key: it is typed through a bound spare key, which
    // has no physical name.
    assert!(got.starts_with("KeyZ,KeyY,"), "US layout: {got}");
    delete_clean(&s, &us);
}

/// On a touch screen: a tap on the page's text area focuses it, the session
/// reports the focus and where the text area is, the viewer asks for its
/// on-screen keyboard there, and text from it arrives; a tap elsewhere takes
/// the focus away and the keyboard with it; a finger drawn upwards scrolls
/// the page. Over WebRTC and over noVNC's input socket.
fn touch_keyboard_follows_the_remote_focus(mode: &str) {
    let s = Server::start_default();
    let created = s
        .create(&json!({ "start_url": focus_page(), "kiosk": true, "width": 1280, "height": 720 }));
    let id = created["id"].as_str().unwrap().to_string();
    s.wait_state(&id, "ready", READY);
    let text = "touch ✓ 👍 Grüße";
    let view = run_viewer(&json!({
        "url": viewer_url(&created, mode),
        "kind": if mode == "vnc" { "canvas" } else { "video" },
        "mode": mode,
        "touch": true,
        // The remote display keeps its 1280x720.
        "viewport": [1280, 720],
        "steps": [
            { "expect": colours::START, "timeoutMs": 30000 },
            { "tap": [300, 330] },
            { "expect": colours::CLICKED },
            // The text area's bottom-left corner, in display pixels.
            { "expectRemoteFocus": { "editable": true, "x": 100, "y": 360 } },
            { "expectKeyboard": "text" },
            // What the on-screen keyboard gives: text without key events.
            { "insertText": text },
            { "press": TYPING_COPY_KEY },
            { "expectRemoteClipboard": text },
            { "tap": [900, 600] },
            { "expect": colours::START },
            { "expectRemoteFocus": { "editable": false } },
            { "expectKeyboard": "none" },
            // Content follows the finger: 300 px upwards scrolls down by
            // about that much (in whole wheel clicks, as the browser
            // scrolls them).
            { "swipe": [[640, 600], [640, 300]] },
            { "press": SCROLL_REPORT_KEY },
            { "expectRemoteClipboardNumber": [150, 450] },
        ],
    }));
    eprintln!("{mode} steps: {}", view["steps"]);
    delete_clean(&s, &id);
}

#[test]
fn touch_keyboard_follows_the_remote_focus_over_webrtc() {
    touch_keyboard_follows_the_remote_focus("webrtc");
}

#[test]
fn touch_keyboard_follows_the_remote_focus_over_novnc() {
    touch_keyboard_follows_the_remote_focus("vnc");
}

/// A viewer whose browser died (a crashed tab, a laptop closed) leaves a
/// peer behind until ICE gives it up, and that peer held control: the
/// person's next page could not type, silently. A controller that is no
/// longer heard now yields within [`SILENT_CONTROLLER`] to one that is.
#[test]
fn a_dead_viewer_yields_control_to_the_next_page() {
    let s = Server::start_default();
    let (id, created) = typing_session(&s);
    let url = viewer_url(&created, "webrtc");
    // Ends by killing its browser: no goodbye reaches the server.
    let first = run_browser(
        "e2e-viewer.mjs",
        &json!({
            "url": url, "kind": "video", "mode": "webrtc",
            "steps": [
                { "expect": colours::START, "timeoutMs": 30000 },
                { "click": true },
                { "keys": [key("a", "KeyA")] },
                { "expect": colours::TYPED },
            ],
        }),
    );
    assert_eq!(first["ok"], true, "{first:#}");
    let limit = SILENT_CONTROLLER + Duration::from_secs(5);
    let second = run_viewer(&json!({
        "url": url, "kind": "video", "mode": "webrtc",
        "steps": [
            { "expect": colours::TYPED, "timeoutMs": 30000 },
            { "expectControl": true, "timeoutMs": limit.as_millis() as u64 },
            { "click": true },
            { "keys": [key("b", "KeyB")] },
            { "press": TYPING_COPY_KEY },
            { "expectRemoteClipboard": "ab" },
        ],
    }));
    eprintln!("control after {} ms", second["steps"][1]["ms"]);
    delete_clean(&s, &id);
}
