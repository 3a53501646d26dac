//! Freezes as the server sees them: the encoder made frames, but a viewer
//! got none of them for longer than [`FREEZE_AFTER`] (it waited for a key
//! frame after a loss, or its frames could not be written). Sans-IO: time
//! is passed in. What the network does to frames after they are sent is the
//! viewer's to see; this counts what the server held back.

use std::time::{Duration, Instant};

/// A gap between two frames sent to a viewer, with frames skipped in
/// between, longer than this is a freeze (the threshold viewers notice).
pub const FREEZE_AFTER: Duration = Duration::from_millis(250);

/// One viewer's frames sent and skipped, in time.
#[derive(Debug, Default, Clone)]
pub struct FreezeMeter {
    last_sent: Option<Instant>,
    skipped: bool,
    /// Freezes counted.
    pub freezes: u64,
    /// Their total length.
    pub frozen: Duration,
}

impl FreezeMeter {
    /// A frame was made but not sent to this viewer.
    pub fn skipped(&mut self) {
        self.skipped = true;
    }

    /// A frame was sent at `now`; returns the freeze it ended, if any.
    pub fn sent(&mut self, now: Instant) -> Option<Duration> {
        let gap = self.last_sent.map(|t| now.saturating_duration_since(t));
        let froze = gap.filter(|g| self.skipped && *g > FREEZE_AFTER);
        if let Some(g) = froze {
            self.freezes += 1;
            self.frozen += g;
        }
        self.last_sent = Some(now);
        self.skipped = false;
        froze
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_gap_with_frames_held_back_is_a_freeze() {
        let t0 = Instant::now();
        let mut m = FreezeMeter::default();
        assert_eq!(m.sent(t0), None, "the first frame ends nothing");
        m.skipped();
        let later = t0 + Duration::from_millis(700);
        assert_eq!(m.sent(later), Some(Duration::from_millis(700)));
        assert_eq!((m.freezes, m.frozen), (1, Duration::from_millis(700)));
    }

    #[test]
    fn a_still_screen_or_a_short_gap_is_not() {
        let t0 = Instant::now();
        let mut m = FreezeMeter::default();
        m.sent(t0);
        // Nothing skipped: the screen did not change, nothing was held back.
        assert_eq!(m.sent(t0 + Duration::from_secs(5)), None);
        // Skipped, but shorter than the threshold.
        m.skipped();
        assert_eq!(m.sent(t0 + Duration::from_millis(5200)), None);
        assert_eq!(m.freezes, 0);
    }
}
