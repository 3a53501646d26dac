//! One error type for the crate.

use x11rb::errors::{ConnectError, ConnectionError, ReplyError, ReplyOrIdError};

/// Everything that can go wrong on the display or in an encoder.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The X display could not be opened.
    #[error("cannot connect to X display {display:?}: {source}")]
    Connect {
        /// The display name asked for.
        display: String,
        /// Why.
        source: ConnectError,
    },
    /// The X connection broke.
    #[error("X connection: {0}")]
    Connection(#[from] ConnectionError),
    /// The X server refused a request.
    #[error("X request failed: {0}")]
    Reply(#[from] ReplyError),
    /// The X server refused a request or ran out of ids.
    #[error("X request failed: {0}")]
    ReplyOrId(#[from] ReplyOrIdError),
    /// The X server lacks an extension sandcast needs.
    #[error("the X server lacks the {0} extension")]
    MissingExtension(&'static str),
    /// A size outside what sandcast accepts.
    #[error(
        "display size {width}x{height} is outside {min_width}x{min_height} to {max_width}x{max_height}"
    )]
    BadSize {
        /// Width asked for.
        width: u32,
        /// Height asked for.
        height: u32,
        /// Smallest width accepted.
        min_width: u32,
        /// Smallest height accepted.
        min_height: u32,
        /// Largest width accepted.
        max_width: u32,
        /// Largest height accepted.
        max_height: u32,
    },
    /// The X server cannot do what was asked (resize, key binding).
    #[error("{0}")]
    Unsupported(String),
    /// An encoder failed.
    #[error("{codec} encoder: {message}")]
    Encoder {
        /// Which codec.
        codec: &'static str,
        /// What it said.
        message: String,
    },
    /// An input event was refused by validation.
    #[error("input refused: {0}")]
    BadInput(#[from] sandcast_proto::InputError),
    /// An input event was refused by the rate limit.
    #[error("input refused: more than {burst} events at {per_second}/s")]
    RateLimited {
        /// Sustained rate allowed.
        per_second: u32,
        /// Burst allowed.
        burst: u32,
    },
    /// A key name or character with no keysym.
    #[error("no keysym for key {key:?} (code {code:?})")]
    UnknownKey {
        /// The `key` value.
        key: String,
        /// The `code` value.
        code: String,
    },
    /// A background thread is gone.
    #[error("the {0} thread has stopped")]
    Stopped(&'static str),
    /// An operating-system call failed.
    #[error("{what}: {source}")]
    Os {
        /// What was attempted.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn encoder(codec: &'static str, message: impl Into<String>) -> Self {
        Error::Encoder {
            codec,
            message: message.into(),
        }
    }

    pub(crate) fn os(what: &'static str) -> Self {
        Error::Os {
            what,
            source: std::io::Error::last_os_error(),
        }
    }
}
