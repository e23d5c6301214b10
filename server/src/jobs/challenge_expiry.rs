//! Removes DNS-01 values an agent published and never removed (it crashed).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::certificates::CHALLENGE_LIFETIME_SECS;
use crate::state::Shared;

/// Time between sweeps.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Runs until `shutdown`.
pub async fn run(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let before = crate::unix_now() - CHALLENGE_LIFETIME_SECS;
        match shared.store.expire_challenges(before).await {
            Ok(n) if n > 0 => tracing::info!(expired = n, "removed stale DNS-01 TXT values"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "expiring DNS-01 TXT values failed"),
        }
    }
}
