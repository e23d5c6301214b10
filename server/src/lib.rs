//! `edge-server`: accepts public TLS, reads only the SNI, and splices the raw
//! bytes over QUIC tunnels to the agent of the node that owns the name.
//!
//! Entry point: [`Server::bind`] then [`BoundServer::run`] with a
//! cancellation token; the binary in `main.rs` is a thin CLI around it.
//!
//! - [`config`]: TOML configuration and validation.
//! - [`store`]: persistent state (SQLite) behind one trait.
//! - [`registry`]: in-memory routes and live tunnels.
//! - [`ingress`]: the TLS listener and the splice to agents.
//! - [`sni`]: reading the ClientHello under a cap.
//! - [`tunnel`]: the QUIC listener and agent sessions.
//! - [`api`]: the signal API, health and metrics over HTTPS.
//! - [`scrape`]: `/metrics` rendered once per second, budgeted per source.
//! - [`metrics`]: counters and their Prometheus rendering.
//! - [`identity`]: the server certificate agents pin.
//! - [`dns`]: authoritative DNS for the zone (hickory-server).
//! - [`certificates`]: DNS-01 challenges and the CSR flow for nodes.
//! - [`modes`], [`detector`]: direct/proxy mode from verified probes;
//!   [`endpoints`]: which endpoints may be probed at all; [`self_loop`]:
//!   refusing our own connections that come back to us.
//! - [`http`]: plain HTTP on :80 (redirects, Host-routed proxying).
//! - [`limits`]: per-source rates, connection caps, refusal counting.
#![forbid(unsafe_code)]

pub mod api;
pub mod certificates;
pub mod config;
pub mod detector;
pub mod dns;
pub mod endpoints;
pub mod http;
pub mod identity;
pub mod ingress;
pub mod limits;
pub mod metrics;
pub mod modes;
pub mod registry;
pub mod scrape;
pub mod self_loop;
pub mod sni;
pub mod store;
pub mod tunnel;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::registry::{NodeHandle, Registry};
use crate::store::sqlite::SqliteStore;
use crate::store::{NodeStatus, Store, StoreError};

/// Errors that stop the server from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not be bound.
    #[error("cannot bind {what} listener on {addr}: {source}")]
    Bind {
        /// Which listener (`tls`, `quic`, `api`).
        what: &'static str,
        /// The address from the config.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A certificate or key could not be loaded or generated.
    #[error(transparent)]
    Cert(#[from] edge_certs::CertError),
    /// TLS configuration failed.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The DNS zone could not be built from the config.
    #[error("dns: {0}")]
    Dns(String),
    /// A file the server writes could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// SHA-256 of a bearer token, the only form in which tokens are stored.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// State shared by all tasks of one server.
#[derive(Debug)]
pub struct Shared {
    /// Validated configuration.
    pub config: ServerConfig,
    /// Persistent state.
    pub store: Arc<dyn Store>,
    /// Routes and tunnels.
    pub registry: Registry,
    /// Counters.
    pub metrics: Metrics,
    /// SHA-256 of the admin token.
    pub admin_token_hash: [u8; 32],
    /// The zone served by DNS, when `[dns]` is configured.
    pub zone: Option<Arc<dns::ZoneCell>>,
    /// ACME client for the CSR flow, when `[acme]` is configured.
    pub acme: Option<edge_certs::acme::AcmeClient>,
    /// One certificate order per node at a time.
    pub order_locks: certificates::OrderLocks,
    /// Reloads run one at a time, so an older snapshot never lands last.
    pub reload_lock: tokio::sync::Mutex<()>,
    /// Reload requests made and answered, for coalescing.
    pub reloads: ReloadCounts,
    /// Bound addresses of the TCP listeners (TLS, HTTP, API, metrics): an
    /// endpoint there would make the server probe or splice to itself.
    pub own_listeners: Vec<SocketAddr>,
    /// Admission checks of each listener.
    pub admission: Admissions,
    /// Failed-authentication budgets per source.
    pub auth_failures: limits::AuthFailures,
    /// Refusal counters and their throttled log.
    pub refusals: limits::Refusals,
    /// The cached `/metrics` body and its per-source budget.
    pub scrape: scrape::Scrape,
    /// Our own probes and fallback splices in flight, to refuse them if
    /// they come back to us.
    pub self_loops: Arc<self_loop::SelfLoops>,
    /// The last reading of [`Shared::own_addresses`].
    own_addresses: std::sync::Mutex<Option<(std::time::Instant, Arc<endpoints::OwnAddresses>)>>,
}

/// How long a reading of the host's own addresses is used.
pub const OWN_ADDRESSES_TTL: Duration = Duration::from_secs(5);

/// Reload requests counted for [`Shared::reload`]'s coalescing.
#[derive(Debug, Default)]
pub struct ReloadCounts {
    requested: std::sync::atomic::AtomicU64,
    completed: std::sync::atomic::AtomicU64,
}

/// The admission check of each listener; TLS and HTTP share one cap.
#[derive(Debug)]
pub struct Admissions {
    /// Public TLS.
    pub tls: limits::Admission,
    /// Plain HTTP.
    pub http: limits::Admission,
    /// Signal API.
    pub api: limits::Admission,
    /// QUIC handshakes of agents.
    pub quic: limits::Admission,
    /// DNS queries.
    pub dns: limits::Admission,
    /// The separate metrics listener.
    pub metrics: limits::Admission,
}

impl Admissions {
    fn new(l: &config::LimitsConfig) -> Self {
        use limits::{Admission, Listener, OpenPerSource, SourceRates};
        let slots = Some(Arc::new(tokio::sync::Semaphore::new(l.max_connections as usize)));
        let rates = || SourceRates::new(l.per_source_rate, l.per_source_burst, l.source_table_size);
        // :443 and :80 share the per-source cap as they share the global one.
        let clients = OpenPerSource::new(l.per_source_max_open);
        let unlimited = OpenPerSource::new(0);
        Self {
            tls: Admission::new(Listener::Tls, rates(), slots.clone(), clients.clone()),
            http: Admission::new(Listener::Http, rates(), slots, clients),
            api: Admission::new(Listener::Api, rates(), None, OpenPerSource::new(l.per_source_max_open)),
            metrics: Admission::new(Listener::Metrics, rates(), None, OpenPerSource::new(l.per_source_max_open)),
            // QUIC handshakes and DNS queries hold no connection slot.
            quic: Admission::new(Listener::Quic, rates(), None, unlimited.clone()),
            dns: Admission::new(
                Listener::Dns,
                SourceRates::new(l.dns_per_source_rate, l.dns_per_source_burst, l.source_table_size),
                None,
                unlimited,
            ),
        }
    }
}

impl std::fmt::Debug for dyn Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Shared {
    /// The node a bearer token belongs to, if the token is valid. Hashes are
    /// compared in constant time. The in-memory registry answers first; on a
    /// miss the store is asked for that one node (a node added or re-keyed by
    /// the CLI a moment ago), and a match reloads the registry. This runs per
    /// agent connection or heartbeat, never per client connection.
    pub async fn authenticate(&self, token: &str) -> Option<Arc<NodeHandle>> {
        let name = edge_proto::join::node_of_token(token)?;
        let hash = token_hash(token);
        if let Some(node) = self.registry.node(name).filter(|n| n.token_matches(&hash)) {
            return Some(node);
        }
        let store = self.store.clone();
        let owned = name.to_string();
        let record = match tokio::task::spawn_blocking(move || store.get_node(&owned)).await {
            Ok(Ok(record)) => record?,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "store lookup during authentication failed");
                return None;
            }
            Err(_) => return None,
        };
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&record.token_hash[..], &hash[..])) {
            return None;
        }
        if let Err(e) = self.reload().await {
            tracing::error!(error = %e, "reloading nodes from the store failed");
        }
        self.registry.node(name).filter(|n| n.token_matches(&hash))
    }

    /// Reloads the registry and the zone from the store. Calls that arrive
    /// while a reload runs are coalesced: each waits for one reload that
    /// began reading the store after the call was made (so it sees the
    /// caller's write), and a burst of changes costs two reloads, not one
    /// each.
    pub async fn reload(&self) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        let wanted = self.reloads.requested.fetch_add(1, SeqCst) + 1;
        let _one_at_a_time = self.reload_lock.lock().await;
        if self.reloads.completed.load(SeqCst) >= wanted {
            return Ok(());
        }
        // Every request counted so far is answered by this reload.
        let covers = self.reloads.requested.load(SeqCst);
        let store = self.store.clone();
        let (records, challenges, revision) = tokio::task::spawn_blocking(move || {
            Ok::<_, StoreError>((store.list_nodes()?, store.list_challenges()?, store.revision()?))
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))??;
        self.registry.reload(&records);
        if let Some(zone) = &self.zone {
            // Direct-mode nodes answer their own endpoint; the others the cluster.
            let names: Vec<(String, Option<std::net::IpAddr>)> =
                self.registry.nodes().iter().map(|n| (n.name.clone(), n.direct_address().map(|e| e.ip()))).collect();
            let mut values: std::collections::HashMap<String, Vec<String>> = std::collections::HashMap::new();
            for c in challenges {
                values.entry(c.node).or_default().push(c.value);
            }
            // The serial must move with every change; the revision does.
            zone.update(revision as u32, &names, values);
        }
        self.reloads.completed.fetch_max(covers, SeqCst);
        Ok(())
    }

    /// Writes a node's live status to the store (off the async threads).
    pub async fn persist_status(&self, node: &NodeHandle) {
        let view = self.node_view(node);
        let status = NodeStatus {
            connected: view.connected,
            last_heartbeat: view.last_heartbeat,
            open_connections: view.open_connections,
            agent_version: view.agent_version,
            remote_addr: view.remote_addr,
            cert_not_after: view.cert_not_after,
        };
        let store = self.store.clone();
        let name = node.name.clone();
        let result = tokio::task::spawn_blocking(move || store.record_status(&name, &status)).await;
        if let Ok(Err(e)) = result {
            tracing::warn!(node = %node.name, error = %e, "recording node status failed");
        }
    }

    /// What the server knows of its own addresses: its listeners, and the
    /// host's interface addresses, `dns.addresses` and the `public.*` hosts
    /// that are IP literals. Interfaces change, so the list is read again
    /// when it is older than [`OWN_ADDRESSES_TTL`]; in between it is shared
    /// (the fallback splice asks once per client connection).
    pub fn own_addresses(&self) -> Arc<endpoints::OwnAddresses> {
        let mut cache = self.own_addresses.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, own)) = cache.as_ref() {
            if at.elapsed() < OWN_ADDRESSES_TTL {
                return own.clone();
            }
        }
        let own = Arc::new(self.read_own_addresses());
        *cache = Some((std::time::Instant::now(), own.clone()));
        own
    }

    fn read_own_addresses(&self) -> endpoints::OwnAddresses {
        let mut host_ips: Vec<std::net::IpAddr> = match if_addrs::get_if_addrs() {
            Ok(interfaces) => interfaces.into_iter().map(|i| i.ip()).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list network interfaces");
                Vec::new()
            }
        };
        if let Some(dns) = &self.config.dns {
            host_ips.extend(dns.ingress_addresses(self.config.listen.tls));
        }
        for public in [&self.config.public.quic, &self.config.public.api].into_iter().flatten() {
            let host = public.rsplit_once(':').map_or(public.as_str(), |(h, _)| h).trim_matches(['[', ']']);
            if let Ok(ip) = host.parse() {
                host_ips.push(ip);
            }
        }
        endpoints::OwnAddresses { listeners: self.own_listeners.clone(), host_ips }
    }

    /// Whether `addr` reaches one of this server's own listeners.
    pub fn is_own_address(&self, addr: SocketAddr) -> bool {
        self.own_addresses().contains(addr)
    }

    /// The live view of a node, for the API and the store.
    pub fn node_view(&self, node: &NodeHandle) -> api::NodeView {
        use std::sync::atomic::Ordering::Relaxed;
        let status = node.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let tunnels = node.tunnel_count();
        api::NodeView {
            name: node.name.clone(),
            hostnames: node.hostnames.clone(),
            connected: tunnels > 0,
            tunnels,
            last_heartbeat: status.last_heartbeat,
            open_connections: node.metrics.active.load(Relaxed),
            total_connections: node.metrics.total.load(Relaxed),
            bytes_to_node: node.metrics.bytes.tcp_to_quic.load(Relaxed),
            bytes_from_node: node.metrics.bytes.quic_to_tcp.load(Relaxed),
            agent_version: status.agent_version,
            remote_addr: status.remote_addr,
            cert_not_after: status.cert_not_after,
            mode: node.current_mode().as_str(),
            endpoint: node.current_endpoint().map(|e| e.to_string()),
            http_mode: node.http_mode.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            samples: Vec::new(),
            last_transition: None,
        }
    }
}

/// Addresses the server actually bound (port 0 in the config picks one).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct BoundAddrs {
    /// Public TLS listener.
    pub tls: SocketAddr,
    /// QUIC listener for agents.
    pub quic: SocketAddr,
    /// Signal API.
    pub api: SocketAddr,
    /// DNS (UDP and TCP), when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<SocketAddr>,
    /// Plain HTTP, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<SocketAddr>,
    /// The metrics listener, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
}

/// File in the data directory where a running server records its bound
/// addresses, so `node add` can print a join string for them.
pub fn listening_file(data_dir: &Path) -> PathBuf {
    data_dir.join("listening.json")
}

/// A server whose listeners are bound, ready to run.
pub struct BoundServer {
    shared: Arc<Shared>,
    tls: TcpListener,
    api: TcpListener,
    endpoint: quinn::Endpoint,
    api_tls: tokio_rustls::TlsAcceptor,
    dns: Option<dns::DnsSockets>,
    http: Option<TcpListener>,
    metrics: Option<TcpListener>,
    /// The bound addresses.
    pub addrs: BoundAddrs,
}

/// Builder entry point.
#[derive(Debug)]
pub struct Server;

impl Server {
    /// Opens the store, loads or creates the identity, binds all listeners.
    pub async fn bind(config: ServerConfig) -> Result<BoundServer, ServerError> {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&config.database_path())?);
        store.reset_status()?;
        let identity = identity::load_or_create(&config)?;
        let admin_token_hash = token_hash(&identity::admin_token(&config)?);

        let tls = bind_tcp("tls", config.listen.tls).await?;
        let api = bind_tcp("api", config.listen.api).await?;
        let socket = edge_net::quic::udp_socket(config.listen.quic, config.tunnel.udp_buffer_bytes)
            .map_err(|source| ServerError::Bind { what: "quic", addr: config.listen.quic, source })?;
        let server_config = identity::quic_server_config(&identity, &config.tunnel)?;
        let endpoint = edge_net::quic::endpoint(socket, Some(server_config), &config.tunnel)
            .map_err(|source| ServerError::Bind { what: "quic", addr: config.listen.quic, source })?;
        let api_tls = identity::api_acceptor(&identity)?;
        let local = |l: &TcpListener, a| l.local_addr().unwrap_or(a);
        let tls_addr = local(&tls, config.listen.tls);
        let (dns_sockets, zone) = match &config.dns {
            Some(d) => {
                let sockets = dns::DnsSockets::bind(d.listen).await.map_err(|source| ServerError::Bind {
                    what: "dns",
                    addr: d.listen,
                    source,
                })?;
                let caa = match &config.acme {
                    Some(acme) => acme.caa_issuers().map_err(ServerError::Dns)?,
                    None => Vec::new(),
                };
                let zone = dns::ZoneCell::from_config(d, config.zone(), tls_addr, &caa).map_err(ServerError::Dns)?;
                (Some(sockets), Some(Arc::new(zone)))
            }
            None => (None, None),
        };
        let http = match config.listen.http {
            Some(addr) => Some(bind_tcp("http", addr).await?),
            None => None,
        };
        let metrics = match config.listen.metrics {
            Some(addr) => Some(bind_tcp("metrics", addr).await?),
            None => None,
        };
        let addrs = BoundAddrs {
            http: http.as_ref().and_then(|l| l.local_addr().ok()),
            tls: tls_addr,
            quic: endpoint.local_addr().unwrap_or(config.listen.quic),
            api: local(&api, config.listen.api),
            dns: dns_sockets.as_ref().and_then(|s| s.local_addr().ok()),
            metrics: metrics.as_ref().and_then(|l| l.local_addr().ok()),
        };
        let acme = config.acme.as_ref().map(|a| {
            let mut client = edge_certs::acme::AcmeClient::new(a.settings.clone(), &config.data_dir.join("acme"));
            client.order_timeout = Duration::from_secs(a.order_timeout_secs);
            client
        });
        let admission = Admissions::new(&config.limits);
        let auth_failures =
            limits::AuthFailures::new(config.limits.auth_failures_per_minute, config.limits.source_table_size);
        let scrape = scrape::Scrape::new(&config.limits);
        let shared = Arc::new(Shared {
            scrape,
            self_loops: Arc::default(),
            own_addresses: std::sync::Mutex::new(None),
            admission,
            auth_failures,
            refusals: limits::Refusals::default(),
            config,
            store,
            registry: Registry::default(),
            metrics: Metrics::default(),
            admin_token_hash,
            zone,
            acme,
            order_locks: Default::default(),
            reload_lock: tokio::sync::Mutex::new(()),
            reloads: ReloadCounts::default(),
            own_listeners: [Some(addrs.tls), addrs.http, Some(addrs.api), addrs.metrics]
                .into_iter()
                .flatten()
                .collect(),
        });
        shared.reload().await?;
        Ok(BoundServer { shared, tls, api, endpoint, api_tls, dns: dns_sockets, http, metrics, addrs })
    }
}

async fn bind_tcp(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr).await.map_err(|source| ServerError::Bind { what, addr, source })
}

impl std::fmt::Debug for BoundServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundServer").field("addrs", &self.addrs).finish_non_exhaustive()
    }
}

impl BoundServer {
    /// Shared state (for tests and embedding).
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Runs until `shutdown` is cancelled, then drains: stops accepting,
    /// lets client connections finish up to the drain timeout, then closes
    /// the tunnels.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ServerError> {
        let BoundServer { shared, tls, api, endpoint, api_tls, dns, http, metrics, addrs } = self;
        let path = listening_file(&shared.config.data_dir);
        let json = serde_json::to_vec_pretty(&addrs).unwrap_or_default();
        edge_certs::store::write_atomic(&path, &json, edge_certs::store::Sensitivity::Public)
            .map_err(|e| ServerError::Io { path: path.clone(), source: std::io::Error::other(e.to_string()) })?;
        tracing::info!(tls = %addrs.tls, quic = %addrs.quic, api = %addrs.api, dns = ?addrs.dns,
            zone = shared.config.zone(), "edge-server listening");

        let clients = TaskTracker::new();
        let agents = TaskTracker::new();
        let background = TaskTracker::new();
        let close_tunnels = CancellationToken::new();

        background.spawn(ingress::serve(tls, shared.clone(), shutdown.clone(), clients.clone()));
        background.spawn(api::serve(
            api,
            Some(api_tls),
            api::router(shared.clone()),
            shared.clone(),
            |s| &s.admission.api,
            shutdown.clone(),
            clients.clone(),
        ));
        if let Some(listener) = metrics {
            background.spawn(api::serve(
                listener,
                None,
                scrape::router(shared.clone()),
                shared.clone(),
                |s| &s.admission.metrics,
                shutdown.clone(),
                clients.clone(),
            ));
        }
        background.spawn(tunnel::serve(
            endpoint.clone(),
            shared.clone(),
            shutdown.clone(),
            close_tunnels.clone(),
            agents.clone(),
        ));
        background.spawn(watch_store(shared.clone(), shutdown.clone()));
        background.spawn(detector::run(shared.clone(), shutdown.clone()));
        if let Some(listener) = http {
            background.spawn(http::serve(listener, shared.clone(), shutdown.clone(), clients.clone()));
        }
        if let (Some(sockets), Some(zone)) = (dns, shared.zone.clone()) {
            background.spawn(dns::serve(sockets, zone, shared.clone(), shutdown.clone()));
        }
        background.close();

        shutdown.cancelled().await;
        let drain = Duration::from_secs(shared.config.limits.drain_timeout_secs);
        let open = clients.len();
        tracing::info!(open_connections = open, drain_secs = drain.as_secs(), "shutting down: draining connections");
        clients.close();
        if tokio::time::timeout(drain, clients.wait()).await.is_err() {
            tracing::warn!(remaining = clients.len(), "drain timeout passed; closing remaining connections");
        }
        close_tunnels.cancel();
        agents.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), agents.wait()).await;
        endpoint.close(quinn::VarInt::from_u32(edge_proto::tunnel::codes::CLOSE_SHUTDOWN), b"server shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), background.wait()).await;
        let _ = std::fs::remove_file(&path);
        tracing::info!("edge-server stopped");
        Ok(())
    }
}

/// Reloads the registry when the store's revision changes (nodes added or
/// removed by the CLI), and persists live node status every few seconds.
async fn watch_store(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut seen: Option<i64> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        ticks += 1;
        let store = shared.store.clone();
        match tokio::task::spawn_blocking(move || store.revision()).await {
            Ok(Ok(revision)) if seen != Some(revision) => {
                if let Err(e) = shared.reload().await {
                    tracing::error!(error = %e, "reloading nodes failed");
                } else {
                    seen = Some(revision);
                }
            }
            Ok(Err(e)) => tracing::error!(error = %e, "reading store revision failed"),
            _ => {}
        }
        if ticks.is_multiple_of(5) {
            for node in shared.registry.nodes() {
                shared.persist_status(&node).await;
            }
        }
        if ticks.is_multiple_of(60) {
            // Values an agent published and never removed (it crashed).
            let store = shared.store.clone();
            let before = unix_now() - certificates::CHALLENGE_LIFETIME_SECS;
            match tokio::task::spawn_blocking(move || store.expire_challenges(before)).await {
                Ok(Ok(n)) if n > 0 => tracing::info!(expired = n, "removed stale DNS-01 TXT values"),
                Ok(Err(e)) => tracing::warn!(error = %e, "expiring DNS-01 TXT values failed"),
                _ => {}
            }
        }
    }
}
