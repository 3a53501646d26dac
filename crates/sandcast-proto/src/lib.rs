//! The agent channel: how the sandcast server and the agent inside a session talk.
//!
//! The same protocol runs over a Unix socket (sandbox backend) and over vsock
//! (Firecracker backend). It is sans-IO: [`FrameCodec`] turns bytes into
//! [`Frame`]s and back over a `BytesMut`, so it is tested without sockets and
//! driven by `tokio_util::codec::Framed` at the edges.
//!
//! # Wire format
//!
//! Every frame is `u32 big-endian length | u8 kind | payload`, where `length`
//! counts the kind byte and the payload. A frame longer than
//! [`MAX_FRAME_LEN`] is an error: the connection is closed rather than
//! buffering an unbounded amount.
//!
//! Every connection is opened by the agent and starts with a [`Message::Hello`]
//! that names its [`Role`]:
//! - [`Role::Control`]: JSON [`Message`]s both ways (configuration, child
//!   reports, logs, input, clipboard, resize, video control).
//! - [`Role::Video`]: agent-to-server [`Frame::Video`] frames, so bulk video
//!   never delays control messages.
//! - [`Role::Stream`]: after the server's [`Message::Welcome`] the connection is
//!   a plain byte pipe (a tunnel to the session's VNC server, for example).
//!   Each tunnelled stream has its own connection, so the kernel's flow control
//!   applies per stream and a slow viewer never stalls another.
//!
//! Only the agent connects; the server never needs a route into a session.

mod codec;
pub mod files;
mod input;
pub mod keyboard;
mod message;
pub mod policy;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod token;
pub mod transfer;
mod video;

pub use codec::{Frame, FrameCodec, FrameError, MAX_FRAME_LEN, MAX_JSON_LEN, encode_message};
pub use files::{FileOp, FileReply, HomePath};
pub use input::{InputError, InputEvent, MAX_COORD, MAX_TEXT_LEN, PointerButton};
pub use keyboard::KeyboardLayout;
pub use message::*;
pub use policy::BrowserPolicy;
pub use token::{AgentToken, sha256_hex};
pub use video::{Codec, VIDEO_HEADER_LEN, VideoFrame, VideoHeader};

/// Version of this protocol. A peer refuses a `Hello` with another version,
/// naming both, instead of misreading frames.
pub const PROTOCOL_VERSION: u16 = 1;
