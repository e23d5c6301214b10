//! The in-memory node registry: routes (hostname → node) and live tunnels.
//!
//! Every client connection does one lookup here under a read lock; the store
//! is never consulted per connection. The store's change feed updates it one
//! node at a time ([`Registry::upsert`], [`Registry::remove`]); it is rebuilt
//! whole ([`Registry::reload`]) only at start and after a resync. Removing a
//! node closes its tunnels.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use edge_net::splice::ByteCounters;
use edge_net::stall::StallBudget;
use subtle::ConstantTimeEq;

use crate::store::NodeRecord;

/// Per-node traffic counters.
#[derive(Debug, Default)]
pub struct NodeMetrics {
    /// Client connections currently spliced to the node.
    pub active: AtomicU64,
    /// Client connections ever routed to the node.
    pub total: AtomicU64,
    /// Bytes each way (client → node is `tcp_to_quic`).
    pub bytes: ByteCounters,
    /// Client connections reset because the client stopped reading while
    /// the tunnel needed the window (`edge_net::stall`).
    pub shed: AtomicU64,
}

/// A live agent connection.
#[derive(Debug, Clone)]
pub struct Tunnel {
    /// Unique per server process.
    pub id: u64,
    /// The QUIC connection.
    pub conn: quinn::Connection,
    /// The agent process it comes from (see `AgentMessage::Hello`).
    pub instance: String,
    /// The agent installation it comes from (empty for agents that do not
    /// send one: they count as one replica).
    pub replica: String,
    /// Placement state shared by every clone.
    pub state: Arc<TunnelState>,
    /// Streams of this connection whose client stopped reading.
    pub stalls: Arc<StallBudget>,
}

impl Tunnel {
    /// A new tunnel in the normal state; `stalls` sized for its windows.
    pub fn new(id: u64, conn: quinn::Connection, instance: String, replica: String, stalls: Arc<StallBudget>) -> Self {
        Self { id, conn, instance, replica, state: Arc::default(), stalls }
    }
}

/// How the server should treat a tunnel when placing new streams.
#[derive(Debug, Default)]
pub struct TunnelState {
    /// The agent said it is leaving: used only if nothing else is up.
    pub leaving: std::sync::atomic::AtomicBool,
    /// Milliseconds (since [`clock_ms`]'s origin) until which the tunnel is
    /// avoided: a stream on it went unanswered, so the agent may be dead
    /// without the connection having timed out yet.
    pub avoid_until_ms: AtomicU64,
    /// The agent announced `services` (it reads stream headers naming a TCP
    /// service; older agents refuse them).
    pub serves_services: std::sync::atomic::AtomicBool,
    /// The agent announced `acme_tls_alpn` (it answers TLS-ALPN-01 on the
    /// server's word).
    pub answers_tls_alpn: std::sync::atomic::AtomicBool,
}

/// Milliseconds since the first call: a cheap monotonic clock for
/// [`TunnelState::avoid_until_ms`].
pub fn clock_ms() -> u64 {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
}

/// What the server knows at run time about a node's agent.
#[derive(Debug, Clone, Default)]
pub struct RuntimeStatus {
    /// Unix seconds of the last heartbeat (control stream or signal API).
    pub last_heartbeat: Option<i64>,
    /// Version the agent reported.
    pub agent_version: Option<String>,
    /// Where the newest tunnel comes from.
    pub remote_addr: Option<String>,
    /// Streams the agent reported open in its last heartbeat.
    pub agent_open_streams: u64,
    /// Expiry (Unix seconds) of the certificate the agent reported serving.
    pub cert_not_after: Option<i64>,
    /// The routes the agent last reported (`AgentMessage::Routes`).
    pub routes: Option<Vec<edge_proto::routes::RouteReport>>,
}

/// A node and its live tunnels.
#[derive(Debug)]
pub struct NodeHandle {
    /// Node name.
    pub name: String,
    /// Hostnames routed to it.
    pub hostnames: Vec<String>,
    token_hash: Mutex<[u8; 32]>,
    tunnels: Mutex<Vec<Tunnel>>,
    next_pick: AtomicU64,
    /// Traffic counters.
    pub metrics: NodeMetrics,
    /// Agent-reported status.
    pub status: Mutex<RuntimeStatus>,
    /// Direct/proxy mode and its counters.
    pub mode: Mutex<crate::modes::ModeTracker>,
    /// The public endpoint the agent declared (resolved against the address
    /// it connects from when it gave only a port).
    pub endpoint: Mutex<Option<SocketAddr>>,
    /// Plain HTTP behaviour.
    pub http_mode: Mutex<crate::store::HttpMode>,
    /// Requests the node may still make of the signal API
    /// (`limits.node_signal_rate`).
    pub signal_budget: Mutex<crate::limits::TokenBucket>,
    /// TLS-ALPN-01 answers for the node's agents (CSR flow of its custom
    /// domains).
    pub alpn: crate::tls_alpn::AlpnRelay,
}

impl NodeHandle {
    fn new(record: &NodeRecord) -> Self {
        Self {
            name: record.name.clone(),
            hostnames: record.hostnames.clone(),
            token_hash: Mutex::new(record.token_hash),
            tunnels: Mutex::new(Vec::new()),
            next_pick: AtomicU64::new(0),
            metrics: NodeMetrics::default(),
            status: Mutex::new(RuntimeStatus::default()),
            mode: Mutex::new(crate::modes::ModeTracker::restored(
                record.mode,
                record.endpoint.as_deref().and_then(|e| e.parse().ok()),
            )),
            endpoint: Mutex::new(record.endpoint.as_deref().and_then(|e| e.parse().ok())),
            http_mode: Mutex::new(record.http_mode),
            signal_budget: Mutex::default(),
            alpn: crate::tls_alpn::AlpnRelay::default(),
        }
    }

    /// The current mode.
    pub fn current_mode(&self) -> crate::modes::Mode {
        lock(&self.mode).mode()
    }

    /// The status the store records for the node.
    pub fn stored_status(&self) -> crate::store::NodeStatus {
        let status = lock(&self.status).clone();
        let tunnels = self.tunnel_count();
        crate::store::NodeStatus {
            connected: tunnels > 0,
            last_heartbeat: status.last_heartbeat,
            open_connections: self.metrics.active.load(Ordering::Relaxed),
            agent_version: status.agent_version,
            remote_addr: status.remote_addr,
            cert_not_after: status.cert_not_after,
            routes: status.routes,
        }
    }

    /// Takes the mode and endpoint the store holds (a follower of the
    /// cluster's decider, or a server that just became the decider).
    pub fn adopt_mode(&self, mode: crate::modes::Mode, endpoint: Option<SocketAddr>) {
        lock(&self.mode).adopt(mode, endpoint);
        if endpoint.is_some() {
            let mut declared = lock(&self.endpoint);
            if declared.is_none() {
                *declared = endpoint;
            }
        }
    }

    /// The declared endpoint, if any.
    pub fn current_endpoint(&self) -> Option<SocketAddr> {
        *lock(&self.endpoint)
    }

    /// Where clients reach the node directly: the endpoint the last probe
    /// verified, while the node is direct. Never an address the agent
    /// merely declared.
    pub fn direct_address(&self) -> Option<SocketAddr> {
        let tracker = lock(&self.mode);
        (tracker.mode() == crate::modes::Mode::Direct).then(|| tracker.verified()).flatten()
    }

    /// The key of reachability probes: SHA-256 of the node token.
    pub fn probe_key(&self) -> [u8; 32] {
        *lock(&self.token_hash)
    }

    /// Compares a token's hash with the node's in constant time.
    pub fn token_matches(&self, token_hash: &[u8; 32]) -> bool {
        let stored = *lock(&self.token_hash);
        bool::from(stored.ct_eq(token_hash))
    }

    /// The tunnel a new stream should use, other than those in `exclude`.
    ///
    /// Streams go round-robin over the best-ranked open tunnels:
    /// 0. normal tunnels of each replica's newest instance (an agent may
    ///    hold several connections, and a node may run several replicas);
    /// 1. tunnels avoided for a while because a stream went unanswered;
    /// 2. tunnels whose agent said it is leaving;
    /// 3. tunnels of a replica's older instance (a restarted agent's
    ///    tunnels win at once, before the idle timeout has noticed that the
    ///    killed instance's tunnels are dead).
    pub fn pick_tunnel(&self, exclude: &[u64]) -> Option<Tunnel> {
        // No allocation: this runs once per client connection.
        let tunnels = lock(&self.tunnels);
        let now = clock_ms();
        let rank = |i: usize| -> Option<u8> {
            let t = &tunnels[i];
            if exclude.contains(&t.id) || t.conn.close_reason().is_some() {
                return None;
            }
            let superseded = tunnels[i + 1..].iter().any(|later| {
                later.replica == t.replica && later.instance != t.instance && later.conn.close_reason().is_none()
            });
            Some(if superseded {
                3
            } else if t.state.leaving.load(Ordering::Relaxed) {
                2
            } else if t.state.avoid_until_ms.load(Ordering::Relaxed) > now {
                1
            } else {
                0
            })
        };
        let best = (0..tunnels.len()).filter_map(rank).min()?;
        let count = (0..tunnels.len()).filter(|&i| rank(i) == Some(best)).count();
        let nth = self.next_pick.fetch_add(1, Ordering::Relaxed) as usize % count.max(1);
        let i = (0..tunnels.len()).filter(|&i| rank(i) == Some(best)).nth(nth)?;
        Some(tunnels[i].clone())
    }

    /// Adds a tunnel. Tunnels of an older instance of the same replica that
    /// did not say they were leaving belong to a process that died without
    /// a word (the replica id lives in the agent's data directory): they are
    /// closed, so their streams reset now instead of hanging until the QUIC
    /// idle timeout. Returns how many were closed.
    pub fn add_tunnel(&self, tunnel: Tunnel) -> usize {
        let mut tunnels = lock(&self.tunnels);
        let mut replaced = 0;
        for old in tunnels.iter() {
            let crashed = old.replica == tunnel.replica
                && old.instance != tunnel.instance
                && !old.state.leaving.load(Ordering::Relaxed)
                && old.conn.close_reason().is_none();
            if crashed {
                old.conn.close(
                    quinn::VarInt::from_u32(edge_proto::tunnel::codes::CLOSE_NORMAL),
                    b"replaced by a newer instance of this replica",
                );
                replaced += 1;
            }
        }
        tunnels.push(tunnel);
        replaced
    }

    /// Removes a tunnel; returns how many remain.
    pub fn remove_tunnel(&self, id: u64) -> usize {
        let mut tunnels = lock(&self.tunnels);
        tunnels.retain(|t| t.id != id);
        tunnels.len()
    }

    /// Ids of the live tunnels whose agent answers TLS-ALPN-01.
    pub fn tls_alpn_tunnels(&self) -> Vec<u64> {
        lock(&self.tunnels)
            .iter()
            .filter(|t| t.conn.close_reason().is_none() && t.state.answers_tls_alpn.load(Ordering::Relaxed))
            .map(|t| t.id)
            .collect()
    }

    /// Number of live tunnels.
    pub fn tunnel_count(&self) -> usize {
        lock(&self.tunnels).iter().filter(|t| t.conn.close_reason().is_none()).count()
    }

    /// Closes every tunnel with `code`.
    pub fn close_tunnels(&self, code: u32, reason: &str) {
        for t in lock(&self.tunnels).drain(..) {
            t.conn.close(quinn::VarInt::from_u32(code), reason.as_bytes());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Debug, Default)]
struct Tables {
    nodes: HashMap<String, Arc<NodeHandle>>,
    routes: HashMap<String, Arc<NodeHandle>>,
    /// Verified custom domains → node name (by name, so a node whose
    /// handle is replaced keeps its domains).
    domains: HashMap<String, String>,
}

/// Routes and tunnels of all nodes.
#[derive(Debug, Default)]
pub struct Registry {
    tables: RwLock<Tables>,
    next_tunnel_id: AtomicU64,
}

impl Registry {
    /// The node that owns `sni` (already lowercased): exact name first, then
    /// the one-label wildcard, then the verified custom domains (which lie
    /// outside the zone, so they never shadow a node's name).
    pub fn route(&self, sni: &str) -> Option<Arc<NodeHandle>> {
        let tables = self.tables.read().unwrap_or_else(|p| p.into_inner());
        if let Some(node) = tables.routes.get(sni) {
            return Some(node.clone());
        }
        if let Some(node) = edge_proto::names::wildcard_parent(sni).and_then(|w| tables.routes.get(&w)) {
            return Some(node.clone());
        }
        tables.domains.get(sni).and_then(|n| tables.nodes.get(n)).cloned()
    }

    /// Routes exactly these custom domains (the routed ones of the store).
    pub fn set_domains(&self, domains: &[crate::store::DomainRecord]) {
        let map = domains.iter().filter(|d| d.state.routed).map(|d| (d.name.clone(), d.node.clone())).collect();
        self.tables.write().unwrap_or_else(|p| p.into_inner()).domains = map;
    }

    /// The custom domains routed to `node`, sorted.
    pub fn domains_of(&self, node: &str) -> Vec<String> {
        let tables = self.tables.read().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<String> =
            tables.domains.iter().filter(|(_, n)| *n == node).map(|(d, _)| d.clone()).collect();
        names.sort();
        names
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> Option<Arc<NodeHandle>> {
        self.tables.read().unwrap_or_else(|p| p.into_inner()).nodes.get(name).cloned()
    }

    /// All nodes, by name.
    pub fn nodes(&self) -> Vec<Arc<NodeHandle>> {
        let tables = self.tables.read().unwrap_or_else(|p| p.into_inner());
        let mut nodes: Vec<_> = tables.nodes.values().cloned().collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        nodes
    }

    /// A fresh tunnel id.
    pub fn next_tunnel_id(&self) -> u64 {
        self.next_tunnel_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Makes the registry match `records` (at start and after a resync):
    /// new nodes appear, removed nodes lose their routes and tunnels,
    /// re-keyed nodes get the new hash.
    pub fn reload(&self, records: &[NodeRecord]) {
        let mut removed = Vec::new();
        {
            let mut tables = self.tables.write().unwrap_or_else(|p| p.into_inner());
            let mut nodes = HashMap::with_capacity(records.len());
            for record in records {
                let (handle, replaced) = merge(tables.nodes.remove(&record.name), record);
                removed.extend(replaced);
                nodes.insert(record.name.clone(), handle);
            }
            removed.extend(tables.nodes.drain().map(|(_, n)| n));
            let mut routes = HashMap::new();
            for node in nodes.values() {
                for host in &node.hostnames {
                    routes.insert(host.clone(), node.clone());
                }
            }
            let domains = std::mem::take(&mut tables.domains);
            *tables = Tables { nodes, routes, domains };
        }
        for node in removed {
            retire(&node);
        }
    }

    /// Adds or updates one node from its stored record.
    pub fn upsert(&self, record: &NodeRecord) -> Arc<NodeHandle> {
        let (handle, replaced) = {
            let mut tables = self.tables.write().unwrap_or_else(|p| p.into_inner());
            let existing = tables.nodes.remove(&record.name);
            let (handle, replaced) = merge(existing, record);
            if let Some(old) = &replaced {
                for host in &old.hostnames {
                    tables.routes.remove(host);
                }
            }
            for host in &handle.hostnames {
                tables.routes.insert(host.clone(), handle.clone());
            }
            tables.nodes.insert(record.name.clone(), handle.clone());
            (handle, replaced)
        };
        if let Some(old) = replaced {
            retire(&old);
        }
        handle
    }

    /// Removes a node: its routes go and its tunnels are closed. `false` if
    /// it was not here.
    pub fn remove(&self, name: &str) -> bool {
        let removed = {
            let mut tables = self.tables.write().unwrap_or_else(|p| p.into_inner());
            let removed = tables.nodes.remove(name);
            if let Some(node) = &removed {
                for host in &node.hostnames {
                    if tables.routes.get(host).is_some_and(|n| Arc::ptr_eq(n, node)) {
                        tables.routes.remove(host);
                    }
                }
            }
            removed
        };
        match removed {
            Some(node) => {
                retire(&node);
                true
            }
            None => false,
        }
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.tables.read().unwrap_or_else(|p| p.into_inner()).nodes.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The handle for `record`: the existing one updated in place (its tunnels
/// and counters kept), or a new one, with the old handle to retire when the
/// hostnames changed.
fn merge(existing: Option<Arc<NodeHandle>>, record: &NodeRecord) -> (Arc<NodeHandle>, Option<Arc<NodeHandle>>) {
    match existing {
        Some(existing) if existing.hostnames == record.hostnames => {
            let mut hash = lock(&existing.token_hash);
            if *hash != record.token_hash {
                *hash = record.token_hash;
                // A new token (say, after a compromise) voids the endpoint
                // the old one vouched for.
                *lock(&existing.endpoint) = None;
                lock(&existing.mode).forget_verified();
                // Tunnels opened with the old token are cut.
                existing.close_tunnels(edge_proto::tunnel::codes::CLOSE_AUTH_FAILED, "token rotated");
            }
            drop(hash);
            *lock(&existing.http_mode) = record.http_mode;
            (existing, None)
        }
        Some(existing) => (Arc::new(NodeHandle::new(record)), Some(existing)),
        None => (Arc::new(NodeHandle::new(record)), None),
    }
}

fn retire(node: &NodeHandle) {
    tracing::info!(node = %node.name, "node removed; closing its tunnels");
    node.close_tunnels(edge_proto::tunnel::codes::CLOSE_NODE_REMOVED, "node removed");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NodeStatus;

    fn record(name: &str, hash: u8) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            hostnames: edge_proto::names::node_hostnames(name, "z.test"),
            token_hash: [hash; 32],
            created_at: 0,
            status: NodeStatus::default(),
            http_mode: crate::store::HttpMode::Redirect,
            mode: crate::store::Mode::Offline,
            endpoint: None,
            mode_since: None,
        }
    }

    #[test]
    fn exact_then_wildcard_one_label() {
        let reg = Registry::default();
        reg.reload(&[record("n1", 1), record("n2", 2)]);
        assert_eq!(reg.route("n1.z.test").unwrap().name, "n1");
        assert_eq!(reg.route("app.n1.z.test").unwrap().name, "n1");
        assert_eq!(reg.route("app.n2.z.test").unwrap().name, "n2");
        assert!(reg.route("a.b.n1.z.test").is_none(), "wildcard covers one label");
        assert!(reg.route("z.test").is_none());
        assert!(reg.route("n3.z.test").is_none());
        assert!(reg.route("n1.z.test.evil").is_none());
    }

    #[test]
    fn custom_domains_route_after_node_names() {
        use edge_proto::domains::VerifyState;
        let reg = Registry::default();
        reg.reload(&[record("n1", 1), record("n2", 2)]);
        let domain = |name: &str, node: &str, routed: bool| crate::store::DomainRecord {
            name: name.into(),
            node: node.into(),
            verify_value: String::new(),
            created_at: 0,
            state: VerifyState { routed, ..VerifyState::default() },
        };
        reg.set_domains(&[domain("www.c.com", "n1", true), domain("api.c.com", "n2", false)]);
        assert_eq!(reg.route("www.c.com").unwrap().name, "n1");
        assert!(reg.route("api.c.com").is_none(), "an unverified domain is not routed");
        assert!(reg.route("x.www.c.com").is_none(), "no wildcard for a custom domain");
        assert_eq!(reg.domains_of("n1"), vec!["www.c.com".to_string()]);
        assert!(reg.domains_of("n2").is_empty());
        reg.upsert(&record("n1", 7));
        reg.reload(&[record("n1", 8), record("n2", 2)]);
        assert_eq!(reg.route("www.c.com").unwrap().name, "n1", "kept across reloads");
        reg.remove("n1");
        assert!(reg.route("www.c.com").is_none(), "a removed node's domain routes nowhere");
    }

    #[test]
    fn reload_removes_and_rekeys() {
        let reg = Registry::default();
        reg.reload(&[record("n1", 1), record("n2", 2)]);
        let n1 = reg.node("n1").unwrap();
        assert!(n1.token_matches(&[1; 32]));
        reg.reload(&[record("n1", 9)]);
        assert!(Arc::ptr_eq(&n1, &reg.node("n1").unwrap()), "handle kept across reloads");
        assert!(n1.token_matches(&[9; 32]) && !n1.token_matches(&[1; 32]));
        assert!(reg.route("n2.z.test").is_none());
        assert_eq!(reg.nodes().len(), 1);
    }

    #[test]
    fn upsert_and_remove_touch_one_node() {
        let reg = Registry::default();
        reg.reload(&[record("n1", 1), record("n2", 2)]);
        let n1 = reg.node("n1").unwrap();
        reg.upsert(&record("n3", 3));
        assert_eq!(reg.route("x.n3.z.test").unwrap().name, "n3");
        let same = reg.upsert(&record("n1", 7));
        assert!(Arc::ptr_eq(&n1, &same), "an update keeps the handle (and its tunnels)");
        assert!(n1.token_matches(&[7; 32]));
        assert!(reg.remove("n2"));
        assert!(!reg.remove("n2"));
        assert!(reg.route("n2.z.test").is_none() && reg.node("n2").is_none());
        assert_eq!(reg.len(), 2);
        assert_eq!(reg.route("n1.z.test").unwrap().name, "n1");
    }
}
