//! Operators' changes, shared by the admin API, the dashboard and the CLI:
//! each validates its input (naming the field at fault), makes its change
//! in the store, and records who did it in the audit log.

use std::sync::Arc;

use edge_proto::admin::{AuditAction, AuditEntry, CreatedToken, JoinCredentials, TokenScope};
use edge_proto::join::JoinTicket;

use crate::config::{DnsConfig, RecordField, ServerConfig};
use crate::store::{ApiTokenRecord, HttpMode, ServiceRecord, StaticKind, StaticRecord, Store, StoreError, UserRecord};

/// Why a change was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// A field's value is invalid (422).
    #[error("{field}: {reason}")]
    Invalid {
        /// The request field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The name exists, or collides with another (409).
    #[error("{message}")]
    Conflict {
        /// The field holding the name.
        field: &'static str,
        /// What it collides with.
        message: String,
    },
    /// No such thing (404).
    #[error("{0}")]
    NotFound(String),
    /// Join strings cannot be made: no address agents can dial is known.
    #[error("cannot tell agents where to connect: {0}")]
    NoAddress(String),
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
    /// Hashing a password failed.
    #[error(transparent)]
    Password(#[from] super::passwords::PasswordError),
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(message) => OpError::Conflict { field: "name", message },
            other => OpError::Store(other),
        }
    }
}

/// Who makes a change, from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// `user:NAME`, `token:NAME` or `cli:LOGIN`.
    pub who: String,
    /// The client's address, or `cli`.
    pub source: String,
}

impl Actor {
    /// The operator at this machine's shell.
    pub fn cli() -> Self {
        let login = std::env::var("SUDO_USER")
            .or_else(|_| std::env::var("USER"))
            .or_else(|_| std::env::var("LOGNAME"))
            .unwrap_or_else(|_| "unknown".into());
        let login: String =
            login.chars().filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c)).take(32).collect();
        Actor { who: format!("cli:{login}"), source: "cli".into() }
    }
}

/// Where agents reach this cluster, for join strings.
#[derive(Debug, Clone)]
pub struct JoinInfo {
    /// `host:port` of QUIC.
    pub server: String,
    /// `host:port` of the signal API.
    pub api: String,
    /// The server identity's SHA-256.
    pub fingerprint: [u8; 32],
}

impl JoinInfo {
    /// Public addresses from the config, else the ones a running server
    /// bound (`running`), else the listen addresses; an error when none is
    /// an address an agent could dial.
    pub fn new(
        config: &ServerConfig,
        running: Option<crate::BoundAddrs>,
        fingerprint: [u8; 32],
    ) -> Result<Self, OpError> {
        let usable = |a: std::net::SocketAddr| (!a.ip().is_unspecified() && a.port() != 0).then(|| a.to_string());
        let server = config
            .public
            .quic
            .clone()
            .or_else(|| running.and_then(|r| usable(r.quic)))
            .or_else(|| usable(config.listen.quic))
            .ok_or_else(|| {
                OpError::NoAddress(format!(
                    "set public.quic in the config (listen.quic = {} is not an address agents can dial)",
                    config.listen.quic
                ))
            })?;
        let api = config
            .public
            .api
            .clone()
            .or_else(|| running.and_then(|r| usable(r.api)))
            .or_else(|| usable(config.listen.api))
            .unwrap_or_else(|| server.clone());
        Ok(JoinInfo { server, api, fingerprint })
    }

    fn credentials(&self, name: &str, hostnames: Vec<String>, token: String) -> JoinCredentials {
        let ticket = JoinTicket {
            token,
            server: self.server.clone(),
            fingerprint: Some(self.fingerprint),
            api: self.api.clone(),
        };
        let join = ticket.to_string();
        let agent_command =
            format!("edge-agent run --join '{join}' --upstream 127.0.0.1:8080 --data-dir /var/lib/edge-agent/{name}");
        JoinCredentials { name: name.to_string(), join, agent_command, hostnames }
    }
}

/// The zone labels the operator's own DNS names take (`dns.records`,
/// `dns.nameservers`), which no node may be named; a reload keeps them
/// current.
#[derive(Debug, Clone, Default)]
pub struct ReservedLabels(Arc<std::sync::RwLock<Vec<String>>>);

impl ReservedLabels {
    /// The labels of `config`.
    pub fn from_config(config: &ServerConfig) -> Self {
        let labels = Self::default();
        labels.set(config);
        labels
    }

    /// Takes the labels of a reloaded `config`.
    pub fn set(&self, config: &ServerConfig) {
        let labels = config.dns.as_ref().map(|d| d.reserved_labels(config.zone())).unwrap_or_default();
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = labels;
    }

    /// Whether a node may not be named `label`.
    pub fn contains(&self, label: &str) -> bool {
        self.0.read().unwrap_or_else(|p| p.into_inner()).iter().any(|l| l == label)
    }
}

/// What the operations need.
#[derive(Debug, Clone)]
pub struct Ops {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Zone and DNS settings.
    pub config: Arc<ServerConfig>,
    /// Labels no node may take.
    pub reserved: ReservedLabels,
    /// For join strings, or why they cannot be made.
    pub join: Result<JoinInfo, String>,
}

impl Ops {
    fn join(&self) -> Result<&JoinInfo, OpError> {
        self.join.as_ref().map_err(|e| OpError::NoAddress(e.clone()))
    }

    fn entry(actor: &Actor, action: AuditAction, target: &str, summary: String) -> AuditEntry {
        AuditEntry {
            id: 0,
            at: crate::unix_now(),
            actor: actor.who.clone(),
            source: actor.source.clone(),
            action: action.as_str().to_string(),
            target: target.to_string(),
            summary,
        }
    }

    /// Makes one store call whose change and audit row commit in one
    /// transaction (a call that changes nothing writes no row).
    async fn audited<T>(
        &self,
        entry: AuditEntry,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        crate::store::accounts::audited(entry, call).await.0
    }

    /// An audit row of its own, for events that change no stored state
    /// beyond themselves (logins, logouts).
    async fn audit(&self, actor: &Actor, action: AuditAction, target: &str, summary: String) {
        let entry = Self::entry(actor, action, target, summary);
        if let Err(e) = self.store.append_audit(&entry).await {
            tracing::error!(error = %e, action = action.as_str(), target, "audit log write failed");
        }
    }

    /// Creates a node and returns its join string, once.
    pub async fn create_node(&self, actor: &Actor, name: &str) -> Result<JoinCredentials, OpError> {
        edge_proto::names::validate_node_name(name)
            .map_err(|e| OpError::Invalid { field: "name", reason: e.to_string() })?;
        let zone = self.config.zone();
        if self.reserved.contains(name) {
            return Err(OpError::Conflict {
                field: "name",
                message: format!(
                    "node name {name:?} is taken by a DNS name of the operator (dns.records or dns.nameservers)"
                ),
            });
        }
        let stored = self.store.list_dns_records().await?;
        if let Some(r) = stored.iter().find(|r| DnsConfig::label_under(&r.name, zone).as_deref() == Some(name)) {
            return Err(OpError::Conflict {
                field: "name",
                message: format!("node name {name:?} is taken by the DNS record {} {}", r.name, r.kind),
            });
        }
        let hostnames = edge_proto::names::node_hostnames(name, zone);
        let token = edge_proto::join::make_token(name, &rand::random());
        let credentials = self.join()?.credentials(name, hostnames.clone(), token.clone());
        let entry = Self::entry(actor, AuditAction::NodeCreate, name, format!("owns {}", hostnames.join(", ")));
        self.audited(entry, self.store.add_node(name, &hostnames, &crate::token_hash(&token))).await?;
        Ok(credentials)
    }

    /// Removes a node (its tunnels are cut, its token stops working).
    pub async fn remove_node(&self, actor: &Actor, name: &str) -> Result<(), OpError> {
        let entry = Self::entry(actor, AuditAction::NodeRemove, name, "removed; tunnels cut".into());
        if !self.audited(entry, self.store.remove_node(name)).await? {
            return Err(OpError::NotFound(format!("no node named {name:?}")));
        }
        Ok(())
    }

    /// Replaces a node's token; the old one stops working.
    pub async fn rotate_token(&self, actor: &Actor, name: &str) -> Result<JoinCredentials, OpError> {
        let Some(node) = self.store.get_node(name).await? else {
            return Err(OpError::NotFound(format!("no node named {name:?}")));
        };
        let token = edge_proto::join::make_token(name, &rand::random());
        let credentials = self.join()?.credentials(name, node.hostnames, token.clone());
        let entry =
            Self::entry(actor, AuditAction::NodeRotateToken, name, "new token; the old one no longer works".into());
        if !self.audited(entry, self.store.set_token_hash(name, &crate::token_hash(&token))).await? {
            return Err(OpError::NotFound(format!("no node named {name:?}")));
        }
        Ok(credentials)
    }

    /// Sets what plain HTTP does for a node.
    pub async fn set_http_mode(&self, actor: &Actor, name: &str, mode: HttpMode) -> Result<(), OpError> {
        let entry = Self::entry(actor, AuditAction::NodeHttpMode, name, format!("plain HTTP: {mode}"));
        if !self.audited(entry, self.store.set_http_mode(name, mode)).await? {
            return Err(OpError::NotFound(format!("no node named {name:?}")));
        }
        Ok(())
    }

    /// Adds a static DNS record; `name` is relative to the zone, `@`, or
    /// absolute. Returns the stored record.
    pub async fn add_dns_record(
        &self,
        actor: &Actor,
        name: &str,
        kind: StaticKind,
        value: &str,
        ttl: u32,
    ) -> Result<StaticRecord, OpError> {
        let zone = self.config.zone();
        if ttl > 86_400 {
            return Err(OpError::Invalid { field: "ttl", reason: "must be at most 86400".into() });
        }
        let absolute = DnsConfig::absolute(name, zone);
        match DnsConfig::check_record(zone, &absolute, kind, value) {
            Err(RecordField::Name) => {
                return Err(OpError::Invalid { field: "name", reason: format!("not a name in the zone {zone}") })
            }
            Err(RecordField::Value) => {
                return Err(OpError::Invalid { field: "value", reason: format!("not a valid {kind} value") })
            }
            Ok(()) => {}
        }
        if let Some(label) = DnsConfig::label_under(&absolute, zone) {
            if self.store.get_node(&label).await?.is_some() {
                return Err(OpError::Conflict {
                    field: "name",
                    message: format!("{absolute} is a name of node {label:?}: its names are its own"),
                });
            }
        }
        let record = StaticRecord { name: absolute.clone(), kind, value: value.to_string(), ttl_secs: ttl };
        let entry = Self::entry(actor, AuditAction::DnsCreate, &absolute, format!("{ttl} {kind} {value}"));
        self.audited(entry, self.store.add_dns_record(&record)).await.map_err(|e| match e {
            StoreError::Conflict(message) => OpError::Conflict { field: "value", message },
            other => OpError::Store(other),
        })?;
        Ok(record)
    }

    /// Removes the static records at a name (of one type, or one value).
    pub async fn remove_dns_records(
        &self,
        actor: &Actor,
        name: &str,
        kind: Option<StaticKind>,
        value: Option<&str>,
    ) -> Result<usize, OpError> {
        let absolute = DnsConfig::absolute(name, self.config.zone());
        let what = match (kind, value) {
            (Some(k), Some(v)) => format!("{k} {v}"),
            (Some(k), None) => format!("every {k} record"),
            _ => "every record".to_string(),
        };
        let entry = Self::entry(actor, AuditAction::DnsDelete, &absolute, what);
        let n = self.audited(entry, self.store.remove_dns_records(&absolute, kind, value)).await?;
        if n == 0 {
            return Err(OpError::NotFound(format!("no such record at {absolute}")));
        }
        Ok(n)
    }

    /// Adds a raw TCP service: the server listens on `listen` (`ip:port`,
    /// or `:port` for every IPv4 address) and sends each connection to
    /// `node`'s agent, which connects the target it declared as `target`.
    pub async fn add_service(
        &self,
        actor: &Actor,
        name: &str,
        node: &str,
        listen: &str,
        target: &str,
    ) -> Result<ServiceRecord, OpError> {
        edge_proto::routes::validate_service_name(name)
            .map_err(|e| OpError::Invalid { field: "name", reason: e.to_string() })?;
        edge_proto::routes::validate_service_name(target)
            .map_err(|e| OpError::Invalid { field: "target", reason: e.to_string() })?;
        let addr = crate::services::parse_listen(listen).ok_or_else(|| OpError::Invalid {
            field: "listen",
            reason: format!("{listen:?} is not ip:port or :port"),
        })?;
        if let Some(own) = crate::services::clashes_with(&self.config, addr) {
            return Err(OpError::Conflict {
                field: "listen",
                message: format!("{addr} would take the port of this server's {own} listener"),
            });
        }
        let record = ServiceRecord {
            name: name.to_string(),
            node: node.to_string(),
            listen: addr.to_string(),
            target: target.to_string(),
            created_at: 0,
        };
        let entry = Self::entry(actor, AuditAction::ServiceCreate, name, format!("node {node}, {addr} -> {target}"));
        self.audited(entry, self.store.add_service(&record)).await.map_err(|e| match e {
            StoreError::Conflict(message) => OpError::Conflict { field: "name", message },
            StoreError::NotFound(message) => OpError::Invalid { field: "node", reason: message },
            other => OpError::Store(other),
        })?;
        Ok(record)
    }

    /// Removes a TCP service (its listener closes on every server).
    pub async fn remove_service(&self, actor: &Actor, name: &str) -> Result<(), OpError> {
        let entry = Self::entry(actor, AuditAction::ServiceRemove, name, String::new());
        if !self.audited(entry, self.store.remove_service(name)).await? {
            return Err(OpError::NotFound(format!("no service named {name:?}")));
        }
        Ok(())
    }

    /// Claims `name` for `node`; the domain routes once its ownership TXT
    /// record is found. Refused when the name is inside the zone, held by
    /// any node, or the node holds its most domains.
    pub async fn add_domain(
        &self,
        actor: &Actor,
        name: &str,
        node: &str,
    ) -> Result<crate::store::DomainRecord, OpError> {
        use edge_proto::domains::{validate_domain, verify_value, MAX_DOMAINS_PER_NODE};
        let name = validate_domain(name, self.config.zone())
            .map_err(|e| OpError::Invalid { field: "name", reason: e.to_string() })?;
        let held = self.store.list_domains().await?;
        if let Some(d) = held.iter().find(|d| d.name == name) {
            let whose = if d.node == node { "this node" } else { "another node" };
            return Err(OpError::Conflict { field: "name", message: format!("{name} is held by {whose} already") });
        }
        if held.iter().filter(|d| d.node == node).count() >= MAX_DOMAINS_PER_NODE {
            return Err(OpError::Invalid {
                field: "node",
                reason: format!("node {node:?} holds {MAX_DOMAINS_PER_NODE} domains, the most a node may"),
            });
        }
        let record = crate::store::DomainRecord {
            name: name.clone(),
            node: node.to_string(),
            verify_value: verify_value(rand::random()),
            created_at: crate::unix_now(),
            state: edge_proto::domains::VerifyState::default(),
        };
        let entry = Self::entry(actor, AuditAction::DomainCreate, &name, format!("node {node}"));
        self.audited(entry, self.store.add_domain(&record)).await.map_err(|e| match e {
            // Another claim won a race with the check above.
            StoreError::Conflict(message) => OpError::Conflict { field: "name", message },
            StoreError::NotFound(message) => OpError::Invalid { field: "node", reason: message },
            other => OpError::Store(other),
        })?;
        Ok(record)
    }

    /// Removes a custom domain: every server stops routing it at once.
    pub async fn remove_domain(&self, actor: &Actor, name: &str) -> Result<(), OpError> {
        let name = edge_proto::domains::lookup_form(name);
        let entry = Self::entry(actor, AuditAction::DomainRemove, &name, String::new());
        if !self.audited(entry, self.store.remove_domain(&name)).await? {
            return Err(OpError::NotFound(format!("no domain named {name:?}")));
        }
        // A policy for the name belonged to this claim: the next node to
        // claim the domain starts without it.
        let scope = edge_proto::access::Scope::Host(name);
        if self.store.list_access().await?.iter().any(|a| a.scope == scope.key()) {
            let entry = Self::entry(actor, AuditAction::AccessClear, &scope.key(), "with its domain".into());
            self.audited(entry, self.store.clear_access(&scope.key())).await?;
        }
        Ok(())
    }

    /// The node `scope` belongs to: the node itself, the node owning the
    /// hostname (exact or by its wildcard), or the service's node.
    async fn node_of_scope(&self, scope: &edge_proto::access::Scope) -> Result<String, OpError> {
        use edge_proto::access::Scope;
        match scope {
            Scope::Node(n) => match self.store.get_node(n).await? {
                Some(_) => Ok(n.clone()),
                None => Err(OpError::Invalid { field: "node", reason: format!("no node named {n:?}") }),
            },
            Scope::Host(h) => {
                let host = edge_proto::names::normalize_hostname(h).filter(|n| n == h).ok_or_else(|| {
                    OpError::Invalid { field: "host", reason: format!("{h:?} is not a lowercase hostname") }
                })?;
                let pattern = edge_proto::routes::HostPattern::Exact(host);
                let nodes = self.store.list_nodes().await?;
                if let Some(n) = nodes.into_iter().find(|n| pattern.within(&n.hostnames)) {
                    return Ok(n.name);
                }
                // A custom domain, verified or not yet.
                let domains = self.store.list_domains().await?;
                domains
                    .into_iter()
                    .find(|d| &d.name == h)
                    .map(|d| d.node)
                    .ok_or_else(|| OpError::Invalid { field: "host", reason: format!("no node owns {h:?}") })
            }
            Scope::Service(s) => {
                let services = self.store.list_services().await?;
                services
                    .into_iter()
                    .find(|x| &x.name == s)
                    .map(|x| x.node)
                    .ok_or_else(|| OpError::Invalid { field: "service", reason: format!("no service named {s:?}") })
            }
        }
    }

    /// Sets the access policy of a node, hostname or TCP service (the
    /// rules in order, then the default).
    pub async fn set_access(
        &self,
        actor: &Actor,
        scope: &edge_proto::access::Scope,
        policy: edge_proto::access::Policy,
    ) -> Result<(), OpError> {
        let node = self.node_of_scope(scope).await?;
        let rules: Vec<String> = policy.rules.iter().map(|r| format!("{} {}", r.action, r.cidr)).collect();
        let summary = format!("{}; default {}", rules.join(", "), policy.default);
        let record = crate::store::AccessRecord { scope: scope.key(), node, policy };
        let entry = Self::entry(actor, AuditAction::AccessSet, &scope.key(), summary);
        self.audited(entry, self.store.set_access(&record)).await?;
        Ok(())
    }

    /// Clears the access policy of a scope.
    pub async fn clear_access(&self, actor: &Actor, scope: &edge_proto::access::Scope) -> Result<(), OpError> {
        let entry = Self::entry(actor, AuditAction::AccessClear, &scope.key(), String::new());
        if !self.audited(entry, self.store.clear_access(&scope.key())).await? {
            return Err(OpError::NotFound(format!("no access policy for {}", scope.key())));
        }
        Ok(())
    }

    /// Forgets a retired server.
    pub async fn remove_server(&self, actor: &Actor, id: &str) -> Result<(), OpError> {
        let entry = Self::entry(actor, AuditAction::ServerRemove, id, "forgotten".into());
        if !self.audited(entry, self.store.remove_server(id)).await? {
            return Err(OpError::NotFound(format!("no server with id {id:?}")));
        }
        Ok(())
    }

    /// Adds a user with this password (hashed with Argon2id).
    pub async fn add_user(&self, actor: &Actor, name: &str, password: &str) -> Result<(), OpError> {
        edge_proto::admin::validate_account_name(name)
            .map_err(|e| OpError::Invalid { field: "name", reason: e.to_string() })?;
        edge_proto::admin::validate_password(password)
            .map_err(|e| OpError::Invalid { field: "password", reason: e.to_string() })?;
        let password = password.to_string();
        let hash = tokio::task::spawn_blocking(move || super::passwords::hash(&password))
            .await
            .map_err(|e| super::passwords::PasswordError::Hash(e.to_string()))??;
        let user = UserRecord { name: name.to_string(), password_hash: hash, created_at: crate::unix_now() };
        self.audited(Self::entry(actor, AuditAction::UserAdd, name, "added".into()), self.store.add_user(&user))
            .await?;
        Ok(())
    }

    /// Removes a user; their sessions end at once.
    pub async fn remove_user(&self, actor: &Actor, name: &str) -> Result<(), OpError> {
        let entry = Self::entry(actor, AuditAction::UserRemove, name, "removed with their sessions".into());
        if !self.audited(entry, self.store.remove_user(name)).await? {
            return Err(OpError::NotFound(format!("no user named {name:?}")));
        }
        Ok(())
    }

    /// Makes an API token; the token is returned once.
    pub async fn add_token(&self, actor: &Actor, name: &str, scope: TokenScope) -> Result<CreatedToken, OpError> {
        edge_proto::admin::validate_account_name(name)
            .map_err(|e| OpError::Invalid { field: "name", reason: e.to_string() })?;
        let token = new_api_token();
        let record = ApiTokenRecord {
            name: name.to_string(),
            scope,
            hash: crate::token_hash(&token),
            created_at: crate::unix_now(),
            last_used: None,
            created_by: actor.who.clone(),
        };
        let entry = Self::entry(actor, AuditAction::TokenAdd, name, format!("scope {scope}"));
        self.audited(entry, self.store.add_api_token(&record)).await?;
        Ok(CreatedToken { name: name.to_string(), scope, token })
    }

    /// Revokes an API token.
    pub async fn remove_token(&self, actor: &Actor, name: &str) -> Result<(), OpError> {
        let entry = Self::entry(actor, AuditAction::TokenRemove, name, "revoked".into());
        if !self.audited(entry, self.store.remove_api_token(name)).await? {
            return Err(OpError::NotFound(format!("no token named {name:?}")));
        }
        Ok(())
    }

    /// Records a login or logout.
    pub async fn session_event(&self, actor: &Actor, action: AuditAction, user: &str) {
        self.audit(actor, action, user, String::new()).await;
    }
}

/// The name under which a server's configured admin token is kept:
/// `admin.token@<server id>` (each server of a cluster has its own).
pub fn admin_token_name(server_id: &str) -> String {
    format!("admin.token@{server_id}")
}

/// A new random API token: `edge_` and 43 base64url characters.
pub fn new_api_token() -> String {
    use base64::Engine;
    format!("edge_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>()))
}

/// Registers this server's configured admin token as the admin-scoped API
/// token [`admin_token_name`], so that it keeps working for `/api/v1` (and
/// a new value in the config replaces the old one).
pub async fn register_admin_token(store: &dyn Store, server_id: &str, hash: [u8; 32]) -> Result<(), StoreError> {
    store
        .put_api_token(&ApiTokenRecord {
            name: admin_token_name(server_id),
            scope: TokenScope::Admin,
            hash,
            created_at: crate::unix_now(),
            last_used: None,
            created_by: "config".into(),
        })
        .await
}
