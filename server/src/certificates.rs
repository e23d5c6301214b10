//! Certificates for nodes, through the server's zone.
//!
//! - `PUT`/`DELETE /api/signal/acme-challenge`: an agent that runs ACME
//!   itself (node-side flow) has the server publish and remove its DNS-01
//!   TXT values. `PUT` answers once our own DNS serves the value.
//! - `POST /api/signal/certificate`: the CSR flow. The agent keeps its key
//!   and sends a CSR; the server, holding the ACME account, publishes the
//!   challenges in its zone, completes the order and returns the chain.
//!
//! Both refuse (403, nothing published) anything that is not the calling
//! node's own names: `_acme-challenge.<node>.<zone>` for TXT values, and
//! `<node>.<zone>` / `*.<node>.<zone>` in a CSR, or else only the node's
//! verified custom domains, validated by TLS-ALPN-01: the node's agents
//! serve the answer ([`crate::tls_alpn`]), since the CA's connection is
//! routed to them.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::{Deserialize, Serialize};

use edge_net::logging::{Throttle, Untrusted};

use crate::dns::ZoneCell;
use crate::registry::NodeHandle;
use crate::store::{Change, Published};
use crate::Shared;

/// Most TXT values one node may have published at once: a node has one
/// challenge name, and an order for its name and its wildcard needs two
/// values there. A new value beyond it replaces the node's oldest value if
/// that one is older than [`STALE_VALUE_SECS`] (an order that never
/// finished), and is refused (429) otherwise.
pub const MAX_VALUES_PER_NODE: usize = 2;
/// A value this old belongs to no running order (orders take at most
/// `order_timeout_secs`, 180 s by default): it makes room for a new one.
pub const STALE_VALUE_SECS: i64 = 600;
/// Values older than this are removed even if the agent never asks.
pub const CHALLENGE_LIFETIME_SECS: i64 = 3600;

/// Why a challenge or certificate request failed.
#[derive(Debug, thiserror::Error)]
pub enum CertRequestError {
    /// The request names something that is not the node's own.
    #[error("{0}")]
    Forbidden(String),
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The node has its most values published, none of them stale.
    #[error("this node has {MAX_VALUES_PER_NODE} TXT values published for a running order; remove one or retry later")]
    TooMany,
    /// This server has no `[dns]` or no `[acme]` section.
    #[error("{0}")]
    NotConfigured(&'static str),
    /// An order for this node is already running (here or on another
    /// server of the cluster).
    #[error("a certificate order for this node is already running; retry later")]
    Busy,
    /// This server runs [`MAX_CONCURRENT_ORDERS`] orders already.
    #[error("this server is running as many certificate orders as it takes; retry later")]
    Saturated,
    /// The store cannot be reached: nothing was published.
    #[error("{0}")]
    StoreUnavailable(String),
    /// The store, our DNS or the CA failed.
    #[error("{0}")]
    Failed(String),
}

impl From<crate::store::StoreError> for CertRequestError {
    fn from(e: crate::store::StoreError) -> Self {
        if e.is_unavailable() {
            Self::StoreUnavailable(e.to_string())
        } else {
            Self::Failed(e.to_string())
        }
    }
}

impl CertRequestError {
    fn status(&self) -> StatusCode {
        match self {
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Invalid(_) => StatusCode::BAD_REQUEST,
            Self::TooMany => StatusCode::TOO_MANY_REQUESTS,
            Self::NotConfigured(_) => StatusCode::NOT_IMPLEMENTED,
            Self::Busy => StatusCode::CONFLICT,
            Self::Saturated => StatusCode::SERVICE_UNAVAILABLE,
            Self::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Failed(_) => StatusCode::BAD_GATEWAY,
        }
    }
}

impl IntoResponse for CertRequestError {
    fn into_response(self) -> Response {
        let body = edge_proto::signal::ErrorResponse { error: self.to_string() };
        (self.status(), Json(body)).into_response()
    }
}

pub use edge_proto::signal::{CertificateRequest, ChallengeRequest};

/// Answer of `POST /api/signal/certificate`.
#[derive(Debug, Deserialize, Serialize)]
pub struct CertificateResponse {
    /// Leaf first, PEM.
    pub chain_pem: String,
    /// The ACME directory that issued it.
    pub directory: String,
    /// The CA's suggested renewal window (Unix seconds), if it offers one.
    pub renewal_window: Option<(i64, i64)>,
}

/// The one TXT name a node may publish at, checked case-insensitively.
fn own_challenge_name(shared: &Shared, node: &NodeHandle, name: &str) -> Result<String, CertRequestError> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let own = format!("{}.{}.{}", edge_proto::dns_zone::ACME_LABEL, node.name, shared.config.zone());
    if name != own {
        refused_foreign_name(
            shared,
            node,
            &name,
            &TXT_REFUSAL_LOG,
            "refused a TXT record outside the node's own names",
        );
        return Err(CertRequestError::Forbidden(format!("node {} may only publish TXT values at {own}", node.name)));
    }
    Ok(name)
}

/// Counts a request naming what is not the node's, and logs it escaped (the
/// name is the node's text) and at most every 10 s per kind (`log`).
fn refused_foreign_name(shared: &Shared, node: &NodeHandle, name: &str, log: &Throttle, message: &'static str) {
    shared.metrics.foreign_name_refusals.fetch_add(1, Ordering::Relaxed);
    if let Some(suppressed) = log.due() {
        tracing::warn!(node = %node.name, name = %Untrusted(name), suppressed, "{message}");
    }
}

/// One log line per 10 s for refused TXT names, and one for refused CSRs.
static TXT_REFUSAL_LOG: std::sync::LazyLock<Throttle> =
    std::sync::LazyLock::new(|| Throttle::new(crate::limits::LOG_EVERY));
static CSR_REFUSAL_LOG: std::sync::LazyLock<Throttle> =
    std::sync::LazyLock::new(|| Throttle::new(crate::limits::LOG_EVERY));

fn check_value(value: &str) -> Result<(), CertRequestError> {
    if edge_proto::signal::is_valid_challenge_value(value) {
        Ok(())
    } else {
        Err(CertRequestError::Invalid(format!(
            "value must be {} base64url characters (a DNS-01 key authorization digest)",
            edge_proto::signal::CHALLENGE_VALUE_LEN
        )))
    }
}

/// How long `PUT` waits for the zone to serve a value it stored.
const PUBLISH_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// What the certificate endpoints need beyond [`Shared`]: the zone they
/// publish in, the ACME client, and one order per node at a time.
#[derive(Debug)]
pub struct CertService {
    zone: Option<Arc<ZoneCell>>,
    /// Replaced as a whole by a reload; orders under way keep theirs.
    acme: std::sync::RwLock<Option<Arc<edge_certs::acme::AcmeClient>>>,
    order_locks: OrderLocks,
    /// Orders this server runs at once (each holds a database connection
    /// for its cluster-wide lock); more wait for the node's next retry.
    orders: tokio::sync::Semaphore,
}

/// The ACME client of `[acme]`, its account kept in the store.
pub fn acme_client(
    config: &crate::config::ServerConfig,
    store: Arc<dyn crate::store::Store>,
) -> Option<edge_certs::acme::AcmeClient> {
    config.acme.as_ref().map(|a| {
        let vault = Arc::new(StoreVault(store));
        let mut client =
            edge_certs::acme::AcmeClient::new(a.settings.clone(), &config.data_dir.join("acme")).with_vault(vault);
        client.order_timeout = std::time::Duration::from_secs(a.order_timeout_secs);
        client
    })
}

/// Most certificate orders one server runs at once.
pub const MAX_CONCURRENT_ORDERS: usize = 16;

impl CertService {
    /// For `zone` (when `[dns]` is set) and `acme` (when `[acme]` is).
    pub fn new(zone: Option<Arc<ZoneCell>>, acme: Option<edge_certs::acme::AcmeClient>) -> Self {
        Self {
            zone,
            acme: std::sync::RwLock::new(acme.map(Arc::new)),
            order_locks: OrderLocks::default(),
            orders: tokio::sync::Semaphore::new(MAX_CONCURRENT_ORDERS),
        }
    }

    /// Takes the ACME client of a reloaded config (new orders use it).
    pub fn set_acme(&self, acme: Option<edge_certs::acme::AcmeClient>) {
        *self.acme.write().unwrap_or_else(|p| p.into_inner()) = acme.map(Arc::new);
    }

    /// The zone this server publishes in, if it serves DNS.
    pub fn zone(&self) -> Option<&Arc<ZoneCell>> {
        self.zone.as_ref()
    }
}

/// Publishes a value for `node`; once this returns, our DNS serves it (it
/// answers from the zone snapshot checked here, in process: no query to
/// ourselves, so no DNS rate limit stands between a node and its record).
/// Publishing a value that is already there changes nothing.
pub async fn publish(
    shared: &Shared,
    certs: &CertService,
    node: &NodeHandle,
    name: &str,
    value: &str,
) -> Result<(), CertRequestError> {
    let zone = certs
        .zone
        .clone()
        .ok_or(CertRequestError::NotConfigured("this server runs no DNS ([dns] is not configured)"))?;
    let name = own_challenge_name(shared, node, name)?;
    check_value(value)?;
    let stale_before = crate::unix_now() - STALE_VALUE_SECS;
    let published = shared.store.put_challenge(&node.name, &name, value, MAX_VALUES_PER_NODE, stale_before).await?;
    if published == Published::Full {
        return Err(CertRequestError::TooMany);
    }
    // The change feed applies the write; an unchanged value is normally
    // served already, and if it is not (an earlier apply failed) a nudge
    // re-reads the node's values, never a removal.
    if !zone.current().serves_txt(&name, value) {
        if published == Published::Unchanged {
            shared.nudge(Change::ChallengePut(node.name.clone()));
        }
        if !zone.wait_for(PUBLISH_WAIT, |z| z.serves_txt(&name, value)).await {
            if published == Published::Added {
                // Not served: take back what this request added, so failed
                // attempts never pile up.
                let _ = remove(shared, certs, node, &name, Some(value)).await;
            }
            return Err(CertRequestError::Failed(format!("the zone does not serve the value at {name}")));
        }
    }
    // Every other live server's DNS must serve it too: a CA may ask any.
    let peers: Vec<(String, std::net::SocketAddr)> = shared
        .cluster
        .members()
        .live()
        .filter(|s| s.record.id != shared.cluster.id)
        .filter_map(|s| Some((s.record.name.clone(), s.record.dns.as_deref()?.parse().ok()?)))
        .collect();
    if !peers.is_empty() {
        let limit = std::time::Duration::from_millis(shared.config.cluster.publish_timeout_ms);
        let missing = crate::dns::query::wait_all_serve(&peers, &name, value, limit).await;
        if !missing.is_empty() {
            if published == Published::Added {
                let _ = remove(shared, certs, node, &name, Some(value)).await;
            }
            return Err(CertRequestError::Failed(format!(
                "not every live server's DNS serves the value at {name} within {} ms: {}",
                limit.as_millis(),
                missing.join("; ")
            )));
        }
    }
    if published == Published::Added {
        tracing::info!(node = %node.name, %name, servers = peers.len() + 1, "DNS-01 TXT value published");
    }
    Ok(())
}

/// The store as the cluster's ACME account vault.
#[derive(Debug)]
pub struct StoreVault(pub Arc<dyn crate::store::Store>);

impl edge_certs::acme::AccountVault for StoreVault {
    fn load<'a>(&'a self, key: &'a str) -> edge_certs::acme::BoxFuture<'a, Result<Option<String>, String>> {
        Box::pin(async move { self.0.setting(key).await.map_err(|e| e.to_string()) })
    }

    fn store_if_absent<'a>(
        &'a self,
        key: &'a str,
        json: &'a str,
    ) -> edge_certs::acme::BoxFuture<'a, Result<String, String>> {
        Box::pin(async move { self.0.init_setting(key, json).await.map_err(|e| e.to_string()) })
    }
}

/// How long a CSR request waits for another server's order of the same node.
const CLUSTER_ORDER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Removes one value (or all at `name`) of `node`.
pub async fn remove(
    shared: &Shared,
    _certs: &CertService,
    node: &NodeHandle,
    name: &str,
    value: Option<&str>,
) -> Result<usize, CertRequestError> {
    let name = own_challenge_name(shared, node, name)?;
    if let Some(v) = value {
        check_value(v)?;
    }
    let removed = shared.store.remove_challenge(&node.name, &name, value).await?;
    if removed > 0 {
        tracing::info!(node = %node.name, %name, removed, "DNS-01 TXT value removed");
    }
    Ok(removed)
}

/// The server's zone as a [`edge_certs::acme::ChallengeSink`] for one node.
struct ZoneSink<'a> {
    shared: &'a Shared,
    certs: &'a CertService,
    node: &'a NodeHandle,
}

impl edge_certs::acme::ChallengeSink for ZoneSink<'_> {
    fn publish<'a>(&'a self, name: &'a str, value: &'a str) -> edge_certs::acme::BoxFuture<'a, Result<(), String>> {
        Box::pin(
            async move { publish(self.shared, self.certs, self.node, name, value).await.map_err(|e| e.to_string()) },
        )
    }

    fn remove<'a>(&'a self, name: &'a str, value: &'a str) -> edge_certs::acme::BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            remove(self.shared, self.certs, self.node, name, Some(value)).await.map(|_| ()).map_err(|e| e.to_string())
        })
    }

    /// The node's agents answer: the CA's connection is routed to them.
    fn publish_tls_alpn<'a>(
        &'a self,
        host: &'a str,
        digest: [u8; 32],
    ) -> edge_certs::acme::BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let node = self.node;
            let served = node.alpn.serve(host, digest, || node.tls_alpn_tunnels(), TLS_ALPN_CONFIRM).await;
            served.map_err(|e| e.to_string())?;
            tracing::info!(node = %node.name, host = %Untrusted(host), "TLS-ALPN-01 answer served by the node's agents");
            Ok(())
        })
    }

    fn remove_tls_alpn<'a>(&'a self, host: &'a str) -> edge_certs::acme::BoxFuture<'a, Result<(), String>> {
        self.node.alpn.withdraw(host);
        Box::pin(async { Ok(()) })
    }
}

/// How long the node's agents may take to confirm a TLS-ALPN-01 answer.
const TLS_ALPN_CONFIRM: std::time::Duration = std::time::Duration::from_secs(10);

/// Per-node guards so one node runs one order at a time.
#[derive(Debug, Default)]
pub struct OrderLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl OrderLocks {
    fn for_node(&self, node: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.lock().unwrap_or_else(|p| p.into_inner()).entry(node.to_string()).or_default().clone()
    }
}

/// The CSR flow: checks the CSR's names, then runs the order.
pub async fn issue_for_csr(
    shared: &Shared,
    certs: &CertService,
    node: &NodeHandle,
    request: &CertificateRequest,
) -> Result<CertificateResponse, CertRequestError> {
    let text = request.csr.trim();
    let der = base64::engine::general_purpose::STANDARD
        .decode(text)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')))
        .map_err(|_| CertRequestError::Invalid("csr must be base64 of a DER PKCS#10 request".into()))?;
    let names = edge_certs::info::csr_names(&der).map_err(|e| CertRequestError::Invalid(format!("csr: {e}")))?;
    // The node's own names (DNS-01 in our zone), or its verified custom
    // domains (TLS-ALPN-01 through the tunnel), never a mix.
    let domains = shared.registry.domains_of(&node.name);
    let kind = if !names.is_empty() && names.iter().all(|n| domains.contains(n)) {
        edge_certs::acme::ChallengeKind::TlsAlpn01
    } else {
        edge_certs::acme::ChallengeKind::Dns01
    };
    let allowed = |n: &String| match kind {
        edge_certs::acme::ChallengeKind::TlsAlpn01 => domains.contains(n),
        edge_certs::acme::ChallengeKind::Dns01 => node.hostnames.contains(n),
    };
    if let Some(foreign) = names.iter().find(|n| !allowed(n)) {
        refused_foreign_name(
            shared,
            node,
            foreign,
            &CSR_REFUSAL_LOG,
            "refused a CSR naming another node's or an unknown name",
        );
        return Err(CertRequestError::Forbidden(format!(
            "node {} may only request certificates for {:?}, or for its verified custom domains {:?} \
             (each CSR names either), not {}",
            node.name,
            node.hostnames,
            domains,
            Untrusted(foreign)
        )));
    }
    // Names are checked first: a foreign name is refused (403) whether or
    // not this server runs ACME.
    let acme = certs.acme.read().unwrap_or_else(|p| p.into_inner()).clone();
    let acme = acme.ok_or(CertRequestError::NotConfigured("this server has no [acme] section"))?;
    let lock = certs.order_locks.for_node(&node.name);
    let Ok(_guard) = lock.try_lock() else {
        return Err(CertRequestError::Busy);
    };
    let Ok(_order) = certs.orders.try_acquire() else {
        return Err(CertRequestError::Saturated);
    };
    // And across the cluster: two servers never order for one node at once.
    let _cluster_guard = match shared.store.lock_order(&node.name, CLUSTER_ORDER_WAIT).await {
        Ok(guard) => guard,
        Err(crate::store::StoreError::Conflict(_)) => return Err(CertRequestError::Busy),
        Err(e) => return Err(e.into()),
    };
    tracing::info!(node = %node.name, names = ?names, ?kind, "certificate requested (CSR flow)");
    let sink = ZoneSink { shared, certs, node };
    match acme.issue_by(&names, &der, &sink, kind).await {
        Ok(issued) => {
            shared.metrics.certificates_issued.fetch_add(1, Ordering::Relaxed);
            Ok(CertificateResponse {
                chain_pem: issued.chain_pem,
                directory: issued.directory,
                renewal_window: issued.renewal_window,
            })
        }
        Err(e) => {
            shared.metrics.certificate_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(node = %node.name, error = %e, "certificate order failed");
            Err(CertRequestError::Failed(e.to_string()))
        }
    }
}
