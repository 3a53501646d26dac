//! Control messages.
//!
//! Readers are tolerant: fields added later get defaults, so an agent built
//! from an older image keeps working with a newer server of the same
//! [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION).

use serde::{Deserialize, Serialize};

use crate::files::FileOp;
use crate::input::InputEvent;
use crate::token::AgentToken;
use crate::video::Codec;

/// What a connection is for; named in its [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The session's one control connection.
    Control,
    /// Encoded video from the agent.
    Video,
    /// The agent's side of a tunnelled stream the server asked for with
    /// [`Message::OpenStream`].
    Stream {
        /// The id from `OpenStream`.
        id: u64,
    },
}

/// First message on every connection, from the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The agent's [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION).
    pub protocol: u16,
    /// What this connection carries.
    pub role: Role,
    /// The agent's build version, for the session's record.
    #[serde(default)]
    pub agent_version: String,
}

/// A control message. Direction is noted on each variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Agent → server: opens every connection.
    Hello(Hello),
    /// Server → agent: the hello is accepted. On a stream connection, raw
    /// bytes follow.
    Welcome {
        /// The server's protocol version.
        protocol: u16,
    },
    /// Server → agent: the hello is refused; the connection closes.
    Reject {
        /// Why, in words.
        reason: String,
    },
    /// Server → agent: the whole session configuration, sent after `Welcome`
    /// on the control connection.
    Config(Box<SessionConfig>),
    /// Agent → server: a child process changed state.
    Child(ChildReport),
    /// Agent → server: a line of output of a child or of the agent.
    Log(LogLine),
    /// Agent → server: everything the session needs is up (display, browser,
    /// VNC server).
    Ready,
    /// Agent → server: the launch command of a session with
    /// [`SessionConfig::launch_once`] exited, and is not restarted.
    LaunchEnded {
        /// How it ended.
        exit: ExitInfo,
    },
    /// Server → agent: a session started ahead of any request (the warm
    /// pool: a blank page, no launch command) is given to one. The
    /// configuration is the session's own; of it the agent applies the
    /// start URL (opened in a new tab that replaces every other, so no
    /// history of the warm-up is left), the launch command and
    /// `launch_once`; the server claims only sessions whose other settings
    /// are those the pool started with. The server sends `Watched` (true)
    /// before it, so a paused browser runs to open the tab.
    Claim(Box<SessionConfig>),
    /// Agent → server: the claim is applied (the start page's tab is open),
    /// or why it could not be.
    Claimed {
        /// Why the claim failed; none: the session is ready.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Agent → server: the session cannot work; the agent gives up.
    Fatal {
        /// Why, in words, naming the child and its last output.
        reason: String,
    },
    /// Server → agent: open a stream connection with this id to the target.
    OpenStream {
        /// Chosen by the server, unique within the session.
        id: u64,
        /// What to connect the stream to.
        target: StreamTarget,
    },
    /// Server → agent: inject one input event.
    Input(InputEvent),
    /// Both ways: the clipboard's text changed.
    Clipboard {
        /// New clipboard text.
        text: String,
    },
    /// Agent → server: whether an editable element of the page has the
    /// keyboard focus (so a touch viewer opens its on-screen keyboard), and
    /// where its bottom-left corner is on the display. Reported by the
    /// page, so only a hint: never trusted for more than placing a keyboard.
    RemoteFocus {
        /// An editable element has the focus.
        editable: bool,
        /// Its left edge on the display, when editable.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        x: Option<u32>,
        /// Its bottom edge on the display, when editable.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        y: Option<u32>,
    },
    /// Agent → server: the session's browser finished a download into
    /// `~/Downloads` (see [`crate::transfer`]). The page chose the name:
    /// the server checks it with [`crate::transfer::check_name`] before it
    /// tells anyone.
    Download {
        /// The file's name in `~/Downloads`.
        name: String,
        /// Its size in bytes, as the browser counted it.
        size: u64,
    },
    /// Agent → server: a page opened a file chooser; the agent intercepted
    /// it and waits for [`Message::ChooseFiles`] with this `chooser`.
    FileChooser {
        /// The agent's number for this chooser; a later one replaces it.
        chooser: u64,
        /// The input accepts several files.
        multiple: bool,
    },
    /// Server → agent: give the page's waiting file chooser these files
    /// (absolute paths under `/home/sandcast/Uploads`, built by the server
    /// from checked names; the agent checks them again). None: cancelled.
    ChooseFiles {
        /// The chooser this answers.
        chooser: u64,
        /// The files, in the viewer's order.
        paths: Vec<String>,
    },
    /// Server → agent: resize the display (the viewer's size, within limits).
    Resize {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// Agent → server: the display's size now.
    DisplaySize {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// Server → agent: start, change or stop the video stream.
    Video(VideoControl),
    /// Agent → server: counters the agent keeps (dropped input, frames).
    Stats(AgentStats),
    /// Server → agent: whether anyone watches the session (a viewer of
    /// any kind). Unwatched for `pause_unwatched_ms`, the agent pauses the
    /// browser; watched again, it resumes it at once.
    Watched {
        /// Someone watches.
        watched: bool,
    },
    /// Server → agent: stop every child and exit.
    Shutdown,
    /// Either way: liveness probe.
    Ping {
        /// Echoed in the pong.
        seq: u64,
    },
    /// Either way: answer to a ping.
    Pong {
        /// The ping's sequence number.
        seq: u64,
    },
}

/// What a tunnelled stream connects to inside the session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamTarget {
    /// The session's VNC server.
    Vnc,
    /// A file operation in the session's home (see [`crate::files`]).
    File(FileOp),
    /// The browser's DevTools HTTP and WebSocket server on the session's
    /// own loopback, for an automation client the server tunnels.
    Devtools,
}

/// Video control from the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum VideoControl {
    /// Start encoding (or switch codec) at this bitrate.
    Start {
        /// Codec the viewers negotiated.
        codec: Codec,
        /// Target bitrate in bits per second.
        bitrate_bps: u32,
    },
    /// Stop encoding; nobody is watching.
    Stop,
    /// Send a key frame as soon as possible.
    KeyFrame,
    /// Change the target bitrate.
    Bitrate {
        /// Bits per second.
        bitrate_bps: u32,
    },
}

/// Everything the agent needs to run a session. Sent by the server, so
/// nothing depends on the environment or on files written into an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionConfig {
    /// The session's id, for logs.
    pub session_id: String,
    /// Display width in pixels.
    pub width: u32,
    /// Display height in pixels.
    pub height: u32,
    /// Page the browser opens.
    pub start_url: String,
    /// Browser without its own tabs and address bar.
    #[serde(default)]
    pub kiosk: bool,
    /// Optional command run beside the browser (argv; not a shell line).
    #[serde(default)]
    pub launch: Option<Vec<String>>,
    /// The launch command runs once: its exit is reported with
    /// [`Message::LaunchEnded`] instead of restarting it (a login command
    /// whose exit completes the session).
    #[serde(default)]
    pub launch_once: bool,
    /// Browser binary and extra flags.
    pub browser: BrowserConfig,
    /// Restart policy for crashed children.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Highest video frame rate.
    #[serde(default = "default_max_fps")]
    pub max_fps: u32,
    /// How the agent tunes its H.264 encoder.
    #[serde(default)]
    pub h264_tuning: H264Tuning,
    /// The wall-clock time at the server when it sent this, in milliseconds
    /// since the Unix epoch; a microVM restored from a snapshot sets its clock
    /// from it.
    #[serde(default)]
    pub server_time_ms: u64,
    /// The session's agent token. An agent in a microVM checks it against
    /// the hash the backend put in MMDS and refuses the configuration when it
    /// does not match; elsewhere it is carried but not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_token: Option<AgentToken>,
    /// Milliseconds without anyone watching (see [`Message::Watched`])
    /// after which the agent pauses the browser (SIGSTOP of its process
    /// group: no rendering, no CPU); 0 never pauses it. A launch command is
    /// never paused.
    #[serde(default)]
    pub pause_unwatched_ms: u64,
    /// The display's keyboard layout (`de`, `us(intl)`; see
    /// [`crate::KeyboardLayout`]); none keeps Xvfb's US layout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyboard_layout: Option<String>,
    /// Downloads and file choosers reach the viewer: the browser saves
    /// downloads in `~/Downloads` and reports them, and file choosers are
    /// intercepted and answered with the viewer's uploads. Off: neither.
    #[serde(default = "default_transfers")]
    pub transfers: bool,
    /// The largest display a viewer may resize the session to, which is
    /// what Xvfb allocates its framebuffer for (4 bytes a pixel, whatever
    /// the size in use); never below the session's own size. None: the
    /// largest sandcast sets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_max: Option<(u32, u32)>,
}

fn default_transfers() -> bool {
    true
}

fn default_max_fps() -> u32 {
    60
}

/// How H.264 is encoded: the trade between the time a frame takes and the
/// bits scrolling text takes (figures in `docs/encoders.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum H264Tuning {
    /// openh264's camera real-time mode, every picture encoded: a small
    /// change takes about a third of screen mode's time, so a keystroke
    /// reaches the viewer sooner; fast scrolling comes out coarser at a
    /// given bitrate.
    #[default]
    Camera,
    /// openh264's screen-content mode: far fewer bits on scrolling text,
    /// for thin links, at about three times the encode time of a small change.
    Screen,
}

/// Which browser to run and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrowserConfig {
    /// Path of the browser binary inside the session.
    pub binary: String,
    /// Flags added after sandcast's own.
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// URL filters the browser must run with; the agent refuses to start
    /// it when it cannot make sure of them. `None`: none.
    #[serde(default)]
    pub policy: Option<crate::BrowserPolicy>,
}

/// How the agent restarts a child that died.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    /// First delay before a restart.
    pub initial_backoff_ms: u64,
    /// Longest delay; the delay doubles up to this.
    pub max_backoff_ms: u64,
    /// A child that dies this many times within `window_ms` is in a crash loop.
    pub crash_loop_restarts: u32,
    /// The window for `crash_loop_restarts`.
    pub crash_loop_window_ms: u64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            initial_backoff_ms: 250,
            max_backoff_ms: 10_000,
            crash_loop_restarts: 5,
            crash_loop_window_ms: 60_000,
        }
    }
}

/// State of one supervised child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildState {
    /// Started, not yet ready.
    Starting,
    /// Up and ready.
    Running,
    /// Up, and paused because nobody watches (the browser only).
    Paused,
    /// Died; a restart is scheduled.
    Restarting,
    /// Died too often too quickly; still restarted, with the longest backoff.
    CrashLoop,
    /// Stopped on purpose, or gave up.
    Stopped,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal number, when a signal killed it.
    pub signal: Option<i32>,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exit code {code}"),
            (None, Some(sig)) => write!(f, "killed by signal {sig}"),
            (None, None) => write!(f, "unknown exit"),
        }
    }
}

/// A child's state, as the agent reports it on every change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildReport {
    /// Stable name: `xvfb`, `browser`, `vnc`, `launch`.
    pub name: String,
    /// Its state now.
    pub state: ChildState,
    /// Its process id inside the session, while it runs.
    pub pid: Option<u32>,
    /// How often it was restarted.
    pub restarts: u32,
    /// How it last ended.
    pub last_exit: Option<ExitInfo>,
    /// The last lines of its output when it ended.
    #[serde(default)]
    pub tail: Vec<String>,
}

/// Where a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    /// A child's standard output.
    Stdout,
    /// A child's standard error.
    Stderr,
    /// The agent itself.
    Agent,
}

/// One line of output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// The child's name, or `agent`.
    pub source: String,
    /// Which stream.
    pub stream: LogStream,
    /// The line, without its newline, cut to a bounded length.
    pub line: String,
}

/// Counters from the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStats {
    /// Input events refused by validation or rate.
    #[serde(default)]
    pub input_dropped: u64,
    /// Frames encoded.
    #[serde(default)]
    pub frames_encoded: u64,
    /// Frames dropped because the channel was busy.
    #[serde(default)]
    pub frames_dropped: u64,
    /// Key frames among the frames encoded.
    #[serde(default)]
    pub key_frames: u64,
    /// Microseconds spent producing the frames encoded (capture,
    /// conversion, encoding).
    #[serde(default)]
    pub encode_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_tagged_json() {
        let json = serde_json::to_string(&Message::Resize {
            width: 800,
            height: 600,
        })
        .unwrap();
        assert_eq!(json, r#"{"type":"resize","width":800,"height":600}"#);
        let back: Message = serde_json::from_str(&json).unwrap();
        assert_eq!(
            back,
            Message::Resize {
                width: 800,
                height: 600
            }
        );
    }

    #[test]
    fn config_defaults_fill_missing_fields() {
        let cfg: SessionConfig = serde_json::from_str(
            r#"{"session_id":"s","width":1280,"height":720,"start_url":"about:blank",
                "browser":{"binary":"/usr/bin/chromium"}}"#,
        )
        .unwrap();
        assert_eq!(cfg.max_fps, 60);
        assert_eq!(cfg.h264_tuning, H264Tuning::Camera);
        assert_eq!(cfg.restart, RestartPolicy::default());
        assert!(cfg.launch.is_none());
        assert!(cfg.agent_token.is_none());
        // A server that predates transfers meant them on.
        assert!(cfg.transfers);
    }

    #[test]
    fn transfer_messages_are_tagged_json() {
        let m = Message::ChooseFiles {
            chooser: 3,
            paths: vec!["/home/sandcast/Uploads/a.txt".into()],
        };
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(
            json,
            r#"{"type":"choose_files","chooser":3,"paths":["/home/sandcast/Uploads/a.txt"]}"#
        );
        assert_eq!(serde_json::from_str::<Message>(&json).unwrap(), m);
        let d: Message =
            serde_json::from_str(r#"{"type":"download","name":"a.pdf","size":12}"#).unwrap();
        assert_eq!(
            d,
            Message::Download {
                name: "a.pdf".into(),
                size: 12
            }
        );
        let c: Message =
            serde_json::from_str(r#"{"type":"file_chooser","chooser":1,"multiple":true}"#).unwrap();
        assert_eq!(
            c,
            Message::FileChooser {
                chooser: 1,
                multiple: true
            }
        );
    }

    #[test]
    fn a_claim_carries_the_whole_configuration_and_its_answer_an_optional_error() {
        let cfg: SessionConfig = serde_json::from_str(
            r#"{"session_id":"s","width":1280,"height":720,"start_url":"https://example.com/",
                "browser":{"binary":"/usr/bin/chromium"},"launch":["true"]}"#,
        )
        .unwrap();
        let json = serde_json::to_string(&Message::Claim(Box::new(cfg.clone()))).unwrap();
        assert!(
            json.starts_with(r#"{"type":"claim","session_id":"s""#),
            "{json}"
        );
        assert_eq!(
            serde_json::from_str::<Message>(&json).unwrap(),
            Message::Claim(Box::new(cfg))
        );
        assert_eq!(
            serde_json::to_string(&Message::Claimed { error: None }).unwrap(),
            r#"{"type":"claimed"}"#
        );
        assert_eq!(
            serde_json::from_str::<Message>(r#"{"type":"claimed","error":"no tab"}"#).unwrap(),
            Message::Claimed {
                error: Some("no tab".into())
            }
        );
    }

    #[test]
    fn h264_tuning_is_a_lowercase_name() {
        assert_eq!(
            serde_json::to_string(&H264Tuning::Screen).unwrap(),
            r#""screen""#
        );
        let t: H264Tuning = serde_json::from_str(r#""camera""#).unwrap();
        assert_eq!(t, H264Tuning::Camera);
        assert!(serde_json::from_str::<H264Tuning>(r#""film""#).is_err());
    }

    #[test]
    fn config_carries_the_agent_token_as_a_string() {
        let mut cfg: SessionConfig = serde_json::from_str(
            r#"{"session_id":"s","width":1,"height":1,"start_url":"about:blank",
                "browser":{"binary":"/b"},"agent_token":"tok"}"#,
        )
        .unwrap();
        assert_eq!(cfg.agent_token.as_ref().unwrap().expose(), "tok");
        assert!(!format!("{cfg:?}").contains("tok\""));
        cfg.agent_token = None;
        // Absent, not null: older agents see the configuration they know.
        assert!(!serde_json::to_string(&cfg).unwrap().contains("agent_token"));
    }

    #[test]
    fn exit_info_reads_well() {
        assert_eq!(
            ExitInfo {
                code: Some(1),
                signal: None
            }
            .to_string(),
            "exit code 1"
        );
        assert_eq!(
            ExitInfo {
                code: None,
                signal: Some(9)
            }
            .to_string(),
            "killed by signal 9"
        );
    }

    #[test]
    fn stream_role_round_trips() {
        let hello = Message::Hello(Hello {
            protocol: 1,
            role: Role::Stream { id: 42 },
            agent_version: String::new(),
        });
        let json = serde_json::to_string(&hello).unwrap();
        assert_eq!(serde_json::from_str::<Message>(&json).unwrap(), hello);
    }

    mod props {
        use super::*;
        use crate::testing::{json_value, mutated, tagged_object};
        use proptest::prelude::*;

        const TYPES: &[&str] = &[
            "hello",
            "welcome",
            "reject",
            "config",
            "child",
            "log",
            "ready",
            "fatal",
            "open_stream",
            "input",
            "clipboard",
            "resize",
            "display_size",
            "video",
            "stats",
            "shutdown",
            "ping",
            "pong",
            "remote_focus",
            "download",
            "file_chooser",
            "choose_files",
            "nonsense",
        ];
        const WORDS: &[&str] = &[
            "type",
            "protocol",
            "role",
            "control",
            "video",
            "stream",
            "id",
            "agent_version",
            "reason",
            "session_id",
            "width",
            "height",
            "start_url",
            "kiosk",
            "launch",
            "browser",
            "binary",
            "extra_args",
            "restart",
            "max_fps",
            "h264_tuning",
            "camera",
            "screen",
            "server_time_ms",
            "agent_token",
            "keyboard_layout",
            "editable",
            "x",
            "y",
            "name",
            "state",
            "running",
            "crash_loop",
            "pid",
            "restarts",
            "last_exit",
            "code",
            "signal",
            "tail",
            "source",
            "stdout",
            "line",
            "target",
            "vnc",
            "kind",
            "pointer_move",
            "key",
            "x",
            "y",
            "text",
            "op",
            "start",
            "key_frame",
            "bitrate",
            "codec",
            "h264",
            "vp8",
            "bitrate_bps",
            "input_dropped",
            "frames_encoded",
            "seq",
            "size",
            "chooser",
            "multiple",
            "paths",
            "transfers",
        ];
        const VALID: &[&str] = &[
            r#"{"type":"hello","protocol":1,"role":{"stream":{"id":7}},"agent_version":"0.1.0"}"#,
            r#"{"type":"config","session_id":"s","width":1280,"height":720,"start_url":"about:blank","browser":{"binary":"/usr/bin/chromium","extra_args":["--x"]},"launch":["xterm"],"agent_token":"t"}"#,
            r#"{"type":"child","name":"browser","state":"crash_loop","pid":7,"restarts":3,"last_exit":{"code":null,"signal":9},"tail":["a","b"]}"#,
            r#"{"type":"log","source":"agent","stream":"stderr","line":"x"}"#,
            r#"{"type":"video","op":"start","codec":"h264","bitrate_bps":2500000}"#,
            r#"{"type":"input","kind":"key","code":"KeyA","key":"a","down":true}"#,
            r#"{"type":"stats","input_dropped":1,"frames_encoded":2,"frames_dropped":3}"#,
        ];

        /// Parses `text` as a control message; one that parses is written and
        /// read back unchanged.
        fn round_trips_if_accepted(text: &[u8]) -> Result<(), TestCaseError> {
            if let Ok(msg) = serde_json::from_slice::<Message>(text) {
                let again = serde_json::to_vec(&msg).unwrap();
                prop_assert_eq!(serde_json::from_slice::<Message>(&again).unwrap(), msg);
            }
            Ok(())
        }

        proptest! {
            #[test]
            fn arbitrary_json_never_panics(v in json_value(WORDS)) {
                round_trips_if_accepted(&serde_json::to_vec(&v).unwrap())?;
            }

            #[test]
            fn tagged_json_never_panics(v in tagged_object("type", TYPES, WORDS)) {
                round_trips_if_accepted(&serde_json::to_vec(&v).unwrap())?;
            }

            #[test]
            fn mutated_messages_never_panic(
                text in prop::sample::select(VALID).prop_flat_map(|m| mutated(m.as_bytes().to_vec()))
            ) {
                round_trips_if_accepted(&text)?;
            }
        }

        #[test]
        fn deep_nesting_is_an_error_not_a_stack_overflow() {
            let deep = format!(
                r#"{{"type":"log","source":{}1{}}}"#,
                "[".repeat(100_000),
                "]".repeat(100_000)
            );
            assert!(serde_json::from_str::<Message>(&deep).is_err());
        }

        #[test]
        fn the_valid_examples_parse() {
            for v in VALID {
                serde_json::from_str::<Message>(v).unwrap();
            }
        }
    }
}
