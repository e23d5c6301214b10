//! Server configuration: TOML, parsed separately from reading the file, then
//! validated; every error names the field (and the file, when read from one).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use edge_net::logging::LogFormat;
use edge_net::quic::TunnelTuning;
use serde::Deserialize;

/// Everything `edge-server` needs to run.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The DNS zone nodes live in: node `n1` owns `n1.<zone>` and `*.n1.<zone>`.
    pub zone: String,
    /// Directory for the server identity, the admin token and (by default)
    /// the SQLite database.
    pub data_dir: PathBuf,
    /// Where the state is: SQLite in `data_dir` (default) or PostgreSQL.
    #[serde(default)]
    pub store: crate::store::StoreConfig,
    /// Listen addresses.
    #[serde(default)]
    pub listen: ListenConfig,
    /// Addresses agents dial, written into join strings.
    #[serde(default)]
    pub public: PublicConfig,
    /// Server certificate for QUIC and the signal API; self-signed if unset.
    #[serde(default)]
    pub identity: IdentityConfig,
    /// Admin bearer token for `GET /api/nodes`; generated into
    /// `<data_dir>/admin.token` when unset.
    #[serde(default)]
    pub admin_token: Option<Secret>,
    /// Limits on client connections.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// QUIC tunnel tuning.
    #[serde(default)]
    pub tunnel: TunnelTuning,
    /// Threads of the async runtime (needs a restart).
    #[serde(default)]
    pub runtime: edge_net::runtime::RuntimeConfig,
    /// Log format, `text` or `json`.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Log filter (`info`, `info,edge_server::tunnel=debug`, ...) when
    /// `RUST_LOG` is unset; a reload (SIGHUP) applies a new one.
    #[serde(default)]
    pub log_filter: Option<String>,
    /// Authoritative DNS for the zone; off when the section is absent.
    #[serde(default)]
    pub dns: Option<DnsConfig>,
    /// ACME for nodes' certificates (CSR flow); needs `[dns]`.
    #[serde(default)]
    pub acme: Option<AcmeConfig>,
    /// Direct/proxy mode detection.
    #[serde(default)]
    pub modes: ModesConfig,
    /// How this server takes part in a cluster of servers sharing one
    /// store (PostgreSQL). A single server registers itself too.
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// Operators' dashboard and admin API on `listen.admin`: sessions,
    /// login limits, the certificate it shows browsers.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Customers' own domains (`edge-server domain add`): how their
    /// ownership is checked.
    #[serde(default)]
    pub domains: DomainsConfig,
}

/// How customers' own domains are verified.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DomainsConfig {
    /// The DNS resolver asked for `_edge-verify.<domain>` TXT records,
    /// `ip:port` (a recursive resolver, or for tests and private DNS the
    /// authoritative server itself); default: the first `nameserver` of
    /// `/etc/resolv.conf`.
    pub resolver: Option<SocketAddr>,
    /// Seconds between checks of a domain that is not verified yet (or
    /// whose last check failed).
    pub check_interval_secs: u64,
    /// Seconds between re-checks of a verified domain.
    pub recheck_interval_secs: u64,
    /// Seconds a verified domain keeps routing after its TXT record went
    /// missing; then it stops until the record is back.
    pub grace_secs: u64,
    /// Deadline of one lookup, in milliseconds.
    pub lookup_timeout_ms: u64,
}

impl Default for DomainsConfig {
    fn default() -> Self {
        Self {
            resolver: None,
            check_interval_secs: 60,
            recheck_interval_secs: 3600,
            grace_secs: 3 * 86_400,
            lookup_timeout_ms: 3000,
        }
    }
}

impl DomainsConfig {
    fn validate(&self) -> Result<(), String> {
        if !(1..=86_400).contains(&self.check_interval_secs) {
            return Err(format!(
                "domains.check_interval_secs = {} must be between 1 and 86400",
                self.check_interval_secs
            ));
        }
        if self.recheck_interval_secs < self.check_interval_secs || self.recheck_interval_secs > 7 * 86_400 {
            return Err(format!(
                "domains.recheck_interval_secs = {} must be at least domains.check_interval_secs ({}) and at most 604800",
                self.recheck_interval_secs, self.check_interval_secs
            ));
        }
        if self.grace_secs > 90 * 86_400 {
            return Err(format!("domains.grace_secs = {} must be at most 7776000 (90 days)", self.grace_secs));
        }
        if !(100..=30_000).contains(&self.lookup_timeout_ms) {
            return Err(format!(
                "domains.lookup_timeout_ms = {} must be between 100 and 30000",
                self.lookup_timeout_ms
            ));
        }
        if self.resolver.is_some_and(|r| r.port() == 0 || r.ip().is_unspecified()) {
            return Err(format!("domains.resolver = {:?} must be an address with a port", self.resolver));
        }
        Ok(())
    }

    /// The check timings.
    pub fn policy(&self) -> edge_proto::domains::CheckPolicy {
        edge_proto::domains::CheckPolicy {
            pending_interval_secs: self.check_interval_secs as i64,
            recheck_interval_secs: self.recheck_interval_secs as i64,
            grace_secs: self.grace_secs as i64,
        }
    }
}

/// The dashboard and `/api/v1` for operators.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// PEM certificate chain for `listen.admin` (default: the server
    /// identity, which browsers do not trust without an exception).
    pub cert_file: Option<PathBuf>,
    /// PEM private key for `cert_file`.
    pub key_file: Option<PathBuf>,
    /// A session ends after this long without a request.
    pub session_idle_secs: u64,
    /// A session ends this long after login, however busy.
    pub session_max_secs: u64,
    /// Failed logins allowed per source address, and per user name, in any
    /// minute; beyond it logins are refused with 429 until the minute ends.
    pub login_failures_per_minute: u32,
    /// Origins (`https://host:port`) the browser may send changes from,
    /// besides the one the request is addressed to (a reverse proxy's).
    pub allowed_origins: Vec<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            session_idle_secs: 30 * 60,
            session_max_secs: 12 * 3600,
            login_failures_per_minute: 5,
            allowed_origins: Vec::new(),
        }
    }
}

impl AdminConfig {
    fn validate(&self) -> Result<(), String> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err("admin.cert_file and admin.key_file: set both or neither".into());
        }
        if !(60..=7 * 86_400).contains(&self.session_idle_secs) {
            return Err(format!("admin.session_idle_secs = {} must be between 60 and 604800", self.session_idle_secs));
        }
        if self.session_max_secs < self.session_idle_secs || self.session_max_secs > 30 * 86_400 {
            return Err(format!(
                "admin.session_max_secs = {} must be at least admin.session_idle_secs ({}) and at most 2592000",
                self.session_max_secs, self.session_idle_secs
            ));
        }
        if !(1..=1000).contains(&self.login_failures_per_minute) {
            return Err(format!(
                "admin.login_failures_per_minute = {} must be between 1 and 1000",
                self.login_failures_per_minute
            ));
        }
        for (i, o) in self.allowed_origins.iter().enumerate() {
            let ok = o.strip_prefix("https://").is_some_and(|rest| !rest.is_empty() && !rest.contains('/'));
            if !ok {
                return Err(format!("admin.allowed_origins[{i}] = {o:?} must be https://host[:port]"));
            }
        }
        Ok(())
    }
}

/// This server as a member of the cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Name for operators (`cluster status`, logs); default: the host of
    /// `public.quic`, else `edge-<id>`.
    pub name: Option<String>,
    /// `host:port` other servers dial to forward client connections to
    /// this one (QUIC, the agents' port); default `public.quic`.
    pub peer: Option<String>,
    /// Address of this server's DNS other servers query to check that a
    /// DNS-01 value is served everywhere; default the DNS listener, when
    /// it is not a wildcard.
    pub dns: Option<SocketAddr>,
    /// Liveness lease: a server that has not renewed it for this long
    /// counts as gone (drops out of DNS answers and agents' lists).
    pub lease_ms: u64,
    /// How often the lease is renewed (and the cluster re-read).
    pub renew_ms: u64,
    /// Lease of the mode decider: how long a stalled decider blocks
    /// another from taking over.
    pub decider_lease_ms: u64,
    /// Every live server probes nodes' endpoints too (with
    /// `modes.probe_locations`): a node is direct only if every location
    /// reaches it.
    pub probe_from_peers: bool,
    /// How long a DNS-01 value may take to be served by every live server.
    pub publish_timeout_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            name: None,
            peer: None,
            dns: None,
            lease_ms: 6_000,
            renew_ms: 2_000,
            decider_lease_ms: 6_000,
            probe_from_peers: true,
            publish_timeout_ms: 10_000,
        }
    }
}

impl ClusterConfig {
    fn validate(&self) -> Result<(), String> {
        if let Some(name) = &self.name {
            let plain = |b: u8| b.is_ascii_alphanumeric() || b"-_.".contains(&b);
            if name.is_empty() || name.len() > 64 || !name.bytes().all(plain) {
                return Err(format!("cluster.name = {name:?} must be 1 to 64 of A-Z a-z 0-9 - _ ."));
            }
        }
        if let Some(peer) = &self.peer {
            let ok =
                peer.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
            if !ok {
                return Err(format!("cluster.peer = {peer:?} must be host:port"));
            }
        }
        if !(100..=60_000).contains(&self.renew_ms) {
            return Err(format!("cluster.renew_ms = {} must be between 100 and 60000", self.renew_ms));
        }
        if self.lease_ms < 2 * self.renew_ms || self.lease_ms > 600_000 {
            return Err(format!(
                "cluster.lease_ms = {} must be at least twice cluster.renew_ms ({}) and at most 600000",
                self.lease_ms, self.renew_ms
            ));
        }
        if self.decider_lease_ms < 2 * self.renew_ms || self.decider_lease_ms > 600_000 {
            return Err(format!(
                "cluster.decider_lease_ms = {} must be at least twice cluster.renew_ms ({}) and at most 600000",
                self.decider_lease_ms, self.renew_ms
            ));
        }
        if !(500..=300_000).contains(&self.publish_timeout_ms) {
            return Err(format!(
                "cluster.publish_timeout_ms = {} must be between 500 and 300000",
                self.publish_timeout_ms
            ));
        }
        Ok(())
    }
}

/// How the detector decides direct or proxy mode.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModesConfig {
    /// Time between probes of each node's endpoint.
    pub probe_interval_ms: u64,
    /// Deadline for one probe (connect, TLS, answer).
    pub probe_timeout_ms: u64,
    /// Consecutive failed probes that end direct mode.
    pub failures_to_proxy: u32,
    /// Probe samples kept per node.
    pub samples_kept: usize,
    /// Other edge servers that probe too; a probe round succeeds only when
    /// this server and every location verified the node.
    pub probe_locations: Vec<ProbeLocation>,
    /// Accept loopback endpoints (127.0.0.0/8, ::1): for a server and its
    /// nodes on one machine (tests, local demos). Off, as on any real
    /// server: a loopback endpoint is the server itself.
    pub allow_loopback_endpoints: bool,
}

impl Default for ModesConfig {
    fn default() -> Self {
        Self {
            probe_interval_ms: 10_000,
            probe_timeout_ms: 3_000,
            failures_to_proxy: 3,
            samples_kept: 20,
            probe_locations: Vec::new(),
            allow_loopback_endpoints: false,
        }
    }
}

/// Another edge-server asked to probe (`POST /api/probe` on its API).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeLocation {
    /// Its signal API, `host:port`.
    pub api: String,
    /// Its admin token.
    pub admin_token: Secret,
    /// SHA-256 of its identity certificate (hex), as in join strings.
    pub fingerprint: String,
}

/// Authoritative DNS for the zone (UDP and TCP on one address).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Address for UDP and TCP, e.g. `0.0.0.0:53`.
    pub listen: SocketAddr,
    /// Cluster ingress addresses answered for node names (A and AAAA).
    /// Defaults to the `listen.tls` address when that is not a wildcard.
    #[serde(default)]
    pub addresses: Vec<std::net::IpAddr>,
    /// NS names at the apex; default `ns.<zone>` (answered with `addresses`).
    #[serde(default)]
    pub nameservers: Vec<String>,
    /// SOA responsible mailbox as a name; default `hostmaster.<zone>`.
    #[serde(default)]
    pub hostmaster: Option<String>,
    /// TTL of node A/AAAA records.
    #[serde(default = "default_address_ttl")]
    pub address_ttl_secs: u32,
    /// TTL of DNS-01 TXT records.
    #[serde(default = "default_txt_ttl")]
    pub txt_ttl_secs: u32,
    /// TTL of SOA and NS records.
    #[serde(default = "default_zone_ttl")]
    pub zone_ttl_secs: u32,
    /// SOA minimum: how long resolvers may cache "no such name". Short, so a
    /// new node's name resolves within seconds.
    #[serde(default = "default_negative_ttl")]
    pub negative_ttl_secs: u32,
    /// Extra records, e.g. the server's own name.
    #[serde(default)]
    pub records: Vec<StaticRecord>,
}

fn default_address_ttl() -> u32 {
    30
}
fn default_txt_ttl() -> u32 {
    5
}
fn default_zone_ttl() -> u32 {
    3600
}
fn default_negative_ttl() -> u32 {
    5
}

/// A static record in the zone.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticRecord {
    /// Owner name, absolute (`www.edge.example.com` or with a trailing dot)
    /// or relative to the zone (`www`, `@` for the apex).
    pub name: String,
    /// `A`, `AAAA` or `TXT`.
    #[serde(rename = "type")]
    pub kind: StaticKind,
    /// Address or text.
    pub value: String,
    /// TTL; default 300.
    #[serde(default = "default_static_ttl")]
    pub ttl_secs: u32,
}

fn default_static_ttl() -> u32 {
    300
}

pub use crate::store::StaticKind;

/// Which part of a static record is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordField {
    /// The name is not in the zone.
    Name,
    /// The value does not fit the type.
    Value,
}

/// A parsed static CAA value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaaValue {
    /// Flag 128: the CA must understand the tag.
    pub critical: bool,
    /// `issue` (false) or `issuewild` (true).
    pub wildcard: bool,
    /// The CA's domain; `None` for `";"` (no CA may issue).
    pub issuer: Option<String>,
    /// Parameters such as `validationmethods=dns-01`.
    pub parameters: Vec<(String, String)>,
}

impl CaaValue {
    /// Parses `<flags> <tag> "<value>"` (tags `issue` and `issuewild`).
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.trim().splitn(3, ' ');
        let critical = match parts.next()? {
            "0" => false,
            "128" => true,
            _ => return None,
        };
        let wildcard = match parts.next()? {
            "issue" => false,
            "issuewild" => true,
            _ => return None,
        };
        let value = parts.next()?.trim().strip_prefix('"')?.strip_suffix('"')?;
        let mut fields = value.split(';').map(str::trim);
        let issuer = match fields.next()? {
            "" => None,
            ca => Some(edge_proto::names::normalize_hostname(ca)?),
        };
        let mut parameters = Vec::new();
        for field in fields.filter(|f| !f.is_empty()) {
            let (key, val) = field.split_once('=')?;
            let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b';');
            if !key.bytes().all(|b| b.is_ascii_alphanumeric()) || key.is_empty() || !plain(val) {
                return None;
            }
            parameters.push((key.to_string(), val.to_string()));
        }
        Some(Self { critical, wildcard, issuer, parameters })
    }
}

/// ACME on the server: it holds the account and completes orders for the
/// CSRs agents send (`POST /api/signal/certificate`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// Directories, contact, custom root CA.
    #[serde(flatten)]
    pub settings: edge_certs::acme::AcmeSettings,
    /// How long one order may take, directory by directory.
    #[serde(default = "default_order_timeout")]
    pub order_timeout_secs: u64,
    /// CAA issuer domains published at the zone apex, each allowed DNS-01
    /// only (RFC 8657). Unset: derived from the directories of well-known
    /// CAs (Let's Encrypt → `letsencrypt.org`, ZeroSSL → `sectigo.com`,
    /// Google → `pki.goog`, Buypass → `buypass.com`, SSL.com → `ssl.com`);
    /// any other directory needs it set. `[]` publishes no CAA.
    #[serde(default)]
    pub caa_issuers: Option<Vec<String>>,
}

/// CAA issuer domains of well-known ACME directories, by directory host.
const KNOWN_CAA: [(&str, &str); 8] = [
    ("acme-v02.api.letsencrypt.org", "letsencrypt.org"),
    ("acme-staging-v02.api.letsencrypt.org", "letsencrypt.org"),
    ("acme.zerossl.com", "sectigo.com"),
    ("dv.acme-v02.api.pki.goog", "pki.goog"),
    ("dv.acme-v02.test-api.pki.goog", "pki.goog"),
    ("api.buypass.com", "buypass.com"),
    ("api.test4.buypass.no", "buypass.com"),
    ("acme.ssl.com", "ssl.com"),
];

impl AcmeConfig {
    /// The CAA issuer domains to publish: configured, or derived from the
    /// directories; an error names the field when neither works.
    pub fn caa_issuers(&self) -> Result<Vec<String>, String> {
        if let Some(list) = &self.caa_issuers {
            for (i, ca) in list.iter().enumerate() {
                if edge_proto::names::normalize_hostname(ca).as_deref() != Some(ca.as_str()) {
                    return Err(format!("acme.caa_issuers[{i}] = {ca:?} is not a lowercase domain name"));
                }
            }
            return Ok(list.clone());
        }
        let mut issuers = Vec::new();
        for url in &self.settings.directories {
            let host = url.trim_start_matches("https://").split(['/', ':']).next().unwrap_or("");
            let Some((_, ca)) = KNOWN_CAA.iter().find(|(h, _)| *h == host) else {
                return Err(format!(
                    "acme.caa_issuers: set it for {url:?} (the CA's CAA domain, e.g. [\"letsencrypt.org\"]), or to [] \
                     to publish no CAA record"
                ));
            };
            if !issuers.iter().any(|i| i == ca) {
                issuers.push(ca.to_string());
            }
        }
        Ok(issuers)
    }
}

fn default_order_timeout() -> u64 {
    180
}

impl DnsConfig {
    /// The addresses node names answer: configured, or the TLS listener's.
    pub fn ingress_addresses(&self, tls: SocketAddr) -> Vec<std::net::IpAddr> {
        if self.addresses.is_empty() && !tls.ip().is_unspecified() {
            vec![tls.ip()]
        } else {
            self.addresses.clone()
        }
    }

    /// Absolute lowercase name for a record name relative to `zone`.
    /// A name ending in `.` is absolute; others are relative unless they
    /// already end in the zone.
    pub fn absolute(name: &str, zone: &str) -> String {
        let absolute = name.ends_with('.');
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if name == "@" || name == zone {
            zone.to_string()
        } else if absolute || name.ends_with(&format!(".{zone}")) {
            name
        } else {
            format!("{name}.{zone}")
        }
    }

    /// First labels under the zone used by static records and in-zone
    /// nameservers: no node may take them (its certificate would cover an
    /// operator's name).
    pub fn reserved_labels(&self, zone: &str) -> Vec<String> {
        let names = self
            .records
            .iter()
            .map(|r| Self::absolute(&r.name, zone))
            .chain(self.nameservers.iter().map(|n| n.trim_end_matches('.').to_ascii_lowercase()))
            .chain(self.nameservers.is_empty().then(|| format!("ns.{zone}")));
        let mut labels: Vec<String> = names.filter_map(|n| Self::label_under(&n, zone)).collect();
        labels.sort();
        labels.dedup();
        labels
    }

    fn validate(&self, zone: &str, tls: SocketAddr) -> Result<(), String> {
        if self.ingress_addresses(tls).is_empty() {
            return Err(format!(
                "dns.addresses: required when listen.tls ({tls}) is a wildcard address; list the public \
                 addresses clients reach the cluster on"
            ));
        }
        for (i, ns) in self.nameservers.iter().enumerate() {
            if edge_proto::names::normalize_hostname(ns.trim_end_matches('.')).is_none() {
                return Err(format!("dns.nameservers[{i}] = {ns:?} is not a DNS name"));
            }
        }
        if let Some(h) = &self.hostmaster {
            if edge_proto::names::normalize_hostname(h.trim_end_matches('.')).is_none() {
                return Err(format!("dns.hostmaster = {h:?} is not a DNS name (write the mailbox as a name)"));
            }
        }
        for (field, v, max) in [
            ("address_ttl_secs", self.address_ttl_secs, 86_400),
            ("txt_ttl_secs", self.txt_ttl_secs, 3600),
            ("zone_ttl_secs", self.zone_ttl_secs, 604_800),
            ("negative_ttl_secs", self.negative_ttl_secs, 86_400),
        ] {
            if v > max {
                return Err(format!("dns.{field} = {v} must be at most {max}"));
            }
        }
        for (i, r) in self.records.iter().enumerate() {
            match Self::check_record(zone, &Self::absolute(&r.name, zone), r.kind, &r.value) {
                Err(RecordField::Name) => {
                    return Err(format!("dns.records[{i}].name = {:?} is not a name in the zone {zone}", r.name))
                }
                Err(RecordField::Value) => {
                    return Err(format!("dns.records[{i}].value = {:?} is not a valid {:?} value", r.value, r.kind))
                }
                Ok(()) => {}
            }
        }
        Ok(())
    }

    /// Checks a static record (from the config or for the store): `name`
    /// absolute in `zone`, `value` of the type's shape.
    pub fn check_record(zone: &str, name: &str, kind: StaticKind, value: &str) -> Result<(), RecordField> {
        let label_ok = edge_proto::names::normalize_hostname(name).is_some() || name.starts_with('_');
        if !label_ok || !(name == zone || name.ends_with(&format!(".{zone}"))) {
            return Err(RecordField::Name);
        }
        let ok = match kind {
            StaticKind::A => value.parse::<std::net::Ipv4Addr>().is_ok(),
            StaticKind::AAAA => value.parse::<std::net::Ipv6Addr>().is_ok(),
            StaticKind::TXT => value.len() <= 255,
            StaticKind::CAA => CaaValue::parse(value).is_some(),
        };
        if ok {
            Ok(())
        } else {
            Err(RecordField::Value)
        }
    }

    /// The first label under `zone` of an absolute name in it (what a node
    /// named so would own), if any.
    pub fn label_under(name: &str, zone: &str) -> Option<String> {
        let rest = name.strip_suffix(&format!(".{zone}"))?;
        Some(rest.rsplit('.').next().unwrap_or(rest).to_string())
    }
}

/// Listen addresses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// Public TLS (TCP) listener for clients.
    pub tls: SocketAddr,
    /// QUIC (UDP) listener for agents.
    pub quic: SocketAddr,
    /// Signal API (HTTPS over TCP).
    pub api: SocketAddr,
    /// Plain HTTP (redirects and Host-routed proxying); off when unset.
    pub http: Option<SocketAddr>,
    /// Plain HTTP listener for `/metrics` and `/healthz` without a token;
    /// off when unset. Bind it to loopback or a private network: on the API
    /// listener `/metrics` needs the admin token.
    pub metrics: Option<SocketAddr>,
    /// The operators' dashboard and admin API (HTTPS); off when unset.
    /// Keep it on a private address or behind a VPN.
    pub admin: Option<SocketAddr>,
    /// UDP listener for QUIC clients (HTTP/3), usually the TLS listener's
    /// address (`0.0.0.0:443`); off when unset. Each client is carried to
    /// the node named in its ClientHello, over the node's tunnel, to agents
    /// that enable `[http3]`.
    pub quic_clients: Option<SocketAddr>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            tls: "0.0.0.0:443".parse().unwrap_or(([0, 0, 0, 0], 443).into()),
            quic: ([0, 0, 0, 0], 4433).into(),
            api: ([0, 0, 0, 0], 4433).into(),
            http: None,
            metrics: None,
            admin: None,
            quic_clients: None,
        }
    }
}

/// Addresses as agents see them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicConfig {
    /// `host:port` agents dial over QUIC; defaults to the bound QUIC address.
    pub quic: Option<String>,
    /// `host:port` of the signal API; defaults to the bound API address.
    pub api: Option<String>,
}

/// Server certificate files.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// PEM certificate chain (e.g. CA-issued).
    pub cert_file: Option<PathBuf>,
    /// PEM private key.
    pub key_file: Option<PathBuf>,
}

/// Limits on client connections.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Deadline for a client to send its complete ClientHello.
    pub client_hello_timeout_ms: u64,
    /// Cap on the bytes read while looking for the SNI.
    pub client_hello_max_bytes: usize,
    /// How long open connections may drain after SIGTERM.
    pub drain_timeout_secs: u64,
    /// Deadline for opening a stream to an agent.
    pub open_stream_timeout_ms: u64,
    /// A spliced connection on which no byte moves either way for this long
    /// is closed (TCP reset, QUIC stream reset); checked once per period, so
    /// the close comes between one and two periods after the last byte.
    pub idle_timeout_secs: u64,
    /// Client connections open at once on the TLS and HTTP listeners
    /// together; beyond it new ones are closed at accept.
    pub max_connections: u32,
    /// Client connections open at once to one node.
    pub max_connections_per_node: u64,
    /// Connections one source address (IPv6: its /64) may hold open at once
    /// on :443 and :80 together, and on the API; 0 turns the check off.
    /// Without it a few dozen sources could hold every `max_connections`
    /// slot until the ClientHello deadline frees them.
    pub per_source_max_open: u32,
    /// Tunnels (agent connections, all replicas together) one node may
    /// hold; bounds what one token can take of the server.
    pub max_tunnels_per_node: usize,
    /// New connections per second from one source address (IPv6: its /64)
    /// on the TLS, HTTP, API and QUIC listeners, each counted on its own;
    /// 0 turns the check off.
    pub per_source_rate: u32,
    /// Connections a source may open at once before `per_source_rate`
    /// applies.
    pub per_source_burst: u32,
    /// DNS queries per second from one source; 0 turns the check off.
    /// Over it, UDP queries are dropped (no reflection) and TCP ones refused.
    pub dns_per_source_rate: u32,
    /// DNS queries a source may send at once.
    pub dns_per_source_burst: u32,
    /// Failed authentications (node tokens on QUIC, bearer tokens on the
    /// API) allowed per source and minute; beyond it the source's attempts
    /// are refused unchecked until the budget refills. 0: no limit.
    pub auth_failures_per_minute: u32,
    /// Requests per second one node (all its agents together) may make of
    /// the signal API (heartbeats, DNS-01 values, certificates); over it the
    /// server answers 429. 0 turns the check off.
    pub node_signal_rate: u32,
    /// Signal API requests a node may make at once before
    /// `node_signal_rate` applies.
    pub node_signal_burst: u32,
    /// Requests per second for `/metrics` from one source (each answer may
    /// be megabytes on a large cluster); 0 turns the check off.
    pub metrics_rate: u32,
    /// How long one rendering of `/metrics` is served to every scraper.
    pub metrics_cache_ms: u64,
    /// Sources tracked per limit (bounds memory under a spoofed flood).
    pub source_table_size: usize,
    /// How long a new client connection waits for the agent's first bytes
    /// before it is replayed on another tunnel of the node, if one is up.
    pub agent_answer_timeout_ms: u64,
    /// New QUIC client connections (first flights) one source (an IPv4
    /// address or an IPv6 /64) may start per second on
    /// `listen.quic_clients`; 0 turns the check off.
    pub quic_client_rate: u32,
    /// QUIC first flights one source may have waiting for their
    /// ClientHello at once.
    pub quic_client_pending: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            client_hello_timeout_ms: 10_000,
            client_hello_max_bytes: edge_proto::client_hello::DEFAULT_MAX_HELLO_BYTES,
            drain_timeout_secs: 30,
            open_stream_timeout_ms: 5_000,
            idle_timeout_secs: 600,
            max_connections: 20_000,
            max_connections_per_node: 10_000,
            per_source_max_open: 256,
            max_tunnels_per_node: 256,
            per_source_rate: 50,
            per_source_burst: 200,
            dns_per_source_rate: 200,
            dns_per_source_burst: 1000,
            auth_failures_per_minute: 10,
            node_signal_rate: 5,
            node_signal_burst: 30,
            metrics_rate: 2,
            metrics_cache_ms: 1000,
            source_table_size: 100_000,
            agent_answer_timeout_ms: 3_000,
            quic_client_rate: 50,
            quic_client_pending: 16,
        }
    }
}

/// A secret string: shown as `<redacted>` in `Debug`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("zone", &self.zone)
            .field("data_dir", &self.data_dir)
            .field("store", &self.store)
            .field("listen", &self.listen)
            .field("public", &self.public)
            .field("identity", &self.identity)
            .field("admin_token", &self.admin_token)
            .field("limits", &self.limits)
            .field("tunnel", &self.tunnel)
            .field("runtime", &self.runtime)
            .field("log_format", &self.log_format)
            .field("dns", &self.dns)
            .field("acme", &self.acme)
            .field("modes", &self.modes)
            .field("cluster", &self.cluster)
            .field("admin", &self.admin)
            .field("domains", &self.domains)
            .field("log_filter", &self.log_filter)
            .finish()
    }
}

/// A configuration error; the message names the file and field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax or a field of the wrong type (toml names the field).
    #[error("{origin}: {message}")]
    Parse {
        /// The file, or `<config>` when parsed from a string.
        origin: String,
        /// toml's message.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{origin}: {message}")]
    Invalid {
        /// The file, or `<config>`.
        origin: String,
        /// Names the field and value.
        message: String,
    },
}

impl ServerConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let mut config = Self::parse(&text, &path.display().to_string())?;
        // A relative data_dir is relative to the config file, not the cwd.
        if config.data_dir.is_relative() {
            if let Some(dir) = path.parent() {
                config.data_dir = dir.join(&config.data_dir);
            }
        }
        Ok(config)
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: ServerConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.validate().map_err(|message| ConfigError::Invalid { origin: origin.to_string(), message })?;
        Ok(config)
    }

    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        let zone = self.zone.trim_end_matches('.');
        if edge_proto::names::normalize_hostname(zone).as_deref() != Some(zone) || !zone.contains('.') {
            return Err(format!(
                "zone = {:?} must be a lowercase DNS name with at least two labels (e.g. \"edge.example.com\")",
                self.zone
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err("data_dir must not be empty".into());
        }
        self.store.validate()?;
        self.cluster.validate()?;
        self.admin.validate()?;
        self.domains.validate()?;
        if let Some(f) = &self.log_filter {
            edge_net::logging::check_filter(f).map_err(|e| format!("log_filter = {f:?}: {e}"))?;
        }
        for (field, value) in [("public.quic", &self.public.quic), ("public.api", &self.public.api)] {
            if let Some(v) = value {
                let ok =
                    v.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
                if !ok {
                    return Err(format!("{field} = {v:?} must be host:port"));
                }
            }
        }
        match (&self.identity.cert_file, &self.identity.key_file) {
            (Some(_), None) => return Err("identity.key_file must be set when identity.cert_file is".into()),
            (None, Some(_)) => return Err("identity.cert_file must be set when identity.key_file is".into()),
            _ => {}
        }
        if let Some(token) = &self.admin_token {
            if token.0.len() < 16 {
                return Err("admin_token must be at least 16 characters".into());
            }
        }
        let l = &self.limits;
        if !(100..=120_000).contains(&l.client_hello_timeout_ms) {
            return Err(format!(
                "limits.client_hello_timeout_ms = {} must be between 100 and 120000",
                l.client_hello_timeout_ms
            ));
        }
        if !(512..=1024 * 1024).contains(&l.client_hello_max_bytes) {
            return Err(format!(
                "limits.client_hello_max_bytes = {} must be between 512 and 1048576",
                l.client_hello_max_bytes
            ));
        }
        if l.drain_timeout_secs > 3600 {
            return Err(format!("limits.drain_timeout_secs = {} must be at most 3600", l.drain_timeout_secs));
        }
        if !(100..=60_000).contains(&l.open_stream_timeout_ms) {
            return Err(format!(
                "limits.open_stream_timeout_ms = {} must be between 100 and 60000",
                l.open_stream_timeout_ms
            ));
        }
        if !(1..=86_400).contains(&l.idle_timeout_secs) {
            return Err(format!("limits.idle_timeout_secs = {} must be between 1 and 86400", l.idle_timeout_secs));
        }
        if !(1..=10_000_000).contains(&l.max_connections) {
            return Err(format!("limits.max_connections = {} must be between 1 and 10000000", l.max_connections));
        }
        if l.max_connections_per_node == 0 {
            return Err("limits.max_connections_per_node must be at least 1".into());
        }
        if !(1..=100_000).contains(&l.max_tunnels_per_node) {
            return Err(format!(
                "limits.max_tunnels_per_node = {} must be between 1 and 100000",
                l.max_tunnels_per_node
            ));
        }
        for (field, rate, burst) in [
            ("per_source", l.per_source_rate, l.per_source_burst),
            ("dns_per_source", l.dns_per_source_rate, l.dns_per_source_burst),
            ("node_signal", l.node_signal_rate, l.node_signal_burst),
        ] {
            if rate > 0 && burst == 0 {
                return Err(format!("limits.{field}_burst must be at least 1 when limits.{field}_rate is set"));
            }
        }
        if l.metrics_cache_ms > 60_000 {
            return Err(format!("limits.metrics_cache_ms = {} must be at most 60000", l.metrics_cache_ms));
        }
        if !(1..=10_000_000).contains(&l.source_table_size) {
            return Err(format!("limits.source_table_size = {} must be between 1 and 10000000", l.source_table_size));
        }
        if !(100..=600_000).contains(&l.agent_answer_timeout_ms) {
            return Err(format!(
                "limits.agent_answer_timeout_ms = {} must be between 100 and 600000",
                l.agent_answer_timeout_ms
            ));
        }
        if !(1..=4096).contains(&l.quic_client_pending) {
            return Err(format!("limits.quic_client_pending = {} must be between 1 and 4096", l.quic_client_pending));
        }
        if let Some(dns) = &self.dns {
            dns.validate(self.zone(), self.listen.tls)?;
        }
        if self.listen.quic_clients.is_some_and(|q| q == self.listen.quic && q.port() != 0) {
            return Err(format!(
                "listen.quic_clients = {} is listen.quic's address: agents and QUIC clients need UDP ports of their own",
                self.listen.quic
            ));
        }
        let m = &self.modes;
        if !(100..=3_600_000).contains(&m.probe_interval_ms) {
            return Err(format!("modes.probe_interval_ms = {} must be between 100 and 3600000", m.probe_interval_ms));
        }
        if !(100..=60_000).contains(&m.probe_timeout_ms) {
            return Err(format!("modes.probe_timeout_ms = {} must be between 100 and 60000", m.probe_timeout_ms));
        }
        if !(1..=100).contains(&m.failures_to_proxy) {
            return Err(format!("modes.failures_to_proxy = {} must be between 1 and 100", m.failures_to_proxy));
        }
        if !(1..=1000).contains(&m.samples_kept) {
            return Err(format!("modes.samples_kept = {} must be between 1 and 1000", m.samples_kept));
        }
        for (i, l) in m.probe_locations.iter().enumerate() {
            if !l.api.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0)) {
                return Err(format!("modes.probe_locations[{i}].api = {:?} must be host:port", l.api));
            }
            if edge_proto::join::parse_fingerprint(&l.fingerprint).is_none() {
                return Err(format!("modes.probe_locations[{i}].fingerprint must be 64 hex digits"));
            }
        }
        if let Some(acme) = &self.acme {
            if self.dns.is_none() {
                return Err("acme: needs a [dns] section (the server publishes DNS-01 records in its own zone)".into());
            }
            acme.settings.validate("acme")?;
            acme.caa_issuers()?;
            if !(10..=3600).contains(&acme.order_timeout_secs) {
                return Err(format!(
                    "acme.order_timeout_secs = {} must be between 10 and 3600",
                    acme.order_timeout_secs
                ));
            }
        }
        self.tunnel.validate("tunnel")?;
        self.runtime.validate("runtime")
    }

    /// The zone without a trailing dot.
    pub fn zone(&self) -> &str {
        self.zone.trim_end_matches('.')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "zone = \"edge.test\"\ndata_dir = \"/tmp/x\"\n";

    #[test]
    fn minimal_config_has_defaults() {
        let c = ServerConfig::parse(MINIMAL, "t").unwrap();
        assert_eq!(c.listen.tls.port(), 443);
        assert_eq!(c.limits.client_hello_max_bytes, 16 * 1024);
        assert_eq!(c.tunnel.max_streams, 10_000);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("zone = \"Bad Zone\"\ndata_dir = \"x\"", "zone"),
            (&format!("{MINIMAL}bogus = 1"), "bogus"),
            (&format!("{MINIMAL}[limits]\nclient_hello_max_bytes = 1"), "limits.client_hello_max_bytes"),
            (&format!("{MINIMAL}[tunnel]\nkeep_alive_secs = 60"), "tunnel.keep_alive_secs"),
            (&format!("{MINIMAL}[limits]\nquic_client_pending = 0"), "limits.quic_client_pending"),
            (&format!("{MINIMAL}[listen]\ntls = \"nope\""), "tls"),
            (&format!("{MINIMAL}[listen]\nquic = \"0.0.0.0:4433\"\nquic_clients = \"0.0.0.0:4433\""), "listen.quic_clients"),
            (&format!("{MINIMAL}[public]\nquic = \"host\""), "public.quic"),
            (&format!("{MINIMAL}admin_token = \"short\""), "admin_token"),
            (&format!("{MINIMAL}[dns]\nlisten = \"127.0.0.1:53\""), "dns.addresses"),
            (
                &format!("{MINIMAL}[dns]\nlisten = \"127.0.0.1:53\"\naddresses = [\"192.0.2.1\"]\n[[dns.records]]\nname = \"www.other.com.\"\ntype = \"A\"\nvalue = \"192.0.2.2\""),
                "dns.records[0].name",
            ),
            (
                &format!("{MINIMAL}[dns]\nlisten = \"127.0.0.1:53\"\naddresses = [\"192.0.2.1\"]\n[[dns.records]]\nname = \"www\"\ntype = \"A\"\nvalue = \"::1\""),
                "dns.records[0].value",
            ),
            (&format!("{MINIMAL}[acme]\ndirectories = [\"https://ca/dir\"]"), "acme: needs a [dns]"),
            (&format!("{MINIMAL}[domains]\ncheck_interval_secs = 0"), "domains.check_interval_secs"),
            (&format!("{MINIMAL}[domains]\ncheck_interval_secs = 600\nrecheck_interval_secs = 60"), "domains.recheck_interval_secs"),
            (&format!("{MINIMAL}[domains]\nresolver = \"127.0.0.1:0\""), "domains.resolver"),
            (&format!("{MINIMAL}[domains]\nbogus = 1"), "bogus"),
            (
                &format!("{MINIMAL}[dns]\nlisten = \"127.0.0.1:53\"\naddresses = [\"192.0.2.1\"]\n[acme]\ndirectories = []"),
                "acme.directories",
            ),
        ];
        for (text, field) in cases {
            let err = ServerConfig::parse(text, "server.toml").unwrap_err().to_string();
            assert!(err.contains(field) && err.starts_with("server.toml"), "{err:?} should name {field}");
        }
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../examples/server.toml");
        let c = ServerConfig::parse(text, "examples/server.toml").unwrap();
        assert_eq!(c.zone(), "edge.example.com");
        assert_eq!(c.public.quic.as_deref(), Some("edge.example.com:4433"));
        assert_eq!(c.listen.quic_clients, Some("0.0.0.0:443".parse().unwrap()));
        let dns = c.dns.as_ref().unwrap();
        assert_eq!(dns.records.len(), 1);
        let acme = c.acme.as_ref().unwrap();
        assert_eq!(acme.caa_issuers().unwrap(), vec!["letsencrypt.org", "sectigo.com"], "derived from the directories");
        crate::dns::ZoneCell::from_config(dns, c.zone(), c.listen.tls, &acme.caa_issuers().unwrap()).unwrap();
        assert_eq!(acme.settings.directories.len(), 2);
        assert_eq!(c.domains.policy().recheck_interval_secs, 3600);
    }

    #[test]
    fn postgres_example_parses_and_masks_nothing_it_should_not() {
        let text = include_str!("../../examples/server-postgres.toml");
        let c = ServerConfig::parse(text, "examples/server-postgres.toml").unwrap();
        // The password file is read when the store opens, not when parsing.
        let err = c.store.location(&c.data_dir).unwrap_err().to_string();
        assert!(err.contains("store.password_file"), "{err}");
        let without_file = crate::store::StoreConfig { password_file: None, ..c.store.clone() };
        let crate::store::StoreLocation::Postgres(pg) = without_file.location(&c.data_dir).unwrap() else {
            panic!("not postgres")
        };
        assert_eq!(pg.describe, "postgres://edge@db.internal:5432/edge");
        assert_eq!(pg.tls, crate::store::StoreTls::VerifyFull);
        let shown = format!("{c:?}");
        assert!(shown.contains("db.internal"), "{shown}");
        let with_password = text.replace("edge@db.internal", "edge:hunter22@db.internal");
        let c = ServerConfig::parse(&with_password, "t").unwrap();
        assert!(!format!("{c:?}").contains("hunter22"), "check-config masks the URL's password");
    }

    #[test]
    fn operator_names_are_reserved() {
        let text = format!(
            "{MINIMAL}[dns]\nlisten = \"127.0.0.1:53\"\naddresses = [\"192.0.2.1\"]\n\
             nameservers = [\"ns1.dns.edge.test\", \"ns.other.example\"]\n\
             [[dns.records]]\nname = \"www\"\ntype = \"A\"\nvalue = \"192.0.2.2\"\n\
             [[dns.records]]\nname = \"@\"\ntype = \"TXT\"\nvalue = \"v=spf1 -all\"\n"
        );
        let c = ServerConfig::parse(&text, "t").unwrap();
        assert_eq!(c.dns.unwrap().reserved_labels("edge.test"), vec!["dns", "www"]);
    }

    #[test]
    fn caa_issuers_and_static_caa_values() {
        let dns = "[dns]\nlisten = \"127.0.0.1:53\"\naddresses = [\"192.0.2.1\"]\n";
        let unknown = format!("{MINIMAL}{dns}[acme]\ndirectories = [\"https://ca.internal/dir\"]\n");
        let err = ServerConfig::parse(&unknown, "t").unwrap_err().to_string();
        assert!(err.contains("acme.caa_issuers"), "{err}");
        let set = format!("{unknown}caa_issuers = [\"ca.internal\"]\n");
        assert_eq!(ServerConfig::parse(&set, "t").unwrap().acme.unwrap().caa_issuers().unwrap(), vec!["ca.internal"]);
        let off = format!("{unknown}caa_issuers = []\n");
        assert!(ServerConfig::parse(&off, "t").unwrap().acme.unwrap().caa_issuers().unwrap().is_empty());
        let bad = format!("{unknown}caa_issuers = [\"Not A Name\"]\n");
        assert!(ServerConfig::parse(&bad, "t").unwrap_err().to_string().contains("acme.caa_issuers[0]"));

        let v = CaaValue::parse("0 issue \"letsencrypt.org; validationmethods=dns-01\"").unwrap();
        assert_eq!((v.critical, v.wildcard, v.issuer.as_deref()), (false, false, Some("letsencrypt.org")));
        assert_eq!(v.parameters, vec![("validationmethods".to_string(), "dns-01".to_string())]);
        assert_eq!(CaaValue::parse("128 issuewild \";\"").unwrap().issuer, None);
        for bad in [
            "1 issue \"x.org\"",
            "0 iodef \"mailto:a@b\"",
            "0 issue x.org",
            "0 issue \"x.org; k\"",
            "0 issue \"x.org; k=\"a\"\"",
        ] {
            assert!(CaaValue::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn debug_masks_admin_token() {
        let c = ServerConfig::parse(&format!("{MINIMAL}admin_token = \"super-secret-admin-token\""), "t").unwrap();
        assert!(!format!("{c:?}").contains("super-secret"));
    }
}
