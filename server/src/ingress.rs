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

use crate::limits::{Admission, Listener, Refusal};
use crate::registry::{clock_ms, NodeHandle};
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
    let admitted = shared.clone();
    accept_loop(
        listener,
        &admitted,
        |s| &s.admission.tls,
        shutdown,
        tracker,
        move |tcp, peer| {
            shared.metrics.connections_accepted.fetch_add(1, Ordering::Relaxed);
            handle(tcp, peer, shared.clone())
        },
    )
    .await;
}

/// Accepts connections until `shutdown`, running `on_connection`'s future
/// for each on `tracker` once `admission` lets it in (refused ones are
/// reset at once and counted). Accept errors (usually EMFILE) back off
/// briefly instead of spinning.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    shared: &Shared,
    admission: fn(&Shared) -> &Admission,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    mut on_connection: F,
) where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let admission = admission(shared);
    let what = admission.listener().label();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => match admission.admit(peer.ip()) {
                Ok(permit) => {
                    let connection = on_connection(tcp, peer);
                    tracker.spawn(async move {
                        let _permit = permit;
                        connection.await
                    });
                }
                Err(reason) => {
                    shared.refusals.refuse(admission.listener(), reason, peer.ip());
                    edge_net::splice::reset_tcp(&tcp);
                }
            },
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
    let limits = shared.limits();
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

    if shared.self_loops.is_ours(peer, &hello) {
        // A probe or fallback splice of ours that came back (a forwarder
        // or NAT hairpin the endpoint rules could not see).
        shared.metrics.reject("self_loop");
        tracing::debug!(%peer, %sni, "refused a connection of our own that came back to us");
        return;
    }
    let Some(node) = shared.registry.route(&sni) else {
        shared.metrics.reject("unknown_sni");
        tracing::debug!(%peer, %sni, "no node owns this name");
        send_alert(&mut tcp, AlertDescription::UnrecognizedName).await;
        return;
    };
    if !shared.access.allows(&node.name, &edge_proto::access::Scope::Host(sni.clone()), peer.ip()) {
        shared.metrics.reject("access_denied");
        send_alert(&mut tcp, AlertDescription::AccessDenied).await;
        return;
    }
    let tunnels = node.tunnel_count();
    if tunnels == 0 {
        // A direct-mode node reached through a stale DNS answer: hand the
        // bytes to its own endpoint (plain L4) rather than drop the client.
        if let Some(endpoint) = node.direct_address().filter(|e| !shared.is_own_address(*e)) {
            return splice_to_endpoint(tcp, &hello, endpoint, &shared, &node).await;
        }
        // Else a peer server with a tunnel to the node (its agent has not
        // reached this server yet, or cannot): one hop through that peer.
        if !shared.peers.peer_has_tunnel(&shared, &node.name).await {
            shared.metrics.reject("node_offline");
            tracing::debug!(%peer, %sni, node = %node.name, "node has no tunnel");
            send_alert(&mut tcp, AlertDescription::InternalError).await;
            return;
        }
    }
    let via_peer = tunnels == 0;
    // Cap client connections per node: the configured cap, and at most
    // max_streams per live tunnel (the agent grants that many streams per
    // connection), so a flood to one name fails fast instead of queueing
    // on stream credit.
    let per_tunnel = u64::from(shared.config.tunnel.max_streams) * tunnels.max(1) as u64;
    let cap = per_tunnel.min(limits.max_connections_per_node);
    if node.metrics.active.load(Ordering::Relaxed) >= cap {
        shared.metrics.reject("node_busy");
        shared.refusals.refuse(Listener::Tls, Refusal::NodeBusy, peer.ip());
        send_alert(&mut tcp, AlertDescription::InternalError).await;
        return;
    }
    let _active = GaugeGuard::new(&node.metrics.active);
    let mut first = StreamHeader { client: peer, local, sni: sni.clone(), plain: false, service: None }.encode();
    first.extend_from_slice(&hello);
    let placed = if via_peer {
        let within = Duration::from_secs(limits.idle_timeout_secs);
        shared
            .peers
            .place(&shared, &node, &first, within)
            .await
            .map(|a| a.into_answered(shared.peers.stalls()))
            .map_err(PlaceError::Peer)
    } else {
        place(&node, &first, &shared).await
    };
    let answered = match placed {
        Ok(answered) => answered,
        Err(e) => {
            shared.metrics.reject("tunnel_failed");
            static LOG: std::sync::LazyLock<edge_net::logging::Throttle> =
                std::sync::LazyLock::new(|| edge_net::logging::Throttle::new(crate::limits::LOG_EVERY));
            if let Some(suppressed) = LOG.due() {
                tracing::warn!(%peer, %sni, node = %node.name, error = %e, suppressed,
                    "no tunnel of the node answered (logged at most every 10 s)");
            }
            if e.agent_answered() {
                edge_net::splice::reset_tcp(&tcp);
            } else {
                send_alert(&mut tcp, AlertDescription::InternalError).await;
            }
            return;
        }
    };
    if via_peer {
        shared.metrics.peer_forwarded.fetch_add(1, Ordering::Relaxed);
    }
    node.metrics.total.fetch_add(1, Ordering::Relaxed);
    node.metrics.bytes.tcp_to_quic.fetch_add(hello.len() as u64, Ordering::Relaxed);
    drop(hello);
    drop(first);
    let Answered { send, recv, first_bytes, stalls } = answered;
    let idle = Duration::from_secs(limits.idle_timeout_secs);
    if !first_bytes.is_empty() {
        let written = tokio::time::timeout(idle, tcp.write_all(&first_bytes)).await;
        if !matches!(written, Ok(Ok(()))) {
            drop((send, recv));
            edge_net::splice::reset_tcp(&tcp);
            return;
        }
        node.metrics.bytes.quic_to_tcp.fetch_add(first_bytes.len() as u64, Ordering::Relaxed);
    }
    drop(first_bytes);
    let end =
        edge_net::splice::splice(tcp, send, recv, codes::STREAM_CLIENT_ABORTED, &node.metrics.bytes, idle, &stalls)
            .await;
    if end == edge_net::splice::SpliceEnd::Shed {
        node.metrics.shed.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%peer, node = %node.name, "client stopped reading while the tunnel needed the window; reset");
    }
    tracing::trace!(%peer, node = %node.name, ?end, "connection finished");
}

/// A data stream the agent has answered on, with its first bytes.
pub(crate) struct Answered {
    pub(crate) send: quinn::SendStream,
    pub(crate) recv: quinn::RecvStream,
    pub(crate) first_bytes: bytes::Bytes,
    /// The stall budget of the tunnel the stream is on.
    pub(crate) stalls: std::sync::Arc<edge_net::stall::StallBudget>,
}

/// Why no tunnel took a client connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PlaceError {
    /// Every tunnel tried failed at the connection level, or none is left.
    #[error("no usable tunnel after {tried} attempt(s)")]
    NoTunnel { tried: usize },
    /// The agent reset the stream before answering (TLS or upstream
    /// failure on its side): a verdict, not a reason to try elsewhere.
    #[error("agent reset the stream with code {0}")]
    AgentReset(u64),
    /// Nothing came back within the idle timeout.
    #[error("agent did not answer within the idle timeout")]
    Silent,
    /// Through a peer server (this one had no tunnel).
    #[error("through a peer: {0}")]
    Peer(crate::cluster::peers::PeerError),
}

impl PlaceError {
    fn agent_answered(&self) -> bool {
        matches!(self, PlaceError::AgentReset(_) | PlaceError::Peer(crate::cluster::peers::PeerError::AgentReset(_)))
    }

    /// The agent's reset code, when the agent gave a verdict.
    pub(crate) fn agent_code(&self) -> Option<u64> {
        match self {
            PlaceError::AgentReset(code) => Some(*code),
            _ => None,
        }
    }
}

/// Tries at most this many tunnels for one client connection.
const MAX_PLACEMENTS: usize = 4;
/// How long a tunnel that left a stream unanswered is avoided.
const AVOID_MS: u64 = 10_000;

/// Opens a data stream on one of the node's tunnels, sends `first` (header
/// and replayed ClientHello) and waits for the agent's first bytes.
///
/// Nothing has reached the client yet, so if the connection under the
/// stream is lost, or nothing comes back within `agent_answer_timeout_ms`
/// while another tunnel is up (a killed agent whose connection has not
/// timed out yet), the same bytes go to the next tunnel: losing one tunnel
/// or one replica loses no new client connection. Replaying a ClientHello
/// is harmless; agents accept no 0-RTT data.
pub(crate) async fn place(node: &NodeHandle, first: &[u8], shared: &Shared) -> Result<Answered, PlaceError> {
    let limits = shared.limits();
    let mut excluded: Vec<u64> = Vec::new();
    // One bound for the whole placement, however many tunnels are tried.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(limits.idle_timeout_secs);
    while excluded.len() < MAX_PLACEMENTS {
        let Some(tunnel) = node.pick_tunnel(&excluded) else { break };
        excluded.push(tunnel.id);
        let open = tokio::time::timeout(Duration::from_millis(limits.open_stream_timeout_ms), tunnel.conn.open_bi());
        let Ok(Ok((mut send, mut recv))) = open.await else { continue };
        // Bounded too: a tunnel whose flow-control credit is held by
        // stalled streams must not park the client.
        let written =
            tokio::time::timeout(Duration::from_millis(limits.agent_answer_timeout_ms), send.write_all(first));
        if !matches!(written.await, Ok(Ok(()))) {
            let _ = send.reset(quinn::VarInt::from_u32(codes::STREAM_CLIENT_ABORTED));
            continue;
        }
        // Datagrams the agent has sent on this connection so far: a live
        // agent at least acknowledges what we just wrote.
        let heard_before = tunnel.conn.stats().udp_rx.datagrams;
        let answer = tokio::time::sleep(Duration::from_millis(limits.agent_answer_timeout_ms));
        let silent = tokio::time::sleep_until(give_up);
        tokio::pin!(answer, silent);
        let mut waited = false;
        let moved_on = loop {
            tokio::select! {
                read = recv.read_chunk(64 * 1024, true) => match read {
                    Ok(Some(chunk)) => {
                        return Ok(Answered { send, recv, first_bytes: chunk.bytes, stalls: tunnel.stalls.clone() })
                    }
                    Ok(None) => {
                        let stalls = tunnel.stalls.clone();
                        return Ok(Answered { send, recv, first_bytes: bytes::Bytes::new(), stalls });
                    }
                    Err(quinn::ReadError::Reset(code)) => return Err(PlaceError::AgentReset(code.into_inner())),
                    Err(_) => break true,
                },
                _ = &mut answer, if !waited => {
                    waited = true;
                    // Only a silent peer counts as dead: an agent that is
                    // alive but slow (its upstream takes long to accept) keeps
                    // the stream, or every connection would cost the
                    // upstream one attempt per tunnel.
                    let silent_peer = tunnel.conn.stats().udp_rx.datagrams == heard_before;
                    if silent_peer && excluded.len() < MAX_PLACEMENTS && node.pick_tunnel(&excluded).is_some() {
                        tunnel.state.avoid_until_ms.store(clock_ms() + AVOID_MS, Ordering::Relaxed);
                        tracing::warn!(node = %node.name, tunnel = tunnel.id, remote = %tunnel.conn.remote_address(),
                            "agent did not answer a stream in time; trying another tunnel");
                        break true;
                    }
                }
                _ = &mut silent => return Err(PlaceError::Silent),
            }
        };
        if moved_on {
            let _ = send.reset(quinn::VarInt::from_u32(codes::STREAM_CLIENT_ABORTED));
            let _ = recv.stop(quinn::VarInt::from_u32(codes::STREAM_CLIENT_ABORTED));
        }
    }
    Err(PlaceError::NoTunnel { tried: excluded.len() })
}

/// Splices a client to a direct-mode node's endpoint, replaying the hello.
async fn splice_to_endpoint(
    mut tcp: TcpStream,
    hello: &[u8],
    endpoint: SocketAddr,
    shared: &Shared,
    node: &crate::registry::NodeHandle,
) {
    let limits = shared.limits();
    let deadline = Duration::from_millis(limits.open_stream_timeout_ms);
    // Registered as ours, with the hello it carries: if the endpoint leads
    // back to us, the second hop is refused instead of looping.
    let _forwarding = shared.self_loops.forwarding(hello);
    let (mut upstream, _own) = match tokio::time::timeout(deadline, shared.self_loops.connect(endpoint)).await {
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
    if !matches!(tokio::time::timeout(deadline, upstream.write_all(hello)).await, Ok(Ok(()))) {
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
