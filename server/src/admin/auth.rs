//! Who is calling the admin API or the dashboard, and whether they may.
//!
//! - A bearer API token (automation): looked up by its SHA-256; its scope
//!   decides. Wrong tokens spend the source's failed-authentication budget.
//! - A session cookie (the dashboard): a 256-bit random id that the store
//!   knows only as a SHA-256, with idle and absolute expiry. Every change
//!   made with a cookie must come from an allowed `Origin` and carry the
//!   session's CSRF token (derived from the id, so it is never stored).

use std::net::IpAddr;

use axum::http::{header, HeaderMap, Method};
use base64::Engine;
use edge_proto::admin::TokenScope;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::ops::Actor;
use crate::config::AdminConfig;
use crate::store::{SessionRecord, Store, StoreError};

/// The session cookie's name. The `__Host-` prefix makes browsers refuse
/// it unless it is Secure, for `/` and for this host only: a site under the
/// same domain cannot plant one.
pub const COOKIE: &str = "__Host-edge_session";
/// The header carrying the CSRF token on API calls made with the cookie.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Header the dashboard's own polling sends: such requests are answered
/// but do not count as activity, so a page left open still goes idle.
pub const BACKGROUND_HEADER: &str = "x-edge-background";

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Who, for the audit log.
    pub actor: Actor,
    /// What they may do (users are admins).
    pub scope: TokenScope,
    /// The session, when authenticated by cookie.
    pub session: Option<Session>,
}

/// A cookie session of a caller.
#[derive(Debug, Clone)]
pub struct Session {
    /// The user.
    pub user: String,
    /// SHA-256 of the id.
    pub id_hash: [u8; 32],
    /// The CSRF token to embed in pages.
    pub csrf: String,
}

/// Why a request is refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token or session, or an invalid or expired one (401).
    #[error("authentication required: a bearer API token or a session")]
    Missing,
    /// The source failed to authenticate too often (429).
    #[error("too many failed authentications from this address; retry later")]
    TooMany,
    /// The scope does not allow the request (403).
    #[error("this token's scope ({0}) does not allow changes")]
    Scope(TokenScope),
    /// A cookie request that changes state came from another origin (403).
    #[error("cross-origin request refused")]
    Origin,
    /// A cookie request that changes state lacked its CSRF token (403).
    #[error("missing or wrong CSRF token")]
    Csrf,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A new session id (for the cookie) and its hash (for the store).
pub fn new_session_id() -> (String, [u8; 32]) {
    let id: [u8; 32] = rand::random();
    (base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id), Sha256::digest(id).into())
}

/// The hash the store keeps of a cookie's session id; `None` when the
/// cookie is not one of ours.
pub fn session_hash(cookie_value: &str) -> Option<[u8; 32]> {
    let id = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(cookie_value).ok()?;
    (id.len() == 32).then(|| Sha256::digest(&id).into())
}

/// The CSRF token of the session with this cookie value.
pub fn csrf_token(cookie_value: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"edge-admin-csrf\0");
    h.update(cookie_value.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(h.finalize())
}

/// The `Set-Cookie` value for a new session.
pub fn session_cookie(value: &str, max_age_secs: u64) -> String {
    format!("{COOKIE}={value}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={max_age_secs}")
}

/// The `Set-Cookie` value that clears the session cookie.
pub fn cleared_cookie() -> String {
    format!("{COOKIE}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0")
}

/// The session cookie's value in a request, if any.
pub fn cookie_value(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

/// Whether a request may change state from its `Origin`: the origin the
/// request is addressed to (`https://` + `Host`) or a configured one. A
/// request without `Origin` is refused: browsers send it on every POST,
/// PUT and DELETE.
pub fn origin_allowed(headers: &HeaderMap, config: &AdminConfig) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let own = headers.get(header::HOST).and_then(|v| v.to_str().ok()).map(|h| format!("https://{h}"));
    own.as_deref() == Some(origin) || config.allowed_origins.iter().any(|o| o == origin)
}

/// Whether a method changes state.
pub fn is_change(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// What [`authenticate`] needs.
#[derive(Debug)]
pub struct Request<'a> {
    /// The method (changes need the CSRF checks).
    pub method: &'a Method,
    /// The headers.
    pub headers: &'a HeaderMap,
    /// The client.
    pub source: IpAddr,
    /// A CSRF token from a form body, for dashboard forms.
    pub form_csrf: Option<&'a str>,
}

/// Authenticates a request by bearer token or session cookie.
pub async fn authenticate(
    store: &dyn Store,
    shared: &crate::Shared,
    config: &AdminConfig,
    req: &Request<'_>,
) -> Result<Caller, AuthError> {
    let now = crate::unix_now();
    if let Some(token) = bearer(req.headers) {
        if !shared.auth_failures.try_take(req.source) {
            return Err(AuthError::TooMany);
        }
        let Some(record) = store.use_api_token(&crate::token_hash(token), now).await? else {
            tracing::debug!(peer = %req.source, "unknown API token");
            return Err(AuthError::Missing);
        };
        shared.auth_failures.refund(req.source);
        return Ok(Caller {
            actor: Actor { who: format!("token:{}", record.name), source: req.source.to_string() },
            scope: record.scope,
            session: None,
        });
    }
    let Some(value) = cookie_value(req.headers) else {
        return Err(AuthError::Missing);
    };
    let Some(id_hash) = session_hash(value) else {
        return Err(AuthError::Missing);
    };
    let csrf = csrf_token(value);
    if is_change(req.method) {
        // Checked before the session is looked up: a forged request learns
        // nothing and touches nothing.
        if !origin_allowed(req.headers, config) {
            return Err(AuthError::Origin);
        }
        let presented = req.form_csrf.or_else(|| req.headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()));
        if !presented.is_some_and(|p| bool::from(p.as_bytes().ct_eq(csrf.as_bytes()))) {
            return Err(AuthError::Csrf);
        }
    }
    // An unknown cookie is a failed authentication like a wrong token.
    if !shared.auth_failures.try_take(req.source) {
        return Err(AuthError::TooMany);
    }
    let idle_before = now - config.session_idle_secs as i64;
    let created_before = now - config.session_max_secs as i64;
    let seen = if req.headers.contains_key(BACKGROUND_HEADER) { idle_before } else { now };
    let Some(SessionRecord { user, .. }) = store.use_session(&id_hash, seen, idle_before, created_before).await? else {
        return Err(AuthError::Missing);
    };
    shared.auth_failures.refund(req.source);
    Ok(Caller {
        actor: Actor { who: format!("user:{user}"), source: req.source.to_string() },
        scope: TokenScope::Admin,
        session: Some(Session { user, id_hash, csrf }),
    })
}

impl Caller {
    /// Refuses changes to read-only callers.
    pub fn require_admin(&self) -> Result<(), AuthError> {
        match self.scope {
            TokenScope::Admin => Ok(()),
            other => Err(AuthError::Scope(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn session_ids_hash_and_csrf_differ() {
        let (value, hash) = new_session_id();
        assert_eq!(value.len(), 43, "256 bits in base64url");
        assert_eq!(session_hash(&value), Some(hash));
        assert_eq!(session_hash("short"), None);
        assert_eq!(session_hash("!!!"), None);
        let csrf = csrf_token(&value);
        assert_ne!(csrf.as_bytes(), value.as_bytes());
        assert_eq!(csrf, csrf_token(&value));
        let (other, _) = new_session_id();
        assert_ne!(csrf_token(&other), csrf);
    }

    #[test]
    fn cookie_flags_and_parsing() {
        let c = session_cookie("abc", 600);
        for flag in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/", "Max-Age=600"] {
            assert!(c.contains(flag), "{c}");
        }
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("theme=dark; __Host-edge_session=abc; x=1"));
        assert_eq!(cookie_value(&h), Some("abc"));
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("__Host-edge_sessionx=1"));
        assert_eq!(cookie_value(&h), None);
    }

    #[test]
    fn origins() {
        let cfg = AdminConfig { allowed_origins: vec!["https://ops.example".into()], ..AdminConfig::default() };
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:9443"));
        assert!(!origin_allowed(&h, &cfg), "no Origin");
        h.insert(header::ORIGIN, HeaderValue::from_static("https://127.0.0.1:9443"));
        assert!(origin_allowed(&h, &cfg));
        h.insert(header::ORIGIN, HeaderValue::from_static("http://127.0.0.1:9443"));
        assert!(!origin_allowed(&h, &cfg), "scheme matters");
        h.insert(header::ORIGIN, HeaderValue::from_static("https://evil.example"));
        assert!(!origin_allowed(&h, &cfg));
        h.insert(header::ORIGIN, HeaderValue::from_static("https://ops.example"));
        assert!(origin_allowed(&h, &cfg));
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(!origin_allowed(&h, &cfg));
    }
}
