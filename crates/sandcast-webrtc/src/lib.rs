//! The WebRTC gateway: one UDP socket (and one ICE-TCP port) for every
//! session and viewer, video out and input back.
//!
//! The agent encodes a session's screen once; the gateway packetises each
//! frame (H.264 constrained baseline or VP8) for every viewer of the session
//! over its own DTLS-SRTP connection, and turns what viewers send (data
//! channel input, clipboard, resize, PLI/FIR, loss reports) into
//! [`GatewayEvent`]s for the server.
//!
//! Layers:
//! - sans-IO and testable without sockets: [`negotiate`] (codecs from the
//!   offer), [`keyframe`] (request rate limiting), [`bitrate`] (loss-based
//!   rate, clamping), [`messages`] (data-channel parsing, validation, rate
//!   limits) and [`Hub`] (all sessions and viewers, each a str0m `Rtc`
//!   driven as a state machine);
//! - the I/O edge, [`Gateway`]: sockets, timers, the server's handle.
//!
//! # Wiring into the server
//!
//! - `POST /api/webrtc/session/{id}/offer`: [`Gateway::accept_offer`];
//!   answer `{"type":"answer","sdp":..}`, or [`OfferError::http_status`]
//!   with the error's text.
//! - Every [`GatewayEvent`] for a session goes to its agent as
//!   [`GatewayEvent::to_agent_message`]; `ViewerState` is for the session's
//!   record.
//! - Frames from the agent's video connection: [`Gateway::push_frame`]
//!   (never blocks). Clipboard and display size from the agent:
//!   [`Gateway::send_to_viewers`] with [`ViewerMessage`].
//! - Ending a session: [`Gateway::close_session`].
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use sandcast_webrtc::{Gateway, GatewayConfig, ViewerOptions};
//! let gw = Gateway::start(GatewayConfig::default()).await?;
//! let mut events = gw.events().expect("the first taker gets the events");
//! let answer = gw.accept_offer("session-1", "v=0...", ViewerOptions::default()).await?;
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

pub mod bitrate;
pub mod freeze;
mod gateway;
mod hub;
pub mod keyframe;
pub mod messages;
pub mod negotiate;
mod peer;
mod types;

pub use gateway::{Gateway, GatewayConfig, GatewayError};
pub use hub::{Hub, HubConfig, MAX_SESSION_ID_LEN, SILENT_CONTROLLER, check_session_id};
pub use messages::{
    MAX_MESSAGE_LEN, RateLimiter, ViewerMessage, ViewerRequest, parse_viewer_message,
};
pub use negotiate::OfferError;
pub use peer::{INPUT_CHANNEL, UNRELIABLE_CHANNEL};
pub use types::{Answer, GatewayEvent, ViewerCounters, ViewerId, ViewerOptions, ViewerState};
