//! Pebble, Let's Encrypt's ACME test server (Debian package `pebble`),
//! started on loopback with `-dnsserver` pointed at edge-server's DNS.
//!
//! Debian ships no certificate for Pebble's own HTTPS listener, so the
//! harness makes a CA and a leaf for 127.0.0.1/localhost; ACME clients trust
//! that CA (`root_ca_file`). Pebble's issuing root, which clients of the
//! nodes must trust, comes from its management endpoint (`/roots/0`).
//! Pebble cannot listen on port 0, so free ports are picked just before it
//! starts.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{wait_for, Proc};

/// A running Pebble.
#[derive(Debug)]
pub struct Pebble {
    /// The process.
    pub proc: Proc,
    /// ACME directory URL.
    pub directory: String,
    /// CA of Pebble's own HTTPS listener (for `root_ca_file`).
    pub listener_ca: PathBuf,
    /// Management address (roots, intermediates).
    pub management: SocketAddr,
    /// ACME listener address.
    pub listen: SocketAddr,
    dir: PathBuf,
}

/// A loopback port free right now, for a process that binds it later.
/// Taken below the kernel's ephemeral range when possible: a port from
/// `bind(:0)` is free only until the kernel hands it out again as the
/// source port of some connection, which on a busy test machine happened
/// before Pebble bound it ("address already in use").
pub fn free_port() -> Result<u16> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if ephemeral_low > 12_000 {
        let span = u32::from(ephemeral_low - 10_000);
        for _ in 0..64 {
            let port = 10_000 + (rand::random::<u32>() % span) as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
            {
                return Ok(port);
            }
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Writes a CA and a leaf for 127.0.0.1/localhost into `dir`: (CA, leaf,
/// key) paths.
pub fn listener_certs(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "edge test Pebble listener CA");
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    let leaf = params.signed_by(&key, &issuer)?;
    let (ca_path, cert_path, key_path) =
        (dir.join("listener-ca.pem"), dir.join("listener.pem"), dir.join("listener.key"));
    std::fs::write(&ca_path, ca.pem())?;
    std::fs::write(&cert_path, leaf.pem())?;
    std::fs::write(&key_path, key.serialize_pem())?;
    Ok((ca_path, cert_path, key_path))
}

impl Pebble {
    /// The directory URL Pebble will serve once started on `port`.
    pub fn directory_for(port: u16) -> String {
        format!("https://127.0.0.1:{port}/dir")
    }

    /// Starts Pebble in `dir` on `port` (see [`free_port`]), validating
    /// DNS-01 against `dns`.
    pub fn start(dir: &Path, port: u16, dns: SocketAddr) -> Result<Self> {
        Self::start_with_tls_port(dir, port, dns, free_port()?)
    }

    /// [`Pebble::start`] validating TLS-ALPN-01 on `tls_port` (an
    /// edge-server's TLS listener, which routes the validation to a node).
    pub fn start_with_tls_port(dir: &Path, port: u16, dns: SocketAddr, tls_port: u16) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let (listener_ca, cert, key) = listener_certs(dir)?;
        let management: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let listen: SocketAddr = ([127, 0, 0, 1], port).into();
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": listen.to_string(),
                "managementListenAddress": management.to_string(),
                "certificate": cert,
                "privateKey": key,
                "httpPort": free_port()?,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }
        });
        let config_path = dir.join("pebble-config.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
        let mut cmd = Command::new("pebble");
        cmd.arg("-config").arg(&config_path).arg("-dnsserver").arg(dns.to_string());
        // Validate at once instead of sleeping up to 15 s per challenge.
        cmd.env("PEBBLE_VA_NOSLEEP", "1");
        cmd.current_dir(dir);
        let n = std::fs::read_dir(dir)?.count();
        let mut proc = Proc::spawn(cmd, dir.join(format!("pebble-{n}.log")))?;
        let directory = Self::directory_for(port);
        let ca = listener_ca.clone();
        let up = wait_for("Pebble directory", Duration::from_secs(20), || {
            if !proc.alive() {
                return Some(false);
            }
            let out = Command::new("curl")
                .args(["-sf", "--max-time", "2", "--cacert"])
                .arg(&ca)
                .arg(&directory)
                .output()
                .ok()?;
            out.status.success().then_some(true)
        })?;
        if !up {
            bail!("pebble exited at start:\n{}", proc.log_text());
        }
        Ok(Self { proc, directory, listener_ca, management, listen, dir: dir.to_path_buf() })
    }

    /// Pebble's issuing root (regenerated at every start), written to a file.
    pub fn issuing_root(&self) -> Result<PathBuf> {
        let path = self.dir.join("issuing-root.pem");
        let out = Command::new("curl")
            .args(["-sf", "--max-time", "5", "--cacert"])
            .arg(&self.listener_ca)
            .arg(format!("https://{}/roots/0", self.management))
            .output()
            .context("running curl")?;
        if !out.status.success() || out.stdout.is_empty() {
            bail!("fetching Pebble's root failed");
        }
        std::fs::write(&path, &out.stdout)?;
        Ok(path)
    }
}
