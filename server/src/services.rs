//! Raw TCP services (`edge-server service add`): one listener per service
//! in the store, kept in line with the set the store sync publishes, and
//! each accepted connection spliced over a tunnel of the service's node.
//! The stream header names the service's target; the agent connects only a
//! target it declared under that name.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use edge_proto::tunnel::{codes, StreamHeader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ServerConfig;
use crate::state::Shared;
use crate::store::ServiceRecord;

/// How often listeners that could not be bound are tried again.
const BIND_RETRY: Duration = Duration::from_secs(2);

/// A service's listen address: `ip:port`, or `:port` for `0.0.0.0:port`.
/// Port 0 is refused (the address must be stable across restarts).
pub fn parse_listen(text: &str) -> Option<SocketAddr> {
    let addr: SocketAddr = match text.strip_prefix(':') {
        Some(port) => SocketAddr::from(([0, 0, 0, 0], port.parse::<u16>().ok()?)),
        None => text.parse().ok()?,
    };
    (addr.port() != 0).then_some(addr)
}

/// Which of the server's own listeners `addr` would collide with, if any
/// (same port, and the same or a wildcard address): as configured, and as
/// bound by a running server (its `listening.json`, for port 0 in the
/// config).
pub fn clashes_with(config: &ServerConfig, addr: SocketAddr) -> Option<&'static str> {
    let l = &config.listen;
    let mut own = vec![
        ("tls", Some(l.tls)),
        ("api", Some(l.api)),
        ("http", l.http),
        ("metrics", l.metrics),
        ("admin", l.admin),
        ("dns", config.dns.as_ref().map(|d| d.listen)),
    ];
    let bound = std::fs::read(crate::server::listening_file(&config.data_dir)).ok();
    if let Some(bound) = bound.and_then(|b| serde_json::from_slice::<crate::server::BoundAddrs>(&b).ok()) {
        own.extend([
            ("tls", Some(bound.tls)),
            ("api", Some(bound.api)),
            ("http", bound.http),
            ("metrics", bound.metrics),
            ("admin", bound.admin),
            ("dns", bound.dns),
        ]);
    }
    own.into_iter().find_map(|(what, a)| {
        let a = a?;
        let overlap = a.ip() == addr.ip() || a.ip().is_unspecified() || addr.ip().is_unspecified();
        (a.port() == addr.port() && overlap).then_some(what)
    })
}

/// Keeps one listener per service of the published set until `shutdown`.
pub async fn run(shared: Arc<Shared>, shutdown: CancellationToken, tracker: TaskTracker) {
    let mut wanted = shared.services.subscribe();
    let mut running: HashMap<String, (ServiceRecord, CancellationToken)> = HashMap::new();
    let mut warned = std::collections::HashSet::new();
    loop {
        let set = wanted.borrow_and_update().clone();
        let missing = reconcile(&shared, &set, &mut running, &mut warned, &shutdown, &tracker);
        let retry = async {
            if missing {
                tokio::time::sleep(BIND_RETRY).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = wanted.changed() => if changed.is_err() { break },
            _ = retry => {}
        }
    }
    for (_, (_, stop)) in running {
        stop.cancel();
    }
}

/// Stops listeners of services gone or changed, starts the missing ones.
/// Returns whether some could not be bound (retried later).
fn reconcile(
    shared: &Arc<Shared>,
    set: &[ServiceRecord],
    running: &mut HashMap<String, (ServiceRecord, CancellationToken)>,
    warned: &mut std::collections::HashSet<String>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> bool {
    running.retain(|name, (record, stop)| {
        let keep = set.iter().any(|s| s == record);
        if !keep {
            stop.cancel();
            tracing::info!(service = %name, listen = %record.listen, "TCP service listener closed");
        }
        keep
    });
    let mut missing = false;
    for record in set {
        if running.contains_key(&record.name) {
            continue;
        }
        let Some(addr) = parse_listen(&record.listen) else {
            tracing::warn!(service = %record.name, listen = %record.listen, "TCP service has an invalid address; skipped");
            continue;
        };
        match bind(addr) {
            Ok(listener) => {
                let stop = shutdown.child_token();
                tracing::info!(service = %record.name, node = %record.node, %addr, target = %record.target,
                    "TCP service listening");
                let record = Arc::new(record.clone());
                tracker.spawn(serve(listener, record.clone(), shared.clone(), stop.clone(), tracker.clone()));
                warned.remove(&record.name);
                running.insert(record.name.clone(), ((*record).clone(), stop));
            }
            Err(e) => {
                missing = true;
                // Once per service until it binds: retries are silent.
                if warned.insert(record.name.clone()) {
                    tracing::warn!(service = %record.name, %addr, error = %e,
                        "cannot listen for a TCP service; retrying every 2 s");
                }
            }
        }
    }
    missing
}

/// Binds with `SO_REUSEPORT`, so that during an upgrade the successor
/// listens while the predecessor still does (each closes its own).
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

async fn serve(
    listener: TcpListener,
    service: Arc<ServiceRecord>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let admitted = shared.clone();
    crate::ingress::accept_loop(
        listener,
        &admitted,
        |s| &s.admission.tls,
        stop,
        tracker,
        move |tcp, peer| {
            shared.metrics.connections_accepted.fetch_add(1, Ordering::Relaxed);
            handle(tcp, peer, shared.clone(), service.clone())
        },
    )
    .await;
}

/// One client of a service: onto a tunnel of its node, then spliced. A
/// node without a tunnel here, at its cap, or an agent that refuses the
/// service, closes the connection.
async fn handle(tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>, service: Arc<ServiceRecord>) {
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let limits = shared.limits();
    if !shared.access.allows(&service.node, &edge_proto::access::Scope::Service(service.name.clone()), peer.ip()) {
        shared.metrics.reject("access_denied");
        return edge_net::splice::reset_tcp(&tcp);
    }
    let Some(node) = shared.registry.node(&service.node) else {
        shared.metrics.reject("node_offline");
        return edge_net::splice::reset_tcp(&tcp);
    };
    let tunnels = node.tunnel_count();
    let per_tunnel = u64::from(shared.config.tunnel.max_streams) * tunnels.max(1) as u64;
    if node.metrics.active.load(Ordering::Relaxed) >= per_tunnel.min(limits.max_connections_per_node) {
        shared.metrics.reject("node_busy");
        shared.refusals.refuse(crate::limits::Listener::Tls, crate::limits::Refusal::NodeBusy, peer.ip());
        return edge_net::splice::reset_tcp(&tcp);
    }
    let Some(sni) = node.hostnames.iter().find(|h| !h.starts_with("*.")).cloned() else {
        return edge_net::splice::reset_tcp(&tcp);
    };
    let header = StreamHeader { client: peer, local, sni, plain: false, service: Some(service.target.clone()) };
    let header = header.encode();
    let mut tried = Vec::new();
    // A tunnel whose connection fails at open or write is skipped; what the
    // agent answers (a refusal included) is final.
    let mut attempts = 0;
    let opened = loop {
        let Some(tunnel) = node.pick_tunnel(&tried) else { break None };
        tried.push(tunnel.id);
        if !tunnel.state.serves_services.load(Ordering::Relaxed) {
            continue;
        }
        attempts += 1;
        let open = tokio::time::timeout(Duration::from_millis(limits.open_stream_timeout_ms), tunnel.conn.open_bi());
        let Ok(Ok((mut send, recv))) = open.await else { continue };
        let write =
            tokio::time::timeout(Duration::from_millis(limits.agent_answer_timeout_ms), send.write_all(&header));
        if matches!(write.await, Ok(Ok(()))) {
            break Some((send, recv, tunnel.stalls.clone()));
        }
        let _ = send.reset(quinn::VarInt::from_u32(codes::STREAM_CLIENT_ABORTED));
        if attempts >= 4 {
            break None;
        }
    };
    let Some((send, recv, stalls)) = opened else {
        shared.metrics.reject("node_offline");
        tracing::debug!(%peer, service = %service.name, node = %node.name, "no tunnel of the node took the connection");
        return edge_net::splice::reset_tcp(&tcp);
    };
    let _active = crate::ingress::GaugeGuard::new(&node.metrics.active);
    node.metrics.total.fetch_add(1, Ordering::Relaxed);
    let idle = Duration::from_secs(limits.idle_timeout_secs);
    let end =
        edge_net::splice::splice(tcp, send, recv, codes::STREAM_CLIENT_ABORTED, &node.metrics.bytes, idle, &stalls)
            .await;
    tracing::trace!(%peer, service = %service.name, ?end, "service connection finished");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(parse_listen(":2222"), Some("0.0.0.0:2222".parse().unwrap()));
        assert_eq!(parse_listen("127.0.0.1:22"), Some("127.0.0.1:22".parse().unwrap()));
        assert_eq!(parse_listen("[::1]:22"), Some("[::1]:22".parse().unwrap()));
        for bad in ["", ":0", "127.0.0.1:0", "host:22", ":x", "2222"] {
            assert_eq!(parse_listen(bad), None, "{bad:?}");
        }
    }
}
