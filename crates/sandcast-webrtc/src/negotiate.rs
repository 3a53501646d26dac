//! Codec negotiation from a viewer's SDP offer.
//!
//! The gateway reads the offer's video section itself, before any `Rtc` is
//! built, so a session's codec is settled (and a viewer that cannot decode it
//! refused) without touching the session.

use sandcast_proto::Codec;

/// Largest offer accepted; real browser offers are 5-10 KB.
pub const MAX_OFFER_LEN: usize = 64 * 1024;

/// H.264 constrained baseline, level 3.1, the profile every browser decodes.
pub const H264_PROFILE_LEVEL_ID: u32 = 0x42e01f;

/// Why an offer was refused. The server maps every variant to a 4xx.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OfferError {
    /// The offer is not SDP str0m can read, or is too large.
    #[error("bad SDP offer: {0}")]
    BadSdp(String),
    /// The offer has no video section the viewer can receive on.
    #[error("the offer has no video section that receives video: {0}")]
    NoVideo(String),
    /// The offer lists neither H.264 constrained baseline
    /// (packetization-mode=1) nor VP8.
    #[error(
        "no usable video codec in the offer (need H.264 constrained baseline with packetization-mode=1, or VP8); offered: {0}"
    )]
    NoCodec(String),
    /// The session already streams a codec this viewer cannot decode.
    #[error("session streams {session:?} but the offer supports only {offered:?}")]
    CodecMismatch {
        /// The session's codec.
        session: Codec,
        /// What the offer supports.
        offered: Vec<Codec>,
    },
    /// The session has as many viewers as it may have.
    #[error("session {session:?} already has the most viewers allowed ({max})")]
    TooManyViewers {
        /// Session id.
        session: String,
        /// The limit.
        max: usize,
    },
    /// The session has been closed, or its name is not acceptable.
    #[error("bad session id {0:?}")]
    BadSession(String),
    /// The gateway is shutting down.
    #[error("the gateway is not running")]
    Stopped,
}

impl OfferError {
    /// The HTTP status a signaling endpoint answers with: 400 for an offer
    /// that cannot work, 409 when the session cannot take this viewer, 503
    /// when the gateway is down.
    pub fn http_status(&self) -> u16 {
        match self {
            OfferError::BadSdp(_) | OfferError::NoVideo(_) | OfferError::NoCodec(_) => 400,
            OfferError::BadSession(_) => 404,
            OfferError::CodecMismatch { .. } | OfferError::TooManyViewers { .. } => 409,
            OfferError::Stopped => 503,
        }
    }
}

/// What a viewer's offer supports, in the gateway's order of preference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferedCodecs {
    /// Supported codecs, H.264 first when present.
    pub codecs: Vec<Codec>,
    /// The `a=mid` of each video section that receives, in offer order.
    pub video_mids: Vec<String>,
}

impl OfferedCodecs {
    /// The gateway's preferred codec among those offered.
    pub fn preferred(&self) -> Option<Codec> {
        self.codecs.first().copied()
    }

    /// Whether the offer supports `codec`.
    pub fn supports(&self, codec: Codec) -> bool {
        self.codecs.contains(&codec)
    }
}

/// Reads the codecs of the offer's receiving video sections.
///
/// H.264 counts only with `packetization-mode=1` and a baseline profile
/// (profile_idc 0x42), which decodes our constrained-baseline stream.
pub fn offered_codecs(sdp: &str) -> Result<OfferedCodecs, OfferError> {
    if sdp.len() > MAX_OFFER_LEN {
        return Err(OfferError::BadSdp(format!(
            "{} bytes exceeds the limit of {MAX_OFFER_LEN}",
            sdp.len()
        )));
    }
    if !sdp.starts_with("v=0") {
        return Err(OfferError::BadSdp(format!(
            "does not start with \"v=0\": {:?}",
            sdp.chars().take(40).collect::<String>()
        )));
    }

    let mut sections: Vec<VideoSection> = Vec::new();
    let mut in_video = false;
    for line in sdp.lines().map(str::trim_end) {
        if let Some(m) = line.strip_prefix("m=") {
            in_video = m.starts_with("video ");
            if in_video {
                sections.push(VideoSection::default());
            }
            continue;
        }
        let Some(sec) = sections.last_mut().filter(|_| in_video) else {
            continue;
        };
        if let Some(rest) = line.strip_prefix("a=rtpmap:") {
            if let Some((pt, enc)) = rest.split_once(' ') {
                let name = enc.split('/').next().unwrap_or("").to_ascii_uppercase();
                sec.rtpmap.push((pt.to_string(), name));
            }
        } else if let Some(rest) = line.strip_prefix("a=fmtp:") {
            if let Some((pt, params)) = rest.split_once(' ') {
                sec.fmtp.push((pt.to_string(), params.to_string()));
            }
        } else if let Some(mid) = line.strip_prefix("a=mid:") {
            sec.mid = Some(mid.trim().to_string());
        } else if matches!(line, "a=sendonly" | "a=inactive") {
            sec.receives = false;
        }
    }

    let receiving: Vec<&VideoSection> = sections.iter().filter(|s| s.receives).collect();
    if receiving.is_empty() {
        return Err(OfferError::NoVideo(if sections.is_empty() {
            "no m=video line".into()
        } else {
            "every video section is sendonly or inactive".into()
        }));
    }

    let mut h264 = false;
    let mut vp8 = false;
    let mut names: Vec<String> = Vec::new();
    for sec in &receiving {
        for (pt, name) in &sec.rtpmap {
            if !names.contains(name) {
                names.push(name.clone());
            }
            match name.as_str() {
                "VP8" => vp8 = true,
                "H264" => h264 |= h264_usable(sec.fmtp_of(pt)),
                _ => {}
            }
        }
    }
    let mut codecs = Vec::new();
    if h264 {
        codecs.push(Codec::H264);
    }
    if vp8 {
        codecs.push(Codec::Vp8);
    }
    if codecs.is_empty() {
        return Err(OfferError::NoCodec(names.join(", ")));
    }
    let video_mids = receiving.iter().filter_map(|s| s.mid.clone()).collect();
    Ok(OfferedCodecs { codecs, video_mids })
}

#[derive(Debug)]
struct VideoSection {
    receives: bool,
    mid: Option<String>,
    rtpmap: Vec<(String, String)>,
    fmtp: Vec<(String, String)>,
}

impl Default for VideoSection {
    fn default() -> Self {
        VideoSection {
            receives: true,
            mid: None,
            rtpmap: Vec::new(),
            fmtp: Vec::new(),
        }
    }
}

impl VideoSection {
    fn fmtp_of(&self, pt: &str) -> &str {
        self.fmtp
            .iter()
            .find(|(p, _)| p == pt)
            .map(|(_, f)| f.as_str())
            .unwrap_or("")
    }
}

fn h264_usable(fmtp: &str) -> bool {
    let mut mode1 = false;
    let mut baseline = false;
    for kv in fmtp.split(';') {
        let Some((k, v)) = kv.trim().split_once('=') else {
            continue;
        };
        match k.trim().to_ascii_lowercase().as_str() {
            "packetization-mode" => mode1 = v.trim() == "1",
            "profile-level-id" => {
                baseline = u32::from_str_radix(v.trim(), 16).is_ok_and(|p| p >> 16 == 0x42)
            }
            _ => {}
        }
    }
    mode1 && baseline
}

/// Codecs every viewer of a session can decode, once `offered` joins the
/// viewers whose common set is `common` (None: the first viewer). The first
/// entry is the codec the session streams; H.264 stays preferred while all
/// support it. Refuses a viewer that shares no codec with the others.
pub fn common_codecs(
    common: Option<&[Codec]>,
    offered: &OfferedCodecs,
) -> Result<Vec<Codec>, OfferError> {
    let Some(common) = common else {
        return Ok(offered.codecs.clone());
    };
    let joint: Vec<Codec> = common
        .iter()
        .copied()
        .filter(|c| offered.supports(*c))
        .collect();
    if joint.is_empty() {
        return Err(OfferError::CodecMismatch {
            session: common.first().copied().unwrap_or(Codec::H264),
            offered: offered.codecs.clone(),
        });
    }
    Ok(joint)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: &str = include_str!("../tests/fixtures/chromium-offer-default.sdp");
    const VP8: &str = include_str!("../tests/fixtures/chromium-offer-vp8.sdp");
    const NOCODEC: &str = include_str!("../tests/fixtures/chromium-offer-nocodec.sdp");

    #[test]
    fn chromium_default_offer_prefers_h264() {
        let c = offered_codecs(DEFAULT).unwrap();
        assert_eq!(c.codecs, vec![Codec::H264, Codec::Vp8]);
        assert_eq!(c.preferred(), Some(Codec::H264));
        assert_eq!(c.video_mids, vec!["0".to_string()]);
    }

    #[test]
    fn chromium_vp8_only_offer_gets_vp8() {
        let c = offered_codecs(VP8).unwrap();
        assert_eq!(c.codecs, vec![Codec::Vp8]);
    }

    #[test]
    fn chromium_offer_without_usable_codec_is_refused_naming_what_it_had() {
        let err = offered_codecs(NOCODEC).unwrap_err();
        match err {
            OfferError::NoCodec(names) => {
                assert!(names.contains("VP9"), "{names}");
                assert!(names.contains("AV1"), "{names}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn errors_map_to_http_statuses() {
        assert_eq!(OfferError::BadSdp("x".into()).http_status(), 400);
        assert_eq!(OfferError::NoCodec("VP9".into()).http_status(), 400);
        assert_eq!(OfferError::BadSession("x".into()).http_status(), 404);
        let busy = OfferError::TooManyViewers {
            session: "s".into(),
            max: 1,
        };
        assert_eq!(busy.http_status(), 409);
        assert_eq!(OfferError::Stopped.http_status(), 503);
    }

    #[test]
    fn h264_needs_packetization_mode_1_and_baseline() {
        let with = |fmtp: &str| {
            format!(
                "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 102\r\na=rtpmap:102 H264/90000\r\na=fmtp:102 {fmtp}\r\n"
            )
        };
        let ok = with("level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f");
        assert_eq!(offered_codecs(&ok).unwrap().codecs, vec![Codec::H264]);
        let mode0 = with("packetization-mode=0;profile-level-id=42e01f");
        assert!(matches!(
            offered_codecs(&mode0),
            Err(OfferError::NoCodec(_))
        ));
        let high = with("packetization-mode=1;profile-level-id=64001f");
        assert!(matches!(offered_codecs(&high), Err(OfferError::NoCodec(_))));
    }

    #[test]
    fn garbage_and_oversized_offers_are_bad_sdp() {
        assert!(matches!(
            offered_codecs("hello"),
            Err(OfferError::BadSdp(_))
        ));
        let big = format!("v=0\r\n{}", "a=x\r\n".repeat(MAX_OFFER_LEN));
        assert!(matches!(offered_codecs(&big), Err(OfferError::BadSdp(_))));
    }

    #[test]
    fn sendonly_or_missing_video_is_no_video() {
        let audio = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n";
        assert!(matches!(offered_codecs(audio), Err(OfferError::NoVideo(_))));
        let sendonly = DEFAULT.replace("a=recvonly", "a=sendonly");
        assert!(matches!(
            offered_codecs(&sendonly),
            Err(OfferError::NoVideo(_))
        ));
    }

    #[test]
    fn viewers_share_a_codec_or_the_newcomer_is_refused() {
        let both = offered_codecs(DEFAULT).unwrap();
        let vp8 = offered_codecs(VP8).unwrap();
        let h264 = OfferedCodecs {
            codecs: vec![Codec::H264],
            video_mids: vec!["0".into()],
        };
        assert_eq!(
            common_codecs(None, &both).unwrap(),
            vec![Codec::H264, Codec::Vp8]
        );
        // A VP8-only viewer moves the session to VP8, which everyone decodes.
        assert_eq!(
            common_codecs(Some(&[Codec::H264, Codec::Vp8]), &vp8).unwrap(),
            vec![Codec::Vp8]
        );
        assert_eq!(
            common_codecs(Some(&[Codec::Vp8]), &both).unwrap(),
            vec![Codec::Vp8]
        );
        assert!(matches!(
            common_codecs(Some(&[Codec::Vp8]), &h264),
            Err(OfferError::CodecMismatch {
                session: Codec::Vp8,
                ..
            })
        ));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;
        use sandcast_proto::testing::{mutated, mutated_lines};

        /// Lines an offer's video sections are made of, with payload types
        /// and parameters that matter to the pre-scan.
        const LINES: &[&str] = &[
            "m=video 9 UDP/TLS/RTP/SAVPF 96 102",
            "m=audio 9 UDP/TLS/RTP/SAVPF 111",
            "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
            "a=rtpmap:96 VP8/90000",
            "a=rtpmap:102 H264/90000",
            "a=rtpmap:102 h264",
            "a=rtpmap:103 VP9/90000",
            "a=rtpmap:",
            "a=rtpmap:102",
            "a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
            "a=fmtp:102 packetization-mode=1;profile-level-id=64001f",
            "a=fmtp:102 packetization-mode=1;profile-level-id=zz",
            "a=fmtp:102 packetization-mode=1;profile-level-id=ffffffffffffffffffff",
            "a=fmtp:102 ;;==;packetization-mode",
            "a=fmtp:",
            "a=mid:0",
            "a=mid:",
            "a=sendonly",
            "a=recvonly",
            "a=inactive",
            "",
        ];

        /// What an accepted offer promises the hub.
        fn is_consistent(sdp: &str) -> Result<(), TestCaseError> {
            if let Ok(c) = offered_codecs(sdp) {
                prop_assert!(sdp.len() <= MAX_OFFER_LEN);
                prop_assert!(!c.codecs.is_empty());
                prop_assert!(c.codecs.len() <= 2);
                prop_assert_ne!(c.codecs.first(), c.codecs.get(1));
                prop_assert_eq!(c.preferred(), c.codecs.first().copied());
                if c.supports(Codec::H264) {
                    prop_assert_eq!(c.preferred(), Some(Codec::H264));
                }
            }
            Ok(())
        }

        proptest! {
            #[test]
            fn arbitrary_text_never_panics(text in any::<String>()) {
                is_consistent(&text)?;
                is_consistent(&format!("v=0\r\n{text}"))?;
            }

            #[test]
            fn offers_of_random_lines_never_panic(
                lines in prop::collection::vec(prop::sample::select(LINES), 0..40),
                crlf in any::<bool>(),
            ) {
                let eol = if crlf { "\r\n" } else { "\n" };
                let sdp = format!("v=0{eol}{}", lines.join(eol));
                is_consistent(&sdp)?;
            }

            #[test]
            fn mutated_real_offers_never_panic(
                bytes in prop_oneof![Just(DEFAULT), Just(VP8), Just(NOCODEC)]
                    .prop_flat_map(|o| mutated(o.as_bytes().to_vec())),
                lines in prop_oneof![Just(DEFAULT), Just(VP8), Just(NOCODEC)]
                    .prop_flat_map(mutated_lines),
            ) {
                is_consistent(&String::from_utf8_lossy(&bytes))?;
                is_consistent(&lines)?;
            }
        }
    }
}
