//! The QUIC listener for agents: authenticate, register the tunnel, answer
//! heartbeats on the control stream, unregister when it ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use edge_proto::tunnel::{codes, AgentMessage, ControlCodec, ServerMessage, PROTOCOL_VERSION};
use futures_util::{SinkExt, StreamExt};
use quinn::VarInt;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::limits::{Listener, Refusal};
use crate::registry::{NodeHandle, Tunnel, TunnelState};
use crate::Shared;

/// Deadline for each step of an agent's handshake.
const HANDSHAKE_STEP: Duration = Duration::from_secs(10);
/// Time a drain notice gets to reach the agent before the tunnel closes.
const NOTICE_FLIGHT: Duration = Duration::from_millis(200);
/// Heartbeat interval the server asks agents for.
pub const HEARTBEAT_SECS: u64 = 15;
/// How often a tunnel's remote address is compared with the last one seen
/// (QUIC connections migrate when a NAT rebinds the agent).
const ADDRESS_CHECK: Duration = Duration::from_secs(1);

/// Accepts agent connections until `shutdown`. Sessions end when
/// `close_tunnels` is cancelled (after client connections drained).
pub async fn serve(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    close_tunnels: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { break };
        let source = incoming.remote_address().ip();
        if let Err(reason) = shared.admission.quic.admit(source) {
            shared.refusals.refuse(Listener::Quic, reason, source);
            incoming.refuse();
            continue;
        }
        let shared = shared.clone();
        let (draining, close_tunnels) = (shutdown.clone(), close_tunnels.clone());
        tracker.spawn(async move {
            let remote = incoming.remote_address();
            if let Err(e) = session(incoming, shared, draining, close_tunnels).await {
                tracing::info!(%remote, error = %e, "agent session ended");
            }
        });
    }
    tracing::info!("QUIC listener stopped accepting agents");
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("handshake timed out")]
    Timeout,
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("control stream: {0}")]
    Control(#[from] edge_proto::tunnel::TunnelError),
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("invalid node token for node {0:?} (unknown node, removed node or wrong token)")]
    Auth(String),
    #[error("agent speaks protocol {0}, server speaks {PROTOCOL_VERSION}")]
    Version(u32),
}

async fn step<T, E: Into<SessionError>>(
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, SessionError> {
    tokio::time::timeout(HANDSHAKE_STEP, fut).await.map_err(|_| SessionError::Timeout)?.map_err(Into::into)
}

async fn session(
    incoming: quinn::Incoming,
    shared: Arc<Shared>,
    draining: CancellationToken,
    close_tunnels: CancellationToken,
) -> Result<(), SessionError> {
    let conn = step(async { incoming.await }).await?;
    if crate::cluster::peers::is_peer_connection(&conn) {
        crate::cluster::peers::serve(conn, shared, close_tunnels).await;
        return Ok(());
    }
    let remote = conn.remote_address();
    let (send, recv) = step(conn.accept_bi()).await?;
    let mut reader = FramedRead::new(recv, ControlCodec::<AgentMessage, ServerMessage>::default());
    let mut writer = FramedWrite::new(send, ControlCodec::<AgentMessage, ServerMessage>::default());

    let first = tokio::time::timeout(HANDSHAKE_STEP, reader.next()).await;
    let (protocol, token, agent_version, instance, replica, endpoint, capabilities) = match first {
        Ok(Some(Ok(AgentMessage::Hello {
            protocol,
            token,
            agent_version,
            instance,
            replica,
            endpoint,
            capabilities,
        }))) => (protocol, token, agent_version, instance, replica, endpoint, capabilities),
        Ok(Some(Ok(_))) => {
            return Err(close_with(
                &conn,
                codes::CLOSE_PROTOCOL_ERROR,
                SessionError::Protocol("first message is not hello"),
            ))
        }
        Ok(Some(Err(e))) => return Err(close_with(&conn, codes::CLOSE_PROTOCOL_ERROR, e)),
        Ok(None) => {
            return Err(close_with(
                &conn,
                codes::CLOSE_PROTOCOL_ERROR,
                SessionError::Protocol("control stream closed before hello"),
            ))
        }
        Err(_) => return Err(close_with(&conn, codes::CLOSE_PROTOCOL_ERROR, SessionError::Timeout)),
    };
    // Ids and the version end up in logs: short, and ids plain characters
    // only (no forged log lines).
    let id_ok = |id: &str| id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let printable = |s: &str| s.len() <= 64 && s.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    let valid = id_ok(&instance)
        && id_ok(&replica)
        && printable(&agent_version)
        && endpoint.as_ref().is_none_or(|e| e.len() <= 256)
        && capabilities.len() <= 32
        && capabilities.iter().all(|c| printable(c));
    if !valid {
        return Err(close_with(
            &conn,
            codes::CLOSE_PROTOCOL_ERROR,
            SessionError::Protocol(
                "bad hello field (ids: at most 64 of A-Z a-z 0-9 - _; version and capabilities: at most 64 \
                 printable bytes, 32 capabilities)",
            ),
        ));
    }
    if protocol != PROTOCOL_VERSION {
        let reason = format!("unsupported protocol version {protocol}; this server speaks {PROTOCOL_VERSION}");
        reject(&conn, &mut writer, codes::CLOSE_VERSION_MISMATCH, reason).await;
        return Err(close_with(&conn, codes::CLOSE_VERSION_MISMATCH, SessionError::Version(protocol)));
    }
    if !shared.auth_failures.try_take(remote.ip()) {
        shared.refusals.refuse(Listener::Quic, Refusal::AuthFailures, remote.ip());
        let reason = "too many failed authentications from this address; retry later".to_string();
        reject(&conn, &mut writer, codes::CLOSE_RATE_LIMITED, reason).await;
        return Err(close_with(&conn, codes::CLOSE_RATE_LIMITED, SessionError::Protocol("auth failure budget used")));
    }
    let Some(node) = shared.authenticate(&token).await else {
        shared.metrics.auth_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let node = edge_proto::join::node_of_token(&token).unwrap_or("?").to_string();
        tracing::warn!(%remote, %node, "agent authentication failed");
        let reason = "invalid node token (unknown node, removed node or wrong token)".to_string();
        reject(&conn, &mut writer, codes::CLOSE_AUTH_FAILED, reason).await;
        return Err(close_with(&conn, codes::CLOSE_AUTH_FAILED, SessionError::Auth(node)));
    };
    shared.auth_failures.refund(remote.ip());
    let cap = shared.limits().max_tunnels_per_node;
    if node.tunnel_count() >= cap {
        let reason = format!("node {} already has {cap} tunnels (limits.max_tunnels_per_node); retry later", node.name);
        tracing::warn!(node = %node.name, %remote, "refusing a tunnel: the node is at its tunnel cap");
        reject(&conn, &mut writer, codes::CLOSE_RATE_LIMITED, reason).await;
        return Err(close_with(&conn, codes::CLOSE_RATE_LIMITED, SessionError::Protocol("tunnel cap of the node")));
    }
    // Agents that follow the cluster get its live servers now and each
    // change later; older agents get the welcome they know.
    let mut servers =
        capabilities.iter().any(|c| c == edge_proto::tunnel::CAPABILITY_CLUSTER).then(|| shared.cluster.agent_list());
    let listed = servers.as_mut().map(|rx| rx.borrow_and_update().as_ref().clone()).unwrap_or_default();
    let (servers_revision, listed) = (listed.revision.max(0) as u64, listed.servers);
    // Agents that serve QUIC clients get a route when this server has a
    // listener for them; the route lives as long as this session.
    let quic_streams = capabilities.iter().any(|c| c == edge_proto::tunnel::CAPABILITY_QUIC_CLIENT_STREAMS);
    let quic_route = match &shared.quic_clients {
        Some(clients) if capabilities.iter().any(|c| c == edge_proto::tunnel::CAPABILITY_QUIC_CLIENTS) => {
            Some(clients.register(&conn, &node.name, quic_streams))
        }
        _ => None,
    };
    let echoed = |c: &&String| {
        *c == edge_proto::tunnel::CAPABILITY_ROUTES
            || (quic_route.is_some()
                && (*c == edge_proto::tunnel::CAPABILITY_QUIC_CLIENTS
                    || *c == edge_proto::tunnel::CAPABILITY_QUIC_CLIENT_STREAMS))
    };
    step(
        writer.send(ServerMessage::Welcome {
            node: node.name.clone(),
            hostnames: node.hostnames.clone(),
            heartbeat_secs: HEARTBEAT_SECS,
            server_version: env!("CARGO_PKG_VERSION").to_string(),
            servers: listed,
            servers_revision,
            capabilities: capabilities.iter().filter(echoed).cloned().collect(),
            quic_route: quic_route.as_ref().map(|r| r.route().0),
            // Only to agents that know the field (the welcome refuses
            // unknown ones): those announcing frame streams came with it.
            quic_port: quic_route
                .as_ref()
                .filter(|_| quic_streams)
                .and(shared.quic_clients.as_ref())
                .and_then(|clients| clients.local_addr().ok())
                .map(|a| a.port()),
        }),
    )
    .await?;

    if apply_endpoint(&shared, &node, endpoint.as_deref(), remote) {
        shared.nudge(crate::store::Change::ModeChanged(node.name.clone()));
    }
    let tunnel_id = shared.registry.next_tunnel_id();
    let tuning = &shared.config.tunnel;
    let stalls = edge_net::stall::StallBudget::for_windows(tuning.connection_window, tuning.stream_window);
    let tunnel = Tunnel::new(tunnel_id, conn.clone(), instance, replica.clone(), stalls);
    let state = tunnel.state.clone();
    if let (Some(clients), Some(route)) = (&shared.quic_clients, &quic_route) {
        clients.set_state(route.route(), state.clone());
    }
    let services = capabilities.iter().any(|c| c == edge_proto::tunnel::CAPABILITY_SERVICES);
    state.serves_services.store(services, std::sync::atomic::Ordering::Relaxed);
    let answers_alpn = capabilities.iter().any(|c| c == edge_proto::tunnel::CAPABILITY_ACME_TLS_ALPN);
    // Subscribed before the tunnel is listed: an order that sees it never
    // misses its command.
    let alpn = answers_alpn.then(|| node.alpn.subscribe());
    state.answers_tls_alpn.store(answers_alpn, std::sync::atomic::Ordering::Relaxed);
    let replaced = node.add_tunnel(tunnel);
    if replaced > 0 {
        tracing::warn!(node = %node.name, %replica, replaced,
            "closed tunnels of an earlier instance of this replica that never said it was leaving (crashed, or \
             two agents share one data_dir or replica id)");
    }
    {
        let mut status = node.status.lock().unwrap_or_else(|p| p.into_inner());
        status.agent_version = Some(agent_version.clone());
        status.remote_addr = Some(remote.to_string());
        status.last_heartbeat = Some(crate::unix_now());
    }
    shared.status_changed.notify_one();
    shared.cluster.note_tunnels_changed();
    tracing::info!(node = %node.name, %remote, agent_version, %replica, tunnel = tunnel_id, "agent connected");

    let handover = capabilities.iter().any(|c| c == edge_proto::tunnel::CAPABILITY_HANDOVER).then(|| {
        let mut moves = shared.agent_handover.subscribe();
        // Welcomed after the others were told: told now.
        if shared.handing_over.load(std::sync::atomic::Ordering::Acquire) {
            moves.mark_changed();
        }
        moves
    });
    // Agents that serve custom domains learn the node's verified ones now
    // and at every change.
    let mut domains =
        capabilities.iter().any(|c| c == edge_proto::tunnel::CAPABILITY_DOMAINS).then(|| shared.domains.subscribe());
    let sent_domains = domains.as_mut().map(|rx| routed_domains(&rx.borrow_and_update(), &node.name));
    let greeted = async {
        if let Some(list) = &sent_domains {
            step(writer.send(ServerMessage::Domains { domains: list.clone() })).await?;
        }
        // Answers an order is waiting for right now reach this agent too
        // (after its domains: it answers only for those).
        let pending = if answers_alpn { node.alpn.pending() } else { Vec::new() };
        for (host, digest) in pending {
            let digest = Some(edge_proto::tunnel::encode_digest(&digest));
            step(writer.send(ServerMessage::AcmeTlsAlpn { host, digest })).await?;
        }
        Ok::<_, SessionError>(())
    }
    .await;
    if let Err(e) = greeted {
        node.remove_tunnel(tunnel_id);
        shared.status_changed.notify_one();
        shared.cluster.note_tunnels_changed();
        return Err(e);
    }
    let sent_domains = sent_domains.unwrap_or_default();
    let control = Control {
        shared: &shared,
        conn: &conn,
        node: &node,
        state: &state,
        declared: endpoint.as_deref(),
        draining: &draining,
        close_tunnels: &close_tunnels,
        servers,
        handover,
        domains,
        sent_domains,
        alpn,
        tunnel_id,
    };
    // The agent's answers to its QUIC clients, for as long as the tunnel.
    // (A tunnel without a route has no use for unidirectional streams.)
    let answers = async {
        match (&shared.quic_clients, &quic_route) {
            (Some(clients), Some(route)) => clients.carry_answers(route.route(), &conn, quic_streams).await,
            _ => edge_net::frame_streams::refuse_all(&conn).await,
        }
        std::future::pending::<()>().await
    };
    let result = tokio::select! {
        result = control_loop(control, &mut reader, &mut writer, shared.limits().drain_timeout_secs) => result,
        () = answers => Ok(()),
    };
    drop(quic_route);
    let remaining = node.remove_tunnel(tunnel_id);
    shared.status_changed.notify_one();
    shared.cluster.note_tunnels_changed();
    tracing::info!(node = %node.name, %remote, tunnel = tunnel_id, remaining, "agent disconnected");
    result
}

type Reader = FramedRead<quinn::RecvStream, ControlCodec<AgentMessage, ServerMessage>>;
type Writer = FramedWrite<quinn::SendStream, ControlCodec<AgentMessage, ServerMessage>>;

/// What the control loop of one tunnel watches.
struct Control<'a> {
    shared: &'a Arc<Shared>,
    conn: &'a quinn::Connection,
    node: &'a Arc<NodeHandle>,
    state: &'a TunnelState,
    /// The endpoint the agent declared in its `hello`.
    declared: Option<&'a str>,
    /// Cancelled when the server starts draining: agents are told once.
    draining: &'a CancellationToken,
    /// Cancelled when the drain is over: tunnels close.
    close_tunnels: &'a CancellationToken,
    /// The cluster's server list, for agents that follow it.
    servers: Option<tokio::sync::watch::Receiver<Arc<crate::cluster::AgentList>>>,
    /// Moves on when agents are to connect to a successor (for agents that
    /// understand it).
    handover: Option<tokio::sync::watch::Receiver<u64>>,
    /// The store's custom domains, for agents that serve them.
    domains: Option<tokio::sync::watch::Receiver<Arc<Vec<crate::store::DomainRecord>>>>,
    /// The node's domains as last sent.
    sent_domains: Vec<String>,
    /// TLS-ALPN-01 answers to relay, for agents that give them.
    alpn: Option<tokio::sync::broadcast::Receiver<crate::tls_alpn::AlpnCommand>>,
    /// This tunnel.
    tunnel_id: u64,
}

/// The domains routed to `node`, sorted by name (as the store lists them).
fn routed_domains(all: &[crate::store::DomainRecord], node: &str) -> Vec<String> {
    // Bounded as the agent reads it, whatever the store holds.
    all.iter()
        .filter(|d| d.node == node && d.state.routed)
        .map(|d| d.name.clone())
        .take(edge_proto::domains::MAX_DOMAINS_PER_NODE)
        .collect()
}

async fn control_loop(
    control: Control<'_>,
    reader: &mut Reader,
    writer: &mut Writer,
    drain_secs: u64,
) -> Result<(), SessionError> {
    let Control {
        shared,
        conn,
        node,
        state,
        declared,
        draining,
        close_tunnels,
        mut servers,
        mut handover,
        mut domains,
        mut sent_domains,
        mut alpn,
        tunnel_id,
    } = control;
    let mut told_draining: Option<std::time::Instant> = None;
    let mut last_routes: Option<std::time::Instant> = None;
    let mut remote = conn.remote_address();
    let mut address_check = tokio::time::interval(ADDRESS_CHECK);
    address_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // The drain notice goes first even when the drain is already over.
            biased;
            _ = draining.cancelled(), if told_draining.is_none() => {
                told_draining = Some(std::time::Instant::now());
                // Best effort: the agent learns that this server is going and
                // that open streams get `drain_secs` to finish.
                if handover.is_none() || !shared.retiring.load(std::sync::atomic::Ordering::Relaxed) {
                    let notice = writer.send(ServerMessage::Draining { drain_secs });
                    let _ = tokio::time::timeout(Duration::from_secs(1), notice).await;
                }
            }
            _ = close_tunnels.cancelled() => {
                // Closing discards unsent stream data: give a notice sent a
                // moment ago time to leave.
                let since = told_draining.map_or(NOTICE_FLIGHT, |at| at.elapsed());
                tokio::time::sleep(NOTICE_FLIGHT.saturating_sub(since)).await;
                conn.close(VarInt::from_u32(codes::CLOSE_SHUTDOWN), b"server shutting down");
                return Ok(());
            }
            changed = async { handover.as_mut()?.changed().await.ok() }, if handover.is_some() => {
                if changed.is_none() {
                    handover = None;
                    continue;
                }
                step(writer.send(ServerMessage::Handover)).await?;
            }
            changed = async { servers.as_mut()?.changed().await.ok() }, if servers.is_some() => {
                let Some(()) = changed else {
                    servers = None;
                    continue;
                };
                let list = servers.as_mut().map(|rx| rx.borrow_and_update().as_ref().clone()).unwrap_or_default();
                let revision = list.revision.max(0) as u64;
                step(writer.send(ServerMessage::Servers { servers: list.servers, revision })).await?;
            }
            changed = async { domains.as_mut()?.changed().await.ok() }, if domains.is_some() => {
                let Some(()) = changed else {
                    domains = None;
                    continue;
                };
                let now = domains.as_mut().map(|rx| routed_domains(&rx.borrow_and_update(), &node.name)).unwrap_or_default();
                if now != sent_domains {
                    sent_domains = now;
                    step(writer.send(ServerMessage::Domains { domains: sent_domains.clone() })).await?;
                }
            }
            command = async { Some(alpn.as_mut()?.recv().await) }, if alpn.is_some() => {
                use tokio::sync::broadcast::error::RecvError;
                let command = match command {
                    Some(Ok(command)) => command,
                    // A lagging receiver skips to the newest commands: the
                    // order waits for confirmations and the node retries.
                    Some(Err(RecvError::Lagged(_))) => continue,
                    Some(Err(RecvError::Closed)) | None => {
                        alpn = None;
                        continue;
                    }
                };
                let digest = command.digest.as_ref().map(edge_proto::tunnel::encode_digest);
                step(writer.send(ServerMessage::AcmeTlsAlpn { host: command.host, digest })).await?;
            }
            _ = address_check.tick() => {
                let now = conn.remote_address();
                if now != remote {
                    agent_moved(shared, node, declared, remote, now).await;
                    remote = now;
                }
            }
            reason = conn.closed() => {
                return match reason {
                    quinn::ConnectionError::LocallyClosed | quinn::ConnectionError::ApplicationClosed(_) => Ok(()),
                    other => Err(other.into()),
                };
            }
            message = reader.next() => match message {
                Some(Ok(AgentMessage::Heartbeat { seq, open_streams })) => {
                    {
                        let mut status = node.status.lock().unwrap_or_else(|p| p.into_inner());
                        status.last_heartbeat = Some(crate::unix_now());
                        status.agent_open_streams = open_streams;
                    }
                    // A peer that stops reading must not park this loop.
                    step(writer.send(ServerMessage::HeartbeatAck { seq })).await?;
                }
                Some(Ok(AgentMessage::Routes { routes })) => {
                    // What the agent says it serves, shown to operators; it
                    // routes nothing here (the node's names are the store's).
                    if !edge_proto::routes::valid_report(&routes) {
                        return Err(close_with(conn, codes::CLOSE_PROTOCOL_ERROR,
                            SessionError::Protocol("bad routes report (at most 64 routes of 16 plain upstreams)")));
                    }
                    let changed = {
                        let mut status = node.status.lock().unwrap_or_else(|p| p.into_inner());
                        let changed = status.routes.as_ref() != Some(&routes);
                        status.routes = Some(routes);
                        changed
                    };
                    // A prompt flush at most once a second per tunnel; the
                    // periodic flush writes reports that come faster.
                    if changed && last_routes.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        last_routes = Some(std::time::Instant::now());
                        shared.status_changed.notify_one();
                    }
                }
                Some(Ok(AgentMessage::AcmeTlsAlpnReady { host, digest })) => {
                    if let Some(digest) = edge_proto::tunnel::decode_digest(&digest) {
                        node.alpn.confirmed(&host, &digest, tunnel_id);
                    }
                }
                Some(Ok(AgentMessage::Leaving)) => {
                    if !state.leaving.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::info!(node = %node.name, remote = %conn.remote_address(),
                            "agent leaving: new streams go to the node's other tunnels");
                    }
                    step(writer.send(ServerMessage::LeaveAck)).await?;
                }
                Some(Ok(AgentMessage::Hello { .. })) => {
                    return Err(close_with(conn, codes::CLOSE_PROTOCOL_ERROR, SessionError::Protocol("second hello")));
                }
                Some(Err(e)) => return Err(close_with(conn, codes::CLOSE_PROTOCOL_ERROR, e)),
                None => {
                    conn.close(VarInt::from_u32(codes::CLOSE_NORMAL), b"control stream closed");
                    return Ok(());
                }
            }
        }
    }
}

/// Sends `Rejected` and gives the agent a moment to read it and hang up
/// first, so it acts on the verdict instead of racing our close (which on a
/// fast path can reach it as a stateless reset and look retryable).
async fn reject(conn: &quinn::Connection, writer: &mut Writer, code: u32, reason: String) {
    let sent = tokio::time::timeout(HANDSHAKE_STEP, writer.send(ServerMessage::Rejected { code, reason })).await;
    if matches!(sent, Ok(Ok(()))) {
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
    }
}

fn close_with(conn: &quinn::Connection, code: u32, error: impl Into<SessionError>) -> SessionError {
    let error = error.into();
    conn.close(VarInt::from_u32(code), error.to_string().as_bytes());
    error
}

/// Sets the node's endpoint from what its agent declared, resolved against
/// the address the tunnel comes from. A refused endpoint clears the node's
/// endpoint instead of leaving an older one in place. An endpoint other than
/// the one last verified drops that verification, so DNS stops answering an
/// address the node may have left until a probe verifies the new one.
/// Returns whether the zone must be rebuilt (a direct node lost its address).
fn apply_endpoint(shared: &Shared, node: &NodeHandle, declared: Option<&str>, remote: SocketAddr) -> bool {
    let allow_loopback = shared.modes().allow_loopback_endpoints;
    let resolved = match declared.map(|e| crate::endpoints::resolve(e, remote, &shared.own_addresses(), allow_loopback))
    {
        Some(Ok(addr)) => Some(addr),
        Some(Err(e)) => {
            tracing::warn!(node = %node.name, error = %e, "ignoring the agent's endpoint");
            None
        }
        None => None,
    };
    *node.endpoint.lock().unwrap_or_else(|p| p.into_inner()) = resolved;
    let was_direct = node.direct_address().is_some();
    let mut tracker = node.mode.lock().unwrap_or_else(|p| p.into_inner());
    if tracker.verified().is_some() && tracker.verified() != resolved {
        tracker.forget_verified();
        return was_direct;
    }
    false
}

/// The tunnel's remote address changed (the connection migrated: a NAT
/// rebinding, a new network). A `:port` endpoint means "where I connect
/// from", so it is resolved again; the status shows the new address.
async fn agent_moved(shared: &Shared, node: &NodeHandle, declared: Option<&str>, from: SocketAddr, to: SocketAddr) {
    tracing::info!(node = %node.name, %from, %to, "agent's address changed (connection migrated)");
    node.status.lock().unwrap_or_else(|p| p.into_inner()).remote_addr = Some(to.to_string());
    if declared.is_some_and(|d| d.starts_with(':')) && apply_endpoint(shared, node, declared, to) {
        shared.nudge(crate::store::Change::ModeChanged(node.name.clone()));
    }
}
