//! Checks customers' domains on schedule: the server holding the
//! [`DOMAIN_CHECKER`] lease looks up each domain whose check is due
//! ([`edge_proto::domains::VerifyState::check_due`]) and records the
//! result; the others wait, so a cluster asks each resolver once.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::state::Shared;

/// The lease of the one server that checks domains.
pub const DOMAIN_CHECKER: &str = "domain-checker";
/// Most lookups in flight at once.
const CONCURRENT_CHECKS: usize = 8;

/// Runs until `shutdown`, then gives the lease up.
pub async fn run(shared: Arc<Shared>, shutdown: CancellationToken) {
    let config = &shared.config.domains;
    let policy = config.policy();
    // Often enough that a due check waits at most a few seconds.
    let period = Duration::from_secs(config.check_interval_secs.clamp(1, 10));
    let ttl_ms = (period.as_millis() as i64 * 3).max(shared.config.cluster.lease_ms as i64);
    let id = shared.cluster.id.clone();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        match shared.store.acquire_lease(DOMAIN_CHECKER, &id, ttl_ms).await {
            Ok(Some(_)) => {}
            Ok(None) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "domain checks: lease unavailable");
                continue;
            }
        }
        let domains = match shared.store.list_domains().await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "domain checks: cannot list the domains");
                continue;
            }
        };
        let now = crate::unix_now();
        let due: Vec<_> = domains.into_iter().filter(|d| d.state.check_due(now, &policy)).collect();
        if due.is_empty() {
            continue;
        }
        let checks = futures_util::stream::iter(due.into_iter().map(|d| {
            let shared = shared.clone();
            async move {
                let result = crate::domains::check_and_record(shared.store.as_ref(), &shared.config.domains, &d).await;
                (d, result)
            }
        }))
        .buffer_unordered(CONCURRENT_CHECKS);
        let mut checks = std::pin::pin!(checks);
        let mut renewed = tokio::time::Instant::now();
        loop {
            // A long batch keeps the lease, or stops when another server
            // took it (its results would race this one's).
            if renewed.elapsed() >= period {
                renewed = tokio::time::Instant::now();
                if !matches!(shared.store.acquire_lease(DOMAIN_CHECKER, &id, ttl_ms).await, Ok(Some(_))) {
                    break;
                }
            }
            let next = tokio::select! {
                _ = shutdown.cancelled() => None,
                next = checks.next() => next,
            };
            let Some((domain, result)) = next else { break };
            shared.metrics.domain_checks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Err(e) = result {
                tracing::warn!(domain = %edge_net::logging::Untrusted(&domain.name), error = %e,
                    "domain check: storing the result failed");
            }
        }
    }
    let _ = shared.store.release_lease(DOMAIN_CHECKER, &id).await;
}
