//! The fragmented MP4 muxer, sans-IO: H.264 frames as the agent encoded
//! them (Annex B) and their capture times in, file bytes out. Nothing is
//! encoded again.
//!
//! A segment is one playable file: an init segment (`ftyp` and `moov`
//! with the `avcC` of its first key frame's SPS and PPS), then fragments
//! (`moof` and `mdat`), each starting with a key frame. A key frame whose
//! size, SPS or PPS differs from the segment's starts a new segment: a
//! player never sees a picture its sample entry does not describe. A
//! sample's duration is the time to the next frame's capture, so a fragment
//! is complete only when the key frame after it arrives (or at
//! [`Muxer::finish`]).
//!
//! The boxes are `mp4-atom`'s; only the Annex B splitting is done here.

use mp4_atom::{
    Avc1, Avcc, Dinf, Dref, Encode, FourCC, Ftyp, Hdlr, Mdat, Mdhd, Mdia, Mfhd, Minf, Moof, Moov,
    Mvex, Mvhd, Stbl, Stco, Stsd, Tfdt, Tfhd, Tkhd, Traf, Trak, Trex, Trun, TrunEntry, TrunSamples,
    Url, Visual, Vmhd,
};

/// Ticks a second of the video track.
pub const TIMESCALE: u32 = 90_000;
/// A fragment that grew this long without a key frame is written and the
/// frames up to the next key frame are dropped (an agent that ignores key
/// frame requests must not make the server buffer without bound).
const MAX_FRAGMENT_TICKS: u64 = 10 * TIMESCALE as u64;
/// The same bound in bytes.
const MAX_FRAGMENT_BYTES: usize = 32 << 20;
/// The same bound in frames (tiny frames cost more than their bytes).
const MAX_FRAGMENT_SAMPLES: usize = 4096;
/// A sample lasts at most this long (a frame before a pause in capture).
const MAX_SAMPLE_TICKS: u64 = 600 * TIMESCALE as u64;
/// The track's id in every segment.
const TRACK: u32 = 1;

/// Sample flags: a sync sample, depending on no other.
const FLAGS_KEY: u32 = 0x0200_0000;
/// Sample flags: depends on others, not a sync sample.
const FLAGS_DELTA: u32 = 0x0101_0000;

/// One encoded frame, as it came from the agent.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// Annex B byte stream of one access unit.
    pub data: &'a [u8],
    /// The agent says it decodes on its own (checked: it must carry SPS,
    /// PPS and an IDR slice).
    pub keyframe: bool,
    /// Encoded width.
    pub width: u16,
    /// Encoded height.
    pub height: u16,
    /// Capture time, microseconds since the Unix epoch.
    pub capture_us: u64,
}

/// What the muxer gives back for a frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// A new segment starts: these bytes (`ftyp` + `moov`) begin its file.
    Segment {
        /// The init segment.
        init: Vec<u8>,
        /// Picture width.
        width: u16,
        /// Picture height.
        height: u16,
    },
    /// A complete fragment (`moof` + `mdat`) to append to the current segment.
    Fragment {
        /// The bytes.
        bytes: Vec<u8>,
        /// Its samples.
        samples: usize,
        /// Its duration in ticks.
        ticks: u64,
    },
}

/// Why a frame was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skipped {
    /// No segment or fragment can start before a key frame.
    WaitingForKeyFrame,
    /// The frame holds no NAL unit, or a key frame lacks SPS or PPS.
    Malformed(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Params {
    sps: Vec<u8>,
    pps: Vec<u8>,
    width: u16,
    height: u16,
}

#[derive(Debug)]
struct Sample {
    /// Length-prefixed NAL units.
    data: Vec<u8>,
    key: bool,
    /// Decode time in ticks since the segment's first frame.
    t: u64,
}

/// The muxer's state: the current segment and its unwritten fragment.
#[derive(Debug, Default)]
pub struct Muxer {
    params: Option<Params>,
    /// Capture time of the segment's first frame.
    origin_us: u64,
    pending: Vec<Sample>,
    pending_bytes: usize,
    /// Decode time of the next fragment's first sample.
    next_t: u64,
    sequence: u32,
    /// After an overlong fragment: frames are dropped until a key frame.
    waiting: bool,
}

/// Splits an Annex B byte stream into its NAL units (without start codes).
pub fn nal_units(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= data.len() {
        if data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 {
            starts.push((i, i + 3));
            i += 3;
        } else {
            i += 1;
        }
    }
    let mut units = Vec::with_capacity(starts.len());
    for (n, &(_, begin)) in starts.iter().enumerate() {
        let mut end = starts.get(n + 1).map_or(data.len(), |&(code, _)| code);
        // A four-byte start code's leading zero, and trailing zeros.
        while end > begin && data[end - 1] == 0 {
            end -= 1;
        }
        if end > begin {
            units.push(&data[begin..end]);
        }
    }
    units.into_iter()
}

impl Muxer {
    /// A muxer before its first key frame.
    pub fn new() -> Muxer {
        Muxer::default()
    }

    /// Takes one frame; returns what is complete because of it.
    pub fn push(&mut self, frame: Frame<'_>) -> Result<Vec<Output>, Skipped> {
        let mut sps = None;
        let mut pps = None;
        let mut idr = false;
        let mut data = Vec::with_capacity(frame.data.len() + 16);
        for nal in nal_units(frame.data) {
            match nal[0] & 0x1f {
                7 => sps = Some(nal),
                8 => pps = Some(nal),
                // Access unit delimiters and SEI say nothing a file needs.
                6 | 9 => {}
                t => {
                    idr |= t == 5;
                    data.extend_from_slice(&(nal.len() as u32).to_be_bytes());
                    data.extend_from_slice(nal);
                }
            }
        }
        if data.is_empty() {
            return Err(Skipped::Malformed("no picture in the frame"));
        }
        let key = frame.keyframe && idr;
        let mut out = Vec::new();
        if key {
            let (Some(sps), Some(pps)) = (sps, pps) else {
                return Err(Skipped::Malformed("a key frame without SPS and PPS"));
            };
            if sps.len() < 4 {
                return Err(Skipped::Malformed("an SPS shorter than 4 bytes"));
            }
            let params = Params {
                sps: sps.to_vec(),
                pps: pps.to_vec(),
                width: frame.width,
                height: frame.height,
            };
            if self.params.as_ref() != Some(&params) {
                if let Some(f) = self.close_fragment(Some(frame.capture_us)) {
                    out.push(f);
                }
                out.push(Output::Segment {
                    init: init_segment(&params),
                    width: params.width,
                    height: params.height,
                });
                self.params = Some(params);
                self.origin_us = frame.capture_us;
                self.next_t = 0;
                self.sequence = 0;
            } else if let Some(f) = self.close_fragment(Some(frame.capture_us)) {
                out.push(f);
            }
            self.waiting = false;
        } else if self.params.is_none() || self.waiting {
            return Err(Skipped::WaitingForKeyFrame);
        }
        let t = self.ticks(frame.capture_us);
        self.pending_bytes += data.len();
        self.pending.push(Sample { data, key, t });
        let span = t.saturating_sub(self.pending[0].t);
        if span >= MAX_FRAGMENT_TICKS
            || self.pending_bytes >= MAX_FRAGMENT_BYTES
            || self.pending.len() >= MAX_FRAGMENT_SAMPLES
        {
            // The frame that overflowed ends the fragment; it gets a
            // nominal duration (the one before it) as at the end.
            if let Some(f) = self.close_fragment(None) {
                out.push(f);
            }
            self.waiting = true;
        }
        Ok(out)
    }

    /// Frames were lost before the one captured at `capture_us`: what is
    /// pending is written (its last frame lasting until then) and frames
    /// are skipped until the next key frame.
    pub fn lost(&mut self, capture_us: u64) -> Option<Output> {
        self.params.as_ref()?;
        self.waiting = true;
        self.close_fragment(Some(capture_us))
    }

    /// Writes what is pending; the last frame lasts until `end_us` (the
    /// capture clock's now), or as long as the one before it.
    pub fn finish(&mut self, end_us: Option<u64>) -> Option<Output> {
        self.close_fragment(end_us)
    }

    /// Decode time of a capture time: monotonic, whatever the agent says.
    fn ticks(&self, capture_us: u64) -> u64 {
        let t = capture_us.saturating_sub(self.origin_us) as u128 * TIMESCALE as u128 / 1_000_000;
        let t = u64::try_from(t).unwrap_or(u64::MAX);
        let floor = match self.pending.last() {
            Some(s) => s.t + 1,
            None => self.next_t,
        };
        t.max(floor).min(floor.saturating_add(MAX_SAMPLE_TICKS - 1))
    }

    /// The pending samples as one fragment; the last lasts until `end_us`.
    fn close_fragment(&mut self, end_us: Option<u64>) -> Option<Output> {
        if self.pending.is_empty() {
            return None;
        }
        let samples = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let last_t = samples[samples.len() - 1].t;
        let end = match end_us {
            Some(us) => self.ticks(us).max(last_t + 1),
            None => match samples.len() {
                1 => last_t + TIMESCALE as u64 / 30,
                n => last_t + (last_t - samples[n - 2].t),
            },
        };
        let base = samples[0].t;
        self.next_t = end;
        self.sequence += 1;
        let entries: Vec<TrunEntry> = samples
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let next = samples.get(i + 1).map_or(end, |n| n.t);
                TrunEntry {
                    duration: Some(u32::try_from(next - s.t).unwrap_or(u32::MAX)),
                    size: Some(s.data.len() as u32),
                    flags: Some(if s.key { FLAGS_KEY } else { FLAGS_DELTA }),
                    cts: None,
                }
            })
            .collect();
        let mut moof = Moof {
            mfhd: Mfhd {
                sequence_number: self.sequence,
            },
            traf: vec![Traf {
                tfhd: Tfhd {
                    track_id: TRACK,
                    default_base_is_moof: true,
                    ..Default::default()
                },
                tfdt: Some(Tfdt {
                    base_media_decode_time: base,
                }),
                trun: vec![Trun {
                    data_offset: Some(0),
                    samples: TrunSamples::Explicit(entries),
                }],
                ..Default::default()
            }],
        };
        let mut head = Vec::new();
        moof.encode(&mut head).expect("a moof encodes into a Vec");
        // The samples start after the moof and the mdat's 8-byte header.
        moof.traf[0].trun[0].data_offset = Some(head.len() as i32 + 8);
        let mut bytes = Vec::with_capacity(
            head.len() + 8 + samples.iter().map(|s| s.data.len()).sum::<usize>(),
        );
        moof.encode(&mut bytes).expect("a moof encodes into a Vec");
        let mdat = Mdat {
            data: samples
                .iter()
                .flat_map(|s| s.data.iter().copied())
                .collect(),
        };
        mdat.encode(&mut bytes).expect("an mdat encodes into a Vec");
        Some(Output::Fragment {
            bytes,
            samples: samples.len(),
            ticks: end - base,
        })
    }
}

/// `ftyp` + `moov` of a segment: one H.264 video track, fragments to follow.
fn init_segment(p: &Params) -> Vec<u8> {
    let ftyp = Ftyp {
        major_brand: FourCC::new(b"iso6"),
        minor_version: 0,
        compatible_brands: vec![
            FourCC::new(b"iso6"),
            FourCC::new(b"avc1"),
            FourCC::new(b"mp41"),
        ],
    };
    let avcc = Avcc::new(&p.sps, &p.pps).expect("an SPS of at least 4 bytes");
    let moov = Moov {
        mvhd: Mvhd {
            timescale: 1000,
            rate: 1.into(),
            volume: 1.into(),
            next_track_id: TRACK + 1,
            ..Default::default()
        },
        mvex: Some(Mvex {
            mehd: None,
            trex: vec![Trex {
                track_id: TRACK,
                default_sample_description_index: 1,
                ..Default::default()
            }],
        }),
        trak: vec![Trak {
            tkhd: Tkhd {
                track_id: TRACK,
                enabled: true,
                in_movie: true,
                width: p.width.into(),
                height: p.height.into(),
                ..Default::default()
            },
            mdia: Mdia {
                mdhd: Mdhd {
                    timescale: TIMESCALE,
                    language: "und".into(),
                    ..Default::default()
                },
                hdlr: Hdlr {
                    handler: FourCC::new(b"vide"),
                    name: "sandcast".into(),
                },
                minf: Minf {
                    vmhd: Some(Vmhd::default()),
                    dinf: Dinf {
                        dref: Dref {
                            entries: vec![Url::default().into()],
                        },
                    },
                    stbl: Stbl {
                        stsd: Stsd {
                            codecs: vec![
                                Avc1 {
                                    visual: Visual {
                                        data_reference_index: 1,
                                        width: p.width,
                                        height: p.height,
                                        ..Default::default()
                                    },
                                    avcc,
                                    btrt: None,
                                    colr: None,
                                    pasp: None,
                                    taic: None,
                                    fiel: None,
                                    spatial: None,
                                }
                                .into(),
                            ],
                        },
                        stco: Some(Stco::default()),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            },
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut out = Vec::new();
    ftyp.encode(&mut out).expect("an ftyp encodes into a Vec");
    moov.encode(&mut out).expect("a moov encodes into a Vec");
    out
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use mp4_atom::{Any, Decode, Moof};
    use sandcast_media::testdata::ScrollingText;
    use sandcast_media::{EncoderSettings, new_encoder};
    use sandcast_proto::Codec;

    use super::*;

    /// Real H.264 frames (openh264, as the agent encodes them) of scrolling
    /// text, `fps` a second, a key frame every `key_every` (see
    /// [`super::testing::h264`] for the common case).
    fn frames(
        width: u32,
        height: u32,
        n: u32,
        key_every: u32,
        fps: u64,
    ) -> Vec<(Vec<u8>, bool, u64)> {
        let text = ScrollingText::new(width, height);
        let mut enc = new_encoder(Codec::H264, EncoderSettings::default()).unwrap();
        let t0 = 1_700_000_000_000_000u64;
        (0..n)
            .filter_map(|i| {
                let f = enc.encode(&text.i420(i, 4), i % key_every == 0).unwrap()?;
                Some((
                    f.data.to_vec(),
                    f.keyframe,
                    t0 + u64::from(i) * 1_000_000 / fps,
                ))
            })
            .collect()
    }

    /// A test frame (from [`frames`]) at `w` x `h`.
    fn frame((data, key, t): &(Vec<u8>, bool, u64), w: u16, h: u16) -> Frame<'_> {
        Frame {
            data,
            keyframe: *key,
            width: w,
            height: h,
            capture_us: *t,
        }
    }

    fn push_all(m: &mut Muxer, frames: &[(Vec<u8>, bool, u64)], w: u16, h: u16) -> Vec<Output> {
        let mut out = Vec::new();
        for f in frames {
            out.extend(m.push(frame(f, w, h)).unwrap());
        }
        out
    }

    /// Every box of a file, parsed back by mp4-atom.
    fn parse(bytes: &[u8]) -> Vec<Any> {
        let mut c = Cursor::new(bytes);
        let mut atoms = Vec::new();
        while (c.position() as usize) < bytes.len() {
            atoms.push(Any::decode(&mut c).expect("a box mp4-atom reads"));
        }
        atoms
    }

    fn file_of(outs: &[Output]) -> Vec<u8> {
        let mut file = Vec::new();
        for o in outs {
            match o {
                Output::Segment { init, .. } => {
                    assert!(file.is_empty(), "one segment expected");
                    file.extend_from_slice(init);
                }
                Output::Fragment { bytes, .. } => file.extend_from_slice(bytes),
            }
        }
        file
    }

    #[test]
    fn a_recording_parses_back_with_key_frames_first_and_capture_time_durations() {
        // 90 frames at 30 fps, a key frame each second: three fragments.
        let fs = frames(320, 240, 90, 30, 30);
        let mut m = Muxer::new();
        let mut outs = push_all(&mut m, &fs, 320, 240);
        let end = fs.last().unwrap().2 + 1_000_000 / 30;
        outs.extend(m.finish(Some(end)));
        let atoms = parse(&file_of(&outs));
        let Any::Ftyp(_) = &atoms[0] else {
            panic!("ftyp first: {:?}", atoms[0])
        };
        let Any::Moov(moov) = &atoms[1] else {
            panic!("moov second")
        };
        assert_eq!(moov.trak[0].mdia.mdhd.timescale, TIMESCALE);
        let Codec4::Avc1(avc1) = classify(&moov.trak[0].mdia.minf.stbl.stsd.codecs[0]) else {
            panic!("an avc1 sample entry")
        };
        assert_eq!((avc1.visual.width, avc1.visual.height), (320, 240));
        assert_eq!(avc1.avcc.length_size, 4);
        let moofs: Vec<&Moof> = atoms
            .iter()
            .filter_map(|a| if let Any::Moof(m) = a { Some(m) } else { None })
            .collect();
        let mdats = atoms.iter().filter(|a| matches!(a, Any::Mdat(_))).count();
        assert_eq!((moofs.len(), mdats), (3, 3));
        let mut expected_t = 0;
        let mut samples = 0;
        for (i, moof) in moofs.iter().enumerate() {
            assert_eq!(moof.mfhd.sequence_number, i as u32 + 1);
            let traf = &moof.traf[0];
            assert_eq!(
                traf.tfdt.as_ref().unwrap().base_media_decode_time,
                expected_t
            );
            let entries: Vec<_> = traf.trun[0].samples.iter().collect();
            assert_eq!(
                entries[0].flags,
                Some(FLAGS_KEY),
                "fragment {i} starts with a key frame"
            );
            assert!(entries[1..].iter().all(|e| e.flags == Some(FLAGS_DELTA)));
            for e in &entries {
                // 1/30 s at 90 kHz, to the tick (rounding of µs).
                let d = e.duration.unwrap();
                assert!((2999..=3001).contains(&d), "duration {d}");
                expected_t += u64::from(d);
            }
            samples += entries.len();
        }
        assert_eq!(samples, 90);
        // Three seconds of video.
        assert!(
            (expected_t as i64 - 3 * TIMESCALE as i64).abs() <= 3,
            "{expected_t}"
        );
    }

    #[test]
    fn samples_are_length_prefixed_without_parameter_sets() {
        let fs = frames(160, 120, 3, 30, 30);
        let mut m = Muxer::new();
        let mut outs = push_all(&mut m, &fs, 160, 120);
        outs.extend(m.finish(None));
        let atoms = parse(&file_of(&outs));
        let Some(Any::Mdat(mdat)) = atoms.iter().find(|a| matches!(a, Any::Mdat(_))) else {
            panic!("an mdat")
        };
        let mut rest = &mdat.data[..];
        let mut types = Vec::new();
        while !rest.is_empty() {
            let n = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            types.push(rest[4] & 0x1f);
            rest = &rest[4 + n..];
        }
        assert_eq!(types[0], 5, "the first sample is an IDR slice: {types:?}");
        assert!(!types.contains(&7) && !types.contains(&8), "{types:?}");
    }

    #[test]
    fn nothing_is_written_before_the_first_key_frame() {
        let fs = frames(160, 120, 31, 30, 30);
        let mut m = Muxer::new();
        // Frame 1 is not a key frame: skipped until frame 30 is.
        for f in &fs[1..30] {
            assert!(!f.1);
            let r = m.push(frame(f, 160, 120));
            assert_eq!(r, Err(Skipped::WaitingForKeyFrame));
        }
        let out = m.push(frame(&fs[30], 160, 120)).unwrap();
        assert!(matches!(
            out[..],
            [Output::Segment {
                width: 160,
                height: 120,
                ..
            }]
        ));
    }

    #[test]
    fn a_size_change_starts_a_new_segment_after_the_last_fragment() {
        let small = frames(160, 120, 10, 30, 30);
        let mut big = frames(320, 240, 10, 30, 30);
        let shift = small.last().unwrap().2 + 33_333 - big[0].2;
        for f in &mut big {
            f.2 += shift;
        }
        let mut m = Muxer::new();
        let mut outs = push_all(&mut m, &small, 160, 120);
        assert_eq!(outs.len(), 1);
        outs = push_all(&mut m, &big, 320, 240);
        assert!(
            matches!(&outs[0], Output::Fragment { samples: 10, .. }),
            "{:?}",
            outs[0]
        );
        assert!(matches!(
            &outs[1],
            Output::Segment {
                width: 320,
                height: 240,
                ..
            }
        ));
        // The new segment's time starts at zero.
        outs.extend(m.finish(None));
        let atoms = parse(&file_of(&outs[1..]));
        let Some(Any::Moof(moof)) = atoms.iter().find(|a| matches!(a, Any::Moof(_))) else {
            panic!()
        };
        assert_eq!(
            moof.traf[0].tfdt.as_ref().unwrap().base_media_decode_time,
            0
        );
    }

    #[test]
    fn lost_frames_close_the_fragment_and_wait_for_a_key_frame() {
        let fs = frames(160, 120, 40, 30, 30);
        let mut m = Muxer::new();
        push_all(&mut m, &fs[..5], 160, 120);
        let out = m.lost(fs[7].2).unwrap();
        assert!(matches!(out, Output::Fragment { samples: 5, .. }));
        let r = m.push(frame(&fs[7], 160, 120));
        assert_eq!(r, Err(Skipped::WaitingForKeyFrame));
        assert!(m.push(frame(&fs[30], 160, 120)).unwrap().is_empty());
    }

    #[test]
    fn capture_times_going_backwards_still_give_increasing_decode_times() {
        let fs = frames(160, 120, 4, 30, 30);
        let mut m = Muxer::new();
        let times = [1_000_000, 900_000, 900_000, 2_000_000];
        for ((data, key, _), t) in fs.iter().zip(times) {
            m.push(Frame {
                data,
                keyframe: *key,
                width: 160,
                height: 120,
                capture_us: t,
            })
            .unwrap();
        }
        let Some(Output::Fragment { bytes, .. }) = m.finish(None) else {
            panic!()
        };
        let Any::Moof(moof) = Any::decode(&mut Cursor::new(&bytes)).unwrap() else {
            panic!()
        };
        let d: Vec<u32> = moof.traf[0].trun[0]
            .samples
            .iter()
            .map(|e| e.duration.unwrap())
            .collect();
        assert!(d.iter().all(|&d| d >= 1), "{d:?}");
        assert_eq!(d[2], 90_000 - 2, "the later frame takes up the time: {d:?}");
    }

    #[test]
    fn a_fragment_without_a_key_frame_for_too_long_is_closed_and_frames_wait() {
        // An agent that never sends a key frame after the first.
        let fs = frames(160, 120, 2, 1000, 30);
        let mut m = Muxer::new();
        let (key, delta) = (&fs[0], &fs[1]);
        m.push(Frame {
            data: &key.0,
            keyframe: true,
            width: 160,
            height: 120,
            capture_us: 0,
        })
        .unwrap();
        let mut closed = None;
        for i in 1..=MAX_FRAGMENT_SAMPLES as u64 {
            let f = Frame {
                data: &delta.0,
                keyframe: false,
                width: 160,
                height: 120,
                capture_us: i,
            };
            let out = m.push(f).unwrap();
            if !out.is_empty() {
                closed = Some((i, out));
                break;
            }
        }
        let (i, out) = closed.expect("the fragment was closed");
        assert_eq!(i as usize, MAX_FRAGMENT_SAMPLES - 1);
        assert!(matches!(
            out[..],
            [Output::Fragment {
                samples: MAX_FRAGMENT_SAMPLES,
                ..
            }]
        ));
        let f = Frame {
            data: &delta.0,
            keyframe: false,
            width: 160,
            height: 120,
            capture_us: i + 1,
        };
        assert_eq!(m.push(f), Err(Skipped::WaitingForKeyFrame));
    }

    #[test]
    fn malformed_frames_are_refused() {
        let mut m = Muxer::new();
        let f = |data| Frame {
            data,
            keyframe: true,
            width: 16,
            height: 16,
            capture_us: 0,
        };
        assert!(matches!(m.push(f(b"")), Err(Skipped::Malformed(_))));
        assert!(matches!(
            m.push(f(b"\0\0\x01\x65\x88")),
            Err(Skipped::Malformed(_))
        ));
        assert!(matches!(
            m.push(f(b"\0\0\x01\x67\x42\0\0\0\x01\x68\x01\0\0\x01\x65\x88")),
            Err(Skipped::Malformed(_))
        ));
    }

    #[test]
    fn annex_b_splits_on_three_and_four_byte_start_codes() {
        let units: Vec<&[u8]> =
            nal_units(b"\0\0\0\x01\x67\x01\x02\0\0\x01\x68\x03\0\0\0\x01\x65\x04\0").collect();
        assert_eq!(units, [&b"\x67\x01\x02"[..], b"\x68\x03", b"\x65\x04"]);
    }

    enum Codec4<'a> {
        Avc1(&'a Avc1),
        Other,
    }

    fn classify(c: &mp4_atom::Codec) -> Codec4<'_> {
        match c {
            mp4_atom::Codec::Avc1(a) => Codec4::Avc1(a),
            _ => Codec4::Other,
        }
    }
}

/// Real H.264 frames for the tests of the recording's modules.
#[cfg(test)]
pub(crate) mod testing {
    use sandcast_media::testdata::ScrollingText;
    use sandcast_media::{EncoderSettings, new_encoder};
    use sandcast_proto::Codec;

    /// `n` frames of `width`×`height` at 30 fps, a key frame every 30:
    /// `(Annex B, key frame, capture µs)`.
    pub fn h264(width: u32, height: u32, n: u32) -> Vec<(Vec<u8>, bool, u64)> {
        let text = ScrollingText::new(width, height);
        let mut enc = new_encoder(Codec::H264, EncoderSettings::default()).unwrap();
        (0..n)
            .filter_map(|i| {
                let f = enc.encode(&text.i420(i, 4), i % 30 == 0).unwrap()?;
                Some((
                    f.data.to_vec(),
                    f.keyframe,
                    1_700_000_000_000_000 + u64::from(i) * 33_333,
                ))
            })
            .collect()
    }
}
