//! All persistent state goes through the [`Store`] trait.
//!
//! Two implementations: [`sqlite::SqliteStore`] (embedded, one file, WAL;
//! the default) and [`postgres::PostgresStore`] (shared by several servers).
//! [`open`] picks one from `[store]`. Nothing on the per-connection path
//! touches the store: routing uses the in-memory registry, which follows the
//! store's change feed ([`Store::subscribe`], [`Store::watch`]).

pub mod accounts;
pub mod changes;
pub mod cluster;
pub mod deadline;
pub mod error;
pub mod location;
pub mod postgres;
pub mod sqlite;
pub mod values;

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

pub use accounts::{AccountStore, ApiTokenRecord, AuditEntry, AuditQuery, SessionRecord, TokenScope, UserRecord};
pub use changes::{Change, ChangeEvent, FeedEvent};
pub use cluster::{Fence, Lease, OrderLock, ServerEntry, ServerList, ServerRecord, MODE_DECIDER};
pub use error::StoreError;
pub use location::{StoreConfig, StoreLocation, StoreTls};
pub use values::{AccessRecord, DomainRecord, HttpMode, Mode, ServiceRecord, StaticKind, StaticRecord};

/// A node as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// Node name (one DNS label).
    pub name: String,
    /// Hostnames the node owns, derived from its name and the zone.
    pub hostnames: Vec<String>,
    /// SHA-256 of the node token; the token itself is never stored.
    pub token_hash: [u8; 32],
    /// Unix seconds.
    pub created_at: i64,
    /// Last status the server recorded.
    pub status: NodeStatus,
    /// Plain HTTP on :80 for this node.
    pub http_mode: HttpMode,
    /// Last recorded mode.
    pub mode: Mode,
    /// Endpoint at the last mode transition.
    pub endpoint: Option<String>,
    /// Unix seconds of the last mode transition.
    pub mode_since: Option<i64>,
}

impl std::fmt::Debug for NodeRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeRecord")
            .field("name", &self.name)
            .field("hostnames", &self.hostnames)
            .field("token_hash", &"<redacted>")
            .field("created_at", &self.created_at)
            .field("status", &self.status)
            .field("http_mode", &self.http_mode)
            .field("mode", &self.mode)
            .field("endpoint", &self.endpoint)
            .field("mode_since", &self.mode_since)
            .finish()
    }
}

impl NodeRecord {
    /// A node as [`Store::add_node`] creates it.
    pub fn new(name: &str, hostnames: &[String], token_hash: &[u8; 32], created_at: i64) -> Self {
        Self {
            name: name.to_string(),
            hostnames: hostnames.to_vec(),
            token_hash: *token_hash,
            created_at,
            status: NodeStatus::default(),
            http_mode: HttpMode::default(),
            mode: Mode::Offline,
            endpoint: None,
            mode_since: None,
        }
    }
}

/// Runtime status of a node as last recorded by the server.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct NodeStatus {
    /// Whether at least one tunnel was up.
    pub connected: bool,
    /// Unix seconds of the last heartbeat.
    pub last_heartbeat: Option<i64>,
    /// Client connections open through the node.
    pub open_connections: u64,
    /// Version the agent reported.
    pub agent_version: Option<String>,
    /// Address the agent connected from.
    pub remote_addr: Option<String>,
    /// Expiry (Unix seconds) of the certificate the agent serves.
    pub cert_not_after: Option<i64>,
    /// The routes the agent last reported, with its upstreams' health
    /// (`None`: never reported, e.g. an older agent; a write of `None`
    /// keeps the stored value).
    pub routes: Option<Vec<edge_proto::routes::RouteReport>>,
}

/// One reachability probe of a node's endpoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProbeSample {
    /// Unix seconds.
    pub at: i64,
    /// The address probed.
    pub endpoint: String,
    /// Whether the node proved itself.
    pub ok: bool,
    /// What happened (`verified`, `connect: refused`, `wrong answer`, ...).
    pub detail: String,
}

/// A mode change as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModeChange {
    /// Unix seconds.
    pub at: i64,
    /// Old mode.
    pub from: Mode,
    /// New mode.
    pub to: Mode,
    /// Why.
    pub reason: String,
}

/// A node's mode, newest samples and transitions first.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ModeHistory {
    /// Last recorded mode.
    pub mode: Option<Mode>,
    /// Endpoint at the last transition.
    pub endpoint: Option<String>,
    /// Unix seconds of the last transition.
    pub since: Option<i64>,
    /// Newest first.
    pub samples: Vec<ProbeSample>,
    /// Newest first.
    pub transitions: Vec<ModeChange>,
}

/// A DNS-01 TXT value published in the zone for a node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChallengeRecord {
    /// The node it was published for.
    pub node: String,
    /// `_acme-challenge.<name>` (lowercase, no trailing dot).
    pub name: String,
    /// The TXT value.
    pub value: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// What [`Store::put_challenge`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// A new value: the revision moved.
    Added,
    /// The value was there already; only its age was reset.
    Unchanged,
    /// Nothing stored: the node has `max_per_node` values, none stale.
    Full,
}

/// What the routing state is built from, read at one revision: every node
/// and every published TXT value.
#[derive(Debug, Clone, Default)]
pub struct RoutingState {
    /// The revision the rows were read at (the SOA serial follows it).
    pub revision: i64,
    /// All nodes, by name.
    pub nodes: Vec<NodeRecord>,
    /// All TXT values.
    pub challenges: Vec<ChallengeRecord>,
    /// Static DNS records kept in the store.
    pub dns_records: Vec<StaticRecord>,
}

/// Everything a store holds, for `edge-server store copy`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The source's revision (the target continues from it, so SOA serials
    /// never go back).
    pub revision: i64,
    /// Nodes with their status, mode and settings.
    pub nodes: Vec<NodeRecord>,
    /// Probe samples per node, oldest first.
    pub samples: Vec<(String, ProbeSample)>,
    /// Mode transitions per node, oldest first.
    pub transitions: Vec<(String, ModeChange)>,
    /// TXT values.
    pub challenges: Vec<ChallengeRecord>,
    /// Static DNS records.
    pub dns_records: Vec<StaticRecord>,
}

/// Row counts, to verify a copy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Nodes.
    pub nodes: u64,
    /// Probe samples.
    pub samples: u64,
    /// Mode transitions.
    pub transitions: u64,
    /// TXT values.
    pub challenges: u64,
    /// Static DNS records.
    pub dns_records: u64,
}

impl Counts {
    /// The counts a snapshot should leave in an empty store.
    pub fn of(snapshot: &Snapshot) -> Self {
        Self {
            nodes: snapshot.nodes.len() as u64,
            samples: snapshot.samples.len() as u64,
            transitions: snapshot.transitions.len() as u64,
            challenges: snapshot.challenges.len() as u64,
            dns_records: snapshot.dns_records.len() as u64,
        }
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} nodes, {} TXT values, {} probe samples, {} transitions, {} DNS records",
            self.nodes, self.challenges, self.samples, self.transitions, self.dns_records
        )
    }
}

/// Persistent state of the server.
///
/// Every write that changes what is routed or served (nodes, tokens, HTTP
/// modes, TXT values, mode transitions, static DNS records) moves the revision and emits a
/// [`ChangeEvent`] to this process's subscribers at once; writes by other
/// processes arrive through [`Store::watch`]. Status, probes and history
/// are recorded without events.
#[async_trait::async_trait]
pub trait Store: AccountStore + Send + Sync + std::fmt::Debug + 'static {
    /// Where the store is, without secrets (for logs and errors).
    fn describe(&self) -> &str;
    /// Creates a node; fails with [`StoreError::Conflict`] if the name is taken.
    async fn add_node(&self, name: &str, hostnames: &[String], token_hash: &[u8; 32])
        -> Result<NodeRecord, StoreError>;
    /// Removes a node and everything of it; `false` if it did not exist.
    async fn remove_node(&self, name: &str) -> Result<bool, StoreError>;
    /// Replaces a node's token hash; `false` if it does not exist.
    async fn set_token_hash(&self, name: &str, token_hash: &[u8; 32]) -> Result<bool, StoreError>;
    /// Sets what plain HTTP does for a node; `false` if no such node.
    async fn set_http_mode(&self, name: &str, http_mode: HttpMode) -> Result<bool, StoreError>;
    /// One node by name.
    async fn get_node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError>;
    /// All nodes, by name.
    async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    /// The revision: it moves with every change that emits an event.
    async fn revision(&self) -> Result<i64, StoreError>;
    /// Nodes and TXT values read at one revision.
    async fn routing_state(&self) -> Result<RoutingState, StoreError>;
    /// Records the runtime status of several nodes in one transaction;
    /// names that do not exist (removed meanwhile) are skipped.
    async fn record_statuses(&self, statuses: &[(String, NodeStatus)]) -> Result<(), StoreError>;
    /// Marks every node disconnected (at server start).
    async fn reset_status(&self) -> Result<(), StoreError>;
    /// Publishes a TXT value for `node`. At `max_per_node` values, the
    /// oldest makes room if it was published before `stale_before` (Unix
    /// seconds); otherwise nothing is stored ([`Published::Full`]). A value
    /// already published only has its age reset (no revision change: the
    /// zone stays as it is).
    async fn put_challenge(
        &self,
        node: &str,
        name: &str,
        value: &str,
        max_per_node: usize,
        stale_before: i64,
    ) -> Result<Published, StoreError>;
    /// Removes one value (or all at `name` when `value` is `None`) of `node`;
    /// returns how many were removed.
    async fn remove_challenge(&self, node: &str, name: &str, value: Option<&str>) -> Result<usize, StoreError>;
    /// Every TXT value of one node.
    async fn node_challenges(&self, node: &str) -> Result<Vec<ChallengeRecord>, StoreError>;
    /// Every published TXT value.
    async fn list_challenges(&self) -> Result<Vec<ChallengeRecord>, StoreError>;
    /// Removes values published before `created_before` (Unix seconds).
    async fn expire_challenges(&self, created_before: i64) -> Result<usize, StoreError>;
    /// Appends a probe sample, keeping the newest `keep` per node.
    async fn record_probe(&self, name: &str, sample: &ProbeSample, keep: usize) -> Result<(), StoreError>;
    /// Records a transition and the node's new current mode.
    async fn record_transition(
        &self,
        name: &str,
        change: &ModeChange,
        endpoint: Option<&str>,
    ) -> Result<(), StoreError>;
    /// [`Store::record_transition`] by the holder of a lease: written only
    /// while `fence` still holds and the stored mode is still
    /// `change.from` (no stored mode counts as offline), so a transition is
    /// written once even when a new decider saw the same flip. `false`:
    /// not written (the lease moved on, or the mode already changed).
    async fn record_transition_fenced(
        &self,
        name: &str,
        change: &ModeChange,
        endpoint: Option<&str>,
        fence: &Fence,
    ) -> Result<bool, StoreError>;
    /// Registers (or re-registers) a server as live with a lease of
    /// `lease_ms`; the live set changes ([`Change::ServersChanged`]).
    async fn register_server(&self, record: &ServerRecord, lease_ms: i64) -> Result<(), StoreError>;
    /// Renews a live server's lease and records the nodes it holds tunnels
    /// to. `false`: it is not registered or was declared gone (it must
    /// register again).
    async fn renew_server(&self, id: &str, lease_ms: i64, tunnels: &[String]) -> Result<bool, StoreError>;
    /// Declares gone every live server whose lease ran out; returns how
    /// many. Several servers may call it at once: each server is declared
    /// gone by exactly one write.
    async fn expire_servers(&self) -> Result<usize, StoreError>;
    /// A server leaves (shutdown): declared gone at once.
    async fn leave_server(&self, id: &str) -> Result<(), StoreError>;
    /// Forgets a server (retired by an operator). `false` if unknown.
    async fn remove_server(&self, id: &str) -> Result<bool, StoreError>;
    /// Every registered server, live or gone, by name, with the revision
    /// read before them.
    async fn list_servers(&self) -> Result<ServerList, StoreError>;
    /// Takes or renews lease `name` for `holder` for `ttl_ms`: the fencing
    /// token when held (a new one when it changed hands), `None` while
    /// another holder's lease runs.
    async fn acquire_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<Option<i64>, StoreError>;
    /// Gives lease `name` up if `holder` has it.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError>;
    /// Lease `name` as it stands.
    async fn lease(&self, name: &str) -> Result<Option<Lease>, StoreError>;
    /// A cluster-wide setting.
    async fn setting(&self, key: &str) -> Result<Option<String>, StoreError>;
    /// Stores `value` under `key` unless a value is there; returns the one
    /// that is (so servers racing to create it all end up with one).
    async fn init_setting(&self, key: &str, value: &str) -> Result<String, StoreError>;
    /// Holds the cluster-wide lock of `node`'s certificate order, waiting
    /// up to `wait` for another server to release it.
    async fn lock_order(&self, node: &str, wait: std::time::Duration) -> Result<OrderLock, StoreError>;
    /// Current mode and the newest `limit` samples and transitions.
    async fn mode_history(&self, name: &str, limit: usize) -> Result<ModeHistory, StoreError>;
    /// Static DNS records, by name, type and value.
    async fn list_dns_records(&self) -> Result<Vec<StaticRecord>, StoreError>;
    /// Adds a static DNS record; [`StoreError::Conflict`] if the same name,
    /// type and value exist.
    async fn add_dns_record(&self, record: &StaticRecord) -> Result<(), StoreError>;
    /// Every TCP service, by name.
    async fn list_services(&self) -> Result<Vec<ServiceRecord>, StoreError>;
    /// Adds a TCP service: [`StoreError::NotFound`] without its node,
    /// [`StoreError::Conflict`] when the name or the listen address is taken.
    async fn add_service(&self, service: &ServiceRecord) -> Result<(), StoreError>;
    /// Removes a TCP service; whether it existed.
    async fn remove_service(&self, name: &str) -> Result<bool, StoreError>;
    /// Every custom domain, by name.
    async fn list_domains(&self) -> Result<Vec<DomainRecord>, StoreError>;
    /// Claims a custom domain for its node: [`StoreError::NotFound`]
    /// without the node, [`StoreError::Conflict`] when any node holds the
    /// name already.
    async fn add_domain(&self, domain: &DomainRecord) -> Result<(), StoreError>;
    /// Removes a custom domain; whether it existed.
    async fn remove_domain(&self, name: &str) -> Result<bool, StoreError>;
    /// Records a check's result for the claim `checked` (its name, node
    /// and value) if it still stands: removed or claimed anew meanwhile,
    /// nothing is written (`false`), so a check of an old claim never
    /// verifies a new one. The revision moves only when whether it is
    /// routed changes.
    async fn record_domain_check(
        &self,
        checked: &DomainRecord,
        state: &edge_proto::domains::VerifyState,
    ) -> Result<bool, StoreError>;
    /// Every access policy.
    async fn list_access(&self) -> Result<Vec<AccessRecord>, StoreError>;
    /// Sets (replaces) the policy of a scope; [`StoreError::NotFound`]
    /// without its node.
    async fn set_access(&self, record: &AccessRecord) -> Result<(), StoreError>;
    /// Clears the policy of a scope; whether there was one.
    async fn clear_access(&self, scope: &str) -> Result<bool, StoreError>;
    /// Removes the records at `name` (of `kind`, with `value`, when given);
    /// returns how many.
    async fn remove_dns_records(
        &self,
        name: &str,
        kind: Option<StaticKind>,
        value: Option<&str>,
    ) -> Result<usize, StoreError>;
    /// Row counts.
    async fn counts(&self) -> Result<Counts, StoreError>;
    /// Everything, for a copy.
    async fn export(&self) -> Result<Snapshot, StoreError>;
    /// Writes `snapshot` into this store in one transaction; refuses with
    /// [`StoreError::NotEmpty`] if the store holds anything.
    async fn import(&self, snapshot: &Snapshot) -> Result<(), StoreError>;
    /// Change events: this process's writes at once, other processes'
    /// while [`Store::watch`] runs.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<FeedEvent>;
    /// Follows other processes' writes until `shutdown`, from `since` (the
    /// revision of the state the subscriber holds): SQLite polls its change
    /// log; PostgreSQL listens for notifications and asks for a resync
    /// after every reconnect.
    fn watch(&self, since: i64, shutdown: CancellationToken) -> BoxFuture<'static, ()>;
}

/// Opens the store `[store]` names: the one factory the server and the CLI
/// use. PostgreSQL connects, and both migrate, before this returns.
pub async fn open(config: &StoreConfig, data_dir: &std::path::Path) -> Result<Arc<dyn Store>, StoreError> {
    match config.location(data_dir)? {
        StoreLocation::Sqlite { path } => {
            let poll = std::time::Duration::from_millis(config.poll_ms);
            Ok(Arc::new(sqlite::SqliteStore::open_async(path, poll).await?))
        }
        StoreLocation::Postgres(options) => {
            // A statement in flight may wait on top of getting a connection.
            let point = options.connect_timeout * 2;
            let bulk = point.max(std::time::Duration::from_secs(60));
            let describe = options.describe.clone();
            let store = match tokio::time::timeout(bulk, postgres::PostgresStore::connect(*options)).await {
                Ok(store) => store?,
                Err(_) => {
                    let reason = format!("no answer within {} s while connecting and migrating", bulk.as_secs());
                    return Err(StoreError::Unavailable { store: describe, reason });
                }
            };
            Ok(Arc::new(deadline::WithDeadline::new(store, point, bulk)))
        }
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// How many events a subscriber may fall behind before it must resync.
pub(crate) const FEED_CAPACITY: usize = 4096;
