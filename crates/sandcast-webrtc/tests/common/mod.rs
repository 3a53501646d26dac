//! In-process viewers for the sans-IO [`Hub`]: full str0m peers (the same
//! ICE, DTLS, SCTP and RTP a browser speaks) wired to the hub through
//! memory, on a simulated clock.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sandcast_webrtc::{Answer, Hub, HubConfig, ViewerOptions};
use str0m::change::SdpAnswer;
use str0m::channel::ChannelId;
use str0m::media::{Direction, Frequency, KeyframeRequestKind, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::Extension;
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};

/// The hub's advertised UDP address.
pub const HUB_ADDR: &str = "127.0.0.1:3478";

/// One viewer: a str0m `Rtc` acting as the browser.
pub struct Client {
    pub rtc: Rtc,
    pub addr: SocketAddr,
    pub mid: Mid,
    pub channel: ChannelId,
    pub channel_open: bool,
    pub connected: bool,
    pub timeout: Instant,
    pub frames: Vec<Vec<u8>>,
    /// Per frame: RTP time (90 kHz) and the playout-delay extension's min/max.
    pub frame_meta: Vec<(u64, Option<MediaTime>, Option<MediaTime>)>,
    pub messages: Vec<String>,
    pub answer: Answer,
}

/// A hub and its viewers on one simulated clock.
pub struct Loopback {
    pub hub: Hub,
    pub clients: Vec<Client>,
    pub now: Instant,
    /// How often the hub's timer fired (its wake-ups without network input).
    pub hub_wakeups: u64,
    /// Drop every n-th packet from the hub to the viewers (0: none).
    pub drop_every: usize,
    /// Packets dropped so far.
    pub dropped: usize,
    sent: usize,
}

impl Loopback {
    /// A hub advertising [`HUB_ADDR`].
    pub fn new() -> Self {
        let c = Candidate::host(HUB_ADDR.parse().unwrap(), "udp").unwrap();
        Loopback {
            hub: Hub::new(HubConfig::default(), vec![c]),
            clients: Vec::new(),
            now: Instant::now(),
            hub_wakeups: 0,
            drop_every: 0,
            dropped: 0,
            sent: 0,
        }
    }

    /// Adds a viewer of `session` that offers str0m's default codecs.
    pub fn add_client(&mut self, session: &str, opts: ViewerOptions) -> usize {
        // Browsers offer playout-delay; str0m's default map lacks it.
        let cfg = Rtc::builder().set_extension(5, Extension::PlayoutDelay);
        self.add_client_with(session, opts, cfg)
    }

    /// Adds a viewer of `session` that offers VP8 only.
    pub fn add_vp8_client(&mut self, session: &str) -> usize {
        let cfg = Rtc::builder().clear_codecs().enable_vp8(true);
        self.add_client_with(session, ViewerOptions::default(), cfg)
    }

    fn add_client_with(&mut self, session: &str, opts: ViewerOptions, cfg: RtcConfig) -> usize {
        let i = self.clients.len();
        let addr: SocketAddr = format!("127.0.0.{}:{}", 10 + i, 5000 + i).parse().unwrap();
        let mut rtc = cfg.build(self.now);
        rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
        let mut api = rtc.sdp_api();
        let mid = api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
        let channel = api.add_channel("input".into());
        let (offer, pending) = api.apply().unwrap();
        let answer = self
            .hub
            .accept_offer(session, &offer.to_sdp_string(), opts, self.now)
            .unwrap();
        rtc.sdp_api()
            .accept_answer(pending, SdpAnswer::from_sdp_string(&answer.sdp).unwrap())
            .unwrap();
        self.clients.push(Client {
            rtc,
            addr,
            mid,
            channel,
            channel_open: false,
            connected: false,
            timeout: self.now,
            frames: Vec::new(),
            frame_meta: Vec::new(),
            messages: Vec::new(),
            answer,
        });
        self.pump();
        i
    }

    /// Moves every pending packet until nothing is left to deliver.
    pub fn pump(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            for ci in 0..self.clients.len() {
                let c = &mut self.clients[ci];
                loop {
                    match c.rtc.poll_output().unwrap() {
                        Output::Timeout(t) => {
                            c.timeout = t;
                            break;
                        }
                        Output::Transmit(t) => {
                            moved = true;
                            self.hub.handle_receive(
                                Protocol::Udp,
                                t.source,
                                t.destination,
                                &t.contents,
                                self.now,
                            );
                        }
                        Output::Event(e) => match e {
                            Event::Connected => c.connected = true,
                            Event::ChannelOpen(id, _) if id == c.channel => c.channel_open = true,
                            Event::MediaData(d) => {
                                c.frames.push(d.data.to_vec());
                                c.frame_meta.push((
                                    d.time.rebase(Frequency::NINETY_KHZ).numer(),
                                    d.ext_vals.play_delay_min,
                                    d.ext_vals.play_delay_max,
                                ));
                            }
                            Event::ChannelData(d) => c
                                .messages
                                .push(String::from_utf8_lossy(&d.data).into_owned()),
                            _ => {}
                        },
                    }
                }
            }
            for t in self.hub.take_transmits() {
                moved = true;
                self.sent += 1;
                if self.drop_every > 0 && self.sent.is_multiple_of(self.drop_every) {
                    self.dropped += 1;
                    continue;
                }
                if let Some(c) = self.clients.iter_mut().find(|c| c.addr == t.destination) {
                    let r =
                        Receive::new(Protocol::Udp, t.source, t.destination, &t.contents).unwrap();
                    c.rtc.handle_input(Input::Receive(self.now, r)).unwrap();
                }
            }
            if !moved {
                return;
            }
        }
        panic!("packets kept flowing for 10000 rounds");
    }

    /// Advances the clock to `until`, firing every timer on the way.
    pub fn run_until(&mut self, until: Instant) {
        loop {
            self.pump();
            let hub_next = self.hub.poll_timeout();
            let client_next = self.clients.iter().map(|c| c.timeout).min();
            let next = [hub_next, client_next]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(until)
                .max(self.now);
            if next > until || (hub_next.is_none() && client_next.is_none()) {
                self.now = until;
                return;
            }
            self.now = next;
            if hub_next.is_some_and(|t| t <= self.now) {
                self.hub_wakeups += 1;
                self.hub.handle_timeout(self.now);
            }
            for c in &mut self.clients {
                if c.timeout <= self.now {
                    c.rtc.handle_input(Input::Timeout(self.now)).unwrap();
                }
            }
        }
    }

    /// Runs for `d` of simulated time.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    /// Runs until every client is connected with its channel open.
    pub fn connect_all(&mut self) {
        let deadline = self.now + Duration::from_secs(10);
        while !self.clients.iter().all(|c| c.connected && c.channel_open) {
            assert!(self.now < deadline, "clients did not connect");
            self.run_for(Duration::from_millis(10));
        }
    }

    /// Sends a data-channel text message from a client.
    pub fn send(&mut self, client: usize, text: &str) {
        let c = &mut self.clients[client];
        c.rtc
            .channel(c.channel)
            .expect("channel open")
            .write(false, text.as_bytes())
            .unwrap();
        self.pump();
    }

    /// A client asks for a key frame with a PLI.
    pub fn pli(&mut self, client: usize) {
        let c = &mut self.clients[client];
        c.rtc
            .writer(c.mid)
            .unwrap()
            .request_keyframe(None, KeyframeRequestKind::Pli)
            .unwrap();
        self.pump();
    }
}

/// Encodes `n` frames of a moving pattern with openh264; the first is IDR.
pub fn h264_frames(n: usize, w: usize, h: usize) -> Vec<(bool, Vec<u8>)> {
    use openh264::OpenH264API;
    use openh264::encoder::{Encoder, EncoderConfig, FrameType};
    use openh264::formats::{RgbSliceU8, YUVBuffer};
    let mut enc =
        Encoder::with_api_config(OpenH264API::from_source(), EncoderConfig::new()).unwrap();
    let mut out = Vec::new();
    let mut rgb = vec![0u8; w * h * 3];
    for i in 0..n {
        for (p, px) in rgb.chunks_mut(3).enumerate() {
            let x = p % w;
            let v = if (x + i * 8) % 64 < 32 { 230 } else { 30 };
            px.copy_from_slice(&[v, 80, 255 - v]);
        }
        let yuv = YUVBuffer::from_rgb_source(RgbSliceU8::new(&rgb, (w, h)));
        let bs = enc.encode(&yuv).unwrap();
        let key = matches!(bs.frame_type(), FrameType::IDR | FrameType::I);
        out.push((key, bs.to_vec()));
    }
    out
}
