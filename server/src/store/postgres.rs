//! PostgreSQL implementation of [`Store`], shared by several servers:
//! a pool of connections (deadpool-postgres), TLS by rustls, migrations
//! under an advisory lock, and a change feed by `LISTEN`/`NOTIFY` on one
//! more connection that reconnects by itself and asks for a resync after
//! every reconnect (notifications sent while it was away are lost).
//!
//! Every write that emits an event bumps `meta.revision` in its
//! transaction: the row lock orders writers, so revisions follow commit
//! order, and `pg_notify` in the same transaction is delivered on commit.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Transaction;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::future::BoxFuture;
use tokio::sync::broadcast;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::FromSql;
use tokio_postgres::{IsolationLevel, Row};
use tokio_util::sync::CancellationToken;

use super::changes::new_origin;
use super::location::{PostgresOptions, StoreTls};
use super::{
    now, AccessRecord, ChallengeRecord, Change, ChangeEvent, Counts, DomainRecord, FeedEvent, Fence, HttpMode, Lease,
    Mode, ModeChange, ModeHistory, NodeRecord, NodeStatus, OrderLock, ProbeSample, Published, RoutingState,
    ServerEntry, ServerList, ServerRecord, ServiceRecord, Snapshot, StaticKind, StaticRecord, Store, StoreError,
    FEED_CAPACITY,
};

/// Schema migrations; entry `i` moves the schema from version `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 1: nodes, status, TXT values, modes, probes, transitions, revision.
    "CREATE TABLE nodes (
        name TEXT PRIMARY KEY,
        hostnames TEXT[] NOT NULL,
        token_hash BYTEA NOT NULL,
        created_at BIGINT NOT NULL,
        http_mode TEXT NOT NULL DEFAULT 'redirect'
    );
    CREATE TABLE node_status (
        name TEXT PRIMARY KEY REFERENCES nodes(name) ON DELETE CASCADE,
        connected BOOLEAN NOT NULL DEFAULT false,
        last_heartbeat BIGINT,
        open_connections BIGINT NOT NULL DEFAULT 0,
        agent_version TEXT,
        remote_addr TEXT,
        cert_not_after BIGINT,
        updated_at BIGINT NOT NULL
    );
    CREATE TABLE acme_challenges (
        id BIGSERIAL,
        node TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
        name TEXT NOT NULL,
        value TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (name, value)
    );
    CREATE TABLE node_modes (
        name TEXT PRIMARY KEY REFERENCES nodes(name) ON DELETE CASCADE,
        mode TEXT NOT NULL,
        endpoint TEXT,
        since BIGINT NOT NULL
    );
    CREATE TABLE probe_samples (
        id BIGSERIAL PRIMARY KEY,
        name TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
        at BIGINT NOT NULL,
        endpoint TEXT NOT NULL,
        ok BOOLEAN NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX probe_samples_by_node ON probe_samples(name, id);
    CREATE TABLE mode_transitions (
        id BIGSERIAL PRIMARY KEY,
        name TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
        at BIGINT NOT NULL,
        from_mode TEXT NOT NULL,
        to_mode TEXT NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE INDEX mode_transitions_by_node ON mode_transitions(name, id);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
    INSERT INTO meta (key, value) VALUES ('revision', 0);",
    // 2: the database refuses values no server would write, and a node's
    // TXT values are found without a scan.
    "ALTER TABLE nodes ADD CONSTRAINT nodes_http_mode CHECK (http_mode IN ('redirect', 'proxy'));
    ALTER TABLE node_modes ADD CONSTRAINT node_modes_mode CHECK (mode IN ('direct', 'proxy', 'offline'));
    CREATE INDEX acme_challenges_by_node ON acme_challenges(node);",
    // 3: static DNS records kept in the store (`edge-server dns add`).
    "CREATE TABLE dns_records (
        name TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('A', 'AAAA', 'TXT', 'CAA')),
        value TEXT NOT NULL,
        ttl BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (name, kind, value)
    );",
    // 4: servers with their liveness leases, named leases (the mode
    // decider), and cluster-wide settings (the ACME account).
    "CREATE TABLE servers (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        quic TEXT NOT NULL,
        api TEXT NOT NULL,
        peer TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        dns TEXT,
        nameservers TEXT[] NOT NULL,
        addresses TEXT[] NOT NULL,
        version TEXT NOT NULL,
        started_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        gone BOOLEAN NOT NULL DEFAULT false,
        tunnels TEXT[] NOT NULL DEFAULT '{}'
    );
    CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, token BIGINT NOT NULL, expires_at BIGINT NOT NULL);
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    // 5: operators: users, sessions, API tokens, and the audit log.
    "CREATE TABLE users (name TEXT PRIMARY KEY, password_hash TEXT NOT NULL, created_at BIGINT NOT NULL);
    CREATE TABLE sessions (
        id_hash BYTEA PRIMARY KEY,
        username TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        created_at BIGINT NOT NULL,
        last_seen BIGINT NOT NULL
    );
    CREATE TABLE api_tokens (
        name TEXT PRIMARY KEY,
        scope TEXT NOT NULL CHECK (scope IN ('read', 'admin')),
        hash BYTEA NOT NULL UNIQUE,
        created_at BIGINT NOT NULL,
        last_used BIGINT,
        created_by TEXT NOT NULL
    );
    CREATE TABLE audit (
        id BIGSERIAL PRIMARY KEY,
        at BIGINT NOT NULL,
        actor TEXT NOT NULL,
        source TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        summary TEXT NOT NULL
    );
    CREATE INDEX audit_by_target ON audit (target, id);",
    // 6: the routes an agent last reported (JSON), for `node show` and the
    // API; raw TCP services.
    "ALTER TABLE node_status ADD COLUMN routes TEXT;
    CREATE TABLE services (
        name TEXT PRIMARY KEY,
        node TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
        listen TEXT NOT NULL UNIQUE,
        target TEXT NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE access_policies (
        scope TEXT PRIMARY KEY,
        node TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
        policy TEXT NOT NULL
    );",
    // 7: customers' own domains, each held by one node at most.
    "CREATE TABLE domains (
        name TEXT PRIMARY KEY,
        node TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
        verify_value TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        verified_at BIGINT,
        checked_at BIGINT,
        failing_since BIGINT,
        last_error TEXT,
        routed BOOLEAN NOT NULL DEFAULT false
    );",
];

/// The database's clock in milliseconds: every server's lease is timed by
/// one clock.
const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

const SELECT_SERVERS: &str = "SELECT id, name, quic, api, peer, fingerprint, dns, nameservers, addresses, version,
    started_at, expires_at - (extract(epoch from clock_timestamp()) * 1000)::bigint, gone, tunnels FROM servers";

fn server_row(store: &str, row: &Row) -> Result<ServerEntry, StoreError> {
    Ok(ServerEntry {
        record: ServerRecord {
            id: col(store, row, 0)?,
            name: col(store, row, 1)?,
            quic: col(store, row, 2)?,
            api: col(store, row, 3)?,
            peer: col(store, row, 4)?,
            fingerprint: col(store, row, 5)?,
            dns: col(store, row, 6)?,
            nameservers: col(store, row, 7)?,
            addresses: col(store, row, 8)?,
            version: col(store, row, 9)?,
        },
        started_at: col::<i64>(store, row, 10)? / 1000,
        lease_left_ms: col(store, row, 11)?,
        alive: !col::<bool>(store, row, 12)?,
        tunnels: col(store, row, 13)?,
    })
}

/// How often a waiting order lock asks again.
const ORDER_LOCK_RETRY: Duration = Duration::from_millis(200);

/// A connection of its own holding a session-level advisory lock: dropped,
/// its driver is aborted and the connection closes, which frees the lock.
struct HeldConnection {
    client: tokio_postgres::Client,
    _driver: AbortOnDrop,
}

/// The `NOTIFY` channel of change events.
const CHANNEL: &str = "edge_changes";

/// Key of the advisory lock migrations run under ("edgemigr").
const MIGRATION_LOCK: i64 = 0x6564_6765_6d69_6772;

/// How often the feed connection is checked when nothing arrives.
const FEED_CHECK: Duration = Duration::from_secs(5);

/// First wait before reconnecting the change feed.
const FEED_BACKOFF_MIN: Duration = Duration::from_millis(100);

/// Longest wait between reconnect attempts of the change feed.
const FEED_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The shared store.
pub struct PostgresStore {
    pool: Pool,
    options: PostgresOptions,
    tls: Tls,
    origin: String,
    events: broadcast::Sender<FeedEvent>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").field("store", &self.options.describe).finish_non_exhaustive()
    }
}

/// TLS for the pool and the feed connection.
#[derive(Clone)]
enum Tls {
    Off,
    On(tokio_postgres_rustls::MakeRustlsConnect),
}

fn tls_config(options: &PostgresOptions) -> Result<Tls, StoreError> {
    if options.tls == StoreTls::Disable {
        return Ok(Tls::Off);
    }
    let invalid = |what: String| StoreError::Invalid(what);
    let mut roots = rustls::RootCertStore::empty();
    match &options.ca_file {
        Some(file) => {
            let pem = std::fs::read(file).map_err(|e| invalid(format!("store.ca_file {}: {e}", file.display())))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| invalid(format!("store.ca_file {}: {e}", file.display())))?;
                roots.add(cert).map_err(|e| invalid(format!("store.ca_file {}: {e}", file.display())))?;
            }
            if roots.is_empty() {
                return Err(invalid(format!("store.ca_file {}: no PEM certificates in it", file.display())));
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(invalid("store.tls: no system root certificates found; set store.ca_file".into()));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(format!("store.tls: {e}")))?;
    let roots = Arc::new(roots);
    let config = match options.tls {
        StoreTls::VerifyFull => builder.with_root_certificates(roots).with_no_client_auth(),
        _ => {
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| invalid(format!("store.tls: {e}")))?;
            builder.dangerous().with_custom_certificate_verifier(Arc::new(AnyName(inner))).with_no_client_auth()
        }
    };
    Ok(Tls::On(tokio_postgres_rustls::MakeRustlsConnect::new(config)))
}

/// `verify-ca`: the chain must verify; the name in it may differ.
#[derive(Debug)]
struct AnyName(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError, Error};
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(Error::InvalidCertificate(CertificateError::NotValidForName))
            | Err(Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })) => {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Maps a driver error: connection trouble is [`StoreError::Unavailable`].
fn pg_err(store: &str, e: tokio_postgres::Error) -> StoreError {
    let unavailable = || StoreError::Unavailable { store: store.to_string(), reason: error_text(&e) };
    match e.code() {
        Some(code) if *code == SqlState::UNIQUE_VIOLATION => StoreError::Conflict(error_text(&e)),
        Some(code)
            if code.code().starts_with("08")
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::TOO_MANY_CONNECTIONS =>
        {
            unavailable()
        }
        Some(_) => StoreError::Backend { store: store.to_string(), message: error_text(&e) },
        // No SQLSTATE: the connection failed. I/O trouble (refused, reset,
        // timed out, closed) may pass; a TLS verification failure, a bad
        // password prompt or a protocol error will not, and saying
        // "retry later" would mislead.
        None if e.is_closed()
            || io_cause(&e).is_some_and(|io| io.get_ref().is_none_or(|inner| !inner.is::<rustls::Error>())) =>
        {
            unavailable()
        }
        None if error_text(&e).contains("timed out") => unavailable(),
        None => StoreError::Backend { store: store.to_string(), message: error_text(&e) },
    }
}

/// The I/O error under a driver error, if that is what it is.
fn io_cause(e: &tokio_postgres::Error) -> Option<&std::io::Error> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        source = s.source();
    }
    None
}

/// The driver's message with the server's detail and the I/O cause.
fn error_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    edge_net::error_chain(std::iter::successors(Some(e as &dyn std::error::Error), |e| e.source()))
}

fn pool_err(store: &str, e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_err(store, e),
        deadpool_postgres::PoolError::Timeout(_) => StoreError::Unavailable {
            store: store.to_string(),
            reason: "no database connection within the connect timeout".into(),
        },
        other => StoreError::Unavailable { store: store.to_string(), reason: other.to_string() },
    }
}

/// A column, or [`StoreError::Corrupt`] if it does not decode (never a panic).
fn col<'a, T: FromSql<'a>>(store: &str, row: &'a Row, i: usize) -> Result<T, StoreError> {
    row.try_get(i).map_err(|e| StoreError::Corrupt { store: store.to_string(), what: format!("column {i}: {e}") })
}

const SELECT_NODES: &str = "SELECT n.name, n.hostnames, n.token_hash, n.created_at,
        COALESCE(s.connected, false), s.last_heartbeat, COALESCE(s.open_connections, 0), s.agent_version,
        s.remote_addr, s.cert_not_after, n.http_mode, COALESCE(m.mode, 'offline'), m.endpoint, m.since, s.routes
    FROM nodes n LEFT JOIN node_status s ON s.name = n.name LEFT JOIN node_modes m ON m.name = n.name";

fn node_row(store: &str, row: &Row) -> Result<NodeRecord, StoreError> {
    let name: String = col(store, row, 0)?;
    let corrupt = |what: &str| StoreError::Corrupt { store: store.to_string(), what: format!("node {name:?}: {what}") };
    let hash: Vec<u8> = col(store, row, 2)?;
    let http_mode: String = col(store, row, 10)?;
    let mode: String = col(store, row, 11)?;
    Ok(NodeRecord {
        hostnames: col(store, row, 1)?,
        token_hash: hash.as_slice().try_into().map_err(|_| corrupt("token_hash"))?,
        created_at: col(store, row, 3)?,
        status: NodeStatus {
            connected: col(store, row, 4)?,
            last_heartbeat: col(store, row, 5)?,
            open_connections: col::<i64>(store, row, 6)?.max(0) as u64,
            agent_version: col(store, row, 7)?,
            remote_addr: col(store, row, 8)?,
            cert_not_after: col(store, row, 9)?,
            routes: super::values::decode_routes(col::<Option<String>>(store, row, 14)?.as_deref()),
        },
        http_mode: HttpMode::parse(&http_mode).ok_or_else(|| corrupt("http_mode"))?,
        mode: Mode::parse(&mode).ok_or_else(|| corrupt("mode"))?,
        endpoint: col(store, row, 12)?,
        mode_since: col(store, row, 13)?,
        name: name.clone(),
    })
}

fn challenge_row(store: &str, row: &Row) -> Result<ChallengeRecord, StoreError> {
    Ok(ChallengeRecord {
        node: col(store, row, 0)?,
        name: col(store, row, 1)?,
        value: col(store, row, 2)?,
        created_at: col(store, row, 3)?,
    })
}

/// A probe sample from columns `at, endpoint, ok, detail` starting at `i`.
fn sample_row(store: &str, row: &Row, i: usize) -> Result<ProbeSample, StoreError> {
    Ok(ProbeSample {
        at: col(store, row, i)?,
        endpoint: col(store, row, i + 1)?,
        ok: col(store, row, i + 2)?,
        detail: col(store, row, i + 3)?,
    })
}

/// A transition from columns `at, from_mode, to_mode, reason` starting at `i`.
fn transition_row(store: &str, row: &Row, i: usize) -> Result<ModeChange, StoreError> {
    Ok(ModeChange {
        at: col(store, row, i)?,
        from: mode_col(store, row, i + 1)?,
        to: mode_col(store, row, i + 2)?,
        reason: col(store, row, i + 3)?,
    })
}

fn dns_record_row(store: &str, row: &Row) -> Result<StaticRecord, StoreError> {
    let kind: String = col(store, row, 1)?;
    let ttl: i64 = col(store, row, 3)?;
    Ok(StaticRecord {
        name: col(store, row, 0)?,
        kind: StaticKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt { store: store.to_string(), what: format!("record type {kind:?}") })?,
        value: col(store, row, 2)?,
        ttl_secs: ttl.clamp(0, u32::MAX as i64) as u32,
    })
}

fn mode_col(store: &str, row: &Row, i: usize) -> Result<Mode, StoreError> {
    let s: String = col(store, row, i)?;
    Mode::parse(&s).ok_or_else(|| StoreError::Corrupt { store: store.to_string(), what: format!("mode {s:?}") })
}

impl PostgresStore {
    /// Connects (failing fast if the database is unreachable) and migrates.
    pub async fn connect(options: PostgresOptions) -> Result<Self, StoreError> {
        Self::connect_at_version(options, MIGRATIONS.len()).await
    }

    /// Connects with migrations applied up to `version` only (tests of
    /// upgrades from an older schema).
    #[doc(hidden)]
    pub async fn connect_at_version(options: PostgresOptions, version: usize) -> Result<Self, StoreError> {
        let tls = tls_config(&options)?;
        let manager_config = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let manager = match &tls {
            Tls::Off => Manager::from_config(options.config.clone(), tokio_postgres::NoTls, manager_config),
            Tls::On(tls) => Manager::from_config(options.config.clone(), tls.clone(), manager_config),
        };
        let timeout = Some(options.connect_timeout);
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .wait_timeout(timeout)
            .create_timeout(timeout)
            .recycle_timeout(timeout)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Invalid(format!("store: {e}")))?;
        let (events, _) = broadcast::channel(FEED_CAPACITY);
        let store = Self { pool, options, tls, origin: new_origin(), events };
        store.migrate(version).await?;
        Ok(store)
    }

    fn store(&self) -> &str {
        &self.options.describe
    }

    fn err(&self, e: tokio_postgres::Error) -> StoreError {
        pg_err(self.store(), e)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| pool_err(self.store(), e))
    }

    /// Applies pending migrations under an advisory lock held for the
    /// transaction: of several servers starting at once, one migrates and
    /// the others wait, then find nothing left to do.
    async fn migrate(&self, target: usize) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(|e| self.err(e))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS edge_schema (version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .await
        .map_err(|e| self.err(e))?;
        let row =
            tx.query_one("SELECT COALESCE(MAX(version), 0) FROM edge_schema", &[]).await.map_err(|e| self.err(e))?;
        let version = i64::from(col::<i32>(self.store(), &row, 0)?);
        let supported = MIGRATIONS.len() as i64;
        if version > supported {
            return Err(StoreError::SchemaTooNew { store: self.store().to_string(), found: version, supported });
        }
        let target = target.min(MIGRATIONS.len());
        for (i, sql) in MIGRATIONS.iter().enumerate().take(target).skip(version as usize) {
            tx.batch_execute(sql).await.map_err(|e| self.err(e))?;
            let v = i as i32 + 1;
            tx.execute("INSERT INTO edge_schema (version, applied_at) VALUES ($1, $2)", &[&v, &now()])
                .await
                .map_err(|e| self.err(e))?;
        }
        tx.commit().await.map_err(|e| self.err(e))?;
        if (version as usize) < target {
            tracing::info!(store = self.store(), from = version, to = target, "applied database migrations");
        }
        Ok(())
    }

    /// Writes the pending audit entry (see `accounts::audited`) in `tx`.
    async fn audit_pending(&self, tx: &Transaction<'_>) -> Result<(), StoreError> {
        if let Some(e) = super::accounts::take_pending_audit() {
            tx.execute(
                "INSERT INTO audit (at, actor, source, action, target, summary) VALUES ($1, $2, $3, $4, $5, $6)",
                &[&e.at, &e.actor, &e.source, &e.action, &e.target, &e.summary],
            )
            .await
            .map_err(|err| self.err(err))?;
        }
        Ok(())
    }

    /// Moves the revision and queues the notification (sent on commit).
    async fn log(&self, tx: &Transaction<'_>, change: Change) -> Result<ChangeEvent, StoreError> {
        self.audit_pending(tx).await?;
        let row = tx
            .query_one("UPDATE meta SET value = value + 1 WHERE key = 'revision' RETURNING value", &[])
            .await
            .map_err(|e| self.err(e))?;
        let event = ChangeEvent { revision: col(self.store(), &row, 0)?, change, origin: self.origin.clone() };
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &event.encode()]).await.map_err(|e| self.err(e))?;
        Ok(event)
    }

    /// Commits and announces the events to this process's subscribers.
    async fn commit(&self, tx: Transaction<'_>, events: Vec<ChangeEvent>) -> Result<(), StoreError> {
        tx.commit().await.map_err(|e| self.err(e))?;
        for event in events {
            let _ = self.events.send(FeedEvent::Change(event));
        }
        Ok(())
    }

    /// Records a transition and the node's new mode.
    async fn write_transition(
        &self,
        tx: &Transaction<'_>,
        name: &str,
        t: &ModeChange,
        endpoint: Option<&str>,
    ) -> Result<(), StoreError> {
        tx.execute(
            "INSERT INTO mode_transitions (name, at, from_mode, to_mode, reason) VALUES ($1, $2, $3, $4, $5)",
            &[&name, &t.at, &t.from.as_str(), &t.to.as_str(), &t.reason],
        )
        .await
        .map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT INTO node_modes (name, mode, endpoint, since) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE SET mode = excluded.mode, endpoint = excluded.endpoint, since = excluded.since",
            &[&name, &t.to.as_str(), &endpoint, &t.at],
        )
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn exists_locked(&self, tx: &Transaction<'_>, name: &str) -> Result<bool, StoreError> {
        let rows =
            tx.query("SELECT 1 FROM nodes WHERE name = $1 FOR UPDATE", &[&name]).await.map_err(|e| self.err(e))?;
        Ok(!rows.is_empty())
    }

    async fn counts_in(&self, client: &impl deadpool_postgres::GenericClient) -> Result<Counts, StoreError> {
        let row = client
            .query_one(
                "SELECT (SELECT COUNT(*) FROM nodes), (SELECT COUNT(*) FROM probe_samples),
                        (SELECT COUNT(*) FROM mode_transitions), (SELECT COUNT(*) FROM acme_challenges),
                        (SELECT COUNT(*) FROM dns_records)",
                &[],
            )
            .await
            .map_err(|e| self.err(e))?;
        let n = |i| col::<i64>(self.store(), &row, i).map(|v| v.max(0) as u64);
        Ok(Counts { nodes: n(0)?, samples: n(1)?, transitions: n(2)?, challenges: n(3)?, dns_records: n(4)? })
    }

    async fn nodes_in(
        &self,
        client: &impl deadpool_postgres::GenericClient,
        name: Option<&str>,
    ) -> Result<Vec<NodeRecord>, StoreError> {
        let rows = match name {
            Some(name) => client.query(&format!("{SELECT_NODES} WHERE n.name = $1"), &[&name]).await,
            None => client.query(&format!("{SELECT_NODES} ORDER BY n.name"), &[]).await,
        }
        .map_err(|e| self.err(e))?;
        rows.iter().map(|r| node_row(self.store(), r)).collect()
    }

    async fn challenges_in(
        &self,
        client: &impl deadpool_postgres::GenericClient,
        node: Option<&str>,
    ) -> Result<Vec<ChallengeRecord>, StoreError> {
        let rows = match node {
            Some(node) => client
                .query(
                    "SELECT node, name, value, created_at FROM acme_challenges WHERE node = $1 ORDER BY name, value",
                    &[&node],
                )
                .await,
            None => {
                client
                    .query("SELECT node, name, value, created_at FROM acme_challenges ORDER BY name, value", &[])
                    .await
            }
        }
        .map_err(|e| self.err(e))?;
        rows.iter().map(|r| challenge_row(self.store(), r)).collect()
    }

    async fn dns_records_in(
        &self,
        client: &impl deadpool_postgres::GenericClient,
    ) -> Result<Vec<StaticRecord>, StoreError> {
        let rows = client
            .query("SELECT name, kind, value, ttl FROM dns_records ORDER BY name, kind, value", &[])
            .await
            .map_err(|e| self.err(e))?;
        rows.iter().map(|r| dns_record_row(self.store(), r)).collect()
    }

    async fn revision_in(&self, client: &impl deadpool_postgres::GenericClient) -> Result<i64, StoreError> {
        let row =
            client.query_one("SELECT value FROM meta WHERE key = 'revision'", &[]).await.map_err(|e| self.err(e))?;
        col(self.store(), &row, 0)
    }

    async fn upsert_statuses(&self, tx: &Transaction<'_>, statuses: &[(String, NodeStatus)]) -> Result<(), StoreError> {
        let names: Vec<&str> = statuses.iter().map(|(n, _)| n.as_str()).collect();
        let connected: Vec<bool> = statuses.iter().map(|(_, s)| s.connected).collect();
        let heartbeat: Vec<Option<i64>> = statuses.iter().map(|(_, s)| s.last_heartbeat).collect();
        let open: Vec<i64> = statuses.iter().map(|(_, s)| s.open_connections.min(i64::MAX as u64) as i64).collect();
        let version: Vec<Option<&str>> = statuses.iter().map(|(_, s)| s.agent_version.as_deref()).collect();
        let remote: Vec<Option<&str>> = statuses.iter().map(|(_, s)| s.remote_addr.as_deref()).collect();
        let cert: Vec<Option<i64>> = statuses.iter().map(|(_, s)| s.cert_not_after).collect();
        let routes: Vec<Option<String>> =
            statuses.iter().map(|(_, s)| super::values::encode_routes(s.routes.as_deref())).collect();
        // One statement for the whole batch: a status flush of thousands of
        // nodes is one round trip.
        tx.execute(
            "INSERT INTO node_status (name, connected, last_heartbeat, open_connections, agent_version, remote_addr, cert_not_after, updated_at, routes)
             SELECT u.name, u.connected, u.last_heartbeat, u.open_connections, u.agent_version, u.remote_addr, u.cert_not_after, $8, u.routes
             FROM UNNEST($1::text[], $2::bool[], $3::bigint[], $4::bigint[], $5::text[], $6::text[], $7::bigint[], $9::text[])
                AS u(name, connected, last_heartbeat, open_connections, agent_version, remote_addr, cert_not_after, routes)
             WHERE EXISTS (SELECT 1 FROM nodes n WHERE n.name = u.name)
             ON CONFLICT (name) DO UPDATE SET connected = excluded.connected,
                last_heartbeat = COALESCE(excluded.last_heartbeat, node_status.last_heartbeat),
                open_connections = excluded.open_connections,
                agent_version = COALESCE(excluded.agent_version, node_status.agent_version),
                remote_addr = COALESCE(excluded.remote_addr, node_status.remote_addr),
                cert_not_after = COALESCE(excluded.cert_not_after, node_status.cert_not_after),
                routes = COALESCE(excluded.routes, node_status.routes),
                updated_at = excluded.updated_at",
            &[&names, &connected, &heartbeat, &open, &version, &remote, &cert, &now(), &routes],
        )
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Updates a node row by name and logs `change` if it existed.
    async fn update_node(
        &self,
        sql: &str,
        name: &str,
        value: &(dyn tokio_postgres::types::ToSql + Sync),
        change: Change,
    ) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        let n = tx.execute(sql, &[&name, value]).await.map_err(|e| self.err(e))?;
        let mut events = Vec::new();
        if n > 0 {
            events.push(self.log(&tx, change).await?);
        }
        self.commit(tx, events).await?;
        Ok(n > 0)
    }
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    fn describe(&self) -> &str {
        self.store()
    }

    async fn add_node(
        &self,
        name: &str,
        hostnames: &[String],
        token_hash: &[u8; 32],
    ) -> Result<NodeRecord, StoreError> {
        let record = NodeRecord::new(name, hostnames, token_hash, now());
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        let n = tx
            .execute(
                "INSERT INTO nodes (name, hostnames, token_hash, created_at, http_mode) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (name) DO NOTHING",
                &[
                    &record.name,
                    &record.hostnames,
                    &record.token_hash.as_slice(),
                    &record.created_at,
                    &record.http_mode.as_str(),
                ],
            )
            .await
            .map_err(|e| self.err(e))?;
        if n == 0 {
            return Err(StoreError::Conflict(format!("node {name:?} already exists")));
        }
        let event = self.log(&tx, Change::NodeAdded(name.to_string())).await?;
        self.commit(tx, vec![event]).await?;
        Ok(record)
    }

    async fn remove_node(&self, name: &str) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        let n = tx.execute("DELETE FROM nodes WHERE name = $1", &[&name]).await.map_err(|e| self.err(e))?;
        let mut events = Vec::new();
        if n > 0 {
            events.push(self.log(&tx, Change::NodeRemoved(name.to_string())).await?);
        }
        self.commit(tx, events).await?;
        Ok(n > 0)
    }

    async fn set_token_hash(&self, name: &str, token_hash: &[u8; 32]) -> Result<bool, StoreError> {
        let hash = token_hash.as_slice();
        self.update_node(
            "UPDATE nodes SET token_hash = $2 WHERE name = $1",
            name,
            &hash,
            Change::TokenRotated(name.into()),
        )
        .await
    }

    async fn set_http_mode(&self, name: &str, http_mode: HttpMode) -> Result<bool, StoreError> {
        let mode = http_mode.as_str();
        self.update_node(
            "UPDATE nodes SET http_mode = $2 WHERE name = $1",
            name,
            &mode,
            Change::NodeUpdated(name.into()),
        )
        .await
    }

    async fn get_node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        let client = self.client().await?;
        Ok(self.nodes_in(&client, Some(name)).await?.into_iter().next())
    }

    async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let client = self.client().await?;
        self.nodes_in(&client, None).await
    }

    async fn revision(&self) -> Result<i64, StoreError> {
        let client = self.client().await?;
        self.revision_in(&client).await
    }

    async fn routing_state(&self) -> Result<RoutingState, StoreError> {
        let mut client = self.client().await?;
        // One snapshot: the rows and the revision agree.
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|e| self.err(e))?;
        let revision = self.revision_in(&tx).await?;
        let nodes = self.nodes_in(&tx, None).await?;
        let challenges = self.challenges_in(&tx, None).await?;
        let dns_records = self.dns_records_in(&tx).await?;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(RoutingState { revision, nodes, challenges, dns_records })
    }

    async fn record_statuses(&self, statuses: &[(String, NodeStatus)]) -> Result<(), StoreError> {
        if statuses.is_empty() {
            return Ok(());
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        self.upsert_statuses(&tx, statuses).await?;
        tx.commit().await.map_err(|e| self.err(e))
    }

    async fn reset_status(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute("UPDATE node_status SET connected = false, open_connections = 0", &[])
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn put_challenge(
        &self,
        node: &str,
        name: &str,
        value: &str,
        max_per_node: usize,
        stale_before: i64,
    ) -> Result<Published, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        // The node's row lock orders concurrent publishers of one node, so
        // the cap holds across servers.
        if !self.exists_locked(&tx, node).await? {
            return Ok(Published::Full);
        }
        let refreshed = tx
            .execute(
                "UPDATE acme_challenges SET created_at = $4 WHERE node = $1 AND name = $2 AND value = $3",
                &[&node, &name, &value, &now()],
            )
            .await
            .map_err(|e| self.err(e))?;
        if refreshed > 0 {
            tx.commit().await.map_err(|e| self.err(e))?;
            return Ok(Published::Unchanged);
        }
        let row = tx
            .query_one("SELECT COUNT(*) FROM acme_challenges WHERE node = $1", &[&node])
            .await
            .map_err(|e| self.err(e))?;
        let count = col::<i64>(self.store(), &row, 0)?.max(0) as usize;
        if count >= max_per_node {
            // As in SQLite: the oldest stale value makes room.
            let evicted = tx
                .execute(
                    "DELETE FROM acme_challenges WHERE id = (SELECT id FROM acme_challenges WHERE node = $1
                       AND created_at < $2 ORDER BY created_at, id LIMIT 1)",
                    &[&node, &stale_before],
                )
                .await
                .map_err(|e| self.err(e))?;
            if evicted == 0 || count > max_per_node {
                return Ok(Published::Full);
            }
        }
        let n = tx
            .execute(
                "INSERT INTO acme_challenges (node, name, value, created_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name, value) DO NOTHING",
                &[&node, &name, &value, &now()],
            )
            .await
            .map_err(|e| self.err(e))?;
        if n == 0 {
            return Ok(Published::Full);
        }
        let event = self.log(&tx, Change::ChallengePut(node.to_string())).await?;
        self.commit(tx, vec![event]).await?;
        Ok(Published::Added)
    }

    async fn remove_challenge(&self, node: &str, name: &str, value: Option<&str>) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        let n = match value {
            Some(v) => {
                tx.execute(
                    "DELETE FROM acme_challenges WHERE node = $1 AND name = $2 AND value = $3",
                    &[&node, &name, &v],
                )
                .await
            }
            None => tx.execute("DELETE FROM acme_challenges WHERE node = $1 AND name = $2", &[&node, &name]).await,
        }
        .map_err(|e| self.err(e))?;
        let mut events = Vec::new();
        if n > 0 {
            events.push(self.log(&tx, Change::ChallengeRemoved(node.to_string())).await?);
        }
        self.commit(tx, events).await?;
        Ok(n as usize)
    }

    async fn node_challenges(&self, node: &str) -> Result<Vec<ChallengeRecord>, StoreError> {
        let client = self.client().await?;
        self.challenges_in(&client, Some(node)).await
    }

    async fn list_challenges(&self) -> Result<Vec<ChallengeRecord>, StoreError> {
        let client = self.client().await?;
        self.challenges_in(&client, None).await
    }

    async fn expire_challenges(&self, created_before: i64) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        let rows = tx
            .query("DELETE FROM acme_challenges WHERE created_at < $1 RETURNING node", &[&created_before])
            .await
            .map_err(|e| self.err(e))?;
        let mut nodes = rows.iter().map(|r| col::<String>(self.store(), r, 0)).collect::<Result<Vec<_>, _>>()?;
        nodes.sort();
        nodes.dedup();
        let mut events = Vec::new();
        for node in nodes {
            events.push(self.log(&tx, Change::ChallengeRemoved(node)).await?);
        }
        self.commit(tx, events).await?;
        Ok(rows.len())
    }

    async fn record_probe(&self, name: &str, sample: &ProbeSample, keep: usize) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT INTO probe_samples (name, at, endpoint, ok, detail)
             SELECT $1, $2, $3, $4, $5 WHERE EXISTS (SELECT 1 FROM nodes WHERE name = $1)",
            &[&name, &sample.at, &sample.endpoint, &sample.ok, &sample.detail],
        )
        .await
        .map_err(|e| self.err(e))?;
        tx.execute(
            "DELETE FROM probe_samples WHERE name = $1 AND id NOT IN
               (SELECT id FROM probe_samples WHERE name = $1 ORDER BY id DESC LIMIT $2)",
            &[&name, &(keep as i64)],
        )
        .await
        .map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))
    }

    async fn record_transition(&self, name: &str, t: &ModeChange, endpoint: Option<&str>) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        let mut events = Vec::new();
        if self.exists_locked(&tx, name).await? {
            self.write_transition(&tx, name, t, endpoint).await?;
            events.push(self.log(&tx, Change::ModeChanged(name.to_string())).await?);
        }
        self.commit(tx, events).await
    }

    async fn mode_history(&self, name: &str, limit: usize) -> Result<ModeHistory, StoreError> {
        let client = self.client().await?;
        let store = self.store();
        let limit = limit as i64;
        let current = client
            .query_opt("SELECT mode, endpoint, since FROM node_modes WHERE name = $1", &[&name])
            .await
            .map_err(|e| self.err(e))?;
        let samples = client
            .query(
                "SELECT at, endpoint, ok, detail FROM probe_samples WHERE name = $1 ORDER BY id DESC LIMIT $2",
                &[&name, &limit],
            )
            .await
            .map_err(|e| self.err(e))?;
        let transitions = client
            .query(
                "SELECT at, from_mode, to_mode, reason FROM mode_transitions WHERE name = $1 ORDER BY id DESC LIMIT $2",
                &[&name, &limit],
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(ModeHistory {
            mode: current.as_ref().map(|r| mode_col(store, r, 0)).transpose()?,
            endpoint: current.as_ref().map(|r| col(store, r, 1)).transpose()?.flatten(),
            since: current.as_ref().map(|r| col(store, r, 2)).transpose()?,
            samples: samples.iter().map(|r| sample_row(store, r, 0)).collect::<Result<_, StoreError>>()?,
            transitions: transitions.iter().map(|r| transition_row(store, r, 0)).collect::<Result<_, StoreError>>()?,
        })
    }

    async fn list_dns_records(&self) -> Result<Vec<StaticRecord>, StoreError> {
        let client = self.client().await?;
        self.dns_records_in(&client).await
    }

    async fn add_dns_record(&self, record: &StaticRecord) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        let n = tx
            .execute(
                "INSERT INTO dns_records (name, kind, value, ttl, created_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT DO NOTHING",
                &[&record.name, &record.kind.as_str(), &record.value, &i64::from(record.ttl_secs), &now()],
            )
            .await
            .map_err(|e| self.err(e))?;
        if n == 0 {
            return Err(StoreError::Conflict(format!(
                "a {} record {:?} with this value exists already",
                record.kind, record.name
            )));
        }
        let event = self.log(&tx, Change::DnsRecordsChanged).await?;
        self.commit(tx, vec![event]).await
    }

    async fn list_services(&self) -> Result<Vec<ServiceRecord>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT name, node, listen, target, created_at FROM services ORDER BY name", &[])
            .await
            .map_err(|e| self.err(e))?;
        rows.iter()
            .map(|r| {
                Ok(ServiceRecord {
                    name: col(self.store(), r, 0)?,
                    node: col(self.store(), r, 1)?,
                    listen: col(self.store(), r, 2)?,
                    target: col(self.store(), r, 3)?,
                    created_at: col(self.store(), r, 4)?,
                })
            })
            .collect()
    }

    async fn add_service(&self, service: &ServiceRecord) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        let node = tx
            .query_opt("SELECT 1 FROM nodes WHERE name = $1 FOR SHARE", &[&service.node])
            .await
            .map_err(|e| self.err(e))?;
        if node.is_none() {
            return Err(StoreError::NotFound(format!("no node named {:?}", service.node)));
        }
        let n = tx
            .execute(
                "INSERT INTO services (name, node, listen, target, created_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT DO NOTHING",
                &[&service.name, &service.node, &service.listen, &service.target, &now()],
            )
            .await
            .map_err(|e| self.err(e))?;
        if n == 0 {
            return Err(StoreError::Conflict(format!(
                "a service named {:?} or listening on {} exists already",
                service.name, service.listen
            )));
        }
        let event = self.log(&tx, Change::ServicesChanged).await?;
        self.commit(tx, vec![event]).await
    }

    async fn list_access(&self) -> Result<Vec<AccessRecord>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT scope, node, policy FROM access_policies ORDER BY scope", &[])
            .await
            .map_err(|e| self.err(e))?;
        rows.iter()
            .map(|r| {
                let scope: String = col(self.store(), r, 0)?;
                let text: String = col(self.store(), r, 2)?;
                let policy = serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
                    store: self.store().to_string(),
                    what: format!("access policy of {scope:?}: {e}"),
                })?;
                Ok(AccessRecord { node: col(self.store(), r, 1)?, scope, policy })
            })
            .collect()
    }

    async fn set_access(&self, record: &AccessRecord) -> Result<(), StoreError> {
        let policy = serde_json::to_string(&record.policy).unwrap_or_default();
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        let n = tx
            .execute(
                "INSERT INTO access_policies (scope, node, policy)
                 SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM nodes WHERE name = $2)
                 ON CONFLICT (scope) DO UPDATE SET node = excluded.node, policy = excluded.policy",
                &[&record.scope, &record.node, &policy],
            )
            .await
            .map_err(|e| self.err(e))?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("no node named {:?}", record.node)));
        }
        let event = self.log(&tx, Change::AccessChanged).await?;
        self.commit(tx, vec![event]).await
    }

    async fn clear_access(&self, scope: &str) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        let n = tx.execute("DELETE FROM access_policies WHERE scope = $1", &[&scope]).await.map_err(|e| self.err(e))?;
        let mut events = Vec::new();
        if n > 0 {
            events.push(self.log(&tx, Change::AccessChanged).await?);
        }
        self.commit(tx, events).await?;
        Ok(n > 0)
    }

    async fn list_domains(&self) -> Result<Vec<DomainRecord>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT name, node, verify_value, created_at, verified_at, checked_at, failing_since, last_error, routed
                 FROM domains ORDER BY name",
                &[],
            )
            .await
            .map_err(|e| self.err(e))?;
        rows.iter()
            .map(|r| {
                Ok(DomainRecord {
                    name: col(self.store(), r, 0)?,
                    node: col(self.store(), r, 1)?,
                    verify_value: col(self.store(), r, 2)?,
                    created_at: col(self.store(), r, 3)?,
                    state: edge_proto::domains::VerifyState {
                        verified_at: col(self.store(), r, 4)?,
                        checked_at: col(self.store(), r, 5)?,
                        failing_since: col(self.store(), r, 6)?,
                        last_error: col(self.store(), r, 7)?,
                        routed: col(self.store(), r, 8)?,
                    },
                })
            })
            .collect()
    }

    async fn add_domain(&self, domain: &DomainRecord) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        let node = tx
            .query_opt("SELECT 1 FROM nodes WHERE name = $1 FOR SHARE", &[&domain.node])
            .await
            .map_err(|e| self.err(e))?;
        if node.is_none() {
            return Err(StoreError::NotFound(format!("no node named {:?}", domain.node)));
        }
        let st = &domain.state;
        let n = tx
            .execute(
                "INSERT INTO domains (name, node, verify_value, created_at, verified_at, checked_at, failing_since, last_error, routed)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
                &[
                    &domain.name,
                    &domain.node,
                    &domain.verify_value,
                    &now(),
                    &st.verified_at,
                    &st.checked_at,
                    &st.failing_since,
                    &st.last_error,
                    &st.routed,
                ],
            )
            .await
            .map_err(|e| self.err(e))?;
        if n == 0 {
            return Err(StoreError::Conflict(format!("the domain {} is held by a node already", domain.name)));
        }
        let event = self.log(&tx, Change::DomainsChanged).await?;
        self.commit(tx, vec![event]).await
    }

    async fn remove_domain(&self, name: &str) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        let n = tx.execute("DELETE FROM domains WHERE name = $1", &[&name]).await.map_err(|e| self.err(e))?;
        let mut events = Vec::new();
        if n > 0 {
            events.push(self.log(&tx, Change::DomainsChanged).await?);
        }
        self.commit(tx, events).await?;
        Ok(n > 0)
    }

    async fn record_domain_check(
        &self,
        checked: &DomainRecord,
        state: &edge_proto::domains::VerifyState,
    ) -> Result<bool, StoreError> {
        let (name, node) = (&checked.name, &checked.node);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        let before = tx
            .query_opt(
                "SELECT routed FROM domains WHERE name = $1 AND node = $2 AND verify_value = $3 FOR UPDATE",
                &[name, node, &checked.verify_value],
            )
            .await
            .map_err(|e| self.err(e))?;
        let Some(row) = before else { return Ok(false) };
        let routed: bool = col(self.store(), &row, 0)?;
        tx.execute(
            "UPDATE domains SET verified_at = $3, checked_at = $4, failing_since = $5, last_error = $6, routed = $7
             WHERE name = $1 AND node = $2",
            &[
                &name,
                &node,
                &state.verified_at,
                &state.checked_at,
                &state.failing_since,
                &state.last_error,
                &state.routed,
            ],
        )
        .await
        .map_err(|e| self.err(e))?;
        let mut events = Vec::new();
        if routed != state.routed {
            events.push(self.log(&tx, Change::DomainsChanged).await?);
        }
        self.commit(tx, events).await?;
        Ok(true)
    }

    async fn remove_service(&self, name: &str) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        let n = tx.execute("DELETE FROM services WHERE name = $1", &[&name]).await.map_err(|e| self.err(e))?;
        let mut events = Vec::new();
        if n > 0 {
            events.push(self.log(&tx, Change::ServicesChanged).await?);
        }
        self.commit(tx, events).await?;
        Ok(n > 0)
    }

    async fn remove_dns_records(
        &self,
        name: &str,
        kind: Option<StaticKind>,
        value: Option<&str>,
    ) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        let kind = kind.map(|k| k.as_str());
        let n = tx
            .execute(
                "DELETE FROM dns_records WHERE name = $1 AND ($2::text IS NULL OR kind = $2)
                   AND ($3::text IS NULL OR value = $3)",
                &[&name, &kind, &value],
            )
            .await
            .map_err(|e| self.err(e))?;
        let mut events = Vec::new();
        if n > 0 {
            events.push(self.log(&tx, Change::DnsRecordsChanged).await?);
        }
        self.commit(tx, events).await?;
        Ok(n as usize)
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        let client = self.client().await?;
        self.counts_in(&client).await
    }

    async fn export(&self) -> Result<Snapshot, StoreError> {
        let mut client = self.client().await?;
        let store = self.store();
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|e| self.err(e))?;
        let revision = self.revision_in(&tx).await?;
        let nodes = self.nodes_in(&tx, None).await?;
        let samples = tx
            .query("SELECT name, at, endpoint, ok, detail FROM probe_samples ORDER BY id", &[])
            .await
            .map_err(|e| self.err(e))?
            .iter()
            .map(|r| Ok((col(store, r, 0)?, sample_row(store, r, 1)?)))
            .collect::<Result<_, StoreError>>()?;
        let transitions = tx
            .query("SELECT name, at, from_mode, to_mode, reason FROM mode_transitions ORDER BY id", &[])
            .await
            .map_err(|e| self.err(e))?
            .iter()
            .map(|r| Ok((col(store, r, 0)?, transition_row(store, r, 1)?)))
            .collect::<Result<_, StoreError>>()?;
        let challenges = self.challenges_in(&tx, None).await?;
        let dns_records = self.dns_records_in(&tx).await?;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(Snapshot { revision, nodes, samples, transitions, challenges, dns_records })
    }

    async fn import(&self, s: &Snapshot) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        // Two copies into one target at once: the second waits, then
        // finds the first's rows and refuses.
        tx.batch_execute("LOCK TABLE nodes IN EXCLUSIVE MODE").await.map_err(|e| self.err(e))?;
        let found = self.counts_in(&tx).await?;
        if !found.is_empty() {
            return Err(StoreError::NotEmpty { store: self.store().to_string(), what: found.to_string() });
        }
        let insert_node = tx
            .prepare(
                "INSERT INTO nodes (name, hostnames, token_hash, created_at, http_mode) VALUES ($1, $2, $3, $4, $5)",
            )
            .await
            .map_err(|e| self.err(e))?;
        let insert_mode = tx
            .prepare("INSERT INTO node_modes (name, mode, endpoint, since) VALUES ($1, $2, $3, $4)")
            .await
            .map_err(|e| self.err(e))?;
        for n in &s.nodes {
            tx.execute(
                &insert_node,
                &[&n.name, &n.hostnames, &n.token_hash.as_slice(), &n.created_at, &n.http_mode.as_str()],
            )
            .await
            .map_err(|e| self.err(e))?;
            if let Some(since) = n.mode_since {
                tx.execute(&insert_mode, &[&n.name, &n.mode.as_str(), &n.endpoint, &since])
                    .await
                    .map_err(|e| self.err(e))?;
            }
        }
        let statuses: Vec<(String, NodeStatus)> = s.nodes.iter().map(|n| (n.name.clone(), n.status.clone())).collect();
        self.upsert_statuses(&tx, &statuses).await?;
        let insert_sample = tx
            .prepare("INSERT INTO probe_samples (name, at, endpoint, ok, detail) VALUES ($1, $2, $3, $4, $5)")
            .await
            .map_err(|e| self.err(e))?;
        for (name, p) in &s.samples {
            tx.execute(&insert_sample, &[name, &p.at, &p.endpoint, &p.ok, &p.detail]).await.map_err(|e| self.err(e))?;
        }
        let insert_transition = tx
            .prepare("INSERT INTO mode_transitions (name, at, from_mode, to_mode, reason) VALUES ($1, $2, $3, $4, $5)")
            .await
            .map_err(|e| self.err(e))?;
        for (name, t) in &s.transitions {
            tx.execute(&insert_transition, &[name, &t.at, &t.from.as_str(), &t.to.as_str(), &t.reason])
                .await
                .map_err(|e| self.err(e))?;
        }
        let insert_challenge = tx
            .prepare("INSERT INTO acme_challenges (node, name, value, created_at) VALUES ($1, $2, $3, $4)")
            .await
            .map_err(|e| self.err(e))?;
        for c in &s.challenges {
            tx.execute(&insert_challenge, &[&c.node, &c.name, &c.value, &c.created_at])
                .await
                .map_err(|e| self.err(e))?;
        }
        for r in &s.dns_records {
            tx.execute(
                "INSERT INTO dns_records (name, kind, value, ttl, created_at) VALUES ($1, $2, $3, $4, $5)",
                &[&r.name, &r.kind.as_str(), &r.value, &i64::from(r.ttl_secs), &now()],
            )
            .await
            .map_err(|e| self.err(e))?;
        }
        // Continue from the source's revision: serials never go back.
        tx.execute("UPDATE meta SET value = GREATEST(value, $1) WHERE key = 'revision'", &[&s.revision])
            .await
            .map_err(|e| self.err(e))?;
        let event = self.log(&tx, Change::Imported).await?;
        self.commit(tx, vec![event]).await
    }

    async fn record_transition_fenced(
        &self,
        name: &str,
        t: &ModeChange,
        endpoint: Option<&str>,
        fence: &Fence,
    ) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        // The lease row locked: a successor taking it waits for this write,
        // and this write sees a successor that already took it.
        let held = tx
            .query(
                &format!(
                    "SELECT 1 FROM leases WHERE name = $1 AND holder = $2 AND token = $3 AND expires_at >= {NOW_MS}
                     FOR UPDATE"
                ),
                &[&fence.lease, &fence.holder, &fence.token],
            )
            .await
            .map_err(|e| self.err(e))?;
        if held.is_empty() || !self.exists_locked(&tx, name).await? {
            return Ok(false);
        }
        let stored =
            tx.query("SELECT mode FROM node_modes WHERE name = $1", &[&name]).await.map_err(|e| self.err(e))?;
        let current = match stored.first() {
            Some(row) => mode_col(self.store(), row, 0)?,
            None => Mode::Offline,
        };
        if current != t.from {
            return Ok(false);
        }
        self.write_transition(&tx, name, t, endpoint).await?;
        let event = self.log(&tx, Change::ModeChanged(name.to_string())).await?;
        self.commit(tx, vec![event]).await?;
        Ok(true)
    }

    async fn register_server(&self, r: &ServerRecord, lease_ms: i64) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        tx.execute(
            &format!(
                "INSERT INTO servers (id, name, quic, api, peer, fingerprint, dns, nameservers, addresses, version,
                    started_at, expires_at, gone, tunnels)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, {NOW_MS}, {NOW_MS} + $11, false, '{{}}')
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name, quic = excluded.quic, api = excluded.api,
                    peer = excluded.peer, fingerprint = excluded.fingerprint, dns = excluded.dns,
                    nameservers = excluded.nameservers, addresses = excluded.addresses, version = excluded.version,
                    started_at = excluded.started_at, expires_at = excluded.expires_at, gone = false, tunnels = '{{}}'"
            ),
            &[
                &r.id,
                &r.name,
                &r.quic,
                &r.api,
                &r.peer,
                &r.fingerprint,
                &r.dns,
                &r.nameservers,
                &r.addresses,
                &r.version,
                &lease_ms,
            ],
        )
        .await
        .map_err(|e| self.err(e))?;
        let event = self.log(&tx, Change::ServersChanged).await?;
        self.commit(tx, vec![event]).await
    }

    async fn renew_server(&self, id: &str, lease_ms: i64, tunnels: &[String]) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let tunnels = tunnels.to_vec();
        let n = client
            .execute(
                &format!("UPDATE servers SET expires_at = {NOW_MS} + $2, tunnels = $3 WHERE id = $1 AND NOT gone"),
                &[&id, &lease_ms, &tunnels],
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }

    async fn expire_servers(&self) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        // Row locks make two servers' calls take turns: a row declared gone
        // by the first no longer matches for the second.
        let n = tx
            .execute(&format!("UPDATE servers SET gone = true WHERE NOT gone AND expires_at < {NOW_MS}"), &[])
            .await
            .map_err(|e| self.err(e))?;
        let events = if n > 0 { vec![self.log(&tx, Change::ServersChanged).await?] } else { Vec::new() };
        self.commit(tx, events).await?;
        Ok(n as usize)
    }

    async fn leave_server(&self, id: &str) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        let n = tx
            .execute(
                &format!("UPDATE servers SET gone = true, expires_at = LEAST(expires_at, {NOW_MS}) WHERE id = $1 AND NOT gone"),
                &[&id],
            )
            .await
            .map_err(|e| self.err(e))?;
        // Expired, not deleted: fencing tokens keep counting up.
        tx.execute(&format!("UPDATE leases SET expires_at = {NOW_MS} - 1 WHERE holder = $1"), &[&id])
            .await
            .map_err(|e| self.err(e))?;
        let events = if n > 0 { vec![self.log(&tx, Change::ServersChanged).await?] } else { Vec::new() };
        self.commit(tx, events).await
    }

    async fn remove_server(&self, id: &str) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        let n = tx.execute("DELETE FROM servers WHERE id = $1", &[&id]).await.map_err(|e| self.err(e))?;
        let events = if n > 0 { vec![self.log(&tx, Change::ServersChanged).await?] } else { Vec::new() };
        self.commit(tx, events).await?;
        Ok(n > 0)
    }

    async fn list_servers(&self) -> Result<ServerList, StoreError> {
        let client = self.client().await?;
        let revision = self.revision_in(&client).await?;
        let rows = client.query(&format!("{SELECT_SERVERS} ORDER BY name, id"), &[]).await.map_err(|e| self.err(e))?;
        let servers = rows.iter().map(|r| server_row(self.store(), r)).collect::<Result<_, _>>()?;
        Ok(ServerList { revision, servers })
    }

    async fn acquire_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<Option<i64>, StoreError> {
        let client = self.client().await?;
        // One statement: taken when free or run out, renewed by its holder;
        // the token moves only when the holder changes or its lease ran out.
        let rows = client
            .query(
                &format!(
                    "INSERT INTO leases AS l (name, holder, token, expires_at) VALUES ($1, $2, 1, {NOW_MS} + $3)
                     ON CONFLICT (name) DO UPDATE SET
                        token = CASE WHEN l.holder = excluded.holder AND l.expires_at >= {NOW_MS}
                            THEN l.token ELSE l.token + 1 END,
                        holder = excluded.holder, expires_at = excluded.expires_at
                     WHERE l.holder = excluded.holder OR l.expires_at < {NOW_MS}
                     RETURNING token"
                ),
                &[&name, &holder, &ttl_ms],
            )
            .await
            .map_err(|e| self.err(e))?;
        match rows.first() {
            Some(row) => Ok(Some(col(self.store(), row, 0)?)),
            None => Ok(None),
        }
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                &format!("UPDATE leases SET expires_at = {NOW_MS} - 1 WHERE name = $1 AND holder = $2"),
                &[&name, &holder],
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn lease(&self, name: &str) -> Result<Option<Lease>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(&format!("SELECT name, holder, token, expires_at - {NOW_MS} FROM leases WHERE name = $1"), &[&name])
            .await
            .map_err(|e| self.err(e))?;
        let store = self.store();
        rows.first()
            .map(|r| {
                Ok(Lease {
                    name: col(store, r, 0)?,
                    holder: col(store, r, 1)?,
                    token: col(store, r, 2)?,
                    left_ms: col(store, r, 3)?,
                })
            })
            .transpose()
    }

    async fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        let client = self.client().await?;
        let rows = client.query("SELECT value FROM settings WHERE key = $1", &[&key]).await.map_err(|e| self.err(e))?;
        rows.first().map(|r| col(self.store(), r, 0)).transpose()
    }

    async fn init_setting(&self, key: &str, value: &str) -> Result<String, StoreError> {
        let client = self.client().await?;
        client
            .execute("INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING", &[&key, &value])
            .await
            .map_err(|e| self.err(e))?;
        let row =
            client.query_one("SELECT value FROM settings WHERE key = $1", &[&key]).await.map_err(|e| self.err(e))?;
        col(self.store(), &row, 0)
    }

    async fn lock_order(&self, node: &str, wait: Duration) -> Result<OrderLock, StoreError> {
        let key = super::cluster::order_lock_key(node);
        // Its own connection, outside the pool: an order lasts minutes and
        // must not hold one of the pool's few connections, and a
        // session-level lock is not cut by a server's idle-in-transaction
        // timeout. Closing the connection (dropping the guard) frees it.
        type Driver = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let connected = match &self.tls {
            Tls::Off => self
                .options
                .config
                .connect(tokio_postgres::NoTls)
                .await
                .map(|(c, conn)| (c, Box::pin(drive(conn, tx)) as Driver)),
            Tls::On(tls) => {
                self.options.config.connect(tls.clone()).await.map(|(c, conn)| (c, Box::pin(drive(conn, tx)) as Driver))
            }
        };
        let (client, driver) = connected.map_err(|e| self.err(e))?;
        let held = HeldConnection { client, _driver: AbortOnDrop(tokio::spawn(driver)) };
        let give_up = tokio::time::Instant::now() + wait;
        loop {
            let row =
                held.client.query_one("SELECT pg_try_advisory_lock($1)", &[&key]).await.map_err(|e| self.err(e))?;
            if col::<bool>(self.store(), &row, 0)? {
                return Ok(OrderLock::held(Box::new(held)));
            }
            if tokio::time::Instant::now() + ORDER_LOCK_RETRY > give_up {
                return Err(StoreError::Conflict(format!(
                    "another server is ordering a certificate for node {node:?}; try again later"
                )));
            }
            tokio::time::sleep(ORDER_LOCK_RETRY).await;
        }
    }

    fn subscribe(&self) -> broadcast::Receiver<FeedEvent> {
        self.events.subscribe()
    }

    fn watch(&self, since: i64, shutdown: CancellationToken) -> BoxFuture<'static, ()> {
        let feed = Feed {
            config: self.options.config.clone(),
            describe: self.options.describe.clone(),
            tls: self.tls.clone(),
            events: self.events.clone(),
        };
        Box::pin(feed.run(since, shutdown))
    }
}

/// The `LISTEN` connection.
struct Feed {
    config: tokio_postgres::Config,
    describe: String,
    tls: Tls,
    events: broadcast::Sender<FeedEvent>,
}

/// Why a feed connection ended.
enum FeedEnd {
    Shutdown,
    Lost(String),
}

impl Feed {
    async fn run(self, since: i64, shutdown: CancellationToken) {
        let mut backoff = FEED_BACKOFF_MIN;
        let mut ever_listened = false;
        let mut warned = false;
        loop {
            let mut listened = false;
            match self.session(since, !ever_listened, &shutdown, &mut listened).await {
                FeedEnd::Shutdown => return,
                // One warning per outage, not one per attempt.
                FeedEnd::Lost(why) if listened || !warned => {
                    tracing::warn!(store = %self.describe, error = %why,
                        "change feed unavailable; serving from memory and reconnecting");
                    warned = true;
                }
                FeedEnd::Lost(why) => {
                    tracing::debug!(store = %self.describe, error = %why, "change feed reconnect failed")
                }
            }
            ever_listened |= listened;
            backoff = if listened { FEED_BACKOFF_MIN } else { (backoff * 2).min(FEED_BACKOFF_MAX) };
            let jitter = Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 / 4 + 1));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff + jitter) => {}
            }
        }
    }

    /// One connection: connect, `LISTEN`, then forward notifications until
    /// the connection fails or `shutdown`.
    async fn session(&self, since: i64, first: bool, shutdown: &CancellationToken, listened: &mut bool) -> FeedEnd {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        type Driver = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
        let connected = match &self.tls {
            Tls::Off => self
                .config
                .connect(tokio_postgres::NoTls)
                .await
                .map(|(c, conn)| (c, Box::pin(drive(conn, tx)) as Driver)),
            Tls::On(tls) => {
                self.config.connect(tls.clone()).await.map(|(c, conn)| (c, Box::pin(drive(conn, tx)) as Driver))
            }
        };
        let (client, driver) = match connected {
            Ok(pair) => pair,
            Err(e) => return FeedEnd::Lost(error_text(&e)),
        };
        let driver = tokio::spawn(driver);
        let _abort = AbortOnDrop(driver);
        if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
            return FeedEnd::Lost(error_text(&e));
        }
        // Listening now, so nothing from here on is missed. What happened
        // before: after a reconnect anything may have; at first, only what
        // came after the subscriber's load at `since`.
        let revision = match client.query_one("SELECT value FROM meta WHERE key = 'revision'", &[]).await {
            Ok(row) => row.try_get::<_, i64>(0).unwrap_or(i64::MAX),
            Err(e) => return FeedEnd::Lost(error_text(&e)),
        };
        if !first || revision != since {
            let _ = self.events.send(FeedEvent::Resync);
        }
        *listened = true;
        tracing::info!(store = %self.describe, revision, "change feed listening");
        let mut check = tokio::time::interval(FEED_CHECK);
        check.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return FeedEnd::Shutdown,
                payload = rx.recv() => match payload {
                    // Our own events come back too: a write whose caller
                    // stopped waiting (or whose commit reply was lost) was
                    // never announced locally. A repeat costs a re-read.
                    Some(Ok(payload)) => match ChangeEvent::decode(&payload) {
                        Some(event) => { let _ = self.events.send(FeedEvent::Change(event)); }
                        None => {
                            tracing::warn!(store = %self.describe, payload = %edge_net::logging::Untrusted(&payload),
                                "unreadable change notification; resyncing");
                            let _ = self.events.send(FeedEvent::Resync);
                        }
                    },
                    Some(Err(why)) => return FeedEnd::Lost(why),
                    None => return FeedEnd::Lost("connection closed".into()),
                },
                _ = check.tick() => {
                    // A silent network failure shows up here, not in the driver.
                    match tokio::time::timeout(FEED_CHECK, client.simple_query("SELECT 1")).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return FeedEnd::Lost(error_text(&e)),
                        Err(_) => return FeedEnd::Lost("no answer to a liveness check".into()),
                    }
                }
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Polls the connection, passing notifications (and the error that ends
/// it) to the session.
async fn drive<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    out: tokio::sync::mpsc::UnboundedSender<Result<String, String>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    use futures_util::StreamExt;
    while let Some(message) = messages.next().await {
        match message {
            Ok(tokio_postgres::AsyncMessage::Notification(n)) if n.channel() == CHANNEL => {
                if out.send(Ok(n.payload().to_string())).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                let _ = out.send(Err(error_text(&e)));
                return;
            }
        }
    }
}

mod accounts;
