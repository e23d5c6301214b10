//! `/api/v1`: the admin API's handlers. Bodies are the types of
//! `edge_proto::admin`; see `openapi.json` (served at
//! `/api/v1/openapi.json`) for the contract, which a test checks against
//! [`ROUTES`].

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Extension, Json, Router};
use edge_proto::admin::{
    ApiError, AuditAction, AuditPage, CreateNode, CreateToken, CreateUser, DnsRecord, ErrorCode, Login, NodeDetail,
    NodeSummary, Probe, ServerSummary, SessionInfo, SetHttpMode, TokenSummary, Transition, UserSummary,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::auth::{self, AuthError, Caller};
use super::ops::OpError;
use super::AdminState;
use crate::api::Peer;
use crate::store::{AuditQuery, NodeRecord, StaticKind};

/// Every route of `/api/v1` as (method, path), as the OpenAPI document
/// names them.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/api/v1/openapi.json"),
    ("get", "/api/v1/session"),
    ("post", "/api/v1/session"),
    ("delete", "/api/v1/session"),
    ("get", "/api/v1/nodes"),
    ("post", "/api/v1/nodes"),
    ("get", "/api/v1/nodes/{name}"),
    ("delete", "/api/v1/nodes/{name}"),
    ("post", "/api/v1/nodes/{name}/rotate-token"),
    ("put", "/api/v1/nodes/{name}/http-mode"),
    ("get", "/api/v1/dns/records"),
    ("post", "/api/v1/dns/records"),
    ("delete", "/api/v1/dns/records"),
    ("get", "/api/v1/domains"),
    ("post", "/api/v1/domains"),
    ("delete", "/api/v1/domains/{name}"),
    ("get", "/api/v1/services"),
    ("post", "/api/v1/services"),
    ("delete", "/api/v1/services/{name}"),
    ("get", "/api/v1/access"),
    ("put", "/api/v1/access/{scope}"),
    ("delete", "/api/v1/access/{scope}"),
    ("get", "/api/v1/servers"),
    ("delete", "/api/v1/servers/{id}"),
    ("get", "/api/v1/audit"),
    ("get", "/api/v1/users"),
    ("post", "/api/v1/users"),
    ("delete", "/api/v1/users/{name}"),
    ("get", "/api/v1/tokens"),
    ("post", "/api/v1/tokens"),
    ("delete", "/api/v1/tokens/{name}"),
];

/// The OpenAPI 3.1 document.
pub const OPENAPI: &str = include_str!("openapi.json");

/// The routes; `sessions` adds login and the session cookie (the admin
/// listener), else only bearer tokens are taken (the signal API's
/// listener, which faces the internet).
pub fn router(sessions: bool) -> Router<Arc<AdminState>> {
    let router = Router::new();
    let router =
        if sessions { router.route("/api/v1/session", get(session_info).post(login).delete(logout)) } else { router };
    router
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/nodes", get(list_nodes).post(create_node))
        .route("/api/v1/nodes/{name}", get(get_node).delete(remove_node))
        .route("/api/v1/nodes/{name}/rotate-token", post(rotate_token))
        .route("/api/v1/nodes/{name}/http-mode", put(set_http_mode))
        .route("/api/v1/dns/records", get(list_dns).post(create_dns).delete(delete_dns))
        .route("/api/v1/domains", get(list_domains).post(create_domain))
        .route("/api/v1/domains/{name}", delete(remove_domain))
        .route("/api/v1/services", get(list_services).post(create_service))
        .route("/api/v1/services/{name}", delete(remove_service))
        .route("/api/v1/access", get(list_access))
        .route("/api/v1/access/{scope}", put(set_access).delete(clear_access))
        .route("/api/v1/servers", get(list_servers))
        .route("/api/v1/servers/{id}", delete(remove_server))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/users", get(list_users).post(create_user))
        .route("/api/v1/users/{name}", delete(remove_user))
        .route("/api/v1/tokens", get(list_tokens).post(create_token))
        .route("/api/v1/tokens/{name}", delete(remove_token))
        .fallback(|| async { api_error(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such route", None) })
}

/// An error answer.
pub fn api_error(status: StatusCode, error: ErrorCode, message: &str, field: Option<&str>) -> Response {
    let body = ApiError { error, message: message.to_string(), field: field.map(str::to_string) };
    (status, Json(body)).into_response()
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        match self {
            AuthError::Missing => api_error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, &message, None),
            AuthError::TooMany => api_error(StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited, &message, None),
            AuthError::Scope(_) | AuthError::Origin | AuthError::Csrf => {
                api_error(StatusCode::FORBIDDEN, ErrorCode::Forbidden, &message, None)
            }
            AuthError::Store(e) => store_error(&e),
        }
    }
}

fn store_error(e: &crate::store::StoreError) -> Response {
    if e.is_unavailable() {
        api_error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, &e.to_string(), None)
    } else {
        tracing::error!(error = %e, "store error in the admin API");
        api_error(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, "store error (see the server log)", None)
    }
}

impl IntoResponse for OpError {
    fn into_response(self) -> Response {
        match &self {
            OpError::Invalid { field, reason } => {
                api_error(StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::Invalid, reason, Some(field))
            }
            OpError::Conflict { field, message } => {
                api_error(StatusCode::CONFLICT, ErrorCode::Conflict, message, Some(field))
            }
            OpError::NotFound(m) => api_error(StatusCode::NOT_FOUND, ErrorCode::NotFound, m, None),
            OpError::Store(e) => store_error(e),
            OpError::NoAddress(_) | OpError::Password(_) => {
                api_error(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, &self.to_string(), None)
            }
        }
    }
}

/// Authenticates the request; `admin` requires the admin scope.
async fn caller(
    api: &AdminState,
    method: &Method,
    headers: &HeaderMap,
    peer: Peer,
    admin: bool,
) -> Result<Caller, Response> {
    let req = auth::Request { method, headers, source: peer.0, form_csrf: None };
    let caller = auth::authenticate(api.shared.store.as_ref(), &api.shared, &api.config, &req)
        .await
        .map_err(IntoResponse::into_response)?;
    if admin {
        caller.require_admin().map_err(IntoResponse::into_response)?;
    }
    Ok(caller)
}

/// A caller who may read: a token of any scope or a session. With a
/// cookie, any method but GET must pass the Origin and CSRF checks.
#[derive(Debug)]
pub struct Reader(pub Caller);

/// A caller who may change things: an admin token or a session.
#[derive(Debug)]
pub struct Writer(pub Caller);

async fn caller_of(api: &AdminState, parts: &Parts, admin: bool) -> Result<Caller, Response> {
    let peer = parts.extensions.get::<Peer>().copied().unwrap_or(Peer(std::net::IpAddr::from([0, 0, 0, 0])));
    caller(api, &parts.method, &parts.headers, peer, admin).await
}

impl FromRequestParts<Arc<AdminState>> for Reader {
    type Rejection = Response;
    async fn from_request_parts(parts: &mut Parts, api: &Arc<AdminState>) -> Result<Self, Response> {
        caller_of(api, parts, false).await.map(Reader)
    }
}

impl FromRequestParts<Arc<AdminState>> for Writer {
    type Rejection = Response;
    async fn from_request_parts(parts: &mut Parts, api: &Arc<AdminState>) -> Result<Self, Response> {
        caller_of(api, parts, true).await.map(Writer)
    }
}

/// A JSON request body, refused as [`json_body`] says. Extracted last, so
/// the caller is authenticated before a byte of the body is read.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AdminState>> for JsonBody<T> {
    type Rejection = Response;
    async fn from_request(req: axum::extract::Request, _: &Arc<AdminState>) -> Result<Self, Response> {
        json_body(req.into_body()).await.map(JsonBody)
    }
}

/// Reads a JSON body: 413 over the limit, 400 when it is not JSON, 422
/// naming the field when a field is missing, unknown or of the wrong type.
async fn json_body<T: DeserializeOwned>(body: Body) -> Result<T, Response> {
    let bytes = axum::body::to_bytes(body, super::MAX_BODY)
        .await
        .map_err(|_| api_error(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLarge, "request body too large", None))?;
    parse_json(&bytes).map_err(IntoResponse::into_response)
}

/// A request body that was refused.
#[derive(Debug)]
pub struct BodyError {
    status: StatusCode,
    error: ErrorCode,
    message: String,
    field: Option<String>,
}

impl IntoResponse for BodyError {
    fn into_response(self) -> Response {
        api_error(self.status, self.error, &self.message, self.field.as_deref())
    }
}

/// The JSON parse of [`json_body`].
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, BodyError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize::<_, T>(de).map_err(|e| {
        let inner = e.inner();
        if inner.is_syntax() || inner.is_eof() {
            return BodyError {
                status: StatusCode::BAD_REQUEST,
                error: ErrorCode::BadRequest,
                message: "body is not JSON".into(),
                field: None,
            };
        }
        let message = inner.to_string();
        let field = field_of(&e.path().to_string(), &message);
        BodyError { status: StatusCode::UNPROCESSABLE_ENTITY, error: ErrorCode::Invalid, message, field: Some(field) }
    })
}

/// The field an error is about: the path to it, else (a missing field at
/// the top) the field the message names between backticks.
fn field_of(path: &str, message: &str) -> String {
    if !path.is_empty() && path != "." {
        return path.to_string();
    }
    let named = (message.starts_with("unknown field") || message.starts_with("missing field"))
        .then(|| message.split('`').nth(1))
        .flatten();
    named.unwrap_or_default().to_string()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// The node's summary from its stored record, this server's registry and
/// the cluster's tunnel lists.
pub fn node_summary(api: &AdminState, n: &NodeRecord) -> NodeSummary {
    use std::sync::atomic::Ordering::Relaxed;
    let members = api.shared.cluster.members();
    let servers: Vec<String> =
        members.live().filter(|s| s.tunnels.iter().any(|t| t == &n.name)).map(|s| s.record.name.clone()).collect();
    let handle = api.shared.registry.node(&n.name);
    let tunnels = handle.as_ref().map_or(0, |h| h.tunnel_count());
    let m = handle.as_ref().map(|h| &h.metrics);
    // This server's live view of the agent first; the store's (written
    // every few seconds by whichever server holds the tunnel) otherwise.
    let live = handle.as_ref().map(|h| h.status.lock().unwrap_or_else(|p| p.into_inner()).clone()).unwrap_or_default();
    NodeSummary {
        name: n.name.clone(),
        hostnames: n.hostnames.clone(),
        mode: handle.as_ref().map_or(n.mode, |h| h.current_mode()),
        endpoint: n.endpoint.clone(),
        http_mode: n.http_mode,
        connected: tunnels > 0 || !servers.is_empty() || n.status.connected,
        servers,
        tunnels,
        open_connections: m.map_or(0, |m| m.active.load(Relaxed)),
        total_connections: m.map_or(0, |m| m.total.load(Relaxed)),
        bytes_to_node: m.map_or(0, |m| m.bytes.tcp_to_quic.load(Relaxed)),
        bytes_from_node: m.map_or(0, |m| m.bytes.quic_to_tcp.load(Relaxed)),
        last_heartbeat: live.last_heartbeat.or(n.status.last_heartbeat),
        cert_not_after: live.cert_not_after.or(n.status.cert_not_after),
        agent_version: live.agent_version.or_else(|| n.status.agent_version.clone()),
        remote_addr: live.remote_addr.or_else(|| n.status.remote_addr.clone()),
        created_at: n.created_at,
    }
}

/// A node in full.
pub async fn node_detail(api: &AdminState, name: &str) -> Result<Option<NodeDetail>, OpError> {
    let Some(n) = api.shared.store.get_node(name).await? else {
        return Ok(None);
    };
    let history = api.shared.store.mode_history(name, 20).await?;
    // This server's live report first, else what the store last recorded.
    let live_routes =
        api.shared.registry.node(name).and_then(|h| h.status.lock().unwrap_or_else(|p| p.into_inner()).routes.clone());
    let routes = live_routes.or_else(|| n.status.routes.clone()).unwrap_or_default();
    Ok(Some(NodeDetail {
        summary: node_summary(api, &n),
        mode_since: history.since,
        transitions: history
            .transitions
            .into_iter()
            .map(|t| Transition { at: t.at, from: t.from, to: t.to, reason: t.reason })
            .collect(),
        probes: history
            .samples
            .into_iter()
            .map(|s| Probe { at: s.at, endpoint: s.endpoint, ok: s.ok, detail: s.detail })
            .collect(),
        routes,
    }))
}

async fn list_nodes(State(api): State<Arc<AdminState>>, _: Reader) -> Result<Response, OpError> {
    let nodes = api.shared.store.list_nodes().await?;
    Ok(Json(nodes.iter().map(|n| node_summary(&api, n)).collect::<Vec<_>>()).into_response())
}

async fn get_node(
    State(api): State<Arc<AdminState>>,
    _: Reader,
    Path(name): Path<String>,
) -> Result<Response, OpError> {
    match node_detail(&api, &name).await? {
        Some(d) => Ok(Json(d).into_response()),
        None => Err(OpError::NotFound(format!("no node named {name:?}"))),
    }
}

async fn create_node(
    State(api): State<Arc<AdminState>>,
    Writer(c): Writer,
    JsonBody(req): JsonBody<CreateNode>,
) -> Result<Response, OpError> {
    let created = api.ops.create_node(&c.actor, &req.name).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn remove_node(
    State(api): State<Arc<AdminState>>,
    Writer(c): Writer,
    Path(name): Path<String>,
) -> Result<StatusCode, OpError> {
    api.ops.remove_node(&c.actor, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn rotate_token(
    State(api): State<Arc<AdminState>>,
    Writer(c): Writer,
    Path(name): Path<String>,
) -> Result<Response, OpError> {
    Ok(Json(api.ops.rotate_token(&c.actor, &name).await?).into_response())
}

async fn set_http_mode(
    State(api): State<Arc<AdminState>>,
    Writer(c): Writer,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<SetHttpMode>,
) -> Result<StatusCode, OpError> {
    api.ops.set_http_mode(&c.actor, &name, req.mode).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_dns(State(api): State<Arc<AdminState>>, _: Reader) -> Result<Response, OpError> {
    let records = api.shared.store.list_dns_records().await?;
    let records: Vec<DnsRecord> = records
        .into_iter()
        .map(|r| DnsRecord { name: r.name, kind: r.kind, value: r.value, ttl: r.ttl_secs })
        .collect();
    Ok(Json(records).into_response())
}

async fn create_dns(
    State(api): State<Arc<AdminState>>,
    Writer(c): Writer,
    JsonBody(req): JsonBody<DnsRecord>,
) -> Result<Response, OpError> {
    let r = api.ops.add_dns_record(&c.actor, &req.name, req.kind, &req.value, req.ttl).await?;
    let body = DnsRecord { name: r.name, kind: r.kind, value: r.value, ttl: r.ttl_secs };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn list_domains(State(api): State<Arc<AdminState>>, _: Reader) -> Result<Response, OpError> {
    let zone = api.shared.config.zone();
    let domains = api.shared.store.list_domains().await?;
    let views: Vec<_> = domains.iter().map(|d| crate::domains::view(d, zone)).collect();
    Ok(Json(views).into_response())
}

async fn create_domain(
    State(api): State<Arc<AdminState>>,
    Writer(c): Writer,
    JsonBody(req): JsonBody<edge_proto::domains::CreateDomain>,
) -> Result<Response, OpError> {
    let d = api.ops.add_domain(&c.actor, &req.name, &req.node).await?;
    Ok((StatusCode::CREATED, Json(crate::domains::view(&d, api.shared.config.zone()))).into_response())
}

async fn remove_domain(
    State(api): State<Arc<AdminState>>,
    Writer(c): Writer,
    Path(name): Path<String>,
) -> Result<StatusCode, OpError> {
    api.ops.remove_domain(&c.actor, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_services(State(api): State<Arc<AdminState>>, _: Reader) -> Result<Response, OpError> {
    Ok(Json(api.shared.store.list_services().await?).into_response())
}

async fn create_service(
    State(api): State<Arc<AdminState>>,
    Writer(c): Writer,
    JsonBody(req): JsonBody<edge_proto::admin::CreateService>,
) -> Result<Response, OpError> {
    let record = api.ops.add_service(&c.actor, &req.name, &req.node, &req.listen, &req.target).await?;
    Ok((StatusCode::CREATED, Json(record)).into_response())
}

async fn remove_service(
    State(api): State<Arc<AdminState>>,
    Writer(c): Writer,
    Path(name): Path<String>,
) -> Result<StatusCode, OpError> {
    api.ops.remove_service(&c.actor, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_access(State(api): State<Arc<AdminState>>, _: Reader) -> Result<Response, OpError> {
    Ok(Json(api.shared.store.list_access().await?).into_response())
}

fn scope_of(key: &str) -> Result<edge_proto::access::Scope, OpError> {
    edge_proto::access::Scope::parse(key).ok_or_else(|| OpError::Invalid {
        field: "scope",
        reason: format!("{:?} is not node:NAME, host:NAME or service:NAME", key.chars().take(80).collect::<String>()),
    })
}

async fn set_access(
    State(api): State<Arc<AdminState>>,
    Writer(c): Writer,
    Path(scope): Path<String>,
    JsonBody(policy): JsonBody<edge_proto::access::Policy>,
) -> Result<StatusCode, OpError> {
    let scope = scope_of(&scope)?;
    let policy = edge_proto::access::Policy::new(policy.rules, policy.default)
        .map_err(|e| OpError::Invalid { field: "rules", reason: e.to_string() })?;
    api.ops.set_access(&c.actor, &scope, policy).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn clear_access(
    State(api): State<Arc<AdminState>>,
    Writer(c): Writer,
    Path(scope): Path<String>,
) -> Result<StatusCode, OpError> {
    api.ops.clear_access(&c.actor, &scope_of(&scope)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /api/v1/dns/records?name=...&kind=...&value=...`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSelector {
    /// Name (relative, `@` or absolute).
    pub name: String,
    /// Only this type.
    pub kind: Option<StaticKind>,
    /// Only this value.
    pub value: Option<String>,
}

async fn delete_dns(
    State(api): State<Arc<AdminState>>,
    Writer(c): Writer,
    query: Result<Query<DnsSelector>, axum::extract::rejection::QueryRejection>,
) -> Result<StatusCode, OpError> {
    let Ok(Query(sel)) = query else {
        return Err(OpError::Invalid {
            field: "name",
            reason: "query must be name=..., and optionally kind=A|AAAA|TXT|CAA and value=...".into(),
        });
    };
    api.ops.remove_dns_records(&c.actor, &sel.name, sel.kind, sel.value.as_deref()).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The cluster's servers.
pub async fn servers(api: &AdminState) -> Result<Vec<ServerSummary>, crate::store::StoreError> {
    let list = api.shared.store.list_servers().await?;
    let decider = api.shared.store.lease(crate::store::MODE_DECIDER).await?.filter(|l| l.left_ms >= 0);
    Ok(list
        .servers
        .into_iter()
        .map(|s| ServerSummary {
            decider: decider.as_ref().is_some_and(|d| d.holder == s.record.id),
            id: s.record.id,
            name: s.record.name,
            alive: s.alive,
            lease_left_ms: s.lease_left_ms,
            quic: s.record.quic,
            api: s.record.api,
            version: s.record.version,
            tunnels: s.tunnels,
            started_at: s.started_at,
        })
        .collect())
}

async fn list_servers(State(api): State<Arc<AdminState>>, _: Reader) -> Result<Response, OpError> {
    Ok(Json(servers(&api).await?).into_response())
}

async fn remove_server(
    State(api): State<Arc<AdminState>>,
    Writer(c): Writer,
    Path(id): Path<String>,
) -> Result<StatusCode, OpError> {
    api.ops.remove_server(&c.actor, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/v1/audit` filters.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditFilter {
    /// Only this actor (`user:alice`, `token:ci`).
    pub actor: Option<String>,
    /// Only this action (`node.create`).
    pub action: Option<String>,
    /// Only this target.
    pub target: Option<String>,
    /// Only at or after this Unix time.
    pub since: Option<i64>,
    /// The next page: entries older than this id.
    pub before: Option<i64>,
    /// Page size, 1 to 500 (default 100).
    pub limit: Option<usize>,
}

/// Largest audit page.
pub const MAX_AUDIT_PAGE: usize = 500;

/// One page of the audit log.
pub async fn audit_page(api: &AdminState, f: AuditFilter) -> Result<AuditPage, OpError> {
    let limit = f.limit.unwrap_or(100);
    if !(1..=MAX_AUDIT_PAGE).contains(&limit) {
        return Err(OpError::Invalid { field: "limit", reason: format!("must be 1 to {MAX_AUDIT_PAGE}") });
    }
    // Empty filters (a form's blank fields) filter nothing.
    let empty = |s: Option<String>| s.filter(|v| !v.is_empty());
    let (actor, action, target) = (empty(f.actor), empty(f.action), empty(f.target));
    if let Some(a) = &action {
        if AuditAction::parse(a).is_none() {
            return Err(OpError::Invalid { field: "action", reason: format!("{a:?} is not an audit action") });
        }
    }
    let q = AuditQuery { actor, action, target, since: f.since, before_id: f.before, limit };
    let entries = api.shared.store.query_audit(&q).await?;
    let next_before = (entries.len() == limit).then(|| entries.last().map(|e| e.id)).flatten();
    Ok(AuditPage { entries, next_before })
}

async fn audit(
    State(api): State<Arc<AdminState>>,
    _: Reader,
    query: Result<Query<AuditFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, OpError> {
    let Ok(Query(filter)) = query else {
        return Err(OpError::Invalid {
            field: "query",
            reason: "filters: actor, action, target, since, before, limit".into(),
        });
    };
    Ok(Json(audit_page(&api, filter).await?).into_response())
}

async fn list_users(State(api): State<Arc<AdminState>>, _: Writer) -> Result<Response, OpError> {
    let users = api.shared.store.list_users().await?;
    Ok(Json(users.into_iter().map(|u| UserSummary { name: u.name, created_at: u.created_at }).collect::<Vec<_>>())
        .into_response())
}

async fn create_user(
    State(api): State<Arc<AdminState>>,
    Writer(c): Writer,
    JsonBody(req): JsonBody<CreateUser>,
) -> Result<Response, OpError> {
    api.ops.add_user(&c.actor, &req.name, &req.password).await?;
    Ok((StatusCode::CREATED, Json(UserSummary { name: req.name, created_at: crate::unix_now() })).into_response())
}

async fn remove_user(
    State(api): State<Arc<AdminState>>,
    Writer(c): Writer,
    Path(name): Path<String>,
) -> Result<StatusCode, OpError> {
    api.ops.remove_user(&c.actor, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_tokens(State(api): State<Arc<AdminState>>, _: Writer) -> Result<Response, OpError> {
    let tokens = api.shared.store.list_api_tokens().await?;
    Ok(Json(tokens.into_iter().map(token_summary).collect::<Vec<_>>()).into_response())
}

/// A token as listed.
pub fn token_summary(t: crate::store::ApiTokenRecord) -> TokenSummary {
    TokenSummary {
        name: t.name,
        scope: t.scope,
        created_at: t.created_at,
        last_used: t.last_used,
        created_by: t.created_by,
    }
}

async fn create_token(
    State(api): State<Arc<AdminState>>,
    Writer(c): Writer,
    JsonBody(req): JsonBody<CreateToken>,
) -> Result<Response, OpError> {
    let made = api.ops.add_token(&c.actor, &req.name, req.scope).await?;
    Ok((StatusCode::CREATED, Json(made)).into_response())
}

async fn remove_token(
    State(api): State<Arc<AdminState>>,
    Writer(c): Writer,
    Path(name): Path<String>,
) -> Result<StatusCode, OpError> {
    api.ops.remove_token(&c.actor, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Why a login failed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// Wrong user or password (401).
    #[error("wrong user name or password")]
    Wrong,
    /// Too many failures from the source or for the user (429).
    #[error("too many failed logins; wait a minute")]
    Limited,
    /// Too many logins are being checked at once (503).
    #[error("too many logins at once; retry in a moment")]
    Busy,
    /// The store or the hasher failed (logged; 503).
    #[error("login is unavailable now; retry later")]
    Failed,
}

/// Argon2 runs at once; more logins wait their turn briefly, then get
/// 503 (each run takes 19 MiB and a blocking thread).
const HASHING_AT_ONCE: usize = 4;
/// How long a login waits for a hashing slot.
const HASHING_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

static HASHING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(HASHING_AT_ONCE);

/// Checks a login and opens a session; returns the cookie value.
pub async fn log_in(
    api: &AdminState,
    source: std::net::IpAddr,
    user: &str,
    password: &str,
) -> Result<String, LoginError> {
    if !api.limiter.begin(source, user, Instant::now()) {
        return Err(LoginError::Limited);
    }
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        tracing::error!(error = %e, "login failed: {what}");
        LoginError::Failed
    };
    let record = api.shared.store.get_user(user).await.map_err(|e| failed("store", &e))?;
    let stored = record.as_ref().map_or_else(|| super::passwords::decoy().to_string(), |u| u.password_hash.clone());
    let password = password.to_string();
    let Ok(Ok(_slot)) = tokio::time::timeout(HASHING_WAIT, HASHING.acquire()).await else {
        return Err(LoginError::Busy);
    };
    let ok = tokio::task::spawn_blocking(move || super::passwords::verify(&password, &stored))
        .await
        .map_err(|e| failed("hashing task", &e))?
        .map_err(|e| failed("stored hash", &e))?;
    if !ok || record.is_none() {
        tracing::info!(peer = %source, user = %edge_net::logging::Untrusted(user), "failed login");
        return Err(LoginError::Wrong);
    }
    api.limiter.succeeded(source, user);
    let (value, id_hash) = auth::new_session_id();
    let t = crate::unix_now();
    let session = crate::store::SessionRecord { id_hash, user: user.to_string(), created_at: t, last_seen: t };
    api.shared
        .store
        .add_session(&session, t - api.config.session_idle_secs as i64, t - api.config.session_max_secs as i64)
        .await
        .map_err(|e| failed("store", &e))?;
    let actor = super::ops::Actor { who: format!("user:{user}"), source: source.to_string() };
    api.ops.session_event(&actor, AuditAction::Login, user).await;
    Ok(value)
}

async fn login(
    State(api): State<Arc<AdminState>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // A login changes state: it must come from an allowed origin when a
    // browser sends it (automation has no Origin and uses tokens anyway).
    if headers.contains_key(header::ORIGIN) && !auth::origin_allowed(&headers, &api.config) {
        return AuthError::Origin.into_response();
    }
    let req: Login = match json_body(body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    match log_in(&api, peer.0, &req.user, &req.password).await {
        Ok(value) => {
            let info = SessionInfo {
                user: req.user,
                csrf_token: auth::csrf_token(&value),
                idle_timeout_secs: api.config.session_idle_secs,
            };
            ([(header::SET_COOKIE, auth::session_cookie(&value, api.config.session_max_secs))], Json(info))
                .into_response()
        }
        Err(e) => login_error(e),
    }
}

/// The answer to a failed login.
pub fn login_error(e: LoginError) -> Response {
    let m = e.to_string();
    match e {
        LoginError::Wrong => api_error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, &m, None),
        LoginError::Limited => api_error(StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited, &m, None),
        LoginError::Failed | LoginError::Busy => {
            api_error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, &m, None)
        }
    }
}

async fn session_info(State(api): State<Arc<AdminState>>, Reader(c): Reader) -> Response {
    let Some(s) = c.session else {
        return api_error(StatusCode::NOT_FOUND, ErrorCode::NotFound, "a token has no session", None);
    };
    Json(SessionInfo { user: s.user, csrf_token: s.csrf, idle_timeout_secs: api.config.session_idle_secs })
        .into_response()
}

/// Logging out changes state: with a cookie it needs the CSRF checks,
/// which [`Reader`] applies to every method but GET.
async fn logout(State(api): State<Arc<AdminState>>, Reader(c): Reader) -> Response {
    let Some(s) = c.session else {
        return api_error(StatusCode::NOT_FOUND, ErrorCode::NotFound, "a token has no session", None);
    };
    end_session(&api, &c.actor, &s).await;
    ([(header::SET_COOKIE, auth::cleared_cookie())], StatusCode::NO_CONTENT).into_response()
}

/// Ends a session (logout).
pub async fn end_session(api: &AdminState, actor: &super::ops::Actor, s: &auth::Session) {
    if let Err(e) = api.shared.store.remove_session(&s.id_hash).await {
        tracing::warn!(error = %e, "could not remove a session at logout");
    }
    api.ops.session_event(actor, AuditAction::Logout, &s.user).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_of_errors() {
        assert_eq!(field_of("extra", "unknown field `extra`, expected `name`"), "extra");
        assert_eq!(field_of(".", "missing field `name`"), "name");
        assert_eq!(field_of("mode", "unknown variant `x`, expected one of"), "mode");
        assert_eq!(field_of("ttl", "invalid type: string"), "ttl");
    }

    #[test]
    fn the_document_names_every_route_and_no_other() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let mut documented = Vec::new();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for method in ops.as_object().unwrap().keys() {
                documented.push((method.clone(), path.clone()));
            }
        }
        let mut routed: Vec<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
        documented.sort();
        routed.sort();
        assert_eq!(documented, routed);
        assert_eq!(doc["openapi"], "3.1.0");
    }
}
