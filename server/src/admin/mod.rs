//! Operators' side of the server: the admin API (`/api/v1`), the web
//! dashboard (`/ui`), accounts and sessions, and the audit log.
//!
//! - [`ops`]: every change an operator can make, validated and audited;
//!   the API, the dashboard and the CLI all go through it.
//! - [`auth`]: API tokens and session cookies, CSRF and origin checks.
//! - [`passwords`]: Argon2id. [`login_limit`]: failed-login budgets.
//! - [`v1`]: the JSON API. [`dashboard`]: server-rendered pages.
//!
//! Served on `listen.admin` (HTTPS) when set; `/api/v1` is also served on
//! the signal API's listener for automation.

pub mod auth;
pub mod dashboard;
pub mod login_limit;
pub mod ops;
pub mod passwords;
pub mod v1;

use std::sync::Arc;

use axum::http::{header, HeaderValue};
use axum::Router;

use crate::config::AdminConfig;
use crate::Shared;

/// Largest request body of the admin API and the dashboard.
pub const MAX_BODY: usize = 64 * 1024;

/// What the admin handlers share.
#[derive(Debug)]
pub struct AdminState {
    /// The server's state.
    pub shared: Arc<Shared>,
    /// Changes, audited.
    pub ops: ops::Ops,
    /// Failed-login budgets.
    pub limiter: login_limit::LoginLimiter,
    /// Sessions and origins.
    pub config: AdminConfig,
}

impl AdminState {
    /// The state for `shared`, making join strings with `join`.
    pub fn new(shared: Arc<Shared>, join: Result<ops::JoinInfo, String>) -> Self {
        let config = shared.config.admin.clone();
        let ops = ops::Ops {
            store: shared.store.clone(),
            config: Arc::new(shared.config.clone()),
            reserved: ops::ReservedLabels::from_config(&shared.config),
            join,
        };
        Self { limiter: login_limit::LoginLimiter::new(config.login_failures_per_minute), shared, ops, config }
    }
}

/// The Content-Security-Policy of every answer: our own scripts and styles
/// only, no inline code, no framing, forms only to us.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
    form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Adds the security headers to every answer.
async fn security_headers(request: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // `same-origin` rather than `no-referrer`: with `no-referrer` browsers
    // send `Origin: null` on form posts, and the origin check needs it.
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::STRICT_TRANSPORT_SECURITY, HeaderValue::from_static("max-age=31536000"));
    h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    response
}

/// The admin listener's routes: the API and the dashboard.
pub fn router(state: Arc<AdminState>) -> Router {
    v1::router(true)
        .merge(dashboard::router())
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(state)
}

/// Drops cookies: on the signal API's listener only tokens authenticate.
async fn no_cookies(mut request: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    request.headers_mut().remove(header::COOKIE);
    next.run(request).await
}

/// `/api/v1` for automation on the signal API's listener: bearer tokens
/// only, no login or session cookie.
pub fn api_router(state: Arc<AdminState>) -> Router {
    v1::router(false)
        .layer(axum::middleware::from_fn(no_cookies))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(state)
}
