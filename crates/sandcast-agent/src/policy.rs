//! Makes sure the session's browser starts with the URL filters of its
//! configuration (Chromium's managed policies, see
//! [`sandcast_proto::policy`]).
//!
//! A sandbox session finds the policy file already there, written by the
//! host and read-only; a microVM's agent is root in the guest and writes it.
//! Either way the file must hold exactly the configured policy before the
//! browser starts: a session whose filters cannot be put in place fails,
//! naming the file, rather than run a browser without them.

use std::path::{Path, PathBuf};

use sandcast_proto::BrowserPolicy;
use sandcast_proto::policy::{FILE_NAME, POLICY_DIRS};

/// Puts `policy` in place under `root` (`/` in a session): in every
/// browser policy directory that exists, and in Chromium's when none does.
/// Returns the files that hold it.
pub fn install(policy: &BrowserPolicy, root: &Path) -> Result<Vec<PathBuf>, String> {
    let text = policy.managed_json();
    let existing: Vec<&str> = POLICY_DIRS
        .iter()
        .copied()
        .filter(|d| under(root, d).is_dir())
        .collect();
    // With no browser directory yet (a fresh image), Chromium's.
    let dirs = if existing.is_empty() {
        vec![POLICY_DIRS[0]]
    } else {
        existing
    };
    let mut files = Vec::new();
    for d in dirs {
        let managed = under(root, d).join("policies").join("managed");
        let file = managed.join(FILE_NAME);
        if std::fs::read_to_string(&file).is_ok_and(|t| t == text) {
            files.push(file);
            continue;
        }
        std::fs::create_dir_all(&managed)
            .and_then(|()| std::fs::write(&file, &text))
            .map_err(|e| {
                format!(
                    "the browser's URL filters (browser.blocked_urls) cannot be put in {}: {e}",
                    file.display()
                )
            })?;
        files.push(file);
    }
    Ok(files)
}

/// `dir` (absolute, as the session sees it) under `root`.
fn under(root: &Path, dir: &str) -> PathBuf {
    root.join(dir.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BrowserPolicy {
        BrowserPolicy::default()
    }

    #[test]
    fn written_where_the_browser_reads_it() {
        let t = tempfile::tempdir().unwrap();
        // No browser directory: Chromium's is made.
        let files = install(&policy(), t.path()).unwrap();
        assert_eq!(
            files,
            [t.path().join("etc/chromium/policies/managed/sandcast.json")]
        );
        assert_eq!(
            std::fs::read_to_string(&files[0]).unwrap(),
            policy().managed_json()
        );
        // Both browsers' directories, when both exist; a stale file is replaced.
        std::fs::create_dir_all(t.path().join("etc/opt/chrome")).unwrap();
        std::fs::write(&files[0], "{}").unwrap();
        let files = install(&policy(), t.path()).unwrap();
        assert_eq!(files.len(), 2);
        for f in &files {
            assert_eq!(std::fs::read_to_string(f).unwrap(), policy().managed_json());
        }
    }

    #[test]
    fn a_file_that_holds_the_policy_is_left_alone_and_one_that_cannot_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        let managed = t.path().join("etc/chromium/policies/managed");
        std::fs::create_dir_all(&managed).unwrap();
        let file = managed.join(FILE_NAME);
        std::fs::write(&file, policy().managed_json()).unwrap();
        // The sandbox's file is read-only: install must not write it.
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(install(&policy(), t.path()).unwrap(), vec![file.clone()]);
        assert_eq!(std::fs::metadata(&file).unwrap().modified().unwrap(), old);
        // Where the file cannot be written (here: `managed` is no directory,
        // which stops root too), the error names it.
        std::fs::remove_dir_all(&managed).unwrap();
        std::fs::write(&managed, "").unwrap();
        let e = install(&policy(), t.path()).unwrap_err();
        assert!(
            e.contains("sandcast.json") && e.contains("cannot be put"),
            "{e}"
        );
    }
}
