//! Rate limiting of key-frame requests towards the agent.
//!
//! A key frame costs 100-160 KB, half a second of bandwidth at 2.5 Mbit/s,
//! and lossy viewers send PLIs in bursts. So at most one request passes per
//! interval; a request inside the interval is remembered and passed when the
//! interval ends, so a viewer that lost its picture never waits for a second
//! PLI.

use std::time::{Duration, Instant};

/// Default shortest time between two key-frame requests to the agent.
pub const DEFAULT_KEYFRAME_INTERVAL: Duration = Duration::from_millis(500);

/// Lets key-frame requests through at most once per interval.
#[derive(Debug, Clone)]
pub struct KeyFrameLimiter {
    interval: Duration,
    last_sent: Option<Instant>,
    pending: bool,
}

impl KeyFrameLimiter {
    /// A limiter passing at most one request per `interval`.
    pub fn new(interval: Duration) -> Self {
        KeyFrameLimiter {
            interval,
            last_sent: None,
            pending: false,
        }
    }

    /// A request arrives; true when it should go to the agent now.
    pub fn request(&mut self, now: Instant) -> bool {
        match self.last_sent {
            Some(t) if now.saturating_duration_since(t) < self.interval => {
                self.pending = true;
                false
            }
            _ => {
                self.last_sent = Some(now);
                self.pending = false;
                true
            }
        }
    }

    /// When a held-back request is due, if one is.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.pending, self.last_sent) {
            (true, Some(t)) => Some(t + self.interval),
            _ => None,
        }
    }

    /// Time passes; true when a held-back request should go to the agent now.
    pub fn handle_timeout(&mut self, now: Instant) -> bool {
        match self.poll_timeout() {
            Some(due) if now >= due => {
                self.pending = false;
                self.last_sent = Some(now);
                true
            }
            _ => false,
        }
    }

    /// A key frame arrived from the agent: a held-back request is satisfied.
    pub fn key_frame_sent(&mut self) {
        self.pending = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_passes_and_a_burst_is_held_to_one() {
        let t0 = Instant::now();
        let mut k = KeyFrameLimiter::new(Duration::from_millis(500));
        assert!(k.request(t0));
        assert_eq!(k.poll_timeout(), None);
        for ms in [1, 50, 100, 499] {
            assert!(!k.request(t0 + Duration::from_millis(ms)), "at {ms} ms");
        }
        // The burst is remembered and passed once, at the end of the interval.
        assert_eq!(k.poll_timeout(), Some(t0 + Duration::from_millis(500)));
        assert!(!k.handle_timeout(t0 + Duration::from_millis(499)));
        assert!(k.handle_timeout(t0 + Duration::from_millis(500)));
        assert!(!k.handle_timeout(t0 + Duration::from_millis(501)));
        assert_eq!(k.poll_timeout(), None);
    }

    #[test]
    fn requests_after_the_interval_pass_at_once() {
        let t0 = Instant::now();
        let mut k = KeyFrameLimiter::new(Duration::from_millis(500));
        assert!(k.request(t0));
        assert!(k.request(t0 + Duration::from_millis(600)));
        assert!(!k.request(t0 + Duration::from_millis(700)));
    }

    #[test]
    fn a_key_frame_satisfies_a_held_request() {
        let t0 = Instant::now();
        let mut k = KeyFrameLimiter::new(Duration::from_millis(500));
        assert!(k.request(t0));
        assert!(!k.request(t0 + Duration::from_millis(10)));
        k.key_frame_sent();
        assert_eq!(k.poll_timeout(), None);
        assert!(!k.handle_timeout(t0 + Duration::from_secs(1)));
    }
}
