//! One viewer: a str0m `Rtc` driven as a plain state machine.
//!
//! Every mutation of the `Rtc` is followed by a full drain of its output
//! (str0m's single-mutation invariant); transmits are collected for the I/O
//! edge and events are turned into [`PeerEvent`]s for the hub.

use std::time::{Duration, Instant};

use sandcast_proto::{Codec, VideoFrame};
use str0m::change::SdpOffer;
use str0m::channel::ChannelId;
use str0m::media::{MediaKind, MediaTime, Mid};
use str0m::net::{Receive, Transmit};
use str0m::rtp::Extension;
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};

use crate::bitrate::LossController;
use crate::messages::{
    MessageError, RateLimiter, ViewerMessage, ViewerRequest, parse_viewer_message,
};
use crate::negotiate::{H264_PROFILE_LEVEL_ID, OfferError, OfferedCodecs};
use crate::{ViewerCounters, ViewerId};

/// Label of the ordered, reliable data channel for input and messages.
pub const INPUT_CHANNEL: &str = "input";
/// Label of the optional unordered, unreliable channel for pointer moves.
pub const UNRELIABLE_CHANNEL: &str = "input-unreliable";

/// RTP header extension id for playout-delay when sandcast offers; in
/// answers str0m follows the offer's ids.
const PLAYOUT_DELAY_EXT_ID: u8 = 5;

/// What happened to a viewer, for the hub.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PeerEvent {
    /// ICE and DTLS are up; media can flow.
    Connected,
    /// The viewer is gone (ICE timed out, DTLS closed).
    Closed,
    /// The viewer lost its picture (PLI or FIR).
    KeyFrameRequest,
    /// The viewer's bitrate estimate changed.
    Bitrate(u32),
    /// A valid message from the viewer.
    Request(ViewerRequest),
}

/// What every new viewer gets besides its offer.
pub(crate) struct PeerSetup<'a> {
    pub connect_deadline: Instant,
    pub candidates: &'a [Candidate],
    pub control: bool,
    pub view_only: bool,
    pub limiter: RateLimiter,
}

pub(crate) struct Peer {
    pub id: ViewerId,
    pub session: String,
    pub codecs: Vec<Codec>,
    pub control: bool,
    /// Never in control (a `view` token's viewer).
    pub view_only: bool,
    pub counters: ViewerCounters,
    pub connected: bool,
    pub loss: LossController,
    /// Frames held back from this viewer, in time.
    freeze: crate::freeze::FreezeMeter,
    /// When a packet from the viewer last arrived.
    pub last_heard: Instant,
    /// What the viewer was last told of its control, if anything.
    pub told_control: Option<bool>,
    rtc: Rtc,
    mid: Option<Mid>,
    channels: Vec<(ChannelId, String)>,
    limiter: RateLimiter,
    timeout: Instant,
    awaiting_key_frame: bool,
    connect_deadline: Option<Instant>,
    egress_packets: u64,
    outbox: Vec<String>,
    events: Vec<PeerEvent>,
}

impl Peer {
    /// Builds the viewer's `Rtc` from its offer; returns it with the answer.
    pub fn accept(
        id: ViewerId,
        session: &str,
        offer: &str,
        offered: &OfferedCodecs,
        setup: &PeerSetup<'_>,
        now: Instant,
    ) -> Result<(Peer, String), OfferError> {
        let offer =
            SdpOffer::from_sdp_string(offer).map_err(|e| OfferError::BadSdp(e.to_string()))?;
        // No str0m BWE: its pacer pads at >= 50 kbit/s and ticks continuously
        // whenever a TWCC-capable sending section exists, even while the
        // screen is idle. Rate control uses receiver-report loss instead.
        let mut cfg = Rtc::builder()
            .set_ice_lite(true)
            .clear_codecs()
            .set_extension(PLAYOUT_DELAY_EXT_ID, Extension::PlayoutDelay)
            .set_stats_interval(Some(Duration::from_secs(1)));
        let codecs = &offered.codecs;
        let video_mids = &offered.video_mids;
        for codec in codecs {
            match codec {
                Codec::H264 => cfg.codec_config().add_h264(
                    108.into(),
                    Some(109.into()),
                    true,
                    H264_PROFILE_LEVEL_ID,
                ),
                Codec::Vp8 => cfg.codec_config().enable_vp8(true),
            }
        }
        let mut rtc = cfg.build(now);
        for c in setup.candidates {
            rtc.add_local_candidate(c.clone());
        }
        let answer = rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| OfferError::BadSdp(e.to_string()))?;
        let mut peer = Peer {
            id,
            session: session.to_string(),
            codecs: codecs.to_vec(),
            control: setup.control && !setup.view_only,
            view_only: setup.view_only,
            counters: ViewerCounters::default(),
            connected: false,
            loss: LossController::default(),
            freeze: Default::default(),
            last_heard: now,
            told_control: None,
            rtc,
            mid: None,
            channels: Vec::new(),
            limiter: setup.limiter.clone(),
            timeout: now,
            awaiting_key_frame: true,
            connect_deadline: Some(setup.connect_deadline),
            egress_packets: 0,
            outbox: Vec::new(),
            events: Vec::new(),
        };
        let mut sink = Vec::new();
        peer.drain(&mut sink, now);
        if peer.mid.is_none() {
            peer.mid = video_mids.iter().map(|m| Mid::from(m.as_str())).find(|m| {
                peer.rtc.media(*m).is_some_and(|media| {
                    media.kind() == MediaKind::Video && media.direction().is_sending()
                })
            });
        }
        if peer.mid.is_none() {
            return Err(OfferError::NoVideo(
                "no video section str0m can send on".into(),
            ));
        }
        // Nothing to send yet; an answer with no ICE started has no transmits.
        debug_assert!(sink.is_empty());
        Ok((peer, answer.to_sdp_string()))
    }

    /// Whether this network input belongs to this viewer.
    pub fn accepts(&self, input: &Input) -> bool {
        self.rtc.accepts(input)
    }

    /// Whether the `Rtc` has ended for good.
    pub fn is_alive(&self) -> bool {
        self.rtc.is_alive()
    }

    /// When this viewer next needs [`Peer::handle_timeout`].
    pub fn timeout(&self) -> Instant {
        match self.connect_deadline {
            Some(d) => d.min(self.timeout),
            None => self.timeout,
        }
    }

    /// Feeds a network packet.
    pub fn handle_receive(&mut self, r: Receive, out: &mut Vec<Transmit>, now: Instant) {
        self.last_heard = now;
        if let Err(e) = self.rtc.handle_input(Input::Receive(now, r)) {
            tracing::debug!(viewer = %self.id, "input refused: {e}");
        }
        self.drain(out, now);
    }

    /// Advances time.
    pub fn handle_timeout(&mut self, out: &mut Vec<Transmit>, now: Instant) {
        if self.connect_deadline.is_some_and(|d| now >= d) {
            tracing::debug!(viewer = %self.id, "not connected in time; closing");
            self.connect_deadline = None;
            self.rtc.disconnect();
            self.events.push(PeerEvent::Closed);
            return;
        }
        if now < self.timeout {
            return;
        }
        if let Err(e) = self.rtc.handle_input(Input::Timeout(now)) {
            tracing::debug!(viewer = %self.id, "timeout refused: {e}");
        }
        self.drain(out, now);
    }

    /// Sends one encoded frame. Until the first key frame after connecting,
    /// delta frames are skipped: the viewer could not decode them.
    pub fn write_frame(
        &mut self,
        frame: &VideoFrame,
        wallclock: Instant,
        out: &mut Vec<Transmit>,
        now: Instant,
    ) {
        let (Some(mid), true) = (self.mid, self.connected) else {
            return;
        };
        if self.awaiting_key_frame {
            if !frame.header.keyframe {
                self.counters.frames_skipped += 1;
                self.freeze.skipped();
                return;
            }
            self.awaiting_key_frame = false;
        }
        let want = match frame.header.codec {
            Codec::H264 => str0m::format::Codec::H264,
            Codec::Vp8 => str0m::format::Codec::Vp8,
        };
        let Some(writer) = self.rtc.writer(mid) else {
            return;
        };
        let Some(pt) = writer
            .payload_params()
            .find(|p| p.spec().codec == want)
            .map(|p| p.pt())
        else {
            self.counters.frames_skipped += 1;
            self.freeze.skipped();
            return;
        };
        // RTP time from the capture time, so the viewer's jitter estimate
        // sees the real capture cadence.
        let rtp_time = MediaTime::from_90khz(frame.header.capture_us.wrapping_mul(9) / 100);
        let res = writer
            .playout_delay(MediaTime::ZERO, MediaTime::ZERO)
            .write(pt, wallclock, rtp_time, frame.data.to_vec());
        match res {
            Ok(()) => {
                self.freeze.sent(now);
                self.counters.frames_sent += 1;
                self.counters.bytes_sent += frame.data.len() as u64;
                if frame.header.keyframe {
                    self.counters.key_frames_sent += 1;
                }
            }
            Err(e) => {
                self.counters.frames_skipped += 1;
                self.freeze.skipped();
                tracing::debug!(viewer = %self.id, "frame not written: {e}");
            }
        }
        self.drain(out, now);
    }

    /// The counters, with the loss controller's current target.
    pub fn counter_snapshot(&self) -> ViewerCounters {
        ViewerCounters {
            target_bitrate_bps: self.loss.bitrate(),
            freezes: self.freeze.freezes,
            freeze_ms: self.freeze.frozen.as_millis() as u64,
            ..self.counters
        }
    }

    /// Forget the current picture: skip to the next key frame (codec switch).
    pub fn await_key_frame(&mut self) {
        self.awaiting_key_frame = true;
    }

    /// Sends a message on the input channel, or queues it until it opens.
    pub fn send_message(&mut self, msg: &ViewerMessage, out: &mut Vec<Transmit>, now: Instant) {
        let Ok(json) = serde_json::to_string(msg) else {
            return;
        };
        self.outbox.push(json);
        self.flush_outbox(out, now);
    }

    fn flush_outbox(&mut self, out: &mut Vec<Transmit>, now: Instant) {
        let Some(id) = self
            .channels
            .iter()
            .find(|(_, l)| l == INPUT_CHANNEL)
            .map(|(id, _)| *id)
        else {
            return;
        };
        // A viewer that reads nothing must not grow the queue without bound.
        const MAX_QUEUED: usize = 256;
        if self.outbox.len() > MAX_QUEUED {
            let drop = self.outbox.len() - MAX_QUEUED;
            self.outbox.drain(..drop);
        }
        let pending = std::mem::take(&mut self.outbox);
        for json in pending {
            match self.rtc.channel(id) {
                Some(mut ch) => {
                    if let Err(e) = ch.write(false, json.as_bytes()) {
                        tracing::debug!(viewer = %self.id, "message not sent: {e}");
                    }
                }
                None => self.outbox.push(json),
            }
            self.drain(out, now);
        }
    }

    /// Closes the connection: DTLS close_notify and RTCP BYE go out.
    pub fn close(&mut self, out: &mut Vec<Transmit>, now: Instant) {
        let _ = self.rtc.close();
        self.drain(out, now);
        self.rtc.disconnect();
    }

    /// Takes the events produced since the last call.
    pub fn take_events(&mut self) -> Vec<PeerEvent> {
        std::mem::take(&mut self.events)
    }

    fn drain(&mut self, out: &mut Vec<Transmit>, now: Instant) {
        loop {
            match self.rtc.poll_output() {
                Ok(Output::Timeout(t)) => {
                    self.timeout = t;
                    break;
                }
                Ok(Output::Transmit(t)) => out.push(t),
                Ok(Output::Event(e)) => self.on_event(e, now),
                Err(e) => {
                    tracing::debug!(viewer = %self.id, "rtc failed: {e}");
                    self.rtc.disconnect();
                    self.events.push(PeerEvent::Closed);
                    self.timeout = now + Duration::from_secs(3600);
                    break;
                }
            }
        }
        let open = self.channels.iter().any(|(_, l)| l == INPUT_CHANNEL);
        if open && !self.outbox.is_empty() {
            self.flush_outbox(out, now);
        }
    }

    fn on_event(&mut self, e: Event, now: Instant) {
        match e {
            Event::MediaAdded(m)
                if m.kind == MediaKind::Video && m.direction.is_sending() && self.mid.is_none() =>
            {
                self.mid = Some(m.mid);
            }
            Event::Connected => {
                self.connected = true;
                self.connect_deadline = None;
                self.awaiting_key_frame = true;
                self.events.push(PeerEvent::Connected);
            }
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) | Event::Closed => {
                if !self.events.contains(&PeerEvent::Closed) {
                    self.events.push(PeerEvent::Closed);
                }
                self.rtc.disconnect();
            }
            Event::KeyframeRequest(_) => {
                self.counters.key_frame_requests += 1;
                self.events.push(PeerEvent::KeyFrameRequest);
            }
            Event::MediaEgressStats(s) => {
                // A clean report with nothing sent since the last one says
                // nothing about capacity: hold instead of climbing while idle.
                let sent = s.packets > self.egress_packets;
                self.egress_packets = s.packets;
                if let Some(loss) = s.loss {
                    self.counters.loss_permille = (loss.clamp(0.0, 1.0) * 1000.0).round() as u32;
                }
                if let Some(loss) = s.loss.filter(|l| sent || *l >= 0.02) {
                    let before = self.loss.bitrate();
                    let after = self.loss.on_loss(loss);
                    if before != after {
                        self.events.push(PeerEvent::Bitrate(after));
                    }
                }
                if let Some(rtt) = s.rtt {
                    self.counters.rtt_ms = rtt.as_millis() as u32;
                }
            }
            Event::ChannelOpen(id, label) => {
                if label == INPUT_CHANNEL || label == UNRELIABLE_CHANNEL {
                    self.channels.push((id, label));
                } else {
                    tracing::debug!(viewer = %self.id, "ignoring data channel {label:?}");
                }
            }
            Event::ChannelClose(id) => self.channels.retain(|(c, _)| *c != id),
            Event::ChannelData(d) => {
                if !self.channels.iter().any(|(c, _)| *c == d.id) {
                    self.counters.messages_dropped += 1;
                    return;
                }
                if !self.limiter.allow(now) {
                    self.counters.messages_dropped += 1;
                    self.counters.messages_rate_limited += 1;
                    return;
                }
                match parse_viewer_message(&d.data) {
                    Ok(req) => {
                        self.counters.messages_accepted += 1;
                        self.events.push(PeerEvent::Request(req));
                    }
                    Err(err) => {
                        self.counters.messages_dropped += 1;
                        if matches!(err, MessageError::TooLarge(_)) {
                            self.counters.messages_oversized += 1;
                        }
                        tracing::debug!(viewer = %self.id, "dropped message: {err}");
                    }
                }
            }
            _ => {}
        }
    }
}
