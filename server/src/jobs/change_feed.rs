//! Follows the store's change feed (and in-memory nudges) and applies each
//! batch to the registry and the zone; reloads everything after a resync.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::state::Shared;
use crate::store::{Change, FeedEvent};
use crate::sync::RoutingSync;

/// Most events applied in one batch.
const MAX_BATCH: usize = 4096;

/// Wait before retrying a failed resync (the store may be down).
const RESYNC_RETRY: Duration = Duration::from_millis(500);

/// Runs until `shutdown`.
pub async fn run(
    shared: Arc<Shared>,
    sync: Arc<RoutingSync>,
    mut feed: broadcast::Receiver<FeedEvent>,
    mut nudges: mpsc::UnboundedReceiver<Change>,
    shutdown: CancellationToken,
) {
    let mut resync = false;
    let mut failing = false;
    loop {
        let mut changes = Vec::new();
        let mut revision = 0;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            event = feed.recv() => match event {
                Ok(FeedEvent::Change(e)) => { revision = e.revision; changes.push(e.change); }
                Ok(FeedEvent::Resync) | Err(RecvError::Lagged(_)) => resync = true,
                Err(RecvError::Closed) => return,
            },
            Some(change) = nudges.recv() => changes.push(change),
            _ = tokio::time::sleep(RESYNC_RETRY), if resync => {}
        }
        // Everything already queued joins the batch: a burst of writes costs
        // one pass over what they touched.
        while changes.len() < MAX_BATCH {
            match feed.try_recv() {
                Ok(FeedEvent::Change(e)) => {
                    revision = revision.max(e.revision);
                    changes.push(e.change);
                }
                Ok(FeedEvent::Resync) | Err(TryRecvError::Lagged(_)) => resync = true,
                Err(TryRecvError::Empty) | Err(TryRecvError::Closed) => break,
            }
        }
        while let Ok(change) = nudges.try_recv() {
            changes.push(change);
        }
        let result = if resync {
            sync.apply_in_memory(&changes);
            let started = std::time::Instant::now();
            match sync.full_reload().await {
                Ok(revision) => {
                    resync = false;
                    shared.metrics.store_resyncs.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        revision,
                        nodes = shared.registry.len(),
                        ms = started.elapsed().as_millis() as u64,
                        "resynced routing state from the store"
                    );
                    Ok(())
                }
                Err(e) => Err(e),
            }
        } else {
            let n = changes.len() as u64;
            let applied = sync.apply(&changes, revision).await;
            if applied.is_ok() {
                shared.metrics.store_changes_applied.fetch_add(n, Ordering::Relaxed);
            } else {
                // What the batch named is re-read with everything else;
                // what needs no store applies now.
                sync.apply_in_memory(&changes);
                resync = true;
            }
            applied
        };
        match result {
            Ok(()) if failing => {
                tracing::info!(store = shared.store.describe(), "routing state follows the store again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "applying store changes failed; serving from memory, retrying");
                    failing = true;
                }
                resync = true;
            }
        }
    }
}
