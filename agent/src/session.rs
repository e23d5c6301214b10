//! One tunnel session: dial, authenticate, serve streams, heartbeat; and the
//! reconnect loop around it (exponential backoff, each delay drawn from half to all of it).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_proto::tunnel::{codes, AgentMessage, ControlCodec, ServerMessage, ALPN, PROTOCOL_VERSION};
use futures_util::{SinkExt, StreamExt};
use quinn::VarInt;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::Target;
use crate::{AgentError, AgentShared};

/// Deadline for the QUIC handshake.
/// Least time between two routes reports on one tunnel.
const ROUTES_EVERY: Duration = Duration::from_secs(1);
const CONNECT_DEADLINE: Duration = Duration::from_secs(5);
/// Deadline for the server's answer to hello.
const WELCOME_DEADLINE: Duration = Duration::from_secs(10);
/// A session that lasted this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(30);
/// After the server acknowledged `leaving`, streams it opened just before
/// may still arrive for this long.
const LEAVE_LINGER: Duration = Duration::from_millis(500);
/// How long after the server's drain could have ended a handed-over
/// connection the server did not close is left by the agent.
const HANDOVER_SLACK: Duration = Duration::from_secs(30);
/// A server that does not acknowledge `leaving` this long after it was sent
/// is gone (killed, partitioned): with no stream open, nothing is waited for.
const LEAVE_ACK_WAIT: Duration = Duration::from_secs(2);

/// How a session ended.
#[derive(Debug)]
enum End {
    /// Shutdown requested.
    Shutdown,
    /// Try again after a backoff.
    Retry(String),
    /// The server shut down (or restarts): try again after a delay drawn
    /// over `reconnect.shutdown_spread_ms`, so a fleet that lost its server
    /// at one instant does not come back in one burst.
    ServerLeft(String),
    /// Retrying cannot help (bad token, removed node, wrong server).
    Fatal(String),
}

/// Runs sessions until shutdown or a fatal error. When the server says it
/// hands over to a successor, the next session starts at once while the
/// current one finishes its open streams in the background.
pub async fn run(
    endpoint: quinn::Endpoint,
    shared: Arc<AgentShared>,
    target: Arc<Target>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let handed_over = TaskTracker::new();
    let result = sessions(endpoint, shared, target, shutdown, &handed_over).await;
    handed_over.close();
    handed_over.wait().await;
    result
}

async fn sessions(
    endpoint: quinn::Endpoint,
    shared: Arc<AgentShared>,
    target: Arc<Target>,
    shutdown: CancellationToken,
    handed_over: &TaskTracker,
) -> Result<(), AgentError> {
    let initial = Duration::from_millis(shared.config.reconnect.initial_ms);
    let max = Duration::from_millis(shared.config.reconnect.max_ms);
    let mut backoff = initial;
    loop {
        let started = Instant::now();
        let (moved, mut moving) = tokio::sync::oneshot::channel();
        let mut current = Box::pin(session(endpoint.clone(), shared.clone(), target.clone(), shutdown.clone(), moved));
        let end = tokio::select! {
            end = &mut current => end,
            Ok(()) = &mut moving => {
                tracing::info!(server = %target.name,
                    "the server is being upgraded: connecting to its successor; open streams finish on this connection");
                handed_over.spawn(async move {
                    let _ = current.await;
                });
                backoff = initial;
                continue;
            }
        };
        if started.elapsed() >= STABLE_SESSION {
            backoff = initial;
        }
        // Jitter (half to all of the backoff) spreads agents that failed one
        // by one. Agents whose server shut down all lost it at the same
        // instant: a jitter of a few hundred ms would keep them together
        // (and QUIC's fixed Initial retransmits would land them on the
        // restarted server in one burst), so they spread over the whole
        // `shutdown_spread_ms` window instead.
        let (reason, delay) = match end {
            End::Shutdown => return Ok(()),
            End::Fatal(message) if target.is_join => return Err(AgentError::Fatal(message)),
            // A listed server may lag behind the store (a token just
            // rotated, the node just added) or run another version during
            // an upgrade: only the join string's server's verdict is final.
            End::Fatal(message) => {
                backoff = max;
                (format!("{message} (retrying: only the join string's server's verdict stops the agent)"), max)
            }
            End::Retry(reason) => (reason, backoff.mul_f64(rand::random_range(0.5..=1.0))),
            End::ServerLeft(reason) => {
                let spread = backoff.max(Duration::from_millis(shared.config.reconnect.shutdown_spread_ms));
                (reason, spread.mul_f64(rand::random_range(0.0..=1.0)))
            }
        };
        tracing::warn!(server = %target.name, %reason, retry_in_ms = delay.as_millis() as u64, "tunnel down; reconnecting");
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
        backoff = (backoff * 2).min(max);
    }
}

/// Features this agent offers, as reported in hello and heartbeats.
pub fn capabilities(config: &crate::config::AgentConfig) -> Vec<String> {
    let mut capabilities = vec![
        "tls_termination".to_string(),
        "passthrough".to_string(),
        edge_proto::tunnel::CAPABILITY_CLUSTER.to_string(),
        edge_proto::tunnel::CAPABILITY_HANDOVER.to_string(),
        edge_proto::tunnel::CAPABILITY_ROUTES.to_string(),
        edge_proto::tunnel::CAPABILITY_SERVICES.to_string(),
        edge_proto::tunnel::CAPABILITY_DOMAINS.to_string(),
        edge_proto::tunnel::CAPABILITY_ACME_TLS_ALPN.to_string(),
    ];
    if config.proxy_protocol {
        capabilities.push("proxy_v2".into());
    }
    if config.http3.enabled {
        capabilities.push(edge_proto::tunnel::CAPABILITY_QUIC_CLIENTS.into());
        capabilities.push(edge_proto::tunnel::CAPABILITY_QUIC_CLIENT_STREAMS.into());
    }
    capabilities
}

/// What a close or rejection code from the server means for the agent.
fn verdict(code: u64, reason: &str) -> End {
    const AUTH: u64 = codes::CLOSE_AUTH_FAILED as u64;
    const REMOVED: u64 = codes::CLOSE_NODE_REMOVED as u64;
    const VERSION: u64 = codes::CLOSE_VERSION_MISMATCH as u64;
    const SHUTDOWN: u64 = codes::CLOSE_SHUTDOWN as u64;
    match code {
        AUTH => End::Fatal(format!("server refused the node token: {reason}")),
        REMOVED => End::Fatal(format!("this node was removed from the server: {reason}")),
        VERSION => End::Fatal(format!("protocol mismatch: {reason}")),
        SHUTDOWN => End::ServerLeft(format!("server shut down: {reason}")),
        _ => End::Retry(format!("server closed the tunnel: {reason}")),
    }
}

fn classify_close(error: &quinn::ConnectionError) -> End {
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => {
            let reason = String::from_utf8_lossy(&close.reason).into_owned();
            verdict(close.error_code.into_inner(), &reason)
        }
        quinn::ConnectionError::LocallyClosed => End::Shutdown,
        other => End::Retry(other.to_string()),
    }
}

/// One session; `moved` fires if the server hands over to a successor.
async fn session(
    endpoint: quinn::Endpoint,
    shared: Arc<AgentShared>,
    target: Arc<Target>,
    shutdown: CancellationToken,
    moved: tokio::sync::oneshot::Sender<()>,
) -> End {
    let (endpoint, shared, target, shutdown) = (&endpoint, &shared, &*target, &shutdown);
    let server = &target.address;
    let addr = match tokio::net::lookup_host(server).await.map(|mut a| a.next()) {
        Ok(Some(addr)) => addr,
        Ok(None) => return End::Retry(format!("{server} resolved to no address")),
        Err(e) => return End::Retry(format!("resolving {server}: {e}")),
    };
    let tls = target.trust.client_config(ALPN);
    let crypto = match quinn::crypto::rustls::QuicClientConfig::try_from(tls) {
        Ok(c) => c,
        Err(e) => return End::Fatal(format!("QUIC TLS config: {e}")),
    };
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(shared.config.tunnel.transport(shared.config.tunnel.max_streams)));
    let connecting = match endpoint.connect_with(client, addr, &crate::tls::server_name(server)) {
        Ok(c) => c,
        Err(e) => return End::Retry(format!("connecting to {addr}: {e}")),
    };
    let conn = tokio::select! {
        _ = shutdown.cancelled() => return End::Shutdown,
        r = tokio::time::timeout(CONNECT_DEADLINE, connecting) => match r {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                shared.metrics.connect_failures.fetch_add(1, Ordering::Relaxed);
                if let Some(message) = target.trust.mismatch_message() {
                    // The join string's pin is the operator's word; a listed
                    // server's may just be stale (it got a new identity).
                    return if target.is_join { End::Fatal(message) } else { End::Retry(message) };
                }
                return match classify_close(&e) {
                    End::Retry(m) => End::Retry(format!("connecting to {addr}: {m}")),
                    other => other,
                };
            }
            Err(_) => {
                shared.metrics.connect_failures.fetch_add(1, Ordering::Relaxed);
                return End::Retry(format!("no QUIC handshake with {addr} within {}s", CONNECT_DEADLINE.as_secs()));
            }
        }
    };
    let end = tunnel(&conn, shared, target, shutdown, moved).await;
    if let End::Shutdown = end {
        conn.close(VarInt::from_u32(codes::CLOSE_NORMAL), b"agent shutting down");
    }
    end
}

/// The verdict of a closed connection, else a retry with `fallback`.
fn ended(conn: &quinn::Connection, fallback: String) -> End {
    conn.close_reason().map_or(End::Retry(fallback), |r| classify_close(&r))
}

type Reader = FramedRead<quinn::RecvStream, ControlCodec<ServerMessage, AgentMessage>>;
type Writer = FramedWrite<quinn::SendStream, ControlCodec<ServerMessage, AgentMessage>>;

/// What the server's welcome said.
struct Welcomed {
    reader: Reader,
    writer: Writer,
    node: String,
    hostnames: Vec<String>,
    heartbeat_secs: u64,
    /// The server takes [`AgentMessage::Routes`].
    takes_routes: bool,
    /// The route of this tunnel's QUIC clients, when the server carries them.
    quic_route: Option<u32>,
    /// The server's UDP port for QUIC clients (advertised in `Alt-Svc`).
    quic_port: Option<u16>,
    /// The server takes QUIC client frames on streams when they do not
    /// fit a DATAGRAM frame.
    quic_streams: bool,
}

async fn handshake(conn: &quinn::Connection, shared: &AgentShared) -> Result<Welcomed, End> {
    let closed = |e: quinn::ConnectionError| classify_close(&e);
    let (send, recv) = conn.open_bi().await.map_err(closed)?;
    let mut reader = FramedRead::new(recv, ControlCodec::<ServerMessage, AgentMessage>::default());
    let mut writer = FramedWrite::new(send, ControlCodec::<ServerMessage, AgentMessage>::default());
    let capabilities = capabilities(&shared.config);
    let hello = AgentMessage::Hello {
        protocol: PROTOCOL_VERSION,
        token: shared.ticket.token.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        capabilities,
        instance: shared.instance.clone(),
        replica: shared.replica.clone(),
        endpoint: shared.config.public_endpoint.clone(),
    };
    if let Err(e) = writer.send(hello).await {
        return Err(conn
            .close_reason()
            .map_or_else(|| End::Retry(format!("sending hello: {e}")), |r| classify_close(&r)));
    }
    match tokio::time::timeout(WELCOME_DEADLINE, reader.next()).await {
        Ok(Some(Ok(ServerMessage::Welcome {
            node,
            hostnames,
            heartbeat_secs,
            servers,
            servers_revision,
            capabilities,
            quic_route,
            quic_port,
            ..
        }))) => {
            shared.learn_servers(servers, servers_revision);
            let takes_routes = capabilities.iter().any(|c| c == edge_proto::tunnel::CAPABILITY_ROUTES);
            let quic_streams = capabilities.iter().any(|c| c == edge_proto::tunnel::CAPABILITY_QUIC_CLIENT_STREAMS);
            let heartbeat_secs = heartbeat_secs.clamp(1, 300);
            Ok(Welcomed {
                reader,
                writer,
                node,
                hostnames,
                heartbeat_secs,
                takes_routes,
                quic_route,
                quic_port,
                quic_streams,
            })
        }
        Ok(Some(Ok(ServerMessage::Rejected { code, reason }))) => Err(verdict(u64::from(code), &reason)),
        Ok(Some(Ok(other))) => Err(End::Retry(format!("unexpected first message from server: {other:?}"))),
        Ok(Some(Err(e))) => Err(ended(conn, format!("control stream: {e}"))),
        Ok(None) => {
            // The server may close before its Rejected frame is delivered;
            // the close code carries the verdict.
            let reason = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
            Err(reason.map_or_else(|_| End::Retry("control stream closed".into()), |r| classify_close(&r)))
        }
        Err(_) => Err(End::Retry("server did not answer hello in time".into())),
    }
}

async fn tunnel(
    conn: &quinn::Connection,
    shared: &Arc<AgentShared>,
    target: &Target,
    shutdown: &CancellationToken,
    moved: tokio::sync::oneshot::Sender<()>,
) -> End {
    let mut moved = Some(moved);
    let Welcomed {
        mut reader,
        mut writer,
        node: node_name,
        hostnames,
        heartbeat_secs,
        takes_routes,
        quic_route,
        quic_port,
        quic_streams,
    } = match handshake(conn, shared).await {
        Ok(h) => h,
        Err(end) => return end,
    };
    if node_name != shared.ticket.node() {
        return End::Fatal(format!(
            "server says this is node {node_name:?}, the join string says {:?}",
            shared.ticket.node()
        ));
    }
    let node = match shared.node_for(&node_name, &hostnames).await {
        Ok(node) => node,
        Err(e) => return End::Fatal(e.to_string()),
    };
    shared.welcomed.send_replace(true);
    shared.metrics.connects.fetch_add(1, Ordering::Relaxed);
    // The agent's receive windows on this connection: what stalled upstreams can hold.
    let tuning = &shared.config.tunnel;
    let stalls = edge_net::stall::StallBudget::for_windows(tuning.connection_window, tuning.stream_window);
    shared.metrics.tunnels_up.fetch_add(1, Ordering::Relaxed);
    tracing::info!(node = %node_name, hostnames = ?hostnames, server = %target.name, address = %conn.remote_address(),
        "tunnel up");

    // HTTP/3 clients on this tunnel's route, for as long as the tunnel (a
    // drain lets their requests finish too).
    let http3 = CancellationToken::new();
    let _http3_stop = http3.clone().drop_guard();
    if let Some(route) = quic_route.filter(|_| shared.config.http3.enabled) {
        let (conn, node, stop) = (conn.clone(), node.clone(), http3.clone());
        tokio::spawn(async move {
            let route = edge_proto::quic_route::RouteId(route);
            if let Err(e) = crate::http3::serve(conn, route, quic_streams, node, stop).await {
                tracing::error!(error = %e, "HTTP/3 could not start on this tunnel");
            }
        });
    }
    // TCP clients learn of HTTP/3 on the server's QUIC port.
    let alt_svc =
        quic_port.filter(|_| quic_route.is_some() && shared.config.http3.enabled && shared.config.http3.alt_svc);
    let streams = TaskTracker::new();
    let interval = Duration::from_secs(heartbeat_secs);
    let mut heartbeat = tokio::time::interval(interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut path_stats = tokio::time::interval(Duration::from_secs(1));
    let mut seq: u64 = 0;
    let mut last_ack = Instant::now();
    let drain = Duration::from_secs(shared.config.drain_timeout_secs);
    // Draining after SIGTERM: when we said `leaving`, and when the server
    // acknowledged it (no new streams after that, save stragglers).
    let mut leaving: Option<Instant> = None;
    let mut leave_acked: Option<Instant> = None;
    let mut drain_check = tokio::time::interval(Duration::from_millis(50));
    // After `handover`, the server closes this connection once its streams
    // finished; if it never does (the upgrade was given up), this session
    // leaves by itself a while after the server's drain could have ended.
    let mut handed_over: Option<tokio::time::Instant> = None;
    // Routes are reported now and at every change, to servers that take them.
    let mut last_routes: Option<tokio::time::Instant> = None;
    let mut routes_due: Option<tokio::time::Instant> = None;
    let mut route_changes = takes_routes.then(|| {
        let mut rx = shared.route_changes();
        rx.mark_changed();
        rx
    });
    let end = loop {
        let leave_by = handed_over.map(|at| at + drain + HANDOVER_SLACK);
        tokio::select! {
            _ = async { tokio::time::sleep_until(leave_by.unwrap_or_else(tokio::time::Instant::now)).await },
                if leave_by.is_some() && leaving.is_none() => {
                leaving = Some(Instant::now());
                tracing::info!(server = %target.name, "the server kept the handed-over connection open; leaving it");
                let said = tokio::time::timeout(Duration::from_secs(1), writer.send(AgentMessage::Leaving)).await;
                if !matches!(said, Ok(Ok(()))) {
                    tracing::warn!("could not tell the server we are leaving; draining until the timeout");
                }
            }
            _ = shutdown.cancelled(), if leaving.is_none() => {
                leaving = Some(Instant::now());
                tracing::info!(open_streams = streams.len(), drain_secs = drain.as_secs(),
                    "shutting down: asking the server for no new streams, draining open ones");
                let said = tokio::time::timeout(Duration::from_secs(1), writer.send(AgentMessage::Leaving)).await;
                if !matches!(said, Ok(Ok(()))) {
                    // Keep accepting what the server still places here until
                    // the drain timeout; a dead connection ends the loop anyway.
                    tracing::warn!("could not tell the server we are leaving; draining until the timeout");
                }
            }
            _ = drain_check.tick(), if leaving.is_some() => {
                let unanswered = leave_acked.is_none() && leaving.is_some_and(|at| at.elapsed() >= LEAVE_ACK_WAIT);
                let settled = (leave_acked.is_some_and(|at| at.elapsed() >= LEAVE_LINGER) || unanswered)
                    && streams.is_empty();
                if settled || leaving.is_some_and(|at| at.elapsed() >= drain) {
                    break End::Shutdown;
                }
            }
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(crate::streams::handle(send, recv, node.clone(), stalls.clone(), alt_svc));
                }
                Err(e) => break classify_close(&e),
            },
            // One connection's figures: the successor's once handed over.
            _ = path_stats.tick(), if handed_over.is_none() => {
                let stats = conn.stats();
                let m = &shared.metrics;
                m.path_mtu.store(u64::from(stats.path.current_mtu), Ordering::Relaxed);
                m.rtt_us.store(stats.path.rtt.as_micros() as u64, Ordering::Relaxed);
                m.cwnd.store(stats.path.cwnd, Ordering::Relaxed);
                m.congestion_events.store(stats.path.congestion_events, Ordering::Relaxed);
                m.lost_packets.store(stats.path.lost_packets, Ordering::Relaxed);
            }
            changed = async { route_changes.as_mut()?.changed().await.ok() }, if route_changes.is_some() => {
                if changed.is_none() {
                    route_changes = None;
                    continue;
                }
                // At most one report per second: flapping health must not
                // become a store write per flap.
                let earliest = last_routes.map_or_else(tokio::time::Instant::now, |t| t + ROUTES_EVERY);
                routes_due.get_or_insert(earliest);
            }
            _ = async { tokio::time::sleep_until(routes_due.unwrap_or_else(tokio::time::Instant::now)).await },
                if routes_due.is_some() => {
                routes_due = None;
                last_routes = Some(tokio::time::Instant::now());
                let message = AgentMessage::Routes { routes: shared.routes().report() };
                let size = serde_json::to_vec(&message).map_or(usize::MAX, |v| v.len());
                if size > edge_proto::tunnel::MAX_CONTROL_FRAME {
                    tracing::warn!(bytes = size, "the routes report is larger than a control frame; not sent");
                    continue;
                }
                if let Err(e) = writer.send(message).await {
                    break conn.close_reason().map_or_else(|| End::Retry(format!("routes: {e}")), |r| classify_close(&r));
                }
            }
            _ = heartbeat.tick() => {
                if last_ack.elapsed() > interval * 3 {
                    conn.close(VarInt::from_u32(codes::CLOSE_NORMAL), b"heartbeat timeout");
                    break End::Retry("server stopped answering heartbeats".into());
                }
                seq += 1;
                let open_streams = shared.metrics.open_streams.load(Ordering::Relaxed);
                if let Err(e) = writer.send(AgentMessage::Heartbeat { seq, open_streams }).await {
                    break conn.close_reason().map_or_else(|| End::Retry(format!("heartbeat: {e}")), |r| classify_close(&r));
                }
            }
            message = reader.next() => match message {
                Some(Ok(ServerMessage::HeartbeatAck { .. })) => last_ack = Instant::now(),
                Some(Ok(ServerMessage::LeaveAck)) => leave_acked = Some(Instant::now()),
                Some(Ok(ServerMessage::Draining { drain_secs })) => {
                    tracing::info!(drain_secs, "server is shutting down; its open streams finish, then this tunnel reconnects");
                }
                Some(Ok(ServerMessage::Handover)) => {
                    if let Some(moved) = moved.take() {
                        let _ = moved.send(());
                        handed_over = Some(tokio::time::Instant::now());
                    }
                }
                Some(Ok(ServerMessage::Notice { level, message })) => tracing::info!(%level, %message, "notice from server"),
                Some(Ok(ServerMessage::Servers { servers, revision })) => shared.learn_servers(servers, revision),
                Some(Ok(ServerMessage::Domains { domains })) => shared.learn_domains(domains),
                Some(Ok(ServerMessage::AcmeTlsAlpn { host, digest })) => {
                    if let Some(ready) = crate::domain_certs::answer_for_server(shared, &host, digest.as_deref()) {
                        if let Err(e) = writer.send(ready).await {
                            break conn.close_reason().map_or_else(|| End::Retry(format!("tls-alpn: {e}")), |r| classify_close(&r));
                        }
                    }
                }
                Some(Ok(ServerMessage::Rejected { code, reason })) => break verdict(u64::from(code), &reason),
                Some(Ok(ServerMessage::Welcome { .. })) => break End::Retry("unexpected second welcome".into()),
                Some(Err(e)) => break ended(conn, format!("control stream: {e}")),
                None => {
                    let reason = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                    break reason.map_or_else(|_| End::Retry("control stream closed".into()), |r| classify_close(&r));
                }
            }
        }
    };
    shared.metrics.tunnels_up.fetch_sub(1, Ordering::Relaxed);
    streams.close();
    if let End::Shutdown = end {
        let left = drain.saturating_sub(leaving.map_or(Duration::ZERO, |at| at.elapsed()));
        if tokio::time::timeout(left, streams.wait()).await.is_err() {
            tracing::warn!(open_streams = streams.len(), "drain timeout passed; closing open streams");
        }
    }
    end
}
