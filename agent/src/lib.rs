//! `edge-agent`: runs on a node (often behind NAT), dials `edge-server`
//! over QUIC, and serves the client connections the server routes to it:
//! TLS is terminated here with the node's own certificate, so neither the
//! key nor the plaintext ever reaches the cluster.
//!
//! - [`config`]: configuration file and validation.
//! - [`cluster`]: which servers to hold tunnels to (every live server).
//! - [`session`]: dial, authenticate, heartbeat, reconnect with backoff.
//! - [`routes`]: which upstreams serve which names; picking an upstream.
//! - [`health`]: upstream health from active checks and failed connects.
//! - [`streams`]: one client connection per QUIC stream.
//! - [`alt_svc`]: `Alt-Svc: h3` on the first HTTP/1.x response of a
//!   terminated connection.
//! - [`http3`]: QUIC clients (over the tunnel or direct), served HTTP/3.
//! - [`direct`]: clients connecting to the node itself, without the tunnel.
//! - [`tls`]: node certificate (swappable) and server trust.
//! - [`signal`]: heartbeats to the signal API.
//! - [`status`]: local `/ready` and `/metrics`.
//! - [`metrics`]: the agent's counters.
//! - [`acme`]: the node's ACME certificate: obtain, store, renew, swap.
//! - [`domain_certs`]: a certificate for each verified custom domain.
#![forbid(unsafe_code)]

pub mod acme;
pub mod alt_svc;
pub mod cluster;
pub mod config;
pub mod direct;
pub mod domain_certs;
pub mod health;
pub mod http3;
pub mod metrics;
pub mod routes;
pub mod session;
pub mod signal;
pub mod status;
pub mod streams;
pub mod tls;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use edge_proto::join::JoinTicket;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::metrics::AgentMetrics;
use crate::tls::{NodeCertResolver, ServerTrust};

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration is invalid.
    #[error("{0}")]
    Config(String),
    /// A certificate or key could not be loaded or generated.
    #[error(transparent)]
    Cert(#[from] edge_certs::CertError),
    /// A socket could not be bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// Which socket.
        what: &'static str,
        /// Address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Retrying cannot help: wrong token, node removed, wrong server.
    #[error("{0}")]
    Fatal(String),
}

/// State shared by the agent's tasks.
#[derive(Debug)]
pub struct AgentShared {
    /// Validated configuration.
    pub config: AgentConfig,
    /// Parsed join string.
    pub ticket: JoinTicket,
    /// How the server is trusted.
    pub trust: ServerTrust,
    /// Counters.
    pub metrics: AgentMetrics,
    /// Random id of this agent process, sent in every hello.
    pub instance: String,
    /// Id of this installation among the node's replicas.
    pub replica: String,
    resolver: Arc<NodeCertResolver>,
    /// The routes in force (a reload swaps the table).
    routes: std::sync::RwLock<Arc<routes::RouteTable>>,
    /// Moves on at every route change (reload, health transition): the
    /// sessions report the routes again.
    routes_changed: Arc<tokio::sync::watch::Sender<u64>>,
    /// Stops the running table's health checks.
    health_checks: Mutex<CancellationToken>,
    node: Mutex<Option<Arc<Node>>>,
    /// Serializes certificate loading between the agent's sessions.
    node_setup: tokio::sync::Mutex<()>,
    /// Set once the server has welcomed this agent. Extra connections wait
    /// for it, so a refused token is one refused attempt, not one per
    /// connection racing the others.
    welcomed: tokio::sync::watch::Sender<bool>,
    /// The cluster's live servers as a server last listed them.
    servers: tokio::sync::watch::Sender<Vec<edge_proto::tunnel::ClusterServer>>,
    /// The store revision of that list: an older list (from a server that
    /// lags behind the store) is ignored.
    servers_revision: std::sync::atomic::AtomicU64,
    /// Facts of the certificate being served.
    certificate: Mutex<Option<edge_certs::info::CertInfo>>,
    /// Set once the ACME manager runs.
    acme_started: std::sync::atomic::AtomicBool,
    /// The node's verified custom domains, as a server last sent them.
    domains: tokio::sync::watch::Sender<Vec<String>>,
    /// TLS-ALPN-01 answers being served.
    pub challenges: tls::ChallengeCerts,
    /// Held while a CSR is with the server (the node's and its domains'
    /// certificates are ordered one after another).
    pub csr_lock: tokio::sync::Mutex<()>,
    /// Stops the agent's tasks.
    shutdown: CancellationToken,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// The node as the server described it in its welcome.
#[derive(Debug)]
pub struct Node {
    /// Agent state.
    pub shared: Arc<AgentShared>,
    /// Node name.
    pub name: String,
    /// Hostnames this node owns.
    pub hostnames: Vec<String>,
}

impl Node {
    /// Whether `sni` is one of this node's names (exact or one-label
    /// wildcard) or one of its verified custom domains.
    pub fn owns(&self, sni: &str) -> bool {
        self.hostnames.iter().any(|h| h == sni)
            || edge_proto::names::wildcard_parent(sni).is_some_and(|w| self.hostnames.contains(&w))
            || self.shared.domains.borrow().iter().any(|d| d == sni)
    }
}

impl AgentShared {
    /// Takes a server list from a welcome or notice, read at the store's
    /// `revision` (ill-formed entries dropped; an empty list says nothing; a
    /// list older than the one taken is ignored).
    pub fn learn_servers(&self, servers: Vec<edge_proto::tunnel::ClusterServer>, revision: u64) {
        let servers = cluster::valid(servers);
        if servers.is_empty() {
            return;
        }
        let newest = self.servers_revision.fetch_max(revision, std::sync::atomic::Ordering::SeqCst);
        if revision < newest {
            return;
        }
        self.servers.send_if_modified(|current| {
            let changed = *current != servers;
            if changed {
                *current = servers;
            }
            changed
        });
    }

    /// Takes the node's verified custom domains from a server (names that
    /// are not plain lowercase hostnames, and any beyond the bound, are
    /// dropped).
    pub fn learn_domains(&self, mut domains: Vec<String>) {
        domains.retain(|d| {
            edge_proto::names::normalize_hostname(d).as_deref() == Some(d.as_str()) && !d.starts_with("*.")
        });
        domains.sort();
        domains.dedup();
        domains.truncate(edge_proto::domains::MAX_DOMAINS_PER_NODE);
        self.domains.send_if_modified(|current| {
            let changed = *current != domains;
            if changed {
                tracing::info!(domains = ?domains, "custom domains of this node");
                *current = domains;
            }
            changed
        });
    }

    /// The node's verified custom domains.
    pub fn domains(&self) -> tokio::sync::watch::Receiver<Vec<String>> {
        self.domains.subscribe()
    }

    /// Serves `key` (or with `None` no own certificate) for a custom domain.
    pub fn install_domain_certificate(&self, domain: &str, key: Option<Arc<rustls::sign::CertifiedKey>>) {
        self.resolver.set_domain(domain, key);
    }

    /// The servers last listed (for the signal API when the join string's
    /// server is down).
    pub fn known_servers(&self) -> Vec<edge_proto::tunnel::ClusterServer> {
        self.servers.borrow().clone()
    }

    /// The routes in force.
    pub fn routes(&self) -> Arc<routes::RouteTable> {
        self.routes.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A receiver that sees every route change.
    pub fn route_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.routes_changed.subscribe()
    }

    /// Puts the routes of `config` in force and starts their health checks;
    /// the previous table's checks stop. Connections already open keep the
    /// route (and upstream) they have.
    pub fn install_routes(&self, config: &AgentConfig) {
        let table = Arc::new(routes::RouteTable::build(config, &self.resolver, &self.routes_changed));
        table.carry_health_from(&self.routes());
        let stop = self.shutdown.child_token();
        let old = std::mem::replace(&mut *self.health_checks.lock().unwrap_or_else(|p| p.into_inner()), stop.clone());
        old.cancel();
        *self.routes.write().unwrap_or_else(|p| p.into_inner()) = table.clone();
        tokio::spawn(health::run(table, stop));
        self.routes_changed.send_modify(|n| *n += 1);
    }

    /// Applies a reloaded config: routes, upstreams, modes, ALPN and health
    /// checks. Other settings need a restart and are named in the log.
    pub fn reload(&self, config: &AgentConfig) {
        let restart = self.config.restart_only_changes(config);
        if !restart.is_empty() {
            tracing::warn!(settings = ?restart, "reload: these settings changed but apply only after a restart");
        }
        self.install_routes(config);
        let table = self.routes();
        tracing::info!(routes = table.routes().len(), "reload: routes in force");
    }

    /// The node as last welcomed by the server, once known.
    pub fn current_node(&self) -> Option<Arc<Node>> {
        self.node.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The certificates TLS termination serves (HTTP/3 serves the same).
    pub fn cert_resolver(&self) -> Arc<NodeCertResolver> {
        self.resolver.clone()
    }

    /// Facts of the certificate being served, once one is installed.
    pub fn certificate(&self) -> Option<edge_certs::info::CertInfo> {
        self.certificate.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Swaps a certificate into the TLS terminator: handshakes from now on
    /// use it, connections already open keep theirs.
    pub fn install_certificate(&self, key: Arc<rustls::sign::CertifiedKey>) {
        let info = key.cert.first().and_then(|leaf| edge_certs::info::cert_info(leaf).ok());
        if let Some(i) = &info {
            self.metrics.cert_not_after.store(i.not_after.max(0) as u64, std::sync::atomic::Ordering::Relaxed);
        }
        *self.certificate.lock().unwrap_or_else(|p| p.into_inner()) = info;
        self.resolver.set(key);
    }

    /// The node for a welcome; the certificate is loaded or generated once
    /// and reused across reconnects while the names stay the same. Without
    /// a configured certificate, a stored ACME one is used when it covers
    /// the names, else a local one until ACME delivers.
    async fn node_for(self: &Arc<Self>, name: &str, hostnames: &[String]) -> Result<Arc<Node>, AgentError> {
        let _setup = self.node_setup.lock().await;
        if let Some(node) = self.node.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            if node.name == name && node.hostnames == hostnames {
                return Ok(node);
            }
        }
        let shared = self.clone();
        let (n, h) = (name.to_string(), hostnames.to_vec());
        let use_acme = self.config.cert_file.is_none() && self.config.acme.flow != config::AcmeFlow::Off;
        let (key, stored) = tokio::task::spawn_blocking(move || {
            let stored = if use_acme {
                match acme::load_stored(&acme::store_dir(&shared.config.data_dir)) {
                    Ok(s) => s.filter(|s| acme::usable(&s.info, &h, unix_now())),
                    Err(e) => {
                        tracing::warn!(error = %e, "the stored ACME certificate is unusable; obtaining a new one");
                        None
                    }
                }
            } else {
                None
            };
            match &stored {
                Some(s) => Ok((s.key.clone(), stored)),
                None => tls::load_node_cert(&shared.config, &n, &h).map(|k| (k, None)),
            }
        })
        .await
        .map_err(|e| AgentError::Fatal(format!("certificate task failed: {e}")))??;
        self.install_certificate(key);
        if use_acme && !self.acme_started.swap(true, std::sync::atomic::Ordering::SeqCst) {
            tokio::spawn(acme::run(self.clone(), acme::Slot::Node, hostnames.to_vec(), stored, self.shutdown.clone()));
        }
        let node = Arc::new(Node { shared: self.clone(), name: name.to_string(), hostnames: hostnames.to_vec() });
        let unreachable = self.routes().unreachable(hostnames);
        if !unreachable.is_empty() {
            tracing::warn!(routes = ?unreachable, hostnames = ?hostnames,
                "routes outside the node's names: no client will reach them");
        }
        *self.node.lock().unwrap_or_else(|p| p.into_inner()) = Some(node.clone());
        Ok(node)
    }
}

/// Binds a TCP listener when an address is configured.
async fn bind_optional(addr: Option<SocketAddr>, what: &'static str) -> Result<Option<TcpListener>, AgentError> {
    let Some(addr) = addr else { return Ok(None) };
    TcpListener::bind(addr).await.map(Some).map_err(|source| AgentError::Bind { what, addr, source })
}

/// Logs a listener's bound address and records it in `path`, so supervisors
/// and tests can find an ephemeral port (e.g. `status_listen = "127.0.0.1:0"`).
fn announce(listener: &TcpListener, path: &std::path::Path, message: &str) {
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(%addr, "{message}");
    if let Err(e) = edge_certs::store::write_atomic(path, addr.as_bytes(), edge_certs::store::Sensitivity::Public) {
        tracing::warn!(error = %e, "could not record the listening address");
    }
}

/// The replica id kept in `<data_dir>/replica.id`, created on first use. If
/// it cannot be stored, a random id serves this run (a restart then counts
/// as a new replica until the old tunnels time out).
fn replica_id(data_dir: &std::path::Path) -> String {
    let path = data_dir.join("replica.id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        let plain = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
        if !id.is_empty() && id.len() <= 64 && id.bytes().all(plain) {
            return id.to_string();
        }
    }
    let id = format!("{:016x}", rand::random::<u64>());
    let stored = std::fs::create_dir_all(data_dir).map_err(|e| e.to_string()).and_then(|()| {
        edge_certs::store::write_atomic(&path, id.as_bytes(), edge_certs::store::Sensitivity::Public)
            .map_err(|e| e.to_string())
    });
    if let Err(e) = stored {
        tracing::warn!(path = %path.display(), error = %e, "could not store the replica id; using a random one");
    }
    id
}

/// Applies each config that arrives on `reloads` (already validated).
async fn apply_reloads(
    shared: Arc<AgentShared>,
    mut reloads: tokio::sync::mpsc::Receiver<AgentConfig>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            next = reloads.recv() => match next {
                Some(config) => shared.reload(&config),
                None => return,
            },
        }
    }
}

/// Runs the agent until `shutdown` is cancelled or a fatal error occurs.
/// Each config sent on `reloads` (validated; SIGHUP in the binary) replaces
/// the routes.
pub async fn run(
    config: AgentConfig,
    origin: &str,
    reloads: tokio::sync::mpsc::Receiver<AgentConfig>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let ticket = config.validate(origin).map_err(|e| AgentError::Config(e.to_string()))?;
    let trust = ServerTrust::from_config(config.server_ca_file.as_deref(), ticket.fingerprint)?;
    // A configured certificate is checked now, not at the first welcome: a
    // missing or unreadable file must stop the agent even while the server
    // is unreachable.
    if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
        edge_certs::pem::load_certified_key(cert, key)?;
    }
    // Dual-stack, so servers are reached over IPv4 and IPv6 alike (a join
    // string may name either, and a cluster may list both); IPv4 alone on
    // a host without IPv6.
    let dual: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, 0).into();
    let v4: SocketAddr = (std::net::Ipv4Addr::UNSPECIFIED, 0).into();
    let (socket, bind) = match edge_net::quic::udp_socket(dual, config.tunnel.udp_buffer_bytes) {
        Ok(socket) => (socket, dual),
        Err(e) => {
            tracing::info!(error = %e, "no IPv6 socket; servers are reached over IPv4 only");
            let socket = edge_net::quic::udp_socket(v4, config.tunnel.udp_buffer_bytes)
                .map_err(|source| AgentError::Bind { what: "QUIC socket", addr: v4, source })?;
            (socket, v4)
        }
    };
    let endpoint = edge_net::quic::endpoint(socket, None, &config.tunnel).map_err(|source| AgentError::Bind {
        what: "QUIC endpoint",
        addr: bind,
        source,
    })?;
    let replica = match &config.replica {
        Some(r) => r.clone(),
        None => replica_id(&config.data_dir),
    };
    let status_listener = bind_optional(config.status_listen, "status endpoint").await?;
    let resolver = NodeCertResolver::new();
    let routes_changed = Arc::new(tokio::sync::watch::Sender::new(0u64));
    let table = Arc::new(routes::RouteTable::build(&config, &resolver, &routes_changed));
    let direct_listener = bind_optional(config.direct_listen, "direct listener").await?;
    let shared = Arc::new(AgentShared {
        config,
        ticket,
        trust,
        metrics: AgentMetrics::default(),
        instance: format!("{:016x}", rand::random::<u64>()),
        replica,
        resolver: resolver.clone(),
        routes: std::sync::RwLock::new(table),
        routes_changed,
        health_checks: Mutex::new(CancellationToken::new()),
        node: Mutex::new(None),
        node_setup: tokio::sync::Mutex::new(()),
        welcomed: tokio::sync::watch::Sender::new(false),
        servers: tokio::sync::watch::Sender::new(Vec::new()),
        servers_revision: std::sync::atomic::AtomicU64::new(0),
        certificate: Mutex::new(None),
        acme_started: std::sync::atomic::AtomicBool::new(false),
        domains: tokio::sync::watch::Sender::new(Vec::new()),
        challenges: tls::ChallengeCerts::default(),
        csr_lock: tokio::sync::Mutex::new(()),
        shutdown: shutdown.clone(),
    });
    let config = shared.config.clone();
    shared.install_routes(&config);
    tracing::info!(node = shared.ticket.node(), server = %shared.ticket.server,
        upstream = shared.config.upstream.as_deref().unwrap_or("none"), routes = shared.config.routes.len(),
        mode = %shared.config.mode, "edge-agent starting");
    if shared.config.http3_has_nothing_to_serve() {
        tracing::warn!(
            "http3.enabled is set but every route passes TLS through: HTTP/3 clients get 421 and retry \
            over TCP; turn http3 off or terminate a route"
        );
    }
    tokio::spawn(apply_reloads(shared.clone(), reloads, shutdown.clone()));
    if let Some(listener) = status_listener {
        announce(&listener, &shared.config.data_dir.join("status.addr"), "status endpoint listening");
        tokio::spawn(status::serve(listener, shared.clone(), shutdown.clone()));
    }
    if let Some(listener) = direct_listener {
        announce(&listener, &shared.config.data_dir.join("direct.addr"), "direct listener accepting");
        if shared.config.http3.enabled {
            // HTTP/3 on the same address, over UDP.
            match listener.local_addr().and_then(std::net::UdpSocket::bind) {
                Ok(socket) => {
                    let (shared, shutdown) = (shared.clone(), shutdown.clone());
                    tokio::spawn(async move {
                        if let Err(e) = http3::serve_direct(socket, shared, shutdown).await {
                            tracing::error!(error = %e, "HTTP/3 on the direct listener could not start");
                        }
                    });
                }
                Err(e) => tracing::error!(error = %e, "could not bind UDP for HTTP/3 on the direct listener"),
            }
        }
        tokio::spawn(direct::serve(listener, shared.clone(), shutdown.clone()));
    }
    tokio::spawn(domain_certs::run(shared.clone(), shutdown.clone()));
    let heartbeats = tokio::spawn(signal::run(shared.clone(), shutdown.clone()));
    // Reconnecting sessions to every server of the cluster; a fatal error
    // in any of them (token refused, node removed) stops the agent.
    let result = cluster::run(endpoint.clone(), shared.clone(), shutdown.clone()).await;
    shutdown.cancel();
    let _ = heartbeats.await;
    endpoint.close(quinn::VarInt::from_u32(0), b"agent stopped");
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), endpoint.wait_idle()).await;
    result
}
