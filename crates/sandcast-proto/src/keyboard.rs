//! Keyboard layouts a session's display can have: `layout` or
//! `layout(variant)` as XKB names them (`de`, `fr`, `jp`, `us(intl)`). One
//! rule for the server, which refuses a bad name with a 400, and the agent,
//! which sets it on the display with `setxkbmap`.

use std::path::Path;

/// Longest layout value accepted.
pub const MAX_LAYOUT_LEN: usize = 64;

/// Where XKB keeps its layouts (Debian's `xkb-data`, a dependency of Xvfb).
pub const XKB_SYMBOLS_DIR: &str = "/usr/share/X11/xkb/symbols";

/// A parsed keyboard layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyboardLayout {
    /// The XKB layout (`de`).
    pub layout: String,
    /// The XKB variant (`nodeadkeys`), if any.
    pub variant: Option<String>,
}

/// Why a layout value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// Not `layout` or `layout(variant)` of the allowed characters.
    #[error(
        "keyboard_layout {0:?} is not an XKB layout name such as \"de\", \"fr\" or \"us(intl)\" (lowercase letters, digits, '_' and '-', at most {MAX_LAYOUT_LEN} characters)"
    )]
    Malformed(String),
    /// No such layout or variant on this host.
    #[error("keyboard_layout {value:?}: {what} is not in {dir}")]
    Unknown {
        /// The value given.
        value: String,
        /// What was missing.
        what: String,
        /// Where it was looked for.
        dir: String,
    },
}

fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        && s.as_bytes()[0].is_ascii_lowercase()
}

impl KeyboardLayout {
    /// Parses `layout` or `layout(variant)`.
    pub fn parse(value: &str) -> Result<KeyboardLayout, LayoutError> {
        let bad = || LayoutError::Malformed(value.chars().take(MAX_LAYOUT_LEN + 8).collect());
        if value.len() > MAX_LAYOUT_LEN {
            return Err(bad());
        }
        let (layout, variant) = match value.split_once('(') {
            Some((l, rest)) => {
                let v = rest.strip_suffix(')').ok_or_else(bad)?;
                (l, Some(v))
            }
            None => (value, None),
        };
        if !name_ok(layout) || variant.is_some_and(|v| !name_ok(v)) {
            return Err(bad());
        }
        Ok(KeyboardLayout {
            layout: layout.to_owned(),
            variant: variant.map(str::to_owned),
        })
    }

    /// Checks that the layout (and its variant) exist under `dir`, an XKB
    /// symbols directory; a host without one checks nothing.
    pub fn check_installed(&self, dir: &Path) -> Result<(), LayoutError> {
        if !dir.is_dir() {
            return Ok(());
        }
        let unknown = |what: String| LayoutError::Unknown {
            value: self.to_string(),
            what,
            dir: dir.display().to_string(),
        };
        let text = std::fs::read_to_string(dir.join(&self.layout))
            .map_err(|_| unknown(format!("layout {:?}", self.layout)))?;
        if let Some(v) = &self.variant
            && !text.contains(&format!("xkb_symbols \"{v}\""))
        {
            return Err(unknown(format!(
                "variant {v:?} of layout {:?}",
                self.layout
            )));
        }
        Ok(())
    }

    /// The arguments `setxkbmap` takes for it.
    pub fn setxkbmap_args(&self) -> Vec<String> {
        let mut args = vec!["-layout".to_owned(), self.layout.clone()];
        if let Some(v) = &self.variant {
            args.extend(["-variant".to_owned(), v.clone()]);
        }
        args
    }
}

impl std::fmt::Display for KeyboardLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.variant {
            Some(v) => write!(f, "{}({v})", self.layout),
            None => f.write_str(&self.layout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_and_variants_parse() {
        let de = KeyboardLayout::parse("de").unwrap();
        assert_eq!((de.layout.as_str(), de.variant), ("de", None));
        let intl = KeyboardLayout::parse("us(intl)").unwrap();
        assert_eq!(intl.variant.as_deref(), Some("intl"));
        assert_eq!(intl.to_string(), "us(intl)");
        assert_eq!(intl.setxkbmap_args(), ["-layout", "us", "-variant", "intl"]);
    }

    #[test]
    fn anything_else_is_refused_by_name() {
        for bad in [
            "",
            "DE",
            "de fr",
            "de;rm -rf",
            "-layout",
            "de(",
            "de()",
            "de(x",
            "../etc",
            "de(a(b))",
            &"a".repeat(MAX_LAYOUT_LEN + 1),
        ] {
            let err = KeyboardLayout::parse(bad).unwrap_err();
            assert!(
                err.to_string().contains("keyboard_layout"),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn installed_layouts_are_found_and_missing_ones_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("de"),
            "xkb_symbols \"basic\" {};\nxkb_symbols \"nodeadkeys\" {};\n",
        )
        .unwrap();
        let ok = KeyboardLayout::parse("de(nodeadkeys)").unwrap();
        assert!(ok.check_installed(dir.path()).is_ok());
        let err = KeyboardLayout::parse("zz")
            .unwrap()
            .check_installed(dir.path())
            .unwrap_err();
        assert!(err.to_string().contains("layout \"zz\""), "{err}");
        let err = KeyboardLayout::parse("de(nope)")
            .unwrap()
            .check_installed(dir.path())
            .unwrap_err();
        assert!(err.to_string().contains("variant \"nope\""), "{err}");
        // A host without XKB data checks nothing.
        assert!(ok.check_installed(&dir.path().join("none")).is_ok());
    }
}
