//! The public TLS listener: read the SNI, route it, splice the raw bytes
//! over a new QUIC stream to the owning node's agent. Nothing is decrypted.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edge_proto::client_hello::{fatal_alert, AlertDescription};
use edge_proto::tunnel::{codes, StreamHeader};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::sni::{read_client_hello, HelloError};
use crate::Shared;

/// Decrements a gauge when dropped, whatever path the task takes.
pub(crate) struct GaugeGuard<'a>(&'a AtomicU64);

impl<'a> GaugeGuard<'a> {
    pub(crate) fn new(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts client connections until `shutdown`; each runs on `tracker`.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken, tracker: TaskTracker) {
    accept_loop(listener, "TLS", shutdown, tracker, move |tcp, peer| {
        shared.metrics.connections_accepted.fetch_add(1, Ordering::Relaxed);
        handle(tcp, peer, shared.clone())
    })
    .await;
}

/// Accepts connections until `shutdown`, running `on_connection`'s future
/// for each on `tracker`. Accept errors (usually EMFILE) back off briefly
/// instead of spinning.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    mut on_connection: F,
) where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                tracker.spawn(on_connection(tcp, peer));
            }
            Err(e) => {
                tracing::warn!(error = %e, listener = what, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracing::info!(listener = what, "listener stopped accepting");
}

async fn handle(mut tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let _open = GaugeGuard::new(&shared.metrics.connections_open);
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let limits = &shared.config.limits;
    let mut hello = Vec::with_capacity(2048);
    let read = tokio::time::timeout(
        Duration::from_millis(limits.client_hello_timeout_ms),
        read_client_hello(&mut tcp, limits.client_hello_max_bytes, &mut hello),
    )
    .await;
    let sni = match read {
        Ok(Ok(sni)) => sni,
        Ok(Err(HelloError::Rejected(rejection))) => {
            shared.metrics.reject(rejection.label());
            tracing::debug!(%peer, reason = %rejection, "rejected client");
            if let Some(alert) = rejection.alert() {
                send_alert(&mut tcp, alert).await;
            }
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "client gone before ClientHello");
            return;
        }
        Err(_) => {
            shared.metrics.reject("timeout");
            tracing::debug!(%peer, bytes = hello.len(), "ClientHello deadline passed");
            return;
        }
    };

    let Some(node) = shared.registry.route(&sni) else {
        shared.metrics.reject("unknown_sni");
        tracing::debug!(%peer, %sni, "no node owns this name");
        send_alert(&mut tcp, AlertDescription::UnrecognizedName).await;
        return;
    };
    let Some(tunnel) = node.pick_tunnel() else {
        // A direct-mode node reached through a stale DNS answer: hand the
        // bytes to its own endpoint (plain L4) rather than drop the client.
        if let Some(endpoint) = node.direct_address().filter(|e| !shared.is_own_address(*e)) {
            return splice_to_endpoint(tcp, &hello, endpoint, &shared, &node).await;
        }
        shared.metrics.reject("node_offline");
        tracing::debug!(%peer, %sni, node = %node.name, "node has no tunnel");
        send_alert(&mut tcp, AlertDescription::InternalError).await;
        return;
    };
    // Cap client connections per node at max_streams per live tunnel (the
    // agent grants the same number of streams per connection), so a flood
    // to one name fails fast instead of queueing on stream credit.
    let cap = u64::from(shared.config.tunnel.max_streams) * node.tunnel_count().max(1) as u64;
    if node.metrics.active.load(Ordering::Relaxed) >= cap {
        shared.metrics.reject("node_busy");
        tracing::debug!(%peer, %sni, node = %node.name, cap, "node at its connection cap");
        send_alert(&mut tcp, AlertDescription::InternalError).await;
        return;
    }
    let open = tokio::time::timeout(Duration::from_millis(limits.open_stream_timeout_ms), tunnel.conn.open_bi()).await;
    let (mut send, recv) = match open {
        Ok(Ok(streams)) => streams,
        other => {
            shared.metrics.reject("tunnel_failed");
            tracing::warn!(%peer, %sni, node = %node.name, timed_out = other.is_err(), "could not open tunnel stream");
            send_alert(&mut tcp, AlertDescription::InternalError).await;
            return;
        }
    };
    let _active = GaugeGuard::new(&node.metrics.active);
    node.metrics.total.fetch_add(1, Ordering::Relaxed);

    let mut first = StreamHeader { client: peer, local, sni, plain: false }.encode();
    first.extend_from_slice(&hello);
    if send.write_all(&first).await.is_err() {
        shared.metrics.reject("tunnel_failed");
        edge_net::splice::reset_tcp(&tcp);
        return;
    }
    node.metrics.bytes.tcp_to_quic.fetch_add(hello.len() as u64, Ordering::Relaxed);
    drop(hello);
    drop(first);
    let idle = Duration::from_secs(limits.idle_timeout_secs);
    let end = edge_net::splice::splice(tcp, send, recv, codes::STREAM_CLIENT_ABORTED, &node.metrics.bytes, idle).await;
    tracing::trace!(%peer, node = %node.name, ?end, "connection finished");
}

/// Splices a client to a direct-mode node's endpoint, replaying the hello.
async fn splice_to_endpoint(
    mut tcp: TcpStream,
    hello: &[u8],
    endpoint: SocketAddr,
    shared: &Shared,
    node: &crate::registry::NodeHandle,
) {
    let limits = &shared.config.limits;
    let connect =
        tokio::time::timeout(Duration::from_millis(limits.open_stream_timeout_ms), TcpStream::connect(endpoint));
    let mut upstream = match connect.await {
        Ok(Ok(u)) => u,
        _ => {
            shared.metrics.reject("node_offline");
            tracing::debug!(node = %node.name, %endpoint, "direct endpoint unreachable and no tunnel");
            send_alert(&mut tcp, AlertDescription::InternalError).await;
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let _active = GaugeGuard::new(&node.metrics.active);
    node.metrics.total.fetch_add(1, Ordering::Relaxed);
    if upstream.write_all(hello).await.is_err() {
        return;
    }
    node.metrics.bytes.tcp_to_quic.fetch_add(hello.len() as u64, Ordering::Relaxed);
    let idle = Duration::from_secs(limits.idle_timeout_secs);
    let end = edge_net::splice::splice_tcp(tcp, upstream, &node.metrics.bytes, idle).await;
    tracing::trace!(node = %node.name, ?end, "direct fallback connection finished");
}

/// Best effort: one fatal alert, bounded in time, then the caller drops.
async fn send_alert(tcp: &mut TcpStream, alert: AlertDescription) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        tcp.write_all(&fatal_alert(alert)).await?;
        tcp.shutdown().await
    })
    .await;
}
