//! Input injection with XTest.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sandcast_proto::InputEvent;
use x11rb::connection::Connection;
use x11rb::protocol::xproto::{self, ConnectionExt as _};
use x11rb::protocol::xtest::ConnectionExt as _;
use x11rb::rust_connection::RustConnection;

use crate::error::{Error, Result};
use crate::keysym::{keysym_for_char, keysym_for_key};
use crate::xutil;

/// Viewer pixels per wheel click. Chromium on X11 scrolls about 53 px per
/// wheel click, so one click per 53 px makes the remote page move as far as
/// the viewer scrolled; touchpads' small deltas add up instead of being
/// lost, and a remainder is kept for the next event.
pub const WHEEL_PX_PER_CLICK: i32 = 53;

/// At most this many clicks per wheel event, whatever the delta.
const MAX_CLICKS_PER_EVENT: i32 = 50;

/// Text events cost one token plus one per this many characters.
const CHARS_PER_TOKEN: usize = 8;

/// Most keys held at once. A keyboard has about a hundred; each held key is
/// remembered by the viewer's `code`, so a viewer pressing ever new codes
/// without releasing them must not grow that record without bound.
pub const MAX_KEYS_HELD: usize = 128;

/// How long a client gets to take up a changed keyboard mapping before a
/// key bound by the change is pressed. X sends every client a MappingNotify,
/// but Chromium fetches the new map asynchronously: a press that reaches it
/// first is read with the old map, where the key code means nothing, and
/// the character is lost (measured: none of two new characters arrived
/// without a pause; 15 ms was enough on an idle host). Nothing tells us when
/// the client is done, so the pause is generous, and text binds every new
/// character of a run at once so a run pays it once.
pub const KEYMAP_SETTLE: Duration = Duration::from_millis(60);

/// How long after its last press a bound key code may be bound to another
/// keysym. A client that lags behind (a loaded host) may read that press
/// only after fetching a map that already holds the new binding, and type
/// the wrong character: measured with noVNC polling the screen, a run of
/// presses 60 ms behind came out as the next run's characters. Codes are
/// reused least recently used first, so a person's typing rarely waits.
pub const REBIND_AFTER: Duration = Duration::from_millis(300);

const SHIFT_L: u32 = 0xffe1;
const SHIFT_R: u32 = 0xffe2;

/// A token bucket: `per_second` sustained, `burst` at once.
#[derive(Debug, Clone)]
pub struct RateLimit {
    per_second: u32,
    burst: u32,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    /// A full bucket.
    pub fn new(per_second: u32, burst: u32) -> RateLimit {
        RateLimit {
            per_second,
            burst,
            tokens: f64::from(burst),
            last: Instant::now(),
        }
    }

    /// Takes `cost` tokens at `now`, or refuses without taking any.
    pub fn take_at(&mut self, cost: u32, now: Instant) -> Result<()> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens =
            (self.tokens + elapsed * f64::from(self.per_second)).min(f64::from(self.burst));
        if self.tokens < f64::from(cost) {
            return Err(Error::RateLimited {
                per_second: self.per_second,
                burst: self.burst,
            });
        }
        self.tokens -= f64::from(cost);
        Ok(())
    }
}

impl Default for RateLimit {
    /// 1000 events a second, bursts of 2000: far above what a person does,
    /// far below what floods the X server.
    fn default() -> Self {
        RateLimit::new(1000, 2000)
    }
}

/// The core keyboard map, cached.
struct Keymap {
    min: u8,
    per: u8,
    syms: Vec<u32>,
    /// Key codes with no keysym, for binding keysyms the layout lacks,
    /// least recently used first.
    spare: Vec<u8>,
}

impl Keymap {
    fn load(conn: &RustConnection) -> Result<Keymap> {
        let setup = conn.setup();
        let (min, max) = (setup.min_keycode, setup.max_keycode);
        let reply = conn.get_keyboard_mapping(min, max - min + 1)?.reply()?;
        let per = reply.keysyms_per_keycode;
        let syms = reply.keysyms;
        let spare = (min..=max)
            .filter(|kc| {
                let i = usize::from(kc - min) * usize::from(per);
                syms[i..i + usize::from(per)].iter().all(|s| *s == 0)
            })
            .collect::<Vec<_>>();
        Ok(Keymap {
            min,
            per,
            syms,
            spare,
        })
    }

    /// Marks a spare key code as just used, so it is the last to be
    /// rebound; false for the layout's own key codes.
    fn touch(&mut self, kc: u8) -> bool {
        let Some(pos) = self.spare.iter().position(|&k| k == kc) else {
            return false;
        };
        let k = self.spare.remove(pos);
        self.spare.push(k);
        true
    }

    /// The key code and column (0 plain, 1 shifted) that give `sym`.
    fn find(&self, sym: u32) -> Option<(u8, usize)> {
        let per = usize::from(self.per);
        for col in 0..per.min(2) {
            for (i, chunk) in self.syms.chunks(per).enumerate() {
                if chunk[col] == sym {
                    return Some((self.min + i as u8, col));
                }
            }
        }
        None
    }
}

/// The next run of keysyms that text types after one keymap change.
#[derive(Debug, PartialEq)]
struct Run {
    /// How many keysyms, at least one.
    len: usize,
    /// Keysyms of the run the keymap lacks, each once: bound before it.
    new: Vec<u32>,
    /// Spare key codes the run already uses: kept from being rebound.
    kept: Vec<u8>,
}

/// Plans the longest run from the start of `syms` whose new keysyms plus
/// the spare codes it already uses fit in `room` spare codes, so binding
/// one keysym of the run can never evict another. `lookup` finds a keysym's
/// key code, `is_spare` tells codes sandcast binds from the layout's own.
fn next_run(
    syms: &[u32],
    lookup: impl Fn(u32) -> Option<u8>,
    is_spare: impl Fn(u8) -> bool,
    room: usize,
) -> Run {
    let mut run = Run {
        len: 0,
        new: Vec::new(),
        kept: Vec::new(),
    };
    for &sym in syms {
        let full = run.new.len() + run.kept.len() >= room.max(1);
        match lookup(sym) {
            Some(kc) if is_spare(kc) && !run.kept.contains(&kc) => {
                if full {
                    break;
                }
                run.kept.push(kc);
            }
            Some(_) => {}
            None if run.new.contains(&sym) => {}
            None => {
                if full {
                    break;
                }
                run.new.push(sym);
            }
        }
        run.len += 1;
    }
    run
}

/// Injects viewer input into an X display.
pub struct InputInjector {
    conn: RustConnection,
    root: xproto::Window,
    keymap: Keymap,
    limit: RateLimit,
    /// Keys held, by the viewer's `code`, with the key code pressed.
    keys_down: HashMap<String, u8>,
    buttons_down: Vec<u8>,
    wheel_rem: (i32, i32),
    dropped: u64,
    /// When each key code bound by [`InputInjector::bind`] was last pressed.
    spare_pressed: HashMap<u8, Instant>,
}

impl std::fmt::Debug for InputInjector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InputInjector")
            .field("dropped", &self.dropped)
            .finish_non_exhaustive()
    }
}

impl InputInjector {
    /// Connects to `display` with the default rate limit.
    pub fn connect(display: &str) -> Result<InputInjector> {
        Self::with_rate_limit(display, RateLimit::default())
    }

    /// Connects to `display` with a given rate limit.
    pub fn with_rate_limit(display: &str, limit: RateLimit) -> Result<InputInjector> {
        let (conn, screen) = xutil::connect(display)?;
        conn.xtest_get_version(2, 2)?
            .reply()
            .map_err(|_| Error::MissingExtension("XTEST"))?;
        let root = conn.setup().roots[screen].root;
        let keymap = Keymap::load(&conn)?;
        Ok(InputInjector {
            conn,
            root,
            keymap,
            limit,
            keys_down: HashMap::new(),
            buttons_down: Vec::new(),
            wheel_rem: (0, 0),
            dropped: 0,
            spare_pressed: HashMap::new(),
        })
    }

    /// Events refused so far (validation, rate, unknown keys).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Validates and injects one event. A refused event is counted and
    /// returned as an error; the injector stays usable.
    pub fn apply(&mut self, event: &InputEvent) -> Result<()> {
        let res = self.apply_inner(event);
        if let Err(e) = &res {
            self.dropped += 1;
            tracing::debug!(error = %e, "input event refused");
        }
        res
    }

    fn apply_inner(&mut self, event: &InputEvent) -> Result<()> {
        event.validate()?;
        let cost = match event {
            InputEvent::Text { text } => 1 + text.chars().count() / CHARS_PER_TOKEN,
            _ => 1,
        };
        self.limit
            .take_at(u32::try_from(cost).unwrap_or(u32::MAX), Instant::now())?;
        match event {
            InputEvent::PointerMove { x, y } => {
                self.fake(xproto::MOTION_NOTIFY_EVENT, 0, *x as i16, *y as i16)?;
            }
            InputEvent::PointerButton { button, down } => {
                let b = button.x11_button();
                self.button(b, *down)?;
            }
            InputEvent::Wheel { dx, dy } => {
                self.wheel(*dx, *dy)?;
            }
            InputEvent::Key { code, key, down } => self.key(code, key, *down)?,
            InputEvent::Text { text } => self.type_text(text)?,
            InputEvent::ReleaseAll => self.release_all()?,
        }
        self.conn.flush()?;
        Ok(())
    }

    fn fake(&self, kind: u8, detail: u8, x: i16, y: i16) -> Result<()> {
        let root = if kind == xproto::MOTION_NOTIFY_EVENT {
            self.root
        } else {
            x11rb::NONE
        };
        self.conn
            .xtest_fake_input(kind, detail, x11rb::CURRENT_TIME, root, x, y, 0)?;
        Ok(())
    }

    fn button(&mut self, b: u8, down: bool) -> Result<()> {
        if down {
            if !self.buttons_down.contains(&b) {
                self.buttons_down.push(b);
            }
            self.fake(xproto::BUTTON_PRESS_EVENT, b, 0, 0)
        } else {
            self.buttons_down.retain(|x| *x != b);
            self.fake(xproto::BUTTON_RELEASE_EVENT, b, 0, 0)
        }
    }

    fn wheel(&mut self, dx: i32, dy: i32) -> Result<()> {
        // Positive is down or right: buttons 5 and 7; negative 4 and 6.
        for (delta, rem, neg, pos) in [(dy, 1, 4u8, 5u8), (dx, 0, 6, 7)] {
            let r = if rem == 1 {
                &mut self.wheel_rem.1
            } else {
                &mut self.wheel_rem.0
            };
            // A change of direction drops what was left over the other way.
            if (*r > 0 && delta < 0) || (*r < 0 && delta > 0) {
                *r = 0;
            }
            *r += delta;
            let clicks =
                (*r / WHEEL_PX_PER_CLICK).clamp(-MAX_CLICKS_PER_EVENT, MAX_CLICKS_PER_EVENT);
            *r -= clicks * WHEEL_PX_PER_CLICK;
            *r = (*r).clamp(-WHEEL_PX_PER_CLICK, WHEEL_PX_PER_CLICK);
            let b = if clicks < 0 { neg } else { pos };
            for _ in 0..clicks.abs() {
                self.fake(xproto::BUTTON_PRESS_EVENT, b, 0, 0)?;
                self.fake(xproto::BUTTON_RELEASE_EVENT, b, 0, 0)?;
            }
        }
        Ok(())
    }

    fn is_shift(&self, kc: u8) -> bool {
        let i = usize::from(kc - self.keymap.min) * usize::from(self.keymap.per);
        matches!(self.keymap.syms.get(i), Some(&SHIFT_L) | Some(&SHIFT_R))
    }

    fn shift_held(&self) -> bool {
        self.keys_down.values().any(|&kc| self.is_shift(kc))
    }

    fn key(&mut self, code: &str, key: &str, down: bool) -> Result<()> {
        if !down {
            // Release what the press pressed, whatever `key` says now (the
            // user may have let go of Shift first).
            if let Some(kc) = self.keys_down.remove(code) {
                self.fake(xproto::KEY_RELEASE_EVENT, kc, 0, 0)?;
            }
            return Ok(());
        }
        if self.keys_down.len() >= MAX_KEYS_HELD && !self.keys_down.contains_key(code) {
            return Err(Error::Unsupported(format!(
                "more than {MAX_KEYS_HELD} keys held at once"
            )));
        }
        let sym = keysym_for_key(key, code).ok_or_else(|| Error::UnknownKey {
            key: key.to_owned(),
            code: code.to_owned(),
        })?;
        let is_char = key.chars().count() == 1;
        let shift = self.shift_held();
        // A character must come out of the column the current Shift state
        // selects; named keys ignore columns. A character of the layout in
        // the other column (":" sent without Shift, ";" with it, as other
        // layouts and typed text do) is pressed with Shift flipped for that
        // moment: binding it to a spare key code instead changes the
        // keymap, and a client such as Chromium may read the press before
        // the new mapping and lose the character. Not for letters: with
        // Caps Lock on in the session, Shift would turn them back.
        let letter = key.chars().next().is_some_and(char::is_alphabetic);
        let (kc, flip) = match self.keymap.find(sym) {
            Some((kc, col)) if !is_char || (col == 1) == shift => (kc, false),
            Some((kc, _)) if !letter => (kc, true),
            _ => (self.bind(&[sym])?[0], false),
        };
        if self.keymap.touch(kc) {
            self.spare_pressed.insert(kc, Instant::now());
        }
        if let Some(old) = self.keys_down.insert(code.to_owned(), kc) {
            // Auto-repeat from the viewer: a press while held repeats.
            if old != kc {
                self.fake(xproto::KEY_RELEASE_EVENT, old, 0, 0)?;
            }
        }
        if !flip {
            return self.fake(xproto::KEY_PRESS_EVENT, kc, 0, 0);
        }
        // Shift keys to let go of (Shift held) or to press (not held).
        let shifts: Vec<u8> = if shift {
            self.keys_down
                .values()
                .copied()
                .filter(|&k| self.is_shift(k))
                .collect()
        } else {
            self.keymap
                .find(SHIFT_L)
                .map(|(k, _)| k)
                .into_iter()
                .collect()
        };
        let (before, after) = if shift {
            (xproto::KEY_RELEASE_EVENT, xproto::KEY_PRESS_EVENT)
        } else {
            (xproto::KEY_PRESS_EVENT, xproto::KEY_RELEASE_EVENT)
        };
        for &s in &shifts {
            self.fake(before, s, 0, 0)?;
        }
        self.fake(xproto::KEY_PRESS_EVENT, kc, 0, 0)?;
        for &s in &shifts {
            self.fake(after, s, 0, 0)?;
        }
        Ok(())
    }

    /// Types text: each run of characters binds the keysyms the keymap
    /// lacks at once (as many as there are spare key codes), waits once for
    /// clients to take up the new map, then types the run.
    fn type_text(&mut self, text: &str) -> Result<()> {
        // Characters without a key (other control characters) are
        // skipped, not fatal for the rest of the text.
        let syms: Vec<u32> = text.chars().filter_map(keysym_for_char).collect();
        let room = self.free_spares().max(1);
        let mut start = 0;
        while start < syms.len() {
            let run = next_run(
                &syms[start..],
                |sym| self.keymap.find(sym).map(|(kc, _)| kc),
                |kc| self.keymap.spare.contains(&kc),
                room,
            );
            for &kc in &run.kept {
                let _ = self.keymap.touch(kc);
            }
            self.bind(&run.new)?;
            for &sym in &syms[start..start + run.len] {
                self.type_sym(sym)?;
            }
            // The run's presses go out before the next run changes the map.
            self.conn.flush()?;
            start += run.len;
        }
        Ok(())
    }

    /// Spare key codes not held down now.
    fn free_spares(&self) -> usize {
        self.keymap
            .spare
            .iter()
            .filter(|kc| !self.keys_down.values().any(|h| h == *kc))
            .count()
    }

    /// Types one keysym with a press and a release, adding Shift when the
    /// layout has it in the shifted column. The keysym is in the keymap.
    fn type_sym(&mut self, sym: u32) -> Result<()> {
        let shift = self.shift_held();
        let (kc, needs_shift) = match self.keymap.find(sym) {
            Some((kc, 0)) if !shift => (kc, false),
            Some((kc, 1)) if !shift => (kc, true),
            Some((kc, 1)) => (kc, false),
            // Shift is held and the keysym is only unshifted here.
            _ => (self.bind(&[sym])?[0], false),
        };
        if self.keymap.touch(kc) {
            self.spare_pressed.insert(kc, Instant::now());
        }
        let shift_kc = if needs_shift {
            self.keymap.find(SHIFT_L).map(|(k, _)| k)
        } else {
            None
        };
        if let Some(s) = shift_kc {
            self.fake(xproto::KEY_PRESS_EVENT, s, 0, 0)?;
        }
        self.fake(xproto::KEY_PRESS_EVENT, kc, 0, 0)?;
        self.fake(xproto::KEY_RELEASE_EVENT, kc, 0, 0)?;
        if let Some(s) = shift_kc {
            self.fake(xproto::KEY_RELEASE_EVENT, s, 0, 0)?;
        }
        Ok(())
    }

    /// Binds each of `syms` to a spare key code (in both columns, so Shift
    /// does not change it), waits [`KEYMAP_SETTLE`] once if anything was
    /// bound, and returns the key codes. Bindings stay until the code is
    /// needed for another keysym, least recently used first.
    ///
    /// A client may also fetch the map when it reads a press (the press of
    /// a new binding makes the server announce the whole map again), so a
    /// code is not rebound within [`REBIND_AFTER`] of its last press: the
    /// client's fetch must not see the next binding while it still has
    /// presses of the last one to read.
    fn bind(&mut self, syms: &[u32]) -> Result<Vec<u8>> {
        if syms.is_empty() {
            return Ok(Vec::new());
        }
        let held: Vec<u8> = self.keys_down.values().copied().collect();
        let mut codes = Vec::with_capacity(syms.len());
        for _ in syms {
            let pos = self
                .keymap
                .spare
                .iter()
                .position(|kc| !held.contains(kc) && !codes.contains(kc))
                .ok_or_else(|| {
                    Error::Unsupported("no spare key code to bind a keysym to".into())
                })?;
            let kc = self.keymap.spare.remove(pos);
            self.keymap.spare.push(kc);
            codes.push(kc);
        }
        let wait = codes
            .iter()
            .filter_map(|kc| self.spare_pressed.get(kc))
            .map(|t| REBIND_AFTER.saturating_sub(t.elapsed()))
            .max()
            .unwrap_or_default();
        std::thread::sleep(wait);
        let per = usize::from(self.keymap.per);
        for (&sym, &kc) in syms.iter().zip(&codes) {
            let mut row = vec![0u32; per];
            row[0] = sym;
            if per > 1 {
                row[1] = sym;
            }
            self.conn
                .change_keyboard_mapping(1, kc, self.keymap.per, &row)?;
            let i = usize::from(kc - self.keymap.min) * per;
            self.keymap.syms[i..i + per].copy_from_slice(&row);
        }
        // The server has the new map once this round trip is back; the
        // clients get their time after that.
        self.conn.get_input_focus()?.reply()?;
        std::thread::sleep(KEYMAP_SETTLE);
        Ok(codes)
    }

    fn release_all(&mut self) -> Result<()> {
        for (_, kc) in std::mem::take(&mut self.keys_down) {
            self.fake(xproto::KEY_RELEASE_EVENT, kc, 0, 0)?;
        }
        for b in std::mem::take(&mut self.buttons_down) {
            self.fake(xproto::BUTTON_RELEASE_EVENT, b, 0, 0)?;
        }
        self.wheel_rem = (0, 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xvfb::Xvfb;
    use sandcast_proto::PointerButton;
    use std::time::Duration;
    use x11rb::protocol::Event;
    use x11rb::protocol::xproto::{
        CreateWindowAux, EventMask, InputFocus, KeyButMask, WindowClass,
    };

    struct Client {
        conn: RustConnection,
    }

    impl Client {
        /// A focused 200x200 window at the origin that selects input.
        fn new(display: &str) -> Client {
            let (conn, screen) = xutil::connect(display).unwrap();
            let root = conn.setup().roots[screen].root;
            let win = conn.generate_id().unwrap();
            conn.create_window(
                0,
                win,
                root,
                0,
                0,
                200,
                200,
                0,
                WindowClass::INPUT_OUTPUT,
                0,
                &CreateWindowAux::new().override_redirect(1).event_mask(
                    EventMask::KEY_PRESS
                        | EventMask::KEY_RELEASE
                        | EventMask::BUTTON_PRESS
                        | EventMask::BUTTON_RELEASE
                        | EventMask::POINTER_MOTION
                        | EventMask::EXPOSURE,
                ),
            )
            .unwrap();
            conn.map_window(win).unwrap();
            conn.flush().unwrap();
            let c = Client { conn };
            c.next(|e| matches!(e, Event::Expose(_)));
            c.conn
                .set_input_focus(InputFocus::PARENT, win, x11rb::CURRENT_TIME)
                .unwrap();
            c.conn.get_input_focus().unwrap().reply().unwrap();
            c
        }

        fn next(&self, want: impl Fn(&Event) -> bool) -> Event {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match xutil::wait_event(&self.conn, Some(deadline)).unwrap() {
                    Some(e) if want(&e) => return e,
                    Some(_) => {}
                    None => panic!("no matching event within 10 s"),
                }
            }
        }

        /// The keysym of the next KeyPress, as a client would look it up.
        fn next_keysym(&self) -> u32 {
            let Event::KeyPress(ev) = self.next(|e| matches!(e, Event::KeyPress(_))) else {
                unreachable!()
            };
            let map = self
                .conn
                .get_keyboard_mapping(ev.detail, 1)
                .unwrap()
                .reply()
                .unwrap();
            let col = usize::from(u16::from(ev.state) & u16::from(KeyButMask::SHIFT) != 0);
            map.keysyms[col]
        }

        fn next_button(&self) -> u8 {
            let Event::ButtonPress(ev) = self.next(|e| matches!(e, Event::ButtonPress(_))) else {
                unreachable!()
            };
            ev.detail
        }
    }

    fn key(code: &str, key: &str, down: bool) -> InputEvent {
        InputEvent::Key {
            code: code.into(),
            key: key.into(),
            down,
        }
    }

    fn tap(inj: &mut InputInjector, code: &str, k: &str) {
        inj.apply(&key(code, k, true)).unwrap();
        inj.apply(&key(code, k, false)).unwrap();
    }

    #[test]
    fn keys_and_text_arrive_with_the_right_keysyms() {
        let x = Xvfb::start(320, 240).unwrap();
        let client = Client::new(x.display());
        let mut inj = InputInjector::connect(x.display()).unwrap();
        tap(&mut inj, "KeyA", "a");
        assert_eq!(client.next_keysym(), 0x61);
        // Not in the US map: bound to spare key codes.
        tap(&mut inj, "Quote", "ä");
        assert_eq!(client.next_keysym(), 0xe4);
        tap(&mut inj, "KeyE", "€");
        assert_eq!(client.next_keysym(), 0x10020ac);
        tap(&mut inj, "Enter", "Enter");
        assert_eq!(client.next_keysym(), 0xff0d);
        tap(&mut inj, "ArrowLeft", "ArrowLeft");
        assert_eq!(client.next_keysym(), 0xff51);
        inj.apply(&InputEvent::Text {
            text: "xA€жä!".into(),
        })
        .unwrap();
        let mut got = Vec::new();
        for _ in 0..6 {
            let mut sym = client.next_keysym();
            if sym == SHIFT_L {
                sym = client.next_keysym();
            }
            got.push(sym);
        }
        assert_eq!(got, vec![0x78, 0x41, 0x10020ac, 0x1000436, 0xe4, 0x21]);
        assert_eq!(inj.dropped(), 0);
    }

    #[test]
    fn a_character_in_the_other_shift_column_is_typed_with_shift_flipped() {
        let x = Xvfb::start(320, 240).unwrap();
        let client = Client::new(x.display());
        let mut inj = InputInjector::connect(x.display()).unwrap();
        let keymap = inj.keymap.syms.clone();
        // ":" without Shift, as typed text and some layouts send it.
        tap(&mut inj, "Semicolon", ":");
        assert_eq!(client.next_keysym(), SHIFT_L);
        assert_eq!(client.next_keysym(), 0x3a);
        // ";" with Shift held, as layouts with ";" on Shift+Comma send it.
        inj.apply(&key("ShiftLeft", "Shift", true)).unwrap();
        assert_eq!(client.next_keysym(), SHIFT_L);
        tap(&mut inj, "Comma", ";");
        assert_eq!(client.next_keysym(), 0x3b);
        // Shift is down again for what follows.
        assert_eq!(client.next_keysym(), SHIFT_L);
        tap(&mut inj, "KeyA", "A");
        assert_eq!(client.next_keysym(), 0x41);
        inj.apply(&key("ShiftLeft", "Shift", false)).unwrap();
        // No key code was rebound: a client never has to catch up with a
        // changed keymap before it reads the press.
        assert_eq!(inj.keymap.syms, keymap);
        assert_eq!(inj.dropped(), 0);
    }

    #[test]
    fn shift_with_a_letter_types_the_capital() {
        let x = Xvfb::start(320, 240).unwrap();
        let client = Client::new(x.display());
        let mut inj = InputInjector::connect(x.display()).unwrap();
        inj.apply(&key("ShiftLeft", "Shift", true)).unwrap();
        assert_eq!(client.next_keysym(), SHIFT_L);
        tap(&mut inj, "KeyA", "A");
        assert_eq!(client.next_keysym(), 0x41);
        inj.apply(&key("ShiftLeft", "Shift", false)).unwrap();
        // Caps Lock in the viewer: "A" without Shift still types "A".
        tap(&mut inj, "KeyA", "A");
        assert_eq!(client.next_keysym(), 0x41);
    }

    #[test]
    fn pointer_buttons_and_wheel() {
        let x = Xvfb::start(320, 240).unwrap();
        let client = Client::new(x.display());
        let mut inj = InputInjector::connect(x.display()).unwrap();
        inj.apply(&InputEvent::PointerMove { x: 50, y: 60 })
            .unwrap();
        let Event::MotionNotify(m) = client.next(|e| matches!(e, Event::MotionNotify(_))) else {
            unreachable!()
        };
        assert_eq!((m.event_x, m.event_y), (50, 60));
        for (button, n) in [(PointerButton::Left, 1), (PointerButton::Right, 3)] {
            inj.apply(&InputEvent::PointerButton { button, down: true })
                .unwrap();
            inj.apply(&InputEvent::PointerButton {
                button,
                down: false,
            })
            .unwrap();
            assert_eq!(client.next_button(), n);
        }
        let px = WHEEL_PX_PER_CLICK;
        inj.apply(&InputEvent::Wheel { dx: 0, dy: 2 * px }).unwrap();
        assert_eq!((client.next_button(), client.next_button()), (5, 5));
        inj.apply(&InputEvent::Wheel { dx: 0, dy: -px }).unwrap();
        assert_eq!(client.next_button(), 4);
        inj.apply(&InputEvent::Wheel { dx: px, dy: 0 }).unwrap();
        assert_eq!(client.next_button(), 7);
        inj.apply(&InputEvent::Wheel { dx: -px, dy: 0 }).unwrap();
        assert_eq!(client.next_button(), 6);
        // Small deltas add up to a click.
        inj.apply(&InputEvent::Wheel { dx: 0, dy: px / 2 }).unwrap();
        inj.apply(&InputEvent::Wheel {
            dx: 0,
            dy: px / 2 + 1,
        })
        .unwrap();
        assert_eq!(client.next_button(), 5);
        // ...and the button that follows proves no extra click came first.
        inj.apply(&InputEvent::PointerButton {
            button: PointerButton::Middle,
            down: true,
        })
        .unwrap();
        assert_eq!(client.next_button(), 2);
        inj.apply(&InputEvent::ReleaseAll).unwrap();
        let Event::ButtonRelease(r) =
            client.next(|e| matches!(e, Event::ButtonRelease(r) if r.detail == 2))
        else {
            unreachable!()
        };
        assert_eq!(r.detail, 2);
    }

    #[test]
    fn bad_events_are_refused_counted_and_not_fatal() {
        let x = Xvfb::start(320, 240).unwrap();
        let client = Client::new(x.display());
        let mut inj = InputInjector::with_rate_limit(x.display(), RateLimit::new(1, 5)).unwrap();
        let err = inj
            .apply(&InputEvent::PointerMove { x: -5, y: 0 })
            .unwrap_err();
        assert!(err.to_string().contains("-5"), "{err}");
        let err = inj.apply(&key("Nonsense", "Nonsense", true)).unwrap_err();
        assert!(err.to_string().contains("Nonsense"), "{err}");
        assert_eq!(inj.dropped(), 2);
        // Four of the five tokens are left: an invalid event costs none, an
        // unknown key one.
        for _ in 0..4 {
            inj.apply(&InputEvent::PointerMove { x: 1, y: 1 }).unwrap();
        }
        let err = inj
            .apply(&InputEvent::PointerMove { x: 2, y: 2 })
            .unwrap_err();
        assert!(matches!(err, Error::RateLimited { .. }), "{err}");
        assert_eq!(inj.dropped(), 3);
        drop(client);
    }

    #[test]
    fn held_keys_are_bounded() {
        // Presses of ever new codes without a release used to be remembered
        // without bound.
        let x = Xvfb::start(320, 240).unwrap();
        let mut inj =
            InputInjector::with_rate_limit(x.display(), RateLimit::new(100_000, 100_000)).unwrap();
        for i in 0..MAX_KEYS_HELD {
            inj.apply(&key(&format!("Code{i}"), "a", true)).unwrap();
        }
        let err = inj.apply(&key("OneMore", "a", true)).unwrap_err();
        assert!(err.to_string().contains("keys held"), "{err}");
        assert_eq!(inj.keys_down.len(), MAX_KEYS_HELD);
        // A held key repeats, a release frees a place.
        inj.apply(&key("Code0", "a", true)).unwrap();
        inj.apply(&key("Code0", "a", false)).unwrap();
        inj.apply(&key("OneMore", "a", true)).unwrap();
        inj.apply(&InputEvent::ReleaseAll).unwrap();
        assert!(inj.keys_down.is_empty());
    }

    #[test]
    fn text_runs_bind_each_new_keysym_once_and_never_evict_their_own() {
        // 'a' is on the layout, 0x100 sits on spare code 200, the rest are new.
        let lookup = |sym: u32| match sym {
            0x61 => Some(38u8),
            0x100 => Some(200u8),
            _ => None,
        };
        let spare = |kc: u8| kc >= 200;
        let syms = [0x61, 0x1001, 0x100, 0x1001, 0x1002, 0x1003, 0x61];
        let run = next_run(&syms, lookup, spare, 3);
        assert_eq!(
            run,
            Run {
                len: 5,
                new: vec![0x1001, 0x1002],
                kept: vec![200],
            }
        );
        let rest = next_run(&syms[run.len..], lookup, spare, 3);
        assert_eq!(rest.len, 2);
        assert_eq!(rest.new, vec![0x1003]);
        // No spare code at all still makes progress, one keysym a run.
        assert_eq!(next_run(&[0x1001, 0x1002], lookup, spare, 0).len, 1);
        // Text entirely on the layout is one run with nothing to bind.
        let plain = next_run(&[0x61; 100], lookup, spare, 1);
        assert_eq!((plain.len, plain.new.len()), (100, 0));
    }

    #[test]
    fn more_new_characters_than_spare_codes_all_arrive() {
        let x = Xvfb::start(320, 240).unwrap();
        let client = Client::new(x.display());
        let mut inj =
            InputInjector::with_rate_limit(x.display(), RateLimit::new(100_000, 100_000)).unwrap();
        let spare = inj.keymap.spare.len();
        // Twice as many distinct characters as there are spare codes.
        let text: String = (0..2 * spare as u32)
            .map(|i| char::from_u32(0x0410 + i).unwrap())
            .collect();
        let typing = {
            let text = text.clone();
            std::thread::spawn(move || {
                inj.apply(&InputEvent::Text { text }).unwrap();
                inj
            })
        };
        // Each key code pressed gives its character under the map of the
        // moment: the client reads events while they come and takes up
        // every MappingNotify as it arrives, within the settle time.
        let mut map: HashMap<u8, u32> = HashMap::new();
        let mut got = String::new();
        while got.chars().count() < text.chars().count() {
            match client.next(|e| matches!(e, Event::KeyPress(_) | Event::MappingNotify(_))) {
                Event::MappingNotify(m) if m.request != xproto::Mapping::KEYBOARD => {}
                Event::MappingNotify(m) => {
                    let r = client
                        .conn
                        .get_keyboard_mapping(m.first_keycode, m.count)
                        .unwrap()
                        .reply()
                        .unwrap();
                    let per = usize::from(r.keysyms_per_keycode);
                    for i in 0..usize::from(m.count) {
                        map.insert(m.first_keycode + i as u8, r.keysyms[i * per]);
                    }
                }
                Event::KeyPress(k) => {
                    let sym = map.get(&k.detail).copied().unwrap_or_else(|| {
                        let r = client
                            .conn
                            .get_keyboard_mapping(k.detail, 1)
                            .unwrap()
                            .reply()
                            .unwrap();
                        r.keysyms[0]
                    });
                    got.push(char::from_u32(sym - 0x100_0000).unwrap_or('?'));
                }
                _ => unreachable!(),
            }
        }
        assert_eq!(got, text);
        assert_eq!(typing.join().unwrap().dropped(), 0);
    }

    #[test]
    fn a_missing_display_is_named() {
        let err = InputInjector::connect(":4243").unwrap_err();
        assert!(err.to_string().contains(":4243"), "{err}");
    }

    #[test]
    fn token_bucket_refills_at_its_rate() {
        let mut rl = RateLimit::new(1000, 2000);
        let t0 = Instant::now();
        rl.last = t0;
        assert!(rl.take_at(2000, t0).is_ok());
        assert!(rl.take_at(1, t0).is_err());
        assert!(rl.take_at(100, t0 + Duration::from_millis(100)).is_ok());
        assert!(rl.take_at(1, t0 + Duration::from_millis(100)).is_err());
        // Never more than the burst, however long the pause.
        assert!(rl.take_at(2001, t0 + Duration::from_secs(60)).is_err());
        assert!(rl.take_at(2000, t0 + Duration::from_secs(60)).is_ok());
    }
}
