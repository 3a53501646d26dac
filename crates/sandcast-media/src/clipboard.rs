//! The session's clipboard: X selections both ways.
//!
//! From the session: a change of the CLIPBOARD owner (XFixes tells us, no
//! polling) is read as UTF-8 text and handed to a callback; the PRIMARY
//! selection (any text the user highlights) is not reported, since it would
//! overwrite the viewer's clipboard on every selection.
//! To the session: [`Clipboard::set`] makes us the owner of both CLIPBOARD
//! and PRIMARY, so Ctrl+V and middle-click paste the same text.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sandcast_proto::MAX_TEXT_LEN;
use x11rb::connection::Connection;
use x11rb::protocol::Event;
use x11rb::protocol::xfixes::{ConnectionExt as _, SelectionEventMask};
use x11rb::protocol::xproto::{
    Atom, AtomEnum, ClientMessageEvent, ConnectionExt as _, CreateWindowAux, EventMask, PropMode,
    Property, SelectionNotifyEvent, SelectionRequestEvent, Window, WindowClass,
};
use x11rb::rust_connection::RustConnection;
use x11rb::wrapper::ConnectionExt as _;

use crate::error::{Error, Result};
use crate::xutil;

x11rb::atom_manager! {
    Atoms: AtomsCookie {
        CLIPBOARD,
        PRIMARY,
        TARGETS,
        UTF8_STRING,
        TEXT,
        INCR,
        TEXT_PLAIN_UTF8: b"text/plain;charset=utf-8",
        SANDCAST_CLIP,
    }
}

/// How long an owner may take to answer, including an incremental transfer.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`Clipboard::set`] waits for the clipboard thread.
const SET_TIMEOUT: Duration = Duration::from_secs(5);

struct Shared {
    /// Text to own, and who waits for it to be owned.
    pending: Mutex<Option<(String, mpsc::Sender<()>)>>,
    stop: AtomicBool,
}

/// Keeps the session's clipboard in step with the viewer's.
pub struct Clipboard {
    shared: Arc<Shared>,
    waker: RustConnection,
    window: Window,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Clipboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clipboard").finish_non_exhaustive()
    }
}

impl Clipboard {
    /// Watches `display`'s clipboard; `on_change` gets the text whenever
    /// another client (the browser) puts text on the CLIPBOARD.
    pub fn spawn(
        display: &str,
        on_change: impl FnMut(String) + Send + 'static,
    ) -> Result<Clipboard> {
        let (conn, screen) = xutil::connect(display)?;
        conn.xfixes_query_version(5, 0)?
            .reply()
            .map_err(|_| Error::MissingExtension("XFIXES"))?;
        let atoms = Atoms::new(&conn)?.reply()?;
        let root = conn.setup().roots[screen].root;
        let window = conn.generate_id()?;
        conn.create_window(
            0,
            window,
            root,
            -1,
            -1,
            1,
            1,
            0,
            WindowClass::INPUT_ONLY,
            0,
            &CreateWindowAux::new().event_mask(EventMask::PROPERTY_CHANGE),
        )?;
        conn.xfixes_select_selection_input(
            window,
            atoms.CLIPBOARD,
            SelectionEventMask::SET_SELECTION_OWNER,
        )?;
        conn.get_input_focus()?.reply()?;
        let (waker, _) = xutil::connect(display)?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        let mut worker = Worker {
            conn,
            window,
            atoms,
            owned: None,
            last_seen: None,
            on_change: Box::new(on_change),
        };
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("sandcast-clipboard".into())
            .spawn(move || {
                if let Err(e) = worker.run(&thread_shared) {
                    tracing::error!(error = %e, "clipboard stopped");
                }
            })
            .map_err(|source| Error::Os {
                what: "spawn the clipboard thread",
                source,
            })?;
        Ok(Clipboard {
            shared,
            waker,
            window,
            thread: Some(thread),
        })
    }

    /// Puts `text` on the session's CLIPBOARD and PRIMARY; when it returns,
    /// a paste in the session gets `text`.
    pub fn set(&self, text: &str) -> Result<()> {
        if text.len() > MAX_TEXT_LEN {
            return Err(Error::BadInput(sandcast_proto::InputError::BadLength {
                field: "clipboard",
                len: text.len(),
                max: MAX_TEXT_LEN,
            }));
        }
        if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
            return Err(Error::Stopped("clipboard"));
        }
        let (tx, rx) = mpsc::channel();
        *self.shared.pending.lock().expect("clipboard lock") = Some((text.to_owned(), tx));
        self.wake()?;
        rx.recv_timeout(SET_TIMEOUT)
            .map_err(|_| Error::Stopped("clipboard"))
    }

    fn wake(&self) -> Result<()> {
        let ev = ClientMessageEvent::new(32, self.window, x11rb::NONE, [0u32; 5]);
        self.waker
            .send_event(false, self.window, EventMask::NO_EVENT, ev)?;
        self.waker.flush()?;
        Ok(())
    }
}

impl Drop for Clipboard {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    conn: RustConnection,
    window: Window,
    atoms: Atoms,
    /// The text we own both selections with.
    owned: Option<String>,
    /// The last text reported or set, so nothing is reported twice.
    last_seen: Option<String>,
    on_change: Box<dyn FnMut(String) + Send>,
}

impl Worker {
    fn run(&mut self, shared: &Shared) -> Result<()> {
        while !shared.stop.load(Ordering::SeqCst) {
            let pending = shared.pending.lock().expect("clipboard lock").take();
            if let Some((text, done)) = pending {
                self.own(text)?;
                let _ = done.send(());
            }
            let ev = xutil::wait_event(&self.conn, None)?;
            match ev {
                // Our own SetSelectionOwner comes back here too.
                Some(Event::XfixesSelectionNotify(ev))
                    if ev.owner != self.window && ev.owner != x11rb::NONE =>
                {
                    match self.read(ev.selection) {
                        Ok(Some(text)) => {
                            if self.last_seen.as_deref() != Some(&text) {
                                self.last_seen = Some(text.clone());
                                (self.on_change)(text);
                            }
                        }
                        Ok(None) => {}
                        Err(e) => tracing::warn!(error = %e, "reading the clipboard failed"),
                    }
                }
                // The server sends requests only while we own a selection,
                // so the text is kept, not cleared on SelectionClear.
                Some(Event::SelectionRequest(req)) => self.answer(&req)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn own(&mut self, text: String) -> Result<()> {
        for sel in [self.atoms.CLIPBOARD, self.atoms.PRIMARY] {
            self.conn
                .set_selection_owner(self.window, sel, x11rb::CURRENT_TIME)?;
        }
        self.last_seen = Some(text.clone());
        self.owned = Some(text);
        // A round trip: once answered, the server has made us the owner, so
        // a paste that follows `set` sees the new text.
        let owner = self
            .conn
            .get_selection_owner(self.atoms.CLIPBOARD)?
            .reply()?
            .owner;
        if owner != self.window {
            tracing::warn!("another client took the clipboard at once");
        }
        Ok(())
    }

    /// Answers another client's request for our selection.
    fn answer(&mut self, req: &SelectionRequestEvent) -> Result<()> {
        let a = &self.atoms;
        // Obsolete clients name no property; ICCCM says use the target.
        let property = if req.property == x11rb::NONE {
            req.target
        } else {
            req.property
        };
        let text = self.owned.as_deref();
        let ok = match text {
            None => false,
            Some(_) if req.target == a.TARGETS => {
                let targets = [
                    a.TARGETS,
                    a.UTF8_STRING,
                    a.TEXT_PLAIN_UTF8,
                    a.TEXT,
                    AtomEnum::STRING.into(),
                ];
                self.conn.change_property32(
                    PropMode::REPLACE,
                    req.requestor,
                    property,
                    AtomEnum::ATOM,
                    &targets,
                )?;
                true
            }
            Some(t) if [a.UTF8_STRING, a.TEXT_PLAIN_UTF8, a.TEXT].contains(&req.target) => {
                let ty = if req.target == a.TEXT {
                    a.UTF8_STRING
                } else {
                    req.target
                };
                self.conn.change_property8(
                    PropMode::REPLACE,
                    req.requestor,
                    property,
                    ty,
                    t.as_bytes(),
                )?;
                true
            }
            Some(t) if req.target == Atom::from(AtomEnum::STRING) => {
                // STRING is Latin-1; what it cannot hold becomes '?'.
                let latin1: Vec<u8> = t
                    .chars()
                    .map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?'))
                    .collect();
                self.conn.change_property8(
                    PropMode::REPLACE,
                    req.requestor,
                    property,
                    AtomEnum::STRING,
                    &latin1,
                )?;
                true
            }
            Some(_) => false,
        };
        let ev = SelectionNotifyEvent {
            response_type: x11rb::protocol::xproto::SELECTION_NOTIFY_EVENT,
            sequence: 0,
            time: req.time,
            requestor: req.requestor,
            selection: req.selection,
            target: req.target,
            property: if ok { property } else { x11rb::NONE },
        };
        self.conn
            .send_event(false, req.requestor, EventMask::NO_EVENT, ev)?;
        self.conn.flush()?;
        Ok(())
    }

    /// Reads `selection` as UTF-8 text, following an incremental transfer.
    /// `None` when the owner has no text or too much of it.
    fn read(&mut self, selection: Atom) -> Result<Option<String>> {
        let a = &self.atoms;
        let (prop, utf8, incr) = (a.SANDCAST_CLIP, a.UTF8_STRING, a.INCR);
        self.conn
            .convert_selection(self.window, selection, utf8, prop, x11rb::CURRENT_TIME)?;
        self.conn.flush()?;
        let deadline = Instant::now() + READ_TIMEOUT;
        let notify = loop {
            match xutil::wait_event(&self.conn, Some(deadline))? {
                Some(Event::SelectionNotify(ev)) if ev.requestor == self.window => break ev,
                // Keep serving our own selection meanwhile.
                Some(Event::SelectionRequest(req)) => self.answer(&req)?,
                Some(_) => {}
                None => return Ok(None),
            }
        };
        if notify.property == x11rb::NONE {
            return Ok(None);
        }
        // Never more than the limit is read: a session's owner may offer
        // gigabytes.
        let reply = self
            .conn
            .get_property(true, self.window, prop, AtomEnum::ANY, 0, words_for(0))?
            .reply()?;
        if reply.bytes_after > 0 {
            return Ok(too_long(reply.value.len() + reply.bytes_after as usize));
        }
        let bytes = if reply.type_ == incr {
            // The owner sends chunks; each one we delete asks for the next,
            // and an empty one ends the transfer.
            let mut all = Vec::new();
            loop {
                let ev = loop {
                    match xutil::wait_event(&self.conn, Some(deadline))? {
                        Some(Event::PropertyNotify(ev))
                            if ev.atom == prop && ev.state == Property::NEW_VALUE =>
                        {
                            break ev;
                        }
                        Some(Event::SelectionRequest(req)) => self.answer(&req)?,
                        Some(_) => {}
                        None => return Ok(None),
                    }
                };
                let chunk = self
                    .conn
                    .get_property(
                        true,
                        ev.window,
                        prop,
                        AtomEnum::ANY,
                        0,
                        words_for(all.len()),
                    )?
                    .reply()?;
                if chunk.value.is_empty() {
                    break all;
                }
                let len = all.len() + chunk.value.len() + chunk.bytes_after as usize;
                if chunk.bytes_after > 0 || len > MAX_TEXT_LEN {
                    return Ok(too_long(len));
                }
                all.extend_from_slice(&chunk.value);
            }
        } else {
            reply.value
        };
        Ok(selection_text(&bytes))
    }
}

/// How many 32-bit units of a property to read when `have` bytes of the
/// text are already here: one unit more than the limit allows, so a longer
/// text shows as `bytes_after`.
fn words_for(have: usize) -> u32 {
    u32::try_from(MAX_TEXT_LEN.saturating_sub(have) / 4 + 1).unwrap_or(u32::MAX)
}

fn too_long(len: usize) -> Option<String> {
    tracing::warn!(
        len,
        max = MAX_TEXT_LEN,
        "clipboard text too long; not copied"
    );
    None
}

/// The text of a selection's bytes: UTF-8 with invalid sequences replaced,
/// `None` when it is longer than [`MAX_TEXT_LEN`] bytes, counted after the
/// replacement (each invalid byte becomes a three-byte U+FFFD).
fn selection_text(bytes: &[u8]) -> Option<String> {
    if bytes.len() > MAX_TEXT_LEN {
        return too_long(bytes.len());
    }
    let text = String::from_utf8_lossy(bytes);
    if text.len() > MAX_TEXT_LEN {
        return too_long(text.len());
    }
    Some(text.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xvfb::Xvfb;
    use std::sync::mpsc;

    /// Another X client: a window and the atoms.
    fn client(display: &str) -> (RustConnection, Window, Atoms) {
        let (conn, screen) = xutil::connect(display).unwrap();
        let atoms = Atoms::new(&conn).unwrap().reply().unwrap();
        let win = conn.generate_id().unwrap();
        let root = conn.setup().roots[screen].root;
        conn.create_window(
            0,
            win,
            root,
            0,
            0,
            1,
            1,
            0,
            WindowClass::INPUT_ONLY,
            0,
            &CreateWindowAux::new(),
        )
        .unwrap();
        conn.flush().unwrap();
        (conn, win, atoms)
    }

    /// Reads `selection` as UTF8_STRING the way a browser would.
    fn read_as_client(display: &str, selection: fn(&Atoms) -> Atom) -> Option<String> {
        let (conn, win, atoms) = client(display);
        let sel = selection(&atoms);
        conn.convert_selection(
            win,
            sel,
            atoms.UTF8_STRING,
            atoms.SANDCAST_CLIP,
            x11rb::CURRENT_TIME,
        )
        .unwrap();
        conn.flush().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match xutil::wait_event(&conn, Some(deadline)).unwrap() {
                Some(Event::SelectionNotify(ev)) => {
                    if ev.property == x11rb::NONE {
                        return None;
                    }
                    let r = conn
                        .get_property(true, win, ev.property, AtomEnum::ANY, 0, 1 << 20)
                        .unwrap()
                        .reply()
                        .unwrap();
                    assert_eq!(r.type_, atoms.UTF8_STRING);
                    return Some(String::from_utf8(r.value).unwrap());
                }
                Some(_) => {}
                None => panic!("no SelectionNotify within 10 s"),
            }
        }
    }

    #[test]
    fn viewer_text_lands_on_clipboard_and_primary() {
        let x = Xvfb::start(320, 240).unwrap();
        let (tx, rx) = mpsc::channel();
        let clip = Clipboard::spawn(x.display(), move |t| tx.send(t).unwrap()).unwrap();
        clip.set("héllo € 世界").unwrap();
        assert_eq!(
            read_as_client(x.display(), |a| a.CLIPBOARD).as_deref(),
            Some("héllo € 世界")
        );
        assert_eq!(
            read_as_client(x.display(), |a| a.PRIMARY).as_deref(),
            Some("héllo € 世界")
        );
        // Our own text is not reported back as a change.
        assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());
        let err = clip.set(&"x".repeat(MAX_TEXT_LEN + 1)).unwrap_err();
        assert!(
            err.to_string().contains(&(MAX_TEXT_LEN + 1).to_string()),
            "{err}"
        );
    }

    #[test]
    fn session_copy_reaches_the_callback() {
        let x = Xvfb::start(320, 240).unwrap();
        let (tx, rx) = mpsc::channel();
        let _clip = Clipboard::spawn(x.display(), move |t| tx.send(t).unwrap()).unwrap();
        // Another client (the browser) copies text and serves it.
        let (conn, win, atoms) = client(x.display());
        let text = "copied in the session ✓".to_string();
        conn.set_selection_owner(win, atoms.CLIPBOARD, x11rb::CURRENT_TIME)
            .unwrap();
        conn.flush().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match xutil::wait_event(&conn, Some(deadline)).unwrap() {
                Some(Event::SelectionRequest(req)) => {
                    assert_eq!(req.target, atoms.UTF8_STRING);
                    conn.change_property8(
                        PropMode::REPLACE,
                        req.requestor,
                        req.property,
                        req.target,
                        text.as_bytes(),
                    )
                    .unwrap();
                    let ev = SelectionNotifyEvent {
                        response_type: x11rb::protocol::xproto::SELECTION_NOTIFY_EVENT,
                        sequence: 0,
                        time: req.time,
                        requestor: req.requestor,
                        selection: req.selection,
                        target: req.target,
                        property: req.property,
                    };
                    conn.send_event(false, req.requestor, EventMask::NO_EVENT, ev)
                        .unwrap();
                    conn.flush().unwrap();
                    break;
                }
                Some(_) => {}
                None => panic!("the clipboard never asked for the text"),
            }
        }
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), text);
    }

    #[test]
    fn a_missing_display_is_named() {
        let err = Clipboard::spawn(":4244", |_| {}).unwrap_err();
        assert!(err.to_string().contains(":4244"), "{err}");
    }

    #[test]
    fn large_copies_arrive_by_incremental_transfer() {
        use x11rb::protocol::xproto::ChangeWindowAttributesAux;
        let x = Xvfb::start(320, 240).unwrap();
        let (tx, rx) = mpsc::channel();
        let _clip = Clipboard::spawn(x.display(), move |t| tx.send(t).unwrap()).unwrap();
        let (conn, win, atoms) = client(x.display());
        let text: String = (0..10_000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        conn.set_selection_owner(win, atoms.CLIPBOARD, x11rb::CURRENT_TIME)
            .unwrap();
        conn.flush().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let next = || match xutil::wait_event(&conn, Some(deadline)).unwrap() {
            Some(e) => e,
            None => panic!("the transfer stalled"),
        };
        // The request: answer INCR, and watch the requestor's property.
        let req = loop {
            if let Event::SelectionRequest(req) = next() {
                break req;
            }
        };
        conn.change_window_attributes(
            req.requestor,
            &ChangeWindowAttributesAux::new().event_mask(EventMask::PROPERTY_CHANGE),
        )
        .unwrap();
        conn.change_property32(
            PropMode::REPLACE,
            req.requestor,
            req.property,
            atoms.INCR,
            &[text.len() as u32],
        )
        .unwrap();
        let notify = SelectionNotifyEvent {
            response_type: x11rb::protocol::xproto::SELECTION_NOTIFY_EVENT,
            sequence: 0,
            time: req.time,
            requestor: req.requestor,
            selection: req.selection,
            target: req.target,
            property: req.property,
        };
        conn.send_event(false, req.requestor, EventMask::NO_EVENT, notify)
            .unwrap();
        conn.flush().unwrap();
        // Each deletion asks for the next chunk; an empty one ends it.
        let mut chunks = text.as_bytes().chunks(3000).chain(std::iter::once(&[][..]));
        loop {
            match next() {
                Event::PropertyNotify(ev)
                    if ev.window == req.requestor
                        && ev.atom == req.property
                        && ev.state == Property::DELETE =>
                {
                    let Some(chunk) = chunks.next() else { break };
                    conn.change_property8(
                        PropMode::REPLACE,
                        req.requestor,
                        req.property,
                        atoms.UTF8_STRING,
                        chunk,
                    )
                    .unwrap();
                    conn.flush().unwrap();
                    if chunk.is_empty() {
                        break;
                    }
                }
                _ => {}
            }
        }
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), text);
    }

    #[test]
    fn invalid_utf8_is_held_to_the_limit_after_replacement() {
        // A selection of MAX_TEXT_LEN bytes that are not UTF-8 became three
        // times as much text (each byte a U+FFFD), and was sent on as is.
        assert_eq!(selection_text(&vec![0xff; MAX_TEXT_LEN]), None);
        assert_eq!(
            selection_text(&vec![0xff; MAX_TEXT_LEN / 3]).unwrap().len(),
            MAX_TEXT_LEN / 3 * 3
        );
        assert_eq!(selection_text(&vec![b'a'; MAX_TEXT_LEN + 1]), None);
        assert_eq!(selection_text("ä€".as_bytes()).as_deref(), Some("ä€"));
    }

    #[test]
    fn a_copy_over_the_limit_is_not_read_whole_and_the_clipboard_goes_on() {
        let x = Xvfb::start(320, 240).unwrap();
        let (tx, rx) = mpsc::channel();
        let _clip = Clipboard::spawn(x.display(), move |t| tx.send(t).unwrap()).unwrap();
        let (conn, win, atoms) = client(x.display());
        // Serves `text` to the next request for the CLIPBOARD it owns.
        let serve = |text: &[u8]| {
            conn.set_selection_owner(win, atoms.CLIPBOARD, x11rb::CURRENT_TIME)
                .unwrap();
            conn.flush().unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match xutil::wait_event(&conn, Some(deadline)).unwrap() {
                    Some(Event::SelectionRequest(req)) => {
                        conn.change_property8(
                            PropMode::REPLACE,
                            req.requestor,
                            req.property,
                            req.target,
                            text,
                        )
                        .unwrap();
                        let ev = SelectionNotifyEvent {
                            response_type: x11rb::protocol::xproto::SELECTION_NOTIFY_EVENT,
                            sequence: 0,
                            time: req.time,
                            requestor: req.requestor,
                            selection: req.selection,
                            target: req.target,
                            property: req.property,
                        };
                        conn.send_event(false, req.requestor, EventMask::NO_EVENT, ev)
                            .unwrap();
                        conn.flush().unwrap();
                        return;
                    }
                    Some(_) => {}
                    None => panic!("the clipboard never asked for the text"),
                }
            }
        };
        // 4 MiB offered in one property: refused from its first 64 KiB.
        serve(&vec![b'x'; 4 << 20]);
        assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());
        serve(b"short and sweet");
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            "short and sweet"
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn selection_text_is_within_the_limit(
                bytes in prop_oneof![
                    prop::collection::vec(any::<u8>(), 0..4096),
                    (any::<u8>(), 0..MAX_TEXT_LEN + 64).prop_map(|(b, n)| vec![b; n]),
                    (0..MAX_TEXT_LEN + 64).prop_map(|n| "é".repeat(n / 2).into_bytes()),
                ]
            ) {
                match selection_text(&bytes) {
                    Some(text) => {
                        prop_assert!(text.len() <= MAX_TEXT_LEN);
                        if let Ok(valid) = std::str::from_utf8(&bytes) {
                            prop_assert_eq!(text, valid);
                        }
                    }
                    None => prop_assert!(
                        bytes.len() > MAX_TEXT_LEN
                            || String::from_utf8_lossy(&bytes).len() > MAX_TEXT_LEN
                    ),
                }
            }

            #[test]
            fn reads_never_ask_for_more_than_the_limit(have in 0..MAX_TEXT_LEN * 2) {
                let bytes = words_for(have) as usize * 4;
                prop_assert!(bytes <= MAX_TEXT_LEN.saturating_sub(have) + 4);
                prop_assert!(bytes > MAX_TEXT_LEN.saturating_sub(have));
            }
        }
    }
}
