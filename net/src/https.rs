//! One JSON request over HTTPS/1.1 with a bearer token: how agents talk to
//! the signal API and how a server asks another server to probe for it.
//! The caller supplies the rustls config (pinned or CA trust) and the
//! deadline; the response body is read up to a cap.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;

/// Sends `body` as JSON to `https://<addr><path>` with `Authorization:
/// Bearer <bearer>`; returns the status and at most `max_response` bytes.
#[allow(clippy::too_many_arguments)]
pub async fn json_request(
    addr: &str,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
    method: hyper::Method,
    path: &str,
    bearer: &str,
    body: &impl serde::Serialize,
    max_response: usize,
) -> Result<(hyper::StatusCode, Bytes), String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(tls);
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).map_err(|e| e.to_string())?;
    let stream = connector.connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    let driver = tokio::spawn(conn);
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr)
        .header(hyper::header::AUTHORIZATION, format!("Bearer {bearer}"))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).map_err(|e| format!("encoding the request: {e}"))?)))
        .map_err(|e| e.to_string())?;
    let result = match sender.send_request(request).await {
        Ok(response) => {
            let status = response.status();
            Limited::new(response.into_body(), max_response)
                .collect()
                .await
                .map(|b| (status, b.to_bytes()))
                .map_err(|e| format!("reading response: {e}"))
        }
        Err(e) => Err(e.to_string()),
    };
    driver.abort();
    result
}

/// A TLS 1.3-only client config builder on aws-lc-rs (every client of the
/// tunnel, the signal API and peer servers uses it).
pub fn tls13_client_builder() -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap_or_else(|_| rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13]))
}

/// A TLS 1.3 client config that accepts exactly the certificate with
/// SHA-256 `fingerprint`, offering `alpn`.
pub fn pinned_client_config(fingerprint: [u8; 32], alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut config = tls13_client_builder()
        .dangerous()
        .with_custom_certificate_verifier(crate::pinned::PinnedVerifier::new(fingerprint))
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}
