//! What the server's tasks share: configuration, the store handle, the
//! registry, counters and admission state. No API, DNS or certificate types
//! live here; those belong to their listeners.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{self, ServerConfig};
use crate::metrics::Metrics;
use crate::registry::{NodeHandle, Registry};
use crate::store::{Change, Store};
use crate::{endpoints, limits, self_loop, token_hash};

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
    /// Bound addresses of the TCP listeners (TLS, HTTP, API, metrics): an
    /// endpoint there would make the server probe or splice to itself.
    pub own_listeners: Vec<SocketAddr>,
    /// Admission checks of each listener.
    pub admission: Admissions,
    /// Failed-authentication budgets per source.
    pub auth_failures: limits::AuthFailures,
    /// Refusal counters and their throttled log.
    pub refusals: limits::Refusals,
    /// Our own probes and fallback splices in flight, to refuse them if
    /// they come back to us.
    pub self_loops: Arc<self_loop::SelfLoops>,
    /// Wakes the status flush job early (an agent connected or left).
    pub status_changed: tokio::sync::Notify,
    /// Changes made in memory (a node's direct address) that the zone
    /// must follow; the change feed job applies them with the store's.
    pub nudges: tokio::sync::mpsc::UnboundedSender<Change>,
    /// The cluster's servers as last read, and this server's part in it.
    pub cluster: crate::cluster::ClusterView,
    /// Connections to peer servers, for forwarding.
    pub peers: crate::cluster::peers::PeerLinks,
    /// The last reading of [`Shared::own_addresses`].
    pub(crate) own_addresses: std::sync::Mutex<Option<(std::time::Instant, Arc<endpoints::OwnAddresses>)>>,
    /// The settings a reload (SIGHUP) may change; `config` keeps the ones
    /// read at start.
    pub live: LiveSettings,
    /// Set when this process handed over to a successor (an upgrade): it
    /// drains without leaving the cluster or writing what the successor
    /// now owns (the server's lease, node status, the decider lease).
    pub retiring: std::sync::atomic::AtomicBool,
    /// Moved on when agents are to connect to a successor: each tunnel's
    /// control loop tells its agent.
    pub agent_handover: tokio::sync::watch::Sender<u64>,
    /// Set while agents are being moved to a successor: an agent that
    /// connects meanwhile is told to move at once.
    pub handing_over: std::sync::atomic::AtomicBool,
    /// The TCP services in the store (the sync publishes, the service
    /// listeners follow).
    pub services: tokio::sync::watch::Sender<Arc<Vec<crate::store::ServiceRecord>>>,
    /// The custom domains in the store (the sync publishes; each agent's
    /// session sends its node's routed ones).
    pub domains: tokio::sync::watch::Sender<Arc<Vec<crate::store::DomainRecord>>>,
    /// Access policies in force (the sync sets them).
    pub access: crate::access::AccessTable,
    /// The UDP listener for QUIC clients, when configured: tunnels of
    /// agents that serve them register a route here.
    pub quic_clients: Option<Arc<crate::quic_clients::QuicClients>>,
}

/// Settings that take effect on new work when the config is reloaded.
#[derive(Debug)]
pub struct LiveSettings {
    limits: std::sync::RwLock<Arc<config::LimitsConfig>>,
    modes: std::sync::RwLock<Arc<config::ModesConfig>>,
}

impl LiveSettings {
    /// The settings of `config`.
    pub fn new(config: &config::ServerConfig) -> Self {
        Self {
            limits: std::sync::RwLock::new(Arc::new(config.limits.clone())),
            modes: std::sync::RwLock::new(Arc::new(config.modes.clone())),
        }
    }

    /// Takes the limits and modes of a reloaded config.
    pub fn set(&self, config: &config::ServerConfig) {
        *self.limits.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config.limits.clone());
        *self.modes.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config.modes.clone());
    }
}

static AUTH_STORE_LOG: std::sync::LazyLock<edge_net::logging::Throttle> =
    std::sync::LazyLock::new(|| edge_net::logging::Throttle::new(limits::LOG_EVERY));

/// How long a reading of the host's own addresses is used.
pub const OWN_ADDRESSES_TTL: Duration = Duration::from_secs(5);

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
    /// The connection cap shared by :443 and :80, and its size now.
    slots: Arc<tokio::sync::Semaphore>,
    slot_total: std::sync::Mutex<u32>,
    /// Permits a lowered cap still has to take back as connections end.
    slot_debt: Arc<std::sync::atomic::AtomicUsize>,
}

impl Admissions {
    /// Admission state from `[limits]`.
    pub fn new(l: &config::LimitsConfig) -> Self {
        use limits::{Admission, Listener, OpenPerSource, SourceRates};
        let cap = Arc::new(tokio::sync::Semaphore::new(l.max_connections as usize));
        let slots = Some(cap.clone());
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
            slots: cap,
            slot_total: std::sync::Mutex::new(l.max_connections),
            slot_debt: Arc::default(),
        }
    }

    /// Applies reloaded `[limits]` to new connections: rates (buckets start
    /// full), per-source caps and the connection cap. Open connections keep
    /// their slots; a lower cap takes effect as they end.
    pub fn apply(&self, l: &config::LimitsConfig) {
        use limits::SourceRates;
        let rates = || SourceRates::new(l.per_source_rate, l.per_source_burst, l.source_table_size);
        for a in [&self.tls, &self.http, &self.api, &self.metrics, &self.quic] {
            a.set_rates(rates());
        }
        self.dns.set_rates(SourceRates::new(l.dns_per_source_rate, l.dns_per_source_burst, l.source_table_size));
        for a in [&self.tls, &self.api, &self.metrics] {
            a.per_source().set_max(l.per_source_max_open);
        }
        let mut total = self.slot_total.lock().unwrap_or_else(|p| p.into_inner());
        let debt = &self.slot_debt;
        if l.max_connections >= *total {
            // A raise first cancels what a lowering still owes.
            let raise = (l.max_connections - *total) as usize;
            let repaid = take_up_to(debt, raise);
            self.slots.add_permits(raise - repaid);
        } else {
            // Permits in use cannot be forgotten now: forget what is free,
            // and owe the rest, taken back as connections end.
            let cut = (*total - l.max_connections) as usize;
            let owed = cut - self.slots.forget_permits(cut);
            if owed > 0 && debt.fetch_add(owed, std::sync::atomic::Ordering::SeqCst) == 0 {
                let (slots, debt) = (self.slots.clone(), debt.clone());
                tokio::spawn(async move {
                    while debt.load(std::sync::atomic::Ordering::SeqCst) > 0 {
                        let Ok(permit) = slots.acquire().await else { break };
                        if take_up_to(&debt, 1) == 1 {
                            permit.forget();
                        }
                    }
                });
            }
        }
        *total = l.max_connections;
    }
}

/// Takes up to `n` from `counter`; returns how much it took.
fn take_up_to(counter: &std::sync::atomic::AtomicUsize, n: usize) -> usize {
    use std::sync::atomic::Ordering::SeqCst;
    let before = counter.fetch_update(SeqCst, SeqCst, |d| Some(d - d.min(n))).unwrap_or(0);
    before.min(n)
}

impl Shared {
    /// `[limits]` in force now.
    pub fn limits(&self) -> Arc<config::LimitsConfig> {
        self.live.limits.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `[modes]` in force now.
    pub fn modes(&self) -> Arc<config::ModesConfig> {
        self.live.modes.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The node a bearer token belongs to, if the token is valid. Hashes are
    /// compared in constant time. The in-memory registry answers first; on a
    /// miss the store is asked for that one node (a node added or re-keyed
    /// a moment ago whose change has not arrived yet), and a match updates
    /// the registry. This runs per agent connection or heartbeat, never per
    /// client connection.
    pub async fn authenticate(&self, token: &str) -> Option<Arc<NodeHandle>> {
        let name = edge_proto::join::node_of_token(token)?;
        let hash = token_hash(token);
        if let Some(node) = self.registry.node(name).filter(|n| n.token_matches(&hash)) {
            return Some(node);
        }
        let record = match self.store.get_node(name).await {
            Ok(record) => record?,
            Err(e) => {
                if let Some(suppressed) = AUTH_STORE_LOG.due() {
                    tracing::warn!(error = %e, suppressed, "store lookup during authentication failed");
                }
                return None;
            }
        };
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&record.token_hash[..], &hash[..])) {
            return None;
        }
        let node = self.registry.upsert(&record);
        // The zone follows (the change itself may still be on its way).
        self.nudge(Change::NodeAdded(record.name.clone()));
        Some(node)
    }

    /// Has the change feed job bring the zone in line with `change`.
    pub fn nudge(&self, change: Change) {
        let _ = self.nudges.send(change);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: u32) -> config::LimitsConfig {
        config::LimitsConfig { max_connections: max, ..config::LimitsConfig::default() }
    }

    #[tokio::test]
    async fn lowering_and_raising_the_cap_keeps_the_count() {
        let a = Admissions::new(&limits(10));
        let held = a.slots.clone().acquire_many_owned(8).await.unwrap();
        a.apply(&limits(5));
        assert_eq!(a.slots.available_permits(), 0, "the free two are gone");
        assert_eq!(a.slot_debt.load(std::sync::atomic::Ordering::SeqCst), 3, "three owed");
        a.apply(&limits(10));
        assert_eq!(a.slot_debt.load(std::sync::atomic::Ordering::SeqCst), 0, "the raise cancels the debt");
        assert_eq!(a.slots.available_permits(), 2);
        drop(held);
        tokio::task::yield_now().await;
        assert_eq!(a.slots.available_permits(), 10, "back to the raised cap, none lost");
        // Lowered while busy, the debt is taken back as connections end.
        let held = a.slots.clone().acquire_many_owned(10).await.unwrap();
        a.apply(&limits(4));
        drop(held);
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert_eq!(a.slots.available_permits(), 4);
    }
}
