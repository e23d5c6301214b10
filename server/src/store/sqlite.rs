//! SQLite implementation of [`Store`]: one file, WAL journal, versioned
//! migrations applied in one transaction at open, and a change log that
//! other processes on the same file poll.
//!
//! The connection sits behind a mutex and every operation runs on tokio's
//! blocking pool: each is a few milliseconds and none is on the
//! per-connection path.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::changes::new_origin;
use super::{
    now, AccessRecord, ChallengeRecord, Change, ChangeEvent, Counts, DomainRecord, FeedEvent, Fence, HttpMode, Lease,
    Mode, ModeChange, ModeHistory, NodeRecord, NodeStatus, OrderLock, ProbeSample, Published, RoutingState,
    ServerEntry, ServerList, ServerRecord, ServiceRecord, Snapshot, StaticKind, StaticRecord, Store, StoreError,
    FEED_CAPACITY,
};

/// Schema migrations; entry `i` moves the schema from version `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 1: nodes, their status, and a revision counter for change detection.
    "CREATE TABLE nodes (
        name TEXT PRIMARY KEY,
        hostnames TEXT NOT NULL,
        token_hash BLOB NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE node_status (
        name TEXT PRIMARY KEY REFERENCES nodes(name) ON DELETE CASCADE,
        connected INTEGER NOT NULL DEFAULT 0,
        last_heartbeat INTEGER,
        open_connections INTEGER NOT NULL DEFAULT 0,
        agent_version TEXT,
        remote_addr TEXT,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO meta (key, value) VALUES ('revision', 0);",
    // 2: DNS-01 challenge values published in the zone, and the expiry of
    // the certificate each node's agent reports.
    "CREATE TABLE acme_challenges (
        node TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
        name TEXT NOT NULL,
        value TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (name, value)
    );
    ALTER TABLE node_status ADD COLUMN cert_not_after INTEGER;",
    // 3: direct/proxy mode: current mode and endpoint, probe samples,
    // transitions, and the per-node behaviour of plain HTTP.
    "ALTER TABLE nodes ADD COLUMN http_mode TEXT NOT NULL DEFAULT 'redirect';
    CREATE TABLE node_modes (
        name TEXT PRIMARY KEY REFERENCES nodes(name) ON DELETE CASCADE,
        mode TEXT NOT NULL,
        endpoint TEXT,
        since INTEGER NOT NULL
    );
    CREATE TABLE probe_samples (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
        at INTEGER NOT NULL,
        endpoint TEXT NOT NULL,
        ok INTEGER NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX probe_samples_by_node ON probe_samples(name, id);
    CREATE TABLE mode_transitions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
        at INTEGER NOT NULL,
        from_mode TEXT NOT NULL,
        to_mode TEXT NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE INDEX mode_transitions_by_node ON mode_transitions(name, id);",
    // 4: the change log other processes poll. Its sequence is the revision;
    // it continues from the old counter so SOA serials never go back.
    "CREATE TABLE changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        origin TEXT NOT NULL,
        kind TEXT NOT NULL,
        node TEXT NOT NULL,
        at INTEGER NOT NULL
    );
    INSERT INTO sqlite_sequence (name, seq) SELECT 'changes', value FROM meta WHERE key = 'revision';
    CREATE INDEX acme_challenges_by_node ON acme_challenges(node);",
    // 5: static DNS records kept in the store (`edge-server dns add`).
    "CREATE TABLE dns_records (
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        value TEXT NOT NULL,
        ttl INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (name, kind, value)
    );",
    // 6: servers with their liveness leases, named leases (the mode
    // decider), and cluster-wide settings (the ACME account).
    "CREATE TABLE servers (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        quic TEXT NOT NULL,
        api TEXT NOT NULL,
        peer TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        dns TEXT,
        nameservers TEXT NOT NULL,
        addresses TEXT NOT NULL,
        version TEXT NOT NULL,
        started_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        gone INTEGER NOT NULL DEFAULT 0,
        tunnels TEXT NOT NULL DEFAULT '[]'
    );
    CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, token INTEGER NOT NULL, expires_at INTEGER NOT NULL);
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    // 7: operators: users, sessions, API tokens, and the audit log.
    "CREATE TABLE users (name TEXT PRIMARY KEY, password_hash TEXT NOT NULL, created_at INTEGER NOT NULL);
    CREATE TABLE sessions (
        id_hash BLOB PRIMARY KEY,
        user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        created_at INTEGER NOT NULL,
        last_seen INTEGER NOT NULL
    );
    CREATE TABLE api_tokens (
        name TEXT PRIMARY KEY,
        scope TEXT NOT NULL CHECK (scope IN ('read', 'admin')),
        hash BLOB NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        last_used INTEGER,
        created_by TEXT NOT NULL
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        actor TEXT NOT NULL,
        source TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        summary TEXT NOT NULL
    );
    CREATE INDEX audit_by_target ON audit (target, id);",
    // 8: the routes an agent last reported (JSON), for `node show` and the
    // API; raw TCP services.
    "ALTER TABLE node_status ADD COLUMN routes TEXT;
    CREATE TABLE services (
        name TEXT PRIMARY KEY,
        node TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
        listen TEXT NOT NULL UNIQUE,
        target TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE access_policies (
        scope TEXT PRIMARY KEY,
        node TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
        policy TEXT NOT NULL
    );",
    // 9: customers' own domains, each held by one node at most.
    "CREATE TABLE domains (
        name TEXT PRIMARY KEY,
        node TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
        verify_value TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        verified_at INTEGER,
        checked_at INTEGER,
        failing_since INTEGER,
        last_error TEXT,
        routed INTEGER NOT NULL DEFAULT 0
    );",
];

std::thread_local! {
    /// The audit entry pending for the store call running on this blocking
    /// thread (moved here from the caller's task by `SqliteStore::run`).
    static PENDING_AUDIT: std::cell::RefCell<Option<super::accounts::AuditEntry>> =
        const { std::cell::RefCell::new(None) };
}

/// Records a transition and the node's new mode.
fn write_transition(tx: &Connection, name: &str, t: &ModeChange, endpoint: Option<&str>) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO mode_transitions (name, at, from_mode, to_mode, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![name, t.at, t.from.as_str(), t.to.as_str(), t.reason],
    )?;
    tx.execute(
        "INSERT INTO node_modes (name, mode, endpoint, since) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(name) DO UPDATE SET mode = excluded.mode, endpoint = excluded.endpoint, since = excluded.since",
        params![name, t.to.as_str(), endpoint, t.at],
    )?;
    Ok(())
}

/// Milliseconds since the Unix epoch: lease times (one host's clock).
fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn json_list(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

fn json_text(list: &[String]) -> String {
    serde_json::to_string(list).unwrap_or_else(|_| "[]".into())
}

fn server_row(row: &rusqlite::Row<'_>, now: i64) -> rusqlite::Result<ServerEntry> {
    let nameservers: String = row.get(7)?;
    let addresses: String = row.get(8)?;
    let expires_at: i64 = row.get(11)?;
    let gone: bool = row.get(12)?;
    let tunnels: String = row.get(13)?;
    Ok(ServerEntry {
        record: ServerRecord {
            id: row.get(0)?,
            name: row.get(1)?,
            quic: row.get(2)?,
            api: row.get(3)?,
            peer: row.get(4)?,
            fingerprint: row.get(5)?,
            dns: row.get(6)?,
            nameservers: json_list(&nameservers),
            addresses: json_list(&addresses),
            version: row.get(9)?,
        },
        started_at: row.get::<_, i64>(10)? / 1000,
        alive: !gone,
        lease_left_ms: expires_at - now,
        tunnels: json_list(&tunnels),
    })
}

/// Change log rows kept; a poller further behind resyncs.
const CHANGES_KEPT: i64 = 10_000;

/// How long a statement waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The embedded store.
#[derive(Debug)]
pub struct SqliteStore {
    db: Arc<SqliteDb>,
    events: broadcast::Sender<FeedEvent>,
    poll: Duration,
}

#[derive(Debug)]
struct SqliteDb {
    describe: String,
    origin: String,
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and migrates it.
    /// Blocks: from async code, use [`SqliteStore::open_async`].
    pub fn open(path: &Path, poll: Duration) -> Result<Self, StoreError> {
        Self::open_at_version(path, poll, MIGRATIONS.len())
    }

    /// [`SqliteStore::open`] on the blocking pool.
    pub async fn open_async(path: PathBuf, poll: Duration) -> Result<Self, StoreError> {
        let describe = format!("sqlite://{}", path.display());
        tokio::task::spawn_blocking(move || Self::open(&path, poll))
            .await
            .map_err(|e| StoreError::Backend { store: describe, message: e.to_string() })?
    }

    /// Opens with migrations applied up to `version` only (tests of
    /// upgrades from an older schema).
    #[doc(hidden)]
    pub fn open_at_version(path: &Path, poll: Duration, version: usize) -> Result<Self, StoreError> {
        let describe = format!("sqlite://{}", path.display());
        let db_err = |e: rusqlite::Error| map_err(&describe, e);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Backend { store: describe.clone(), message: e.to_string() })?;
        }
        let mut conn = Connection::open(path).map_err(db_err)?;
        // Token hashes live here (they also key reachability probes): owner
        // only, whatever the umask.
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        // The busy timeout comes first: every later statement may meet
        // another process opening the same fresh file (a server starting
        // while an operator runs `node add`).
        conn.busy_timeout(BUSY_TIMEOUT).map_err(db_err)?;
        set_wal(&conn).map_err(db_err)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(db_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(db_err)?;
        migrate(&mut conn, &describe, version)?;
        let (events, _) = broadcast::channel(FEED_CAPACITY);
        let db = SqliteDb { describe, origin: new_origin(), conn: Mutex::new(conn) };
        Ok(Self { db: Arc::new(db), events, poll })
    }

    /// Runs `f` on the blocking pool and announces the changes it made
    /// from there, right after the commit: a caller that stops waiting (a
    /// client hung up) cancels neither the write nor its announcement.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SqliteDb) -> Result<(T, Vec<ChangeEvent>), StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (db, announce) = (self.db.clone(), self.events.clone());
        // A pending audit entry follows the call to the blocking thread.
        let pending = super::accounts::take_pending_audit();
        let (result, unwritten) = tokio::task::spawn_blocking(move || {
            PENDING_AUDIT.with(|p| *p.borrow_mut() = pending);
            let result = f(&db).map(|(value, events)| {
                for event in events {
                    let _ = announce.send(FeedEvent::Change(event));
                }
                value
            });
            (result, PENDING_AUDIT.with(|p| p.borrow_mut().take()))
        })
        .await
        .map_err(|e| StoreError::Backend { store: self.db.describe.clone(), message: e.to_string() })?;
        if let Some(entry) = unwritten {
            super::accounts::restore_pending_audit(entry);
        }
        result
    }

    /// [`SqliteStore::run`] for reads.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.run(move |db| db.with(f).map(|v| (v, Vec::new()))).await
    }
}

fn map_err(store: &str, e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode;
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) =>
        {
            StoreError::Unavailable { store: store.to_string(), reason: e.to_string() }
        }
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
        {
            StoreError::Conflict(format!("store {store}: {e}"))
        }
        rusqlite::Error::SqliteFailure(f, _) if matches!(f.code, ErrorCode::CannotOpen | ErrorCode::ReadOnly) => {
            StoreError::Unavailable { store: store.to_string(), reason: e.to_string() }
        }
        _ => StoreError::Backend { store: store.to_string(), message: e.to_string() },
    }
}

/// Switches to WAL. Changing the journal mode needs a moment of exclusive
/// access, and SQLite reports a conflict there without calling the busy
/// handler, so this retries within [`BUSY_TIMEOUT`].
fn set_wal(conn: &Connection) -> rusqlite::Result<()> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Applies pending migrations up to `target`. The version is read inside
/// the same `BEGIN IMMEDIATE` transaction that runs the DDL, so of several
/// processes opening a fresh file at once exactly one migrates and the
/// others, once the write lock is theirs, find nothing left to do.
fn migrate(conn: &mut Connection, store: &str, target: usize) -> Result<(), StoreError> {
    let db_err = |e| map_err(store, e);
    let supported = MIGRATIONS.len() as i64;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(db_err)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(db_err)?;
    if version > supported {
        return Err(StoreError::SchemaTooNew { store: store.to_string(), found: version, supported });
    }
    let target = target.min(MIGRATIONS.len()) as i64;
    for sql in MIGRATIONS.iter().take(target as usize).skip(version as usize) {
        tx.execute_batch(sql).map_err(db_err)?;
    }
    if version < target {
        tx.pragma_update(None, "user_version", target).map_err(db_err)?;
    }
    tx.commit().map_err(db_err)?;
    if version < target {
        tracing::info!(store, from = version, to = target, "applied database migrations");
    }
    Ok(())
}

impl SqliteDb {
    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut conn).map_err(|e| map_err(&self.describe, e))
    }

    /// Runs `f` in a `BEGIN IMMEDIATE` transaction (taking the write lock
    /// first, so two processes never deadlock upgrading a read) and returns
    /// the change events it logged.
    fn write<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>, &mut Vec<ChangeEvent>) -> rusqlite::Result<T>,
    ) -> Result<(T, Vec<ChangeEvent>), StoreError> {
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let mut events = Vec::new();
            let value = f(&tx, &mut events)?;
            tx.commit()?;
            Ok((value, events))
        })
    }

    /// Writes the pending audit entry (see `accounts::audited`) in `tx`.
    fn audit_pending(&self, tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
        if let Some(e) = PENDING_AUDIT.with(|p| p.borrow_mut().take()) {
            tx.execute(
                "INSERT INTO audit (at, actor, source, action, target, summary) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![e.at, e.actor, e.source, e.action, e.target, e.summary],
            )?;
        }
        Ok(())
    }

    fn log(
        &self,
        tx: &rusqlite::Transaction<'_>,
        events: &mut Vec<ChangeEvent>,
        change: Change,
    ) -> rusqlite::Result<()> {
        self.audit_pending(tx)?;
        tx.execute(
            "INSERT INTO changes (origin, kind, node, at) VALUES (?1, ?2, ?3, ?4)",
            params![self.origin, change.kind(), change.node().unwrap_or_default(), now()],
        )?;
        let revision = tx.last_insert_rowid();
        if revision % 100 == 0 {
            tx.execute("DELETE FROM changes WHERE seq <= ?1", params![revision - CHANGES_KEPT])?;
        }
        events.push(ChangeEvent { revision, change, origin: self.origin.clone() });
        Ok(())
    }

    fn row_to_node(&self, row: RawNode) -> Result<NodeRecord, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt {
            store: self.describe.clone(),
            what: format!("node {:?}: {what}", row.name),
        };
        let hostnames: Vec<String> = serde_json::from_str(&row.hostnames).map_err(|_| corrupt("hostnames"))?;
        let token_hash: [u8; 32] = row.token_hash.as_slice().try_into().map_err(|_| corrupt("token_hash"))?;
        Ok(NodeRecord {
            name: row.name.clone(),
            hostnames,
            token_hash,
            created_at: row.created_at,
            status: row.status,
            http_mode: HttpMode::parse(&row.http_mode).ok_or_else(|| corrupt("http_mode"))?,
            mode: Mode::parse(&row.mode).ok_or_else(|| corrupt("mode"))?,
            endpoint: row.endpoint,
            mode_since: row.mode_since,
        })
    }

    fn nodes(&self, conn: &Connection, filter: Option<&str>) -> Result<Vec<NodeRecord>, StoreError> {
        let raws = (|| {
            let rows = match filter {
                Some(name) => {
                    let mut stmt = conn.prepare_cached(&format!("{SELECT_NODES} WHERE n.name = ?1"))?;
                    let rows = stmt.query_map(params![name], raw_node)?.collect::<rusqlite::Result<Vec<_>>>();
                    rows
                }
                None => {
                    let mut stmt = conn.prepare_cached(&format!("{SELECT_NODES} ORDER BY n.name"))?;
                    let rows = stmt.query_map([], raw_node)?.collect::<rusqlite::Result<Vec<_>>>();
                    rows
                }
            };
            rows
        })()
        .map_err(|e| map_err(&self.describe, e))?;
        raws.into_iter().map(|r| self.row_to_node(r)).collect()
    }
}

struct RawNode {
    name: String,
    hostnames: String,
    token_hash: Vec<u8>,
    created_at: i64,
    status: NodeStatus,
    http_mode: String,
    mode: String,
    endpoint: Option<String>,
    mode_since: Option<i64>,
}

const SELECT_NODES: &str = "SELECT n.name, n.hostnames, n.token_hash, n.created_at,
        COALESCE(s.connected, 0), s.last_heartbeat, COALESCE(s.open_connections, 0), s.agent_version, s.remote_addr, s.cert_not_after, n.http_mode,
        COALESCE(m.mode, 'offline'), m.endpoint, m.since, s.routes
    FROM nodes n LEFT JOIN node_status s ON s.name = n.name LEFT JOIN node_modes m ON m.name = n.name";

fn raw_node(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawNode> {
    Ok(RawNode {
        name: row.get(0)?,
        hostnames: row.get(1)?,
        token_hash: row.get(2)?,
        created_at: row.get(3)?,
        status: NodeStatus {
            connected: row.get::<_, i64>(4)? != 0,
            last_heartbeat: row.get(5)?,
            open_connections: row.get::<_, i64>(6)?.max(0) as u64,
            agent_version: row.get(7)?,
            remote_addr: row.get(8)?,
            cert_not_after: row.get(9)?,
            routes: super::values::decode_routes(row.get::<_, Option<String>>(14)?.as_deref()),
        },
        http_mode: row.get(10)?,
        mode: row.get(11)?,
        endpoint: row.get(12)?,
        mode_since: row.get(13)?,
    })
}

fn revision(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'changes'), 0)", [], |r| r.get(0))
}

fn challenges(conn: &Connection, node: Option<&str>) -> rusqlite::Result<Vec<ChallengeRecord>> {
    let map = |r: &rusqlite::Row<'_>| {
        Ok(ChallengeRecord { node: r.get(0)?, name: r.get(1)?, value: r.get(2)?, created_at: r.get(3)? })
    };
    match node {
        Some(node) => {
            let mut stmt = conn.prepare_cached(
                "SELECT node, name, value, created_at FROM acme_challenges WHERE node = ?1 ORDER BY name, value",
            )?;
            let rows = stmt.query_map(params![node], map)?.collect();
            rows
        }
        None => {
            let mut stmt =
                conn.prepare_cached("SELECT node, name, value, created_at FROM acme_challenges ORDER BY name, value")?;
            let rows = stmt.query_map([], map)?.collect();
            rows
        }
    }
}

fn dns_records(conn: &Connection, store: &str) -> rusqlite::Result<Result<Vec<StaticRecord>, StoreError>> {
    let mut stmt = conn.prepare_cached("SELECT name, kind, value, ttl FROM dns_records ORDER BY name, kind, value")?;
    let rows = stmt
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(3)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows
        .into_iter()
        .map(|(name, kind, value, ttl)| {
            let kind = StaticKind::parse(&kind).ok_or_else(|| StoreError::Corrupt {
                store: store.to_string(),
                what: format!("record type {kind:?}"),
            })?;
            Ok(StaticRecord { name, kind, value, ttl_secs: ttl.clamp(0, u32::MAX as i64) as u32 })
        })
        .collect())
}

fn count(conn: &Connection, table: &str) -> rusqlite::Result<u64> {
    conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get::<_, i64>(0)).map(|n| n.max(0) as u64)
}

fn counts(conn: &Connection) -> rusqlite::Result<Counts> {
    Ok(Counts {
        nodes: count(conn, "nodes")?,
        samples: count(conn, "probe_samples")?,
        transitions: count(conn, "mode_transitions")?,
        challenges: count(conn, "acme_challenges")?,
        dns_records: count(conn, "dns_records")?,
    })
}

fn upsert_status(tx: &Connection, name: &str, status: &NodeStatus) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO node_status (name, connected, last_heartbeat, open_connections, agent_version, remote_addr, updated_at, cert_not_after, routes)
         SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9 WHERE EXISTS (SELECT 1 FROM nodes WHERE name = ?1)
         ON CONFLICT(name) DO UPDATE SET connected = excluded.connected,
            last_heartbeat = COALESCE(excluded.last_heartbeat, node_status.last_heartbeat),
            open_connections = excluded.open_connections,
            agent_version = COALESCE(excluded.agent_version, node_status.agent_version),
            remote_addr = COALESCE(excluded.remote_addr, node_status.remote_addr),
            updated_at = excluded.updated_at,
            cert_not_after = COALESCE(excluded.cert_not_after, node_status.cert_not_after),
            routes = COALESCE(excluded.routes, node_status.routes)",
    )?;
    stmt.execute(params![
        name,
        status.connected as i64,
        status.last_heartbeat,
        status.open_connections.min(i64::MAX as u64) as i64,
        status.agent_version,
        status.remote_addr,
        now(),
        status.cert_not_after,
        super::values::encode_routes(status.routes.as_deref())
    ])
    .map(|_| ())
}

fn own<T: ToOwned + ?Sized>(v: &T) -> T::Owned {
    v.to_owned()
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    fn describe(&self) -> &str {
        &self.db.describe
    }

    async fn add_node(
        &self,
        name: &str,
        hostnames: &[String],
        token_hash: &[u8; 32],
    ) -> Result<NodeRecord, StoreError> {
        let record = NodeRecord::new(name, hostnames, token_hash, now());
        let hostnames_json = serde_json::to_string(hostnames).unwrap_or_else(|_| "[]".into());
        let row = record.clone();
        let inserted = self
            .run(move |db| {
                db.write(|tx, events| {
                    let n = tx.execute(
                        "INSERT OR IGNORE INTO nodes (name, hostnames, token_hash, created_at, http_mode) VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![row.name, hostnames_json, row.token_hash.as_slice(), row.created_at, row.http_mode.as_str()],
                    )?;
                    if n == 1 {
                        db.log(tx, events, Change::NodeAdded(row.name.clone()))?;
                    }
                    Ok(n == 1)
                })
            })
            .await?;
        if !inserted {
            return Err(StoreError::Conflict(format!("node {name:?} already exists")));
        }
        Ok(record)
    }

    async fn remove_node(&self, name: &str) -> Result<bool, StoreError> {
        let name = own(name);
        self.run(move |db| {
            db.write(|tx, events| {
                let n = tx.execute("DELETE FROM nodes WHERE name = ?1", params![name])?;
                if n > 0 {
                    db.log(tx, events, Change::NodeRemoved(name.clone()))?;
                }
                Ok(n > 0)
            })
        })
        .await
    }

    async fn set_token_hash(&self, name: &str, token_hash: &[u8; 32]) -> Result<bool, StoreError> {
        let (name, hash) = (own(name), *token_hash);
        self.run(move |db| {
            db.write(|tx, events| {
                let n =
                    tx.execute("UPDATE nodes SET token_hash = ?2 WHERE name = ?1", params![name, hash.as_slice()])?;
                if n > 0 {
                    db.log(tx, events, Change::TokenRotated(name.clone()))?;
                }
                Ok(n > 0)
            })
        })
        .await
    }

    async fn set_http_mode(&self, name: &str, http_mode: HttpMode) -> Result<bool, StoreError> {
        let name = own(name);
        self.run(move |db| {
            db.write(|tx, events| {
                let n =
                    tx.execute("UPDATE nodes SET http_mode = ?2 WHERE name = ?1", params![name, http_mode.as_str()])?;
                if n > 0 {
                    db.log(tx, events, Change::NodeUpdated(name.clone()))?;
                }
                Ok(n > 0)
            })
        })
        .await
    }

    async fn get_node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        let name = own(name);
        self.run(move |db| {
            let nodes = db.with(|conn| Ok(db.nodes(conn, Some(&name))))??;
            Ok((nodes.into_iter().next(), Vec::new()))
        })
        .await
    }

    async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.run(move |db| Ok((db.with(|conn| Ok(db.nodes(conn, None)))??, Vec::new()))).await
    }

    async fn revision(&self) -> Result<i64, StoreError> {
        self.read(|conn| revision(conn)).await
    }

    async fn routing_state(&self) -> Result<RoutingState, StoreError> {
        self.run(move |db| {
            // One read transaction: the rows and the revision agree.
            let state = db.with(|conn| {
                let tx = conn.transaction()?;
                let revision = revision(&tx)?;
                let nodes = db.nodes(&tx, None);
                let challenges = challenges(&tx, None)?;
                let records = dns_records(&tx, &db.describe)?;
                tx.commit()?;
                Ok(nodes.and_then(|nodes| Ok(RoutingState { revision, nodes, challenges, dns_records: records? })))
            })??;
            Ok((state, Vec::new()))
        })
        .await
    }

    async fn record_statuses(&self, statuses: &[(String, NodeStatus)]) -> Result<(), StoreError> {
        if statuses.is_empty() {
            return Ok(());
        }
        let statuses = statuses.to_vec();
        self.run(move |db| {
            db.write(|tx, _| {
                for (name, status) in &statuses {
                    upsert_status(tx, name, status)?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn reset_status(&self) -> Result<(), StoreError> {
        self.run(|db| {
            db.write(|tx, _| tx.execute("UPDATE node_status SET connected = 0, open_connections = 0", []).map(|_| ()))
        })
        .await
    }

    async fn put_challenge(
        &self,
        node: &str,
        name: &str,
        value: &str,
        max_per_node: usize,
        stale_before: i64,
    ) -> Result<Published, StoreError> {
        let (node, name, value) = (own(node), own(name), own(value));
        self.run(move |db| {
            db.write(|tx, events| {
                let refreshed = tx.execute(
                    "UPDATE acme_challenges SET created_at = ?4 WHERE node = ?1 AND name = ?2 AND value = ?3",
                    params![node, name, value, now()],
                )?;
                if refreshed > 0 {
                    return Ok(Published::Unchanged);
                }
                let exists =
                    tx.query_row("SELECT 1 FROM nodes WHERE name = ?1", params![node], |_| Ok(())).optional()?;
                if exists.is_none() {
                    return Ok(Published::Full);
                }
                let count: i64 =
                    tx.query_row("SELECT COUNT(*) FROM acme_challenges WHERE node = ?1", params![node], |r| r.get(0))?;
                if count as usize >= max_per_node {
                    // At the cap, the oldest value makes room if it is stale:
                    // what is left of an order that never finished (an agent
                    // or a server that died halfway) must not block the next
                    // order for an hour, but a running order's values are kept.
                    let evicted = tx.execute(
                        "DELETE FROM acme_challenges WHERE rowid = (SELECT rowid FROM acme_challenges WHERE node = ?1
                           AND created_at < ?2 ORDER BY created_at, rowid LIMIT 1)",
                        params![node, stale_before],
                    )?;
                    if evicted == 0 || count as usize > max_per_node {
                        return Ok(Published::Full);
                    }
                }
                // (name, value) is unique and names are per node: another
                // node's row here would be a bug upstream, and stays untouched.
                let n = tx.execute(
                    "INSERT INTO acme_challenges (node, name, value, created_at) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(name, value) DO NOTHING",
                    params![node, name, value, now()],
                )?;
                if n == 0 {
                    return Ok(Published::Full);
                }
                db.log(tx, events, Change::ChallengePut(node.clone()))?;
                Ok(Published::Added)
            })
        })
        .await
    }

    async fn remove_challenge(&self, node: &str, name: &str, value: Option<&str>) -> Result<usize, StoreError> {
        let (node, name, value) = (own(node), own(name), value.map(own));
        self.run(move |db| {
            db.write(|tx, events| {
                let n = match &value {
                    Some(v) => tx.execute(
                        "DELETE FROM acme_challenges WHERE node = ?1 AND name = ?2 AND value = ?3",
                        params![node, name, v],
                    )?,
                    None => {
                        tx.execute("DELETE FROM acme_challenges WHERE node = ?1 AND name = ?2", params![node, name])?
                    }
                };
                if n > 0 {
                    db.log(tx, events, Change::ChallengeRemoved(node.clone()))?;
                }
                Ok(n)
            })
        })
        .await
    }

    async fn node_challenges(&self, node: &str) -> Result<Vec<ChallengeRecord>, StoreError> {
        let node = own(node);
        self.read(move |conn| challenges(conn, Some(&node))).await
    }

    async fn list_challenges(&self) -> Result<Vec<ChallengeRecord>, StoreError> {
        self.read(|conn| challenges(conn, None)).await
    }

    async fn expire_challenges(&self, created_before: i64) -> Result<usize, StoreError> {
        self.run(move |db| {
            db.write(|tx, events| {
                let nodes: Vec<String> = {
                    let mut stmt =
                        tx.prepare("SELECT DISTINCT node FROM acme_challenges WHERE created_at < ?1 ORDER BY node")?;
                    let rows =
                        stmt.query_map(params![created_before], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
                    rows
                };
                let n = tx.execute("DELETE FROM acme_challenges WHERE created_at < ?1", params![created_before])?;
                for node in nodes {
                    db.log(tx, events, Change::ChallengeRemoved(node))?;
                }
                Ok(n)
            })
        })
        .await
    }

    async fn record_probe(&self, name: &str, sample: &ProbeSample, keep: usize) -> Result<(), StoreError> {
        let (name, sample) = (own(name), sample.clone());
        self.run(move |db| {
            db.write(|tx, _| {
                tx.execute(
                    "INSERT INTO probe_samples (name, at, endpoint, ok, detail)
                     SELECT ?1, ?2, ?3, ?4, ?5 WHERE EXISTS (SELECT 1 FROM nodes WHERE name = ?1)",
                    params![name, sample.at, sample.endpoint, sample.ok as i64, sample.detail],
                )?;
                tx.execute(
                    "DELETE FROM probe_samples WHERE name = ?1 AND id NOT IN
                       (SELECT id FROM probe_samples WHERE name = ?1 ORDER BY id DESC LIMIT ?2)",
                    params![name, keep as i64],
                )?;
                Ok(())
            })
        })
        .await
    }

    async fn record_transition(&self, name: &str, t: &ModeChange, endpoint: Option<&str>) -> Result<(), StoreError> {
        let (name, t, endpoint) = (own(name), t.clone(), endpoint.map(own));
        self.run(move |db| {
            db.write(|tx, events| {
                let exists =
                    tx.query_row("SELECT 1 FROM nodes WHERE name = ?1", params![name], |_| Ok(())).optional()?;
                if exists.is_some() {
                    write_transition(tx, &name, &t, endpoint.as_deref())?;
                    db.log(tx, events, Change::ModeChanged(name.clone()))?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn mode_history(&self, name: &str, limit: usize) -> Result<ModeHistory, StoreError> {
        let name = own(name);
        let store = self.db.describe.clone();
        let raw = self
            .read(move |conn| {
                let current = conn
                    .query_row("SELECT mode, endpoint, since FROM node_modes WHERE name = ?1", params![name], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, i64>(2)?))
                    })
                    .optional()?;
                let mut stmt = conn.prepare_cached(
                    "SELECT at, endpoint, ok, detail FROM probe_samples WHERE name = ?1 ORDER BY id DESC LIMIT ?2",
                )?;
                let samples = stmt
                    .query_map(params![name, limit as i64], |r| {
                        Ok(ProbeSample {
                            at: r.get(0)?,
                            endpoint: r.get(1)?,
                            ok: r.get::<_, i64>(2)? != 0,
                            detail: r.get(3)?,
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                let mut stmt = conn.prepare_cached(
                    "SELECT at, from_mode, to_mode, reason FROM mode_transitions WHERE name = ?1 ORDER BY id DESC LIMIT ?2",
                )?;
                let transitions = stmt
                    .query_map(params![name, limit as i64], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok((current, samples, transitions))
            })
            .await?;
        let (current, samples, transitions) = raw;
        let mode = |s: &str| {
            Mode::parse(s).ok_or_else(|| StoreError::Corrupt { store: store.clone(), what: format!("mode {s:?}") })
        };
        Ok(ModeHistory {
            mode: current.as_ref().map(|c| mode(&c.0)).transpose()?,
            endpoint: current.as_ref().and_then(|c| c.1.clone()),
            since: current.map(|c| c.2),
            samples,
            transitions: transitions
                .into_iter()
                .map(|(at, from, to, reason)| Ok(ModeChange { at, from: mode(&from)?, to: mode(&to)?, reason }))
                .collect::<Result<_, StoreError>>()?,
        })
    }

    async fn list_dns_records(&self) -> Result<Vec<StaticRecord>, StoreError> {
        self.run(|db| Ok((db.with(|conn| dns_records(conn, &db.describe))??, Vec::new()))).await
    }

    async fn add_dns_record(&self, record: &StaticRecord) -> Result<(), StoreError> {
        let r = record.clone();
        let added = self
            .run(move |db| {
                db.write(|tx, events| {
                    let n = tx.execute(
                        "INSERT OR IGNORE INTO dns_records (name, kind, value, ttl, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![r.name, r.kind.as_str(), r.value, r.ttl_secs, now()],
                    )?;
                    if n == 1 {
                        db.log(tx, events, Change::DnsRecordsChanged)?;
                    }
                    Ok(n == 1)
                })
            })
            .await?;
        if !added {
            return Err(StoreError::Conflict(format!(
                "a {} record {:?} with this value exists already",
                record.kind, record.name
            )));
        }
        Ok(())
    }

    async fn list_services(&self) -> Result<Vec<ServiceRecord>, StoreError> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare_cached("SELECT name, node, listen, target, created_at FROM services ORDER BY name")?;
            let rows = stmt.query_map([], |r| {
                Ok(ServiceRecord {
                    name: r.get(0)?,
                    node: r.get(1)?,
                    listen: r.get(2)?,
                    target: r.get(3)?,
                    created_at: r.get(4)?,
                })
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })
        .await
    }

    async fn add_service(&self, service: &ServiceRecord) -> Result<(), StoreError> {
        let svc = service.clone();
        let outcome = self
            .run(move |db| {
                db.write(|tx, events| {
                    let node = tx.query_row("SELECT COUNT(*) FROM nodes WHERE name = ?1", [&svc.node], |r| r.get::<_, i64>(0))?;
                    if node == 0 {
                        return Ok(Some(false));
                    }
                    let n = tx.execute(
                        "INSERT OR IGNORE INTO services (name, node, listen, target, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![svc.name, svc.node, svc.listen, svc.target, now()],
                    )?;
                    if n == 1 {
                        db.log(tx, events, Change::ServicesChanged)?;
                        return Ok(None);
                    }
                    Ok(Some(true))
                })
            })
            .await?;
        match outcome {
            None => Ok(()),
            Some(false) => Err(StoreError::NotFound(format!("no node named {:?}", service.node))),
            Some(true) => Err(StoreError::Conflict(format!(
                "a service named {:?} or listening on {} exists already",
                service.name, service.listen
            ))),
        }
    }

    async fn list_access(&self) -> Result<Vec<AccessRecord>, StoreError> {
        let store = self.db.describe.clone();
        let rows = self
            .read(|conn| {
                let mut stmt = conn.prepare_cached("SELECT scope, node, policy FROM access_policies ORDER BY scope")?;
                let rows = stmt
                    .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        rows.into_iter()
            .map(|(scope, node, policy)| {
                let policy = serde_json::from_str(&policy).map_err(|e| StoreError::Corrupt {
                    store: store.clone(),
                    what: format!("access policy of {scope:?}: {e}"),
                })?;
                Ok(AccessRecord { scope, node, policy })
            })
            .collect()
    }

    async fn set_access(&self, record: &AccessRecord) -> Result<(), StoreError> {
        let r = record.clone();
        let policy = serde_json::to_string(&record.policy).unwrap_or_default();
        let set = self
            .run(move |db| {
                db.write(|tx, events| {
                    let n = tx.execute(
                        "INSERT INTO access_policies (scope, node, policy)
                         SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM nodes WHERE name = ?2)
                         ON CONFLICT(scope) DO UPDATE SET node = excluded.node, policy = excluded.policy",
                        params![r.scope, r.node, policy],
                    )?;
                    if n > 0 {
                        db.log(tx, events, Change::AccessChanged)?;
                    }
                    Ok(n > 0)
                })
            })
            .await?;
        if !set {
            return Err(StoreError::NotFound(format!("no node named {:?}", record.node)));
        }
        Ok(())
    }

    async fn clear_access(&self, scope: &str) -> Result<bool, StoreError> {
        let scope = own(scope);
        self.run(move |db| {
            db.write(|tx, events| {
                let n = tx.execute("DELETE FROM access_policies WHERE scope = ?1", [&scope])?;
                if n > 0 {
                    db.log(tx, events, Change::AccessChanged)?;
                }
                Ok(n > 0)
            })
        })
        .await
    }

    async fn list_domains(&self) -> Result<Vec<DomainRecord>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT name, node, verify_value, created_at, verified_at, checked_at, failing_since, last_error, routed
                 FROM domains ORDER BY name",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(DomainRecord {
                    name: r.get(0)?,
                    node: r.get(1)?,
                    verify_value: r.get(2)?,
                    created_at: r.get(3)?,
                    state: edge_proto::domains::VerifyState {
                        verified_at: r.get(4)?,
                        checked_at: r.get(5)?,
                        failing_since: r.get(6)?,
                        last_error: r.get(7)?,
                        routed: r.get(8)?,
                    },
                })
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })
        .await
    }

    async fn add_domain(&self, domain: &DomainRecord) -> Result<(), StoreError> {
        let d = domain.clone();
        let outcome = self
            .run(move |db| {
                db.write(|tx, events| {
                    let node = tx.query_row("SELECT COUNT(*) FROM nodes WHERE name = ?1", [&d.node], |r| r.get::<_, i64>(0))?;
                    if node == 0 {
                        return Ok(Some(false));
                    }
                    let st = &d.state;
                    let n = tx.execute(
                        "INSERT OR IGNORE INTO domains (name, node, verify_value, created_at, verified_at, checked_at, failing_since, last_error, routed)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                        params![d.name, d.node, d.verify_value, now(), st.verified_at, st.checked_at, st.failing_since, st.last_error, st.routed],
                    )?;
                    if n == 1 {
                        db.log(tx, events, Change::DomainsChanged)?;
                        return Ok(None);
                    }
                    Ok(Some(true))
                })
            })
            .await?;
        match outcome {
            None => Ok(()),
            Some(false) => Err(StoreError::NotFound(format!("no node named {:?}", domain.node))),
            Some(true) => Err(StoreError::Conflict(format!("the domain {} is held by a node already", domain.name))),
        }
    }

    async fn remove_domain(&self, name: &str) -> Result<bool, StoreError> {
        let name = own(name);
        self.run(move |db| {
            db.write(|tx, events| {
                let n = tx.execute("DELETE FROM domains WHERE name = ?1", [&name])?;
                if n > 0 {
                    db.log(tx, events, Change::DomainsChanged)?;
                }
                Ok(n > 0)
            })
        })
        .await
    }

    async fn record_domain_check(
        &self,
        checked: &DomainRecord,
        state: &edge_proto::domains::VerifyState,
    ) -> Result<bool, StoreError> {
        let (name, node, value, st) =
            (checked.name.clone(), checked.node.clone(), checked.verify_value.clone(), state.clone());
        self.run(move |db| {
            db.write(|tx, events| {
                let before: Option<bool> = tx
                    .query_row(
                        "SELECT routed FROM domains WHERE name = ?1 AND node = ?2 AND verify_value = ?3",
                        [&name, &node, &value],
                        |r| r.get(0),
                    )
                    .optional()?;
                let Some(routed) = before else { return Ok(false) };
                tx.execute(
                    "UPDATE domains SET verified_at = ?3, checked_at = ?4, failing_since = ?5, last_error = ?6, routed = ?7
                     WHERE name = ?1 AND node = ?2",
                    params![name, node, st.verified_at, st.checked_at, st.failing_since, st.last_error, st.routed],
                )?;
                if routed != st.routed {
                    db.log(tx, events, Change::DomainsChanged)?;
                }
                Ok(true)
            })
        })
        .await
    }

    async fn remove_service(&self, name: &str) -> Result<bool, StoreError> {
        let name = own(name);
        self.run(move |db| {
            db.write(|tx, events| {
                let n = tx.execute("DELETE FROM services WHERE name = ?1", [&name])?;
                if n > 0 {
                    db.log(tx, events, Change::ServicesChanged)?;
                }
                Ok(n > 0)
            })
        })
        .await
    }

    async fn remove_dns_records(
        &self,
        name: &str,
        kind: Option<StaticKind>,
        value: Option<&str>,
    ) -> Result<usize, StoreError> {
        let (name, kind, value) = (own(name), kind.map(|k| k.as_str()), value.map(own));
        self.run(move |db| {
            db.write(|tx, events| {
                let n = tx.execute(
                    "DELETE FROM dns_records WHERE name = ?1 AND (?2 IS NULL OR kind = ?2) AND (?3 IS NULL OR value = ?3)",
                    params![name, kind, value],
                )?;
                if n > 0 {
                    db.log(tx, events, Change::DnsRecordsChanged)?;
                }
                Ok(n)
            })
        })
        .await
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        self.read(|conn| counts(conn)).await
    }

    async fn export(&self) -> Result<Snapshot, StoreError> {
        let store = self.db.describe.clone();
        let (revision, nodes, samples, transitions, challenges, records) = self
            .run(move |db| {
                let out = db.with(|conn| {
                    let tx = conn.transaction()?;
                    let revision = revision(&tx)?;
                    let nodes = db.nodes(&tx, None);
                    let samples = {
                        let mut stmt =
                            tx.prepare("SELECT name, at, endpoint, ok, detail FROM probe_samples ORDER BY id")?;
                        let rows = stmt
                            .query_map([], |r| {
                                Ok((
                                    r.get::<_, String>(0)?,
                                    ProbeSample {
                                        at: r.get(1)?,
                                        endpoint: r.get(2)?,
                                        ok: r.get::<_, i64>(3)? != 0,
                                        detail: r.get(4)?,
                                    },
                                ))
                            })?
                            .collect::<rusqlite::Result<Vec<_>>>()?;
                        rows
                    };
                    let transitions = {
                        let mut stmt = tx
                            .prepare("SELECT name, at, from_mode, to_mode, reason FROM mode_transitions ORDER BY id")?;
                        let rows = stmt
                            .query_map([], |r| {
                                Ok((
                                    r.get::<_, String>(0)?,
                                    r.get::<_, i64>(1)?,
                                    r.get::<_, String>(2)?,
                                    r.get::<_, String>(3)?,
                                    r.get::<_, String>(4)?,
                                ))
                            })?
                            .collect::<rusqlite::Result<Vec<_>>>()?;
                        rows
                    };
                    let challenges = challenges(&tx, None)?;
                    let records = dns_records(&tx, &db.describe)?;
                    tx.commit()?;
                    Ok((revision, nodes, samples, transitions, challenges, records))
                })?;
                Ok((out, Vec::new()))
            })
            .await?;
        let mode = |s: &str| {
            Mode::parse(s).ok_or_else(|| StoreError::Corrupt { store: store.clone(), what: format!("mode {s:?}") })
        };
        Ok(Snapshot {
            revision,
            nodes: nodes?,
            samples,
            transitions: transitions
                .into_iter()
                .map(|(n, at, from, to, reason)| Ok((n, ModeChange { at, from: mode(&from)?, to: mode(&to)?, reason })))
                .collect::<Result<_, StoreError>>()?,
            challenges,
            dns_records: records?,
        })
    }

    async fn import(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let snapshot = snapshot.clone();
        let store = self.db.describe.clone();
        let refused = self
            .run(move |db| {
                db.write(|tx, events| {
                    let found = counts(tx)?;
                    if !found.is_empty() {
                        return Ok(Some(found));
                    }
                    for n in &snapshot.nodes {
                        let hostnames = serde_json::to_string(&n.hostnames).unwrap_or_else(|_| "[]".into());
                        tx.execute(
                            "INSERT INTO nodes (name, hostnames, token_hash, created_at, http_mode) VALUES (?1, ?2, ?3, ?4, ?5)",
                            params![n.name, hostnames, n.token_hash.as_slice(), n.created_at, n.http_mode.as_str()],
                        )?;
                        upsert_status(tx, &n.name, &n.status)?;
                        if let Some(since) = n.mode_since {
                            tx.execute(
                                "INSERT INTO node_modes (name, mode, endpoint, since) VALUES (?1, ?2, ?3, ?4)",
                                params![n.name, n.mode.as_str(), n.endpoint, since],
                            )?;
                        }
                    }
                    for (name, s) in &snapshot.samples {
                        tx.execute(
                            "INSERT INTO probe_samples (name, at, endpoint, ok, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
                            params![name, s.at, s.endpoint, s.ok as i64, s.detail],
                        )?;
                    }
                    for (name, t) in &snapshot.transitions {
                        tx.execute(
                            "INSERT INTO mode_transitions (name, at, from_mode, to_mode, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
                            params![name, t.at, t.from.as_str(), t.to.as_str(), t.reason],
                        )?;
                    }
                    for c in &snapshot.challenges {
                        tx.execute(
                            "INSERT INTO acme_challenges (node, name, value, created_at) VALUES (?1, ?2, ?3, ?4)",
                            params![c.node, c.name, c.value, c.created_at],
                        )?;
                    }
                    for r in &snapshot.dns_records {
                        tx.execute(
                            "INSERT INTO dns_records (name, kind, value, ttl, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                            params![r.name, r.kind.as_str(), r.value, r.ttl_secs, now()],
                        )?;
                    }
                    // Continue from the source's revision: serials never go back.
                    tx.execute(
                        "UPDATE sqlite_sequence SET seq = MAX(seq, ?1) WHERE name = 'changes'",
                        params![snapshot.revision],
                    )?;
                    db.log(tx, events, Change::Imported)?;
                    Ok(None)
                })
            })
            .await?;
        match refused {
            Some(found) => Err(StoreError::NotEmpty { store, what: found.to_string() }),
            None => Ok(()),
        }
    }

    async fn record_transition_fenced(
        &self,
        name: &str,
        t: &ModeChange,
        endpoint: Option<&str>,
        fence: &Fence,
    ) -> Result<bool, StoreError> {
        let (name, t, endpoint, fence) = (own(name), t.clone(), endpoint.map(own), fence.clone());
        self.run(move |db| {
            db.write(|tx, events| {
                let held = tx
                    .query_row(
                        "SELECT 1 FROM leases WHERE name = ?1 AND holder = ?2 AND token = ?3 AND expires_at >= ?4",
                        params![fence.lease, fence.holder, fence.token, now_ms()],
                        |_| Ok(()),
                    )
                    .optional()?;
                let exists =
                    tx.query_row("SELECT 1 FROM nodes WHERE name = ?1", params![name], |_| Ok(())).optional()?;
                let stored: Option<String> = tx
                    .query_row("SELECT mode FROM node_modes WHERE name = ?1", params![name], |r| r.get(0))
                    .optional()?;
                let current = stored.as_deref().and_then(Mode::parse).unwrap_or(Mode::Offline);
                if held.is_none() || exists.is_none() || current != t.from {
                    return Ok(false);
                }
                write_transition(tx, &name, &t, endpoint.as_deref())?;
                db.log(tx, events, Change::ModeChanged(name.clone()))?;
                Ok(true)
            })
        })
        .await
    }

    async fn register_server(&self, r: &ServerRecord, lease_ms: i64) -> Result<(), StoreError> {
        let r = r.clone();
        self.run(move |db| {
            db.write(|tx, events| {
                let now = now_ms();
                tx.execute(
                    "INSERT INTO servers (id, name, quic, api, peer, fingerprint, dns, nameservers, addresses, version,
                        started_at, expires_at, gone, tunnels)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, 0, '[]')
                     ON CONFLICT(id) DO UPDATE SET name = excluded.name, quic = excluded.quic, api = excluded.api,
                        peer = excluded.peer, fingerprint = excluded.fingerprint, dns = excluded.dns,
                        nameservers = excluded.nameservers, addresses = excluded.addresses,
                        version = excluded.version, started_at = excluded.started_at,
                        expires_at = excluded.expires_at, gone = 0, tunnels = '[]'",
                    params![
                        r.id,
                        r.name,
                        r.quic,
                        r.api,
                        r.peer,
                        r.fingerprint,
                        r.dns,
                        json_text(&r.nameservers),
                        json_text(&r.addresses),
                        r.version,
                        now,
                        now + lease_ms
                    ],
                )?;
                db.log(tx, events, Change::ServersChanged)?;
                Ok(())
            })
        })
        .await
    }

    async fn renew_server(&self, id: &str, lease_ms: i64, tunnels: &[String]) -> Result<bool, StoreError> {
        let (id, tunnels) = (own(id), json_text(tunnels));
        self.run(move |db| {
            db.with(|conn| {
                conn.execute(
                    "UPDATE servers SET expires_at = ?2, tunnels = ?3 WHERE id = ?1 AND gone = 0",
                    params![id, now_ms() + lease_ms, tunnels],
                )
            })
            .map(|n| (n > 0, Vec::new()))
        })
        .await
    }

    async fn expire_servers(&self) -> Result<usize, StoreError> {
        self.run(move |db| {
            db.write(|tx, events| {
                let n =
                    tx.execute("UPDATE servers SET gone = 1 WHERE gone = 0 AND expires_at < ?1", params![now_ms()])?;
                if n > 0 {
                    db.log(tx, events, Change::ServersChanged)?;
                }
                Ok(n)
            })
        })
        .await
    }

    async fn leave_server(&self, id: &str) -> Result<(), StoreError> {
        let id = own(id);
        self.run(move |db| {
            db.write(|tx, events| {
                let n = tx.execute(
                    "UPDATE servers SET gone = 1, expires_at = MIN(expires_at, ?2) WHERE id = ?1 AND gone = 0",
                    params![id, now_ms()],
                )?;
                // Expired, not deleted: fencing tokens keep counting up.
                tx.execute("UPDATE leases SET expires_at = ?2 - 1 WHERE holder = ?1", params![id, now_ms()])?;
                if n > 0 {
                    db.log(tx, events, Change::ServersChanged)?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn remove_server(&self, id: &str) -> Result<bool, StoreError> {
        let id = own(id);
        self.run(move |db| {
            db.write(|tx, events| {
                let n = tx.execute("DELETE FROM servers WHERE id = ?1", params![id])?;
                if n > 0 {
                    db.log(tx, events, Change::ServersChanged)?;
                }
                Ok(n > 0)
            })
        })
        .await
    }

    async fn list_servers(&self) -> Result<ServerList, StoreError> {
        self.read(|conn| {
            let now = now_ms();
            let revision = revision(conn)?;
            let mut stmt = conn.prepare(
                "SELECT id, name, quic, api, peer, fingerprint, dns, nameservers, addresses, version, started_at,
                    expires_at, gone, tunnels FROM servers ORDER BY name, id",
            )?;
            let rows = stmt.query_map([], |row| server_row(row, now))?;
            Ok(ServerList { revision, servers: rows.collect::<rusqlite::Result<_>>()? })
        })
        .await
    }

    async fn acquire_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<Option<i64>, StoreError> {
        let (name, holder) = (own(name), own(holder));
        self.run(move |db| {
            db.write(|tx, _| {
                let now = now_ms();
                let current: Option<(String, i64, i64)> = tx
                    .query_row("SELECT holder, token, expires_at FROM leases WHERE name = ?1", params![name], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })
                    .optional()?;
                let token = match current {
                    Some((h, token, expires)) if h == holder && expires >= now => token,
                    Some((_, _, expires)) if expires >= now => return Ok(None),
                    Some((_, token, _)) => token + 1,
                    None => 1,
                };
                tx.execute(
                    "INSERT INTO leases (name, holder, token, expires_at) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(name) DO UPDATE SET holder = excluded.holder, token = excluded.token,
                        expires_at = excluded.expires_at",
                    params![name, holder, token, now + ttl_ms],
                )?;
                Ok(Some(token))
            })
        })
        .await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let (name, holder) = (own(name), own(holder));
        self.run(move |db| {
            db.with(|conn| {
                conn.execute(
                    "UPDATE leases SET expires_at = ?3 - 1 WHERE name = ?1 AND holder = ?2",
                    params![name, holder, now_ms()],
                )
            })
            .map(|_| ((), Vec::new()))
        })
        .await
    }

    async fn lease(&self, name: &str) -> Result<Option<Lease>, StoreError> {
        let name = own(name);
        self.read(move |conn| {
            conn.query_row("SELECT name, holder, token, expires_at FROM leases WHERE name = ?1", params![name], |r| {
                Ok(Lease {
                    name: r.get(0)?,
                    holder: r.get(1)?,
                    token: r.get(2)?,
                    left_ms: r.get::<_, i64>(3)? - now_ms(),
                })
            })
            .optional()
        })
        .await
    }

    async fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        let key = own(key);
        self.read(move |conn| {
            conn.query_row("SELECT value FROM settings WHERE key = ?1", params![key], |r| r.get(0)).optional()
        })
        .await
    }

    async fn init_setting(&self, key: &str, value: &str) -> Result<String, StoreError> {
        let (key, value) = (own(key), own(value));
        self.run(move |db| {
            db.write(|tx, _| {
                tx.execute(
                    "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO NOTHING",
                    params![key, value],
                )?;
                tx.query_row("SELECT value FROM settings WHERE key = ?1", params![key], |r| r.get(0))
            })
        })
        .await
    }

    async fn lock_order(&self, _node: &str, _wait: Duration) -> Result<OrderLock, StoreError> {
        // One server per SQLite file: its in-process lock is enough.
        Ok(OrderLock::local())
    }

    fn subscribe(&self) -> broadcast::Receiver<FeedEvent> {
        self.events.subscribe()
    }

    fn watch(&self, since: i64, shutdown: CancellationToken) -> BoxFuture<'static, ()> {
        let (db, events, poll) = (self.db.clone(), self.events.clone(), self.poll);
        Box::pin(poll_changes(db, events, poll, since, shutdown))
    }
}

/// Reads the change log every `poll` and announces other processes' rows.
async fn poll_changes(
    db: Arc<SqliteDb>,
    events: broadcast::Sender<FeedEvent>,
    poll: Duration,
    since: i64,
    shutdown: CancellationToken,
) {
    let mut cursor = since;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(poll) => {}
        }
        let reader = db.clone();
        let read = tokio::task::spawn_blocking(move || {
            reader.with(|conn| {
                let oldest: Option<i64> = conn.query_row("SELECT MIN(seq) FROM changes", [], |r| r.get(0))?;
                let mut stmt = conn.prepare_cached(
                    "SELECT seq, origin, kind, node FROM changes WHERE seq > ?1 ORDER BY seq LIMIT 1000",
                )?;
                let rows = stmt
                    .query_map(params![cursor], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                        ))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok((oldest, rows, revision(conn)?))
            })
        })
        .await;
        let (oldest, rows, latest) = match read {
            Ok(Ok(read)) => {
                if failing {
                    tracing::info!(store = %db.describe, "reading the change log works again");
                    failing = false;
                }
                read
            }
            Ok(Err(e)) => {
                if !failing {
                    tracing::warn!(store = %db.describe, error = %e, "reading the change log failed; retrying");
                    failing = true;
                }
                continue;
            }
            Err(_) => continue,
        };
        // Rows between the cursor and the oldest kept were pruned: what
        // they said is lost, so the subscriber reloads everything.
        if oldest.is_some_and(|o| o > cursor + 1) && latest > cursor {
            let _ = events.send(FeedEvent::Resync);
            cursor = latest;
            continue;
        }
        for (seq, origin, kind, node) in rows {
            cursor = seq;
            if origin != db.origin {
                let change = Change::from_parts(&kind, &node);
                let _ = events.send(FeedEvent::Change(ChangeEvent { revision: seq, change, origin }));
            }
        }
    }
}

mod accounts;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_openers_of_a_fresh_file_all_succeed() {
        // Processes racing on a fresh data_dir (systemd starting the server
        // while `node add` runs) used to fail with "table nodes already
        // exists". Threads with their own connections race the same way.
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        for round in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("edge.db");
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
            let openers: Vec<_> = (0..8)
                .map(|i| {
                    let (path, barrier) = (path.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        SqliteStore::open(&path, Duration::from_secs(1)).map(|_| i)
                    })
                })
                .collect();
            for (i, opener) in openers.into_iter().enumerate() {
                opener.join().unwrap().unwrap_or_else(|e| panic!("round {round}, opener {i}: {e}"));
            }
            let store = SqliteStore::open(&path, Duration::from_secs(1)).unwrap();
            runtime.block_on(async {
                for i in 0..8 {
                    store.add_node(&format!("n{i}"), &[], &[i as u8; 32]).await.unwrap();
                }
                assert_eq!(store.list_nodes().await.unwrap().len(), 8);
            });
        }
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge.db");
        drop(SqliteStore::open(&path, Duration::from_secs(1)).unwrap());
        Connection::open(&path).unwrap().pragma_update(None, "user_version", 99).unwrap();
        let err = SqliteStore::open(&path, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, StoreError::SchemaTooNew { found: 99, .. }), "{err}");
    }

    #[test]
    fn the_revision_continues_from_the_old_counter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge.db");
        drop(SqliteStore::open_at_version(&path, Duration::from_secs(1), 3).unwrap());
        Connection::open(&path).unwrap().execute("UPDATE meta SET value = 41 WHERE key = 'revision'", []).unwrap();
        let store = SqliteStore::open(&path, Duration::from_secs(1)).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            assert_eq!(store.revision().await.unwrap(), 41);
            store.add_node("n1", &[], &[1; 32]).await.unwrap();
            assert_eq!(store.revision().await.unwrap(), 42);
        });
    }
}
