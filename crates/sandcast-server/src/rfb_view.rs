//! What a `view` token's noVNC viewer may say to the session's VNC server:
//! a filter of the RFB client-to-server stream (RFC 6143), sans-IO.
//!
//! It passes the handshake (protocol version, security type None, the
//! ClientInit) and the messages that only ask for the picture
//! (SetPixelFormat, SetEncodings, FramebufferUpdateRequest,
//! EnableContinuousUpdates, ClientFence), and drops whole messages that act
//! on the session: keys, pointer, clipboard (ClientCutText), SetDesktopSize,
//! xvp, QEMU's extended keys. Its ClientInit always asks for a shared
//! session, so a watcher never disconnects the others. A message it cannot
//! frame ends the
//! connection: it never guesses where the next one starts.

/// Longest ClientCutText skipped; a longer one ends the connection.
const MAX_CUT_TEXT: usize = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Version,
    Security,
    ClientInit,
    Messages,
}

/// How much of a message's start is needed, or its whole length.
enum Frame {
    /// At least this many bytes of its start.
    Need(usize),
    /// It is this long; `true`: it goes to the server.
    Whole(usize, bool),
}

/// The filter of one connection.
#[derive(Debug)]
pub struct ViewFilter {
    phase: Phase,
    /// The protocol's minor version, once read.
    minor: Option<u32>,
    /// The start of the current item, until its length is known.
    head: Vec<u8>,
    /// Bytes of the current item still to pass on.
    pass: usize,
    /// Bytes of the current item still to drop.
    skip: usize,
    /// Messages dropped.
    pub dropped: u64,
}

impl Default for ViewFilter {
    fn default() -> Self {
        ViewFilter {
            phase: Phase::Version,
            minor: None,
            head: Vec::new(),
            pass: 0,
            skip: 0,
            dropped: 0,
        }
    }
}

impl ViewFilter {
    /// Takes the next bytes from the viewer; returns what goes on to the
    /// server, or why the connection ends.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(data.len());
        while !data.is_empty() {
            if self.pass > 0 {
                let n = self.pass.min(data.len());
                out.extend_from_slice(&data[..n]);
                self.pass -= n;
                data = &data[n..];
                continue;
            }
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            self.head.push(data[0]);
            data = &data[1..];
            match self.frame()? {
                Frame::Need(n) if self.head.len() < n => {}
                Frame::Need(_) => unreachable!("frame() asks only for more than it has"),
                Frame::Whole(len, keep) => {
                    let rest = len - self.head.len();
                    if keep {
                        out.append(&mut self.head);
                        self.pass = rest;
                    } else {
                        self.head.clear();
                        self.skip = rest;
                        self.dropped += 1;
                    }
                    self.next_phase();
                }
            }
        }
        Ok(out)
    }

    fn next_phase(&mut self) {
        self.phase = match self.phase {
            Phase::Version => {
                // RFB 3.3: the server picks the security type, the
                // client sends none.
                if self.minor == Some(3) {
                    Phase::ClientInit
                } else {
                    Phase::Security
                }
            }
            Phase::Security => Phase::ClientInit,
            Phase::ClientInit | Phase::Messages => Phase::Messages,
        };
    }

    /// What the item in `head` is, so far.
    fn frame(&mut self) -> Result<Frame, String> {
        let h = &self.head;
        let need = |n: usize| Ok(Frame::Need(n));
        match self.phase {
            Phase::Version => {
                if h.len() < 12 {
                    return need(12);
                }
                if !h.starts_with(b"RFB 003.") || h[11] != b'\n' {
                    return Err("not an RFB 3.x protocol version".into());
                }
                let minor = std::str::from_utf8(&h[8..11])
                    .ok()
                    .and_then(|m| m.parse::<u32>().ok())
                    .ok_or("a malformed RFB version")?;
                self.minor = Some(minor);
                Ok(Frame::Whole(12, true))
            }
            // Only None: the session's VNC server asks for no password.
            Phase::Security => match h[0] {
                1 => Ok(Frame::Whole(1, true)),
                t => Err(format!("security type {t} is not offered")),
            },
            // Always shared: an exclusive ClientInit would make the VNC
            // server drop every other viewer.
            Phase::ClientInit => {
                self.head[0] = 1;
                Ok(Frame::Whole(1, true))
            }
            Phase::Messages => message(h),
        }
    }
}

/// Frames one client message from its start.
fn message(h: &[u8]) -> Result<Frame, String> {
    let keep = |n| Ok(Frame::Whole(n, true));
    let drop = |n| Ok(Frame::Whole(n, false));
    let need = |n: usize| Ok(Frame::Need(n));
    let u16_at = |i: usize| usize::from(u16::from_be_bytes([h[i], h[i + 1]]));
    match h[0] {
        0 => keep(20),                // SetPixelFormat
        2 if h.len() < 4 => need(4),  // SetEncodings
        2 => keep(4 + 4 * u16_at(2)), //
        3 => keep(10),                // FramebufferUpdateRequest
        4 => drop(8),                 // KeyEvent
        5 => drop(6),                 // PointerEvent
        6 if h.len() < 8 => need(8),  // ClientCutText
        6 => {
            // Extended clipboard sends a negative length.
            let len = i32::from_be_bytes([h[4], h[5], h[6], h[7]]).unsigned_abs() as usize;
            if len > MAX_CUT_TEXT {
                return Err(format!("a clipboard message of {len} bytes"));
            }
            drop(8 + len)
        }
        150 => keep(10),                         // EnableContinuousUpdates
        248 if h.len() < 9 => need(9),           // ClientFence
        248 => keep(9 + usize::from(h[8])),      //
        250 => drop(4),                          // xvp (shutdown, reboot)
        251 if h.len() < 8 => need(8),           // SetDesktopSize
        251 => drop(8 + 16 * usize::from(h[6])), //
        255 if h.len() < 2 => need(2),           // QEMU
        255 => match h[1] {
            0 => drop(12), // extended key event
            1 if h.len() < 4 => need(4),
            1 => match u16_at(2) {
                0 | 1 => drop(4),
                2 => drop(10),
                op => Err(format!("QEMU audio operation {op}")),
            },
            sub => Err(format!("QEMU message {sub}")),
        },
        t => Err(format!("client message type {t} is not known")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake() -> Vec<u8> {
        let mut v = b"RFB 003.008\n".to_vec();
        v.push(1); // security None
        v.push(1); // ClientInit: shared
        v
    }

    fn kept() -> Vec<Vec<u8>> {
        let mut pixel = vec![0u8; 20];
        pixel[4] = 32;
        let mut enc = vec![2, 0, 0, 3];
        enc.extend([0, 0, 0, 7, 0xff, 0xff, 0xff, 0x21, 0, 0, 0, 1]);
        let update = vec![3, 1, 0, 0, 0, 0, 5, 0, 2, 208];
        let mut fence = vec![248, 0, 0, 0, 0, 0, 0, 1, 4];
        fence.extend([9, 9, 9, 9]);
        let cont = vec![150, 1, 0, 0, 0, 0, 5, 0, 2, 208];
        vec![pixel, enc, update, fence, cont]
    }

    fn dropped() -> Vec<Vec<u8>> {
        let key = vec![4, 1, 0, 0, 0, 0, 0, 0x68];
        let pointer = vec![5, 1, 0, 10, 0, 20];
        let mut cut = vec![6, 0, 0, 0, 0, 0, 0, 5];
        cut.extend(b"hello");
        let mut ext_cut = vec![6, 0, 0, 0];
        ext_cut.extend((-4i32).to_be_bytes());
        ext_cut.extend([1, 2, 3, 4]);
        let mut size = vec![251, 0, 2, 128, 1, 224, 1, 0];
        size.extend([0u8; 16]);
        let qemu_key = vec![255, 0, 0, 1, 0, 0, 0, 0x23, 0, 0, 0, 0x1e];
        let qemu_audio = vec![255, 1, 0, 2, 1, 0, 0, 0, 0, 2];
        let xvp = vec![250, 0, 1, 2];
        vec![key, pointer, cut, ext_cut, size, qemu_key, qemu_audio, xvp]
    }

    /// The viewer's stream: handshake, then the kept and dropped messages
    /// interleaved; and what the server must get.
    fn stream() -> (Vec<u8>, Vec<u8>) {
        let mut all = handshake();
        let mut want = handshake();
        let (k, d) = (kept(), dropped());
        for i in 0..k.len().max(d.len()) {
            if let Some(m) = d.get(i) {
                all.extend(m);
            }
            if let Some(m) = k.get(i) {
                all.extend(m);
                want.extend(m);
            }
        }
        (all, want)
    }

    #[test]
    fn only_requests_for_the_picture_pass_in_any_chunking() {
        let (all, want) = stream();
        let mut f = ViewFilter::default();
        assert_eq!(f.feed(&all).unwrap(), want);
        assert_eq!(f.dropped, dropped().len() as u64);
        for chunk in [1, 2, 3, 7, 13] {
            let mut f = ViewFilter::default();
            let mut got = Vec::new();
            for c in all.chunks(chunk) {
                got.extend(f.feed(c).unwrap());
            }
            assert_eq!(got, want, "chunks of {chunk}");
        }
    }

    #[test]
    fn rfb_3_3_has_no_security_choice() {
        let mut f = ViewFilter::default();
        let mut s = b"RFB 003.003\n".to_vec();
        s.push(1); // ClientInit
        s.extend([4, 1, 0, 0, 0, 0, 0, 0x68]);
        s.extend([3, 1, 0, 0, 0, 0, 5, 0, 2, 208]);
        let out = f.feed(&s).unwrap();
        assert_eq!(out.len(), 12 + 1 + 10);
    }

    #[test]
    fn a_watcher_never_asks_for_the_session_alone() {
        let mut f = ViewFilter::default();
        let mut s = b"RFB 003.008\n".to_vec();
        s.extend([1, 0]); // security None, ClientInit: exclusive
        let out = f.feed(&s).unwrap();
        assert_eq!(out[12..], [1, 1], "ClientInit made shared");
    }

    #[test]
    fn what_cannot_be_framed_ends_the_connection() {
        let mut f = ViewFilter::default();
        assert!(f.feed(b"GET / HTTP/1.1\r\n").is_err());
        let mut f = ViewFilter::default();
        let mut s = b"RFB 003.008\n".to_vec();
        s.push(2); // VNC authentication: not offered
        assert!(f.feed(&s).is_err());
        let mut f = ViewFilter::default();
        let mut s = handshake();
        s.push(7);
        assert!(f.feed(&s).is_err());
        let mut f = ViewFilter::default();
        let mut s = handshake();
        s.extend([6, 0, 0, 0, 0x7f, 0, 0, 0]);
        assert!(f.feed(&s).is_err(), "an oversized clipboard message");
    }
}
