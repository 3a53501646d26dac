//! Downloads and uploads for the person in the viewer: the one rule for the
//! file names that travel between the page, the agent, the server and the
//! viewer, and where those files live in the session's home.
//!
//! A name comes from a hostile side either way (the remote page suggests a
//! download's name; the viewer names an upload), so it is never a path: a
//! single component, checked by everyone who receives it, joined to its
//! directory only by whoever builds the path.

use crate::files::{HomePath, SESSION_HOME};

/// Where the session's browser saves downloads, relative to the home.
pub const DOWNLOADS_DIR: &str = "Downloads";

/// Where the viewer's uploads are written, relative to the home.
pub const UPLOADS_DIR: &str = "Uploads";

/// Longest file name, in bytes (Linux's `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;

/// Most files one file-chooser answer names.
pub const MAX_CHOSEN: usize = 32;

/// Checks a file name: one path component (no `/`), not `.` or `..`, no
/// control characters (no NUL, no line break: it goes into headers and
/// onto the viewer's screen), at most [`MAX_NAME_LEN`] bytes, not empty.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the file name is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "the file name is {} bytes; at most {MAX_NAME_LEN}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a file name"));
    }
    if name.contains('/') {
        return Err(format!(
            "{name:?} contains `/`; a file name is one component"
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("{name:?} contains a control character"));
    }
    Ok(())
}

/// `~/Downloads/<name>`, for a checked name.
pub fn download_path(name: &str) -> Result<HomePath, String> {
    check_name(name)?;
    HomePath::parse(&format!("{DOWNLOADS_DIR}/{name}"))
}

/// `~/Uploads/<name>`, for a checked name.
pub fn upload_path(name: &str) -> Result<HomePath, String> {
    check_name(name)?;
    HomePath::parse(&format!("{UPLOADS_DIR}/{name}"))
}

/// The absolute path of an upload as the session's browser sees it
/// (`/home/sandcast/Uploads/<name>`), for a checked name.
pub fn upload_absolute(name: &str) -> Result<String, String> {
    upload_path(name).map(|p| p.absolute())
}

/// Whether `path` is exactly an upload's absolute path (the agent's check
/// of what the server asks it to hand to a page).
pub fn is_upload_absolute(path: &str) -> bool {
    path.strip_prefix(SESSION_HOME)
        .and_then(|r| r.strip_prefix('/'))
        .and_then(|r| r.strip_prefix(UPLOADS_DIR))
        .and_then(|r| r.strip_prefix('/'))
        .is_some_and(|name| check_name(name).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_one_plain_component() {
        for good in [
            "report.pdf",
            "a b (1).txt",
            "ünïcödé 你好.csv",
            ".hidden",
            "...",
            "x",
        ] {
            assert_eq!(check_name(good), Ok(()), "{good:?}");
        }
        let long = "a".repeat(MAX_NAME_LEN + 1);
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/etc/passwd",
            "a\0b",
            "a\nb",
            "a\rb",
            "tab\there",
            "\u{7f}",
            long.as_str(),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_name(&"a".repeat(MAX_NAME_LEN)), Ok(()));
    }

    #[test]
    fn paths_are_built_only_from_checked_names() {
        assert_eq!(download_path("a.txt").unwrap().as_str(), "Downloads/a.txt");
        assert_eq!(upload_path("a.txt").unwrap().as_str(), "Uploads/a.txt");
        assert_eq!(
            upload_absolute("a.txt").unwrap(),
            "/home/sandcast/Uploads/a.txt"
        );
        assert!(download_path("../x").is_err());
        assert!(upload_path("..").is_err());
        assert!(upload_absolute("a/b").is_err());
    }

    #[test]
    fn only_an_uploads_absolute_path_is_one() {
        assert!(is_upload_absolute("/home/sandcast/Uploads/a.txt"));
        for bad in [
            "/home/sandcast/Uploads/",
            "/home/sandcast/Uploads/../x",
            "/home/sandcast/Uploads/a/b",
            "/home/sandcast/Uploads/..",
            "/home/sandcast/Downloads/a.txt",
            "/home/sandcast/Uploadsx/a",
            "/etc/passwd",
            "Uploads/a.txt",
            "/home/sandcastUploads/a",
        ] {
            assert!(!is_upload_absolute(bad), "{bad:?}");
        }
    }
}
