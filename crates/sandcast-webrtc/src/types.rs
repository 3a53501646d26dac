//! Public types of the gateway's API.

use std::fmt;

use sandcast_proto::{Codec, InputEvent, Message, VideoControl};

use crate::messages::ViewerRequest;
use serde::{Deserialize, Serialize};

/// Identifies one viewer connection, unique for the gateway's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ViewerId(pub u64);

impl fmt::Display for ViewerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// How a viewer may interact with its session.
///
/// `control: true` lets the viewer drive the session always (shared
/// control). With `false` the viewer drives it only while no other viewer
/// does: the first viewer of a session controls it, later ones watch, and
/// control passes on when the controlling viewer leaves.
///
/// `view_only: true` (a `view` token's viewer) gets the stream and the
/// session's messages but never control: its input, clipboard, resize and
/// file-chooser answers are dropped and counted, whatever `control` says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewerOptions {
    /// Always in control, alongside any others.
    #[serde(default)]
    pub control: bool,
    /// Never in control: watches only.
    #[serde(default)]
    pub view_only: bool,
}

/// The answer to a viewer's offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// The new viewer.
    pub viewer_id: ViewerId,
    /// SDP answer for the viewer's `setRemoteDescription`.
    pub sdp: String,
}

/// Where a viewer's connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ViewerState {
    /// Offer answered; ICE and DTLS under way.
    Connecting,
    /// Media can flow.
    Connected,
    /// The viewer went away or was closed.
    Closed,
}

/// Counters kept per viewer; bad input is dropped and counted, never fatal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewerCounters {
    /// Data-channel messages accepted.
    pub messages_accepted: u64,
    /// Data-channel messages dropped (malformed, invalid, oversized, over the
    /// rate, or from a viewer not in control).
    pub messages_dropped: u64,
    /// Of the dropped: larger than the size cap.
    pub messages_oversized: u64,
    /// Of the dropped: over the rate limit.
    pub messages_rate_limited: u64,
    /// Of the dropped: valid, but the viewer is not in control.
    pub messages_not_in_control: u64,
    /// Of those not in control: the viewer is view-only (never in control).
    pub messages_view_only: u64,
    /// Video frames handed to the packetiser.
    pub frames_sent: u64,
    /// Video frames skipped (waiting for a key frame, codec not negotiated).
    pub frames_skipped: u64,
    /// PLI and FIR received.
    pub key_frame_requests: u64,
    /// Last round-trip time from receiver reports, in milliseconds.
    pub rtt_ms: u32,
    /// Of the frames sent: key frames.
    pub key_frames_sent: u64,
    /// Encoded bytes of the frames sent (before RTP packetisation).
    pub bytes_sent: u64,
    /// Fraction of packets lost in the last receiver report, in thousandths.
    pub loss_permille: u32,
    /// The bitrate the loss controller asks of the encoder for this viewer.
    pub target_bitrate_bps: u32,
    /// Freezes: frames were made but none sent to this viewer for longer
    /// than [`crate::freeze::FREEZE_AFTER`].
    pub freezes: u64,
    /// Their total length, in milliseconds.
    pub freeze_ms: u64,
}

/// What the gateway tells the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GatewayEvent {
    /// A session's first viewer arrived, or its codec changed: start the
    /// encoder with this codec (`VideoControl::Start`).
    VideoWanted {
        /// Session id.
        session: String,
        /// Codec every viewer decodes.
        codec: Codec,
        /// Initial target bitrate.
        bitrate_bps: u32,
    },
    /// The session's last viewer left: stop the encoder.
    VideoUnwanted {
        /// Session id.
        session: String,
    },
    /// A viewer needs a key frame (new viewer, PLI, FIR); rate-limited.
    KeyFrameWanted {
        /// Session id.
        session: String,
    },
    /// New target bitrate: the minimum over the session's viewers, clamped.
    Bitrate {
        /// Session id.
        session: String,
        /// Bits per second.
        bps: u32,
    },
    /// Input from a viewer in control, validated.
    Input {
        /// Session id.
        session: String,
        /// Which viewer sent it.
        viewer: ViewerId,
        /// The event.
        event: InputEvent,
    },
    /// A viewer in control pasted text.
    Clipboard {
        /// Session id.
        session: String,
        /// The text.
        text: String,
    },
    /// A viewer in control changed size; the display should follow.
    Resize {
        /// Session id.
        session: String,
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// A viewer in control answered a file chooser with files it uploaded
    /// (checked plain names in `~/Uploads`; none: cancelled).
    ChooseFiles {
        /// Session id.
        session: String,
        /// The chooser answered.
        chooser: u64,
        /// File names in `~/Uploads`.
        names: Vec<String>,
    },
    /// A viewer's connection changed state.
    ViewerState {
        /// Session id.
        session: String,
        /// The viewer.
        viewer: ViewerId,
        /// Its new state.
        state: ViewerState,
    },
}

impl GatewayEvent {
    /// What a viewer's valid request becomes for the server.
    pub fn from_request(session: String, viewer: ViewerId, req: ViewerRequest) -> GatewayEvent {
        match req {
            ViewerRequest::Input(event) => GatewayEvent::Input {
                session,
                viewer,
                event,
            },
            ViewerRequest::Clipboard(text) => GatewayEvent::Clipboard { session, text },
            ViewerRequest::Resize { width, height } => GatewayEvent::Resize {
                session,
                width,
                height,
            },
            ViewerRequest::ChooseFiles { chooser, names } => GatewayEvent::ChooseFiles {
                session,
                chooser,
                names,
            },
        }
    }

    /// The agent-channel message that carries this event to the session's
    /// agent, for the events the agent acts on.
    pub fn to_agent_message(&self) -> Option<Message> {
        Some(match self {
            GatewayEvent::VideoWanted {
                codec, bitrate_bps, ..
            } => Message::Video(VideoControl::Start {
                codec: *codec,
                bitrate_bps: *bitrate_bps,
            }),
            GatewayEvent::VideoUnwanted { .. } => Message::Video(VideoControl::Stop),
            GatewayEvent::KeyFrameWanted { .. } => Message::Video(VideoControl::KeyFrame),
            GatewayEvent::Bitrate { bps, .. } => {
                Message::Video(VideoControl::Bitrate { bitrate_bps: *bps })
            }
            GatewayEvent::Input { event, .. } => Message::Input(event.clone()),
            GatewayEvent::Clipboard { text, .. } => Message::Clipboard { text: text.clone() },
            GatewayEvent::Resize { width, height, .. } => Message::Resize {
                width: *width,
                height: *height,
            },
            // The server builds the paths: only names it checks again
            // become paths, and only under `~/Uploads`.
            GatewayEvent::ChooseFiles { chooser, names, .. } => Message::ChooseFiles {
                chooser: *chooser,
                paths: names
                    .iter()
                    .filter_map(|n| sandcast_proto::transfer::upload_absolute(n).ok())
                    .collect(),
            },
            GatewayEvent::ViewerState { .. } => return None,
        })
    }

    /// The session the event is about.
    pub fn session(&self) -> &str {
        match self {
            GatewayEvent::VideoWanted { session, .. }
            | GatewayEvent::VideoUnwanted { session }
            | GatewayEvent::KeyFrameWanted { session }
            | GatewayEvent::Bitrate { session, .. }
            | GatewayEvent::Input { session, .. }
            | GatewayEvent::Clipboard { session, .. }
            | GatewayEvent::Resize { session, .. }
            | GatewayEvent::ChooseFiles { session, .. }
            | GatewayEvent::ViewerState { session, .. } => session,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_map_to_agent_messages() {
        let s = || "s".to_string();
        let cases = [
            (
                GatewayEvent::VideoWanted {
                    session: s(),
                    codec: Codec::Vp8,
                    bitrate_bps: 1_000_000,
                },
                Some(Message::Video(VideoControl::Start {
                    codec: Codec::Vp8,
                    bitrate_bps: 1_000_000,
                })),
            ),
            (
                GatewayEvent::VideoUnwanted { session: s() },
                Some(Message::Video(VideoControl::Stop)),
            ),
            (
                GatewayEvent::KeyFrameWanted { session: s() },
                Some(Message::Video(VideoControl::KeyFrame)),
            ),
            (
                // The names become paths under ~/Uploads here, never before.
                GatewayEvent::ChooseFiles {
                    session: s(),
                    chooser: 2,
                    names: vec!["a.txt".into(), "b c".into()],
                },
                Some(Message::ChooseFiles {
                    chooser: 2,
                    paths: vec![
                        "/home/sandcast/Uploads/a.txt".into(),
                        "/home/sandcast/Uploads/b c".into(),
                    ],
                }),
            ),
            (
                GatewayEvent::Bitrate {
                    session: s(),
                    bps: 500_000,
                },
                Some(Message::Video(VideoControl::Bitrate {
                    bitrate_bps: 500_000,
                })),
            ),
            (
                GatewayEvent::Input {
                    session: s(),
                    viewer: ViewerId(1),
                    event: InputEvent::ReleaseAll,
                },
                Some(Message::Input(InputEvent::ReleaseAll)),
            ),
            (
                GatewayEvent::Clipboard {
                    session: s(),
                    text: "t".into(),
                },
                Some(Message::Clipboard { text: "t".into() }),
            ),
            (
                GatewayEvent::Resize {
                    session: s(),
                    width: 800,
                    height: 600,
                },
                Some(Message::Resize {
                    width: 800,
                    height: 600,
                }),
            ),
            (
                GatewayEvent::ViewerState {
                    session: s(),
                    viewer: ViewerId(1),
                    state: ViewerState::Closed,
                },
                None,
            ),
        ];
        for (ev, msg) in cases {
            assert_eq!(ev.session(), "s");
            assert_eq!(ev.to_agent_message(), msg, "{ev:?}");
        }
    }
}
