//! Writes live node status to the store every few seconds (and soon after
//! an agent connects or leaves), only for nodes whose status changed, in one
//! transaction per round.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::state::Shared;
use crate::store::NodeStatus;

/// Time between flushes.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// Runs until `shutdown`, with a last flush then.
pub async fn run(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut written: HashMap<String, NodeStatus> = HashMap::new();
    let mut failing = false;
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let last = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = tick.tick() => false,
            _ = shared.status_changed.notified() => {
                // Coalesce a burst of connects into one write.
                tokio::time::sleep(Duration::from_millis(50)).await;
                false
            }
        };
        // A retiring process's status is its successor's to write.
        if last && shared.retiring.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let nodes = shared.registry.nodes();
        let members = shared.cluster.members();
        let changed: Vec<(String, NodeStatus)> = nodes
            .iter()
            .map(|n| (n.name.clone(), n.stored_status()))
            // The status row is one per node: a server without a tunnel to
            // it leaves the row to a peer that has one.
            .filter(|(name, status)| status.connected || !members.peer_has_tunnel(&shared.cluster.id, name))
            .filter(|(name, status)| written.get(name) != Some(status))
            .collect();
        match shared.store.record_statuses(&changed).await {
            Ok(()) => {
                if failing {
                    tracing::info!(store = shared.store.describe(), "recording node status works again");
                    failing = false;
                }
                written.retain(|name, _| shared.registry.node(name).is_some());
                written.extend(changed);
            }
            // One line per outage, not one per node and round.
            Err(e) if !failing => {
                tracing::warn!(error = %e, nodes = changed.len(), "recording node status failed; retrying");
                failing = true;
            }
            Err(_) => {}
        }
        if last {
            return;
        }
    }
}
