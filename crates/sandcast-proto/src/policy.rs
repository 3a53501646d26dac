//! Chromium's managed policies in a session: which URLs a person in the
//! viewer may open. By default a session cannot open local files,
//! Chromium's own pages or `about:` pages other than `about:blank`, all of
//! which a person can type into the address bar.
//!
//! The server sends them in [`BrowserConfig::policy`](crate::BrowserConfig)
//! and the agent makes sure the browser reads exactly them before it starts
//! it ([`BrowserPolicy::managed_json`] in `policies/managed/sandcast.json`
//! under each of [`POLICY_DIRS`], where Chromium reads policies an ordinary
//! user cannot change). The sandbox backend writes that file on the host and
//! shows it read-only; in a microVM the agent (root in the guest) writes it.

use serde::{Deserialize, Serialize};

/// The browsers' policy directories under the root, as the session sees them.
pub const POLICY_DIRS: [&str; 2] = ["/etc/chromium", "/etc/opt/chrome"];

/// The file the policies are written to, under `policies/managed`.
pub const FILE_NAME: &str = "sandcast.json";

/// URL filters for the session's browser, in Chromium's URL filter format
/// (`scheme://host/path`, `*` for any).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrowserPolicy {
    /// URLs the browser refuses to open (`URLBlocklist`).
    pub blocked_urls: Vec<String>,
    /// Exceptions to `blocked_urls` (`URLAllowlist`).
    pub allowed_urls: Vec<String>,
}

impl Default for BrowserPolicy {
    fn default() -> Self {
        BrowserPolicy {
            blocked_urls: [
                "file://*",
                "chrome://*",
                "chrome-untrusted://*",
                "devtools://*",
                "view-source:*",
                "about:*",
            ]
            .map(String::from)
            .to_vec(),
            allowed_urls: vec!["about:blank".into()],
        }
    }
}

impl BrowserPolicy {
    /// Rejects filters Chromium would not parse, naming them.
    pub fn check(&self) -> Result<(), String> {
        for (key, list) in [
            ("blocked_urls", &self.blocked_urls),
            ("allowed_urls", &self.allowed_urls),
        ] {
            if list.len() > 1000 {
                return Err(format!(
                    "browser.{key} has {} entries (at most 1000)",
                    list.len()
                ));
            }
            for u in list {
                if u.is_empty() || u.len() > 2048 || u.chars().any(char::is_whitespace) {
                    return Err(format!(
                        "browser.{key} entry {u:?} must be 1 to 2048 characters without spaces"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The managed policy file's JSON: the same bytes wherever it is
    /// written, so the agent can tell that a file is this policy.
    pub fn managed_json(&self) -> String {
        serde_json::to_string_pretty(&serde_json::json!({
            "URLBlocklist": self.blocked_urls,
            "URLAllowlist": self.allowed_urls,
        }))
        .expect("policy serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_blocks_local_and_internal_pages_but_about_blank() {
        let p = BrowserPolicy::default();
        let v: serde_json::Value = serde_json::from_str(&p.managed_json()).unwrap();
        let block = v["URLBlocklist"].as_array().unwrap();
        for u in ["file://*", "chrome://*", "about:*"] {
            assert!(block.iter().any(|b| b == u), "{u}");
        }
        assert_eq!(v["URLAllowlist"], serde_json::json!(["about:blank"]));
        assert_eq!(p.check(), Ok(()));
    }

    #[test]
    fn bad_filters_are_named() {
        let p = BrowserPolicy {
            blocked_urls: vec!["file:// x".into()],
            allowed_urls: Vec::new(),
        };
        assert!(p.check().unwrap_err().contains("\"file:// x\""));
        let p = BrowserPolicy {
            blocked_urls: Vec::new(),
            allowed_urls: vec![String::new()],
        };
        assert!(p.check().unwrap_err().contains("browser.allowed_urls"));
    }
}
