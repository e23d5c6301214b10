//! Keeps the zone's HTTPS records (`alpn="h3"`) in step with the nodes
//! whose QUIC clients this server carries now: a node gets its record when
//! a tunnel of an agent serving HTTP/3 comes up, and loses it when the
//! last one goes.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::dns::ZoneCell;
use crate::quic_clients::QuicClients;

/// Runs until `shutdown`. `port` is the QUIC listener's port when it is
/// not the TLS port (the records then name it).
pub async fn run(clients: Arc<QuicClients>, zone: Arc<ZoneCell>, port: Option<u16>, shutdown: CancellationToken) {
    let mut served = clients.served_nodes();
    loop {
        let nodes = served.borrow_and_update().clone();
        zone.set_http3(&nodes, port);
        tracing::debug!(nodes = nodes.len(), "HTTPS records follow the nodes serving HTTP/3");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = served.changed() => if changed.is_err() { return },
        }
    }
}
