//! Cost of sending one encoded frame to a session's viewers: packetising,
//! SRTP encryption and the hub's bookkeeping, per frame, for 1 and 4
//! connected viewers (in-process str0m peers, no sockets).
//!
//! `cargo bench -p sandcast-webrtc --bench fanout`

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::{Loopback, h264_frames};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use sandcast_proto::{Codec, VideoFrame, VideoHeader};
use sandcast_webrtc::ViewerOptions;

fn frame(seq: u32, key: bool, data: &[u8]) -> VideoFrame {
    VideoFrame {
        header: VideoHeader {
            codec: Codec::H264,
            keyframe: key,
            width: 1280,
            height: 720,
            seq,
            capture_us: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_micros() as u64,
        },
        data: Bytes::copy_from_slice(data),
    }
}

fn fanout(c: &mut Criterion) {
    let frames = h264_frames(2, 1280, 720);
    let key = frame(0, true, &frames[0].1);
    // A typical delta frame of moving screen content is 10-40 KB.
    let delta = frame(1, false, &vec![0x55u8; 24 * 1024]);
    let mut g = c.benchmark_group("push_frame_24KiB");
    for viewers in [1usize, 4] {
        let mut l = Loopback::new();
        for _ in 0..viewers {
            l.add_client("s", ViewerOptions::default());
        }
        l.connect_all();
        l.hub.push_frame("s", &key, l.now);
        l.run_for(Duration::from_millis(100));
        g.bench_with_input(BenchmarkId::from_parameter(viewers), &viewers, |b, _| {
            let mut packets = 0usize;
            b.iter(|| {
                let now = std::time::Instant::now().max(l.now);
                l.hub.push_frame("s", black_box(&delta), now);
                // Packetising happens on the timer str0m asks for at once.
                while l.hub.poll_timeout().is_some_and(|t| t <= now) {
                    l.hub.handle_timeout(now);
                }
                packets += l.hub.take_transmits().len();
            });
            assert!(packets > 0, "frames were packetised and sent");
        });
    }
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
