//! Keeps this server's row in the store live: renews its lease every
//! `cluster.renew_ms` with the nodes it holds tunnels to, declares servers
//! whose lease ran out gone, re-reads the members, and leaves at shutdown
//! so the others drop it at once rather than after the lease.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::state::Shared;
use crate::store::ServerRecord;

/// How long leaving at shutdown may take.
const LEAVE_DEADLINE: Duration = Duration::from_secs(2);
/// Least time between two renewals woken by tunnel changes (a reconnect
/// storm costs a few writes per second, not one per agent).
const TUNNEL_DEBOUNCE: Duration = Duration::from_millis(100);

/// Runs until `shutdown`, then leaves the cluster.
pub async fn run(shared: Arc<Shared>, record: ServerRecord, shutdown: CancellationToken) {
    let cfg = &shared.config.cluster;
    let lease = cfg.lease_ms as i64;
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.renew_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    // Others are declared gone only by a server that has itself renewed for
    // a whole lease: after an outage of the store every lease has run out,
    // and the first server back must not declare the others gone before
    // they had a chance to renew.
    let mut renewing_since = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
            _ = shared.cluster.tunnels_changed() => tokio::time::sleep(TUNNEL_DEBOUNCE).await,
        }
        let may_expire = renewing_since.elapsed() >= Duration::from_millis(cfg.lease_ms);
        let result = renew(&shared, &record, lease, may_expire).await;
        if result.is_err() {
            renewing_since = tokio::time::Instant::now();
        }
        match result {
            Ok(()) if failing => {
                tracing::info!("cluster lease renewed again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "renewing the cluster lease failed; retrying");
                    failing = true;
                }
            }
        }
    }
    if shared.retiring.load(std::sync::atomic::Ordering::Acquire) {
        // The successor renews this server's row from now on.
        return;
    }
    match tokio::time::timeout(LEAVE_DEADLINE, shared.store.leave_server(&record.id)).await {
        Ok(Ok(())) => tracing::info!(server = %record.name, "left the cluster"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not leave the cluster; the others drop this server when its lease runs out")
        }
        Err(_) => tracing::warn!("leaving the cluster timed out; the others drop this server when its lease runs out"),
    }
}

async fn renew(
    shared: &Shared,
    record: &ServerRecord,
    lease: i64,
    may_expire: bool,
) -> Result<(), crate::store::StoreError> {
    let mut tunnels: Vec<String> =
        shared.registry.nodes().iter().filter(|n| n.tunnel_count() > 0).map(|n| n.name.clone()).collect();
    tunnels.sort();
    if !shared.store.renew_server(&record.id, lease, &tunnels).await? {
        // Declared gone while away (a partition, a long pause): back in.
        tracing::warn!(server = %record.name, "this server had been declared gone; registering again");
        shared.store.register_server(record, lease).await?;
        shared.store.renew_server(&record.id, lease, &tunnels).await?;
    }
    if may_expire {
        let expired = shared.store.expire_servers().await?;
        if expired > 0 {
            tracing::info!(expired, "declared servers whose lease ran out gone");
        }
    }
    shared.cluster.set_members(shared.store.list_servers().await?);
    Ok(())
}
