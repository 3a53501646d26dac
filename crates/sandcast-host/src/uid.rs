//! A host uid (and the gid of the same number) per session, from the
//! configured range.
//!
//! A candidate is taken when `/etc/passwd` or `/etc/group` names it (as a
//! uid or a gid), when `/etc/subuid` or `/etc/subgid` hands it to some user's
//! containers, when any process on the host runs with it (real, effective,
//! saved or file-system id), or when a live claim holds it. Claims are files
//! `<claims_dir>/<uid>` naming the claiming backend's state directory and
//! session, made with `O_EXCL` under an flock in the same directory; the
//! claims directory is host-wide (under `lock_dir`), so two servers with
//! different state directories, and the two backends, never hand out the
//! same uid. A claim whose session has no record any more (a crash) and
//! whose uid no process uses is stale and is taken over.

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use sandcast_backend::BackendError;
use sha2::{Digest, Sha256};

/// Files that name uids and gids on the host.
const ID_FILES: [&str; 4] = ["/etc/passwd", "/etc/group", "/etc/subuid", "/etc/subgid"];

/// Checks a configured range: unprivileged, ordered, below the invalid id.
pub fn check_range([lo, hi]: [u32; 2]) -> Result<(), String> {
    if lo == 0 || lo > hi || hi >= u32::MAX - 1 {
        return Err(format!(
            "host.uid_range [{lo}, {hi}] must be two ids with 0 < first <= last < 4294967294"
        ));
    }
    Ok(())
}

/// Ids the host's account files name: the numeric fields of
/// `name:x:id:…` lines, and each `name:start:count` subordinate range.
pub fn named_ids(passwd_like: &[String], subid: &[String]) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    for text in passwd_like {
        for line in text.lines() {
            let f: Vec<&str> = line.split(':').collect();
            for field in f.iter().skip(2).take(2) {
                if let Ok(id) = field.parse::<u32>() {
                    out.push((id, id));
                }
            }
        }
    }
    for text in subid {
        for line in text.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if let (Some(Ok(start)), Some(Ok(count))) = (
                f.get(1).map(|s| s.parse::<u32>()),
                f.get(2).map(|s| s.parse::<u32>()),
            ) && count > 0
            {
                out.push((start, start.saturating_add(count - 1)));
            }
        }
    }
    out
}

/// Every uid and gid some process on the host runs with.
pub fn ids_in_use() -> BTreeSet<u32> {
    let mut ids = BTreeSet::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return ids;
    };
    for e in rd.filter_map(Result::ok) {
        if !e
            .file_name()
            .as_encoded_bytes()
            .iter()
            .all(u8::is_ascii_digit)
        {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue; // gone meanwhile
        };
        for line in status.lines() {
            if let Some(rest) = line
                .strip_prefix("Uid:")
                .or_else(|| line.strip_prefix("Gid:"))
            {
                ids.extend(
                    rest.split_whitespace()
                        .filter_map(|v| v.parse::<u32>().ok()),
                );
            }
        }
    }
    ids
}

/// The host uid that process `pid` runs as (real uid), from `/proc`.
pub fn uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Where claims live: under the host-wide lock directory, shared by every
/// instance and backend on the host.
pub fn claims_dir(lock_dir: &Path) -> PathBuf {
    lock_dir.join("uids")
}

fn claim_text(state_dir: &Path, id: &str) -> String {
    format!("{}\n{id}\n", state_dir.display())
}

/// Whether the claim file's session still has a record.
fn claim_is_live(text: &str) -> bool {
    let mut lines = text.lines();
    match (lines.next(), lines.next()) {
        (Some(state), Some(id)) => crate::state::Record::exists(Path::new(state), id),
        // Half written: its writer holds the lock, or died while doing so.
        _ => false,
    }
}

/// Allocates a uid for session `id` of the backend at `state_dir`, claims
/// it and calls `commit` with it while still holding the lock (the caller
/// saves the session's record there, which keeps the claim live). When
/// `commit` fails the claim is dropped. The search starts at a point derived
/// from the id, so that a uid is not handed out again at once after its
/// session ended.
pub fn allocate(
    range: [u32; 2],
    claims: &Path,
    state_dir: &Path,
    id: &str,
    commit: impl FnOnce(u32) -> Result<(), BackendError>,
) -> Result<u32, BackendError> {
    let io_err = |what: String| move |e| BackendError::io(what, e);
    std::fs::create_dir_all(claims).map_err(io_err(format!("creating {}", claims.display())))?;
    let lock_path = claims.join(".lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(format!("opening {}", lock_path.display())))?;
    // SAFETY: flock(2) on an fd we own; released when `lock` is dropped.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(BackendError::io(
            format!("locking {}", lock_path.display()),
            io::Error::last_os_error(),
        ));
    }
    let passwd: Vec<String> = ID_FILES[..2]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect();
    let subid: Vec<String> = ID_FILES[2..]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect();
    let named = named_ids(&passwd, &subid);
    let running = ids_in_use();
    let [lo, hi] = range;
    let size = u64::from(hi - lo) + 1;
    let digest = Sha256::digest(id.as_bytes());
    let start = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes")) % size;
    for i in 0..size {
        let uid = lo + u32::try_from((start + i) % size).expect("within the range");
        if running.contains(&uid) || named.iter().any(|(a, b)| (*a..=*b).contains(&uid)) {
            continue;
        }
        let path = claims.join(uid.to_string());
        if let Ok(text) = std::fs::read_to_string(&path) {
            if claim_is_live(&text) {
                continue;
            }
            let _ = std::fs::remove_file(&path); // stale: its session is gone
        }
        let mut f = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(BackendError::io(format!("creating {}", path.display()), e)),
        };
        let committed = f
            .write_all(claim_text(state_dir, id).as_bytes())
            .map_err(io_err(format!("writing {}", path.display())))
            .and_then(|()| commit(uid));
        if let Err(e) = committed {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        return Ok(uid);
    }
    Err(BackendError::Start(format!(
        "no free uid in host.uid_range [{lo}, {hi}]: every one is named in the account files, used by a process or held by a session"
    )))
}

/// Drops the claim of `uid` if it is this session's (missing is fine).
pub fn release(claims: &Path, uid: u32, state_dir: &Path, id: &str) -> Result<(), String> {
    let path = claims.join(uid.to_string());
    match std::fs::read_to_string(&path) {
        Ok(text) if text == claim_text(state_dir, id) => {
            std::fs::remove_file(&path).map_err(|e| format!("removing {}: {e}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Drops every claim of the backend at `state_dir` whose session is not in
/// `keep` (a crash between claiming and recording); one line per claim.
pub fn release_others(
    claims: &Path,
    state_dir: &Path,
    keep: &std::collections::HashSet<String>,
) -> Vec<String> {
    let mut lines = Vec::new();
    let Ok(rd) = std::fs::read_dir(claims) else {
        return lines;
    };
    let ours = format!("{}\n", state_dir.display());
    for e in rd.filter_map(Result::ok) {
        let p = e.path();
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        let Some(id) = text.strip_prefix(&ours).map(str::trim_end) else {
            continue;
        };
        if !keep.contains(id) && std::fs::remove_file(&p).is_ok() {
            lines.push(format!(
                "released uid {} of {id}",
                e.file_name().to_string_lossy()
            ));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked() {
        assert!(check_range([2_000_000, 2_065_535]).is_ok());
        assert!(check_range([5, 5]).is_ok());
        for bad in [[0, 10], [10, 5], [1, u32::MAX - 1]] {
            let e = check_range(bad).unwrap_err();
            assert!(e.contains(&format!("[{}, {}]", bad[0], bad[1])), "{e}");
        }
    }

    #[test]
    fn account_files_name_ids_and_ranges() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nweird:x:7:9000:::\n# comment\n".to_string();
        let subid = "alice:100000:65536\nbob:200000:0\n".to_string();
        let named = named_ids(&[passwd], &[subid]);
        assert!(named.contains(&(0, 0)));
        assert!(named.contains(&(7, 7)));
        assert!(named.contains(&(9000, 9000)));
        assert!(named.contains(&(100_000, 165_535)));
        assert!(!named.iter().any(|(a, _)| *a == 200_000));
    }

    #[test]
    fn running_ids_include_our_own() {
        // SAFETY: getuid cannot fail.
        let me = unsafe { libc::getuid() };
        assert!(ids_in_use().contains(&me));
        assert_eq!(uid_of(std::process::id()), Some(me));
    }

    #[test]
    fn claims_are_exclusive_released_and_stale_ones_taken_over() {
        let t = tempfile::tempdir().unwrap();
        let claims = t.path().join("uids");
        let state = t.path().join("state");
        std::fs::create_dir_all(crate::state::dir(&state)).unwrap();
        let live = |id: &str| {
            std::fs::write(crate::state::dir(&state).join(format!("{id}.json")), "{}").unwrap()
        };
        // A range far above anything the account files or processes name.
        let range = [3_900_000_000, 3_900_000_001];
        let alloc = |id: &str| allocate(range, &claims, &state, id, |_| Ok(()));
        live("a");
        live("b");
        let a = alloc("a").unwrap();
        let b = alloc("b").unwrap();
        assert_ne!(a, b);
        live("c");
        let full = alloc("c").unwrap_err().to_string();
        assert!(
            full.contains("no free uid in host.uid_range [3900000000, 3900000001]"),
            "{full}"
        );
        // Another session's claim is not released by this one.
        release(&claims, a, &state, "b").unwrap();
        assert!(claims.join(a.to_string()).exists());
        release(&claims, a, &state, "a").unwrap();
        assert!(!claims.join(a.to_string()).exists());
        // A failed commit leaves no claim.
        let failed = allocate(range, &claims, &state, "c", |_| {
            Err(BackendError::Start("no record".into()))
        });
        assert!(failed.is_err());
        assert!(!claims.join(a.to_string()).exists());
        assert_eq!(alloc("c").unwrap(), a);
        // b's record disappears (a crash): its claim is stale.
        std::fs::remove_file(crate::state::dir(&state).join("b.json")).unwrap();
        live("d");
        assert_eq!(alloc("d").unwrap(), b);
        // Reap: only this backend's claims of sessions not kept go.
        std::fs::write(claims.join("77"), "/other/state\nz\n").unwrap();
        let keep = std::collections::HashSet::from(["c".to_string()]);
        let gone = release_others(&claims, &state, &keep);
        assert_eq!(gone, [format!("released uid {b} of d")]);
        assert!(claims.join(a.to_string()).exists());
        assert!(claims.join("77").exists());
    }
}
