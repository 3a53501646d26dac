//! The session's Chromium over its DevTools pipe (`--remote-debugging-pipe`:
//! the browser reads commands on its descriptor 3 and writes replies and
//! events on 4, each a JSON message ended by a NUL byte). Nothing listens on
//! a port, in the session or out of it.
//!
//! The agent opens the URLs a program in the session asks to open (see
//! [`crate::opener`]) as tabs, and learns where the keyboard focus is: a small
//! script in every page reports whether an editable element has the focus
//! (and where it is), so a viewer on a touch screen opens its on-screen
//! keyboard and places an input method's window there. The page is not
//! trusted: it may call the report itself, so only two shapes of report are
//! accepted, and they are rate-limited.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

use sandcast_proto::Message;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

use crate::opener::OpenRequest;

/// Longest message read from the browser; longer ones are skipped unread.
pub const MAX_MESSAGE_LEN: usize = 1 << 20;

/// The page-side function the focus script calls.
const BINDING: &str = "__sandcastFocus";

/// At most this many focus reports a second reach the server.
const REPORTS_PER_SECOND: f64 = 20.0;

/// Installed in every document: reports `e,X,Y` when an editable element
/// gets the focus (X, Y: its bottom-left corner in screen pixels, an
/// estimate that assumes the browser's toolbars are above the page) and `n`
/// when none has it.
const FOCUS_SCRIPT: &str = r#"(() => {
  if (window.__sandcastFocusInstalled) return;
  window.__sandcastFocusInstalled = true;
  // Looked up at each call: in a new document the binding may arrive after
  // this script runs.
  const report = (p) => { const f = window.__sandcastFocus; if (typeof f === 'function') f(p); };
  const NOT_TEXT = ['button', 'checkbox', 'radio', 'submit', 'reset', 'file', 'image', 'range', 'color', 'hidden'];
  const editable = (t) => !!t && t.nodeType === 1 && (t.isContentEditable || t.tagName === 'TEXTAREA'
    || (t.tagName === 'INPUT' && !NOT_TEXT.includes((t.type || '').toLowerCase())));
  const send = () => {
    let t = document.activeElement;
    while (t && t.shadowRoot && t.shadowRoot.activeElement) t = t.shadowRoot.activeElement;
    if (!editable(t)) { report('n'); return; }
    const r = t.getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    const top = Math.max(0, window.outerHeight - window.innerHeight);
    const x = Math.round(window.screenX + r.left * dpr);
    const y = Math.round(window.screenY + top + r.bottom * dpr);
    report(`e,${x},${y}`);
  };
  addEventListener('focusin', send, true);
  addEventListener('focusout', () => setTimeout(send, 0), true);
  if (document.readyState !== 'loading') send(); else addEventListener('DOMContentLoaded', send);
})();"#;

/// What a focus report says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Focus {
    /// An editable element has the focus.
    pub editable: bool,
    /// Its bottom-left corner on the display, when editable.
    pub at: Option<(u32, u32)>,
}

/// Parses the page's report; anything else is refused.
pub fn parse_report(payload: &str) -> Option<Focus> {
    if payload == "n" {
        return Some(Focus {
            editable: false,
            at: None,
        });
    }
    let rest = payload.strip_prefix("e,")?;
    let (x, y) = rest.split_once(',')?;
    let clamp = |v: &str| -> Option<u32> {
        let n: i64 = v.parse().ok()?;
        Some(n.clamp(0, i64::from(sandcast_proto::MAX_COORD)) as u32)
    };
    Some(Focus {
        editable: true,
        at: Some((clamp(x)?, clamp(y)?)),
    })
}

/// Commands waiting to be written, NUL-terminated.
#[derive(Default)]
struct Commands {
    next_id: u64,
    pending: Vec<u8>,
}

impl Commands {
    /// Queues a command; returns its id.
    fn add(&mut self, method: &str, params: Value, session: Option<&str>) -> u64 {
        self.next_id += 1;
        let mut m = json!({ "id": self.next_id, "method": method, "params": params });
        if let Some(s) = session {
            m["sessionId"] = json!(s);
        }
        self.pending
            .extend(serde_json::to_vec(&m).unwrap_or_default());
        self.pending.push(0);
        self.next_id
    }
}

/// Drives one browser run's DevTools pipe until the browser closes it:
/// `to_browser` is the write end of the browser's descriptor 3,
/// `from_browser` the read end of its descriptor 4; a word on `close`
/// asks the browser to close (the session ends). Focus changes go to
/// `out` as [`Message::RemoteFocus`]; URLs from `opens` become tabs in
/// front (see [`crate::opener`]). `opens` is shared by every run of the
/// browser: a request made while it restarts waits for the next run.
pub async fn run(
    to_browser: OwnedFd,
    from_browser: OwnedFd,
    out: mpsc::Sender<Message>,
    opens: Arc<tokio::sync::Mutex<mpsc::Receiver<OpenRequest>>>,
    close: oneshot::Receiver<()>,
) {
    let mut close = Some(close);
    let mut tx = tokio::fs::File::from_std(std::fs::File::from(to_browser));
    let (msg_tx, mut msgs) = mpsc::channel::<Value>(64);
    tokio::spawn(read_messages(from_browser, msg_tx));
    let mut opens = opens.lock().await;
    let mut cmds = Commands::default();
    // Every page, now and later, is attached on its own flat session.
    cmds.add(
        "Target.setAutoAttach",
        json!({ "autoAttach": true, "waitForDebuggerOnStart": false, "flatten": true }),
        None,
    );
    // Open requests waiting for the browser's answer, by command id.
    let mut opening: HashMap<u64, oneshot::Sender<Result<(), String>>> = HashMap::new();
    let mut last: Option<Focus> = None;
    let mut tokens = REPORTS_PER_SECOND;
    let mut refilled = Instant::now();
    loop {
        if !cmds.pending.is_empty() {
            if tx.write_all(&cmds.pending).await.is_err() {
                return;
            }
            cmds.pending.clear();
        }
        let msg = tokio::select! {
            m = msgs.recv() => match m {
                Some(m) => m,
                None => return,
            },
            asked = async { close.as_mut().expect("guarded").await }, if close.is_some() => {
                close = None;
                if asked.is_ok() {
                    // A clean exit, with the profile written out.
                    cmds.add("Browser.close", json!({}), None);
                }
                continue;
            }
            req = opens.recv() => {
                let Some(req) = req else { continue };
                let id = cmds.add("Target.createTarget", json!({ "url": req.url }), None);
                opening.insert(id, req.reply);
                continue;
            }
        };
        if let Some(reply) = msg["id"].as_u64().and_then(|id| opening.remove(&id)) {
            let answer = match (
                msg["result"]["targetId"].as_str(),
                msg["error"]["message"].as_str(),
            ) {
                (Some(target), _) => {
                    // In front, so the person sees the page it opened.
                    cmds.add("Target.activateTarget", json!({ "targetId": target }), None);
                    Ok(())
                }
                (None, Some(e)) => Err(format!("the browser refused it: {e}")),
                (None, None) => Err("the browser did not say".to_string()),
            };
            let _ = reply.send(answer);
            continue;
        }
        match msg["method"].as_str() {
            Some("Target.attachedToTarget") => {
                let Some(session) = msg["params"]["sessionId"].as_str() else {
                    continue;
                };
                if msg["params"]["targetInfo"]["type"] != "page" {
                    continue;
                }
                // Bindings exist only in contexts Runtime inspects; enabling
                // it announces every page context, now and later, and the
                // script is put into each (below).
                cmds.add(
                    "Runtime.addBinding",
                    json!({ "name": BINDING }),
                    Some(session),
                );
                cmds.add("Runtime.enable", json!({}), Some(session));
            }
            Some("Runtime.executionContextCreated") => {
                let ctx = &msg["params"]["context"];
                let (Some(session), Some(id)) = (msg["sessionId"].as_str(), ctx["id"].as_i64())
                else {
                    continue;
                };
                if ctx["auxData"]["isDefault"] != true {
                    continue;
                }
                cmds.add(
                    "Runtime.evaluate",
                    json!({ "expression": FOCUS_SCRIPT, "contextId": id }),
                    Some(session),
                );
            }
            Some("Runtime.bindingCalled") if msg["params"]["name"] == BINDING => {
                let Some(focus) = msg["params"]["payload"].as_str().and_then(parse_report) else {
                    continue;
                };
                let now = Instant::now();
                tokens = (tokens + now.duration_since(refilled).as_secs_f64() * REPORTS_PER_SECOND)
                    .min(REPORTS_PER_SECOND);
                refilled = now;
                if last == Some(focus) || tokens < 1.0 {
                    continue;
                }
                tokens -= 1.0;
                last = Some(focus);
                let _ = out
                    .send(Message::RemoteFocus {
                        editable: focus.editable,
                        x: focus.at.map(|a| a.0),
                        y: focus.at.map(|a| a.1),
                    })
                    .await;
            }
            _ => {}
        }
    }
}

/// Reads the browser's NUL-ended messages into `tx` until the pipe ends.
async fn read_messages(from_browser: OwnedFd, tx: mpsc::Sender<Value>) {
    let mut rx = BufReader::new(tokio::fs::File::from_std(std::fs::File::from(from_browser)));
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // Bounded: a message longer than the limit is read past, not kept.
        let n = match (&mut rx)
            .take(MAX_MESSAGE_LEN as u64 + 1)
            .read_until(0, &mut buf)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if buf.last() != Some(&0) {
            if n > MAX_MESSAGE_LEN {
                // Skip the rest of the long message.
                let mut sink = Vec::new();
                loop {
                    sink.clear();
                    match (&mut rx).take(64 * 1024).read_until(0, &mut sink).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) if sink.last() == Some(&0) => break,
                        Ok(_) => {}
                    }
                }
                continue;
            }
            return;
        }
        buf.pop();
        if let Ok(msg) = serde_json::from_slice::<Value>(&buf)
            && tx.send(msg).await.is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_two_report_shapes_are_accepted() {
        assert_eq!(
            parse_report("n"),
            Some(Focus {
                editable: false,
                at: None
            })
        );
        assert_eq!(
            parse_report("e,10,20"),
            Some(Focus {
                editable: true,
                at: Some((10, 20))
            })
        );
        // Out of range is clamped to the display's possible range.
        assert_eq!(
            parse_report("e,-5,99999999").unwrap().at,
            Some((0, sandcast_proto::MAX_COORD as u32))
        );
        for bad in ["", "e", "e,1", "e,a,b", "x,1,2", "n ", "e,1,2,3"] {
            assert_eq!(parse_report(bad), None, "{bad:?}");
        }
    }
}
