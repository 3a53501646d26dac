//! Token buckets for what a session makes the server write on the host:
//! log bytes and stored agent events. Plain state with the clock passed in,
//! so limits are tested without waiting.

use std::time::Instant;

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct Budget {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Budget {
    /// A full bucket.
    pub fn new(rate_per_second: u64, burst: u64, now: Instant) -> Budget {
        let burst = burst.max(1) as f64;
        Budget {
            rate: rate_per_second.max(1) as f64,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Spends `cost` tokens if there are that many; returns whether it did.
    /// A cost above the burst is never admitted.
    pub fn take(&mut self, cost: u64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        let cost = cost as f64;
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }
}

/// The gate of one session's agent events (child and display reports)
/// before they reach the database: beyond the budget they are dropped and
/// counted. The session's in-memory state always takes the latest report.
#[derive(Debug, Clone)]
pub struct EventGate {
    budget: Budget,
    dropped: u64,
}

impl EventGate {
    /// A gate admitting `per_second` events a second, `burst` at once.
    pub fn new(per_second: u32, burst: u32, now: Instant) -> EventGate {
        EventGate {
            budget: Budget::new(per_second.into(), burst.into(), now),
            dropped: 0,
        }
    }

    /// `Some(n)` when the event may be stored, `n` being how many were
    /// dropped since the last admitted one; `None` when it is dropped.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        if self.budget.take(1, now) {
            Some(std::mem::take(&mut self.dropped))
        } else {
            self.dropped += 1;
            None
        }
    }

    /// Events dropped since the last admitted one.
    pub fn pending_drops(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bucket_admits_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = Budget::new(100, 1000, t0);
        assert!(b.take(1000, t0));
        assert!(!b.take(1, t0));
        // 0.5 s at 100/s refills 50.
        let t1 = t0 + Duration::from_millis(500);
        assert!(b.take(50, t1));
        assert!(!b.take(1, t1));
        // Never more than the burst, however long the pause.
        let t2 = t1 + Duration::from_secs(3600);
        assert!(!b.take(1001, t2));
        assert!(b.take(1000, t2));
    }

    #[test]
    fn a_gate_counts_what_it_drops_and_reports_it_once() {
        let t0 = Instant::now();
        let mut g = EventGate::new(2, 3, t0);
        assert_eq!(g.admit(t0), Some(0));
        assert_eq!(g.admit(t0), Some(0));
        assert_eq!(g.admit(t0), Some(0));
        assert_eq!(g.admit(t0), None);
        assert_eq!(g.admit(t0), None);
        assert_eq!(g.pending_drops(), 2);
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(g.admit(t1), Some(2));
        assert_eq!(g.admit(t1), None);
        assert_eq!(g.pending_drops(), 1);
    }
}
