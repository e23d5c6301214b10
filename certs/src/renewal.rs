//! When to renew a certificate and how long to wait after a failed attempt.
//! Pure functions of times and a random draw, so every rule is tested
//! without a clock or a CA.

use std::time::Duration;

/// When a certificate is due for renewal.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RenewalPolicy {
    /// Renew once this fraction of the lifetime (not_before → not_after)
    /// has passed. Default 2/3: a 90-day certificate renews at day 60.
    pub fraction: f64,
    /// Renew this many seconds after the certificate was obtained instead,
    /// when sooner (for short test lifetimes and operators who want it).
    pub renew_after_secs: Option<u64>,
    /// First delay after a failed attempt; doubles up to `retry_max_secs`.
    pub retry_initial_secs: f64,
    /// Largest delay between attempts. Attempts never stop: a CA outage of
    /// days is retried for days while the current certificate is served.
    pub retry_max_secs: u64,
}

impl Default for RenewalPolicy {
    fn default() -> Self {
        Self { fraction: 2.0 / 3.0, renew_after_secs: None, retry_initial_secs: 30.0, retry_max_secs: 6 * 3600 }
    }
}

impl RenewalPolicy {
    /// Checks ranges; the message names the field under `prefix`.
    pub fn validate(&self, prefix: &str) -> Result<(), String> {
        if !(self.fraction > 0.0 && self.fraction < 1.0) {
            return Err(format!("{prefix}.fraction = {} must be between 0 and 1 (exclusive)", self.fraction));
        }
        if !(self.retry_initial_secs >= 0.01 && self.retry_initial_secs <= self.retry_max_secs as f64) {
            return Err(format!(
                "{prefix}.retry_initial_secs = {} must be at least 0.01 and at most {prefix}.retry_max_secs = {}",
                self.retry_initial_secs, self.retry_max_secs
            ));
        }
        Ok(())
    }

    /// Unix second at which to renew. `obtained_at` is when this process
    /// stored the certificate; `ari_window` is the CA's suggested window
    /// (ACME Renewal Info), if it offers one; `draw` is uniform in [0, 1)
    /// and picks the moment inside that window, so a fleet does not renew
    /// in one burst. The earliest of the rules wins.
    pub fn renew_at(
        &self,
        not_before: i64,
        not_after: i64,
        obtained_at: i64,
        ari_window: Option<(i64, i64)>,
        draw: f64,
    ) -> i64 {
        let lifetime = (not_after - not_before).max(0) as f64;
        let mut at = not_before + (lifetime * self.fraction) as i64;
        if let Some(after) = self.renew_after_secs {
            at = at.min(obtained_at.saturating_add(after as i64));
        }
        if let Some((start, end)) = ari_window.filter(|(s, e)| e >= s) {
            let pick = start + ((end - start) as f64 * draw.clamp(0.0, 1.0)) as i64;
            at = at.min(pick);
        }
        at.min(not_after)
    }

    /// Delay before retry number `attempt` (0 for the first retry): doubling
    /// from `retry_initial_secs`, capped at `retry_max_secs`, then spread by
    /// ±25% with `draw` (uniform in [0, 1)).
    pub fn retry_delay(&self, attempt: u32, draw: f64) -> Duration {
        let base = self.retry_initial_secs * 2f64.powi(attempt.min(60) as i32);
        let capped = base.min(self.retry_max_secs as f64);
        let spread = 0.75 + 0.5 * draw.clamp(0.0, 1.0);
        Duration::from_secs_f64((capped * spread).min(self.retry_max_secs as f64 * 1.25))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    #[test]
    fn two_thirds_of_lifetime_by_default() {
        let p = RenewalPolicy::default();
        assert_eq!(p.renew_at(0, 90 * DAY, 0, None, 0.5), 60 * DAY);
    }

    #[test]
    fn renew_after_and_ari_can_only_bring_it_forward() {
        let p = RenewalPolicy { renew_after_secs: Some(5), ..Default::default() };
        assert_eq!(p.renew_at(0, 90 * DAY, 1000, None, 0.0), 1005);
        let p = RenewalPolicy::default();
        assert_eq!(p.renew_at(0, 90 * DAY, 0, Some((10 * DAY, 12 * DAY)), 0.5), 11 * DAY);
        assert_eq!(p.renew_at(0, 90 * DAY, 0, Some((70 * DAY, 80 * DAY)), 0.5), 60 * DAY);
        // A reversed window is ignored; nothing is later than expiry.
        assert_eq!(p.renew_at(0, 90 * DAY, 0, Some((12 * DAY, 10 * DAY)), 0.5), 60 * DAY);
        let p = RenewalPolicy { renew_after_secs: Some(u64::MAX), ..Default::default() };
        assert_eq!(p.renew_at(0, 90 * DAY, i64::MAX - 1, None, 0.0), 60 * DAY);
    }

    #[test]
    fn retries_double_then_cap_and_never_stop() {
        let p = RenewalPolicy::default();
        let mid = |n| p.retry_delay(n, 0.5).as_secs();
        assert_eq!((mid(0), mid(1), mid(2)), (30, 60, 120));
        assert_eq!(mid(20), 6 * 3600);
        assert_eq!(mid(u32::MAX), 6 * 3600);
        assert!(p.retry_delay(0, 0.0) < p.retry_delay(0, 0.99));
        // Days of retries at the cap: the schedule keeps going.
        let total: u64 = (0..40).map(|n| p.retry_delay(n, 0.5).as_secs()).sum();
        assert!(total > 3 * DAY as u64);
    }

    #[test]
    fn validation_names_fields() {
        let bad = RenewalPolicy { fraction: 1.5, ..Default::default() };
        assert!(bad.validate("acme.renewal").unwrap_err().contains("acme.renewal.fraction"));
        let bad = RenewalPolicy { retry_initial_secs: 0.0, ..Default::default() };
        assert!(bad.validate("acme.renewal").unwrap_err().contains("retry_initial_secs"));
    }
}
