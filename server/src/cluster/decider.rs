//! One mode decider for the cluster: the server holding the
//! [`MODE_DECIDER`] lease runs the probe rounds and writes transitions,
//! each write fenced by the lease's token (a stalled former decider's
//! writes are refused). The others follow the store. Renewed every
//! `cluster.renew_ms`; a decider that cannot renew stops deciding before
//! its lease could have run out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::state::Shared;
use crate::store::{Fence, MODE_DECIDER};

/// Runs until `shutdown`, then gives the lease up.
pub async fn run(shared: Arc<Shared>, shutdown: CancellationToken) {
    let cfg = &shared.config.cluster;
    let ttl = Duration::from_millis(cfg.decider_lease_ms);
    let renew = Duration::from_millis(cfg.renew_ms);
    let id = shared.cluster.id.clone();
    let mut tick = tokio::time::interval(renew);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When the lease was last confirmed (measured before asking: the
    // database's clock started no earlier).
    let mut confirmed: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let asked = Instant::now();
        match shared.store.acquire_lease(MODE_DECIDER, &id, ttl.as_millis() as i64).await {
            Ok(Some(token)) => {
                confirmed = Some(asked);
                let previous = shared.cluster.decider_fence();
                if previous.as_ref().map(|f| f.token) != Some(token) {
                    tracing::info!(token, "this server now decides nodes' modes");
                    // Start from the store's modes: the previous decider's
                    // last writes may not have reached this registry yet.
                    if let Err(e) = adopt_stored_modes(&shared).await {
                        tracing::warn!(error = %e, "could not read the stored modes; not deciding yet");
                        continue;
                    }
                }
                shared.cluster.set_decider(Some(Fence { lease: MODE_DECIDER.into(), holder: id.clone(), token }));
            }
            Ok(None) => {
                confirmed = None;
                if shared.cluster.is_decider() {
                    tracing::warn!("another server took the mode decider lease; following it");
                    step_down(&shared).await;
                }
            }
            Err(e) => {
                // The lease may still hold in the store; this server cannot
                // tell, so it stops a renewal interval before it would run out.
                let stale = confirmed.is_none_or(|at| at.elapsed() + renew >= ttl);
                if stale && shared.cluster.is_decider() {
                    tracing::warn!(error = %e, "cannot renew the mode decider lease; no longer deciding");
                    step_down(&shared).await;
                }
            }
        }
    }
    if shared.cluster.is_decider() {
        shared.cluster.set_decider(None);
        // A retiring process's successor holds the lease under the same id.
        if !shared.retiring.load(std::sync::atomic::Ordering::Acquire) {
            let _ = tokio::time::timeout(Duration::from_secs(1), shared.store.release_lease(MODE_DECIDER, &id)).await;
        }
    }
}

/// Stops deciding and takes the stored modes (what this server decided in
/// memory but could not write must not outlive its term); the zone
/// follows. If the store is unreachable now, the change feed's resync
/// brings them when it is back.
async fn step_down(shared: &Shared) {
    shared.cluster.set_decider(None);
    if adopt_stored_modes(shared).await.is_ok() {
        for node in shared.registry.nodes() {
            shared.nudge(crate::store::Change::ModeChanged(node.name.clone()));
        }
    }
}

/// Sets every node's mode from the store.
async fn adopt_stored_modes(shared: &Shared) -> Result<(), crate::store::StoreError> {
    for record in shared.store.list_nodes().await? {
        if let Some(node) = shared.registry.node(&record.name) {
            node.adopt_mode(record.mode, record.endpoint.as_deref().and_then(|e| e.parse().ok()));
        }
    }
    Ok(())
}
