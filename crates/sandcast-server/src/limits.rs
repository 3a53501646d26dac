//! What a request may ask for: sizes, URL schemes, field lengths. Checked
//! before anything reaches the store or a backend.

/// Largest request body the API reads.
pub const MAX_BODY: usize = 64 * 1024;
/// Longest start URL (data: URLs carry whole pages).
pub const MAX_URL_LEN: usize = 32 * 1024;
/// Longest user id or provider name.
pub const MAX_NAME_LEN: usize = 128;
/// Most launch arguments and the longest one.
pub const MAX_LAUNCH_ARGS: usize = 64;
/// Longest launch argument.
pub const MAX_ARG_LEN: usize = 4096;
/// Display size range.
pub const MIN_SIZE: (u32, u32) = (320, 240);
/// Display size range.
pub const MAX_SIZE: (u32, u32) = (3840, 2160);
/// Longest TTL: a day.
pub const MAX_TTL: u64 = 24 * 3600;

/// Checks a display size.
pub fn check_size(width: u32, height: u32) -> Result<(), String> {
    if !(MIN_SIZE.0..=MAX_SIZE.0).contains(&width) {
        return Err(format!(
            "width {width} is outside {}..={}",
            MIN_SIZE.0, MAX_SIZE.0
        ));
    }
    if !(MIN_SIZE.1..=MAX_SIZE.1).contains(&height) {
        return Err(format!(
            "height {height} is outside {}..={}",
            MIN_SIZE.1, MAX_SIZE.1
        ));
    }
    Ok(())
}

/// Checks a start URL: http, https, data and `about:blank` only (other
/// `about:` pages, `about:settings`, `about:flags`, are Chromium's aliases
/// of the refused `chrome://` pages).
pub fn check_url(url: &str) -> Result<(), String> {
    if url.len() > MAX_URL_LEN {
        return Err(format!(
            "URL of {} bytes is longer than {MAX_URL_LEN}",
            url.len()
        ));
    }
    if url.chars().any(|c| c.is_control()) {
        return Err("URL contains control characters".into());
    }
    let scheme = url
        .split_once(':')
        .map(|(s, _)| s.to_ascii_lowercase())
        .unwrap_or_default();
    match scheme.as_str() {
        "http" | "https" => {
            let rest = &url[scheme.len() + 1..];
            if !rest.starts_with("//") || rest.len() <= 2 {
                return Err(format!("{url:?} has no host"));
            }
            Ok(())
        }
        "data" => Ok(()),
        "about" if url.eq_ignore_ascii_case("about:blank") => Ok(()),
        "about" => Err(format!(
            "{:?}: of about: URLs only about:blank is allowed",
            truncate(url, 40)
        )),
        _ => Err(format!(
            "{:?}: scheme must be http, https, data or about",
            truncate(url, 40)
        )),
    }
}

/// Checks a short name (user id, provider).
pub fn check_name(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > MAX_NAME_LEN {
        return Err(format!("{what} must be 1..={MAX_NAME_LEN} bytes"));
    }
    if value.chars().any(|c| c.is_control()) {
        return Err(format!("{what} contains control characters"));
    }
    Ok(())
}

/// Checks a launch command.
pub fn check_launch(argv: &[String]) -> Result<(), String> {
    if argv.is_empty() {
        return Err("launch must name a program".into());
    }
    if argv.len() > MAX_LAUNCH_ARGS {
        return Err(format!("launch has more than {MAX_LAUNCH_ARGS} arguments"));
    }
    if argv
        .iter()
        .any(|a| a.len() > MAX_ARG_LEN || a.contains('\0'))
    {
        return Err(format!(
            "launch arguments must be at most {MAX_ARG_LEN} bytes without NUL"
        ));
    }
    if argv[0].is_empty() {
        return Err("launch program is empty".into());
    }
    Ok(())
}

/// Most paths a session may collect.
pub const MAX_COLLECT: usize = 32;

/// Checks what a session is to leave behind (from a request or a preset):
/// `complete_on` needs a launch command, `collect` paths stay in the home,
/// the result's time to live is within bounds. Returns the collect paths
/// parsed; an error names the field.
pub fn check_outcome(
    launch: Option<&[String]>,
    complete_on: Option<crate::store::CompleteOn>,
    collect: &[String],
    result_ttl_seconds: Option<u64>,
) -> Result<Vec<sandcast_proto::HomePath>, (&'static str, String)> {
    if complete_on.is_some() && launch.is_none_or(|l| l.is_empty()) {
        return Err((
            "complete_on",
            "\"launch_exit\" needs a launch command (launch)".into(),
        ));
    }
    if collect.len() > MAX_COLLECT {
        return Err(("collect", format!("at most {MAX_COLLECT} paths")));
    }
    if !collect.is_empty() && complete_on.is_none() {
        return Err((
            "collect",
            "files are collected when the session completes; set complete_on".into(),
        ));
    }
    let paths = collect
        .iter()
        .map(|p| {
            let path = sandcast_proto::HomePath::parse(p).map_err(|e| ("collect", e))?;
            if path.is_home() {
                return Err((
                    "collect",
                    "name files in the home, not the home itself".into(),
                ));
            }
            Ok(path)
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(t) = result_ttl_seconds
        && !(1..=MAX_TTL).contains(&t)
    {
        return Err((
            "result_ttl_seconds",
            format!("{t} is outside 1..={MAX_TTL}"),
        ));
    }
    Ok(paths)
}

/// Checks a session id as it appears in a path.
pub fn check_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("{:?} is not a session id", truncate(id, 70)))
    }
}

fn truncate(s: &str, n: usize) -> &str {
    let mut end = s.len().min(n);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Reads a request's `egress`: `"internet"`, `"none"`, `true`/`false` or a
/// list of at most [`sandcast_backend::MAX_EGRESS_RULES`] networks with
/// optional ports; the error names every bad entry.
pub fn check_egress(v: serde_json::Value) -> Result<sandcast_backend::Egress, String> {
    serde_json::from_value(v).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_forms_are_read_and_bad_entries_named() {
        use sandcast_backend::Egress;
        assert_eq!(
            check_egress(serde_json::json!(true)).unwrap(),
            Egress::Internet
        );
        assert_eq!(
            check_egress(serde_json::json!("none")).unwrap(),
            Egress::None
        );
        assert!(matches!(
            check_egress(serde_json::json!(["10.1.0.0/16:3128"])).unwrap(),
            Egress::Allow(r) if r.len() == 1
        ));
        let e = check_egress(serde_json::json!([
            "203.0.113.0/24",
            "300.1.1.1",
            "1.2.3.4:99999"
        ]))
        .unwrap_err();
        assert!(
            e.contains("\"300.1.1.1\"") && e.contains("\"1.2.3.4:99999\""),
            "{e}"
        );
        assert!(!e.contains("\"203.0.113.0/24\""), "{e}");
        assert!(
            check_egress(serde_json::json!({"a": 1}))
                .unwrap_err()
                .contains("internet")
        );
    }

    #[test]
    fn urls() {
        for ok in [
            "https://example.org/",
            "http://a",
            "data:text/html,<h1>x</h1>",
            "about:blank",
            "HTTPS://EXAMPLE.ORG",
        ] {
            assert!(check_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "file:///etc/passwd",
            "javascript:alert(1)",
            "chrome://settings",
            "about:settings",
            "about:flags",
            "ABOUT:version",
            "about:blank#x",
            "example.org",
            "http:",
            "https://",
            "http://a\nb",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
        assert!(check_url(&format!("data:,{}", "a".repeat(MAX_URL_LEN))).is_err());
        assert!(
            check_url("about:flags")
                .unwrap_err()
                .contains("about:flags")
        );
    }

    #[test]
    fn sizes() {
        assert!(check_size(1280, 720).is_ok());
        assert!(check_size(320, 240).is_ok());
        assert!(check_size(3840, 2160).is_ok());
        assert!(check_size(10, 720).unwrap_err().contains("width 10"));
        assert!(check_size(1280, 5000).unwrap_err().contains("height 5000"));
    }

    #[test]
    fn ids_names_and_launch() {
        assert!(check_id("0f3a-9").is_ok());
        for bad in ["", "UPPER", "../x", "a/b", &"a".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
        assert!(check_name("user_id", "alice").is_ok());
        assert!(check_name("user_id", "").is_err());
        assert!(check_name("user_id", &"x".repeat(129)).is_err());
        assert!(check_launch(&["xterm".into()]).is_ok());
        assert!(check_launch(&[]).is_err());
        assert!(check_launch(&["".into()]).is_err());
        assert!(check_launch(&["a\0b".into()]).is_err());
    }
}
