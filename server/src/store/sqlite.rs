//! SQLite implementation of [`Store`]: one file, WAL journal, versioned
//! migrations applied in transactions at open.
//!
//! The connection sits behind a mutex: every operation is a few
//! milliseconds and none is on the per-connection path.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};

use super::{
    ChallengeRecord, ModeChange, ModeHistory, NodeRecord, NodeStatus, ProbeSample, Published, Store, StoreError,
};

/// Schema migrations; entry `i` moves the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
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
];

/// The embedded store.
#[derive(Debug)]
pub struct SqliteStore {
    path: String,
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let display = path.display().to_string();
        let db_err = |source| StoreError::Database { path: display.clone(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| db_err(io_error(e)))?;
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
        migrate(&mut conn, &display)?;
        Ok(Self { path: display, conn: Mutex::new(conn) })
    }

    /// The database file.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(&self.path)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut conn).map_err(|source| StoreError::Database { path: self.path.clone(), source })
    }

    fn row_to_node(&self, row: RawNode) -> Result<NodeRecord, StoreError> {
        let corrupt =
            |what: &str| StoreError::Corrupt { path: self.path.clone(), what: format!("node {:?}: {what}", row.name) };
        let hostnames: Vec<String> = serde_json::from_str(&row.hostnames).map_err(|_| corrupt("hostnames"))?;
        let token_hash: [u8; 32] = row.token_hash.as_slice().try_into().map_err(|_| corrupt("token_hash"))?;
        Ok(NodeRecord {
            name: row.name,
            hostnames,
            token_hash,
            created_at: row.created_at,
            status: row.status,
            http_mode: row.http_mode,
            mode: row.mode,
            endpoint: row.endpoint,
        })
    }
}

fn io_error(e: std::io::Error) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(Box::new(e))
}

/// How long a statement waits for another process's write lock.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

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
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Applies pending migrations. The version is read inside the same
/// `BEGIN IMMEDIATE` transaction that runs the DDL, so of several processes
/// opening a fresh file at once exactly one migrates and the others, once
/// the write lock is theirs, find nothing left to do.
fn migrate(conn: &mut Connection, path: &str) -> Result<(), StoreError> {
    let db_err = |source| StoreError::Database { path: path.to_string(), source };
    let supported = MIGRATIONS.len() as i64;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(db_err)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(db_err)?;
    if version > supported {
        return Err(StoreError::SchemaTooNew { path: path.to_string(), found: version, supported });
    }
    for sql in MIGRATIONS.iter().skip(version as usize) {
        tx.execute_batch(sql).map_err(db_err)?;
    }
    if version < supported {
        tx.pragma_update(None, "user_version", supported).map_err(db_err)?;
    }
    tx.commit().map_err(db_err)?;
    if version < supported {
        tracing::info!(path, from = version, to = supported, "applied database migrations");
    }
    Ok(())
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
}

const SELECT_NODES: &str = "SELECT n.name, n.hostnames, n.token_hash, n.created_at,
        COALESCE(s.connected, 0), s.last_heartbeat, COALESCE(s.open_connections, 0), s.agent_version, s.remote_addr, s.cert_not_after, n.http_mode,
        COALESCE(m.mode, 'offline'), m.endpoint
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
        },
        http_mode: row.get(10)?,
        mode: row.get(11)?,
        endpoint: row.get(12)?,
    })
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn bump_revision(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute("UPDATE meta SET value = value + 1 WHERE key = 'revision'", []).map(|_| ())
}

impl Store for SqliteStore {
    fn add_node(&self, name: &str, hostnames: &[String], token_hash: &[u8; 32]) -> Result<NodeRecord, StoreError> {
        let created_at = now();
        let hostnames_json = serde_json::to_string(hostnames).unwrap_or_else(|_| "[]".into());
        let inserted = self.with(|conn| {
            let tx = conn.transaction()?;
            let n = tx.execute(
                "INSERT OR IGNORE INTO nodes (name, hostnames, token_hash, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![name, hostnames_json, token_hash.as_slice(), created_at],
            )?;
            if n == 1 {
                bump_revision(&tx)?;
            }
            tx.commit()?;
            Ok(n == 1)
        })?;
        if !inserted {
            return Err(StoreError::NodeExists(name.to_string()));
        }
        Ok(NodeRecord {
            name: name.to_string(),
            hostnames: hostnames.to_vec(),
            token_hash: *token_hash,
            created_at,
            status: NodeStatus::default(),
            http_mode: "redirect".into(),
            mode: "offline".into(),
            endpoint: None,
        })
    }

    fn remove_node(&self, name: &str) -> Result<bool, StoreError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let n = tx.execute("DELETE FROM nodes WHERE name = ?1", params![name])?;
            if n > 0 {
                bump_revision(&tx)?;
            }
            tx.commit()?;
            Ok(n > 0)
        })
    }

    fn set_token_hash(&self, name: &str, token_hash: &[u8; 32]) -> Result<bool, StoreError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let n =
                tx.execute("UPDATE nodes SET token_hash = ?2 WHERE name = ?1", params![name, token_hash.as_slice()])?;
            if n > 0 {
                bump_revision(&tx)?;
            }
            tx.commit()?;
            Ok(n > 0)
        })
    }

    fn get_node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        let raw = self.with(|conn| {
            conn.query_row(&format!("{SELECT_NODES} WHERE n.name = ?1"), params![name], raw_node).optional()
        })?;
        raw.map(|r| self.row_to_node(r)).transpose()
    }

    fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let raws = self.with(|conn| {
            let mut stmt = conn.prepare(&format!("{SELECT_NODES} ORDER BY n.name"))?;
            let rows = stmt.query_map([], raw_node)?.collect::<rusqlite::Result<Vec<_>>>();
            rows
        })?;
        raws.into_iter().map(|r| self.row_to_node(r)).collect()
    }

    fn revision(&self) -> Result<i64, StoreError> {
        self.with(|conn| conn.query_row("SELECT value FROM meta WHERE key = 'revision'", [], |r| r.get(0)))
    }

    fn record_status(&self, name: &str, status: &NodeStatus) -> Result<(), StoreError> {
        self.with(|conn| {
            conn.execute(
                "INSERT INTO node_status (name, connected, last_heartbeat, open_connections, agent_version, remote_addr, updated_at, cert_not_after)
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8 WHERE EXISTS (SELECT 1 FROM nodes WHERE name = ?1)
                 ON CONFLICT(name) DO UPDATE SET connected = excluded.connected,
                    last_heartbeat = COALESCE(excluded.last_heartbeat, node_status.last_heartbeat),
                    open_connections = excluded.open_connections,
                    agent_version = COALESCE(excluded.agent_version, node_status.agent_version),
                    remote_addr = COALESCE(excluded.remote_addr, node_status.remote_addr),
                    updated_at = excluded.updated_at,
                    cert_not_after = COALESCE(excluded.cert_not_after, node_status.cert_not_after)",
                params![
                    name,
                    status.connected as i64,
                    status.last_heartbeat,
                    status.open_connections as i64,
                    status.agent_version,
                    status.remote_addr,
                    now(),
                    status.cert_not_after
                ],
            )
            .map(|_| ())
        })
    }

    fn reset_status(&self) -> Result<(), StoreError> {
        self.with(|conn| conn.execute("UPDATE node_status SET connected = 0, open_connections = 0", []).map(|_| ()))
    }

    fn put_challenge(
        &self,
        node: &str,
        name: &str,
        value: &str,
        max_per_node: usize,
        stale_before: i64,
    ) -> Result<Published, StoreError> {
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let refreshed = tx.execute(
                "UPDATE acme_challenges SET created_at = ?4 WHERE node = ?1 AND name = ?2 AND value = ?3",
                params![node, name, value, now()],
            )?;
            if refreshed > 0 {
                tx.commit()?;
                return Ok(Published::Unchanged);
            }
            let count: i64 =
                tx.query_row("SELECT COUNT(*) FROM acme_challenges WHERE node = ?1", params![node], |r| r.get(0))?;
            if count as usize >= max_per_node {
                // At the cap, the oldest value makes room if it is stale:
                // what is left of an order that never finished (an agent or
                // a server that died halfway) must not block the next order
                // for an hour, but a running order's values are kept.
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
            tx.execute(
                "INSERT INTO acme_challenges (node, name, value, created_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name, value) DO NOTHING",
                params![node, name, value, now()],
            )?;
            bump_revision(&tx)?;
            tx.commit()?;
            Ok(Published::Added)
        })
    }

    fn remove_challenge(&self, node: &str, name: &str, value: Option<&str>) -> Result<usize, StoreError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let n = match value {
                Some(v) => tx.execute(
                    "DELETE FROM acme_challenges WHERE node = ?1 AND name = ?2 AND value = ?3",
                    params![node, name, v],
                )?,
                None => tx.execute("DELETE FROM acme_challenges WHERE node = ?1 AND name = ?2", params![node, name])?,
            };
            if n > 0 {
                bump_revision(&tx)?;
            }
            tx.commit()?;
            Ok(n)
        })
    }

    fn list_challenges(&self) -> Result<Vec<ChallengeRecord>, StoreError> {
        self.with(|conn| {
            let mut stmt =
                conn.prepare("SELECT node, name, value, created_at FROM acme_challenges ORDER BY name, value")?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(ChallengeRecord { node: r.get(0)?, name: r.get(1)?, value: r.get(2)?, created_at: r.get(3)? })
                })?
                .collect::<rusqlite::Result<Vec<_>>>();
            rows
        })
    }

    fn set_http_mode(&self, name: &str, http_mode: &str) -> Result<bool, StoreError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let n = tx.execute("UPDATE nodes SET http_mode = ?2 WHERE name = ?1", params![name, http_mode])?;
            if n > 0 {
                bump_revision(&tx)?;
            }
            tx.commit()?;
            Ok(n > 0)
        })
    }

    fn record_probe(&self, name: &str, sample: &ProbeSample, keep: usize) -> Result<(), StoreError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
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
            tx.commit()
        })
    }

    fn record_transition(&self, name: &str, t: &ModeChange, endpoint: Option<&str>) -> Result<(), StoreError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let exists: bool =
                tx.query_row("SELECT 1 FROM nodes WHERE name = ?1", params![name], |_| Ok(())).optional()?.is_some();
            if exists {
                tx.execute(
                    "INSERT INTO mode_transitions (name, at, from_mode, to_mode, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![name, t.at, t.from, t.to, t.reason],
                )?;
                tx.execute(
                    "INSERT INTO node_modes (name, mode, endpoint, since) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(name) DO UPDATE SET mode = excluded.mode, endpoint = excluded.endpoint,
                        since = excluded.since",
                    params![name, t.to, endpoint, t.at],
                )?;
                bump_revision(&tx)?;
            }
            tx.commit()
        })
    }

    fn mode_history(&self, name: &str, limit: usize) -> Result<ModeHistory, StoreError> {
        self.with(|conn| {
            let current = conn
                .query_row("SELECT mode, endpoint, since FROM node_modes WHERE name = ?1", params![name], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, i64>(2)?))
                })
                .optional()?;
            let mut stmt = conn.prepare(
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
            let mut stmt = conn.prepare(
                "SELECT at, from_mode, to_mode, reason FROM mode_transitions WHERE name = ?1 ORDER BY id DESC LIMIT ?2",
            )?;
            let transitions = stmt
                .query_map(params![name, limit as i64], |r| {
                    Ok(ModeChange { at: r.get(0)?, from: r.get(1)?, to: r.get(2)?, reason: r.get(3)? })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(ModeHistory {
                mode: current.as_ref().map(|c| c.0.clone()),
                endpoint: current.as_ref().and_then(|c| c.1.clone()),
                since: current.map(|c| c.2),
                samples,
                transitions,
            })
        })
    }

    fn expire_challenges(&self, created_before: i64) -> Result<usize, StoreError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let n = tx.execute("DELETE FROM acme_challenges WHERE created_at < ?1", params![created_before])?;
            if n > 0 {
                bump_revision(&tx)?;
            }
            tx.commit()?;
            Ok(n)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_survive_reopen_and_revision_moves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge.db");
        let store = SqliteStore::open(&path).unwrap();
        let r0 = store.revision().unwrap();
        store.add_node("n1", &["n1.z.test".into(), "*.n1.z.test".into()], &[1; 32]).unwrap();
        assert!(matches!(store.add_node("n1", &[], &[2; 32]), Err(StoreError::NodeExists(_))));
        let r1 = store.revision().unwrap();
        assert!(r1 > r0);
        store
            .record_status("n1", &NodeStatus { connected: true, last_heartbeat: Some(5), ..Default::default() })
            .unwrap();
        drop(store);

        let store = SqliteStore::open(&path).unwrap();
        let node = store.get_node("n1").unwrap().unwrap();
        assert_eq!(node.token_hash, [1; 32]);
        assert_eq!(node.hostnames.len(), 2);
        assert!(node.status.connected);
        store.reset_status().unwrap();
        assert!(!store.get_node("n1").unwrap().unwrap().status.connected);
        assert!(store.set_token_hash("n1", &[3; 32]).unwrap());
        assert!(store.remove_node("n1").unwrap());
        assert!(!store.remove_node("n1").unwrap());
        assert!(store.get_node("n1").unwrap().is_none());
        assert!(store.revision().unwrap() > r1);
        // Status of a removed node is not recorded.
        store.record_status("n1", &NodeStatus::default()).unwrap();
        assert!(store.list_nodes().unwrap().is_empty());
    }

    #[test]
    fn many_openers_of_a_fresh_file_all_succeed() {
        // Processes racing on a fresh data_dir (systemd starting the server
        // while `node add` runs) used to fail with "table nodes already
        // exists". Threads with their own connections race the same way.
        for round in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("edge.db");
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
            let openers: Vec<_> = (0..8)
                .map(|i| {
                    let (path, barrier) = (path.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        let store = SqliteStore::open(&path)?;
                        store.add_node(&format!("n{i}"), &[], &[i as u8; 32]).map(|_| ())
                    })
                })
                .collect();
            for (i, opener) in openers.into_iter().enumerate() {
                opener.join().unwrap().unwrap_or_else(|e| panic!("round {round}, opener {i}: {e}"));
            }
            let store = SqliteStore::open(&path).unwrap();
            assert_eq!(store.list_nodes().unwrap().len(), 8);
        }
    }

    #[test]
    fn republishing_a_value_changes_nothing_and_the_cap_holds() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("edge.db")).unwrap();
        store.add_node("n1", &[], &[1; 32]).unwrap();
        let at = "_acme-challenge.n1.z.test";
        let fresh = now() - 600;
        assert_eq!(store.put_challenge("n1", at, "v1", 2, fresh).unwrap(), Published::Added);
        let r = store.revision().unwrap();
        for _ in 0..100 {
            assert_eq!(store.put_challenge("n1", at, "v1", 2, fresh).unwrap(), Published::Unchanged);
        }
        assert_eq!(store.revision().unwrap(), r, "an unchanged value moves no revision");
        assert_eq!(store.put_challenge("n1", at, "v2", 2, fresh).unwrap(), Published::Added);
        // A third value is refused while the two are fresh (a running order)...
        assert_eq!(store.put_challenge("n1", at, "v3", 2, fresh).unwrap(), Published::Full);
        // ...and replaces the oldest once they are stale.
        let all_stale = now() + 1;
        assert_eq!(store.put_challenge("n1", at, "v3", 2, all_stale).unwrap(), Published::Added);
        let values: Vec<String> = store.list_challenges().unwrap().into_iter().map(|c| c.value).collect();
        assert_eq!(values.len(), 2);
        assert!(values.contains(&"v3".to_string()), "{values:?}");
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge.db");
        drop(SqliteStore::open(&path).unwrap());
        Connection::open(&path).unwrap().pragma_update(None, "user_version", 99).unwrap();
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::SchemaTooNew { found: 99, .. }), "{err}");
    }
}
