//! Retention: a session that ended (stopped or failed) is kept for
//! `retention.seconds` (its row, events and log files), then removed by a
//! periodic sweep. Log files go first, then the row, so a crash in between
//! leaves a row the next sweep finishes; log files without a row (an older
//! run's) are removed too.

use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::manager::{Manager, now_ms};
use crate::session_log;
use crate::store::Store;

/// Rows removed per database call, so a large backlog never holds the
/// store's lock for long.
const BATCH: usize = 256;

/// What one sweep removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    /// Sessions (rows with their events and log files).
    pub sessions: usize,
    /// Log files of sessions without a row.
    pub orphan_logs: usize,
}

/// How often the sweep runs for a retention time: a tenth of it, between
/// one second and five minutes.
pub fn interval(retention_seconds: u64) -> Duration {
    Duration::from_secs((retention_seconds / 10).clamp(1, 300))
}

/// Removes every session that ended at or before `cutoff_ms` and is not
/// `live`, and log files that belong to no session.
pub fn sweep(
    store: &dyn Store,
    logs_dir: &Path,
    cutoff_ms: i64,
    live: impl Fn(&str) -> bool,
) -> Result<Swept, String> {
    let mut swept = Swept::default();
    loop {
        let ids = store
            .ended_before(cutoff_ms, BATCH)
            .map_err(|e| e.to_string())?;
        let mut removed = 0;
        for id in ids.iter().filter(|id| !live(id)) {
            session_log::remove(logs_dir, id)
                .map_err(|e| format!("removing the log of {id}: {e}"))?;
            if store.delete(id).map_err(|e| e.to_string())? {
                removed += 1;
            }
        }
        swept.sessions += removed;
        if ids.len() < BATCH || removed == 0 {
            break;
        }
    }
    let entries = match std::fs::read_dir(logs_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(swept),
        Err(e) => return Err(format!("reading {}: {e}", logs_dir.display())),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(session_log::id_of) else {
            continue;
        };
        // A session's row is written before its log is opened.
        if !live(id) && !store.exists(id).map_err(|e| e.to_string())? {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => swept.orphan_logs += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("removing {}: {e}", entry.path().display())),
            }
        }
    }
    Ok(swept)
}

/// Sweeps periodically while the manager lives.
pub async fn run(manager: Weak<Manager>) {
    let Some(m) = manager.upgrade() else { return };
    let seconds = m.config().retention.seconds;
    drop(m);
    let mut tick = tokio::time::interval(interval(seconds));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(m) = manager.upgrade() else { return };
        let cutoff = now_ms().saturating_sub((seconds as i64).saturating_mul(1000));
        let result = tokio::task::spawn_blocking(move || {
            let dir = session_log::dir(&m.config().data_dir);
            let live = |id: &str| m.live(id).is_some();
            sweep(m.store(), &dir, cutoff, live)
        })
        .await;
        match result {
            Ok(Ok(s)) if s != Swept::default() => {
                tracing::info!(
                    sessions = s.sessions,
                    orphan_logs = s.orphan_logs,
                    "retention removed ended sessions"
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "retention sweep"),
            Err(e) => tracing::error!(error = %e, "retention sweep panicked"),
        }
    }
}

/// Starts the sweep for a manager.
pub fn spawn(manager: &Arc<Manager>) {
    tokio::spawn(run(Arc::downgrade(manager)));
}

/// Runs `sweep` on a blocking thread every `every`, for as long as the
/// server runs: the expiry of what sessions leave (results, recordings).
pub fn spawn_every(every: Duration, sweep: impl Fn() + Send + Sync + 'static) {
    let sweep = Arc::new(sweep);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let sweep = sweep.clone();
            let _ = tokio::task::spawn_blocking(move || sweep()).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LogLimits;
    use crate::store::{Row, State};

    #[test]
    fn a_sweep_removes_ended_sessions_files_and_orphans_only() {
        let dir = std::env::temp_dir().join(format!("sc-retention-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = crate::store::sqlite::SqliteStore::open(&dir.join("db.sqlite")).unwrap();
        let logs = dir.join("logs");
        let ids = [
            "aaaaaaaaaaaaaaaaaaaaaaaa", // ended long ago
            "bbbbbbbbbbbbbbbbbbbbbbbb", // ended recently
            "cccccccccccccccccccccccc", // running
            "dddddddddddddddddddddddd", // failed long ago, still tearing down
        ];
        for id in ids {
            store.insert(&Row::for_test(id)).unwrap();
            store
                .add_event(id, "state", &serde_json::json!({}), 1)
                .unwrap();
            let log = session_log::SessionLog::open(&logs, id, &LogLimits::default());
            log.write("launch", "stdout", "hello");
            log.close();
        }
        store
            .set_state(ids[0], State::Stopped, None, 1_000)
            .unwrap();
        store
            .set_state(ids[1], State::Stopped, None, 9_000)
            .unwrap();
        store
            .set_state(ids[3], State::Failed, Some("x"), 1_000)
            .unwrap();
        let orphan = "eeeeeeeeeeeeeeeeeeeeeeee";
        std::fs::write(logs.join(format!("{orphan}.log.1")), "old\n").unwrap();
        std::fs::write(logs.join("unrelated.txt"), "keep\n").unwrap();

        let live = |id: &str| id == ids[2] || id == ids[3];
        let swept = sweep(&store, &logs, 5_000, live).unwrap();
        assert_eq!(
            swept,
            Swept {
                sessions: 1,
                orphan_logs: 1
            }
        );
        assert!(!store.exists(ids[0]).unwrap());
        assert!(store.events(ids[0]).unwrap().is_empty());
        assert!(!session_log::paths(&logs, ids[0])[1].exists());
        for id in &ids[1..] {
            assert!(store.exists(id).unwrap(), "{id}");
            assert!(session_log::paths(&logs, id)[1].exists(), "{id}");
        }
        assert!(!logs.join(format!("{orphan}.log.1")).exists());
        assert!(logs.join("unrelated.txt").exists());

        // Once its teardown is over, the failed one goes too.
        let swept = sweep(&store, &logs, 5_000, |id| id == ids[2]).unwrap();
        assert_eq!(swept.sessions, 1);
        assert!(!store.exists(ids[3]).unwrap());
        assert_eq!(
            sweep(&store, &logs, 5_000, |_| false).unwrap(),
            Swept::default()
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_sweep_runs_often_enough_for_short_and_long_retention() {
        assert_eq!(interval(2), Duration::from_secs(1));
        assert_eq!(interval(100), Duration::from_secs(10));
        assert_eq!(interval(7 * 24 * 3600), Duration::from_secs(300));
    }
}
