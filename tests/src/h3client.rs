//! A Rust HTTP/3 client on quinn and h3, for the end-to-end tests and the
//! benchmark: it reaches a node through the server's QUIC client listener,
//! trusting only the node's certificate authority.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, Bytes};

/// One HTTP/3 connection.
pub struct H3Client {
    /// The client's endpoint (rebind it to move the client).
    pub endpoint: quinn::Endpoint,
    /// The QUIC connection.
    pub conn: quinn::Connection,
    send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    driver: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for H3Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H3Client").field("remote", &self.conn.remote_address()).finish_non_exhaustive()
    }
}

/// A client TLS config trusting the CA in `ca` (PEM), offering `h3`. The
/// provider prefers X25519MLKEM768, so the ClientHello spans several
/// Initial packets.
pub fn client_config(ca: &Path) -> Result<quinn::ClientConfig> {
    let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile_certs(&pem)? {
        roots.add(cert)?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

fn rustls_pemfile_certs(pem: &[u8]) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(pem).collect::<Result<_, _>>()?;
    if certs.is_empty() {
        bail!("no certificate in the CA file");
    }
    Ok(certs)
}

impl H3Client {
    /// Connects to `server` (the QUIC client listener) for `name`.
    pub async fn connect(server: SocketAddr, name: &str, config: quinn::ClientConfig) -> Result<Self> {
        let bind: SocketAddr = if server.is_ipv6() { "[::1]:0".parse()? } else { "127.0.0.1:0".parse()? };
        let mut endpoint = quinn::Endpoint::client(bind)?;
        endpoint.set_default_client_config(config);
        let conn = tokio::time::timeout(std::time::Duration::from_secs(10), endpoint.connect(server, name)?)
            .await
            .map_err(|_| anyhow!("QUIC handshake with {name} via {server} timed out"))??;
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn.clone()))
            .await
            .map_err(|e| anyhow!("HTTP/3 connection setup: {e:?}"))?;
        let driver = tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        Ok(Self { endpoint, conn, send, driver })
    }

    /// GETs `path` with `name` as the authority: (status, body).
    pub async fn get(&self, name: &str, path: &str) -> Result<(u16, Vec<u8>)> {
        self.get_with(name, path, |_| {}).await
    }

    /// [`H3Client::get`], calling `progress` with the bytes received so far
    /// after each chunk.
    pub async fn get_with(&self, name: &str, path: &str, mut progress: impl FnMut(usize)) -> Result<(u16, Vec<u8>)> {
        let mut send = self.send.clone();
        let request = http::Request::get(format!("https://{name}{path}")).body(())?;
        // h3's errors can display as nothing: their Debug form says more.
        let h3 = |step: &'static str| move |e: h3::error::StreamError| anyhow!("HTTP/3 request, {step}: {e:?}");
        let mut stream = send.send_request(request).await.map_err(h3("sending"))?;
        // A server may stop the request side with H3_NO_ERROR once it has
        // answered (RFC 9114 §4.1): the answer is still there to read.
        if let Err(e) = stream.finish().await {
            if !matches!(e, h3::error::StreamError::RemoteTerminate { code, .. } if code == h3::error::Code::H3_NO_ERROR)
            {
                return Err(h3("finishing")(e));
            }
        }
        let response = stream.recv_response().await.map_err(h3("response head"))?;
        let mut body = Vec::new();
        while let Some(mut chunk) = stream.recv_data().await.map_err(h3("response body"))? {
            let n = chunk.remaining();
            body.extend_from_slice(&chunk.copy_to_bytes(n));
            progress(body.len());
        }
        Ok((response.status().as_u16(), body))
    }

    /// Closes the connection and waits for the endpoint to be idle.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"done");
        self.driver.abort();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}
