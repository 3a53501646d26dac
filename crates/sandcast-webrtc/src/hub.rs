//! The gateway's core, sans-IO: every session and viewer, no sockets.
//!
//! The I/O edge feeds it packets, time, frames and commands, and carries out
//! the [`Transmit`]s and [`GatewayEvent`]s it collects.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sandcast_proto::{Codec, VideoFrame};
use str0m::net::{Protocol, Receive, Transmit};
use str0m::{Candidate, Input};

use crate::bitrate::{START_BITRATE_BPS, clamp_bitrate, worth_updating};
use crate::keyframe::KeyFrameLimiter;
use crate::messages::{RateLimiter, ViewerMessage, ViewerRequest};
use crate::negotiate::{OfferError, common_codecs, offered_codecs};
use crate::peer::{Peer, PeerEvent, PeerSetup};
use crate::{Answer, GatewayEvent, ViewerCounters, ViewerId, ViewerOptions, ViewerState};

/// Longest session id accepted.
pub const MAX_SESSION_ID_LEN: usize = 128;

/// Tunables of the core.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Shortest time between two key-frame requests to the agent.
    pub keyframe_interval: Duration,
    /// Data-channel messages per second per viewer.
    pub input_rate_per_second: u32,
    /// Data-channel burst per viewer.
    pub input_burst: u32,
    /// Most viewers one session may have at once.
    pub max_viewers_per_session: usize,
    /// A viewer not connected this long after its offer is dropped, so a
    /// failed connection never keeps a session's encoder running.
    pub connect_timeout: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            keyframe_interval: crate::keyframe::DEFAULT_KEYFRAME_INTERVAL,
            input_rate_per_second: crate::messages::DEFAULT_RATE_PER_SECOND,
            input_burst: crate::messages::DEFAULT_BURST,
            max_viewers_per_session: 16,
            connect_timeout: Duration::from_secs(20),
        }
    }
}

struct Session {
    viewers: Vec<ViewerId>,
    /// Codecs every viewer decodes; the first is streamed.
    common: Vec<Codec>,
    streaming: Option<Codec>,
    keyframes: KeyFrameLimiter,
    bitrate: u32,
    display: Option<(u32, u32)>,
}

/// Every session and viewer of the gateway.
pub struct Hub {
    cfg: HubConfig,
    candidates: Vec<Candidate>,
    sessions: HashMap<String, Session>,
    peers: HashMap<ViewerId, Peer>,
    routes: HashMap<(Protocol, SocketAddr), ViewerId>,
    next_id: u64,
    transmits: Vec<Transmit>,
    events: Vec<GatewayEvent>,
    unrouted: u64,
}

/// A viewer silent this long no longer holds implicit control while another
/// viewer is heard: a closed or reloaded page's peer lingers until ICE gives
/// it up, and its person, back in a new page, must not wait that long to
/// type. A live viewer is heard far more often (RTCP reports about every
/// second while video flows, consent checks every 4-6 s without).
pub const SILENT_CONTROLLER: Duration = Duration::from_secs(8);

/// Checks a session id: 1 to 128 of `[A-Za-z0-9._-]`.
pub fn check_session_id(id: &str) -> Result<(), OfferError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_SESSION_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(OfferError::BadSession(
            id.chars().take(MAX_SESSION_ID_LEN).collect(),
        ))
    }
}

/// The `Instant` that corresponds to a capture time in µs since the epoch.
fn wallclock_of(capture_us: u64, now: Instant) -> Instant {
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(capture_us);
    let age = Duration::from_micros(now_us.saturating_sub(capture_us));
    now.checked_sub(age).unwrap_or(now)
}

impl Hub {
    /// A core that advertises these local candidates to every viewer.
    pub fn new(cfg: HubConfig, candidates: Vec<Candidate>) -> Self {
        Hub {
            cfg,
            candidates,
            sessions: HashMap::new(),
            peers: HashMap::new(),
            routes: HashMap::new(),
            next_id: 1,
            transmits: Vec::new(),
            events: Vec::new(),
            unrouted: 0,
        }
    }

    /// Answers a viewer's offer for `session`, creating the session on its
    /// first viewer. A refused offer leaves the session untouched.
    pub fn accept_offer(
        &mut self,
        session: &str,
        sdp: &str,
        opts: ViewerOptions,
        now: Instant,
    ) -> Result<Answer, OfferError> {
        check_session_id(session)?;
        let offered = offered_codecs(sdp)?;
        let max = self.cfg.max_viewers_per_session;
        if self
            .sessions
            .get(session)
            .is_some_and(|s| s.viewers.len() >= max)
        {
            return Err(OfferError::TooManyViewers {
                session: session.to_string(),
                max,
            });
        }
        let existing = self
            .sessions
            .get(session)
            .filter(|s| !s.viewers.is_empty())
            .map(|s| s.common.clone());
        let common = common_codecs(existing.as_deref(), &offered)?;
        let id = ViewerId(self.next_id);
        let limiter = RateLimiter::new(self.cfg.input_rate_per_second, self.cfg.input_burst);
        let setup = PeerSetup {
            connect_deadline: now + self.cfg.connect_timeout,
            candidates: &self.candidates,
            control: opts.control,
            view_only: opts.view_only,
            limiter,
        };
        let (peer, answer) = Peer::accept(id, session, sdp, &offered, &setup, now)?;
        self.next_id += 1;
        self.peers.insert(id, peer);
        let interval = self.cfg.keyframe_interval;
        let s = self
            .sessions
            .entry(session.to_string())
            .or_insert_with(|| Session {
                viewers: Vec::new(),
                common: Vec::new(),
                streaming: None,
                keyframes: KeyFrameLimiter::new(interval),
                bitrate: START_BITRATE_BPS,
                display: None,
            });
        s.viewers.push(id);
        s.common = common;
        self.events.push(GatewayEvent::ViewerState {
            session: session.to_string(),
            viewer: id,
            state: ViewerState::Connecting,
        });
        // Start the encoder now, so it is warm when ICE completes.
        self.update_codec(session);
        self.update_control(session, now);
        Ok(Answer {
            viewer_id: id,
            sdp: answer,
        })
    }

    /// Feeds one packet that arrived on a local socket.
    pub fn handle_receive(
        &mut self,
        proto: Protocol,
        source: SocketAddr,
        destination: SocketAddr,
        data: &[u8],
        now: Instant,
    ) {
        let Ok(r) = Receive::new(proto, source, destination, data) else {
            self.unrouted += 1;
            return;
        };
        let input = Input::Receive(now, r);
        let routed = self
            .routes
            .get(&(proto, source))
            .copied()
            .filter(|id| self.peers.get(id).is_some_and(|p| p.accepts(&input)));
        let id = match routed {
            Some(id) => id,
            None => match self.peers.values().find(|p| p.accepts(&input)) {
                Some(p) => {
                    let id = p.id;
                    self.routes.insert((proto, source), id);
                    id
                }
                None => {
                    self.unrouted += 1;
                    return;
                }
            },
        };
        let Input::Receive(_, r) = input else {
            unreachable!("built as Receive above")
        };
        if let Some(p) = self.peers.get_mut(&id) {
            p.handle_receive(r, &mut self.transmits, now);
        }
        self.after_peer(id, now);
    }

    /// When [`Hub::handle_timeout`] is next due; None while nothing is pending.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let peers = self.peers.values().map(|p| p.timeout());
        let keys = self
            .sessions
            .values()
            .filter_map(|s| s.keyframes.poll_timeout());
        peers.chain(keys).min()
    }

    /// Advances time.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<ViewerId> = self
            .peers
            .values()
            .filter(|p| p.timeout() <= now)
            .map(|p| p.id)
            .collect();
        for id in due {
            if let Some(p) = self.peers.get_mut(&id) {
                p.handle_timeout(&mut self.transmits, now);
            }
            self.after_peer(id, now);
        }
        for (name, s) in &mut self.sessions {
            if s.keyframes.handle_timeout(now) {
                self.events.push(GatewayEvent::KeyFrameWanted {
                    session: name.clone(),
                });
            }
        }
        // A controller may have fallen silent since.
        let names: Vec<String> = self.sessions.keys().cloned().collect();
        for name in names {
            self.update_control(&name, now);
        }
    }

    /// Sends a frame to every connected viewer of its session. Frames of a
    /// codec the session no longer streams are dropped.
    pub fn push_frame(&mut self, session: &str, frame: &VideoFrame, now: Instant) {
        let Some(s) = self.sessions.get_mut(session) else {
            return;
        };
        if s.streaming != Some(frame.header.codec) {
            return;
        }
        if frame.header.keyframe {
            s.keyframes.key_frame_sent();
        }
        let wallclock = wallclock_of(frame.header.capture_us, now);
        let viewers = s.viewers.clone();
        for id in viewers {
            if let Some(p) = self.peers.get_mut(&id) {
                p.write_frame(frame, wallclock, &mut self.transmits, now);
            }
        }
    }

    /// Sends a message to every viewer of a session.
    pub fn send_to_viewers(&mut self, session: &str, msg: &ViewerMessage, now: Instant) {
        if let Err(e) = msg.check() {
            tracing::warn!(session, "not sent to the viewers: {e}");
            return;
        }
        let Some(s) = self.sessions.get_mut(session) else {
            return;
        };
        if let ViewerMessage::DisplaySize { width, height } = msg {
            s.display = Some((*width, *height));
        }
        for id in s.viewers.clone() {
            if let Some(p) = self.peers.get_mut(&id) {
                p.send_message(msg, &mut self.transmits, now);
            }
        }
    }

    /// Closes every viewer of a session and forgets it.
    pub fn close_session(&mut self, session: &str, now: Instant) {
        let Some(s) = self.sessions.get(session) else {
            return;
        };
        for id in s.viewers.clone() {
            self.close_viewer(id, now);
        }
        self.sessions.remove(session);
    }

    /// Closes one viewer.
    pub fn close_viewer(&mut self, id: ViewerId, now: Instant) {
        if let Some(p) = self.peers.get_mut(&id) {
            p.close(&mut self.transmits, now);
        }
        self.remove_peer(id, now);
    }

    /// Takes the packets to send.
    pub fn take_transmits(&mut self) -> Vec<Transmit> {
        std::mem::take(&mut self.transmits)
    }

    /// Takes the events for the server.
    pub fn take_events(&mut self) -> Vec<GatewayEvent> {
        std::mem::take(&mut self.events)
    }

    /// A viewer's counters.
    pub fn counters(&self, id: ViewerId) -> Option<ViewerCounters> {
        self.peers.get(&id).map(|p| p.counter_snapshot())
    }

    /// Every viewer's counters with its session, for the metrics.
    pub fn all_counters(&self) -> Vec<(String, ViewerId, ViewerCounters)> {
        let mut all: Vec<_> = self
            .peers
            .values()
            .map(|p| (p.session.clone(), p.id, p.counter_snapshot()))
            .collect();
        all.sort_by_key(|(_, id, _)| *id);
        all
    }

    /// Viewers of a session.
    pub fn viewers(&self, session: &str) -> Vec<ViewerId> {
        self.sessions
            .get(session)
            .map(|s| s.viewers.clone())
            .unwrap_or_default()
    }

    /// Packets that matched no viewer.
    pub fn unrouted(&self) -> u64 {
        self.unrouted
    }

    fn after_peer(&mut self, id: ViewerId, now: Instant) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        let events = p.take_events();
        let session = p.session.clone();
        let alive = p.is_alive();
        for ev in events {
            match ev {
                PeerEvent::Connected => {
                    self.events.push(GatewayEvent::ViewerState {
                        session: session.clone(),
                        viewer: id,
                        state: ViewerState::Connected,
                    });
                    // A new viewer needs a picture at once, whatever the limiter says.
                    if let Some(s) = self.sessions.get_mut(&session) {
                        s.keyframes.request(now);
                    }
                    self.events.push(GatewayEvent::KeyFrameWanted {
                        session: session.clone(),
                    });
                    self.send_initial_messages(id, now);
                }
                PeerEvent::Closed => {}
                PeerEvent::KeyFrameRequest => {
                    if let Some(s) = self.sessions.get_mut(&session)
                        && s.keyframes.request(now)
                    {
                        self.events.push(GatewayEvent::KeyFrameWanted {
                            session: session.clone(),
                        });
                    }
                }
                PeerEvent::Bitrate(_) => self.update_bitrate(&session),
                PeerEvent::Request(req) => self.on_request(id, &session, req, now),
            }
        }
        if !alive {
            self.remove_peer(id, now);
        }
    }

    fn send_initial_messages(&mut self, id: ViewerId, now: Instant) {
        let Some(p) = self.peers.get(&id) else { return };
        let display = self.sessions.get(&p.session).and_then(|s| s.display);
        let granted = self.in_control(id, now);
        if let Some(p) = self.peers.get_mut(&id) {
            p.told_control = Some(granted);
            p.send_message(
                &ViewerMessage::Control { granted },
                &mut self.transmits,
                now,
            );
            if let Some((width, height)) = display {
                p.send_message(
                    &ViewerMessage::DisplaySize { width, height },
                    &mut self.transmits,
                    now,
                );
            }
        }
    }

    fn in_control(&self, id: ViewerId, now: Instant) -> bool {
        let Some(p) = self.peers.get(&id) else {
            return false;
        };
        if p.view_only {
            return false;
        }
        if p.control {
            return true;
        }
        // Without shared control, the earliest remaining viewer drives,
        // unless someone with shared control already does; a silent one is
        // passed over while another is heard. View-only viewers never drive.
        let Some(s) = self.sessions.get(&p.session) else {
            return false;
        };
        let peers: Vec<&Peer> = s
            .viewers
            .iter()
            .filter_map(|v| self.peers.get(v))
            .filter(|o| !o.view_only)
            .collect();
        if peers.iter().any(|o| o.control) {
            return false;
        }
        let driver = peers
            .iter()
            .find(|o| now.saturating_duration_since(o.last_heard) < SILENT_CONTROLLER)
            .or(peers.first());
        driver.is_some_and(|d| d.id == id)
    }

    /// Tells each viewer of `session` whose control changed.
    fn update_control(&mut self, session: &str, now: Instant) {
        let viewers = self.viewers(session);
        for id in viewers {
            let granted = self.in_control(id, now);
            if let Some(p) = self.peers.get_mut(&id)
                && p.connected
                && p.told_control != Some(granted)
            {
                p.told_control = Some(granted);
                p.send_message(
                    &ViewerMessage::Control { granted },
                    &mut self.transmits,
                    now,
                );
            }
        }
    }

    fn on_request(&mut self, id: ViewerId, session: &str, req: ViewerRequest, now: Instant) {
        if !self.in_control(id, now) {
            if let Some(p) = self.peers.get_mut(&id) {
                p.counters.messages_accepted = p.counters.messages_accepted.saturating_sub(1);
                p.counters.messages_dropped += 1;
                p.counters.messages_not_in_control += 1;
                if p.view_only {
                    p.counters.messages_view_only += 1;
                }
            }
            return;
        }
        self.events
            .push(GatewayEvent::from_request(session.to_string(), id, req));
    }

    fn update_bitrate(&mut self, session: &str) {
        let Some(s) = self.sessions.get_mut(session) else {
            return;
        };
        let min = s
            .viewers
            .iter()
            .filter_map(|v| self.peers.get(v))
            .map(|p| u64::from(p.loss.bitrate()))
            .min();
        let Some(min) = min else { return };
        let next = clamp_bitrate(min);
        if worth_updating(s.bitrate, next) {
            s.bitrate = next;
            self.events.push(GatewayEvent::Bitrate {
                session: session.to_string(),
                bps: next,
            });
        }
    }

    /// Starts or switches the session's codec to the first common one.
    fn update_codec(&mut self, session: &str) {
        let Some(s) = self.sessions.get_mut(session) else {
            return;
        };
        let want = s.common.first().copied();
        if want == s.streaming {
            return;
        }
        let switching = s.streaming.is_some();
        s.streaming = want;
        if let Some(codec) = want {
            self.events.push(GatewayEvent::VideoWanted {
                session: session.to_string(),
                codec,
                bitrate_bps: s.bitrate,
            });
            if switching {
                for id in s.viewers.clone() {
                    if let Some(p) = self.peers.get_mut(&id) {
                        p.await_key_frame();
                    }
                }
            }
        }
    }

    fn remove_peer(&mut self, id: ViewerId, now: Instant) {
        let Some(p) = self.peers.remove(&id) else {
            return;
        };
        self.routes.retain(|_, v| *v != id);
        let session = p.session;
        self.events.push(GatewayEvent::ViewerState {
            session: session.clone(),
            viewer: id,
            state: ViewerState::Closed,
        });
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        s.viewers.retain(|v| *v != id);
        if s.viewers.is_empty() {
            s.common.clear();
            if s.streaming.take().is_some() {
                self.events.push(GatewayEvent::VideoUnwanted {
                    session: session.clone(),
                });
            }
            return;
        }
        // The remaining viewers may share a better codec.
        let mut common: Option<Vec<Codec>> = None;
        for v in &s.viewers {
            if let Some(p) = self.peers.get(v) {
                common = Some(match common {
                    None => p.codecs.clone(),
                    Some(c) => c.into_iter().filter(|x| p.codecs.contains(x)).collect(),
                });
            }
        }
        s.common = common.unwrap_or_default();
        self.update_codec(&session);
        self.update_bitrate(&session);
        self.update_control(&session, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: &str = include_str!("../tests/fixtures/chromium-offer-default.sdp");
    const VP8: &str = include_str!("../tests/fixtures/chromium-offer-vp8.sdp");
    const NOCODEC: &str = include_str!("../tests/fixtures/chromium-offer-nocodec.sdp");

    fn hub() -> Hub {
        let c = Candidate::host("127.0.0.1:3478".parse().unwrap(), "udp").unwrap();
        Hub::new(HubConfig::default(), vec![c])
    }

    #[test]
    fn first_offer_starts_h264_and_answers_with_our_candidate() {
        let mut h = hub();
        let a = h
            .accept_offer("s1", DEFAULT, ViewerOptions::default(), Instant::now())
            .unwrap();
        assert!(a.sdp.contains("a=candidate:"), "{}", a.sdp);
        assert!(a.sdp.contains("127.0.0.1 3478"), "{}", a.sdp);
        assert!(a.sdp.contains("H264/90000"), "{}", a.sdp);
        assert!(a.sdp.contains("profile-level-id=42e01f"), "{}", a.sdp);
        assert!(a.sdp.contains("playout-delay"), "{}", a.sdp);
        assert!(a.sdp.contains("a=ice-lite"), "{}", a.sdp);
        let ev = h.take_events();
        assert!(ev.contains(&GatewayEvent::VideoWanted {
            session: "s1".into(),
            codec: Codec::H264,
            bitrate_bps: START_BITRATE_BPS
        }));
        assert_eq!(h.viewers("s1"), vec![a.viewer_id]);
    }

    #[test]
    fn a_vp8_only_viewer_switches_the_session_and_leaving_switches_back() {
        let mut h = hub();
        let now = Instant::now();
        let a = h
            .accept_offer("s", DEFAULT, ViewerOptions::default(), now)
            .unwrap();
        let b = h
            .accept_offer("s", VP8, ViewerOptions::default(), now)
            .unwrap();
        let ev = h.take_events();
        assert!(ev.contains(&GatewayEvent::VideoWanted {
            session: "s".into(),
            codec: Codec::Vp8,
            bitrate_bps: START_BITRATE_BPS
        }));
        h.close_viewer(b.viewer_id, now);
        let ev = h.take_events();
        assert!(ev.contains(&GatewayEvent::VideoWanted {
            session: "s".into(),
            codec: Codec::H264,
            bitrate_bps: START_BITRATE_BPS
        }));
        h.close_viewer(a.viewer_id, now);
        let ev = h.take_events();
        assert!(ev.contains(&GatewayEvent::VideoUnwanted {
            session: "s".into()
        }));
        assert!(h.viewers("s").is_empty());
    }

    #[test]
    fn bad_offers_leave_the_session_untouched() {
        let mut h = hub();
        let now = Instant::now();
        assert!(matches!(
            h.accept_offer("s", "garbage", ViewerOptions::default(), now),
            Err(OfferError::BadSdp(_))
        ));
        assert!(matches!(
            h.accept_offer("s", NOCODEC, ViewerOptions::default(), now),
            Err(OfferError::NoCodec(_))
        ));
        assert!(matches!(
            h.accept_offer("../etc", DEFAULT, ViewerOptions::default(), now),
            Err(OfferError::BadSession(_))
        ));
        // Parses as far as our codec check, but str0m cannot read it.
        let broken = DEFAULT.replace("a=fingerprint:", "a=fingerprnt:");
        assert!(matches!(
            h.accept_offer("s", &broken, ViewerOptions::default(), now),
            Err(OfferError::BadSdp(_))
        ));
        assert!(h.viewers("s").is_empty());
        assert!(h.take_events().is_empty());
        assert_eq!(h.poll_timeout(), None);
    }

    #[test]
    fn first_viewer_controls_unless_shared() {
        let mut h = hub();
        let now = Instant::now();
        let a = h
            .accept_offer("s", DEFAULT, ViewerOptions::default(), now)
            .unwrap();
        let b = h
            .accept_offer("s", DEFAULT, ViewerOptions::default(), now)
            .unwrap();
        assert!(h.in_control(a.viewer_id, now));
        assert!(!h.in_control(b.viewer_id, now));
        // Only the controlling viewer's input reaches the server.
        let ev = InputEventFixture::click();
        h.on_request(b.viewer_id, "s", ViewerRequest::Input(ev.clone()), now);
        assert!(
            h.take_events()
                .iter()
                .all(|e| !matches!(e, GatewayEvent::Input { .. }))
        );
        h.on_request(a.viewer_id, "s", ViewerRequest::Input(ev.clone()), now);
        assert!(h.take_events().contains(&GatewayEvent::Input {
            session: "s".into(),
            viewer: a.viewer_id,
            event: ev,
        }));
        // Control passes on when the controller leaves.
        h.close_viewer(a.viewer_id, now);
        assert!(h.in_control(b.viewer_id, now));
        let c = h
            .accept_offer(
                "s",
                DEFAULT,
                ViewerOptions {
                    control: true,
                    ..ViewerOptions::default()
                },
                now,
            )
            .unwrap();
        assert!(h.in_control(c.viewer_id, now));
        assert!(
            !h.in_control(b.viewer_id, now),
            "shared control takes over from the implicit one"
        );
    }

    #[test]
    fn a_view_only_viewer_never_controls_and_its_requests_are_dropped() {
        let mut h = hub();
        let t0 = Instant::now();
        let view = ViewerOptions {
            control: true,
            view_only: true,
        };
        let a = h.accept_offer("s", DEFAULT, view, t0).unwrap().viewer_id;
        // Alone, and asking for shared control: still not in control.
        assert!(!h.in_control(a, t0));
        let b = h
            .accept_offer("s", DEFAULT, ViewerOptions::default(), t0)
            .unwrap()
            .viewer_id;
        // The first viewer that may drive does, though it came later.
        assert!(h.in_control(b, t0));
        // Heard while b is silent long enough: a still never drives.
        let later = t0 + SILENT_CONTROLLER + Duration::from_secs(1);
        h.peers.get_mut(&a).unwrap().last_heard = later;
        assert!(!h.in_control(a, later));
        assert!(h.in_control(b, later));
        h.take_events();
        let requests = [
            ViewerRequest::Input(InputEventFixture::click()),
            ViewerRequest::Clipboard("from a watcher".into()),
            ViewerRequest::Resize {
                width: 640,
                height: 480,
            },
            ViewerRequest::ChooseFiles {
                chooser: 1,
                names: vec!["x.txt".into()],
            },
        ];
        for req in requests.clone() {
            h.on_request(a, "s", req, later);
        }
        assert!(
            h.take_events().is_empty(),
            "nothing of a view-only viewer reaches the server"
        );
        let c = h.counters(a).unwrap();
        assert_eq!(c.messages_view_only, 4);
        assert_eq!(c.messages_not_in_control, 4);
        assert_eq!(c.messages_dropped, 4);
        // The same requests from the viewer in control do.
        for req in requests {
            h.on_request(b, "s", req, later);
        }
        assert_eq!(h.take_events().len(), 4);
        assert_eq!(h.counters(b).unwrap().messages_view_only, 0);
        // When the controller leaves, control does not pass to a.
        h.close_viewer(b, later);
        assert!(!h.in_control(a, later));
    }

    #[test]
    fn a_silent_controller_yields_to_a_viewer_that_is_heard() {
        // A reloaded page: its old peer lingers until ICE gives it up, its
        // new one must be able to type at once.
        let mut h = hub();
        let t0 = Instant::now();
        let a = h
            .accept_offer("s", DEFAULT, ViewerOptions::default(), t0)
            .unwrap()
            .viewer_id;
        let b = h
            .accept_offer("s", DEFAULT, ViewerOptions::default(), t0)
            .unwrap()
            .viewer_id;
        let later = t0 + SILENT_CONTROLLER + Duration::from_secs(1);
        // Both silent: the first keeps control, nobody is left without.
        assert!(h.in_control(a, later) && !h.in_control(b, later));
        // b is heard, a is not.
        h.peers.get_mut(&b).unwrap().last_heard = later - Duration::from_secs(1);
        assert!(!h.in_control(a, later));
        assert!(h.in_control(b, later));
        let ev = InputEventFixture::click();
        h.on_request(b, "s", ViewerRequest::Input(ev.clone()), later);
        assert!(h.take_events().contains(&GatewayEvent::Input {
            session: "s".into(),
            viewer: b,
            event: ev.clone(),
        }));
        h.on_request(a, "s", ViewerRequest::Input(ev), later);
        assert!(
            h.take_events()
                .iter()
                .all(|e| !matches!(e, GatewayEvent::Input { .. })),
            "the silent viewer's input is not used"
        );
        // Heard again, the first viewer drives again.
        h.peers.get_mut(&a).unwrap().last_heard = later;
        assert!(h.in_control(a, later) && !h.in_control(b, later));
    }

    struct InputEventFixture;
    impl InputEventFixture {
        fn click() -> sandcast_proto::InputEvent {
            sandcast_proto::InputEvent::PointerButton {
                button: sandcast_proto::PointerButton::Left,
                down: true,
            }
        }
    }

    #[test]
    fn a_viewer_that_never_connects_is_dropped_and_video_stops() {
        let mut h = hub();
        let t0 = Instant::now();
        h.accept_offer("s", DEFAULT, ViewerOptions::default(), t0)
            .unwrap();
        h.take_events();
        let due = h.poll_timeout().unwrap();
        assert!(due <= t0 + HubConfig::default().connect_timeout);
        h.handle_timeout(t0 + Duration::from_secs(5));
        assert_eq!(h.viewers("s").len(), 1, "still within the connect timeout");
        h.handle_timeout(t0 + HubConfig::default().connect_timeout);
        let ev = h.take_events();
        assert!(h.viewers("s").is_empty(), "{ev:?}");
        assert!(ev.contains(&GatewayEvent::VideoUnwanted {
            session: "s".into()
        }));
        assert_eq!(h.poll_timeout(), None);
    }

    #[test]
    fn viewers_per_session_are_capped() {
        let cfg = HubConfig {
            max_viewers_per_session: 2,
            ..HubConfig::default()
        };
        let c = Candidate::host("127.0.0.1:3478".parse().unwrap(), "udp").unwrap();
        let mut h = Hub::new(cfg, vec![c]);
        let now = Instant::now();
        for _ in 0..2 {
            h.accept_offer("s", DEFAULT, ViewerOptions::default(), now)
                .unwrap();
        }
        let err = h
            .accept_offer("s", DEFAULT, ViewerOptions::default(), now)
            .unwrap_err();
        assert_eq!(
            err,
            OfferError::TooManyViewers {
                session: "s".into(),
                max: 2
            }
        );
        assert!(
            h.accept_offer("other", DEFAULT, ViewerOptions::default(), now)
                .is_ok()
        );
    }

    #[test]
    fn session_ids_are_checked() {
        assert!(check_session_id("abc-DEF_1.2").is_ok());
        assert!(check_session_id("").is_err());
        assert!(check_session_id("a b").is_err());
        assert!(check_session_id(&"a".repeat(MAX_SESSION_ID_LEN + 1)).is_err());
    }

    #[test]
    fn wallclock_follows_the_capture_time() {
        let now = Instant::now();
        let us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64;
        let w = wallclock_of(us - 50_000, now);
        let age = now - w;
        assert!(
            age >= Duration::from_millis(50) && age < Duration::from_millis(60),
            "{age:?}"
        );
        // A capture time in the future (clock skew) maps to now.
        assert_eq!(wallclock_of(us + 10_000_000, now), now);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;
        use sandcast_proto::testing::{mutated, mutated_lines};

        proptest! {
            /// The offer goes past the pre-scan into str0m's parser and
            /// negotiation: whatever a viewer sends, the hub answers or
            /// refuses, and goes on.
            #[test]
            fn mutated_offers_never_panic_the_hub(
                bytes in prop_oneof![Just(DEFAULT), Just(VP8)]
                    .prop_flat_map(|o| mutated(o.as_bytes().to_vec())),
                lines in prop_oneof![Just(DEFAULT), Just(VP8)].prop_flat_map(mutated_lines),
            ) {
                let mut h = hub();
                let now = Instant::now();
                for sdp in [String::from_utf8_lossy(&bytes).into_owned(), lines] {
                    if let Err(e) = h.accept_offer("s", &sdp, ViewerOptions::default(), now) {
                        prop_assert!((400..500).contains(&e.http_status()), "{e}");
                    }
                }
                prop_assert!(h.accept_offer("t", DEFAULT, ViewerOptions::default(), now).is_ok());
            }
        }
    }
}
