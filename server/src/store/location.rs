//! `[store]`: which database holds the state, parsed and validated apart
//! from reading the password file, which happens only when the store opens.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::StoreError;

/// Environment variable holding the database password (when no
/// `store.password_file` is set).
pub const PASSWORD_ENV: &str = "EDGE_STORE_PASSWORD";

/// `[store]` as written in the config file.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite://<path>` (relative paths are under `data_dir`) or
    /// `postgres://user@host:port/db`. Unset: `sqlite://edge.db` in
    /// `data_dir`.
    pub url: Option<String>,
    /// File holding the PostgreSQL password (first line). Else
    /// `EDGE_STORE_PASSWORD`, else a password in the URL.
    pub password_file: Option<PathBuf>,
    /// TLS to PostgreSQL. Unset: `disable` for a loopback host or a Unix
    /// socket, `verify-full` otherwise.
    pub tls: Option<StoreTls>,
    /// PEM roots that sign the database's certificate; unset: the system's.
    pub ca_file: Option<PathBuf>,
    /// PostgreSQL connections in the pool (the change feed has one more).
    pub pool_size: usize,
    /// How long connecting (and waiting for a pooled connection) may take
    /// before a write fails as unavailable.
    pub connect_timeout_secs: u64,
    /// How often SQLite's change log is read for other processes' writes.
    pub poll_ms: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: None,
            password_file: None,
            tls: None,
            ca_file: None,
            pool_size: 8,
            connect_timeout_secs: 5,
            poll_ms: 500,
        }
    }
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &self.url.as_deref().map(mask_url))
            .field("password_file", &self.password_file)
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout_secs", &self.connect_timeout_secs)
            .field("poll_ms", &self.poll_ms)
            .finish()
    }
}

/// TLS to PostgreSQL, named after libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoreTls {
    /// Plain TCP (loopback or a trusted network only).
    Disable,
    /// TLS; the certificate must chain to the roots, any name.
    VerifyCa,
    /// TLS; the certificate must chain to the roots and name the host.
    VerifyFull,
}

/// Where the store is, resolved.
#[derive(Debug)]
pub enum StoreLocation {
    /// An SQLite file.
    Sqlite {
        /// The database file.
        path: PathBuf,
    },
    /// A PostgreSQL database.
    Postgres(Box<PostgresOptions>),
}

/// How to reach PostgreSQL.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Driver settings, password included (its `Debug` redacts it).
    pub config: tokio_postgres::Config,
    /// `postgres://user@host:port/db`, for logs and errors.
    pub describe: String,
    /// TLS mode.
    pub tls: StoreTls,
    /// Roots for TLS; `None`: the system's.
    pub ca_file: Option<PathBuf>,
    /// Pool size.
    pub pool_size: usize,
    /// Connect and pool wait timeout.
    pub connect_timeout: Duration,
}

enum Scheme<'a> {
    Sqlite(&'a str),
    Postgres,
}

fn scheme(url: &str) -> Result<Scheme<'_>, String> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err("store.url: sqlite:// needs a file path, as in sqlite:///var/lib/edge/edge.db".into());
        }
        Ok(Scheme::Sqlite(path))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Scheme::Postgres)
    } else {
        Err(format!(
            "store.url = {:?}: must start with sqlite:// or postgres:// (as in postgres://edge@db.internal:5432/edge)",
            mask_url(url)
        ))
    }
}

fn parse_postgres(url: &str) -> Result<tokio_postgres::Config, String> {
    if url.contains("sslmode=") {
        return Err("store.url: set TLS with store.tls (disable, verify-ca, verify-full), not sslmode".into());
    }
    let config: tokio_postgres::Config = url.parse().map_err(|e| format!("store.url = {:?}: {e}", mask_url(url)))?;
    if config.get_hosts().is_empty() {
        return Err(format!("store.url = {:?}: no host", mask_url(url)));
    }
    if config.get_user().is_none() {
        return Err(format!("store.url = {:?}: no user (postgres://USER@host/db)", mask_url(url)));
    }
    if config.get_dbname().is_none() {
        return Err(format!("store.url = {:?}: no database name (postgres://user@host/DB)", mask_url(url)));
    }
    Ok(config)
}

impl StoreConfig {
    /// Checks every field; errors name it.
    pub fn validate(&self) -> Result<(), String> {
        let postgres = match self.url.as_deref().map(scheme).transpose()? {
            Some(Scheme::Postgres) => {
                parse_postgres(self.url.as_deref().unwrap_or_default())?;
                true
            }
            Some(Scheme::Sqlite(_)) | None => false,
        };
        if !postgres {
            for (set, field) in [
                (self.password_file.is_some(), "store.password_file"),
                (self.tls.is_some(), "store.tls"),
                (self.ca_file.is_some(), "store.ca_file"),
            ] {
                if set {
                    return Err(format!("{field} applies to a postgres:// store.url only"));
                }
            }
        }
        if self.tls == Some(StoreTls::Disable) && self.ca_file.is_some() {
            return Err("store.ca_file is set but store.tls = \"disable\"".into());
        }
        // Any publicly trusted certificate chains to the system roots, and
        // verify-ca ignores the name: only the operator's own CA means
        // anything there.
        if self.tls == Some(StoreTls::VerifyCa) && self.ca_file.is_none() {
            return Err(
                "store.tls = \"verify-ca\" needs store.ca_file (the CA that signs the database's certificate)".into()
            );
        }
        if postgres && self.tls.is_some_and(|t| t != StoreTls::Disable) {
            let config = parse_postgres(self.url.as_deref().unwrap_or_default())?;
            if config.get_hosts().iter().any(|h| matches!(h, tokio_postgres::config::Host::Unix(_))) {
                return Err("store.tls: TLS does not apply to a Unix socket host; use tls = \"disable\"".into());
            }
        }
        if !(1..=256).contains(&self.pool_size) {
            return Err(format!("store.pool_size = {}: must be 1 to 256", self.pool_size));
        }
        if !(1..=300).contains(&self.connect_timeout_secs) {
            return Err(format!("store.connect_timeout_secs = {}: must be 1 to 300", self.connect_timeout_secs));
        }
        if !(50..=60_000).contains(&self.poll_ms) {
            return Err(format!("store.poll_ms = {}: must be 50 to 60000", self.poll_ms));
        }
        Ok(())
    }

    /// Where the store is. Reads the password file or environment.
    pub fn location(&self, data_dir: &Path) -> Result<StoreLocation, StoreError> {
        let url = match &self.url {
            None => return Ok(StoreLocation::Sqlite { path: data_dir.join("edge.db") }),
            Some(url) => url,
        };
        match scheme(url).map_err(StoreError::Invalid)? {
            Scheme::Sqlite(path) => Ok(StoreLocation::Sqlite { path: data_dir.join(path) }),
            Scheme::Postgres => {
                let mut config = parse_postgres(url).map_err(StoreError::Invalid)?;
                if let Some(file) = &self.password_file {
                    let text = std::fs::read_to_string(file)
                        .map_err(|e| StoreError::Invalid(format!("store.password_file {}: {e}", file.display())))?;
                    config.password(text.lines().next().unwrap_or_default());
                } else if let Ok(password) = std::env::var(PASSWORD_ENV) {
                    config.password(password);
                }
                let loopback = config.get_hosts().iter().all(|h| match h {
                    tokio_postgres::config::Host::Tcp(name) => {
                        name == "localhost" || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
                    }
                    tokio_postgres::config::Host::Unix(_) => true,
                });
                let tls = self.tls.unwrap_or(if loopback { StoreTls::Disable } else { StoreTls::VerifyFull });
                let connect_timeout = Duration::from_secs(self.connect_timeout_secs);
                config.connect_timeout(connect_timeout);
                config.application_name("edge-server");
                // TLS is required, never "preferred": a server (or a man in
                // the middle) answering "no TLS" must not get a plaintext
                // session and the password.
                config.ssl_mode(match tls {
                    StoreTls::Disable => tokio_postgres::config::SslMode::Disable,
                    StoreTls::VerifyCa | StoreTls::VerifyFull => tokio_postgres::config::SslMode::Require,
                });
                // A database that vanishes without closing (a partition)
                // must fail statements within seconds, not after the
                // kernel's retransmission timeout of many minutes.
                config.keepalives_idle(Duration::from_secs(10));
                config.keepalives_interval(Duration::from_secs(2));
                config.keepalives_retries(3);
                config.tcp_user_timeout(connect_timeout * 2);
                Ok(StoreLocation::Postgres(Box::new(PostgresOptions {
                    describe: describe_postgres(&config),
                    config,
                    tls,
                    ca_file: self.ca_file.clone(),
                    pool_size: self.pool_size,
                    connect_timeout,
                })))
            }
        }
    }
}

/// `postgres://user@host:port/db`: what logs and errors name.
pub fn describe_postgres(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) if h.contains(':') => format!("[{h}]"),
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => String::new(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{host}:{port}/{}",
        config.get_user().unwrap_or_default(),
        config.get_dbname().unwrap_or_default()
    )
}

/// The URL with any password replaced by `***`. The credentials end at
/// the first `@`, as the driver reads them, so a password holding `/`, `?`
/// or `:` is masked whole.
pub fn mask_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> StoreConfig {
        StoreConfig { url: Some(url.into()), ..Default::default() }
    }

    #[test]
    fn passwords_are_masked() {
        assert_eq!(mask_url("postgres://edge:s3cret@db:5432/edge"), "postgres://edge:***@db:5432/edge");
        assert_eq!(mask_url("postgres://edge:pa/ss?x@db/edge"), "postgres://edge:***@db/edge");
        assert_eq!(mask_url("postgres://edge:a:b@db/edge?x=1"), "postgres://edge:***@db/edge?x=1");
        assert_eq!(mask_url("postgres://edge@db/edge"), "postgres://edge@db/edge");
        assert_eq!(mask_url("sqlite:///var/lib/edge.db"), "sqlite:///var/lib/edge.db");
        let c = config("postgres://edge:s3cret@db/edge");
        assert!(!format!("{c:?}").contains("s3cret"), "{c:?}");
    }

    #[test]
    fn urls_resolve() {
        let dir = Path::new("/data");
        let loc = StoreConfig::default().location(dir).unwrap();
        assert!(matches!(loc, StoreLocation::Sqlite { path } if path == Path::new("/data/edge.db")));
        let loc = config("sqlite://state/e.db").location(dir).unwrap();
        assert!(matches!(loc, StoreLocation::Sqlite { path } if path == Path::new("/data/state/e.db")));
        let loc = config("sqlite:///abs/e.db").location(dir).unwrap();
        assert!(matches!(loc, StoreLocation::Sqlite { path } if path == Path::new("/abs/e.db")));
        let StoreLocation::Postgres(pg) = config("postgres://edge@127.0.0.1:5433/edge").location(dir).unwrap() else {
            panic!("not postgres");
        };
        assert_eq!(pg.describe, "postgres://edge@127.0.0.1:5433/edge");
        assert_eq!(pg.tls, StoreTls::Disable, "loopback defaults to plain");
        let StoreLocation::Postgres(pg) = config("postgres://edge@db.internal/edge").location(dir).unwrap() else {
            panic!("not postgres");
        };
        assert_eq!(pg.tls, StoreTls::VerifyFull, "a remote host defaults to verified TLS");
        assert_eq!(pg.describe, "postgres://edge@db.internal:5432/edge");
    }

    #[test]
    fn password_file_wins() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
        let c = StoreConfig { password_file: Some(file), ..config("postgres://edge:in-url@db/edge") };
        let StoreLocation::Postgres(pg) = c.location(dir.path()).unwrap() else { panic!() };
        assert_eq!(pg.config.get_password(), Some(&b"from-file"[..]));
        let c = StoreConfig { password_file: Some(dir.path().join("missing")), ..config("postgres://edge@db/edge") };
        let err = c.location(dir.path()).unwrap_err().to_string();
        assert!(err.contains("store.password_file"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        for (c, field) in [
            (config("mysql://x@y/z"), "store.url"),
            (config("sqlite://"), "store.url"),
            (config("postgres://db/edge"), "store.url"),
            (config("postgres://edge@db"), "store.url"),
            (config("postgres://edge@db/edge?sslmode=require"), "store.tls"),
            (StoreConfig { pool_size: 0, ..config("postgres://e@db/e") }, "store.pool_size"),
            (StoreConfig { connect_timeout_secs: 0, ..Default::default() }, "store.connect_timeout_secs"),
            (StoreConfig { poll_ms: 1, ..Default::default() }, "store.poll_ms"),
            (StoreConfig { password_file: Some("p".into()), ..Default::default() }, "store.password_file"),
            (
                StoreConfig { tls: Some(StoreTls::Disable), ca_file: Some("ca".into()), ..config("postgres://e@db/e") },
                "store.ca_file",
            ),
            (StoreConfig { tls: Some(StoreTls::VerifyCa), ..config("postgres://e@db/e") }, "store.ca_file"),
            (
                StoreConfig { tls: Some(StoreTls::VerifyFull), ..config("postgres://e@%2Frun%2Fpostgresql/e") },
                "store.tls",
            ),
        ] {
            let err = c.validate().unwrap_err();
            assert!(err.contains(field), "{field}: {err}");
            assert!(!err.contains("in-url"), "{err}");
        }
        config("postgres://edge@db:5432/edge").validate().unwrap();
        StoreConfig::default().validate().unwrap();
    }
}
