//! The sans-IO hub against in-process str0m viewers: connection, media,
//! key-frame requests, input, idle cost. No sockets, simulated time.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::{Loopback, h264_frames};
use sandcast_proto::{Codec, InputEvent, VideoFrame, VideoHeader};
use sandcast_webrtc::{GatewayEvent, ViewerMessage, ViewerOptions, ViewerState};
use str0m::media::MediaTime;

fn frame(seq: u32, key: bool, data: &[u8]) -> VideoFrame {
    VideoFrame {
        header: VideoHeader {
            codec: Codec::H264,
            keyframe: key,
            width: 320,
            height: 240,
            seq,
            capture_us: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_micros() as u64,
        },
        data: Bytes::copy_from_slice(data),
    }
}

fn count(events: &[GatewayEvent], f: impl Fn(&GatewayEvent) -> bool) -> usize {
    events.iter().filter(|e| f(e)).count()
}

#[test]
fn connects_and_delivers_the_encoders_frames_byte_for_byte() {
    let mut l = Loopback::new();
    l.add_client("s", ViewerOptions::default());
    l.connect_all();
    let ev = l.hub.take_events();
    assert_eq!(
        count(&ev, |e| matches!(e, GatewayEvent::KeyFrameWanted { .. })),
        1,
        "a new viewer asks for a key frame at once: {ev:?}"
    );
    assert!(ev.iter().any(|e| matches!(
        e,
        GatewayEvent::ViewerState {
            state: ViewerState::Connected,
            ..
        }
    )));

    let frames = h264_frames(10, 320, 240);
    let mut sent_capture: Vec<u64> = Vec::new();
    // A delta frame before the first key frame cannot be decoded: skipped.
    l.hub.push_frame("s", &frame(0, false, &frames[1].1), l.now);
    for (i, (key, data)) in frames.iter().enumerate() {
        let f = frame(i as u32 + 1, *key, data);
        sent_capture.push(f.header.capture_us);
        l.hub.push_frame("s", &f, l.now);
        l.run_for(Duration::from_millis(33));
        std::thread::sleep(Duration::from_millis(2));
    }
    l.run_for(Duration::from_millis(200));
    // RTP time is the capture time at 90 kHz; playout delay asks for zero.
    let meta = &l.clients[0].frame_meta;
    assert_eq!(meta.len(), frames.len());
    for (i, (rtp, min, max)) in meta.iter().enumerate() {
        assert_eq!(*rtp as u32, (sent_capture[i] * 9 / 100) as u32, "frame {i}");
        assert_eq!((*min, *max), (Some(MediaTime::ZERO), Some(MediaTime::ZERO)));
    }
    let got = &l.clients[0].frames;
    assert_eq!(
        got.len(),
        frames.len(),
        "every frame after the key frame arrives"
    );
    for (i, (_, data)) in frames.iter().enumerate() {
        // str0m's depacketiser hands back Annex B, as openh264 wrote it.
        assert_eq!(&got[i], data, "frame {i} differs");
    }
    // What the operator's metrics read: the frames, key frames and bytes
    // sent, and the one skipped before the first key frame.
    let all = l.hub.all_counters();
    assert_eq!(all.len(), 1, "{all:?}");
    let (session, _, c) = &all[0];
    assert_eq!(session, "s");
    assert_eq!(c.frames_sent, frames.len() as u64);
    assert_eq!(c.frames_skipped, 1);
    assert_eq!(
        c.key_frames_sent,
        frames.iter().filter(|(key, _)| *key).count() as u64
    );
    assert_eq!(
        c.bytes_sent,
        frames.iter().map(|(_, d)| d.len() as u64).sum::<u64>()
    );
    assert!(c.target_bitrate_bps > 0);
}

/// A VP8 key frame header (RFC 6386 9.1): frame tag with the key-frame bit
/// clear, start code, 320x240; the rest is payload the packetiser only
/// splits.
fn vp8_frame(seq: u32, key: bool, len: usize) -> VideoFrame {
    let mut data = vec![0u8; len];
    let size = (len as u32 - 10) << 5;
    data[0] = (size as u8 & 0xe0) | 0x10 | u8::from(!key);
    data[1] = (size >> 8) as u8;
    data[2] = (size >> 16) as u8;
    if key {
        data[3..6].copy_from_slice(&[0x9d, 0x01, 0x2a]);
        data[6..8].copy_from_slice(&320u16.to_le_bytes());
        data[8..10].copy_from_slice(&240u16.to_le_bytes());
    }
    for (i, b) in data.iter_mut().enumerate().skip(10) {
        *b = (i * 7 + seq as usize) as u8;
    }
    let mut f = frame(seq, key, &data);
    f.header.codec = Codec::Vp8;
    f
}

#[test]
fn a_vp8_only_viewer_gets_vp8_packetised() {
    let mut l = Loopback::new();
    l.add_vp8_client("s");
    let ev = l.hub.take_events();
    assert!(
        ev.iter().any(|e| matches!(
            e,
            GatewayEvent::VideoWanted {
                codec: Codec::Vp8,
                ..
            }
        )),
        "{ev:?}"
    );
    l.connect_all();
    let frames: Vec<VideoFrame> = (0..6)
        .map(|i| vp8_frame(i, i == 0, 3000 + i as usize * 1500))
        .collect();
    // H.264 frames still in flight from before a codec switch are dropped.
    let stale = frame(99, true, &h264_frames(1, 64, 64)[0].1);
    l.hub.push_frame("s", &stale, l.now);
    for f in &frames {
        l.hub.push_frame("s", f, l.now);
        l.run_for(Duration::from_millis(33));
    }
    l.run_for(Duration::from_millis(200));
    let got = &l.clients[0].frames;
    assert_eq!(got.len(), frames.len());
    for (g, f) in got.iter().zip(&frames) {
        assert_eq!(g.as_slice(), &f.data[..]);
    }
}

#[test]
fn lost_packets_are_repaired_by_nack_retransmission() {
    let mut l = Loopback::new();
    l.add_client("s", ViewerOptions::default());
    l.connect_all();
    // Big frames: many packets each, so a loss hits the middle of frames.
    let frames = h264_frames(30, 640, 480);
    l.drop_every = 10;
    for (i, (key, data)) in frames.iter().enumerate() {
        l.hub.push_frame("s", &frame(i as u32, *key, data), l.now);
        l.run_for(Duration::from_millis(33));
    }
    l.run_for(Duration::from_secs(2));
    assert!(l.dropped >= 3, "only {} packets dropped", l.dropped);
    let got = &l.clients[0].frames;
    assert_eq!(got.len(), frames.len(), "lost packets were resent");
    for (i, (_, data)) in frames.iter().enumerate() {
        assert_eq!(&got[i], data, "frame {i} differs");
    }
}

#[test]
fn plis_become_rate_limited_key_frame_requests() {
    let mut l = Loopback::new();
    l.add_client("s", ViewerOptions::default());
    l.connect_all();
    // Media must flow before the viewer knows a stream to PLI.
    let frames = h264_frames(3, 320, 240);
    for (i, (key, data)) in frames.iter().enumerate() {
        l.hub.push_frame("s", &frame(i as u32, *key, data), l.now);
        l.run_for(Duration::from_millis(33));
    }
    l.run_for(Duration::from_secs(1));
    l.hub.take_events();

    l.pli(0);
    l.run_for(Duration::from_millis(20));
    let ev = l.hub.take_events();
    assert_eq!(
        count(&ev, |e| matches!(e, GatewayEvent::KeyFrameWanted { .. })),
        1,
        "{ev:?}"
    );
    // A burst within the interval is held back to a single request at its end.
    for _ in 0..5 {
        l.pli(0);
        l.run_for(Duration::from_millis(20));
    }
    assert_eq!(
        count(&l.hub.take_events(), |e| matches!(
            e,
            GatewayEvent::KeyFrameWanted { .. }
        )),
        0
    );
    l.run_for(Duration::from_millis(600));
    assert_eq!(
        count(&l.hub.take_events(), |e| matches!(
            e,
            GatewayEvent::KeyFrameWanted { .. }
        )),
        1
    );
}

#[test]
fn data_channel_input_is_validated_and_messages_reach_the_viewer() {
    let mut l = Loopback::new();
    l.add_client("s", ViewerOptions::default());
    l.connect_all();
    l.hub.take_events();
    l.send(0, r#"{"kind":"pointer_move","x":5,"y":6}"#);
    l.send(0, r#"{"kind":"pointer_move","x":-5,"y":6}"#);
    l.send(0, "garbage");
    l.send(0, r#"{"kind":"key","code":"KeyA","key":"a","down":true}"#);
    l.run_for(Duration::from_millis(50));
    let ev = l.hub.take_events();
    let inputs: Vec<&InputEvent> = ev
        .iter()
        .filter_map(|e| match e {
            GatewayEvent::Input { event, .. } => Some(event),
            _ => None,
        })
        .collect();
    assert_eq!(
        inputs,
        vec![
            &InputEvent::PointerMove { x: 5, y: 6 },
            &InputEvent::Key {
                code: "KeyA".into(),
                key: "a".into(),
                down: true
            }
        ]
    );
    let id = l.clients[0].answer.viewer_id;
    let c = l.hub.counters(id).unwrap();
    assert_eq!((c.messages_accepted, c.messages_dropped), (2, 2));

    l.hub.send_to_viewers(
        "s",
        &ViewerMessage::Clipboard {
            text: "copied".into(),
        },
        l.now,
    );
    l.run_for(Duration::from_millis(50));
    assert!(
        l.clients[0]
            .messages
            .contains(&r#"{"kind":"clipboard","text":"copied"}"#.to_string()),
        "{:?}",
        l.clients[0].messages
    );
    assert!(
        l.clients[0]
            .messages
            .contains(&r#"{"kind":"control","granted":true}"#.to_string())
    );
}

#[test]
fn an_idle_session_sleeps_instead_of_spinning() {
    let mut l = Loopback::new();
    l.add_client("s", ViewerOptions::default());
    l.add_client("s", ViewerOptions::default());
    l.connect_all();
    let frames = h264_frames(2, 320, 240);
    for (i, (key, data)) in frames.iter().enumerate() {
        l.hub.push_frame("s", &frame(i as u32, *key, data), l.now);
    }
    l.run_for(Duration::from_secs(2));
    let before = l.hub_wakeups;
    l.run_for(Duration::from_secs(30));
    let per_second = (l.hub_wakeups - before) as f64 / 30.0;
    eprintln!("idle: {per_second:.2} hub timer wake-ups per second, two viewers");
    // str0m's own housekeeping (RTCP, stats, ICE consent, SCTP) for two
    // viewers; a 1 ms or pacer tick would be hundreds.
    assert!(
        per_second < 20.0,
        "{per_second} timer wake-ups per second while idle"
    );
    assert!(
        l.clients.iter().all(|c| c.connected),
        "viewers stay connected while idle"
    );
}

#[test]
fn a_viewer_that_goes_silent_is_closed_and_video_stops() {
    let mut l = Loopback::new();
    l.add_client("s", ViewerOptions::default());
    l.connect_all();
    l.hub.take_events();
    // The viewer vanishes without a word: no more packets from it.
    l.clients.clear();
    l.run_for(Duration::from_secs(60));
    let ev = l.hub.take_events();
    assert!(
        ev.iter().any(|e| matches!(
            e,
            GatewayEvent::ViewerState {
                state: ViewerState::Closed,
                ..
            }
        )),
        "{ev:?}"
    );
    assert!(
        ev.iter()
            .any(|e| matches!(e, GatewayEvent::VideoUnwanted { .. })),
        "{ev:?}"
    );
    assert_eq!(l.hub.poll_timeout(), None, "nothing left to wake up for");
}
