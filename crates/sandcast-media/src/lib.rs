//! Screen capture, video encoding, input injection, clipboard and resize on
//! the session's X display.
//!
//! This is the media half of the sandcast agent. Everything talks to the X
//! server directly over the X protocol (x11rb):
//!
//! - [`VideoPipeline`]: a thread that sleeps on the X connection until the
//!   Damage extension reports a change, captures the screen through MIT-SHM,
//!   converts BGRA to I420 and encodes H.264 (openh264) or VP8 (libvpx). The
//!   newest frame wins: the pipeline never queues encoded frames, it captures
//!   again only once the previous frame was taken ([`FrameReceiver`]).
//! - [`InputInjector`]: validated, rate-limited XTest injection of pointer,
//!   wheel, keys and text, binding spare key codes for keysyms the current
//!   keyboard map lacks.
//! - [`Clipboard`]: the session's CLIPBOARD and PRIMARY selections both ways.
//! - [`resize_display`]: RandR screen resize with the top-level windows
//!   following.
//!
//! An idle display costs nothing: every thread blocks on its X connection.
//!
//! ```no_run
//! use sandcast_media::{Clipboard, InputInjector, VideoPipeline, VideoSettings, resize_display};
//! use sandcast_proto::{Codec, InputEvent, VideoControl};
//!
//! # async fn agent() -> sandcast_media::Result<()> {
//! // Xvfb started at the largest size a viewer may ask for, so RandR can
//! // shrink and grow it: `Xvfb :99 -screen 0 3840x2160x24`.
//! resize_display(":99", 1280, 720)?;
//! let (pipeline, mut frames) = VideoPipeline::spawn(
//!     ":99",
//!     VideoSettings { codec: Codec::H264, bitrate_bps: 2_500_000, ..VideoSettings::default() },
//! )?;
//! pipeline.control(VideoControl::KeyFrame);
//! let mut input = InputInjector::connect(":99")?;
//! input.apply(&InputEvent::PointerMove { x: 10, y: 20 })?;
//! let clipboard = Clipboard::spawn(":99", |text| println!("copied: {text}"))?;
//! clipboard.set("pasted from the viewer")?;
//! while let Some(frame) = frames.next().await {
//!     // send `frame` on the video connection; slow sends drop, not queue
//!     # let _ = frame;
//! }
//! let stats = pipeline.stats().to_agent_stats(input.dropped());
//! # let _ = stats;
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

mod capture;
mod clipboard;
mod convert;
mod encoder;
mod error;
mod h264;
mod input;
mod keysym;
mod pipeline;
mod resize;
pub mod testdata;
mod vp8;
mod xutil;
pub mod xvfb;

pub use capture::{Capture, CaptureMethod, CapturedFrame};
pub use clipboard::Clipboard;
pub use convert::{I420Frame, bgra_to_i420};
pub use encoder::{EncodedFrame, Encoder, EncoderSettings, KeyFramePolicy, new_encoder};
pub use error::{Error, Result};
pub use h264::{H264Encoder, H264Mode};
pub use input::{InputInjector, RateLimit, WHEEL_PX_PER_CLICK};
pub use keysym::{keysym_for_char, keysym_for_key};
pub use pipeline::{FrameReceiver, PipelineStats, VideoPipeline, VideoSettings};
pub use resize::{MAX_DISPLAY_SIZE, MIN_DISPLAY_SIZE, resize_display};
pub use vp8::Vp8Encoder;
