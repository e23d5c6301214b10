//! Agent configuration: a TOML file and/or command-line flags, validated
//! with errors that name the field.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use edge_net::logging::LogFormat;
use edge_net::quic::TunnelTuning;
use edge_proto::join::JoinTicket;
use serde::Deserialize;

/// What the agent does with a client connection: terminate TLS here or
/// pass the raw TLS through.
pub use edge_proto::routes::RouteMode as Mode;

/// Everything `edge-agent` needs.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Join string from `edge-server node add` (secret).
    pub join: String,
    /// Verify the server with this CA bundle instead of the pinned fingerprint.
    #[serde(default)]
    pub server_ca_file: Option<PathBuf>,
    /// Local service, `host:port`, that receives client connections no
    /// route in `routes` matches (the default route). Optional when
    /// `routes` is set: names no route serves then get 404 (terminate) or
    /// a closed connection (passthrough).
    #[serde(default)]
    pub upstream: Option<String>,
    /// `terminate` (default) or `passthrough`, for the default route and
    /// for routes that do not set their own.
    #[serde(default)]
    pub mode: Mode,
    /// Health check of the default route's upstream.
    #[serde(default)]
    pub health: Option<HealthConfig>,
    /// Routes by hostname, each to its own upstreams (see [`RouteConfig`]).
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Local targets of raw TCP services (`edge-server service add ...
    /// --target NAME`): the server names one, and can never make the agent
    /// dial anything else.
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    /// Send a PROXY protocol v2 header to the upstream with the client address.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Directory for generated certificates.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Node certificate chain (PEM). Without it a local CA and certificate
    /// are generated in `data_dir/certs`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Node private key (PEM).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// ALPN protocols offered to clients when terminating TLS.
    #[serde(default = "default_alpn")]
    pub alpn: Vec<String>,
    /// Local status endpoint (`/ready`, `/metrics`); loopback only; off when unset.
    #[serde(default)]
    pub status_listen: Option<SocketAddr>,
    /// Also accept clients directly on this address (TLS terminated here,
    /// same certificate and upstream); off when unset.
    #[serde(default)]
    pub direct_listen: Option<SocketAddr>,
    /// Public endpoint for direct mode, `ip:port`, or `:port` for "the
    /// address the server sees me at, this port" (a forwarded port). The
    /// server probes it and points DNS here while it answers as this node.
    /// Needs `direct_listen` and `mode = "terminate"`. Unset: proxy only.
    #[serde(default)]
    pub public_endpoint: Option<String>,
    /// QUIC connections held to the server. The server spreads client
    /// connections over them; each is driven on its own core, and losing one
    /// leaves the others serving.
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// Identity of this installation among replicas of the node (several
    /// agents serving one node share its traffic). Default: a random id
    /// kept in `<data_dir>/replica.id`, so a restart replaces the old
    /// process's tunnels instead of counting as another replica.
    #[serde(default)]
    pub replica: Option<String>,
    /// After SIGTERM: how long open client connections may finish. The
    /// server is told at once to send new ones to other tunnels.
    #[serde(default = "default_drain_timeout_secs")]
    pub drain_timeout_secs: u64,
    /// Reconnect backoff.
    #[serde(default)]
    pub reconnect: ReconnectConfig,
    /// QUIC tunnel tuning.
    #[serde(default)]
    pub tunnel: TunnelTuning,
    /// Threads of the async runtime (needs a restart).
    #[serde(default)]
    pub runtime: edge_net::runtime::RuntimeConfig,
    /// Log format, `text` or `json`.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Publicly trusted certificate through ACME (unless `cert_file` is set).
    #[serde(default)]
    pub acme: AgentAcmeConfig,
    /// HTTP/3 for clients of the node's terminated routes.
    #[serde(default)]
    pub http3: Http3Config,
}

/// HTTP/3: QUIC clients reach the server's `listen.quic_clients`, which
/// carries their datagrams over the tunnel; the agent terminates QUIC and
/// TLS with the node's certificate and forwards each request to the
/// route's upstream as HTTP/1.1.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http3Config {
    /// Serve HTTP/3 (off by default).
    pub enabled: bool,
    /// QUIC client connections this agent serves at once (over all its
    /// tunnels and the direct listener); more are refused.
    pub max_connections: u32,
    /// Requests a client may have open at once on one connection.
    pub max_streams_per_connection: u32,
    /// A client connection with no traffic for this long is closed.
    pub idle_timeout_secs: u64,
    /// Advertise HTTP/3 to TCP clients: the first HTTP/1.x response of
    /// each TLS connection the agent terminates gets `Alt-Svc: h3=":port"`
    /// (the server's QUIC port, or `direct_listen`'s), unless the upstream
    /// sent one.
    pub alt_svc: bool,
}

impl Default for Http3Config {
    fn default() -> Self {
        Self {
            enabled: false,
            max_connections: 4096,
            max_streams_per_connection: 100,
            idle_timeout_secs: 30,
            alt_svc: true,
        }
    }
}

impl Http3Config {
    fn validate(&self) -> Result<(), String> {
        if !(1..=1_000_000).contains(&self.max_connections) {
            return Err(format!("http3.max_connections = {} must be between 1 and 1000000", self.max_connections));
        }
        if !(1..=10_000).contains(&self.max_streams_per_connection) {
            return Err(format!(
                "http3.max_streams_per_connection = {} must be between 1 and 10000",
                self.max_streams_per_connection
            ));
        }
        // Under the server's 60 s answer window, so a quiet connection
        // closes here before the server stops carrying its answers.
        if !(1..=50).contains(&self.idle_timeout_secs) {
            return Err(format!("http3.idle_timeout_secs = {} must be between 1 and 50", self.idle_timeout_secs));
        }
        Ok(())
    }
}

/// One route: the node's names matching `host` go to `upstreams`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// A name of the node, or `*.name` for every name one label below it.
    /// Exact routes win over wildcards, wildcards over the default route.
    pub host: String,
    /// Local services, `host:port`: round-robin over the healthy ones, and
    /// the next one is tried when a connect fails.
    pub upstreams: Vec<String>,
    /// `terminate` or `passthrough` (default: the top-level `mode`).
    #[serde(default)]
    pub mode: Option<Mode>,
    /// PROXY v2 header to the upstreams (default: the top-level setting).
    #[serde(default)]
    pub proxy_protocol: Option<bool>,
    /// ALPN offered when terminating TLS (default: the top-level `alpn`).
    #[serde(default)]
    pub alpn: Option<Vec<String>>,
    /// Active health check of each upstream; without one, an upstream
    /// whose connect failed is retried after 5 s.
    #[serde(default)]
    pub health: Option<HealthConfig>,
}

/// A local target the server may send raw TCP connections to.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// The name the server's service refers to (`--target`).
    pub name: String,
    /// `host:port` the agent connects.
    pub target: String,
    /// PROXY v2 header with the client's address first.
    #[serde(default)]
    pub proxy_protocol: bool,
}

/// Which active check probes an upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connect.
    #[default]
    Tcp,
    /// An HTTP/1.1 `GET path` answered with an expected status (terminate
    /// mode: the upstream speaks plain HTTP).
    Http,
}

impl CheckKind {
    /// The name reported to the server.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Http => "http",
        }
    }
}

/// Active health checks of a route's upstreams.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// `tcp` (default) or `http`.
    #[serde(default)]
    pub check: CheckKind,
    /// Path of the HTTP check.
    #[serde(default = "default_health_path")]
    pub path: String,
    /// Statuses the HTTP check accepts (default: any 2xx or 3xx).
    #[serde(default)]
    pub expect_status: Vec<u16>,
    /// Time between checks of one upstream.
    #[serde(default = "default_health_interval_ms")]
    pub interval_ms: u64,
    /// Deadline of one check.
    #[serde(default = "default_health_timeout_ms")]
    pub timeout_ms: u64,
    /// Successes in a row that bring a down upstream up.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Failures in a row (checks or connects) that take an up upstream down.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

fn default_health_path() -> String {
    "/".into()
}
fn default_health_interval_ms() -> u64 {
    2000
}
fn default_health_timeout_ms() -> u64 {
    1000
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    2
}

impl HealthConfig {
    fn validate(&self, field: &str, mode: Mode) -> Result<(), String> {
        if !(100..=3_600_000).contains(&self.interval_ms) {
            return Err(format!("{field}.interval_ms = {} must be between 100 and 3600000", self.interval_ms));
        }
        if self.timeout_ms == 0 || self.timeout_ms > self.interval_ms {
            return Err(format!(
                "{field}.timeout_ms = {} must be at least 1 and at most interval_ms = {}",
                self.timeout_ms, self.interval_ms
            ));
        }
        if !(1..=100).contains(&self.rise) || !(1..=100).contains(&self.fall) {
            return Err(format!("{field}.rise and .fall must be between 1 and 100"));
        }
        if self.check == CheckKind::Http {
            if mode == Mode::Passthrough {
                return Err(format!(
                    "{field}.check = \"http\" needs mode = \"terminate\" (a passthrough upstream speaks TLS; use \"tcp\")"
                ));
            }
            let plain = self.path.starts_with('/')
                && self.path.len() <= 1024
                && self.path.bytes().all(|b| b.is_ascii_graphic());
            if !plain {
                return Err(format!(
                    "{field}.path = {:?} must start with / and hold no spaces or control bytes",
                    self.path
                ));
            }
        }
        if let Some(bad) = self.expect_status.iter().find(|s| !(100..=599).contains(*s)) {
            return Err(format!("{field}.expect_status: {bad} is not an HTTP status"));
        }
        Ok(())
    }
}

fn valid_host_port(addr: &str) -> bool {
    addr.rsplit_once(':').is_some_and(|(h, p)| {
        !h.is_empty()
            && h.len() <= 255
            && h.bytes().all(|b| b.is_ascii_graphic())
            && p.parse::<u16>().is_ok_and(|p| p != 0)
    })
}

/// Who runs ACME for the node's certificate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AcmeFlow {
    /// The agent sends a CSR; the server holds the ACME account (default).
    /// The key never leaves the node. If the server offers no ACME, the
    /// local certificate stays in use.
    #[default]
    Server,
    /// The agent runs ACME itself; the server only publishes its DNS-01 TXT
    /// values.
    Node,
    /// No ACME: a locally generated certificate.
    Off,
}

/// ACME settings of the agent.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentAcmeConfig {
    /// `server` (default), `node` or `off`.
    #[serde(default)]
    pub flow: AcmeFlow,
    /// ACME directories, tried in order (node flow).
    #[serde(default)]
    pub directories: Vec<String>,
    /// Account contact addresses (node flow).
    #[serde(default)]
    pub contact: Vec<String>,
    /// CA (PEM) trusted for the directories' HTTPS (node flow; e.g. Pebble).
    #[serde(default)]
    pub root_ca_file: Option<PathBuf>,
    /// When to renew and how to retry.
    #[serde(default)]
    pub renewal: edge_certs::renewal::RenewalPolicy,
}

impl AgentAcmeConfig {
    /// The settings for the node-side flow.
    pub fn settings(&self) -> edge_certs::acme::AcmeSettings {
        edge_certs::acme::AcmeSettings {
            directories: self.directories.clone(),
            contact: self.contact.clone(),
            root_ca_file: self.root_ca_file.clone(),
        }
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("edge-agent-data")
}

fn default_connections() -> usize {
    2
}

fn default_drain_timeout_secs() -> u64 {
    30
}

fn default_alpn() -> Vec<String> {
    vec!["http/1.1".into()]
}

impl AgentConfig {
    /// Whether HTTP/3 is on but no route terminates TLS here: HTTP/3
    /// clients (which the zone's HTTPS record invites) would only get 421.
    pub fn http3_has_nothing_to_serve(&self) -> bool {
        let default_terminates = self.upstream.is_some() && self.mode == Mode::Terminate;
        let route_terminates = self.routes.iter().any(|r| r.mode.unwrap_or(self.mode) == Mode::Terminate);
        self.http3.enabled && !default_terminates && !route_terminates
    }
}

/// Reconnect backoff: exponential from `initial_ms` to `max_ms`, with jitter.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconnectConfig {
    /// First delay.
    pub initial_ms: u64,
    /// Largest delay.
    pub max_ms: u64,
    /// After the server shut down, the first attempt comes at a random time
    /// in this window (at least the backoff), so a fleet spreads out.
    pub shutdown_spread_ms: u64,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        Self { initial_ms: 250, max_ms: 30_000, shutdown_spread_ms: 5_000 }
    }
}

impl fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentConfig")
            .field(
                "join",
                &JoinTicket::parse(&self.join).map_or_else(|_| "<invalid>".to_string(), |t| format!("{t:?}")),
            )
            .field("server_ca_file", &self.server_ca_file)
            .field("upstream", &self.upstream)
            .field("mode", &self.mode)
            .field("health", &self.health)
            .field("routes", &self.routes)
            .field("services", &self.services)
            .field("proxy_protocol", &self.proxy_protocol)
            .field("data_dir", &self.data_dir)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("alpn", &self.alpn)
            .field("status_listen", &self.status_listen)
            .field("direct_listen", &self.direct_listen)
            .field("public_endpoint", &self.public_endpoint)
            .field("connections", &self.connections)
            .field("replica", &self.replica)
            .field("drain_timeout_secs", &self.drain_timeout_secs)
            .field("reconnect", &self.reconnect)
            .field("tunnel", &self.tunnel)
            .field("runtime", &self.runtime)
            .field("log_format", &self.log_format)
            .field("acme", &self.acme)
            .finish()
    }
}

/// A configuration error; the message names the origin and field.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct ConfigError {
    /// The file, or `command line`.
    pub origin: String,
    /// What is wrong, naming the field and value.
    pub message: String,
}

impl AgentConfig {
    /// Checks the default route and `routes`.
    fn validate_routes(&self) -> Result<(), String> {
        let alpn_ok = |alpn: &[String]| alpn.iter().all(|a| !a.is_empty() && a.len() <= 255) && alpn.len() <= 16;
        match &self.upstream {
            Some(u) if !valid_host_port(u) => return Err(format!("upstream = {u:?} must be host:port")),
            None if self.routes.is_empty() && self.services.is_empty() => {
                return Err(
                    "upstream is not set and there are no [[routes]] or [[services]]: nothing would serve clients"
                        .into(),
                )
            }
            _ => {}
        }
        if !alpn_ok(&self.alpn) {
            return Err(format!("alpn = {:?}: each protocol must be 1 to 255 bytes", self.alpn));
        }
        if let Some(h) = &self.health {
            if self.upstream.is_none() {
                return Err("health: checks the default route's upstream, but upstream is not set".into());
            }
            h.validate("health", self.mode)?;
        }
        if self.routes.len() > edge_proto::routes::MAX_ROUTES {
            return Err(format!("routes: {} routes, at most {}", self.routes.len(), edge_proto::routes::MAX_ROUTES));
        }
        let mut names = std::collections::HashSet::new();
        if self.services.len() > 64 {
            return Err(format!("services: {} entries, at most 64", self.services.len()));
        }
        for (i, svc) in self.services.iter().enumerate() {
            edge_proto::routes::validate_service_name(&svc.name).map_err(|e| format!("services[{i}].name: {e}"))?;
            if !names.insert(svc.name.as_str()) {
                return Err(format!("services[{i}].name = {:?}: another service has the same name", svc.name));
            }
            if !valid_host_port(&svc.target) {
                return Err(format!("services[{i}].target = {:?} must be host:port", svc.target));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let field = format!("routes[{i}]");
            let pattern = edge_proto::routes::HostPattern::parse(&r.host).map_err(|e| format!("{field}.host: {e}"))?;
            if pattern == edge_proto::routes::HostPattern::Any && self.upstream.is_some() {
                return Err(format!("{field}.host = \"*\" is the default route, which upstream already sets"));
            }
            if !seen.insert(pattern.clone()) {
                return Err(format!("{field}.host = {:?}: another route has the same host", r.host));
            }
            if r.upstreams.is_empty() || r.upstreams.len() > edge_proto::routes::MAX_UPSTREAMS {
                return Err(format!(
                    "{field}.upstreams: between 1 and {} host:port entries",
                    edge_proto::routes::MAX_UPSTREAMS
                ));
            }
            if let Some(bad) = r.upstreams.iter().find(|u| !valid_host_port(u)) {
                return Err(format!("{field}.upstreams: {bad:?} must be host:port"));
            }
            let mode = r.mode.unwrap_or(self.mode);
            if let Some(alpn) = &r.alpn {
                if !alpn_ok(alpn) {
                    return Err(format!("{field}.alpn = {alpn:?}: each protocol must be 1 to 255 bytes"));
                }
            }
            if let Some(h) = &r.health {
                h.validate(&format!("{field}.health"), mode)?;
            }
        }
        Ok(())
    }

    /// The settings a reload cannot change, by name, where `other` differs
    /// (they are logged as needing a restart).
    pub fn restart_only_changes(&self, other: &AgentConfig) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let mut check = |name, differs: bool| {
            if differs {
                changed.push(name);
            }
        };
        check("join", self.join != other.join);
        check("server_ca_file", self.server_ca_file != other.server_ca_file);
        check("data_dir", self.data_dir != other.data_dir);
        check("cert_file", self.cert_file != other.cert_file || self.key_file != other.key_file);
        check("status_listen", self.status_listen != other.status_listen);
        check("direct_listen", self.direct_listen != other.direct_listen);
        check("public_endpoint", self.public_endpoint != other.public_endpoint);
        check("connections", self.connections != other.connections);
        check("replica", self.replica != other.replica);
        check("tunnel", format!("{:?}", self.tunnel) != format!("{:?}", other.tunnel));
        check("runtime", self.runtime != other.runtime);
        check("acme", format!("{:?}", self.acme) != format!("{:?}", other.acme));
        check("log_format", self.log_format != other.log_format);
        // Offered in the hello: a tunnel takes it when it connects.
        check("http3", self.http3 != other.http3);
        changed
    }

    /// Reads a TOML file (without validating; see [`AgentConfig::validate`]).
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError { origin: origin.clone(), message: e.to_string() })?;
        let mut config = Self::parse(&text, &origin)?;
        if let Some(dir) = path.parent() {
            for p in [
                Some(&mut config.data_dir),
                config.cert_file.as_mut(),
                config.key_file.as_mut(),
                config.server_ca_file.as_mut(),
                config.acme.root_ca_file.as_mut(),
            ]
            .into_iter()
            .flatten()
            {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            }
        }
        Ok(config)
    }

    /// Parses TOML text.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text)
            .map_err(|e| ConfigError { origin: origin.into(), message: e.to_string().trim_end().into() })
    }

    /// Checks values serde cannot; returns the parsed join ticket.
    pub fn validate(&self, origin: &str) -> Result<JoinTicket, ConfigError> {
        let err = |message: String| ConfigError { origin: origin.into(), message };
        let ticket = JoinTicket::parse(&self.join).map_err(|e| err(format!("join: {e}")))?;
        if ticket.fingerprint.is_none() && self.server_ca_file.is_none() {
            return Err(err(
                "join: has no fp= fingerprint and server_ca_file is not set; one is needed to trust the server".into(),
            ));
        }
        self.validate_routes().map_err(err)?;
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => return Err(err("key_file must be set when cert_file is".into())),
            (None, Some(_)) => return Err(err("cert_file must be set when key_file is".into())),
            _ => {}
        }
        if let Some(addr) = self.status_listen {
            if !addr.ip().is_loopback() {
                return Err(err(format!("status_listen = {addr:?} must be a loopback address (127.0.0.0/8 or ::1)")));
            }
        }
        if let Some(ep) = &self.public_endpoint {
            let ok = match ep.strip_prefix(':') {
                Some(port) => port.parse::<u16>().is_ok_and(|p| p != 0),
                None => ep.parse::<SocketAddr>().is_ok_and(|a| a.port() != 0 && !a.ip().is_unspecified()),
            };
            if !ok {
                return Err(err(format!("public_endpoint = {ep:?} must be ip:port or :port")));
            }
            if self.direct_listen.is_none() {
                return Err(err("public_endpoint needs direct_listen (the agent serves the endpoint itself)".into()));
            }
            if self.mode != Mode::Terminate {
                return Err(err("public_endpoint needs mode = \"terminate\" (the agent answers probes in TLS)".into()));
            }
        }
        self.http3.validate().map_err(err)?;
        if !(1..=16).contains(&self.connections) {
            return Err(err(format!("connections = {} must be between 1 and 16", self.connections)));
        }
        if let Some(r) = &self.replica {
            if r.is_empty() || r.len() > 64 || !r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return Err(err(format!("replica = {r:?} must be 1 to 64 letters, digits, '-' or '_'")));
            }
        }
        if self.reconnect.shutdown_spread_ms > 600_000 {
            return Err(err(format!(
                "reconnect.shutdown_spread_ms = {} must be at most 600000",
                self.reconnect.shutdown_spread_ms
            )));
        }
        if self.drain_timeout_secs > 3600 {
            return Err(err(format!("drain_timeout_secs = {} must be at most 3600", self.drain_timeout_secs)));
        }
        if self.reconnect.initial_ms == 0 || self.reconnect.max_ms < self.reconnect.initial_ms {
            return Err(err(format!(
                "reconnect.initial_ms = {} must be at least 1 and at most reconnect.max_ms = {}",
                self.reconnect.initial_ms, self.reconnect.max_ms
            )));
        }
        self.tunnel.validate("tunnel").map_err(err)?;
        self.runtime.validate("runtime").map_err(err)?;
        if self.acme.flow == AcmeFlow::Node {
            self.acme.settings().validate("acme").map_err(err)?;
        } else if !self.acme.directories.is_empty() {
            return Err(err("acme.directories: only used with acme.flow = \"node\"".into()));
        }
        self.acme.renewal.validate("acme.renewal").map_err(err)?;
        Ok(ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join() -> String {
        let token = edge_proto::join::make_token("n1", &[7; 32]);
        format!("edge://{token}@127.0.0.1:4433?fp={}", "ab".repeat(32))
    }

    #[test]
    fn valid_minimal() {
        let text = format!("join = {:?}\nupstream = \"127.0.0.1:3000\"\n", join());
        let c = AgentConfig::parse(&text, "agent.toml").unwrap();
        let ticket = c.validate("agent.toml").unwrap();
        assert_eq!(ticket.node(), "n1");
        assert!(!format!("{c:?}").contains(&ticket.token), "Debug hides the token");
    }

    #[test]
    fn http3_with_only_passthrough_routes_is_noticed() {
        let j = join();
        let parse = |extra: &str| AgentConfig::parse(&format!("join = {j:?}\n{extra}"), "agent.toml").unwrap();
        let on = "[http3]\nenabled = true\n";
        assert!(!parse(&format!("upstream = \"h:1\"\n{on}")).http3_has_nothing_to_serve());
        assert!(parse(&format!("upstream = \"h:1\"\nmode = \"passthrough\"\n{on}")).http3_has_nothing_to_serve());
        let mixed = format!(
            "mode = \"passthrough\"\n[[routes]]\nhost = \"n1.edge.test\"\nupstreams = [\"h:1\"]\nmode = \"terminate\"\n{on}"
        );
        assert!(!parse(&mixed).http3_has_nothing_to_serve(), "one route terminates");
        assert!(!parse("upstream = \"h:1\"\nmode = \"passthrough\"\n").http3_has_nothing_to_serve(), "http3 off");
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../examples/agent.toml");
        let c = AgentConfig::parse(text, "examples/agent.toml").unwrap();
        let ticket = c.validate("examples/agent.toml").unwrap();
        assert_eq!(ticket.node(), "web1");
        assert_eq!(c.status_listen, Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(c.acme.flow, AcmeFlow::Server);
        assert!((c.acme.renewal.fraction - 0.6667).abs() < 1e-9);
        assert_eq!(c.routes.len(), 2);
        assert_eq!(c.routes[1].mode, Some(Mode::Passthrough));
        assert_eq!(c.routes[0].health.as_ref().map(|h| h.check), Some(CheckKind::Http));
        assert!(c.http3.enabled && c.http3.max_connections == 4096 && c.http3.idle_timeout_secs == 30);
    }

    #[test]
    fn routes_parse_with_defaults() {
        let text = format!(
            "join = {:?}\nupstream = \"127.0.0.1:3000\"\nmode = \"passthrough\"\n\
             [[routes]]\nhost = \"api.n1.z.test\"\nupstreams = [\"127.0.0.1:4000\", \"127.0.0.1:4001\"]\n\
             mode = \"terminate\"\n[routes.health]\ncheck = \"http\"\npath = \"/healthz\"\n\
             [[routes]]\nhost = \"*.n1.z.test\"\nupstreams = [\"127.0.0.1:5000\"]\n",
            join()
        );
        let c = AgentConfig::parse(&text, "agent.toml").unwrap();
        c.validate("agent.toml").unwrap();
        assert_eq!(c.routes.len(), 2);
        let h = c.routes[0].health.as_ref().unwrap();
        assert_eq!(
            (h.check, h.path.as_str(), h.interval_ms, h.rise, h.fall),
            (CheckKind::Http, "/healthz", 2000, 2, 2)
        );
        assert_eq!(c.routes[1].mode, None, "inherits the top-level mode later");
        let mut other = c.clone();
        other.routes.pop();
        other.alpn = vec!["h2".into()];
        assert!(c.restart_only_changes(&other).is_empty(), "routes and alpn reload");
        other.connections = 3;
        assert_eq!(c.restart_only_changes(&other), vec!["connections"]);
    }

    #[test]
    fn errors_name_the_field() {
        let j = join();
        let cases = [
            (format!("join = {j:?}\nupstream = \"nope\""), "upstream"),
            ("join = \"x\"\nupstream = \"h:1\"".to_string(), "join"),
            (format!("join = {j:?}\nupstream = \"h:1\"\nstatus_listen = \"0.0.0.0:9\""), "status_listen"),
            (format!("join = {j:?}\nupstream = \"h:1\"\nmode = \"bogus\""), "mode"),
            (format!("join = {j:?}\nupstream = \"h:1\"\n[reconnect]\ninitial_ms = 0"), "reconnect.initial_ms"),
            (format!("join = {j:?}\nupstream = \"h:1\"\ncert_file = \"c.pem\""), "key_file"),
            (format!("join = {j:?}\nupstream = \"h:1\"\n[acme]\nflow = \"node\""), "acme.directories"),
            (format!("join = {j:?}\nupstream = \"h:1\"\n[acme.renewal]\nfraction = 2.0"), "acme.renewal.fraction"),
            (format!("join = {j:?}"), "upstream"),
            (format!("join = {j:?}\n[[services]]\nname = \"SSH\"\ntarget = \"h:22\""), "services[0].name"),
            (format!("join = {j:?}\n[[services]]\nname = \"ssh\"\ntarget = \"h\""), "services[0].target"),
            (
                format!("join = {j:?}\n[[services]]\nname = \"a\"\ntarget = \"h:1\"\n[[services]]\nname = \"a\"\ntarget = \"h:2\""),
                "services[1].name",
            ),
            (format!("join = {j:?}\n[[routes]]\nhost = \"a..b\"\nupstreams = [\"h:1\"]"), "routes[0].host"),
            (format!("join = {j:?}\n[[routes]]\nhost = \"a.b\"\nupstreams = []"), "routes[0].upstreams"),
            (format!("join = {j:?}\n[[routes]]\nhost = \"a.b\"\nupstreams = [\"h\"]"), "routes[0].upstreams"),
            (
                format!("join = {j:?}\n[[routes]]\nhost = \"a.b\"\nupstreams = [\"h:1\"]\n[[routes]]\nhost = \"A.b\"\nupstreams = [\"h:2\"]"),
                "routes[1].host",
            ),
            (format!("join = {j:?}\nupstream = \"h:1\"\n[[routes]]\nhost = \"*\"\nupstreams = [\"h:2\"]"), "routes[0].host"),
            (
                format!("join = {j:?}\n[[routes]]\nhost = \"a.b\"\nupstreams = [\"h:1\"]\nmode = \"passthrough\"\n[routes.health]\ncheck = \"http\""),
                "routes[0].health.check",
            ),
            (
                format!("join = {j:?}\n[[routes]]\nhost = \"a.b\"\nupstreams = [\"h:1\"]\n[routes.health]\ntimeout_ms = 5000\ninterval_ms = 1000"),
                "routes[0].health.timeout_ms",
            ),
            (format!("join = {j:?}\n[[routes]]\nhost = \"a.b\"\nupstreams = [\"h:1\"]\nbogus = 1"), "bogus"),
            (format!("join = {j:?}\n[health]\ncheck = \"tcp\"\n[[routes]]\nhost = \"a.b\"\nupstreams = [\"h:1\"]"), "health"),
            (format!("join = {j:?}\nupstream = \"h:1\"\n[http3]\nmax_connections = 0"), "http3.max_connections"),
            (
                format!("join = {j:?}\nupstream = \"h:1\"\n[http3]\nmax_streams_per_connection = 0"),
                "http3.max_streams_per_connection",
            ),
            (format!("join = {j:?}\nupstream = \"h:1\"\n[http3]\nidle_timeout_secs = 60"), "http3.idle_timeout_secs"),
            (format!("join = {j:?}\nupstream = \"h:1\"\n[http3]\nenable = true"), "enable"),
        ];
        for (text, field) in cases {
            let err = AgentConfig::parse(&text, "agent.toml").and_then(|c| c.validate("agent.toml").map(|_| ()));
            let msg = err.unwrap_err().to_string();
            assert!(msg.starts_with("agent.toml") && msg.contains(field), "{msg:?} should name {field}");
        }
    }
}
