//! Target bitrate for the agent's encoder.
//!
//! The estimate comes from the viewers' RTCP receiver reports: loss fraction
//! drives the loss-based controller of the Google congestion control draft
//! (draft-ietf-rmcat-gcc, section 6): above 10 % loss the rate drops by half
//! the loss, under 2 % it grows by 8 % per report, in between it holds. The
//! session's rate is the minimum over its viewers, clamped.

/// Lowest bitrate ever asked of the encoder; below it text is unreadable.
pub const MIN_BITRATE_BPS: u32 = 300_000;
/// Highest bitrate ever asked of the encoder.
pub const MAX_BITRATE_BPS: u32 = 8_000_000;
/// Where a new viewer starts.
pub const START_BITRATE_BPS: u32 = 2_500_000;

/// Clamps a bitrate into [`MIN_BITRATE_BPS`]..=[`MAX_BITRATE_BPS`].
pub fn clamp_bitrate(bps: u64) -> u32 {
    bps.clamp(MIN_BITRATE_BPS.into(), MAX_BITRATE_BPS.into()) as u32
}

/// Loss-based rate controller for one viewer.
#[derive(Debug, Clone)]
pub struct LossController {
    bps: u32,
}

impl Default for LossController {
    fn default() -> Self {
        LossController {
            bps: START_BITRATE_BPS,
        }
    }
}

impl LossController {
    /// The current estimate.
    pub fn bitrate(&self) -> u32 {
        self.bps
    }

    /// A receiver report with this loss fraction (0.0..=1.0) arrived;
    /// returns the new estimate.
    pub fn on_loss(&mut self, loss: f32) -> u32 {
        let loss = f64::from(loss.clamp(0.0, 1.0));
        let bps = f64::from(self.bps);
        let next = if loss > 0.10 {
            bps * (1.0 - 0.5 * loss)
        } else if loss < 0.02 {
            bps * 1.08
        } else {
            bps
        };
        self.bps = clamp_bitrate(next as u64);
        self.bps
    }
}

/// Whether a new session rate differs enough from the last one sent to be
/// worth telling the encoder (5 %), so reports don't churn it.
pub fn worth_updating(last: u32, next: u32) -> bool {
    let diff = last.abs_diff(next);
    u64::from(diff) * 20 >= u64::from(last.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamps_to_the_range() {
        assert_eq!(clamp_bitrate(0), MIN_BITRATE_BPS);
        assert_eq!(clamp_bitrate(1_000_000), 1_000_000);
        assert_eq!(clamp_bitrate(u64::MAX), MAX_BITRATE_BPS);
    }

    #[test]
    fn heavy_loss_halves_towards_the_floor_and_clean_links_grow_to_the_cap() {
        let mut c = LossController::default();
        let after = c.on_loss(0.5);
        assert_eq!(after, (f64::from(START_BITRATE_BPS) * 0.75) as u32);
        for _ in 0..100 {
            c.on_loss(1.0);
        }
        assert_eq!(c.bitrate(), MIN_BITRATE_BPS);
        for _ in 0..100 {
            c.on_loss(0.0);
        }
        assert_eq!(c.bitrate(), MAX_BITRATE_BPS);
    }

    #[test]
    fn moderate_loss_holds() {
        let mut c = LossController::default();
        assert_eq!(c.on_loss(0.05), START_BITRATE_BPS);
        assert_eq!(c.on_loss(f32::NAN.max(0.05)), START_BITRATE_BPS);
    }

    #[test]
    fn small_changes_are_not_worth_an_update() {
        assert!(!worth_updating(1_000_000, 1_040_000));
        assert!(worth_updating(1_000_000, 1_050_000));
        assert!(worth_updating(1_000_000, 900_000));
    }
}
