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
//!
//! With transfers on (the session's default), the browser saves downloads
//! in `~/Downloads` and the agent reports each finished one
//! ([`Message::Download`]), and file choosers are intercepted
//! ([`Message::FileChooser`]) and answered with the viewer's uploads
//! (`DOM.setFileInputFiles`). The page names its downloads and opens
//! choosers as often as it likes: names are checked, reports rate-limited,
//! and only files in `~/Uploads` are ever handed to a page.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use sandcast_proto::{Message, transfer};
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

/// A token bucket with the clock passed in.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    fn new(rate: f64, burst: f64, now: Instant) -> Bucket {
        Bucket {
            rate,
            burst,
            tokens: burst,
            refilled: now,
        }
    }

    /// Takes a token if there is one.
    fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.refilled = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// At most this many download and file-chooser reports a second reach the
/// server (the page decides how many it makes).
const TRANSFER_EVENTS_PER_SECOND: f64 = 5.0;
/// ... after a burst of this many.
const TRANSFER_EVENTS_BURST: f64 = 20.0;
/// Downloads under way whose suggested names are remembered; more are
/// reported by the name the browser saved them under, or not at all.
const MAX_DOWNLOADS_UNDER_WAY: usize = 256;

/// A file chooser the page opened and the agent intercepted.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Chooser {
    id: u64,
    /// The page's DevTools session.
    session: String,
    /// The `<input type=file>` it belongs to.
    node: i64,
    multiple: bool,
}

/// Downloads and file choosers of one browser run.
#[derive(Debug)]
struct Transfers {
    /// The session's home as the browser sees it.
    home: PathBuf,
    /// Suggested names of downloads under way, by guid.
    names: HashMap<String, String>,
    /// The chooser waiting for the viewer's answer; a new one replaces it.
    chooser: Option<Chooser>,
    next_chooser: u64,
    bucket: Bucket,
}

impl Transfers {
    fn downloads(&self) -> PathBuf {
        self.home.join(transfer::DOWNLOADS_DIR)
    }

    /// The file name a completed download has in `~/Downloads`: the one
    /// the browser says it saved (it adds ` (1)` to a name taken), else the
    /// suggested one; only a plain name, directly in the directory.
    fn completed_name(&self, file_path: Option<&str>, suggested: Option<String>) -> Option<String> {
        let saved = file_path.and_then(|p| {
            let p = Path::new(p);
            (p.parent() == Some(self.downloads().as_path()))
                .then(|| p.file_name()?.to_str().map(String::from))
                .flatten()
        });
        saved
            .or(suggested)
            .filter(|n| transfer::check_name(n).is_ok())
    }
}

/// One browser run's DevTools conversation, without I/O: events and
/// replies go in (with the time), commands for the browser collect in
/// [`Driver::take_commands`], messages for the server come out.
pub struct Driver {
    cmds: Commands,
    focus: Option<Focus>,
    focus_bucket: Bucket,
    /// None: transfers are off for the session.
    transfers: Option<Transfers>,
    /// Ids of `DOM.setFileInputFiles` commands, whose failure is logged.
    choosing: HashMap<u64, u64>,
    /// The tabs attached now (targets of type `page` but the browser's
    /// own WebUI, such as its omnibox popup), by their flat session.
    pages: HashMap<String, String>,
}

impl Driver {
    /// A new run. With `transfers_home`, downloads are saved in its
    /// `Downloads` and reported, and file choosers are intercepted.
    pub fn new(transfers_home: Option<PathBuf>, now: Instant) -> Driver {
        let mut cmds = Commands::default();
        // Every page, now and later, is attached on its own flat session.
        cmds.add(
            "Target.setAutoAttach",
            json!({ "autoAttach": true, "waitForDebuggerOnStart": false, "flatten": true }),
            None,
        );
        let transfers = transfers_home.map(|home| Transfers {
            home,
            names: HashMap::new(),
            chooser: None,
            next_chooser: 0,
            bucket: Bucket::new(TRANSFER_EVENTS_PER_SECOND, TRANSFER_EVENTS_BURST, now),
        });
        if let Some(t) = &transfers {
            // A browser-wide setting: no session.
            cmds.add(
                "Browser.setDownloadBehavior",
                json!({
                    "behavior": "allow",
                    "downloadPath": t.downloads().to_string_lossy(),
                    "eventsEnabled": true,
                }),
                None,
            );
        }
        Driver {
            cmds,
            focus: None,
            focus_bucket: Bucket::new(REPORTS_PER_SECOND, REPORTS_PER_SECOND, now),
            transfers,
            choosing: HashMap::new(),
            pages: HashMap::new(),
        }
    }

    /// The commands queued since the last call, each NUL-terminated.
    pub fn take_commands(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.cmds.pending)
    }

    /// Opens `url` in a new tab; returns the command's id, whose reply
    /// says how it went.
    pub fn open(&mut self, url: &str) -> u64 {
        self.cmds
            .add("Target.createTarget", json!({ "url": url }), None)
    }

    /// A new tab the browser made for [`Driver::open`]: in front, so the
    /// person sees the page a program opened.
    pub fn activate(&mut self, target: &str) {
        self.cmds
            .add("Target.activateTarget", json!({ "targetId": target }), None);
    }

    /// Closes every page but `keep`, the tab [`Driver::open`] made to
    /// replace them.
    pub fn close_others(&mut self, keep: &str) {
        let others: Vec<String> = self
            .pages
            .values()
            .filter(|t| t.as_str() != keep)
            .cloned()
            .collect();
        for target in others {
            self.cmds
                .add("Target.closeTarget", json!({ "targetId": target }), None);
        }
    }

    /// Asks the browser to close cleanly (the session ends): the only way
    /// it writes everything of its profile out.
    pub fn close(&mut self) {
        self.cmds.add("Browser.close", json!({}), None);
    }

    /// The server's answer to a file chooser: `paths` must each be an
    /// upload's absolute path (`/home/sandcast/Uploads/<name>`); they are
    /// set on the chooser's input if it is still the one waiting. Empty:
    /// cancelled, the input keeps what it had.
    pub fn choose(&mut self, chooser: u64, paths: &[String]) -> Result<(), String> {
        let Some(t) = &mut self.transfers else {
            return Err("transfers are off".into());
        };
        if t.chooser.as_ref().map(|c| c.id) != Some(chooser) {
            return Err(format!("file chooser {chooser} is not the one waiting"));
        }
        if let Some(bad) = paths.iter().find(|p| !transfer::is_upload_absolute(p)) {
            return Err(format!(
                "{bad:?} is not a file in ~/{}",
                transfer::UPLOADS_DIR
            ));
        }
        let c = t.chooser.take().expect("checked above");
        if paths.is_empty() {
            return Ok(());
        }
        let take = if c.multiple { transfer::MAX_CHOSEN } else { 1 };
        // The server names the session's home as /home/sandcast; the
        // browser gets the files where this agent's home really is.
        let files: Vec<String> = paths
            .iter()
            .take(take)
            .filter_map(|p| p.strip_prefix(sandcast_proto::files::SESSION_HOME))
            .map(|rest| {
                t.home
                    .join(rest.trim_start_matches('/'))
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        let id = self.cmds.add(
            "DOM.setFileInputFiles",
            json!({ "files": files, "backendNodeId": c.node }),
            Some(&c.session),
        );
        self.choosing.insert(id, c.id);
        Ok(())
    }

    /// Handles one message from the browser; what the server should hear
    /// of it, if anything.
    pub fn on_message(&mut self, msg: &Value, now: Instant) -> Option<Message> {
        if let Some(chooser) = msg["id"].as_u64().and_then(|id| self.choosing.remove(&id)) {
            let e = msg["error"]["message"].as_str()?;
            return Some(agent_line(format!(
                "the browser did not take the files for chooser {chooser}: {e}"
            )));
        }
        let session = msg["sessionId"].as_str();
        let params = &msg["params"];
        match msg["method"].as_str()? {
            "Target.attachedToTarget" => {
                let session = params["sessionId"].as_str()?;
                if params["targetInfo"]["type"] != "page" {
                    return None;
                }
                let url = params["targetInfo"]["url"].as_str().unwrap_or_default();
                let browsers_own = ["chrome://", "chrome-untrusted://", "devtools://"]
                    .iter()
                    .any(|p| url.starts_with(p));
                if let Some(target) = params["targetInfo"]["targetId"].as_str()
                    && !browsers_own
                {
                    self.pages.insert(session.to_string(), target.to_string());
                }
                // Bindings exist only in contexts Runtime inspects; enabling
                // it announces every page context, now and later, and the
                // script is put into each (below).
                self.cmds.add(
                    "Runtime.addBinding",
                    json!({ "name": BINDING }),
                    Some(session),
                );
                self.cmds.add("Runtime.enable", json!({}), Some(session));
                if self.transfers.is_some() {
                    // File choosers come to the agent instead of opening a
                    // dialog on the remote display (Page events need Page on).
                    self.cmds.add("Page.enable", json!({}), Some(session));
                    self.cmds.add(
                        "Page.setInterceptFileChooserDialog",
                        json!({ "enabled": true }),
                        Some(session),
                    );
                }
                None
            }
            "Target.detachedFromTarget" => {
                let gone = params["sessionId"].as_str()?;
                self.pages.remove(gone);
                if let Some(t) = &mut self.transfers
                    && t.chooser.as_ref().is_some_and(|c| c.session == gone)
                {
                    t.chooser = None;
                }
                None
            }
            "Runtime.executionContextCreated" => {
                let ctx = &params["context"];
                let (Some(session), Some(id)) = (session, ctx["id"].as_i64()) else {
                    return None;
                };
                if ctx["auxData"]["isDefault"] != true {
                    return None;
                }
                self.cmds.add(
                    "Runtime.evaluate",
                    json!({ "expression": FOCUS_SCRIPT, "contextId": id }),
                    Some(session),
                );
                None
            }
            "Runtime.bindingCalled" if params["name"] == BINDING => {
                let focus = params["payload"].as_str().and_then(parse_report)?;
                if self.focus == Some(focus) || !self.focus_bucket.take(now) {
                    return None;
                }
                self.focus = Some(focus);
                Some(Message::RemoteFocus {
                    editable: focus.editable,
                    x: focus.at.map(|a| a.0),
                    y: focus.at.map(|a| a.1),
                })
            }
            // Browser-wide events come without a session.
            "Browser.downloadWillBegin" if session.is_none() => {
                let t = self.transfers.as_mut()?;
                let (guid, name) = (
                    params["guid"].as_str()?,
                    params["suggestedFilename"].as_str()?,
                );
                if t.names.len() < MAX_DOWNLOADS_UNDER_WAY && guid.len() <= 64 {
                    t.names.insert(guid.to_string(), name.to_string());
                }
                None
            }
            "Browser.downloadProgress" if session.is_none() => {
                let t = self.transfers.as_mut()?;
                let guid = params["guid"].as_str()?;
                match params["state"].as_str()? {
                    "completed" => {}
                    "canceled" => {
                        t.names.remove(guid);
                        return None;
                    }
                    _ => return None,
                }
                let suggested = t.names.remove(guid);
                let name = t.completed_name(params["filePath"].as_str(), suggested)?;
                if !t.bucket.take(now) {
                    return None;
                }
                let size = params["receivedBytes"]
                    .as_f64()
                    .filter(|b| b.is_finite() && *b >= 0.0)
                    .map_or(0, |b| b as u64);
                Some(Message::Download { name, size })
            }
            "Page.fileChooserOpened" => {
                let t = self.transfers.as_mut()?;
                let session = session?;
                // Only an <input type=file> can be given files; other
                // pickers stay unanswered.
                let node = params["backendNodeId"].as_i64()?;
                if !t.bucket.take(now) {
                    return None;
                }
                t.next_chooser += 1;
                let multiple = params["mode"] == "selectMultiple";
                t.chooser = Some(Chooser {
                    id: t.next_chooser,
                    session: session.to_string(),
                    node,
                    multiple,
                });
                Some(Message::FileChooser {
                    chooser: t.next_chooser,
                    multiple,
                })
            }
            _ => None,
        }
    }
}

/// A line of the agent's in the session's log.
fn agent_line(line: String) -> Message {
    Message::Log(sandcast_proto::LogLine {
        source: "agent".into(),
        stream: sandcast_proto::LogStream::Agent,
        line,
    })
}

/// A viewer's answer to a file chooser, as the server passes it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The chooser answered.
    pub chooser: u64,
    /// Absolute paths of the uploads (checked again by [`Driver::choose`]).
    pub paths: Vec<String>,
}

/// Drives one browser run's DevTools pipe until the browser closes it:
/// `to_browser` is the write end of the browser's descriptor 3,
/// `from_browser` the read end of its descriptor 4; a word on `close`
/// asks the browser to close (the session ends). Focus changes,
/// downloads and file choosers go to `out` (see [`Driver`]); URLs from
/// `opens` become tabs in front (see [`crate::opener`]); `choices` answer
/// file choosers. `opens` and `choices` are shared by every run of the
/// browser: a request made while it restarts waits for the next run.
/// With `transfers_home`, downloads land in its `Downloads` and file
/// choosers are intercepted.
pub async fn run(
    to_browser: OwnedFd,
    from_browser: OwnedFd,
    out: mpsc::Sender<Message>,
    opens: Arc<tokio::sync::Mutex<mpsc::Receiver<OpenRequest>>>,
    close: oneshot::Receiver<()>,
    choices: Arc<tokio::sync::Mutex<mpsc::Receiver<Choice>>>,
    transfers_home: Option<PathBuf>,
) {
    let mut close = Some(close);
    let mut tx = tokio::fs::File::from_std(std::fs::File::from(to_browser));
    let (msg_tx, mut msgs) = mpsc::channel::<Value>(64);
    tokio::spawn(read_messages(from_browser, msg_tx));
    let mut opens = opens.lock().await;
    let mut choices = choices.lock().await;
    if let Some(home) = &transfers_home {
        // Made by the agent, so the first download does not depend on
        // the browser making it.
        let _ = std::fs::create_dir_all(home.join(transfer::DOWNLOADS_DIR));
    }
    let mut driver = Driver::new(transfers_home, Instant::now());
    // Open requests waiting for the browser's answer, by command id.
    let mut opening: HashMap<u64, OpenRequest> = HashMap::new();
    loop {
        let pending = driver.take_commands();
        if !pending.is_empty() && tx.write_all(&pending).await.is_err() {
            return;
        }
        let msg = tokio::select! {
            m = msgs.recv() => match m {
                Some(m) => m,
                None => return,
            },
            asked = async { close.as_mut().expect("guarded").await }, if close.is_some() => {
                close = None;
                if asked.is_ok() {
                    driver.close();
                }
                continue;
            }
            req = opens.recv() => {
                let Some(req) = req else { continue };
                let id = driver.open(&req.url);
                opening.insert(id, req);
                continue;
            }
            choice = choices.recv() => {
                let Some(c) = choice else { continue };
                if let Err(e) = driver.choose(c.chooser, &c.paths) {
                    let _ = out.send(agent_line(format!("file chooser answer ignored: {e}"))).await;
                }
                continue;
            }
        };
        if let Some(req) = msg["id"].as_u64().and_then(|id| opening.remove(&id)) {
            let answer = match (
                msg["result"]["targetId"].as_str(),
                msg["error"]["message"].as_str(),
            ) {
                (Some(target), _) => {
                    driver.activate(target);
                    if req.replace {
                        driver.close_others(target);
                    }
                    Ok(())
                }
                (None, Some(e)) => Err(format!("the browser refused it: {e}")),
                (None, None) => Err("the browser did not say".to_string()),
            };
            let _ = req.reply.send(answer);
            continue;
        }
        if let Some(m) = driver.on_message(&msg, Instant::now()) {
            let _ = out.send(m).await;
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
    /// The commands a driver queued, as JSON.
    fn commands(d: &mut Driver) -> Vec<Value> {
        d.take_commands()
            .split(|&b| b == 0)
            .filter(|c| !c.is_empty())
            .map(|c| serde_json::from_slice(c).unwrap())
            .collect()
    }

    fn home() -> PathBuf {
        PathBuf::from("/home/sandcast")
    }

    fn attached(session: &str) -> Value {
        json!({"method": "Target.attachedToTarget", "params": {
            "sessionId": session, "targetInfo": {"type": "page", "targetId": "T"}}})
    }

    fn attached_to(session: &str, kind: &str, target: &str) -> Value {
        json!({"method": "Target.attachedToTarget", "params": {
            "sessionId": session, "targetInfo": {"type": kind, "targetId": target, "url": "about:blank"}}})
    }

    #[test]
    fn a_replacing_tab_closes_every_other_page_and_nothing_else() {
        let now = Instant::now();
        let mut d = Driver::new(None, now);
        commands(&mut d);
        d.on_message(&attached_to("S1", "page", "BLANK"), now);
        d.on_message(&attached_to("S2", "service_worker", "WORKER"), now);
        d.on_message(&attached_to("S3", "page", "GONE"), now);
        d.on_message(
            &json!({"method": "Target.detachedFromTarget", "params": {"sessionId": "S3"}}),
            now,
        );
        d.on_message(&attached_to("S4", "page", "NEW"), now);
        // The browser's own popups are pages too, and not the warm-up's.
        let mut popup = attached_to("S5", "page", "POPUP");
        popup["params"]["targetInfo"]["url"] = json!("chrome://omnibox-popup.top-chrome/");
        d.on_message(&popup, now);
        commands(&mut d);
        d.close_others("NEW");
        let c = commands(&mut d);
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(c[0]["method"], "Target.closeTarget");
        assert_eq!(c[0]["params"]["targetId"], "BLANK");
    }

    #[test]
    fn downloads_are_allowed_into_the_home_and_choosers_intercepted_per_page() {
        let now = Instant::now();
        let mut d = Driver::new(Some(home()), now);
        let first = commands(&mut d);
        assert_eq!(first[0]["method"], "Target.setAutoAttach");
        // Browser-wide: no session.
        assert_eq!(first[1]["method"], "Browser.setDownloadBehavior");
        assert_eq!(first[1]["params"]["behavior"], "allow");
        assert_eq!(
            first[1]["params"]["downloadPath"],
            "/home/sandcast/Downloads"
        );
        assert_eq!(first[1]["params"]["eventsEnabled"], true);
        assert!(first[1].get("sessionId").is_none());
        assert_eq!(d.on_message(&attached("S1"), now), None);
        let cmds = commands(&mut d);
        let methods: Vec<_> = cmds.iter().map(|c| c["method"].as_str().unwrap()).collect();
        assert_eq!(
            methods,
            [
                "Runtime.addBinding",
                "Runtime.enable",
                "Page.enable",
                "Page.setInterceptFileChooserDialog"
            ]
        );
        assert!(cmds.iter().all(|c| c["sessionId"] == "S1"));
        assert_eq!(cmds[3]["params"]["enabled"], true);
    }

    #[test]
    fn with_transfers_off_nothing_is_intercepted_or_reported() {
        let now = Instant::now();
        let mut d = Driver::new(None, now);
        let first = commands(&mut d);
        assert_eq!(first.len(), 1, "{first:?}");
        d.on_message(&attached("S1"), now);
        let methods: Vec<_> = commands(&mut d)
            .iter()
            .map(|c| c["method"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(methods, ["Runtime.addBinding", "Runtime.enable"]);
        let opened = json!({"method": "Page.fileChooserOpened", "sessionId": "S1",
            "params": {"frameId": "F", "backendNodeId": 5, "mode": "selectSingle"}});
        assert_eq!(d.on_message(&opened, now), None);
        let done = json!({"method": "Browser.downloadProgress", "params": {
            "guid": "g", "state": "completed", "receivedBytes": 3, "totalBytes": 3,
            "filePath": "/home/sandcast/Downloads/a.txt"}});
        assert_eq!(d.on_message(&done, now), None);
        assert!(d.choose(1, &["/home/sandcast/Uploads/a".into()]).is_err());
    }

    #[test]
    fn a_completed_download_is_reported_by_its_saved_plain_name() {
        let now = Instant::now();
        let mut d = Driver::new(Some(home()), now);
        let begin = |guid: &str, name: &str| {
            json!({"method": "Browser.downloadWillBegin", "params": {
                "frameId": "F", "guid": guid, "url": "blob:x", "suggestedFilename": name}})
        };
        let progress = |guid: &str, state: &str, path: Option<&str>| {
            let mut v = json!({"method": "Browser.downloadProgress", "params": {
                "guid": guid, "state": state, "receivedBytes": 1234.0, "totalBytes": 1234.0}});
            if let Some(p) = path {
                v["params"]["filePath"] = json!(p);
            }
            v
        };
        assert_eq!(d.on_message(&begin("g1", "report.pdf"), now), None);
        assert_eq!(d.on_message(&progress("g1", "inProgress", None), now), None);
        // The name the browser saved it under wins (it adds " (1)").
        assert_eq!(
            d.on_message(
                &progress(
                    "g1",
                    "completed",
                    Some("/home/sandcast/Downloads/report (1).pdf")
                ),
                now
            ),
            Some(Message::Download {
                name: "report (1).pdf".into(),
                size: 1234
            })
        );
        // Reported once.
        assert_eq!(d.on_message(&progress("g1", "completed", None), now), None);
        // Without a path, the suggested name.
        d.on_message(&begin("g2", "b.txt"), now);
        assert_eq!(
            d.on_message(&progress("g2", "completed", None), now),
            Some(Message::Download {
                name: "b.txt".into(),
                size: 1234
            })
        );
        // A path outside the directory is not believed; a bad name is not reported.
        d.on_message(&begin("g3", "../../etc/passwd"), now);
        assert_eq!(
            d.on_message(&progress("g3", "completed", Some("/etc/passwd")), now),
            None
        );
        d.on_message(&begin("g4", "fine.txt"), now);
        assert_eq!(
            d.on_message(
                &progress("g4", "completed", Some("/home/sandcast/Downloads/sub/x")),
                now
            )
            .map(|m| matches!(m, Message::Download { name, .. } if name == "fine.txt")),
            Some(true)
        );
        // Cancelled: forgotten, never reported.
        d.on_message(&begin("g5", "c.txt"), now);
        assert_eq!(d.on_message(&progress("g5", "canceled", None), now), None);
        assert_eq!(d.on_message(&progress("g5", "completed", None), now), None);
        // A download event inside a page's session is not the browser's.
        let mut forged = progress("g6", "completed", Some("/home/sandcast/Downloads/f"));
        forged["sessionId"] = json!("S1");
        assert_eq!(d.on_message(&forged, now), None);
    }

    #[test]
    fn download_reports_are_rate_limited() {
        let now = Instant::now();
        let mut d = Driver::new(Some(home()), now);
        let done = |i: usize| {
            json!({"method": "Browser.downloadProgress", "params": {
                "guid": format!("g{i}"), "state": "completed", "receivedBytes": 1,
                "filePath": format!("/home/sandcast/Downloads/f{i}")}})
        };
        let sent = (0..1000)
            .filter(|&i| d.on_message(&done(i), now).is_some())
            .count();
        assert_eq!(sent, TRANSFER_EVENTS_BURST as usize);
        let later = now + std::time::Duration::from_secs(1);
        let sent = (1000..2000)
            .filter(|&i| d.on_message(&done(i), later).is_some())
            .count();
        assert_eq!(sent, TRANSFER_EVENTS_PER_SECOND as usize);
    }

    #[test]
    fn a_chooser_is_answered_only_with_uploads_on_its_own_input() {
        let now = Instant::now();
        let mut d = Driver::new(Some(home()), now);
        d.on_message(&attached("S1"), now);
        commands(&mut d);
        let opened = |mode: &str| {
            json!({"method": "Page.fileChooserOpened", "sessionId": "S1",
                "params": {"frameId": "F", "backendNodeId": 42, "mode": mode}})
        };
        assert_eq!(
            d.on_message(&opened("selectSingle"), now),
            Some(Message::FileChooser {
                chooser: 1,
                multiple: false
            })
        );
        // Not a file in ~/Uploads, or not the chooser waiting: nothing is set.
        for bad in [
            "/etc/passwd",
            "/home/sandcast/Uploads/../x",
            "/home/sandcast/a",
        ] {
            assert!(d.choose(1, &[bad.into()]).is_err(), "{bad}");
        }
        assert!(
            d.choose(7, &["/home/sandcast/Uploads/a.txt".into()])
                .is_err()
        );
        assert!(commands(&mut d).is_empty());
        // A single chooser takes the first file.
        d.choose(
            1,
            &[
                "/home/sandcast/Uploads/a.txt".into(),
                "/home/sandcast/Uploads/b.txt".into(),
            ],
        )
        .unwrap();
        let cmds = commands(&mut d);
        assert_eq!(cmds.len(), 1);
        assert_eq!(cmds[0]["method"], "DOM.setFileInputFiles");
        assert_eq!(cmds[0]["sessionId"], "S1");
        assert_eq!(cmds[0]["params"]["backendNodeId"], 42);
        assert_eq!(
            cmds[0]["params"]["files"],
            json!(["/home/sandcast/Uploads/a.txt"])
        );
        // Answered once.
        assert!(
            d.choose(1, &["/home/sandcast/Uploads/a.txt".into()])
                .is_err()
        );
        // A failure to set them is logged.
        let failed = json!({"id": cmds[0]["id"], "error": {"message": "no node"}});
        assert!(
            matches!(d.on_message(&failed, now), Some(Message::Log(l)) if l.line.contains("no node"))
        );

        // A multiple chooser takes all; cancelling sets nothing.
        assert_eq!(
            d.on_message(&opened("selectMultiple"), now),
            Some(Message::FileChooser {
                chooser: 2,
                multiple: true
            })
        );
        d.choose(2, &[]).unwrap();
        assert!(commands(&mut d).is_empty());
        d.on_message(&opened("selectMultiple"), now);
        d.choose(
            3,
            &[
                "/home/sandcast/Uploads/a.txt".into(),
                "/home/sandcast/Uploads/b.txt".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            commands(&mut d)[0]["params"]["files"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        // A chooser with no input, or one whose page went away, is not answered.
        let picker = json!({"method": "Page.fileChooserOpened", "sessionId": "S1",
            "params": {"frameId": "F", "mode": "selectSingle"}});
        assert_eq!(d.on_message(&picker, now), None);
        d.on_message(&opened("selectSingle"), now);
        d.on_message(
            &json!({"method": "Target.detachedFromTarget", "params": {"sessionId": "S1"}}),
            now,
        );
        assert!(
            d.choose(4, &["/home/sandcast/Uploads/a.txt".into()])
                .is_err()
        );
    }

    #[test]
    fn uploads_are_given_where_the_agents_home_really_is() {
        let now = Instant::now();
        let mut d = Driver::new(Some(PathBuf::from("/tmp/h")), now);
        d.on_message(
            &json!({"method": "Page.fileChooserOpened", "sessionId": "S",
                "params": {"backendNodeId": 1, "mode": "selectSingle"}}),
            now,
        );
        commands(&mut d);
        d.choose(1, &["/home/sandcast/Uploads/a.txt".into()])
            .unwrap();
        assert_eq!(
            commands(&mut d)[0]["params"]["files"],
            json!(["/tmp/h/Uploads/a.txt"])
        );
    }

    #[test]
    fn focus_reports_are_passed_on_once_each() {
        let now = Instant::now();
        let mut d = Driver::new(None, now);
        let call = |p: &str| {
            json!({"method": "Runtime.bindingCalled", "sessionId": "S",
                "params": {"name": BINDING, "payload": p, "executionContextId": 1}})
        };
        assert_eq!(
            d.on_message(&call("e,1,2"), now),
            Some(Message::RemoteFocus {
                editable: true,
                x: Some(1),
                y: Some(2)
            })
        );
        assert_eq!(d.on_message(&call("e,1,2"), now), None);
        assert_eq!(d.on_message(&call("bogus"), now), None);
        assert!(d.on_message(&call("n"), now).is_some());
    }
}
