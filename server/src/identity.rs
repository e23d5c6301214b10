//! The server's identity: the certificate agents pin (QUIC) and that the
//! signal API presents (HTTPS), plus the admin token.

use std::sync::Arc;

use edge_certs::store::{create_new, Sensitivity};
use rustls::sign::CertifiedKey;

use crate::config::ServerConfig;
use crate::ServerError;

/// The loaded server certificate.
#[derive(Debug)]
pub struct Identity {
    /// Chain and signing key.
    pub key: Arc<CertifiedKey>,
    /// SHA-256 of the leaf certificate, as pinned by agents.
    pub fingerprint: [u8; 32],
}

/// Loads the configured certificate, or the generated self-signed one
/// (created in the data directory on first use).
pub fn load_or_create(config: &ServerConfig) -> Result<Identity, ServerError> {
    let (cert, key) = match (&config.identity.cert_file, &config.identity.key_file) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        _ => {
            let mut names = vec!["edge-server".to_string()];
            if let Some(host) = config.public.quic.as_deref().and_then(|a| a.rsplit_once(':')).map(|(h, _)| h) {
                names.push(host.trim_matches(['[', ']']).to_string());
            }
            let pair = edge_certs::generate::server_identity(&config.data_dir, &names)?;
            (pair.cert, pair.key)
        }
    };
    let certified = edge_certs::pem::load_certified_key(&cert, &key)?;
    let fingerprint = edge_certs::fingerprint(certified.cert.first().map(|c| c.as_ref()).unwrap_or_default());
    Ok(Identity { key: Arc::new(certified), fingerprint })
}

/// The admin token: from the config, else from `<data_dir>/admin.token`,
/// generated there (mode 0600) on first use.
pub fn admin_token(config: &ServerConfig) -> Result<String, ServerError> {
    if let Some(token) = &config.admin_token {
        return Ok(token.0.clone());
    }
    let path = config.data_dir.join("admin.token");
    if let Some(token) = read_token(&path)? {
        return Ok(token);
    }
    let token = edge_proto::join::make_token("admin", &rand::random());
    // Created only if absent: of processes starting at once, one writes the
    // token and the others read that one.
    if create_new(&path, token.as_bytes(), Sensitivity::Secret)? {
        tracing::info!(path = %path.display(), "generated admin token");
        return Ok(token);
    }
    read_token(&path)?.ok_or_else(|| ServerError::Io {
        path: path.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "admin token file is empty"),
    })
}

fn read_token(path: &std::path::Path) -> Result<Option<String>, ServerError> {
    match std::fs::read_to_string(path) {
        Ok(token) if !token.trim().is_empty() => Ok(Some(token.trim().to_string())),
        Ok(_) => Err(ServerError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "admin token file is empty; delete it to have a new one generated",
            ),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ServerError::Io { path: path.to_path_buf(), source }),
    }
}

#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The identity's TLS config offering `alpn`. A client certificate is
/// asked for but not required: agents send none; peer servers send their
/// identity, which is checked against the store's live servers.
fn tls_config(identity: &Identity, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, ServerError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(crate::cluster::peers::AnyClientCert::new())
        .with_cert_resolver(Arc::new(FixedCert(identity.key.clone())));
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(config)
}

/// QUIC server config: the tunnel ALPN for agents and the peer ALPN for
/// other servers, tuned transport. Agents may open one bidirectional
/// stream (the control stream); a peer's connection is granted more once
/// it is known.
pub fn quic_server_config(
    identity: &Identity,
    tuning: &edge_net::quic::TunnelTuning,
) -> Result<quinn::ServerConfig, ServerError> {
    let tls = tls_config(identity, &[edge_proto::tunnel::ALPN, edge_proto::tunnel::PEER_ALPN])?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| ServerError::Tls(rustls::Error::General(e.to_string())))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(tuning.transport(1)));
    // Connection migration stays on (quinn's default): an agent behind a
    // NAT that rebinds keeps its tunnel. The session notices the new
    // address and resolves a `:port` endpoint again (`tunnel.rs:
    // agent_moved`), so no verified endpoint outlives the address it was
    // verified at.
    Ok(config)
}

/// TLS acceptor for the signal API.
pub fn api_acceptor(identity: &Identity) -> Result<tokio_rustls::TlsAcceptor, ServerError> {
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(tls_config(identity, &[b"http/1.1"])?)))
}

/// TLS acceptor for the admin listener: the configured `admin.cert_file`,
/// else the server identity. No client certificate is asked for, so
/// browsers never prompt for one.
pub fn admin_acceptor(
    identity: &Identity,
    admin: &crate::config::AdminConfig,
) -> Result<tokio_rustls::TlsAcceptor, ServerError> {
    let key = match (&admin.cert_file, &admin.key_file) {
        (Some(cert), Some(key)) => Arc::new(edge_certs::pem::load_certified_key(cert, key)?),
        _ => identity.key.clone(),
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(FixedCert(key)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
