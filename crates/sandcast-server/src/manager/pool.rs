//! The warm pool (`[session] pool_size`): sessions started ahead of any
//! request, each with its display, its browser on a blank page in a fresh
//! profile, its agent connected and its network ready, and its browser
//! paused while it waits. A create whose session a pooled one can become
//! takes one; the agent then opens the start page in a tab that replaces
//! the blank one and starts the launch command ([`sandcast_proto::Message::Claim`]),
//! so the session is ready in the time a tab takes to open instead of the
//! time a browser takes to start.
//!
//! This is the pool's bookkeeping alone, without I/O and with time passed
//! in; the manager keeps it under the same lock as its map of sessions,
//! whose count includes pooled sessions: `max_sessions` bounds both.
//!
//! What a claim can change is one rule, [`fits`]: everything else of a
//! session is fixed when its sandbox and browser start (its network, its
//! home, its display's size and layout, the browser's flags), so a request
//! that wants another value starts cold.

use std::time::{Duration, Instant};

use crate::config::Config;
use crate::store::Spec;

/// The wait after a pooled session failed to become ready; it doubles with
/// each failure in a row, up to [`MAX_BACKOFF`], so a host that cannot
/// start sessions is not kept busy trying.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between failed starts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The pool's bookkeeping.
#[derive(Debug)]
pub struct Pool {
    size: usize,
    /// Pooled sessions, oldest first.
    entries: Vec<Entry>,
    /// Failures to become ready in a row.
    failures: u32,
    /// No start before this, after a failure.
    retry_at: Option<Instant>,
}

#[derive(Debug)]
struct Entry {
    id: String,
    ready: bool,
}

/// What the pool wants now.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Start a pooled session.
    Start,
    /// Nothing before this time (a failure's back-off).
    At(Instant),
    /// Nothing until something changes (the pool is full, a session is
    /// warming, or the server is full).
    Wait,
}

/// The session every pooled one starts as: the configured defaults (kiosk
/// as `pool_kiosk` says), on a blank page, with no launch command, living
/// at most a day (then it is replaced by a fresh one).
pub fn spec(config: &Config) -> Spec {
    Spec {
        start_url: "about:blank".into(),
        kiosk: config.session.pool_kiosk,
        idle_timeout_seconds: LIFETIME.as_secs(),
        ..Spec::from_defaults(&config.session)
    }
}

/// How long a pooled session waits to be claimed before it is replaced.
pub const LIFETIME: Duration = Duration::from_secs(crate::limits::MAX_TTL);

/// Whether a session started as `pooled` can become `wanted` by a claim:
/// they differ only in what the agent applies then (the start URL, the
/// launch command and its outcome) and what the server keeps (time to
/// live, idle timeout).
pub fn fits(pooled: &Spec, wanted: &Spec) -> bool {
    let Spec {
        start_url: _,
        launch: _,
        outcome: _,
        idle_timeout_seconds: _,
        recording_ttl_seconds: _,
        width,
        height,
        kiosk,
        egress,
        keyboard_layout,
        profile,
        transfers,
        record,
    } = wanted;
    // Destructured so that a field added to `Spec` must be placed here.
    *width == pooled.width
        && *height == pooled.height
        && *kiosk == pooled.kiosk
        && *egress == pooled.egress
        && *keyboard_layout == pooled.keyboard_layout
        && *transfers == pooled.transfers
        && profile.is_none()
        && !record
}

impl Pool {
    /// A pool of `size` sessions (0: none).
    pub fn new(size: usize) -> Pool {
        Pool {
            size,
            entries: Vec::new(),
            failures: 0,
            retry_at: None,
        }
    }

    /// Whether `id` is a pooled session (not yet claimed).
    pub fn holds(&self, id: &str) -> bool {
        self.entries.iter().any(|e| e.id == id)
    }

    /// Pooled sessions ready to be claimed.
    pub fn ready(&self) -> usize {
        self.entries.iter().filter(|e| e.ready).count()
    }

    /// Pooled sessions, ready or not.
    pub fn count(&self) -> usize {
        self.entries.len()
    }

    /// What to do now, with `sessions` sessions (pooled ones included) on
    /// a server that allows `max`. One pooled session starts at a time:
    /// a burst of starts would slow the sessions people use.
    pub fn next(&self, sessions: usize, max: usize, now: Instant) -> Next {
        if self.entries.len() >= self.size
            || sessions >= max
            || self.entries.iter().any(|e| !e.ready)
        {
            return Next::Wait;
        }
        match self.retry_at {
            Some(t) if now < t => Next::At(t),
            _ => Next::Start,
        }
    }

    /// A pooled session `id` is starting.
    pub fn started(&mut self, id: String) {
        self.entries.push(Entry { id, ready: false });
    }

    /// The pooled session `id` is ready: it can be claimed.
    pub fn mark_ready(&mut self, id: &str) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.id == id) {
            e.ready = true;
            self.failures = 0;
            self.retry_at = None;
        }
    }

    /// Takes the oldest ready session for a request.
    pub fn take(&mut self) -> Option<String> {
        let i = self.entries.iter().position(|e| e.ready)?;
        Some(self.entries.remove(i).id)
    }

    /// Takes a pooled session to stop, to make room for a request it does
    /// not fit: one still warming first (it has cost less so far).
    pub fn evict(&mut self) -> Option<String> {
        let i = self
            .entries
            .iter()
            .position(|e| !e.ready)
            .or((!self.entries.is_empty()).then_some(0))?;
        Some(self.entries.remove(i).id)
    }

    /// The session `id` ended; whether it was a pooled one. One that ended
    /// before it was ready is a failure: the next start waits.
    pub fn gone(&mut self, id: &str, now: Instant) -> bool {
        let Some(i) = self.entries.iter().position(|e| e.id == id) else {
            return false;
        };
        if !self.entries.remove(i).ready {
            let wait = FIRST_BACKOFF
                .saturating_mul(1 << self.failures.min(16))
                .min(MAX_BACKOFF);
            self.failures += 1;
            self.retry_at = Some(now + wait);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pooled() -> Spec {
        spec(&Config::default())
    }

    #[test]
    fn a_request_fits_when_only_what_a_claim_applies_differs() {
        let p = pooled();
        let mut w = p.clone();
        w.start_url = "https://example.com/".into();
        w.launch = Some(vec!["gh".into(), "auth".into(), "login".into()]);
        w.outcome.complete_on = Some(crate::store::CompleteOn::LaunchExit);
        w.idle_timeout_seconds = 60;
        assert!(fits(&p, &w));
        let changes: [fn(&mut Spec); 8] = [
            |s| s.width += 2,
            |s| s.height += 2,
            |s| s.kiosk = true,
            |s| s.egress = sandcast_backend::Egress::None,
            |s| s.keyboard_layout = Some("de".into()),
            |s| s.transfers = false,
            |s| s.profile = Some("alice".into()),
            |s| s.record = true,
        ];
        for (i, change) in changes.iter().enumerate() {
            let mut w = p.clone();
            change(&mut w);
            assert!(!fits(&p, &w), "change {i} must start cold");
        }
    }

    #[test]
    fn the_pool_fills_one_at_a_time_within_the_servers_limit() {
        let now = Instant::now();
        let mut pool = Pool::new(2);
        assert_eq!(pool.next(0, 10, now), Next::Start);
        pool.started("a".into());
        // One warming: the next waits for it.
        assert_eq!(pool.next(1, 10, now), Next::Wait);
        assert_eq!(pool.take(), None, "a warming session is not claimed");
        pool.mark_ready("a");
        assert_eq!(pool.next(1, 10, now), Next::Start);
        // The server's limit counts pooled sessions too.
        assert_eq!(pool.next(10, 10, now), Next::Wait);
        pool.started("b".into());
        pool.mark_ready("b");
        assert_eq!(pool.next(2, 10, now), Next::Wait, "full");
        assert_eq!(pool.ready(), 2);
        assert_eq!(pool.take().as_deref(), Some("a"), "oldest first");
        assert!(!pool.holds("a"));
        assert_eq!(pool.next(2, 10, now), Next::Start);
        // A claimed session's end is not the pool's business.
        assert!(!pool.gone("a", now));
    }

    #[test]
    fn failed_starts_back_off_and_a_ready_one_resets_it() {
        let t0 = Instant::now();
        let mut pool = Pool::new(1);
        pool.started("a".into());
        assert!(pool.gone("a", t0));
        assert_eq!(pool.next(0, 10, t0), Next::At(t0 + FIRST_BACKOFF));
        assert_eq!(pool.next(0, 10, t0 + FIRST_BACKOFF), Next::Start);
        let t1 = t0 + FIRST_BACKOFF;
        pool.started("b".into());
        assert!(pool.gone("b", t1));
        assert_eq!(pool.next(0, 10, t1), Next::At(t1 + 2 * FIRST_BACKOFF));
        // Many failures: never more than the cap.
        for i in 0..40 {
            pool.started(format!("f{i}"));
            pool.gone(&format!("f{i}"), t1);
        }
        assert_eq!(pool.next(0, 10, t1), Next::At(t1 + MAX_BACKOFF));
        pool.started("c".into());
        pool.mark_ready("c");
        assert!(pool.gone("c", t1), "a ready one ending is no failure");
        assert_eq!(pool.next(0, 10, t1), Next::Start);
    }

    #[test]
    fn eviction_takes_a_warming_session_first() {
        let mut pool = Pool::new(3);
        pool.started("a".into());
        pool.mark_ready("a");
        pool.started("b".into());
        assert_eq!(pool.evict().as_deref(), Some("b"));
        assert_eq!(pool.evict().as_deref(), Some("a"));
        assert_eq!(pool.evict(), None);
    }
}
