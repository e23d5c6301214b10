//! Real TLS clients (rustls, curl) for the data path.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A client config trusting the CA certificates in `ca_file`.
pub fn client_config(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in edge_certs::pem::load_certs(ca_file)? {
        roots.add(cert)?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Connects and completes a TLS handshake for `sni` through `addr`.
pub async fn connect(addr: SocketAddr, sni: &str, config: Arc<rustls::ClientConfig>) -> Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await.context("tcp connect")?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(sni.to_string())?;
    let tls =
        tokio::time::timeout(Duration::from_secs(10), tokio_rustls::TlsConnector::from(config).connect(name, tcp))
            .await
            .context("TLS handshake timed out")?
            .context("TLS handshake")?;
    Ok(tls)
}

/// One HTTP/1.1 GET with `Connection: close`: (status, body).
pub async fn https_get(
    addr: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
    path: &str,
) -> Result<(u16, String)> {
    let mut tls = connect(addr, sni, config).await?;
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut buf)).await.context("response timed out")??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let Some((_, body)) = text.split_once("\r\n\r\n") else { bail!("no HTTP response: {text:?}") };
    Ok((status, body.to_string()))
}

/// The first flight (ClientHello) rustls sends for `sni`.
pub fn client_hello(sni: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from(sni.to_string()).expect("name"))
            .expect("client connection");
    let mut out = Vec::new();
    conn.write_tls(&mut out).expect("write_tls");
    out
}

/// Reads until EOF, reset or `limit`; returns the bytes and how it ended.
pub async fn read_until_closed(tcp: &mut TcpStream, limit: Duration) -> (Vec<u8>, Closed) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return (out, Closed::StillOpen),
            Ok(Ok(0)) => return (out, Closed::Eof),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => return (out, Closed::Reset),
        }
    }
}

/// How a connection ended in [`read_until_closed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// FIN.
    Eof,
    /// RST or other error.
    Reset,
    /// Still open at the deadline.
    StillOpen,
}

/// curl with only `root` trusted (no -k), to `host` through a server's TLS
/// listener `tls` on 127.0.0.1: (success, body, stderr).
pub fn curl_verified(root: &Path, host: &str, tls: SocketAddr) -> (bool, String, String) {
    let out = std::process::Command::new("curl")
        .args(["-s", "--max-time", "10", "--cacert"])
        .arg(root)
        .args(["--resolve", &format!("{host}:{}:127.0.0.1", tls.port())])
        .arg(format!("https://{host}:{}/", tls.port()))
        .output();
    match out {
        Ok(out) => (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ),
        Err(e) => (false, String::new(), format!("running curl: {e}")),
    }
}
