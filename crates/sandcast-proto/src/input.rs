//! Input events from a viewer, validated before they reach the agent's X server.

use serde::{Deserialize, Serialize};

/// Longest text one [`InputEvent::Text`] or clipboard message may carry.
pub const MAX_TEXT_LEN: usize = 64 * 1024;

/// Largest coordinate or wheel delta accepted; real displays are far smaller.
pub const MAX_COORD: i32 = 16_384;

/// A mouse button, numbered as X numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PointerButton {
    /// Primary button (X button 1).
    Left,
    /// Middle button (X button 2).
    Middle,
    /// Secondary button (X button 3).
    Right,
    /// Back (X button 8).
    Back,
    /// Forward (X button 9).
    Forward,
}

impl PointerButton {
    /// The X11 button number.
    pub fn x11_button(self) -> u8 {
        match self {
            PointerButton::Left => 1,
            PointerButton::Middle => 2,
            PointerButton::Right => 3,
            PointerButton::Back => 8,
            PointerButton::Forward => 9,
        }
    }
}

/// One input event, in display pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum InputEvent {
    /// Move the pointer to an absolute position.
    PointerMove {
        /// Column in display pixels.
        x: i32,
        /// Row in display pixels.
        y: i32,
    },
    /// Press or release a button at the pointer's position.
    PointerButton {
        /// Which button.
        button: PointerButton,
        /// Pressed (true) or released.
        down: bool,
    },
    /// Scroll by pixels; positive is down or right.
    Wheel {
        /// Horizontal pixels.
        dx: i32,
        /// Vertical pixels.
        dy: i32,
    },
    /// A key by its physical code and the character or name it produced in
    /// the viewer (`KeyboardEvent.code` and `.key`), so layouts other than US
    /// type what the user sees.
    Key {
        /// Physical key, such as `KeyA` or `Enter`.
        code: String,
        /// Produced value, such as `a`, `ä` or `Enter`.
        key: String,
        /// Pressed (true) or released.
        down: bool,
    },
    /// Type a string as it is (pasted text, input methods).
    Text {
        /// UTF-8 text.
        text: String,
    },
    /// Release every key and button held (the viewer lost focus).
    ReleaseAll,
}

/// Why an input event was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// A coordinate or delta outside the accepted range.
    #[error("{field} = {value} is out of range")]
    OutOfRange {
        /// The field's name.
        field: &'static str,
        /// Its value.
        value: i64,
    },
    /// A string that is empty or too long.
    #[error("{field} must be 1 to {max} bytes, got {len}")]
    BadLength {
        /// The field's name.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
}

impl InputEvent {
    /// Checks ranges and lengths; a refused event is dropped and counted by
    /// the caller, never fatal.
    pub fn validate(&self) -> Result<(), InputError> {
        fn coord(field: &'static str, v: i32, min: i32) -> Result<(), InputError> {
            if (min..=MAX_COORD).contains(&v) {
                Ok(())
            } else {
                Err(InputError::OutOfRange {
                    field,
                    value: v.into(),
                })
            }
        }
        fn text(field: &'static str, s: &str, max: usize) -> Result<(), InputError> {
            if s.is_empty() || s.len() > max {
                Err(InputError::BadLength {
                    field,
                    len: s.len(),
                    max,
                })
            } else {
                Ok(())
            }
        }
        match self {
            InputEvent::PointerMove { x, y } => {
                coord("x", *x, 0)?;
                coord("y", *y, 0)
            }
            InputEvent::Wheel { dx, dy } => {
                coord("dx", *dx, -MAX_COORD)?;
                coord("dy", *dy, -MAX_COORD)
            }
            InputEvent::Key { code, key, .. } => {
                text("code", code, 64)?;
                text("key", key, 64)
            }
            InputEvent::Text { text: t } => text("text", t, MAX_TEXT_LEN),
            InputEvent::PointerButton { .. } | InputEvent::ReleaseAll => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_viewer_json() {
        let ev: InputEvent =
            serde_json::from_str(r#"{"kind":"pointer_move","x":10,"y":20}"#).unwrap();
        assert_eq!(ev, InputEvent::PointerMove { x: 10, y: 20 });
        let ev: InputEvent =
            serde_json::from_str(r#"{"kind":"pointer_button","button":"right","down":true}"#)
                .unwrap();
        assert_eq!(
            ev,
            InputEvent::PointerButton {
                button: PointerButton::Right,
                down: true
            }
        );
    }

    #[test]
    fn unknown_fields_and_kinds_are_refused() {
        assert!(
            serde_json::from_str::<InputEvent>(r#"{"kind":"pointer_move","x":1,"y":2,"z":3}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<InputEvent>(r#"{"kind":"teleport"}"#).is_err());
    }

    #[test]
    fn validation_bounds() {
        assert!(InputEvent::PointerMove { x: 0, y: 0 }.validate().is_ok());
        assert!(InputEvent::PointerMove { x: -1, y: 0 }.validate().is_err());
        assert!(
            InputEvent::PointerMove { x: 0, y: 100_000 }
                .validate()
                .is_err()
        );
        assert!(InputEvent::Wheel { dx: -120, dy: 120 }.validate().is_ok());
        assert!(
            InputEvent::Wheel {
                dx: 0,
                dy: i32::MIN
            }
            .validate()
            .is_err()
        );
        assert!(
            InputEvent::Text {
                text: String::new()
            }
            .validate()
            .is_err()
        );
        assert!(
            InputEvent::Text {
                text: "x".repeat(MAX_TEXT_LEN + 1)
            }
            .validate()
            .is_err()
        );
        assert!(
            InputEvent::Key {
                code: "KeyA".into(),
                key: "a".into(),
                down: true
            }
            .validate()
            .is_ok()
        );
        assert!(
            InputEvent::Key {
                code: "K".repeat(65),
                key: "a".into(),
                down: true
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn buttons_map_to_x11_numbers() {
        assert_eq!(PointerButton::Left.x11_button(), 1);
        assert_eq!(PointerButton::Right.x11_button(), 3);
        assert_eq!(PointerButton::Forward.x11_button(), 9);
    }

    mod props {
        use super::*;
        use crate::testing::{json_string, tagged_object};
        use proptest::prelude::*;

        const KINDS: &[&str] = &[
            "pointer_move",
            "pointer_button",
            "wheel",
            "key",
            "text",
            "release_all",
            "other",
        ];
        const WORDS: &[&str] = &[
            "kind", "x", "y", "dx", "dy", "button", "down", "code", "key", "text", "left", "right",
            "back", "KeyA", "a", "é", "Enter",
        ];

        /// The ranges the documentation promises for an accepted event,
        /// stated again here rather than taken from `validate`.
        fn in_range(ev: &InputEvent) -> bool {
            let coord = |v: i32| (0..=16_384).contains(&v);
            let delta = |v: i32| (-16_384..=16_384).contains(&v);
            let short = |s: &str| (1..=64).contains(&s.len());
            match ev {
                InputEvent::PointerMove { x, y } => coord(*x) && coord(*y),
                InputEvent::Wheel { dx, dy } => delta(*dx) && delta(*dy),
                InputEvent::Key { code, key, .. } => short(code) && short(key),
                InputEvent::Text { text } => (1..=MAX_TEXT_LEN).contains(&text.len()),
                InputEvent::PointerButton { .. } | InputEvent::ReleaseAll => true,
            }
        }

        fn event() -> impl Strategy<Value = InputEvent> {
            let int = prop_oneof![any::<i32>(), -20_000i32..20_000];
            let text = json_string(WORDS);
            prop_oneof![
                (int.clone(), int.clone()).prop_map(|(x, y)| InputEvent::PointerMove { x, y }),
                (int.clone(), int).prop_map(|(dx, dy)| InputEvent::Wheel { dx, dy }),
                (text.clone(), text.clone(), any::<bool>())
                    .prop_map(|(code, key, down)| InputEvent::Key { code, key, down }),
                text.prop_map(|text| InputEvent::Text { text }),
                Just(InputEvent::ReleaseAll),
            ]
        }

        proptest! {
            #[test]
            fn every_accepted_event_is_in_range(ev in event()) {
                prop_assert_eq!(ev.validate().is_ok(), in_range(&ev), "{:?}", ev);
            }

            #[test]
            fn every_accepted_event_from_json_is_in_range(v in tagged_object("kind", KINDS, WORDS)) {
                let text = serde_json::to_vec(&v).unwrap();
                if let Ok(ev) = serde_json::from_slice::<InputEvent>(&text)
                    && ev.validate().is_ok()
                {
                    prop_assert!(in_range(&ev), "{:?}", ev);
                }
            }
        }
    }
}
