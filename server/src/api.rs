//! The signal API (HTTPS, JSON) for agents and operators.
//!
//! - `POST /api/signal/heartbeat`: node token as bearer; status report.
//! - `PUT`/`DELETE /api/signal/acme-challenge`, `POST /api/signal/certificate`:
//!   node token as bearer; see [`crate::certificates`].
//! - `GET /api/nodes`, `GET /api/nodes/{name}`: admin token as bearer; nodes
//!   and their live state (from this server's registry).
//! - `GET /healthz`: liveness.
//! - `GET /metrics`: Prometheus text format, admin token as bearer (see
//!   [`crate::scrape`]; `listen.metrics` serves it without a token).

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Extension, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use edge_proto::signal::ProbeRequest;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Serialize;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::certificates::CertService;
use crate::limits::{Listener, Refusal};
use crate::registry::NodeHandle;
use crate::scrape::Scrape;
use crate::Shared;

/// What the API handlers share: the server's state and what only the API
/// uses (certificates, the `/metrics` cache).
#[derive(Debug)]
pub struct ApiState {
    /// The server's shared state.
    pub shared: Arc<Shared>,
    /// Zone, ACME client and order locks for the certificate endpoints.
    pub certs: CertService,
    /// The cached `/metrics` body and its per-source budget.
    pub scrape: Arc<Scrape>,
}

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// Deadline for the TLS handshake and for request headers.
const CLIENT_DEADLINE: Duration = Duration::from_secs(10);

/// The API routes.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/api/signal/heartbeat", post(heartbeat))
        .route("/api/signal/acme-challenge", put(put_challenge).delete(delete_challenge))
        .route("/api/signal/certificate", post(certificate))
        .route("/api/nodes", get(nodes))
        .route("/api/nodes/{name}", get(node))
        .route("/api/probe", post(probe_for_peer))
        .route("/api/probe/batch", post(probe_batch_for_peer))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// The routes of the separate metrics listener (no token: bind it where
/// only the scraper reaches).
pub fn metrics_router(state: Arc<ApiState>) -> Router {
    Router::new().route("/metrics", get(open_metrics)).route("/healthz", get(|| async { "ok\n" })).with_state(state)
}

async fn open_metrics(State(api): State<Arc<ApiState>>, Extension(peer): Extension<Peer>) -> Response {
    api.scrape.respond(&api.shared, Listener::Metrics, peer.0).await
}

/// The client's address, added to every request of its connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub IpAddr);

/// The SHA-256 (hex) of the client certificate the TLS peer presented, if
/// any: peer servers present their identity.
#[derive(Debug, Clone, Default)]
pub struct ClientIdentity(pub Option<String>);

/// Serves `router` on `listener` until `shutdown`: over HTTPS with `tls`
/// (the signal API), plain HTTP without (the metrics listener). Sources over
/// their rate or open-connection cap (the `admission` of the listener) are
/// refused at accept; every answer must leave within [`CLIENT_DEADLINE`] of
/// the peer's last read.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
    shared: Arc<Shared>,
    admission: fn(&Shared) -> &crate::limits::Admission,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let what = admission(&shared).listener();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, listener = what.label(), "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admitted = match admission(&shared).admit(peer.ip()) {
            Ok(admitted) => admitted,
            Err(reason) => {
                shared.refusals.refuse(what, reason, peer.ip());
                edge_net::splice::reset_tcp(&tcp);
                continue;
            }
        };
        let tls = tls.clone();
        let router = router.clone().layer(axum::Extension(Peer(peer.ip())));
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _admitted = admitted;
            let Some(tls) = tls else {
                let service = TowerToHyperService::new(router.layer(axum::Extension(ClientIdentity(None))));
                return serve_connection(tcp, service, shutdown).await;
            };
            match tokio::time::timeout(CLIENT_DEADLINE, tls.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let identity = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|leaf| edge_proto::join::hex(&edge_certs::fingerprint(leaf)));
                    let service = TowerToHyperService::new(router.layer(axum::Extension(ClientIdentity(identity))));
                    serve_connection(stream, service, shutdown).await
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "API TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "API TLS handshake timed out"),
            }
        });
    }
}

/// HTTP/1.1 on one connection until the peer is done or `shutdown`.
async fn serve_connection<IO, S>(io: IO, service: S, shutdown: CancellationToken)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming> + Send,
    S::Future: Send + 'static,
    S::ResBody: Send + 'static,
    <S::ResBody as hyper::body::Body>::Data: Send,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = edge_net::write_deadline::WriteDeadline::new(io, CLIENT_DEADLINE);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(CLIENT_DEADLINE)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => { let _ = result; }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(CLIENT_DEADLINE, conn).await;
        }
    }
}

/// Spends one attempt of the source's failed-authentication budget before
/// its token is looked at; `Some(refusal)` when the budget is used up. The
/// caller refunds the attempt when the token turns out good.
fn auth_refusal(shared: &Shared, peer: Peer) -> Option<Response> {
    if shared.auth_failures.try_take(peer.0) {
        return None;
    }
    shared.refusals.refuse(Listener::Api, Refusal::AuthFailures, peer.0);
    Some(error(StatusCode::TOO_MANY_REQUESTS, "too many failed authentications from this address; retry later"))
}

/// Checks the admin bearer token, counting failures against the source.
/// `Some(refusal)` unless the request carries the admin token.
fn admin_refusal(shared: &Shared, peer: Peer, headers: &HeaderMap) -> Option<Response> {
    let Some(presented) = bearer(headers).map(crate::token_hash) else {
        // No token at all (a monitor, a scanner) is no guess: not counted.
        return Some(error(StatusCode::UNAUTHORIZED, "admin token required"));
    };
    if let Some(refused) = auth_refusal(shared, peer) {
        return Some(refused);
    }
    if bool::from(presented.ct_eq(&shared.admin_token_hash)) {
        shared.auth_failures.refund(peer.0);
        return None;
    }
    tracing::debug!(peer = %peer.0, "wrong admin token");
    Some(error(StatusCode::UNAUTHORIZED, "admin token required"))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(edge_proto::signal::ErrorResponse { error: message.to_string() })).into_response()
}

pub use edge_proto::signal::HeartbeatRequest;

/// A node's authenticated request with its JSON body, as an extractor (see
/// [`node_request`]).
#[derive(Debug)]
pub struct NodeRequest<T>(Arc<crate::registry::NodeHandle>, T);

impl<T: serde::de::DeserializeOwned> axum::extract::FromRequest<Arc<ApiState>> for NodeRequest<T> {
    type Rejection = Response;

    async fn from_request(request: axum::extract::Request, api: &Arc<ApiState>) -> Result<Self, Response> {
        let (parts, body) = request.into_parts();
        let peer = parts.extensions.get::<Peer>().copied().unwrap_or(Peer(IpAddr::from([0, 0, 0, 0])));
        let (node, body) = node_request(&api.shared, peer, &parts.headers, body).await?;
        Ok(NodeRequest(node, body))
    }
}

/// Authenticates a node request, then reads its JSON body: the token is
/// checked before a byte of the body is read, an announced length over the
/// limit is refused at once, and the rest is read under a deadline.
async fn node_request<T: serde::de::DeserializeOwned>(
    shared: &Shared,
    peer: Peer,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<(Arc<crate::registry::NodeHandle>, T), Response> {
    let Some(token) = bearer(headers) else {
        return Err(error(StatusCode::UNAUTHORIZED, "missing bearer token"));
    };
    if let Some(refused) = auth_refusal(shared, peer) {
        return Err(refused);
    }
    let Some(node) = shared.authenticate(token).await else {
        shared.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
        return Err(error(StatusCode::UNAUTHORIZED, "invalid node token"));
    };
    shared.auth_failures.refund(peer.0);
    // A node's own budget: one token holder looping requests (each of which
    // may touch the store, the registry and the zone) must not slow the
    // server down for every other node.
    let limits = shared.limits();
    let within = node.signal_budget.lock().unwrap_or_else(|p| p.into_inner()).take(
        f64::from(limits.node_signal_rate),
        limits.node_signal_burst,
        std::time::Instant::now(),
    );
    if !within {
        shared.refusals.refuse(Listener::Api, Refusal::NodeRate, peer.0);
        let mut refused = error(StatusCode::TOO_MANY_REQUESTS, "this node is over its signal API request budget");
        refused.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return Err(refused);
    }
    let announced = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if announced.is_some_and(|n| n > MAX_BODY) {
        return Err(error(StatusCode::PAYLOAD_TOO_LARGE, "body larger than 64 KiB"));
    }
    let bytes = match tokio::time::timeout(CLIENT_DEADLINE, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => return Err(error(StatusCode::PAYLOAD_TOO_LARGE, "body larger than 64 KiB")),
        Err(_) => return Err(error(StatusCode::REQUEST_TIMEOUT, "body not received in time")),
    };
    match serde_json::from_slice(&bytes) {
        Ok(b) => Ok((node, b)),
        Err(e) => Err(error(StatusCode::BAD_REQUEST, &format!("invalid request body: {e}"))),
    }
}

async fn put_challenge(
    State(api): State<Arc<ApiState>>,
    request: NodeRequest<crate::certificates::ChallengeRequest>,
) -> Response {
    let NodeRequest(node, req) = request;
    let Some(value) = req.value.as_deref() else {
        return error(StatusCode::BAD_REQUEST, "value is required");
    };
    match crate::certificates::publish(&api.shared, &api.certs, &node, &req.name, value).await {
        Ok(()) => Json(edge_proto::signal::ChallengePublished { published: req.name }).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn delete_challenge(
    State(api): State<Arc<ApiState>>,
    request: NodeRequest<crate::certificates::ChallengeRequest>,
) -> Response {
    let NodeRequest(node, req) = request;
    match crate::certificates::remove(&api.shared, &api.certs, &node, &req.name, req.value.as_deref()).await {
        Ok(removed) => Json(edge_proto::signal::ChallengesRemoved { removed }).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn certificate(
    State(api): State<Arc<ApiState>>,
    request: NodeRequest<crate::certificates::CertificateRequest>,
) -> Response {
    let NodeRequest(node, req) = request;
    // The order runs in its own task: a client that hangs up mid-order does
    // not cancel it halfway, so published TXT values are always removed.
    let order =
        tokio::spawn(async move { crate::certificates::issue_for_csr(&api.shared, &api.certs, &node, &req).await });
    match order.await {
        Ok(Ok(issued)) => Json(issued).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("certificate task failed: {e}")),
    }
}

async fn heartbeat(request: NodeRequest<HeartbeatRequest>) -> Response {
    let NodeRequest(node, body) = request;
    if body.status.len() > 64 || body.version.len() > 64 || body.capabilities.len() > 64 || body.counters.len() > 64 {
        return error(StatusCode::BAD_REQUEST, "heartbeat fields too long");
    }
    {
        let mut status = node.status.lock().unwrap_or_else(|p| p.into_inner());
        status.last_heartbeat = Some(crate::unix_now());
        status.agent_version = Some(body.version.clone());
        if let Some(open) = body.counters.get("open_streams") {
            status.agent_open_streams = *open;
        }
        if body.cert_not_after.is_some() {
            status.cert_not_after = body.cert_not_after;
        }
    }
    // The status flush job writes it to the store within a few seconds.
    Json(edge_proto::signal::HeartbeatResponse {
        node: node.name.clone(),
        hostnames: node.hostnames.clone(),
        tunnels: node.tunnel_count(),
        server_time: crate::unix_now(),
    })
    .into_response()
}

/// One node in `GET /api/nodes`.
#[derive(Debug, Serialize)]
pub struct NodeView {
    /// Node name.
    pub name: String,
    /// Hostnames routed to it.
    pub hostnames: Vec<String>,
    /// Whether a tunnel is up.
    pub connected: bool,
    /// Live tunnels.
    pub tunnels: usize,
    /// Unix seconds of the last heartbeat.
    pub last_heartbeat: Option<i64>,
    /// Client connections open now.
    pub open_connections: u64,
    /// Client connections routed so far.
    pub total_connections: u64,
    /// Bytes client → node.
    pub bytes_to_node: u64,
    /// Bytes node → client.
    pub bytes_from_node: u64,
    /// Agent version.
    pub agent_version: Option<String>,
    /// Agent address.
    pub remote_addr: Option<String>,
    /// Expiry (Unix seconds) of the certificate the agent serves.
    pub cert_not_after: Option<i64>,
    /// Where the node's names point.
    pub mode: crate::store::Mode,
    /// The endpoint the agent declared, as probed.
    pub endpoint: Option<String>,
    /// Plain HTTP behaviour in proxy mode.
    pub http_mode: crate::store::HttpMode,
    /// Newest probe samples first.
    pub samples: Vec<crate::store::ProbeSample>,
    /// The newest mode transition.
    pub last_transition: Option<crate::store::ModeChange>,
}

async fn nodes(State(api): State<Arc<ApiState>>, Extension(peer): Extension<Peer>, headers: HeaderMap) -> Response {
    let shared = &api.shared;
    if let Some(refused) = admin_refusal(shared, peer, &headers) {
        return refused;
    }
    let mut views: Vec<NodeView> = shared.registry.nodes().iter().map(|n| node_view(n)).collect();
    for view in &mut views {
        // History is for operators; an unreachable store leaves it empty.
        let history = shared.store.mode_history(&view.name, 5).await.unwrap_or_default();
        view.samples = history.samples;
        view.last_transition = history.transitions.into_iter().next();
    }
    Json(views).into_response()
}

async fn node(
    State(api): State<Arc<ApiState>>,
    Extension(peer): Extension<Peer>,
    axum::extract::Path(name): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    let shared = &api.shared;
    if let Some(refused) = admin_refusal(shared, peer, &headers) {
        return refused;
    }
    let Some(node) = shared.registry.node(&name) else {
        return error(StatusCode::NOT_FOUND, "no such node on this server");
    };
    let mut view = node_view(&node);
    let history = shared.store.mode_history(&view.name, 5).await.unwrap_or_default();
    view.samples = history.samples;
    view.last_transition = history.transitions.into_iter().next();
    Json(view).into_response()
}

/// The live view of a node, from the registry.
pub fn node_view(node: &NodeHandle) -> NodeView {
    use std::sync::atomic::Ordering::Relaxed;
    let status = node.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let tunnels = node.tunnel_count();
    NodeView {
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
        mode: node.current_mode(),
        endpoint: node.current_endpoint().map(|e| e.to_string()),
        http_mode: *node.http_mode.lock().unwrap_or_else(|p| p.into_inner()),
        samples: Vec::new(),
        last_transition: None,
    }
}

/// `Some(refusal)` unless the caller is a live server of the cluster (by
/// its identity client certificate) or presents the admin token.
fn probe_refusal(shared: &Shared, peer: Peer, identity: &ClientIdentity, headers: &HeaderMap) -> Option<Response> {
    let from_server =
        identity.0.as_deref().is_some_and(|fp| shared.cluster.members().live_peer(&shared.cluster.id, fp).is_some());
    if from_server {
        return None;
    }
    admin_refusal(shared, peer, headers)
}

/// Reads a JSON body of at most `limit` bytes within the client deadline.
async fn json_body<T: serde::de::DeserializeOwned>(body: axum::body::Body, limit: usize) -> Result<T, Response> {
    let bytes = match tokio::time::timeout(CLIENT_DEADLINE, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => return Err(error(StatusCode::PAYLOAD_TOO_LARGE, &format!("body larger than {limit} bytes"))),
        Err(_) => return Err(error(StatusCode::REQUEST_TIMEOUT, "body not received in time")),
    };
    serde_json::from_slice(&bytes).map_err(|e| error(StatusCode::BAD_REQUEST, &format!("invalid request body: {e}")))
}

/// Why a probe another server asked for did not give an answer.
enum ProbeFailure {
    /// The request itself is invalid.
    Invalid(&'static str),
    /// The node's endpoint did not answer the probe.
    Failed(String),
}

/// Runs one probe asked for by another server; the node's answer, unchecked.
async fn run_probe(shared: &Shared, req: &ProbeRequest) -> Result<[u8; 32], ProbeFailure> {
    let nonce = edge_proto::join::parse_fingerprint(&req.nonce);
    let (Some(nonce), Some(sni)) = (nonce, edge_proto::names::normalize_hostname(&req.sni)) else {
        return Err(ProbeFailure::Invalid("nonce must be 64 hex digits and sni a DNS name"));
    };
    let timeout = Duration::from_millis(req.timeout_ms.unwrap_or(3000).clamp(100, 10_000));
    let tls = crate::detector::probe_client_config();
    match tokio::time::timeout(timeout, crate::detector::raw_probe(req.endpoint, &sni, &nonce, tls, &shared.self_loops))
        .await
    {
        Ok(result) => result.map_err(ProbeFailure::Failed),
        Err(_) => Err(ProbeFailure::Failed("no answer in time".into())),
    }
}

async fn probe_for_peer(
    State(api): State<Arc<ApiState>>,
    Extension(peer): Extension<Peer>,
    Extension(identity): Extension<ClientIdentity>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let shared = &api.shared;
    if let Some(refused) = probe_refusal(shared, peer, &identity, &headers) {
        return refused;
    }
    let req: ProbeRequest = match json_body(body, 4096).await {
        Ok(r) => r,
        Err(refused) => return refused,
    };
    match run_probe(shared, &req).await {
        Ok(answer) => Json(edge_proto::signal::ProbeAnswer { answer: edge_proto::join::hex(&answer) }).into_response(),
        Err(ProbeFailure::Invalid(why)) => error(StatusCode::BAD_REQUEST, why),
        Err(ProbeFailure::Failed(e)) => error(StatusCode::BAD_GATEWAY, &e),
    }
}

/// Probes of one batch in flight at once.
const PROBE_BATCH_CONCURRENCY: usize = 64;

/// `POST /api/probe/batch`: every probe of a round in one request.
async fn probe_batch_for_peer(
    State(api): State<Arc<ApiState>>,
    Extension(peer): Extension<Peer>,
    Extension(identity): Extension<ClientIdentity>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    use edge_proto::signal::{ProbeBatchAnswer, ProbeBatchRequest, ProbeOutcome, MAX_PROBE_BATCH};
    use futures_util::StreamExt;
    let shared = &api.shared;
    if let Some(refused) = probe_refusal(shared, peer, &identity, &headers) {
        return refused;
    }
    let batch: ProbeBatchRequest = match json_body(body, MAX_PROBE_BATCH * 512).await {
        Ok(b) => b,
        Err(refused) => return refused,
    };
    if batch.probes.len() > MAX_PROBE_BATCH {
        return error(StatusCode::PAYLOAD_TOO_LARGE, &format!("at most {MAX_PROBE_BATCH} probes per batch"));
    }
    let outcomes: Vec<ProbeOutcome> = futures_util::stream::iter(batch.probes)
        .map(|req| {
            let shared = shared.clone();
            async move {
                match run_probe(&shared, &req).await {
                    Ok(answer) => ProbeOutcome::Answer { answer: edge_proto::join::hex(&answer) },
                    Err(ProbeFailure::Invalid(why)) => ProbeOutcome::Failed { error: why.to_string() },
                    Err(ProbeFailure::Failed(error)) => ProbeOutcome::Failed { error },
                }
            }
        })
        .buffered(PROBE_BATCH_CONCURRENCY)
        .collect()
        .await;
    Json(ProbeBatchAnswer { outcomes }).into_response()
}

/// `/metrics` on the public API: admin token required (the separate
/// `listen.metrics` listener serves it without one).
async fn metrics(State(api): State<Arc<ApiState>>, Extension(peer): Extension<Peer>, headers: HeaderMap) -> Response {
    if let Some(refused) = admin_refusal(&api.shared, peer, &headers) {
        return refused;
    }
    api.scrape.respond(&api.shared, Listener::Api, peer.0).await
}
