//! The web dashboard: server-rendered HTML pages under `/ui`, a small
//! script and a stylesheet embedded in the binary (`/assets`). Forms post
//! back to `/ui` with the session's CSRF token; every change goes through
//! [`super::ops`], so it is validated and audited as in the API.
//!
//! No inline script or style: the Content-Security-Policy forbids them.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use edge_proto::admin::{JoinCredentials, TokenScope};
use serde::Deserialize;

use super::auth::{self, AuthError, Caller};
use super::ops::OpError;
use super::v1::{self, AuditFilter, LoginError};
use super::AdminState;
use crate::api::Peer;
use crate::store::{HttpMode, StaticKind};

const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");

/// The dashboard's routes.
pub fn router() -> Router<Arc<AdminState>> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/nodes") }))
        .route("/ui", get(|| async { Redirect::to("/ui/nodes") }))
        .route("/assets/app.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], SCRIPT) }))
        .route("/assets/app.css", get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE) }))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/nodes", get(nodes_page).post(create_node))
        .route("/ui/nodes/new", get(new_node_page))
        .route("/ui/nodes/{name}", get(node_page))
        .route("/ui/nodes/{name}/rotate", post(rotate))
        .route("/ui/nodes/{name}/remove", post(remove))
        .route("/ui/nodes/{name}/http-mode", post(http_mode))
        .route("/ui/dns", get(dns_page).post(add_dns))
        .route("/ui/dns/delete", post(delete_dns))
        .route("/ui/domains", get(domains_page).post(add_domain))
        .route("/ui/domains/remove", post(remove_domain))
        .route("/ui/servers", get(servers_page))
        .route("/ui/access", get(access_page))
        .route("/ui/users", post(add_user))
        .route("/ui/users/remove", post(remove_user))
        .route("/ui/tokens", post(add_token))
        .route("/ui/tokens/remove", post(remove_token))
        .route("/ui/audit", get(audit_page))
}

/// HTML-escapes text for element content and quoted attributes.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn time(t: Option<i64>) -> String {
    t.map_or_else(|| "—".to_string(), edge_certs::format_unix)
}

/// A whole page around `body`, with the navigation when logged in.
fn page(title: &str, session: Option<&auth::Session>, body: &str) -> Html<String> {
    let mut nav = String::new();
    if let Some(s) = session {
        let _ = write!(
            nav,
            r#"<nav aria-label="main"><a href="/ui/nodes">Nodes</a><a href="/ui/nodes/new">Add node</a><a href="/ui/dns">DNS</a><a href="/ui/domains">Domains</a><a href="/ui/servers">Servers</a><a href="/ui/access">Users &amp; tokens</a><a href="/ui/audit">Audit log</a>
<form method="post" action="/ui/logout" class="inline"><input type="hidden" name="csrf" value="{}"><button type="submit" id="logout">Log out {}</button></form></nav>"#,
            esc(&s.csrf),
            esc(&s.user)
        );
    }
    Html(format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>{t} · edge</title><link rel="stylesheet" href="/assets/app.css"><script src="/assets/app.js" defer></script></head>
<body><header><strong class="brand">edge</strong>{nav}</header><main><h1>{t}</h1>{body}</main></body></html>"#,
        t = esc(title)
    ))
}

fn csrf_field(s: &auth::Session) -> String {
    format!(r#"<input type="hidden" name="csrf" value="{}">"#, esc(&s.csrf))
}

fn error_page(status: StatusCode, session: Option<&auth::Session>, message: &str) -> Response {
    let body =
        format!(r#"<p class="error" role="alert">{}</p><p><a href="/ui/nodes">Back to nodes</a></p>"#, esc(message));
    (status, page("Error", session, &body)).into_response()
}

/// The session of a page request; a redirect to the login page without
/// one, a 403 page when a form fails the CSRF or origin check.
async fn session(
    api: &AdminState,
    method: &Method,
    headers: &HeaderMap,
    peer: Peer,
    form_csrf: Option<&str>,
) -> Result<(Caller, auth::Session), Response> {
    let req = auth::Request { method, headers, source: peer.0, form_csrf: Some(form_csrf.unwrap_or("")) };
    // Pages take only the cookie: a bearer token is for the API.
    if headers.contains_key(header::AUTHORIZATION) {
        return Err(error_page(StatusCode::UNAUTHORIZED, None, "the dashboard takes a session, not a token"));
    }
    match auth::authenticate(api.shared.store.as_ref(), &api.shared, &api.config, &req).await {
        Ok(c) => match c.session.clone() {
            Some(s) => Ok((c, s)),
            None => Err(Redirect::to("/ui/login").into_response()),
        },
        Err(AuthError::Missing) => Err(Redirect::to("/ui/login").into_response()),
        Err(e @ (AuthError::Origin | AuthError::Csrf | AuthError::Scope(_))) => {
            Err(error_page(StatusCode::FORBIDDEN, None, &e.to_string()))
        }
        Err(e) => Err(error_page(StatusCode::SERVICE_UNAVAILABLE, None, &e.to_string())),
    }
}

/// A page request with its session (GET: no CSRF check needed).
struct Page(auth::Session);

impl FromRequestParts<Arc<AdminState>> for Page {
    type Rejection = Response;
    async fn from_request_parts(parts: &mut Parts, api: &Arc<AdminState>) -> Result<Self, Response> {
        let peer = parts.extensions.get::<Peer>().copied().unwrap_or(Peer(std::net::IpAddr::from([0, 0, 0, 0])));
        session(api, &parts.method, &parts.headers, peer, None).await.map(|(_, s)| Page(s))
    }
}

/// The CSRF token of a posted form.
#[derive(Deserialize)]
struct CsrfField {
    csrf: Option<String>,
}

/// A posted form, authenticated with its session and its CSRF token.
struct Posted<T>(Caller, auth::Session, T);

impl<T: serde::de::DeserializeOwned + Send> FromRequest<Arc<AdminState>> for Posted<T> {
    type Rejection = Response;
    async fn from_request(req: axum::extract::Request, api: &Arc<AdminState>) -> Result<Self, Response> {
        let (parts, body) = req.into_parts();
        let bytes = axum::body::to_bytes(body, super::MAX_BODY)
            .await
            .map_err(|_| error_page(StatusCode::PAYLOAD_TOO_LARGE, None, "form too large"))?;
        let field = |bytes: &axum::body::Bytes| {
            axum::http::Request::from_parts(parts.clone(), axum::body::Body::from(bytes.clone()))
        };
        let Form(CsrfField { csrf }) = Form::<CsrfField>::from_request(field(&bytes), api)
            .await
            .map_err(|e| error_page(StatusCode::BAD_REQUEST, None, &e.body_text()))?;
        let peer = parts.extensions.get::<Peer>().copied().unwrap_or(Peer(std::net::IpAddr::from([0, 0, 0, 0])));
        let (c, s) = session(api, &parts.method, &parts.headers, peer, csrf.as_deref()).await?;
        let Form(form) = Form::<T>::from_request(field(&bytes), api)
            .await
            .map_err(|e| error_page(StatusCode::UNPROCESSABLE_ENTITY, Some(&s), &e.body_text()))?;
        Ok(Posted(c, s, form))
    }
}

fn op_error(e: OpError, s: &auth::Session) -> Response {
    let status = match &e {
        OpError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        OpError::Conflict { .. } => StatusCode::CONFLICT,
        OpError::NotFound(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    error_page(status, Some(s), &e.to_string())
}

fn see_other(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_string())]).into_response()
}

async fn login_page() -> Response {
    login_form(StatusCode::OK, None)
}

fn login_form(status: StatusCode, error: Option<&str>) -> Response {
    let error =
        error.map_or(String::new(), |e| format!(r#"<p class="error" role="alert" id="login-error">{}</p>"#, esc(e)));
    let body = format!(
        r#"{error}<form method="post" action="/ui/login" class="card">
<label for="user">User name</label><input id="user" name="user" autocomplete="username" required>
<label for="password">Password</label><input id="password" name="password" type="password" autocomplete="current-password" required>
<button type="submit" id="login">Log in</button></form>"#
    );
    (status, page("Log in", None, &body)).into_response()
}

/// The login form.
#[derive(Deserialize)]
struct LoginForm {
    user: String,
    password: String,
}

async fn login(
    State(api): State<Arc<AdminState>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    if !auth::origin_allowed(&headers, &api.config) {
        return error_page(StatusCode::FORBIDDEN, None, "cross-origin request refused");
    }
    match v1::log_in(&api, peer.0, &form.user, &form.password).await {
        Ok(value) => {
            let cookie = auth::session_cookie(&value, api.config.session_max_secs);
            (StatusCode::SEE_OTHER, [(header::SET_COOKIE, cookie), (header::LOCATION, "/ui/nodes".to_string())])
                .into_response()
        }
        Err(e @ LoginError::Wrong) => login_form(StatusCode::UNAUTHORIZED, Some(&e.to_string())),
        Err(e @ LoginError::Limited) => login_form(StatusCode::TOO_MANY_REQUESTS, Some(&e.to_string())),
        Err(e) => login_form(StatusCode::SERVICE_UNAVAILABLE, Some(&e.to_string())),
    }
}

/// A form with nothing but its CSRF token.
#[derive(Deserialize)]
struct CsrfForm {}

async fn logout(State(api): State<Arc<AdminState>>, Posted(c, s, _): Posted<CsrfForm>) -> Response {
    v1::end_session(&api, &c.actor, &s).await;
    (StatusCode::SEE_OTHER, [(header::SET_COOKIE, auth::cleared_cookie()), (header::LOCATION, "/ui/login".into())])
        .into_response()
}

async fn nodes_page(State(api): State<Arc<AdminState>>, Page(s): Page) -> Response {
    let nodes = match api.shared.store.list_nodes().await {
        Ok(n) => n,
        Err(e) => return error_page(StatusCode::SERVICE_UNAVAILABLE, Some(&s), &e.to_string()),
    };
    let mut rows = String::new();
    for n in &nodes {
        let v = v1::node_summary(&api, n);
        let _ = write!(
            rows,
            r#"<tr id="node-{id}" data-node="{id}" data-connected="{conn}"><td data-label="Name"><a href="/ui/nodes/{id}">{id}</a></td><td data-f="servers" data-label="Connected to">{servers}</td><td data-f="mode" data-label="Mode">{mode}</td><td data-f="cert" data-label="Certificate expires">{cert}</td><td data-f="open" data-label="Open connections">{open}</td><td data-f="rate" data-label="Traffic">—</td></tr>"#,
            id = esc(&v.name),
            conn = v.connected,
            servers = if v.servers.is_empty() { "—".to_string() } else { esc(&v.servers.join(", ")) },
            mode = v.mode,
            cert = esc(&time(v.cert_not_after)),
            open = v.open_connections,
        );
    }
    let body = format!(
        r#"<p><a class="button" href="/ui/nodes/new">Add node</a></p><div class="scroll"><table id="nodes" data-live="/api/v1/nodes"><caption>Nodes (updated every second)</caption><thead><tr><th scope="col">Name</th><th scope="col">Connected to</th><th scope="col">Mode</th><th scope="col">Certificate expires</th><th scope="col">Open connections</th><th scope="col">Traffic</th></tr></thead><tbody>{rows}</tbody></table></div>{empty}"#,
        empty = if nodes.is_empty() { r#"<p id="no-nodes">No nodes yet.</p>"# } else { "" }
    );
    page("Nodes", Some(&s), &body).into_response()
}

async fn new_node_page(State(api): State<Arc<AdminState>>, Page(s): Page) -> Response {
    let body = format!(
        r#"<form method="post" action="/ui/nodes" class="card">{csrf}<label for="name">Node name (one DNS label: a-z, 0-9, -)</label><input id="name" name="name" required pattern="[a-z0-9]([a-z0-9\-]*[a-z0-9])?" maxlength="63"><p class="hint">The node owns NAME.{zone} and *.NAME.{zone}.</p><button type="submit" id="create">Create node</button></form>"#,
        csrf = csrf_field(&s),
        zone = esc(api.shared.config.zone())
    );
    page("Add node", Some(&s), &body).into_response()
}

/// The add-node form.
#[derive(Deserialize)]
struct NameForm {
    name: String,
}

fn credentials_page(title: &str, s: &auth::Session, c: &JoinCredentials, note: &str) -> Response {
    let body = format!(
        r#"<p class="notice" role="status">{note}</p><p>Shown once: the server keeps only a hash of the token.</p>
<h2>Join string</h2><pre id="join">{join}</pre><button type="button" data-copy="join">Copy join string</button>
<h2>Agent command</h2><pre id="agent-command">{cmd}</pre><button type="button" data-copy="agent-command">Copy command</button>
<p>Names: {names}</p><p><a href="/ui/nodes/{name}">Open the node's page</a></p>"#,
        note = esc(note),
        join = esc(&c.join),
        cmd = esc(&c.agent_command),
        names = esc(&c.hostnames.join(", ")),
        name = esc(&c.name),
    );
    page(title, Some(s), &body).into_response()
}

async fn create_node(State(api): State<Arc<AdminState>>, Posted(c, s, form): Posted<NameForm>) -> Response {
    match api.ops.create_node(&c.actor, &form.name).await {
        Ok(creds) => {
            let note = format!("Created node {}.", creds.name);
            credentials_page("Node created", &s, &creds, &note)
        }
        Err(e) => op_error(e, &s),
    }
}

async fn node_page(State(api): State<Arc<AdminState>>, Path(name): Path<String>, Page(s): Page) -> Response {
    let d = match v1::node_detail(&api, &name).await {
        Ok(Some(d)) => d,
        Ok(None) => return error_page(StatusCode::NOT_FOUND, Some(&s), &format!("no node named {name:?}")),
        Err(e) => return op_error(e, &s),
    };
    let n = &d.summary;
    let id = esc(&n.name);
    let mut timeline = String::new();
    for t in &d.transitions {
        let _ = write!(
            timeline,
            "<li><time>{}</time> <strong>{} -&gt; {}</strong> {}</li>",
            esc(&time(Some(t.at))),
            t.from,
            t.to,
            esc(&t.reason)
        );
    }
    let mut probes = String::new();
    for p in &d.probes {
        let _ = write!(
            probes,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&time(Some(p.at))),
            esc(&p.endpoint),
            if p.ok { "ok" } else { "failed" },
            esc(&p.detail)
        );
    }
    if probes.is_empty() {
        let why = if n.endpoint.is_none() { "the node declared no endpoint for direct mode" } else { "none yet" };
        let _ = write!(probes, r#"<tr><td colspan="4">No probes: {why}.</td></tr>"#);
    }
    let mut routes = String::new();
    for r in &d.routes {
        let ups: Vec<String> = r
            .upstreams
            .iter()
            .map(|u| {
                format!("{} {} ({})", esc(&u.addr), if u.up { "up" } else { "<strong>down</strong>" }, esc(&u.check))
            })
            .collect();
        let _ = write!(routes, "<tr><td>{}</td><td>{}</td><td>{}</td></tr>", esc(&r.host), r.mode, ups.join(", "));
    }
    if routes.is_empty() {
        routes.push_str(r#"<tr><td colspan="3">Not reported yet.</td></tr>"#);
    }
    let select = |m: HttpMode| if n.http_mode == m { " selected" } else { "" };
    let csrf = csrf_field(&s);
    let body = format!(
        r#"<section class="card"><dl>
<dt>Names</dt><dd id="hostnames">{hostnames}</dd>
<dt>Mode</dt><dd id="mode">{mode} (since {since})</dd>
<dt>Endpoint</dt><dd>{endpoint}</dd>
<dt>Tunnels</dt><dd id="tunnels">{tunnels} to this server; servers with a tunnel: {servers}</dd>
<dt>Certificate expires</dt><dd id="cert">{cert}</dd>
<dt>Agent</dt><dd>{agent} from {remote}, last heartbeat {hb}</dd>
<dt>Connections</dt><dd>{open} open, {total} in all; {to} bytes to the node, {from} from it (through this server)</dd>
</dl></section>
<h2>Routes</h2><div class="scroll"><table id="routes"><thead><tr><th scope="col">Host</th><th scope="col">Mode</th><th scope="col">Upstreams</th></tr></thead><tbody>{routes}</tbody></table></div>
<h2>Mode timeline</h2><ol id="timeline" class="timeline">{timeline}</ol>
<h2>Recent probes</h2><div class="scroll"><table id="probes"><thead><tr><th scope="col">When</th><th scope="col">Endpoint</th><th scope="col">Result</th><th scope="col">Detail</th></tr></thead><tbody>{probes}</tbody></table></div>
<h2>Plain HTTP</h2><form method="post" action="/ui/nodes/{id}/http-mode" class="card">{csrf}<label for="http-mode">On :80 in proxy mode</label><select id="http-mode" name="mode"><option value="redirect"{r}>redirect to HTTPS</option><option value="proxy"{p}>proxy to the agent</option></select><button type="submit" id="set-http-mode">Save</button></form>
<h2>Token</h2><form method="post" action="/ui/nodes/{id}/rotate" data-confirm="Issue a new token for {id}? The agent's current join string stops working." class="card">{csrf}<button type="submit" id="rotate">Rotate token</button></form>
<h2>Remove</h2><form method="post" action="/ui/nodes/{id}/remove" data-confirm="Remove node {id}? Its tunnels are cut and its names stop resolving." class="card">{csrf}<button type="submit" class="danger" id="remove">Remove node</button></form>"#,
        hostnames = esc(&n.hostnames.join(", ")),
        mode = n.mode,
        since = esc(&time(d.mode_since)),
        endpoint = esc(n.endpoint.as_deref().unwrap_or("none declared")),
        tunnels = n.tunnels,
        servers = if n.servers.is_empty() { "none".to_string() } else { esc(&n.servers.join(", ")) },
        cert = esc(&time(n.cert_not_after)),
        agent = esc(n.agent_version.as_deref().unwrap_or("unknown version")),
        remote = esc(n.remote_addr.as_deref().unwrap_or("—")),
        hb = esc(&time(n.last_heartbeat)),
        open = n.open_connections,
        total = n.total_connections,
        to = n.bytes_to_node,
        from = n.bytes_from_node,
        r = select(HttpMode::Redirect),
        p = select(HttpMode::Proxy),
    );
    page(&format!("Node {}", n.name), Some(&s), &body).into_response()
}

async fn rotate(
    State(api): State<Arc<AdminState>>,
    Path(name): Path<String>,
    Posted(c, s, _): Posted<CsrfForm>,
) -> Response {
    match api.ops.rotate_token(&c.actor, &name).await {
        Ok(creds) => {
            let note = format!("New token for {}; the old join string no longer works.", creds.name);
            credentials_page("Token rotated", &s, &creds, &note)
        }
        Err(e) => op_error(e, &s),
    }
}

async fn remove(
    State(api): State<Arc<AdminState>>,
    Path(name): Path<String>,
    Posted(c, s, _): Posted<CsrfForm>,
) -> Response {
    match api.ops.remove_node(&c.actor, &name).await {
        Ok(()) => see_other("/ui/nodes"),
        Err(e) => op_error(e, &s),
    }
}

/// The HTTP mode form.
#[derive(Deserialize)]
struct ModeForm {
    mode: String,
}

async fn http_mode(
    State(api): State<Arc<AdminState>>,
    Path(name): Path<String>,
    Posted(c, s, form): Posted<ModeForm>,
) -> Response {
    let Some(mode) = HttpMode::parse(&form.mode) else {
        return op_error(OpError::Invalid { field: "mode", reason: "redirect or proxy".into() }, &s);
    };
    match api.ops.set_http_mode(&c.actor, &name, mode).await {
        Ok(()) => see_other(&format!("/ui/nodes/{}", percent(&name))),
        Err(e) => op_error(e, &s),
    }
}

/// Percent-encodes a path segment (node names are labels; this is for
/// anything else).
fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn dns_page(State(api): State<Arc<AdminState>>, Page(s): Page) -> Response {
    let records = match api.shared.store.list_dns_records().await {
        Ok(r) => r,
        Err(e) => return error_page(StatusCode::SERVICE_UNAVAILABLE, Some(&s), &e.to_string()),
    };
    let csrf = csrf_field(&s);
    let mut rows = String::new();
    for (i, r) in records.iter().enumerate() {
        let _ = write!(
            rows,
            r#"<tr><td>{name}</td><td>{ttl}</td><td>{kind}</td><td>{value}</td><td><form method="post" action="/ui/dns/delete" data-confirm="Delete this record?">{csrf}<input type="hidden" name="name" value="{name}"><input type="hidden" name="kind" value="{kind}"><input type="hidden" name="value" value="{value}"><button type="submit" aria-label="Delete record {i}">Delete</button></form></td></tr>"#,
            name = esc(&r.name),
            ttl = r.ttl_secs,
            kind = r.kind,
            value = esc(&r.value),
        );
    }
    let body = format!(
        r#"<div class="scroll"><table id="records"><thead><tr><th scope="col">Name</th><th scope="col">TTL</th><th scope="col">Type</th><th scope="col">Value</th><th scope="col">Action</th></tr></thead><tbody>{rows}</tbody></table></div>
<h2>Add a record</h2><form method="post" action="/ui/dns" class="card">{csrf}<label for="rname">Name (relative to {zone}, or @)</label><input id="rname" name="name" required><label for="rkind">Type</label><select id="rkind" name="kind"><option>A</option><option>AAAA</option><option>TXT</option><option>CAA</option></select><label for="rvalue">Value</label><input id="rvalue" name="value" required><label for="rttl">TTL (seconds)</label><input id="rttl" name="ttl" type="number" min="0" max="86400" value="300"><button type="submit" id="add-record">Add record</button></form>"#,
        zone = esc(api.shared.config.zone())
    );
    page("DNS records", Some(&s), &body).into_response()
}

/// The DNS record forms.
#[derive(Deserialize)]
struct RecordForm {
    name: String,
    kind: String,
    value: String,
    ttl: Option<String>,
}

async fn add_dns(State(api): State<Arc<AdminState>>, Posted(c, s, form): Posted<RecordForm>) -> Response {
    let Some(kind) = StaticKind::parse(&form.kind) else {
        return op_error(OpError::Invalid { field: "kind", reason: "A, AAAA, TXT or CAA".into() }, &s);
    };
    let Ok(ttl) = form.ttl.as_deref().unwrap_or("300").parse::<u32>() else {
        return op_error(OpError::Invalid { field: "ttl", reason: "a number of seconds".into() }, &s);
    };
    match api.ops.add_dns_record(&c.actor, &form.name, kind, &form.value, ttl).await {
        Ok(_) => see_other("/ui/dns"),
        Err(e) => op_error(e, &s),
    }
}

async fn delete_dns(State(api): State<Arc<AdminState>>, Posted(c, s, form): Posted<RecordForm>) -> Response {
    let kind = StaticKind::parse(&form.kind);
    match api.ops.remove_dns_records(&c.actor, &form.name, kind, Some(&form.value)).await {
        Ok(_) => see_other("/ui/dns"),
        Err(e) => op_error(e, &s),
    }
}

async fn domains_page(State(api): State<Arc<AdminState>>, Page(s): Page) -> Response {
    let (domains, nodes) = match (api.shared.store.list_domains().await, api.shared.store.list_nodes().await) {
        (Ok(d), Ok(n)) => (d, n),
        (Err(e), _) | (_, Err(e)) => return error_page(StatusCode::SERVICE_UNAVAILABLE, Some(&s), &e.to_string()),
    };
    let zone = api.shared.config.zone();
    let csrf = csrf_field(&s);
    let mut rows = String::new();
    for d in &domains {
        let v = crate::domains::view(d, zone);
        let _ = write!(
            rows,
            r#"<tr id="domain-{name}" data-status="{status}"><td data-label="Domain">{name}</td><td data-label="Node"><a href="/ui/nodes/{node}">{node}</a></td><td data-label="Status">{status}</td><td data-label="Verified">{verified}</td><td data-label="Publish"><code>{vname} TXT "{value}"</code><br><code>{name} CNAME {target}</code></td><td data-label="Last error">{error}</td><td><form method="post" action="/ui/domains/remove" data-confirm="Remove {name}? No server routes it any more.">{csrf}<input type="hidden" name="name" value="{name}"><button type="submit" aria-label="Remove {name}">Remove</button></form></td></tr>"#,
            name = esc(&v.name),
            node = esc(&v.node),
            status = v.status,
            verified = time(v.state.verified_at),
            vname = esc(&v.verify_name),
            value = esc(&v.verify_value),
            target = esc(&v.cname_target),
            error = esc(v.state.last_error.as_deref().unwrap_or("")),
        );
    }
    let options: String = nodes.iter().map(|n| format!("<option>{}</option>", esc(&n.name))).collect();
    let body = format!(
        r#"<p class="hint">A customer's domain routes to its node once the TXT record shown is published in the customer's DNS; the agent then gets its certificate by TLS-ALPN-01.</p><div class="scroll"><table id="domains"><thead><tr><th scope="col">Domain</th><th scope="col">Node</th><th scope="col">Status</th><th scope="col">Verified</th><th scope="col">Publish</th><th scope="col">Last error</th><th scope="col">Action</th></tr></thead><tbody>{rows}</tbody></table></div>
<h2>Claim a domain</h2><form method="post" action="/ui/domains" class="card">{csrf}<label for="dname">Domain (outside {zone})</label><input id="dname" name="name" required maxlength="253"><label for="dnode">Node</label><select id="dnode" name="node">{options}</select><button type="submit" id="add-domain">Claim domain</button></form>"#,
        zone = esc(zone)
    );
    page("Domains", Some(&s), &body).into_response()
}

/// The domain claim form.
#[derive(Deserialize)]
struct DomainForm {
    name: String,
    node: String,
}

async fn add_domain(State(api): State<Arc<AdminState>>, Posted(c, s, form): Posted<DomainForm>) -> Response {
    match api.ops.add_domain(&c.actor, &form.name, &form.node).await {
        Ok(_) => see_other("/ui/domains"),
        Err(e) => op_error(e, &s),
    }
}

async fn remove_domain(State(api): State<Arc<AdminState>>, Posted(c, s, form): Posted<NameForm>) -> Response {
    match api.ops.remove_domain(&c.actor, &form.name).await {
        Ok(()) => see_other("/ui/domains"),
        Err(e) => op_error(e, &s),
    }
}

async fn servers_page(State(api): State<Arc<AdminState>>, Page(s): Page) -> Response {
    let servers = match v1::servers(&api).await {
        Ok(v) => v,
        Err(e) => return error_page(StatusCode::SERVICE_UNAVAILABLE, Some(&s), &e.to_string()),
    };
    let mut rows = String::new();
    for v in &servers {
        let _ = write!(
            rows,
            "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&v.name),
            esc(&v.id),
            if v.alive { "live" } else { "gone" },
            v.lease_left_ms,
            esc(&v.quic),
            esc(&v.version),
            if v.decider { "yes" } else { "" },
            esc(&v.tunnels.join(", "))
        );
    }
    let body = format!(
        r#"<div class="scroll"><table id="servers"><thead><tr><th scope="col">Name</th><th scope="col">Id</th><th scope="col">State</th><th scope="col">Lease left (ms)</th><th scope="col">QUIC</th><th scope="col">Version</th><th scope="col">Mode decider</th><th scope="col">Tunnels to</th></tr></thead><tbody>{rows}</tbody></table></div>"#
    );
    page("Cluster servers", Some(&s), &body).into_response()
}

async fn access_page(State(api): State<Arc<AdminState>>, Page(s): Page) -> Response {
    access(&api, &s, None).await
}

async fn access(api: &AdminState, s: &auth::Session, new_token: Option<(String, String)>) -> Response {
    let (users, tokens) = match (api.shared.store.list_users().await, api.shared.store.list_api_tokens().await) {
        (Ok(u), Ok(t)) => (u, t),
        (Err(e), _) | (_, Err(e)) => return error_page(StatusCode::SERVICE_UNAVAILABLE, Some(s), &e.to_string()),
    };
    let csrf = csrf_field(s);
    let mut urows = String::new();
    for u in &users {
        let _ = write!(
            urows,
            r#"<tr><td>{n}</td><td>{t}</td><td><form method="post" action="/ui/users/remove" data-confirm="Remove user {n}? Their sessions end now.">{csrf}<input type="hidden" name="name" value="{n}"><button type="submit" aria-label="Remove user {n}">Remove</button></form></td></tr>"#,
            n = esc(&u.name),
            t = esc(&time(Some(u.created_at)))
        );
    }
    let mut trows = String::new();
    for t in &tokens {
        let _ = write!(
            trows,
            r#"<tr><td>{n}</td><td>{scope}</td><td>{c}</td><td>{u}</td><td>{by}</td><td><form method="post" action="/ui/tokens/remove" data-confirm="Revoke token {n}?">{csrf}<input type="hidden" name="name" value="{n}"><button type="submit" aria-label="Revoke token {n}">Revoke</button></form></td></tr>"#,
            n = esc(&t.name),
            scope = t.scope,
            c = esc(&time(Some(t.created_at))),
            u = esc(&time(t.last_used)),
            by = esc(&t.created_by)
        );
    }
    let shown = new_token.map_or(String::new(), |(name, token)| {
        format!(
            r#"<p class="notice" role="status">Token {} made. Shown once:</p><pre id="new-token">{}</pre><button type="button" data-copy="new-token">Copy token</button>"#,
            esc(&name),
            esc(&token)
        )
    });
    let body = format!(
        r#"{shown}<h2>Users</h2><div class="scroll"><table id="users"><thead><tr><th scope="col">Name</th><th scope="col">Added</th><th scope="col">Action</th></tr></thead><tbody>{urows}</tbody></table></div>
<form method="post" action="/ui/users" class="card">{csrf}<label for="uname">New user name</label><input id="uname" name="name" required autocomplete="off"><label for="upass">Password (at least 10 characters)</label><input id="upass" name="password" type="password" required minlength="10" autocomplete="new-password"><button type="submit" id="add-user">Add user</button></form>
<h2>API tokens</h2><div class="scroll"><table id="tokens"><thead><tr><th scope="col">Name</th><th scope="col">Scope</th><th scope="col">Made</th><th scope="col">Last used</th><th scope="col">By</th><th scope="col">Action</th></tr></thead><tbody>{trows}</tbody></table></div>
<form method="post" action="/ui/tokens" class="card">{csrf}<label for="tname">New token name</label><input id="tname" name="name" required><label for="tscope">Scope</label><select id="tscope" name="scope"><option value="read">read</option><option value="admin">admin</option></select><button type="submit" id="add-token">Make token</button></form>"#
    );
    page("Users & tokens", Some(s), &body).into_response()
}

/// The add-user form.
#[derive(Deserialize)]
struct UserForm {
    name: String,
    password: String,
}

async fn add_user(State(api): State<Arc<AdminState>>, Posted(c, s, form): Posted<UserForm>) -> Response {
    match api.ops.add_user(&c.actor, &form.name, &form.password).await {
        Ok(()) => see_other("/ui/access"),
        Err(e) => op_error(e, &s),
    }
}

async fn remove_user(State(api): State<Arc<AdminState>>, Posted(c, s, form): Posted<NameForm>) -> Response {
    match api.ops.remove_user(&c.actor, &form.name).await {
        Ok(()) => see_other("/ui/access"),
        Err(e) => op_error(e, &s),
    }
}

/// The add-token form.
#[derive(Deserialize)]
struct TokenForm {
    name: String,
    scope: String,
}

async fn add_token(State(api): State<Arc<AdminState>>, Posted(c, s, form): Posted<TokenForm>) -> Response {
    let Ok(scope) = form.scope.parse::<TokenScope>() else {
        return op_error(OpError::Invalid { field: "scope", reason: "read or admin".into() }, &s);
    };
    match api.ops.add_token(&c.actor, &form.name, scope).await {
        Ok(t) => access(&api, &s, Some((t.name, t.token))).await,
        Err(e) => op_error(e, &s),
    }
}

async fn remove_token(State(api): State<Arc<AdminState>>, Posted(c, s, form): Posted<NameForm>) -> Response {
    match api.ops.remove_token(&c.actor, &form.name).await {
        Ok(()) => see_other("/ui/access"),
        Err(e) => op_error(e, &s),
    }
}

async fn audit_page(
    State(api): State<Arc<AdminState>>,
    Page(s): Page,
    query: Result<Query<AuditFilter>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let filter = query.map(|Query(q)| q).unwrap_or_default();
    let (actor, action, target) = (filter.actor.clone(), filter.action.clone(), filter.target.clone());
    let page_data = match v1::audit_page(&api, filter).await {
        Ok(p) => p,
        Err(e) => return op_error(e, &s),
    };
    let mut rows = String::new();
    for e in &page_data.entries {
        let _ = write!(
            rows,
            r#"<tr data-action="{action}"><td>{at}</td><td>{actor}</td><td>{source}</td><td>{action}</td><td>{target}</td><td>{summary}</td></tr>"#,
            at = esc(&time(Some(e.at))),
            actor = esc(&e.actor),
            source = esc(&e.source),
            action = esc(&e.action),
            target = esc(&e.target),
            summary = esc(&e.summary)
        );
    }
    let keep = |v: &Option<String>| esc(v.as_deref().unwrap_or(""));
    let next = page_data.next_before.map_or(String::new(), |b| {
        format!(
            r#"<p><a href="/ui/audit?before={b}&amp;actor={}&amp;action={}&amp;target={}">Older entries</a></p>"#,
            percent(actor.as_deref().unwrap_or("")),
            percent(action.as_deref().unwrap_or("")),
            percent(target.as_deref().unwrap_or(""))
        )
    });
    let body = format!(
        r#"<form method="get" action="/ui/audit" class="card filters"><label for="factor">Actor</label><input id="factor" name="actor" value="{a}"><label for="faction">Action</label><input id="faction" name="action" value="{ac}" placeholder="node.create"><label for="ftarget">Target</label><input id="ftarget" name="target" value="{t}"><button type="submit">Filter</button></form>
<div class="scroll"><table id="audit"><thead><tr><th scope="col">When</th><th scope="col">Who</th><th scope="col">From</th><th scope="col">Action</th><th scope="col">Target</th><th scope="col">Change</th></tr></thead><tbody>{rows}</tbody></table></div>{next}"#,
        a = keep(&actor),
        ac = keep(&action),
        t = keep(&target)
    );
    page("Audit log", Some(&s), &body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(esc(r#"<a href="x">'&'</a>"#), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
        assert_eq!(percent("a b/é"), "a%20b%2F%C3%A9");
    }

    #[test]
    fn pages_have_no_inline_code() {
        let p = page("T", None, "<p>x</p>").0;
        assert!(!p.contains("<script>"), "scripts only by src");
        assert!(!p.contains("style="));
        assert!(p.contains(r#"name="viewport""#));
        for asset in [SCRIPT, STYLE] {
            assert!(!asset.contains("http://") && !asset.contains("https://"), "no remote assets");
        }
    }
}
