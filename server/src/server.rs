//! Starting and running the server: [`Server::bind`] opens the store,
//! loads the routing state and binds every listener; [`BoundServer::run`]
//! runs the listeners and background jobs in one `JoinSet` until shutdown,
//! noticing any task that stops early, then drains.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::state::{Admissions, Shared};
use crate::store::StoreError;
use crate::sync::RoutingSync;
use crate::upgrade::{HandoverSockets, Successor, Takeover, Upgrader};
use crate::{
    api, certificates, detector, dns, http, identity, ingress, jobs, limits, quic_clients, scrape, token_hash, tunnel,
};
use edge_net::shared_quic::SharedQuicSocket;
use edge_proto::handover::SocketRole;

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
    /// A task the server cannot run without stopped.
    #[error("server task {0:?} stopped unexpectedly")]
    TaskFailed(&'static str),
    /// A file the server writes could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
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
    /// The admin dashboard and API, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
    /// The UDP listener for QUIC clients, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quic_clients: Option<SocketAddr>,
}

/// File in the data directory where a running server records its bound
/// addresses, so `node add` can print a join string for them.
pub fn listening_file(data_dir: &Path) -> PathBuf {
    data_dir.join("listening.json")
}

/// A server whose listeners are bound, ready to run.
pub struct BoundServer {
    shared: Arc<Shared>,
    record: crate::store::ServerRecord,
    api_state: Arc<api::ApiState>,
    sync: Arc<RoutingSync>,
    nudges: tokio::sync::mpsc::UnboundedReceiver<crate::store::Change>,
    feed: tokio::sync::broadcast::Receiver<crate::store::FeedEvent>,
    revision: i64,
    tls: TcpListener,
    api: TcpListener,
    endpoint: quinn::Endpoint,
    api_tls: tokio_rustls::TlsAcceptor,
    dns: Option<(dns::DnsSockets, Arc<dns::ZoneCell>)>,
    http: Option<TcpListener>,
    metrics: Option<TcpListener>,
    admin: Option<(TcpListener, tokio_rustls::TlsAcceptor)>,
    admin_state: Arc<crate::admin::AdminState>,
    /// The bound addresses.
    pub addrs: BoundAddrs,
    quic_socket: Arc<SharedQuicSocket>,
    server_config: quinn::ServerConfig,
    handover_sockets: HandoverSockets,
    takeover: Option<Takeover>,
    control: Option<std::os::unix::net::UnixListener>,
    successor: Option<Successor>,
}

/// Builder entry point.
#[derive(Debug)]
pub struct Server;

impl Server {
    /// Opens the store, loads or creates the identity, binds all listeners,
    /// and loads the routing state.
    pub async fn bind(config: ServerConfig) -> Result<BoundServer, ServerError> {
        Self::bind_with(config, None).await
    }

    /// Like [`Server::bind`], taking over the listening sockets of a
    /// predecessor process when `takeover` is given (an upgrade): sockets
    /// it offers for this config's addresses are used instead of bound.
    pub async fn bind_with(config: ServerConfig, mut takeover: Option<Takeover>) -> Result<BoundServer, ServerError> {
        let store = crate::store::open(&config.store, &config.data_dir).await?;
        let identity = identity::load_or_create(&config)?;
        let server_id = crate::cluster::server_id(&config.data_dir)
            .map_err(|source| ServerError::Io { path: config.data_dir.join("server.id"), source })?;
        let admin_token_hash = token_hash(&identity::admin_token(&config)?);

        let mut keep = HandoverSockets::default();
        let tls = listen_tcp("tls", SocketRole::Tls, config.listen.tls, &mut takeover, &mut keep).await?;
        let api = listen_tcp("api", SocketRole::Api, config.listen.api, &mut takeover, &mut keep).await?;
        let quic_err = |source| ServerError::Bind { what: "quic", addr: config.listen.quic, source };
        let udp = match takeover.as_mut().map(|t| t.take_udp(SocketRole::Quic, config.listen.quic)) {
            Some(Some(udp)) => udp,
            // The old process's QUIC connections cannot follow a new socket.
            Some(None) => {
                let error = "listen.quic differs from the running server's: its agents' connections cannot move \
                    to another socket; restart instead of upgrading";
                if let Some(t) = &takeover {
                    t.fail(error).await;
                }
                return Err(quic_err(std::io::Error::other(error)));
            }
            None => edge_net::quic::udp_socket(config.listen.quic, config.tunnel.udp_buffer_bytes).map_err(quic_err)?,
        };
        keep.keep(SocketRole::Quic, udp.local_addr().ok(), &udp);
        let quic_socket = SharedQuicSocket::new(udp, takeover.as_ref().map_or(0, Takeover::epoch)).map_err(quic_err)?;
        if let Some(forward) = takeover.as_mut().and_then(Takeover::take_forward) {
            // Until the predecessor moves its agents, it accepts them.
            forward.set_nonblocking(true).map_err(quic_err)?;
            quic_socket.set_peer(Some(tokio::net::UnixDatagram::from_std(forward).map_err(quic_err)?));
            quic_socket.set_accepting(false);
        }
        let server_config = identity::quic_server_config(&identity, &config.tunnel)?;
        let endpoint =
            edge_net::quic::shared_endpoint(quic_socket.clone(), Some(server_config.clone()), &config.tunnel)
                .map_err(quic_err)?;
        let api_tls = identity::api_acceptor(&identity)?;
        let local = |l: &TcpListener, a| l.local_addr().unwrap_or(a);
        let tls_addr = local(&tls, config.listen.tls);
        let (dns_sockets, zone) = match &config.dns {
            Some(d) => {
                let dns_err = |source| ServerError::Bind { what: "dns", addr: d.listen, source };
                let inherited = takeover.as_mut().and_then(|t| {
                    let udp = t.take_udp(SocketRole::DnsUdp, d.listen)?;
                    let tcp = udp.local_addr().ok().and_then(|a| t.take_tcp(SocketRole::DnsTcp, a));
                    Some((udp, tcp))
                });
                let sockets = match inherited {
                    Some((udp, Some(tcp))) => dns::DnsSockets::from_std(udp, tcp).map_err(dns_err)?,
                    _ => dns::DnsSockets::bind(d.listen).await.map_err(dns_err)?,
                };
                sockets.keep(&mut keep);
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
            Some(addr) => Some(listen_tcp("http", SocketRole::Http, addr, &mut takeover, &mut keep).await?),
            None => None,
        };
        let metrics = match config.listen.metrics {
            Some(addr) => Some(listen_tcp("metrics", SocketRole::Metrics, addr, &mut takeover, &mut keep).await?),
            None => None,
        };
        let admin = match config.listen.admin {
            Some(addr) => Some((
                listen_tcp("admin", SocketRole::Admin, addr, &mut takeover, &mut keep).await?,
                identity::admin_acceptor(&identity, &config.admin)?,
            )),
            None => None,
        };
        let quic_clients = match config.listen.quic_clients {
            Some(addr) => {
                let err = |source| ServerError::Bind { what: "quic_clients", addr, source };
                let socket = match takeover.as_mut().and_then(|t| t.take_udp(SocketRole::QuicClients, addr)) {
                    Some(socket) => socket,
                    None => edge_net::quic::udp_socket(addr, config.tunnel.udp_buffer_bytes).map_err(err)?,
                };
                keep.keep(SocketRole::QuicClients, socket.local_addr().ok(), &socket);
                Some(crate::quic_clients::QuicClients::new(socket).map_err(err)?)
            }
            None => None,
        };
        let control = control_listener(&config, &mut takeover);
        if let Some(listener) = &control {
            keep.keep(SocketRole::Control, None, listener);
        }
        if let Some(t) = &takeover {
            for unused in t.unused() {
                tracing::info!(role = ?unused.role, addr = ?unused.addr,
                    "the predecessor's socket is not for this config (an address changed); it closes when the \
                    predecessor exits");
            }
        }
        let addrs = BoundAddrs {
            admin: admin.as_ref().and_then(|(l, _)| l.local_addr().ok()),
            http: http.as_ref().and_then(|l| l.local_addr().ok()),
            tls: tls_addr,
            quic: endpoint.local_addr().unwrap_or(config.listen.quic),
            api: local(&api, config.listen.api),
            dns: dns_sockets.as_ref().and_then(|s| s.local_addr().ok()),
            metrics: metrics.as_ref().and_then(|l| l.local_addr().ok()),
            quic_clients: quic_clients.as_ref().and_then(|q| q.local_addr().ok()),
        };
        let acme = certificates::acme_client(&config, store.clone());
        let admission = Admissions::new(&config.limits);
        let auth_failures =
            limits::AuthFailures::new(config.limits.auth_failures_per_minute, config.limits.source_table_size);
        let scrape = Arc::new(scrape::Scrape::new(&config.limits));
        let (nudge_tx, nudges) = tokio::sync::mpsc::unbounded_channel();
        // Subscribed before the load: nothing written after it is missed.
        let feed = store.subscribe();
        let fingerprint = edge_proto::join::hex(&identity.fingerprint);
        let record = crate::cluster::own_record(&config, &server_id, &fingerprint, &addrs);
        for (field, addr) in
            [("public.quic", &record.quic), ("public.api", &record.api), ("cluster.peer", &record.peer)]
        {
            if !crate::cluster::dialable(addr) {
                tracing::warn!(field, %addr, "this server binds a wildcard and no address for others is set; \
                    set it for agents and other servers of a cluster to reach this one");
            }
        }
        if config.dns.is_some() && record.dns.is_none() {
            tracing::warn!(
                "the DNS listener binds a wildcard: set cluster.dns so that other servers can check \
                DNS-01 values here (until then this server is left out of that check)"
            );
        }
        // A successor shares its predecessor's row and status, which stay
        // the predecessor's until it retires.
        if takeover.is_none() {
            store.register_server(&record, config.cluster.lease_ms as i64).await?;
        }
        crate::admin::ops::register_admin_token(store.as_ref(), &server_id, admin_token_hash).await?;
        let servers = store.list_servers().await?;
        // Connected flags are one per node: only a server alone may clear
        // those a previous run left.
        if takeover.is_none() && !servers.servers.iter().any(|s| s.alive && s.record.id != server_id) {
            store.reset_status().await?;
        }
        let cluster = crate::cluster::ClusterView::new(server_id);
        cluster.set_members(servers);
        let peers = crate::cluster::peers::PeerLinks::new(endpoint.clone(), identity.key.clone(), &config.tunnel);
        let shared = Arc::new(Shared {
            cluster,
            peers,
            self_loops: Arc::default(),
            own_addresses: std::sync::Mutex::new(None),
            live: crate::state::LiveSettings::new(&config),
            admission,
            auth_failures,
            refusals: limits::Refusals::default(),
            config,
            store,
            registry: Registry::default(),
            metrics: Metrics::default(),
            admin_token_hash,
            nudges: nudge_tx,
            status_changed: tokio::sync::Notify::new(),
            own_listeners: [Some(addrs.tls), addrs.http, Some(addrs.api), addrs.metrics, addrs.admin]
                .into_iter()
                .flatten()
                .collect(),
            retiring: std::sync::atomic::AtomicBool::new(false),
            agent_handover: tokio::sync::watch::Sender::new(0),
            handing_over: std::sync::atomic::AtomicBool::new(false),
            services: tokio::sync::watch::Sender::new(Arc::new(Vec::new())),
            domains: tokio::sync::watch::Sender::new(Arc::new(Vec::new())),
            access: crate::access::AccessTable::new(),
            quic_clients,
        });
        let sync = Arc::new(RoutingSync::new(shared.clone(), zone.clone()));
        let started = std::time::Instant::now();
        let revision = sync.full_reload().await?;
        tracing::info!(
            store = shared.store.describe(),
            nodes = shared.registry.len(),
            revision,
            ms = started.elapsed().as_millis() as u64,
            "loaded routing state"
        );
        let certs = certificates::CertService::new(zone.clone(), acme);
        let api_state = Arc::new(api::ApiState { shared: shared.clone(), certs, scrape });
        let join = crate::admin::ops::JoinInfo::new(&shared.config, Some(addrs), identity.fingerprint)
            .map_err(|e| e.to_string());
        let admin_state = Arc::new(crate::admin::AdminState::new(shared.clone(), join));
        Ok(BoundServer {
            shared,
            record,
            api_state,
            sync,
            nudges,
            feed,
            revision,
            tls,
            api,
            endpoint,
            api_tls,
            dns: dns_sockets.zip(zone),
            http,
            metrics,
            admin,
            admin_state,
            addrs,
            quic_socket,
            server_config,
            handover_sockets: keep,
            takeover,
            control,
            successor: None,
        })
    }
}

async fn bind_tcp(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr).await.map_err(|source| ServerError::Bind { what, addr, source })
}

/// The predecessor's listener for `role` when it serves `addr`, else a new
/// one; a duplicate is kept to hand over later.
async fn listen_tcp(
    what: &'static str,
    role: SocketRole,
    addr: SocketAddr,
    takeover: &mut Option<Takeover>,
    keep: &mut HandoverSockets,
) -> Result<TcpListener, ServerError> {
    let listener = match takeover.as_mut().and_then(|t| t.take_tcp(role, addr)) {
        Some(inherited) => inherited
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(inherited))
            .map_err(|source| ServerError::Bind { what, addr, source })?,
        None => bind_tcp(what, addr).await?,
    };
    keep.keep(role, listener.local_addr().ok(), &listener);
    Ok(listener)
}

/// The control socket for `edge-server upgrade`: the predecessor's, or a
/// new one. Without it the server runs, but cannot be upgraded in place.
fn control_listener(
    config: &ServerConfig,
    takeover: &mut Option<Takeover>,
) -> Option<std::os::unix::net::UnixListener> {
    if let Some(inherited) = takeover.as_mut().and_then(Takeover::take_control) {
        return Some(inherited);
    }
    let path = crate::upgrade::control_socket(&config.data_dir);
    match crate::upgrade::control::bind(&path) {
        Ok(Some(listener)) => Some(listener),
        Ok(None) => {
            tracing::warn!(path = %path.display(), "another server answers on this data directory's control \
                socket; `edge-server upgrade` will reach that one, not this one");
            None
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot bind the control socket; \
                `edge-server upgrade` is unavailable for this server");
            None
        }
    }
}

impl std::fmt::Debug for BoundServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundServer").field("addrs", &self.addrs).finish_non_exhaustive()
    }
}

/// Named tasks: a task that ends before shutdown is a failure.
struct Tasks {
    set: JoinSet<()>,
    names: HashMap<tokio::task::Id, &'static str>,
}

impl Tasks {
    fn spawn(&mut self, name: &'static str, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// The next task to end, by name, with how it ended.
    async fn next(&mut self) -> Option<(&'static str, Result<(), tokio::task::JoinError>)> {
        let (id, result) = match self.set.join_next_with_id().await? {
            Ok((id, ())) => (id, Ok(())),
            Err(e) => (e.id(), Err(e)),
        };
        Some((self.names.remove(&id).unwrap_or("unknown"), result))
    }
}

impl BoundServer {
    /// Shared state (for tests and embedding).
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// What applies a reloaded config to this server while it runs.
    pub fn reloader(&self) -> crate::reload::Reloader {
        crate::reload::Reloader::new(self.shared.clone(), self.api_state.clone(), self.admin_state.ops.reserved.clone())
    }

    /// Lets `edge-server upgrade` start `successor` to take this server's
    /// place (the binary sets this; an embedded server cannot upgrade).
    pub fn with_successor(mut self, successor: Successor) -> Self {
        self.successor = Some(successor);
        self
    }

    /// Runs until `shutdown` is cancelled, then drains: stops accepting,
    /// lets client connections finish up to the drain timeout, then closes
    /// the tunnels. A task that stops on its own (a listener failing, a
    /// panic) is logged and stops the server with [`ServerError::TaskFailed`].
    /// A successor (bound with a takeover) first takes its predecessor's
    /// agents, then its clients; an upgrade retires this process the same
    /// way a shutdown does, minus leaving the cluster.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ServerError> {
        let BoundServer {
            shared,
            record,
            api_state,
            sync,
            nudges,
            feed,
            revision,
            tls,
            api,
            endpoint,
            api_tls,
            dns,
            http,
            metrics,
            admin,
            admin_state,
            addrs,
            quic_socket,
            server_config,
            handover_sockets,
            takeover,
            control,
            successor,
        } = self;
        let path = listening_file(&shared.config.data_dir);
        let json = serde_json::to_vec_pretty(&addrs).unwrap_or_default();
        edge_certs::store::write_atomic(&path, &json, edge_certs::store::Sensitivity::Public)
            .map_err(|e| ServerError::Io { path: path.clone(), source: std::io::Error::other(e.to_string()) })?;
        tracing::info!(tls = %addrs.tls, quic = %addrs.quic, api = %addrs.api, dns = ?addrs.dns, admin = ?addrs.admin,
            zone = shared.config.zone(), store = shared.store.describe(), "edge-server listening");

        let clients = TaskTracker::new();
        let agents = TaskTracker::new();
        let close_tunnels = CancellationToken::new();
        let mut tasks = Tasks { set: JoinSet::new(), names: HashMap::new() };

        // What serves from the start, a successor's too: agents, the API,
        // DNS, and following the store.
        tasks.spawn(
            "api listener",
            api::serve(
                api,
                Some(api_tls),
                api::router(api_state.clone()).merge(crate::admin::api_router(admin_state.clone())),
                shared.clone(),
                |s| &s.admission.api,
                shutdown.clone(),
                clients.clone(),
            ),
        );
        if let Some((listener, tls)) = admin {
            tasks.spawn(
                "admin listener",
                api::serve(
                    listener,
                    Some(tls),
                    crate::admin::router(admin_state.clone()),
                    shared.clone(),
                    |s| &s.admission.api,
                    shutdown.clone(),
                    clients.clone(),
                ),
            );
        }
        if let Some(listener) = metrics {
            tasks.spawn(
                "metrics listener",
                api::serve(
                    listener,
                    None,
                    api::metrics_router(api_state.clone()),
                    shared.clone(),
                    |s| &s.admission.metrics,
                    shutdown.clone(),
                    clients.clone(),
                ),
            );
        }
        tasks.spawn(
            "quic listener",
            tunnel::serve(endpoint.clone(), shared.clone(), shutdown.clone(), close_tunnels.clone(), agents.clone()),
        );
        tasks.spawn("store watch", shared.store.watch(revision, shutdown.clone()));
        tasks.spawn("change feed", jobs::change_feed::run(shared.clone(), sync, feed, nudges, shutdown.clone()));
        if let Some((sockets, zone)) = dns {
            if let Some(clients) = shared.quic_clients.clone() {
                // Clients of the zone's names find HTTP/3 in HTTPS records.
                let port = addrs.quic_clients.map(|a| a.port()).filter(|p| *p != addrs.tls.port());
                let job = jobs::http3_records::run(clients, zone.clone(), port, shutdown.clone());
                tasks.spawn("https records", job);
            }
            tasks.spawn("dns listener", dns::serve(sockets, zone, shared.clone(), shutdown.clone()));
        }

        let taking_over = takeover.is_some();
        let took_over = match takeover {
            None => None,
            Some(takeover) => tokio::select! {
                _ = shutdown.cancelled() => {
                    // Stopped before it took over: what this server owns
                    // stays the predecessor's.
                    shared.retiring.store(true, std::sync::atomic::Ordering::Release);
                    None
                }
                taken = take_over(&shared, &quic_socket, takeover) => taken,
            },
        };
        if taking_over && !shutdown.is_cancelled() {
            // The row now names this binary's version and addresses.
            if let Err(e) = shared.store.register_server(&record, shared.config.cluster.lease_ms as i64).await {
                tracing::warn!(error = %e, "could not update this server's row; the lease renewal retries");
            }
        }

        // Clients, and the jobs that write what one process of this server
        // owns: a successor starts them once its predecessor retired.
        tasks.spawn("tls listener", ingress::serve(tls, shared.clone(), shutdown.clone(), clients.clone()));
        if let Some(quic_clients) = shared.quic_clients.clone() {
            tasks.spawn("quic client listener", quic_clients::serve(quic_clients, shared.clone(), shutdown.clone()));
        }
        if let Some(listener) = http {
            tasks.spawn("http listener", http::serve(listener, shared.clone(), shutdown.clone(), clients.clone()));
        }
        tasks.spawn("tcp service listeners", crate::services::run(shared.clone(), shutdown.clone(), clients.clone()));
        let owner_jobs = TaskTracker::new();
        let owned = &owner_jobs;
        tasks.spawn("status flush", owned.track_future(jobs::status_flush::run(shared.clone(), shutdown.clone())));
        tasks.spawn(
            "challenge expiry",
            owned.track_future(jobs::challenge_expiry::run(shared.clone(), shutdown.clone())),
        );
        tasks.spawn("domain checks", owned.track_future(jobs::domain_check::run(shared.clone(), shutdown.clone())));
        tasks.spawn("mode detector", owned.track_future(detector::run(shared.clone(), shutdown.clone())));
        tasks.spawn(
            "cluster membership",
            owned.track_future(crate::cluster::membership::run(shared.clone(), record, shutdown.clone())),
        );
        tasks.spawn(
            "mode decider lease",
            owned.track_future(crate::cluster::decider::run(shared.clone(), shutdown.clone())),
        );
        let upgrader = Arc::new(Upgrader {
            shared: shared.clone(),
            sockets: std::sync::Mutex::new(handover_sockets),
            quic: quic_socket.clone(),
            endpoint: endpoint.clone(),
            server_config,
            successor,
            shutdown: shutdown.clone(),
            clients: clients.clone(),
            owner_jobs: owner_jobs.clone(),
            busy: std::sync::atomic::AtomicBool::new(false),
            successor_link: std::sync::Mutex::new(None),
        });
        let owns_control = control.is_some();
        if let Some(listener) = control {
            match listener.set_nonblocking(true).and_then(|()| tokio::net::UnixListener::from_std(listener)) {
                Ok(listener) => tasks.spawn(
                    "control socket",
                    crate::upgrade::control::serve(listener, upgrader.clone(), shutdown.clone()),
                ),
                Err(e) => tracing::warn!(error = %e, "control socket unusable; upgrades unavailable"),
            }
        }
        match took_over {
            Some(takeover) => {
                let (quic, stop) = (quic_socket.clone(), shutdown.clone());
                tasks.spawn("predecessor watch", async move {
                    takeover.predecessor_gone().await;
                    quic.set_peer(None);
                    let stats = quic.stats();
                    tracing::info!(
                        passed = stats.passed.load(std::sync::atomic::Ordering::Relaxed),
                        received = stats.received.load(std::sync::atomic::Ordering::Relaxed),
                        dropped = stats.dropped.load(std::sync::atomic::Ordering::Relaxed),
                        "the predecessor exited: the upgrade is complete"
                    );
                    stop.cancelled().await;
                });
            }
            None => crate::upgrade::systemd::ready(),
        }

        let failed = tokio::select! {
            // Shutdown first: tasks end because of it, which is no failure.
            biased;
            _ = shutdown.cancelled() => None,
            Some((name, result)) = tasks.next() => {
                match result {
                    Err(e) if e.is_panic() => tracing::error!(task = name, "server task panicked; shutting down"),
                    _ => tracing::error!(task = name, "server task stopped unexpectedly; shutting down"),
                }
                shutdown.cancel();
                Some(name)
            }
        };
        let drain = Duration::from_secs(shared.limits().drain_timeout_secs);
        let open = clients.len();
        let retiring = shared.retiring.load(std::sync::atomic::Ordering::Acquire);
        upgrader.release_sockets();
        if owns_control && !retiring {
            // A successor keeps using the control socket's path.
            let _ = std::fs::remove_file(crate::upgrade::control_socket(&shared.config.data_dir));
        }
        if retiring {
            tracing::info!(
                open_connections = open,
                drain_secs = drain.as_secs(),
                "handed over to the successor: draining connections, then exiting"
            );
        } else {
            tracing::info!(
                open_connections = open,
                drain_secs = drain.as_secs(),
                "shutting down: draining connections"
            );
        }
        clients.close();
        if tokio::time::timeout(drain, clients.wait()).await.is_err() {
            tracing::warn!(remaining = clients.len(), "drain timeout passed; closing remaining connections");
        }
        close_tunnels.cancel();
        shared.peers.close_all();
        agents.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), agents.wait()).await;
        endpoint.close(quinn::VarInt::from_u32(edge_proto::tunnel::codes::CLOSE_SHUTDOWN), b"server shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        let finish = async {
            while let Some((name, result)) = tasks.next().await {
                if let Err(e) = result {
                    if e.is_panic() {
                        tracing::error!(task = name, "server task panicked while stopping");
                    }
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(2), finish).await.is_err() {
            tracing::warn!("background tasks did not stop in time; aborting them");
            tasks.set.abort_all();
        }
        // The successor wrote the file for itself.
        if !retiring {
            let _ = std::fs::remove_file(&path);
        }
        tracing::info!("edge-server stopped");
        match failed {
            Some(name) => Err(ServerError::TaskFailed(name)),
            None => Ok(()),
        }
    }
}

/// How long a successor waits for the moved agents' tunnels before it
/// takes clients anyway.
const TUNNEL_WAIT: Duration = Duration::from_secs(10);

/// A successor's handover: say ready, take the predecessor's agents, then
/// its clients. `None` when it did not complete: this process then serves
/// alone (a predecessor that gave up stops it).
async fn take_over(shared: &Shared, quic: &SharedQuicSocket, mut takeover: Takeover) -> Option<Takeover> {
    let predecessor = takeover.predecessor_pid();
    let result = async {
        // From now on both processes accept agents, until the predecessor
        // stops on `ready`: no Initial lands where nobody takes it.
        quic.set_accepting(true);
        let nodes = takeover.ready().await?;
        tracing::info!(predecessor, nodes = nodes.len(), "the predecessor moves its agents here");
        let waiting = tokio::time::Instant::now();
        let missing = loop {
            let missing: Vec<String> = nodes
                .iter()
                .filter(|name| shared.registry.node(name).is_none_or(|node| node.tunnel_count() == 0))
                .cloned()
                .collect();
            if missing.is_empty() || waiting.elapsed() >= TUNNEL_WAIT {
                break missing;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Committed: systemd follows this process from now on.
        crate::upgrade::systemd::main_pid_is_me();
        let draining = takeover.take_clients(missing.clone()).await?;
        tracing::info!(
            predecessor,
            missing = missing.len(),
            predecessor_draining = draining,
            ms = waiting.elapsed().as_millis() as u64,
            "took over from the predecessor: accepting clients"
        );
        Ok::<_, crate::upgrade::UpgradeError>(())
    }
    .await;
    match result {
        Ok(()) => Some(takeover),
        Err(e) => {
            tracing::warn!(predecessor, error = %e, "the handover did not complete; serving alone");
            quic.set_peer(None);
            quic.set_accepting(true);
            None
        }
    }
}
