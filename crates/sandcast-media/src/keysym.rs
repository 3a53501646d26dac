//! Keysyms from the viewer's `KeyboardEvent.key` and `.code`.

/// The keysym that types `c`: Latin-1 keysyms equal their code point, every
/// other character has the Unicode keysym `0x1000000 + code point`.
/// Control characters that have keys (newline, tab) map to those keys;
/// other control characters have none.
pub fn keysym_for_char(c: char) -> Option<u32> {
    let cp = u32::from(c);
    match c {
        '\n' | '\r' => Some(0xff0d),
        '\t' => Some(0xff09),
        '\u{8}' => Some(0xff08),
        '\u{1b}' => Some(0xff1b),
        _ if c.is_control() => None,
        _ if (0x20..=0x7e).contains(&cp) || (0xa0..=0xff).contains(&cp) => Some(cp),
        _ => Some(0x100_0000 + cp),
    }
}

/// Keys named by `KeyboardEvent.key`, with the `code` that tells left from
/// right where X has both.
fn named_key(key: &str, code: &str) -> Option<u32> {
    let right = code.ends_with("Right");
    Some(match key {
        "Enter" => 0xff0d,
        "Backspace" => 0xff08,
        "Tab" => 0xff09,
        "Escape" | "Esc" => 0xff1b,
        "Delete" | "Del" => 0xffff,
        "Insert" => 0xff63,
        "Home" => 0xff50,
        "End" => 0xff57,
        "PageUp" => 0xff55,
        "PageDown" => 0xff56,
        "ArrowLeft" | "Left" => 0xff51,
        "ArrowUp" | "Up" => 0xff52,
        "ArrowRight" | "Right" => 0xff53,
        "ArrowDown" | "Down" => 0xff54,
        "Shift" if right => 0xffe2,
        "Shift" => 0xffe1,
        "Control" if right => 0xffe4,
        "Control" => 0xffe3,
        "Alt" if right => 0xffea,
        "Alt" => 0xffe9,
        "AltGraph" => 0xfe03,
        "Meta" | "OS" | "Super" if right => 0xffec,
        "Meta" | "OS" | "Super" => 0xffeb,
        "CapsLock" => 0xffe5,
        "NumLock" => 0xff7f,
        "ScrollLock" => 0xff14,
        "Pause" => 0xff13,
        "PrintScreen" => 0xff61,
        "ContextMenu" => 0xff67,
        "Clear" => 0xff0b,
        _ => {
            let n: u32 = key.strip_prefix('F')?.parse().ok()?;
            if !(1..=35).contains(&n) {
                return None;
            }
            0xffbe + n - 1
        }
    })
}

/// Keys by physical `code` on a US layout, for `key` values that name no
/// character (dead keys, `Unidentified`).
fn code_key(code: &str) -> Option<u32> {
    if let Some(l) = code.strip_prefix("Key")
        && l.len() == 1
        && l.as_bytes()[0].is_ascii_uppercase()
    {
        return Some(u32::from(l.as_bytes()[0].to_ascii_lowercase()));
    }
    if let Some(d) = code.strip_prefix("Digit")
        && d.len() == 1
        && d.as_bytes()[0].is_ascii_digit()
    {
        return Some(u32::from(d.as_bytes()[0]));
    }
    if let Some(d) = code.strip_prefix("Numpad")
        && d.len() == 1
        && d.as_bytes()[0].is_ascii_digit()
    {
        return Some(0xffb0 + u32::from(d.as_bytes()[0] - b'0'));
    }
    Some(match code {
        "Space" => 0x20,
        "Minus" => u32::from(b'-'),
        "Equal" => u32::from(b'='),
        "BracketLeft" => u32::from(b'['),
        "BracketRight" => u32::from(b']'),
        "Backslash" | "IntlBackslash" => u32::from(b'\\'),
        "Semicolon" => u32::from(b';'),
        "Quote" => u32::from(b'\''),
        "Backquote" => u32::from(b'`'),
        "Comma" => u32::from(b','),
        "Period" => u32::from(b'.'),
        "Slash" => u32::from(b'/'),
        "NumpadEnter" => 0xff8d,
        "NumpadAdd" => 0xffab,
        "NumpadSubtract" => 0xffad,
        "NumpadMultiply" => 0xffaa,
        "NumpadDivide" => 0xffaf,
        "NumpadDecimal" => 0xffae,
        _ => return None,
    })
}

/// The keysym for a viewer key event: the character produced if `key` is
/// one character (so any layout types what the user sees), else the named
/// key, else the physical `code` on a US layout.
pub fn keysym_for_key(key: &str, code: &str) -> Option<u32> {
    let mut chars = key.chars();
    if let (Some(c), None) = (chars.next(), chars.next()) {
        return keysym_for_char(c);
    }
    named_key(key, code).or_else(|| code_key(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters() {
        assert_eq!(keysym_for_char('a'), Some(0x61));
        assert_eq!(keysym_for_char('Z'), Some(0x5a));
        assert_eq!(keysym_for_char(' '), Some(0x20));
        assert_eq!(keysym_for_char('ä'), Some(0xe4));
        assert_eq!(keysym_for_char('€'), Some(0x10020ac));
        assert_eq!(keysym_for_char('ж'), Some(0x1000436));
        assert_eq!(keysym_for_char('\n'), Some(0xff0d));
        assert_eq!(keysym_for_char('\u{7}'), None);
    }

    #[test]
    fn named_keys_and_sides() {
        assert_eq!(keysym_for_key("Enter", "Enter"), Some(0xff0d));
        assert_eq!(keysym_for_key("ArrowLeft", "ArrowLeft"), Some(0xff51));
        assert_eq!(keysym_for_key("F1", "F1"), Some(0xffbe));
        assert_eq!(keysym_for_key("F12", "F12"), Some(0xffc9));
        assert_eq!(keysym_for_key("Shift", "ShiftLeft"), Some(0xffe1));
        assert_eq!(keysym_for_key("Shift", "ShiftRight"), Some(0xffe2));
        assert_eq!(keysym_for_key("Control", "ControlLeft"), Some(0xffe3));
        assert_eq!(keysym_for_key("Meta", "MetaLeft"), Some(0xffeb));
        assert_eq!(keysym_for_key("F99", "F99"), None);
    }

    #[test]
    fn unknown_key_values_fall_back_to_the_physical_code() {
        assert_eq!(keysym_for_key("Dead", "Quote"), Some(0x27));
        assert_eq!(keysym_for_key("Unidentified", "KeyQ"), Some(0x71));
        assert_eq!(keysym_for_key("Unidentified", "Digit7"), Some(0x37));
        assert_eq!(keysym_for_key("Unidentified", "Nonsense"), None);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn any_key_and_code_give_a_keysym_or_none(key in any::<String>(), code in any::<String>()) {
                // Keysyms are at most 29 bits; Unicode ones end at 0x110ffff.
                if let Some(sym) = keysym_for_key(&key, &code) {
                    prop_assert!(sym <= 0x110_ffff, "{sym:#x}");
                }
            }

            #[test]
            fn named_function_keys_stay_in_their_block(n in any::<u32>()) {
                let key = format!("F{n}");
                match keysym_for_key(&key, "") {
                    Some(sym) => prop_assert!((0xffbe..=0xffe0).contains(&sym) && (1..=35).contains(&n)),
                    None => prop_assert!(!(1..=35).contains(&n)),
                }
            }
        }
    }
}
