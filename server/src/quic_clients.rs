//! QUIC clients (HTTP/3) on UDP (issue 17): each datagram goes to the
//! tunnel of the node its client is talking to, decided by the sans-IO
//! [`QuicRouter`] (the SNI of a first flight, or the route in a connection
//! ID the node's endpoint issued). It crosses in one QUIC DATAGRAM frame of
//! the tunnel ([`edge_proto::quic_datagram`]); the agent's QUIC endpoint
//! terminates it, so nothing is decrypted here.
//!
//! The agent's answers come back the same way and leave from this socket,
//! but only to an address that sent datagrams to that tunnel's route
//! lately: no node can make the server send UDP to an address of its
//! choosing.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use edge_proto::quic_datagram;
use edge_proto::quic_route::{DropReason, Limits, QuicRouter, RouteId, Verdict};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::Shared;

/// Largest datagram read from a client (QUIC datagrams are at most this).
const MAX_DATAGRAM: usize = 65_527;

/// Counters of the QUIC client listener.
#[derive(Debug, Default)]
pub struct QuicClientMetrics {
    /// Datagrams from clients carried to a tunnel.
    pub to_node_datagrams: AtomicU64,
    /// Bytes of those.
    pub to_node_bytes: AtomicU64,
    /// Datagrams of agents sent to clients.
    pub to_client_datagrams: AtomicU64,
    /// Bytes of those.
    pub to_client_bytes: AtomicU64,
    /// Version Negotiation packets sent.
    pub version_negotiation: AtomicU64,
    /// First flights routed by their SNI (new client connections).
    pub connections_routed: AtomicU64,
    /// Datagrams of first flights held until their ClientHello was whole
    /// (a post-quantum ClientHello spans two or more).
    pub first_flight_buffered: AtomicU64,
    /// Client datagrams dropped, by [`DropReason`].
    dropped: [AtomicU64; DropReason::ALL.len()],
    /// Client datagrams the tunnel could not take (too large for its path
    /// now, or the tunnel was gone).
    pub tunnel_refused: AtomicU64,
    /// Agent datagrams not sent: their address sent nothing to the route.
    pub answers_refused: AtomicU64,
    /// Client datagrams carried on tunnel streams (too large for a
    /// DATAGRAM frame of the tunnel then).
    pub to_node_streamed: AtomicU64,
    /// Agent datagrams that arrived on tunnel streams.
    pub to_client_streamed: AtomicU64,
}

impl QuicClientMetrics {
    fn drop_for(&self, reason: DropReason) {
        if let Some(i) = DropReason::ALL.iter().position(|r| *r == reason) {
            self.dropped[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One tunnel that carries QUIC clients.
#[derive(Debug, Clone)]
struct RouteEntry {
    conn: quinn::Connection,
    node: String,
    /// Frame streams, when the agent takes them.
    streams: Option<edge_net::frame_streams::FrameStreams>,
    /// The tunnel's state, once listed: a leaving tunnel takes no new
    /// clients while another is up.
    state: Option<Arc<crate::registry::TunnelState>>,
}

/// The listener's shared state: the socket, the router, the routes.
#[derive(Debug)]
pub struct QuicClients {
    socket: UdpSocket,
    /// Whether the socket is IPv6 (dual-stack: IPv4 clients are reached by
    /// their mapped form), read once rather than per datagram.
    ipv6: bool,
    router: Mutex<QuicRouter>,
    routes: RwLock<HashMap<RouteId, RouteEntry>>,
    next_route: AtomicU32,
    /// The nodes with a live route, for the zone's HTTPS records.
    served: tokio::sync::watch::Sender<Arc<BTreeSet<String>>>,
    /// Counters.
    pub metrics: QuicClientMetrics,
}

impl QuicClients {
    /// State around a bound socket.
    pub fn new(socket: std::net::UdpSocket) -> std::io::Result<Arc<Self>> {
        socket.set_nonblocking(true)?;
        let ipv6 = socket.local_addr()?.is_ipv6();
        Ok(Arc::new(Self {
            ipv6,
            socket: UdpSocket::from_std(socket)?,
            router: Mutex::new(QuicRouter::new(Limits::default())),
            routes: RwLock::new(HashMap::new()),
            // Random start: a route of a previous run is not reused at once.
            next_route: AtomicU32::new(rand::random::<u32>() | 1),
            served: tokio::sync::watch::Sender::new(Arc::default()),
            metrics: QuicClientMetrics::default(),
        }))
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Gives a tunnel of `node` a route; its QUIC clients flow until the
    /// returned guard is dropped. With `streams` (the agent announced
    /// them), frames too large for a DATAGRAM frame go on frame streams.
    pub fn register(self: &Arc<Self>, conn: &quinn::Connection, node: &str, streams: bool) -> RouteGuard {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        let route = loop {
            let candidate = RouteId(self.next_route.fetch_add(1, Ordering::Relaxed));
            if !routes.contains_key(&candidate) {
                break candidate;
            }
        };
        let streams = streams.then(|| edge_net::frame_streams::FrameStreams::new(conn.clone()));
        routes.insert(route, RouteEntry { conn: conn.clone(), node: node.to_string(), streams, state: None });
        self.publish_served(&routes);
        RouteGuard { clients: self.clone(), route }
    }

    /// The nodes that have a route now, updated as tunnels come and go.
    pub fn served_nodes(&self) -> tokio::sync::watch::Receiver<Arc<BTreeSet<String>>> {
        self.served.subscribe()
    }

    /// Publishes the set of nodes with a route (called with the routes
    /// locked, so changes publish in order).
    fn publish_served(&self, routes: &HashMap<RouteId, RouteEntry>) {
        let nodes: BTreeSet<String> = routes.values().map(|e| e.node.clone()).collect();
        self.served.send_if_modified(|served| {
            let changed = **served != nodes;
            if changed {
                *served = Arc::new(nodes);
            }
            changed
        });
    }

    /// Links a route to its tunnel's state (listed after the welcome).
    pub fn set_state(&self, route: RouteId, state: Arc<crate::registry::TunnelState>) {
        if let Some(entry) = self.routes.write().unwrap_or_else(|p| p.into_inner()).get_mut(&route) {
            entry.state = Some(state);
        }
    }

    fn live(&self, route: RouteId) -> bool {
        self.routes.read().unwrap_or_else(|p| p.into_inner()).contains_key(&route)
    }

    /// A route of `node` for a new client: one whose tunnel is not leaving
    /// when there is one, the most recently assigned among those.
    fn route_of(&self, node: &str) -> Option<RouteId> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        let leaving = |e: &RouteEntry| e.state.as_ref().is_some_and(|s| s.leaving.load(Ordering::Relaxed));
        routes.iter().filter(|(_, e)| e.node == node).max_by_key(|(r, e)| (!leaving(e), r.0)).map(|(r, _)| *r)
    }

    /// Carries the datagrams the agent sends on `route`'s tunnel to their
    /// clients, until the tunnel closes.
    /// With `streams`, frames too large for a DATAGRAM frame arrive on
    /// frame streams too.
    pub async fn carry_answers(&self, route: RouteId, conn: &quinn::Connection, streams: bool) {
        // Each read lives at most STREAM_DEADLINE; the agent may have only
        // STREAMS_IN_FLIGHT streams open at once.
        let mut reads = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                frame = conn.read_datagram() => match frame {
                    Ok(frame) => self.answer(route, &frame),
                    Err(_) => break,
                },
                recv = conn.accept_uni() => match recv {
                    Ok(recv) if streams => {
                        reads.spawn(edge_net::frame_streams::read(recv));
                    }
                    // Not negotiated: nothing of it is kept.
                    Ok(mut recv) => {
                        let _ = recv.stop(quinn::VarInt::from_u32(0));
                    }
                    Err(_) => break,
                },
                Some(read) = reads.join_next(), if !reads.is_empty() => {
                    if let Ok(Some(frame)) = read {
                        self.metrics.to_client_streamed.fetch_add(1, Ordering::Relaxed);
                        self.answer(route, &frame);
                    }
                }
            }
        }
    }

    /// Sends one frame of the agent's to its client, if that client may be
    /// answered on `route`.
    fn answer(&self, route: RouteId, frame: &[u8]) {
        let Ok((client, datagram)) = quic_datagram::decode(frame) else {
            self.metrics.answers_refused.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let allowed = self.router.lock().unwrap_or_else(|p| p.into_inner()).may_answer(Instant::now(), route, client);
        if !allowed {
            self.metrics.answers_refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.send_to(client, datagram);
        self.metrics.to_client_datagrams.fetch_add(1, Ordering::Relaxed);
        self.metrics.to_client_bytes.fetch_add(datagram.len() as u64, Ordering::Relaxed);
    }

    /// Best effort, as UDP: a full socket buffer drops the datagram.
    fn send_to(&self, client: SocketAddr, datagram: &[u8]) {
        let to = match client {
            SocketAddr::V4(v4) if self.ipv6 => {
                SocketAddr::new(std::net::IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
            }
            _ => client,
        };
        let _ = self.socket.try_send_to(datagram, to);
    }

    fn forward(&self, route: RouteId, client: SocketAddr, datagram: &[u8]) {
        let (conn, streams) = match self.routes.read().unwrap_or_else(|p| p.into_inner()).get(&route) {
            Some(entry) => (entry.conn.clone(), entry.streams.clone()),
            None => return,
        };
        let mut frame = Vec::with_capacity(quic_datagram::header_len(client) + datagram.len());
        quic_datagram::encode(client, datagram, &mut frame);
        // A clone of `Bytes` is a reference count: the frame stays at hand
        // for a stream if the tunnel finds it too large.
        let frame = Bytes::from(frame);
        let carried = match conn.send_datagram(frame.clone()) {
            Ok(()) => true,
            Err(quinn::SendDatagramError::TooLarge) => match &streams {
                Some(streams) if streams.send(&frame) => {
                    self.metrics.to_node_streamed.fetch_add(1, Ordering::Relaxed);
                    true
                }
                _ => false,
            },
            Err(_) => false,
        };
        if carried {
            self.metrics.to_node_datagrams.fetch_add(1, Ordering::Relaxed);
            self.metrics.to_node_bytes.fetch_add(datagram.len() as u64, Ordering::Relaxed);
        } else {
            self.metrics.tunnel_refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Appends the listener's series in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let g = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let m = &self.metrics;
        let _ = writeln!(out, "# HELP edge_quic_client_datagrams_total QUIC client datagrams carried, by direction.");
        let _ = writeln!(out, "# TYPE edge_quic_client_datagrams_total counter");
        let _ = writeln!(out, "edge_quic_client_datagrams_total{{direction=\"to_node\"}} {}", g(&m.to_node_datagrams));
        let _ =
            writeln!(out, "edge_quic_client_datagrams_total{{direction=\"to_client\"}} {}", g(&m.to_client_datagrams));
        let _ = writeln!(out, "# HELP edge_quic_client_bytes_total QUIC client bytes carried, by direction.");
        let _ = writeln!(out, "# TYPE edge_quic_client_bytes_total counter");
        let _ = writeln!(out, "edge_quic_client_bytes_total{{direction=\"to_node\"}} {}", g(&m.to_node_bytes));
        let _ = writeln!(out, "edge_quic_client_bytes_total{{direction=\"to_client\"}} {}", g(&m.to_client_bytes));
        let _ = writeln!(
            out,
            "# HELP edge_quic_client_streamed_total QUIC client datagrams carried on tunnel streams (too large for a \
             DATAGRAM frame then), by direction; also counted in edge_quic_client_datagrams_total."
        );
        let _ = writeln!(out, "# TYPE edge_quic_client_streamed_total counter");
        let _ = writeln!(out, "edge_quic_client_streamed_total{{direction=\"to_node\"}} {}", g(&m.to_node_streamed));
        let _ =
            writeln!(out, "edge_quic_client_streamed_total{{direction=\"to_client\"}} {}", g(&m.to_client_streamed));
        let _ = writeln!(out, "# HELP edge_quic_client_dropped_total QUIC client datagrams dropped, by reason.");
        let _ = writeln!(out, "# TYPE edge_quic_client_dropped_total counter");
        for (reason, count) in DropReason::ALL.iter().zip(&m.dropped) {
            let _ = writeln!(out, "edge_quic_client_dropped_total{{reason=\"{}\"}} {}", reason.label(), g(count));
        }
        let _ = writeln!(out, "edge_quic_client_dropped_total{{reason=\"tunnel_refused\"}} {}", g(&m.tunnel_refused));
        let _ = writeln!(out, "edge_quic_client_dropped_total{{reason=\"answer_refused\"}} {}", g(&m.answers_refused));
        let _ = writeln!(out, "# HELP edge_quic_client_connections_total QUIC client connections routed by SNI.");
        let _ = writeln!(out, "# TYPE edge_quic_client_connections_total counter");
        let _ = writeln!(out, "edge_quic_client_connections_total {}", g(&m.connections_routed));
        let _ = writeln!(
            out,
            "# HELP edge_quic_client_first_flight_buffered_total Datagrams of first flights held until their \
             ClientHello was whole."
        );
        let _ = writeln!(out, "# TYPE edge_quic_client_first_flight_buffered_total counter");
        let _ = writeln!(out, "edge_quic_client_first_flight_buffered_total {}", g(&m.first_flight_buffered));
        let _ = writeln!(out, "# HELP edge_quic_version_negotiation_total Version Negotiation packets sent.");
        let _ = writeln!(out, "# TYPE edge_quic_version_negotiation_total counter");
        let _ = writeln!(out, "edge_quic_version_negotiation_total {}", g(&m.version_negotiation));
        let router = self.router.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "# HELP edge_quic_client_pending First flights waiting for their ClientHello.");
        let _ = writeln!(out, "# TYPE edge_quic_client_pending gauge");
        let _ = writeln!(out, "edge_quic_client_pending {}", router.pending());
        let _ = writeln!(out, "# HELP edge_quic_client_addresses Client addresses a node may answer.");
        let _ = writeln!(out, "# TYPE edge_quic_client_addresses gauge");
        let _ = writeln!(out, "edge_quic_client_addresses {}", router.answer_addresses());
    }
}

/// Keeps a tunnel's route live; dropping it ends the route.
#[derive(Debug)]
pub struct RouteGuard {
    clients: Arc<QuicClients>,
    route: RouteId,
}

impl RouteGuard {
    /// The route.
    pub fn route(&self) -> RouteId {
        self.route
    }
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        let mut routes = self.clients.routes.write().unwrap_or_else(|p| p.into_inner());
        routes.remove(&self.route);
        self.clients.publish_served(&routes);
    }
}

/// The router's bounds: the defaults, with the per-source ones from
/// `[limits]`.
fn router_limits(limits: &crate::config::LimitsConfig) -> Limits {
    let rate = if limits.quic_client_rate == 0 { u32::MAX } else { limits.quic_client_rate };
    Limits { new_per_source_per_sec: rate, max_pending_per_source: limits.quic_client_pending, ..Limits::default() }
}

/// Reads client datagrams until `shutdown`.
pub async fn serve(clients: Arc<QuicClients>, shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut expiry = tokio::time::interval(Duration::from_secs(1));
    expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (len, source) = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = expiry.tick() => {
                let mut router = clients.router.lock().unwrap_or_else(|p| p.into_inner());
                router.expire(Instant::now());
                // Follows a reload within a second.
                router.set_limits(router_limits(&shared.limits()));
                continue;
            }
            received = clients.socket.recv_from(&mut buf) => match received {
                Ok(got) => got,
                // ICMP errors surface here on Linux; the socket stays usable.
                Err(_) => continue,
            },
        };
        let source = quic_datagram::canonical(source);
        let datagram = &buf[..len];
        let verdict = {
            let resolve = |name: &str| {
                let node = shared.registry.route(name)?;
                let scope = edge_proto::access::Scope::Host(name.to_string());
                if !shared.access.allows(&node.name, &scope, source.ip()) {
                    return None;
                }
                clients.route_of(&node.name)
            };
            let live = |route| clients.live(route);
            let mut router = clients.router.lock().unwrap_or_else(|p| p.into_inner());
            router.on_datagram(Instant::now(), source, datagram, resolve, live)
        };
        match verdict {
            Verdict::Forward { route, buffered, name } => {
                if let Some(name) = name {
                    clients.metrics.connections_routed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(client = %source, name = %name.escape_debug(), route = route.0,
                        "QUIC client forwarded");
                }
                for earlier in &buffered {
                    clients.forward(route, source, earlier);
                }
                clients.forward(route, source, datagram);
            }
            Verdict::Buffered => {
                clients.metrics.first_flight_buffered.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::Reply(packet) => {
                clients.metrics.version_negotiation.fetch_add(1, Ordering::Relaxed);
                clients.send_to(source, &packet);
            }
            Verdict::Drop(reason) => clients.metrics.drop_for(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_config_and_zero_turns_the_rate_off() {
        let mut config =
            crate::config::LimitsConfig { quic_client_rate: 7, quic_client_pending: 3, ..Default::default() };
        let limits = router_limits(&config);
        assert_eq!((limits.new_per_source_per_sec, limits.max_pending_per_source), (7, 3));
        assert_eq!(limits.max_pending, Limits::default().max_pending, "the rest stays");
        config.quic_client_rate = 0;
        assert_eq!(router_limits(&config).new_per_source_per_sec, u32::MAX);
    }
}
