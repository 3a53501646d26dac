//! When to restart a child that died, and when it is in a crash loop.
//!
//! Plain state, no clocks of its own: the caller passes `now`, so the policy
//! is tested without waiting.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use sandcast_proto::RestartPolicy;

/// A child that ran this long before dying starts again from the shortest
/// backoff: it was healthy, this is a fresh failure.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// What to do after a child died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Wait this long before starting it again.
    pub delay: Duration,
    /// It died `crash_loop_restarts` times within the window.
    pub crash_loop: bool,
}

/// Restart bookkeeping for one child.
#[derive(Debug, Clone)]
pub struct RestartTracker {
    policy: RestartPolicy,
    deaths: VecDeque<Instant>,
    consecutive: u32,
    restarts: u32,
}

impl RestartTracker {
    /// A tracker for a child that has not died yet.
    pub fn new(policy: RestartPolicy) -> Self {
        RestartTracker {
            policy,
            deaths: VecDeque::new(),
            consecutive: 0,
            restarts: 0,
        }
    }

    /// How often the child was restarted.
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// Records a death at `now` after running for `ran_for`.
    pub fn on_exit(&mut self, now: Instant, ran_for: Duration) -> Decision {
        if ran_for >= STABLE_AFTER {
            self.consecutive = 0;
        }
        let window = Duration::from_millis(self.policy.crash_loop_window_ms);
        self.deaths.push_back(now);
        while let Some(&first) = self.deaths.front() {
            if now.duration_since(first) > window {
                self.deaths.pop_front();
            } else {
                break;
            }
        }
        let crash_loop = self.policy.crash_loop_restarts > 0
            && self.deaths.len() as u32 >= self.policy.crash_loop_restarts;
        let factor = 1u64 << self.consecutive.min(20);
        let delay_ms = self
            .policy
            .initial_backoff_ms
            .saturating_mul(factor)
            .min(self.policy.max_backoff_ms);
        self.consecutive += 1;
        self.restarts += 1;
        let delay = if crash_loop {
            Duration::from_millis(self.policy.max_backoff_ms)
        } else {
            Duration::from_millis(delay_ms)
        };
        Decision { delay, crash_loop }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            initial_backoff_ms: 100,
            max_backoff_ms: 1000,
            crash_loop_restarts: 4,
            crash_loop_window_ms: 10_000,
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut t = RestartTracker::new(RestartPolicy {
            crash_loop_restarts: 0,
            ..policy()
        });
        let now = Instant::now();
        let delays: Vec<u64> = (0..6)
            .map(|i| {
                t.on_exit(now + Duration::from_secs(i), Duration::from_millis(10))
                    .delay
                    .as_millis() as u64
            })
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(t.restarts(), 6);
    }

    #[test]
    fn quick_deaths_within_the_window_are_a_crash_loop() {
        let mut t = RestartTracker::new(policy());
        let now = Instant::now();
        let loops: Vec<bool> = (0..4)
            .map(|i| {
                t.on_exit(now + Duration::from_secs(i), Duration::from_millis(10))
                    .crash_loop
            })
            .collect();
        assert_eq!(loops, [false, false, false, true]);
    }

    #[test]
    fn deaths_spread_beyond_the_window_are_not() {
        let mut t = RestartTracker::new(policy());
        let now = Instant::now();
        for i in 0..10 {
            let d = t.on_exit(now + Duration::from_secs(i * 6), Duration::from_millis(10));
            assert!(!d.crash_loop, "death {i}");
        }
    }

    #[test]
    fn a_long_healthy_run_resets_the_backoff() {
        let mut t = RestartTracker::new(policy());
        let now = Instant::now();
        t.on_exit(now, Duration::from_millis(10));
        t.on_exit(now + Duration::from_secs(1), Duration::from_millis(10));
        let d = t.on_exit(now + Duration::from_secs(100), Duration::from_secs(99));
        assert_eq!(d.delay, Duration::from_millis(100));
    }
}
