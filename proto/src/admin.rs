//! The admin API's wire contract (`/api/v1`, JSON): request and response
//! bodies, error bodies, audit actions, and the validation rules for the
//! names operators choose. Both the server and its tests speak these types.
//!
//! Requests reject unknown fields. Errors are [`ApiError`] bodies; a 422
//! names the field at fault.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a node's names point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// DNS points at the node's own public endpoint.
    Direct,
    /// DNS points at the cluster; traffic goes through the tunnel.
    Proxy,
    /// Neither reachable nor tunneled.
    #[default]
    Offline,
}

impl Mode {
    /// Lowercase name, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Proxy => "proxy",
            Mode::Offline => "offline",
        }
    }

    /// Parses [`Mode::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "direct" => Some(Mode::Direct),
            "proxy" => Some(Mode::Proxy),
            "offline" => Some(Mode::Offline),
            _ => None,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What plain HTTP on :80 does for a node in proxy mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpMode {
    /// 307 to https (the default).
    #[default]
    Redirect,
    /// The request goes to the agent's upstream through the tunnel.
    Proxy,
}

impl HttpMode {
    /// Lowercase name, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMode::Redirect => "redirect",
            HttpMode::Proxy => "proxy",
        }
    }

    /// Parses [`HttpMode::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "redirect" => Some(HttpMode::Redirect),
            "proxy" => Some(HttpMode::Proxy),
            _ => None,
        }
    }
}

impl fmt::Display for HttpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for HttpMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s).ok_or_else(|| format!("{s:?} is not an HTTP mode (redirect or proxy)"))
    }
}

/// Types of static DNS records (in `[dns]` or in the store).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum StaticKind {
    /// IPv4 address.
    A,
    /// IPv6 address.
    AAAA,
    /// Text.
    TXT,
    /// CA authorization: `<flags> issue|issuewild "<ca>[; key=value]..."`,
    /// e.g. `0 issue "letsencrypt.org; validationmethods=dns-01"`. A CAA
    /// record at the apex replaces the ones derived from `[acme]`.
    CAA,
}

impl StaticKind {
    /// The type's name, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            StaticKind::A => "A",
            StaticKind::AAAA => "AAAA",
            StaticKind::TXT => "TXT",
            StaticKind::CAA => "CAA",
        }
    }

    /// Parses [`StaticKind::as_str`] (any case).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_uppercase().as_str() {
            "A" => Some(StaticKind::A),
            "AAAA" => Some(StaticKind::AAAA),
            "TXT" => Some(StaticKind::TXT),
            "CAA" => Some(StaticKind::CAA),
            _ => None,
        }
    }
}

impl fmt::Display for StaticKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for StaticKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s).ok_or_else(|| format!("{s:?} is not a record type (A, AAAA, TXT or CAA)"))
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s).ok_or_else(|| format!("{s:?} is not a mode (direct, proxy or offline)"))
    }
}

/// What an API token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenScope {
    /// `GET` requests only.
    Read,
    /// Everything, including changes.
    Admin,
}

impl TokenScope {
    /// The wire and stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for TokenScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TokenScope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" => Ok(Self::Read),
            "admin" => Ok(Self::Admin),
            other => Err(format!("{other:?} is not a scope (read or admin)")),
        }
    }
}

/// What kind of change an audit entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AuditAction {
    /// A node was created.
    #[serde(rename = "node.create")]
    NodeCreate,
    /// A node was removed.
    #[serde(rename = "node.remove")]
    NodeRemove,
    /// A node's token was replaced.
    #[serde(rename = "node.rotate_token")]
    NodeRotateToken,
    /// A node's plain-HTTP mode was set.
    #[serde(rename = "node.http_mode")]
    NodeHttpMode,
    /// A static DNS record was added.
    #[serde(rename = "dns.create")]
    DnsCreate,
    /// Static DNS records were deleted.
    #[serde(rename = "dns.delete")]
    DnsDelete,
    /// A retired server was forgotten.
    #[serde(rename = "server.remove")]
    ServerRemove,
    /// A TCP service was added.
    #[serde(rename = "service.create")]
    ServiceCreate,
    /// A TCP service was removed.
    #[serde(rename = "service.remove")]
    ServiceRemove,
    /// A custom domain was claimed for a node.
    #[serde(rename = "domain.create")]
    DomainCreate,
    /// A custom domain was removed.
    #[serde(rename = "domain.remove")]
    DomainRemove,
    /// An access policy was set.
    #[serde(rename = "access.set")]
    AccessSet,
    /// An access policy was cleared.
    #[serde(rename = "access.clear")]
    AccessClear,
    /// A user was added.
    #[serde(rename = "user.add")]
    UserAdd,
    /// A user was removed (with their sessions).
    #[serde(rename = "user.remove")]
    UserRemove,
    /// An API token was made.
    #[serde(rename = "token.add")]
    TokenAdd,
    /// An API token was revoked.
    #[serde(rename = "token.remove")]
    TokenRemove,
    /// A user logged in.
    #[serde(rename = "session.login")]
    Login,
    /// A user logged out.
    #[serde(rename = "session.logout")]
    Logout,
}

impl AuditAction {
    /// Every action, for filters and documentation.
    pub const ALL: [AuditAction; 19] = [
        Self::NodeCreate,
        Self::NodeRemove,
        Self::NodeRotateToken,
        Self::NodeHttpMode,
        Self::DnsCreate,
        Self::DnsDelete,
        Self::ServerRemove,
        Self::ServiceCreate,
        Self::ServiceRemove,
        Self::DomainCreate,
        Self::DomainRemove,
        Self::AccessSet,
        Self::AccessClear,
        Self::UserAdd,
        Self::UserRemove,
        Self::TokenAdd,
        Self::TokenRemove,
        Self::Login,
        Self::Logout,
    ];

    /// The stored spelling, e.g. `node.create`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NodeCreate => "node.create",
            Self::NodeRemove => "node.remove",
            Self::NodeRotateToken => "node.rotate_token",
            Self::NodeHttpMode => "node.http_mode",
            Self::DnsCreate => "dns.create",
            Self::DnsDelete => "dns.delete",
            Self::ServerRemove => "server.remove",
            Self::ServiceCreate => "service.create",
            Self::ServiceRemove => "service.remove",
            Self::DomainCreate => "domain.create",
            Self::DomainRemove => "domain.remove",
            Self::AccessSet => "access.set",
            Self::AccessClear => "access.clear",
            Self::UserAdd => "user.add",
            Self::UserRemove => "user.remove",
            Self::TokenAdd => "token.add",
            Self::TokenRemove => "token.remove",
            Self::Login => "session.login",
            Self::Logout => "session.logout",
        }
    }

    /// The action spelled so, if any.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

impl fmt::Display for AuditAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went wrong, as a stable code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the body is not JSON of the expected shape.
    BadRequest,
    /// 401: no valid token or session.
    Unauthorized,
    /// 403: the token's scope does not allow this, or a CSRF check failed.
    Forbidden,
    /// 404: no such thing.
    NotFound,
    /// 409: the name exists already, or collides with another name.
    Conflict,
    /// 413: the body is too large.
    TooLarge,
    /// 422: a field's value is invalid; `field` names it.
    Invalid,
    /// 429: too many failed logins; retry later.
    RateLimited,
    /// 503: the store cannot be reached now.
    Unavailable,
    /// 500: a failure on the server's side.
    Internal,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// The kind of error.
    pub error: ErrorCode,
    /// For people.
    pub message: String,
    /// The request field at fault (422, and 409 where one field collides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// A mode transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// When (Unix seconds).
    pub at: i64,
    /// Mode before.
    pub from: Mode,
    /// Mode after.
    pub to: Mode,
    /// Why.
    pub reason: String,
}

/// One reachability probe of a node's declared endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// When (Unix seconds).
    pub at: i64,
    /// The endpoint probed.
    pub endpoint: String,
    /// Whether the node answered the nonce.
    pub ok: bool,
    /// What happened.
    pub detail: String,
}

/// A node as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSummary {
    /// The node's name (one DNS label).
    pub name: String,
    /// The names it owns.
    pub hostnames: Vec<String>,
    /// Direct, proxy or offline.
    pub mode: Mode,
    /// The endpoint it declared for direct mode.
    pub endpoint: Option<String>,
    /// What plain HTTP does in proxy mode.
    pub http_mode: HttpMode,
    /// Whether any server of the cluster has a tunnel to it.
    pub connected: bool,
    /// Names of the servers with a tunnel to it.
    pub servers: Vec<String>,
    /// Tunnels to this server.
    pub tunnels: usize,
    /// Client connections open through this server now.
    pub open_connections: u64,
    /// Client connections through this server since it started.
    pub total_connections: u64,
    /// Bytes from clients to the node through this server.
    pub bytes_to_node: u64,
    /// Bytes from the node to clients through this server.
    pub bytes_from_node: u64,
    /// Last heartbeat (Unix seconds).
    pub last_heartbeat: Option<i64>,
    /// The node's certificate's expiry (Unix seconds).
    pub cert_not_after: Option<i64>,
    /// The agent's version.
    pub agent_version: Option<String>,
    /// Where the agent connects from.
    pub remote_addr: Option<String>,
    /// When the node was created (Unix seconds).
    pub created_at: i64,
}

/// One node in full.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDetail {
    /// What the list shows.
    #[serde(flatten)]
    pub summary: NodeSummary,
    /// Since when the node is in its mode.
    pub mode_since: Option<i64>,
    /// Mode transitions, newest first.
    pub transitions: Vec<Transition>,
    /// Recent probes, newest first.
    pub probes: Vec<Probe>,
    /// The routes the agent last reported, with its upstreams' health
    /// (empty until an agent that reports routes connected).
    #[serde(default)]
    pub routes: Vec<crate::routes::RouteReport>,
}

/// `POST /api/v1/nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateNode {
    /// One DNS label: lowercase letters, digits, `-`.
    pub name: String,
}

/// `POST /api/v1/services`: a raw TCP service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateService {
    /// The service's name: lowercase letters, digits, `-`.
    pub name: String,
    /// The node that serves it.
    pub node: String,
    /// Where every server listens: `ip:port`, or `:port`.
    pub listen: String,
    /// The name of the agent's `[[services]]` entry.
    pub target: String,
}

/// A node's join string, shown once.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinCredentials {
    /// The node.
    pub name: String,
    /// The join string (holds the token; the server keeps only a hash).
    pub join: String,
    /// The complete `edge-agent` command line.
    pub agent_command: String,
    /// The names the node owns.
    pub hostnames: Vec<String>,
}

impl fmt::Debug for JoinCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinCredentials").field("name", &self.name).field("join", &"<secret>").finish_non_exhaustive()
    }
}

/// `PUT /api/v1/nodes/{name}/http-mode`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetHttpMode {
    /// `redirect` or `proxy`.
    pub mode: HttpMode,
}

/// A static DNS record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsRecord {
    /// Absolute name (answers), or relative to the zone / `@` (requests).
    pub name: String,
    /// A, AAAA, TXT or CAA.
    pub kind: StaticKind,
    /// Address, text or CAA value.
    pub value: String,
    /// TTL in seconds (0 to 86400; requests default to 300).
    #[serde(default = "default_ttl")]
    pub ttl: u32,
}

fn default_ttl() -> u32 {
    300
}

/// A cluster server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerSummary {
    /// Persistent id.
    pub id: String,
    /// Configured name.
    pub name: String,
    /// Whether its lease is current.
    pub alive: bool,
    /// Milliseconds left on its lease (negative: expired).
    pub lease_left_ms: i64,
    /// QUIC address for agents.
    pub quic: String,
    /// Signal API address.
    pub api: String,
    /// Its version.
    pub version: String,
    /// Nodes it has tunnels to.
    pub tunnels: Vec<String>,
    /// Whether it decides nodes' modes now.
    pub decider: bool,
    /// When it started (Unix seconds).
    pub started_at: i64,
}

/// One operator change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Increasing id (the paging cursor).
    pub id: i64,
    /// When (Unix seconds).
    pub at: i64,
    /// Who: `user:NAME`, `token:NAME` or `cli:LOGIN`.
    pub actor: String,
    /// From where: the client's address, or `cli`.
    pub source: String,
    /// What, e.g. `node.create` ([`AuditAction`]).
    pub action: String,
    /// What it was done to.
    pub target: String,
    /// A short summary of the change.
    pub summary: String,
}

/// `GET /api/v1/audit`: one page, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditPage {
    /// The entries.
    pub entries: Vec<AuditEntry>,
    /// Pass as `before` for the next page; absent on the last.
    pub next_before: Option<i64>,
}

/// `POST /api/v1/session`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Login {
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
}

impl fmt::Debug for Login {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Login").field("user", &self.user).field("password", &"<secret>").finish()
    }
}

/// The current session (`GET`/`POST /api/v1/session`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Who is logged in.
    pub user: String,
    /// Send as `X-CSRF-Token` on every change made with the cookie.
    pub csrf_token: String,
    /// The session ends after this many seconds without a request.
    pub idle_timeout_secs: u64,
}

/// `POST /api/v1/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Unique name.
    pub name: String,
    /// `read` or `admin`.
    pub scope: TokenScope,
}

/// A new token, shown once.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedToken {
    /// Its name.
    pub name: String,
    /// Its scope.
    pub scope: TokenScope,
    /// The bearer token (the server keeps only a hash).
    pub token: String,
}

impl fmt::Debug for CreatedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatedToken").field("name", &self.name).field("token", &"<secret>").finish_non_exhaustive()
    }
}

/// A token as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenSummary {
    /// Its name.
    pub name: String,
    /// Its scope.
    pub scope: TokenScope,
    /// When it was made.
    pub created_at: i64,
    /// Last use (to within a minute).
    pub last_used: Option<i64>,
    /// Who made it.
    pub created_by: String,
}

/// `POST /api/v1/users`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    /// Login name.
    pub name: String,
    /// Password (at least [`MIN_PASSWORD_CHARS`] characters).
    pub password: String,
}

impl fmt::Debug for CreateUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateUser").field("name", &self.name).field("password", &"<secret>").finish()
    }
}

/// A user as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSummary {
    /// Login name.
    pub name: String,
    /// When added.
    pub created_at: i64,
}

/// Shortest password accepted.
pub const MIN_PASSWORD_CHARS: usize = 10;
/// Longest password accepted (hashing cost grows with it).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// Why a user or token name, or a password, is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty or longer than 64 bytes.
    #[error("must be 1 to 64 characters")]
    Length,
    /// A character outside `a-z 0-9 . _ -`.
    #[error("may hold only lowercase letters, digits, '.', '_' and '-'")]
    Character,
    /// A password shorter than [`MIN_PASSWORD_CHARS`].
    #[error("must be at least {MIN_PASSWORD_CHARS} characters")]
    TooShort,
    /// A password longer than [`MAX_PASSWORD_BYTES`].
    #[error("must be at most {MAX_PASSWORD_BYTES} bytes")]
    TooLong,
}

/// Checks a user or token name.
pub fn validate_account_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() || name.len() > 64 {
        return Err(NameError::Length);
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')) {
        return Err(NameError::Character);
    }
    Ok(())
}

/// Checks a new password's length.
pub fn validate_password(password: &str) -> Result<(), NameError> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(NameError::TooShort);
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(NameError::TooLong);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_actions_round_trip() {
        for a in AuditAction::ALL {
            assert_eq!(AuditAction::parse(a.as_str()), Some(a));
            assert_eq!(serde_json::to_string(&a).unwrap(), format!("\"{}\"", a.as_str()));
        }
        assert_eq!(AuditAction::parse("node.nuke"), None);
    }

    #[test]
    fn account_names() {
        assert_eq!(validate_account_name("ci-bot.1_x"), Ok(()));
        assert_eq!(validate_account_name(""), Err(NameError::Length));
        assert_eq!(validate_account_name(&"a".repeat(65)), Err(NameError::Length));
        assert_eq!(validate_account_name("Alice"), Err(NameError::Character));
        assert_eq!(validate_account_name("a b"), Err(NameError::Character));
        assert_eq!(validate_password("short"), Err(NameError::TooShort));
        assert_eq!(validate_password("ten chars!"), Ok(()));
        assert_eq!(validate_password(&"x".repeat(1025)), Err(NameError::TooLong));
    }

    #[test]
    fn requests_reject_unknown_fields() {
        assert!(serde_json::from_str::<CreateNode>(r#"{"name":"a","extra":1}"#).is_err());
        assert!(serde_json::from_str::<CreateToken>(r#"{"name":"a","scope":"root"}"#).is_err());
        let r: DnsRecord = serde_json::from_str(r#"{"name":"www","kind":"A","value":"192.0.2.1"}"#).unwrap();
        assert_eq!(r.ttl, 300);
    }

    #[test]
    fn secrets_are_masked() {
        let l = Login { user: "a".into(), password: "hunter2-hunter2".into() };
        assert!(!format!("{l:?}").contains("hunter2"));
        let t = CreatedToken { name: "ci".into(), scope: TokenScope::Read, token: "edge_tok_secret".into() };
        assert!(!format!("{t:?}").contains("secret\""));
    }
}
