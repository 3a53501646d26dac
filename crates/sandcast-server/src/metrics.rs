//! Prometheus metrics: sessions by state, starts, failures, restarts and the
//! time from request to ready.

use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::store::State;

/// The server's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Sessions by state, refreshed from the store at each scrape.
    pub sessions: Family<Vec<(String, String)>, Gauge>,
    /// Sessions created.
    pub starts: Counter,
    /// Sessions that failed.
    pub failures: Counter,
    /// Child restarts reported by agents.
    pub restarts: Counter,
    /// Seconds from create to ready.
    pub start_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sandcast");
        let sessions = Family::<Vec<(String, String)>, Gauge>::default();
        let starts = Counter::default();
        let failures = Counter::default();
        let restarts = Counter::default();
        let start_seconds = Histogram::new([0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0]);
        registry.register("sessions", "Sessions by state", sessions.clone());
        registry.register("session_starts", "Sessions created", starts.clone());
        registry.register("session_failures", "Sessions that failed", failures.clone());
        registry.register(
            "child_restarts",
            "Child processes restarted by agents",
            restarts.clone(),
        );
        registry.register(
            "session_start_seconds",
            "Time from the create request to ready",
            start_seconds.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            sessions,
            starts,
            failures,
            restarts,
            start_seconds,
        }
    }

    /// Sets the per-state gauges from counts.
    pub fn set_states(&self, counts: &[(State, i64)]) {
        for state in State::ALL {
            let n = counts
                .iter()
                .find(|(s, _)| *s == state)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            self.sessions
                .get_or_create(&vec![("state".to_string(), state.as_str().to_string())])
                .set(n);
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry.lock().unwrap()).expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_documented_series() {
        let m = Metrics::new();
        m.starts.inc();
        m.start_seconds.observe(0.8);
        m.set_states(&[(State::Ready, 2)]);
        let text = m.render();
        assert!(text.contains("sandcast_session_starts_total 1"), "{text}");
        assert!(
            text.contains("sandcast_sessions{state=\"ready\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("sandcast_sessions{state=\"failed\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("sandcast_session_start_seconds_bucket{le=\"1.0\"} 1"),
            "{text}"
        );
        assert!(text.contains("sandcast_child_restarts_total 0"), "{text}");
    }
}
