//! All persistent state goes through the [`Store`] trait.
//!
//! One implementation today, [`sqlite::SqliteStore`] (embedded, one file,
//! WAL). A shared PostgreSQL store for clusters of several servers will
//! implement the same trait. Nothing on the per-connection path touches the
//! store: routing uses the in-memory [`crate::registry::Registry`], which is
//! reloaded when [`Store::revision`] changes.

pub mod sqlite;

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
    /// Plain HTTP on :80 for this node: `redirect` (to https) or `proxy`.
    pub http_mode: String,
    /// Last recorded mode (`direct`, `proxy`, `offline`).
    pub mode: String,
    /// Endpoint at the last mode transition.
    pub endpoint: Option<String>,
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
            .finish()
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

/// A mode change as stored (modes as their lowercase names).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModeChange {
    /// Unix seconds.
    pub at: i64,
    /// Old mode.
    pub from: String,
    /// New mode.
    pub to: String,
    /// Why.
    pub reason: String,
}

/// A node's mode, newest samples and transitions first.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ModeHistory {
    /// Last recorded mode.
    pub mode: Option<String>,
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

/// Errors from a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database reported an error.
    #[error("database {path}: {source}")]
    Database {
        /// The database file.
        path: String,
        /// The driver's error.
        source: rusqlite::Error,
    },
    /// The schema is newer than this binary understands.
    #[error(
        "database {path} has schema version {found}, newer than this edge-server ({supported}); upgrade edge-server"
    )]
    SchemaTooNew {
        /// The database file.
        path: String,
        /// Version in the file.
        found: i64,
        /// Highest version this binary knows.
        supported: i64,
    },
    /// A node with this name exists already.
    #[error("node {0:?} already exists")]
    NodeExists(String),
    /// The task running a store operation failed.
    #[error("store task failed: {0}")]
    Task(String),
    /// Stored data could not be decoded.
    #[error("database {path}: corrupt row: {what}")]
    Corrupt {
        /// The database file.
        path: String,
        /// What was wrong.
        what: String,
    },
}

/// Persistent state of the server.
pub trait Store: Send + Sync + 'static {
    /// Creates a node; fails with [`StoreError::NodeExists`] if taken.
    fn add_node(&self, name: &str, hostnames: &[String], token_hash: &[u8; 32]) -> Result<NodeRecord, StoreError>;
    /// Removes a node; `false` if it did not exist.
    fn remove_node(&self, name: &str) -> Result<bool, StoreError>;
    /// Replaces a node's token hash; `false` if it does not exist.
    fn set_token_hash(&self, name: &str, token_hash: &[u8; 32]) -> Result<bool, StoreError>;
    /// One node by name.
    fn get_node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError>;
    /// All nodes, by name.
    fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    /// A number that changes whenever nodes are added, removed or re-keyed.
    fn revision(&self) -> Result<i64, StoreError>;
    /// Records a node's runtime status.
    fn record_status(&self, name: &str, status: &NodeStatus) -> Result<(), StoreError>;
    /// Marks every node disconnected (at server start).
    fn reset_status(&self) -> Result<(), StoreError>;
    /// Publishes a TXT value for `node`. At `max_per_node` values, the
    /// oldest makes room if it was published before `stale_before` (Unix
    /// seconds); otherwise nothing is stored ([`Published::Full`]). A value
    /// already published only has its age reset (no revision change: the
    /// zone stays as it is).
    fn put_challenge(
        &self,
        node: &str,
        name: &str,
        value: &str,
        max_per_node: usize,
        stale_before: i64,
    ) -> Result<Published, StoreError>;
    /// Removes one value (or all at `name` when `value` is `None`) of `node`;
    /// returns how many were removed.
    fn remove_challenge(&self, node: &str, name: &str, value: Option<&str>) -> Result<usize, StoreError>;
    /// Every published TXT value.
    fn list_challenges(&self) -> Result<Vec<ChallengeRecord>, StoreError>;
    /// Removes values published before `created_before` (Unix seconds).
    fn expire_challenges(&self, created_before: i64) -> Result<usize, StoreError>;
    /// Sets `redirect` or `proxy` for plain HTTP; `false` if no such node.
    fn set_http_mode(&self, name: &str, http_mode: &str) -> Result<bool, StoreError>;
    /// Appends a probe sample, keeping the newest `keep` per node.
    fn record_probe(&self, name: &str, sample: &ProbeSample, keep: usize) -> Result<(), StoreError>;
    /// Records a transition and the node's new current mode.
    fn record_transition(&self, name: &str, change: &ModeChange, endpoint: Option<&str>) -> Result<(), StoreError>;
    /// Current mode and the newest `limit` samples and transitions.
    fn mode_history(&self, name: &str, limit: usize) -> Result<ModeHistory, StoreError>;
}
