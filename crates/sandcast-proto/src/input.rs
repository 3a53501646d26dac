//! Input events from a viewer, validated before they reach the agent's X server.

use serde::{Deserialize, Serialize};

/// Longest text one [`InputEvent::Text`] or clipboard message may carry.
pub const MAX_TEXT_LEN: usize = 64 * 1024;

/// Largest coordinate or wheel delta accepted; real displays are far smaller.
const MAX_COORD: i32 = 16_384;

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
}
