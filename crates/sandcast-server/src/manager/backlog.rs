//! What waits for a session when the next hop is full: the policy that keeps
//! what must not be lost and coalesces or drops the rest, sans-IO.
//!
//! Used twice with the same rule: by the gateway relay when a session's
//! command queue is full, and by the session itself when its agent's control
//! connection does not keep up. Releases (keys, buttons, `ReleaseAll`) are
//! never dropped, so a slow session never ends with a stuck key; viewer
//! arrivals and departures are counted, never dropped, so idle timeouts stay
//! right; pointer moves collapse into the latest position, because only the
//! last one matters; presses, wheel, text and pongs are dropped (and counted)
//! once the backlog holds `cap` items, because a press delivered late is
//! worse than one not delivered. Settings (video start/stop, bitrate, resize,
//! clipboard) keep only their newest value. Everything is bounded: at most
//! `4 × cap` items, after which queued releases collapse into one
//! `ReleaseAll`.

use std::collections::VecDeque;

use sandcast_proto::{InputEvent, Message, VideoControl};
use sandcast_webrtc::{GatewayEvent, ViewerState};

/// Items a backlog holds before it starts dropping what may be dropped.
pub const BACKLOG_CAP: usize = 256;

/// Events for one session that could not be delivered yet, in order.
#[derive(Debug)]
pub struct Backlog {
    items: VecDeque<Message>,
    cap: usize,
    /// Viewers that connected meanwhile.
    pub connected: u32,
    /// Viewers that left meanwhile.
    pub closed: u32,
    /// Something showed that a person is there (input, a viewer's change).
    pub activity: bool,
    /// Items dropped by the policy.
    pub dropped: u64,
}

/// How the policy treats a message.
#[derive(Debug, PartialEq, Eq)]
enum Class {
    /// Collapses with an adjacent one of its kind.
    Move,
    /// Never dropped.
    Release,
    /// Only the newest counts; an older queued one is replaced.
    Setting(u8),
    /// Dropped when the backlog is full.
    Droppable,
    /// Kept (stream requests, shutdown): few by construction.
    Keep,
}

fn class(msg: &Message) -> Class {
    match msg {
        Message::Input(InputEvent::PointerMove { .. }) => Class::Move,
        Message::Input(InputEvent::PointerButton { down: false, .. })
        | Message::Input(InputEvent::Key { down: false, .. })
        | Message::Input(InputEvent::ReleaseAll) => Class::Release,
        Message::Input(_) => Class::Droppable,
        Message::Video(VideoControl::Start { .. } | VideoControl::Stop) => Class::Setting(0),
        Message::Video(VideoControl::Bitrate { .. }) => Class::Setting(1),
        Message::Resize { .. } => Class::Setting(2),
        Message::Clipboard { .. } => Class::Setting(3),
        Message::Watched { .. } => Class::Setting(4),
        // Only the newest answer to a file chooser can still fit it.
        Message::ChooseFiles { .. } => Class::Setting(5),
        Message::Video(VideoControl::KeyFrame) | Message::Pong { .. } => Class::Droppable,
        _ => Class::Keep,
    }
}

impl Default for Backlog {
    fn default() -> Self {
        Backlog::new(BACKLOG_CAP)
    }
}

impl Backlog {
    /// An empty backlog that starts dropping at `cap` items.
    pub fn new(cap: usize) -> Backlog {
        Backlog {
            items: VecDeque::new(),
            cap: cap.max(1),
            connected: 0,
            closed: 0,
            activity: false,
            dropped: 0,
        }
    }

    /// Nothing waits, not even a viewer change.
    pub fn nothing_waits(&self) -> bool {
        self.items.is_empty() && self.connected == 0 && self.closed == 0 && !self.activity
    }

    /// Messages waiting.
    pub fn messages(&self) -> usize {
        self.items.len()
    }

    /// The oldest waiting message.
    pub fn pop(&mut self) -> Option<Message> {
        self.items.pop_front()
    }

    /// The waiting messages, oldest first.
    pub fn drain(&mut self) -> impl Iterator<Item = Message> + '_ {
        self.items.drain(..)
    }

    /// Adds an event from the gateway: viewer changes are counted, the rest
    /// becomes the agent message it stands for.
    pub fn push_event(&mut self, ev: GatewayEvent) {
        match &ev {
            GatewayEvent::ViewerState { state, .. } => {
                match state {
                    ViewerState::Connected => self.connected += 1,
                    ViewerState::Closed => self.closed += 1,
                    _ => {}
                }
                self.activity = true;
                return;
            }
            GatewayEvent::Input { .. } => self.activity = true,
            _ => {}
        }
        if let Some(msg) = ev.to_agent_message() {
            self.push(msg);
        }
    }

    /// Adds a message for the agent under the policy.
    pub fn push(&mut self, msg: Message) {
        let full = self.items.len() >= self.cap;
        match class(&msg) {
            Class::Move => {
                if let Some(last @ Message::Input(InputEvent::PointerMove { .. })) =
                    self.items.back_mut()
                {
                    *last = msg;
                } else if full {
                    self.dropped += 1;
                } else {
                    self.items.push_back(msg);
                }
            }
            Class::Setting(kind) => {
                let before = self.items.len();
                self.items.retain(|m| class(m) != Class::Setting(kind));
                self.dropped += (before - self.items.len()) as u64;
                self.items.push_back(msg);
            }
            Class::Droppable if full => self.dropped += 1,
            Class::Release if self.items.len() >= 4 * self.cap => {
                // Bounded even against a viewer releasing made-up keys:
                // every queued release becomes one release of everything.
                let before = self.items.len();
                self.items.retain(|m| class(m) != Class::Release);
                self.dropped += (before - self.items.len()) as u64;
                self.items.push_back(Message::Input(InputEvent::ReleaseAll));
            }
            Class::Release | Class::Droppable | Class::Keep => self.items.push_back(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandcast_proto::PointerButton;
    use sandcast_webrtc::ViewerId;

    fn key(code: &str, down: bool) -> Message {
        Message::Input(InputEvent::Key {
            code: code.into(),
            key: code.into(),
            down,
        })
    }

    fn mv(x: i32) -> Message {
        Message::Input(InputEvent::PointerMove { x, y: 1 })
    }

    #[test]
    fn under_the_cap_everything_is_kept_in_order_and_moves_collapse() {
        let mut b = Backlog::new(8);
        for m in [mv(1), mv(2), key("KeyA", true), mv(3), key("KeyA", false)] {
            b.push(m);
        }
        let got: Vec<_> = b.drain().collect();
        assert_eq!(got, [mv(2), key("KeyA", true), mv(3), key("KeyA", false)]);
        assert_eq!(b.dropped, 0);
    }

    #[test]
    fn when_full_presses_are_dropped_and_releases_kept() {
        let mut b = Backlog::new(4);
        for i in 0..4 {
            b.push(key(&format!("Key{i}"), true));
        }
        b.push(key("KeyX", true));
        b.push(Message::Input(InputEvent::Text { text: "x".into() }));
        b.push(key("Key0", false));
        b.push(Message::Input(InputEvent::PointerButton {
            button: PointerButton::Left,
            down: false,
        }));
        assert_eq!(b.dropped, 2);
        let got: Vec<_> = b.drain().collect();
        assert_eq!(got.len(), 6);
        assert_eq!(got[4], key("Key0", false));
        assert!(matches!(
            got[5],
            Message::Input(InputEvent::PointerButton { down: false, .. })
        ));
    }

    #[test]
    fn releases_are_bounded_by_collapsing_into_release_all() {
        let mut b = Backlog::new(2);
        for i in 0..100 {
            b.push(key(&format!("K{i}"), false));
        }
        assert!(b.messages() <= 8 + 1, "{}", b.messages());
        assert!(
            b.drain()
                .any(|m| m == Message::Input(InputEvent::ReleaseAll))
        );
    }

    #[test]
    fn settings_keep_only_the_newest() {
        let mut b = Backlog::new(2);
        b.push(Message::Video(VideoControl::Start {
            codec: sandcast_proto::Codec::H264,
            bitrate_bps: 1,
        }));
        b.push(Message::Resize {
            width: 800,
            height: 600,
        });
        b.push(Message::Video(VideoControl::Stop));
        b.push(Message::Resize {
            width: 1024,
            height: 768,
        });
        let got: Vec<_> = b.drain().collect();
        assert_eq!(
            got,
            [
                Message::Video(VideoControl::Stop),
                Message::Resize {
                    width: 1024,
                    height: 768
                }
            ]
        );
    }

    #[test]
    fn viewer_changes_are_counted_never_dropped() {
        let mut b = Backlog::new(1);
        let ev = |state| GatewayEvent::ViewerState {
            session: "s".into(),
            viewer: ViewerId(1),
            state,
        };
        for _ in 0..1000 {
            b.push_event(ev(ViewerState::Connected));
        }
        b.push_event(ev(ViewerState::Closed));
        assert_eq!((b.connected, b.closed), (1000, 1));
        assert!(b.activity && b.messages() == 0 && !b.nothing_waits());
    }
}
