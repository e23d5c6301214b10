//! A private PostgreSQL cluster for tests: `initdb` into a temporary
//! directory, `pg_ctl start` on a free loopback port, torn down on drop.
//! As root, every server command runs as the `postgres` account (through
//! `runuser`): PostgreSQL refuses to run as root.
//!
//! The superuser `edge` has a password (in [`Postgres::password_file`]);
//! TCP connections must present it (scram-sha-256), so tests exercise the
//! password path the server uses in production.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// The password of the `edge` superuser.
pub const PASSWORD: &str = "edge-test-password";

/// A running private cluster.
#[derive(Debug)]
pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    /// The TCP port (on 127.0.0.1).
    pub port: u16,
    /// With TLS on: the CA that signed the server's certificate.
    pub ca: Option<PathBuf>,
    as_postgres: bool,
    _tmp: tempfile::TempDir,
}

/// The newest installed server's `bin` directory.
fn bin_dir() -> Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (Debian package postgresql)")?
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, p)| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p).context("no initdb under /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

fn chown_postgres(path: &Path) -> Result<()> {
    let ok = Command::new("chown").args(["-R", "postgres:postgres"]).arg(path).status()?.success();
    if !ok {
        bail!("chown postgres {} failed (is there a postgres account?)", path.display());
    }
    Ok(())
}

impl Postgres {
    /// Starts a cluster without TLS.
    pub fn start() -> Result<Self> {
        Self::launch(false)
    }

    /// Starts a cluster that also accepts TLS, with a certificate for
    /// 127.0.0.1 and localhost signed by [`Postgres::ca`].
    pub fn start_tls() -> Result<Self> {
        Self::launch(true)
    }

    fn launch(tls: bool) -> Result<Self> {
        let bin = bin_dir()?;
        let tmp = tempfile::Builder::new().prefix("edge-pg-").tempdir()?;
        let dir = tmp.path().to_path_buf();
        let as_postgres = is_root();
        let pwfile = dir.join("password");
        std::fs::write(&pwfile, format!("{PASSWORD}\n"))?;
        let ca = if tls {
            let (ca, cert, key) = crate::pebble::listener_certs(&dir)?;
            std::fs::rename(&cert, dir.join("server.crt"))?;
            std::fs::rename(&key, dir.join("server.key"))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.join("server.key"), std::fs::Permissions::from_mode(0o600))?;
            Some(ca)
        } else {
            None
        };
        if as_postgres {
            chown_postgres(&dir)?;
        }
        let mut pg = Self { dir, bin, port: 0, ca, as_postgres, _tmp: tmp };
        let data = pg.dir.join("data");
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "edge", "-E", "UTF8", "--no-sync", "--auth-local=trust", "--auth-host=scram-sha-256"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut conf = format!(
            "listen_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = off\nsynchronous_commit = off\n\
             full_page_writes = off\nmax_connections = 200\nshared_buffers = 32MB\n",
            pg.dir.display()
        );
        if tls {
            conf.push_str(&format!(
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                pg.dir.join("server.crt").display(),
                pg.dir.join("server.key").display()
            ));
        }
        let path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path)?;
        text.push_str(&conf);
        std::fs::write(&path, text)?;
        // A free port can be taken between the probe and the start: retry.
        let mut last = String::new();
        for _ in 0..3 {
            pg.port = crate::pebble::free_port()?;
            match pg.pg_ctl_start() {
                Ok(()) => return Ok(pg),
                Err(e) => last = e.to_string(),
            }
        }
        bail!("pg_ctl start failed: {last}")
    }

    fn command(&self, tool: &str) -> Command {
        if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(self.bin.join(tool));
            cmd
        } else {
            Command::new(self.bin.join(tool))
        }
    }

    fn pg_ctl_start(&self) -> Result<()> {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-o", &format!("-p {}", self.port), "-w", "-t", "30", "start"])
            .output()?;
        if !out.status.success() {
            bail!("{}{}", String::from_utf8_lossy(&out.stdout), self.log());
        }
        Ok(())
    }

    /// Stops the server (`-m fast`: clients are disconnected at once).
    pub fn stop(&self) -> Result<()> {
        let out =
            self.command("pg_ctl").arg("-D").arg(self.dir.join("data")).args(["-m", "fast", "-w", "stop"]).output()?;
        if !out.status.success() {
            bail!("pg_ctl stop failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Starts the server again on the same port, after [`Postgres::stop`].
    pub fn restart(&self) -> Result<()> {
        self.pg_ctl_start()
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// A file holding the `edge` password.
    pub fn password_file(&self) -> PathBuf {
        self.dir.join("password")
    }

    /// Creates database `name` and returns its URL (no password in it).
    pub fn create_db(&self, name: &str) -> Result<String> {
        self.sql("postgres", &format!("CREATE DATABASE {name}"))?;
        Ok(self.url(name))
    }

    /// `postgres://edge@127.0.0.1:<port>/<db>`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://edge@127.0.0.1:{}/{db}", self.port)
    }

    /// The `[store]` section of a server config for database `db`.
    pub fn store_section(&self, db: &str) -> String {
        format!(
            "[store]\nurl = \"{}\"\npassword_file = \"{}\"\nconnect_timeout_secs = 2\n",
            self.url(db),
            self.password_file().display()
        )
    }

    /// Runs SQL with psql over TCP; returns its output (unaligned, tuples only).
    pub fn sql(&self, db: &str, sql: &str) -> Result<String> {
        let out = Command::new(self.bin.join("psql"))
            .env("PGPASSWORD", PASSWORD)
            // Plain: psql's own session must not count as the server's TLS.
            .env("PGSSLMODE", "disable")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "edge", "-d", db])
            .args(["-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
            .output()?;
        if !out.status.success() {
            bail!("psql {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "-t", "10", "stop"])
            .output();
        std::thread::sleep(Duration::from_millis(10));
    }
}
