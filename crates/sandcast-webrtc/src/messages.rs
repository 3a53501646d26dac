//! Data-channel messages between a viewer and the gateway.
//!
//! Viewer to gateway, on the ordered reliable channel `input` (and, for
//! pointer moves, optionally the unordered unreliable channel
//! `input-unreliable`): JSON objects tagged by `kind`, either a
//! [`sandcast_proto::InputEvent`] (`{"kind":"pointer_move","x":1,"y":2}`) or
//! `{"kind":"clipboard","text":..}` / `{"kind":"resize","width":..,"height":..}`
//! / `{"kind":"choose_files","chooser":..,"names":[..]}`.
//!
//! Gateway to viewer, on `input`: [`ViewerMessage`] JSON, tagged the same way.

use std::time::{Duration, Instant};

use sandcast_proto::transfer::{MAX_CHOSEN, check_name};
use sandcast_proto::{InputEvent, MAX_TEXT_LEN};
use serde::{Deserialize, Serialize};

/// Largest data-channel message accepted from a viewer. A 64 KiB clipboard
/// text with JSON quoting fits; anything larger is dropped unread.
pub const MAX_MESSAGE_LEN: usize = 96 * 1024;

/// Smallest display a viewer may ask for.
pub const MIN_DISPLAY: u32 = 200;
/// Largest display width a viewer may ask for.
pub const MAX_DISPLAY_WIDTH: u32 = 3840;
/// Largest display height a viewer may ask for.
pub const MAX_DISPLAY_HEIGHT: u32 = 2160;

/// A valid request from a viewer.
#[derive(Debug, Clone, PartialEq)]
pub enum ViewerRequest {
    /// Input for the remote display.
    Input(InputEvent),
    /// The viewer's clipboard changed (paste into the remote).
    Clipboard(String),
    /// The viewer's element changed size.
    Resize {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// The answer to a remote file chooser: the names of files the viewer
    /// uploaded to `~/Uploads` (checked plain names; none: cancelled).
    ChooseFiles {
        /// The chooser from [`ViewerMessage::FileChooser`].
        chooser: u64,
        /// File names in `~/Uploads`.
        names: Vec<String>,
    },
}

/// Why a viewer message was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// Larger than [`MAX_MESSAGE_LEN`].
    #[error("message of {0} bytes exceeds {MAX_MESSAGE_LEN} bytes")]
    TooLarge(usize),
    /// Not JSON of a known kind.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Parsed, but a value is out of range.
    #[error("invalid message: {0}")]
    Invalid(String),
}

#[derive(Deserialize)]
struct Kind<'a> {
    #[serde(borrow)]
    kind: std::borrow::Cow<'a, str>,
}

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum Extra {
    Clipboard { text: String },
    Resize { width: u32, height: u32 },
    ChooseFiles { chooser: u64, names: Vec<String> },
}

/// Parses and validates one viewer message.
pub fn parse_viewer_message(data: &[u8]) -> Result<ViewerRequest, MessageError> {
    if data.len() > MAX_MESSAGE_LEN {
        return Err(MessageError::TooLarge(data.len()));
    }
    let kind: Kind =
        serde_json::from_slice(data).map_err(|e| MessageError::Malformed(e.to_string()))?;
    let req = match kind.kind.as_ref() {
        "clipboard" | "resize" | "choose_files" => {
            match serde_json::from_slice(data)
                .map_err(|e| MessageError::Malformed(e.to_string()))?
            {
                Extra::Clipboard { text } => {
                    if text.len() > MAX_TEXT_LEN {
                        return Err(MessageError::Invalid(format!(
                            "clipboard text of {} bytes exceeds {MAX_TEXT_LEN}",
                            text.len()
                        )));
                    }
                    ViewerRequest::Clipboard(text)
                }
                Extra::Resize { width, height } => {
                    if !(MIN_DISPLAY..=MAX_DISPLAY_WIDTH).contains(&width)
                        || !(MIN_DISPLAY..=MAX_DISPLAY_HEIGHT).contains(&height)
                    {
                        return Err(MessageError::Invalid(format!(
                            "resize to {width}x{height} is outside {MIN_DISPLAY}x{MIN_DISPLAY}..{MAX_DISPLAY_WIDTH}x{MAX_DISPLAY_HEIGHT}"
                        )));
                    }
                    ViewerRequest::Resize { width, height }
                }
                Extra::ChooseFiles { chooser, names } => {
                    if names.len() > MAX_CHOSEN {
                        return Err(MessageError::Invalid(format!(
                            "{} files chosen; at most {MAX_CHOSEN}",
                            names.len()
                        )));
                    }
                    for n in &names {
                        check_name(n).map_err(MessageError::Invalid)?;
                    }
                    ViewerRequest::ChooseFiles { chooser, names }
                }
            }
        }
        _ => {
            let ev: InputEvent =
                serde_json::from_slice(data).map_err(|e| MessageError::Malformed(e.to_string()))?;
            ev.validate()
                .map_err(|e| MessageError::Invalid(e.to_string()))?;
            ViewerRequest::Input(ev)
        }
    };
    Ok(req)
}

/// A message from the gateway to a viewer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ViewerMessage {
    /// The remote clipboard changed (copy in the remote browser).
    Clipboard {
        /// New clipboard text.
        text: String,
    },
    /// The remote display's size, for mapping pointer coordinates.
    DisplaySize {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// The session's state, in words the viewer may show.
    SessionState {
        /// Short state name, such as `running` or `ended`.
        state: String,
        /// Why, when there is a reason to give.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Whether this viewer's input is used.
    Control {
        /// True when this viewer drives the session.
        granted: bool,
    },
    /// Whether an editable element of the remote page has the keyboard
    /// focus, and where its bottom-left corner is on the display: a touch
    /// viewer opens its on-screen keyboard and puts an input method's
    /// window there. Reported by the page: a hint.
    Focus {
        /// An editable element has the focus.
        editable: bool,
        /// Its left edge in display pixels.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        x: Option<u32>,
        /// Its bottom edge in display pixels.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        y: Option<u32>,
    },
    /// The remote browser finished a download into the session's
    /// `~/Downloads`; the viewer offers it at `/viewer/{id}/downloads/{name}`.
    /// The page chose the name: a checked plain name, shown as text only.
    Download {
        /// The file's name.
        name: String,
        /// Its size in bytes, as the browser counted it.
        size: u64,
    },
    /// The remote page opened a file chooser: the viewer asks its person for
    /// files, uploads them and answers with `choose_files`.
    FileChooser {
        /// Which chooser, to name in the answer.
        chooser: u64,
        /// The input accepts several files.
        multiple: bool,
    },
    /// Automation clients (CDP) connected to the session, and whether their
    /// input is paused because the person took control: the viewer offers
    /// to take over while a program drives, and to give control back.
    Automation {
        /// Automation clients connected now.
        clients: u32,
        /// The person holds control: automation input is refused.
        paused: bool,
    },
}

impl ViewerMessage {
    /// Checks what the session sends viewers against the limits viewers
    /// are held to: the session (its agent included) is not trusted, and a
    /// viewer that reads nothing has up to 256 messages queued.
    pub fn check(&self) -> Result<(), MessageError> {
        match self {
            ViewerMessage::Clipboard { text } if text.len() > MAX_TEXT_LEN => {
                Err(MessageError::Invalid(format!(
                    "clipboard text of {} bytes exceeds {MAX_TEXT_LEN}",
                    text.len()
                )))
            }
            ViewerMessage::Focus { x, y, .. }
                if [x, y]
                    .iter()
                    .any(|v| v.is_some_and(|v| v > sandcast_proto::MAX_COORD as u32)) =>
            {
                Err(MessageError::Invalid(
                    "focus position outside the largest display".into(),
                ))
            }
            ViewerMessage::Download { name, .. } => {
                check_name(name).map_err(|e| MessageError::Invalid(format!("download: {e}")))
            }
            _ => Ok(()),
        }
    }
}

/// Token bucket limiting how many messages a viewer may send.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

/// Default sustained message rate per viewer: pointer moves at a 240 Hz
/// display plus typing fit comfortably.
pub const DEFAULT_RATE_PER_SECOND: u32 = 500;
/// Default burst per viewer.
pub const DEFAULT_BURST: u32 = 1000;

impl RateLimiter {
    /// `per_second` messages sustained, `burst` at once.
    pub fn new(per_second: u32, burst: u32) -> Self {
        RateLimiter {
            per_second: f64::from(per_second),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: None,
        }
    }

    /// True when a message arriving at `now` is within the rate.
    pub fn allow(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.per_second).min(self.burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter::new(DEFAULT_RATE_PER_SECOND, DEFAULT_BURST)
    }
}

/// Shortest time the rate limiter needs to refill one token, for docs and tests.
pub fn refill_time(per_second: u32) -> Duration {
    Duration::from_secs_f64(1.0 / f64::from(per_second.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandcast_proto::PointerButton;

    #[test]
    fn parses_input_clipboard_and_resize() {
        assert_eq!(
            parse_viewer_message(br#"{"kind":"pointer_move","x":10,"y":20}"#),
            Ok(ViewerRequest::Input(InputEvent::PointerMove {
                x: 10,
                y: 20
            }))
        );
        assert_eq!(
            parse_viewer_message(br#"{"kind":"pointer_button","button":"left","down":true}"#),
            Ok(ViewerRequest::Input(InputEvent::PointerButton {
                button: PointerButton::Left,
                down: true
            }))
        );
        assert_eq!(
            parse_viewer_message(r#"{"kind":"clipboard","text":"hällo"}"#.as_bytes()),
            Ok(ViewerRequest::Clipboard("hällo".into()))
        );
        assert_eq!(
            parse_viewer_message(br#"{"kind":"resize","width":1280,"height":720}"#),
            Ok(ViewerRequest::Resize {
                width: 1280,
                height: 720
            })
        );
    }

    #[test]
    fn malformed_messages_are_errors_naming_the_problem() {
        for bad in [
            &b"not json"[..],
            br#"{"x":1}"#,
            br#"{"kind":"teleport"}"#,
            br#"{"kind":"pointer_move","x":"1","y":2}"#,
            br#"{"kind":"resize","width":800}"#,
            br#"{"kind":"clipboard","text":"a","extra":1}"#,
        ] {
            assert!(
                matches!(parse_viewer_message(bad), Err(MessageError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn out_of_range_values_are_invalid() {
        let err = parse_viewer_message(br#"{"kind":"pointer_move","x":-5,"y":2}"#).unwrap_err();
        assert!(
            matches!(&err, MessageError::Invalid(m) if m.contains("-5")),
            "{err}"
        );
        let err =
            parse_viewer_message(br#"{"kind":"resize","width":100000,"height":720}"#).unwrap_err();
        assert!(
            matches!(&err, MessageError::Invalid(m) if m.contains("100000")),
            "{err}"
        );
        let long = format!(
            r#"{{"kind":"clipboard","text":"{}"}}"#,
            "a".repeat(MAX_TEXT_LEN + 1)
        );
        assert!(matches!(
            parse_viewer_message(long.as_bytes()),
            Err(MessageError::Invalid(_))
        ));
    }

    #[test]
    fn a_file_choice_names_plain_files_only() {
        assert_eq!(
            parse_viewer_message(
                br#"{"kind":"choose_files","chooser":4,"names":["a.txt","b c.pdf"]}"#
            ),
            Ok(ViewerRequest::ChooseFiles {
                chooser: 4,
                names: vec!["a.txt".into(), "b c.pdf".into()]
            })
        );
        // No names: cancelled.
        assert_eq!(
            parse_viewer_message(br#"{"kind":"choose_files","chooser":4,"names":[]}"#),
            Ok(ViewerRequest::ChooseFiles {
                chooser: 4,
                names: vec![]
            })
        );
        for bad in [
            r#"{"kind":"choose_files","chooser":4,"names":["../x"]}"#,
            r#"{"kind":"choose_files","chooser":4,"names":["a/b"]}"#,
            r#"{"kind":"choose_files","chooser":4,"names":[".."]}"#,
            r#"{"kind":"choose_files","chooser":4,"names":[""]}"#,
            r#"{"kind":"choose_files","chooser":4,"names":["a\nb"]}"#,
        ] {
            assert!(
                matches!(
                    parse_viewer_message(bad.as_bytes()),
                    Err(MessageError::Invalid(_))
                ),
                "{bad}"
            );
        }
        let many = format!(
            r#"{{"kind":"choose_files","chooser":1,"names":[{}]}}"#,
            vec![r#""a""#; MAX_CHOSEN + 1].join(",")
        );
        assert!(matches!(
            parse_viewer_message(many.as_bytes()),
            Err(MessageError::Invalid(m)) if m.contains("at most")
        ));
        assert!(matches!(
            parse_viewer_message(br#"{"kind":"choose_files","names":["a"]}"#),
            Err(MessageError::Malformed(_))
        ));
    }

    #[test]
    fn a_download_for_viewers_has_a_plain_name() {
        let ok = ViewerMessage::Download {
            name: "report (1).pdf".into(),
            size: 10,
        };
        assert_eq!(ok.check(), Ok(()));
        assert_eq!(
            serde_json::to_string(&ok).unwrap(),
            r#"{"kind":"download","name":"report (1).pdf","size":10}"#
        );
        let long = "a".repeat(300);
        for bad in ["../../etc/passwd", "a/b", "", "..", "x\r\n", long.as_str()] {
            let m = ViewerMessage::Download {
                name: bad.to_string(),
                size: 1,
            };
            assert!(m.check().is_err(), "{bad:?}");
        }
        let chooser = ViewerMessage::FileChooser {
            chooser: 2,
            multiple: false,
        };
        assert_eq!(
            serde_json::to_string(&chooser).unwrap(),
            r#"{"kind":"file_chooser","chooser":2,"multiple":false}"#
        );
    }

    #[test]
    fn oversized_messages_are_refused_unread() {
        let big = vec![b'{'; MAX_MESSAGE_LEN + 1];
        assert_eq!(
            parse_viewer_message(&big),
            Err(MessageError::TooLarge(MAX_MESSAGE_LEN + 1))
        );
    }

    #[test]
    fn clipboard_text_for_viewers_is_held_to_the_limit() {
        // An agent sending 1 MiB of clipboard text had it queued for every
        // viewer as it was.
        let long = ViewerMessage::Clipboard {
            text: "a".repeat(MAX_TEXT_LEN + 1),
        };
        assert!(matches!(long.check(), Err(MessageError::Invalid(m)) if m.contains("65537")));
        let ok = ViewerMessage::Clipboard {
            text: "a".repeat(MAX_TEXT_LEN),
        };
        assert_eq!(ok.check(), Ok(()));
    }

    #[test]
    fn server_messages_are_tagged_json() {
        let json = serde_json::to_string(&ViewerMessage::DisplaySize {
            width: 1280,
            height: 720,
        })
        .unwrap();
        assert_eq!(json, r#"{"kind":"display_size","width":1280,"height":720}"#);
        let json = serde_json::to_string(&ViewerMessage::SessionState {
            state: "running".into(),
            reason: None,
        })
        .unwrap();
        assert_eq!(json, r#"{"kind":"session_state","state":"running"}"#);
    }

    #[test]
    fn rate_limiter_allows_a_burst_then_the_sustained_rate() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(100, 10);
        let allowed = (0..50).filter(|_| r.allow(t0)).count();
        assert_eq!(allowed, 10);
        // 100 ms later, 10 more tokens.
        let t1 = t0 + Duration::from_millis(100);
        let allowed = (0..50).filter(|_| r.allow(t1)).count();
        assert_eq!(allowed, 10);
        // The bucket never holds more than the burst.
        let t2 = t1 + Duration::from_secs(60);
        let allowed = (0..50).filter(|_| r.allow(t2)).count();
        assert_eq!(allowed, 10);
        assert_eq!(refill_time(100), Duration::from_millis(10));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;
        use sandcast_proto::testing::{json_value, mutated, tagged_object};

        const KINDS: &[&str] = &[
            "pointer_move",
            "pointer_button",
            "wheel",
            "key",
            "text",
            "release_all",
            "clipboard",
            "resize",
            "display_size",
            "choose_files",
            "teleport",
        ];
        const WORDS: &[&str] = &[
            "kind",
            "x",
            "y",
            "dx",
            "dy",
            "button",
            "down",
            "code",
            "key",
            "text",
            "width",
            "height",
            "left",
            "middle",
            "right",
            "names",
            "chooser",
            "a.txt",
            "../x",
            "back",
            "forward",
            "KeyA",
            "a",
            "ä",
            "Enter",
            "clipboard",
            "resize",
            "wheel",
        ];
        const VALID: &[&str] = &[
            r#"{"kind":"pointer_move","x":10,"y":20}"#,
            r#"{"kind":"pointer_button","button":"left","down":true}"#,
            r#"{"kind":"wheel","dx":-120,"dy":53}"#,
            r#"{"kind":"key","code":"KeyA","key":"a","down":false}"#,
            r#"{"kind":"text","text":"hällo"}"#,
            r#"{"kind":"release_all"}"#,
            r#"{"kind":"clipboard","text":"copied"}"#,
            r#"{"kind":"resize","width":1280,"height":720}"#,
            r#"{"kind":"choose_files","chooser":1,"names":["a.txt"]}"#,
        ];

        /// What every accepted message holds, whatever it was made of.
        fn holds_its_limits(data: &[u8]) -> Result<(), TestCaseError> {
            match parse_viewer_message(data) {
                Ok(ViewerRequest::Input(ev)) => {
                    prop_assert!(data.len() <= MAX_MESSAGE_LEN);
                    prop_assert_eq!(ev.validate(), Ok(()));
                }
                Ok(ViewerRequest::Clipboard(text)) => prop_assert!(text.len() <= MAX_TEXT_LEN),
                Ok(ViewerRequest::Resize { width, height }) => {
                    prop_assert!((MIN_DISPLAY..=MAX_DISPLAY_WIDTH).contains(&width));
                    prop_assert!((MIN_DISPLAY..=MAX_DISPLAY_HEIGHT).contains(&height));
                }
                Ok(ViewerRequest::ChooseFiles { names, .. }) => {
                    prop_assert!(names.len() <= MAX_CHOSEN);
                    for n in &names {
                        prop_assert_eq!(check_name(n), Ok(()));
                    }
                }
                Err(MessageError::TooLarge(n)) => prop_assert!(n > MAX_MESSAGE_LEN),
                Err(_) => {}
            }
            Ok(())
        }

        proptest! {
            #[test]
            fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..4096)) {
                holds_its_limits(&data)?;
            }

            #[test]
            fn arbitrary_json_never_panics(v in json_value(WORDS)) {
                holds_its_limits(&serde_json::to_vec(&v).unwrap())?;
            }

            #[test]
            fn tagged_json_is_accepted_only_within_limits(v in tagged_object("kind", KINDS, WORDS)) {
                holds_its_limits(&serde_json::to_vec(&v).unwrap())?;
            }

            #[test]
            fn mutated_valid_messages_never_panic(
                data in prop::sample::select(VALID).prop_flat_map(|m| mutated(m.as_bytes().to_vec()))
            ) {
                holds_its_limits(&data)?;
            }
        }
    }
}
